"""``vitkit data inspect``: what a folder holds and which files would break a run, all in one report.

Every image is decoded in full (a truncated JPEG only shows itself there), so the report lists every
unreadable file with its reason, instead of a training run stopping at the first one.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from vitkit.data import cifar
from vitkit.data.decode import decode_files
from vitkit.data.folder import scan_folder
from vitkit.data.sources import resolve_data_root


def _ranked(counter: Counter) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))


def inspect_folder(path: str | os.PathLike, *, workers: int | None = None) -> dict:
    """A JSON-serialisable report of an image folder: classes, counts per class and split, sizes, modes,
    formats, unreadable files with reasons, structural problems and ignored non-image files.

    An extracted CIFAR folder (or "cifar10"/"cifar100" under the data root) is reported from its batch files.
    """
    name = cifar.cifar_name(os.fspath(path))
    if name is not None and not Path(path).exists():
        return _inspect_cifar(cifar.prepare(name, resolve_data_root(), download_missing=False), name)
    name = cifar.detect_cifar_dir(Path(path))
    if name is not None:
        return _inspect_cifar(Path(path), name)
    layout = scan_folder(path)
    entries = [(split, e) for split, files in layout.splits.items() for e in files]
    results = decode_files([e.path for _, e in entries], None, workers=workers)
    sizes: Counter = Counter()
    modes: Counter = Counter()
    formats: Counter = Counter()
    unreadable = []
    for (_, entry), (_, info, reason) in zip(entries, results, strict=True):
        if reason is not None:
            unreadable.append({"path": entry.path, "reason": reason})
            continue
        file_format, mode, width, height = info
        sizes[f"{width}x{height}"] += 1
        modes[mode] += 1
        formats[file_format] += 1
    splits = {}
    for split, files in layout.splits.items():
        per_class = Counter(layout.classes[e.label] for e in files)
        splits[split] = {"total": len(files), "per_class": {c: per_class.get(c, 0) for c in layout.classes}}
    return {
        "root": str(layout.root),
        "layout": layout.layout,
        "classes": layout.classes,
        "splits": splits,
        "total": len(entries),
        "readable": len(entries) - len(unreadable),
        "sizes": _ranked(sizes),
        "modes": _ranked(modes),
        "formats": _ranked(formats),
        "unreadable": unreadable,
        "problems": layout.problems,
        "ignored_files": layout.ignored,
    }


def _inspect_cifar(path: Path, name: str) -> dict:
    data = cifar.load_cifar_dir(path, name)  # MD5-checked; a mismatch raises with the file's name
    classes = data["classes"]
    splits = {}
    for split in ("train", "test"):
        labels = data[split][1]
        counts = labels.bincount(minlength=len(classes)).tolist()
        splits[split] = {"total": len(labels), "per_class": dict(zip(classes, counts, strict=True))}
    total = sum(s["total"] for s in splits.values())
    return {
        "root": str(path),
        "layout": "cifar",
        "classes": classes,
        "splits": splits,
        "total": total,
        "readable": total,
        "sizes": {"32x32": total},
        "modes": {"RGB": total},
        "formats": {f"{cifar.CIFAR_SPECS[name].title} python": total},
        "unreadable": [],
        "problems": [],
        "ignored_files": [],
    }


def _top(counts: dict[str, int], limit: int = 8) -> str:
    items = list(counts.items())
    text = ", ".join(f"{key} ({n})" for key, n in items[:limit])
    if len(items) > limit:
        text += f", ... {len(items) - limit} more"
    return text or "-"


def format_inspection(report: dict) -> str:
    """The report of :func:`inspect_folder` as text for a terminal."""
    layout = {"splits": "ROOT/{train,val,test}/<class>/*", "classes": "ROOT/<class>/*"}.get(
        report["layout"], report["layout"]
    )
    splits = list(report["splits"])
    lines = [
        f"{report['root']}  (layout {layout})",
        f"{len(report['classes'])} classes, {report['total']} images, {report['readable']} readable",
        "",
    ]
    width = max([5, *(len(c) for c in report["classes"])])
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits))
    for name in report["classes"]:
        counts = "  ".join(f"{report['splits'][s]['per_class'][name]:>7}" for s in splits)
        lines.append(f"{name:<{width}}  {counts}")
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{report['splits'][s]['total']:>7}" for s in splits))
    lines += ["", f"sizes:   {_top(report['sizes'])}", f"modes:   {_top(report['modes'])}",
              f"formats: {_top(report['formats'])}"]  # fmt: skip
    if report["unreadable"]:
        lines += ["", f"unreadable files ({len(report['unreadable'])}):"]
        lines += [f"  {item['path']}: {item['reason']}" for item in report["unreadable"]]
    if report["problems"]:
        lines += ["", f"problems ({len(report['problems'])}):"]
        lines += [f"  {problem}" for problem in report["problems"]]
    if report["ignored_files"]:
        shown = report["ignored_files"][:10]
        more = len(report["ignored_files"]) - len(shown)
        lines += ["", f"ignored non-image files ({len(report['ignored_files'])}):"]
        lines += [f"  {path}" for path in shown]
        if more:
            lines.append(f"  ... {more} more")
    if not report["unreadable"] and not report["problems"]:
        lines += ["", "no problems found"]
    return "\n".join(lines)
