"""Batches of uint8 images in a replayable order, for Lightning.

The order of an epoch is a permutation drawn from (seed, epoch) alone, and each process of a
multi-process run takes its own slice of it. The position inside the epoch (the batches done, as
the run plan counts them) is the only state, so a run stopped mid-epoch resumes on exactly the next
batch (Lightning saves ``state_dict()`` in its checkpoint and hands it back to ``load_state_dict()``).
Each batch carries its samples' indices in the training set. Augmentation happens later, on the
training device, in whole batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from vitkit.data import ImageSet, iter_batches


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class TrainBatch(NamedTuple):
    """A training batch: uint8 images, labels, step_key = (epoch, index in the epoch), and the
    training-set indices of its samples (for per-image state such as a distillation teacher's cache)."""

    images: torch.Tensor
    labels: torch.Tensor
    step_key: torch.Tensor
    indices: torch.Tensor


class TrainBatches:
    """Shuffled training batches (TrainBatch), replayable from (seed, epoch, index).

    ``drop_last`` keeps every batch the same size (one compiled graph, even BatchNorm-free
    statistics per step), and ranks get equally many batches so collective ops never hang.
    ``position`` says what a checkpoint records: (epoch, batches of it done), the run plan's count;
    without it, the batches handed out so far.
    """

    def __init__(self, images: ImageSet, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, current_epoch: Callable[[], int] | None = None,
                 position: Callable[[], tuple[int, int]] | None = None) -> None:
        per_rank = len(images) // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"the training split has {len(images)} images, fewer than one batch of {batch_size} per process "
                f"({world_size} process(es)); lower --batch-size to at most {max(per_rank, 1)}"
            )
        self.images = images
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        # Asked at the start of each pass: Lightning's epoch counter is the truth, whatever order
        # its restore and epoch hooks run in.
        self.current_epoch = current_epoch or (lambda: self.epoch)
        self.position = position or (lambda: (self.epoch, self.handed_out))
        self.epoch = 0
        self.handed_out = 0  # batches of self.epoch yielded so far
        self._resume_at: tuple[int, int] | None = None

    def __len__(self) -> int:
        return (len(self.images) // self.world_size) // self.batch_size

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        order = epoch_permutation(len(self.images), self.seed, epoch)
        mine = order[self.rank :: self.world_size]
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]

    def __iter__(self) -> Iterator[TrainBatch]:
        self.epoch, start = self.current_epoch(), 0
        if self._resume_at is not None:
            epoch, completed = self._resume_at
            self._resume_at = None
            if epoch == self.epoch:
                start = completed
        self.handed_out = start
        batches = self.batch_indices(self.epoch)[start:]
        for offset, (images, labels) in enumerate(iter_batches(self.images, batches, self.num_workers)):
            self.handed_out = start + offset + 1
            yield TrainBatch(images, labels, torch.tensor([self.epoch, start + offset]), batches[offset])

    def state_dict(self) -> dict[str, Any]:
        epoch, completed = self.position()
        return {"epoch": epoch, "completed": completed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint was trained with seed {state['seed']}, this run uses {self.seed}")
        self.epoch = int(state["epoch"])
        self._resume_at = (self.epoch, int(state["completed"]))


class EvalBatches:
    """Sequential batches for evaluation; yields ``(images, labels)``; this rank's share only."""

    def __init__(self, images: ImageSet, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0) -> None:
        self.images = images
        self.batch_size = batch_size
        self.indices = torch.arange(len(images))[rank::world_size]
        self.num_workers = num_workers

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = list(self.indices.split(self.batch_size))
        yield from iter_batches(self.images, batches, self.num_workers)
