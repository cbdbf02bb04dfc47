"""`vitkit train` as a function: data, model, Lightning Trainer, run directory.

The run directory holds ``best.ckpt`` (best validation accuracy), ``last.ckpt``, ``config.yaml``
(the resolved settings), ``metrics.csv``/``steps.csv``, ``model.safetensors`` (the evaluated weights
with config, class names, normalisation and the training settings) and ``val_predictions.npz`` (for the report).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging, TQDMProgressBar

from vitkit.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, VIT_MEAN, VIT_STD, load_splits
from vitkit.fileio import atomic_write_text, remove_stale_temporaries
from vitkit.model import VisionTransformer, ViTConfig, get_config
from vitkit.model.fast import optimize
from vitkit.train.callbacks import (
    AtomicCheckpointIO,
    GracefulStop,
    MetricsTable,
    PlanState,
    TimeBudget,
    ValidatedCheckpoint,
)
from vitkit.train.config import MODEL_SETTINGS, TrainConfig
from vitkit.train.distill import CACHE_FILE_NAME, load_teacher
from vitkit.train.loader import EvalBatches, TrainBatches
from vitkit.train.module import ViTClassifier
from vitkit.train.precision import resolve_precision
from vitkit.weights import config_from_weights, load_weights, read_training_checkpoint, save_vitkit

log = logging.getLogger("vitkit")

NORMALIZATION = {"vit": (VIT_MEAN, VIT_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                 "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path
    best_val_acc: float | None
    epochs_done: int
    steps_done: int
    seconds: float


class ImageDataModule(L.LightningDataModule):
    """Hands each process its share of the in-memory (or streamed) training split; the module
    validates on its own (ViTClassifier.validate), where the run plan says."""

    def __init__(self, splits: Any, cfg: TrainConfig) -> None:
        super().__init__()
        self.splits = splits
        self.cfg = cfg

    def train_dataloader(self) -> TrainBatches:
        t = self.trainer
        return TrainBatches(self.splits.train, self.cfg.batch_size, self.cfg.seed, rank=t.global_rank,
                            world_size=t.world_size, num_workers=self.cfg.num_workers,
                            current_epoch=lambda: t.current_epoch, position=lambda: t.lightning_module.plan.position)


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The ViTConfig fields a run sets: model_args and the top-level settings, checked together
    (model_args {class_token: false} is valid only beside global_pool: avg)."""
    overrides: dict[str, Any] = dict(cfg.model_args)
    for key in MODEL_SETTINGS:
        if key != "img_size" and getattr(cfg, key) is not None:  # img_size: build_model follows the data
            overrides[key] = getattr(cfg, key)
    return overrides


DEFAULT_MODEL = "cifar-tiny"


def model_config(cfg: TrainConfig, **overrides: Any) -> ViTConfig:
    """The config of the model the run trains: the variant cfg.model names, or without one the --init
    weights' own architecture (a pretrained name or file), else DEFAULT_MODEL; overrides on top."""
    if cfg.model is None and cfg.init:
        return config_from_weights(cfg.init, trust_checkpoint=cfg.trust_checkpoint, **overrides)
    return get_config(cfg.model or DEFAULT_MODEL, **overrides)


def build_model(cfg: TrainConfig, num_classes: int, data_size: int, base: ViTConfig | None = None) -> VisionTransformer:
    """The model the config names, sized for the data; pretrained weights loaded if asked. ``base``: the
    run's model_config, where the caller has it (read from the --init weights, it is not read again)."""
    config = (base or model_config(cfg, **model_overrides(cfg))).replace(num_classes=num_classes)
    if cfg.img_size is not None:
        config = config.replace(img_size=cfg.img_size)
    elif cfg.init is None and config.img_size == 32:  # small-image presets follow the data's size
        config = config.replace(img_size=data_size)
    model = VisionTransformer(config)
    if cfg.init:
        report = load_weights(model, cfg.init, resample_patch=cfg.resample_patch,
                              trust_checkpoint=cfg.trust_checkpoint)
        log.info("initialised from %s (%s)", cfg.init, report)
    return model


