"""The ``"vitkit"`` section of a training checkpoint, read and checked in one place.

``vitkit train`` saves it beside Lightning's state (``ViTClassifier.on_save_checkpoint``)::

    {"config": {...ViTConfig...}, "classes": [...], "mean": [r, g, b], "std": [r, g, b],
     "train": {...TrainConfig...}, "weights": "model." | "ema.module.", "interpolation": "bicubic"}

``weights`` is the prefix, in Lightning's ``state_dict``, of the weights that are evaluated and
exported (the EMA's when the run kept one). ``interpolation`` is the Pillow filter the training data
was resized with; checkpoints written before it was recorded lack it, and were resized with the data
loader's default (bicubic).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vitkit.model import ViTConfig
from vitkit.weights.errors import WeightsError, preview
from vitkit.weights.io import read_checkpoint

__all__ = ["TrainingCheckpoint", "read_training_checkpoint", "training_checkpoint"]

_REQUIRED = ("config", "weights")  # what loading the weights needs; the rest is checked where it is present
_DAMAGED = ("the file is damaged or was not written by `vitkit train`; use the run's model.safetensors, "
            "or train again")


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A training checkpoint's ``"vitkit"`` section, checked, with the checkpoint's Lightning state dict."""

    source: str  # the file, for messages
    config: ViTConfig
    weights_prefix: str
    state_dict: Mapping[str, Any]
    classes: list[str] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    train: dict[str, Any] | None
    interpolation: str | None  # None: not recorded (see the module doc)

    def require(self, *fields: str) -> TrainingCheckpoint:
        """Itself, or an error naming the file and the ``fields`` its section lacks (None)."""
        missing = [name for name in fields if getattr(self, name) is None]
        if missing:
            raise WeightsError(f"{self.source}: its 'vitkit' section lacks {', '.join(missing)}; {_DAMAGED}")
        return self

    def weights(self) -> dict[str, Tensor]:
        """The evaluated model's state dict: the tensors under :attr:`weights_prefix`, prefix removed."""
        prefix = self.weights_prefix
        return {k[len(prefix):]: v for k, v in self.state_dict.items() if isinstance(k, str) and k.startswith(prefix)}


def training_checkpoint(raw: Any, source: str | os.PathLike) -> TrainingCheckpoint | None:
    """The checked ``"vitkit"`` section of an already-read checkpoint; None for a checkpoint without one.

    A section without the config or the weights' prefix, or with a malformed value, is an error naming
    the file and the key; the other fields are None where absent (:meth:`TrainingCheckpoint.require`).
    """
    source = os.fspath(source)
    if not isinstance(raw, Mapping) or "vitkit" not in raw:
        return None
    meta = raw["vitkit"]
    if not isinstance(meta, Mapping):
        raise WeightsError(f"{source}: its 'vitkit' section is a {type(meta).__name__}, not a mapping; {_DAMAGED}")
    missing = [key for key in _REQUIRED if meta.get(key) is None]
    if missing:
        raise WeightsError(f"{source}: its 'vitkit' section lacks {', '.join(missing)}; {_DAMAGED}")
    state = raw.get("state_dict")
    if not isinstance(state, Mapping):
        raise WeightsError(f"{source}: a vitkit training checkpoint without a 'state_dict' mapping; {_DAMAGED}")
    if not isinstance(meta["config"], Mapping):
        raise WeightsError(f"{source}: 'vitkit' config is a {type(meta['config']).__name__}, not a mapping; "
                           f"{_DAMAGED}")
    try:
        config = ViTConfig.from_dict(dict(meta["config"]))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: its model config does not build a ViT ({e}); a checkpoint of another vitkit "
                           "version may need that version to load it") from e
    classes = meta.get("classes")
    if classes is not None:
        if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
            raise WeightsError(f"{source}: 'vitkit' classes must be a list of names, got {classes!r:.80}; {_DAMAGED}")
        if config.num_classes and len(classes) != config.num_classes:
            raise WeightsError(f"{source}: {len(classes)} class names for a {config.num_classes}-class head; "
                               f"{_DAMAGED}")
        classes = list(classes)
    mean, std = _channels(meta, "mean", config, source), _channels(meta, "std", config, source)
    if std is not None and not all(s > 0 for s in std):
        raise WeightsError(f"{source}: 'vitkit' std {std} must be positive; {_DAMAGED}")
    train = meta.get("train")
    if train is not None and not isinstance(train, Mapping):
        raise WeightsError(f"{source}: 'vitkit' train settings are a {type(train).__name__}, not a mapping; "
                           f"{_DAMAGED}")
    prefix, interpolation = meta["weights"], meta.get("interpolation")
    if not isinstance(prefix, str):
        raise WeightsError(f"{source}: 'vitkit' weights must name a key prefix such as 'model.', got {prefix!r}; "
                           f"{_DAMAGED}")
    if interpolation is not None and not isinstance(interpolation, str):
        raise WeightsError(f"{source}: 'vitkit' interpolation must be a Pillow filter name such as 'bicubic', "
                           f"got {interpolation!r}; {_DAMAGED}")
    checkpoint = TrainingCheckpoint(source, config, prefix, state, classes, mean, std,
                                    dict(train) if train is not None else None, interpolation)
    if not any(isinstance(k, str) and k.startswith(prefix) for k in state):
        raise WeightsError(f"{source}: the 'vitkit' section names the weights {prefix!r}, but the state_dict has "
                           f"none (its keys: {preview(state)}); {_DAMAGED}")
    return checkpoint


def read_training_checkpoint(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> TrainingCheckpoint:
    """Read a checkpoint written by ``vitkit train`` (safely, see read_checkpoint) and check its section."""
    checkpoint = training_checkpoint(read_checkpoint(path, trust_checkpoint=trust_checkpoint), path)
    if checkpoint is None:
        raise WeightsError(f"{path} is not a vitkit training checkpoint (no 'vitkit' section); only checkpoints "
                           "written by `vitkit train` resume or load as runs: load other weights with --init or "
                           "vitkit.load_weights")
    return checkpoint


def _channels(meta: Mapping[str, Any], key: str, config: ViTConfig, source: str) -> tuple[float, ...] | None:
    values = meta.get(key)
    if values is None:
        return None
    if (not isinstance(values, list | tuple) or len(values) != config.in_chans
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)):
        raise WeightsError(f"{source}: 'vitkit' {key} must be {config.in_chans} numbers, one per channel, got "
                           f"{values!r:.80}; {_DAMAGED}")
    return tuple(float(v) for v in values)
