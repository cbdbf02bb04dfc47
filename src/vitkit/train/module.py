"""The LightningModule: a ViT, its optimiser and schedule, EMA, a teacher, and the train/validation steps.

Randomness of a step (augmentation, dropout, stochastic depth) is drawn from generators seeded by
(run seed, epoch, batch index, rank), not from a stream carried across steps: a run resumed from any
checkpoint replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data import AugmentConfig, BatchAugment, ImageSet, preprocess
from vitkit.model import VisionTransformer, flip_averaged_log_probs
from vitkit.train.config import TrainConfig
from vitkit.train.distill import Teacher, TeacherCache
from vitkit.train.muon import MuonAdamW

log = logging.getLogger("vitkit")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing after it is saved."""


class EMA(nn.Module):
    """Exponential moving average of a model's weights, with the usual warm-up of the decay.

    The effective decay min(decay, (1 + t) / (10 + t)) lets the average follow the fast early
    changes instead of remembering the random init for thousands of steps.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """One step of the average at this decay (the caller sizes it: fixed, or to the run's length)."""
        self.updates += 1
        t = float(self.updates)
        decay = min(decay, (1 + t) / (10 + t))
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def parameter_groups(model: VisionTransformer, weight_decay: float, layer_decay: float | None,
                     muon: bool = False) -> list[dict]:
    """Optimizer groups: no decay for norms, biases, class token and position embeddings; optional
    layer-wise lr decay (each block's lr scaled by layer_decay ** (distance from the head)); with
    muon, the hidden weight matrices in groups of their own marked muon=True (see MuonAdamW): the
    blocks' and, in a hybrid, the conv stem's filters except the first, which reads the pixels;
    attention's fused qkv weights in a group with row_blocks=3, so q, k and v are orthogonalized apart."""
    depth = len(model.blocks)
    pixel_filters = next((f"patch_embed.{n}" for n, p in model.patch_embed.named_parameters() if p.ndim == 4), None)
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool, bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in skip
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
        hidden_filters = param.ndim == 4 and name.startswith("patch_embed.") and name != pixel_filters
        matrix = muon and ((param.ndim == 2 and name.startswith("blocks.")) or hidden_filters)
        row_blocks = 3 if matrix and name.endswith(".attn.qkv.weight") else 1
        key = (layer if layer_decay else 0, no_decay, matrix, row_blocks)
        group = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                        "lr_scale": scale, "muon": matrix, "row_blocks": row_blocks})
        group["params"].append(param)
    return list(groups.values())


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


