"""The model: parity with timm, named variants, parameter counts, the fast CPU path against the reference, compile,
gradients, bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import vitkit
from conftest import OpNames
from vitkit.model import VisionTransformer, resample_pos_embed, sincos_pos_embed_2d
from vitkit.weights import load_vitkit, save_vitkit

timm = pytest.importorskip("timm")

PARITY_CASES = [
    ("vit_tiny_patch16_224", "Ti/16", {}),
    ("vit_small_patch16_224", "S/16", {}),
    ("vit_base_patch16_224", "B/16", {}),
    ("vit_base_patch16_384", "B/16@384", {}),
    ("vit_tiny_patch16_224", "cifar-tiny", dict(img_size=32, patch_size=4, depth=6, num_classes=10)),
]


@pytest.mark.parametrize("timm_name,name,timm_overrides", PARITY_CASES, ids=[c[1] for c in PARITY_CASES])
def test_logits_equal_timm(timm_name, name, timm_overrides):
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False, **timm_overrides).eval()
    model = vitkit.create_model(name, num_classes=reference.num_classes).eval()
    model.load_state_dict(reference.state_dict(), strict=True)  # same names, same shapes
    size = model.config.img_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        diff = (logits - reference(x)).abs().max().item()
        feats = (model.forward_features(x) - reference.forward_features(x)).abs().max().item()
    assert logits.std() > 0  # timm initialises its head at random: the logits differ from each other
    assert diff <= 1e-5, f"{name}: logits differ from timm's by {diff}"
    assert feats <= 1e-5


def test_avg_pool_matches_timm():
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                                  num_classes=5, global_pool="avg").eval()
    model = vitkit.create_model("Ti/4@32", depth=2, num_classes=5, global_pool="avg").eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert logits.std() > 0 and (logits - reference(x)).abs().max() <= 1e-5


def test_forward_intermediates_match_timm():
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4).eval()
    model = vitkit.create_model("Ti/4@32", depth=4).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kwargs in (dict(indices=2), dict(indices=[0, -1], norm=True), dict(output_fmt="NLC")):
            final, ours = model.forward_intermediates(x, **kwargs)
            ref_final, theirs = reference.forward_intermediates(x, **kwargs)
            assert torch.allclose(final, ref_final, atol=1e-5)
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
        only = model.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NLC")
        assert len(only) == 1 and only[0].shape == (2, 64, 192)


# The table; timm's 630.76M for H/14 is its headless (num_classes=0) in21k count.
@pytest.mark.parametrize(
    "name,num_classes,expected", [("B/16", 1000, 86.57), ("L/16", 1000, 304.33), ("H/14", 0, 630.76),
                                  ("H/14", 1000, 632.05)]
)
def test_parameter_counts_on_meta(name, num_classes, expected):
    count = vitkit.count_parameters(name, num_classes=num_classes, img_size=224)
    assert round(count / 1e6, 2) == expected


@pytest.mark.parametrize("timm_name", ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"])
def test_parameter_counts_equal_timm(timm_name):
    with torch.device("meta"):
        reference = timm.create_model(timm_name, num_classes=1000)
    assert vitkit.count_parameters(timm_name) == sum(p.numel() for p in reference.parameters())


def test_names_decode_alike():
    a = vitkit.get_config("vit_base_patch16_384")
    b = vitkit.get_config("B/16@384")
    assert a == b and a.img_size == 384 and a.patch_size == 16 and a.embed_dim == 768
    c = vitkit.get_config("S/16", img_size=64, num_classes=10, depth=3)
    assert (c.img_size, c.num_classes, c.depth, c.num_patches) == (64, 10, 3, 16)
    assert "B/16" in vitkit.list_models() and "cifar-tiny" in vitkit.list_models()
    for name in vitkit.list_models():
        vitkit.get_config(name)


def test_attention_path_equals_fused_and_returns_weights():
    torch.manual_seed(0)
    model = vitkit.create_model("cifar-tiny", depth=3).eval()
    torch.nn.init.normal_(model.head.weight)  # a zero head would hide differences
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, maps = model.forward_attention(x)
        assert logits.std() > 0 and torch.allclose(logits, model(x), rtol=1e-5, atol=1e-4)
    assert len(maps) == 3
    assert maps[0].shape == (2, 3, 65, 65)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 3, 65), atol=1e-5)


def _random_model(name: str = "cifar-mini", **overrides) -> VisionTransformer:
    """A seeded model whose head and biases are random: the paper's zero head would make every logit 0,
    and zero biases would hide a projection that drops its bias."""
    torch.manual_seed(0)
    model = vitkit.create_model(name, **overrides)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    _randomize_biases(model)
    return model


def _logits_and_gradients(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(x)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == expected.keys()
    for name, reference in expected.items():
        assert reference.abs().max() > 0, f"{name}: no gradient, nothing is compared"
        diff = (grads[name] - reference).abs().max().item()
        assert diff <= 1e-4 * reference.abs().max().item() + 1e-8, (name, diff)


FAST_CASES = {
    "class-token": {},
    "avg-pool": {"global_pool": "avg"},
    "locality": {"locality_attention": True},
    "shifted-stem": {"stem": "shifted"},
    "conv-stem": {"stem": "conv"},
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("overrides", FAST_CASES.values(), ids=FAST_CASES.keys())
def test_the_fast_path_computes_the_reference_logits_and_gradients(overrides, mode):
    """optimize() (head-by-head attention in CPU training, oneDNN's projections in inference where they
    pay, the class token alone in the last block) computes the reference's logits and gradients, and
    without gradients its logits."""
    from vitkit.model.fast import optimize

    reference = _random_model(depth=3, **overrides).train(mode == "train")
    fast = optimize(copy.deepcopy(reference))
    x = torch.randn(4, 3, 32, 32)
    logits, grads = _logits_and_gradients(reference, x)
    fast_logits, fast_grads = _logits_and_gradients(fast, x)
    assert logits.std() > 0
    torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=1e-5)
    _assert_same_gradients(fast_grads, grads)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("explicit_max_tokens", [128, 0], ids=["explicit-attention", "sdpa"])
def test_fast_training_matches_the_full_computation_and_timm(monkeypatch, explicit_max_tokens):
    """The fast training forward (the class token alone in the last block, explicit attention for short
    sequences or the fused kernel) gives the logits and every gradient of the full computation (all
    tokens through every block, fused attention), and timm's training-mode logits."""
    from vitkit.model import fast

    monkeypatch.setattr(fast, "EXPLICIT_ATTENTION_MAX_TOKENS", explicit_max_tokens)
    model = fast.optimize(_random_model(depth=3))
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3,
                                  embed_dim=128, num_heads=4, num_classes=10)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)

    fast_logits, fast_grads = _logits_and_gradients(model, x)
    monkeypatch.setattr(fast, "EXPLICIT_ATTENTION_MAX_TOKENS", 0)
    model.zero_grad()
    full = model.forward_head(model.forward_features(x))
    full.square().sum().backward()
    timm_logits = reference(x)

    assert full.std() > 0
    assert torch.allclose(fast_logits, full, atol=1e-6) and torch.allclose(fast_logits, timm_logits, atol=1e-5)
    _assert_same_gradients(fast_grads, {n: p.grad for n, p in model.named_parameters()})


