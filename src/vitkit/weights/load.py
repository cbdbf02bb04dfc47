"""From any supported weights source to a vitkit model, checked in full before anything is copied.

A *source* is a path (file or directory) or an in-memory state dict. Every source is first read
into one normal form: vitkit/timm key names, a class slot in the position embeddings, plus
*hints* the tensors cannot carry (head count, GELU flavour, LayerNorm eps, class names,
normalisation). :func:`config_from_weights` turns that into a :class:`ViTConfig`;
:func:`load_weights` adapts it to an existing model (head, grid, patch size) and copies it only
once every key and shape is known to fit, so a failed load never leaves a half-loaded model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitkit.fileio import atomic_path
from vitkit.model import SIZES, VisionTransformer, ViTConfig, get_config, resample_pos_embed, sincos_pos_embed_2d
from vitkit.weights import formats
from vitkit.weights.checkpoint import training_checkpoint
from vitkit.weights.errors import WeightsError, preview
from vitkit.weights.io import find_weight_files, read_checkpoint, read_json
from vitkit.weights.resample import resample_patch_embed

log = logging.getLogger(__name__)

__all__ = [
    "config_from_weights",
    "detect_format",
    "load_vitkit",
    "load_weights",
    "read_state_dict",
    "save_vitkit",
]

Source = str | os.PathLike | Mapping[str, Any]

VITKIT_FORMAT_VERSION = "1"
# Hugging Face activation names and the GELU each one computes.
_HF_GELU = {
    "gelu": "exact", "gelu_python": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
}
# Pillow's filter numbers (Hugging Face's "resample") and names (vitkit's and timm's "interpolation").
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# The filter vitkit's data loader resizes with (vitkit.data.DEFAULT_INTERPOLATION; this layer does not
# import the data layer): what a model trained by vitkit without a record of it expects.
LOADER_INTERPOLATION = "bicubic"
_HEAD_KEYS = ("head.weight", "head.bias")
_PRE_LOGITS_KEYS = ("pre_logits.fc.weight", "pre_logits.fc.bias")


@dataclass
class _Source:
    """A weights source in normal form (see the module docstring)."""

    label: str  # the path, or "<state dict>", for messages
    format: str
    state_dict: dict[str, Tensor]
    hints: dict[str, Any] = field(default_factory=dict)


# ---- reading ------------------------------------------------------------------------------------


def _resolve(source: Source | _Source, trust_checkpoint: bool = False) -> _Source:
    if isinstance(source, _Source):
        return source
    hints: dict[str, Any] = {}
    if isinstance(source, Mapping):
        label, raw = "<state dict>", source
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        label = str(path)
        if isinstance(source, str) and not path.exists():  # a pretrained name: its folder in the hub cache
            from vitkit.weights.hub import resolve_path

            path = resolve_path(source, trust_checkpoint=trust_checkpoint)
        if path.is_dir():
            hints.update(_directory_hints(path))
            raw = {}
            for file in find_weight_files(path):
                part = read_checkpoint(file, trust_checkpoint=trust_checkpoint)
                tensors, _ = formats.unwrap_checkpoint(part, str(file))
                raw.update(tensors)
        else:
            raw = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    else:
        raise TypeError(f"weights source must be a path or a state dict, got {type(source).__name__}")

    raw, training_hints = _training_checkpoint(raw, label)
    hints.update(training_hints)
    tensors, metadata = formats.unwrap_checkpoint(raw, label)
    hints.update(_metadata_hints(metadata, label))
    fmt = formats.detect_from_keys(tensors.keys(), label)
    if fmt == "timm":
        sd = formats.select_model_keys(tensors, formats.TIMM_MARKER, label)
    elif fmt == "hf":
        sd, dropped = formats.hf_to_vitkit(formats.select_model_keys(tensors, formats.HF_MARKER, label), label)
        hints["dropped"] = dropped
        hints.setdefault("gelu", "exact")
        hints.setdefault("layer_norm_eps", 1e-12)  # transformers' ViTConfig default
    else:
        sd, npz_hints = formats.npz_to_vitkit(tensors, fmt, label)
        hints = npz_hints | hints
    if fmt != "timm":  # timm's two layouts (with and without prefix slots) are fitted to the model in _prepare
        formats.normalize_pos_embed(sd, label)
    # A shifted-patch stem's projection is a matrix; its config (a vitkit file's) says so.
    shifted = isinstance(hints.get("config"), dict) and hints["config"].get("stem") == "shifted"
    if "patch_embed.proj.weight" not in sd or sd["patch_embed.proj.weight"].ndim != (2 if shifted else 4):
        raise WeightsError(f"{label}: patch_embed.proj.weight must be "
                           + ("a matrix (out, 5 * in * p * p), its config's stem being 'shifted'" if shifted
                              else "a 4-D conv kernel (out, in, p, p)"))
    return _Source(label, fmt, sd, hints)


def _training_checkpoint(raw: Mapping[str, Any], label: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """vitkit's own Lightning checkpoints name the weights they evaluate (EMA or not) and carry their config,
    classes, normalisation and interpolation (:mod:`vitkit.weights.checkpoint`): the state dict is narrowed
    to those weights, so the evaluated weights are the ones loaded.
    """
    checkpoint = training_checkpoint(raw, label)
    if checkpoint is None:
        return raw, {}
    config = checkpoint.config.to_dict()
    hints: dict[str, Any] = {"config": config}
    for key in ("classes", "mean", "std", "interpolation"):
        value = getattr(checkpoint, key)
        if value is not None:
            hints[key] = list(value) if isinstance(value, tuple) else value
    hints.update({k: config[k] for k in ("num_heads", "gelu", "layer_norm_eps") if k in config})
    return checkpoint.weights(), hints


def _directory_hints(path: Path) -> dict[str, Any]:
    """What a model directory's JSON files say: Hugging Face config.json, or timm's hub config.json."""
    hints: dict[str, Any] = {}
    config_path = path / "config.json"
    if config_path.is_file():
        config = read_json(config_path)
        if "model_type" in config:
            hints.update(_hf_config_hints(config, config_path))
        elif isinstance(config.get("architecture"), str):  # timm's hub layout
            hints["name"] = config["architecture"].split(".")[0]  # drop the pretrained tag (".augreg_in21k")
            pretrained = config.get("pretrained_cfg") or {}
            if config.get("label_names"):
                hints["classes"] = list(config["label_names"])
            for key in ("mean", "std"):
                if pretrained.get(key):
                    hints[key] = [float(x) for x in pretrained[key]]
            if pretrained.get("interpolation") in PIL_FILTERS.values():
                hints["interpolation"] = pretrained["interpolation"]
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = read_json(preprocessor)
        for key, ours in (("image_mean", "mean"), ("image_std", "std")):
            if isinstance(pre.get(key), list):
                hints.setdefault(ours, [float(x) for x in pre[key]])
        if pre.get("resample") in PIL_FILTERS:
            hints.setdefault("interpolation", PIL_FILTERS[pre["resample"]])
    return hints


def _hf_config_hints(config: dict[str, Any], where: Path) -> dict[str, Any]:
    if config["model_type"] != "vit":
        raise WeightsError(
            f"{where}: model_type {config['model_type']!r}; vitkit loads Hugging Face 'vit' models only "
            "(ViTModel, ViTForImageClassification)"
        )
    hints: dict[str, Any] = {}
    act = config.get("hidden_act", "gelu")
    if act not in _HF_GELU:
        raise WeightsError(f"{where}: hidden_act {act!r} is not a GELU vitkit supports ({', '.join(_HF_GELU)})")
    hints["gelu"] = _HF_GELU[act]
    hints["layer_norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
    if "num_attention_heads" in config:
        hints["num_heads"] = int(config["num_attention_heads"])
    size = config.get("image_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise WeightsError(f"{where}: image_size {size} is not square; vitkit's ViT takes square images")
        size = size[0]
    if isinstance(size, int):
        hints["img_size"] = size
    labels = config.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)] if labels else []
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:
        hints["classes"] = names
    return hints


def _metadata_hints(metadata: Mapping[str, str], label: str) -> dict[str, Any]:
    """Hints from a vitkit safetensors file's metadata (all JSON strings)."""
    if "config" not in metadata or "vitkit" not in metadata:
        return {}
    hints: dict[str, Any] = {}
    for key in ("config", "classes", "mean", "std", "interpolation", "extra"):
        if key in metadata:
            try:
                hints[key] = json.loads(metadata[key])
            except json.JSONDecodeError as e:
                raise WeightsError(f"{label}: metadata {key!r} is not valid JSON ({e}); the file is corrupt") from e
    config = hints.get("config")
    if isinstance(config, dict):
        hints.update({k: config[k] for k in ("num_heads", "gelu", "layer_norm_eps") if k in config})
    return {k: v for k, v in hints.items() if v is not None}


