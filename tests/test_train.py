"""Training end to end on generated images: learning, saved artefacts, exact reload, resume, DDP."""

from __future__ import annotations

import copy
import csv
import itertools
import math
import os
import signal
import subprocess
import sys
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import yaml

import vitkit
from conftest import TINY_TRAIN
from vitkit.model.fast import optimize
from vitkit.train import TrainingInterrupted, resolve_config, train
from vitkit.train.module import parameter_groups
from vitkit.train.muon import MuonAdamW, newton_schulz, newton_schulz_gram, orthogonalize
from vitkit.train.plan import (
    RunPlan,
    ema_decay,
    has_begun,
    lr_multiplier,
    patch_drop_rate,
    train_resolution,
    warmup_steps,
)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_model_learns(trained_run):
    rows = read_rows(trained_run.run_dir / "metrics.csv")
    assert len(rows) == 3
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], f"training loss did not fall: {losses}"
    assert float(rows[-1]["val_acc"]) > 0.5  # chance is 1/3
    assert trained_run.best_val_acc is not None and trained_run.best_val_acc > 0.5


def test_run_directory_holds_everything(trained_run):
    run = trained_run.run_dir
    for name in ("best.ckpt", "last.ckpt", "metrics.csv", "steps.csv", "config.yaml", "model.safetensors",
                 "val_predictions.npz"):
        assert (run / name).is_file(), name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["classes"] == ["blue", "green", "red"]
    assert config["model_config"]["depth"] == 2
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert "images_per_s" in header and "lr" in header
    rows = read_rows(run / "metrics.csv")
    assert all(float(r["val_seconds"]) > 0 for r in rows)  # every epoch validated, and timed


def test_load_reproduces_logits_exactly(trained_run):
    run = trained_run.run_dir
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    from_ckpt = vitkit.load(run / "best.ckpt")
    from_safetensors = vitkit.load(run / "model.safetensors")
    from_dir = vitkit.load(run)
    assert from_ckpt.classes == from_safetensors.classes == ["blue", "green", "red"]
    state = torch.load(run / "best.ckpt", weights_only=True)
    model = optimize(vitkit.create_model("cifar-mini", img_size=16, depth=2, num_classes=3)).eval()
    model.load_state_dict({k[6:]: v for k, v in state["state_dict"].items() if k.startswith("model.")})
    with torch.no_grad():  # as the classifier runs it: fast kernels, no gradients
        expected = model(from_ckpt.preprocess(x))
    assert torch.equal(from_ckpt.logits(x), expected)
    assert torch.equal(from_safetensors.logits(x), expected)
    assert torch.equal(from_dir.logits(x), expected)
    # The run directory's model carries the run's settings: `vitkit eval` on it scores the run's own
    # validation split (a quarter here, not the default tenth).
    assert from_dir.train_config["val_fraction"] == from_ckpt.train_config["val_fraction"] == 0.25
    assert from_dir.train_config["split_seed"] == from_ckpt.train_config["split_seed"]


def test_flip_averaged_evaluation(trained_run, color_folder):
    """--tta-flip: an image and its mirror get the same prediction; a mirror-symmetric image the plain one."""
    classifier = vitkit.load(trained_run.run_dir)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(classifier.logits(x, tta_flip=True), classifier.logits(x.flip(-1), tta_flip=True),
                          atol=1e-5)
    symmetric = torch.cat([x[..., :8], x[..., :8].flip(-1)], dim=-1)
    assert torch.allclose(classifier.logits(symmetric, tta_flip=True).softmax(-1),
                          classifier.logits(symmetric).softmax(-1), atol=1e-5)
    from vitkit.data import load_splits

    images = load_splits(str(color_folder), val_fraction=0.0).train
    plain, flipped = vitkit.evaluate(classifier, images), vitkit.evaluate(classifier, images, tta_flip=True)
    assert plain["images"] == flipped["images"] == 120 and flipped["top1"] > 0.5


def test_shift_averaged_evaluation(trained_run, color_folder, capsys):
    """--tta-shift: the mean probabilities of the image moved by -2, 0 and +2 pixels along each axis, the
    border black as training's padded crops leave it (built here by padding the uint8 image with zeros)."""
    import json

    import torch.nn.functional as F

    from vitkit.cli.main import main

    classifier = vitkit.load(trained_run.run_dir)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    padded = F.pad(x, (2, 2, 2, 2))
    views = [padded[..., 2 + dy : 18 + dy, 2 + dx : 18 + dx] for dy in (-2, 0, 2) for dx in (-2, 0, 2)]
    views += [view.flip(-1) for view in views]
    expected = torch.stack([classifier.logits(view).softmax(-1) for view in views]).mean(0).log()
    assert torch.allclose(classifier.logits(x, tta_flip=True, tta_shift=2), expected, atol=1e-5)
    assert torch.allclose(classifier.logits(x, tta_shift=2),
                          torch.stack([classifier.logits(v).softmax(-1) for v in views[:9]]).mean(0).log(), atol=1e-5)

    from vitkit.data import load_splits

    images = load_splits(str(color_folder), val_fraction=0.0).train
    shifted = vitkit.evaluate(classifier, images, tta_flip=True, tta_shift=2)
    assert shifted["images"] == 120 and shifted["top1"] > 0.5
    argv = ["eval", "--checkpoint", str(trained_run.run_dir), "--data", str(color_folder), "--split", "all",
            "--tta-flip", "--tta-shift", "2", "--json"]
    assert main(argv) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reported["tta_shift"] == 2 and reported["top1"] == pytest.approx(shifted["top1"])


def test_predict_averages_the_same_views_as_evaluation(trained_run, color_folder, capsys):
    """predict --tta-flip --tta-shift: each image's probabilities are those eval's views average."""
    import json

    from vitkit.cli.main import main

    classifier = vitkit.load(trained_run.run_dir)
    paths = [color_folder / "red" / "0000.png", color_folder / "green" / "0001.png"]
    x = torch.stack([classifier.to_tensor(p) for p in paths])
    for views in ({"tta_flip": True}, {"tta_shift": 2}, {"tta_flip": True, "tta_shift": 2}):
        probs = classifier.logits(x, **views).softmax(-1)
        predictions = classifier.predict([str(p) for p in paths], top_k=3, **views)
        for prediction, row in zip(predictions, probs):
            assert [p for _, p in prediction.top_k] == pytest.approx(row.topk(3).values.tolist(), abs=1e-6)
            assert prediction.index == row.argmax().item()
    averaged = classifier.predict([str(p) for p in paths], tta_flip=True, tta_shift=2)
    assert main(["predict", "--checkpoint", str(trained_run.run_dir), "--tta-flip", "--tta-shift", "2", "--json",
                 *map(str, paths)]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["probability"] for r in reported] == pytest.approx([p.probability for p in averaged], abs=1e-6)
    # The plain prediction differs: the views are really averaged, not ignored.
    plain = classifier.predict([str(p) for p in paths])
    assert any(abs(a.probability - b.probability) > 1e-4 for a, b in zip(plain, averaged))


def test_predict_api_takes_paths_pil_and_arrays(trained_run, color_folder):
    from PIL import Image

    classifier = vitkit.load(trained_run.run_dir)
    path = color_folder / "red" / "0000.png"
    pil = Image.open(path)
    results = classifier.predict([str(path), pil, np.asarray(pil.convert("RGB"))], top_k=2)
    assert len(results) == 3 and all(len(r.top_k) == 2 for r in results)
    assert results[0].label == results[1].label == results[2].label
    assert abs(sum(p for _, p in classifier.predict(str(path), top_k=3)[0].top_k) - 1) < 1e-5
    # Images smaller than the model's 16 pixels, of different sizes, are resized to it and batch together.
    small = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((8, 8), (12, 10), (40, 16))]
    assert classifier.inputs(small).shape == (3, 3, 16, 16)
    assert len(classifier.predict(small)) == 3


