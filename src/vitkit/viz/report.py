"""A run report: training curves, confusion matrix, per-class accuracy and the most confident right
and wrong validation predictions, as PNGs plus one self-contained HTML page.

Inputs are the files the trainer writes into a run directory (all optional; what is missing is
skipped and the page says so):

* ``metrics.csv``: one row per epoch,
  ``epoch,step,train_loss,train_acc,val_loss,val_acc,val_top5,lr,images_per_s,val_seconds``;
* ``steps.csv``: one row per logged step, ``step,epoch,train_loss,lr``;
* ``config.yaml``: a mapping with ``classes: [names...]``;
* ``val_predictions.npz``: ``probs`` (N, C), ``labels`` (N,), optionally ``images`` (N, 3, h, w) uint8.

The page embeds the PNGs as base64 data URIs, so it can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report"]

METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"]
MAX_TICK_CLASSES = 20  # above this, class names on axes become unreadable: drop them
MAX_ANNOTATED_CLASSES = 12  # write counts into confusion-matrix cells up to this many classes
GRID_COLUMNS = 8  # thumbnails per row in the confident-predictions grid


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """CSV with a header -> column name -> float array; empty or unparsable fields become NaN."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, np.ndarray] = {}
    names = rows[0].keys() if rows else []
    for name in names:
        values = []
        for row in rows:
            try:
                values.append(float(row.get(name) or "nan"))
            except ValueError:
                values.append(math.nan)
        columns[name] = np.asarray(values, dtype=np.float64)
    return columns


def _has_values(columns: dict[str, np.ndarray], name: str) -> bool:
    return name in columns and bool(np.isfinite(columns[name]).any())


@dataclass
class _Run:
    """What could be read from a run directory, plus notes on what could not."""

    metrics: dict[str, np.ndarray] | None = None
    steps: dict[str, np.ndarray] | None = None
    classes: list[str] | None = None
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    images: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def _load_run(run_dir: Path) -> _Run:
    run = _Run()
    path = run_dir / "metrics.csv"
    if path.is_file():
        run.metrics = _read_csv(path)
        if not run.metrics:
            run.notes.append("metrics.csv has no rows: no training curves or final metrics.")
            run.metrics = None
    else:
        run.notes.append("No metrics.csv: no per-epoch curves or final metrics.")
    path = run_dir / "steps.csv"
    if path.is_file():
        run.steps = _read_csv(path) or None
    if run.steps is None:
        run.notes.append("No steps.csv: no per-step curves.")
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        config = yaml.safe_load(path.read_text()) or {}
        classes = config.get("classes") if isinstance(config, dict) else None
        if isinstance(classes, list) and classes:
            run.classes = [str(c) for c in classes]
    if run.classes is None:
        run.notes.append("No class names (config.yaml with a 'classes' list): classes are shown by index.")
    path = run_dir / "val_predictions.npz"
    if path.is_file():
        with np.load(path) as data:
            run.probs = np.asarray(data["probs"], dtype=np.float64)
            run.labels = np.asarray(data["labels"], dtype=np.int64)
            run.images = np.asarray(data["images"]) if "images" in data.files else None
        if run.images is None:
            run.notes.append("val_predictions.npz has no 'images': the confident-predictions grid is skipped.")
        num_classes = run.probs.shape[1]
        valid = (run.labels >= 0) & (run.labels < num_classes)
        if not valid.all():
            run.notes.append(f"{int((~valid).sum())} validation labels outside 0..{num_classes - 1} were left out.")
            run.probs, run.labels = run.probs[valid], run.labels[valid]
            run.images = run.images[valid] if run.images is not None else None
        if run.classes is not None and len(run.classes) != num_classes:
            run.notes.append(
                f"config.yaml lists {len(run.classes)} classes but the predictions have {num_classes}: "
                "classes are shown by index."
            )
            run.classes = None
    else:
        run.notes.append("No val_predictions.npz: no confusion matrix, per-class accuracy or prediction grid.")
    return run


def _class_names(run: _Run, num_classes: int) -> list[str]:
    return run.classes if run.classes is not None else [str(i) for i in range(num_classes)]


# ---- figures ------------------------------------------------------------------------------------