def compile_model(model: VisionTransformer, cuda: bool) -> bool:
    """torch.compile the model in place and say so, or leave it eager with a warning where inductor
    cannot build CPU kernels (no C++ compiler): a recipe that compiles only for speed still trains there.

    Compiling fuses the elementwise work between the products (GELU, norms, residual sums, autocast's
    casts), which on a CPU is bound by memory traffic, not arithmetic.
    """
    if not cuda:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as error:  # InvalidCxxCompiler, or a torch whose private module moved
            log.warning("compile: true needs a C++ compiler for torch.compile on the CPU (%s: %s); training "
                        "without it. Install g++ (or set CXX) to compile, or set compile: false.",
                        type(error).__name__, error)
            return False
    model.compile()
    return True


def prepare_run_dir(cfg: TrainConfig, resume: Path | None) -> Path:
    run_dir = Path(cfg.out)
    existing = run_dir.exists() and any(run_dir.glob("*.ckpt"))
    if existing and resume is None and not cfg.overwrite:
        raise FileExistsError(
            f"run directory {run_dir} already holds checkpoints; pass --resume {run_dir} to continue it, "
            "--overwrite to start over, or another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the run directory {run_dir} ({e.strerror}); choose another --out") from e
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"run directory {run_dir} is not writable; choose another --out")
    if existing and resume is None:  # an interrupted new run must not leave the old one's model to load
        for name in ("best.ckpt", "last.ckpt", "metrics.csv", "steps.csv", "model.safetensors",
                     "val_predictions.npz", CACHE_FILE_NAME):
            (run_dir / name).unlink(missing_ok=True)
    remove_stale_temporaries(run_dir)
    return run_dir


def resume_checkpoint(path: str | os.PathLike) -> Path:
    """--resume takes a run directory (its last.ckpt) or a checkpoint file."""
    path = Path(path)
    checkpoint = path / "last.ckpt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise FileNotFoundError(f"nothing to resume: {checkpoint} does not exist")
    return checkpoint