def test_accumulated_steps_match_the_schedule(tmp_path, color_folder):
    """With --accumulate, Lightning also steps on an epoch's last, partial group of batches: the
    schedule must count those steps, or its cosine reaches the floor before the run ends."""
    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         **dict(TINY_TRAIN, epochs=2, accumulate=2))
    # 90 training images in batches of 16: 5 batches an epoch, stepped as 2 + 2 + 1.
    plan = RunPlan.for_config(cfg, train_size=90)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (5, 3, 6)
    assert [plan.steps_after(i) for i in range(5)] == [False, True, False, True, True]
    two = RunPlan.for_config(cfg, train_size=90, world_size=2)  # 45 images each: 2 batches, one group
    assert (two.batches_per_epoch, two.steps_per_epoch) == (2, 1)
    planned = plan.steps_per_epoch
    result = train(cfg)
    assert result.steps_done == 2 * planned
    logged = read_rows(result.run_dir / "steps.csv")  # every 10th step: none in 6, but the first (step 0)
    assert [int(r["step"]) for r in logged] == [0]
    assert float(logged[0]["train_loss"]) == pytest.approx(math.log(3), abs=0.3)  # the batch's loss, not half


def test_run_plan_counts_steps_and_ends_the_run():
    """The plan's total comes from the epochs or max_steps; a time budget's revision replaces it (never
    past max_steps); the run ends at the total, or, under a time budget before its first revision,
    only at max_steps (or the deadline)."""
    plan = RunPlan(batches_per_epoch=10, epochs=4)
    assert (plan.steps_per_epoch, plan.total_steps, plan.last_step) == (10, 40, 40)
    assert plan.fraction(10) == 0.25 and not plan.ends_at(39) and plan.ends_at(40)
    assert RunPlan(batches_per_epoch=10, epochs=4, max_steps=25).total_steps == 25
    assert RunPlan(batches_per_epoch=10, epochs=4, accumulate=3).steps_per_epoch == 4  # 3 + 3 + 3 + 1
    budgeted = RunPlan(batches_per_epoch=10, epochs=4, max_steps=100, epochs_end_run=False)
    assert budgeted.total_steps == 40 and budgeted.last_step == 100  # the epochs only size the schedule
    budgeted.revise(70)
    assert (budgeted.total_steps, budgeted.last_step, budgeted.fraction(35)) == (70, 70, 0.5)
    budgeted.revise(130)
    assert budgeted.total_steps == 100 and budgeted.ends_at(100)
    assert RunPlan(batches_per_epoch=10, epochs=4, epochs_end_run=False).last_step is None


def test_run_plan_decides_validation():
    """The first epoch, every val_every-th, and wherever the run ends: its last epoch, max_steps in
    mid-epoch, a time budget's planned step, or a stop something else asked for."""
    plan = RunPlan(batches_per_epoch=5, epochs=7, val_every=3)
    at_epoch_ends = [plan.validates_after(epoch, 4, 5 * (epoch + 1), False) for epoch in range(7)]
    assert at_epoch_ends == [True, False, True, False, False, True, True]
    assert not plan.validates_after(1, 2, 8, False)  # mid-epoch
    assert plan.validates_after(1, 2, 8, True)  # a stop (the deadline, a callback's) mid-epoch
    assert RunPlan(batches_per_epoch=5, epochs=7, val_every=3, max_steps=8).validates_after(1, 2, 8, False)
    budgeted = RunPlan(batches_per_epoch=5, epochs=2, val_every=3, epochs_end_run=False)
    assert not budgeted.validates_after(1, 4, 10, False)  # epochs=2 does not end a budgeted run
    budgeted.revise(13)
    assert not budgeted.validates_after(2, 1, 12, False) and budgeted.validates_after(2, 2, 13, False)


def test_run_plan_state_survives_a_checkpoint():
    """What a checkpoint keeps of the plan (PlanState), as plain values: the position in the epoch,
    restored; a time budget's revision only for the record, since the resumed run's own budget revises
    the plan for its own deadline. A checkpoint without it leaves the plan from the settings."""
    import json
    from types import SimpleNamespace

    from vitkit.train.callbacks import PlanState

    plan = RunPlan(batches_per_epoch=5, epochs=3, epochs_end_run=False)
    plan.revise(12)
    plan.record_batch(2, 1)
    checkpoint: dict = {}
    PlanState().on_save_checkpoint(None, SimpleNamespace(plan=plan), checkpoint)
    assert json.loads(json.dumps(checkpoint)) == {"run_plan": {"position": [2, 2], "budgeted_steps": 12}}
    restored = SimpleNamespace(plan=RunPlan(batches_per_epoch=5, epochs=3, epochs_end_run=False))
    PlanState().on_load_checkpoint(None, restored, json.loads(json.dumps(checkpoint)))
    assert restored.plan.position == (2, 2) and restored.plan.budgeted_steps is None
    assert restored.plan.last_step is None  # until the resumed run's budget has measured its steps
    untouched = SimpleNamespace(plan=RunPlan(batches_per_epoch=5, epochs=3))
    PlanState().on_load_checkpoint(None, untouched, {})
    assert untouched.plan == RunPlan(batches_per_epoch=5, epochs=3)


def test_schedules_are_functions_of_the_step_and_the_planned_total():
    """ema_horizon 0.2 of 15 steps: a time constant of 3 steps; mix_start 0.5 of 15: from step 8 (7.5
    rounded up); patch dropout 0.75 annealed to 0 over the run, or kept until 0.6 and then none;
    progressive resizing 8 -> 16 in multiples of 4 by 0.6 of the run; a revised total moves them all."""
    assert ema_decay(None, 0.2, 15) == pytest.approx(1 - 1 / 3)
    assert ema_decay(0.999, None, 15) == 0.999 and ema_decay(None, 0.2, 3) == 0.0  # at least one step
    assert [has_begun(step, 15, 0.5) for step in (7, 8)] == [False, True] and has_begun(0, 15, 0.0)
    assert [has_begun(step, 30, 0.5) for step in (8, 14, 15)] == [False, False, True]
    assert patch_drop_rate(0, 15, 0.75, 0.0, None) == 0.75 and patch_drop_rate(15, 15, 0.75, 0.0, None) == 0.0
    assert patch_drop_rate(5, 10, 0.75, 0.25, None) == pytest.approx(0.5)
    assert [patch_drop_rate(step, 15, 0.75, None, 0.6) for step in (8, 9)] == [0.75, 0.0]
    assert [train_resolution(step, 15, 16, 8, 0.6, 4) for step in range(15)] == [8] * 5 + [12] * 4 + [16] * 6
    assert train_resolution(5, 30, 16, 8, 0.6, 4) == 8 and train_resolution(3, 15, 16, None, 0.6, 4) == 16
    assert warmup_steps(0.5, 5) == 2 and warmup_steps(1.5, 5) == 8  # rounded half to even, as round() does


