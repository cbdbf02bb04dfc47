"""Weights in and out: timm, Hugging Face and Google .npz in; vitkit, timm, HF and ONNX out.

No network: random-init reference models stand in for downloaded ones. Every parameter is
perturbed before saving so that swapped norms, a transposed kernel or a zero head cannot hide.
The .npz files are written here from a known vitkit model by an independent inverse map.
Hostile and broken files: tests/test_weights_safety.py, which runs without timm.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitkit
from conftest import perturb
from vitkit.model import resample_pos_embed
from vitkit.weights import (
    WeightsError,
    config_from_weights,
    convert,
    detect_format,
    export,
    load_vitkit,
    load_weights,
    read_checkpoint,
    read_state_dict,
    resample_patch_embed,
    save_vitkit,
)

timm = pytest.importorskip("timm")


def images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def small_model(**overrides) -> vitkit.VisionTransformer:
    """A fast known model: width 64, 4 heads (not width // 64), depth 2, 32x32 images, patch 8."""
    fields = dict(embed_dim=64, num_heads=4, depth=2, num_classes=7) | overrides
    return perturb(vitkit.create_model("Ti/8@32", **fields)).eval()


# ---- timm -> vitkit ------------------------------------------------------------------------------


def _save_plain_safetensors(sd, path):
    save_file(sd, path / "weights.safetensors")
    return path / "weights.safetensors"


def _save_timm_train_checkpoint(sd, path):
    torch.save({"epoch": 3, "arch": "vit", "state_dict": sd, "metric": 0.5}, path / "checkpoint.pth")
    return path / "checkpoint.pth"


def _save_lightning_checkpoint(sd, path):
    state = {f"model.{k}": v for k, v in sd.items()}
    # Another model beside it (only its first tensors, to keep the file small): must be ignored.
    state |= {f"ema_model.{k}": torch.zeros_like(v) for k, v in list(sd.items())[:4]}
    state["criterion.weight"] = torch.ones(3)
    torch.save({"epoch": 1, "global_step": 10, "state_dict": state, "optimizer_states": [{"lr": 0.1}]},
               path / "last.ckpt")
    return path / "last.ckpt"


def _save_ddp_compiled_bin(sd, path):
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, path / "pytorch_model.bin")
    return path / "pytorch_model.bin"


TIMM_CASES = [
    ("vit_tiny_patch16_224", "Ti/16", _save_plain_safetensors),
    ("vit_small_patch16_224", "S/16", _save_timm_train_checkpoint),
    ("vit_base_patch16_224", "B/16", _save_lightning_checkpoint),
    ("vit_base_patch16_384", "B/16@384", _save_ddp_compiled_bin),
]


@pytest.mark.parametrize("timm_name,name,save", TIMM_CASES, ids=[c[1] for c in TIMM_CASES])
def test_timm_weights_reproduce_timm_logits(tmp_path, timm_name, name, save):
    torch.manual_seed(0)
    reference = perturb(timm.create_model(timm_name, pretrained=False)).eval()
    path = save(reference.state_dict(), tmp_path)
    assert detect_format(path) == "timm"
    cfg = config_from_weights(path)
    expected = vitkit.get_config(name)
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes"):
        assert getattr(cfg, key) == getattr(expected, key), key
    # The B models are built on the meta device: the weights are assigned, nothing is initialised twice.
    with torch.device("meta" if name.startswith("B/") else "cpu"):
        model = vitkit.create_model(cfg).eval()
    report = load_weights(model, path)
    assert report["format"] == "timm" and not report["dropped"] and not report["resampled"]
    assert not any(t.is_meta for t in model.state_dict().values())
    x = images(1, cfg.img_size)
    with torch.no_grad():  # fp32 rounding only: an optimized model may multiply through oneDNN, timm through BLAS
        expected = reference(x)
        assert max_diff(model(x), expected) <= 1e-5 * max(1.0, expected.abs().max().item())


