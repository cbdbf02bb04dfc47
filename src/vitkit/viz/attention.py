"""Where the model looks: attention rollout and the last layer's class-token attention (ViT Figure 6).

All maps come from ``model.forward_attention``, the model's explicit softmax path, so they are
available even though the ordinary forward uses the fused kernel (which never forms the weights
and which hook-based extraction therefore misses).

Attention rollout (Abnar and Zuidema, 2020) treats each layer's head-averaged attention, plus the
identity for the residual connection, as a token-mixing matrix and multiplies them from the first
layer to the last: row i of the result says how much of each input token reached token i.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "attention_rollout",
    "cls_attention_maps",
    "iter_attention",
    "rollout_map",
    "save_attention_figures",
]

PANEL_INCHES = 2.4  # side of one image panel in the attention figure
TITLE_INCHES = 0.5  # band for the suptitle (prediction) above the panels
MAX_COLUMNS = 6


def attention_rollout(maps: Sequence[Tensor], residual: bool = True) -> Tensor:
    """Rollout of per-layer attention maps (each (B, heads, T, T)) -> (B, T, T).

    Heads are averaged; with ``residual`` each layer becomes 0.5*A + 0.5*I (the skip connection
    carries half the signal), rows are renormalised, and layers are multiplied so that the last
    layer is applied last: R = A_L @ ... @ A_1. Rows of R sum to 1.
    """
    if len(maps) == 0:
        raise ValueError("attention_rollout needs at least one layer's attention map")
    rollout: Tensor | None = None
    for attn in maps:
        if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"expected attention maps of shape (B, heads, T, T), got {tuple(attn.shape)}")
        a = attn.float().mean(dim=1)
        if residual:
            eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None
    return rollout


def _query_rows(attn: Tensor, num_prefix_tokens: int) -> Tensor:
    """Attention (..., T, T) -> (..., patches): the class token's row, or without one the mean row.

    A model without a class token (global average pooling) has no single query that makes the
    prediction; every patch feeds the average equally, so the mean over patch queries stands in.
    """
    if num_prefix_tokens > 0:
        return attn[..., 0, num_prefix_tokens:]
    return attn.mean(dim=-2)


def _to_grid(rows: Tensor, grid_size: int) -> Tensor:
    if rows.shape[-1] != grid_size * grid_size:
        raise ValueError(
            f"{rows.shape[-1]} patch tokens do not form a {grid_size}x{grid_size} grid; "
            "check grid_size and num_prefix_tokens"
        )
    return rows.reshape(*rows.shape[:-1], grid_size, grid_size)


def cls_attention_maps(maps: Sequence[Tensor], grid_size: int, num_prefix_tokens: int = 1) -> Tensor:
    """The last layer's class-token attention to the patches, per head: (B, heads, g, g).

    These are the raw softmax weights (the class token's attention to itself and other prefix
    tokens is left out, so a map need not sum to 1). Patches are in row-major order.
    """
    return _to_grid(_query_rows(maps[-1].float(), num_prefix_tokens), grid_size)


def _normalise01(x: Tensor) -> Tensor:
    """Min-max scale each (..., g, g) map to [0, 1]; a constant map becomes all zeros."""
    flat = x.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(x.shape)


def rollout_map(maps: Sequence[Tensor], grid_size: int, num_prefix_tokens: int = 1) -> Tensor:
    """The class token's rollout row over the patches, (B, g, g), scaled to [0, 1] for display."""
    return _normalise01(_to_grid(_query_rows(attention_rollout(maps), num_prefix_tokens), grid_size))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def iter_attention(model: nn.Module, images: Tensor, batch_size: int = 32) -> Iterator[tuple[Tensor, list[Tensor]]]:
    """Yield ``(logits, maps)`` for successive chunks of ``images``, in eval mode, without gradients.

    Chunking keeps memory bounded: the maps hold depth x heads x T x T numbers per image. Tensors
    are moved to the model's device; results stay there.
    """
    device = next(model.parameters()).device
    with _eval_mode(model), torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device)
            logits, maps = model.forward_attention(chunk)
            yield logits, maps


def _upsample(grid_map: Tensor, height: int, width: int) -> np.ndarray:
    """(g, g) map -> (height, width) array in [0, 1], bilinearly, so it lines up with the image."""
    up = F.interpolate(grid_map[None, None].float().cpu(), size=(height, width), mode="bilinear", align_corners=False)
    return _normalise01(up[0, 0]).numpy()


def _prediction_title(probs: Tensor, classes: Sequence[str] | None) -> str:
    if probs.numel() == 0:
        return "no classifier head"
    p, index = probs.max(dim=-1)
    label = classes[int(index)] if classes is not None and int(index) < len(classes) else f"class {int(index)}"
    return f"predicted: {label} ({100 * float(p):.1f}%)"


def save_attention_figures(
    model: nn.Module,
    images: Tensor,
    originals: list[np.ndarray],
    names: list[str],
    classes: list[str] | None,
    out_dir: str | Path,
) -> list[Path]:
    """One PNG per image, ``out_dir/<name>.png``: the image, its rollout overlay, and each head's
    last-layer class-token attention overlaid, titled with the predicted label and probability.

    ``images`` is the preprocessed batch the model takes; ``originals`` are the same images as
    HxWx3 uint8 arrays for display (any size: maps are upsampled to it). Each overlay is scaled
    to [0, 1] on its own, so a head with weak but focused attention is still visible.
    """
    from vitkit.viz._plotting import colormap, new_figure, save_figure, to_display_image

    if not len(images) == len(originals) == len(names):
        raise ValueError(f"got {len(images)} images, {len(originals)} originals and {len(names)} names")
    out_dir = Path(out_dir)
    cfg = model.config
    grid, prefix = cfg.grid_size, cfg.num_prefix_tokens
    cmap = colormap("jet")
    paths: list[Path] = []
    index = 0
    for logits, maps in iter_attention(model, images):
        has_head = getattr(model, "num_classes", 1) > 0
        probs = logits.float().softmax(dim=-1).cpu() if has_head else torch.empty(logits.shape[0], 0)
        rollouts = rollout_map(maps, grid, prefix).cpu()
        heads = cls_attention_maps(maps, grid, prefix).cpu()
        for b in range(logits.shape[0]):
            original = to_display_image(originals[index])
            height, width = original.shape[:2]
            panels = [("input", None), ("attention rollout", rollouts[b])]
            panels += [(f"last layer, head {h + 1}", heads[b, h]) for h in range(heads.shape[1])]
            cols = min(len(panels), MAX_COLUMNS)
            rows = math.ceil(len(panels) / cols)
            fig = new_figure(cols * PANEL_INCHES, rows * PANEL_INCHES + TITLE_INCHES)
            fig.suptitle(f"{names[index]}: {_prediction_title(probs[b], classes)}", fontsize=13)
            for i, (title, grid_map) in enumerate(panels):
                ax = fig.add_subplot(rows, cols, i + 1)
                ax.imshow(original)
                if grid_map is not None:
                    ax.imshow(_upsample(grid_map, height, width), cmap=cmap, alpha=0.5, vmin=0.0, vmax=1.0)
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
            paths.append(save_figure(fig, out_dir / f"{names[index]}.png"))
            index += 1
    return paths
