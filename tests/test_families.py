"""The ViT families fine-tuned today (DeiT III, DINOv2 with and without registers, CLIP image towers):
their timm state dicts load strictly into a vitkit model built from the same name, and give timm's outputs,
in the reference model and after ``optimize``."""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import perturb
from vitkit.model import count_parameters, get_config
from vitkit.model.fast import optimize
from vitkit.model.layers import AttentionPoolLatent, LayerScale, PackedSwiGLU, QuickGELU
from vitkit.viz.attention import cls_attention_maps
from vitkit.weights import WeightsError, config_from_weights, export, load_weights

timm = pytest.importorskip("timm")

# (timm name, small-image kwargs): two blocks and a few patches, so each case runs in well under a second.
FAMILY_CASES = [
    ("deit3_small_patch16_224", dict(img_size=64)),
    ("vit_small_patch14_dinov2", dict(img_size=56)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    ("vit_base_patch16_clip_224", dict(img_size=48)),
    ("vit_base_patch16_clip_quickgelu_224", dict(img_size=48)),
    ("vit_base_patch16_siglip_224", dict(img_size=48)),
    ("vit_giant_patch14_dinov2", dict(img_size=28, embed_dim=192, num_heads=3)),  # narrowed: the packed SwiGLU
]
IDS = [c[0] for c in FAMILY_CASES]


def timm_twin(name: str, small: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb(timm.create_model(name, pretrained=False, num_classes=5, depth=2, **small), seed=seed).eval()


def assert_matches(model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> None:
    """model's logits and features equal reference's, in the reference model and after optimize, each with
    and without gradients (no grad: fused or oneDNN kernels; grad: the explicit attention of training)."""
    with torch.no_grad():
        expected = outputs(reference, x)
    assert expected[0].std() > 0.1 and expected[1].std() > 0.1  # the compared outputs vary
    for fast in (False, True):
        if fast:
            optimize(model)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                for got, want in zip(outputs(model, x), expected, strict=True):
                    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model(x), model.forward_features(x)


@pytest.mark.parametrize("name,small", FAMILY_CASES, ids=IDS)
def test_timm_family_loads_strict_and_matches_timm(name, small):
    reference = timm_twin(name, small)
    sd = reference.state_dict()
    cfg = config_from_weights(sd, name=None if "embed_dim" in small else name)  # a narrowed model has no name
    named = get_config(name, num_classes=5, depth=2, **small)
    # The parts are read off the keys; the MLP ratio off fc1's width (timm's giant ratio 5.33334 is rounded).
    assert cfg.replace(mlp_ratio=named.mlp_ratio) == named and cfg.mlp_dim == named.mlp_dim
    model = vitkit.create_model(cfg).eval()
    model.load_state_dict(sd, strict=True)  # timm's names and shapes, nothing renamed
    report = load_weights(model, sd, strict_head=True)
    assert not report["dropped"] and not report["resampled"] and not report["notes"]
    assert_matches(model, reference, images(2, small["img_size"]))


def test_qk_norm_matches_timm():
    """timm's qk_norm on the paper's ViT (registered models with it use other blocks): q_norm and k_norm
    LayerNorms over head_dim, with the block norm's eps."""
    reference = timm_twin("vit_small_patch16_224", dict(img_size=32, patch_size=8, qk_norm=True))
    sd = reference.state_dict()
    assert "blocks.0.attn.q_norm.weight" in sd
    cfg = config_from_weights(sd, name="vit_small_patch16_224")
    assert cfg.qk_norm and cfg == get_config("S/8", img_size=32, num_classes=5, depth=2, qk_norm=True)
    model = vitkit.create_model(cfg).eval()
    model.load_state_dict(sd, strict=True)
    x = images(2, 32)
    assert_matches(model, reference, x)
    timm_maps = []
    reference.blocks[-1].attn.fused_attn = False
    reference.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, args, out: timm_maps.append(args[0]))
    with torch.no_grad():
        reference(x)
        assert (model.forward_attention(x)[1][-1] - timm_maps[0]).abs().max() <= 1e-6
    with torch.no_grad():  # the class-token-only last block normalises its queries too
        model.blocks[-1].attn.q_norm.weight.mul_(3.0)
        reference.blocks[-1].attn.q_norm.weight.mul_(3.0)
    assert model._class_token_only(x)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch14_dinov2",
                                  "vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_224",
                                  "vit_large_patch14_clip_224", "vit_base_patch16_siglip_224",
                                  "vit_giant_patch14_dinov2"])
