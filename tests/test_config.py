"""One source for every training setting: TrainConfig's fields (and AugmentConfig's, for augment's
keys) give `vitkit train`'s flags, their help, types and choices, the recipe keys and validate()'s checks.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from vitkit.cli.main import (
    TRAIN_COMMAND_FLAGS,
    Parser,
    UsageError,
    add_train_flags,
    build_parser,
    main,
    setting_flags,
    setting_overrides,
)
from vitkit.data import AugmentConfig
from vitkit.train.config import SECTIONS, TrainConfig, read_recipe, resolve_config, setting


def train_parser(config_class: type | None = None) -> Parser:
    parser = Parser(prog="vitkit train")
    add_train_flags(parser, config_class)
    return parser


def options(parser: Parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def overrides(argv: str, config_class: type = TrainConfig) -> dict:
    return setting_overrides(train_parser(config_class).parse_args(argv.split()), config_class)


def test_every_field_has_a_flag_and_every_flag_a_field():
    flags = setting_flags(TrainConfig)
    paths = {flag.path for flag in flags}
    nested = {("augment", item.name) for item in dataclasses.fields(AugmentConfig)}
    fields = {(item.name,) for item in dataclasses.fields(TrainConfig) if item.name != "augment"}
    assert paths == fields | nested
    assert len({flag.option for flag in flags}) == len(flags)  # no two settings share a flag
    assert options(train_parser()) == {flag.option for flag in flags} | set(TRAIN_COMMAND_FLAGS) | {"-h", "--help"}
    # Through the real command line too: `vitkit train` gets its flags when it is parsed.
    args = build_parser().parse_args(["train", "--lr", "0.5", "--mixup", "0.2"])
    assert setting_overrides(args, TrainConfig) == {"lr": 0.5, "augment": {"mixup_alpha": 0.2}}


# Every flag `vitkit train` took before its flags were derived from TrainConfig, and the settings the
# old hand-written mapping made of them (recorded from that code, not computed by this one).
BASELINE_ARGV = (
    "--recipe cifar10-quick --data d --download --model S/16 --img-size 64 --patch-size 8 --depth 3 "
    "--model-arg stem=shifted --model-arg patch_drop_rate=0.5 --epochs 3 --max-steps 7 --batch-size 16 --lr 2e-3 "
    "--weight-decay 0.1 --optimizer sgd --warmup-epochs 0.5 --schedule linear --label-smoothing 0.1 "
    "--drop-path-rate 0.1 --drop-rate 0.2 --grad-clip 1.5 --accumulate 2 --ema 0.99 --ema-horizon 0.05 "
    "--on-nonfinite skip --swa --mixup 0.8 --cutmix 1.0 --mix-start 0.5 --auto-augment none "
    "--auto-augment-start 0.3 --tta-flip --val-fraction 0.2 --val-every 2 --skip-bad-images --init w.safetensors "
    "--teacher t --distill-weight 0.4 --distill-cache --resample-patch --layer-decay 0.75 --freeze backbone "
    "--trust-checkpoint --resume r --seed 3 --deterministic --compile --accelerator cpu --devices 2 --strategy ddp "
    "--num-nodes 2 --precision bf16-mixed --num-workers 2 --time-budget 30m --out o --overwrite --no-progress "
    "--tensorboard"
)
BASELINE_OVERRIDES = {
    "accelerator": "cpu", "accumulate": 2, "augment": {"auto_augment": None, "cutmix_alpha": 1.0, "mixup_alpha": 0.8},
    "auto_augment_start": 0.3, "batch_size": 16, "compile": True, "data": "d", "depth": 3, "deterministic": True,
    "devices": "2", "distill_cache": True, "distill_weight": 0.4, "download": True, "drop_path_rate": 0.1,
    "drop_rate": 0.2, "ema": 0.99, "ema_horizon": 0.05, "epochs": 3, "freeze": "backbone", "grad_clip": 1.5,
    "img_size": 64, "init": "w.safetensors", "label_smoothing": 0.1, "layer_decay": 0.75, "lr": 0.002, "max_steps": 7,
    "mix_start": 0.5, "model": "S/16", "model_args": {"patch_drop_rate": 0.5, "stem": "shifted"}, "nonfinite": "skip",
    "num_nodes": 2, "num_workers": 2, "optimizer": "sgd", "out": "o", "overwrite": True, "patch_size": 8,
    "precision": "bf16-mixed", "progress": False, "resample_patch": True, "schedule": "linear", "seed": 3,
    "skip_bad_images": True, "strategy": "ddp", "swa": True, "teacher": "t", "tensorboard": True,
    "time_budget": 1800.0, "trust_checkpoint": True, "tta_flip": True, "val_every": 2, "val_fraction": 0.2,
    "warmup_epochs": 0.5, "weight_decay": 0.1,
}


def test_every_baseline_flag_parses_to_the_settings_it_gave_before():
    args = train_parser().parse_args(BASELINE_ARGV.split())
    assert args.resume == "r"
    given = setting_overrides(args, TrainConfig)
    assert given.pop("recipe") == "cifar10-quick"
    assert given == BASELINE_OVERRIDES
    assert overrides("") == {}  # no flag, no override: the recipe's values stand
    assert overrides("--auto-augment trivial --no-hflip") == {"augment": {"auto_augment": "trivial", "hflip": False}}
    assert overrides("--betas 0.9 0.95 --rrc-scale 0.35 1") == {"betas": (0.9, 0.95),
                                                                "augment": {"rrc_scale": (0.35, 1.0)}}


def test_a_new_field_becomes_a_flag_a_recipe_key_and_a_check(tmp_path):
    """Adding a setting is one edit: a field with its metadata."""
    extended = dataclasses.make_dataclass(
        "Extended", [("warmup_lr", float, setting(0.0, "optimisation", "lr at the start of warmup",
                                                  kind="non_negative_float"))], bases=(TrainConfig,))
    parser = train_parser(extended)
    assert "--warmup-lr" in options(parser)
    assert "lr at the start of warmup" in parser.format_help().split("optimisation settings:")[1]
    cfg = resolve_config(None, config_class=extended, **overrides("--warmup-lr 1e-5 --lr 0.1", extended))
    assert (cfg.warmup_lr, cfg.lr) == (1e-5, 0.1)
    with pytest.raises(UsageError, match=r"--warmup-lr.*-1\.0 must be >= 0"):
        parser.parse_args(["--warmup-lr", "-1"])

    recipe = tmp_path / "warm.yaml"
    recipe.write_text("warmup_lr: 2.0e-5\nepochs: 4\n")
    assert read_recipe(str(recipe), extended) == {"warmup_lr": 2e-5, "epochs": 4}
    assert resolve_config(str(recipe), config_class=extended).warmup_lr == 2e-5
    with pytest.raises(ValueError, match="unknown key 'warmup_lr'"):  # TrainConfig itself has no such key
        read_recipe(str(recipe))
    recipe.write_text("warmup_lr: -1\n")
    with pytest.raises(ValueError, match=r"warmup_lr=-1: must be >= 0 \(lr at the start of warmup\)"):
        resolve_config(str(recipe), config_class=extended)


def test_choices_come_from_one_place():
    """A field's choices are its flag's and validate()'s."""
    parser = train_parser()
    by_dest = {action.dest: action for action in parser._actions}
    with_choices = [item for item in dataclasses.fields(TrainConfig) if "choices" in item.metadata]
    assert {item.name for item in with_choices} >= {"optimizer", "schedule", "freeze", "normalization", "nonfinite",
                                                    "precision", "accelerator"}
    for item in with_choices:
        assert by_dest[item.name].choices == list(item.metadata["choices"])
        message = f"{item.name}='bogus': must be one of {list(item.metadata['choices'])}"
        with pytest.raises(ValueError, match=re.escape(message)):
            resolve_config(None, **{item.name: "bogus"})
    assert by_dest["augment.auto_augment"].choices == ["none", "trivial", "randaugment"]
    with pytest.raises(ValueError, match=r"augment: auto_augment='rand': must be one of"):
        resolve_config(None, augment={"auto_augment": "rand"})


