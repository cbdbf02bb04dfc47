"""The command line answers a user's mistake with exit code 2 and one line naming the value, never a
traceback: a table of bad invocations, each run through `vitkit.cli.main.main` as a user would type it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_color_folder
from vitkit.cli.main import main


@pytest.fixture(scope="module")
def places(tmp_path_factory, trained_run, color_folder) -> dict[str, str]:
    """Paths the bad invocations refer to: a trained run, folders, and files that are not what they claim."""
    root = tmp_path_factory.mktemp("cli")
    other_classes = make_color_folder(root / "other", per_class=4)
    (other_classes / "blue").rename(other_classes / "cyan")  # same count, other names
    text_jpg = root / "notes.jpg"
    text_jpg.write_text("not an image")
    a_file = root / "a_file"
    a_file.write_text("x")
    unknown_key = root / "bad_recipe.yaml"
    unknown_key.write_text("lr: 1e-3\nlearning_rat: 2\n")
    augment_typo = root / "augment_typo.yaml"
    augment_typo.write_text("augment: {mixup: 0.8}\n")
    empty_folder = root / "empty"
    (empty_folder / "cats").mkdir(parents=True)
    run = trained_run.run_dir
    return {"run": str(run), "ckpt": str(run / "best.ckpt"), "data": str(color_folder),
            "other": str(other_classes), "text_jpg": str(text_jpg), "file": str(a_file),
            "recipe": str(unknown_key), "augment_typo": str(augment_typo), "empty": str(empty_folder),
            "out": str(root / "out"), "missing": str(root / "does-not-exist")}


# (id, argv with {placeholders}, words the message must contain)
BAD_INVOCATIONS = [
    ("train-missing-data", "train --data {missing} --out {out}", ["does-not-exist"]),
    ("train-negative-lr", "train --data {data} --lr -0.1", ["--lr", "-0.1 must be positive"]),
    ("train-zero-epochs", "train --data {data} --epochs 0", ["--epochs", "0"]),
    ("train-batch-not-a-number", "train --data {data} --batch-size many", ["--batch-size", "many"]),
    ("train-unknown-model", "train --data {data} --model ViT-Q/16 --out {out}", ["ViT-Q/16"]),
    ("train-unknown-recipe", "train --data {data} --recipe cifar10-quik", ["cifar10-quik", "cifar10-quick"]),
    ("train-recipe-unknown-key", "train --data {data} --recipe {recipe}", ["learning_rat"]),
    ("train-img-size-not-divisible", "train --data {data} --img-size 30 --patch-size 4 --out {out}",
     ["img_size=30", "patch_size=4"]),
    ("train-val-fraction-above-one", "train --data {data} --val-fraction 1.5", ["--val-fraction", "1.5"]),
    ("train-val-every-zero", "train --data {data} --val-every 0", ["--val-every", "0"]),
    ("train-unknown-schedule", "train --data {data} --schedule step", ["--schedule", "step"]),
    ("train-bad-time-budget", "train --data {data} --time-budget soon", ["soon"]),
    ("train-out-under-a-file", "train --data {data} --out {file}/run --epochs 1", ["a_file", "another --out"]),
    ("train-missing-init", "train --data {data} --init {missing}.safetensors --out {out}", ["does-not-exist"]),
    ("train-missing-resume", "train --data {data} --resume {missing}", ["does-not-exist"]),
    ("train-empty-class-folder", "train --data {empty} --out {out}", ["empty"]),
    ("eval-missing-checkpoint", "eval --checkpoint {missing}.ckpt --data {data}", ["does-not-exist"]),
    ("eval-other-classes", "eval --checkpoint {ckpt} --data {other} --split all", ["cyan"]),
    ("eval-shift-not-positive", "eval --checkpoint {ckpt} --data {data} --tta-shift -2", ["--tta-shift", "-2"]),
    ("eval-shift-past-the-image", "eval --checkpoint {ckpt} --data {data} --tta-shift 16", ["16x16", "--tta-shift"]),
    ("predict-missing-image", "predict --checkpoint {ckpt} {missing}.png", ["does-not-exist"]),
    ("predict-not-an-image", "predict --checkpoint {ckpt} {text_jpg}", ["notes.jpg"]),
    ("predict-shift-past-the-image", "predict --checkpoint {ckpt} --tta-shift 16 {data}/red/0000.png",
     ["16x16", "--tta-shift"]),
    ("predict-top-k-zero", "predict --checkpoint {ckpt} --top-k 0 {text_jpg}", ["--top-k"]),
    ("convert-unknown-format", "convert {ckpt} {out}/w.bin --to keras", ["--to", "keras"]),
    ("convert-missing-source", "convert {missing}.pth {out}/w.safetensors --to vitkit", ["does-not-exist"]),
    ("info-missing", "info {missing}.ckpt", ["does-not-exist"]),
    ("data-inspect-missing", "data inspect {missing}", ["does-not-exist"]),
    ("bench-unknown-model", "bench --model cifar-huge --steps 1 --rounds 1", ["cifar-huge"]),
    ("train-model-arg-with-a-flag-of-its-own", "train --data {data} --model-arg depth=3 --out {out}",
     ["'depth'", "setting of its own"]),
    ("bench-model-arg-without-value", "bench --model-arg shifted", ["'shifted'", "KEY=VALUE"]),
    ("bench-unknown-model-arg", "bench --model-arg stemm=shifted --steps 1 --rounds 1", ["stemm"]),
    ("bench-timm-lacks-the-stem", "bench --model-arg stem=shifted --against timm --steps 1 --rounds 1",
     ["stem='shifted'", "without --against timm"]),
    ("attention-missing-image", "attention --checkpoint {ckpt} {missing}.png -o {out}", ["does-not-exist"]),
    ("inspect-missing-checkpoint", "inspect {missing}.ckpt -o {out}", ["does-not-exist"]),
    ("report-not-a-run", "report {data}", ["not a run directory"]),
    ("unknown-command", "fit --data {data}", ["fit"]),
    ("train-unknown-flag", "train --data {data} --lrr 0.1", ["--lrr", "did you mean --lr"]),
    ("train-unknown-precision", "train --data {data} --precision bf16", ["--precision", "bf16", "bf16-mixed"]),
    ("train-mix-prob-above-one", "train --data {data} --mix-prob 2", ["--mix-prob", "2.0 must be a probability"]),
    ("train-betas-one-value", "train --data {data} --betas 0.9", ["--betas", "2 arguments"]),
    ("train-recipe-augment-typo", "train --data {data} --recipe {augment_typo}", ["'mixup'", "mixup_alpha"]),
]


@pytest.mark.parametrize("argv,words", [case[1:] for case in BAD_INVOCATIONS], ids=[c[0] for c in BAD_INVOCATIONS])
def test_bad_invocation_gets_one_line_and_exit_code_2(places, capsys, argv, words):
    code = main(argv.format(**places).split())
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    messages = [line for line in err.strip().splitlines() if line.startswith("vitkit")]
    assert len(messages) == 1, err  # argparse adds a usage line; progress lines may precede
    message = messages[0]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not Path(places["out"], "best.ckpt").exists()


def test_a_reader_that_stops_reading_is_not_an_error(monkeypatch, capsys):
    """`vitkit eval ... | head -1`: the closed pipe ends the command quietly, exit 0."""
    import vitkit.cli.main as cli

    def models_into_a_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_models", models_into_a_closed_pipe)
    assert main(["models"]) == 0
    assert capsys.readouterr().err == ""


def test_train_model_arg_changes_one_of_a_recipes_model_options(monkeypatch, capsys):
    """`--model-arg stem=shifted` on top of cifar10-hybrid-30m keeps the recipe's other model_args,
    as --auto-augment keeps its other augment settings."""
    from types import SimpleNamespace

    import vitkit.train

    seen = {}

    def record(cfg, resume=None, start_time=None):
        seen["cfg"] = cfg
        return SimpleNamespace(best_val_acc=None, epochs_done=0, steps_done=0, seconds=0.0, run_dir="run",
                               best_checkpoint=Path("best.ckpt"))

    monkeypatch.setattr(vitkit.train, "train", record)
    argv = ("train --recipe cifar10-hybrid-30m --data unused --model-arg patch_drop_rate=0.5 --auto-augment trivial "
            "--auto-augment-start 0.3")
    assert main(argv.split()) == 0
    cfg = seen["cfg"]
    assert cfg.model_args == {"stem": "conv", "stem_depth": 2, "patch_drop_rate": 0.5}
    assert cfg.augment["auto_augment"] == "trivial" and cfg.augment["crop_padding"] == 4
    assert cfg.auto_augment_start == 0.3


# Bad invocations of the installed `vitkit` executable, as a shell runs it: no fixture, no test harness
# between the user and the message.
EXECUTABLE_CASES = [
    ("unknown-flag", ["train", "--lrr", "0.1"], "did you mean --lr"),
    ("bad-value-type", ["train", "--epochs", "many"], "'many' is not a whole number"),
    ("unknown-recipe", ["train", "--recipe", "cifar10-quik", "--data", "unused"], "cifar10-quick"),
    ("eval-without-checkpoint", ["eval", "--data", "unused"], "--checkpoint"),
    ("unknown-command", ["fit"], "'fit'"),
]


@pytest.mark.parametrize("argv,words", [case[1:] for case in EXECUTABLE_CASES], ids=[c[0] for c in EXECUTABLE_CASES])
def test_installed_executable_answers_a_bad_invocation_with_one_line(tmp_path, argv, words):
    executable = Path(sys.executable).parent / "vitkit"
    assert executable.is_file(), f"{executable} is missing: install the package (make test does) to run this test"
    done = subprocess.run([str(executable), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("vitkit") and words in lines[0], lines[0]
    assert done.stdout == ""
