"""Shared matplotlib plumbing for the viz modules.

Figures are built with ``matplotlib.figure.Figure`` directly, not ``pyplot``: saving to PNG then
goes through the Agg canvas without touching the global backend (a notebook or GUI the user has
open keeps its own), and no figure lingers in pyplot's registry to leak memory in a loop.
matplotlib is imported here lazily so that ``import vitkit.viz`` needs only torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100  # fixed, and savefig is called without bbox_inches="tight", so PNG size = figsize * DPI


def new_figure(width_in: float, height_in: float) -> Figure:
    """An Agg-renderable figure of a fixed size with constrained layout (labels never overlap)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # matplotlib is the optional "viz" extra
        raise ImportError("vitkit's figures need matplotlib: pip install 'vitkit[viz]'") from error
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG, creating the folder; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def colormap(name: str, bad: str | None = None) -> Any:
    """A registered colormap, optionally with a colour for NaN ("bad") cells."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return cmap.with_extremes(bad=bad) if bad is not None else cmap


def to_display_image(image: np.ndarray) -> np.ndarray:
    """HxWx3 or HxW (or 3xHxW / 1xHxW) array -> HxWx3 uint8, so imshow shows every input the same way."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.transpose(image, (1, 2, 0))  # channels first -> last
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 or HxW image, got shape {image.shape}")
    if image.dtype != np.uint8:
        scale = 255.0 if image.max(initial=0) <= 1.0 else 1.0
        image = np.clip(image.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    return image
