"""Lightning plumbing that makes runs survive: atomic checkpoints, graceful stop, a metrics table."""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vitkit.fileio import atomic_write, atomic_write_text


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

    On an epoch's last batch the stop waits for the epoch's validation and its checkpoint, so the
    resumed run starts cleanly at the next epoch. A second signal while the checkpoint is written is
    ignored (the write is atomic anyway).
    """

    def __init__(self, checkpoint: Path, checkpoint_after_validation: bool = True) -> None:
        self.checkpoint = checkpoint
        # With validation, the epoch's checkpoint is written at validation end, before on_train_epoch_end.
        self.checkpoint_after_validation = checkpoint_after_validation
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

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        received = self._agreed_signal(trainer)
        if not received or self._stop_at_epoch_end:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._stop_at_epoch_end = received
            return
        trainer.save_checkpoint(self.checkpoint)
        raise TrainingInterrupted(received, self.checkpoint)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_at_epoch_end:
            if not self.checkpoint_after_validation:
                trainer.save_checkpoint(self.checkpoint)
            raise TrainingInterrupted(self._stop_at_epoch_end, self.checkpoint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class TimeBudget(L.Callback):
    """Stops at an epoch end once the next epoch would overrun the wall-clock budget."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._epoch_start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_time = time.monotonic() - self._epoch_start
        if time.monotonic() + epoch_time > self.deadline:
            trainer.should_stop = True


class MetricsTable(L.Callback):
    """One row per epoch in metrics.csv, one per logged step in steps.csv (for plots and reports)."""

    COLUMNS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "images_per_s")

    def __init__(self, run_dir: Path, every_n_steps: int = 10) -> None:
        self.run_dir = run_dir
        self.every = every_n_steps
        self.rows: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step % self.every == 0 and outputs is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.steps.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                               "train_loss": float(loss), "lr": _lr(trainer)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
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
