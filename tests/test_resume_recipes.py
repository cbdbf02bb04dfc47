"""Exact resume across processes with each shipped CIFAR recipe's settings, and of a 2-process DDP run.

Each recipe is read as shipped and shrunk to seconds (a 2-block model, 16-pixel images, a fixed
number of epochs instead of its time budget, 32-bit precision instead of "auto", which measures the
machine in every process) while every augmentation (patch dropout, padded crops, flips,
TrivialAugment, mixup/CutMix), the optimizer (Muon), the EMA and the schedule fractions stay. One
process trains it uninterrupted; another is stopped by a real SIGTERM at a fixed step (this file,
run as a script, sends it to itself from a callback once that step is done); a third, the `vitkit
train --resume` command, finishes it. The two runs must end on bit-identical weights, EMA and
optimizer state.

usage (the stopped process): python tests/test_resume_recipes.py RECIPE DATA OUT STOP_AFTER_STEP
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

SCRIPT = Path(__file__).resolve()

# 120 images, a quarter held out: 90 training images in batches of 8, 11 steps an epoch.
BATCH_SIZE = 8
STEPS_PER_EPOCH = 11
EPOCHS = 5  # 55 steps: ema_horizon 0.05 averages over ~3 steps, mix_start 0.5 starts mixing at step 28
SHRINK = dict(model="cifar-mini", depth=2, img_size=16, batch_size=BATCH_SIZE, epochs=EPOCHS, val_fraction=0.25,
              precision="32-true", progress=False)

# Stopped mid-epoch in the second epoch, which val_every 4 leaves unvalidated, before mixing begins; and,
# for the recipe that mixes late, once more after mixing has begun. The stop lands once the step after
# STOP_AFTER has finished (the callback that sends the signal runs after vitkit's own).
CASES = [
    ("cifar10-quick", 15, {}),
    ("cifar10-vit-30m", 15, {}),
    ("cifar10-hybrid-30m", 15, {}),
    ("cifar10-vit-2h", 36, {}),
    # The schedules the recipes' experiments tried (docs/experiments.md): TrivialAugment from 30% of the
    # steps, patch dropout annealed and off for the last tenth.
    ("cifar10-vit-2h", 12, dict(auto_augment_start=0.3, patch_drop_end=0.25, patch_drop_until=0.9)),
]


def child_env() -> dict[str, str]:
    """One thread per process: the same arithmetic in every run, and no fight over shared cores."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def shrunk_recipe(name: str, tmp_path: Path, extra: dict) -> Path:
    """The shipped recipe with SHRINK on top and no time budget, as a recipe file of its own."""
    from vitkit.train import read_recipe

    values = read_recipe(name)
    values.pop("time_budget", None)
    values |= SHRINK | extra
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