def test_family_parameter_counts_equal_timms(name):
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    assert count_parameters(name) == sum(p.numel() for p in reference.parameters())
    assert get_config(name).img_size == reference.patch_embed.img_size[0]
    assert get_config(name).num_classes == reference.num_classes


def test_family_parts_are_named_modules():
    model = vitkit.create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2)
    assert isinstance(model.blocks[0].ls1, LayerScale) and model.blocks[0].ls1.gamma.eq(1e-5).all()
    assert model.reg_token.shape == (1, 4, 384) and model.num_prefix_tokens == 5
    assert model.pos_embed.shape == (1, 16, 384)  # no_embed_class: patches only
    siglip = vitkit.create_model("vit_base_patch16_siglip_224", img_size=32, depth=1)
    assert isinstance(siglip.attn_pool, AttentionPoolLatent) and siglip.cls_token is None
    assert siglip.attn_pool.latent.std() > 0  # initialised, unlike a zero query that would attend uniformly
    giant = vitkit.create_model("vit_giant_patch14_dinov2", img_size=28, depth=1, embed_dim=192, num_heads=3)
    assert isinstance(giant.blocks[0].mlp, PackedSwiGLU) and giant.blocks[0].mlp.fc2.in_features == 512
    with pytest.raises(ValueError, match="is odd"):
        vitkit.create_model("S/16", mlp_layer="swiglu_packed", embed_dim=6, num_heads=2, mlp_ratio=1.5)
    clip = vitkit.create_model("vit_base_patch16_clip_quickgelu_224", img_size=32, depth=1)
    assert isinstance(clip.blocks[0].mlp.act, QuickGELU) and isinstance(clip.norm_pre, torch.nn.LayerNorm)
    assert clip.patch_embed.proj.bias is None and clip.norm_pre.eps == 1e-5
    plain = vitkit.create_model("S/16", img_size=32, depth=1)  # the paper's ViT gains no parameters
    assert not [k for k in plain.state_dict() if k.startswith(("reg_token", "norm_pre")) or ".ls" in k]
    assert isinstance(plain.blocks[0].ls1, torch.nn.Identity) and isinstance(plain.norm_pre, torch.nn.Identity)
    with pytest.raises(ValueError, match="init_values=0"):
        vitkit.create_model("S/16", init_values=0.0)
    with pytest.raises(ValueError, match="reg_tokens=-1"):
        vitkit.create_model("S/16", reg_tokens=-1)


def test_registers_turn_off_the_class_token_only_block_and_stay_out_of_attention_maps():
    reference = timm_twin("vit_small_patch14_reg4_dinov2", dict(img_size=56))
    model = vitkit.create_model(config_from_weights(reference.state_dict())).eval()
    model.load_state_dict(reference.state_dict())
    optimize(model)
    x = images(2, 56)
    assert not model._class_token_only(x)  # the registers are prefix tokens too: the guard holds
    deit = optimize(vitkit.create_model("deit3_small_patch16_224", img_size=32, depth=2).eval())
    assert deit._class_token_only(x[..., :32, :32])
    timm_maps = []  # timm's softmax weights of the last block, from its explicit attention path
    reference.blocks[-1].attn.fused_attn = False
    reference.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, args, out: timm_maps.append(args[0]))
    with torch.no_grad():
        logits, maps = model.forward_attention(x)
        assert (logits - reference(x)).abs().max() <= 1e-5
    assert maps[-1].shape == (2, 6, 5 + 16, 5 + 16)
    assert (maps[-1] - timm_maps[0]).abs().max() <= 1e-6 and timm_maps[0].std() > 0
    grid = cls_attention_maps(maps, 4, model.num_prefix_tokens)  # the class token's row over the 16 patches
    assert torch.allclose(grid, timm_maps[0][:, :, 0, 5:].reshape(2, 6, 4, 4), atol=1e-6)


