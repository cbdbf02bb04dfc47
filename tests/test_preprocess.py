"""One preprocessing for every path: `vitkit eval`'s data, `vitkit predict`, the Python API and the
Hugging Face export see the same pixels, resized with the interpolation the checkpoint records."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
import vitkit.inference
from vitkit.cli.main import main
from vitkit.data import (
    DEFAULT_INTERPOLATION,
    Preprocessing,
    decode_image,
    load_splits,
    resize_center_crop,
)
from vitkit.model import create_model
from vitkit.weights import export, load_vitkit, read_training_checkpoint, save_vitkit

SIZE = 32  # the model's input side; the JPEG's shorter side (300) is above 2 x SIZE, so libjpeg scales it
CLASSES = ["a", "b"]
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)


def _noise(height: int, width: int, channels: int = 3, seed: int = 0, high: int = 256, dtype=np.uint8) -> np.ndarray:
    """Smooth noise: detail at every scale, so that resizing differently shows in the pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, high, (height // 10 + 2, width // 10 + 2, channels)).astype(np.float64)
    ys, xs = np.linspace(0, coarse.shape[0] - 1.001, height), np.linspace(0, coarse.shape[1] - 1.001, width)
    smooth = coarse[ys.astype(int)][:, xs.astype(int)]
    fine = rng.integers(0, high // 4, (height, width, channels))
    return np.clip(smooth * 0.75 + fine, 0, high - 1).astype(dtype)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of a 500x300 JPEG, an RGBA PNG and a 16-bit grayscale PNG, none of them square."""
    root = tmp_path_factory.mktemp("preprocess") / "folder"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    jpeg = root / "a" / "photo.jpg"
    Image.fromarray(_noise(300, 500)).save(jpeg, quality=90)
    deep = root / "b" / "deep.png"
    Image.fromarray(_noise(70, 45, 1, seed=1, high=65536, dtype=np.uint16)[..., 0]).save(deep)
    rgba = root / "b" / "rgba.png"
    Image.fromarray(_noise(60, 90, 4, seed=2)).save(rgba)
    assert Image.open(deep).mode.startswith("I;16") and Image.open(rgba).mode == "RGBA"
    return root, [jpeg, deep, rgba]


def _checkpoint(path, interpolation=None):
    """A training checkpoint as `vitkit train` writes it (random weights); without interpolation as
    checkpoints were written before it was recorded."""
    torch.manual_seed(0)
    model = create_model("cifar-mini", img_size=SIZE, depth=1, num_classes=len(CLASSES))
    torch.nn.init.normal_(model.head.weight)  # the head starts at zero: every image would score the same
    meta = {"config": model.config.to_dict(), "classes": CLASSES, "mean": list(MEAN), "std": list(STD),
            "train": {"val_fraction": 0.0, "split_seed": 0}, "weights": "model."}
    if interpolation is not None:
        meta["interpolation"] = interpolation
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "vitkit": meta}, path)
    return path


@pytest.fixture
def recorded(monkeypatch):
    """Every (model input, logits) that reaches the model through Classifier's logits or predict."""
    calls = []
    original = vitkit.inference.view_averaged_logits

    def record(model, x, **views):
        out = original(model, x, **views)
        calls.append((x.clone(), out.clone()))
        return out

    monkeypatch.setattr(vitkit.inference, "view_averaged_logits", record)
    return calls


def test_eval_predict_and_api_give_identical_model_inputs(tmp_path, images, recorded, capsys):
    root, paths = images
    checkpoint = _checkpoint(tmp_path / "model.ckpt")
    stored = load_splits(root, image_size=SIZE, val_fraction=0.0, cache_dir=tmp_path / "cache").train
    listed = [Path(p).resolve() for p in stored.paths]
    paths = sorted(paths, key=lambda p: listed.index(p.resolve()))  # the folder's order, as `vitkit eval` sees it

    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 3
    assert main(["predict", "--checkpoint", str(checkpoint), "--json", *map(str, paths)]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (eval_inputs, eval_logits), (predict_inputs, predict_logits) = recorded
    assert eval_inputs.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(eval_inputs, predict_inputs)
    assert torch.equal(eval_logits, predict_logits) and eval_logits.std(0).min() > 0  # the images score differently
    assert [r["probability"] for r in reported] == eval_logits.softmax(-1).max(-1).values.tolist()

    classifier = vitkit.load(checkpoint)
    assert torch.equal(classifier.inputs([str(p) for p in paths]), eval_inputs)
    assert torch.equal(torch.stack([classifier.to_tensor(p) for p in paths]), stored.images)
    predictions = classifier.predict([str(p) for p in paths])
    assert [p.probability for p in predictions] == eval_logits.softmax(-1).max(-1).values.tolist()

    # The JPEG is decoded with DCT scaling, as the loader does: a full decode, then resized, differs.
    full = resize_center_crop(decode_image(paths[0]), SIZE)
    assert not np.array_equal(full, classifier.preprocessing.to_array(paths[0]))


def test_pil_images_arrays_and_tensors_take_the_same_decode_and_resize(images):
    _, (jpeg, deep, rgba) = images
    preprocessing = Preprocessing(SIZE, MEAN, STD)
    for path in (deep, rgba):  # 16-bit rescaled, alpha composited: as the file
        with Image.open(path) as image:
            assert np.array_equal(preprocessing.to_array(image), preprocessing.to_array(path)), path.name
    native = decode_image(jpeg)  # (300, 500, 3): an array or a tensor is resized as the loader resizes
    expected = resize_center_crop(native, SIZE)
    assert np.array_equal(preprocessing.to_array(native), expected)
    assert torch.equal(preprocessing.to_tensor(torch.from_numpy(native).permute(2, 0, 1)),
                       torch.from_numpy(expected).permute(2, 0, 1))
    with Image.open(deep) as image:  # Pillow's own RGB conversion would clip 16-bit data to white
        assert not np.array_equal(preprocessing.to_array(image), resize_center_crop(np.asarray(image.convert("RGB")),
                                                                                    SIZE))


def test_small_squares_stay_native_in_eval_and_predict(tmp_path, recorded, capsys):
    root = tmp_path / "small"
    for name, seed in (("a", 3), ("b", 4)):
        (root / name).mkdir(parents=True)
        Image.fromarray(_noise(16, 16, seed=seed)).save(root / name / "x.png")
    paths = [root / "a" / "x.png", root / "b" / "x.png"]
    checkpoint = _checkpoint(tmp_path / "model.ckpt")
    assert load_splits(root, image_size=SIZE, val_fraction=0.0, cache_dir=tmp_path / "cache").image_size == 16
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "all", "--json"]) == 0
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, paths)]) == 0
    capsys.readouterr()
    (eval_inputs, _), (predict_inputs, _) = recorded
    assert eval_inputs.shape == (2, 3, SIZE, SIZE) and torch.equal(eval_inputs, predict_inputs)
    classifier = vitkit.load(checkpoint)
    assert classifier.to_tensor(paths[0]).shape == (3, 16, 16)
    # a batch of mixed stored sizes: each image as it would be alone
    mixed = classifier.inputs([paths[0], _noise(20, 30, seed=6)])
    assert torch.equal(mixed[:1], classifier.inputs([paths[0]]))


