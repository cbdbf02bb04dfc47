"""``load_splits``: one entry point for CIFAR-10/100 and image folders, all giving uint8 images and labels.

Folders are decoded once and then read back from the decoded-tensor cache; folders whose decoded pixels
would not fit comfortably in memory are streamed (decoded per batch) instead.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from vitkit.data import cifar
from vitkit.data.cache import cache_key, cache_path, load_cache, save_cache
from vitkit.data.dataset import DataSplits, ImageSet
from vitkit.data.decode import (
    DEFAULT_INTERPOLATION,
    BadImagesError,
    check_interpolation,
    decode_files,
    resize_center_crop,
)
from vitkit.data.folder import FileEntry, FolderLayout, check_layout, scan_folder
from vitkit.data.split import holdout_split

logger = logging.getLogger("vitkit.data")

# Above this many bytes of decoded pixels (all splits together), a folder is streamed instead of held.
STREAM_ABOVE_BYTES = 4 * 2**30


def resolve_data_root(path: str | os.PathLike | None = None) -> Path:
    """Where datasets and the cache live: ``path`` (--data-root) > ``$VITKIT_DATA`` > ``~/.cache/vitkit``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get("VITKIT_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vitkit"


def load_splits(
    source: str | os.PathLike,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    download: bool = False,
    in_memory: bool | None = None,
    data_root: str | os.PathLike | None = None,
    workers: int | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> DataSplits:
    """Load a source into train/val(/test) splits of uint8 images.

    ``source``: "cifar10"/"cifar100" (official python format under the data root, fetched with
    ``download=True``), an extracted ``cifar-10-batches-py``/``cifar-100-python`` folder, or an image folder
    (``ROOT/<class>/*`` or ``ROOT/{train,val,test}/<class>/*``).

    ``image_size``: the stored size for images larger than it or of mixed sizes (shorter side resized, then
    center crop). Square images of one size no larger than ``image_size`` (CIFAR's 32x32 for a 224 model)
    stay native: the augmentation resizes them on the training device instead of storing them 49x larger.
    None keeps the native size, which needs all images to be square and of one size.

    ``val_fraction``/``seed``: the per-class holdout used when the source has no val split (0 gives an empty
    val). ``cache_dir``: where decoded folders are cached (default ``<data root>/cache``). ``in_memory``:
    None decides by the estimated decoded size (streams above 4 GiB). ``workers``: decoding processes for
    the first load (default: the usable cores). ``interpolation``: the Pillow filter of the resize
    (``vitkit eval`` passes the one the checkpoint was trained with).
    """
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size={image_size}: must be a positive number of pixels, e.g. 224")
    check_interpolation(interpolation)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1), e.g. 0.1 to hold out 10% of each class")
    text = os.fspath(source)
    path = Path(text).expanduser()
    name = cifar.cifar_name(text)
    if name is not None and not path.exists():
        directory = cifar.prepare(name, resolve_data_root(data_root), download_missing=download)
        return _cifar_splits(directory, name, image_size, val_fraction, seed, interpolation)
    name = cifar.detect_cifar_dir(path)
    if name is not None:
        return _cifar_splits(path, name, image_size, val_fraction, seed, interpolation)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else resolve_data_root(data_root) / "cache"
    return _folder_splits(path, image_size, val_fraction, seed, cache_dir, skip_bad_images, in_memory, workers,
                          interpolation)


def _resize_images(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, size, size), each image through :func:`resize_center_crop`."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for row, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        out[row] = torch.from_numpy(resize_center_crop(image, size, interpolation)).permute(2, 0, 1)
    return out


def _stored_size(native: int, image_size: int | None) -> int:
    return native if image_size is None or native <= image_size else image_size


def _with_holdout(train: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    train_idx, val_idx = holdout_split(train.labels, val_fraction, seed)
    return train.subset(train_idx), train.subset(val_idx)


def _cifar_splits(directory: Path, name: str, image_size: int | None, val_fraction: float, seed: int,
                  interpolation: str) -> DataSplits:
    start = time.perf_counter()
    data = cifar.load_cifar_dir(directory, name)
    classes: list[str] = data["classes"]  # type: ignore[assignment]
    size = _stored_size(32, image_size)
    sets = {}
    for split in ("train", "test"):
        images, labels = data[split]  # type: ignore[misc]
        sets[split] = ImageSet(labels, classes, _resize_images(images, size, interpolation))
    train, val = _with_holdout(sets["train"], val_fraction, seed)
    logger.info("loaded %s from %s in %.1f s", cifar.CIFAR_SPECS[name].title, directory, time.perf_counter() - start)
    return DataSplits(train, val, sets["test"], classes, size, source=f"{cifar.CIFAR_SPECS[name].title} ({directory})")


def _probe_sizes(entries: list[FileEntry], count: int = 64) -> list[tuple[int, int]]:
    """Header sizes of up to ``count`` files spread over the list (cheap: no pixel decoding)."""
    step = max(1, len(entries) // count)
    sizes = []
    for entry in entries[::step][:count]:
        try:
            with Image.open(entry.path) as image:
                sizes.append(image.size)
        except Exception:  # unreadable files are reported by the full decode or the streamed batches
            continue
    return sizes


def _planned_size(layout: FolderLayout, image_size: int | None, strict: bool) -> int:
    """The stored size a folder will most likely get, judged from a sample of headers.

    ``strict`` (streaming, where there is no full decode to find out later) refuses a sample of mixed sizes
    without ``image_size``; otherwise the largest side seen serves as the estimate.
    """
    entries = [e for files in layout.splits.values() for e in files]
    sizes = _probe_sizes(entries)
    if sizes and len(set(sizes)) == 1 and sizes[0][0] == sizes[0][1]:
        return _stored_size(sizes[0][0], image_size)
    if image_size is None and not strict:
        return max((max(s) for s in sizes), default=1)
    if image_size is None:
        shown = ", ".join(f"{w}x{h}" for (w, h), _ in Counter(sizes).most_common(5))
        raise ValueError(
            f"{layout.root}: images are not all square and of one size (seen {shown}); pass --image-size N "
            "(image_size=N) to resize the shorter side to N and center-crop."
        )
    return image_size


def _decode_split(entries: list[FileEntry], root: Path, image_size: int | None, workers: int | None,
                  interpolation: str) -> dict:
    """Decode every file of a split into one uint8 tensor; unreadable files are listed, not filled in."""
    start = time.perf_counter()
    results = decode_files([e.path for e in entries], image_size, keep_small_squares=True, workers=workers,
                           interpolation=interpolation)
    good = [(i, array) for i, (array, _, _) in enumerate(results) if array is not None]
    bad = [(entries[i].relpath, reason) for i, (array, _, reason) in enumerate(results) if array is None]
    shapes = Counter(array.shape[:2] for _, array in good)
    if len(shapes) > 1 or any(h != w for h, w in shapes):
        if image_size is None:
            examples = {}
            for i, array in good:
                examples.setdefault(array.shape[:2], entries[i].path)
            shown = ", ".join(f"{w}x{h} ({n}, e.g. {examples[(h, w)]})" for (h, w), n in shapes.most_common(4))
            raise ValueError(
                f"{root}: images are not all square and of one size: {shown}. Pass --image-size N "
                "(image_size=N) to resize the shorter side to N and center-crop."
            )
        good = [(i, resize_center_crop(a, image_size, interpolation)) for i, a in good]
    size = good[0][1].shape[0] if good else (image_size or 0)
    images = torch.empty((len(good), 3, size, size), dtype=torch.uint8)
    for row, (_, array) in enumerate(good):
        images[row] = torch.from_numpy(array).permute(2, 0, 1)
    kept = [entries[i] for i, _ in good]
    logger.info("decoded %d images from %s in %.1f s", len(entries), root, time.perf_counter() - start)
    return {
        "images": images,
        "labels": torch.tensor([e.label for e in kept], dtype=torch.long),
        "relpaths": "\n".join(e.relpath for e in kept),  # one string: unpickles 50x faster than a list
        "bad": bad,
    }


def _load_or_decode(
    layout: FolderLayout, split: str, image_size: int | None, cache_dir: Path, workers: int | None,
    interpolation: str,
) -> dict:
    entries = layout.splits[split]
    key = cache_key(((e.relpath, e.label, e.size, e.mtime_ns) for e in entries), image_size, interpolation)
    path = cache_path(cache_dir, f"{layout.root.resolve().name}-{split}", key)
    payload = load_cache(path, key)
    if payload is None:
        payload = {"key": key, **_decode_split(entries, layout.root, image_size, workers, interpolation)}
        try:
            save_cache(path, payload)
        except OSError as error:  # a read-only or full disk costs speed next time, not this run
            warnings.warn(f"could not write the decoded-image cache {path}: {error}", stacklevel=3)
    return payload


def _folder_splits(
    root: Path,
    image_size: int | None,
    val_fraction: float,
    seed: int,
    cache_dir: Path,
    skip_bad_images: bool,
    in_memory: bool | None,
    workers: int | None,
    interpolation: str,
) -> DataSplits:
    layout = scan_folder(root)
    check_layout(layout)
    root = layout.root  # absolute, so that reported paths work from any directory
    classes = layout.classes
    total = sum(len(files) for files in layout.splits.values())
    if in_memory is None:
        planned = _planned_size(layout, image_size, strict=False)
        in_memory = total * 3 * planned * planned <= STREAM_ABOVE_BYTES
    sets: dict[str, ImageSet] = {}
    skipped: list[tuple[str, str]] = []
    if in_memory:
        payloads = {split: _load_or_decode(layout, split, image_size, cache_dir, workers, interpolation)
                    for split in layout.splits}
        bad = [(str(root / rel), reason) for p in payloads.values() for rel, reason in p["bad"]]
        if bad and not skip_bad_images:
            raise BadImagesError(bad)
        if bad:
            skipped = bad
            warnings.warn(
                f"{root}: skipped {len(bad)} unreadable image file(s), e.g. {bad[0][0]}: {bad[0][1]}", stacklevel=3
            )
        sizes = {p["images"].shape[-1] for p in payloads.values() if len(p["images"])}
        if len(sizes) > 1:  # e.g. train all 32x32 (kept native) but val of mixed sizes (resized)
            if image_size is None:
                raise ValueError(f"{root}: the splits have different image sizes {sorted(sizes)}; pass --image-size N.")
            for p in payloads.values():
                p["images"] = _resize_images(p["images"], image_size, interpolation)
        for split, p in payloads.items():
            if not len(p["images"]):
                raise ValueError(f"{root / split if layout.layout == 'splits' else root}: no readable images left")
            prefix = os.path.join(str(root), "")
            paths = [prefix + rel for rel in p["relpaths"].split("\n")] if p["relpaths"] else []
            sets[split] = ImageSet(
                p["labels"],
                classes,
                p["images"],
                paths,
                skip_bad_images=skip_bad_images,
                skipped=[(str(root / rel), reason) for rel, reason in p["bad"]],
            )
        size = next(iter(sets.values())).image_size
    else:
        size = _planned_size(layout, image_size, strict=True)
        for split, entries in layout.splits.items():
            sets[split] = ImageSet(
                torch.tensor([e.label for e in entries], dtype=torch.long),
                classes,
                None,
                [e.path for e in entries],
                image_size=size,
                skip_bad_images=skip_bad_images,
                interpolation=interpolation,
            )
    train = sets["train"]
    if "val" in sets:
        val = sets["val"]
    else:
        train, val = _with_holdout(train, val_fraction, seed)
    return DataSplits(train, val, sets.get("test"), classes, size, source=str(root), skipped=skipped)
