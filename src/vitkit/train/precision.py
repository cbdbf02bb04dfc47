"""Which numeric precision a run trains in.

On CUDA, bf16 autocast is the default. On the CPU it depends on the chip: some multiply bf16
matrices several times as fast as fp32, some at about half its speed, and CPUs without bf16 dot
products emulate it about 100x slower. The CPU flags do not tell these apart, so `precision: auto`
times one small product in both and takes bf16 autocast only where it is clearly faster. The
default on the CPU stays fp32: the same numbers on every CPU.
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
    than 256: the smaller product's ratio swings from run to run (one stalled product can cut the
    timing short), the larger one's stays near the model's own products' ratio."""
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
