"""Faster CPU kernels for a VisionTransformer, switched on by one call: ``optimize(model)``.

The reference (``vit.py``) runs one path of standard ops per module. ``optimize`` swaps the classes of
the model and its parts for the subclasses below, which compute the same function (up to fp32
rounding) faster; parameters, buffers and state dict keys do not change, the swap survives
``copy.deepcopy``, pickling and ``torch.compile``, and calling it again changes nothing. Off the CPU
every part runs the reference's ops but the last block (below). On the CPU (decided in ``kernels`` alone):

- Eager inference projections (the blocks', and the shifted stem's): oneDNN's fused linear (a private
  op, ``torch.ops.mkldnn._linear_pointwise``), which adds the bias, and in the MLP the GELU, in its
  epilogue, where a timing probe at the first call says it beats PyTorch's BLAS path on this CPU
  (``onednn_linear_pays``; under bf16 autocast in bf16); else BLAS with the GELU in place.
- Training on short sequences (up to ``EXPLICIT_ATTENTION_MAX_TOKENS``): attention as explicit matrix
  products, head by head in fp32, batched over heads under bf16 autocast: the flash kernel's CPU
  backward is slow for short sequences.
- On any device, with the class token pooled (global_pool="token") and no register tokens, the last block
  computes the class token alone: its other outputs feed nothing, so the logits are the same for about
  1/depth less work. It falls back to the whole block when the model checkpoints gradients or a forward
  hook could see the difference (one on the blocks, the last block or anything in it, or the final norm).

Each speed-up was measured faster on several CPUs and machine-dependent where a probe decides; see
docs/experiments.md.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes  # private; see onednn_linear_pays

from vitkit.model.vit import Attention, Block, Mlp, VisionTransformer

__all__ = [
    "EXPLICIT_ATTENTION_MAX_TOKENS",
    "ONEDNN_LINEAR",
    "FastAttention",
    "FastBlock",
    "FastLinear",
    "FastMlp",
    "FastVisionTransformer",
    "Kernels",
    "cpu_inference_projections",
    "kernels",
    "linear",
    "onednn_linear_pays",
    "optimize",
]

# oneDNN's fused linear (a private op, present in builds with oneDNN); see linear().
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Training on the CPU, sequences up to this length use explicit attention (faster there than the
# flash kernel): head by head in fp32, batched under bf16 autocast.
EXPLICIT_ATTENTION_MAX_TOKENS = 128


# ---- the one decision: which kernels this call runs ---------------------------------------------


class Kernels(NamedTuple):
    """What a call on the CPU runs: projections through oneDNN in this dtype (None: F.linear), and
    attention "fused" (scaled_dot_product_attention), "head_by_head" (fp32) or "batched" (explicit)."""

    onednn: torch.dtype | None
    attention: str


def kernels(x: torch.Tensor) -> Kernels | None:
    """The kernels for an input x of shape (batch, tokens, ...), from the ambient state: device, grad
    mode, autocast, compilation and the token count. None off the CPU: the reference's ops there."""
    if x.device.type != "cpu":
        return None
    bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if torch.is_grad_enabled():
        if x.ndim < 3 or x.shape[1] > EXPLICIT_ATTENTION_MAX_TOKENS:
            return Kernels(None, "fused")
        # In bf16 the batched products beat head by head: oneDNN's bf16 batched product copies each
        # strided head into a dense one, which costs more than the batched form's single copy.
        return Kernels(None, "batched" if bf16 else "head_by_head")
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # compiled, traced and exported code: standard ops
        return Kernels(None, "fused")
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.bfloat16 if bf16 else None  # autocast does not cast a private op's operands: linear() does
    else:
        dtype = torch.float32 if x.dtype == torch.float32 else None
    return Kernels(dtype if dtype is not None and onednn_linear_pays(dtype) else None, "fused")


# ---- oneDNN's fused projections ------------------------------------------------------------------


def cpu_inference_projections(dtype: torch.dtype = torch.float32) -> str:
    """Which path eager CPU inference in dtype (fp32, or bf16 autocast) takes for the blocks'
    projections once optimized: "oneDNN" or "BLAS"."""
    return "oneDNN" if onednn_linear_pays(dtype) else "BLAS"


