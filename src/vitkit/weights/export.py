"""Writing a vitkit model in the formats other tools read: vitkit, timm, Hugging Face, ONNX.

Each export is checked where the target tool can be asked cheaply: timm's key names and shapes
(on the meta device) when timm is installed, ONNX outputs against PyTorch when onnxruntime is.
Every file is written atomically.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vitkit.fileio import atomic_path
from vitkit.model import SIZES, VisionTransformer, ViTConfig, get_config
from vitkit.model.config import TIMM_FAMILY_KWARGS
from vitkit.weights.errors import WeightsError, preview
from vitkit.weights.formats import vitkit_to_hf
from vitkit.weights.load import LOADER_INTERPOLATION, PIL_FILTERS, Source, load_model, save_vitkit

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "convert", "export", "hf_config", "hf_preprocessor_config", "timm_name_for"]

EXPORT_FORMATS = ("vitkit", "timm", "hf", "onnx")
ONNX_ATOL = 1e-4
# Above this many bytes of weights an ONNX file must keep them in an external data file (2 GB protobuf limit).
_ONNX_INLINE_LIMIT = 1_800_000_000
_TIMM_SIZE_WORDS = {"Ti": "tiny", "S": "small", "M": "medium", "B": "base", "L": "large", "H": "huge"}
# The ViTConfig fields timm's VisionTransformer takes as keyword arguments under the same name.
_TIMM_KWARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                "mlp_ratio", "qkv_bias", "class_token", "global_pool", *TIMM_FAMILY_KWARGS)


def export(
    model: VisionTransformer,
    dst: str | os.PathLike,
    to: str,
    *,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    timm_name: str | None = None,
    interpolation: str = LOADER_INTERPOLATION,
) -> Path:
    """Write ``model`` to ``dst`` in format ``to`` and return the path written.

    ``interpolation``: the Pillow filter the model's inputs are resized with (the one its training data
    was resized with; a Classifier's ``preprocessing.interpolation``).

    * ``"vitkit"``: one safetensors file with config, class names, normalisation and interpolation in its
      metadata.
    * ``"timm"``: a plain state dict (``.safetensors`` if ``dst`` ends so, else a ``torch.save``
      pickle of tensors only) that ``timm.create_model(timm_name, pretrained=False, **kwargs)`` loads
      with strict=True; the kwargs needed (num_classes, img_size, ...) are logged. Checked against
      timm when it is installed.
    * ``"hf"``: a directory (config.json, model.safetensors, preprocessor_config.json when mean/std
      are given) for ``ViTForImageClassification.from_pretrained`` (``ViTModel`` when headless); the
      preprocessor config describes vitkit's preprocessing (:func:`hf_preprocessor_config`).
    * ``"onnx"``: input ``pixel_values`` (batch, C, H, W) with a dynamic batch axis, output
      ``logits``; verified with onnxruntime (batch 1 and 7, within 1e-4) when it is installed.
    """
    if to not in EXPORT_FORMATS:
        raise WeightsError(f"unknown export format {to!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    dst = Path(dst)
    if interpolation not in PIL_FILTERS.values():
        raise WeightsError(f"{dst}: interpolation {interpolation!r} is not a Pillow filter; use one of "
                           f"{', '.join(PIL_FILTERS.values())}")
    if to == "vitkit":
        save_vitkit(dst, model, classes=classes, mean=mean, std=std, interpolation=interpolation)
        return dst
    if to == "timm":
        return _export_timm(model, dst, timm_name)
    if to == "hf":
        return _export_hf(model, dst, classes, mean, std, interpolation)
    return _export_onnx(model, dst)


def convert(
    src: Source,
    dst: str | os.PathLike,
    to: str,
    *,
    name: str | None = None,
    timm_name: str | None = None,
    trust_checkpoint: bool = False,
    **overrides: Any,
) -> Path:
    """``vitkit convert SRC DST --to FORMAT``: read weights of any format, rebuild the model, export it.

    Class names, normalisation and interpolation travel along when the source has them (vitkit
    metadata, Hugging Face config.json/preprocessor_config.json, timm hub config.json).
    """
    model, meta = load_model(src, name=name, trust_checkpoint=trust_checkpoint, **overrides)
    return export(model, dst, to, classes=meta["classes"], mean=meta["mean"], std=meta["std"],
                  timm_name=timm_name or name, interpolation=meta["interpolation"] or LOADER_INTERPOLATION)


def _state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


# ---- timm ----------------------------------------------------------------------------------------


def timm_name_for(cfg: ViTConfig) -> str | None:
    """timm's model name for a config of the paper's widths, else None.

    ``vit_small_patch16_384`` when timm has that exact model (or timm is not installed to ask),
    otherwise the size's ``..._patch16_224`` base, which takes patch_size/img_size as kwargs.
    """
    size = next((s for s, spec in SIZES.items()
                 if spec["embed_dim"] == cfg.embed_dim and spec["num_heads"] == cfg.num_heads), None)
    if size is None:
        return None
    exact = f"vit_{_TIMM_SIZE_WORDS[size]}_patch{cfg.patch_size}_{cfg.img_size}"
    try:
        import timm
    except ImportError:
        return exact
    for name in (exact, f"vit_{_TIMM_SIZE_WORDS[size]}_patch16_224"):
        if timm.is_model(name):
            return name
    return None


def _timm_kwargs(cfg: ViTConfig, timm_name: str, dst: Path) -> dict[str, Any]:
    """The keyword arguments timm.create_model(timm_name, ...) needs to build exactly ``cfg``.

    Width and heads are what a timm name's size word promises; a model that differs in them gets
    an error rather than a misleading name with overriding kwargs.
    """
    try:
        base = get_config(timm_name)
    except ValueError:
        return {"num_classes": cfg.num_classes, "img_size": cfg.img_size}
    differ = [k for k in ("embed_dim", "num_heads") if getattr(cfg, k) != getattr(base, k)]
    if differ:
        ours = ", ".join(f"{k}={getattr(cfg, k)}" for k in differ)
        theirs = ", ".join(f"{k}={getattr(base, k)}" for k in differ)
        raise WeightsError(
            f"{dst}: the model has {ours} but timm's {timm_name} has {theirs}; "
            f"use timm_name={timm_name_for(cfg)!r} or leave it out"
        )
    return {k: getattr(cfg, k) for k in _TIMM_KWARGS if getattr(cfg, k) != getattr(base, k)}


def _check_expressible(extras: list[str], dst: Path, tool: str) -> None:
    """A model with parts the tool's ViT lacks (``extras``) would be written to a file it cannot load."""
    if extras:
        raise WeightsError(f"{dst}: {tool}'s ViT has no {' or '.join(extras)}, so it could not load this model; "
                           "export to vitkit or onnx instead")


