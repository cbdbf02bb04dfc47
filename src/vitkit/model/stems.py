"""The two alternatives to the paper's patch projection that PatchEmbed can put before it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvStem", "ShiftedPatches"]


class ShiftedPatches(nn.Module):
    """Shifted patch tokenization (Lee, Lee and Song, 2021, "Vision Transformer for Small-Size
    Datasets"): each patch is flattened together with the same patch of four copies of the image
    shifted half a patch diagonally, and the vector is layer-normalised; PatchEmbed.proj, one linear
    layer, then makes the token. Each token so sees its patch and a ring of the neighbours' pixels
    around it, a little of the locality a ViT otherwise has to learn from data, at no extra tokens:
    the encoder stays a transformer over patch tokens. Returns (B, h*w, 5*C*p*p), row-major.
    """

    SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # (down, right) in half patches; zeros fill the gap

    def __init__(self, in_chans: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.out_features = (1 + len(self.SHIFTS)) * in_chans * patch_size**2
        self.norm = nn.LayerNorm(self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, s = self.patch_size, self.patch_size // 2
        B, _, H, W = x.shape
        padded = F.pad(x, (s, s, s, s))
        views = [x] + [padded[..., s - dy * s : s - dy * s + H, s - dx * s : s - dx * s + W] for dy, dx in self.SHIFTS]
        x = torch.cat(views, dim=1)  # (B, 5C, H, W)
        x = x.unflatten(3, (W // p, p)).unflatten(2, (H // p, p))  # (B, 5C, h, p, w, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), self.out_features)
        return self.norm(x)


class ConvStem(nn.Sequential):
    """The hybrid model's input (the paper's Section 3.1) kept small: 3x3 convolutions with batch norm
    and ReLU, a stride-2 one per halving until one position per patch; a 1x1 projection
    (PatchEmbed.proj) then makes the tokens. Early convolutions of this kind (Xiao et al., 2021) make
    ViTs learn faster from little data, at a small part of the model's FLOPs (8% of cifar-mini's).
    Channels double per halving, ending at the width.

    depth > 1 adds depth - 1 stride-1 convolutions at every resolution, the input's included (at half
    the first halving's channels): more of the convolutions' locality bias for small data, where it
    paid on CIFAR-10 (see the cifar10-hybrid-30m recipe), at a larger part of the FLOPs (30% of
    cifar-mini's with depth 2). depth 1 is the original layout, so its checkpoints keep their keys.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, depth: int = 1) -> None:
        halvings = patch_size.bit_length() - 1  # patch_size is a power of two (checked by the config)
        widths = [max(embed_dim >> (halvings - i), 16) for i in range(halvings + 1)]  # per resolution
        layers: list[nn.Module] = []
        channels = in_chans
        for i, width in enumerate(widths):
            strides = ([2] if i else []) + [1] * (depth - 1)  # the input resolution has no halving
            for stride in strides:
                layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        super().__init__(*layers)
        self.out_chans = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last: oneDNN's (and cuDNN's) convolutions run faster on NHWC; the 1x1 projection
        # after the stem then leaves its tokens contiguous, so the final transpose copies nothing.
        return super().forward(x.contiguous(memory_format=torch.channels_last))
