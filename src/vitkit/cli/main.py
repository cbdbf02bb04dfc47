"""The `vitkit` command. The only module that knows every other one.

A user's mistake (a missing file, a bad value, mismatched classes) ends with one line on stderr
and exit code 2; tracebacks appear only with --debug. An interrupted training run exits 143
(SIGTERM) or 130 (SIGINT) after writing a checkpoint it can resume from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vitkit.allocator import keep_freed_memory

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
)


class UsageError(Exception):
    """A mistake in the command line itself (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors instead of usage dumps."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---- argument types: checked at parse time, named in the error -------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def fraction(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{value} must be below 1")
    return value


def duration(text: str) -> float:
    from vitkit.train.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def model_arg(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as YAML reads a recipe's model_args (0.5, true, shifted)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. stem=shifted)")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        with contextlib.suppress(ValueError):
            parsed = float(parsed)  # YAML 1.1 reads 1e-12 as text
    return key.strip(), parsed


# ---- the parser ---------------------------------------------------------------------------

def add_model_args(parser: argparse.ArgumentParser) -> None:
    """train's and bench's model options beyond their own flags: one generic flag, not one per option."""
    parser.add_argument("--model-arg", action="append", default=[], type=model_arg, metavar="KEY=VALUE",
                        help="a model option as a recipe's model_args takes it (stem=shifted, patch_drop_rate=0.5); "
                             "repeat for more")


def add_test_time_views(parser: argparse.ArgumentParser) -> None:
    """eval's and predict's test-time augmentation: the same views, averaged the same way."""
    parser.add_argument("--tta-flip", action="store_true", help="average each image's and its mirror's predictions")
    parser.add_argument("--tta-shift", type=positive_int, default=0, metavar="PIXELS",
                        help="also average over the image moved by PIXELS along each axis (9 views; 2 suits 32x32 "
                             "CIFAR models trained with padded crops)")


def build_parser() -> Parser:
    parser = Parser(prog="vitkit", description="Vision Transformers: train, fine-tune, evaluate, inspect, export.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train from scratch, or fine-tune with --init")
    t.add_argument("--recipe", help="shipped recipe name (see `vitkit recipes`) or a YAML file")
    t.add_argument("--data", help="image folder, extracted CIFAR dir, or cifar10/cifar100 (with --download)")
    t.add_argument("--download", action="store_true", default=None, help="download cifar10/cifar100 if missing")
    t.add_argument("--model", help="variant: S/16, B/16@384, vit_tiny_patch16_224, cifar-tiny ...")
    t.add_argument("--img-size", type=positive_int)
    t.add_argument("--patch-size", type=positive_int)
    t.add_argument("--depth", type=positive_int)
    add_model_args(t)
    t.add_argument("--epochs", type=positive_int)
    t.add_argument("--max-steps", type=positive_int)
    t.add_argument("--batch-size", type=positive_int)
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--weight-decay", type=non_negative_float)
    t.add_argument("--optimizer", choices=["adamw", "muon", "adam", "sgd"])
    t.add_argument("--warmup-epochs", type=non_negative_float)
    t.add_argument("--schedule", choices=["cosine", "linear", "constant"], help="lr after warmup (default cosine)")
    t.add_argument("--label-smoothing", type=fraction)
    t.add_argument("--drop-path-rate", type=fraction)
    t.add_argument("--drop-rate", type=fraction)
    t.add_argument("--grad-clip", type=positive_float)
    t.add_argument("--accumulate", type=positive_int, help="gradient accumulation steps")
    t.add_argument("--ema", type=fraction, help="EMA decay, e.g. 0.999 (the EMA weights are evaluated and saved)")
    t.add_argument("--ema-horizon", type=fraction,
                   help="EMA sized to the run: its time constant as a fraction of the run's steps, e.g. 0.05")
    t.add_argument("--on-nonfinite", dest="nonfinite", choices=["stop", "skip"],
                   help="a NaN/inf loss stops the run (default) or skips that step")
    t.add_argument("--swa", action="store_true", default=None)
    t.add_argument("--mixup", type=non_negative_float, dest="mixup_alpha", help="mixup alpha")
    t.add_argument("--cutmix", type=non_negative_float, dest="cutmix_alpha", help="cutmix alpha")
    t.add_argument("--mix-start", type=fraction, help="mixup/cutmix from this fraction of the run's steps on")
    t.add_argument("--auto-augment", choices=["none", "trivial", "randaugment"])
    t.add_argument("--auto-augment-start", type=fraction,
                   help="TrivialAugment/RandAugment from this fraction of the run's steps on")
    t.add_argument("--tta-flip", action="store_true", default=None, help="evaluate with horizontal-flip averaging")
    t.add_argument("--val-fraction", type=fraction)
    t.add_argument("--val-every", type=positive_int, metavar="EPOCHS",
                   help="validate every EPOCHS epochs (and the first and last): more of a time budget trains")
    t.add_argument("--skip-bad-images", action="store_true", default=None)
    t.add_argument("--init", help="pretrained weights to fine-tune from (timm, Hugging Face, .npz, vitkit)")
    t.add_argument("--teacher", help="distil from this trained classifier (run dir, .ckpt or .safetensors), "
                   "which sees the same augmented batches")
    t.add_argument("--distill-weight", type=positive_float, help="the teacher's share of the loss (default 0.5)")
    t.add_argument("--distill-cache", action="store_true", default=None,
                   help="ask the teacher once, before training, for every image on a grid of crops and flips, "
                   "instead of a forward pass every step")
    t.add_argument("--resample-patch", action="store_true", default=None,
                   help="allow --init weights of another patch size (kernel resampled)")
    t.add_argument("--layer-decay", type=positive_float, help="layer-wise lr decay, e.g. 0.75")
    t.add_argument("--freeze", choices=["none", "backbone"], help="backbone: linear probe")
    t.add_argument("--trust-checkpoint", action="store_true", default=None,
                   help="allow pickled code in --init files (unsafe); --resume reads vitkit's own checkpoints, "
                        "which need none")
    t.add_argument("--resume", help="run directory or checkpoint to continue")
    t.add_argument("--seed", type=int)
    t.add_argument("--deterministic", action="store_true", default=None)
    t.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    t.add_argument("--accelerator", choices=["auto", "cpu", "gpu", "cuda", "mps"])
    t.add_argument("--devices", help="number of devices (or 'auto')")
    t.add_argument("--strategy", help="auto, ddp, ddp_spawn, fsdp ...")
    t.add_argument("--num-nodes", type=positive_int, help="machines in a multi-node run (torchrun or SLURM)")
    t.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed, or auto: bf16-mixed where this machine "
                   "multiplies bf16 faster than fp32 (CUDA, Zen 4 EPYCs), else 32-true")
    t.add_argument("--num-workers", type=int)
    t.add_argument("--time-budget", type=duration, help="wall-clock budget such as 30m: the schedule fits it")
    t.add_argument("--out", help="run directory (default runs/latest)")
    t.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run directory")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    t.add_argument("--tensorboard", action="store_true", default=None)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy, loss, per-class accuracy and confusion matrix")
    e.add_argument("--checkpoint", required=True, help="run directory, .ckpt or .safetensors")
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=["val", "test", "all"], default="val",
                   help="val: the run's held-out split (default); test: the folder's test/; all: every training image, "
                        "none held out")
    e.add_argument("--batch-size", type=positive_int, default=256)
    add_test_time_views(e)
    e.add_argument("--json", action="store_true")
    e.add_argument("--trust-checkpoint", action="store_true")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify images or folders of images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--top-k", type=positive_int, default=5)
    add_test_time_views(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(func=cmd_predict)

    m = sub.add_parser("models", help="the variant table")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("recipes", help="the shipped training recipes")
    r.set_defaults(func=cmd_recipes)

    i = sub.add_parser("info", help="what a checkpoint or weights file holds")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--trust-checkpoint", action="store_true")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert weights: vitkit, timm, hf (Hugging Face) or onnx")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=["vitkit", "timm", "hf", "onnx"])
    c.add_argument("--trust-checkpoint", action="store_true")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND", parser_class=Parser)
    di = dsub.add_parser("inspect", help="classes, counts, sizes, modes and unreadable files of a folder")
    di.add_argument("path")
    di.add_argument("--json", action="store_true")
    di.set_defaults(func=cmd_data_inspect)

    b = sub.add_parser("bench", help="training/inference throughput (or `bench data` for the input pipeline)")
    b.add_argument("target", nargs="?", choices=["model", "data"], default="model")
    b.add_argument("--model", default="cifar-tiny")
    add_model_args(b)
    b.add_argument("--batch-size", type=positive_int, help="default 128 for a model, 256 for `bench data`")
    b.add_argument("--against", choices=["timm"], help="time timm's identical model in the same run")
    b.add_argument("--rounds", type=positive_int, default=5)
    b.add_argument("--steps", type=positive_int, default=5, help="steps per round")
    b.add_argument("--compile", action="store_true")
    b.add_argument("--precision", choices=["32-true", "bf16-mixed"],
                   help="default bf16-mixed on CUDA, 32-true on the CPU (where bf16 pays only on some CPUs)")
    b.add_argument("--data", help="for `bench data`: CIFAR-style folder (default: random images)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    a = sub.add_parser("attention", help="attention rollout and class-token attention overlays")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("images", nargs="+", metavar="IMAGE")
    a.add_argument("-o", "--out", required=True)
    a.add_argument("--trust-checkpoint", action="store_true")
    a.set_defaults(func=cmd_attention)

    n = sub.add_parser("inspect", help="the paper's Figure 7 for a checkpoint")
    n.add_argument("checkpoint")
    n.add_argument("-o", "--out", required=True)
    n.add_argument("--data", help="images for the attention distances (default: random noise images)")
    n.add_argument("--trust-checkpoint", action="store_true")
    n.set_defaults(func=cmd_inspect)

    rp = sub.add_parser("report", help="curves, confusion matrix and predictions of a run, as PNGs and HTML")
    rp.add_argument("run_dir")
    rp.add_argument("-o", "--out")
    rp.set_defaults(func=cmd_report)
    return parser


def _version() -> str:
    from vitkit import __version__

    return f"vitkit {__version__}"


# ---- commands -----------------------------------------------------------------------------

TRAIN_FLAGS = [
    "data", "download", "model", "img_size", "patch_size", "depth", "epochs", "max_steps", "batch_size", "lr",
    "weight_decay", "optimizer", "warmup_epochs", "schedule", "label_smoothing", "drop_path_rate", "drop_rate",
    "grad_clip", "accumulate", "ema", "ema_horizon", "mix_start", "auto_augment_start", "nonfinite", "swa",
    "tta_flip", "val_fraction", "val_every", "skip_bad_images", "init", "resample_patch", "teacher", "distill_weight",
    "distill_cache", "layer_decay", "freeze", "trust_checkpoint", "seed", "deterministic", "compile", "accelerator",
    "devices", "num_nodes", "strategy", "precision", "num_workers", "time_budget", "out", "overwrite", "progress",
    "tensorboard",
]


def cmd_train(args: argparse.Namespace) -> int:
    from vitkit.train import TrainingInterrupted, resolve_config, resume_checkpoint, saved_train_config, train

    start = time.monotonic()
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    augment = {k: getattr(args, k) for k in ("mixup_alpha", "cutmix_alpha") if getattr(args, k) is not None}
    if args.auto_augment is not None:
        augment["auto_augment"] = None if args.auto_augment == "none" else args.auto_augment
    if augment:
        overrides["augment"] = augment
    if args.model_arg:
        overrides["model_args"] = dict(args.model_arg)
    if args.resume:
        checkpoint = resume_checkpoint(args.resume)
        saved = saved_train_config(checkpoint)
        overrides.setdefault("out", str(checkpoint.parent))
        cfg = resolve_config(None, base={k: v for k, v in saved.items() if k != "recipe"}, **overrides)
    else:
        cfg = resolve_config(args.recipe, **overrides)
    try:
        result = train(cfg, resume=args.resume, start_time=start)
    except TrainingInterrupted as stop:
        print(f"vitkit train: {stop}", file=sys.stderr)
        return stop.exit_code
    acc = f"{result.best_val_acc:.4f}" if result.best_val_acc is not None else "n/a"
    print(f"best val_acc {acc} after {result.epochs_done} epoch(s), {result.steps_done} steps, "
          f"{result.seconds / 60:.1f} min; run directory {result.run_dir} (best: {result.best_checkpoint.name})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vitkit.data import load_splits
    from vitkit.inference import evaluate, load

    classifier = load(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    train_cfg = classifier.train_config
    # The model's size, as in training: small images stay as stored, and the decoded cache is shared.
    splits = load_splits(args.data, image_size=classifier.config.img_size,
                         val_fraction=0.0 if args.split == "all" else train_cfg.get("val_fraction", 0.1),
                         seed=train_cfg.get("split_seed", 0))
    if args.split == "val":
        images = splits.val
    elif args.split == "test":
        if splits.test is None:
            raise ValueError(f"{args.data} has no test split (a test/ folder); use --split val or all")
        images = splits.test
    else:
        images = splits.train
    if len(images) == 0:
        raise ValueError(f"the {args.split} split of {args.data} is empty; try --split all")
    result = evaluate(classifier, images, batch_size=args.batch_size, tta_flip=args.tta_flip, tta_shift=args.tta_shift)
    result["split"], result["tta_flip"], result["tta_shift"] = args.split, args.tta_flip, args.tta_shift
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.split}: {result['images']} images  top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
          f"loss {result['loss']:.4f}")
    for name, acc in result["per_class"].items():
        if acc is not None:
            print(f"  {name:<20} {acc:.4f}")
    return 0


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _expand_images(items: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    from vitkit.inference import load

    classifier = load(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    paths = _expand_images(args.images)
    predictions = classifier.predict([str(p) for p in paths], top_k=args.top_k, tta_flip=args.tta_flip,
                                     tta_shift=args.tta_shift)
    if args.json:
        print(json.dumps([{"path": str(p), "label": r.label, "probability": r.probability,
                           "top_k": [{"label": c, "probability": q} for c, q in r.top_k]}
                          for p, r in zip(paths, predictions)]))
        return 0
    for path, result in zip(paths, predictions):
        others = ", ".join(f"{c} {q:.3f}" for c, q in result.top_k[1:])
        print(f"{path}: {result.label} ({result.probability:.3f})" + (f"  [{others}]" if others else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from vitkit.model import count_parameters, get_config, list_models

    rows = []
    for name in list_models():
        cfg = get_config(name)
        rows.append({"name": name, "img_size": cfg.img_size, "patch_size": cfg.patch_size,
                     "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                     "tokens": cfg.num_patches + cfg.num_prefix_tokens,
                     "params_m": round(count_parameters(name) / 1e6, 2)})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<24}{'img':>5}{'patch':>6}{'width':>6}{'depth':>6}{'heads':>6}{'tokens':>7}{'params':>10}")
    for r in rows:
        print(f"{r['name']:<24}{r['img_size']:>5}{r['patch_size']:>6}{r['embed_dim']:>6}{r['depth']:>6}"
              f"{r['num_heads']:>6}{r['tokens']:>7}{r['params_m']:>9.2f}M")
    print("Any size/patch/resolution combination also works: Ti|S|M|B|L|H/<patch>[@<img_size>].")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from importlib import resources

    from vitkit.train.config import recipe_names

    for name in recipe_names():
        text = (resources.files("vitkit") / "recipes" / f"{name}.yaml").read_text()
        summary = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        print(f"{name:<24}{summary}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from vitkit.inference import load
    from vitkit.model import count_parameters

    classifier = load(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    cfg = classifier.config
    info = {"source": args.checkpoint, "config": cfg.to_dict(), "parameters": count_parameters(cfg),
            "classes": classifier.classes, "mean": classifier.mean, "std": classifier.std}
    if classifier.train_config:
        info["train"] = {k: classifier.train_config.get(k) for k in ("recipe", "data", "epochs", "lr", "batch_size")}
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"{args.checkpoint}: {cfg.name or 'ViT'}  {cfg.img_size}px  patch {cfg.patch_size}  width {cfg.embed_dim}  "
          f"depth {cfg.depth}  heads {cfg.num_heads}  {info['parameters'] / 1e6:.2f}M parameters")
    print(f"classes ({len(classifier.classes)}): {', '.join(classifier.classes[:20])}"
          + (" ..." if len(classifier.classes) > 20 else ""))
    if "train" in info:
        print("trained with: " + ", ".join(f"{k}={v}" for k, v in info["train"].items()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vitkit.inference import load
    from vitkit.weights import export

    classifier = load(args.src, trust_checkpoint=args.trust_checkpoint)
    out = export(classifier.model, args.dst, args.to, classes=classifier.classes, mean=classifier.mean,
                 std=classifier.std)
    print(f"wrote {out} ({args.to})")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from vitkit.data import format_inspection, inspect_folder

    report = inspect_folder(args.path)
    print(json.dumps(report) if args.json else format_inspection(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vitkit import bench

    if args.target == "data":
        result = bench.bench_data(args.data, batch_size=args.batch_size or 256)
        print(json.dumps(result) if args.json else bench.format_result(result))
        return 0
    result = bench.bench_model(args.model, batch_size=args.batch_size or 128, against=args.against, rounds=args.rounds,
                               steps=args.steps, compile=args.compile, precision=args.precision,
                               **dict(args.model_arg))
    print(json.dumps(result) if args.json else bench.format_result(result))
    return 0


def _checkpoint_images(classifier: Any, paths: list[Path]) -> tuple[Any, list]:
    import numpy as np
    import torch

    tensors = [classifier.to_tensor(str(p)) for p in paths]
    originals = [np.ascontiguousarray(t.permute(1, 2, 0).numpy()) for t in tensors]
    return classifier.preprocess(torch.stack(tensors)), originals


def cmd_attention(args: argparse.Namespace) -> int:
    from vitkit.inference import load
    from vitkit.viz.attention import save_attention_figures

    classifier = load(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    paths = _expand_images(args.images)
    batch, originals = _checkpoint_images(classifier, paths)
    written = save_attention_figures(classifier.model, batch, originals, [p.stem for p in paths],
                                     classifier.classes, args.out)
    for path in written:
        print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from vitkit.inference import load
    from vitkit.viz.figure7 import save_figure7

    classifier = load(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    if args.data:
        paths = _expand_images([args.data])
        paths = paths[:: max(1, len(paths) // 64)][:64]  # spread over the folder, so over its classes
        batch, _ = _checkpoint_images(classifier, paths)
    else:
        size = classifier.config.img_size
        batch = classifier.preprocess(torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8))
    for path in save_figure7(classifier.model, batch, args.out):
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vitkit.viz.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.csv)")
    print(write_report(run_dir, args.out))
    return 0


# ---- entry point --------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _configure_logging(debug)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        func: Callable[[argparse.Namespace], int] = args.func
        keep_freed_memory()
        return func(args)
    except UsageError as error:
        print(str(error), file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped reading (`vitkit eval ... | head -1`): nothing went wrong here
        with contextlib.suppress(OSError, ValueError):  # and Python's exit flush must not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"vitkit: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitkit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure that is not the user's: short by default, full with --debug
        if debug:
            raise
        print(f"vitkit: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a message comes, not as it was when main() first ran: main()
    called again in the same process after sys.stderr was swapped (tests, notebooks) must not write
    to a stale, possibly closed stream."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(debug: bool) -> None:
    """vitkit's own messages at INFO; Lightning's start-up chatter only with --debug."""
    logger = logging.getLogger("vitkit")  # vitkit.data, vitkit.weights ... propagate here
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    # Importing lightning.pytorch resets that logger to INFO, so the loggers its start-up chatter
    # ("GPU available", tips) comes from are quietened by their own names, which it leaves alone.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)
    if not debug:
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