def test_kernels_are_chosen_in_one_place_from_the_call():
    """fast.kernels: head by head in CPU training on short sequences, batched under bf16 autocast, the
    fused kernel on long ones and in inference (projections through oneDNN there where it pays in
    that dtype), and nothing of its own off the CPU."""
    from vitkit.model.fast import Kernels, kernels, onednn_linear_pays

    short, long = torch.randn(2, 65, 8), torch.randn(2, 129, 8)
    assert kernels(short) == Kernels(None, "head_by_head") and kernels(long) == Kernels(None, "fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels(short) == Kernels(None, "batched")
        with torch.no_grad():
            assert kernels(short) == Kernels(torch.bfloat16 if onednn_linear_pays(torch.bfloat16) else None, "fused")
    with torch.no_grad():
        assert kernels(short) == Kernels(torch.float32 if onednn_linear_pays(torch.float32) else None, "fused")
        assert kernels(short.double()) == Kernels(None, "fused")
    assert kernels(torch.empty(2, 65, 8, device="meta")) is None


@pytest.mark.parametrize("num_queries", [None, 1], ids=["all-tokens", "class-token-only"])
def test_cpu_training_attention_in_bf16_matches_the_fused_kernel(monkeypatch, num_queries):
    """CPU training in bf16 autocast takes batched explicit attention, in fp32 head by head: both
    must compute the fused kernel's function, gradients included, to bf16's precision."""
    from vitkit.model import fast

    torch.manual_seed(0)
    attn = fast.FastAttention(64, 4, qkv_bias=True, attn_drop=0.0, proj_drop=0.0)
    x = torch.randn(2, 17, 64)

    def run(attention: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(fast, "kernels", lambda x: fast.Kernels(None, attention))
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, num_queries).float()
        out.square().sum().backward()
        return out, [p.grad.clone() for p in attn.parameters()]

    fused, fused_grads = run("fused")
    assert fused.std() > 0
    for explicit in (run("batched"), run("head_by_head")):
        out, grads = explicit
        assert out.shape == fused.shape == (2, num_queries or 17, 64)
        assert (out - fused).abs().max() <= 0.02 * fused.abs().max()
        for grad, reference in zip(grads, fused_grads):
            assert (grad - reference).abs().max() <= 0.03 * reference.abs().max()


@pytest.mark.parametrize("num_queries", [None, 1], ids=["all-tokens", "class-token-only"])
def test_locality_self_attention_on_every_path(monkeypatch, num_queries):
    """locality_attention: softmax(q k^T * learned scale) with each token's own key masked out, the
    same function on the reference (fused kernel), head by head (fp32) and batched (bf16 autocast)
    paths, with the gradient reaching the scale; checked against the definition written out."""
    from vitkit.model import fast

    torch.manual_seed(0)
    attn = fast.FastAttention(64, 4, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, locality=True)
    with torch.no_grad():
        attn.scale.fill_(0.4)  # not the 1/sqrt(16) it starts at, so a path ignoring it would show
    x = torch.randn(2, 17, 64)
    q, k, v = (attn.qkv(x).unflatten(-1, (3, 4, 16)).permute(2, 0, 3, 1, 4))  # (B, heads, tokens, 16) each
    scores = (q @ k.transpose(-2, -1) * 0.4).masked_fill(torch.eye(17, dtype=torch.bool), float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, 64))[:, :num_queries]
    assert expected.std() > 0

    def run(attention: str, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(fast, "kernels", lambda x: fast.Kernels(None, attention))
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = attn(x, num_queries).float()
        out.square().sum().backward()
        return out, attn.scale.grad.clone()

    fused, fused_grad = run("fused", False)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert fused_grad.abs() > 0
    head_by_head, grad = run("head_by_head", False)
    torch.testing.assert_close(head_by_head, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, fused_grad, rtol=1e-4, atol=1e-6)
    batched, grad = run("batched", True)
    assert (batched - expected).abs().max() <= 0.02 * expected.abs().max()
    assert (grad - fused_grad).abs() <= 0.05 * fused_grad.abs()
    _, weights = attn.forward_with_attention(x)
    assert weights.diagonal(dim1=-2, dim2=-1).abs().max() == 0  # no token attends to itself
    model = vitkit.create_model("cifar-mini", depth=1, locality_attention=True)
    assert "blocks.0.attn.scale" in model.state_dict() and "blocks.0.attn.scale" not in vitkit.create_model(
        "cifar-mini", depth=1).state_dict()


PATHS = ["reference", "fast"]


@pytest.mark.parametrize("path", PATHS)
def test_forward_is_the_head_of_the_features_on_every_path(path):
    """forward(x) == forward_head(forward_features(x)) in training and evaluation, with and without
    gradients, on the reference and the fast path (which computes the last block's class token alone)."""
    from vitkit.model.fast import optimize

    model = _random_model(depth=2)
    if path == "fast":
        optimize(model)
    x = torch.randn(3, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                logits = model(x)
                assert logits.std() > 0
                torch.testing.assert_close(logits, model.forward_head(model.forward_features(x)), rtol=1e-5,
                                           atol=1e-5, msg=f"training={training}, grad={grad}")


@pytest.mark.parametrize("path", PATHS)
def test_a_forward_hook_on_the_last_block_sees_every_token(path, monkeypatch):
    """Hooks on the last block (or on a part of it) see all 1 + 64 tokens on either path, and the
    logits do not change; without hooks the fast path does skip the patch tokens' work."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitkit.model import fast
    from vitkit.model.fast import optimize

    monkeypatch.setattr(fast, "onednn_linear_pays", lambda dtype: False)  # F.linear, which the counter counts
    model = _random_model(depth=2).eval()
    if path == "fast":
        optimize(model)
    x = torch.randn(3, 3, 32, 32)

    def flops_and_logits() -> tuple[int, torch.Tensor]:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            logits = model(x)
        return counter.get_total_flops(), logits

    unhooked_flops, logits = flops_and_logits()
    assert logits.std() > 0
    seen: list[tuple[int, ...]] = []
    for module in (model.blocks[-1], model.blocks[-1].mlp.fc2):
        seen.clear()
        handle = module.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
        hooked_flops, hooked_logits = flops_and_logits()
        handle.remove()
        assert seen == [(3, 65, 128)]
        torch.testing.assert_close(hooked_logits, logits, rtol=1e-5, atol=1e-5)
        assert (unhooked_flops < hooked_flops) == (path == "fast")


def test_optimize_swaps_classes_in_place_and_keeps_the_state_dict(tmp_path):
    """optimize: in place, idempotent, the same state dict (so old checkpoints load either way), a copy
    (the EMA's) and a pickle stay fast; the head stays an nn.Linear; anything else is refused."""
    from vitkit.model.fast import FastAttention, FastBlock, FastLinear, FastMlp, FastVisionTransformer, optimize

    model = _random_model(depth=2, stem="shifted")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimize(model) is model
    classes = [type(m) for m in model.modules()]
    assert optimize(model) is model and [type(m) for m in model.modules()] == classes
    assert type(model) is FastVisionTransformer and isinstance(model, VisionTransformer)
    block = model.blocks[0]
    assert (type(block), type(block.attn), type(block.mlp)) == (FastBlock, FastAttention, FastMlp)
    assert {type(m) for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)} == {FastLinear}
    assert type(model.patch_embed.proj) is FastLinear and type(model.head) is torch.nn.Linear
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    reference = vitkit.create_model("cifar-mini", depth=2, stem="shifted")
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.eval()(x)
        assert expected.std() > 0
        for twin in (copy.deepcopy(model), _pickled(model, tmp_path / "model.pt")):
            assert [type(m) for m in twin.modules()] == classes
            torch.testing.assert_close(twin.eval()(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="takes a vitkit VisionTransformer, got Linear"):
        optimize(torch.nn.Linear(2, 2))


def _pickled(model: torch.nn.Module, path) -> torch.nn.Module:
    torch.save(model, path)
    return torch.load(path, weights_only=False)


def test_off_the_cpu_the_fast_path_runs_the_reference_ops():
    """On another device (here the meta device, which runs no kernel) an optimized model dispatches
    exactly the reference's operations, in training and inference, but for the class-token-only last
    block, which pays on any device: with average pooling (where it does not apply) the operations are
    the same; with the class token, fewer, and the last block's projections take one row per image."""
    from vitkit.model.fast import optimize

    for pool in ("avg", "token"):
        reference = vitkit.create_model("cifar-mini", depth=2, global_pool=pool).to("meta")
        fast = optimize(copy.deepcopy(reference))
        x = torch.randn(2, 3, 32, 32, device="meta")
        for grad in (True, False):
            calls = []
            for model in (reference, fast):
                with torch.set_grad_enabled(grad), OpNames() as ops:
                    model(x).sum().backward() if grad else model(x)
                calls.append(ops.names)
            assert len(calls[0]) > 50, grad
            if pool == "avg":
                assert calls[0] == calls[1], grad
            else:
                assert calls[0] != calls[1] and "mkldnn" not in " ".join(calls[1]), grad


def test_gradient_checkpointing_gives_the_same_gradients():
    """set_grad_checkpointing (timm's method): each block recomputed in the backward pass, the same
    logits and gradients as without, on the reference and the fast path."""
    from vitkit.model.fast import optimize

    for model in (_random_model(depth=2), optimize(_random_model(depth=2))):
        x = torch.randn(2, 3, 32, 32)
        logits, grads = _logits_and_gradients(model, x)
        model.set_grad_checkpointing()
        assert model.grad_checkpointing
        again, checkpointed = _logits_and_gradients(model, x)
        assert logits.std() > 0
        torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)
        _assert_same_gradients(checkpointed, grads)
        model.set_grad_checkpointing(False)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = vitkit.create_model("cifar-mini", depth=2, drop_path_rate=0.1, drop_rate=0.1)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a zero head stops gradients behind it
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("path", PATHS)
def test_compile_agrees_with_eager(path):
    from vitkit.model.fast import optimize

    model = _random_model(depth=2).eval()
    if path == "fast":
        optimize(model)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        expected = model(x)
        assert expected.std() > 0 and torch.allclose(compiled(x), expected, atol=1e-5)


def test_set_input_size_resamples_and_keeps_class_slot():
    torch.manual_seed(0)
    model = vitkit.create_model("Ti/4@32", depth=1)
    cls_slot = model.pos_embed[:, :1].clone()
    model.set_input_size(64)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 192)
    assert torch.equal(model.pos_embed[:, :1], cls_slot)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.config.img_size == 64
    with pytest.raises(ValueError, match="not divisible"):
        model.set_input_size(30)


@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_dynamic_img_size_runs_other_resolutions_as_set_input_size_does(pos_embed):
    """With dynamic_img_size a 32-pixel model takes 24-pixel images, with the same logits as a copy
    resized by set_input_size, and learned position embeddings get gradients through the resampling."""
    torch.manual_seed(0)
    model = vitkit.create_model("cifar-mini", depth=2, pos_embed=pos_embed)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    resized = copy.deepcopy(model)
    resized.set_input_size(24)
    x = torch.randn(2, 3, 24, 24)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 32, 32\)"):
        model(x)
    model.dynamic_img_size = True
    logits = model(x)
    assert logits.std() > 0
    torch.testing.assert_close(logits, resized(x))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model(x).square().sum().backward()
    assert (model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0) == (pos_embed == "learn")
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        model(torch.randn(2, 3, 26, 26))
    # forward_intermediates maps the input's grid (6 x 6 at 24 pixels), not the model's own (8 x 8)
    with torch.no_grad():
        _, maps = model.forward_intermediates(x, indices=1)
        _, expected = resized.forward_intermediates(x, indices=1)
    assert maps[0].shape == (2, 128, 6, 6) and maps[0].std() > 0
    torch.testing.assert_close(maps[0], expected[0])


