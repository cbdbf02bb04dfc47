"""The run plan: how many optimizer steps the run takes, where it stands, and what follows from that.

Every schedule of a run (the lr, the EMA's decay, when mixing and the auto-augment ops begin, the patch
dropout rate, progressive resizing) is a pure function of the step and the planned total, below. The
plan's total comes from the epochs (or max_steps); a time budget revises it as it measures the step
time (``RunPlan.revise``), and nothing else changes it. Validation and the run's end are decided by
the plan too, so no part of the run has to watch another one's side effects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vitkit.train.config import TrainConfig


@dataclass
class RunPlan:
    """The run's length and position, in the units Lightning steps in.

    batches_per_epoch: training batches of one process in an epoch (TrainBatches drops the last partial
    batch); an optimizer step takes accumulate of them, and the epoch's last, partial group steps too.
    epochs: the configured epochs; epochs_end_run is False under a time budget, where they only size
    the schedule until the budget's first revision. budgeted_steps: that revision. position: (epoch,
    batches of it done), what a checkpoint records for an exact resume.
    """

    batches_per_epoch: int
    epochs: int
    accumulate: int = 1
    max_steps: int | None = None
    val_every: int = 1
    epochs_end_run: bool = True
    budgeted_steps: int | None = None
    position: tuple[int, int] = (0, 0)

    @classmethod
    def for_config(cls, cfg: TrainConfig, train_size: int, world_size: int = 1) -> RunPlan:
        """The plan of cfg's run on train_size images split between world_size processes."""
        return cls(batches_per_epoch=(train_size // world_size) // cfg.batch_size, epochs=cfg.epochs,
                   accumulate=cfg.accumulate, max_steps=cfg.max_steps, val_every=cfg.val_every,
                   epochs_end_run=not cfg.time_budget)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps an epoch: Lightning also steps on an epoch's last, partial group."""
        return max(1, -(-self.batches_per_epoch // self.accumulate))

    @property
    def total_steps(self) -> int:
        """Optimizer steps the schedules span: a time budget's revision, else epochs (or max_steps)."""
        if self.budgeted_steps:
            return self.budgeted_steps
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    @property
    def last_step(self) -> int | None:
        """The step the run ends at, where known: None under a time budget before its first revision
        (and without max_steps), when only the deadline bounds the run."""
        if self.budgeted_steps is not None or self.epochs_end_run:
            return self.total_steps
        return self.max_steps

    def fraction(self, step: int) -> float:
        """The fraction of the planned steps done before step."""
        return step / max(1, self.total_steps)

    def revise(self, total_steps: int) -> None:
        """A time budget's plan: the run ends at total_steps (never past max_steps)."""
        self.budgeted_steps = min(total_steps, self.max_steps) if self.max_steps else total_steps

    def ends_at(self, step: int) -> bool:
        """Whether the run is over once step optimizer steps are done."""
        last = self.last_step
        return last is not None and step >= last

    def is_last_batch(self, index: int) -> bool:
        """Whether the batch at index (in its epoch) is the epoch's last."""
        return index + 1 >= self.batches_per_epoch

    def steps_after(self, index: int) -> bool:
        """Whether an optimizer step follows the batch at index: it completes an accumulation group,
        or it is the epoch's last."""
        return (index + 1) % self.accumulate == 0 or self.is_last_batch(index)

    def validates_after(self, epoch: int, index: int, step: int, stopping: bool) -> bool:
        """Whether the batch at index of epoch, after which step optimizer steps are done, is followed
        by a validation pass: the first epoch's end (its pass times validation for a time budget),
        every val_every-th epoch's end, and wherever the run ends (the last epoch, max_steps, the
        budget's planned step, or a stop any part of the run asked for), so that best.ckpt and the
        run's score are of the final weights."""
        if stopping or self.ends_at(step):
            return True
        if not self.is_last_batch(index):
            return False
        last_epoch = self.epochs_end_run and epoch + 1 >= self.epochs
        return epoch == 0 or (epoch + 1) % self.val_every == 0 or last_epoch

    def record_batch(self, epoch: int, index: int) -> None:
        """The batch at index of epoch is done (its step is taken once its group is complete)."""
        self.position = (epoch, index + 1)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the position, and for the record the budget's last revision."""
        return {"position": list(self.position), "budgeted_steps": self.budgeted_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The position. A time budget's revision is not taken over: it counted down to the stopped
        run's deadline, and the resumed run's budget revises the plan for its own once it has
        measured its steps; everything else follows from the settings."""
        epoch, done = state.get("position", (0, 0))
        self.position = (int(epoch), int(done))


# ---- the schedules: pure functions of (step, planned total) and the settings ------------------------


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    return round(warmup_epochs * steps_per_epoch)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str) -> float:
    """The lr multiplier at an optimizer step: linear warmup, then cosine, linear decay or constant.

    Both decays average half the peak; linear lowers the lr sooner and keeps more of it in the last
    part of the run. Defazio et al. (2023) and Bergsma et al. (2025) found it matching or beating
    cosine on language models; which wins on a given task is for a benchmark run to say.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    fall = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * fall


def ema_decay(decay: float | None, horizon: float | None, total_steps: int) -> float:
    """The EMA's decay: fixed (decay), or sized to the run (horizon).

    A fixed decay such as 0.999 averages the last ~1,000 steps: most of a 5-minute run, a sliver of a
    2-hour one. horizon instead makes the time constant 1 / (1 - decay) that fraction of the planned
    steps, which a time budget revises as it goes.
    """
    if horizon is None:
        return float(decay)
    return 1.0 - 1.0 / max(1.0, horizon * total_steps)


def has_begun(step: int, total_steps: int, start: float) -> bool:
    """Whether something that starts at the fraction start of the run (mix_start, auto_augment_start)
    is on at step: mixing and the auto-augment ops begin once the model has begun to fit its data."""
    return step >= start * total_steps


def patch_drop_rate(step: int, total_steps: int, rate: float, end: float | None, until: float | None) -> float:
    """The patch dropout of a step: the model's rate, falling linearly to end, and none from the
    fraction until of the run on.

    Many tokens dropped early make the first steps cheap (as low resolution does in progressive
    resizing); fewer dropped late bring training closer to evaluation, which sees every patch. until
    ends the run on every patch, as FLIP's unmasked tuning does, so attention learns the token count
    it is evaluated on. Those steps cost more; a time budget sees them slow down and revises the plan,
    so the unmasked tail takes about 1 - until of the time and a smaller share of the steps.
    """
    masked_steps = (until or 1.0) * total_steps
    if until is not None and step >= masked_steps:
        return 0.0
    progress = min(1.0, step / max(1.0, masked_steps))
    return rate if end is None else rate + (end - rate) * progress


def train_resolution(step: int, total_steps: int, full: int, start: int | None, until: float, patch: int) -> int:
    """Progressive resizing: the side of a step's training images, from start up to full by the
    fraction until of the run, in multiples of the patch size.

    A ViT's step costs about its token count, so low resolution early buys more steps of a time budget,
    while, unlike patch dropout's random subset, the tokens still cover the whole image. The position
    embeddings are resampled to each grid (VisionTransformer.dynamic_img_size); the full-resolution
    tail adapts the model to the size it is evaluated at.
    """
    if start is None:
        return full
    progress = min(1.0, step / max(1.0, until * total_steps))
    return min(full, int(start + (full - start) * progress) // patch * patch)