def test_no_embed_class_weights_load_into_a_model_with_class_slots_and_back():
    reference = timm_twin("deit3_small_patch16_224", dict(img_size=64))
    sd = reference.state_dict()
    slotted = vitkit.create_model("deit3_small_patch16_224", img_size=64, depth=2, num_classes=5,
                                  no_embed_class=False).eval()
    load_weights(slotted, sd)  # a zero class slot added: the class token gets no position either way
    assert slotted.pos_embed.shape == (1, 17, 384) and not slotted.pos_embed[:, 0].any()
    x = images(2, 64)
    with torch.no_grad():
        assert (slotted(x) - reference(x)).abs().max() <= 1e-5
    back = vitkit.create_model(config_from_weights(sd)).eval()
    load_weights(back, slotted.state_dict())  # zero slots drop exactly
    assert torch.equal(back.pos_embed, sd["pos_embed"])
    with torch.no_grad():
        slotted.pos_embed[:, 0] = 1.0
    with pytest.raises(WeightsError, match="no_embed_class=False"):
        load_weights(back, slotted.state_dict())


def test_no_embed_class_resamples_patch_positions_only():
    model = vitkit.create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=1).eval()
    before = model.pos_embed.detach().clone()
    model.set_input_size(84)
    assert model.pos_embed.shape == (1, 36, 384)
    assert torch.allclose(model.pos_embed, vitkit.model.resample_pos_embed(before, 6, num_prefix_tokens=0))
    model.dynamic_img_size = True  # back at 56 pixels: the resampled table is resampled again
    again = vitkit.model.resample_pos_embed(model.pos_embed.detach(), 4, num_prefix_tokens=0)
    assert torch.allclose(model._pos_embed_for(4), again)
    assert model.forward_features(images(1, 56)).shape == (1, 5 + 16, 384)


@pytest.mark.parametrize("name,small", FAMILY_CASES[0:6:2] + FAMILY_CASES[5:6], ids=IDS[0:6:2] + IDS[5:6])
def test_family_exports_to_timm_strictly(tmp_path, name, small):
    model = perturb(vitkit.create_model(name, num_classes=5, depth=2, **small), seed=3).eval()
    path = export(model, tmp_path / "m.pth", "timm", timm_name=name)
    reference = timm.create_model(name, pretrained=False, num_classes=5, depth=2, **small).eval()
    reference.load_state_dict(torch.load(path), strict=True)
    x = images(2, small["img_size"])
    with torch.no_grad():
        want = reference(x)
        assert want.std() > 0 and (model(x) - want).abs().max() <= 1e-5


def test_parts_hf_lacks_names_the_family_parts_and_timm_has_them_all():
    """Export to Hugging Face's ViTModel cannot hold these parts; timm's VisionTransformer holds every one."""
    assert get_config("S/16", global_pool="avg", gelu="tanh").parts_hf_lacks() == []
    assert get_config("vit_small_patch14_reg4_dinov2").parts_hf_lacks() == [
        "init_values=1e-05", "reg_tokens=4", "no_embed_class=True"]
    assert get_config("vit_base_patch16_clip_quickgelu_224").parts_hf_lacks() == ["pre_norm=True", "gelu='quick'"]
    assert get_config("vit_base_patch16_siglip_224", qk_norm=True).parts_hf_lacks() == [
        "qk_norm=True", "global_pool='map'"]
    assert get_config("vit_giant_patch14_dinov2").parts_hf_lacks()[-1] == "mlp_layer='swiglu_packed'"
    for name, _ in FAMILY_CASES:
        assert get_config(name).parts_timm_lacks() == []