def test_schedule_and_parameter_groups():
    assert lr_multiplier(0, 10, 100, 0.0, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(10, 10, 100, 0.0, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(100, 10, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(55, 10, 100, 0.0, "cosine") == pytest.approx(0.5)  # halfway down
    assert lr_multiplier(55, 10, 100, 0.0, "linear") == pytest.approx(0.5)
    assert lr_multiplier(32, 10, 100, 0.0, "linear") == pytest.approx(1 - 22 / 90)  # early on below cosine's 0.86
    assert lr_multiplier(32, 10, 100, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert lr_multiplier(100, 10, 100, 0.1, "linear") == pytest.approx(0.1)
    assert lr_multiplier(50, 10, 100, 0.0, "constant") == 1.0
    model = vitkit.create_model("cifar-mini", depth=2)
    groups = parameter_groups(model, 0.05, None)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert id(model.blocks[0].norm1.weight) in no_decay and id(model.head.bias) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay
    layered = parameter_groups(model, 0.05, 0.5)
    scales = {g["lr_scale"] for g in layered}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.5**3)
    # the parts before the blocks (registers, a pre-norm) sit with the class token in layer 0, not the head's
    family = vitkit.create_model("cifar-mini", depth=2, reg_tokens=2, pre_norm=True)
    scale_of = {id(p): g["lr_scale"] for g in parameter_groups(family, 0.05, 0.5) for p in g["params"]}
    for param in (family.reg_token, family.norm_pre.weight, family.cls_token):
        assert scale_of[id(param)] == pytest.approx(0.5**3)
    assert scale_of[id(family.head.weight)] == 1.0


def test_orthogonalize_brings_singular_values_near_one():
    torch.manual_seed(0)
    for shape in ((3, 32, 96), (2, 96, 32)):  # wide and tall stacks
        matrices = torch.randn(shape) * torch.logspace(-1.5, 0, shape[-1])  # columns of unequal size
        out = orthogonalize(matrices)
        assert out.shape == matrices.shape
        singular = torch.linalg.svdvals(out)
        assert singular.min() > 0.6 and singular.max() < 1.25, (shape, singular.min(), singular.max())


def test_orthogonalize_in_bf16_on_the_cpu_as_in_fp32():
    # a CPU run in bf16 autocast orthogonalizes in bf16 (MuonAdamW's ns_dtype), as CUDA does:
    # the plain iteration, close to fp32's result, handed back in the input's dtype
    torch.manual_seed(0)
    for shape in ((3, 32, 96), (2, 96, 32)):
        matrices = torch.randn(shape) * torch.logspace(-1.5, 0, shape[-1])
        fp32, bf16 = orthogonalize(matrices), orthogonalize(matrices, dtype=torch.bfloat16)
        assert bf16.dtype == torch.float32
        assert (bf16 - fp32).norm() < 0.05 * fp32.norm(), shape
        singular = torch.linalg.svdvals(bf16)
        assert singular.min() > 0.6 and singular.max() < 1.25, (shape, singular.min(), singular.max())


def test_gram_newton_schulz_matches_the_plain_iteration():
    # orthogonalize takes the Gram form for matrices at least twice as wide as tall (here both stacks,
    # the tall one transposed); it must give the plain iteration's result, for any number of steps
    torch.manual_seed(0)
    for shape in ((3, 32, 96), (2, 96, 32)):
        matrices = torch.randn(shape) * torch.logspace(-1.5, 0, shape[-1])
        wide = matrices if shape[1] < shape[2] else matrices.mT
        wide = wide / wide.norm(dim=(-2, -1), keepdim=True)
        for steps in (0, 1, 2, 5):
            plain = newton_schulz(wide, steps)
            assert (newton_schulz_gram(wide, steps) - plain).norm() < 1e-5 * plain.norm(), (shape, steps)
        expected = plain if shape[1] < shape[2] else plain.mT
        assert (orthogonalize(matrices) - expected).norm() < 1e-5 * expected.norm(), shape


def test_muon_adamw_groups_and_updates():
    torch.manual_seed(0)
    model = vitkit.create_model("cifar-mini", depth=2)
    groups = parameter_groups(model, 0.05, None, muon=True)
    muon = {id(p) for g in groups if g["muon"] for p in g["params"]}
    blocks_matrices = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert muon == blocks_matrices and id(model.head.weight) not in muon
    # the fused qkv weights, and only they, are orthogonalized as three blocks (q, k, v)
    fused = {id(p) for g in groups if g["muon"] and g["row_blocks"] == 3 for p in g["params"]}
    assert fused == {id(b.attn.qkv.weight) for b in model.blocks}
    assert all(not g["muon"] for g in parameter_groups(model, 0.05, None))
    # a hybrid's stem filters are hidden matrices too, except the first convolution, which reads the pixels
    hybrid = vitkit.create_model("cifar-mini", depth=2, stem="conv", stem_depth=2)
    muon = {id(p) for g in parameter_groups(hybrid, 0.05, None, muon=True) if g["muon"] for p in g["params"]}
    stem = [p for n, p in hybrid.patch_embed.named_parameters() if p.ndim == 4]
    assert len(stem) == 6 and id(stem[0]) not in muon and all(id(p) in muon for p in stem[1:])

    # AdamW groups step exactly as torch's AdamW
    a, b = (torch.nn.Parameter(torch.randn(6, 4)) for _ in range(2))
    b.data.copy_(a.data)
    ours = MuonAdamW([{"params": [a], "weight_decay": 0.1}], lr=0.01)
    reference = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(6, 4)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(a, b)

    # a Muon step moves a matrix by lr * 0.2 * sqrt(max side) times an orthogonal-ish direction
    w = torch.nn.Parameter(torch.zeros(8, 32))
    w.grad = torch.randn(8, 32)
    MuonAdamW([{"params": [w], "muon": True}], lr=0.1).step()
    assert torch.linalg.svdvals(w.detach() / (0.1 * 0.2 * 32**0.5)).min() > 0.6
    # and convolution filters (out, in, kh, kw) as the (out, in * kh * kw) matrix they apply
    f = torch.nn.Parameter(torch.zeros(8, 4, 3, 3))
    f.grad = torch.randn(8, 4, 3, 3)
    MuonAdamW([{"params": [f], "muon": True}], lr=0.1).step()
    assert torch.linalg.svdvals(f.detach().flatten(1) / (0.1 * 0.2 * 36**0.5)).min() > 0.6
    # row_blocks=3 steps each third of a fused matrix as a matrix of its own, whatever the others' scale
    fused, parts = torch.nn.Parameter(torch.zeros(24, 32)), [torch.nn.Parameter(torch.zeros(8, 32)) for _ in range(3)]
    fused.grad = torch.cat([torch.randn(8, 32) * scale for scale in (1.0, 100.0, 0.01)])
    for part, grad in zip(parts, fused.grad.chunk(3)):
        part.grad = grad.clone()
    MuonAdamW([{"params": [fused], "muon": True, "row_blocks": 3}], lr=0.1).step()
    MuonAdamW([{"params": parts, "muon": True}], lr=0.1).step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in parts]))

    # state survives a state_dict round trip: both continue identically
    model2 = vitkit.create_model("cifar-mini", depth=2)
    model2.load_state_dict(model.state_dict())
    opts = [MuonAdamW(parameter_groups(m, 0.05, None, muon=True), lr=1e-3) for m in (model, model2)]
    x = torch.randn(4, 3, 32, 32)
    for step in range(3):
        for m, opt in zip((model, model2), opts):
            opt.zero_grad()
            m(x).logsumexp(-1).mean().backward()
            opt.step()
        if step == 0:  # a new optimizer for the second model, resumed from the first one's state
            opts[1] = MuonAdamW(parameter_groups(model2, 0.05, None, muon=True), lr=1e-3)
            opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)

    with pytest.raises(ValueError, match="weight matrices or convolution filters"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}])
    with pytest.raises(ValueError, match="row_blocks=3 does not divide"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 4))], "muon": True, "row_blocks": 3}])


