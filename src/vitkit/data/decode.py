"""Turn any image file a user's folder may hold into a uint8 RGB array, or a reason why not.

Every mode Pillow opens becomes RGB the same way: 16-bit and 32-bit data are rescaled (not clipped to
255, which would turn most of a 16-bit image white), alpha is composited on a fixed background (not
dropped, which leaves whatever colour the transparent pixels happened to store), EXIF orientation is
applied. Broken files raise :class:`BadImagesError` with a reason a person can act on; nothing is ever
filled in silently (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger("vitkit.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

# Transparent pixels are composited onto this colour, so the same file always gives the same RGB.
ALPHA_BACKGROUND = (255, 255, 255)

# Images with more pixels than this are refused as decompression bombs. Pillow's own limit (it only warns
# between 1x and 2x of it); the tests lower it to check the refusal without building a huge file.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# Pillow's filters by name, for the one resize (:func:`resize_center_crop`). Training data is resized with
# bicubic; a checkpoint that records no interpolation was trained on that.
INTERPOLATIONS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
DEFAULT_INTERPOLATION = "bicubic"

# Bump when the decoding rules change, so that cached tensors made under the old rules are not reused.
DECODE_VERSION = 1

# Below this many files, decoding in this process beats starting a process pool.
POOL_MIN_FILES = 2000

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImagesError(ValueError):
    """One or more image files cannot be used; ``.bad`` lists every ``(path, reason)``.

    The message lists them all, so a user can fix or delete the files in one go instead of one per run.
    """

    def __init__(self, bad: Sequence[tuple[str, str]], hint: str | None = None) -> None:
        self.bad = [(str(path), str(reason)) for path, reason in bad]
        if hint is None:
            hint = "Remove or repair these files, or pass --skip-bad-images (skip_bad_images=True) to skip them."
        lines = [f"{len(self.bad)} unreadable image file(s):"]
        lines += [f"  {path}: {reason}" for path, reason in self.bad]
        lines.append(hint)
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep .bad when the error crosses a process boundary (DataLoader workers)
        return (type(self), (self.bad,))


class _Unreadable(Exception):
    """Internal: a single file failed; carries the human-readable reason."""


def _reason(error: BaseException) -> str:
    """A short, actionable reason for a decoding failure."""
    if isinstance(error, _Unreadable):
        return str(error)
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"decompression bomb ({error})"
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can identify (wrong extension, or not an image at all)"
    text = str(error)
    if "truncated" in text:
        return f"truncated image data ({text})"
    if isinstance(error, OSError | SyntaxError | ValueError | EOFError):
        return f"corrupt image data ({type(error).__name__}: {text})"
    return f"{type(error).__name__}: {text}"


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map 16/32-bit integer or float samples to 0..255 without clipping.

    Integer data within 0..65535 is read as 16-bit (the usual source: 16-bit PNG/TIFF), so a given sample
    value always maps to the same gray. Anything else (negative or larger integers, floats outside 0..1) is
    stretched from its own minimum to maximum; floats within 0..1 are read as fractions of white.
    """
    if mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(values * 255.0).astype(np.uint8)
    else:
        values = values.astype(np.int64)
        lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
        if lo >= 0 and hi <= 65535:
            return ((values * 255 + 32767) // 65535).astype(np.uint8)
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite(rgba: np.ndarray) -> np.ndarray:
    """Blend an RGBA array onto :data:`ALPHA_BACKGROUND` (integer arithmetic, rounded)."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    background = np.asarray(ALPHA_BACKGROUND, np.uint32)
    return ((rgb * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to an (H, W, 3) uint8 RGB array."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.array(image)  # a writable copy: torch warns about read-only arrays
    if mode.startswith("I") or mode == "F":  # I, I;16, I;16B, I;16L, I;16N, F
        gray = _scale_to_uint8(np.asarray(image), mode)
        return np.repeat(gray[..., None], 3, axis=2)
    alpha_modes = ("RGBA", "LA", "PA", "RGBa", "La")
    if mode in alpha_modes or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite(np.asarray(image.convert("RGBA")))
    return np.array(image.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX ...


def resize_center_crop(rgb: np.ndarray, size: int, interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """Resize the shorter side to ``size`` (antialiased when shrinking) and center-crop a square.

    The one resize of vitkit: training data, evaluation and prediction all go through it.
    ``interpolation`` is a Pillow filter name (:data:`INTERPOLATIONS`).
    """
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        return rgb
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = Image.fromarray(rgb)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _resampling(interpolation))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))


def fit_to_size(rgb: np.ndarray, size: int, keep_small_squares: bool,
                interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """:func:`resize_center_crop`, except that with ``keep_small_squares`` a square image no larger than
    ``size`` stays native: a 32x32 set then stays 32x32 and is resized on the model's device, not stored at
    224x224."""
    height, width = rgb.shape[:2]
    if keep_small_squares and height == width and height <= size:
        return rgb
    return resize_center_crop(rgb, size, interpolation)


def check_interpolation(interpolation: str) -> str:
    """``interpolation`` itself if it names a Pillow filter, else a ValueError listing the names."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not a Pillow filter; use one of "
                         f"{', '.join(INTERPOLATIONS)} ({DEFAULT_INTERPOLATION!r} is what vitkit trains with)")
    return interpolation


