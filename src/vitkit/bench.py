"""`vitkit bench`: how close a training step comes to the machine's limit, and how it compares.

Throughput is measured in alternating rounds (vitkit, then the reference, then vitkit ...) in one
process, so drift in clock speed or background load hits both alike; medians are reported. The
FLOP count comes from ``torch.utils.flop_counter.FlopCounterMode`` on one real step, and the peak is
the fastest of a large matrix product by each library PyTorch has for it (matmul_peaks), timed in the
same run, in the step's precision: fp32 by default on the CPU, bf16 under autocast on CUDA or with
``precision="bf16-mixed"`` (worth it only on CPUs whose bf16 products outrun fp32; CPUs without native
bf16 products emulate them, about 100x slower; see docs/experiments.md).

vitkit's model runs with its fast CPU kernels on (``vitkit.model.fast.optimize``), as training and
inference run it; the timm twin is timm's own model.

The peak is a square product's; a model's products are thinner (one side is its width), so they run
slower. To tell that apart from everything else a step does, the counted operations of one step are
recorded and each is replayed alone at its own shapes and strides: their total time is what the step
would take if nothing else cost anything, and their rate is the fraction of peak that step could
reach at best.
"""

from __future__ import annotations

import functools
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from vitkit.model import VisionTransformer, get_config
from vitkit.model.config import TIMM_FAMILY_KWARGS
from vitkit.model.fast import ONEDNN_LINEAR, cpu_inference_projections, optimize

BENCH_PRECISIONS = ("32-true", "bf16-mixed")  # Lightning's names, as `vitkit train --precision` takes them


def default_precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def matmul_peaks(device: torch.device, size: int | None = None, repeats: int = 8,
                 dtype: torch.dtype = torch.float32, seconds: float = 5.0) -> dict[str, float]:
    """GFLOP/s of a square product in dtype, best of `repeats`, for each library PyTorch multiplies
    with here: torch.mm (BLAS on the CPU, cuBLAS on CUDA) and, on the CPU, oneDNN's linear. The best of
    them is the peak a step is compared with.

    Both count because either can run a step's products (vitkit's CPU inference uses oneDNN where it
    pays), and BLAS alone can understate the ceiling: on some CPUs oneDNN's product runs faster than
    BLAS's (docs/experiments.md).

    A GPU needs a product of 8192 squared to approach its peak; 2048 already saturates a CPU. After
    two products, repeats stop once they have taken `seconds`: a CPU that emulates bf16 (AVX2 ones)
    takes about 10 s for each 2048-square product.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return {name: 2 * size**3 / _best_time(product, device, repeats, seconds) / 1e9
            for name, product in square_products(a, b).items()}


def square_products(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """a @ b by each library matmul_peaks times, by name."""
    products: dict[str, Callable[[], torch.Tensor]] = {"mm": lambda: a @ b}
    if a.device.type == "cpu" and ONEDNN_LINEAR:
        weight = b.t().contiguous()  # linear multiplies by its weight's transpose
        products["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")
    return products


def _best_time(product: Callable[[], torch.Tensor], device: torch.device, repeats: int, seconds: float) -> float:
    best = float("inf")
    began = time.perf_counter()
    for i in range(repeats):
        _sync(device)
        start = time.perf_counter()
        product()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if i >= 1 and time.perf_counter() - began > seconds:
            break
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timm_twin(model: VisionTransformer) -> nn.Module:
    """timm's VisionTransformer of the identical configuration, with the same weights (and the same
    dropouts, patch dropout included, since they change what a training step computes)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    cfg = model.config
    extras = cfg.parts_timm_lacks() + ([f"gelu={cfg.gelu!r}"] if cfg.gelu != "exact" else []) + (
        [f"mlp_layer={cfg.mlp_layer!r}"] if cfg.mlp_layer != "mlp" else [])
    if extras:
        raise ValueError(f"timm's VisionTransformer has no {' or '.join(extras)}, so there is no timm twin to "
                         "time against; bench this model without --against timm")
    twin = TimmViT(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                   num_classes=cfg.num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                   mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token,
                   global_pool=cfg.global_pool, pos_drop_rate=cfg.drop_rate, proj_drop_rate=cfg.drop_rate,
                   attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
                   patch_drop_rate=cfg.patch_drop_rate, **{k: getattr(cfg, k) for k in TIMM_FAMILY_KWARGS})
    twin.load_state_dict(model.state_dict())
    return twin


