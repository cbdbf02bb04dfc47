"""The training run's settings: one dataclass, recipes as YAML files that fill it, flags on top.

Each setting is one field of TrainConfig, and its metadata (``setting(...)``) says everything else about
it: its section, help, value kind and choices. `vitkit train`'s flags, the recipe keys and the checks of
validate() are all derived from the fields, so adding a setting is adding a field.

Precedence: dataclass defaults < recipe file < command-line flags. The resolved config is saved
with every run (``config.yaml``), so a run can be repeated from its directory alone.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vitkit.data.augment import AugmentConfig
from vitkit.settings import check_values, nearest, parse_duration

# Lightning's precisions that keep fp32 weights, and "auto": bf16-mixed where the machine multiplies bf16
# faster (train.precision). Lightning's "-true" precisions other than 32 are left out: they cast the weights,
# and the fp32 images that preprocessing makes would meet them in the first layer with a dtype mismatch.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")

# `vitkit train --help` groups its flags by these sections, in this order.
SECTIONS = ("data", "model", "fine-tuning", "distillation", "optimisation", "augmentation", "run")

# ViTConfig fields with a top-level setting of their own (the rest go through model_args).
MODEL_SETTINGS = ("img_size", "patch_size", "depth", "drop_rate", "drop_path_rate", "global_pool")

# The metadata a setting may carry besides its section and help (vitkit.settings describes them).
FLAG_OPTIONS = {"kind", "flag", "choices", "metavar", "nested"}


def setting(default: Any = None, section: str = "run", help: str = "", *,
            factory: Callable[[], Any] | None = None, **options: Any) -> Any:
    """A TrainConfig field with the metadata its flag, help and checks come from; options are the
    metadata keys vitkit.settings describes (kind, choices, flag, metavar, nested)."""
    if section not in SECTIONS:
        raise ValueError(f"setting section {section!r}: use one of {SECTIONS}")
    unknown = set(options) - FLAG_OPTIONS
    if unknown:
        raise TypeError(f"setting(): unknown option(s) {sorted(unknown)}; valid: {sorted(FLAG_OPTIONS)}")
    metadata = {"section": section, "help": help, **options}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every knob of `vitkit train`. Field names are the recipe keys; flags use dashes."""

    data: str | None = setting(None, "data", "image folder, extracted CIFAR dir, or cifar10/cifar100 under the "
                               "data root (with --download)")
    download: bool = setting(False, "data", "download cifar10/cifar100 if missing")
    val_fraction: float = setting(0.1, "data", "per-class holdout carved from train when the source has no val "
                                  "split", kind="fraction")
    split_seed: int = setting(0, "data", "seed of the validation holdout")
    val_every: int = setting(1, "data", "validate every EPOCHS epochs (and the first and where training ends): "
                             "more of a time budget trains", kind="positive_int", metavar="EPOCHS")
    skip_bad_images: bool = setting(False, "data", "leave out unreadable images instead of stopping")
    normalization: str = setting("vit", "data", "mean/std: vit (0.5, 0.5), imagenet or cifar10",
                                 choices=("vit", "imagenet", "cifar10"))
    num_workers: int = setting(0, "data", "decoding workers for folders streamed from disk", kind="non_negative_int")

    model: str | None = setting(None, "model", "variant: S/16, B/16@384, vit_tiny_patch16_224, cifar-tiny ...; "
                                "default: the --init weights' own architecture, else cifar-tiny")
    img_size: int | None = setting(None, "model", "input side; default: the data's stored size for presets, "
                                   "else the model's", kind="positive_int")
    patch_size: int | None = setting(None, "model", "patch side in pixels", kind="positive_int")
    depth: int | None = setting(None, "model", "transformer blocks", kind="positive_int")
    drop_rate: float = setting(0.0, "model", "dropout rate", kind="fraction")
    drop_path_rate: float = setting(0.0, "model", "stochastic depth rate", kind="fraction")
    global_pool: str | None = setting(None, "model", "what feeds the head: the class token or the patch tokens' "
                                      "mean", choices=("token", "avg"))
    patch_drop_end: float | None = setting(None, "model", "patch_drop_rate falls linearly to this by the last "
                                           "step", kind="fraction")
    patch_drop_until: float | None = setting(None, "model", "no patch dropout from this fraction of the run's "
                                             "steps on", kind="portion")
    resize_start: int | None = setting(None, "model", "progressive resizing: training images start at this "
                                       "side...", kind="positive_int", metavar="PIXELS")
    resize_until: float = setting(0.75, "model", "...and grow linearly to img_size by this fraction of the "
                                  "run's steps", kind="portion")
    model_args: dict[str, Any] = setting(  # noqa: RUF009 (setting() returns a dataclasses.field)
        section="model", help="any other ViTConfig option, e.g. {stem: conv} in a recipe; on the command line "
        "KEY=VALUE (stem=shifted, patch_drop_rate=0.5), repeated for more", factory=dict, flag="model-arg",
        metavar="KEY=VALUE")

    init: str | None = setting(None, "fine-tuning", "pretrained weights to fine-tune from (timm, Hugging Face, "
                               ".npz, vitkit)")
    resample_patch: bool = setting(False, "fine-tuning", "allow --init weights of another patch size (kernel "
                                   "resampled)")
    trust_checkpoint: bool = setting(False, "fine-tuning", "allow pickled code in --init files (unsafe); "
                                     "--resume reads vitkit's own checkpoints, which need none")
    freeze: str = setting("none", "fine-tuning", "backbone: a linear probe, only the head trains",
                          choices=("none", "backbone"))
    layer_decay: float | None = setting(None, "fine-tuning", "layer-wise lr decay, e.g. 0.75", kind="portion")

    teacher: str | None = setting(None, "distillation", "distil from this trained classifier (run dir, .ckpt or "
                                  ".safetensors), which sees the same augmented batches")
    distill_weight: float = setting(0.5, "distillation", "the teacher's share of the loss: (1 - w) * CE(labels) "
                                    "+ w * CE(teacher's probabilities)", kind="portion")
    distill_cache: bool = setting(False, "distillation", "ask the teacher once, before training, for every image "
                                  "on a grid of crops and flips, instead of a forward pass every step")

    epochs: int = setting(10, "optimisation", "epochs to train", kind="positive_int")
    max_steps: int | None = setting(None, "optimisation", "stop after this many optimizer steps",
                                    kind="positive_int")
    batch_size: int = setting(128, "optimisation", "images per batch", kind="positive_int")
    optimizer: str = setting("adamw", "optimisation", "adamw (decoupled decay), muon (hidden matrices; AdamW "
                             "else), adam or sgd", choices=("adamw", "muon", "adam", "sgd"))
    lr: float = setting(1e-3, "optimisation", "the learning rate after warmup", kind="positive_float")
    min_lr_ratio: float = setting(0.0, "optimisation", "the decay ends at lr * min_lr_ratio",
                                  kind="non_negative_float")
    weight_decay: float = setting(0.05, "optimisation", "weight decay", kind="non_negative_float")
    betas: tuple[float, float] = setting((0.9, 0.999), "optimisation", "Adam's betas", kind="fraction",
                                         metavar=("BETA1", "BETA2"))
    warmup_epochs: float = setting(0.0, "optimisation", "linear lr warmup, in epochs", kind="non_negative_float")
    schedule: str = setting("cosine", "optimisation", "lr after warmup, per step (linear: to min_lr_ratio)",
                            choices=("cosine", "linear", "constant"))
    label_smoothing: float = setting(0.0, "optimisation", "label smoothing", kind="fraction")
    grad_clip: float | None = setting(None, "optimisation", "clip the gradient norm to this", kind="positive_float")
    accumulate: int = setting(1, "optimisation", "gradient accumulation steps", kind="positive_int")
    ema: float | None = setting(None, "optimisation", "EMA decay, e.g. 0.999 (the EMA weights are evaluated and "
                                "saved)", kind="fraction")
    ema_horizon: float | None = setting(None, "optimisation", "instead of ema, an EMA sized to the run: its time "
                                        "constant as a fraction of the run's steps, e.g. 0.05", kind="fraction")
    nonfinite: str = setting("stop", "optimisation", "a NaN/inf loss stops the run (naming step and batch) or "
                             "skips that step", flag="on-nonfinite", choices=("stop", "skip"))
    swa: bool = setting(False, "optimisation", "stochastic weight averaging")

    augment: dict[str, Any] = setting(  # noqa: RUF009 (setting() returns a dataclasses.field)
        section="augmentation", help="batched augmentation: data.AugmentConfig's options",
        factory=lambda: {"hflip": True}, nested=AugmentConfig)
    mix_start: float = setting(0.0, "augmentation", "mixup/cutmix only from this fraction of the run's steps on",
                               kind="fraction")
    auto_augment_start: float = setting(0.0, "augmentation", "TrivialAugment/RandAugment only from this fraction "
                                        "of the run's steps on", kind="fraction")
    tta_flip: bool = setting(False, "augmentation", "evaluate on the image and its mirror, averaged")

    seed: int = setting(0, "run", "random seed")
    deterministic: bool = setting(False, "run", "deterministic algorithms only")
    compile: bool = setting(False, "run", "torch.compile the model")
    accelerator: str = setting("auto", "run", "where to train", choices=("auto", "cpu", "gpu", "cuda", "mps"))
    devices: str = setting("auto", "run", "number of devices (or 'auto')")
    num_nodes: int = setting(1, "run", "machines in a multi-node run (torchrun or SLURM)", kind="positive_int")
    strategy: str = setting("auto", "run", "auto, ddp, ddp_spawn, fsdp ...")
    precision: str | None = setting(None, "run", "default: bf16-mixed on CUDA, 32-true on the CPU; auto: "
                                    "bf16-mixed where this machine multiplies bf16 faster than fp32 (CUDA, CPUs "
                                    "with fast bf16), else 32-true", choices=PRECISIONS)
    time_budget: float | None = setting(None, "run", "seconds of wall clock (or 30m, 2h) from start to the final "
                                        "checkpoint: the schedule fits it", kind="duration")
    out: str = setting("runs/latest", "run", "run directory")
    overwrite: bool = setting(False, "run", "replace an existing run directory")
    progress: bool = setting(True, "run", "the progress bar")
    tensorboard: bool = setting(False, "run", "also log to TensorBoard")
    recipe: str | None = setting(None, "run", "shipped recipe name (see `vitkit recipes`) or a YAML file; "
                                 "saved as where the values came from")

    def validate(self) -> TrainConfig:
        """Check values a user can get wrong; errors name the key, the value and the fix."""
        check_values(type(self), vars(self))
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema={self.ema}: the EMA decay must be in (0, 1), e.g. 0.999")
        if self.ema_horizon is not None and not 0 < self.ema_horizon < 1:
            raise ValueError(f"ema_horizon={self.ema_horizon}: a fraction of the run's steps in (0, 1), e.g. 0.05")
        if self.ema is not None and self.ema_horizon is not None:
            raise ValueError(f"ema={self.ema} and ema_horizon={self.ema_horizon}: set one of them, not both "
                             "(ema fixes the decay, ema_horizon sizes it to the run's length)")
        if self.auto_augment_start and not self.augment.get("auto_augment"):
            raise ValueError(f"auto_augment_start={self.auto_augment_start} schedules augment's auto_augment, which "
                             "is not set: add --auto-augment trivial (augment: {auto_augment: trivial}) or drop it")
        if self.distill_cache and not self.teacher:
            raise ValueError("distill_cache: true caches a teacher's answers; pass --teacher RUN as well")
        if self.distill_cache and self.augment.get("random_resized_crop"):
            raise ValueError("distill_cache stores views of the padded crop (augment: crop_padding); it cannot "
                             "follow random_resized_crop: drop one of them")
        for key in self.augment:
            if key not in AUGMENT_KEYS:
                raise ValueError(f"augment: unknown option {key!r}{nearest(str(key), AUGMENT_KEYS)} "
                                 f"(valid: {', '.join(sorted(AUGMENT_KEYS))})")
        check_values(AugmentConfig, self.augment, "augment: ")
        AugmentConfig(**self.augment)  # its own checks across options (rrc_scale's order, randaugment_m's range)
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


