"""Two processes (CPU, gloo) train as one: each epoch split into disjoint shards that together hold every
training image, and each optimizer step leaving both processes with the same weights as one process's
step on the same global batch.

Every image carries its own number in its top-left pixel, so a callback can tell from the batch
Lightning hands to the training step which images each process trained on. The processes run this
file as a script (Lightning's launcher starts the second one with the same command line), which
trains through vitkit.train.train with that callback.

usage: python tests/test_ddp.py DATA OUT DEVICES BATCH_SIZE EPOCHS
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve()
CLASSES, PER_CLASS, SIZE = 3, 32, 16  # 96 images: 48 per process, 6 batches of 8 each an epoch
BATCH_PER_PROCESS = 8


def numbered_folder(root: Path) -> Path:
    """ROOT/<class>/*.png, 16x16 noise whose top-left pixel holds the image's number (red: low byte,
    green: high byte)."""
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            number = label * PER_CLASS + i
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[..., label] //= 2
            pixels[0, 0] = (number % 256, number // 256, 0)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


class Record(L.Callback):
    """Writes, per process: the image numbers of every training batch by epoch, and the weights before
    the first optimizer step and after the first and the second."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        images = batch[0]
        assert images.dtype == torch.uint8 and images.ndim == 4  # as stored: augmentation comes later
        numbers = images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()
        self.batches.append((trainer.current_epoch, numbers.tolist()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "step0")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step in (1, 2):
            self._save(trainer, pl_module, f"step{trainer.global_step}")

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"{name}-rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / f"batches-rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


def run_training(data: str, out: str, devices: int, batch_size: int, epochs: int) -> None:
    from vitkit.train import resolve_config, train

    # No randomness in a step (no flips, crops, dropout, patch dropout): each process draws its own
    # augmentation, so only then is the two-process step the one-process step on the same images. SGD: its
    # update is linear in the gradient, so the two ways of summing it differ by rounding only (an update
    # normalised per weight, as Adam's first is, turns the rounding of a near-zero gradient into a full step).
    cfg = resolve_config(None, data=data, out=out, model="cifar-mini", depth=2, img_size=SIZE, val_fraction=0.0,
                         batch_size=batch_size, epochs=epochs, optimizer="sgd", lr=0.1, warmup_epochs=0,
                         augment={"hflip": False}, accelerator="cpu", devices=str(devices),
                         strategy="ddp" if devices > 1 else "auto", precision="32-true", progress=False)
    train(cfg, callbacks=[Record(Path(out))])


def run_script(data: Path, out: Path, devices: int, batch_size: int, epochs: int) -> None:
    argv = [str(data), str(out), str(devices), str(batch_size), str(epochs)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def batches(out: Path, rank: int) -> list[tuple[int, list[int]]]:
    return [(epoch, numbers) for epoch, numbers in json.loads((out / f"batches-rank{rank}.json").read_text())]


def weights(out: Path, rank: int, step: int = 1) -> dict[str, torch.Tensor]:
    return torch.load(out / f"step{step}-rank{rank}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")
def test_two_processes_train_disjoint_complete_shards_and_step_as_one(tmp_path):
    data = numbered_folder(tmp_path / "numbered")
    every_image = set(range(CLASSES * PER_CLASS))
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_script(data, ddp, devices=2, batch_size=BATCH_PER_PROCESS, epochs=2)
    run_script(data, single, devices=1, batch_size=2 * BATCH_PER_PROCESS, epochs=2)  # the same steps, schedule

    ranks = [batches(ddp, 0), batches(ddp, 1)]
    steps_per_epoch = len(every_image) // (2 * BATCH_PER_PROCESS)
    orders = []
    for epoch in range(2):
        shards = [[n for e, numbers in ranks[rank] if e == epoch for n in numbers] for rank in range(2)]
        assert [len(shard) for shard in shards] == [steps_per_epoch * BATCH_PER_PROCESS] * 2
        assert all(len(set(shard)) == len(shard) for shard in shards)  # no image twice in a process's epoch
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: both processes trained on the same images"
        assert set(shards[0]) | set(shards[1]) == every_image, f"epoch {epoch}: images left out"
        orders.append(shards)
    assert orders[0][0] != orders[1][0]  # each epoch is shuffled anew

    # Each step's global batch is the one-process run's batch of that step: the comparison is like for like.
    for step, (_, numbers) in enumerate(batches(single, 0)):
        assert set(ranks[0][step][1]) | set(ranks[1][step][1]) == set(numbers)

    # The first step trains the head alone (it starts at zero, so no gradient reaches the blocks); the
    # second moves every weight matrix, by far more than the tolerance.
    start = weights(single, 0, step=0)
    assert all(torch.equal(start[key], value) for key, value in weights(ddp, 0, step=0).items())
    for step in (1, 2):
        rank0, rank1, one = weights(ddp, 0, step), weights(ddp, 1, step), weights(single, 0, step)
        assert rank0.keys() == rank1.keys() == one.keys()
        for key, value in rank0.items():
            assert torch.equal(value, rank1[key]), f"step {step}, {key}: the processes' weights differ"
            torch.testing.assert_close(value, one[key], rtol=0, atol=1e-6, msg=f"step {step}, {key}")
    moved = {key: (one[key] - value).abs().max().item() for key, value in start.items() if value.ndim == 2}
    assert min(moved.values()) > 1e-4, moved

if __name__ == "__main__":
    data, out, devices, batch_size, epochs = sys.argv[1:]
    run_training(data, out, int(devices), int(batch_size), int(epochs))
