"""Pretrained weights by name (vitkit.weights.hub) against a local stand-in for the Hugging Face Hub.

The server answers the two requests huggingface_hub's hf_hub_download makes: HEAD and GET of
/{repo}/resolve/{revision}/{filename}, with the commit, ETag (a large file's sha256) and size headers
the hub sends. No network is used; the Hugging Face cache is a temporary folder.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
from pathlib import Path

import pytest
import torch

import vitkit
from vitkit.cli.main import main
from vitkit.weights import WeightsError, export, read_state_dict
from vitkit.weights.hub import download, list_pretrained, parse_name

pytestmark = pytest.mark.xdist_group("hub")

NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
REPO = f"timm/{NAME}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def timm_config(architecture: str, num_classes: int = 5, **model_args) -> bytes:
    """config.json as timm's push_to_hub writes it."""
    return json.dumps({
        "architecture": architecture, "num_classes": num_classes, "num_features": 192,
        "global_pool": "token", "model_args": model_args,
        "pretrained_cfg": {"tag": "augreg_in21k_ft_in1k", "input_size": [3, 32, 32], "interpolation": "bicubic",
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": num_classes},
    }).encode()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, bytes]:
    """A Ti/16 of 2 blocks at 32 px with a 5-class head, as timm safetensors, and a pickle of the same."""
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5)
    folder = tmp_path_factory.mktemp("export")
    safetensors = export(model, folder / "model.safetensors", "timm", timm_name="vit_tiny_patch16_224")
    buffer = io.BytesIO()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, buffer)
    return {"safetensors": safetensors.read_bytes(), "pickle": buffer.getvalue()}


