"""Patch-kernel resizing: FlexiViT's pseudo-inverse resize (Beyer et al., 2023, Section 3.4).

Resizing a patch kernel like an image (bilinear) changes what the patch embedding computes:
token = <patch, kernel> is not preserved when both patch and kernel are interpolated. FlexiViT asks
instead for a new kernel w' with <resize(x), w'> = <x, w> for every old-size patch x. With B the
matrix of the resize (resize(x) = B x) this is B^T w' = w, solved in the least-squares sense by
w' = pinv(B^T) w. Upsampling the patch (new size >= old) gives an exact solution: every token of
an upsampled image is unchanged. Downsampling cannot be exact; the pseudo-inverse gives the
best approximation in the least-squares sense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resample_patch_embed"]


def _resize_matrix(old: int, new: int) -> torch.Tensor:
    """B with resize(x).flatten() = B @ x.flatten() for old x old patches: (new*new, old*old), float64."""
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    # Bilinear with antialiasing, as jax.image.resize does (FlexiViT's reference resize).
    resized = F.interpolate(basis, size=(new, new), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(old * old, new * new).T


def resample_patch_embed(weight: torch.Tensor, new_patch: int) -> torch.Tensor:
    """Resize a conv patch kernel (out, in, p, p) to (out, in, new_patch, new_patch), FlexiViT's way.

    Used to fine-tune weights trained at one patch size with another (e.g. S/16 weights into a
    32x32 model with 4-pixel patches). Computed in float64; the result has ``weight``'s dtype.
    """
    if weight.ndim != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"expected a square conv kernel (out, in, p, p), got shape {tuple(weight.shape)}")
    if not isinstance(new_patch, int) or new_patch <= 0:
        raise ValueError(f"new_patch={new_patch!r}: must be a positive integer")
    old = weight.shape[-1]
    if old == new_patch:
        return weight
    resize = _resize_matrix(old, new_patch)  # (new^2, old^2)
    solve = torch.linalg.pinv(resize.T)  # (new^2, old^2): w' = solve @ w
    flat = weight.detach().reshape(-1, old * old).to(torch.float64)
    out = flat @ solve.T
    return out.reshape(*weight.shape[:2], new_patch, new_patch).to(weight.dtype)
