"""Pretrained weights by name, from the Hugging Face Hub.

A *name* is a timm pretrained name (``vit_base_patch16_224.augreg2_in21k_ft_in1k``, hub repo
``timm/<name>``), a hub repo id (``timm/<name>``, ``google/vit-base-patch16-224``) or timm's
``hf-hub:owner/repo`` spelling, each optionally followed by ``@revision``. :func:`download` fetches the
repo's config.json and weights with huggingface_hub into the user's Hugging Face cache (``HF_HOME``;
``HF_HUB_OFFLINE=1`` and the stored token are honoured by huggingface_hub) and returns the snapshot
folder, which the loaders of :mod:`vitkit.weights.load` read like any timm or Hugging Face folder.

Safetensors only, unless ``trust_checkpoint``: a repo whose weights are a pickle is refused before it
is downloaded. A freshly downloaded file whose sha256 differs from the hub's is deleted, never used.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitkit.weights.errors import WeightsError

__all__ = ["PRETRAINED", "HubName", "download", "is_hub_name", "list_pretrained", "not_found_hint", "parse_name",
           "resolve_path"]

# The pretrained ViTs vitkit builds exactly: name -> (architecture, resolution, source).
# The first tag listed for an architecture is the one a bare architecture name means (timm's default).
PRETRAINED: dict[str, tuple[str, int, str]] = {
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k": ("Ti/16", 224, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_tiny_patch16_224.augreg_in21k": ("Ti/16", 224, "timm, AugReg: ImageNet-21k"),
    "vit_tiny_patch16_384.augreg_in21k_ft_in1k": ("Ti/16", 384, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": ("S/16", 224, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_small_patch16_224.augreg_in21k": ("S/16", 224, "timm, AugReg: ImageNet-21k"),
    "vit_small_patch16_224.augreg_in1k": ("S/16", 224, "timm, AugReg: ImageNet-1k"),
    "vit_small_patch16_384.augreg_in21k_ft_in1k": ("S/16", 384, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_small_patch32_224.augreg_in21k_ft_in1k": ("S/32", 224, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_small_patch32_224.augreg_in21k": ("S/32", 224, "timm, AugReg: ImageNet-21k"),
    "vit_small_patch32_384.augreg_in21k_ft_in1k": ("S/32", 384, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": ("B/16", 224, "timm, AugReg2: ImageNet-21k, fine-tuned on 1k"),
    "vit_base_patch16_224.augreg_in21k_ft_in1k": ("B/16", 224, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_base_patch16_224.augreg_in21k": ("B/16", 224, "timm, AugReg: ImageNet-21k"),
    "vit_base_patch16_224.augreg_in1k": ("B/16", 224, "timm, AugReg: ImageNet-1k"),
    "vit_base_patch16_224.orig_in21k": ("B/16", 224, "timm, the paper's ImageNet-21k backbone (no head)"),
    "vit_base_patch16_384.augreg_in21k_ft_in1k": ("B/16", 384, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_base_patch16_384.orig_in21k_ft_in1k": ("B/16", 384, "timm, the paper's: ImageNet-21k, fine-tuned on 1k"),
    "vit_base_patch32_224.augreg_in21k_ft_in1k": ("B/32", 224, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_base_patch32_224.augreg_in21k": ("B/32", 224, "timm, AugReg: ImageNet-21k"),
    "vit_base_patch32_384.augreg_in21k_ft_in1k": ("B/32", 384, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_base_patch8_224.augreg2_in21k_ft_in1k": ("B/8", 224, "timm, AugReg2: ImageNet-21k, fine-tuned on 1k"),
    "vit_large_patch16_224.augreg_in21k_ft_in1k": ("L/16", 224, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_large_patch16_384.augreg_in21k_ft_in1k": ("L/16", 384, "timm, AugReg: ImageNet-21k, fine-tuned on 1k"),
    "vit_large_patch32_384.orig_in21k_ft_in1k": ("L/32", 384, "timm, the paper's: ImageNet-21k, fine-tuned on 1k"),
    "deit3_small_patch16_224.fb_in22k_ft_in1k": ("deit3_small_patch16_224", 224, "timm, DeiT III: 22k, tuned on 1k"),
    "deit3_base_patch16_224.fb_in22k_ft_in1k": ("deit3_base_patch16_224", 224, "timm, DeiT III: 22k, tuned on 1k"),
    "vit_small_patch14_dinov2.lvd142m": ("vit_small_patch14_dinov2", 518, "timm, DINOv2: self-supervised, LVD-142M"),
    "vit_base_patch14_dinov2.lvd142m": ("vit_base_patch14_dinov2", 518, "timm, DINOv2: self-supervised, LVD-142M"),
    "vit_small_patch14_reg4_dinov2.lvd142m": ("vit_small_patch14_reg4_dinov2", 518, "timm, DINOv2, 4 registers"),
    "vit_base_patch14_reg4_dinov2.lvd142m": ("vit_base_patch14_reg4_dinov2", 518, "timm, DINOv2, 4 registers"),
    "vit_base_patch16_clip_224.laion2b": ("vit_base_patch16_clip_224", 224, "timm, CLIP image tower: LAION-2B"),
    "vit_base_patch16_siglip_224.webli": ("vit_base_patch16_siglip_224", 224, "timm, SigLIP image tower: WebLI"),
    "google/vit-base-patch16-224": ("B/16", 224, "Hugging Face, the paper's: ImageNet-21k, fine-tuned on 1k"),
    "google/vit-base-patch16-224-in21k": ("B/16", 224, "Hugging Face, the paper's ImageNet-21k backbone"),
}
_DEFAULT_TAG = {name.split(".")[0]: name for name in reversed(PRETRAINED) if "/" not in name}

# A weights file's suffix: such a name is a path that does not exist, never a hub name.
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".tar", ".json", ".onnx")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TIMM_NAME = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")
# timm architectures that may be ViTs vitkit builds (the loader then checks every key); others are refused unread.
VIT_ARCHITECTURES = ("vit_", "deit", "flexivit_")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VARIANT = re.compile(r"(Ti|S|M|B|L|H)/\d+(@\d+)?")  # vitkit's own variant names ("B/16@384"), not repos


@dataclass(frozen=True)
class HubName:
    """A name as the hub knows it: the repo and the revision (None: the default branch)."""

    text: str
    repo_id: str
    revision: str | None = None


def parse_name(text: str) -> HubName | None:
    """The hub repo a name means, or None when it is not spelled like one (see the module doc)."""
    name, _, revision = str(text).partition("@")
    if _VARIANT.fullmatch(str(text)):
        return None
    if not name or name.lower().endswith(_FILE_SUFFIXES) or (revision == "" and "@" in str(text)):
        return None
    name = name.removeprefix("hf-hub:")
    if _REPO_ID.fullmatch(name) and ".." not in name:
        return HubName(str(text), name, revision or None)
    if name in _DEFAULT_TAG:
        name = _DEFAULT_TAG[name]
    if _TIMM_NAME.fullmatch(name):
        return HubName(str(text), f"timm/{name}", revision or None)
    return None


def is_hub_name(source: object) -> bool:
    """Whether ``source`` is a str naming a hub repo rather than an existing path."""
    return isinstance(source, str) and not Path(source).exists() and parse_name(source) is not None


def resolve_path(source: str, *, trust_checkpoint: bool = False) -> Path:
    """An existing path as it is; otherwise the local folder of the hub name (downloaded if need be).

    A string that is neither raises :class:`WeightsError` naming the known names closest to it.
    """
    path = Path(source)
    if path.exists():
        return path
    if parse_name(source) is None:
        raise WeightsError(f"{source}: no such file{not_found_hint(source)}")
    return download(source, trust_checkpoint=trust_checkpoint)


def not_found_hint(text: str) -> str:
    """For a missing path that may be a mistyped pretrained name: the known names closest to it."""
    if str(text).lower().endswith(_FILE_SUFFIXES):
        return ""
    return f", and not a pretrained name{_close_matches(text)}"


def list_pretrained(pattern: str = "*") -> list[dict[str, Any]]:
    """The known pretrained names matching the fnmatch ``pattern``, with architecture, resolution and source."""
    return [{"name": name, "architecture": arch, "img_size": size, "source": source}
            for name, (arch, size, source) in PRETRAINED.items() if fnmatch.fnmatchcase(name, pattern)]


def _close_matches(text: str) -> str:
    name = str(text).partition("@")[0].removeprefix("hf-hub:").removeprefix("timm/")
    matches = difflib.get_close_matches(name, list(PRETRAINED), n=4, cutoff=0.5)
    if not matches:
        return "; `vitkit models --pretrained` lists the known names"
    return f"; did you mean {', '.join(matches)}? (`vitkit models --pretrained` lists them)"


def download(name: str, *, trust_checkpoint: bool = False) -> Path:
    """The local snapshot folder of hub ``name`` with its config.json and weights, downloaded if not cached.

    Refused before the weights are fetched: a repo whose config.json is not a ViT vitkit builds, and
    one whose only weights are a pickle (pytorch_model.bin) unless ``trust_checkpoint``.
    """
    hub = parse_name(name)
    if hub is None:
        raise WeightsError(f"{name}: not a hub name (timm name, owner/repo or hf-hub:owner/repo){_close_matches(name)}")
    config = _fetch(hub, "config.json")
    _check_architecture(hub, config)
    folder = config.parent
    for optional in ("preprocessor_config.json",):
        _fetch(hub, optional, required=False)
    if _fetch(hub, "model.safetensors", required=False) is not None:
        return folder
    if not trust_checkpoint:
        if _exists_remotely(hub, "pytorch_model.bin"):
            raise WeightsError(
                f"{hub.repo_id}: its weights are a pickle only (pytorch_model.bin, no model.safetensors), which "
                "could run code when loaded; pass --trust-checkpoint (trust_checkpoint=True) only if you trust "
                "the repo's owner"
            )
        raise WeightsError(f"{hub.repo_id}: the repo has no model.safetensors; vitkit loads timm and Hugging Face "
                           "ViT repos")
    _fetch(hub, "pytorch_model.bin")
    return folder


def _fetch(hub: HubName, filename: str, required: bool = True) -> Path | None:
    """One file of the repo from the cache or the hub; None for an absent optional file."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    blobs = Path(constants.HF_HUB_CACHE) / f"models--{hub.repo_id.replace('/', '--')}" / "blobs"
    cached = set(os.listdir(blobs)) if blobs.is_dir() else set()
    try:
        path = Path(hf_hub_download(hub.repo_id, filename, revision=hub.revision))
    except LocalEntryNotFoundError as e:
        if not required:
            return None
        fix = (f"offline (HF_HUB_OFFLINE=1): run `vitkit download {hub.text}` while online, or set HF_HUB_OFFLINE=0"
               if constants.HF_HUB_OFFLINE else
               f"the Hugging Face Hub could not be reached: run `vitkit download {hub.text}` when online")
        raise WeightsError(
            f"{hub.repo_id}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {fix}"
        ) from e
    except GatedRepoError as e:
        raise WeightsError(f"{hub.repo_id}: a gated repo; accept its terms on the hub and log in "
                           "(`hf auth login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise WeightsError(f"{hub.text}: no such file or folder, and the Hugging Face Hub has no model repo "
                           f"{hub.repo_id!r} (a private one needs `hf auth login` or HF_TOKEN)"
                           f"{_close_matches(hub.text)}") from e
    except RevisionNotFoundError as e:
        raise WeightsError(f"{hub.repo_id}: no revision {hub.revision!r} (a branch, tag or commit)") from e
    except EntryNotFoundError as e:
        if not required:
            return None
        raise WeightsError(f"{hub.repo_id}: the repo has no {filename}; vitkit loads timm and Hugging Face ViT "
                           "repos") from e
    except (HfHubHTTPError, OSError) as e:
        if "Consistency check failed" in str(e):  # fewer or more bytes than the hub announced
            raise WeightsError(f"{hub.repo_id}: the download of {filename} was cut short or is corrupt "
                               f"({str(e).split('(')[0].strip()}); it was not used, run the command again") from e
        raise WeightsError(f"{hub.repo_id}: downloading {filename} failed: {' '.join(str(e).split())}") from e
    blob = path.resolve()
    if blob.name not in cached and _SHA256.fullmatch(blob.name):  # new large file: its name is its sha256
        digest = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != blob.name:
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise WeightsError(f"{hub.repo_id}: the downloaded {filename} is corrupt (sha256 {digest.hexdigest()}, "
                               f"the hub says {blob.name}); it was deleted, try again")
    return path


def _exists_remotely(hub: HubName, filename: str) -> bool:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(hub.repo_id, filename, revision=hub.revision))
    except Exception:  # absent, or the hub unreachable: either way the file cannot be had
        return False
    return True


def _check_architecture(hub: HubName, config_path: Path) -> None:
    """Refuse, before the weights are fetched, a repo whose config.json names a model that is not a ViT."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        return
    if "model_type" in config and config["model_type"] != "vit":
        raise WeightsError(f"{hub.repo_id}: a Hugging Face {config['model_type']!r} model; vitkit loads plain "
                           "ViTs only (model_type 'vit')")
    architecture = config.get("architecture")
    if isinstance(architecture, str) and not architecture.startswith(VIT_ARCHITECTURES):
        raise WeightsError(f"{hub.repo_id}: a timm {architecture!r} model; vitkit loads plain ViTs only (vit_*)")
