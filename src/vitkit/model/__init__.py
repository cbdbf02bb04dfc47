"""The model: config, variant table and the VisionTransformer (the reference; ``vitkit.model.fast.optimize``
switches one to faster CPU kernels). Imports nothing else of vitkit's."""

from __future__ import annotations

from typing import Any

import torch

from vitkit.model.config import SIZES, SMALL_IMAGE_PRESETS, ViTConfig, get_config, list_models
from vitkit.model.pos_embed import resample_pos_embed, sincos_pos_embed_2d
from vitkit.model.vit import VisionTransformer

__all__ = [
    "SIZES",
    "SMALL_IMAGE_PRESETS",
    "ViTConfig",
    "VisionTransformer",
    "count_parameters",
    "create_model",
    "get_config",
    "list_models",
    "resample_pos_embed",
    "sincos_pos_embed_2d",
]


def create_model(name: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """Build a randomly initialised ViT: ``create_model("S/16", num_classes=10, img_size=384)``.

    ``name`` is a variant name (see :func:`list_models`) or a ready :class:`ViTConfig`. Weights
    are loaded separately, with :func:`vitkit.load_weights`.
    """
    cfg = name.replace(**overrides) if isinstance(name, ViTConfig) else get_config(name, **overrides)
    return VisionTransformer(cfg)


def count_parameters(name: str | ViTConfig, **overrides: Any) -> int:
    """Number of parameters, counted on the meta device: nothing is allocated, H/14 costs nothing."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())
