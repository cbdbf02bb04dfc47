"""Muon for the hidden weight matrices, AdamW for the rest, as one torch optimizer.

Muon (Jordan et al., 2024) replaces each matrix's momentum by its nearest semi-orthogonal matrix
(all singular values near 1), so every direction of the update moves at the same speed instead of
the few that dominate the gradient. It has trained transformers in fewer steps than AdamW, which is
what a short time budget needs. It suits hidden weight matrices: the blocks' 2-D weights, and a
hybrid's convolution filters past the first, each taken as the (out, in * kh * kw) matrix it
applies (as Muon's CIFAR-10 speed runs do). A fused projection is orthogonalized block by block:
attention's qkv weight as its q, k and v matrices (a group's ``row_blocks=3``), since its authors
found Muon trains transformers better with the three apart (fused, a large gradient in one of them
can shrink the other two's updates). The layer that reads the pixels, class token, position
embeddings, norms, biases and head keep AdamW (their advice too).

torch.optim.Muon exists, but orthogonalizes in bfloat16, which is two orders of magnitude slower
than float32 on most CPUs, and handles one matrix at a time. Here matrices of one shape are stacked and
orthogonalized together (a batched matmul), in float32 on the CPU and bfloat16 on CUDA or where a CPU
run trains in bf16 autocast (a chip whose bf16 products are fast: ns_dtype); in float32,
matrices at least twice as wide as tall take an equivalent form of the iteration that works on
their small Gram matrix (newton_schulz_gram).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

# Quintic Newton-Schulz coefficients from the Muon authors: chosen for the steepest slope at zero,
# so five iterations bring every singular value into roughly [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrices: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T for each matrix U S V^T of a (n, rows, cols) stack, by Newton-Schulz, in
    dtype: by default bfloat16 on CUDA and float32 on the CPU, where most chips multiply bfloat16
    slower (MuonAdamW's ns_dtype lets a run that trains in bf16 on a CPU whose bf16 is fast say so)."""
    if dtype is None:
        dtype = torch.bfloat16 if matrices.is_cuda else torch.float32
    x = matrices.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)  # Frobenius norm 1: no singular value above 1
    # At least twice as wide as tall (an MLP's weights, a stem's filters), the Gram form multiplies
    # less (1.8x less at 4:1). bfloat16 (CUDA) keeps the plain form: the Gram form's products of
    # products compound rounding, and on matrices whose singular values decay from 1 to 1e-3 it
    # diverged in bf16 (largest singular value 11-31 instead of 1.2, on a CPU and an H200 alike) and
    # drifted in TF32 (up to 1.7); scripts/muon-forms.py measures both forms in each precision.
    if dtype == torch.float32 and x.shape[-1] >= 2 * x.shape[-2]:
        x = newton_schulz_gram(x, steps)
    else:
        x = newton_schulz(x, steps)
    return (x if wide else x.mT).to(matrices.dtype)


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration x <- p(x x^T) x, p(A) = a I + b A + c A^2, on wide (rows <= cols) matrices
    of Frobenius norm at most 1."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        # a x + (b A + c A^2) x as two fused products: no separate scaling and sum of x-sized
        # tensors, which in bf16 on a CPU cost about 6 of the optimizer step's 34 ms.
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def newton_schulz_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    """newton_schulz's result (up to rounding) with the iteration carried by rows x rows matrices.

    Every iterate is Q x for a polynomial Q of the Gram matrix R = x x^T, so the iterate's own Gram
    matrix A = Q R Q is one too. All such polynomials commute, so with P = p(A): Q <- P Q and
    A <- P A P, and x is read twice, for R and for the final Q x.

    On a (rows, cols) matrix the plain form multiplies 10 rows^2 cols + 5 rows^3; this one
    2 rows^2 cols + 17 rows^3: 1.8x less for an MLP's 4:1 weights, more for a stem's wider filters;
    the two cost the same at 1.5:1, and below it this one costs more (so orthogonalize takes it from
    2:1 on).
    """
    a, b, c = NS_COEFFICIENTS
    gram = x @ x.mT
    q = None
    for step in range(steps):
        p = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2, as in newton_schulz
        p.diagonal(dim1=-2, dim2=-1).add_(a)
        q = p if q is None else p @ q
        if step < steps - 1:
            gram = p @ (gram @ p)
    return x if q is None else q @ x  # no steps: x as given, as in newton_schulz


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer for a ViT: groups with ``muon=True`` take Muon steps, the others AdamW steps.

    Both use the group's ``lr`` and decoupled ``weight_decay``. A Muon group's ``row_blocks`` (1 unless
    given) splits each of its matrices into that many equal row blocks, orthogonalized apart. Muon's
    update is scaled by 0.2 * sqrt(max(rows, cols)) of each (block) matrix, which gives it the
    root-mean-square size of an AdamW update (Liu et al., 2025, "Muon is Scalable"), so a learning
    rate and decay tuned for AdamW carry over, and one schedule drives both kinds of group.
    """

    def __init__(self, params: Iterable[dict], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, muon=False, row_blocks=1)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # orthogonalize's dtype; None: bfloat16 on CUDA, float32 on the CPU
        for group in (g for g in self.param_groups if g["muon"]):
            flat = [tuple(p.shape) for p in group["params"] if p.ndim < 2]
            if flat:
                raise ValueError(f"Muon groups take weight matrices or convolution filters only, got shapes {flat}; "
                                 "put other parameters in a group with muon=False (AdamW)")
            uneven = [tuple(p.shape) for p in group["params"] if p.shape[0] % group["row_blocks"]]
            if uneven:
                raise ValueError(f"row_blocks={group['row_blocks']} does not divide the rows of shapes {uneven}; "
                                 "give fused weights (like qkv) a group of their own with their block count")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, blocks = group["lr"], group["momentum"], group["row_blocks"]
        by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_shape[tuple(p.shape)].append(p)
        for shape, same in by_shape.items():
            grads = [p.grad for p in same]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in same]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=momentum)
            # a convolution's filters (out, in, kh, kw) as the (out, in * kh * kw) matrix they apply,
            # a fused weight's row blocks as matrices of their own
            matrices = torch.stack(nesterov).reshape(len(same) * blocks, shape[0] // blocks, -1)
            update = orthogonalize(matrices, group["ns_steps"], self.ns_dtype).view(len(same), *shape).unbind(0)
            if group["weight_decay"]:
                torch._foreach_mul_(same, 1 - lr * group["weight_decay"])
            torch._foreach_add_(same, update, alpha=-lr * 0.2 * max(matrices.shape[-2:]) ** 0.5)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        step = states[0]["step"]  # a group's parameters are always stepped together
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias2**0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, value=-lr / bias1)
