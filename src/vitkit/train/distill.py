"""Knowledge distillation: a trained classifier's probabilities as extra targets for the student.

The teacher sees exactly the student's augmented (cropped, flipped, mixed) batch, as DeiT does and
as Beyer et al. ("Knowledge distillation: A good teacher is patient and consistent", 2022) found
essential: targets precomputed on the unaugmented images disagree with what the student is shown.
The student's loss is (1 - w) * cross-entropy to the labels + w * cross-entropy to the teacher's
probabilities (temperature 1). The student stays whatever it is, e.g. a pure ViT taught by a hybrid.

Run every step, the teacher costs a forward pass per batch (a quarter of a cifar10-vit-2h step with
a cifar10-hybrid-30m teacher). ``distill_cache`` instead asks it once, before training, for every
training image on a fixed grid of views (TeacherCache), as FKD (Shen and Xing, "A Fast Knowledge
Distillation Framework for Visual Recognition", 2022) stores soft labels per crop: each step looks up
the view nearest the student's crop, and mixup/CutMix mix the looked-up probabilities as they mix the
labels. What the cache cannot follow (a 1-pixel offset off the grid, TrivialAugment's colour ops,
CutMix's pasted box) the teacher then does not see. With ``file`` (the run directory's
teacher_cache.safetensors) the cache is written once and read back when the run is resumed, instead of
asking the teacher again inside the remaining budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vitkit.data import ImageSet, crop_flip, preprocess
from vitkit.fileio import atomic_path
from vitkit.inference import load

log = logging.getLogger("vitkit")

# A cache larger than this (views x images x classes in fp16) would not fit beside the training set on
# a laptop; ImageNet-1k's would be ~46 GB.
MAX_CACHE_BYTES = 4 * 1024**3
# A TeacherCache's file in the run directory: a resumed run reads it instead of asking the teacher again.
CACHE_FILE_NAME = "teacher_cache.safetensors"


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


def cache_shifts(padding: int) -> tuple[int, ...]:
    """The crop offsets a TeacherCache stores per axis: (-s, 0, s) with s = round(2 padding / 3), so
    every offset in -padding..padding lies within padding / 3 of one (within 1 pixel for padding 4)."""
    if padding <= 0:
        return (0,)
    shift = max(1, round(2 * padding / 3))
    return (-shift, 0, shift)


class TeacherCache:
    """A teacher's probabilities for every image of a training set on a fixed grid of views, computed
    once: crop offsets cache_shifts(padding) on both axes, times flipped and not (18 views for
    padding 4 with flips; the teacher's forward passes over 18 copies of the set take as long as
    ~18 epochs of its inference).

    probabilities(indices, offset_y, offset_x, flip) answers for the view nearest each sample's crop.
    Stored in fp16 on the device that trains. In distributed training (world_size > 1, the process
    group initialised) each process labels its share of the images and an all-reduce gives every
    process the whole cache: the samplers hand any image to any process over the epochs.

    file: where the cache is kept between starts of a run. It is read instead of asking the teacher
    when it was computed from the same teacher weights, images, labels, views and precision (a hash
    of all of them is stored with it), and written (by process 0) after the teacher was asked.
    """

    def __init__(self, teacher: Teacher, images: ImageSet, padding: int, hflip: bool, image_size: int,
                 mean: Sequence[float], std: Sequence[float], padding_mode: str = "constant",
                 device: torch.device | str = "cpu", autocast: torch.dtype | None = None,
                 batch_size: int = 512, rank: int = 0, world_size: int = 1,
                 file: str | os.PathLike | None = None) -> None:
        if images.images is None:
            raise ValueError(f"distill_cache needs the training images in memory; {images} is streamed from "
                             "files: drop distill_cache (the teacher then runs every step)")
        self.shifts = cache_shifts(padding)
        self.flips = (False, True) if hflip else (False,)
        views = [(y, x, f) for y in self.shifts for x in self.shifts for f in self.flips]
        size = len(images) * len(views) * len(images.classes) * 2
        if size > MAX_CACHE_BYTES:
            raise ValueError(f"distill_cache would store {size / 1024**3:.1f} GiB ({len(images)} images x "
                             f"{len(views)} views x {len(images.classes)} classes); drop distill_cache "
                             "(the teacher then runs every step)")
        start = time.monotonic()
        device = torch.device(device)
        key, probs = "", None
        if file is not None:
            key = _cache_key(teacher, images, views, image_size, mean, std, padding_mode, autocast)
            probs = _read_cache(Path(file), key, device)
        if file is not None and world_size > 1:  # every process reads the file, or all ask the teacher
            found = torch.tensor([probs is not None], dtype=torch.int32, device=device)
            dist.all_reduce(found, op=dist.ReduceOp.MIN)
            probs = probs if found.item() else None
        share = range(len(images) * rank // world_size, len(images) * (rank + 1) // world_size)
        self.read_from = Path(file) if probs is not None else None
        if probs is None:
            probs = self._ask(teacher, images, views, share, image_size, mean, std, padding_mode, device, autocast,
                              batch_size)
            if world_size > 1:
                dist.all_reduce(probs)
            if file is not None and rank == 0:
                with atomic_path(file, suffix=".safetensors") as tmp:
                    save_file({"probs": probs.cpu().contiguous()}, str(tmp), metadata={"key": key})
        self.probs = probs
        centre = views.index((0, 0, False))
        agree = (probs[:, centre].argmax(-1).cpu() == images.labels).float().mean().item()
        self.seconds = time.monotonic() - start
        if self.read_from is not None:
            log.info("distill_cache: read the teacher's answers for %d images x %d views from %s (%.1f s; it "
                     "agrees with %.1f%% of the training labels on the centre view)", len(images), len(views),
                     self.read_from, self.seconds, 100 * agree)
        else:
            log.info("distill_cache: the teacher labelled %d images x %d views in %.1f s%s (it agrees with %.1f%% "
                     "of the training labels on the centre view)", len(images), len(views), self.seconds,
                     f", {len(share)} of them in this process of {world_size}" if world_size > 1 else "", 100 * agree)

    @staticmethod
    def _ask(teacher: Teacher, images: ImageSet, views: list[tuple[int, int, bool]], share: range, image_size: int,
             mean: Sequence[float], std: Sequence[float], padding_mode: str, device: torch.device,
             autocast: torch.dtype | None, batch_size: int) -> torch.Tensor:
        """The teacher's fp16 probabilities for this process's share of the images on every view;
        zeros outside the share, so that summing the processes' shares assembles the cache exactly."""
        teacher.to(device)
        probs = torch.zeros(len(images), len(views), len(images.classes), dtype=torch.float16, device=device)
        for first in range(share.start, share.stop, batch_size):
            batch = images.images[first:min(first + batch_size, share.stop)].to(device)
            n = batch.shape[0]
            for v, (y, x, f) in enumerate(views):
                view = crop_flip(batch, torch.full((n,), y), torch.full((n,), x), torch.full((n,), f),
                                 padding_mode)
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    probs[first:first + n, v] = teacher.probabilities(
                        preprocess(view, image_size, mean, std)).to(torch.float16)
        return probs

    def to(self, device: torch.device | str) -> TeacherCache:
        self.probs = self.probs.to(device)
        return self

    def probabilities(self, indices: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor,
                      flip: torch.Tensor) -> torch.Tensor:
        """float32 (B, classes): each sample's cached view nearest its crop offsets, same flip."""
        reach = len(self.shifts) // 2
        step = max(self.shifts)  # 0 when there is no offset grid
        device = self.probs.device

        def nearest(offset: torch.Tensor) -> torch.Tensor:
            return (offset.to(device) / max(step, 1)).round().clamp(-reach, reach).long() + reach

        view = (nearest(offset_y) * len(self.shifts) + nearest(offset_x)) * len(self.flips)
        if len(self.flips) == 2:
            view = view + flip.to(device).long()
        return self.probs[indices.to(device), view].float()


