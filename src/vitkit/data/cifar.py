"""CIFAR-10 and CIFAR-100 in the official python format, downloaded with every byte checked.

The official files are pickles, and unpickling runs code, so nothing is unpickled before its MD5 matches
the published one, and the unpickler only accepts the NumPy types the files really contain. Downloads go
to ``<name>.part`` and are renamed only after the archive's MD5 matches; a mismatching archive is deleted
and nothing of it is extracted. Extraction uses tarfile's ``"data"`` filter after checking every member,
so a member that would land outside the target directory stops the run before anything is written.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch


@dataclass(frozen=True)
class CifarSpec:
    title: str
    url: str
    archive: str  # file name of the downloaded archive
    archive_md5: str
    folder: str  # the directory the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes  # key of the labels in each batch dict
    names_key: bytes  # key of the class names in the meta dict
    md5: dict[str, str]  # MD5 of every file above, checked before it is unpickled


# Module-level so that tests (and mirrors) can swap the URL and checksums with dataclasses.replace.
CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
    "cifar100": CifarSpec(
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
}


def cifar_name(source: str) -> str | None:
    """'cifar10' / 'CIFAR-10' / 'cifar_100' -> the CIFAR_SPECS key, else None."""
    key = source.lower().replace("-", "").replace("_", "")
    return key if key in CIFAR_SPECS else None


def detect_cifar_dir(path: Path) -> str | None:
    """The spec name when ``path`` is an extracted official CIFAR directory, else None."""
    if not path.is_dir():
        return None
    for name, spec in CIFAR_SPECS.items():
        if (path / spec.meta_file).is_file() and all((path / f).is_file() for f in spec.train_files):
            return name
    return None


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest.part``, check its MD5, then rename it to ``dest``.

    On a mismatch or any failure the partial file is deleted, so a later run never trusts it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as file:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                file.write(block)
    except BaseException as error:
        part.unlink(missing_ok=True)
        if isinstance(error, OSError):  # URLError, HTTPError, timeouts, disk full
            raise OSError(
                f"downloading {url} to {dest} failed: {error}. Check the network, or download the file by hand "
                f"and place it at {dest}."
            ) from error
        raise
    if digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise ValueError(
            f"{url}: downloaded file has MD5 {digest.hexdigest()}, expected {md5}; it was deleted. "
            "The download was corrupted or the file was changed; try again."
        )
    os.replace(part, dest)
    return dest


def extract(archive: Path, target_parent: Path, folder: str) -> Path:
    """Extract ``archive`` so that ``target_parent/folder`` appears complete, or not at all.

    Every member is checked against tarfile's "data" filter before anything is written, extraction goes
    to a temporary sibling directory, and only the finished ``folder`` is moved into place.
    """
    tmp = target_parent / f".{folder}.extracting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                try:
                    tarfile.data_filter(member, str(tmp))
                except tarfile.FilterError as error:
                    raise ValueError(
                        f"{archive}: refusing to extract member {member.name!r}: {error}. The archive is not a "
                        "genuine CIFAR archive; delete it and download again."
                    ) from error
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / folder).is_dir():
            raise ValueError(f"{archive}: does not contain the folder {folder}/; delete it and download again.")
        os.replace(tmp / folder, target_parent / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target_parent / folder


def prepare(name: str, root: Path, *, download_missing: bool, url: str | None = None) -> Path:
    """The extracted directory of CIFAR ``name`` under ``root``, downloading and extracting when allowed."""
    spec = CIFAR_SPECS[name]
    target = root / spec.folder
    needed = [*spec.train_files, *spec.test_files, spec.meta_file]
    if target.is_dir():
        missing = [f for f in needed if not (target / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{target}: incomplete {spec.title} folder (missing {', '.join(missing)}); delete it and run again "
                "with --download."
            )
        return target
    archive = root / spec.archive
    if not archive.is_file():
        if not download_missing:
            raise FileNotFoundError(
                f"{spec.title} not found: no {target} (data root {root}, from --data, $VITKIT_DATA or "
                f"~/.cache/vitkit). Pass --download (download=True) to fetch it from {url or spec.url}, or pass "
                f"the path of an extracted {spec.folder} folder."
            )
        download(url or spec.url, archive, spec.archive_md5)
    else:
        actual = file_md5(archive)
        if actual != spec.archive_md5:
            archive.unlink()
            raise ValueError(
                f"{archive}: MD5 {actual} does not match the official {spec.archive_md5}; the file was deleted "
                "without extracting anything. Run again with --download to fetch a fresh copy."
            )
    return extract(archive, root, spec.folder)


class _CifarUnpickler(pickle.Unpickler):
    """Accepts only what the official CIFAR pickles contain: dicts, lists, strings and NumPy arrays."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2 (re-pickled copies of the files)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        if module == "_codecs":
            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        multiarray = getattr(np, "_core", None) or np.core
        return getattr(multiarray.multiarray, name)


def _load_pickle(path: Path, expected_md5: str) -> dict:
    actual = file_md5(path)
    if actual != expected_md5:
        raise ValueError(
            f"{path}: MD5 {actual} does not match the official {expected_md5}; not loading it. The file was "
            f"changed or damaged: delete {path.parent} and run again with --download."
        )
    with open(path, "rb") as file:
        data = file.read()
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:
        raise ValueError(f"{path}: not a valid CIFAR batch file ({error})") from error


def _load_batch(path: Path, spec: CifarSpec) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _load_pickle(path, spec.md5[path.name])
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[spec.label_key], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"{path}: CIFAR batch without the key {error}") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {labels.shape}")
    # Rows are the red, green and blue 32x32 planes one after the other: exactly (3, 32, 32).
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def load_cifar_dir(path: Path, name: str) -> dict[str, object]:
    """Load an extracted CIFAR directory: {"classes", "train": (images, labels), "test": (images, labels)}."""
    spec = CIFAR_SPECS[name]
    meta = _load_pickle(path / spec.meta_file, spec.md5[spec.meta_file])
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    result: dict[str, object] = {"classes": classes}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        parts = [_load_batch(path / f, spec) for f in files]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(f"{path}: {split} labels outside 0..{len(classes) - 1}")
        result[split] = (images, labels)
    return result
