"""How an image becomes a model input: one definition for training data, evaluation and prediction.

1. Decode (:mod:`vitkit.data.decode`): every mode to RGB, EXIF orientation, DCT scaling of large JPEGs.
2. Resize the shorter side to the model's size with the recorded interpolation and crop the centre
   square; a square no larger than that stays native, as the data loader stores it.
3. On the model's device: a smaller square is resized to the model's size (bilinear, antialiased) and
   every pixel normalised (:func:`~vitkit.data.augment.preprocess`).

Steps 1-2 give the uint8 image the data loader stores (:meth:`Preprocessing.to_tensor`), so a file
predicted on its own gets the same pixels as in ``vitkit eval`` and in training's validation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitkit.data.augment import VIT_MEAN, VIT_STD, preprocess
from vitkit.data.decode import DEFAULT_INTERPOLATION, check_interpolation, decode_image, fit_to_size, pil_to_rgb

ImageLike = str | os.PathLike | np.ndarray | torch.Tensor | Any  # Any: a PIL image


@dataclass(frozen=True)
class Preprocessing:
    """The steps from an image to a model input (module doc) for a model of ``image_size`` pixels.

    ``interpolation``: the Pillow filter of the resize; the default is what vitkit's data loader
    has always used, so a checkpoint that records none means it.
    """

    image_size: int
    mean: tuple[float, ...] = VIT_MEAN
    std: tuple[float, ...] = VIT_STD
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        check_interpolation(self.interpolation)
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"mean {self.mean} and std {self.std}: need three values each, std positive")

    def to_array(self, image: ImageLike) -> np.ndarray:
        """One image (path, PIL image, HxWx3 array or 3xHxW uint8 tensor) -> (S, S, 3) uint8 as the data
        loader stores it: S is the model's size, or a smaller square image's own."""
        if isinstance(image, str | os.PathLike):
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{os.fspath(image)}: no such image file")
            return decode_image(image, self.image_size, keep_small_squares=True, interpolation=self.interpolation)
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError(f"expected an RGB uint8 image (3, H, W), got {tuple(image.shape)} {image.dtype}")
            rgb = image.detach().cpu().permute(1, 2, 0).numpy()
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an RGB image array (H, W, 3), got shape {image.shape}")
            rgb = np.array(image, dtype=np.uint8)
        else:  # PIL: the modes, transparency and orientation as a file's
            rgb = pil_to_rgb(image)
        return np.ascontiguousarray(fit_to_size(np.ascontiguousarray(rgb), self.image_size, True,
                                                self.interpolation))

    def to_tensor(self, image: ImageLike) -> torch.Tensor:
        """:meth:`to_array` as a uint8 (3, S, S) tensor."""
        return torch.from_numpy(self.to_array(image)).permute(2, 0, 1).contiguous()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) -> float32 (B, 3, image_size, image_size), normalised, on the images' device."""
        return preprocess(images, self.image_size, self.mean, self.std)

    def inputs(self, images: Sequence[ImageLike], device: str | torch.device = "cpu") -> torch.Tensor:
        """The model's input batch for ``images`` of any sizes: each through :meth:`to_tensor`, then
        :meth:`normalize` on ``device`` (small squares kept native are resized there, one at a time when
        the batch mixes sizes)."""
        tensors = [self.to_tensor(image) for image in images]
        if len({tuple(t.shape) for t in tensors}) <= 1:
            stacked = torch.stack(tensors) if tensors else torch.empty((0, 3, self.image_size, self.image_size),
                                                                       dtype=torch.uint8)
            return self.normalize(stacked.to(device))
        return torch.cat([self.normalize(t[None].to(device)) for t in tensors])