def test_resample_identity_and_constant():
    pe = torch.randn(1, 1 + 49, 8)
    assert torch.equal(resample_pos_embed(pe, 7), pe)
    const = torch.ones(1, 1 + 16, 8)
    assert torch.allclose(resample_pos_embed(const, 8), torch.ones(1, 65, 8), atol=1e-5)


def test_sincos_option():
    model = vitkit.create_model("cifar-mini", pos_embed="sincos", depth=1)
    assert not model.pos_embed.requires_grad
    assert torch.allclose(model.pos_embed[0, 1:], sincos_pos_embed_2d(8, 128))
    assert "pos_embed" in model.state_dict()


def test_hybrid_conv_stem():
    """The hybrid: stride-2 3x3 convolutions down to one position per patch, then a 1x1 projection;
    the transformer after it is unchanged, and the model still trains end to end."""
    model = vitkit.create_model("cifar-hybrid", depth=2)
    stem = model.patch_embed.backbone
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2)] and convs[-1].out_channels == 192
    assert model.patch_embed.proj.kernel_size == (1, 1)
    x = torch.randn(4, 3, 32, 32)
    tokens = model.patch_embed(x)
    assert tokens.shape == (4, 64, 192)
    assert tokens.is_contiguous()  # the channels-last stem hands its tokens over without a copy
    nchw = model.patch_embed.proj(torch.nn.Sequential(*stem)(x)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, nchw, rtol=1e-4, atol=1e-5)  # the layout changes no result
    torch.nn.init.normal_(model.head.weight, std=0.02)
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert "patch_embed.backbone.1.running_mean" in model.state_dict()  # batch-norm statistics are saved
    assert vitkit.create_model("S/16", stem="conv", depth=1)(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match="power of two"):
        vitkit.create_model("S/14", stem="conv")