class SignalAfter(L.Callback):
    """Sends this process a SIGTERM once a given optimizer step is done: the real signal path, at a
    step that does not depend on timing. Only process 0 of a DDP run is signalled."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def run_stopped(recipe: str, data: str, out: str, stop_after: int) -> int:
    """Train the recipe until the signal; the exit code the command would give."""
    from vitkit.train import TrainingInterrupted, resolve_config, train

    cfg = resolve_config(recipe, data=data, out=out)
    try:
        train(cfg, callbacks=[SignalAfter(stop_after)])
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


def run(argv: list[str], log: Path) -> int:
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=err, env=child_env(),
                              timeout=600)
    return done.returncode


def vitkit_train(*args: str, log: Path) -> None:
    code = run(["-m", "vitkit.cli.main", "train", *args], log)
    assert code == 0, log.read_text()[-3000:]


def stop_at(recipe: Path, data: Path, out: Path, stop_after: int, log: Path) -> dict:
    code = run([str(SCRIPT), str(recipe), str(data), str(out), str(stop_after)], log)
    assert code == 143, log.read_text()[-3000:]
    stopped = load(out / "last.ckpt")
    assert stopped["global_step"] in (stop_after, stop_after + 1), stopped["global_step"]
    return stopped


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bit_identical(a: dict, b: dict) -> None:
    """The same training state to the last bit: weights (EMA among them), optimizer, schedule."""
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [key for key, value in a["state_dict"].items() if not torch.equal(value, b["state_dict"][key])]
    assert not different, f"{len(different)} of {len(a['state_dict'])} tensors differ, e.g. {different[:5]}"
    oa, ob = a["optimizer_states"], b["optimizer_states"]
    assert len(oa) == len(ob)
    for sa, sb in zip(oa, ob):
        assert sa["state"].keys() == sb["state"].keys()
        for index, state in sa["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][index][name])), (index, name)
        assert [g["lr"] for g in sa["param_groups"]] == [g["lr"] for g in sb["param_groups"]]
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


def assert_same_exported_model(whole: Path, resumed: Path) -> None:
    """model.safetensors, the evaluated (EMA where on) weights of the best epoch, loads to the same tensors."""
    import vitkit

    a, b = vitkit.load(whole).model.state_dict(), vitkit.load(resumed).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(value, b[key]) for key, value in a.items())


def read_setting(recipe: Path, key: str):
    return yaml.safe_load(recipe.read_text()).get(key)


@pytest.mark.slow
@pytest.mark.xdist_group("resume_recipes")
@pytest.mark.parametrize("name,stop_after,extra", CASES,
                         ids=[f"{name}-step{stop}{'-schedules' if extra else ''}" for name, stop, extra in CASES])
def test_recipe_resumes_across_processes_to_the_same_weights(tmp_path, color_folder, name, stop_after, extra):
    recipe = shrunk_recipe(name, tmp_path, extra)
    whole, split = tmp_path / "whole", tmp_path / "split"
    vitkit_train("--recipe", str(recipe), "--data", str(color_folder), "--out", str(whole), log=tmp_path / "whole.txt")
    stopped = stop_at(recipe, color_folder, split, stop_after, tmp_path / "stop.txt")
    step = stopped["global_step"]
    assert step % STEPS_PER_EPOCH != 0 and step < EPOCHS * STEPS_PER_EPOCH  # mid-epoch, not the run's end
    vitkit_train("--resume", str(split), log=tmp_path / "resume.txt")

    a, b = load(whole / "last.ckpt"), load(split / "last.ckpt")
    assert a["global_step"] == EPOCHS * STEPS_PER_EPOCH
    evaluated = a["vitkit"]["weights"]  # the prefix of the weights that are evaluated and exported
    uses_ema = read_setting(recipe, "ema_horizon") is not None
    assert any(key.startswith(evaluated) for key in a["state_dict"])
    assert uses_ema == (sum(key.startswith(evaluated) for key in a["state_dict"]) < len(a["state_dict"]))
    assert_bit_identical(a, b)
    assert_same_exported_model(whole, split)
    assert_same_validation(whole, split)


def assert_same_validation(whole: Path, resumed: Path) -> None:
    val = [line.split(",")[5] for line in (whole / "metrics.csv").read_text().splitlines()]
    assert val == [line.split(",")[5] for line in (resumed / "metrics.csv").read_text().splitlines()]
    assert any(value not in ("", "val_acc") for value in val)


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")
def test_two_process_ddp_run_stopped_by_sigterm_resumes_to_the_same_weights(tmp_path, color_folder):
    """cifar10-vit-2h's settings on 2 processes (CPU, gloo): 45 training images each, 5 steps an epoch.
    Only process 0 receives the SIGTERM; both stop at the same step, and `vitkit train --resume` starts
    both again."""
    steps_per_epoch, stop_after = 5, 7
    recipe = shrunk_recipe("cifar10-vit-2h", tmp_path, dict(devices="2", strategy="ddp", accelerator="cpu"))
    whole, split = tmp_path / "whole", tmp_path / "split"
    vitkit_train("--recipe", str(recipe), "--data", str(color_folder), "--out", str(whole), log=tmp_path / "whole.txt")
    stopped = stop_at(recipe, color_folder, split, stop_after, tmp_path / "stop.txt")
    assert stopped["global_step"] % steps_per_epoch != 0
    assert (tmp_path / "stop.txt").read_text().count("stopped by SIGTERM") == 2  # each process wrote why
    vitkit_train("--resume", str(split), log=tmp_path / "resume.txt")

    a, b = load(whole / "last.ckpt"), load(split / "last.ckpt")
    assert a["global_step"] == EPOCHS * steps_per_epoch
    assert_bit_identical(a, b)
    assert_same_exported_model(whole, split)
    assert_same_validation(whole, split)


if __name__ == "__main__":
    sys.exit(run_stopped(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