def _plot_lines(ax: Any, x: np.ndarray, series: list[tuple[str, np.ndarray, dict[str, Any]]]) -> bool:
    """Plot each (label, y, style) where it has values; returns whether anything was drawn."""
    drawn = False
    for label, y, style in series:
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.any():
            ax.plot(x[keep], y[keep], label=label, **style)
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def _plot_epoch_curves(metrics: dict[str, np.ndarray], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    from vitkit.viz._plotting import new_figure, save_figure

    n = len(next(iter(metrics.values())))
    epoch = metrics["epoch"] if _has_values(metrics, "epoch") else np.arange(1, n + 1, dtype=np.float64)
    col = {name: metrics.get(name, np.full(n, np.nan)) for name in METRIC_COLUMNS}
    marker = dict(marker="o", markersize=3)
    fig = new_figure(14, 4.2)
    fig.suptitle("Training curves per epoch", fontsize=13)
    panels = [
        ("Loss", "loss", [("train", col["train_loss"], marker), ("validation", col["val_loss"], marker)]),
        ("Accuracy", "accuracy", [("train", col["train_acc"], marker), ("validation", col["val_acc"], marker)]),
        ("Learning rate", "learning rate", [("lr", col["lr"], marker)]),
    ]
    for i, (title, ylabel, series) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        _plot_lines(ax, epoch, series)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.5"
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    return save_figure(fig, path)


def _plot_step_curves(steps: dict[str, np.ndarray], metrics: dict[str, np.ndarray] | None, path: Path) -> Path:
    """Per-step train loss and lr; per-epoch validation loss is drawn at the step each epoch ended."""
    from vitkit.viz._plotting import new_figure, save_figure

    n = len(next(iter(steps.values())))
    step = steps.get("step", np.arange(n, dtype=np.float64))
    fig = new_figure(12, 4.2)
    fig.suptitle("Training curves per step", fontsize=13)
    loss_series: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        ("train (per step)", steps.get("train_loss", np.full(n, np.nan)), dict(linewidth=1, alpha=0.8))
    ]
    ax = fig.add_subplot(1, 2, 1)
    _plot_lines(ax, step, loss_series)
    if metrics is not None and _has_values(metrics, "step") and _has_values(metrics, "val_loss"):
        keep = np.isfinite(metrics["step"]) & np.isfinite(metrics["val_loss"])
        ax.plot(metrics["step"][keep], metrics["val_loss"][keep], "o-", markersize=4, label="validation (per epoch)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_title("Loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax = fig.add_subplot(1, 2, 2)
    _plot_lines(ax, step, [("lr", steps.get("lr", np.full(n, np.nan)), dict(linewidth=1.2))])
    ax.set_title("Learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    return save_figure(fig, path)


def _confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _plot_confusion(cm: np.ndarray, names: list[str], path: Path) -> Path:
    from vitkit.viz._plotting import new_figure, save_figure

    c = cm.shape[0]
    totals = cm.sum(axis=1, keepdims=True)
    fraction = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    fig = new_figure(8.5, 7.5)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"Confusion matrix ({cm.sum()} validation images, accuracy {100 * accuracy:.1f}%)", fontsize=12)
    if c <= MAX_TICK_CLASSES:
        ax.set_xticks(range(c), names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(c), names)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
    else:
        ax.set_xlabel("Predicted class (index)")
        ax.set_ylabel("True class (index)")
    if c <= MAX_ANNOTATED_CLASSES:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    color = "white" if fraction[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(image, ax=ax, shrink=0.85, label="fraction of the true class (row-normalised)")
    return save_figure(fig, path)


def _plot_per_class(accuracy: np.ndarray, names: list[str], path: Path) -> Path:
    from vitkit.viz._plotting import new_figure, save_figure

    c = len(accuracy)
    fig = new_figure(10, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    values = np.nan_to_num(100 * accuracy)
    ax.bar(np.arange(c), values, color="tab:blue", width=0.8)
    mean = np.nanmean(accuracy) * 100 if np.isfinite(accuracy).any() else 0.0
    ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Per-class validation accuracy (dashed: mean over classes, {mean:.1f}%)")
    if c <= MAX_TICK_CLASSES:
        ax.set_xticks(range(c), names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_xlabel("class")
    else:
        ax.set_xlabel("class (index)")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _confident(mask: np.ndarray, confidence: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most confident predictions among ``mask``, most confident first."""
    candidates = np.flatnonzero(mask)
    return candidates[np.argsort(-confidence[candidates], kind="stable")][:k]


def _plot_predictions(
    images: np.ndarray, probs: np.ndarray, labels: np.ndarray, names: list[str], path: Path
) -> Path:
    from vitkit.viz._plotting import new_figure, save_figure, to_display_image

    preds = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    right = _confident(preds == labels, confidence, GRID_COLUMNS)
    wrong = _confident(preds != labels, confidence, GRID_COLUMNS)
    fig = new_figure(14, 4.9)
    fig.suptitle("Most confident validation predictions", fontsize=13)
    rows = [("correct", right, "tab:green"), ("wrong", wrong, "tab:red")]
    for r, (kind, indices, color) in enumerate(rows):
        for col in range(GRID_COLUMNS):
            ax = fig.add_subplot(2, GRID_COLUMNS, r * GRID_COLUMNS + col + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"most confident\n{kind}", fontsize=10, color=color)
            if col >= len(indices):
                if col == 0:
                    ax.text(0.5, 0.5, f"no {kind}\npredictions", ha="center", va="center", color="grey",
                            transform=ax.transAxes)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            i = indices[col]
            ax.imshow(to_display_image(images[i]))
            title = f"{names[preds[i]]} {100 * confidence[i]:.0f}%"
            if kind == "wrong":
                title += f"\ntrue: {names[labels[i]]}"
            ax.set_title(title, fontsize=8, color=color)
    return save_figure(fig, path)


# ---- page ---------------------------------------------------------------------------------------


def _format(value: float, name: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if name in ("epoch", "step"):
        return str(int(value))
    if name == "lr":
        return f"{value:.3g}"
    if name in ("images_per_s", "val_seconds"):
        return f"{value:.1f}"
    return f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _final_metrics_html(metrics: dict[str, np.ndarray]) -> str:
    names = [name for name in METRIC_COLUMNS if name in metrics] + [n for n in metrics if n not in METRIC_COLUMNS]
    rows = [[name, _format(float(metrics[name][-1]), name)] for name in names]
    html_out = _table(["metric (last epoch)", "value"], rows)
    if _has_values(metrics, "val_acc"):
        best = int(np.nanargmax(metrics["val_acc"]))
        epoch = _format(float(metrics["epoch"][best]), "epoch") if "epoch" in metrics else str(best + 1)
        html_out += (f"<p>Best validation accuracy: <b>{_format(float(metrics['val_acc'][best]), 'val_acc')}</b>"
                     f" at epoch {html.escape(epoch)}.</p>")
    return html_out


def _image_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; margin-top: 0; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em 0.5em 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #f3f3f3; } td:nth-child(n+2) { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.5em 0 1.5em; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the PNGs and ``report.html`` for a training run; returns the HTML page's path.

    ``out_dir`` defaults to ``run_dir/report``. Missing inputs are skipped with a note on the page;
    a directory holding none of metrics.csv, steps.csv and val_predictions.npz is an error.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    run = _load_run(run_dir)
    if run.metrics is None and run.steps is None and run.probs is None:
        raise FileNotFoundError(
            f"{run_dir} has no metrics.csv, steps.csv or val_predictions.npz; is it a training run directory?"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    sections: list[str] = []
    if run.metrics is not None:
        sections.append("<h2>Final metrics</h2>" + _final_metrics_html(run.metrics))
    curves = []
    if run.metrics is not None:
        curves.append(_image_html(_plot_epoch_curves(run.metrics, out_dir / "curves_epochs.png"), "curves per epoch"))
    if run.steps is not None:
        path = _plot_step_curves(run.steps, run.metrics, out_dir / "curves_steps.png")
        curves.append(_image_html(path, "curves per step"))
    if curves:
        sections.append("<h2>Training curves</h2>" + "".join(curves))

    if run.probs is not None and run.labels is not None:
        probs, labels = run.probs, run.labels
        num_classes = probs.shape[1]
        names = _class_names(run, num_classes)
        preds = probs.argmax(axis=1)
        cm = _confusion(labels, preds, num_classes)
        sections.append("<h2>Confusion matrix</h2>" + _image_html(
            _plot_confusion(cm, names, out_dir / "confusion_matrix.png"), "confusion matrix"))
        support = cm.sum(axis=1)
        correct = np.diag(cm)
        accuracy = np.divide(correct, support, out=np.full(num_classes, np.nan), where=support > 0)
        rows = [[names[i], str(support[i]), str(correct[i]), f"{100 * accuracy[i]:.1f} %" if support[i] else "n/a"]
                for i in range(num_classes)]
        sections.append(
            "<h2>Per-class accuracy</h2>"
            + _image_html(_plot_per_class(accuracy, names, out_dir / "per_class_accuracy.png"), "per-class accuracy")
            + f"<details{' open' if num_classes <= MAX_TICK_CLASSES else ''}><summary>Table</summary>"
            + _table(["class", "images", "correct", "accuracy"], rows) + "</details>"
        )
        if run.images is not None:
            path = _plot_predictions(run.images, probs, labels, names, out_dir / "predictions.png")
            sections.append("<h2>Most confident predictions</h2>" + _image_html(path, "confident predictions"))

    notes = "".join(f"<li>{html.escape(note)}</li>" for note in run.notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>vitkit report: {html.escape(run_dir.name)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>Run report: {html.escape(run_dir.name)}</h1>
<p class="meta">{html.escape(str(run_dir.resolve()))} &middot; generated {datetime.now():%Y-%m-%d %H:%M}</p>
{f'<ul class="notes">{notes}</ul>' if notes else ''}
{''.join(sections)}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
