"""The `vitkit` command. The only module that knows every other one.

A user's mistake (a missing file, a bad value, mismatched classes) ends with one line on stderr
and exit code 2; tracebacks appear only with --debug. An interrupted training run exits 143
(SIGTERM) or 130 (SIGINT) after writing a checkpoint it can resume from.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from vitkit.allocator import keep_freed_memory
from vitkit.settings import KINDS, Kind, kind_of, nearest, value_type

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
)


class UsageError(Exception):
    """A mistake in the command line itself (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors instead of usage dumps, and unknown flags named with the nearest
    valid ones. ``populate`` adds a subcommand's flags when it is first parsed: `vitkit train`'s come
    from TrainConfig, whose module loads the training code, which the other commands do without."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            flags = [option for action in self._actions for option in action.option_strings]
            unknown = next((word for word in extras if word.startswith("-")), extras[0])
            self.error(f"unrecognized arguments: {' '.join(extras)}{nearest(unknown.split('=')[0], flags)}")
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---- argument types: checked at parse time, named in the error -------------------------------

def flag_type(kind: Kind | str) -> Callable[[str], Any]:
    """argparse's type for a value kind of vitkit.settings (or its name in KINDS): the kind's message
    becomes argparse's one line."""
    parse = (KINDS[kind] if isinstance(kind, str) else kind).parse

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return read


positive_int = flag_type("positive_int")
model_arg = flag_type("mapping")  # KEY=VALUE -> (key, value), the value read as YAML reads a recipe's


# ---- train's flags: one per TrainConfig field ----------------------------------------------

# `vitkit train`'s flags that are no setting (which run to continue, not how to train), with their help.
TRAIN_COMMAND_FLAGS = {"--resume": "run directory or checkpoint to continue: its saved settings, then the flags"}


@dataclass(frozen=True)
class SettingFlag:
    """The flag of one setting: ``path`` is where its value goes, ("lr",) or ("augment", "mixup_alpha")."""

    path: tuple[str, ...]
    option: str
    section: str
    kwargs: dict[str, Any]  # add_argument's

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def setting_flags(config_class: type, section: str | None = None, prefix: tuple[str, ...] = ()) -> list[SettingFlag]:
    """The flags of a settings dataclass's fields, from their metadata (vitkit.settings) and annotations.
    Every default is None, so that a flag not given leaves the recipe's value (resolve_config)."""
    hints = typing.get_type_hints(config_class)
    flags = []
    for item in dataclasses.fields(config_class):
        meta = item.metadata
        own_section = meta.get("section", section)
        if meta.get("nested") is not None:
            flags += setting_flags(meta["nested"], own_section, (*prefix, item.name))
            continue
        path = (*prefix, item.name)
        base, length = value_type(hints[item.name])
        about = meta.get("help", "")
        name = meta.get("flag") or item.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": ".".join(path), "default": None}
        if base is bool:
            on_by_default = item.default is True
            if on_by_default:
                name, about = meta.get("flag") or f"no-{name}", f"turn off: {about}"
            kwargs["action"] = "store_false" if on_by_default else "store_true"
        else:
            choices = meta.get("choices")
            if choices is not None:
                kwargs["choices"] = ["none" if choice is None else choice for choice in choices]
            else:
                kwargs["type"] = flag_type(kind_of(item, hints[item.name]))
                kwargs["metavar"] = meta.get("metavar", item.name.upper())
            if base is dict:  # KEY=VALUE, repeated
                kwargs["action"] = "append"
            if length is not None:
                kwargs["nargs"] = length
            if item.default not in (None, dataclasses.MISSING):
                about += f" (default {_shown(item.default)})"
        kwargs["help"] = about.replace("%", "%%")
        flags.append(SettingFlag(path, f"--{name}", own_section or "", kwargs))
    return flags


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_setting_flags(parser: argparse.ArgumentParser, config_class: type,
                      sections: Sequence[str]) -> dict[str, argparse._ArgumentGroup]:
    """One flag per setting, in one argument group per section (in --help); the groups by section."""
    groups = {section: parser.add_argument_group(f"{section} settings") for section in sections}
    for flag in setting_flags(config_class):
        groups[flag.section].add_argument(flag.option, **flag.kwargs)
    return groups


def setting_overrides(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The settings the flags gave, as resolve_config takes them: nested ones (augment) and repeated
    KEY=VALUE flags (model_args) as mappings, "none" as None."""
    overrides: dict[str, Any] = {}
    for flag in setting_flags(config_class):
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if flag.kwargs.get("action") == "append":
            value = dict(value)
        elif flag.kwargs.get("nargs"):
            value = tuple(value)
        elif value == "none" and "none" in flag.kwargs.get("choices", ()):
            value = None
        target = overrides
        for key in flag.path[:-1]:
            target = target.setdefault(key, {})
        target[flag.path[-1]] = value
    return overrides


def add_train_flags(parser: argparse.ArgumentParser, config_class: type | None = None) -> None:
    """`vitkit train`'s flags: one per field of TrainConfig (or of config_class, a dataclass like it)."""
    from vitkit.train.config import SECTIONS, TrainConfig

    groups = add_setting_flags(parser, config_class or TrainConfig, SECTIONS)
    for option, about in TRAIN_COMMAND_FLAGS.items():
        groups["run"].add_argument(option, help=about)
    parser.set_defaults(func=cmd_train, config_class=config_class)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """bench's model options beyond its own flags: one generic flag, not one per option (as train's)."""
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

    sub.add_parser("train", help="train from scratch, or fine-tune with --init", populate=add_train_flags,
                   description="Train from scratch, or fine-tune with --init. Each flag sets the recipe key of "
                   "its name (dashes for underscores; augmentation flags set augment's keys): defaults < "
                   "--recipe < flags.")

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

    m = sub.add_parser("models", help="the variant table, or with --pretrained the pretrained names")
    m.add_argument("--pretrained", nargs="?", const="*", metavar="PATTERN",
                   help="list the pretrained weights vitkit loads by name, those matching PATTERN (e.g. 'vit_tiny*')")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    dl = sub.add_parser("download", help="fetch pretrained weights into the Hugging Face cache; prints the folder")
    dl.add_argument("name", help="a pretrained name (vitkit models --pretrained), owner/repo or hf-hub:owner/repo, "
                    "optionally @revision")
    dl.add_argument("--trust-checkpoint", action="store_true", help="allow a repo whose weights are a pickle")
    dl.set_defaults(func=cmd_download)

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

def cmd_train(args: argparse.Namespace) -> int:
    from vitkit.train import TrainingInterrupted, resolve_config, resume_checkpoint, saved_train_config, train
    from vitkit.train.config import TrainConfig

    start = time.monotonic()
    config_class = args.config_class or TrainConfig
    overrides = setting_overrides(args, config_class)
    recipe = overrides.pop("recipe", None)
    if args.resume:
        checkpoint = resume_checkpoint(args.resume)
        saved = saved_train_config(checkpoint)
        overrides.setdefault("out", str(checkpoint.parent))
        cfg = resolve_config(None, base={k: v for k, v in saved.items() if k != "recipe"},
                             config_class=config_class, **overrides)
    else:
        cfg = resolve_config(recipe, config_class=config_class, **overrides)
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
                         seed=train_cfg.get("split_seed", 0), interpolation=classifier.preprocessing.interpolation)
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

    if args.pretrained is not None:
        return _list_pretrained(args.pretrained, args.json)
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
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'name':<{width}}{'img':>5}{'patch':>6}{'width':>6}{'depth':>6}{'heads':>6}{'tokens':>7}{'params':>10}")
    for r in rows:
        print(f"{r['name']:<{width}}{r['img_size']:>5}{r['patch_size']:>6}{r['embed_dim']:>6}{r['depth']:>6}"
              f"{r['num_heads']:>6}{r['tokens']:>7}{r['params_m']:>9.2f}M")
    print("Any size/patch/resolution combination also works: Ti|S|M|B|L|H/<patch>[@<img_size>].")
    return 0


