"""vitkit: Vision Transformers (Dosovitskiy et al., 2021) to build, train, fine-tune and inspect.

    model = vitkit.create_model("S/16", num_classes=10)       # the architecture
    model = vitkit.create_model("vit_small_patch16_224.augreg_in21k", pretrained=True, num_classes=10)
    vitkit.load_weights(model, "vit_small_patch16_224.pth")    # timm, Hugging Face, .npz, vitkit
    classifier = vitkit.load("runs/latest")                    # a trained run, ready to predict
"""

from typing import Any

from vitkit import model as _model
from vitkit.model import VisionTransformer, ViTConfig, count_parameters, get_config, list_models

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "count_parameters",
    "create_model",
    "evaluate",
    "get_config",
    "list_models",
    "load",
    "load_weights",
]

# Imported on first use, so that `import vitkit` for the model alone stays light.
_LAZY = {"load": "vitkit.inference", "Classifier": "vitkit.inference", "evaluate": "vitkit.inference",
         "load_weights": "vitkit.weights"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")


def create_model(name: str | ViTConfig, pretrained: bool = False, *, trust_checkpoint: bool = False,
                 **overrides: Any) -> VisionTransformer:
    """A ViT: ``create_model("S/16", num_classes=10)`` builds one randomly initialised
    (:func:`vitkit.model.create_model`); with ``pretrained=True``, ``name`` is a pretrained name
    (``vit_small_patch16_224.augreg_in21k``, ``google/vit-base-patch16-224``; fetched into the Hugging
    Face cache) or a weights path, and the model is built from the weights' config with ``overrides``
    on top (``num_classes=10``: a new head; ``img_size=384``: positions resampled), in training mode.
    """
    if not pretrained:
        return _model.create_model(name, **overrides)
    if not isinstance(name, str):
        raise TypeError(f"pretrained=True takes a pretrained name or a weights path, not {type(name).__name__}")
    from vitkit.weights import load_model

    model, _ = load_model(name, trust_checkpoint=trust_checkpoint, **overrides)
    return model.train()