def test_muon_trains(tmp_path, color_folder):
    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         **dict(TINY_TRAIN, optimizer="muon"))
    result = train(cfg)
    rows = read_rows(result.run_dir / "metrics.csv")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert result.best_val_acc > 0.5  # chance is 1/3


@pytest.mark.parametrize("speedup,expected", [(2.2, "bf16-mixed"), (0.55, "32-true"), (0.01, "32-true")])
def test_precision_auto_trains_in_bf16_only_where_bf16_multiplies_faster(tmp_path, color_folder, monkeypatch,
                                                                         speedup, expected):
    """"auto" measures the chip (some multiply bf16 2.2x as fast as fp32, some 0.55x, CPUs without bf16
    dot products about 0.01x); the forward pass runs under autocast, and Muon
    orthogonalizes in bf16, exactly when bf16 was chosen."""
    import vitkit.train.precision as precision

    monkeypatch.setattr(precision, "bf16_speedup", lambda: speedup)
    monkeypatch.setenv(precision.AUTO_CHOICE_ENV, "unset")  # train() exports its choice; restored after
    autocast_seen, ns_dtypes = set(), set()

    class WatchForward(L.Callback):  # during fit only: the final predictions are made in fp32
        def on_fit_start(self, trainer, pl_module):
            self.hook = pl_module.model.register_forward_hook(
                lambda *_: autocast_seen.add(torch.is_autocast_enabled("cpu")))

        def on_train_start(self, trainer, pl_module):
            ns_dtypes.add(trainer.optimizers[0].ns_dtype)

        def on_fit_end(self, trainer, pl_module):
            self.hook.remove()

    # on the CPU: on CUDA "auto" is always bf16, and a machine with a GPU would train there
    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         **dict(TINY_TRAIN, epochs=1, precision="auto", accelerator="cpu", optimizer="muon"))
    result = train(cfg, callbacks=[WatchForward()])
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["precision_used"] == expected
    assert autocast_seen == {expected == "bf16-mixed"}
    assert ns_dtypes == {torch.bfloat16 if expected == "bf16-mixed" else None}


def test_precision_auto_is_measured_once_per_machine(monkeypatch):
    """The launching process measures and exports its choice; the DDP processes it starts
    (LOCAL_RANK 1, 2, ...) take that choice instead of timing a product of their own."""
    import vitkit.train.precision as precision

    monkeypatch.setenv(precision.AUTO_CHOICE_ENV, "unset")  # restored after the test
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 2.0)
    assert precision.resolve_precision("auto", cuda=False) == "bf16-mixed"
    assert os.environ[precision.AUTO_CHOICE_ENV] == "bf16-mixed"

    def must_not_measure():
        raise AssertionError("a launched process measured again")

    monkeypatch.setattr(precision, "bf16_speedup", must_not_measure)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert precision.resolve_precision("auto", cuda=False) == "bf16-mixed"
    monkeypatch.setenv(precision.AUTO_CHOICE_ENV, "32-true")
    assert precision.resolve_precision("auto", cuda=False) == "32-true"
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 1.0)  # nothing inherited: measure
    monkeypatch.delenv(precision.AUTO_CHOICE_ENV)
    assert precision.resolve_precision("auto", cuda=False) == "32-true"


def test_precision_defaults_and_names():
    from vitkit.train.precision import resolve_precision

    assert resolve_precision(None, cuda=False) == "32-true"  # the same numbers on every CPU
    assert resolve_precision(None, cuda=True) == resolve_precision("auto", cuda=True) == "bf16-mixed"
    assert resolve_precision("32-true", cuda=True) == "32-true"
    with pytest.raises(ValueError, match=r"precision='bf16': must be one of .*'bf16-mixed'"):
        resolve_config(None, data="unused", precision="bf16")
    with pytest.raises(ValueError, match=r"precision='bf16-true': must be one of"):  # would cast the weights only
        resolve_config(None, data="unused", precision="bf16-true")


def test_every_shipped_recipe_resolves_to_a_valid_model():
    from vitkit.train.config import recipe_names

    names = recipe_names()
    assert {"cifar10-quick", "cifar10-vit-30m", "cifar10-hybrid-30m", "seed-ti16-finetune"} <= set(names)
    from vitkit.weights.hub import PRETRAINED

    for name in names:
        cfg = resolve_config(name, data="unused")
        if cfg.model is None:  # fine-tuning: the model is the --init weights' own, a known name or the user's file
            assert name.startswith("finetune") and (cfg.init is None or cfg.init in PRETRAINED), name
            continue
        model_cfg = vitkit.get_config(cfg.model, **cfg.model_args)
        assert model_cfg.embed_dim > 0, name
    assert resolve_config("cifar10-vit-30m").time_budget == 1800.0  # "30m" in the file
    assert resolve_config("cifar10-hybrid-30m").model_args == {"stem": "conv", "stem_depth": 2, "patch_drop_rate": 0.75}


class SignalAt(L.Callback):
    """Sends this process a signal after a given global step: the real stop path, in-process."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _weights(run_dir):
    state = torch.load(run_dir / "last.ckpt", weights_only=True)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("stop_step,val_every", [(4, 1), (7, 1), (9, 3)],
                         ids=["last-batch-of-epoch", "mid-epoch", "last-batch-of-an-unvalidated-epoch"])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, color_folder, stop_step, val_every):
    """SIGTERM mid-run (exit 143 path), then --resume: the same weights, optimizer and lr as one go.

    90 training images in batches of 16 make 5 steps an epoch. The signal arrives during step
    stop_step + 1, which completes before the checkpoint (5: the last batch of epoch 1; 8: mid-epoch).
    EMA, label smoothing and stochastic depth are on, so every piece of state has to survive. With
    val_every 3 and the signal in step 10, epoch 2 has no validation to wait for: its checkpoint is
    written at its end.
    """
    settings = dict(TINY_TRAIN, ema=0.9, label_smoothing=0.1, drop_path_rate=0.1, val_every=val_every)
    whole = resolve_config(None, data=str(color_folder), out=str(tmp_path / "whole"), val_fraction=0.25, **settings)
    train(whole)
    split = resolve_config(None, data=str(color_folder), out=str(tmp_path / "split"), val_fraction=0.25, **settings)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(split, callbacks=[SignalAt(stop_step)])
    assert stopped.value.exit_code == 143
    interrupted = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert interrupted["global_step"] == stop_step + 1
    # the batches done, as the plan counted them and the loader's saved state says (5 batches an epoch)
    epoch, done = stop_step // 5, stop_step % 5 + 1
    assert interrupted["run_plan"]["position"] == [epoch, done]
    loader_state = interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["completed"]) == (epoch, done)
    train(split, resume=tmp_path / "split")

    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a["global_step"] == b["global_step"] == 15
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for name in sa:
            assert torch.equal(sa[name], sb[name])
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    ra, rb = read_rows(tmp_path / "whole" / "metrics.csv"), read_rows(tmp_path / "split" / "metrics.csv")
    assert [r["val_acc"] for r in ra] == [r["val_acc"] for r in rb]


def test_resuming_a_checkpoint_grouped_otherwise_names_the_file_and_init(tmp_path, color_folder, trained_run):
    """A checkpoint whose optimizer groups differ from today's (an earlier vitkit's) is refused before
    anything trains, with its path and the --init way on, not torch's bare group-size error."""
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    state = torch.load(trained_run.run_dir / "last.ckpt", weights_only=True)
    groups = state["optimizer_states"][0]["param_groups"]
    assert len(groups) >= 2
    groups[0]["params"] += groups.pop(1)["params"]  # one group fewer, as an earlier grouping would save
    torch.save(state, run_dir / "last.ckpt")
    cfg = resolve_config(None, data=str(color_folder), out=str(run_dir), val_fraction=0.25,
                         **dict(TINY_TRAIN, epochs=4))
    with pytest.raises(ValueError, match=r"last\.ckpt.*cannot be resumed.*--init .*last\.ckpt"):
        train(cfg, resume=run_dir)


