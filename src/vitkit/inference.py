"""A trained classifier in one object: ``vitkit.load(path).predict(images)``.

``load`` takes a run directory, a training checkpoint (.ckpt), a vitkit ``.safetensors`` file, a
pretrained name (``vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``google/vit-base-patch16-224``: fetched
into the Hugging Face cache by :mod:`vitkit.weights.hub`), or weights in another format (a timm or
Hugging Face folder or file, .npz; class names and normalisation come from the folder's JSON where it
has them; else the classes are unknown and the original ViT's mean and std of 0.5 are assumed).
Checkpoints are read without unpickling code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitkit.data import DEFAULT_INTERPOLATION, VIT_MEAN, VIT_STD, ImageLike, ImageSet, Preprocessing
from vitkit.model import VisionTransformer, ViTConfig
from vitkit.model.fast import optimize
from vitkit.model.tta import view_averaged_logits
from vitkit.weights import load_model, load_vitkit, read_training_checkpoint
from vitkit.weights.hub import download, is_hub_name, not_found_hint
from vitkit.weights.io import check_safetensors_header

__all__ = ["Classifier", "ImageLike", "Prediction", "evaluate", "load"]


@dataclass
class Prediction:
    label: str
    index: int
    probability: float
    top_k: list[tuple[str, float]]


class Classifier:
    """A model (switched to vitkit.model.fast's kernels) with its class names and preprocessing attached.

    ``preprocessing`` (:class:`vitkit.data.Preprocessing`) is the training data's: decode, shorter side
    resized with ``interpolation`` (the checkpoint's record; bicubic, the data loader's, when it has
    none), centre crop, normalisation with ``mean`` and ``std``.
    """

    def __init__(self, model: VisionTransformer, classes: Sequence[str] | None = None,
                 mean: Sequence[float] = VIT_MEAN, std: Sequence[float] = VIT_STD, *,
                 interpolation: str = DEFAULT_INTERPOLATION, train_config: dict[str, Any] | None = None,
                 source: str = "") -> None:
        self.model = optimize(model).eval()  # in place: the fast kernels, the same function
        n = model.config.num_classes
        self.classes = list(classes) if classes else [f"class_{i}" for i in range(n)]
        if len(self.classes) != n:
            raise ValueError(f"{source or 'model'}: {len(self.classes)} class names for a {n}-class head")
        try:
            self.preprocessing = Preprocessing(model.config.img_size, tuple(mean), tuple(std), interpolation)
        except ValueError as e:
            raise ValueError(f"{source or 'model'}: {e}") from e
        self.train_config = train_config or {}
        self.source = source

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def config(self) -> ViTConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    def to(self, device: str | torch.device) -> Classifier:
        self.model.to(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W), as the data loader stores them -> normalised float at the model's resolution."""
        return self.preprocessing.normalize(images.to(self.device))

    def to_tensor(self, image: ImageLike) -> torch.Tensor:
        """One image (path, PIL, HxWx3 array or 3xHxW uint8 tensor) -> uint8 (3, S, S) as the data loader
        stores it: S is the model's size, or a smaller square image's own (enlarged by :meth:`preprocess`)."""
        return self.preprocessing.to_tensor(image)

    def inputs(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """The model's input batch for images of any kinds and sizes (:meth:`to_tensor`, :meth:`preprocess`)."""
        return self.preprocessing.inputs(images, self.device)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, tta_flip: bool = False, tta_shift: int = 0) -> torch.Tensor:
        """Logits of a uint8 batch, or with test-time augmentation the log of its views' mean
        probabilities (:func:`vitkit.model.tta.view_averaged_logits`).

        tta_flip adds each view's mirror image. tta_shift moves the image by that many pixels (at
        the model's resolution) along each axis, every combination of -shift, 0 and +shift: nine
        views. The uncovered border is black, as training's padded crops leave it.
        """
        return self._logits(self.preprocess(images), tta_flip, tta_shift)

    def _logits(self, x: torch.Tensor, tta_flip: bool, tta_shift: int) -> torch.Tensor:
        black = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)], device=x.device)
        return view_averaged_logits(self.model, x, flip=tta_flip, shift=tta_shift, fill=black)

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike] | ImageLike, top_k: int = 5, batch_size: int = 64,
                tta_flip: bool = False, tta_shift: int = 0) -> list[Prediction]:
        """Class predictions for paths, PIL images, arrays or tensors; one Prediction each, with the
        probabilities averaged over test-time views as in logits()."""
        if not isinstance(images, list | tuple):
            images = [images]
        k = max(1, min(top_k, len(self.classes)))
        results = []
        for start in range(0, len(images), batch_size):
            x = self.inputs(images[start : start + batch_size])
            probs = self._logits(x, tta_flip, tta_shift).softmax(-1).cpu()
            values, indices = probs.topk(k, dim=-1)
            for v, i in zip(values.tolist(), indices.tolist()):
                top = [(self.classes[j], p) for j, p in zip(i, v)]
                results.append(Prediction(top[0][0], i[0], v[0], top))
        return results


