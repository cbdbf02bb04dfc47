"""The Vision Transformer of Dosovitskiy et al. (2021), built from its named parts.

image (B, C, H, W)
  -> PatchEmbed: strided convolution, one token per patch          (B, N, D)
  -> prepend the class token, add position embeddings               (B, 1 + N, D)
  -> depth x Block: x + Attention(LN(x)); x + Mlp(LN(x))           (B, 1 + N, D)
  -> final LayerNorm, take the class token (or average patches)     (B, D)
  -> Linear head                                                    (B, num_classes)

Parameter names equal timm's VisionTransformer (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.attn.qkv``, ...), so a timm state dict of the same configuration loads with strict=True.
This module imports nothing else of vitkit's but its config and ``cpu_linear`` (the projections'
faster path in CPU inference): checkpoint formats live in ``vitkit.weights``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.model.config import ViTConfig
from vitkit.model.cpu_linear import bf16_autocast_on_the_cpu, linear

# Training on the CPU, sequences up to this length use explicit attention (faster there than the
# flash kernel): head by head in fp32 (see Attention._attend_head_by_head), batched in bf16.
EXPLICIT_ATTENTION_MAX_TOKENS = 128

__all__ = [
    "Attention",
    "Block",
    "ConvStem",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "flip_averaged_log_probs",
    "resample_pos_embed",
    "sincos_pos_embed_2d",
]


def _is_plain(module: nn.Module, kind: type) -> bool:
    """module is exactly a `kind`, without hooks: its forward may be replaced by the same function."""
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks)


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) by cpu_linear.linear for a plain nn.Linear; anything else (a LoRA wrapper, a quantised
    layer, a hooked one) is called as itself."""
    if _is_plain(layer, nn.Linear):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each linearly: a strided convolution.

    A conv with kernel = stride = patch size is exactly the paper's "flatten each P x P x C patch
    and multiply by E", done without materialising the patches.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, stem: str = "patch",
                 stem_depth: int = 1) -> None:
        super().__init__()
        self.img_size = img_size
        self.strict_img_size = True  # timm's name; False (VisionTransformer.dynamic_img_size) takes other sizes
        self.patch_size = patch_size
        self.in_chans = in_chans
        if stem == "conv":
            self.backbone = ConvStem(in_chans, embed_dim, patch_size, stem_depth)
            self.proj = nn.Conv2d(self.backbone.out_chans, embed_dim, kernel_size=1)
        elif stem == "shifted":
            self.backbone = ShiftedPatches(in_chans, patch_size)
            self.proj = nn.Linear(self.backbone.out_features, embed_dim)
        else:
            self.backbone = None
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.strict_img_size and x.ndim == 4 and x.shape[1] == self.in_chans:
            if x.shape[2] != x.shape[3] or x.shape[2] % self.patch_size:
                raise ValueError(f"expected square images whose side is a multiple of the patch size "
                                 f"{self.patch_size}, got {tuple(x.shape)}")
        elif x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"expected images of shape (batch, {self.in_chans}, {self.img_size}, {self.img_size}), "
                f"got {tuple(x.shape)}; resize the input, or call model.set_input_size(...) "
                f"for another resolution (a multiple of the patch size {self.patch_size})"
            )
        if isinstance(self.backbone, ShiftedPatches):
            return _linear(self.proj, self.backbone(x))
        if self.backbone is not None:
            x = self.backbone(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D), row-major


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


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout: q, k, v stacked).

    locality=True is Lee, Lee and Song's (2021) locality self-attention for small datasets: the
    softmax temperature is learned (``scale``, a parameter starting at 1/sqrt(head_dim)) and no token
    attends to itself, so the weights sharpen onto the other tokens instead of staying flat.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 locality: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.locality = locality
        self.scale: float | nn.Parameter = self.head_dim**-0.5
        if locality:
            self.scale = nn.Parameter(torch.tensor(self.head_dim**-0.5))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _project(self, x: torch.Tensor, num_queries: int | None = None) -> tuple[torch.Tensor, ...]:
        """The projections, heads still side by side: (qkv,) of every token, or with num_queries
        (q of the first num_queries tokens, kv of every token)."""
        if num_queries is None:
            return (_linear(self.qkv, x),)
        # Keys and values of every token, queries of the few whose output is wanted: the same
        # fused weight, sliced, so checkpoints do not change.
        D = x.shape[-1]
        weight, bias = self.qkv.weight, self.qkv.bias
        q = linear(x[:, :num_queries], weight[:D], None if bias is None else bias[:D])
        kv = linear(x, weight[D:], None if bias is None else bias[D:])
        return q, kv

    def _qkv(self, x: torch.Tensor, num_queries: int | None = None) -> tuple[torch.Tensor, ...]:
        """q, k, v as (B, heads, tokens, head_dim); q only for the first num_queries tokens if given."""
        split = [p.unflatten(-1, (-1, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
                 for p in self._project(x, num_queries)]  # (q, k, v or some of them, B, heads, tokens, head_dim)
        return tuple(t for part in split for t in part.unbind(0))

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = x.shape
        return self.proj_drop(_linear(self.proj, x.transpose(1, 2).reshape(B, N, -1)))

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """Self-attention; with num_queries, only the first num_queries tokens' outputs are computed."""
        if x.device.type == "cpu" and torch.is_grad_enabled() and x.shape[1] <= EXPLICIT_ATTENTION_MAX_TOKENS:
            if not bf16_autocast_on_the_cpu():
                return self.proj_drop(_linear(self.proj, self._attend_head_by_head(x, num_queries)))
            # In bf16 the batched products beat head by head: oneDNN's bf16 batched product copies
            # each strided head into a dense one, which costs more than the batched form's single
            # copy into head-major order (attention 1.09-1.13x as fast on a Xeon with AMX).
            return self._merge(self._attend_explicitly(*self._qkv(x, num_queries))[0])
        # The fused kernel (flash / memory-efficient on CUDA, flash on CPU) never stores the N x N map.
        q, k, v = self._qkv(x, num_queries)
        dropout = self.attn_drop.p if self.training else 0.0
        if self.locality:
            mask = ~self._self_mask(q.shape[-2], k.shape[-2], q.device)  # True: may attend
            x = F.scaled_dot_product_attention(q * self.scale, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self._merge(x)

    @staticmethod
    def _self_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """(queries, keys), True where a query meets its own token's key: query i is token i."""
        return torch.eye(num_queries, num_keys, dtype=torch.bool, device=device)

    def _weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale), without each token's own key under locality self-attention."""
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.locality:
            scores = scores.masked_fill(self._self_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
        return scores.softmax(dim=-1)

    def _attend_head_by_head(self, x: torch.Tensor, num_queries: int | None) -> torch.Tensor:
        """CPU training in fp32 on short sequences (CIFAR's 65 tokens): attention as plain batched
        matrix products, one head at a time, on strided views of the projections.

        Measured: the flash kernel's CPU backward is slow for short sequences (on an AVX-512 Xeon
        explicit attention batched over (batch, heads) ran forward and backward 1.5x faster), and that batched
        form copies q, k, v and their gradients into head-major order; head by head there are no
        such copies (attention forward and backward 25% faster than the batched form and on par
        with flash on an AVX2 EPYC). Returns (B, tokens, dim), the heads side by side.
        """
        heads = [h for p in self._project(x, num_queries) for h in p.unflatten(-1, (-1, self.head_dim)).unbind(2)]
        H = self.num_heads
        out = [self.attn_drop(self._weights(q, k)) @ v for q, k, v in zip(heads[:H], heads[H : 2 * H], heads[2 * H :])]
        return torch.cat(out, dim=-1)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same function computed explicitly, also returning the (B, heads, N, N) weights."""
        out, attn = self._attend_explicitly(*self._qkv(x))
        return self._merge(out), attn

    def _attend_explicitly(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(q k^T * scale) v as two matrix products; also returns the softmax weights."""
        attn = self._weights(q, k)
        return self.attn_drop(attn) @ v, attn


class Mlp(nn.Module):
    """The block's two-layer perceptron: Linear -> GELU -> Linear, with the paper's dropout."""

    def __init__(self, dim: int, hidden_dim: int, gelu: str, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_plain(self.fc1, nn.Linear) and _is_plain(self.act, nn.GELU):
            h = linear(x, self.fc1.weight, self.fc1.bias, gelu=self.act.approximate)
        else:  # a wrapped or hooked layer is called as itself
            h = self.act(_linear(self.fc1, x))
        return self.drop2(_linear(self.fc2, self.drop1(h)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch, scaling the survivors by 1/keep."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """A pre-norm encoder block: x + Attention(LN(x)), then x + Mlp(LN(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate,
                              cfg.locality_attention)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, cfg.mlp_dim, cfg.gelu, cfg.drop_rate)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """The block; with num_queries, only the first num_queries tokens come out (all are attended)."""
        y = self.attn(self.norm1(x), num_queries)
        x = (x if num_queries is None else x[:, :num_queries]) + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x))), attn


def flip_averaged_log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Test-time flip: log of the mean class probabilities of each image and its mirror image.

    Usable wherever logits are (cross-entropy and argmax read it the same way).
    """
    return ((model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2).log()


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


class VisionTransformer(nn.Module):
    """ViT from a :class:`ViTConfig`. Methods follow timm: forward_features, forward_head, ..."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.embed_dim = self.num_features = cfg.embed_dim
        self.global_pool = cfg.global_pool
        self.patch_drop_rate = cfg.patch_drop_rate  # an attribute, so a training schedule may change it

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.stem,
                                      cfg.stem_depth)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        num_pos = cfg.num_patches + cfg.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, cfg.embed_dim), requires_grad=cfg.pos_embed == "learn")
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, rate) for rate in rates])
        # timm's convention: with average pooling the norm moves after the pooling (fc_norm).
        use_fc_norm = cfg.global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if self.pos_embed.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter and buffer from scratch: timm-style truncated-normal linear layers, the paper's
        (big_vision's) zero-initialised head, PyTorch's defaults for convolutions and norms, the attention
        temperature at 1/sqrt(head_dim). Complete, so a model built on the meta device and materialised
        with ``to_empty()`` is usable after it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d)):
                module.reset_parameters()  # batch norm: its running statistics too
            elif isinstance(module, Attention) and isinstance(module.scale, nn.Parameter):
                module.scale.fill_(module.head_dim**-0.5)
        if self.config.pos_embed == "sincos":
            grid = sincos_pos_embed_2d(self.config.grid_size, self.embed_dim)
            self.pos_embed.copy_(F.pad(grid, (0, 0, self.num_prefix_tokens, 0))[None])
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ---- parts of the forward pass -------------------------------------------------------------

    @property
    def dynamic_img_size(self) -> bool:
        """timm's flag: accept square images of any multiple of the patch size, with the position
        embeddings resampled on every call (differentiably), as progressive resizing trains. Off by
        default, so an image of the wrong size raises instead of being silently resampled."""
        return not self.patch_embed.strict_img_size

    @dynamic_img_size.setter
    def dynamic_img_size(self, value: bool) -> None:
        self.patch_embed.strict_img_size = not value

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[-1] // self.config.patch_size
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self._pos_embed_for(grid))

    def _pos_embed_for(self, grid: int) -> torch.Tensor:
        """The position embeddings of a grid x grid patch layout: the model's own, or at another
        resolution (dynamic_img_size) fixed sine-cosine ones computed for it or learned ones resampled."""
        if grid == self.config.grid_size:
            return self.pos_embed
        if self.config.pos_embed == "sincos":
            fixed = sincos_pos_embed_2d(grid, self.embed_dim).to(self.pos_embed)
            return torch.cat([self.pos_embed[:, : self.num_prefix_tokens], fixed[None]], dim=1)
        return resample_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Training with patch_drop_rate: each image keeps a random subset of its patch tokens.

        The transformer's cost falls with the token count, so a step costs about (1 - rate) as
        much, and the missing patches act as a regulariser (PatchDropout, Liu et al. 2022; FLIP).
        Evaluation always sees every patch; position embeddings are added before, so the kept
        tokens still know where they came from.
        """
        rate = self.patch_drop_rate
        if not self.training or rate == 0.0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, N, D = patches.shape
        keep = max(1, round(N * (1.0 - rate)))
        index = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep]
        patches = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, D))
        return torch.cat([prefix, patches], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + N, D); in training with
        patch_drop_rate, N is the number of patches kept."""
        return self.norm(self.blocks(self._drop_patches(self._embed(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (or the pooled, normalised features with pre_logits=True)."""
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool != "token":
            return self.forward_head(self.forward_features(x))
        # The head reads only the class token, and the last block's other outputs feed nothing:
        # computing the class token alone there gives the same logits for less work (about 1/depth
        # of the model's FLOPs, forward and backward). forward_features still returns every token.
        x = self._drop_patches(self._embed(x))
        for block in self.blocks[:-1]:
            x = block(x)
        return self.forward_head(self.norm(self.blocks[-1](x, num_queries=1)))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of selected blocks, with timm's signature and meaning.

        ``indices``: an int n takes the last n blocks, a sequence takes those block indices
        (negative counts from the end), None takes all. ``output_fmt``: "NCHW" gives patch tokens
        as a (B, D, h, w) map, "NLC" gives (B, N, D) tokens. Returns the intermediates alone with
        ``intermediates_only``, else ``(final_tokens, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: must be 'NCHW' or 'NLC'")
        take = self._block_indices(indices)
        last = max(take) if stop_early or intermediates_only else len(self.blocks) - 1
        intermediates = []
        x = self._embed(x)
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        patches = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            g = self.patch_embed.grid_size
            patches = [y.reshape(y.shape[0], g, g, -1).permute(0, 3, 1, 2).contiguous() for y in patches]
        result = list(zip(patches, prefix)) if return_prefix_tokens else patches
        if intermediates_only:
            return result
        return self.norm(x), result

    def _block_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices}: take between 1 and {depth} last blocks")
            return list(range(depth - indices, depth))
        take = []
        for i in indices:
            if not -depth <= i < depth:
                raise ValueError(f"block index {i} out of range for a model of depth {depth}")
            take.append(i % depth)
        return take

    def forward_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits plus every block's attention weights, (B, heads, tokens, tokens) each.

        Computed through the explicit softmax path (the fused kernel never forms the weights), so
        the ordinary forward stays fused; hooks are not needed.
        """
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            x, attn = block.forward_with_attention(x)
            maps.append(attn)
        return self.forward_head(self.norm(x)), maps

    # ---- changing shape -----------------------------------------------------------------------

    def set_input_size(self, img_size: int) -> None:
        """Accept another resolution: the position embeddings are resampled bicubically."""
        cfg = self.config.replace(img_size=img_size)  # validates divisibility
        with torch.no_grad():
            new = self._pos_embed_for(cfg.grid_size)
        self.pos_embed = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.patch_embed.img_size = img_size
        self.config = cfg

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new zero-initialised head (timm's method name), e.g. for fine-tuning."""
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError("changing global_pool changes where the final norm sits; build a new model")
        self.config = self.config.replace(num_classes=num_classes)
        self.num_classes = num_classes
        device = self.pos_embed.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay should spare (timm's method), besides norms and biases."""
        return {"pos_embed", "cls_token"}