def test_deeper_conv_stem_adds_stride_1_convolutions_at_every_resolution():
    """stem_depth=2: one stride-1 conv at 32x32 (half the first halving's channels), then after each
    stride-2 conv one stride-1 conv at its resolution; depth 1 keeps the original layout and keys."""
    model = vitkit.create_model("cifar-mini", stem="conv", stem_depth=2, depth=1)
    convs = [m for m in model.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.patch_embed(torch.randn(2, 3, 32, 32)).shape == (2, 64, 128)
    shallow = vitkit.create_model("cifar-mini", stem="conv", depth=1).patch_embed.backbone
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(shallow.state_dict()) == ["0.weight", *(f"1.{k}" for k in bn), "3.weight", *(f"4.{k}" for k in bn)]
    assert [c.stride[0] for c in shallow if isinstance(c, torch.nn.Conv2d)] == [2, 2]
    with pytest.raises(ValueError, match="stem_depth=2 needs stem='conv'"):
        vitkit.create_model("cifar-mini", stem_depth=2)


@pytest.mark.parametrize("overrides", [
    {},
    {"stem": "conv", "stem_depth": 2, "pos_embed": "sincos"},
    {"stem": "shifted", "locality_attention": True, "global_pool": "avg"},
])
def test_init_weights_sets_every_tensor_of_a_meta_built_model(overrides):
    """A model built on the meta device holds no values; to_empty() then init_weights() must set every
    parameter and buffer: the ones a seed does not change (norms, the attention temperature, the zero
    head, sine-cosine positions) to exactly what a normal build has, the random ones to their scale."""
    torch.manual_seed(0)
    a = vitkit.create_model("cifar-mini", depth=2, **overrides)
    torch.manual_seed(1)
    b = vitkit.create_model("cifar-mini", depth=2, **overrides)
    with torch.device("meta"):
        model = vitkit.create_model("cifar-mini", depth=2, **overrides)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)
    model.init_weights()
    built, other, tensors = a.state_dict(), b.state_dict(), model.state_dict()
    assert tensors.keys() == built.keys()
    for key, tensor in tensors.items():
        if torch.equal(built[key], other[key]):  # the same whatever the seed: must be exactly that
            assert torch.equal(tensor, built[key]), key
        else:
            assert torch.isfinite(tensor).all(), key
            assert 0.7 < float(tensor.float().std() / built[key].float().std()) < 1.4, key


