"""Key maps between the checkpoint layouts of the field and vitkit's (= timm's) parameter names.

vitkit's VisionTransformer uses timm's names, so "timm" needs no renaming, only unwrapping. The
other layouts differ in names and in how tensors are laid out:

* Hugging Face ``ViTModel`` / ``ViTForImageClassification``: separate query/key/value Linear
  layers (fused here into one qkv in q, k, v order), ``layernorm_before/after``, an optional
  ``pooler`` that no ViT classifier uses (dropped), ``classifier`` for the head.
* Google vit_jax .npz: Flax kernels are (in, out), so they are transposed; the patch kernel is
  HWIO; attention kernels carry a separate heads axis, (D, heads, head_dim), which also tells the
  head count exactly. Blocks: ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``,
  ``MlpBlock_3``.
* Google big_vision .npz: the same tensors under ``params/``, blocks numbered ``..._0`` /
  ``LayerNorm_1``, optionally stacked along a leading depth axis (``encoderblock/`` when trained
  with scan), and the position embedding at top level *without* the class slot: big_vision adds
  position embeddings before it prepends the class token.

Both Google layouts were trained with Flax's default GELU, the tanh approximation.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vitkit.weights.errors import WeightsError, preview

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "detect_format",
    "detect_from_keys",
    "fit_pos_slots",
    "hf_to_vitkit",
    "normalize_pos_embed",
    "npz_to_vitkit",
    "pos_embed_slots",
    "select_model_keys",
    "unwrap_checkpoint",
    "vitkit_to_hf",
]

FORMATS = ("timm", "hf", "vit_jax", "big_vision")

TIMM_MARKER = "patch_embed.proj.weight"
HF_MARKER = "embeddings.patch_embeddings.projection.weight"
NPZ_MARKER = "embedding/kernel"

# Where training code nests a model's state dict, most specific first. EMA copies come after the
# plain weights: the plain ones are what a user means unless they extract the EMA themselves.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net", "state_dict_ema", "model_ema", "ema")
# Prefix segments added by DDP, torch.compile and Lightning/hand-written wrappers around the model.
_WRAPPER_SEGMENTS = {"module", "_orig_mod", "model"}


# ---- unwrapping ----------------------------------------------------------------------------------


def unwrap_checkpoint(obj: Mapping[str, Any], label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A flat {key: tensor} from a checkpoint object, and the safetensors metadata if there was any.

    Training checkpoints keep the weights under ``state_dict`` (Lightning, timm's train script),
    ``model`` (DeiT, MAE) or similar, next to optimizer state and counters; those are left behind.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{label}: expected a dict of tensors, got {type(obj).__name__}")
    metadata = obj.get("__metadata__") if isinstance(obj.get("__metadata__"), Mapping) else {}
    current: Mapping[str, Any] = obj
    for _ in range(3):  # wrappers nest at most a couple of levels deep in practice
        if _tensor_count(current) and _has_marker(current):
            break
        inner = next(
            (current[k] for k in _WRAPPER_KEYS if isinstance(current.get(k), Mapping) and _tensor_count(current[k])),
            None,
        )
        if inner is None:
            break
        current = inner
    tensors = {str(k): _as_tensor(v) for k, v in current.items() if isinstance(v, torch.Tensor | np.ndarray)}
    if not tensors:
        raise WeightsError(
            f"{label}: no tensors found (top-level keys: {preview(obj.keys())}); expected a state dict, "
            f"or a checkpoint with one under {', '.join(repr(k) for k in _WRAPPER_KEYS[:3])}"
        )
    return tensors, dict(metadata or {})


def _as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def _tensor_count(d: Mapping[str, Any]) -> int:
    return sum(isinstance(v, torch.Tensor | np.ndarray) for v in d.values())


def _has_marker(d: Mapping[str, Any]) -> bool:
    return any(str(k).endswith((TIMM_MARKER, HF_MARKER, NPZ_MARKER)) for k in d)


def detect_format(obj: Mapping[str, Any]) -> str:
    """Which layout a state dict (or checkpoint object) uses: "timm" | "hf" | "vit_jax" | "big_vision".

    Decided from the keys alone: ``embedding/kernel`` means a Google .npz (big_vision if its
    attention is ``MultiHeadDotProductAttention_0`` or it sits under ``params/``), a
    ``embeddings.patch_embeddings.projection`` means Hugging Face, ``patch_embed.proj`` timm/vitkit.
    Paths are accepted by :func:`vitkit.weights.detect_format`, which reads the file first.
    """
    tensors, _ = unwrap_checkpoint(obj, "<state dict>")
    return detect_from_keys(tensors.keys(), "<state dict>")


def detect_from_keys(keys: Any, label: str) -> str:
    """:func:`detect_format` on bare key names; ``label`` names the source in the error."""
    keys = [str(k) for k in keys]
    npz_prefixes = [k[: -len(NPZ_MARKER)] for k in keys if k.endswith(NPZ_MARKER) and _is_npz_prefix(k)]
    if npz_prefixes:
        prefix = min(npz_prefixes, key=len)
        block_keys = [k for k in keys if k.startswith(prefix + "Transformer/encoderblock")]
        if any("MultiHeadDotProductAttention_1/" in k for k in block_keys):
            return "vit_jax"
        if any("MultiHeadDotProductAttention_0/" in k for k in block_keys) or prefix.startswith("params/"):
            return "big_vision"
        return "vit_jax"
    if any(k.endswith(HF_MARKER) for k in keys):
        return "hf"
    if any(k.endswith(TIMM_MARKER) for k in keys):
        return "timm"
    raise WeightsError(
        f"{label}: not a Vision Transformer checkpoint vitkit knows: no patch embedding among its keys "
        f"({preview(keys)}). Expected a key ending in '{TIMM_MARKER}' (timm/vitkit), '{HF_MARKER}' "
        f"(Hugging Face ViT) or '{NPZ_MARKER}' (Google vit_jax/big_vision .npz)."
    )


def _is_npz_prefix(key: str) -> bool:
    prefix = key[: -len(NPZ_MARKER)]
    return prefix == "" or prefix.endswith("/")


def select_model_keys(tensors: dict[str, torch.Tensor], marker: str, label: str) -> dict[str, torch.Tensor]:
    """The one model's tensors in a state dict, with wrapper prefixes stripped.

    The prefix is read off the marker key (``model.module._orig_mod.patch_embed.proj.weight`` ->
    ``model.module._orig_mod.``). When several models are stored side by side (Lightning's
    ``model.*`` next to ``ema_model.*``), the one whose prefix is made of wrapper segments only
    (module, _orig_mod, model) is taken. Keys outside the prefix (losses, EMA copies) are dropped.
    """
    candidates = sorted({k[: -len(marker)] for k in tensors if k.endswith(marker)}, key=len)
    if len(candidates) > 1:
        plain = [c for c in candidates if all(seg in _WRAPPER_SEGMENTS for seg in c.split(".")[:-1])]
        if not plain:
            raise WeightsError(
                f"{label}: holds several models (key prefixes {', '.join(repr(c) for c in candidates)}); "
                "save the state dict of the one you want"
            )
        candidates = plain[:1]
    prefix = candidates[0]
    if not prefix:
        return tensors
    if marker == HF_MARKER and prefix.endswith("vit."):
        prefix = prefix[: -len("vit.")]  # the classifier sits beside vit.*, not inside it
    kept = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    dropped = sorted(set(tensors) - {prefix + k for k in kept})
    log.info("%s: using the model under prefix %r", label, prefix)
    if dropped:
        log.info("%s: ignoring %d tensors outside it (%s)", label, len(dropped), preview(dropped, 4))
    return kept


# ---- Hugging Face --------------------------------------------------------------------------------

_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_BLOCK_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV = re.compile(r"^attention\.attention\.(query|key|value)$")
# Parts of HF ViT checkpoints that no classifier forward uses.
_HF_UNUSED = ("pooler.", "embeddings.mask_token")


def hf_to_vitkit(tensors: dict[str, torch.Tensor], label: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a Hugging Face ViT state dict; fuse query/key/value into qkv. Returns (state dict, dropped keys).

    Unknown keys are passed through under their HF names so that the key check reports them.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        bare = key[len("vit."):] if key.startswith("vit.") else key
        if bare.startswith(_HF_UNUSED):
            dropped.append(key)
        elif bare in _HF_TOP:
            out[_HF_TOP[bare]] = value
        elif m := _HF_BLOCK_KEY.match(bare):
            index, module, param = int(m[1]), m[2], m[3]
            if q := _HF_QKV.match(module):
                qkv.setdefault((index, param), {})[q[1]] = value
            elif module in _HF_BLOCK:
                out[f"blocks.{index}.{_HF_BLOCK[module]}.{param}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (index, param), parts in sorted(qkv.items()):
        absent = [p for p in ("query", "key", "value") if p not in parts]
        if absent:
            raise WeightsError(
                f"{label}: layer {index} has attention {', '.join(sorted(parts))} {param} but no "
                f"{', '.join(absent)}; the checkpoint is incomplete"
            )
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if dropped:
        log.info("%s: dropping %s (not used by a ViT classifier)", label, preview(dropped, 4))
    return out, dropped


def vitkit_to_hf(state_dict: Mapping[str, torch.Tensor], classifier: bool = True) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_vitkit`: split qkv, rename; ``vit.`` prefix for ViTForImageClassification."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    prefix = "vit." if classifier else ""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in ("head.weight", "head.bias"):
            if classifier:
                out[top[key]] = value
        elif key in top:
            out[prefix + top[key]] = value
        elif m := re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key):
            index, module, param = m[1], m[2], m[3]
            base = f"{prefix}encoder.layer.{index}."
            if module == "attn.qkv":
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    out[f"{base}attention.attention.{name}.{param}"] = part
            elif module in block:
                out[f"{base}{block[module]}.{param}"] = value
            else:
                raise WeightsError(f"parameter {key!r} has no Hugging Face ViT equivalent")
        else:
            raise WeightsError(f"parameter {key!r} has no Hugging Face ViT equivalent")
    return {k: v.contiguous() for k, v in out.items()}


# ---- Google .npz ---------------------------------------------------------------------------------


def npz_to_vitkit(
    arrays: dict[str, torch.Tensor], flavor: str, label: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map a vit_jax or big_vision .npz to vitkit names. Returns (state dict, hints).

    ``hints`` holds what the shapes alone cannot say: ``num_heads`` (from the attention kernels),
    ``gelu="tanh"`` and ``layer_norm_eps=1e-6`` (Flax defaults).
    Unsupported variants fail clearly: hybrid ResNet stems, MAP-head or average-pooled models
    (no class token: their final LayerNorm sits before the pooling, which vitkit's avg pool does not
    reproduce), sin-cos position embeddings that were not stored.
    """
    prefix = min((k[: -len(NPZ_MARKER)] for k in arrays if k.endswith(NPZ_MARKER) and _is_npz_prefix(k)), key=len)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in arrays:
            raise WeightsError(
                f"{label}: {flavor} .npz lacks {key!r}; it is incomplete or not a plain ViT "
                f"(arrays present: {preview(arrays.keys())})"
            )
        used.add(key)
        return arrays[key].float()

    def has(name: str) -> bool:
        return prefix + name in arrays

    if has("conv_root/kernel") or any(k.startswith(prefix + "block1/") for k in arrays):
        raise WeightsError(f"{label}: a hybrid ResNet+ViT checkpoint (conv_root/...); vitkit's ViT has no ResNet stem")
    if any(k.startswith(prefix + "MAPHead_0/") for k in arrays):
        raise WeightsError(f"{label}: a MAP-head (attention pooling) ViT in .npz form, which vitkit does not map; "
                           "load timm's conversion of it (e.g. vit_base_patch16_siglip_224) instead")

    sd: dict[str, torch.Tensor] = {}
    kernel = take("embedding/kernel")
    if kernel.ndim != 4:
        raise WeightsError(
            f"{label}: {prefix}embedding/kernel has shape {tuple(kernel.shape)}; expected a 4-D HWIO conv kernel"
        )
    sd["patch_embed.proj.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
    sd["patch_embed.proj.bias"] = take("embedding/bias")
    width = kernel.shape[-1]

    if not has("cls"):
        raise WeightsError(
            f"{label}: no class token ('{prefix}cls'): the model pools by averaging (pool_type 'gap') or by "
            "its first token, and puts its final LayerNorm before the pooling, which vitkit's ViT "
            "(LayerNorm after averaging, as in timm's fc_norm) cannot reproduce exactly. Only class-token "
            "ViTs load from .npz."
        )
    sd["cls_token"] = take("cls").reshape(1, 1, width)

    pos_names = ["pos_embedding", "Transformer/pos_embedding", "Transformer/posembed_input/pos_embedding"]
    if flavor == "vit_jax":
        pos_names.reverse()
    pos_name = next((n for n in pos_names if has(n)), None)
    if pos_name is None:
        raise WeightsError(
            f"{label}: no position embedding stored (looked for {', '.join(prefix + n for n in pos_names)}); "
            "a big_vision model with posemb='sincos2d' computes its own, which vitkit does not reproduce"
        )
    pos = take(pos_name)
    sd["pos_embed"] = pos.reshape(1, -1, width)  # the class slot, if missing, is added by normalize_pos_embed

    if has("Transformer/encoderblock/LayerNorm_0/scale"):  # big_vision with scan: stacked blocks
        depth = arrays[prefix + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        blocks = [("Transformer/encoderblock/", i) for i in range(depth)]
    else:
        indices = sorted(
            {int(m[1]) for k in arrays if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", k))}
        )
        if indices != list(range(len(indices))):
            raise WeightsError(f"{label}: encoder block numbers {indices} are not 0..N-1; the checkpoint is incomplete")
        blocks = [(f"Transformer/encoderblock_{i}/", None) for i in indices]
    attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if flavor == "big_vision":
        attn, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")

    num_heads = None
    for i, (base, stacked) in enumerate(blocks):
        def block(name: str, base: str = base, stacked: int | None = stacked) -> torch.Tensor:
            value = take(base + name)
            return value[stacked] if stacked is not None else value

        out = f"blocks.{i}."
        sd[out + "norm1.weight"] = block("LayerNorm_0/scale")
        sd[out + "norm1.bias"] = block("LayerNorm_0/bias")
        q, k, v = (block(f"{attn}/{n}/kernel") for n in ("query", "key", "value"))
        if q.ndim != 3:
            raise WeightsError(
                f"{label}: {prefix}{base}{attn}/query/kernel has shape {tuple(q.shape)}; "
                "expected (width, heads, head_dim)"
            )
        num_heads = q.shape[1]
        sd[out + "attn.qkv.weight"] = torch.cat([t.reshape(width, -1).T for t in (q, k, v)], dim=0)
        if has(f"{base}{attn}/query/bias"):
            biases = [block(f"{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
            sd[out + "attn.qkv.bias"] = torch.cat(biases)
        sd[out + "attn.proj.weight"] = block(f"{attn}/out/kernel").reshape(-1, width).T
        sd[out + "attn.proj.bias"] = block(f"{attn}/out/bias")
        sd[out + "norm2.weight"] = block(f"{ln2}/scale")
        sd[out + "norm2.bias"] = block(f"{ln2}/bias")
        for j in range(2):
            sd[out + f"mlp.fc{j + 1}.weight"] = block(f"{mlp}/Dense_{j}/kernel").T
            sd[out + f"mlp.fc{j + 1}.bias"] = block(f"{mlp}/Dense_{j}/bias")

    sd["norm.weight"] = take("Transformer/encoder_norm/scale")
    sd["norm.bias"] = take("Transformer/encoder_norm/bias")
    if has("pre_logits/kernel"):  # timm's old name; load_weights decides whether it may be dropped
        sd["pre_logits.fc.weight"] = take("pre_logits/kernel").T
        sd["pre_logits.fc.bias"] = take("pre_logits/bias")
    if has("head/kernel"):
        sd["head.weight"] = take("head/kernel").T
        sd["head.bias"] = take("head/bias")

    unused = sorted(k for k in arrays if k not in used)
    if unused:
        raise WeightsError(
            f"{label}: {flavor} .npz has arrays a plain ViT does not: {preview(unused)}; "
            "it is another architecture or variant, which vitkit cannot load"
        )
    hints: dict[str, Any] = {"gelu": "tanh", "layer_norm_eps": 1e-6}
    if num_heads is not None:
        hints["num_heads"] = int(num_heads)
    return {k: v.contiguous() for k, v in sd.items()}, hints


# ---- shared fix-ups ------------------------------------------------------------------------------


def normalize_pos_embed(sd: dict[str, torch.Tensor], label: str) -> None:
    """Give position embeddings a class slot when the model has a class token but the table has none.

    big_vision and timm's ``no_embed_class`` models (DeiT III) add position embeddings before
    prepending the class token, so the token gets none: a zero slot is the exact equivalent.
    """
    pos = sd.get("pos_embed")
    if pos is None or "cls_token" not in sd or pos.ndim != 3:
        return
    n = pos.shape[1]
    if _is_square(n - 1):
        return
    if _is_square(n):
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        log.info("%s: position embeddings have no class slot; a zero slot was added (equivalent)", label)
        return
    raise WeightsError(
        f"{label}: pos_embed holds {n} positions, neither a square grid nor a square grid plus a class slot"
    )


def pos_embed_slots(length: int, num_prefix_tokens: int) -> int | None:
    """How many of a pos_embed table's ``length`` rows are prefix-token slots: num_prefix_tokens when the
    rest is a square grid (timm's default layout), 0 when the whole table is (timm's ``no_embed_class``:
    DeiT III, DINOv2 with registers), None when neither."""
    if num_prefix_tokens and _is_square(length - num_prefix_tokens):
        return num_prefix_tokens
    return 0 if _is_square(length) else None


def fit_pos_slots(pos: torch.Tensor, num_prefix_tokens: int, slots: int, label: str) -> torch.Tensor:
    """pos_embed with ``slots`` prefix slots (a model's ``pos_prefix_tokens``), from a table with or without them.

    Adding zero slots is exact: a prefix token without a position gets zero. Removing slots is exact only
    when they are zero; learned ones cannot be dropped.
    """
    have = pos_embed_slots(pos.shape[1], num_prefix_tokens) if pos.ndim == 3 else None
    if have is None or have == slots:
        return pos  # not a table this can read: the shape check reports it
    if have == 0:
        log.info("%s: position embeddings have no prefix slots; %d zero slots added (equivalent)", label, slots)
        return torch.cat([pos.new_zeros(1, slots, pos.shape[2]), pos], dim=1)
    if torch.count_nonzero(pos[:, :have]):
        raise WeightsError(
            f"{label}: pos_embed has learned positions for its {have} prefix tokens, which a model with "
            "no_embed_class=True has no place for; build the model with no_embed_class=False"
        )
    return pos[:, have:]


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