@pytest.mark.slow
def test_two_process_ddp_completes(tmp_path, color_folder):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "vitkit.cli.main", "train", "--data", str(color_folder), "--out", str(out),
               "--model", "cifar-mini", "--img-size", "16", "--depth", "1", "--epochs", "1", "--batch-size", "8",
               "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--precision", "auto",
               "--no-progress"]
    from vitkit.train.precision import AUTO_CHOICE_ENV

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop(AUTO_CHOICE_ENV, None)  # as on a fresh shell: the launcher measures
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "best.ckpt").is_file() and (out / "model.safetensors").is_file()
    assert "best val_acc" in done.stdout
    # One measurement for both processes: the second takes the launcher's choice.
    assert (done.stdout + done.stderr).count("precision auto: bf16 matrix products run") == 1


def _simulate_budget(step_seconds, deadline=100.0, steps_per_epoch=50, val_seconds=1.0, val_every=1):
    """Drives TimeBudget with a fake clock: step_seconds(step) is each step's cost, validation runs
    where the run plan has it (the first and every val_every-th epoch's end, and the stop), and the run
    stops where the plan ends it, as ViTClassifier does. Returns (stop step, stop time, the planned
    total after each step)."""
    from types import SimpleNamespace

    from vitkit.train.callbacks import TimeBudget

    now = [0.0]
    budget = TimeBudget(deadline, clock=lambda: now[0])
    trainer = SimpleNamespace(global_step=0, should_stop=False)
    plan = RunPlan(batches_per_epoch=steps_per_epoch, epochs=10, val_every=val_every, epochs_end_run=False)
    module = SimpleNamespace(plan=plan, val_batches=SimpleNamespace(indices=range(200)),
                             cfg=SimpleNamespace(batch_size=10))
    plans = []
    while not trainer.should_stop:
        now[0] += step_seconds(trainer.global_step)
        trainer.global_step += 1
        budget.on_train_batch_end(trainer, module)
        plans.append(plan.budgeted_steps)
        if plan.ends_at(trainer.global_step):
            trainer.should_stop = True
        epoch, index = divmod(trainer.global_step - 1, steps_per_epoch)
        if plan.validates_after(epoch, index, trainer.global_step, trainer.should_stop):
            now[0] += val_seconds
            budget.validated(val_seconds)
    return trainer.global_step, now[0], plans


@pytest.mark.parametrize("slowdown_at", [None, 150, 400])
def test_time_budget_replans_when_the_machine_slows_down(slowdown_at):
    """Steps of 0.1 s that become 0.3 s part-way (another process took a core): the plan follows
    the measured speed, so the run stops at its planned step (the cosine's end), with the reserve for
    the final validation and export left, and never by hitting the deadline."""
    def step_seconds(step):
        return 0.3 if slowdown_at is not None and step >= slowdown_at else 0.1

    stop_step, stop_time, plans = _simulate_budget(step_seconds)
    assert stop_step == plans[-1]
    # Lightning sets a step's lr before the callback re-plans, so the last step ran on the plan made
    # after the one before it; the gradual re-plan has it at the cosine's end all the same.
    last_lr = lr_multiplier(stop_step - 1, 0, plans[-2], 0.0, "cosine")
    assert last_lr < 0.01, f"the last step ran at {last_lr:.3f} of the peak lr"
    assert 90.0 < stop_time < 100.0 - 2 * 1.0 - 5.0 + 1.0  # the reserve (2 validations + 5 s) is kept
    if slowdown_at is None:
        assert stop_step > 700  # the budget is used, not wasted


def test_time_budget_schedule_only_moves_forward_when_the_speed_swings():
    """Step times swinging between 0.1 and 0.17 s every 80 steps, as a shared machine's did (437 to 760
    images/s from one epoch to the next): the fraction of the run done, which sets the lr and when
    mixing begins, must not step back, and the budget is still used to its end. Planned from a window
    of recent steps, it stepped back by 0.007 of the run here (in that machine's 2-hour run, once by 0.23)."""
    def step_seconds(step):
        return 0.17 if (step // 80) % 2 else 0.1

    stop_step, stop_time, plans = _simulate_budget(step_seconds, deadline=300.0)
    fractions = [step / plan for step, plan in enumerate(plans, start=1) if plan]
    backward = max(before - after for before, after in itertools.pairwise(fractions))
    assert backward < 1e-3, f"the schedule stepped back by {backward:.3f} of the run"
    # Validation comes in lumps the plan spreads over the epoch's steps: one may land past the
    # plan's aim (the reserve's second pass absorbs it), never the 5 s kept for the export.
    assert stop_step == plans[-1] and 290.0 < stop_time < 300.0 - 5.0


def test_time_budget_gives_the_validation_val_every_skips_to_training():
    """Validation of 3 s after every 0.2 s x 50 steps of training: every fourth epoch instead of
    every one, the plan counts only the passes that run, so the run trains into the time they left
    and still stops with the reserve kept (two passes and the export's 5 s), not at the deadline."""
    def step_seconds(step):
        return 0.2

    every_epoch, _, _ = _simulate_budget(step_seconds, deadline=400.0, val_seconds=3.0)
    stop_step, stop_time, plans = _simulate_budget(step_seconds, deadline=400.0, val_seconds=3.0, val_every=4)
    assert stop_step == plans[-1] and 400.0 - 2 * 3.0 - 5.0 - 3.0 < stop_time < 400.0 - 5.0
    # Validating every epoch: about 1,500 steps and 31 passes; the first and every fourth epoch: 11
    # passes, and the 60 s saved train 300 more steps of 0.2 s.
    assert stop_step - every_epoch >= 300, (every_epoch, stop_step)


def test_val_every_validates_every_nth_epoch_the_first_and_where_the_run_ends(tmp_path, color_folder):
    """val_every 3 over 4 epochs: epoch 1 (the first pass times validation for a time budget), not 2
    (its validation columns blank, not the last pass's), 3 as asked, 4 because the run ends there. With
    val_every 5 and max_steps in the middle of epoch 2, Lightning would not validate there at all; the
    run is validated at its last step, as it is where a callback of the user's (run after vitkit's own)
    stops it: the run's score is that of its final weights."""
    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "every3"), val_fraction=0.25,
                         **dict(TINY_TRAIN, epochs=4, val_every=3))
    result = train(cfg)
    rows = read_rows(result.run_dir / "metrics.csv")
    assert [bool(r["val_acc"]) for r in rows] == [True, False, True, True]
    assert not rows[1]["val_loss"] and not rows[1]["val_seconds"] and rows[1]["train_loss"]
    assert (result.run_dir / "best.ckpt").is_file() and result.best_val_acc is not None
    assert torch.load(result.run_dir / "last.ckpt", weights_only=True)["global_step"] == int(rows[-1]["step"])

    steps_per_epoch = int(rows[0]["step"])
    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "every5"), val_fraction=0.25,
                         **dict(TINY_TRAIN, val_every=5, max_steps=steps_per_epoch + 2))
    result = train(cfg)
    rows = read_rows(result.run_dir / "metrics.csv")
    assert [(int(r["step"]), bool(r["val_acc"])) for r in rows] == [(steps_per_epoch, True),
                                                                    (steps_per_epoch + 2, True)]
    assert result.best_val_acc == pytest.approx(float(rows[-1]["val_acc"]))

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == steps_per_epoch + 3:
                trainer.should_stop = True

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "stopped"), val_fraction=0.25,
                         **dict(TINY_TRAIN, val_every=5))
    result = train(cfg, callbacks=[StopAt()])
    rows = read_rows(result.run_dir / "metrics.csv")
    assert [(int(r["step"]), bool(r["val_acc"])) for r in rows] == [(steps_per_epoch, True),
                                                                    (steps_per_epoch + 3, True)]
    assert result.best_val_acc == pytest.approx(float(rows[-1]["val_acc"]))
    assert torch.load(result.run_dir / "last.ckpt", weights_only=True)["global_step"] == steps_per_epoch + 3
    with pytest.raises(ValueError, match="val_every=0"):
        resolve_config(None, data="unused", val_every=0)


