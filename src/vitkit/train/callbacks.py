"""Lightning plumbing that makes runs survive: atomic checkpoints, graceful stop, a metrics table."""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vitkit.fileio import atomic_write, atomic_write_text
from vitkit.train.plan import RunPlan


class NonFiniteWeightsError(RuntimeError):
    """Refusal to write a checkpoint whose parameters are NaN or infinite."""


def _check_finite(state: dict[str, Any], path: str | os.PathLike) -> None:
    for key, value in state.get("state_dict", {}).items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise NonFiniteWeightsError(f"not writing {path}: parameter {key} holds NaN or inf")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, fsync'd, then renamed over it.

    Lightning's own writer streams into the final path, so a kill mid-write leaves a truncated
    file where the last good checkpoint was.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        _check_finite(checkpoint, path)
        buffer = io.BytesIO()  # serialise fully first: an error here leaves the old file untouched
        torch.save(checkpoint, buffer)
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))


class TrainingInterrupted(Exception):
    """Raised after the interrupt checkpoint is written; carries the exit code (143 or 130)."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with --resume {checkpoint.parent}")


class GracefulStop(L.Callback):
    """SIGTERM/SIGINT: finish the current step, write last.ckpt, leave with 143/130.

    With --accumulate the stop waits for the group's optimizer step: a checkpoint cannot hold the
    gradients summed so far, and a resumed run would start the group over on the next batch. On an
    epoch's last batch the stop waits for the epoch's validation (if the plan gives it one) and its
    checkpoints, so the resumed run starts cleanly at the next epoch. Where a batch stands (its
    group, the epoch's last) comes from its step key and the run plan. A second signal while the
    checkpoint is written is ignored (the write is atomic anyway).
    """

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self._stop_at_epoch_end: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handler)

    def _agreed_signal(self, trainer: L.Trainer) -> int | None:
        if trainer.world_size == 1:
            return self.received
        flag = torch.tensor([self.received or 0], device=trainer.strategy.root_device)  # every rank stops alike
        return int(trainer.strategy.reduce(flag, reduce_op="max").item()) or None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        received = self._agreed_signal(trainer)
        if not received or self._stop_at_epoch_end:
            return
        index = int(batch.step_key[1])
        if pl_module.plan.is_last_batch(index):
            self._stop_at_epoch_end = received
            return
        if not pl_module.plan.steps_after(index):  # mid-group: no step taken yet
            return
        # A full checkpoint (optimizer, loops, callbacks) for --resume; saying so also keeps Lightning 2.6
        # from logging "`weights_only` was not set" beside our resume hint.
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        raise TrainingInterrupted(received, self.checkpoint)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_at_epoch_end:
            trainer.should_stop = True  # the epoch's checkpoints are written after this hook, then the run ends

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_at_epoch_end:
            raise TrainingInterrupted(self._stop_at_epoch_end, self.checkpoint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class PlanState(L.Callback):
    """Keeps the module's run plan in every checkpoint (RunPlan.state_dict) and hands it back on resume,
    so that the resumed run goes on from the position the stopped one reached."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_plan"] = pl_module.plan.state_dict()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if "run_plan" in checkpoint:  # a checkpoint of an earlier vitkit has none: the plan from the settings
            pl_module.plan.load_state_dict(checkpoint["run_plan"])


class ValidatedCheckpoint(ModelCheckpoint):
    """best.ckpt: considered at the end of each epoch the plan validated, by that pass's val_acc (an
    unvalidated epoch has no figure of its own to be compared on)."""

    @property
    def state_key(self) -> str:  # a plain ModelCheckpoint's: checkpoints of earlier runs restore its best score
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.validation_seconds is not None:
            super().on_train_epoch_end(trainer, pl_module)