def load(path: str | os.PathLike, *, trust_checkpoint: bool = False, device: str = "cpu") -> Classifier:
    """Load a classifier from a run directory, checkpoint, weights file or pretrained name (see module doc)."""
    if isinstance(path, str) and is_hub_name(path):
        path = download(path, trust_checkpoint=trust_checkpoint)
    path = Path(path)
    # A folder with a config.json holds Hugging Face or timm hub weights, read as a whole (the JSON
    # gives heads, class names and normalisation); any other folder is a vitkit run directory.
    if path.is_dir() and not (path / "config.json").is_file():
        for name in ("model.safetensors", "best.ckpt", "last.ckpt"):
            if (path / name).is_file():
                return load(path / name, trust_checkpoint=trust_checkpoint, device=device)
        raise FileNotFoundError(f"{path} holds no model.safetensors, best.ckpt or last.ckpt (a vitkit run) and "
                                "no config.json (Hugging Face or timm hub weights)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist{not_found_hint(str(path))}")
    if path.suffix == ".ckpt":
        return _from_training_checkpoint(path, trust_checkpoint).to(device)
    if path.suffix == ".safetensors":
        meta = _vitkit_metadata(path)
        if meta is not None:
            model, meta = load_vitkit(path)
            return Classifier(model, meta.get("classes"), meta.get("mean") or VIT_MEAN, meta.get("std") or VIT_STD,
                              interpolation=meta.get("interpolation") or DEFAULT_INTERPOLATION,
                              train_config=(meta.get("extra") or {}).get("train"), source=str(path)).to(device)
    model, meta = load_model(path, strict_head=True, trust_checkpoint=trust_checkpoint)
    return Classifier(model, meta["classes"], meta["mean"] or VIT_MEAN, meta["std"] or VIT_STD,
                      interpolation=meta["interpolation"] or DEFAULT_INTERPOLATION, source=str(path)).to(device)


def _vitkit_metadata(path: Path) -> dict | None:
    """The file's vitkit metadata, or None for other safetensors; a truncated file is named as such."""
    _, meta = check_safetensors_header(path)
    return meta if "config" in meta else None


def _from_training_checkpoint(path: Path, trust_checkpoint: bool) -> Classifier:
    checkpoint = read_training_checkpoint(path, trust_checkpoint=trust_checkpoint).require("mean", "std")
    model = VisionTransformer(checkpoint.config)
    model.load_state_dict(checkpoint.weights())
    return Classifier(model, checkpoint.classes, checkpoint.mean, checkpoint.std,
                      interpolation=checkpoint.interpolation or DEFAULT_INTERPOLATION, train_config=checkpoint.train,
                      source=str(path))


@torch.no_grad()
def evaluate(classifier: Classifier, images: ImageSet, batch_size: int = 256, tta_flip: bool = False,
             tta_shift: int = 0) -> dict[str, Any]:
    """Top-1, top-5, loss, per-class accuracy and confusion matrix on an ImageSet (tta_flip, tta_shift:
    averaged over the views Classifier.logits describes).

    The set's classes are matched to the classifier's by name, so any folder whose class names are
    a subset of the checkpoint's can be evaluated.
    """
    from vitkit.data import iter_batches

    missing = [c for c in images.classes if c not in classifier.classes]
    if missing:
        raise ValueError(
            f"the data has classes the checkpoint does not know: {missing[:10]}; "
            f"the checkpoint's classes are {classifier.classes[:20]}"
        )
    remap = torch.tensor([classifier.classes.index(c) for c in images.classes])
    n = len(classifier.classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    loss_sum, top5, count = 0.0, 0, 0
    batches = list(torch.arange(len(images)).split(batch_size))
    for batch, labels in iter_batches(images, batches):
        labels = remap[labels]
        logits = classifier.logits(batch, tta_flip, tta_shift).float().cpu()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        k = min(5, n)
        top5 += int((logits.topk(k, -1).indices == labels[:, None]).any(-1).sum())
        confusion += torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).reshape(n, n)
        count += len(labels)
    if count == 0:
        raise ValueError("no images to evaluate")
    per_class_total = confusion.sum(1)
    per_class = {c: (float(confusion[i, i] / per_class_total[i]) if per_class_total[i] else None)
                 for i, c in enumerate(classifier.classes)}
    return {
        "images": count,
        "top1": float(confusion.diag().sum() / count),
        "top5": top5 / count,
        "loss": loss_sum / count,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": classifier.classes,
    }
