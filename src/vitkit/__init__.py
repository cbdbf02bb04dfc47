"""vitkit: Vision Transformers (Dosovitskiy et al., 2021) to build, train, fine-tune and inspect.

    model = vitkit.create_model("S/16", num_classes=10)       # the architecture
    vitkit.load_weights(model, "vit_small_patch16_224.pth")    # timm, Hugging Face, .npz, vitkit
    classifier = vitkit.load("runs/latest")                    # a trained run, ready to predict
"""

from typing import Any

from vitkit.model import VisionTransformer, ViTConfig, count_parameters, create_model, get_config, list_models

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
