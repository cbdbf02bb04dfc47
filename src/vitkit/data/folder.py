"""Find the images and classes of a folder: ``ROOT/<class>/*`` or ``ROOT/{train,val,test}/<class>/*``.

Scanning only lists and stats files (no decoding), so it is fast enough to run on every start: its result
is the cache key. Problems are collected rather than raised here, so that ``vitkit data inspect`` can
report all of them at once; :func:`check_layout` turns them into errors for training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vitkit.data.decode import IMAGE_EXTENSIONS

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class FileEntry:
    path: str  # absolute
    relpath: str  # relative to the folder root, with "/" separators
    label: int
    size: int
    mtime_ns: int


@dataclass
class FolderLayout:
    root: Path
    layout: str  # "classes" (ROOT/<class>/*) or "splits" (ROOT/{train,val,test}/<class>/*)
    classes: list[str]
    splits: dict[str, list[FileEntry]]  # split name -> files, sorted by class then path
    ignored: list[str] = field(default_factory=list)  # files that are not images by extension
    problems: list[str] = field(default_factory=list)  # empty class folders, unknown classes, ...


def _is_hidden(name: str) -> bool:
    # "._x.jpg" are macOS resource forks, not images; ".DS_Store", ".ipynb_checkpoints" are clutter.
    return name.startswith(".")


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))


def _scan_class_dir(directory: Path, root: Path, label: int, ignored: list[str]) -> list[FileEntry]:
    """All image files under ``directory`` (recursively, symlinks followed once), sorted by path.

    Uses scandir and plain string joins: a 50,000-file folder is listed and stat'ed in a fraction of a second,
    which matters because this runs on every start to build the cache key.
    """
    found: list[FileEntry] = []
    root_prefix = os.path.join(str(root), "")
    seen: set[str] = set()
    pending = [str(directory)]
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in seen:  # a symlink loop or a second link to the same folder
            continue
        seen.add(real)
        with os.scandir(current) as entries:
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                if entry.is_dir():
                    pending.append(entry.path)
                    continue
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    ignored.append(entry.path)
                    continue
                try:
                    stat = entry.stat()
                    size, mtime_ns = stat.st_size, stat.st_mtime_ns
                except OSError:  # a dangling symlink: it is reported as unreadable when decoded
                    size, mtime_ns = -1, -1
                relpath = entry.path[len(root_prefix) :] if entry.path.startswith(root_prefix) else entry.path
                if os.sep != "/":
                    relpath = relpath.replace(os.sep, "/")
                found.append(FileEntry(entry.path, relpath, label, size, mtime_ns))
    found.sort(key=lambda e: e.relpath)
    return found


def scan_folder(root: str | os.PathLike) -> FolderLayout:
    """List the splits, classes (sorted by name) and image files of an image folder."""
    root = Path(root).expanduser().absolute()  # absolute: the paths must survive a chdir
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder. Pass --data with an image folder, 'cifar10' or 'cifar100'.")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: is a file, not a folder of class subfolders (ROOT/<class>/*.jpg).")
    top = _subdirs(root)
    if "train" in top and set(top) <= set(SPLIT_NAMES):
        layout, split_dirs = "splits", {s: root / s for s in SPLIT_NAMES if s in top}
    elif top and set(top) <= {"val", "test"}:
        raise ValueError(f"{root}: has {'/'.join(top)}/ but no train/ folder; expected ROOT/train/<class>/* as well.")
    else:
        layout, split_dirs = "classes", {"train": root}

    classes = _subdirs(split_dirs["train"])
    ignored: list[str] = []
    problems: list[str] = []
    with os.scandir(split_dirs["train"]) as entries:
        ignored += sorted(e.path for e in entries if e.is_file() and not _is_hidden(e.name))
    if not classes:
        problems.append(f"{split_dirs['train']}: no class folders (expected {split_dirs['train']}/<class>/<image>)")
    index = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[FileEntry]] = {}
    for split, directory in split_dirs.items():
        names = _subdirs(directory)
        unknown = [n for n in names if n not in index]
        if unknown:
            problems.append(f"{directory}: class folder(s) {unknown} are not in {split_dirs['train']}")
        entries_: list[FileEntry] = []
        for name in names:
            if name not in index:
                continue
            files = _scan_class_dir(directory / name, root, index[name], ignored)
            if not files:
                kinds = "/".join(sorted(IMAGE_EXTENSIONS))
                problems.append(f"{directory / name}: empty class folder (no {kinds} files)")
            entries_ += files
        if split != "train" and not entries_:
            problems.append(f"{directory}: no images (expected {directory}/<class>/<image>)")
        splits[split] = entries_
    if classes and not any(splits.values()):
        problems.append(f"{root}: no image files found in any class folder")
    return FolderLayout(root, layout, classes, splits, ignored=sorted(ignored), problems=problems)


def check_layout(layout: FolderLayout) -> None:
    """Raise a ValueError listing every structural problem (empty class, no images, unknown classes)."""
    if layout.problems:
        lines = "\n".join(f"  {p}" for p in layout.problems)
        raise ValueError(
            f"{layout.root}: cannot use this image folder:\n{lines}\n"
            "Every class needs its own subfolder with at least one image; remove empty folders or add images."
        )