AUGMENT_KEYS = frozenset(item.name for item in dataclasses.fields(AugmentConfig))


def recipe_names() -> list[str]:
    """Recipes shipped with the package (``vitkit/recipes/*.yaml``)."""
    folder = resources.files("vitkit") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_recipe(recipe: str, config_class: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """A recipe by shipped name or file path, as a dict of config_class keys (checked)."""
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
    check_keys(values, f"recipe {recipe}", config_class)
    return values


def check_keys(values: Mapping[str, Any], where: str, config_class: type[TrainConfig] = TrainConfig) -> None:
    known = {item.name for item in dataclasses.fields(config_class)}
    for key in values:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}{nearest(str(key), known)}")


def resolve_config(recipe: str | None = None, *, base: dict[str, Any] | None = None,
                   config_class: type[TrainConfig] = TrainConfig, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe (or base: a resumed run's saved settings), then the non-None overrides
    (flags); validated. augment and model_args are merged key by key: a flag changes one of the
    recipe's settings, not all of them."""
    values: dict[str, Any] = read_recipe(recipe, config_class) if recipe else dict(base or {})
    if not recipe and base:  # a recipe's keys were checked as it was read
        check_keys(base, "the resumed run's settings", config_class)
    check_keys(overrides, "option", config_class)
    for key in ("augment", "model_args"):
        for given in (values.get(key), overrides.get(key)):
            if given is not None and not isinstance(given, dict):
                raise ValueError(f"{key}={given!r}: must be a mapping of option: value, e.g. {{hflip: true}}")
    augment = dict(values.pop("augment", None) or {"hflip": True})
    augment.update(overrides.pop("augment", None) or {})
    model_args = dict(values.pop("model_args", None) or {})
    model_args.update(overrides.pop("model_args", None) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["augment"] = augment
    values["model_args"] = model_args
    if isinstance(values.get("betas"), list):
        values["betas"] = tuple(values["betas"])
    if isinstance(values.get("time_budget"), str):  # recipes may write 30m, as the flag does
        values["time_budget"] = parse_duration(values["time_budget"])
    values["recipe"] = recipe
    return config_class(**values).validate()
