"""Reading weight files without ever running code from them.

Three container formats come in:

* safetensors: a JSON header and raw bytes. The header is checked here (size, offsets, byte
  counts) before the safetensors library touches it, so a truncated file or one whose header claims
  gigabytes fails with the file and the tensor named instead of an opaque Rust error.
* PyTorch pickles (.pt, .pth, .bin, .ckpt, .tar): always ``torch.load(weights_only=True)``. Before
  loading, the pickle's imports are listed (without executing anything) and any that is not a plain
  tensor or container is refused by name. ``trust_checkpoint=True`` is the one explicit way to run a
  full pickle, and it warns.
* NumPy .npz (Google's vit_jax and big_vision releases): ``allow_pickle=False``.

Writing goes through :mod:`vitkit.fileio`, whose atomic writes never leave a half-written file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.weights.errors import UnsafeCheckpointError, WeightsError, preview

log = logging.getLogger(__name__)

__all__ = [
    "MAX_SAFETENSORS_HEADER",
    "PICKLE_SUFFIXES",
    "check_safetensors_header",
    "find_weight_files",
    "read_checkpoint",
    "read_json",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# The safetensors library refuses headers above 100 MB; a real ViT header is a few tens of kB.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

# Imports a weights-only torch pickle legitimately needs: torch's tensor rebuilders, storages,
# dtypes, and OrderedDict. Anything else (os.system, builtins.eval, argparse.Namespace...) is named.
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode")


def read_checkpoint(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> dict[str, Any]:
    """The top-level object stored in one weights file, read without running code from it.

    * ``.safetensors``: the tensors, plus the header metadata (str -> str) under ``"__metadata__"``
      when the file has any.
    * ``.npz``: the arrays as tensors, keys unchanged (``Transformer/encoderblock_0/...``).
    * pickles (.pt/.pth/.bin/.ckpt): whatever was saved (a state dict, or a training checkpoint
      wrapping one), loaded with ``weights_only=True``. A pickle that imports anything but tensors
      and containers raises :class:`UnsafeCheckpointError` naming the import. With
      ``trust_checkpoint=True`` it is loaded in full, with a warning: only for files you made.

    Unknown suffixes are sniffed from the first bytes.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory; read_checkpoint takes one file (read_state_dict takes both)")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    kind = _container_kind(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "npz":
        return _read_npz(path)
    return _read_pickle(path, trust_checkpoint)


def _container_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".npz":
        return "npz"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise WeightsError(f"{path}: looks like a zip archive but does not open ({e}); the file is corrupt") from e
        return "npz" if names and all(n.endswith(".npy") for n in names) else "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "pickle"


# ---- safetensors ---------------------------------------------------------------------------------


def check_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate a safetensors file's header against the file size; return (tensor entries, metadata).

    Reads only the header. Every tensor's byte range must lie inside the file and match its dtype
    and shape, so truncation is caught here, naming the first tensor that is cut off.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(
            f"{path}: {size} bytes, too short for a safetensors file (its 8-byte header length is missing); "
            "the file is truncated or not safetensors: download or export it again"
        )
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_SAFETENSORS_HEADER:
            raise WeightsError(
                f"{path}: the safetensors header claims {header_len:,} bytes (limit {MAX_SAFETENSORS_HEADER:,}); "
                "the file is corrupt or crafted, not a real checkpoint: do not use it"
            )
        if 8 + header_len > size:
            raise WeightsError(
                f"{path}: the safetensors header claims {header_len:,} bytes but only {size - 8:,} follow; "
                "the file is truncated: download or export it again"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: safetensors __metadata__ must map strings to strings; the file is corrupt")
    data_len = size - 8 - header_len
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            itemsize = _SAFETENSORS_ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: malformed header entry for tensor {key!r}: {info!r}") from e
        if not 0 <= begin <= end:
            raise WeightsError(f"{path}: tensor {key!r} has invalid data offsets {[begin, end]}; the file is corrupt")
        if end > data_len:
            raise WeightsError(
                f"{path}: tensor {key!r} ends at byte {end:,} of the data section, which has only {data_len:,} bytes; "
                "the file is truncated: download or export it again"
            )
        if end - begin != numel * itemsize:
            raise WeightsError(
                f"{path}: tensor {key!r} ({dtype}, shape {shape}) needs {numel * itemsize:,} bytes "
                f"but its offsets span {end - begin:,}; the file is corrupt"
            )
    return header, dict(metadata)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    _, metadata = check_safetensors_header(path)
    try:
        tensors: dict[str, Any] = dict(load_file(str(path), device="cpu"))
    except Exception as e:  # the library's SafetensorError is not importable under one stable name
        raise WeightsError(f"{path}: cannot read safetensors file: {e}") from e
    if metadata:
        tensors["__metadata__"] = metadata
    return tensors


# ---- npz -----------------------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # allow_pickle=False: nothing runs; any failure means a corrupt file
        raise WeightsError(f"{path}: cannot open as .npz ({e}); the file is corrupt or not a NumPy archive") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a .npy named .npz (a plain array is no context manager)
        raise WeightsError(f"{path}: holds a single array, not the named arrays of a checkpoint")
    out: dict[str, Any] = {}
    with npz:
        for key in npz.files:
            try:
                array = npz[key]
            except ValueError as e:  # object arrays need pickle, which is never allowed here
                raise WeightsError(f"{path}: array {key!r} cannot be read without pickle ({e}); refusing it") from e
            except Exception as e:
                raise WeightsError(f"{path}: array {key!r} is unreadable ({e}); the file is truncated") from e
            if array.dtype.kind not in "fiub":
                raise WeightsError(
                    f"{path}: array {key!r} has dtype {array.dtype} (bfloat16 is stored as raw bytes in .npz); "
                    "convert the checkpoint to float32 first"
                )
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


# ---- pickles -------------------------------------------------------------------------------------


def _read_pickle(path: Path, trust: bool) -> dict[str, Any]:
    if trust:
        message = (
            f"{path}: loading a full pickle because trust_checkpoint/--trust-checkpoint was given; "
            "this can run arbitrary code. Only do this for files you created yourself."
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        log.warning(message)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint: {e}") from e

    unsafe = _unsafe_globals(path)
    if unsafe:
        raise _unsafe_error(path, unsafe)
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols; the errors below say more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if named:
            raise _unsafe_error(path, named) from None
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{path}: not a PyTorch checkpoint that can be read safely ({reason}); "
            "save weights with torch.save(model.state_dict()) or as .safetensors"
        ) from None
    except Exception as e:  # a weights-only unpickler runs no code; any failure here is a corrupt file
        raise WeightsError(f"{path}: unreadable as a PyTorch checkpoint ({e}); the file is truncated or corrupt") from e
    if not isinstance(obj, dict):
        raise WeightsError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict(), not the model"
        )
    return obj


