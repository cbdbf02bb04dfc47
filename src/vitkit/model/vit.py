"""The Vision Transformer of Dosovitskiy et al. (2021), built from its named parts.

image (B, C, H, W)
  -> PatchEmbed: strided convolution, one token per patch          (B, N, D)
  -> prepend the class token, add position embeddings               (B, 1 + N, D)
  -> depth x Block: x + Attention(LN(x)); x + Mlp(LN(x))           (B, 1 + N, D)
  -> final LayerNorm, take the class token (or average patches)     (B, D)
  -> Linear head                                                    (B, num_classes)

Parameter names equal timm's VisionTransformer (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.attn.qkv``, ...), so a timm state dict of the same configuration loads with strict=True.
This is the reference: one path per module, standard PyTorch ops only. ``vitkit.model.fast.optimize``
switches a model to faster CPU kernels computing the same function. This module imports nothing else
of vitkit's but the model package: checkpoint formats live in ``vitkit.weights``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.model.config import ViTConfig
from vitkit.model.layers import AttentionPoolLatent, LayerScale, PackedSwiGLU, gelu_layer, layer_scale, prefix_tokens
from vitkit.model.pos_embed import resample_pos_embed, sincos_pos_embed_2d
from vitkit.model.stems import ConvStem, ShiftedPatches

__all__ = ["Attention", "Block", "ConvStem", "DropPath", "Mlp", "PatchEmbed", "ShiftedPatches", "VisionTransformer",
           "resample_pos_embed", "sincos_pos_embed_2d"]


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each linearly: a strided convolution.

    A conv with kernel = stride = patch size is exactly the paper's "flatten each P x P x C patch
    and multiply by E", done without materialising the patches. stem="conv" puts a ConvStem before a
    1x1 projection, stem="shifted" puts ShiftedPatches before a linear one (see vitkit.model.stems).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, stem: str = "patch",
                 stem_depth: int = 1, bias: bool = True) -> None:
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
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

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
        if self.backbone is not None:
            x = self.backbone(x)
        if isinstance(self.proj, nn.Linear):  # ShiftedPatches made the tokens: (B, h*w, 5*C*p*p)
            return self.proj(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D), row-major


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout: q, k, v stacked).

    locality=True is Lee, Lee and Song's (2021) locality self-attention for small datasets: the
    softmax temperature is learned (``scale``, a parameter starting at 1/sqrt(head_dim)) and no token
    attends to itself, so the weights sharpen onto the other tokens instead of staying flat.
    qk_norm=True puts a LayerNorm over each head's queries and keys (``q_norm``, ``k_norm``), which keeps
    the attention logits bounded in large or long-trained models; else those are Identity.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 locality: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.locality = locality
        self.scale: float | nn.Parameter = self.head_dim**-0.5
        if locality:
            self.scale = nn.Parameter(torch.tensor(self.head_dim**-0.5))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.qk_norm = qk_norm
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.qkv(x))
        return self._merge(self._attend(*self._norm_qk(q, k), v))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same function computed explicitly, also returning the (B, heads, N, N) weights."""
        q, k, v = self._heads(self.qkv(x))
        attn = self._weights(*self._norm_qk(q, k))
        return self._merge(self.attn_drop(attn) @ v), attn

    def _heads(self, projections: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, tokens, parts * dim) -> parts tensors (B, heads, tokens, head_dim): q, k, v of qkv's output."""
        return projections.unflatten(-1, (-1, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k through q_norm and k_norm (over head_dim) under qk_norm, else as they are."""
        return (self.q_norm(q), self.k_norm(k)) if self.qk_norm else (q, k)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) v by the fused kernel, which never stores the N x N weights."""
        dropout = self.attn_drop.p if self.training else 0.0
        if self.locality:
            may_attend = ~self._self_mask(q.shape[-2], k.shape[-2], q.device)
            return F.scaled_dot_product_attention(q * self.scale, k, v, attn_mask=may_attend, dropout_p=dropout,
                                                  scale=1.0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)

    def _weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale), without each token's own key under locality self-attention."""
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.locality:
            scores = scores.masked_fill(self._self_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
        return scores.softmax(dim=-1)

    @staticmethod
    def _self_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """(queries, keys), True where a query meets its own token's key: query i is token i."""
        return torch.eye(num_queries, num_keys, dtype=torch.bool, device=device)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, tokens, head_dim) -> the output projection of the heads side by side, (B, tokens, dim)."""
        B, _, N, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class Mlp(nn.Module):
    """The block's two-layer perceptron: Linear -> GELU -> Linear, with the paper's dropout.
    gelu: "exact", "tanh" or "quick" (see vitkit.model.layers.gelu_layer)."""

    def __init__(self, dim: int, hidden_dim: int, gelu: str, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = gelu_layer(gelu)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


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
    """A pre-norm encoder block: x + Attention(LN(x)), then x + Mlp(LN(x)); with cfg.init_values each
    branch is scaled by a learned per-channel LayerScale (ls1, ls2), else those are Identity."""

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate,
                              cfg.locality_attention, cfg.qk_norm, cfg.layer_norm_eps)
        self.ls1 = layer_scale(dim, cfg.init_values)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = (PackedSwiGLU(dim, cfg.mlp_dim, cfg.drop_rate) if cfg.mlp_layer == "swiglu_packed"
                    else Mlp(dim, cfg.mlp_dim, cfg.gelu, cfg.drop_rate))
        self.ls2 = layer_scale(dim, cfg.init_values)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), attn


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
        self.grad_checkpointing = False  # see set_grad_checkpointing

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.stem,
                                      cfg.stem_depth, bias=not cfg.pre_norm)  # timm: no bias before norm_pre
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.embed_dim)) if cfg.reg_tokens else None
        num_pos = cfg.num_patches + cfg.pos_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, cfg.embed_dim), requires_grad=cfg.pos_embed == "learn")
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.norm_pre = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, rate) for rate in rates])
        # timm's convention: with average pooling the norm moves after the pooling (fc_norm).
        use_fc_norm = cfg.global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps) if use_fc_norm else nn.Identity()
        self.attn_pool = None  # global_pool="map": a learned query pools the patch tokens
        if cfg.global_pool == "map":
            pool_mlp = Mlp(cfg.embed_dim, cfg.mlp_dim, cfg.gelu, 0.0)
            self.attn_pool = AttentionPoolLatent(cfg.embed_dim, cfg.num_heads, pool_mlp, cfg.layer_norm_eps)
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
            elif isinstance(module, (nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d, LayerScale, AttentionPoolLatent)):
                module.reset_parameters()  # batch norm: its running statistics too
            elif isinstance(module, Attention) and isinstance(module.scale, nn.Parameter):
                module.scale.fill_(module.head_dim**-0.5)
        if self.config.pos_embed == "sincos":
            grid = sincos_pos_embed_2d(self.config.grid_size, self.embed_dim)
            self.pos_embed.copy_(F.pad(grid, (0, 0, self.config.pos_prefix_tokens, 0))[None])
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
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
        prefix = prefix_tokens(x.shape[0], self.cls_token, self.reg_token)
        if self.config.no_embed_class:  # the prefix tokens get no position
            x = torch.cat([*prefix, x + self._pos_embed_for(grid)], dim=1)
        else:
            x = (torch.cat([*prefix, x], dim=1) if prefix else x) + self._pos_embed_for(grid)
        return self.norm_pre(self.pos_drop(x))  # a per-token norm: the same before or after dropping patches

    def _pos_embed_for(self, grid: int) -> torch.Tensor:
        """The position embeddings of a grid x grid patch layout: the model's own, or at another
        resolution (dynamic_img_size) fixed sine-cosine ones computed for it or learned ones resampled."""
        if grid == self.config.grid_size:
            return self.pos_embed
        if self.config.pos_embed == "sincos":
            fixed = sincos_pos_embed_2d(grid, self.embed_dim).to(self.pos_embed)
            return torch.cat([self.pos_embed[:, : self.config.pos_prefix_tokens], fixed[None]], dim=1)
        return resample_pos_embed(self.pos_embed, grid, self.config.pos_prefix_tokens)

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
        x = self._drop_patches(self._embed(x))
        if not self.grad_checkpointing:
            return self.norm(self.blocks(x))
        for block in self.blocks:  # each block's activations recomputed in the backward pass
            x = checkpoint(block, x, use_reentrant=False)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (or the pooled, normalised features with pre_logits=True)."""
        if self.attn_pool is not None:
            x = self.attn_pool(x[:, self.num_prefix_tokens :])
        else:
            x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
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
        grid = x.shape[-1] // self.config.patch_size  # the input's, which dynamic_img_size lets differ
        x = self._embed(x)
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        patches = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            patches = [y.reshape(y.shape[0], grid, grid, -1).permute(0, 3, 1, 2).contiguous() for y in patches]
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input in training and recompute the rest in the backward pass (timm's
        method): less memory for about a third more compute."""
        self.grad_checkpointing = enable

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
        return {"pos_embed", "cls_token", "reg_token"}