@pytest.mark.slow
def test_time_budget_sizes_the_schedule(tmp_path, color_folder):
    """A 12 s budget on an injected clock on which every training step takes 0.2 s: the plan made from
    the measured step time is what the schedule spans, the run stops at its planned step (past
    epochs=1: the budget decides the length), and by the clock it ends with the reserve for the final
    validation and export left. The real clock plays no part, so a loaded machine changes nothing."""
    now = [0.0]
    seen: list[tuple[int, float]] = []

    class Tick(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            now[0] += 0.2

        def on_train_batch_end(self, trainer, module, *args):
            seen.append((module.plan.total_steps, lr_multiplier(trainer.global_step - 1, 6, module.plan.total_steps,
                                                                0.0, "cosine")))

        def on_train_end(self, trainer, module):
            seen.append((module.plan.budgeted_steps, trainer.global_step))

    settings = dict(TINY_TRAIN, epochs=1, batch_size=8)  # 11 steps an epoch
    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "budget"), val_fraction=0.25,
                         time_budget=12.0, **settings)
    result = train(cfg, callbacks=[Tick()], clock=lambda: now[0])
    planned, steps = seen[-1]
    # 3 warm-up and 20 measured steps before the first plan; then about (12 - 5 - 2 passes) / 0.2 steps
    assert planned is not None and steps == planned == result.steps_done and 23 < steps <= 35
    assert result.epochs_done > 1  # the budget, not epochs=1, decided the length
    assert seen[22][0] != seen[21][0] == 11  # the schedule spanned epochs=1 until the first plan (step 23)
    assert seen[-2][1] < 0.02  # the last step ran at the cosine's end
    assert now[0] <= 12.0 - 5.0 + 1e-6 and result.seconds == now[0]
    assert (tmp_path / "budget" / "best.ckpt").is_file()


def test_model_args_may_not_shadow_a_setting_of_their_own(tmp_path):
    """model_args: {drop_rate: 0.1} would be overridden by the top-level drop_rate (default 0)."""
    with pytest.raises(ValueError, match=r"'drop_rate'.*top level"):
        resolve_config(None, data=str(tmp_path), model_args={"drop_rate": 0.1})
    cfg = resolve_config(None, data=str(tmp_path), model_args={"patch_drop_rate": 0.5, "stem": "conv"})
    assert cfg.model_args == {"patch_drop_rate": 0.5, "stem": "conv"}


def test_model_args_are_checked_together_with_the_top_level_settings(tmp_path):
    """model_args {class_token: false} is valid only with global_pool: avg, which is set at the top."""
    from vitkit.train.run import build_model

    cfg = resolve_config(None, data=str(tmp_path), global_pool="avg", model_args={"class_token": False})
    model = build_model(cfg, num_classes=10, data_size=32)
    assert model.cls_token is None and model.global_pool == "avg"


def test_compile_falls_back_to_eager_where_the_cpu_has_no_cpp_compiler(tmp_path, monkeypatch, caplog):
    """A recipe with compile: true must still train on a laptop without g++ (inductor's CPU kernels
    need one), eagerly and with a warning that names the fix; with a compiler it compiles."""
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    from vitkit.train.run import build_model, compile_model

    def no_compiler() -> str:
        raise InvalidCxxCompiler

    cfg = resolve_config(None, data=str(tmp_path), model="cifar-mini")
    model = build_model(cfg, num_classes=10, data_size=32)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with caplog.at_level("WARNING", logger="vitkit"):
        assert compile_model(model, cuda=False) is False
    assert model._compiled_call_impl is None
    assert "InvalidCxxCompiler" in caplog.text and "compile: false" in caplog.text
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert compile_model(model, cuda=False) is True
    assert model._compiled_call_impl is not None  # compiled lazily, on the first forward


@pytest.mark.slow
def test_patch_drop_end_anneals_the_kept_tokens(tmp_path, color_folder):
    """patch_drop_rate 0.75 falling to 0: the first step keeps 4 of 16 patches, later steps keep more,
    never fewer, and the last ones nearly all; validation always sees all 16."""
    seen: list[tuple[bool, int]] = []

    class CountTokens(L.Callback):
        def on_fit_start(self, trainer, module):
            module.model.blocks[0].register_forward_pre_hook(
                lambda block, args: seen.append((block.training, args[0].shape[1] - 1)))

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         patch_drop_end=0.0, model_args={"patch_drop_rate": 0.75}, **TINY_TRAIN)
    train(cfg, callbacks=[CountTokens()])
    kept = [n for training, n in seen if training]
    assert len(kept) == 15 and kept[0] == 4 and kept[-1] >= 14
    assert kept == sorted(kept) and len(set(kept)) > 5
    assert {n for training, n in seen if not training} == {16}
    with pytest.raises(ValueError, match="patch_drop_end"):
        resolve_config(None, data="unused", patch_drop_end=1.0)


@pytest.mark.slow
def test_patch_drop_until_ends_the_run_on_every_patch(tmp_path, color_folder):
    """patch_drop_rate 0.75 until 0.6 of a 15-step run: steps 0..8 keep 4 of 16 patches, 9..14 all 16."""
    seen: list[int] = []

    class CountTokens(L.Callback):
        def on_fit_start(self, trainer, module):
            module.model.blocks[0].register_forward_pre_hook(
                lambda block, args: seen.append(args[0].shape[1] - 1) if block.training else None)

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         patch_drop_until=0.6, model_args={"patch_drop_rate": 0.75}, **TINY_TRAIN)
    train(cfg, callbacks=[CountTokens()])
    assert seen == [4] * 9 + [16] * 6
    with pytest.raises(ValueError, match="patch_drop_until"):
        resolve_config(None, data="unused", patch_drop_until=0.0)