def _list_pretrained(pattern: str, as_json: bool) -> int:
    from vitkit.weights.hub import PRETRAINED, list_pretrained

    rows = list_pretrained(pattern)
    if not rows:
        raise ValueError(f"no pretrained name matches {pattern!r}; {len(PRETRAINED)} are known "
                         "(vitkit models --pretrained lists them)")
    if as_json:
        print(json.dumps(rows))
        return 0
    width, arch = (max(len(r[key]) for r in rows) + 2 for key in ("name", "architecture"))
    print(f"{'name':<{width}}{'arch':<{arch}}{'img':>5}  source")
    for r in rows:
        print(f"{r['name']:<{width}}{r['architecture']:<{arch}}{r['img_size']:>5}  {r['source']}")
    print("Also any timm ViT name, owner/repo or hf-hub:owner/repo on the Hugging Face Hub; `vitkit download NAME` "
          "fetches one for offline use.")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from vitkit.weights.hub import download

    print(download(args.name, trust_checkpoint=args.trust_checkpoint))
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
                 std=classifier.std, interpolation=classifier.preprocessing.interpolation)
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
    """The model's input batch for image files and each image as the model sees it, an (S, S, 3) array."""
    import numpy as np

    tensors = [classifier.to_tensor(str(p)) for p in paths]
    originals = [np.ascontiguousarray(t.permute(1, 2, 0).numpy()) for t in tensors]
    return classifier.inputs(tensors), originals


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