@functools.cache
def onednn_linear_pays(dtype: torch.dtype, /) -> bool:  # positional: one cache entry per dtype
    """Whether oneDNN's fused projections (see linear()) beat PyTorch's BLAS path on this CPU in dtype,
    timed once per process and dtype (about 0.1 s) on an MLP's two projections, GELU included; False
    where this PyTorch build lacks the op. It depends on the chip, not on its flags: on some CPUs
    oneDNN's products and GELU epilogue run slower than BLAS and a separate pass (docs/experiments.md).
    """
    if not ONEDNN_LINEAR:
        return False
    # Out of any dispatch mode the first inference call runs under: a FLOP counter would count the
    # probe as the model's work, a fake-tensor mode would time nothing and fix the choice for good.
    with _disable_current_modes():
        # bf16 on fewer rows: where this CPU emulates bf16 products, 2048 would take seconds.
        return _time_fused_and_blas(rows=2048 if dtype == torch.float32 else 512, dtype=dtype)


@torch.compiler.disable  # eager kernels timed: a compiled caller's frame hook must not trace them
def _time_fused_and_blas(rows: int = 2048, dim: int = 192, hidden: int = 768, repeats: int = 5,
                         dtype: torch.dtype = torch.float32) -> bool:
    """Whether cifar-tiny's MLP on `rows` tokens runs faster fused (best of `repeats` each).

    Compiled code can reach it: a compiled model that runs part of its forward eagerly (under a
    FLOP counter, as `vitkit bench --compile` counts) still hands every frame it calls to dynamo,
    which would compile these two MLPs, fail to lower oneDNN's op with a weight that is not a
    constant, and time nothing of what eager inference runs."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cpu").to(dtype)

    x = randn(rows, dim)
    w1, b1 = randn(hidden, dim) * dim**-0.5, torch.zeros(hidden, dtype=dtype)
    w2, b2 = randn(dim, hidden) * hidden**-0.5, torch.zeros(dim, dtype=dtype)

    def fused() -> torch.Tensor:
        h = torch.ops.mkldnn._linear_pointwise(x, w1, b1, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(h, w2, b2, "none", [], "")

    def blas() -> torch.Tensor:
        return F.linear(torch.ops.aten.gelu_(F.linear(x, w1, b1)), w2, b2)

    best = {fused: float("inf"), blas: float("inf")}
    with torch.inference_mode():
        for mlp in best:  # warm-up: oneDNN builds its kernels on the first call
            mlp()
        for _ in range(repeats):  # alternating, so a slow moment of the machine hits both
            for mlp in best:
                start = time.perf_counter()
                mlp()
                best[mlp] = min(best[mlp], time.perf_counter() - start)
    return best[fused] < best[blas]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: torch.dtype | None,
           gelu: str | None = None) -> torch.Tensor:
    """F.linear, followed by GELU (of that approximation, "none" or "tanh") if gelu is given.

    With onednn (a dtype, from kernels()) it runs as one oneDNN matmul in that dtype with the bias and
    the GELU in its epilogue: PyTorch's BLAS path first copies the bias into every output row,
    multiplies, and then reads and writes the hidden activations once more for the GELU. Else F.linear,
    with the GELU in place where nothing needs its input for a gradient.
    """
    if onednn is not None:
        x, weight = x.to(onednn), weight.to(onednn)
        bias = None if bias is None else bias.to(onednn)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none" if gelu is None else "gelu", [], gelu or "")
    y = F.linear(x, weight, bias)
    if gelu is None:
        return y
    if y.requires_grad:
        return F.gelu(y, approximate=gelu)
    return torch.ops.aten.gelu_(y, approximate=gelu)  # inference: in place, sparing a hidden-sized buffer


# ---- the fast parts ------------------------------------------------------------------------------


def _hooked(module: nn.Module) -> bool:
    """Whether module has forward hooks or pre-hooks of its own. Global ones (a FLOP counter's module
    tracker) do not count: they would turn the fast path off wherever its work is counted."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _plain(module: nn.Module, kind: type) -> bool:
    """module is exactly a `kind` (its fast subclass included) without hooks: its weights may be used directly."""
    return type(module) in (kind, _FAST.get(kind)) and not _hooked(module)


class FastLinear(nn.Linear):
    """nn.Linear through linear(): oneDNN's fused matmul in eager CPU inference where it pays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = kernels(x)
        if chosen is None:
            return super().forward(x)
        return linear(x, self.weight, self.bias, chosen.onednn)


class FastMlp(Mlp):
    """The MLP with fc1's GELU in the projection's epilogue (oneDNN) or applied in place (BLAS)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = kernels(x)
        if chosen is None or not (_plain(self.fc1, nn.Linear) and _plain(self.act, nn.GELU)):
            return super().forward(x)  # a wrapped or hooked layer is called as itself
        h = linear(x, self.fc1.weight, self.fc1.bias, chosen.onednn, gelu=self.act.approximate)
        return self.drop2(self.fc2(self.drop1(h)))


