"""Throughput of the input pipeline, to check that data never limits training."""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from vitkit.data.augment import CIFAR10_MEAN, CIFAR10_STD, AugmentConfig, BatchAugment
from vitkit.data.sources import load_splits

# The pipeline the issue measures: CIFAR-10 with crop+flip+TrivialAugment+mixup.
CIFAR_BENCH_CONFIG = AugmentConfig(crop_padding=4, hflip=True, auto_augment="trivial", mixup_alpha=0.8)


def bench_augment(
    images: torch.Tensor,
    config: AugmentConfig,
    *,
    batch_size: int = 256,
    seconds: float = 5.0,
    image_size: int | None = None,
    num_classes: int = 10,
    seed: int = 0,
) -> dict:
    """Images per second of gather + :class:`BatchAugment` on random batches of ``images`` (uint8 (N, 3, h, w)).

    Runs on the images' device (CUDA is synchronised before each clock read) for about ``seconds`` after
    two warm-up batches. Each batch is indexed from the full set, as training does.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"bench_augment needs non-empty uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    device = images.device
    size = int(image_size or images.shape[-1])
    augment = BatchAugment(config, size, num_classes, CIFAR10_MEAN, CIFAR10_STD)
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(num_classes, (len(images),), generator=generator, device=device)

    def step() -> None:
        index = torch.randint(len(images), (batch_size,), generator=generator, device=device)
        augment(images[index], labels[index], generator)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        step()
    sync()
    batches = 0
    start = time.perf_counter()
    while True:
        step()
        batches += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {
        "images_per_s": batches * batch_size / elapsed,
        "batch_size": batch_size,
        "batches": batches,
        "seconds": elapsed,
        "input_size": int(images.shape[-1]),
        "image_size": size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(config),
    }


def bench_data(
    source: str | os.PathLike,
    config: AugmentConfig | None = None,
    *,
    batch_size: int = 256,
    seconds: float = 5.0,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    **load_kwargs,
) -> dict:
    """Load ``source`` (timed: the second run shows the cache) and measure augmentation throughput on it.

    ``image_size`` is the model's input size (the augmentation resizes to it); ``load_kwargs`` go to
    :func:`load_splits`. For ``vitkit bench data``: compare ``images_per_s`` with the model's training speed.
    """
    start = time.perf_counter()
    splits = load_splits(source, **load_kwargs)
    load_seconds = time.perf_counter() - start
    if splits.train.images is None:
        raise ValueError(f"{source}: too large to hold in memory; this benchmark needs in-memory data")
    result = bench_augment(
        splits.train.images.to(device),
        config or CIFAR_BENCH_CONFIG,
        batch_size=batch_size,
        seconds=seconds,
        image_size=image_size,
        num_classes=len(splits.classes),
    )
    return {**result, "load_seconds": load_seconds, "source": splits.source, "train_images": len(splits.train)}