def test_vitkit_training_checkpoint_loads_the_weights_it_names(tmp_path):
    model, ema = small_model(), small_model(depth=2, num_classes=7)
    perturb(ema, seed=5)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {f"ema.module.{k}": v for k, v in ema.state_dict().items()}
    vitkit_meta = {"weights": "ema.module.", "config": ema.config.to_dict(), "classes": list("abcdefg")}
    torch.save({"state_dict": state, "vitkit": vitkit_meta, "epoch": 2}, tmp_path / "best.ckpt")
    assert config_from_weights(tmp_path / "best.ckpt") == ema.config
    loaded = small_model()
    load_weights(loaded, tmp_path / "best.ckpt", strict_head=True)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_state_dict_in_memory_and_legacy_pickle(tmp_path):
    model = small_model()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    got = read_state_dict(sd)
    assert set(got) == set(model.state_dict())
    assert detect_format(sd) == "timm"
    assert detect_format(to_google_npz(model, "big_vision")) == "big_vision"  # numpy arrays in memory
    torch.save(model.state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in read_state_dict(tmp_path / "old.pth").items())


# ---- Hugging Face --------------------------------------------------------------------------------


def _hf_config(**overrides):
    from transformers import ViTConfig as HFViTConfig

    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  image_size=32, patch_size=8, num_labels=5, layer_norm_eps=1e-12,
                  id2label={i: f"class_{i}" for i in range(5)}, label2id={f"class_{i}": i for i in range(5)})
    return HFViTConfig(**(fields | overrides))