def saved_train_config(checkpoint: Path) -> dict[str, Any]:
    """The resolved settings stored in a vitkit checkpoint (read safely: no code can run)."""
    return read_training_checkpoint(checkpoint).require("train").train


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, start_time: float | None = None,
          callbacks: list[L.Callback] | None = None, clock: Callable[[], float] = time.monotonic) -> RunResult:
    """Run training as configured; ``resume`` continues from a run directory or checkpoint.

    ``callbacks`` are extra Lightning callbacks (yours), run after vitkit's own. ``clock`` is what a
    time budget is measured on (start_time, if given, on the same clock).
    """
    start = start_time if start_time is not None else clock()
    ckpt_path = resume_checkpoint(resume) if resume is not None else None
    if ckpt_path is not None:
        saved_train_config(ckpt_path)  # refuses unsafe or foreign files before Lightning opens them
    if cfg.data is None:
        raise ValueError("no data given: pass --data PATH (an image folder, or cifar10 with --download)")
    run_dir = prepare_run_dir(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Images are stored at their own size (32x32 CIFAR stays small; the model input is resized on
    # the device); only large images are decoded down to the model's resolution once.
    base = model_config(cfg, **model_overrides(cfg))
    model_size = cfg.img_size or base.img_size
    splits = load_splits(cfg.data, image_size=model_size,
                         val_fraction=cfg.val_fraction, seed=cfg.split_seed, skip_bad_images=cfg.skip_bad_images,
                         download=cfg.download)
    classes = list(splits.classes)
    # The fast CPU kernels (the same function as the reference), switched on before the EMA copies the model.
    model = optimize(build_model(cfg, len(classes), splits.image_size, base))
    mean, std = NORMALIZATION[cfg.normalization]
    teacher = load_teacher(cfg.teacher, classes, mean, std) if cfg.teacher else None
    cached = teacher is not None and cfg.distill_cache
    module = ViTClassifier(model, cfg, classes, mean, std, train_size=len(splits.train), teacher=teacher,
                           teacher_images=splits.train if cached else None,
                           teacher_cache_file=run_dir / CACHE_FILE_NAME if cached else None, val_images=splits.val)
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    if cfg.compile:  # after the module: its EMA copy stays eager, so validation compiles nothing
        compile_model(model, cuda)

    precision = resolve_precision(cfg.precision, cuda)
    resolved = cfg.to_dict() | {"classes": classes, "model_config": model.config.to_dict(),
                                "mean": list(mean), "std": list(std), "precision_used": precision}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    has_val = len(splits.val) > 0
    # Both checkpoints are taken at an epoch's end (validation, where the plan has it, runs before):
    # best.ckpt where the epoch was validated and its val_acc is the best so far (every epoch without
    # a validation split); Lightning's save_last only writes when the best one changed, so a second
    # callback writes last.ckpt every epoch.
    best_kind = ValidatedCheckpoint if has_val else ModelCheckpoint
    best = best_kind(dirpath=run_dir, filename="best", monitor="val_acc" if has_val else None, mode="max",
                     enable_version_counter=False, save_on_train_epoch_end=True)
    last = ModelCheckpoint(dirpath=run_dir, filename="last", monitor=None, enable_version_counter=False,
                           save_on_train_epoch_end=True)
    metrics = MetricsTable(run_dir)
    if ckpt_path is not None:
        metrics.load_existing()
    extra = list(callbacks or [])
    callbacks = [PlanState(), best, last, metrics, GracefulStop(run_dir / "last.ckpt")]
    if cfg.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if cfg.time_budget:
        callbacks.append(TimeBudget(start + cfg.time_budget, clock=clock))
    if cfg.swa:
        callbacks.append(StochasticWeightAveraging(swa_lrs=cfg.lr * 0.1, swa_epoch_start=0.75))
    callbacks += extra
    logger: Any = False
    if cfg.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(run_dir, name="tensorboard")

    if cuda:  # TF32 tensor cores for what runs in fp32 (all of it with --precision 32-true)
        torch.set_float32_matmul_precision("high")
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=int(cfg.devices) if str(cfg.devices).isdigit() else cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=precision,
        max_epochs=cfg.epochs if not cfg.time_budget else 10_000,
        max_steps=cfg.max_steps or -1,
        gradient_clip_val=cfg.grad_clip,
        accumulate_grad_batches=cfg.accumulate,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=logger,
        default_root_dir=run_dir,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=10,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # The EMA copy stays in eval mode on purpose (it is only evaluated, never trained); Lightning
        # warns about any submodule it finds in eval mode when training starts.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, datamodule=ImageDataModule(splits, cfg), ckpt_path=ckpt_path, weights_only=True)

    best_path = Path(best.best_model_path) if best.best_model_path else run_dir / "last.ckpt"
    if trainer.is_global_zero:
        finish_run(run_dir, best_path, module, splits, classes, mean, std)
    score = best.best_model_score
    return RunResult(run_dir, best_path, float(score) if score is not None else None, trainer.current_epoch,
                     trainer.global_step, clock() - start)


@torch.no_grad()
def finish_run(run_dir: Path, best_path: Path, module: ViTClassifier, splits: Any, classes: list[str],
               mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Export the best checkpoint's evaluated weights and its validation predictions."""
    best = read_training_checkpoint(best_path)
    weights = best.weights()
    model = VisionTransformer(module.model.config).eval()
    model.load_state_dict(weights)
    # The training config travels along: `vitkit eval` on the run directory needs its validation
    # split (val_fraction, split_seed) to score the images the run held out and no others.
    save_vitkit(run_dir / "model.safetensors", model, classes=classes, mean=mean, std=std,
                interpolation=best.interpolation, extra={"train": module.cfg.to_dict()})
    if len(splits.val) == 0:
        return
    module.to("cpu").eval()  # fit leaves the module in training mode: dropout and patch dropout on
    eval_module = module.eval_model
    eval_module.load_state_dict(weights)
    probs, labels, thumbs = [], [], []
    for images, target in EvalBatches(splits.val, 256):
        probs.append(module.logits(images).softmax(-1))
        labels.append(target)
        thumbs.append(images if images.shape[-1] <= 64 else
                      torch.nn.functional.interpolate(images.float(), size=64, mode="area").round().byte())
    arrays = {"probs": torch.cat(probs).float().numpy(), "labels": torch.cat(labels).numpy(),
              "images": torch.cat(thumbs).numpy()}
    np.savez_compressed(run_dir / "val_predictions.npz", **arrays)

