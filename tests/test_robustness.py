"""Runs that survive, proved end to end: crash-safe checkpoints under SIGKILL, exact resume across
processes after SIGTERM/SIGINT, numerical faults, and hostile files refused by every command.

tests/test_train.py covers the in-process stop and resume and two-process DDP; tests/test_weights.py
and tests/test_data_*.py cover hostile input at the library level. Here the real processes and the
real command line are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import queue
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY_TRAIN
from data_images import make_folder, png_bomb
from vitkit.cli.main import main
from vitkit.data import cifar
from vitkit.fileio import TEMP_PREFIX, atomic_write, remove_stale_temporaries
from vitkit.model import VisionTransformer, create_model
from vitkit.train import NonFiniteWeightsError, resolve_config, train
from vitkit.train.callbacks import AtomicCheckpointIO
from vitkit.train.loader import TrainBatches
from vitkit.weights import save_vitkit

TESTS = Path(__file__).resolve().parent


def child_env() -> dict[str, str]:
    """One thread per process: the same arithmetic in every run (and no fight over 2 shared cores)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def stderr_line(capsys) -> str:
    """The command's one-line error message: the last line of stderr, the only one starting with
    "vitkit" (lines before it are progress messages such as "decoded 120 images"), no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith("vitkit") and sum(line.startswith("vitkit") for line in lines) == 1, err
    return lines[-1]


def temporaries(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{TEMP_PREFIX}*"))


# ---- 1. crash-safe checkpoints -------------------------------------------------------------------


class Lines:
    """A child's stdout, line by line, with a timeout (a reader thread feeds a queue)."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.queue.put(line.strip())
        self.queue.put(None)

    def next(self, timeout: float = 120) -> str:
        line = self.queue.get(timeout=timeout)
        if line is None:
            raise AssertionError("the checkpoint writer exited unexpectedly")
        return line


