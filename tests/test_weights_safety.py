"""Weights that must not hurt: pickled code never runs, object arrays are never unpickled, broken,
truncated or oversized files and mismatched keys are refused with the file named and the model left as
it was, a folder's safetensors wins over its pickle, and the safe path warns about nothing.

Needs neither timm nor any other model library (tests/test_weights.py compares against those).
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitkit
from conftest import perturb
from vitkit.weights import (
    UnsafeCheckpointError,
    WeightsError,
    config_from_weights,
    load_weights,
    read_checkpoint,
    read_state_dict,
)


def small_model(**overrides) -> vitkit.VisionTransformer:
    """A fast known model: width 64, 4 heads (not width // 64), depth 2, 32x32 images, patch 8."""
    fields = dict(embed_dim=64, num_heads=4, depth=2, num_classes=7) | overrides
    return perturb(vitkit.create_model("Ti/8@32", **fields)).eval()


class Payload:
    """Unpickling this calls os.mkdir(marker): the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_pickle_payload_never_runs(tmp_path, container):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    state = {"state_dict": small_model().state_dict(), "extra": Payload(marker)}
    if container == "torch_zip":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    for read in (read_checkpoint, read_state_dict, config_from_weights, lambda p: load_weights(small_model(), p)):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*mkdir.*--trust-checkpoint"):
            read(path)
    assert not marker.exists()
    if container == "torch_zip":  # the explicit opt-in does load it, loudly
        with pytest.warns(UserWarning, match="trust"):
            read_checkpoint(path, trust_checkpoint=True)
        assert marker.exists()


def test_npz_object_arrays_are_never_unpickled(tmp_path):
    marker = tmp_path / "payload_ran"
    np.savez(tmp_path / "obj.npz", cls=np.array([Payload(marker)], dtype=object))  # savez pickles object arrays
    with pytest.raises(WeightsError, match=r"obj\.npz: array 'cls' cannot be read without pickle"):
        read_state_dict(tmp_path / "obj.npz")
    assert not marker.exists()


def test_directory_prefers_safetensors_over_pickle(tmp_path):
    model = small_model()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.save({"x": Payload(tmp_path / "payload_ran")}, tmp_path / "pytorch_model.bin")
    assert set(read_state_dict(tmp_path)) == set(model.state_dict())
    assert not (tmp_path / "payload_ran").exists()


def test_truncated_and_oversized_safetensors(tmp_path):
    model = small_model()
    good = tmp_path / "good.safetensors"
    save_file(model.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: tensor '.*' ends at byte .* truncated"):
        load_weights(small_model(), tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match=r"cut\.safetensors: tensor '.*' ends at byte .* truncated"):
        vitkit.load(tmp_path / "cut.safetensors")  # vitkit eval / predict: named, not safetensors' own error
    (tmp_path / "huge.safetensors").write_bytes((8 * 1024**3).to_bytes(8, "little") + b'{"a": 1}')
    with pytest.raises(WeightsError, match=r"huge\.safetensors: the safetensors header claims 8,589,934,592 bytes"):
        read_checkpoint(tmp_path / "huge.safetensors")
    (tmp_path / "short.safetensors").write_bytes((100).to_bytes(8, "little") + b"{}")
    with pytest.raises(WeightsError, match=r"short\.safetensors.*truncated"):
        read_checkpoint(tmp_path / "short.safetensors")
    (tmp_path / "noise.pth").write_bytes(os.urandom(256))
    with pytest.raises(WeightsError, match=r"noise\.pth"):
        load_weights(small_model(), tmp_path / "noise.pth")
    with open(tmp_path / "one.npz", "wb") as handle:  # np.save's .npy format under an .npz name
        np.save(handle, np.zeros(3))
    with pytest.raises(WeightsError, match=r"one\.npz: holds a single array"):
        read_checkpoint(tmp_path / "one.npz")


def test_missing_unexpected_and_misshapen_keys_leave_model_untouched(tmp_path):
    sd = small_model().state_dict()
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}, r"Missing.*blocks\.1\.mlp\.fc2\.weight"),
        (sd | {"blocks.0.ls1.gamma": torch.ones(64)}, r"Not in the model: blocks\.0\.ls1\.gamma"),
        (sd | {"blocks.0.mlp.fc1.bias": torch.zeros(100)}, r"blocks\.0\.mlp\.fc1\.bias: checkpoint \(100,\)"),
        ({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, r"checkpoint has 1 blocks, the model 2"),
    ]
    for i, (bad, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(bad, path)
        with pytest.raises(WeightsError, match=rf"bad{i}\.safetensors.*{match}"):
            load_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(WeightsError, match=r"<state dict>.*blocks\.0\.ls1\.gamma.*different architecture"):
        config_from_weights(sd | {"blocks.0.ls1.gamma": torch.ones(64)})


def test_no_warnings_on_the_safe_path(tmp_path):
    model = small_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ok.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(small_model(), tmp_path / "ok.pt")
