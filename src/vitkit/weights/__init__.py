"""Weights in and out: timm, Hugging Face and Google .npz in; vitkit, timm, Hugging Face and ONNX out.

Safe by default: pickles are read with ``weights_only=True`` after their imports are checked,
safetensors headers are validated against the file, .npz files are read without pickle. Loading
checks every key and shape before copying, so a failed load leaves the model untouched.

Layers: ``io`` (files, safety), ``checkpoint`` (the "vitkit" section of a training checkpoint),
``formats`` (key maps), ``load`` (configs, loading, vitkit's own format), ``resample`` (patch kernels),
``export``, ``hub`` (pretrained names, fetched with huggingface_hub). Depends on ``vitkit.model`` only.
"""

from vitkit.weights.checkpoint import TrainingCheckpoint, read_training_checkpoint, training_checkpoint
from vitkit.weights.errors import UnsafeCheckpointError, WeightsError
from vitkit.weights.export import EXPORT_FORMATS, convert, export, timm_name_for
from vitkit.weights.formats import FORMATS
from vitkit.weights.hub import download, list_pretrained
from vitkit.weights.io import read_checkpoint
from vitkit.weights.load import (
    config_from_weights,
    detect_format,
    load_model,
    load_vitkit,
    load_weights,
    read_state_dict,
    save_vitkit,
)
from vitkit.weights.resample import resample_patch_embed

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "TrainingCheckpoint",
    "UnsafeCheckpointError",
    "WeightsError",
    "config_from_weights",
    "convert",
    "detect_format",
    "download",
    "export",
    "list_pretrained",
    "load_model",
    "load_vitkit",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "read_training_checkpoint",
    "resample_patch_embed",
    "save_vitkit",
    "timm_name_for",
    "training_checkpoint",
]
