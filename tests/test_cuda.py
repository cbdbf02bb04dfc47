"""The CUDA path: bf16 autocast, the flash kernel, torch.compile and Lightning's GPU training.

CI has no GPU, so these are skipped there; they are run on a lent GPU machine (see
docs/performance.md for what was measured there).
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitkit
from conftest import TINY_TRAIN, OpNames

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.float().std() > 0, "the reference is constant (a zero head's logits?): nothing is compared"
    return float((a.float() - b.float()).norm() / b.float().norm())


def _model(name: str, **overrides) -> vitkit.VisionTransformer:
    """A random model whose head is random too (the paper's zero head would make every logit 0)."""
    torch.manual_seed(0)
    model = vitkit.create_model(name, **overrides)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    return model.cuda()


def test_bf16_autocast_agrees_with_fp32():
    model = _model("S/16", num_classes=10).eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert _relative_error(low, reference) < 0.03


def test_attention_runs_on_the_flash_kernel_forward_and_backward():
    """With only the flash backend allowed, a call it cannot take raises instead of falling back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model("B/16", num_classes=10)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_fast_path_runs_the_reference_ops_on_cuda():
    """optimize() changes nothing on CUDA but the class-token-only last block: the same operations as
    the reference (average pooling, where that block does not apply), in training (bf16 autocast) and
    inference, and so the same logits and gradients."""
    from vitkit.model.fast import optimize

    reference = _model("cifar-tiny", global_pool="avg")
    fast = optimize(copy.deepcopy(reference))
    x = torch.randn(8, 3, 32, 32, device="cuda")
    runs = []
    for model in (reference, fast):
        with OpNames() as ops:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x)
            logits.float().logsumexp(-1).mean().backward()
            with torch.no_grad():
                inferred = model(x)
        runs.append((ops.names, logits.detach(), inferred, model.patch_embed.proj.weight.grad))
    (ref_ops, ref_logits, ref_inferred, ref_grad), (fast_ops, logits, inferred, grad) = runs
    assert fast_ops == ref_ops
    assert _relative_error(logits, ref_logits) < 1e-5 and _relative_error(inferred, ref_inferred) < 1e-5
    assert _relative_error(grad, ref_grad) < 1e-2  # the flash kernel's backward may add in another order


def test_the_class_token_only_last_block_gives_the_reference_logits_on_cuda():
    """With the class token pooled, optimize()'s last block computes that token alone on CUDA too: the
    same logits and gradients as the reference's full block, in fp32."""
    from vitkit.model.fast import optimize

    reference = _model("cifar-tiny")
    fast = optimize(copy.deepcopy(reference))
    x = torch.randn(8, 3, 32, 32, device="cuda")
    runs = []
    for model in (reference, fast):
        logits = model(x)
        logits.logsumexp(-1).mean().backward()
        runs.append((logits.detach(), model.blocks[-1].attn.qkv.weight.grad))
    (ref_logits, ref_grad), (logits, grad) = runs
    assert _relative_error(logits, ref_logits) < 1e-5 and _relative_error(grad, ref_grad) < 1e-4


def test_compiled_model_agrees_with_eager_in_training():
    eager = _model("cifar-tiny")
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x = torch.randn(32, 3, 32, 32, device="cuda")
    outputs = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        logits.float().logsumexp(-1).mean().backward()
        outputs.append((logits.detach(), model.patch_embed.proj.weight.grad))
    (a, grad_a), (b, grad_b) = outputs
    assert _relative_error(b, a) < 0.02
    assert _relative_error(grad_b, grad_a) < 0.05


def test_training_on_cuda_in_bf16_compiled_exports_a_model_the_cpu_loads(tmp_path, color_folder):
    from vitkit.train import resolve_config, train

    cfg = resolve_config(None, data=str(color_folder), out=str(tmp_path / "run"), val_fraction=0.25,
                         **dict(TINY_TRAIN, compile=True))
    result = train(cfg)
    assert result.best_val_acc is not None and result.best_val_acc > 0.5  # chance is 1/3
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "compile: true" in config
    on_cpu = vitkit.load(tmp_path / "run" / "model.safetensors")
    on_gpu = vitkit.load(tmp_path / "run" / "model.safetensors", device="cuda")
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert _relative_error(on_gpu.logits(x.cuda()).cpu(), on_cpu.logits(x)) < 1e-2


def test_muon_orthogonalizes_in_bf16_on_cuda_as_in_fp32_on_the_cpu():
    from vitkit.train.muon import orthogonalize

    torch.manual_seed(0)
    matrices = torch.randn(6, 128, 512)
    on_gpu = orthogonalize(matrices.cuda())
    assert on_gpu.dtype == torch.float32 and on_gpu.is_cuda  # bf16 inside, the parameters' dtype out
    assert _relative_error(on_gpu.cpu(), orthogonalize(matrices)) < 0.05