@pytest.mark.slow
def test_progressive_resizing_grows_the_training_images_to_full_size(tmp_path, color_folder):
    """resize_start 8 of 16-pixel images until 0.6 of a 15-step run: the side grows 8 -> 12 -> 16
    (multiples of the patch size 4) by step 9 and stays there; validation sees 16 throughout."""
    seen: list[tuple[bool, int]] = []

    class WatchSizes(L.Callback):
        def on_fit_start(self, trainer, module):
            module.model.patch_embed.register_forward_pre_hook(
                lambda embed, args: seen.append((embed.training, args[0].shape[-1])))

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         resize_start=8, resize_until=0.6, **TINY_TRAIN)
    result = train(cfg, callbacks=[WatchSizes()])
    assert [side for training, side in seen if training] == [8] * 5 + [12] * 4 + [16] * 6
    assert {side for training, side in seen if not training} == {16}
    assert result.best_val_acc > 0.5  # chance is 1/3
    with pytest.raises(ValueError, match=r"resize_start=10: must be a multiple of the patch size 4"):
        train(resolve_config(None, data=str(color_folder), out=str(tmp_path / "bad"), val_fraction=0.25,
                             resize_start=10, **TINY_TRAIN))
    with pytest.raises(ValueError, match="resize_until"):
        resolve_config(None, data="unused", resize_until=0.0)