def _export_timm(model: VisionTransformer, dst: Path, timm_name: str | None) -> Path:
    cfg = model.config
    _check_expressible(cfg.parts_timm_lacks(), dst, "timm")
    tensors = _state_dict(model)
    timm_name = timm_name or timm_name_for(cfg)
    kwargs = _timm_kwargs(cfg, timm_name, dst) if timm_name else {}
    if timm_name:
        _check_against_timm(tensors, timm_name, kwargs, dst)  # before anything is written
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(dst) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    else:
        with atomic_path(dst) as tmp:
            torch.save(tensors, tmp)
    if timm_name is None:
        log.info("%s: written; no timm name matches width %d / %d heads", dst, cfg.embed_dim, cfg.num_heads)
        return dst
    call = ", ".join([repr(timm_name), "pretrained=False", *(f"{k}={v!r}" for k, v in kwargs.items())])
    log.info("%s: load with timm.create_model(%s) and load_state_dict(..., strict=True)", dst, call)
    if cfg.gelu != "exact" or cfg.layer_norm_eps != 1e-6:
        log.warning(
            "%s: the model uses gelu=%r, layer_norm_eps=%g; timm's ViT defaults are 'exact' and 1e-6: pass "
            "act_layer / norm_layer to timm.create_model for identical outputs", dst, cfg.gelu, cfg.layer_norm_eps,
        )
    return dst


def _check_against_timm(tensors: dict[str, torch.Tensor], timm_name: str, kwargs: dict[str, Any], dst: Path) -> None:
    try:
        import timm
    except ImportError:
        return
    try:
        with torch.device("meta"):
            reference = timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as e:
        log.warning("%s: could not build timm's %s to check the export: %s", dst, timm_name, e)
        return
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != ours:
        differ = sorted(k for k in set(expected) | set(ours) if expected.get(k) != ours.get(k))
        raise WeightsError(
            f"{dst}: timm's {timm_name} ({kwargs}) has other keys or shapes: {preview(differ)}; "
            "pass the matching timm_name"
        )


# ---- Hugging Face --------------------------------------------------------------------------------