@pytest.mark.slow
def test_sigkill_during_saves_always_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL at random moments (and right after a temporary appears) during 20+ saves: the file on
    disk always loads with weights_only=True and holds exactly the last finished save or the one after."""
    path = tmp_path / "last.ckpt"
    with open(tmp_path / "saver.err", "w") as err:
        writer = subprocess.Popen([sys.executable, str(TESTS / "robust_saver.py"), str(path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env())
    lines = Lines(writer.stdout)
    rng = random.Random(7)
    marker, saves, kills, mid_write, child = 1, 0, 0, 0, None
    try:
        while kills < 6 or saves < 24 or mid_write < 2:
            assert kills < 60, f"no kill in {kills} landed while a temporary file existed"
            writer.stdin.write(f"{marker}\n")
            writer.stdin.flush()
            child, done, last = None, 0, None
            wanted = rng.randint(1, 4)
            while child is None or done < wanted:
                word, number = lines.next().split()
                if word == "child":
                    child = int(number)
                else:
                    done, last = done + 1, int(number)
            if kills % 2 == 0:  # a random moment
                time.sleep(rng.uniform(0, 0.06))
            else:  # the moment a temporary file appears: mid-write
                deadline = time.monotonic() + 5
                while not temporaries(tmp_path) and time.monotonic() < deadline:
                    pass
            os.kill(child, signal.SIGKILL)
            while (line := lines.next()) != f"gone {child}":
                done, last = done + 1, int(line.split()[1])
            kills, saves = kills + 1, saves + done
            leftovers = temporaries(tmp_path)
            mid_write += bool(leftovers)

            state = torch.load(path, weights_only=True)
            found = state["marker"]
            assert last <= found <= last + 1, (last, found)  # the last reported save, or the one just after
            assert state["global_step"] == found
            assert torch.equal(state["state_dict"]["model.weight"], torch.full((1024, 1024), float(found)))
            assert sorted(remove_stale_temporaries(tmp_path)) == leftovers
            assert not temporaries(tmp_path) and path.is_file()
            marker = found + 1
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        writer.stdin.close()
        writer.wait(timeout=60)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("this object refuses to be pickled")


def _fail_unpicklable(writer, path, state, monkeypatch):
    state["callbacks"] = {"broken": Unpicklable()}
    with pytest.raises(RuntimeError, match="refuses to be pickled"):
        writer.save_checkpoint(state, path)


def _fail_torch_save(writer, path, state, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        writer.save_checkpoint(state, path)


def _fail_disk_full_mid_write(writer, path, state, monkeypatch):
    def half_then_full(handle):
        handle.write(b"x" * 100_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_full)


def _fail_interrupt_mid_write(writer, path, state, monkeypatch):
    def interrupted(handle):
        handle.write(b"x" * 100_000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)


def _fail_nan_parameter(writer, path, state, monkeypatch):
    state["state_dict"]["model.head.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.head\.weight"):
        writer.save_checkpoint(state, path)


@pytest.mark.parametrize("fail", [_fail_unpicklable, _fail_torch_save, _fail_disk_full_mid_write,
                                  _fail_interrupt_mid_write, _fail_nan_parameter],
                         ids=["unpicklable-object", "torch.save-raises", "disk-full-mid-write", "ctrl-c-mid-write",
                              "nan-parameter"])
def test_failed_save_leaves_the_previous_checkpoint_byte_identical(tmp_path, monkeypatch, fail):
    writer = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    model = create_model("cifar-mini", img_size=16, depth=1, num_classes=3)
    writer.save_checkpoint({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "step": 1}, path)
    before = path.read_bytes()
    state = {"state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}, "step": 2}
    fail(writer, path, state, monkeypatch)
    assert path.read_bytes() == before
    assert temporaries(tmp_path) == []
    assert torch.load(path, weights_only=True)["step"] == 1


def test_next_start_removes_stale_temporaries_only(tmp_path):
    from vitkit.train.run import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    stale = [run / f"{TEMP_PREFIX}last.ckpt.a1b2", run / f"{TEMP_PREFIX}metrics.csv.c3d4"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = [run / "notes.txt", run / "tmp-last.ckpt.bak"]
    for path in keep:
        path.write_text("mine")
    cfg = resolve_config(None, data="unused", out=str(run))
    assert prepare_run_dir(cfg, None) == run
    assert temporaries(run) == [] and all(p.read_text() == "mine" for p in keep)


def test_overwrite_removes_the_old_runs_artefacts(tmp_path):
    """--overwrite starts over: a new run stopped early must not leave the old model for `vitkit.load`."""
    from vitkit.train.run import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    old = [run / name for name in ("best.ckpt", "last.ckpt", "metrics.csv", "steps.csv", "model.safetensors",
                                   "val_predictions.npz")]
    for path in old:
        path.write_bytes(b"the previous run")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_run_dir(resolve_config(None, data="unused", out=str(run)), None)
    assert prepare_run_dir(resolve_config(None, data="unused", out=str(run), overwrite=True), None) == run
    assert not any(path.exists() for path in old) and (run / "notes.txt").read_text() == "mine"


class SignalInBatch(L.Callback):
    """Sends this process SIGTERM as a given batch (epoch, index in the epoch) starts: the signal is
    there when that batch's on_train_batch_end asks, the real stop path, in-process."""

    def __init__(self, epoch: int, index: int) -> None:
        self.at = (epoch, index)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if tuple(int(v) for v in batch.step_key.tolist()) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_stop_waits_for_the_accumulated_step(tmp_path, color_folder):
    """With --accumulate 2 a SIGTERM during the first batch of a group stops after the group's second
    batch, where the optimizer has stepped: the checkpoint then holds every batch the resumed run
    will not see again, and the resumed run ends on the uninterrupted run's weights and optimizer state.

    90 training images in batches of 16: 5 batches an epoch, stepped as 2 + 2 + 1 (3 steps). The
    signal arrives in epoch 1's batch 2, the first of its second group: no step taken yet there."""
    from vitkit.train import TrainingInterrupted

    settings = dict(TINY_TRAIN, accumulate=2, ema=0.9, label_smoothing=0.1, drop_path_rate=0.1)
    whole = resolve_config(None, data=str(color_folder), out=str(tmp_path / "whole"), val_fraction=0.25, **settings)
    train(whole)
    split = resolve_config(None, data=str(color_folder), out=str(tmp_path / "split"), val_fraction=0.25, **settings)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(split, callbacks=[SignalInBatch(epoch=1, index=2)])
    assert stopped.value.exit_code == 143
    interrupted = load(tmp_path / "split" / "last.ckpt")
    assert interrupted["global_step"] == 3 + 2  # epoch 0's 3 steps, then epoch 1's first two groups
    assert interrupted["run_plan"]["position"] == [1, 4]  # batches 0-3 of epoch 1 done
    loader_state = interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["completed"]) == (1, 4)
    train(split, resume=tmp_path / "split")
    assert_same_training_state(load(tmp_path / "whole" / "last.ckpt"), load(tmp_path / "split" / "last.ckpt"))