class _Step:
    """One training step (forward, loss, backward, AdamW) or one inference forward."""

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device, train: bool,
                 bf16: bool = False) -> None:
        cfg_size = model.patch_embed.img_size
        size = cfg_size if isinstance(cfg_size, int) else cfg_size[0]
        self.model = model.to(device).train(train)
        self.train = train
        self.x = torch.randn(batch_size, 3, size, size, device=device)
        self.y = torch.randint(0, model.num_classes, (batch_size,), device=device)
        kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kind) if train else None
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None
        self.device = device

    def __call__(self) -> None:
        if self.train:
            with self.autocast or _null():
                loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), self.autocast or _null():
                self.model(self.x)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the model's CPU inference projections

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _onednn_linear_flops(x_shape: torch.Size, w_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
        """The FlopCounterMode knows aten's matrix products only; this one is a plain x @ w.T."""
        rows = 1
        for size in x_shape[:-1]:
            rows *= size
        return 2 * rows * w_shape[0] * w_shape[1]


def count_flops(step: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor's layout, recorded in place of the tensor (a leaf to tree_map, unlike a NamedTuple)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def make(self) -> torch.Tensor:
        """A tensor of this layout (overlapping strides included) filled with random values."""
        extent = 1 + sum((size - 1) * step for size, step in zip(self.shape, self.stride)) if all(self.shape) else 0
        base = torch.randn(extent, device=self.device).to(self.dtype)
        return base.as_strided(self.shape, self.stride)


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    return value


class _RecordCounted(TorchDispatchMode):
    """Records every call of an operation the FLOP counter counts (matrix products, convolutions,
    attention kernels) with its arguments' layouts, so that each can be replayed alone."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list] = {}  # repr of (op, args) -> [op, args, kwargs, times called]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket in flop_registry:
            specs = tree_map(_spec, (args, kwargs))
            entry = self.calls.setdefault(repr((func, specs)), [func, *specs, 0])
            entry[3] += 1
        else:  # without autograd (inference), composite ops such as linear arrive whole: open them here
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)


def products_alone(step: Callable[[], None], device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Milliseconds and GFLOP of one step's counted operations, each replayed alone (median of repeats)
    on fresh tensors of the recorded layouts: the time the step would take if nothing else cost."""
    recorder = _RecordCounted()
    with recorder:
        step()
    seconds = flops = 0.0
    with torch.no_grad():
        for func, args, kwargs, count in recorder.calls.values():
            args, kwargs = tree_map(lambda v: v.make() if isinstance(v, _TensorSpec) else v, (args, kwargs))
            call = functools.partial(func, *args, **kwargs)
            call()  # warm-up
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            samples = [_time_steps(call, 1, device) for _ in range(repeats)]
            seconds += count * statistics.median(samples)
            flops += count * counter.get_total_flops()
    return {"ms": seconds * 1e3, "gflop": flops / 1e9}


def _time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def bench_model(name: str = "cifar-tiny", *, batch_size: int = 128, against: str | None = None, rounds: int = 5,
                steps: int = 5, compile: bool = False, device: str | None = None, precision: str | None = None,
                **overrides: Any) -> dict[str, Any]:
    """Training-step and inference images/s, GFLOP/s, fraction of the matmul peak, peak memory.

    precision: "32-true" or "bf16-mixed" (autocast); by default bf16-mixed on CUDA, 32-true on the CPU.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or default_precision(dev)
    if precision not in BENCH_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(BENCH_PRECISIONS)}")
    bf16 = precision == "bf16-mixed"
    torch.manual_seed(0)
    ours = optimize(VisionTransformer(get_config(name, **overrides)))
    models = {"vitkit": ours}
    if against == "timm":
        models["timm"] = timm_twin(ours)
    if compile:
        for model in models.values():
            model.compile()
    peaks = matmul_peaks(dev, dtype=torch.bfloat16 if bf16 else torch.float32)
    peak = max(peaks.values())
    result: dict[str, Any] = {"model": name, "config": ours.config.to_dict(), "batch_size": batch_size,
                              "device": str(dev), "precision": precision, "threads": torch.get_num_threads(),
                              "rounds": rounds, "steps_per_round": steps, "matmul_peak_gflops": peak,
                              "matmul_peaks": peaks, "compile": compile}
    if dev.type == "cpu" and not compile:  # its probe's time stays out of the rounds
        result["inference_projections"] = cpu_inference_projections(torch.bfloat16 if bf16 else torch.float32)
    for mode in ("train", "infer"):
        runners = {k: _Step(m, batch_size, dev, train=mode == "train", bf16=bf16) for k, m in models.items()}
        # Counted per model: vitkit's optimized forward skips work whose result nothing reads (the last
        # block's patch tokens), so it executes fewer FLOPs than timm for the same logits.
        flops = {k: count_flops(runner) for k, runner in runners.items()}
        for runner in runners.values():  # warm-up (and compilation) outside the timed rounds
            runner()
            runner()
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(rounds):
            for key, runner in runners.items():
                times[key].append(_time_steps(runner, steps, dev))
        for key, samples in times.items():
            median = statistics.median(samples) / steps
            entry = {"images_per_s": batch_size / median, "step_ms": median * 1e3,
                     "gflop_per_image": flops[key] / batch_size / 1e9, "gflops_per_s": flops[key] / median / 1e9}
            entry["fraction_of_peak"] = entry["gflops_per_s"] / peak
            if not compile:  # a compiled step's operations run inside its graphs; they are not replayed
                alone = products_alone(runners[key], dev)
                entry["products_alone_ms"] = alone["ms"]
                entry["products_fraction_of_peak"] = alone["gflop"] / (alone["ms"] / 1e3) / peak
            result.setdefault(key, {})[mode] = entry
        if "timm" in runners:
            result.setdefault("ratio_vs_timm", {})[mode] = (
                result["vitkit"][mode]["images_per_s"] / result["timm"][mode]["images_per_s"])
    if dev.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def bench_data(folder: str | None = None, *, batch_size: int = 256, seconds: float = 5.0) -> dict[str, Any]:
    """Images/s of the training input pipeline: crop+flip+TrivialAugment+mixup on whole batches."""
    from vitkit.data import AugmentConfig, bench_augment, load_splits

    if folder:
        images = load_splits(folder, val_fraction=0.0).train.images
    else:
        images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    config = AugmentConfig(crop_padding=4, hflip=True, auto_augment="trivial", mixup_alpha=0.8)
    result = bench_augment(images, config, batch_size=batch_size, seconds=seconds)
    result.update({"pipeline": "crop+flip+trivialaugment+mixup", "source": folder or "random uint8 32x32",
                   "threads": torch.get_num_threads()})
    return result


def format_result(result: dict[str, Any]) -> str:
    """A short human-readable summary of a bench result."""
    if "pipeline" in result:
        return (f"data pipeline ({result['pipeline']}, batch {result.get('batch_size')}): "
                f"{result['images_per_s']:.0f} images/s on {result['threads']} thread(s)")
    dtype = "bf16" if result["precision"] == "bf16-mixed" else "fp32"
    lines = [f"{result['model']} batch {result['batch_size']} on {result['device']} ({result['threads']} threads), "
             f"{result['precision']}, {dtype} matmul peak {result['matmul_peak_gflops']:.0f} GFLOP/s "
             f"({', '.join(f'{k} {v:.0f}' for k, v in result['matmul_peaks'].items())})"]
    for key in ("vitkit", "timm"):
        if key not in result:
            continue
        for mode in ("train", "infer"):
            e = result[key][mode]
            lines.append(f"  {key:<7}{mode:<6}{e['images_per_s']:>9.1f} img/s  {e['gflop_per_image']:>6.3f} GFLOP/img  "
                         f"{e['gflops_per_s']:>7.1f} GFLOP/s  {100 * e['fraction_of_peak']:>5.1f}% of peak")
            if "products_alone_ms" in e:
                lines.append(f"{'':<15}products alone: {e['products_alone_ms']:.1f} of {e['step_ms']:.1f} ms a step, "
                             f"{100 * e['products_fraction_of_peak']:.1f}% of peak (the step's ceiling)")
    if "inference_projections" in result:
        lines.append(f"  vitkit's inference projections: {result['inference_projections']} "
                     "(of oneDNN's fused ones and BLAS's, the faster here)")
    if "ratio_vs_timm" in result:
        r = result["ratio_vs_timm"]
        lines.append(f"  vitkit / timm: train {r['train']:.3f}x, inference {r['infer']:.3f}x")
    lines.append(f"  peak memory {result['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)
