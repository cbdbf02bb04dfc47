"""vitkit: Vision Transformers (Dosovitskiy et al., 2021) to build, train, fine-tune and inspect."""

from vitkit.model import ViTConfig, VisionTransformer, count_parameters, create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "count_parameters",
    "create_model",
    "get_config",
    "list_models",
]