class ViTClassifier(L.LightningModule):
    """Trains a VisionTransformer on uint8 image batches, augmenting on the training device."""

    def __init__(self, model: VisionTransformer, cfg: TrainConfig, classes: list[str],
                 mean: tuple[float, ...], std: tuple[float, ...], train_size: int,
                 teacher: Teacher | None = None, teacher_images: ImageSet | None = None,
                 teacher_cache_file: Path | None = None) -> None:
        """teacher_images: the training set, when the teacher's answers are to be cached
        (distill_cache) once training starts, on the device and in the precision it trains in;
        teacher_cache_file keeps that cache for a resumed run (TeacherCache's file)."""
        super().__init__()
        self.model = model
        self.teacher: Teacher | TeacherCache | None = teacher
        self._teacher_images = teacher_images
        self._teacher_cache_file = teacher_cache_file
        self.cfg = cfg
        self.classes = classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_size = train_size
        self.planned_steps: int | None = None  # set by a time budget once the step time is known
        self.ema = EMA(model) if cfg.ema or cfg.ema_horizon else None
        augment = AugmentConfig(**cfg.augment)
        self.augment = BatchAugment(augment, model.config.img_size, len(classes), self.mean, self.std)
        self._val: dict[str, Any] = {}
        self._val_start = 0.0
        self.validation_seconds: float | None = None  # this epoch's validation pass, as metrics.csv shows it
        self._throughput: list[float] = []
        if cfg.resize_start is not None:
            full, patch = model.config.img_size, model.config.patch_size
            if cfg.resize_start % patch or not patch <= cfg.resize_start < full:
                raise ValueError(f"resize_start={cfg.resize_start}: must be a multiple of the patch size {patch} "
                                 f"below the image size {full}, e.g. {max(patch, full * 3 // 4 // patch * patch)}")
            model.dynamic_img_size = True
        self._epoch_start, self._epoch_images, self._epoch_seconds = time.perf_counter(), 0, 0.0
        if cfg.freeze == "backbone":
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith(("head", "fc_norm")))

    # ---- the weights that are evaluated and saved -------------------------------------------

    @property
    def eval_model(self) -> VisionTransformer:
        return self.ema.module if self.ema is not None else self.model

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (TrainBatches drops the last partial batch of each process).

        Computed here rather than asked of Lightning: its estimate sets up the train loader before a
        resumed run's loader state is restored, and the restore is then skipped.
        """
        batches = (self.train_size // self.trainer.world_size) // self.cfg.batch_size
        return max(1, -(-batches // self.cfg.accumulate))  # Lightning also steps on an epoch's last, partial group

    def total_steps(self) -> int:
        """Optimizer steps the schedule spans: a time budget's plan, else epochs (or max_steps)."""
        if self.planned_steps:
            return self.planned_steps
        total = self.steps_per_epoch() * self.cfg.epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    # ---- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        cfg = self.cfg
        groups = parameter_groups(self.model, cfg.weight_decay, cfg.layer_decay, muon=cfg.optimizer == "muon")
        for group in groups:
            group["lr"] = cfg.lr * group["lr_scale"]
        fast = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fast)
        elif cfg.optimizer == "muon":  # foreach ops and batched matmuls on any device
            # A run in bf16 autocast orthogonalizes in bf16, as CUDA always does; on the CPU that
            # means precision auto found this chip's bf16 products fast: on a Xeon with AMX, a
            # cifar10-vit-2h step took 221 instead of 238 ms (its optimizer 38 instead of 54).
            bf16 = str(self.trainer.precision).startswith("bf16")
            optimizer = MuonAdamW(groups, lr=cfg.lr, betas=cfg.betas, ns_dtype=torch.bfloat16 if bf16 else None)
        elif cfg.optimizer == "adam":  # L2 folded into the gradient, as the seed's Adam did
            optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **fast)
        else:
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **fast)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch())

        def multiplier(step: int) -> float:  # reads total_steps() live: a time budget may re-plan it
            return lr_multiplier(step, warmup, self.total_steps(), cfg.min_lr_ratio, cfg.schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def ema_decay(self) -> float:
        """The EMA's decay: fixed (ema), or sized to the run (ema_horizon).

        A fixed decay such as 0.999 averages the last ~1,000 steps: most of a 5-minute run, a sliver
        of a 2-hour one. ema_horizon instead makes the time constant 1 / (1 - decay) that fraction
        of the planned steps, which a time budget re-plans as it goes.
        """
        if self.cfg.ema_horizon is None:
            return float(self.cfg.ema)
        return 1.0 - 1.0 / max(1.0, self.cfg.ema_horizon * self.total_steps())

    def patch_drop_rate(self, step: int) -> float:
        """The patch dropout of a step: the model's rate, falling linearly to patch_drop_end, and none
        from patch_drop_until on.

        Many tokens dropped early make the first steps cheap (as low resolution does in progressive
        resizing); fewer dropped late bring training closer to evaluation, which sees every patch.
        patch_drop_until ends the run on every patch, as FLIP's unmasked tuning does, so attention
        learns the token count it is evaluated on. Those steps cost more; a time budget sees them slow
        down and re-plans, so the unmasked tail takes about 1 - patch_drop_until of the time and a
        smaller share of the steps.
        """
        start, end, until = self.model.config.patch_drop_rate, self.cfg.patch_drop_end, self.cfg.patch_drop_until
        masked_steps = (until or 1.0) * self.total_steps()
        if until is not None and step >= masked_steps:
            return 0.0
        progress = min(1.0, step / max(1.0, masked_steps))
        return start if end is None else start + (end - start) * progress

    def train_resolution(self, step: int) -> int:
        """Progressive resizing: the side of a step's training images, from resize_start up to the
        model's img_size by resize_until of the planned steps, in multiples of the patch size.

        A ViT's step costs about its token count, so low resolution early buys more steps of a time
        budget, while, unlike patch dropout's random subset, the tokens still cover the whole image. The
        position embeddings are resampled to each grid (VisionTransformer.dynamic_img_size); the
        full-resolution tail adapts the model to the size it is evaluated at.
        """
        full, start, patch = self.model.config.img_size, self.cfg.resize_start, self.model.config.patch_size
        if start is None:
            return full
        progress = min(1.0, step / max(1.0, self.cfg.resize_until * self.total_steps()))
        return min(full, int(start + (full - start) * progress) // patch * patch)

    # ---- steps ------------------------------------------------------------------------------

    def _step_generator(self, key: torch.Tensor) -> torch.Generator:
        epoch, index = (int(v) for v in key.tolist())
        seed = ((self.cfg.seed * 1_000_003 + epoch) * 1_000_003 + index) * 64 + self.global_rank
        torch.manual_seed(seed)  # dropout and stochastic depth of this step
        return torch.Generator(device=self.device).manual_seed(seed + 1)

    def on_fit_start(self) -> None:
        if self.teacher is not None:  # not a submodule (see Teacher), so Lightning does not move it
            self.teacher.to(self.device)
        if self._teacher_images is not None and isinstance(self.teacher, Teacher):
            # the teacher answers in the precision the student trains in ("bf16-mixed", "16-mixed", "32-true")
            autocast = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(self.trainer.precision).split("-")[0])
            aug = self.augment.config
            self.teacher = TeacherCache(self.teacher, self._teacher_images, aug.crop_padding, aug.hflip,
                                        self.augment.image_size, self.mean, self.std, aug.padding_mode,
                                        device=self.device, autocast=autocast, rank=self.global_rank,
                                        world_size=self.trainer.world_size, file=self._teacher_cache_file)
            self._teacher_images = None
        if self.cfg.nonfinite == "skip" and self.trainer.world_size > 1:
            raise ValueError("--on-nonfinite skip (nonfinite: skip) works with one process only; "
                             "Lightning cannot skip a step in distributed training")

    def on_train_start(self) -> None:  # a resumed run may begin mid-epoch, without on_train_epoch_start
        self._epoch_start, self._epoch_images, self._epoch_seconds = time.perf_counter(), 0, 0.0

    def on_train_epoch_start(self) -> None:
        self._epoch_start, self._epoch_images, self._epoch_seconds = time.perf_counter(), 0, 0.0
        self.validation_seconds = None  # stays None through an epoch that val_every leaves unvalidated

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        images, labels, key = batch
        generator = self._step_generator(key)
        # mix_start, auto_augment_start: mixing and the auto-augment ops only once the model has begun
        # to fit its data; asked every step, since a time budget re-plans the run's length.
        mix = self.global_step >= self.cfg.mix_start * self.total_steps()
        auto_augment = self.global_step >= self.cfg.auto_augment_start * self.total_steps()
        taught = None  # the teacher's probabilities, from its cache
        if isinstance(self.teacher, TeacherCache):
            indices, cache = self.trainer.train_dataloader.indices(key), self.teacher
            x, targets, taught = self.augment(images, labels, generator=generator, mix=mix,
                                              view_targets=lambda *view: cache.probabilities(indices, *view),
                                              auto_augment=auto_augment)
        else:
            x, targets = self.augment(images, labels, generator=generator, mix=mix, auto_augment=auto_augment)
        if self.cfg.patch_drop_end is not None or self.cfg.patch_drop_until is not None:
            self.model.patch_drop_rate = self.patch_drop_rate(self.global_step)
        side = self.train_resolution(self.global_step)
        seen = x if side == x.shape[-1] else F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        logits = self.model(seen)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)
        if self.teacher is not None:  # the teacher sees the full-resolution images it was trained on
            if taught is None:
                taught = self.teacher.probabilities(x)
            w = self.cfg.distill_weight
            loss = (1 - w) * loss + w * F.cross_entropy(logits, taught)  # soft targets
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_completed"):  # what a checkpoint taken after this step records
            loader.mark_completed(int(key[1]))
        if not torch.isfinite(loss):
            epoch, index = key.tolist()
            if self.cfg.nonfinite == "skip":  # returning None: Lightning skips backward and the update
                log.warning("loss became %s: skipped step %d (epoch %d, batch %d), weights unchanged "
                            "(--on-nonfinite skip)", loss.item(), self.global_step, epoch, index)
                return None
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step} (epoch {epoch}, batch {index}); "
                "lower --lr, add --grad-clip 1.0, or check the data. No checkpoint was written after it."
            )
        hard = targets if targets.ndim == 1 else targets.argmax(-1)
        acc = (logits.argmax(-1) == hard).float().mean()
        self._epoch_images += images.shape[0]
        n = images.shape[0]
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train_acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Here rather than in on_train_batch_end: callbacks (checkpoints, a graceful stop) run before
        # the module's own on_train_batch_end, and must see the EMA of the step just taken.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model, self.ema_decay())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._epoch_seconds = time.perf_counter() - self._epoch_start
        self.log("img/s", self.images_per_second(), prog_bar=True, batch_size=1)

    def images_per_second(self) -> float:
        """Training images per second in this epoch up to its last finished step (validation excluded),
        all processes together."""
        return self._epoch_images * self.trainer.world_size / max(self._epoch_seconds, 1e-9)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits of the saved weights (EMA if on), with optional flip averaging."""
        x = preprocess(images, self.model.config.img_size, self.mean, self.std)
        return flip_averaged_log_probs(self.eval_model, x) if self.cfg.tta_flip else self.eval_model(x)

    def on_validation_epoch_start(self) -> None:
        self._val = {"loss": [], "correct": [], "top5": [], "count": []}
        self._val_start, self.validation_seconds = time.perf_counter(), None  # no stale figure from a pass before

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.logits(images)
        self._val["loss"].append(F.cross_entropy(logits, labels, reduction="sum"))
        self._val["correct"].append((logits.argmax(-1) == labels).sum())
        k = min(5, logits.shape[-1])
        self._val["top5"].append((logits.topk(k, -1).indices == labels[:, None]).any(-1).sum())
        self._val["count"].append(torch.tensor(labels.shape[0], device=self.device))

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("count"):
            return
        totals = torch.stack([torch.stack(v).sum().float() for v in self._val.values()])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss, correct, top5, count = totals.tolist()
        self.log("val_loss", loss / count, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log("val_acc", correct / count, prog_bar=True, rank_zero_only=False)
        self.log("val_top5", top5 / count, rank_zero_only=False)
        self.validation_seconds = time.perf_counter() - self._val_start

    # ---- what a checkpoint carries besides Lightning's state --------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning restores the optimizer: refuse a checkpoint whose parameter groups differ
        from the ones these settings make now, naming the file and the way on.

        Resuming restores the optimizer state group by group, so it needs the same grouping. A
        checkpoint written by an earlier vitkit may have another (Muon's q, k and v weights got a group
        of their own on 2026-11-27), and torch's own error ("a parameter group that doesn't match the
        size of optimizer's group") names neither the file nor what to do.
        """
        states = checkpoint.get("optimizer_states") or [{}]
        saved = [len(group["params"]) for group in states[0].get("param_groups", [])]
        cfg = self.cfg
        wanted = [len(group["params"]) for group in
                  parameter_groups(self.model, cfg.weight_decay, cfg.layer_decay, muon=cfg.optimizer == "muon")]
        if saved and saved != wanted:
            path = getattr(self.trainer, "ckpt_path", None) or "the checkpoint"
            raise ValueError(
                f"{path}: its optimizer state has parameter groups of {saved} tensors, while this vitkit groups "
                f"the same model and settings as {wanted} (the checkpoint comes from an earlier version), so it "
                f"cannot be resumed; start a new run from its weights with --init {path}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vitkit"] = {
            "config": self.model.config.to_dict(),
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "train": self.cfg.to_dict(),
            "weights": "ema.module." if self.ema is not None else "model.",
        }