def _cache_key(teacher: Teacher, images: ImageSet, views: list[tuple[int, int, bool]], image_size: int,
               mean: Sequence[float], std: Sequence[float], padding_mode: str, autocast: torch.dtype | None) -> str:
    """A hash of everything a TeacherCache's answers depend on: the teacher's weights and input
    mapping, the images and labels in their order, the views, the preprocessing and the precision
    (hashing CIFAR-10's 45,000 training images takes about a tenth of a second)."""
    digest = hashlib.sha256()

    def add(tensor: torch.Tensor) -> None:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy

    for name, tensor in teacher.model.state_dict().items():
        digest.update(name.encode())
        add(tensor)
    for tensor in (teacher.scale, teacher.shift, images.labels, images.images):
        add(tensor)
    digest.update(repr((teacher.img_size, views, image_size, [float(m) for m in mean], [float(s) for s in std],
                        padding_mode, str(autocast), images.classes)).encode())
    return digest.hexdigest()


def _read_cache(file: Path, key: str, device: torch.device) -> torch.Tensor | None:
    """The probabilities stored in file if it holds the cache of this key, else None."""
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                log.info("distill_cache: %s was computed from another teacher, data or settings; asking the "
                         "teacher again", file)
                return None
            return handle.get_tensor("probs").to(device)
    except Exception as error:  # a damaged file is recomputed, not fatal
        log.warning("distill_cache: cannot read %s (%s); asking the teacher again", file, error)
        return None