class FastAttention(Attention):
    """Attention on the kernels that kernels() chooses; with num_queries, only the first num_queries tokens' outputs
    are computed (all tokens are attended), from slices of the same fused qkv weight."""

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        chosen = kernels(x)
        if num_queries is None and (chosen is None or chosen.attention == "fused"):
            return super().forward(x)
        chosen = chosen or Kernels(None, "fused")  # off the CPU: the reference's ops for the class token alone
        projections = self._project(x, num_queries, chosen)
        if chosen.attention == "head_by_head":
            return self.proj_drop(self.proj(self._attend_head_by_head(*projections)))
        q, k, v = (heads for p in projections for heads in self._heads(p))
        q, k = self._norm_qk(q, k)
        if chosen.attention == "batched":
            return self._merge(self.attn_drop(self._weights(q, k)) @ v)
        return self._merge(self._attend(q, k, v))

    def _project(self, x: torch.Tensor, num_queries: int | None, chosen: Kernels) -> tuple[torch.Tensor, ...]:
        """(qkv,) of every token; with num_queries (q of the first num_queries tokens, kv of every token)."""
        if num_queries is None:
            return (self.qkv(x),)
        D = x.shape[-1]
        weight, bias = self.qkv.weight, self.qkv.bias
        q = linear(x[:, :num_queries], weight[:D], None if bias is None else bias[:D], chosen.onednn)
        kv = linear(x, weight[D:], None if bias is None else bias[D:], chosen.onednn)
        return q, kv

    def _attend_head_by_head(self, *projections: torch.Tensor) -> torch.Tensor:
        """Attention as plain matrix products, one head at a time, on strided views of the projections:
        no copies of q, k, v and their gradients into head-major order, which the batched form makes.
        Returns (B, tokens, dim), the heads side by side."""
        heads = [h for p in projections for h in p.unflatten(-1, (-1, self.head_dim)).unbind(2)]
        H = self.num_heads
        qk = [self._norm_qk(q, k) for q, k in zip(heads[:H], heads[H : 2 * H])]
        out = [self.attn_drop(self._weights(q, k)) @ v for (q, k), v in zip(qk, heads[2 * H :])]
        return torch.cat(out, dim=-1)


class FastBlock(Block):
    """The block; with num_queries, only the first num_queries tokens come out (all are attended)."""

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        if num_queries is None:
            return super().forward(x)
        x = x[:, :num_queries] + self.drop_path1(self.ls1(self.attn(self.norm1(x), num_queries)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class FastVisionTransformer(VisionTransformer):
    """The model whose forward computes only the class token in the last block, where that changes
    nothing anyone can see (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._class_token_only(x):
            return super().forward(x)
        x = self._drop_patches(self._embed(x))
        for block in self.blocks[:-1]:
            x = block(x)
        return self.forward_head(self.norm(self.blocks[-1](x, num_queries=1)))

    def _class_token_only(self, x: torch.Tensor) -> bool:
        last = self.blocks[-1] if len(self.blocks) else None
        return (self.global_pool == "token" and self.num_prefix_tokens == 1
                and not self.grad_checkpointing and type(last) is FastBlock and type(last.attn) is FastAttention
                and _plain(last.attn.qkv, nn.Linear)
                and not any(_hooked(m) for m in (self.blocks, self.norm, *last.modules())))


_FAST: dict[type, type] = {VisionTransformer: FastVisionTransformer, Block: FastBlock, Attention: FastAttention,
                           Mlp: FastMlp, nn.Linear: FastLinear}


def optimize(model: VisionTransformer) -> VisionTransformer:
    """Switch model (in place) to the fast CPU kernels; returns it. Idempotent; the state dict is unchanged.

    Swaps the class of the model, its blocks, their attention and MLP, and the projections in the blocks
    and the patch embedding, for the subclasses of this module; a part that is already fast, or of
    another class (a wrapper, a user's subclass), is left as it is. The head stays an nn.Linear.
    Call it before ``torch.compile``, on the model itself.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vitkit.model.fast.optimize takes a vitkit VisionTransformer, got {type(model).__name__}; "
                        "optimize the model before compiling or wrapping it")
    for module in [model, *model.blocks.modules(), *model.patch_embed.modules()]:
        fast = _FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model