def test_recipe_values_pass_the_checks_flags_do(tmp_path):
    recipe = tmp_path / "bad.yaml"
    for text, words in [
        ("epochs: 0\n", "epochs=0: must be positive"),
        ("epochs: ten\n", "epochs='ten': must be a whole number"),
        ("lr: -0.1\n", "lr=-0.1: must be positive"),
        ("drop_path_rate: 1.5\n", "drop_path_rate=1.5: must be in [0, 1)"),
        ("swa: maybe\n", "swa='maybe': must be true or false"),
        ("betas: [0.9]\n", "must be 2 values (Adam's betas)"),
        ("augment: {mix_prob: 2}\n", "augment: mix_prob=2: must be a probability in [0, 1]"),
        ("augment: {randaugment_m: 40}\n", "randaugment_m=40"),
        ("augment: {mixup: 0.8}\n", "unknown option 'mixup'; did you mean mixup_alpha"),
        ("augment: [hflip]\n", "augment=['hflip']: must be a mapping"),
        ("batch_sise: 2\n", "unknown key 'batch_sise'; did you mean batch_size"),
    ]:
        recipe.write_text(text)
        with pytest.raises(ValueError) as caught:
            resolve_config(str(recipe))
        assert words in str(caught.value), (text, str(caught.value))