@pytest.mark.slow
def test_ema_horizon_mix_start_and_auto_augment_start_follow_the_runs_length(tmp_path, color_folder):
    """ema_horizon 0.2 of a 15-step run is a time constant of 3 steps (decay 2/3); mix_start 0.5
    leaves the first half of the steps unmixed and mixes every step after (mix_prob 1);
    auto_augment_start 0.2 leaves TrivialAugment out of the first fifth."""
    mixed: list[bool] = []
    strong: list[bool] = []
    modules = []

    def watch(augment, args, kwargs, output):
        mixed.append(output[1].ndim == 2)
        strong.append(kwargs["auto_augment"])

    class WatchTargets(L.Callback):
        def on_fit_start(self, trainer, module):
            modules.append(module)
            module.augment.register_forward_hook(watch, with_kwargs=True)

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         **dict(TINY_TRAIN, ema_horizon=0.2, mix_start=0.5, auto_augment_start=0.2,
                                augment={"hflip": True, "mixup_alpha": 0.8, "auto_augment": "trivial"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, callbacks=[WatchTargets()])
    assert not [w for w in caught if "eval mode" in str(w.message)]  # the EMA copy is eval on purpose
    assert mixed == [False] * 8 + [True] * 7  # steps 0..7 come before 0.5 * 15
    assert strong == [False] * 3 + [True] * 12  # steps 0..2 come before 0.2 * 15
    module = modules[0]
    assert module.ema_decay() == pytest.approx(1 - 1 / 3)
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert saved["vitkit"]["weights"] == "ema.module."
    ema = module.ema.module.state_dict()
    assert any(not torch.equal(v, ema[k]) for k, v in module.model.state_dict().items())
    with pytest.raises(ValueError, match="set one of them"):
        resolve_config(None, data="unused", ema=0.999, ema_horizon=0.05)
    with pytest.raises(ValueError, match="mix_start"):
        resolve_config(None, data="unused", mix_start=1.0)
    with pytest.raises(ValueError, match=r"auto_augment_start=1\.5"):
        resolve_config(None, data="unused", auto_augment_start=1.5)
    with pytest.raises(ValueError, match="add --auto-augment trivial"):
        resolve_config(None, data="unused", auto_augment_start=0.5)


def test_teacher_sees_the_students_pixels_in_its_own_normalisation_size_and_class_order(tmp_path):
    """A teacher trained at 16x16 with ImageNet statistics and classes in another order, teaching a
    student fed 32x32 CIFAR-normalised batches: its probabilities are those of its own preprocessing
    of the same pixels, columns in the student's class order."""
    from vitkit.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess
    from vitkit.model import VisionTransformer, get_config
    from vitkit.train.distill import load_teacher
    from vitkit.weights import save_vitkit

    torch.manual_seed(0)
    model = VisionTransformer(get_config("cifar-mini", img_size=16, depth=1, num_classes=3)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the head starts at zero: uniform probabilities
    save_vitkit(tmp_path / "teacher.safetensors", model, classes=["red", "blue", "green"],
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    teacher = load_teacher(tmp_path / "teacher.safetensors", ["blue", "green", "red"], CIFAR10_MEAN, CIFAR10_STD)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    got = teacher.probabilities(preprocess(images, 32, CIFAR10_MEAN, CIFAR10_STD))
    with torch.no_grad():
        expected = model(preprocess(images, 16, IMAGENET_MEAN, IMAGENET_STD)).softmax(-1)[:, [1, 2, 0]]
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert got.std(0).max() > 0.01  # the images are told apart, not a constant guess
    with pytest.raises(ValueError, match="missing from the teacher: \\['cyan'\\]"):
        load_teacher(tmp_path / "teacher.safetensors", ["blue", "green", "cyan"], CIFAR10_MEAN, CIFAR10_STD)


def _tiny_teacher_and_images(folder):
    """A 1-block teacher of 3 classes saved in folder (teacher.safetensors) and 5 random 16-pixel
    images (images.pt), both as loaded back."""
    from vitkit.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet
    from vitkit.model import VisionTransformer, get_config
    from vitkit.train.distill import load_teacher
    from vitkit.weights import save_vitkit

    if not (folder / "images.pt").is_file():
        torch.manual_seed(0)
        model = VisionTransformer(get_config("cifar-mini", img_size=16, depth=1, num_classes=3)).eval()
        torch.nn.init.normal_(model.head.weight, std=0.5)
        save_vitkit(folder / "teacher.safetensors", model, classes=["a", "b", "c"], mean=CIFAR10_MEAN,
                    std=CIFAR10_STD)
        torch.save(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8), folder / "images.pt")
    teacher = load_teacher(folder / "teacher.safetensors", ["a", "b", "c"], CIFAR10_MEAN, CIFAR10_STD)
    images = ImageSet(torch.tensor([0, 1, 2, 0, 1]), ["a", "b", "c"], torch.load(folder / "images.pt"))
    return teacher, images


def test_teacher_cache_answers_for_the_view_nearest_each_crop(tmp_path):
    """distill_cache asks the teacher once per image and grid view (offsets -3, 0, 3 for padding 4,
    flipped or not): a lookup returns exactly its answer on that view, and an off-grid crop the answer
    of the view within a pixel of it, with its own flip."""
    from vitkit.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet, crop_flip, preprocess
    from vitkit.train.distill import TeacherCache, cache_shifts

    assert cache_shifts(4) == (-3, 0, 3) and cache_shifts(0) == (0,) and cache_shifts(1) == (-1, 0, 1)
    teacher, images = _tiny_teacher_and_images(tmp_path)
    cache = TeacherCache(teacher, images, padding=4, hflip=True, image_size=16, mean=CIFAR10_MEAN,
                         std=CIFAR10_STD, batch_size=2)
    assert cache.probs.shape == (5, 18, 3) and cache.probs.dtype == torch.float16

    def asked(index, y, x, flip):
        one = [torch.tensor([v]) for v in (y, x, flip)]
        return teacher.probabilities(preprocess(crop_flip(images.images[index:index + 1], *one), 16,
                                                CIFAR10_MEAN, CIFAR10_STD))[0]

    indices = torch.tensor([4, 0, 2, 2, 1])
    offset_y, offset_x = torch.tensor([-3, 0, 3, 4, -2]), torch.tensor([3, 0, -3, 1, -4])
    flip = torch.tensor([True, False, True, False, True])
    got = cache.probabilities(indices, offset_y, offset_x, flip)
    on_grid = [(-3, 3), (0, 0), (3, -3), (3, 0), (-3, -3)]  # 4 -> 3, 1 -> 0, -2 -> -3, -4 -> -3
    for row, (i, (y, x), f) in enumerate(zip(indices.tolist(), on_grid, flip.tolist(), strict=True)):
        torch.testing.assert_close(got[row], asked(i, y, x, f), atol=1e-3, rtol=1e-3)  # fp16 storage
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # images and views told apart
    streamed = ImageSet(torch.tensor([0]), ["a", "b", "c"], paths=["x.png"], image_size=16)
    with pytest.raises(ValueError, match="streamed"):
        TeacherCache(teacher, streamed, 4, True, 16, CIFAR10_MEAN, CIFAR10_STD)
    with pytest.raises(ValueError, match="--teacher"):
        resolve_config(None, data="unused", distill_cache=True)
    with pytest.raises(ValueError, match="random_resized_crop"):
        resolve_config(None, data="unused", teacher="t", distill_cache=True, augment={"random_resized_crop": True})


def test_teacher_cache_file_is_read_back_for_the_same_teacher_and_images_only(tmp_path):
    """With a file the cache is written once and a second start (a resumed run) reads it without asking
    the teacher; another teacher, other labels or a damaged file make it ask again."""
    from vitkit.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet
    from vitkit.train.distill import TeacherCache

    teacher, images = _tiny_teacher_and_images(tmp_path)
    file = tmp_path / "run" / "teacher_cache.safetensors"

    def cache(images=images):
        return TeacherCache(teacher, images, padding=4, hflip=True, image_size=16, mean=CIFAR10_MEAN,
                            std=CIFAR10_STD, batch_size=2, file=file)

    first = cache()
    assert first.read_from is None and file.is_file()
    ask = teacher.probabilities
    teacher.probabilities = lambda x: pytest.fail("the teacher was asked although its answers were on disk")
    again = cache()
    assert again.read_from == file and torch.equal(again.probs, first.probs)
    teacher.probabilities = ask
    relabelled = ImageSet(images.labels.roll(1), images.classes, images.images)
    assert cache(relabelled).read_from is None  # and the file now holds the relabelled set's cache
    assert cache(relabelled).read_from == file
    with torch.no_grad():
        teacher.model.head.bias[0] += 2.0  # one class: a shift of all logits would change no probability
    other = cache(relabelled)
    assert other.read_from is None and not torch.equal(other.probs, first.probs)
    file.write_bytes(b"not a safetensors file")
    assert cache().read_from is None and cache().read_from == file


def _build_cache_share(rank, folder):
    """One process of test_teacher_cache_split_between_processes: its share, then the all-reduce."""
    import torch.distributed as dist

    from vitkit.data import CIFAR10_MEAN, CIFAR10_STD
    from vitkit.train.distill import TeacherCache

    torch.set_num_threads(1)
    store = folder / f"store{len(list(folder.glob('probs*.pt')))}"  # a fresh rendezvous file per spawn
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    teacher, images = _tiny_teacher_and_images(folder)
    cache = TeacherCache(teacher, images, padding=4, hflip=True, image_size=16, mean=CIFAR10_MEAN,
                         std=CIFAR10_STD, batch_size=2, rank=rank, world_size=2,
                         file=folder / "teacher_cache.safetensors")
    dist.barrier()  # both have looked for the file before either saves what it got
    torch.save(cache.probs, folder / f"probs{rank}{'-read' if cache.read_from else ''}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_teacher_cache_split_between_processes(tmp_path):
    """In distributed training each process labels its share of the images (2 and 3 of 5 here) and
    every process ends with the whole cache, the one a single process builds; started again, every
    process reads the file process 0 wrote."""
    import torch.multiprocessing as mp

    from vitkit.data import CIFAR10_MEAN, CIFAR10_STD
    from vitkit.train.distill import TeacherCache

    teacher, images = _tiny_teacher_and_images(tmp_path)
    alone = TeacherCache(teacher, images, padding=4, hflip=True, image_size=16, mean=CIFAR10_MEAN,
                         std=CIFAR10_STD, batch_size=2).probs
    mp.spawn(_build_cache_share, args=(tmp_path,), nprocs=2)
    first, second = (torch.load(tmp_path / f"probs{rank}.pt") for rank in (0, 1))
    assert torch.equal(first, second)
    torch.testing.assert_close(first, alone, atol=1e-3, rtol=0)
    assert (first.sum(-1) > 0.99).all()  # no image left out of both shares
    mp.spawn(_build_cache_share, args=(tmp_path,), nprocs=2)  # a resumed run: both read what process 0 wrote
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"probs{rank}-read.pt"), first)


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["teacher every step", "distill_cache"])
def test_student_learns_what_the_teacher_says_not_the_labels(tmp_path, color_folder, trained_run, cached, caplog):
    """With distill_weight 1 the labels do not enter the loss: a teacher whose class names are rotated
    (its green is blue, its red green, its blue red) makes the student answer as that teacher does,
    not as the labels say, whether it answers every step or once into its cache. The teacher's weights
    stay out of the student's checkpoint; its cache stays in the run directory, and a resumed run
    reads it back instead of asking the teacher again."""
    from vitkit.weights import load_vitkit, save_vitkit

    model, meta = load_vitkit(trained_run.run_dir / "model.safetensors")
    assert meta["classes"] == ["blue", "green", "red"]
    with torch.no_grad():  # a confident teacher (same answers, sharper probabilities): 3 epochs left it unsure
        model.head.weight.mul_(10)
        model.head.bias.mul_(10)
    rotated = tmp_path / "rotated.safetensors"
    save_vitkit(rotated, model, classes=["green", "red", "blue"], mean=meta["mean"], std=meta["std"])
    settings = dict(TINY_TRAIN, teacher=str(rotated), distill_weight=1.0, distill_cache=cached,
                    augment={"hflip": True, "crop_padding": 2})
    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "student"), val_fraction=0.25,
                         **dict(settings, epochs=4))
    result = train(cfg)
    validation = np.load(result.run_dir / "val_predictions.npz")
    student = torch.from_numpy(validation["probs"]).argmax(-1)
    labels = torch.from_numpy(validation["labels"])
    teacher = vitkit.load(rotated)  # classes in its own order: compare names, not indices
    said = [teacher.classes[i] for i in teacher.logits(torch.from_numpy(validation["images"])).argmax(-1)]
    answered = [["blue", "green", "red"][i] for i in student]
    truth = [["blue", "green", "red"][i] for i in labels]
    agree_teacher = sum(a == b for a, b in zip(answered, said)) / len(said)
    agree_labels = sum(a == b for a, b in zip(answered, truth)) / len(truth)
    assert agree_teacher >= 0.9 and agree_labels <= 0.5, (answered, said, truth)
    saved = torch.load(result.run_dir / "last.ckpt", weights_only=True)
    assert not [k for k in saved["state_dict"] if "teacher" in k]
    assert (result.run_dir / "teacher_cache.safetensors").is_file() == cached
    if cached:
        longer = resolve_config(None, data=str(color_folder), out=str(tmp_path / "student"), val_fraction=0.25,
                                **dict(settings, epochs=5))
        caplog.clear()  # the first run's messages, where an earlier test left the logger at INFO
        with caplog.at_level("INFO", logger="vitkit"):
            train(longer, resume=result.run_dir)
        assert "read the teacher's answers" in caplog.text and "the teacher labelled" not in caplog.text
    with pytest.raises(ValueError, match="distill_weight"):
        resolve_config(None, data="unused", distill_weight=0.0)