class TimeBudget(L.Callback):
    """Fits the run plan to a wall-clock deadline: the cosine ends, validation runs and the final
    checkpoint is written by then.

    After every step the plan's total of optimizer steps is revised (RunPlan.revise; the lr, mix_start,
    the EMA horizon and the other fractions of the run follow it) from the average step time since
    the first measured step, on a clock that stops during validation. The fraction of the run done,
    step / plan, is then the fraction of the training time used, which only moves forward (give or
    take the difference between two validation passes). A machine that slows down mid-run moves down
    the cosine faster instead of being cut off by the deadline halfway down it, and one whose speed
    swings does not raise the lr again or switch mixing off and on. The plan ends the run at its last
    step, which still validates and saves; the deadline itself is only the last resort.
    """

    def __init__(self, deadline: float, calibration_steps: int = 20, warmup_steps: int = 3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline = deadline
        self.warmup_steps = warmup_steps  # the first steps (allocation, compilation) are not typical
        self.clock = clock
        self.calibration_steps = calibration_steps  # measured steps before the first plan
        self._origin: tuple[int, float] | None = None  # the first measured step and its training-clock time
        self._val_seconds = 0.0  # a validation pass: the average so far, or an estimate before the first
        self._val_total = 0.0  # all validation so far, taken off the training clock
        self._val_count = 0

    def _training_clock(self) -> float:
        return self.clock() - self._val_total

    def revise(self, plan: RunPlan, step: int, seconds_per_step: float) -> None:
        """Revise the plan: the steps that fit before the deadline at this speed, validation and the
        reserve for the final validation pass and the exported predictions included."""
        val_per_step = self._val_seconds / (plan.steps_per_epoch * plan.val_every)
        reserve = 2 * self._val_seconds + 5.0
        remaining = self.deadline - self.clock() - reserve
        plan.revise(step + max(0, int(remaining / (seconds_per_step + val_per_step))))

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self._origin is None and step >= self.warmup_steps:
            self._origin = (step, self._training_clock())
        if self._origin is not None and step - self._origin[0] >= self.calibration_steps:
            seconds_per_step = (self._training_clock() - self._origin[1]) / (step - self._origin[0])
            if not self._val_seconds:  # no validation has run yet
                self._val_seconds = self._estimate_val_seconds(module, seconds_per_step)
            self.revise(module.plan, step, seconds_per_step)
        if self.clock() > self.deadline:
            trainer.should_stop = True

    def _estimate_val_seconds(self, module: Any, seconds_per_step: float) -> float:
        """Before the first validation: a forward pass costs about a third of a training step."""
        val_images = len(module.val_batches.indices) if module.val_batches is not None else 0
        return val_images * seconds_per_step / module.cfg.batch_size / 3

    def validated(self, seconds: float) -> None:
        """A validation pass took seconds: off the training clock, and the plan's estimate of a pass."""
        self._val_total += seconds
        self._val_count += 1
        self._val_seconds = self._val_total / self._val_count

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        if module.validation_seconds is not None:  # the plan validated this epoch (at its end, or at the stop)
            self.validated(module.validation_seconds)


class MetricsTable(L.Callback):
    """One row per epoch in metrics.csv, one per logged step in steps.csv (for plots and reports).

    val_seconds is the epoch's validation pass: under a time budget, wall clock that trains nothing.
    An epoch that the plan leaves unvalidated has its validation columns blank, not the last pass's.
    """

    COLUMNS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "images_per_s",
               "val_seconds")

    def __init__(self, run_dir: Path, every_n_steps: int = 10) -> None:
        self.run_dir = run_dir
        self.every = every_n_steps
        self.rows: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # none for a skipped step
        if trainer.global_step % self.every or loss is None:
            return
        if self.steps and self.steps[-1]["step"] == trainer.global_step:  # --accumulate: one row a step
            return
        # Lightning hands back the loss divided by the accumulation count; the row shows the batch's own.
        self.steps.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                           "train_loss": float(loss) * trainer.accumulate_grad_batches, "lr": _lr(trainer)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if pl_module.validation_seconds is None:  # not validated this epoch (val_every): no stale figures
            metrics = {k: v for k, v in metrics.items() if not k.startswith("val_")}
        row = {
            "epoch": trainer.current_epoch + 1,
            "step": trainer.global_step,
            "train_loss": metrics.get("train_loss_epoch", metrics.get("train_loss")),
            "train_acc": metrics.get("train_acc"),
            "val_loss": metrics.get("val_loss"),
            "val_acc": metrics.get("val_acc"),
            "val_top5": metrics.get("val_top5"),
            "lr": _lr(trainer),
            "images_per_s": pl_module.images_per_second(),
            "val_seconds": pl_module.validation_seconds,
        }
        if any(str(r["epoch"]) == str(row["epoch"]) for r in self.rows):
            return  # a run resumed at an epoch's end passes that end again; its row is already written
        self.rows.append(row)
        if trainer.is_global_zero:
            self.write()

    def load_existing(self) -> None:
        """On resume, keep the rows of the epochs already done."""
        for name, target in (("metrics.csv", self.rows), ("steps.csv", self.steps)):
            path = self.run_dir / name
            if path.exists():
                with open(path, newline="") as handle:
                    target.extend(dict(r) for r in csv.DictReader(handle))

    def write(self) -> None:
        _write_csv(self.run_dir / "metrics.csv", self.COLUMNS, self.rows)
        _write_csv(self.run_dir / "steps.csv", ("step", "epoch", "train_loss", "lr"), self.steps)


def _lr(trainer: L.Trainer) -> float | None:
    if not trainer.optimizers:
        return None
    return float(trainer.optimizers[0].param_groups[-1]["lr"])


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in columns])
    atomic_write_text(path, out.getvalue())