def hf_config(cfg: ViTConfig, classes: Sequence[str] | None) -> dict[str, Any]:
    """A transformers ViTConfig (config.json) describing ``cfg``."""
    names = list(classes) if classes is not None else [f"LABEL_{i}" for i in range(cfg.num_classes)]
    return {
        "architectures": ["ViTForImageClassification" if cfg.num_classes else "ViTModel"],
        "model_type": "vit",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": {"exact": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}[cfg.gelu],
        "hidden_dropout_prob": cfg.drop_rate,
        "attention_probs_dropout_prob": cfg.attn_drop_rate,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "encoder_stride": cfg.patch_size,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


def hf_preprocessor_config(image_size: int, mean: Sequence[float], std: Sequence[float],
                           interpolation: str = LOADER_INTERPOLATION) -> dict[str, Any]:
    """A transformers image processor config (preprocessor_config.json) doing vitkit's preprocessing:
    RGB, shorter side resized to ``image_size`` with ``interpolation``, centre square cropped, scaled
    to 0..1, normalised.

    CLIPImageProcessor is transformers' processor that resizes the shorter side and crops the centre,
    as vitkit does. What no processor config can say: vitkit keeps a square image smaller than
    ``image_size`` at its own size and enlarges it bilinearly on the model's device.
    """
    codes = {name: code for code, name in PIL_FILTERS.items()}
    if interpolation not in codes:
        raise WeightsError(f"interpolation {interpolation!r} is not a Pillow filter; use one of {', '.join(codes)}")
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": codes[interpolation],
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in mean],
        "image_std": [float(x) for x in std],
    }


def _export_hf(
    model: VisionTransformer,
    dst: Path,
    classes: Sequence[str] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    interpolation: str,
) -> Path:
    from safetensors.torch import save_file

    cfg = model.config
    _check_expressible(cfg.parts_hf_lacks(), dst, "Hugging Face")
    if not cfg.class_token or cfg.global_pool != "token":
        raise WeightsError(
            f"{dst}: Hugging Face's ViT classifies from the class token; this model uses global_pool="
            f"{cfg.global_pool!r}, class_token={cfg.class_token}, which it cannot express. "
            "Export to vitkit, timm or onnx instead"
        )
    if classes is not None and len(classes) != cfg.num_classes:
        raise WeightsError(f"{dst}: {len(classes)} class names for a model with {cfg.num_classes} classes")
    if dst.exists() and not dst.is_dir():
        raise WeightsError(f"{dst}: exists and is not a directory; Hugging Face exports are directories")
    tensors = vitkit_to_hf(_state_dict(model), classifier=cfg.num_classes > 0)
    dst.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    _write_json(dst / "config.json", hf_config(cfg, classes))
    if mean is not None and std is not None:
        _write_json(dst / "preprocessor_config.json", hf_preprocessor_config(cfg.img_size, mean, std, interpolation))
    return dst


def _write_json(path: Path, value: dict[str, Any]) -> None:
    text = json.dumps(value, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---- ONNX ----------------------------------------------------------------------------------------


def _export_onnx(model: VisionTransformer, dst: Path) -> Path:
    cfg = model.config
    module = copy.deepcopy(model).to("cpu", torch.float32).eval()
    example = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    external = sum(p.numel() * 4 for p in module.parameters()) > _ONNX_INLINE_LIMIT

    def write(path: str) -> None:
        with torch.no_grad():
            torch.onnx.export(
                module, (example,), path, dynamo=True, input_names=["pixel_values"], output_names=["logits"],
                dynamic_shapes=({0: batch},), external_data=external, verbose=False,
            )
        _verify_onnx(module, path, cfg)

    if external:  # the data file is named after the model file, so it is written in place
        log.info("%s: weights above 2 GB go to an external data file beside it", dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(str(dst))
        except WeightsError:  # not faithful: remove what was written, as the message says
            dst.unlink(missing_ok=True)
            dst.with_name(dst.name + ".data").unlink(missing_ok=True)  # the exporter's name for the data file
            raise
    else:
        with atomic_path(dst, suffix=".tmp.onnx") as tmp:
            write(str(tmp))
    return dst


def _verify_onnx(module: VisionTransformer, path: str, cfg: ViTConfig) -> None:
    """onnxruntime's outputs must match PyTorch's within 1e-4 (scaled by the logits' size when above 1)."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime is not installed; the ONNX export was not checked")
        return
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 7):
        x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
        with torch.no_grad():
            expected = module(x)
        (got,) = session.run(["logits"], {"pixel_values": x.numpy()})
        diff = (torch.from_numpy(got) - expected).abs().max().item()
        tolerance = ONNX_ATOL * max(1.0, expected.abs().max().item())
        if not diff <= tolerance:
            raise WeightsError(
                f"ONNX export: onnxruntime's logits differ from PyTorch's by {diff:.3g} (> {tolerance:.3g}) "
                f"at batch {batch}; the export is not faithful, nothing was written"
            )