# ---- 2 and 3. stop with SIGTERM / SIGINT, resume in a new process, same result ----------------------

# 90 training images (120 with a quarter held out) in batches of 8: 11 steps an epoch. EMA, label
# smoothing, stochastic depth and warmup+cosine are on, so every piece of state has to survive.
RESUME_ARGS = ["--model", "cifar-mini", "--img-size", "16", "--depth", "2", "--batch-size", "8", "--lr", "3e-3",
               "--warmup-epochs", "0.5", "--val-fraction", "0.25", "--ema", "0.9", "--label-smoothing", "0.1",
               "--drop-path-rate", "0.1", "--accelerator", "cpu", "--no-progress"]
STEPS_PER_EPOCH = 11


def train_argv(data: Path, out: Path, epochs: int) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--epochs", str(epochs), *RESUME_ARGS]


def run_cli(argv: list[str], log: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    prefix = [str(script)] if script else ["-m", "vitkit.cli.main", "train"]
    with open(log, "w") as err:
        return subprocess.run([sys.executable, *prefix, *argv], stdout=subprocess.PIPE, stderr=err, text=True,
                              env=child_env(), timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, color_folder):
    """Runs of the plain command in one go, by number of epochs (made on first use)."""
    runs: dict[int, Path] = {}

    def get(epochs: int) -> Path:
        if epochs not in runs:
            out = tmp_path_factory.mktemp("whole") / "run"
            done = run_cli(train_argv(color_folder, out, epochs), out.parent / "stderr.txt")
            assert done.returncode == 0, (out.parent / "stderr.txt").read_text()[-3000:]
            runs[epochs] = out
        return runs[epochs]

    return get


def interrupt(argv: list[str], run_dir: Path, signals: list[signal.Signals], log: Path,
              script: Path | None = None) -> int:
    """Start the command, and once the first epoch's checkpoint exists (training is under way, handlers
    installed) send ``signals``; the second epoch is 11 steps long, so the stop lands mid-epoch."""
    prefix = [str(script)] if script else ["-m", "vitkit.cli.main", "train"]
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *prefix, *argv], stdout=subprocess.DEVNULL, stderr=err,
                                env=child_env())
        try:
            deadline = time.monotonic() + 300
            while not (run_dir / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            for signum in signals:
                if proc.poll() is None:
                    proc.send_signal(signum)
            return proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    oa, ob = a["optimizer_states"][0], b["optimizer_states"][0]
    assert oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(ob["state"][index][name], value, rtol=0, atol=1e-6, msg=f"{index}.{name}")
    assert [g["lr"] for g in oa["param_groups"]] == pytest.approx([g["lr"] for g in ob["param_groups"]], abs=1e-12)
    sa, sb = a["lr_schedulers"][0], b["lr_schedulers"][0]
    assert sa["_last_lr"] == pytest.approx(sb["_last_lr"], abs=1e-12) and sa["last_epoch"] == sb["last_epoch"]


SCENARIOS = {
    "sigterm": ([signal.SIGTERM], None, 143),
    "sigint": ([signal.SIGINT], None, 130),
    "second-signals-during-the-write": ([signal.SIGTERM], TESTS / "robust_train.py", 143),
}


@pytest.mark.slow
@pytest.mark.xdist_group("robust_resume")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_stopped_run_resumes_in_a_new_process_to_the_same_result(tmp_path, color_folder, uninterrupted, scenario):
    signals, script, code = SCENARIOS[scenario]
    for epochs in (2, 4, 8):  # a run that finished before the signal proves nothing: run longer
        run_dir = tmp_path / f"run{epochs}"
        log = tmp_path / f"stop{epochs}.txt"
        argv = train_argv(color_folder, run_dir, epochs)
        returncode = interrupt(argv, run_dir, signals, log, script)
        if returncode == 0:
            continue
        err = log.read_text()
        assert returncode == code, err[-3000:]
        break
    else:
        pytest.fail("every run finished before the signal arrived")
    signame = signals[0].name
    assert f"stopped by {signame}; resume with --resume {run_dir}" in err
    assert "weights_only" not in err  # the stop asks for a full checkpoint rather than Lightning's default
    if script is not None:
        assert "SIGTERM and SIGINT sent while writing" in err  # the second signals did land mid-write
    stopped = load(run_dir / "last.ckpt")
    step = stopped["global_step"]
    assert 0 < step < epochs * STEPS_PER_EPOCH and step % STEPS_PER_EPOCH != 0, step  # mid-epoch
    assert temporaries(run_dir) == []

    # a temporary left by a writer killed earlier is cleared when the run starts again
    stale = run_dir / f"{TEMP_PREFIX}last.ckpt.killed"
    stale.write_bytes(b"half a checkpoint")
    resumed = run_cli([*argv, "--resume", str(run_dir)], tmp_path / "resume.txt")
    assert resumed.returncode == 0, (tmp_path / "resume.txt").read_text()[-3000:]
    assert not stale.exists()

    whole = uninterrupted(epochs)
    a, b = load(whole / "last.ckpt"), load(run_dir / "last.ckpt")
    assert a["global_step"] == epochs * STEPS_PER_EPOCH
    assert_same_training_state(a, b)
    assert (whole / "metrics.csv").read_text().splitlines()[0] == (run_dir / "metrics.csv").read_text().splitlines()[0]
    val = [line.split(",")[5] for line in (whole / "metrics.csv").read_text().splitlines()]
    assert val == [line.split(",")[5] for line in (run_dir / "metrics.csv").read_text().splitlines()]


def test_resumed_loader_replays_the_same_sample_indices():
    """The batches after a mid-epoch stop and a fresh loader restored from the saved state are exactly
    those the uninterrupted loader yields; labels here are the sample indices themselves."""
    from vitkit.data import ImageSet

    n = 50
    images = ImageSet(torch.arange(n), [str(i) for i in range(n)], torch.zeros(n, 3, 2, 2, dtype=torch.uint8))
    epoch = {"value": 0}

    done = {"position": (0, 0)}  # the run plan's count of batches done, as a trained batch records it

    def make() -> TrainBatches:
        return TrainBatches(images, 8, seed=3, current_epoch=lambda: epoch["value"], position=lambda: done["position"])

    whole = []
    loader = make()
    for epoch["value"] in range(3):
        for _, labels, key, indices in loader:
            assert indices.tolist() == labels.tolist()  # each batch carries its samples' indices
            whole.append((int(key[0]), int(key[1]), labels.tolist()))
    assert len(whole) == 18 and len({tuple(w[2]) for w in whole}) == 18
    for e in range(3):  # each epoch is a permutation: every sample at most once, in its own order
        seen = [i for w in whole if w[0] == e for i in w[2]]
        assert len(set(seen)) == len(seen) == 48
        assert seen == [int(i) for b in loader.batch_indices(e) for i in b]
    assert [w[2] for w in whole[:6]] != [w[2] for w in whole[6:12]]

    for stop_epoch, stop_after in [(0, 1), (1, 4), (2, 5), (1, 6)]:
        first = make()
        epoch["value"] = stop_epoch
        before, batches = [], iter(first)
        for _, labels, key, _ in batches:
            before.append((int(key[0]), int(key[1]), labels.tolist()))
            done["position"] = (int(key[0]), int(key[1]) + 1)
            if len(before) == stop_after:
                break
        next(batches, None)  # a batch fetched ahead, as Lightning does, is not done: not recorded
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint carries
        second = make()
        second.load_state_dict(state)
        after = []
        for epoch["value"] in range(stop_epoch, 3):
            after += [(int(key[0]), int(key[1]), labels.tolist()) for _, labels, key, _ in second]
        start = stop_epoch * 6
        assert before + after == whole[start:], (stop_epoch, stop_after)
    with pytest.raises(ValueError, match="seed 3"):
        TrainBatches(images, 8, seed=4).load_state_dict(state)


# ---- 4. non-finite loss and weights ----------------------------------------------------------------


@pytest.fixture
def nan_forward_at(monkeypatch):
    """Make the model's n-th forward pass in training mode (n from 0: the optimizer step of that
    number) return NaN logits, as an overflow would, without touching its weights. Training runs the
    model switched to vitkit.model.fast's classes, so the fast model's forward is the one wrapped."""
    from vitkit.model.fast import FastVisionTransformer

    def install(step: int) -> None:
        original = FastVisionTransformer.forward
        calls = {"n": 0}

        def forward(self, x, *args, **kwargs):
            out = original(self, x, *args, **kwargs)
            if self.training:
                calls["n"] += 1
                if calls["n"] == step + 1:
                    return out + float("nan")
            return out

        monkeypatch.setattr(FastVisionTransformer, "forward", forward)

    return install


def tiny_argv(data: Path, out: Path, epochs: int = 3) -> list[str]:
    """TINY_TRAIN on the command line: 90 training images in batches of 16, 5 steps an epoch."""
    return ["train", "--data", str(data), "--out", str(out), "--model", "cifar-mini", "--img-size", "16", "--depth",
            "2", "--epochs", str(epochs), "--batch-size", "16", "--lr", "3e-3", "--weight-decay", "0.01",
            "--val-fraction", "0.25", "--no-progress"]


def assert_checkpoints_finite(run_dir: Path) -> list[dict]:
    states = [load(path) for path in sorted(run_dir.glob("*.ckpt"))]
    for state in states:
        for key, value in state["state_dict"].items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key
    return states


def test_nonfinite_loss_stops_the_run_naming_step_and_batch(tmp_path, capsys, color_folder, nan_forward_at):
    nan_forward_at(7)  # epoch 1 (5 steps an epoch), batch 2
    run = tmp_path / "run"
    assert main(tiny_argv(color_folder, run)) == 1
    message = stderr_line(capsys)
    assert "NonFiniteLossError" in message and "loss became nan at step 7 (epoch 1, batch 2)" in message
    assert "--grad-clip" in message
    states = assert_checkpoints_finite(run)
    assert len(states) == 2 and all(s["global_step"] == 5 for s in states)  # epoch 0's, nothing after


def test_nonfinite_loss_can_skip_the_step(tmp_path, caplog, color_folder, nan_forward_at):
    """--on-nonfinite skip: the step is left out (weights untouched), named in a warning, and the run goes on."""
    nan_forward_at(7)
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 7:
                snapshots["before"] = {k: v.clone() for k, v in module.model.state_dict().items()}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if "before" in snapshots and "after" not in snapshots:
                snapshots["after"] = {k: v.clone() for k, v in module.model.state_dict().items()}

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         nonfinite="skip", **TINY_TRAIN)
    with caplog.at_level("WARNING", logger="vitkit"):
        result = train(cfg, callbacks=[Snapshot()])
    assert any("skipped step 7 (epoch 1, batch 2)" in r.getMessage() for r in caplog.records), caplog.text
    for key, value in snapshots["before"].items():
        assert torch.equal(value, snapshots["after"][key]), key
    assert result.steps_done == 15
    assert_checkpoints_finite(result.run_dir)
    with pytest.raises(ValueError, match="nonfinite"):
        resolve_config(None, nonfinite="ignore")