def test_checkpoint_interpolation_is_used_by_eval_and_predict(tmp_path, images, recorded, capsys):
    root, _ = images
    old = vitkit.load(_checkpoint(tmp_path / "old.ckpt"))
    assert old.preprocessing.interpolation == DEFAULT_INTERPOLATION == "bicubic"
    bilinear = _checkpoint(tmp_path / "bilinear.ckpt", "bilinear")
    assert read_training_checkpoint(bilinear).interpolation == "bilinear"
    classifier = vitkit.load(bilinear)
    assert classifier.preprocessing == Preprocessing(SIZE, MEAN, STD, "bilinear")
    assert main(["eval", "--checkpoint", str(bilinear), "--data", str(root), "--split", "all", "--json"]) == 0
    capsys.readouterr()
    stored = load_splits(root, image_size=SIZE, val_fraction=0.0, cache_dir=tmp_path / "cache").train
    ordered = list(stored.paths)
    (eval_inputs, _), = recorded
    assert torch.equal(eval_inputs, classifier.inputs(ordered))
    assert not torch.equal(eval_inputs, old.inputs(ordered))  # bicubic gives other pixels

    out = tmp_path / "model.safetensors"
    save_vitkit(out, classifier.model, classes=CLASSES, mean=MEAN, std=STD, interpolation="bilinear")
    assert load_vitkit(out)[1]["interpolation"] == "bilinear"
    assert vitkit.load(out).preprocessing == classifier.preprocessing
    converted = tmp_path / "converted.safetensors"  # `vitkit convert` carries the checkpoint's filter on
    assert main(["convert", str(bilinear), str(converted), "--to", "vitkit"]) == 0
    assert load_vitkit(converted)[1]["interpolation"] == "bilinear"


def test_training_records_the_interpolation_through_to_the_exports(trained_run, tmp_path):
    best = read_training_checkpoint(trained_run.run_dir / "best.ckpt")
    assert best.interpolation == DEFAULT_INTERPOLATION
    _, meta = load_vitkit(trained_run.run_dir / "model.safetensors")
    assert meta["interpolation"] == DEFAULT_INTERPOLATION
    classifier = vitkit.load(trained_run.run_dir)
    out = export(classifier.model, tmp_path / "hf", "hf", classes=classifier.classes, mean=classifier.mean,
                 std=classifier.std, interpolation=classifier.preprocessing.interpolation)
    config = json.loads((out / "preprocessor_config.json").read_text())
    size = classifier.config.img_size
    assert config["resample"] == 3  # Pillow's BICUBIC
    assert config["size"] == {"shortest_edge": size} and config["crop_size"] == {"height": size, "width": size}
    assert (config["image_mean"], config["image_std"]) == (list(classifier.mean), list(classifier.std))
    assert vitkit.load(out).preprocessing == classifier.preprocessing  # read back from the export


def test_hf_image_processor_computes_the_same_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = create_model("cifar-mini", img_size=SIZE, depth=1, num_classes=2)
    out = export(model, tmp_path / "hf", "hf", classes=CLASSES, mean=MEAN, std=STD)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    except TypeError:  # transformers before 5 names Pillow's backend "slow"
        processor = transformers.AutoImageProcessor.from_pretrained(out, use_fast=False)
    image = Image.fromarray(_noise(60, 90, seed=5))
    theirs = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"]))
    ours = Preprocessing(SIZE, MEAN, STD).inputs([image])
    assert theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5)