def test_train_help_groups_flags_by_section(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    positions = [text.index(f"\n{section} settings:\n") for section in SECTIONS]
    assert positions == sorted(positions)
    group = dict(zip(SECTIONS, text.split(" settings:\n")[1:], strict=True))
    for section, flag in [("data", "--val-every"), ("model", "--model-arg"), ("fine-tuning", "--init"),
                          ("distillation", "--teacher"), ("optimisation", "--on-nonfinite"),
                          ("augmentation", "--mixup"), ("augmentation", "--auto-augment"), ("run", "--resume")]:
        assert f"  {flag} " in group[section], (section, flag)
    assert "CPUs with fast bf16" in group["run"]
    for chip in ("Zen", "EPYC", "Xeon", "AMX"):
        assert chip not in text


def test_unknown_flag_names_the_nearest(capsys):
    assert main(["train", "--learning-rate", "0.1", "--mixupp", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--learning-rate" in err and "did you mean" in err


SAVED_BEFORE = """\
data: cifar10
download: false
val_fraction: 0.1
split_seed: 0
val_every: 1
skip_bad_images: false
normalization: cifar10
num_workers: 0
model: cifar-mini
img_size: null
patch_size: null
depth: null
drop_rate: 0.0
drop_path_rate: 0.0
global_pool: null
patch_drop_end: null
patch_drop_until: null
resize_start: null
resize_until: 0.75
model_args: {stem: conv, stem_depth: 3, patch_drop_rate: 0.75}
init: null
resample_patch: false
trust_checkpoint: false
freeze: none
layer_decay: null
teacher: null
distill_weight: 0.5
distill_cache: false
epochs: 10
max_steps: null
batch_size: 128
optimizer: muon
lr: 0.002
min_lr_ratio: 0.0
weight_decay: 0.05
betas: [0.9, 0.999]
warmup_epochs: 0.3
schedule: cosine
label_smoothing: 0.1
grad_clip: null
accumulate: 1
ema: null
ema_horizon: null
nonfinite: stop
swa: false
augment: {crop_padding: 4, hflip: true, mixup_alpha: 0.8}
mix_start: 0.5
auto_augment_start: 0.0
tta_flip: false
seed: 0
deterministic: false
compile: false
accelerator: auto
devices: auto
num_nodes: 1
strategy: auto
precision: auto
time_budget: 1800.0
out: runs/hybrid
overwrite: false
progress: true
tensorboard: false
recipe: cifar10-hybrid-30m
"""


def test_a_run_saved_before_resolves_as_its_base():
    """A run directory's settings as the code before this one saved them: --resume rebuilds the same
    config from them, flags on top."""
    saved = yaml.safe_load(SAVED_BEFORE)
    base = {k: v for k, v in saved.items() if k != "recipe"}
    cfg = resolve_config(None, base=base, **overrides("--epochs 12 --cutmix 1.0"))
    assert cfg.to_dict() | {"recipe": "cifar10-hybrid-30m"} == saved | {
        "epochs": 12, "augment": {"crop_padding": 4, "hflip": True, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}}
