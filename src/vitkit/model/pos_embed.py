"""Position embeddings: the fixed 2-D sine-cosine table, and resampling learned ones to another grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resample_pos_embed", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, (grid*grid, dim), in row-major patch order.

    A quarter of the channels each for sin(y), cos(y), sin(x), cos(x), as in MoCo v3 / big_vision.
    """
    if dim % 4:
        raise ValueError(f"embed_dim={dim}: the 2-D sin-cos embedding needs a multiple of 4")
    y, x = torch.meshgrid(torch.arange(grid_size, dtype=torch.float32),
                          torch.arange(grid_size, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resample (1, prefix + g*g, D) position embeddings to a new_grid x new_grid grid.

    The class slot (prefix tokens) is kept as is: it has no position. This is how the paper
    fine-tunes at higher resolution (Section 3.2, "2D interpolation of the pre-trained position
    embeddings").
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid * old_grid != grid.shape[1]:
        raise ValueError(f"position embeddings hold {grid.shape[1]} patch positions, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dtype = grid.dtype
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(dtype)
    return torch.cat([prefix, grid], dim=1)