def test_nonfinite_weights_are_never_checkpointed(tmp_path, color_folder):
    """Weights turned NaN right before the epoch's checkpoint: the save is refused, naming the parameter,
    and the previous checkpoints stay as they were."""

    class PoisonWeights(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 10:  # the last step of epoch 1, before its validation and checkpoints
                with torch.no_grad():
                    module.model.head.bias.fill_(float("nan"))

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25, **TINY_TRAIN)
    with pytest.raises(NonFiniteWeightsError, match=r"model\.head\.bias"):
        train(cfg, callbacks=[PoisonWeights()])
    states = assert_checkpoints_finite(tmp_path / "run")
    assert len(states) == 2 and all(s["global_step"] == 5 for s in states)
    assert temporaries(tmp_path / "run") == []


# ---- 5. hostile input ------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls os.mkdir(marker): the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _tiny_model() -> VisionTransformer:
    return create_model("cifar-mini", img_size=16, depth=1, num_classes=3)


def hostile_file(directory: Path, kind: str, marker: Path) -> Path:
    """A real-looking vitkit training checkpoint (torch zip) or state dict (plain pickle) with a payload."""
    model = _tiny_model()
    if kind == "ckpt":
        path = directory / "evil.ckpt"
        state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 3,
                 "vitkit": {"config": model.config.to_dict(), "classes": ["blue", "green", "red"],
                            "mean": [0.5] * 3, "std": [0.5] * 3, "weights": "model.", "train": {"data": "x"}},
                 "callbacks": {"hook": Payload(marker)}}
        torch.save(state, path)
    else:
        path = directory / "evil.pth"
        with open(path, "wb") as handle:
            pickle.dump({**model.state_dict(), "extra": Payload(marker)}, handle)
    return path


