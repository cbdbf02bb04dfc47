"""One split of images (:class:`ImageSet`), the splits of a source (:class:`DataSplits`), and batching.

A set is either held in memory as one uint8 tensor (indexing a batch is a gather, no Python per image)
or streamed: only paths are kept and each batch is decoded on demand, in DataLoader workers when asked.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitkit.data.decode import DEFAULT_INTERPOLATION, BadImagesError, _decode, _reason


class ImageSet:
    """One split: int64 ``labels`` (N,), ``classes``, and either ``images`` (uint8 (N, 3, H, W)) or ``paths``.

    ``images`` is None for a streamed set; ``paths`` is None when the source has no files (CIFAR).
    ``skipped`` lists the ``(path, reason)`` of unreadable files that were left out. ``interpolation``:
    the Pillow filter a streamed set resizes its files with.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        classes: list[str],
        images: torch.Tensor | None = None,
        paths: list[str] | None = None,
        *,
        image_size: int | None = None,
        skip_bad_images: bool = False,
        skipped: list[tuple[str, str]] | None = None,
        interpolation: str = DEFAULT_INTERPOLATION,
    ) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.classes = list(classes)
        self.images = images
        self.paths = paths
        self.skip_bad_images = skip_bad_images
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.interpolation = interpolation
        if images is not None:
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
            if len(images) != len(self.labels):
                raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
            image_size = images.shape[-1]
        elif paths is None or image_size is None:
            raise ValueError("a streamed ImageSet (images=None) needs paths and image_size")
        if paths is not None and len(paths) != len(self.labels):
            raise ValueError(f"{len(paths)} paths but {len(self.labels)} labels")
        self.image_size: int = int(image_size)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else "streamed"
        return f"ImageSet({len(self)} images, {len(self.classes)} classes, {self.image_size}px, {where})"

    def counts(self) -> list[int]:
        """Images per class, in class order."""
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """A new set with the given rows (copies them for an in-memory set)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        index_list = indices.tolist()
        return ImageSet(
            self.labels[indices],
            self.classes,
            self.images[indices] if self.images is not None else None,
            [self.paths[i] for i in index_list] if self.paths is not None else None,
            image_size=self.image_size,
            skip_bad_images=self.skip_bad_images,
            skipped=self.skipped,
            interpolation=self.interpolation,
        )

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) for the given indices; decodes the files of a streamed set.

        A streamed set raises BadImagesError for an unreadable file (a batch cannot shrink here without
        its labels going out of step; :func:`iter_batches` can skip instead).
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        if self.images is not None:
            return self.images[indices]
        items = [_decode_item(self.paths[i], self.image_size, self.interpolation) for i in indices.tolist()]
        bad = [(path, reason) for _, path, reason in items if reason is not None]
        if bad:
            raise BadImagesError(bad, hint="Remove or repair these files (`vitkit data inspect` finds them all).")
        return torch.stack([item[0] for item in items])


@dataclass
class DataSplits:
    """The splits of one source. ``val`` is the source's own or the per-class holdout carved from train."""

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    classes: list[str]
    image_size: int  # stored H (= W) of the images
    source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files left out (skip_bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        parts = [f"train {len(self.train)}", f"val {len(self.val)}"]
        if self.test is not None:
            parts.append(f"test {len(self.test)}")
        text = f"{self.source}: {len(self.classes)} classes, {self.image_size}x{self.image_size}, " + ", ".join(parts)
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable file(s)"
        return text


def _decode_item(path: str, size: int, interpolation: str) -> tuple[torch.Tensor | None, str, str | None]:
    """(uint8 (3, size, size) tensor, path, None) or (None, path, reason)."""
    try:
        array, _ = _decode(path, size, keep_small_squares=False, interpolation=interpolation)
    except Exception as error:
        return None, path, _reason(error)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), path, None


class _StreamedFiles(Dataset):
    """Picklable view of a streamed set for DataLoader workers: index -> decoded item."""

    def __init__(self, paths: list[str], labels: torch.Tensor, size: int, interpolation: str) -> None:
        self.paths, self.labels, self.size, self.interpolation = paths, labels, size, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image, path, reason = _decode_item(self.paths[index], self.size, self.interpolation)
        return image, int(self.labels[index]), path, reason


class _Collate:
    """Stack the readable images of a batch; return the unreadable ones separately instead of failing."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        good = [item for item in items if item[0] is not None]
        bad = [(item[2], item[3]) for item in items if item[0] is None]
        if good:
            images = torch.stack([item[0] for item in good])
        else:
            images = torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return images, torch.tensor([item[1] for item in good], dtype=torch.long), bad


def iter_batches(
    images: ImageSet, batches: Iterable[torch.Tensor], num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 images, int64 labels)`` for each index tensor in ``batches``, in order.

    In-memory sets are indexed directly. Streamed sets are decoded by a DataLoader with ``num_workers``
    worker processes over exactly these index lists. An unreadable file raises BadImagesError, or, when the
    set was loaded with skip_bad_images, is dropped from its batch (with its label), recorded in
    ``images.skipped`` and warned about.
    """
    if images.images is not None:
        for indices in batches:
            indices = torch.as_tensor(indices, dtype=torch.long)
            yield images.images[indices], images.labels[indices]
        return
    dataset = _StreamedFiles(images.paths, images.labels, images.image_size, images.interpolation)
    index_lists = ([int(i) for i in torch.as_tensor(b).flatten()] for b in batches)
    loader = DataLoader(
        dataset,
        batch_sampler=index_lists,
        num_workers=num_workers,
        collate_fn=_Collate(images.image_size),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    for batch_images, labels, bad in loader:
        if bad:
            if not images.skip_bad_images:
                raise BadImagesError(bad)
            images.skipped.extend(bad)
            warnings.warn(
                f"skipped {len(bad)} unreadable image(s) in this batch ({len(images.skipped)} so far), "
                f"e.g. {bad[0][0]}: {bad[0][1]}",
                stacklevel=2,
            )
        yield batch_images, labels

