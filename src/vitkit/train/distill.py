"""Knowledge distillation: a trained classifier's probabilities as extra targets for the student.

The teacher sees exactly the student's augmented (cropped, flipped, mixed) batch, as DeiT does and
as Beyer et al. ("Knowledge distillation: A good teacher is patient and consistent", 2022) found
essential: targets precomputed on the unaugmented images disagree with what the student is shown.
The student's loss is (1 - w) * cross-entropy to the labels + w * cross-entropy to the teacher's
probabilities (temperature 1). The student stays whatever it is, e.g. a pure ViT taught by a hybrid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.inference import load


class Teacher:
    """A frozen classifier that maps the student's normalised input to class probabilities.

    Not an nn.Module on purpose: its weights belong to neither the optimiser nor the student's
    checkpoints (a resumed run loads the teacher again from its path).
    """

    def __init__(self, model: nn.Module, img_size: int, mean: Sequence[float], std: Sequence[float],
                 student_mean: Sequence[float], student_std: Sequence[float]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.img_size = img_size
        # x_teacher = x_student * scale + shift: back to pixels with the student's statistics, then
        # normalised with the teacher's (identity when both were trained with the same normalisation).
        scale = [s_std / t_std for s_std, t_std in zip(student_std, std, strict=True)]
        shift = [(s_mean - t_mean) / t_std for s_mean, t_mean, t_std in zip(student_mean, mean, std, strict=True)]
        self.scale = torch.tensor(scale).view(1, 3, 1, 1)
        self.shift = torch.tensor(shift).view(1, 3, 1, 1)

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the teacher's logits for a batch normalised as the student's input is."""
        x = x * self.scale + self.shift  # exactly x when the normalisations agree
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.model(x).float().softmax(-1)


def load_teacher(path: str | os.PathLike, classes: Sequence[str], student_mean: Sequence[float],
                 student_std: Sequence[float]) -> Teacher:
    """The teacher at path (a run directory, .ckpt or vitkit .safetensors), its head reordered to the
    student's classes; refuses one trained on other classes."""
    classifier = load(path)
    missing = [c for c in classes if c not in classifier.classes]
    if missing or len(classifier.classes) != len(classes):
        raise ValueError(
            f"teacher {path} knows {len(classifier.classes)} classes {classifier.classes[:20]}, the data has "
            f"{len(classes)} {list(classes)[:20]} (missing from the teacher: {missing[:10]}); pass a teacher "
            "trained on the same classes"
        )
    model = classifier.model
    order = [classifier.classes.index(c) for c in classes]
    if order != list(range(len(classes))):
        model.head.weight.data = model.head.weight.data[order]
        model.head.bias.data = model.head.bias.data[order]
    return Teacher(model, classifier.config.img_size, classifier.mean, classifier.std, student_mean, student_std)
