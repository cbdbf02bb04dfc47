"""Which numeric precision a run trains in.

On CUDA, bf16 autocast is the default. On the CPU it depends on the chip: an AMD Zen 4 EPYC, with
AVX-512 bf16 dot products, multiplies bf16 matrices about 2.2x as fast as fp32, a Xeon with AMX
3.3x (512-square; 5-6x at 2048), an AVX-512 Xeon with avx512_bf16 but no AMX at 0.55x, and AVX2 CPUs
emulate bf16 about 100x slower. The flags do not tell these apart, so `precision: auto` times one
small product in both and takes bf16 autocast only where it is clearly faster. The default on the
CPU stays fp32: the same numbers on every CPU.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger("vitkit")

# bf16 autocast also pays for casts and runs the norms and softmax in fp32: below this speedup of
# the products alone, the step would not gain enough to be worth the coarser arithmetic.
BF16_WORTH = 1.5

# The launching process's choice, for the processes Lightning's DDP launcher starts: each would
# otherwise time its own product while the others load the cores, and ranks that chose differently
# would train one model in two precisions.
AUTO_CHOICE_ENV = "VITKIT_AUTO_PRECISION"


def bf16_speedup(size: int = 512, repeats: int = 10) -> float:
    """How many times faster a size-square bf16 matrix product runs than an fp32 one on this CPU
    (best of repeats each; about 30 ms where bf16 is fast, cut short where it is slow). 512 rather
    than 256: on a Zen 4 EPYC the 256-square product measured 1.82-1.87x, once 1.57x at the start of
    a run (close to BF16_WORTH) and once 0.04x (one stalled product cut the timing short), while the
    512-square one measured 2.09-2.15x in all 15 tries, near the 2.2x of the model's products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = _best_time(a, b, repeats, limit=float("inf"))
    bf16 = _best_time(a.bfloat16(), b.bfloat16(), repeats, limit=20 * fp32)
    return fp32 / bf16


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int, limit: float) -> float:
    a @ b  # warm-up: oneDNN builds its kernel on the first call
    best = float("inf")
    for i in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        if best > limit and i >= 1:  # emulated bf16: two slow products say enough (one may be a stall)
            break
    return best


def resolve_precision(precision: str | None, cuda: bool) -> str:
    """Lightning's precision for this run: bf16-mixed on CUDA and 32-true on the CPU unless set;
    "auto" on the CPU measures whether bf16 pays on this chip, once per machine: the processes a
    launcher starts (LOCAL_RANK 1, 2, ...) take the launcher's choice from the environment. Under
    torchrun every process measures for itself; pass the precision there."""
    if precision not in (None, "auto"):
        return precision
    if cuda:
        return "bf16-mixed"
    if precision is None:
        return "32-true"
    inherited = os.environ.get(AUTO_CHOICE_ENV)
    if inherited in ("bf16-mixed", "32-true") and os.environ.get("LOCAL_RANK", "0") != "0":
        return inherited  # a DDP process started by a launcher that has measured already
    speedup = bf16_speedup()
    chosen = "bf16-mixed" if speedup >= BF16_WORTH else "32-true"
    log.info("precision auto: bf16 matrix products run %.2fx as fast as fp32 on this CPU; training in %s",
             speedup, chosen)
    os.environ[AUTO_CHOICE_ENV] = chosen
    return chosen