def test_shifted_patch_tokens(tmp_path):
    """stem='shifted': each token projects its patch together with the same patch of the image moved
    half a patch along the four diagonals (zeros where a shift leaves no pixel), layer-normalised;
    checked pixel by pixel against that definition, then trained end to end and saved and loaded."""
    model = vitkit.create_model("cifar-mini", stem="shifted", depth=1)
    stem = model.patch_embed.backbone
    x = torch.randn(2, 3, 32, 32)
    vectors = stem(x)
    assert vectors.shape == (2, 64, 5 * 3 * 4 * 4) and model.patch_embed(x).shape == (2, 64, 128)

    def moved(image, down, right):  # image[i - down, j - right], zero outside
        out = torch.zeros_like(image)
        for i in range(32):
            for j in range(32):
                if 0 <= i - down < 32 and 0 <= j - right < 32:
                    out[:, :, i, j] = image[:, :, i - down, j - right]
        return out

    views = torch.cat([x] + [moved(x, 2 * dy, 2 * dx) for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1))], dim=1)
    row, col = 3, 6  # token 3 * 8 + 6: pixels 12..15 x 24..27 of every view
    patch = views[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].reshape(2, -1)  # (B, 5C*p*p), as the stem
    torch.testing.assert_close(vectors[:, row * 8 + col], F.layer_norm(patch, (240,), eps=1e-5))

    torch.nn.init.normal_(model.head.weight, std=0.02)
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    save_vitkit(tmp_path / "spt.safetensors", model)  # its projection is a matrix, not a conv kernel
    loaded, _ = load_vitkit(tmp_path / "spt.safetensors")
    logits = model.eval()(x)
    assert logits.std() > 0
    torch.testing.assert_close(loaded(x), logits)
    assert vitkit.create_model("cifar-mini", stem="shifted", depth=1, patch_drop_rate=0.5).train()(x).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 2"):
        vitkit.create_model("cifar-mini", stem="shifted", patch_size=1)


