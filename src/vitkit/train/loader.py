"""Batches of uint8 images in a replayable order, for Lightning.

The order of an epoch is a permutation drawn from (seed, epoch) alone, and each process of a
multi-process run takes its own slice of it. The position inside the epoch is the only state, so
a run stopped mid-epoch resumes on exactly the next batch (Lightning saves ``state_dict()`` in
its checkpoint and hands it back to ``load_state_dict()``). Augmentation happens later, on the
training device, in whole batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from vitkit.data import ImageSet, iter_batches


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class TrainBatches:
    """Shuffled training batches; yields ``(images, labels, step_key)`` with step_key = (epoch, index).

    ``drop_last`` keeps every batch the same size (one compiled graph, even BatchNorm-free
    statistics per step), and ranks get equally many batches so collective ops never hang.
    """

    def __init__(self, images: ImageSet, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, current_epoch: Callable[[], int] | None = None) -> None:
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
        self.epoch = 0
        self.completed = 0  # batches of self.epoch finished (optimizer step taken)
        self._resume_at: tuple[int, int] | None = None
        self._order: tuple[int, list[torch.Tensor]] | None = None  # (epoch, its batches), for indices()

    def __len__(self) -> int:
        return (len(self.images) // self.world_size) // self.batch_size

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        order = epoch_permutation(len(self.images), self.seed, epoch)
        mine = order[self.rank :: self.world_size]
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]

    def indices(self, step_key: torch.Tensor) -> torch.Tensor:
        """The training-set indices of the batch a step_key names: for per-image state such as a
        distillation teacher's cached answers."""
        epoch, index = (int(v) for v in step_key.tolist())
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.batch_indices(epoch))
        return self._order[1][index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.epoch, start = self.current_epoch(), 0
        if self._resume_at is not None:
            epoch, completed = self._resume_at
            self._resume_at = None
            if epoch == self.epoch:
                start = completed
        self.completed = start
        batches = self.batch_indices(self.epoch)[start:]
        for offset, (images, labels) in enumerate(iter_batches(self.images, batches, self.num_workers)):
            yield images, labels, torch.tensor([self.epoch, start + offset])

    def mark_completed(self, index_in_epoch: int) -> None:
        """Called by a batch's training step: what a checkpoint records. Checkpoints are taken only
        once a batch's optimizer step is done (GracefulStop, epoch ends), so the count is then exact."""
        self.completed = index_in_epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "completed": self.completed, "seed": self.seed}

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
