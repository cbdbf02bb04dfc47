"""The LightningModule: a ViT, its optimiser and schedule, EMA, a teacher, and the train/validation steps.

Randomness of a step (augmentation, dropout, stochastic depth) is drawn from generators seeded by
(run seed, epoch, batch index, rank), not from a stream carried across steps: a run resumed from any
checkpoint replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data import DEFAULT_INTERPOLATION, AugmentConfig, BatchAugment, ImageSet, preprocess
from vitkit.model import VisionTransformer
from vitkit.model.tta import view_averaged_logits
from vitkit.train.config import TrainConfig
from vitkit.train.distill import Teacher, TeacherCache
from vitkit.train.loader import EvalBatches, TrainBatch
from vitkit.train.muon import MuonAdamW
from vitkit.train.plan import (
    RunPlan,
    ema_decay,
    has_begun,
    lr_multiplier,
    patch_drop_rate,
    train_resolution,
    warmup_steps,
)

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
        if name.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")):  # before the blocks
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


class ViTClassifier(L.LightningModule):
    """Trains a VisionTransformer on uint8 image batches, augmenting on the training device, and
    validates it where the run plan says.

    Validation is a pass of the module's own (validate), run after a training batch's callbacks have
    had their say (so it sees a stop any of them asked for) and before the epoch's end, where the
    checkpoints are written. Lightning's validation loop has nothing to run: there is no
    val_dataloader and no validation_step, so it cannot validate where the plan does not.
    """

    def __init__(self, model: VisionTransformer, cfg: TrainConfig, classes: list[str],
                 mean: tuple[float, ...], std: tuple[float, ...], train_size: int,
                 teacher: Teacher | None = None, teacher_images: ImageSet | None = None,
                 teacher_cache_file: Path | None = None, val_images: ImageSet | None = None) -> None:
        """teacher_images: the training set, when the teacher's answers are to be cached
        (distill_cache) once training starts, on the device and in the precision it trains in;
        teacher_cache_file keeps that cache for a resumed run (TeacherCache's file); val_images: the
        validation split (none: the run is not validated)."""
        super().__init__()
        self.model = model
        self.teacher: Teacher | TeacherCache | None = teacher
        self._teacher_images = teacher_images
        self._teacher_cache_file = teacher_cache_file
        self.cfg = cfg
        self.classes = classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_size = train_size
        # The run's plan: made once the number of processes is known (setup), restored from a checkpoint.
        self.plan = RunPlan.for_config(cfg, train_size)
        self._val_images = val_images
        self.val_batches: EvalBatches | None = None  # this process's share of val_images, from setup
        self.ema = EMA(model) if cfg.ema or cfg.ema_horizon else None
        augment = AugmentConfig(**cfg.augment)
        self.augment = BatchAugment(augment, model.config.img_size, len(classes), self.mean, self.std)
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

    def setup(self, stage: str) -> None:
        """The plan and the validation batches of this process (the number of processes is known now).

        The plan counts the steps itself rather than asking Lightning: Lightning's estimate sets up
        the train loader before a resumed run's loader state is restored, and the restore is then skipped.
        """
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        self.plan = RunPlan.for_config(self.cfg, self.train_size, world_size)
        if self._val_images is not None and len(self._val_images) > 0:
            self.val_batches = EvalBatches(self._val_images, self.cfg.batch_size * 2, rank=rank,
                                           world_size=world_size, num_workers=self.cfg.num_workers)

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
            # means precision auto found this chip's bf16 products fast, and the optimizer gains too.
            bf16 = str(self.trainer.precision).startswith("bf16")
            optimizer = MuonAdamW(groups, lr=cfg.lr, betas=cfg.betas, ns_dtype=torch.bfloat16 if bf16 else None)
        elif cfg.optimizer == "adam":  # L2 folded into the gradient, as the seed's Adam did
            optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **fast)
        else:
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **fast)
        warmup = warmup_steps(cfg.warmup_epochs, self.plan.steps_per_epoch)

        def multiplier(step: int) -> float:  # asks the plan every step: a time budget may revise it
            return lr_multiplier(step, warmup, self.plan.total_steps, cfg.min_lr_ratio, cfg.schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def ema_decay(self) -> float:
        """The EMA's decay now: fixed (ema), or sized to the planned steps (ema_horizon)."""
        return ema_decay(self.cfg.ema, self.cfg.ema_horizon, self.plan.total_steps)

    def patch_drop_rate(self, step: int) -> float:
        """The patch dropout of a step (plan.patch_drop_rate): the model's rate, annealed to patch_drop_end,
        none from patch_drop_until of the planned steps on."""
        return patch_drop_rate(step, self.plan.total_steps, self.model.config.patch_drop_rate,
                               self.cfg.patch_drop_end, self.cfg.patch_drop_until)

    def train_resolution(self, step: int) -> int:
        """The side of a step's training images (plan.train_resolution): progressive resizing from
        resize_start to img_size by resize_until of the planned steps."""
        config = self.model.config
        return train_resolution(step, self.plan.total_steps, config.img_size, self.cfg.resize_start,
                                self.cfg.resize_until, config.patch_size)

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
        self.validation_seconds = None  # stays None through an epoch that the plan leaves unvalidated

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor | None:
        images, labels, key, indices = batch
        generator = self._step_generator(key)
        # Asked every step, since a time budget revises the planned total.
        step, total = self.global_step, self.plan.total_steps
        mix = has_begun(step, total, self.cfg.mix_start)
        auto_augment = has_begun(step, total, self.cfg.auto_augment_start)
        taught = None  # the teacher's probabilities, from its cache
        if isinstance(self.teacher, TeacherCache):
            cache = self.teacher
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
        epoch, index = (int(v) for v in key.tolist())
        self.plan.record_batch(epoch, index)  # what a checkpoint taken after this step records
        if not torch.isfinite(loss):
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

    def on_train_batch_end(self, outputs: Any, batch: TrainBatch, batch_idx: int) -> None:
        """After every callback's on_train_batch_end (a time budget's revision, a stop it asked for):
        the run ends where the plan does, and is validated where the plan says."""
        self._epoch_seconds = time.perf_counter() - self._epoch_start
        self.log("img/s", self.images_per_second(), prog_bar=True, batch_size=1)
        trainer, step = self.trainer, self.global_step
        if self.plan.ends_at(step):  # max_steps, which Lightning does not validate mid-epoch, or the budget's step
            trainer.should_stop = True
        epoch, index = (int(v) for v in batch.step_key.tolist())
        if self.val_batches is not None and self.plan.validates_after(epoch, index, step, trainer.should_stop):
            self.validate()

    def images_per_second(self) -> float:
        """Training images per second in this epoch up to its last finished step (validation excluded),
        all processes together."""
        return self._epoch_images * self.trainer.world_size / max(self._epoch_seconds, 1e-9)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits of the saved weights (EMA if on), with optional flip averaging."""
        x = preprocess(images, self.model.config.img_size, self.mean, self.std)
        return view_averaged_logits(self.eval_model, x, flip=self.cfg.tta_flip)

    def validate(self) -> None:
        """A validation pass: loss, top-1 and top-5 over every process's share, logged as val_loss,
        val_acc and val_top5 for this epoch (the checkpoints and metrics.csv read them at its end), and
        its wall clock as validation_seconds. In eval mode, without gradients, in the precision the
        run trains in, as Lightning's own validation loop would run it."""
        start = time.perf_counter()
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        parts: dict[str, list[torch.Tensor]] = {"loss": [], "correct": [], "top5": [], "count": []}
        with torch.inference_mode(), self.trainer.precision_plugin.val_step_context():
            for images, labels in self.val_batches:
                images, labels = images.to(self.device), labels.to(self.device)
                logits = self.logits(images)
                k = min(5, logits.shape[-1])
                parts["loss"].append(F.cross_entropy(logits, labels, reduction="sum"))
                parts["correct"].append((logits.argmax(-1) == labels).sum())
                parts["top5"].append((logits.topk(k, -1).indices == labels[:, None]).any(-1).sum())
                parts["count"].append(torch.tensor(labels.shape[0], device=self.device))
            totals = torch.stack([torch.stack(v).sum().float() for v in parts.values()])
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        for module, training in modes:
            module.train(training)
        loss, correct, top5, count = totals.tolist()
        for name, value, bar in (("val_loss", loss / count, True), ("val_acc", correct / count, True),
                                 ("val_top5", top5 / count, False)):
            self.log(name, value, prog_bar=bar, on_step=False, on_epoch=True, batch_size=1)
        self.validation_seconds = time.perf_counter() - start

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
            "interpolation": DEFAULT_INTERPOLATION,  # how the data loader resized the images (weights.checkpoint)
        }