def read_state_dict(source: Source, *, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """Any supported weights source as a state dict with vitkit (= timm) key names.

    ``source``: a file (.safetensors, .pt/.pth/.bin/.ckpt, .npz), a model directory (Hugging Face
    or timm hub layout; safetensors wins over .bin), a pretrained name (``vit_base_patch16_224.augreg_in21k``,
    ``google/vit-base-patch16-224``: downloaded to the Hugging Face cache, :mod:`vitkit.weights.hub`),
    or an in-memory state dict. Training
    checkpoints are unwrapped (``state_dict``, ``model``...) and wrapper prefixes stripped
    (``module.``, ``_orig_mod.``, ``model.``); tensors of other submodules (``ema_model.*``,
    ``criterion.*``) are dropped. Position embeddings always include the class slot.
    """
    return dict(_resolve(source, trust_checkpoint).state_dict)


def detect_format(obj: Source) -> str:
    """"timm" | "hf" | "vit_jax" | "big_vision" for a path or a state dict (see formats.detect_format)."""
    if isinstance(obj, Mapping):
        return formats.detect_format(obj)
    return _resolve(obj).format


# ---- configs -------------------------------------------------------------------------------------


def config_from_weights(
    source: Source, *, name: str | None = None, trust_checkpoint: bool = False, **overrides: Any
) -> ViTConfig:
    """The ViTConfig that the weights were trained with, so ``create_model(config)`` fits them exactly.

    Shapes give width, depth, MLP ratio, patch size, channels, grid (hence img_size), class count,
    qkv bias, class token and pooling (``fc_norm`` present -> 'avg', ``attn_pool`` -> 'map'), and the parts of
    timm's families from their keys: layer scale, register tokens, position embeddings without prefix slots
    (no_embed_class), norm_pre, qk-norm, a packed SwiGLU MLP. What shapes cannot give:

    * heads: from the Hugging Face config or the .npz attention kernels (exact); else from ``name``
      (e.g. "vit_small_patch16_224") when given; else the paper's table for this width and depth;
      else ``embed_dim // 64`` (the head width of every ViT in the paper but H).
    * GELU and LayerNorm eps: .npz -> tanh and 1e-6 (Flax defaults), Hugging Face -> its config,
      otherwise the named model's (CLIP: 1e-5, QuickGELU for ``..._clip_quickgelu_...``), else timm's
      exact GELU and 1e-6. Layer scale's starting value (overwritten by the weights): the named model's or 1e-5.
    * timm models with ``global_pool='avg'`` but ``fc_norm=False`` look like class-token models;
      pass ``global_pool`` as an override if you have one.

    ``overrides`` (``num_classes=10``, ``img_size=384``, ``drop_path_rate=0.1``...) are applied
    on top, giving a fine-tuning config that :func:`load_weights` adapts the weights to.
    """
    return _config_from_source(_resolve(source, trust_checkpoint), name, overrides)


def load_model(
    source: Source, *, name: str | None = None, strict_head: bool = False, trust_checkpoint: bool = False,
    **overrides: Any
) -> tuple[VisionTransformer, dict[str, Any]]:
    """A model rebuilt from weights of any format (:func:`config_from_weights` + :func:`load_weights`),
    in eval mode, and what the source says about using it: ``{"classes", "mean", "std", "interpolation"}``,
    each None where it says nothing (vitkit metadata, Hugging Face config.json and preprocessor_config.json,
    timm's hub config.json). Class names are None when ``overrides`` gave the model another head.
    """
    src = _resolve(source, trust_checkpoint)
    cfg = _config_from_source(src, name, overrides)
    model = VisionTransformer(cfg)
    load_weights(model, src, strict_head=strict_head)
    classes = src.hints.get("classes")
    if classes is not None and len(classes) != cfg.num_classes:
        classes = None  # the head was replaced: the names no longer apply
    return model.eval(), {"classes": classes, **{k: src.hints.get(k) for k in ("mean", "std", "interpolation")}}


def _config_from_source(src: _Source, name: str | None, overrides: dict[str, Any]) -> ViTConfig:
    label, sd, hints = src.label, src.state_dict, src.hints
    if isinstance(hints.get("config"), dict):  # a vitkit file knows its own config
        try:
            cfg = ViTConfig.from_dict(hints["config"])
            return cfg.replace(**overrides) if overrides else cfg
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{label}: {e}") from e

    out_dim, in_chans, patch_h, patch_w = sd["patch_embed.proj.weight"].shape
    if patch_h != patch_w:
        raise WeightsError(f"{label}: patch kernel is {patch_h}x{patch_w}; vitkit's ViT uses square patches")
    embed_dim = int(out_dim)
    depth = len({int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise WeightsError(f"{label}: no transformer blocks found (keys: {preview(sd)})")
    class_token = "cls_token" in sd
    reg_tokens = int(sd["reg_token"].shape[1]) if "reg_token" in sd and sd["reg_token"].ndim == 3 else 0
    prefix = int(class_token) + reg_tokens
    if "pos_embed" not in sd:
        raise WeightsError(f"{label}: no position embeddings (pos_embed) among the keys ({preview(sd)})")
    slots = formats.pos_embed_slots(sd["pos_embed"].shape[1], prefix)
    if slots is None:
        raise WeightsError(f"{label}: pos_embed shape {tuple(sd['pos_embed'].shape)} is not a square grid, "
                           f"with or without slots for its {prefix} prefix tokens")
    grid = math.isqrt(sd["pos_embed"].shape[1] - slots)
    name = name or hints.get("name")
    named = _named_config(name)
    fields: dict[str, Any] = dict(
        img_size=grid * int(patch_h),
        patch_size=int(patch_h),
        in_chans=int(in_chans),
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        embed_dim=embed_dim,
        depth=depth,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        class_token=class_token,
        global_pool=("map" if "attn_pool.latent" in sd
                     else "avg" if "fc_norm.weight" in sd or not class_token else "token"),
        layer_norm_eps=float(hints.get("layer_norm_eps", named.layer_norm_eps if named else 1e-6)),
        gelu=hints.get("gelu", named.gelu if named else "exact"),
        # Layer scale's starting value is overwritten by the weights: the named model's, else DINOv2's. Only a
        # scale on both branches of every block is one (a partial one is reported as a part vitkit lacks).
        init_values=((named.init_values if named else None) or 1e-5) if all(
            f"blocks.{i}.ls{j}.gamma" in sd for i in range(depth) for j in (1, 2)) else None,
        reg_tokens=reg_tokens,
        no_embed_class=prefix > 0 and slots == 0,
        pre_norm="norm_pre.weight" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        # A packed SwiGLU's fc2 takes half of fc1's outputs (value and gate), a plain MLP's all of them.
        mlp_layer=("swiglu_packed" if "blocks.0.mlp.fc2.weight" in sd
                   and 2 * sd["blocks.0.mlp.fc2.weight"].shape[-1] == sd["blocks.0.mlp.fc1.weight"].shape[0]
                   else "mlp"),
    )
    fields["num_heads"] = _num_heads(embed_dim, depth, hints, name, label)
    if name:
        fields["name"] = name
    known = set(ViTConfig.__dataclass_fields__) - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise WeightsError(f"unknown config override(s) {unknown}; valid: {sorted(known)}")
    try:
        cfg = ViTConfig(**(fields | overrides))
    except ValueError as e:
        raise WeightsError(f"{label}: the weights imply an invalid config: {e}") from e
    _check_keys_fit(cfg, sd, label)
    return cfg


def _named_config(name: str | None) -> ViTConfig | None:
    """The config a model name decodes to (what shapes cannot say: GELU, eps), None for names vitkit lacks."""
    try:
        return get_config(name) if name else None
    except ValueError:
        return None  # e.g. a timm hub architecture vitkit has no name for


def _num_heads(embed_dim: int, depth: int, hints: dict[str, Any], name: str | None, label: str) -> int:
    if "num_heads" in hints:
        return int(hints["num_heads"])
    if name:
        try:
            named = get_config(name)
        except ValueError:
            named = None  # e.g. a timm hub architecture vitkit has no name for; fall through
        if named is not None:
            if named.embed_dim != embed_dim:
                raise WeightsError(
                    f"{label}: the weights have width {embed_dim} but {name!r} has {named.embed_dim}; "
                    "pass the name of the model the weights come from, or none"
                )
            return named.num_heads
    for size in SIZES.values():
        if size["embed_dim"] == embed_dim and size["depth"] == depth:
            return size["num_heads"]
    return max(1, embed_dim // 64)


def _check_keys_fit(cfg: ViTConfig, sd: Mapping[str, Tensor], label: str) -> None:
    """Fail early, naming them, when the weights hold parameters this architecture does not have."""
    with torch.device("meta"):
        expected = set(VisionTransformer(cfg).state_dict())
    extra = sorted(set(sd) - expected - set(_HEAD_KEYS) - set(_PRE_LOGITS_KEYS))
    if extra:
        raise WeightsError(
            f"{label}: parameters vitkit's ViT does not have: {preview(extra)}; the weights come from a "
            "different architecture that vitkit cannot load"
        )


# ---- loading -------------------------------------------------------------------------------------


def load_weights(
    model: VisionTransformer,
    source: Source,
    *,
    strict_head: bool = False,
    resample_patch: bool = False,
    trust_checkpoint: bool = False,
) -> dict[str, Any]:
    """Load weights of any supported format into ``model``, adapting them to its shape where that is sound.

    * A head of another class count (or a head-less model) drops the checkpoint's head, logged;
      a checkpoint without a head leaves the model's at its initialisation. ``strict_head=True``
      makes both an error (evaluation wants the exact head).
    * Position embeddings of another grid are resampled bicubically, class slot kept (the paper's
      high-resolution fine-tuning); a sin-cos model gets its fixed table for its own grid.
    * Another patch size is an error, unless ``resample_patch=True``: then the kernel is resized
      with FlexiViT's pseudo-inverse (:func:`resample_patch_embed`).
    * Anything else that differs (keys, shapes) is an error naming the keys.

    Everything is checked before the first tensor is copied: on error the model is untouched.
    A model built on the meta device gets the checkpoint's tensors assigned (no copy, no init).
    Returns ``{"format", "source", "dropped", "resampled", "initialized", "notes"}``.
    """
    src = _resolve(source, trust_checkpoint)
    sd, report, may_be_missing = _prepare(model, src, strict_head, resample_patch)
    on_meta = any(t.is_meta for t in model.state_dict().values())
    if on_meta and may_be_missing:  # copying into meta tensors does nothing; they must be replaced outright
        raise WeightsError(
            f"{src.label}: the model is on the meta device and the checkpoint does not fill "
            f"{', '.join(sorted(may_be_missing))}; build the model on a real device to initialise them"
        )
    result = model.load_state_dict(sd, strict=False, assign=on_meta)
    left = set(result.missing_keys) - may_be_missing
    if left or result.unexpected_keys:  # cannot happen after _prepare; guard against a model change
        raise WeightsError(f"{src.label}: internal key mismatch {sorted(left)} {result.unexpected_keys}")
    return report


def _prepare(
    model: VisionTransformer, src: _Source, strict_head: bool, resample_patch: bool
) -> tuple[dict[str, Tensor], dict[str, Any], set[str]]:
    """The state dict adapted to ``model``, the report, and the model keys allowed to stay unloaded."""
    label, cfg = src.label, model.config
    sd = dict(src.state_dict)
    target = model.state_dict()
    report: dict[str, Any] = {
        "format": src.format,
        "source": label,
        "dropped": list(src.hints.get("dropped", [])),
        "resampled": [],
        "initialized": [],
        "notes": [],
    }
    may_be_missing: set[str] = set()

    # The head: dropped when its class count differs, kept at init when the checkpoint has none.
    model_head = "head.weight" in target
    ckpt_classes = sd["head.weight"].shape[0] if "head.weight" in sd else None
    head_fits = ckpt_classes is not None and model_head and sd["head.weight"].shape == target["head.weight"].shape
    if ckpt_classes is not None and not head_fits:
        if strict_head:
            raise WeightsError(
                f"{label}: the checkpoint's head has {ckpt_classes} classes, the model {cfg.num_classes}; "
                f"strict_head=True forbids dropping it. Build the model with num_classes={ckpt_classes}, "
                "or allow a new head (strict_head=False) to fine-tune"
            )
        dropped = [k for k in (*_HEAD_KEYS, *_PRE_LOGITS_KEYS) if k in sd]
        for key in dropped:
            del sd[key]
        report["dropped"] += dropped
        if model_head:
            may_be_missing.update(_HEAD_KEYS)
            report["initialized"] += list(_HEAD_KEYS)
        log.info("%s: head of %d classes dropped (model has %d): %s", label, ckpt_classes, cfg.num_classes,
                 ", ".join(dropped))
    elif ckpt_classes is None and model_head:
        if strict_head:
            raise WeightsError(
                f"{label}: the checkpoint has no classification head; strict_head=True needs one. "
                "Load it with strict_head=False to train a new head"
            )
        may_be_missing.update(_HEAD_KEYS)
        report["initialized"] += list(_HEAD_KEYS)
        log.info("%s: no head in the checkpoint; the model's head keeps its initialisation", label)
    if ckpt_classes is None:  # a backbone: a representation layer without a head is of no use
        for key in [k for k in _PRE_LOGITS_KEYS if k in sd]:
            del sd[key]
            report["dropped"].append(key)
    if any(k in sd for k in _PRE_LOGITS_KEYS):
        raise WeightsError(
            f"{label}: the checkpoint has a pre_logits representation layer (Dense + tanh before the head), "
            "which vitkit's ViT does not have, so its head cannot be used as is. Load it as a backbone: "
            "build the model with another num_classes (the head and pre_logits are then dropped)"
        )

    # Keys: the same names, apart from the head handled above.
    missing = sorted(set(target) - set(sd) - may_be_missing)
    unexpected = sorted(set(sd) - set(target))
    if missing or unexpected:
        raise WeightsError(_key_mismatch_message(label, src.format, cfg, sd, missing, unexpected))

    # Patch size, then grid.
    kernel, model_kernel = sd["patch_embed.proj.weight"], target["patch_embed.proj.weight"]
    if kernel.shape[-1] != model_kernel.shape[-1] and kernel.shape[:2] == model_kernel.shape[:2]:
        old, new = kernel.shape[-1], model_kernel.shape[-1]
        if not resample_patch:
            raise WeightsError(
                f"{label}: the checkpoint's patch size is {old}, the model's {new}. Build the model with "
                f"patch_size={old}, or resize the kernel with FlexiViT's pseudo-inverse: "
                "resample_patch=True (--resample-patch)"
            )
        sd["patch_embed.proj.weight"] = resample_patch_embed(kernel, new)
        report["resampled"].append(f"patch_embed.proj.weight: patch {old} -> {new}")
    slots = cfg.pos_prefix_tokens
    sd["pos_embed"] = formats.fit_pos_slots(sd["pos_embed"], model.num_prefix_tokens, slots, label)
    pos, model_pos = sd["pos_embed"], target["pos_embed"]
    if pos.shape != model_pos.shape and pos.shape[-1] == model_pos.shape[-1] and pos.ndim == 3:
        old_grid = math.isqrt(pos.shape[1] - slots)
        if cfg.pos_embed == "sincos":
            # A fixed function of the grid: computed afresh for the model's grid, class slot kept.
            table = sincos_pos_embed_2d(cfg.grid_size, cfg.embed_dim).to(pos.dtype)[None]
            sd["pos_embed"] = torch.cat([pos[:, :slots], table], dim=1)
            report["resampled"].append(f"pos_embed: sin-cos table recomputed for grid {cfg.grid_size}")
        else:
            try:
                sd["pos_embed"] = resample_pos_embed(pos, cfg.grid_size, slots)
            except ValueError as e:
                raise WeightsError(f"{label}: cannot resample pos_embed {tuple(pos.shape)}: {e}") from e
            report["resampled"].append(f"pos_embed: grid {old_grid}x{old_grid} -> {cfg.grid_size}x{cfg.grid_size}")
        log.info("%s: %s", label, report["resampled"][-1])

    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in target.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in bad[:6])
        more = f"; ... ({len(bad) - 6} more)" if len(bad) > 6 else ""
        raise WeightsError(
            f"{label}: shapes differ from the model's: {shown}{more}. Build the model from the weights: "
            "vitkit.create_model(vitkit.config_from_weights(path, num_classes=...))"
        )

    for key, ours, what in (("gelu", cfg.gelu, "GELU"), ("layer_norm_eps", cfg.layer_norm_eps, "LayerNorm eps")):
        theirs = src.hints.get(key)
        if theirs is not None and theirs != ours:
            note = (
                f"{label}: the weights were trained with {what} {theirs!r}, the model uses {ours!r}: outputs will "
                f"differ slightly; build the model with {key}={theirs!r} (config_from_weights does) to match"
            )
            report["notes"].append(note)
            log.warning(note)
    return sd, report, may_be_missing


def _key_mismatch_message(
    label: str, fmt: str, cfg: ViTConfig, sd: Mapping[str, Tensor], missing: list[str], unexpected: list[str]
) -> str:
    parts = [f"{label}: {fmt} weights do not fit this model."]
    if missing:
        parts.append(f"Missing from the checkpoint: {preview(missing)}.")
    if unexpected:
        parts.append(f"Not in the model: {preview(unexpected)}.")
    depth = len({m[1] for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth != cfg.depth:
        parts.append(f"The checkpoint has {depth} blocks, the model {cfg.depth}.")
    parts.append(
        "Build the model from the weights (vitkit.config_from_weights(path, num_classes=...)) or fix the "
        "model options (depth, qkv_bias, class_token, global_pool, init_values, reg_tokens, pre_norm, qk_norm)."
    )
    return " ".join(parts)


# ---- vitkit's own format -------------------------------------------------------------------------


def save_vitkit(
    path: str | os.PathLike,
    model: VisionTransformer,
    *,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` as safetensors with everything needed to rebuild and use it in the metadata.

    The metadata (safetensors allows str -> str only) holds JSON of the config, class names, the
    input normalisation, the Pillow filter its images are resized with (``interpolation``, None: the
    data loader's default) and ``extra``, so :func:`load_vitkit` needs nothing but the file. Written
    atomically: an interrupted save leaves the previous file intact.
    """
    from safetensors.torch import save_file

    metadata = {"format": "pt", "vitkit": VITKIT_FORMAT_VERSION}
    values = {
        "config": model.config.to_dict(),
        "classes": list(classes) if classes is not None else None,
        "mean": [float(x) for x in mean] if mean is not None else None,
        "std": [float(x) for x in std] if std is not None else None,
        "interpolation": interpolation,
        "extra": extra,
    }
    if interpolation is not None and interpolation not in PIL_FILTERS.values():
        raise WeightsError(f"{path}: interpolation {interpolation!r} is not a Pillow filter; use one of "
                           f"{', '.join(PIL_FILTERS.values())}")
    if classes is not None and model.num_classes and len(values["classes"]) != model.num_classes:
        raise WeightsError(f"{path}: {len(values['classes'])} class names for a model with {model.num_classes} classes")
    for key, value in values.items():
        try:
            metadata[key] = json.dumps(value)
        except TypeError as e:
            raise WeightsError(f"{path}: {key} is not JSON-serialisable ({e}); use str/int/float/list/dict") from e
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_vitkit(path: str | os.PathLike) -> tuple[VisionTransformer, dict[str, Any]]:
    """A model saved by :func:`save_vitkit`, in eval mode, and its metadata.

    Metadata: ``{"config": dict, "classes": list | None, "mean": list | None, "std": list | None,
    "interpolation": str | None, "extra": dict | None}``. The model is built on the meta device and its
    tensors assigned, so nothing is randomly initialised only to be overwritten.
    """
    src = _resolve(path)
    if not isinstance(src.hints.get("config"), dict):
        raise WeightsError(
            f"{path}: not a vitkit file (its metadata has no vitkit config). Load it with "
            "vitkit.load_weights(vitkit.create_model(vitkit.config_from_weights(path)), path)"
        )
    cfg = _config_from_source(src, None, {})
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    sd, _, _ = _prepare(model, src, strict_head=True, resample_patch=False)
    model.load_state_dict(sd, strict=True, assign=True)
    metadata = {key: src.hints.get(key) for key in ("classes", "mean", "std", "interpolation", "extra")}
    metadata["config"] = cfg.to_dict()
    return model.eval(), metadata
