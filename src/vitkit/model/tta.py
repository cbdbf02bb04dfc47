"""Test-time augmentation: a model's class probabilities averaged over mirrored and shifted views.

The border a shift uncovers takes a fill colour; black (in normalised space), as training's padded
crops leave it, is what the augmented model has seen there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["shift_image", "view_averaged_logits"]


def shift_image(x: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) moved dy pixels down and dx right; the uncovered border takes fill, one value
    per channel."""
    height, width = x.shape[-2:]
    if dy == dx == 0:
        return x
    if max(abs(dy), abs(dx)) >= min(height, width):
        raise ValueError(f"a shift of ({dy}, {dx}) pixels leaves nothing of a {height}x{width} image; "
                         "use a smaller --tta-shift")
    out = fill.to(x.device, x.dtype).view(1, -1, 1, 1).expand_as(x).clone()
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = \
        x[..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
    return out


def view_averaged_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flip: bool = False,
                         shift: int = 0, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``model(x)``, or with views the log of their mean class probabilities, which cross-entropy and
    argmax read as logits.

    ``flip`` adds each view's mirror image. ``shift`` moves the image by that many pixels along each
    axis, every combination of -shift, 0 and +shift: nine views. ``fill``: the uncovered border's value
    per channel (default 0), e.g. black after normalisation, ``-mean / std``.
    """
    if not (flip or shift):
        return model(x)
    steps = (-shift, 0, shift) if shift else (0,)
    if fill is None:
        fill = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
    views = (shift_image(x, dy, dx, fill) for dy in steps for dx in steps)
    if flip:
        views = (v for view in views for v in (view, view.flip(-1)))
    probs = [model(view).softmax(-1) for view in views]  # one view's images in memory at a time
    return (sum(probs) / len(probs)).log()
