"""Shared fixtures: generated image folders (no network, no shared data needed) and a trained run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "train"

COLORS = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 40, 40)}


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_root(tmp_path_factory):
    """Caches and downloads go to a temporary data root, never the user's ~/.cache."""
    root = tmp_path_factory.mktemp("vitkit-data-root")
    old = os.environ.get("VITKIT_DATA")
    os.environ["VITKIT_DATA"] = str(root)
    yield root
    if old is None:
        os.environ.pop("VITKIT_DATA", None)
    else:
        os.environ["VITKIT_DATA"] = old


def make_color_folder(root: Path, per_class: int = 40, size: int = 16, seed: int = 0) -> Path:
    """ROOT/<class>/*.png: noisy images whose dominant colour is the class; learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for name, color in COLORS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 40, (size, size, 3))
            pixels = np.clip(np.array(color)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def color_folder(tmp_path_factory) -> Path:
    return make_color_folder(tmp_path_factory.mktemp("colors"))


TINY_TRAIN = dict(model="cifar-mini", img_size=16, depth=2, epochs=3, batch_size=16, lr=3e-3,
                  weight_decay=0.01, warmup_epochs=0.5, progress=False, augment={"hflip": True})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, color_folder):
    """A finished 3-epoch run of a 2-block model on the colour folder, shared by many tests."""
    from vitkit.train import resolve_config, train

    out = tmp_path_factory.mktemp("run") / "colors"
    cfg = resolve_config(None, data=str(color_folder), out=str(out), val_fraction=0.25, **TINY_TRAIN)
    result = train(cfg)
    return result


def perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so ones/zeros init (norms, heads) cannot mask a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return module


class OpNames(TorchDispatchMode):
    """Records the name of every operation run under it, in order ("aten.addmm.default", ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
