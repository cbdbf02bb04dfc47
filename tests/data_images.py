"""Builders of small test images and folders for the data tests (every mode, broken files, fake folders)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg" / "train"


def noise(size: int | tuple[int, int], seed: int = 0) -> Image.Image:
    """A random RGB image (width, height) = size."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_image(path: Path, image: Image.Image, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    return path


def make_folder(root: Path, counts: dict[str, int], size: int | tuple[int, int] = 8, ext: str = "png") -> Path:
    """ROOT/<class>/<i>.<ext> with ``counts[class]`` noise images each."""
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_image(root / name / f"{i:03d}.{ext}", noise(size, seed=100 * c + i))
    return root


def truncated_jpeg(path: Path) -> Path:
    write_image(path, noise(64, seed=7), quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def text_as_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not an image\n")
    return path


def empty_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, side: int = 100_000) -> Path:
    """A few-hundred-byte PNG whose header claims side x side pixels (1-bit gray): a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    body = zlib.compress(row * 4)  # a few rows suffice: Pillow refuses at open, from the header alone
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))
    return path
