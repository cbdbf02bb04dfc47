"""`vitkit bench`: what it counts and replays (its timings are for benchmarks, not for tests)."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import perturb
from vitkit import bench
from vitkit.bench import _Step, bench_model, count_flops, format_result, products_alone
from vitkit.model import VisionTransformer, get_config
from vitkit.model.fast import optimize

CPU = torch.device("cpu")


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
def test_products_alone_replays_exactly_the_operations_the_flop_count_counts(train):
    """Every counted call of a step (backward and oneDNN's inference projections included) is replayed,
    each as often as the step makes it: the replays' FLOPs equal the step's."""
    torch.manual_seed(0)
    step = _Step(optimize(VisionTransformer(get_config("cifar-mini", depth=2, img_size=16))), 4, CPU, train=train)
    alone = products_alone(step, CPU, repeats=1)
    assert alone["gflop"] * 1e9 == pytest.approx(count_flops(step), rel=1e-9)
    assert alone["ms"] > 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bench_reports_both_models_and_their_ceilings(precision, monkeypatch):
    # A small peak product: an AVX2 CPU emulates bf16, and its 2048-square one takes ~10 s.
    monkeypatch.setattr(bench, "matmul_peaks", functools.partial(bench.matmul_peaks, size=256))
    result = bench_model("cifar-mini", batch_size=4, against="timm", rounds=1, steps=1, precision=precision,
                         depth=1, img_size=16)
    assert result["precision"] == precision
    for key in ("vitkit", "timm"):
        for mode in ("train", "infer"):
            entry = result[key][mode]
            assert entry["images_per_s"] > 0 and entry["gflop_per_image"] > 0
            assert entry["products_alone_ms"] > 0 and entry["products_fraction_of_peak"] > 0
    assert set(result["ratio_vs_timm"]) == {"train", "infer"}
    text = format_result(result)
    assert text.count("products alone") == 4 and "of peak (the step's ceiling)" in text
    assert ("bf16 matmul peak" if precision == "bf16-mixed" else "fp32 matmul peak") in text
    assert result["matmul_peak_gflops"] == max(result["matmul_peaks"].values())  # the best library's
    assert "mm" in result["matmul_peaks"] and all(f"{k} " in text for k in result["matmul_peaks"])


def test_the_timm_twin_drops_the_same_patches_and_computes_the_same_logits():
    """--against timm times the same work: the twin takes the model's weights and its patch dropout
    (half the tokens dropped halves a training step's FLOPs); parts timm lacks are refused."""
    torch.manual_seed(0)
    ours = VisionTransformer(get_config("cifar-mini", depth=2, img_size=16, num_classes=5, patch_drop_rate=0.5))
    torch.nn.init.normal_(ours.head.weight)  # the zero head would make every logit 0, hiding any difference
    twin = bench.timm_twin(ours)
    x = torch.randn(3, 3, 16, 16)
    logits = optimize(ours).eval()(x)  # as the bench runs it
    assert logits.std() > 0
    torch.testing.assert_close(twin.eval()(x), logits, rtol=1e-5, atol=1e-5)
    whole = bench.timm_twin(VisionTransformer(get_config("cifar-mini", depth=2, img_size=16, num_classes=5)))
    dropped, kept = (count_flops(_Step(model, 4, CPU, train=True)) for model in (twin, whole))
    assert 0.4 < dropped / kept < 0.6
    # the parts of timm's families travel to the twin: layer scale, registers, a pre-norm, qk-norm
    family = dict(init_values=0.1, reg_tokens=2, no_embed_class=True, pre_norm=True, qk_norm=True)
    ours = VisionTransformer(get_config("cifar-mini", depth=2, img_size=16, num_classes=5, **family))
    perturb(ours)  # zero and one inits (head, layer scale, norms) would hide a wrong mapping
    logits = optimize(ours).eval()(x)
    assert logits.std() > 0
    torch.testing.assert_close(bench.timm_twin(ours).eval()(x), logits, rtol=1e-5, atol=1e-5)
    for option in ({"stem": "shifted"}, {"locality_attention": True}, {"gelu": "tanh"},
                   {"mlp_layer": "swiglu_packed"}):
        with pytest.raises(ValueError, match="without --against timm"):
            bench.timm_twin(VisionTransformer(get_config("cifar-mini", depth=1, img_size=16, **option)))


def test_bench_takes_model_options_from_the_command_line(monkeypatch, capsys):
    """`vitkit bench --model-arg KEY=VALUE` builds the model a recipe's model_args would."""
    import json

    from vitkit.cli.main import main

    monkeypatch.setattr(bench, "matmul_peaks", functools.partial(bench.matmul_peaks, size=256))
    options = ["depth=1", "img_size=16", "stem=shifted", "patch_drop_rate=0.5", "layer_norm_eps=1e-5"]
    argv = ["bench", "--model", "cifar-mini", "--batch-size", "4", "--rounds", "1", "--steps", "1", "--json"]
    assert main(argv + [word for option in options for word in ("--model-arg", option)]) == 0
    config = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]
    assert (config["depth"], config["img_size"], config["stem"], config["patch_drop_rate"]) == (1, 16, "shifted", 0.5)
    assert config["layer_norm_eps"] == 1e-5  # a float, though YAML alone would read 1e-5 as text


def test_bench_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="'16-mixed' is not one of 32-true, bf16-mixed"):
        bench_model("cifar-mini", precision="16-mixed", depth=1, img_size=16)


def test_every_library_timed_for_the_peak_computes_the_product():
    a, b = torch.randn(64, 32), torch.randn(32, 48)
    products = bench.square_products(a, b)
    assert "mm" in products
    for name, product in products.items():
        torch.testing.assert_close(product(), a @ b, msg=name)


def test_the_peak_stops_repeating_slow_products(monkeypatch):
    """Two products, then no more once `seconds` have passed: bf16 on an AVX2 CPU is ~100x slower."""

    class Clock:  # every reading a second later
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            cls.now += 1.0
            return cls.now

    syncs = []
    monkeypatch.setattr(bench, "time", Clock)
    monkeypatch.setattr(bench, "_sync", syncs.append)  # called before and after each product
    libraries = len(bench.matmul_peaks(CPU, size=8, repeats=8, seconds=0.5))  # each timed apart
    assert len(syncs) == 2 * 2 * libraries
    syncs.clear()
    bench.matmul_peaks(CPU, size=8, repeats=8, seconds=100.0)
    assert len(syncs) == 2 * 8 * libraries