class Hub:
    """repo -> {filename: bytes}; ``corrupt`` (repo, filename) pairs are served as other bytes of the same size,
    ``truncated`` ones without their last bytes."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.corrupt: set[tuple[str, str]] = set()
        self.truncated: set[tuple[str, str]] = set()
        self.requests: list[str] = []


def _handler(hub: Hub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _answer(self, body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            parts = self.path.split("?")[0].lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                self.send_response(404)
                self.end_headers()
                return
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in hub.repos:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                return
            data = hub.repos[repo].get(filename)
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                return
            large = not filename.endswith(".json")  # LFS: the ETag is the content's sha256
            etag = hashlib.sha256(data).hexdigest() if large else hashlib.sha1(data).hexdigest()
            size = len(data)
            if (repo, filename) in hub.corrupt:
                data = bytes(b ^ 0xFF for b in data)
            if (repo, filename) in hub.truncated:
                data = data[: size // 2]
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            if large:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path, weights):
    """A running stand-in hub with the timm repo, and huggingface_hub pointed at it and at an empty cache."""
    from huggingface_hub import constants

    state = Hub()
    state.repos[REPO] = {"config.json": timm_config("vit_tiny_patch16_224", img_size=32, depth=2),
                         "model.safetensors": weights["safetensors"]}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # read once, at import, into huggingface_hub.constants
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    state.cache = cache
    state.stop = lambda: (server.shutdown(), server.server_close())
    yield state
    if thread.is_alive():
        state.stop()


def test_names_resolve_to_repos():
    assert parse_name(NAME).repo_id == REPO
    assert parse_name(f"timm/{NAME}@v1").revision == "v1"
    assert parse_name("hf-hub:google/vit-base-patch16-224").repo_id == "google/vit-base-patch16-224"
    assert parse_name("vit_base_patch16_224").repo_id == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert parse_name("weights.safetensors") is None and parse_name("S/16") is None


def test_download_caches_then_loads_with_the_hub_gone(hub, weights):
    folder = download(NAME)
    assert (folder / "model.safetensors").read_bytes() == weights["safetensors"]
    assert str(folder).startswith(str(hub.cache))
    expected = read_state_dict(folder)
    classifier = vitkit.load(NAME)
    assert classifier.config.depth == 2 and classifier.config.img_size == 32 and classifier.config.num_classes == 5
    hub.stop()
    again = read_state_dict(NAME)  # the hub is unreachable: the cache answers
    assert all(torch.equal(again[k], v) for k, v in expected.items())
    model = vitkit.create_model(f"timm/{NAME}", pretrained=True, num_classes=3, img_size=48)
    assert model.training and model.config.num_classes == 3 and model.config.img_size == 48
    assert torch.equal(model.blocks[1].mlp.fc2.weight, expected["blocks.1.mlp.fc2.weight"])


def test_offline_with_an_empty_cache_names_the_repo_and_the_fix(hub, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["info", NAME]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert REPO in err and f"vitkit download {NAME}" in err and "HF_HUB_OFFLINE" in err
    assert hub.requests == []


def test_cli_download_then_offline_load(hub, monkeypatch, capsys):
    from huggingface_hub import constants

    assert main(["download", NAME]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert main(["info", NAME, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["depth"] == 2
    assert hub.requests == []


def test_corrupt_download_is_refused_and_not_cached(hub, weights):
    hub.corrupt.add((REPO, "model.safetensors"))
    with pytest.raises(WeightsError, match="corrupt"):
        download(NAME)
    blobs = hub.cache / f"models--timm--{NAME}" / "blobs"
    assert hashlib.sha256(weights["safetensors"]).hexdigest() not in {p.name for p in blobs.iterdir()}
    assert not (hub.cache / f"models--timm--{NAME}" / "snapshots" / COMMIT / "model.safetensors").exists()
    hub.corrupt.clear()
    assert (download(NAME) / "model.safetensors").read_bytes() == weights["safetensors"]


def test_truncated_download_is_refused_and_not_cached(hub, weights):
    hub.truncated.add((REPO, "model.safetensors"))  # fewer bytes than X-Linked-Size says
    with pytest.raises(WeightsError, match="cut short"):
        download(NAME)
    assert not list((hub.cache / f"models--timm--{NAME}" / "snapshots").rglob("model.safetensors"))
    hub.truncated.clear()
    assert (download(NAME) / "model.safetensors").read_bytes() == weights["safetensors"]


def test_pickle_only_repo_needs_trust(hub, weights, recwarn):
    hub.repos["timm/pickled"] = {"config.json": timm_config("vit_tiny_patch16_224", img_size=32, depth=2),
                                 "pytorch_model.bin": weights["pickle"]}
    with pytest.raises(WeightsError, match=r"pickle.*trust-checkpoint"):
        download("timm/pickled")
    assert not any(r.endswith("pytorch_model.bin") for r in hub.requests if r.startswith("GET"))
    folder = download("timm/pickled", trust_checkpoint=True)
    assert (folder / "pytorch_model.bin").is_file()


def test_hugging_face_repo_by_id(hub, tmp_path):
    torch.manual_seed(1)
    model = vitkit.create_model("Ti/16", depth=2, img_size=32, num_classes=2)
    folder = export(model, tmp_path / "hf", "hf", classes=["cat", "dog"], mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2])
    hub.repos["someone/vit-tiny-pets"] = {p.name: p.read_bytes() for p in folder.iterdir()}
    classifier = vitkit.load("hf-hub:someone/vit-tiny-pets")
    assert classifier.classes == ["cat", "dog"] and classifier.mean == pytest.approx((0.4, 0.4, 0.4))
    assert torch.equal(classifier.model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_not_a_vit_is_refused_before_the_weights(hub, capsys):
    hub.repos["timm/convnext_tiny.in12k"] = {"config.json": timm_config("convnext_tiny"),
                                             "model.safetensors": b"x" * 100}
    assert main(["download", "timm/convnext_tiny.in12k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "convnext_tiny" in err
    assert not any("model.safetensors" in r for r in hub.requests)


def test_unknown_name_lists_close_matches(capsys):
    assert main(["info", "vit_tiny_patch16_244"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vit_tiny_patch16_224.augreg_in21k" in err
    model = vitkit.create_model("Ti/16", depth=2)
    with pytest.raises(WeightsError, match="did you mean vit_tiny_patch16_224"):
        vitkit.load_weights(model, "vit_tiny_patch16_244")
    with pytest.raises(WeightsError, match="no such file"):  # a missing file stays a missing file
        vitkit.load_weights(model, "vit_tiny_patch16_224.safetensors")


def test_models_pretrained_lists_matching_names(capsys):
    assert main(["models", "--pretrained", "vit_tiny*"]) == 0
    out = capsys.readouterr().out
    assert NAME in out and "vit_small" not in out
    assert {row["name"] for row in list_pretrained("vit_tiny*")} == {
        n for n in vitkit.weights.hub.PRETRAINED if n.startswith("vit_tiny")}


@pytest.mark.parametrize("model_flags", [["--model", "vit_tiny_patch16_224", "--depth", "2"], []],
                         ids=["named model", "the weights' own model"])
def test_train_init_by_name_copies_the_blocks_and_replaces_the_head(hub, color_folder, tmp_path, monkeypatch,
                                                                     model_flags):
    """`vitkit train --init NAME`: with --model the named variant, without it the weights' own architecture."""
    import vitkit.train.run as run

    pretrained = read_state_dict(download(NAME))
    loaded = {}
    original = run.load_weights

    def recording(model, source, **kwargs):
        report = original(model, source, **kwargs)
        loaded.update({k: v.clone() for k, v in model.state_dict().items()})
        loaded["report"] = report
        return report

    monkeypatch.setattr(run, "load_weights", recording)
    out = tmp_path / "run"
    assert main(["train", "--init", f"timm/{NAME}", "--data", str(color_folder), *model_flags,
                 "--img-size", "48", "--max-steps", "3", "--batch-size", "8",
                 "--val-fraction", "0.25", "--out", str(out)]) == 0
    assert torch.equal(loaded["blocks.1.attn.qkv.weight"], pretrained["blocks.1.attn.qkv.weight"])
    assert loaded["pos_embed"].shape[1] == 1 + 3 * 3  # 48 px, patch 16: resampled from 2x2
    assert loaded["head.weight"].shape[0] == 3
    assert "head.weight" in loaded["report"]["initialized"]
    assert (out / "model.safetensors").is_file() or any(out.rglob("*.safetensors"))


