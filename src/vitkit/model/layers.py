"""Small parts of the ViT families fine-tuned today, beside the paper's (``vit.py``), under timm's names.

- :class:`LayerScale` (``ls1``, ``ls2`` in a block; DeiT III, DINOv2): a learned per-channel scale of each
  residual branch, started small so a deep model begins close to the identity (Touvron et al. 2021, CaiT).
- :class:`QuickGELU` (OpenAI's CLIP towers): the sigmoid approximation x * sigmoid(1.702 x) they were
  trained with; weights trained so need it to give their outputs.
- :func:`prefix_tokens`: the class token and DINOv2's register tokens (Darcet et al. 2023), prepended to
  the patch tokens in that order, as timm does.
- :class:`PackedSwiGLU` (DINOv2 giant) and :class:`AttentionPoolLatent` (SigLIP's "map" pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionPoolLatent", "LayerScale", "PackedSwiGLU", "QuickGELU", "gelu_layer", "layer_scale",
           "prefix_tokens"]


class LayerScale(nn.Module):
    """x * gamma, gamma a learned per-channel vector starting at init_values (timm's name and parameter)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gamma.fill_(self.init_values)


def layer_scale(dim: int, init_values: float | None) -> nn.Module:
    """LayerScale, or nothing (an Identity, as in timm: no parameters) when init_values is None."""
    return LayerScale(dim, init_values) if init_values is not None else nn.Identity()


class QuickGELU(nn.Module):
    """CLIP's GELU: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def gelu_layer(gelu: str) -> nn.Module:
    """The MLP's activation for ViTConfig.gelu: "exact" (erf), "tanh" or "quick"."""
    if gelu == "quick":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if gelu == "tanh" else "none")


def prefix_tokens(batch: int, *tokens: torch.Tensor | None) -> list[torch.Tensor]:
    """The (1, n, D) prefix parameters that exist, expanded to the batch, in order."""
    return [t.expand(batch, -1, -1) for t in tokens if t is not None]


class PackedSwiGLU(nn.Module):
    """The gated MLP of DINOv2's giant model (timm's SwiGLUPacked): fc1 makes the value and the gate side by
    side, silu(value) * gate goes through fc2, which is half fc1's width. Shazeer (2020)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim // 2, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.drop2(self.fc2(self.drop1(self.act(value) * gate)))


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling ("map", SigLIP; timm's names): one learned query (``latent``) attends
    over the patch tokens, and its output passes a residual MLP block; it replaces the class token."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> pooled features (B, D)."""
        B, N, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D))
        return (x + self.mlp(self.norm(x)))[:, 0]

    def reset_parameters(self) -> None:
        """The latent query only: the linear layers and the norm are initialised as the model's others."""
        nn.init.trunc_normal_(self.latent, std=self.latent.shape[-1] ** -0.5)
