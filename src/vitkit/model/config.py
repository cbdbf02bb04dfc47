"""One config dataclass and one table of named variants.

Names are decoded the way big_vision does it: ``"S/16"`` is the S width table entry with 16-pixel
patches; ``"B/16@384"`` adds the input resolution. timm's names (``vit_base_patch16_384``) are
accepted as aliases and decode to the same thing, so a user can copy a name from either world.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

# Width, depth, heads and MLP width of each model size. Ti and S come from DeiT/AugReg,
# B, L and H from the ViT paper (Table 1).
SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "M": dict(embed_dim=512, depth=12, num_heads=8, mlp_dim=2048),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}

# timm spells the sizes out; these map its words to the table above.
TIMM_SIZE_WORDS = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H"}

# Small-image presets for 32x32 data (CIFAR): shallow, patch 4 (64 tokens) unless noted.
SMALL_IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    "cifar-mini": dict(embed_dim=128, depth=6, num_heads=4, patch_size=4),
    "cifar-tiny": dict(embed_dim=192, depth=6, num_heads=3, patch_size=4),
    "cifar-small": dict(embed_dim=384, depth=6, num_heads=6, patch_size=4),
    "cifar-tiny-p2": dict(embed_dim=192, depth=6, num_heads=3, patch_size=2),
    "cifar-hybrid": dict(embed_dim=192, depth=6, num_heads=3, patch_size=4, stem="conv"),
}

# timm's model families beyond the paper's ViT: the parts each adds, and its defaults where timm's differ.
_DINOV2 = dict(init_values=1e-5, img_size=518, num_classes=0)
FAMILIES: dict[str, dict[str, Any]] = {
    "deit3": dict(init_values=1e-6, no_embed_class=True),
    "dinov2": _DINOV2,
    "reg4_dinov2": _DINOV2 | dict(reg_tokens=4, no_embed_class=True),
    "clip": dict(pre_norm=True, layer_norm_eps=1e-5),
    "clip_quickgelu": dict(pre_norm=True, layer_norm_eps=1e-5, gelu="quick"),
    "siglip": dict(class_token=False, global_pool="map", num_classes=0),
}
# The ViTConfig fields of those parts that are also timm's VisionTransformer keyword names, so they pass to
# timm as they are (export, bench's timm twin); Hugging Face's ViTModel has none of them (parts_hf_lacks).
TIMM_FAMILY_KWARGS = ("init_values", "reg_tokens", "no_embed_class", "pre_norm", "qk_norm")
# DINOv2's giant model: a size of its own, with the gated MLP (timm's hidden width 2 * 4096).
_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed")
_FAMILY_NAMES = [
    re.compile(r"^(?P<family>deit3)_(?P<size>small|medium|base|large|huge)_patch(?P<patch>\d+)_(?P<res>\d+)$"),
    re.compile(r"^vit_(?P<size>small|base|large|giant)_patch(?P<patch>\d+)_(?P<family>dinov2|reg4_dinov2)$"),
    re.compile(r"^vit_(?P<size>base|large|huge)_patch(?P<patch>\d+)_(?P<family>clip|clip_quickgelu)_(?P<res>\d+)$"),
    re.compile(r"^vit_(?P<size>base|large)_patch(?P<patch>\d+)_(?P<family>siglip)_(?P<res>\d+)$"),
]

# Names shown by list_models(): the paper's grid, the timm aliases people actually use, and presets.
_LISTED_PAPER = ["Ti/16", "S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14", "B/8", "S/8"]
_LISTED_TIMM = [
    "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch32_224", "vit_small_patch32_384",
    "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch8_224",
    "vit_base_patch32_224", "vit_base_patch32_384", "vit_base_patch16_224", "vit_base_patch16_384",
    "vit_base_patch8_224", "vit_large_patch32_224", "vit_large_patch32_384",
    "vit_large_patch16_224", "vit_large_patch16_384", "vit_large_patch14_224", "vit_huge_patch14_224",
    "deit3_small_patch16_224", "deit3_base_patch16_224", "vit_small_patch14_dinov2", "vit_base_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2", "vit_base_patch16_clip_224",
    "vit_base_patch16_clip_quickgelu_224", "vit_large_patch14_clip_224", "vit_giant_patch14_dinov2",
    "vit_base_patch16_siglip_224",
]

_PAPER_NAME = re.compile(r"^(?P<size>Ti|S|M|B|L|H)/(?P<patch>\d+)(?:@(?P<res>\d+))?$")
_TIMM_NAME = re.compile(r"^vit_(?P<size>tiny|small|medium|base|large|huge)_patch(?P<patch>\d+)_(?P<res>\d+)$")


@dataclass
class ViTConfig:
    """Everything that decides a VisionTransformer's shape and behaviour.

    Keyword names follow timm's VisionTransformer where timm has one, so code and habits carry over.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"  # "token": the class token feeds the head; "avg": mean of patch tokens;
    # "map": attention pooling of the patch tokens by a learned query (attn_pool; SigLIP)
    pos_embed: str = "learn"  # "learn": learned (the paper); "sincos": fixed 2-D sine-cosine
    drop_rate: float = 0.0  # the paper's dropout: after the position embedding, attention proj, MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly with depth to this value
    patch_drop_rate: float = 0.0  # training only: this fraction of patch tokens dropped at random
    layer_norm_eps: float = 1e-6
    gelu: str = "exact"  # "exact" (erf, PyTorch/timm), "tanh" (JAX checkpoints) or "quick" (OpenAI CLIP)
    stem: str = "patch"  # "patch": the paper's strided conv; "shifted": shifted patch tokens; "conv": the hybrid
    locality_attention: bool = False  # learned softmax temperature, no token attends to itself (Attention)
    stem_depth: int = 1  # conv stem only: >1 adds stem_depth-1 stride-1 convs per resolution (ConvStem)
    init_values: float | None = None  # layer scale (ls1, ls2) starting at this value; None: none (DeiT III, DINOv2)
    reg_tokens: int = 0  # register tokens after the class token (DINOv2 with registers)
    no_embed_class: bool = False  # position embeddings for the patches only, prefix tokens get none (timm's name)
    pre_norm: bool = False  # a LayerNorm before the blocks (norm_pre), patch projection without bias (CLIP)
    qk_norm: bool = False  # LayerNorms over each head's queries and keys (q_norm, k_norm in the attention)
    mlp_layer: str = "mlp"  # "mlp": Linear-GELU-Linear; "swiglu_packed": the gated MLP of DINOv2 giant
    name: str = field(default="", compare=False)  # the variant it was decoded from, for display

    def __post_init__(self) -> None:
        _check_positive_int("img_size", self.img_size)
        _check_positive_int("patch_size", self.patch_size)
        _check_positive_int("in_chans", self.in_chans)
        _check_positive_int("embed_dim", self.embed_dim)
        _check_positive_int("depth", self.depth)
        _check_positive_int("num_heads", self.num_heads)
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r}: must be an integer >= 0 (0 = no head)")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                f"use an img_size that is a multiple of {self.patch_size}, e.g. "
                f"{(self.img_size // self.patch_size) * self.patch_size or self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            valid = [h for h in range(1, min(self.embed_dim, 64) + 1) if self.embed_dim % h == 0]
            raise ValueError(
                f"num_heads={self.num_heads} does not divide embed_dim={self.embed_dim}; "
                f"valid head counts include {valid}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio}: must be > 0")
        _check_choice("global_pool", self.global_pool, ("token", "avg", "map"))
        _check_choice("mlp_layer", self.mlp_layer, ("mlp", "swiglu_packed"))
        if self.mlp_layer == "swiglu_packed" and self.mlp_dim % 2:
            raise ValueError(f"mlp_layer='swiglu_packed' splits the hidden layer in two halves, but "
                             f"embed_dim * mlp_ratio = {self.mlp_dim} is odd; choose an mlp_ratio that makes it even")
        _check_choice("pos_embed", self.pos_embed, ("learn", "sincos"))
        _check_choice("gelu", self.gelu, ("exact", "tanh", "quick"))
        _check_choice("stem", self.stem, ("patch", "shifted", "conv"))
        _check_positive_int("stem_depth", self.stem_depth)
        if self.stem_depth != 1 and self.stem != "conv":
            raise ValueError(f"stem_depth={self.stem_depth} needs stem='conv' (the other stems are one "
                             "linear layer); set stem='conv' or leave stem_depth at 1")
        if self.stem == "shifted" and self.patch_size < 2:
            raise ValueError(f"patch_size={self.patch_size}: shifted patches move the image by half a patch, "
                             "so the patch size must be at least 2")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"patch_size={self.patch_size}: the conv stem halves the image per stage, so "
                             "the patch size must be a power of two (2, 4, 8, 16...)")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without one")
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate", "patch_drop_rate"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key}={value}: must be in [0, 1)")
        if self.init_values is not None and not self.init_values > 0:
            raise ValueError(f"init_values={self.init_values!r}: layer scale starts at a value > 0 (timm's "
                             "DeiT III uses 1e-6, DINOv2 1e-5); None builds no layer scale")
        if not isinstance(self.reg_tokens, int) or isinstance(self.reg_tokens, bool) or self.reg_tokens < 0:
            raise ValueError(f"reg_tokens={self.reg_tokens!r}: must be an integer >= 0 (DINOv2 uses 4)")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps}: must be > 0")

    @property
    def grid_size(self) -> int:
        """Patches along each side of the image."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, then the registers."""
        return int(self.class_token) + self.reg_tokens

    @property
    def pos_prefix_tokens(self) -> int:
        """Prefix tokens that have a slot in pos_embed: none under no_embed_class."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def parts_timm_lacks(self) -> list[str]:
        """The options set here that timm's (and Hugging Face's) VisionTransformer has no part for, as
        "name=value" strings: a model with any of them has no twin there to load into or time against."""
        return ([f"stem={self.stem!r}"] if self.stem != "patch" else []) + (
            ["locality_attention=True"] if self.locality_attention else [])

    def parts_hf_lacks(self) -> list[str]:
        """parts_timm_lacks, plus the parts of timm's families that Hugging Face's ViTModel has no place for."""
        plain = ViTConfig()
        keys = (*TIMM_FAMILY_KWARGS, "mlp_layer")
        parts = [f"{k}={getattr(self, k)!r}" for k in keys if getattr(self, k) != getattr(plain, k)]
        parts += ["global_pool='map'"] if self.global_pool == "map" else []
        return self.parts_timm_lacks() + parts + (["gelu='quick'"] if self.gelu == "quick" else [])

    def replace(self, **overrides: Any) -> ViTConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


def _check_positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key}={value!r}: must be a positive integer")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: must be one of {list(choices)}")


def _size_fields(size: str) -> dict[str, Any]:
    spec = SIZES[size]
    return dict(
        embed_dim=spec["embed_dim"],
        depth=spec["depth"],
        num_heads=spec["num_heads"],
        mlp_ratio=spec["mlp_dim"] / spec["embed_dim"],
    )


def list_models() -> list[str]:
    """Names accepted by :func:`get_config` that are worth listing (any S/16@R form also works)."""
    return _LISTED_PAPER + _LISTED_TIMM + list(SMALL_IMAGE_PRESETS)


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """Decode a variant name ("S/16", "B/16@384", "vit_base_patch16_384", "cifar-tiny") into a config.

    timm's names of the families in FAMILIES decode too: "deit3_small_patch16_224" (layer scale, no class
    position), "vit_small_patch14_dinov2" and "..._reg4_dinov2" (registers; "vit_giant_patch14_dinov2" with
    the packed SwiGLU MLP), "vit_base_patch16_clip_224" and "..._clip_quickgelu_224" (norm before the
    blocks), "vit_base_patch16_siglip_224" (attention pooling).

    ``overrides`` take timm's keyword names (``num_classes``, ``img_size``, ``depth``...), so
    ``get_config("S/16", img_size=384, num_classes=10)`` is a fine-tuning shape.
    """
    fields: dict[str, Any]
    if m := _PAPER_NAME.match(name):
        fields = _size_fields(m["size"]) | dict(patch_size=int(m["patch"]))
        if m["res"]:
            fields["img_size"] = int(m["res"])
    elif m := _TIMM_NAME.match(name):
        size = TIMM_SIZE_WORDS[m["size"]]
        fields = _size_fields(size) | dict(patch_size=int(m["patch"]), img_size=int(m["res"]))
    elif m := next((m for pattern in _FAMILY_NAMES if (m := pattern.match(name))), None):
        size = _GIANT if m["size"] == "giant" else _size_fields(TIMM_SIZE_WORDS[m["size"]])
        fields = size | dict(patch_size=int(m["patch"])) | FAMILIES[m["family"]]
        if m.groupdict().get("res"):
            fields["img_size"] = int(m["res"])
    elif name in SMALL_IMAGE_PRESETS:
        fields = dict(SMALL_IMAGE_PRESETS[name], img_size=32, num_classes=10, mlp_ratio=4.0)
    else:
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "."
        raise ValueError(
            f"unknown model name {name!r}{hint} Names look like 'S/16', 'B/16@384', "
            f"'vit_base_patch16_224' or a preset ({', '.join(SMALL_IMAGE_PRESETS)}); "
            "`vitkit models` lists them."
        )
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(known - {'name'})}")
    fields.update(overrides)
    fields["name"] = name
    return ViTConfig(**fields)