def _unsafe_error(path: Path, names: list[str]) -> UnsafeCheckpointError:
    names = sorted(set(names))
    return UnsafeCheckpointError(
        f"{path}: refusing to load: the pickle imports {', '.join(names)}, which is not a tensor or plain "
        "container, so loading it could run code. Convert it to .safetensors on a machine you trust, or, "
        "only if you created this file yourself, pass --trust-checkpoint (trust_checkpoint=True)."
    )


def _unsafe_globals(path: Path) -> list[str]:
    """The imports of a pickle that a weights-only load would not allow, found without unpickling."""
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:
            return []
    with open(path, "rb") as f:
        data = f.read()
    return [g for g in _pickle_globals(data) if not g.startswith(_SAFE_GLOBAL_PREFIXES)]


def _pickle_globals(data: bytes) -> list[str]:
    """Names imported by GLOBAL / STACK_GLOBAL opcodes in a (possibly multi-part) pickle stream.

    pickletools only decodes opcodes, it never imports or calls anything. Legacy torch files are
    several pickles back to back followed by raw storage bytes; scanning stops at the first
    position that does not decode.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []  # every string pushed so far, in order
        memo: dict[int, str | None] = {}
        last: str | None = None  # the string on top of the stack, if the top is one
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                    last = arg
                    strings.append(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = last
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    last = memo.get(int(arg))
                    if last is not None:
                        strings.append(last)
                else:
                    last = None
                if name == "STOP":
                    break
        except Exception:
            break
    return found


# ---- directories ---------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with the file named when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def find_weight_files(directory: Path) -> list[Path]:
    """The weight file(s) of a model directory; safetensors wins over pickles when both are there.

    Hugging Face sharded checkpoints (``*.index.json``) give several files.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index}: has no 'weight_map'; the sharded checkpoint is incomplete")
            shards = [directory / name for name in dict.fromkeys(weight_map.values())]
            absent = [s.name for s in shards if not s.is_file()]
            if absent:
                raise WeightsError(f"{index}: lists shard(s) {preview(absent)} that are not in {directory}")
            return shards
    for preferred in ("model.safetensors", "pytorch_model.bin"):
        if (directory / preferred).is_file():
            if preferred == "pytorch_model.bin" and any(directory.glob("*.safetensors")):
                break  # a differently named safetensors file still wins over the pickle
            return [directory / preferred]
    for suffixes in ((".safetensors",), (".npz",), PICKLE_SUFFIXES):
        found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if len(found) == 1:
            return found
        if len(found) > 1:
            raise WeightsError(
                f"{directory}: holds several weight files ({preview(p.name for p in found)}); pass the file to use"
            )
    raise WeightsError(
        f"{directory}: no weight file found (looked for model.safetensors, pytorch_model.bin, *.safetensors, "
        f"*.npz, {', '.join('*' + s for s in PICKLE_SUFFIXES)})"
    )