def _hostile_commands(evil: Path, data: Path, image: Path, out: Path) -> dict[str, list[str]]:
    resume_dir = out.parent / "resume-dir"
    resume_dir.mkdir()
    (resume_dir / "last.ckpt").write_bytes(evil.read_bytes())
    return {
        "train --init": [*tiny_argv(data, out, epochs=1), "--depth", "1", "--init", str(evil)],
        "train --resume FILE": ["train", "--resume", str(evil)],
        "train --resume DIR": ["train", "--resume", str(resume_dir)],
        "eval": ["eval", "--checkpoint", str(evil), "--data", str(data)],
        "predict": ["predict", "--checkpoint", str(evil), str(image)],
        "convert": ["convert", str(evil), str(out / "converted.pth"), "--to", "timm"],
        "info": ["info", str(evil)],
        "attention": ["attention", "--checkpoint", str(evil), str(image), "-o", str(out)],
        "inspect": ["inspect", str(evil), "-o", str(out)],
    }


HOSTILE_COMMANDS = ["train --init", "train --resume FILE", "train --resume DIR", "eval", "predict", "convert", "info",
                    "attention", "inspect"]


@pytest.mark.parametrize("kind", ["ckpt", "pth"])
@pytest.mark.parametrize("command", HOSTILE_COMMANDS)
def test_pickled_code_is_refused_by_every_command(tmp_path, capsys, color_folder, kind, command):
    marker = tmp_path / "payload_ran"
    evil = hostile_file(tmp_path, kind, marker)
    if command == "train --resume DIR" and kind == "pth":
        pytest.skip("a run directory holds last.ckpt")
    argv = _hostile_commands(evil, color_folder, color_folder / "red" / "0000.png", tmp_path / "out")[command]
    assert main(argv) == 2
    message = stderr_line(capsys)
    assert "refusing to load" in message and "mkdir" in message and "--trust-checkpoint" in message, message
    assert not marker.exists()
    assert not (tmp_path / "out" / "converted.pth").exists() and not list(tmp_path.glob("out/*.png"))