def test_hf_classifier_in_and_out(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = perturb(transformers.ViTForImageClassification(_hf_config())).eval()
    reference.save_pretrained(tmp_path / "hf_in")
    assert detect_format(tmp_path / "hf_in") == "hf"

    cfg = config_from_weights(tmp_path / "hf_in")
    assert (cfg.layer_norm_eps, cfg.num_heads, cfg.gelu, cfg.num_classes) == (1e-12, 4, "exact", 5)
    model = vitkit.create_model(cfg).eval()
    report = load_weights(model, tmp_path / "hf_in")
    assert report["format"] == "hf" and not report["notes"]
    x = images(2, 32)
    with torch.no_grad():
        assert max_diff(model(x), reference(pixel_values=x).logits) <= 1e-5

    classes = [f"class_{i}" for i in range(5)]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    export(model, tmp_path / "hf_out", "hf", classes=classes, mean=mean, std=std)
    again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf_out").eval()
    with torch.no_grad():
        assert max_diff(again(pixel_values=x).logits, reference(pixel_values=x).logits) <= 1e-5
    assert again.config.id2label[3] == "class_3"
    assert again.config.layer_norm_eps == 1e-12

    # vitkit.load (eval, predict, convert) on the folder reads its JSON: 4 heads (width 64 alone would
    # give 1), class names and normalisation; the folder's model.safetensors alone would lose them.
    classifier = vitkit.load(tmp_path / "hf_out")
    assert classifier.config.num_heads == 4 and classifier.classes == classes
    assert classifier.mean == pytest.approx(tuple(mean)) and classifier.std == pytest.approx(tuple(std))
    with torch.no_grad():
        assert max_diff(classifier.model(x), reference(pixel_values=x).logits) <= 1e-5


def test_hf_backbone_drops_pooler_and_keeps_new_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = perturb(transformers.ViTModel(_hf_config(), add_pooling_layer=True)).eval()
    reference.save_pretrained(tmp_path / "backbone")
    torch.save({"not": torch.zeros(1)}, tmp_path / "backbone" / "pytorch_model.bin")  # safetensors must win
    cfg = config_from_weights(tmp_path / "backbone", num_classes=3)
    model = vitkit.create_model(cfg).eval()
    report = load_weights(model, tmp_path / "backbone")
    assert any(k.startswith("pooler.") for k in report["dropped"])
    assert report["initialized"] == ["head.weight", "head.bias"]
    x = images(2, 32)
    with torch.no_grad():
        assert max_diff(model.forward_features(x), reference(pixel_values=x).last_hidden_state) <= 1e-5
    with pytest.raises(WeightsError, match="no classification head"):
        load_weights(vitkit.create_model(cfg), tmp_path / "backbone", strict_head=True)


# ---- Google .npz: written here from a known model by the inverse map -----------------------------


def to_google_npz(model: vitkit.VisionTransformer, layout: str) -> dict[str, np.ndarray]:
    """vit_jax / big_vision / big_vision with scan (stacked blocks) arrays of a class-token vitkit model."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    dim, heads = cfg.embed_dim, cfg.num_heads
    big_vision = layout.startswith("big_vision")
    attn, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else (
        "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    if big_vision:  # position embeddings are added before the class token is prepended
        out["cls"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embedding"] = sd["pos_embed"][:, 1:]
    else:
        out["cls"] = sd["cls_token"]
        out["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    blocks = []
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        block = {"LayerNorm_0/scale": sd[p + "norm1.weight"], "LayerNorm_0/bias": sd[p + "norm1.bias"],
                 f"{ln2}/scale": sd[p + "norm2.weight"], f"{ln2}/bias": sd[p + "norm2.bias"]}
        weights = np.split(sd[p + "attn.qkv.weight"], 3)
        biases = np.split(sd[p + "attn.qkv.bias"], 3)
        for name, w, b in zip(("query", "key", "value"), weights, biases, strict=True):
            block[f"{attn}/{name}/kernel"] = w.T.reshape(dim, heads, dim // heads)
            block[f"{attn}/{name}/bias"] = b.reshape(heads, dim // heads)
        block[f"{attn}/out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(heads, dim // heads, dim)
        block[f"{attn}/out/bias"] = sd[p + "attn.proj.bias"]
        for j in range(2):
            block[f"{mlp}/Dense_{j}/kernel"] = sd[p + f"mlp.fc{j + 1}.weight"].T
            block[f"{mlp}/Dense_{j}/bias"] = sd[p + f"mlp.fc{j + 1}.bias"]
        blocks.append(block)
    if layout == "big_vision_scan":
        out |= {f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
    else:
        out |= {f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}
    prefix = "params/" if big_vision else ""
    return {prefix + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


@pytest.mark.parametrize("layout", ["vit_jax", "big_vision", "big_vision_scan"])
def test_google_npz_reproduces_the_model(tmp_path, layout):
    known = small_model(gelu="tanh")
    path = tmp_path / f"{layout}.npz"
    np.savez(path, **to_google_npz(known, layout))
    assert detect_format(path) == layout.removesuffix("_scan")
    cfg = config_from_weights(path)
    assert cfg.gelu == "tanh" and cfg.num_heads == 4 and cfg.layer_norm_eps == 1e-6
    assert cfg == known.config.replace(name="")
    model = vitkit.create_model(cfg).eval()
    load_weights(model, path)
    x = images(2, 32)
    with torch.no_grad():
        assert max_diff(model(x), known(x)) <= 1e-5


def test_npz_exact_gelu_model_is_told(tmp_path, caplog):
    known = small_model(gelu="tanh")
    np.savez(tmp_path / "w.npz", **to_google_npz(known, "vit_jax"))
    model = small_model(gelu="exact")
    with caplog.at_level(logging.WARNING):
        report = load_weights(model, tmp_path / "w.npz")
    assert report["notes"] and "tanh" in caplog.text


def test_npz_pre_logits_only_as_backbone(tmp_path):
    known = small_model(gelu="tanh")
    arrays = to_google_npz(known, "vit_jax")
    arrays["pre_logits/kernel"] = np.eye(64, dtype=np.float32)
    arrays["pre_logits/bias"] = np.zeros(64, dtype=np.float32)
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(WeightsError, match="pre_logits"):
        load_weights(small_model(gelu="tanh"), tmp_path / "w.npz")
    report = load_weights(small_model(gelu="tanh", num_classes=10), tmp_path / "w.npz")
    assert "pre_logits.fc.weight" in report["dropped"] and "head.weight" in report["dropped"]


def test_npz_of_another_architecture_is_refused(tmp_path):
    resnet = {"conv_root/kernel": np.zeros((7, 7, 3, 64), np.float32),
              "block1/unit1/conv1/kernel": np.zeros((1, 1, 64, 64), np.float32),
              "head/kernel": np.zeros((64, 10), np.float32)}
    np.savez(tmp_path / "resnet.npz", **resnet)
    with pytest.raises(WeightsError, match=r"resnet\.npz.*not a Vision Transformer.*conv_root/kernel"):
        load_weights(small_model(), tmp_path / "resnet.npz")
    gap = {k: v for k, v in to_google_npz(small_model(), "big_vision").items() if k != "params/cls"}
    np.savez(tmp_path / "gap.npz", **gap)
    with pytest.raises(WeightsError, match=r"gap\.npz.*no class token"):
        config_from_weights(tmp_path / "gap.npz")
    extra = to_google_npz(small_model(), "vit_jax") | {"Transformer/encoderblock_0/LayerScale_0/gamma": np.ones(64)}
    np.savez(tmp_path / "extra.npz", **extra)
    with pytest.raises(WeightsError, match="LayerScale_0/gamma"):
        read_state_dict(tmp_path / "extra.npz")


# ---- fine-tuning shapes --------------------------------------------------------------------------


def test_finetune_resolution_and_patch_size(tmp_path):
    source = perturb(vitkit.create_model("S/16", depth=2)).eval()  # depth 2: the loader is depth-agnostic
    save_file(source.state_dict(), tmp_path / "s16.safetensors")
    path = tmp_path / "s16.safetensors"

    at_384 = vitkit.create_model("S/16@384", depth=2, num_classes=10)
    report = load_weights(at_384, path)
    assert report["dropped"] == ["head.weight", "head.bias"]
    assert report["resampled"] == ["pos_embed: grid 14x14 -> 24x24"]
    assert torch.equal(at_384.pos_embed, resample_pos_embed(source.pos_embed, 24))
    assert torch.equal(at_384.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert at_384(images(1, 384)).shape == (1, 10)

    tiny = vitkit.create_model("S/4@32", depth=2, num_classes=10)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(WeightsError, match=r"s16\.safetensors.*patch size is 16, the model's 4.*resample_patch=True"):
        load_weights(tiny, path)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())

    report = load_weights(tiny, path, resample_patch=True)
    assert "patch_embed.proj.weight: patch 16 -> 4" in report["resampled"]
    assert tiny.patch_embed.proj.weight.shape == (384, 3, 4, 4) and tiny.pos_embed.shape == (1, 65, 384)
    assert tiny(images(2, 32)).shape == (2, 10)
    sincos = vitkit.create_model("S/16@64", depth=2, pos_embed="sincos")
    table = sincos.pos_embed.clone()
    assert load_weights(sincos, path)["resampled"] == ["pos_embed: sin-cos table recomputed for grid 4"]
    assert torch.allclose(sincos.pos_embed[:, 1:], table[:, 1:])  # the fixed table for the new grid
    assert torch.equal(sincos.pos_embed[:, :1], source.pos_embed[:, :1])  # the checkpoint's class slot
    with pytest.raises(WeightsError, match="strict_head=True"):
        load_weights(vitkit.create_model("S/16", depth=2, num_classes=10), path, strict_head=True)


def test_resample_patch_embed_is_exact_when_upsampling():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    patch = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    bigger = resample_patch_embed(weight, 8)
    resized = torch.nn.functional.interpolate(patch, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(torch.einsum("bchw,ochw->bo", resized, bigger), torch.einsum("bchw,ochw->bo", patch, weight))
    assert resample_patch_embed(weight, 4) is weight
    assert resample_patch_embed(torch.randn(2, 3, 16, 16), 4).shape == (2, 3, 4, 4)


# ---- exports -------------------------------------------------------------------------------------


def test_export_timm_loads_strict_in_timm(tmp_path):
    model = perturb(vitkit.create_model("Ti/16")).eval()
    for name in ("ti16.pth", "ti16.safetensors"):
        path = export(model, tmp_path / name, "timm")
        sd = read_checkpoint(path)
        sd.pop("__metadata__", None)
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
        reference.load_state_dict(sd, strict=True)
        x = images(1, 224)
        with torch.no_grad():
            assert max_diff(reference(x), model(x)) <= 1e-5
    with pytest.raises(WeightsError, match="embed_dim=192, num_heads=3 but timm's vit_small_patch16_224"):
        export(model, tmp_path / "wrong.pth", "timm", timm_name="vit_small_patch16_224")
    assert not (tmp_path / "wrong.pth").exists()

    small = perturb(vitkit.create_model("Ti/4@32", depth=2, num_classes=10)).eval()
    path = export(small, tmp_path / "small.pth", "timm")  # name and kwargs are worked out and checked
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=4, img_size=32, depth=2,
                                  num_classes=10).eval()
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = images(2, 32)
    with torch.no_grad():
        assert max_diff(reference(x), small(x)) <= 1e-5


def test_export_onnx_dynamic_batch(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = small_model()
    path = export(model, tmp_path / "model.onnx", "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # a named, dynamic batch axis
    for batch in (1, 7):
        x = images(batch, 32, seed=batch)
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            assert max_diff(torch.from_numpy(got), model(x)) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]

    # A model whose weights go to an external file (over 2 GB; here any) and that fails the check
    # leaves nothing behind, as the error says.
    export_module = importlib.import_module("vitkit.weights.export")  # the package's `export` is the function
    monkeypatch.setattr(export_module, "_ONNX_INLINE_LIMIT", 0)
    monkeypatch.setattr(export_module, "ONNX_ATOL", -1.0)
    with pytest.raises(WeightsError, match="nothing was written"):
        export(model, tmp_path / "big" / "model.onnx", "onnx")
    assert list((tmp_path / "big").iterdir()) == []


def test_vitkit_format_roundtrip(tmp_path):
    model = small_model(pos_embed="sincos", num_classes=3)
    classes = ["cat", "dog", "eel"]
    path = tmp_path / "m.safetensors"
    save_vitkit(path, model, classes=classes, mean=(0.5, 0.5, 0.5), std=[0.25] * 3, extra={"epoch": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary left behind
    loaded, meta = load_vitkit(path)
    assert not loaded.training and loaded.config == model.config
    assert meta["classes"] == classes and meta["mean"] == [0.5] * 3 and meta["extra"] == {"epoch": 7}
    assert not loaded.pos_embed.requires_grad
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert config_from_weights(path, num_classes=10).num_classes == 10
    export(model, tmp_path / "t.safetensors", "timm")
    with pytest.raises(WeightsError, match=r"t\.safetensors: not a vitkit file"):
        load_vitkit(tmp_path / "t.safetensors")


def test_convert_timm_file_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_model()
    save_vitkit(tmp_path / "m.safetensors", model, classes=[str(i) for i in range(7)], mean=[0.5] * 3, std=[0.5] * 3)
    out = convert(tmp_path / "m.safetensors", tmp_path / "hf", "hf")
    again = transformers.ViTForImageClassification.from_pretrained(out).eval()
    x = images(2, 32)
    with torch.no_grad():
        assert max_diff(again(pixel_values=x).logits, model(x)) <= 1e-5
    assert (out / "preprocessor_config.json").is_file()
    with pytest.raises(WeightsError, match="class token"):
        export(small_model(global_pool="avg"), tmp_path / "avg", "hf")


@pytest.mark.parametrize("overrides", [dict(stem="shifted"), dict(stem="conv"), dict(locality_attention=True)])
def test_parts_timm_and_hf_lack_are_refused_for_their_formats(tmp_path, overrides):
    """A model with parts timm's and Hugging Face's ViTs do not have exports to vitkit (and onnx), not to
    their formats, which would write files neither could load."""
    model = small_model(**overrides)
    for fmt in ("timm", "hf"):
        with pytest.raises(WeightsError, match="export to vitkit or onnx instead"):
            export(model, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    loaded, _ = load_vitkit(export(model, tmp_path / "m.safetensors", "vitkit"))
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("overrides", [dict(init_values=0.1), dict(reg_tokens=2), dict(gelu="quick"),
                                       dict(qk_norm=True), dict(pre_norm=True)])
def test_parts_only_hf_lacks_export_to_timm_but_not_to_hf(tmp_path, overrides):
    """The parts of timm's families (DeiT III, DINOv2, CLIP) go to timm's format; Hugging Face's ViTModel
    has no place for them, so that export is refused before anything is written."""
    model = small_model(**overrides)
    with pytest.raises(WeightsError, match="export to vitkit or onnx instead"):
        export(model, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
    assert export(model, tmp_path / "m.safetensors", "timm").is_file()
