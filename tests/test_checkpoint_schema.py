"""The "vitkit" section of a training checkpoint: one reader (vitkit.weights.checkpoint) for loading,
`vitkit.load`, resuming and finishing a run; its errors name the file and what to do."""

import json

import pytest
import torch

import vitkit
from vitkit.model import create_model
from vitkit.train import saved_train_config
from vitkit.weights import (
    WeightsError,
    load_model,
    read_state_dict,
    read_training_checkpoint,
    save_vitkit,
    training_checkpoint,
)

CLASSES = ["blue", "green", "red"]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("cifar-mini", img_size=16, depth=1, num_classes=3)
    torch.nn.init.normal_(model.head.weight)  # not the zeros it starts from, so that models differ there too
    return model


def _state(model, ema=None, **changes):
    """A checkpoint as ViTClassifier.on_save_checkpoint and Lightning write it."""
    state_dict = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        state_dict |= {f"ema.module.{k}": v for k, v in ema.state_dict().items()}
    meta = {"config": model.config.to_dict(), "classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3,
            "train": {"val_fraction": 0.2, "split_seed": 3}, "weights": "ema.module." if ema is not None else "model.",
            "interpolation": "bicubic"}
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return {"state_dict": state_dict, "global_step": 1, "vitkit": meta}


def test_reads_every_field_and_the_evaluated_weights(tmp_path):
    model, ema = _model(0), _model(1)
    path = tmp_path / "best.ckpt"
    torch.save(_state(model, ema), path)
    checkpoint = read_training_checkpoint(path)
    assert checkpoint.config == model.config and checkpoint.classes == CLASSES
    assert checkpoint.mean == (0.5, 0.5, 0.5) and checkpoint.std == (0.25, 0.25, 0.25)
    assert checkpoint.train == {"val_fraction": 0.2, "split_seed": 3} and checkpoint.interpolation == "bicubic"
    weights = checkpoint.weights()
    assert weights.keys() == ema.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in ema.state_dict().items())  # the EMA's, not the model's
    assert not torch.equal(weights["head.weight"], model.state_dict()["head.weight"])
    # every reader takes the same weights and settings from it
    assert all(torch.equal(read_state_dict(path)[k], v) for k, v in ema.state_dict().items())
    loaded, meta = load_model(path)
    assert torch.equal(loaded.pos_embed, ema.pos_embed)
    assert meta == {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    classifier = vitkit.load(path)
    assert torch.equal(classifier.model.head.weight, ema.head.weight) and classifier.classes == CLASSES
    assert classifier.train_config == checkpoint.train == saved_train_config(path)


def test_checkpoints_before_the_interpolation_was_recorded(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save(_state(_model(), interpolation=None), path)
    assert read_training_checkpoint(path).interpolation is None  # not recorded
    assert load_model(path)[1]["interpolation"] is None
    assert vitkit.load(path).preprocessing.interpolation == "bicubic"  # what the data loader used


@pytest.mark.parametrize(("changes", "message"), [
    ({"weights": None, "config": None}, "lacks config, weights"),
    ({"classes": ["a", "b"]}, "2 class names for a 3-class head"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 numbers"),
    ({"std": [0.5, 0.0, 0.5]}, "std .* must be positive"),
    ({"weights": "teacher."}, "names the weights 'teacher.'"),
    ({"interpolation": 3}, "interpolation must be a Pillow filter name"),
    ({"config": {"embed_dim": 64, "colour": "red"}}, "does not build a ViT"),
    ({"train": ["x"]}, "train settings are a list"),
])
def test_a_malformed_section_is_refused_naming_the_file(tmp_path, changes, message):
    path = tmp_path / "broken.ckpt"
    torch.save(_state(_model(), **changes), path)
    for read in (read_training_checkpoint, read_state_dict, vitkit.load, saved_train_config):
        with pytest.raises(WeightsError, match=message) as info:
            read(path)
        assert str(path) in str(info.value), read


def test_each_reader_requires_what_it_uses(tmp_path):
    """The weights need the config and the prefix only (a section without the rest loads as weights);
    a classifier needs the normalisation, resuming needs the training settings."""
    no_mean = tmp_path / "no_mean.ckpt"
    torch.save(_state(_model(), mean=None), no_mean)
    assert read_training_checkpoint(no_mean).mean is None
    assert read_state_dict(no_mean).keys() == _model().state_dict().keys()
    assert saved_train_config(no_mean) == {"val_fraction": 0.2, "split_seed": 3}
    with pytest.raises(WeightsError, match="lacks mean") as info:
        vitkit.load(no_mean)
    assert str(no_mean) in str(info.value)
    no_train = tmp_path / "no_train.ckpt"
    torch.save(_state(_model(), train=None, classes=None), no_train)
    assert vitkit.load(no_train).classes == ["class_0", "class_1", "class_2"]
    with pytest.raises(WeightsError, match="lacks train") as info:
        saved_train_config(no_train)
    assert str(no_train) in str(info.value)


def test_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(_model().state_dict(), path)
    assert training_checkpoint(torch.load(path), path) is None  # other checkpoints load as plain weights
    assert read_state_dict(path).keys() == _model().state_dict().keys()
    for read in (read_training_checkpoint, saved_train_config):
        with pytest.raises(WeightsError, match="not a vitkit training checkpoint") as info:
            read(path)
        assert str(path) in str(info.value) and "--init" in str(info.value)
    with pytest.raises(WeightsError, match="is a list, not a mapping"):
        training_checkpoint({"vitkit": [1], "state_dict": {}}, "x.ckpt")


def test_interpolation_travels_in_vitkit_files_and_model_folders(tmp_path):
    model = _model()
    path = tmp_path / "model.safetensors"
    save_vitkit(path, model, classes=CLASSES, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bilinear")
    assert load_model(path)[1]["interpolation"] == "bilinear"
    assert vitkit.load(path).preprocessing.interpolation == "bilinear"
    with pytest.raises(WeightsError, match="'cubic' is not a Pillow filter"):
        save_vitkit(path, model, interpolation="cubic")
    # timm's hub config and a Hugging Face preprocessor config say which filter their models expect
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    save_vitkit(timm_dir / "model.safetensors", model)
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "my_vit.trained",
                                                      "pretrained_cfg": {"interpolation": "bilinear"}}))
    assert load_model(timm_dir)[1]["interpolation"] == "bilinear"
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "my_vit.trained"}))
    (timm_dir / "preprocessor_config.json").write_text(json.dumps({"resample": 1}))
    assert load_model(timm_dir)[1]["interpolation"] == "lanczos"


def test_the_weights_layer_names_the_filters_as_the_data_layer():
    """weights/ does not import data/: its copy of the loader's filter and of Pillow's names must agree."""
    from vitkit.data import DEFAULT_INTERPOLATION, INTERPOLATIONS
    from vitkit.weights.export import hf_preprocessor_config
    from vitkit.weights.load import LOADER_INTERPOLATION, PIL_FILTERS

    assert LOADER_INTERPOLATION == DEFAULT_INTERPOLATION
    assert sorted(PIL_FILTERS.values()) == sorted(INTERPOLATIONS)
    assert hf_preprocessor_config(224, [0.5] * 3, [0.5] * 3, "bilinear")["resample"] == 2
    with pytest.raises(WeightsError, match="'cubic' is not a Pillow filter"):
        hf_preprocessor_config(224, [0.5] * 3, [0.5] * 3, "cubic")