def _archive(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data[member.name]) if member.name in data else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def _file(name: str, payload: bytes) -> tuple[tarfile.TarInfo, dict[str, bytes]]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, {name: payload}


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("VITKIT_DATA", str(root))
    monkeypatch.chdir(tmp_path)  # "cifar10" must not name a folder in the working directory
    return root


def test_tampered_cifar_archive_is_refused_by_the_cli(tmp_path, capsys, data_root):
    archive = data_root / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(2000))
    for argv in (["data", "inspect", "cifar10"], tiny_argv(Path("cifar10"), tmp_path / "run")):
        archive.write_bytes(b"\x1f\x8b" + os.urandom(2000))
        assert main(argv) == 2
        message = stderr_line(capsys)
        assert "cifar-10-python.tar.gz" in message and "MD5" in message
        assert sorted(p.name for p in data_root.iterdir()) == []  # deleted, nothing extracted


@pytest.mark.parametrize("case", ["dotdot", "absolute-link", "outside-link", "outside-hardlink", "device"])
def test_cifar_archive_escaping_its_folder_is_refused_by_the_cli(tmp_path, capsys, data_root, monkeypatch, case):
    outside = tmp_path / "outside.txt"
    good, data = _file("cifar-10-batches-py/batches.meta", b"meta")
    members = {
        "dotdot": _file("cifar-10-batches-py/../../outside.txt", b"escaped"),
        "absolute-link": (_link("cifar-10-batches-py/data_batch_1", str(outside)), {}),
        "outside-link": (_link("cifar-10-batches-py/data_batch_1", "../../outside.txt"), {}),
        "outside-hardlink": (_link("cifar-10-batches-py/data_batch_1", "../outside.txt", tarfile.LNKTYPE), {}),
        "device": (_link("cifar-10-batches-py/data_batch_1", "", tarfile.CHRTYPE), {}),
    }
    bad, bad_data = members[case]
    digest = _archive(data_root / "cifar-10-python.tar.gz", [good, bad], {**data, **bad_data})
    spec = dataclasses.replace(cifar.CIFAR_SPECS["cifar10"], archive_md5=digest)
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", spec)
    assert main(["data", "inspect", "cifar10"]) == 2
    message = stderr_line(capsys)
    assert "refusing to extract member" in message and bad.name in message, message
    assert not outside.exists() and not (data_root / "cifar-10-batches-py").exists()
    assert [p.name for p in data_root.iterdir()] == ["cifar-10-python.tar.gz"]