def test_the_dinov2_recipe_fine_tunes_weights_fetched_by_name(hub, color_folder, tmp_path, monkeypatch):
    """`vitkit train --recipe finetune-dinov2-s14`: the recipe's --init name is fetched from the hub, the model
    is DINOv2's own (layer scale, patch 14; no --model), its blocks are copied exactly, its position grid is
    resampled to the training size and a new head is trained (DINOv2 ships none)."""
    import vitkit.train.run as run

    torch.manual_seed(0)
    name = "vit_small_patch14_dinov2.lvd142m"
    source = vitkit.create_model("vit_small_patch14_dinov2", depth=2, img_size=42)  # a 3 x 3 grid, no head
    with torch.no_grad():
        for block in source.blocks:
            block.ls1.gamma.normal_()  # not DINOv2's 1e-5 start: a copy must carry these values over
    folder = tmp_path / "export"
    folder.mkdir()
    exported = export(source, folder / "model.safetensors", "timm", timm_name="vit_small_patch14_dinov2")
    hub.repos[f"timm/{name}"] = {"config.json": timm_config("vit_small_patch14_dinov2", num_classes=0,
                                                            img_size=42, depth=2),
                                 "model.safetensors": exported.read_bytes()}
    loaded = {}
    original = run.load_weights

    def recording(model, weights, **kwargs):
        report = original(model, weights, **kwargs)
        loaded.update(model=model.config, state={k: v.clone() for k, v in model.state_dict().items()}, report=report)
        return report

    monkeypatch.setattr(run, "load_weights", recording)
    out = tmp_path / "run"
    assert main(["train", "--recipe", "finetune-dinov2-s14", "--data", str(color_folder), "--img-size", "28",
                 "--max-steps", "2", "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25",
                 "--out", str(out), "--no-progress"]) == 0
    config, state = loaded["model"], loaded["state"]
    assert (config.patch_size, config.depth, config.init_values, config.num_classes) == (14, 2, 1e-5, 3)
    assert torch.equal(state["blocks.1.ls1.gamma"], source.blocks[1].ls1.gamma)
    assert torch.equal(state["blocks.0.attn.qkv.weight"], source.blocks[0].attn.qkv.weight)
    assert state["pos_embed"].shape[1] == 1 + 2 * 2  # resampled from 3 x 3
    assert "head.weight" in loaded["report"]["initialized"]
    assert vitkit.load(out).config.init_values == 1e-5
