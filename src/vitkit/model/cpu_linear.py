"""The blocks' projections in eager CPU inference: oneDNN's fused matmul where this CPU runs it faster.

PyTorch's BLAS path for nn.Linear copies the bias into every output row, multiplies, and an MLP then
reads and writes its hidden activations once more for the GELU. oneDNN's linear (a private op,
``torch.ops.mkldnn._linear_pointwise``) adds the bias and applies the GELU in its epilogue. Whether
that pays depends on the chip, not on its flags, so the first inference call of a process times both
(about 0.1 s). Training, tracing and export keep the standard ops. Kept apart from ``vit.py`` so the
model reads as the paper's parts; ``linear`` is all the model needs from here.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes  # private; see onednn_linear_pays

# oneDNN's fused linear (a private op, present in builds with oneDNN); see linear().
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def bf16_autocast_on_the_cpu() -> bool:
    """Whether the caller runs under CPU autocast to bfloat16 (the model's attention path asks too)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _onednn_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype in which x's projections go through oneDNN, or None for the standard ops: eager
    inference on the CPU only, in fp32, or in bf16 under bf16 autocast (casting the operands here,
    since autocast does not cast a private op's), where this CPU runs them faster that way.
    Training, tracing and export keep the standard ops."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.bfloat16 if bf16_autocast_on_the_cpu() else None
    else:
        dtype = torch.float32 if x.dtype == torch.float32 else None
    return dtype if dtype is not None and onednn_linear_pays(dtype) else None


def cpu_inference_projections(dtype: torch.dtype = torch.float32) -> str:
    """Which path eager CPU inference in dtype (fp32, or bf16 autocast) takes for the blocks'
    projections: "oneDNN" or "BLAS"."""
    return "oneDNN" if onednn_linear_pays(dtype) else "BLAS"


@functools.cache
def onednn_linear_pays(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's fused projections (see linear()) beat PyTorch's BLAS path on this CPU
    in dtype, timed once per process and dtype (about 0.1 s) on an MLP's two projections, GELU
    included; False where this PyTorch build lacks the op.

    It depends on the chip, not on its flags. With oneDNN, 2 cores of one AVX2 EPYC (matmul peak
    105-135 GFLOP/s) inferred 1.45x as fast as timm, an AVX-512 Xeon and a Zen 4 EPYC 1.2-1.4x; on a
    Zen 3 EPYC, also AVX2 (peak 184), oneDNN's products ran at 140-148 GFLOP/s against BLAS's 172-175
    and its GELU epilogue cost more than a separate pass: the MLP took 1.3x as long, and inference fell
    from 1.15x timm's with BLAS to 0.95x.
    """
    if not ONEDNN_LINEAR:
        return False
    # Out of any dispatch mode the first inference call runs under: a FLOP counter would count the
    # probe as the model's work, a fake-tensor mode would time nothing and fix the choice for good.
    with _disable_current_modes():
        # bf16 on fewer rows: where this CPU emulates bf16 products (AVX2), 2048 would take seconds.
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           gelu: str | None = None) -> torch.Tensor:
    """F.linear, followed by GELU (of that approximation, "none" or "tanh") if gelu is given.

    In inference on the CPU it runs as one oneDNN matmul with the bias and the GELU in its epilogue:
    PyTorch's BLAS path first copies the bias into every output row, multiplies, and then reads and
    writes the hidden activations once more for the GELU. The fused bias made inference of a CIFAR
    ViT 12-16% faster on 2 cores of an AVX2 EPYC; the fused GELU and the attention output projection
    added 5% on an AVX-512 Xeon (the same results up to fp32 rounding). On CPUs where it is slower
    (onednn_linear_pays), the BLAS path stays. Under bf16 autocast it runs in bf16, as F.linear
    would there: on a Xeon with AMX the bias fused made fc1 1.39x as fast (1.00 against 1.40 ms).
    """
    dtype = _onednn_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none" if gelu is None else "gelu", [], gelu or "")
    y = F.linear(x, weight, bias)
    if gelu is None:
        return y
    if y.requires_grad:
        return F.gelu(y, approximate=gelu)
    return torch.ops.aten.gelu_(y, approximate=gelu)  # inference: in place, sparing a hidden-sized buffer