def test_absolute_member_names_stay_inside_the_target(tmp_path, capsys, data_root, monkeypatch):
    """tarfile's data filter strips the leading slash of an absolute member name: it lands inside."""
    outside = tmp_path / "abs" / "escaped.txt"
    good, data = _file("cifar-10-batches-py/batches.meta", b"meta")
    bad, bad_data = _file(str(outside), b"escaped")
    digest = _archive(data_root / "cifar-10-python.tar.gz", [good, bad], {**data, **bad_data})
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10",
                        dataclasses.replace(cifar.CIFAR_SPECS["cifar10"], archive_md5=digest))
    assert main(["data", "inspect", "cifar10"]) == 2  # extracted, then the batch files' checks refuse it
    assert "batches.meta" in stderr_line(capsys)
    assert not outside.exists()


@pytest.fixture
def bomb_folder(tmp_path) -> tuple[Path, Path]:
    root = make_folder(tmp_path / "data", {"a": 6, "b": 6}, size=16)
    return root, png_bomb(root / "b" / "zz_bomb.png")


def test_decompression_bomb_is_refused_by_train_and_listed_by_inspect(tmp_path, capsys, bomb_folder):
    root, bomb = bomb_folder
    assert main(tiny_argv(root, tmp_path / "run", epochs=1)) == 2
    message = stderr_line(capsys)
    assert str(bomb) in message and "decompression bomb" in message and "--skip-bad-images" in message
    assert not list((tmp_path / "run").glob("*.ckpt"))

    assert main(["data", "inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [u["path"] for u in report["unreadable"]] == [str(bomb)]
    assert "decompression bomb" in report["unreadable"][0]["reason"] and report["readable"] == 12

    weights = tmp_path / "model.safetensors"
    save_vitkit(weights, _tiny_model(), classes=["a", "b", "c"])
    assert main(["predict", "--checkpoint", str(weights), str(bomb)]) == 2
    assert "decompression bomb" in stderr_line(capsys)