def _randomize_biases(model: torch.nn.Module) -> None:
    """Zero-initialised biases would hide a projection that drops its bias."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)


@pytest.mark.parametrize("fused", [True, False], ids=["oneDNN", "BLAS"])
@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_inference_path_equals_the_training_path(gelu, fused, monkeypatch):
    """Optimized inference on the CPU runs the projections through oneDNN with the bias and GELU
    fused in where that is faster (see fast.linear), else through BLAS with an in-place GELU; either
    must compute what the autograd path and the reference (standard ops only) compute, for either GELU."""
    from vitkit.model import fast

    if fused and not fast.ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear")
    assert fast.cpu_inference_projections() in ("oneDNN", "BLAS")  # the probe runs
    monkeypatch.setattr(fast, "onednn_linear_pays", lambda dtype: fused)
    reference = _random_model(gelu=gelu, depth=2).eval()
    model = fast.optimize(copy.deepcopy(reference))
    assert model.blocks[0].mlp.act.approximate == ("tanh" if gelu == "tanh" else "none")
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode(), OpNames() as ops:
        inferred = model(x)
    with torch.inference_mode(), OpNames() as reference_ops:
        expected = reference(x)
    assert ("mkldnn._linear_pointwise.default" in ops.names) == fused, set(ops.names)
    assert not any("mkldnn" in name for name in reference_ops.names), set(reference_ops.names)
    trained = model(x)
    assert trained.requires_grad and expected.std() > 0
    assert torch.allclose(inferred, trained.detach(), atol=1e-5) and torch.allclose(inferred, expected, atol=1e-5)


@pytest.fixture
def unprobed():
    """No cached oneDNN-or-BLAS verdict (fast.onednn_linear_pays): the test's first CPU inference
    call runs the probe; the verdict it leaves is dropped again afterwards."""
    from vitkit.model import fast

    fast.onednn_linear_pays.cache_clear()
    yield
    fast.onednn_linear_pays.cache_clear()


def test_the_projection_probe_is_not_counted_as_the_models_work(unprobed):
    """The first optimized CPU inference times oneDNN against BLAS (fast.onednn_linear_pays); a FLOP
    counter around that first call must see the model's products only."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitkit.model.fast import optimize

    model = optimize(vitkit.create_model("cifar-mini", depth=1, img_size=16).eval())
    x = torch.randn(2, 3, 16, 16)
    counts = []
    for _ in range(2):
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_a_compiled_model_counted_on_its_first_inference_runs_the_probe_eagerly(unprobed):
    """`vitkit bench --compile` counts a compiled model's FLOPs on its first inference call; the
    projection probe that call runs must stay eager (inductor failed to lower oneDNN's op in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitkit.model.fast import optimize

    model = optimize(_random_model(depth=1, img_size=16).eval())
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:  # the first inference call: it runs the probe
        counted = compiled(x)
    with torch.inference_mode():
        again, expected = compiled(x), model(x)
    assert counter.get_total_flops() > 0 and expected.std() > 0
    assert torch.allclose(counted, expected, atol=1e-5) and torch.allclose(again, expected, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_cpu_inference_under_bf16_autocast_multiplies_in_bf16(path):
    """Under autocast, inference multiplies in bf16, as training under autocast does: through oneDNN
    with the operands cast to bf16 (autocast would not cast a private op's), or through F.linear."""
    from torch.utils.flop_counter import flop_registry

    from vitkit.model.fast import optimize

    class ProductDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.dtypes: set[torch.dtype] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in flop_registry or "linear" in str(func):
                self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
            return func(*args, **(kwargs or {}))

    model = vitkit.create_model("cifar-mini", depth=1, img_size=16).eval()
    if path == "fast":
        optimize(model)
    for grad in (False, True):
        products = ProductDtypes()
        with torch.inference_mode(not grad), torch.autocast("cpu", dtype=torch.bfloat16), products:
            model(torch.randn(2, 3, 16, 16))
        assert products.dtypes == {torch.bfloat16}, (grad, products.dtypes)


@pytest.mark.parametrize("fused", [True, False], ids=["oneDNN", "BLAS"])
def test_bf16_inference_path_equals_the_bf16_training_path(fused, monkeypatch):
    """Under bf16 autocast, optimized CPU inference through either path computes what the autograd
    path does, to bf16's precision, and the probe is asked about bf16, not fp32."""
    from vitkit.model import fast

    if fused and not fast.ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear")
    asked: list[torch.dtype] = []
    monkeypatch.setattr(fast, "onednn_linear_pays", lambda dtype: asked.append(dtype) or fused)
    model = fast.optimize(_random_model(depth=2).eval())
    x = torch.randn(3, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            inferred = model(x).float()
        trained = model(x).float()
    assert set(asked) == {torch.bfloat16} and trained.std() > 0
    assert (inferred - trained.detach()).abs().max() <= 0.03 * trained.abs().max()


def test_tanh_gelu_and_eps_are_configurable():
    model = vitkit.create_model("cifar-mini", gelu="tanh", layer_norm_eps=1e-12, depth=1)
    assert model.blocks[0].mlp.act.approximate == "tanh"
    assert model.norm.eps == 1e-12


@pytest.mark.parametrize(
    "name,overrides,match",
    [
        ("S/16", dict(img_size=100), r"img_size=100 is not divisible by patch_size=16"),
        ("S/16", dict(num_heads=5), r"num_heads=5 does not divide embed_dim=384"),
        ("S/16", dict(global_pool="max"), r"global_pool='max'"),
        ("S/16", dict(wrong_option=1), r"unknown model option"),
        ("ViT-B/16", {}, r"did you mean"),
        ("vit_bse_patch16_224", {}, r"vit_base_patch16_224"),
    ],
)
def test_bad_configs_are_clear(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        vitkit.create_model(name, **overrides)


def test_bad_inputs_are_clear():
    model = vitkit.create_model("cifar-mini", depth=1)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 32, 32\), got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"got \(2, 3, 64, 64\).*set_input_size"):
        model(torch.randn(2, 3, 64, 64))


def test_reset_classifier_and_pre_logits():
    model = vitkit.create_model("cifar-mini", depth=1)
    model.reset_classifier(7)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
    assert isinstance(model, VisionTransformer) and model.config.num_classes == 7


def test_patch_dropout_keeps_a_random_subset_of_patches_in_training_only():
    torch.manual_seed(0)
    model = vitkit.create_model("cifar-mini", patch_drop_rate=0.5)
    torch.nn.init.normal_(model.head.weight)  # the zero head would make every logit 0, hiding any difference
    plain = vitkit.create_model("cifar-mini")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    model.train()
    embedded = model._embed(x)
    kept = model._drop_patches(embedded)
    assert kept.shape == (3, 1 + 32, 128)
    assert torch.equal(kept[:, 0], embedded[:, 0])  # the class token always stays
    for b in range(3):  # every kept token is one of the image's own, none twice
        match = (kept[b, 1:, None] == embedded[b, None, 1:]).all(-1)
        assert match.sum(1).eq(1).all() and match.sum(0).le(1).all()
    assert model(x).shape == (3, 10) and model.forward_features(x).shape == (3, 33, 128)
    model.eval(), plain.eval()
    logits = model(x)
    assert logits.std() > 0
    torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)  # evaluation sees every patch
    with pytest.raises(ValueError, match="patch_drop_rate"):
        vitkit.create_model("cifar-mini", patch_drop_rate=1.0)
