"""The decoded-tensor cache: decode a folder once, load it as one uint8 tensor afterwards.

Decoding 50,000 small JPEGs costs tens of seconds of CPU; reading the same pixels back as one tensor
takes well under a second. The key covers everything that decides the pixels (each file's relative path,
byte size and modification time, the requested size, the decoding rules), so an edited, added or removed
file gives a new key and a fresh decode rather than stale data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vitkit.data.decode import ALPHA_BACKGROUND, DECODE_VERSION, DEFAULT_INTERPOLATION, MAX_IMAGE_PIXELS
from vitkit.fileio import atomic_path

logger = logging.getLogger("vitkit.data")

CACHE_FORMAT = 1


def cache_key(entries: Iterable[tuple[str, int, int, int]], image_size: int | None,
              interpolation: str = DEFAULT_INTERPOLATION) -> str:
    """Hash of (relative path, label, byte size, mtime in ns) for every file, the size asked for and the rules."""
    digest = hashlib.sha256()
    rules = f"v{CACHE_FORMAT}.{DECODE_VERSION}|{ALPHA_BACKGROUND}|{MAX_IMAGE_PIXELS}|{image_size}"
    if interpolation != DEFAULT_INTERPOLATION:  # the default adds nothing, so caches made before stay valid
        rules += f"|{interpolation}"
    digest.update(f"{rules}\n".encode())
    for relpath, label, size, mtime_ns in entries:
        digest.update(f"{relpath}\0{label}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def cache_path(cache_dir: str | os.PathLike, name: str, key: str) -> Path:
    """``<cache_dir>/<readable name>-<key>.pt``; the name only helps a person find the file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "data"
    return Path(cache_dir) / f"{safe}-{key}.pt"


def load_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached payload, or None when it is missing, from another key, or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        # mmap: the pixels are paged in from the page cache as they are used, not copied up front.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(payload, dict) or payload.get("key") != key or payload.get("format") != CACHE_FORMAT:
            raise ValueError("key or format does not match")
        images, labels = payload["images"], payload["labels"]
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("unexpected tensor shapes")
    except Exception as error:  # a damaged cache is a reason to decode again, not to fail the run
        logger.warning("ignoring unreadable cache file %s (%s); decoding again", path, error)
        return None
    return payload


def save_cache(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``.

    A run killed halfway, or two runs writing at once, can never leave a half-written file under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "format": CACHE_FORMAT}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