def _resampling(interpolation: str) -> Image.Resampling:
    return Image.Resampling[check_interpolation(interpolation).upper()]


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A Pillow image as its (H, W, 3) uint8 RGB array, turned upright by its EXIF orientation."""
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # damaged EXIF metadata: the pixels may still be fine, so keep them unrotated
        orientation = 1
    rgb = to_rgb_array(image)
    if orientation in _TRANSPOSE_FOR_ORIENTATION:
        rgb = np.array(Image.fromarray(rgb).transpose(_TRANSPOSE_FOR_ORIENTATION[orientation]))
    return rgb


def _decode(path: str, size: int | None, keep_small_squares: bool,
            interpolation: str = DEFAULT_INTERPOLATION) -> tuple[np.ndarray, tuple[str, str, int, int]]:
    """Decode one file to (H, W, 3) uint8 plus (format, mode, width, height) of the file as stored.

    ``size=None`` keeps the native size. Otherwise the result is :func:`fit_to_size`'s.
    """
    if os.path.getsize(path) == 0:
        raise _Unreadable("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; a warning is a bomb too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _Unreadable(
                    f"decompression bomb: {width}x{height} = {width * height} pixels, over the limit of "
                    f"{MAX_IMAGE_PIXELS} (vitkit.data.decode.MAX_IMAGE_PIXELS)"
                )
            info = (image.format or "?", image.mode, width, height)
            if size is not None and image.format == "JPEG" and min(width, height) > 2 * size:
                # Let libjpeg skip detail that the resize would throw away (DCT scaling, 2x-8x faster).
                scale = size / min(width, height)
                image.draft(None, (int(width * scale) + 1, int(height * scale) + 1))
            image.load()
            rgb = pil_to_rgb(image)
    if size is not None:
        rgb = fit_to_size(rgb, size, keep_small_squares, interpolation)
    return np.ascontiguousarray(rgb), info


def decode_image(path: str | os.PathLike, size: int | None = None, *, keep_small_squares: bool = False,
                 interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array, ``size`` x ``size`` when ``size`` is given (see
    :func:`fit_to_size` for ``keep_small_squares`` and ``interpolation``).

    Raises :class:`BadImagesError` naming the file and the reason when it cannot be used.
    """
    path = os.fspath(path)
    check_interpolation(interpolation)  # a wrong name is the caller's error, not the file's
    try:
        return _decode(path, size, keep_small_squares, interpolation)[0]
    except FileNotFoundError:
        raise
    except Exception as error:
        raise BadImagesError([(path, _reason(error))]) from error


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Load one image file as a uint8 (3, H, W) RGB tensor at its native (EXIF-oriented) size.

    Every mode becomes RGB: 16-bit rescaled, alpha composited on :data:`ALPHA_BACKGROUND`, palette
    transparency honoured. A missing file raises FileNotFoundError; an unreadable one BadImagesError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    return torch.from_numpy(decode_image(path)).permute(2, 0, 1).contiguous()


def _decode_chunk(paths: list[str], size: int | None, keep_small_squares: bool, interpolation: str) -> list[tuple]:
    """Worker entry point: decode a chunk; each result is (array, info, None) or (None, None, reason)."""
    results = []
    for path in paths:
        try:
            array, info = _decode(path, size, keep_small_squares, interpolation)
            results.append((array, info, None))
        except Exception as error:
            results.append((None, None, _reason(error)))
    return results


def _pool_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def decode_files(
    paths: Sequence[str], size: int | None = None, *, keep_small_squares: bool = False, workers: int | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> list[tuple]:
    """Decode many files, in a process pool when there are enough of them; results in input order.

    Each result is ``(array, (format, mode, width, height), None)`` or ``(None, None, reason)``. Decoding is
    CPU-bound Python+C work, so processes (not threads) are what scales it.
    """
    paths = [os.fspath(p) for p in paths]
    check_interpolation(interpolation)
    workers = _pool_workers() if workers is None else workers
    if workers <= 1 or len(paths) < POOL_MIN_FILES:
        return _decode_chunk(paths, size, keep_small_squares, interpolation)
    chunk = max(64, min(1024, len(paths) // (workers * 8) + 1))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    # fork starts in milliseconds; the children only run Pillow and NumPy, so the parent's threads are harmless.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    results: list[tuple] = []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        futures = [pool.submit(_decode_chunk, c, size, keep_small_squares, interpolation) for c in chunks]
        for done, future in enumerate(futures, 1):
            results.extend(future.result())
            if done % 20 == 0:
                logger.info("decoded %d of %d images", len(results), len(paths))
    return results
