"""Muon's two Newton-Schulz forms compared: error against float64 and time, per dtype and shape.

orthogonalize() picks newton_schulz_gram for matrices at least twice as wide as tall, but only in
float32; this measures why. Inputs are stacks like Muon's: Gaussian matrices, and matrices whose
singular values decay from 1 to 1e-3 (a momentum's spectrum is far from flat). The error is
||out - ref|| / ||ref|| against the plain iteration in float64, with the output's singular-value
range (five steps bring a flat spectrum into about [0.7, 1.2]).

    python scripts/muon-forms.py   # on CUDA where present (fp32, TF32 and bf16), else the CPU (fp32; bf16 small)
"""

from __future__ import annotations

import statistics
import time

import torch

from vitkit.train.muon import newton_schulz, newton_schulz_gram

# (stack, rows, cols): the 30-minute recipes' MLP weights (width 128, as Muon sees fc1 and fc2),
# a hybrid stem's filters (64 x 32*3*3) and ViT-B's MLP weights
SHAPES = [(12, 128, 512), (2, 64, 288), (24, 768, 3072)]


def inputs(stack: int, rows: int, cols: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * cols)
    flat = torch.randn(stack, rows, cols, generator=gen)
    u = torch.linalg.qr(torch.randn(stack, rows, rows, generator=gen)).Q
    decaying = (u * torch.logspace(0, -3, rows)) @ torch.randn(stack, rows, cols, generator=gen)
    return {"gaussian": flat.to(device), "decaying": decaying.to(device)}


def normalized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x / x.norm(dim=(-2, -1), keepdim=True)


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # (label, dtype, float32 matmul precision); on CUDA "high" is TF32, which training sets
    variants = [("fp32", torch.float32, "highest"), ("bf16", torch.bfloat16, "highest")]
    if device.type == "cuda":
        variants.insert(1, ("tf32", torch.float32, "high"))
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("shape | input | precision | form | rel. error | singular values | ms")
    for shape in SHAPES:
        for kind, x in inputs(*shape, device).items():
            reference = newton_schulz(normalized(x, torch.float64), 5)
            for label, dtype, precision in variants:
                torch.set_float32_matmul_precision(precision)
                for form in (newton_schulz, newton_schulz_gram):
                    if device.type == "cpu" and dtype == torch.bfloat16 and shape[1] > 128:
                        continue  # bf16 products are ~100x slower than fp32 on CPUs
                    start = normalized(x, dtype)
                    out = form(start, 5)
                    error = float((out.double() - reference).norm() / reference.norm())
                    values = torch.linalg.svdvals(out.double().cpu())
                    repeats = 20 if device.type == "cuda" else 3
                    ms = median_ms(lambda f=form, s=start: f(s, 5), device, repeats)
                    print(f"{'x'.join(map(str, shape))} | {kind} | {label} | {form.__name__} | "
                          f"{error:.4f} | {values.min():.3f}-{values.max():.3f} | {ms:.2f}", flush=True)


if __name__ == "__main__":
    main()
