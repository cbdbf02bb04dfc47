"""The training run's settings: one dataclass, recipes as YAML files that fill it, flags on top.

Precedence: dataclass defaults < recipe file < command-line flags. The resolved config is saved
with every run (``config.yaml``), so a run can be repeated from its directory alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# Lightning's precisions that keep fp32 weights, and "auto": bf16-mixed where the machine multiplies bf16
# faster (train.precision). Lightning's "-true" precisions other than 32 are left out: they cast the weights,
# and the fp32 images that preprocessing makes would meet them in the first layer with a dtype mismatch.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")

AUGMENT_KEYS = {
    "crop_padding", "random_resized_crop", "rrc_scale", "hflip", "auto_augment", "randaugment_n",
    "randaugment_m", "random_erasing", "mixup_alpha", "cutmix_alpha", "mix_prob",
}

# ViTConfig fields with a top-level setting of their own (the rest go through model_args).
MODEL_SETTINGS = ("img_size", "patch_size", "depth", "drop_rate", "drop_path_rate", "global_pool")


@dataclass
class TrainConfig:
    """Every knob of `vitkit train`. Field names are the recipe keys; flags use dashes."""

    # data
    data: str | None = None  # image folder, extracted CIFAR dir, or "cifar10"/"cifar100" under the data root
    download: bool = False
    val_fraction: float = 0.1  # per-class holdout carved from train when the source has no val split
    split_seed: int = 0
    val_every: int = 1  # validate every this many epochs, and always the first and where training ends
    skip_bad_images: bool = False
    normalization: str = "vit"  # "vit" (0.5, 0.5), "imagenet" or "cifar10" mean/std
    num_workers: int = 0  # decoding workers for folders streamed from disk
    # model
    model: str = "cifar-tiny"
    img_size: int | None = None  # default: the data's stored size for presets, else the model's
    patch_size: int | None = None
    depth: int | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str | None = None
    patch_drop_end: float | None = None  # patch_drop_rate falls linearly to this by the last step
    patch_drop_until: float | None = None  # no patch dropout from this fraction of the run's steps on
    resize_start: int | None = None  # progressive resizing: training images start at this side...
    resize_until: float = 0.75  # ...and grow linearly to img_size by this fraction of the run's steps
    model_args: dict[str, Any] = field(default_factory=dict)  # any other ViTConfig field, e.g. {stem: conv}
    # fine-tuning
    init: str | None = None  # pretrained weights (timm, Hugging Face, .npz, vitkit)
    resample_patch: bool = False
    trust_checkpoint: bool = False
    freeze: str = "none"  # "none" or "backbone" (a linear probe: only the head trains)
    layer_decay: float | None = None  # layer-wise lr decay, e.g. 0.75 for fine-tuning
    # distillation
    teacher: str | None = None  # a trained classifier (run dir, .ckpt, .safetensors) whose probabilities teach
    distill_weight: float = 0.5  # loss = (1 - w) * CE(labels) + w * CE(teacher's probabilities)
    distill_cache: bool = False  # ask the teacher once, before training, on a grid of views (distill.TeacherCache)
    # optimisation
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    optimizer: str = "adamw"  # "adamw" (decoupled decay), "muon" (hidden matrices; AdamW else), "adam", "sgd"
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # "cosine", "linear" (to min_lr_ratio) or "constant", per step after warmup
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    accumulate: int = 1
    ema: float | None = None  # EMA decay, e.g. 0.999; the EMA weights are evaluated and saved
    ema_horizon: float | None = None  # instead of ema: the EMA's time constant as a fraction of the run's steps
    nonfinite: str = "stop"  # a NaN/inf loss: "stop" the run (naming step and batch) or "skip" that step
    swa: bool = False
    augment: dict[str, Any] = field(default_factory=lambda: {"hflip": True})
    mix_start: float = 0.0  # mixup/cutmix only from this fraction of the run's steps on ("mixup late")
    auto_augment_start: float = 0.0  # augment's auto_augment ops only from this fraction of the run's steps on
    tta_flip: bool = False  # evaluate on the image and its mirror, averaged
    # run
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # default: bf16-mixed on CUDA, 32-true on the CPU; "auto": bf16 where it pays
    time_budget: float | None = None  # seconds of wall clock from start to the final checkpoint
    out: str = "runs/latest"
    overwrite: bool = False
    progress: bool = True
    tensorboard: bool = False
    recipe: str | None = None  # where the values came from, for the record

    def validate(self) -> TrainConfig:
        """Check values a user can get wrong; errors name the key, the value and the fix."""
        positive = ["epochs", "batch_size", "accumulate", "val_every"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}={value!r}: must be a positive integer")
        if not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r}: the learning rate must be a positive number, e.g. 1e-3")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing}: must be in [0, 1)")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema={self.ema}: the EMA decay must be in (0, 1), e.g. 0.999")
        if self.ema_horizon is not None and not 0 < self.ema_horizon < 1:
            raise ValueError(f"ema_horizon={self.ema_horizon}: a fraction of the run's steps in (0, 1), e.g. 0.05")
        if self.ema is not None and self.ema_horizon is not None:
            raise ValueError(f"ema={self.ema} and ema_horizon={self.ema_horizon}: set one of them, not both "
                             "(ema fixes the decay, ema_horizon sizes it to the run's length)")
        if not 0 <= self.mix_start < 1:
            raise ValueError(f"mix_start={self.mix_start}: a fraction of the run's steps in [0, 1), e.g. 0.5")
        if not 0 <= self.auto_augment_start < 1:
            raise ValueError(f"auto_augment_start={self.auto_augment_start}: a fraction of the run's steps in [0, 1), "
                             "e.g. 0.3")
        if self.auto_augment_start and not self.augment.get("auto_augment"):
            raise ValueError(f"auto_augment_start={self.auto_augment_start} schedules augment's auto_augment, which "
                             "is not set: add --auto-augment trivial (augment: {auto_augment: trivial}) or drop it")
        if not 0 < self.distill_weight <= 1:
            raise ValueError(f"distill_weight={self.distill_weight}: the teacher's share of the loss, in (0, 1], "
                             "e.g. 0.5")
        if self.distill_cache and not self.teacher:
            raise ValueError("distill_cache: true caches a teacher's answers; pass --teacher RUN as well")
        if self.distill_cache and self.augment.get("random_resized_crop"):
            raise ValueError("distill_cache stores views of the padded crop (augment: crop_padding); it cannot "
                             "follow random_resized_crop: drop one of them")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay={self.layer_decay}: must be in (0, 1]")
        if self.patch_drop_end is not None and not 0 <= self.patch_drop_end < 1:
            raise ValueError(f"patch_drop_end={self.patch_drop_end}: must be in [0, 1), e.g. 0.25")
        if self.patch_drop_until is not None and not 0 < self.patch_drop_until <= 1:
            raise ValueError(f"patch_drop_until={self.patch_drop_until}: a fraction of the run's steps in (0, 1], "
                             "e.g. 0.9 (the last tenth sees every patch)")
        if self.resize_start is not None and self.resize_start <= 0:
            raise ValueError(f"resize_start={self.resize_start}: the first training images' side in pixels, "
                             "e.g. 24 for 32-pixel CIFAR images")
        if not 0 < self.resize_until <= 1:
            raise ValueError(f"resize_until={self.resize_until}: a fraction of the run's steps in (0, 1], e.g. 0.75")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs}: must be >= 0")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps={self.max_steps}: must be a positive integer")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget={self.time_budget}: must be a positive duration such as 30m")
        choices = dict(optimizer=("adamw", "muon", "adam", "sgd"), schedule=("cosine", "linear", "constant"),
                       freeze=("none", "backbone"), normalization=("vit", "imagenet", "cifar10"),
                       nonfinite=("stop", "skip"))
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {list(PRECISIONS)}; \"auto\" trains "
                             "in bf16-mixed where this machine multiplies bf16 faster than fp32")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: must be one of {list(allowed)}")
        unknown = set(self.augment) - AUGMENT_KEYS
        if unknown:
            raise ValueError(f"unknown augment option(s) {sorted(unknown)}; valid: {sorted(AUGMENT_KEYS)}")
        # Settings with a field of their own: that field would override them silently.
        shadowed = set(self.model_args) & set(MODEL_SETTINGS)
        if shadowed:
            key = sorted(shadowed)[0]
            raise ValueError(f"model_args: {key!r} has a setting of its own, which would override it; "
                             f"write '{key}: ...' at the top level of the recipe instead")
        return self

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas)
        return values


def recipe_names() -> list[str]:
    """Recipes shipped with the package (``vitkit/recipes/*.yaml``)."""
    folder = resources.files("vitkit") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_recipe(recipe: str) -> dict[str, Any]:
    """A recipe by shipped name or file path, as a dict of TrainConfig keys (checked)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {recipe} does not exist")
        text = path.read_text()
    else:
        names = recipe_names()
        if recipe not in names:
            close = difflib.get_close_matches(recipe, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown recipe {recipe!r}{hint}; shipped recipes: {', '.join(names)}, or pass a YAML file"
            )
        text = (resources.files("vitkit") / "recipes" / f"{recipe}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {recipe}: expected a mapping of settings, got {type(values).__name__}")
    check_keys(values, f"recipe {recipe}")
    return values


def check_keys(values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}")


def resolve_config(recipe: str | None = None, *, base: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe (or base: a resumed run's saved settings), then the non-None overrides
    (flags); validated. augment and model_args are merged key by key: a flag changes one of the
    recipe's settings, not all of them."""
    values: dict[str, Any] = read_recipe(recipe) if recipe else dict(base or {})
    if not recipe and base:  # a recipe's keys were checked as it was read
        check_keys(base, "the resumed run's settings")
    check_keys(overrides, "option")
    augment = dict(values.pop("augment", None) or {"hflip": True})
    augment.update(overrides.pop("augment", None) or {})
    model_args = dict(values.pop("model_args", None) or {})
    model_args.update(overrides.pop("model_args", None) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["augment"] = augment
    values["model_args"] = model_args
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    if isinstance(values.get("time_budget"), str):  # recipes may write 30m, as the flag does
        values["time_budget"] = parse_duration(values["time_budget"])
    values["recipe"] = recipe
    return TrainConfig(**values).validate()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_duration(text: str) -> float:
    """'30m', '2h', '90s' or plain seconds -> seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"time budget {text!r}: expected a duration such as 90s, 30m or 2h")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]
