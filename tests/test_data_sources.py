"""Image folders: layouts, the decoded-tensor cache, the holdout, streaming, bad files, inspection, real data."""

import json
import os
import warnings

import pytest
import torch

from data_images import (
    SHARED_CIFAR,
    empty_file,
    make_folder,
    noise,
    png_bomb,
    text_as_jpeg,
    truncated_jpeg,
    write_image,
)
from vitkit.data import (
    BadImagesError,
    format_inspection,
    holdout_split,
    inspect_folder,
    iter_batches,
    load_image,
    load_splits,
    resolve_data_root,
)
from vitkit.data import sources as sources_module


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_class_folder_layout(tmp_path, cache):
    root = make_folder(tmp_path / "data", {"b": 6, "a": 5, "c": 4}, size=8)
    write_image(root / "a" / "nested" / "deep.jpg", noise(8))  # found recursively
    (root / "a" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    write_image(root / "a" / "._0.png", noise(8))  # macOS resource fork names: hidden, ignored
    splits = load_splits(root, cache_dir=cache, val_fraction=0.2)
    assert splits.classes == ["a", "b", "c"]  # sorted by name
    assert splits.image_size == 8 and splits.test is None
    assert len(splits.train) + len(splits.val) == 16
    assert splits.val.counts() == [1, 1, 1]
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (3, 8, 8)
    assert all(os.path.isabs(p) for p in splits.train.paths)
    assert not set(splits.train.paths) & set(splits.val.paths)
    # each stored image is exactly what load_image gives for its file, with the right label
    for i in (0, len(splits.train) - 1):
        path = splits.train.paths[i]
        assert torch.equal(splits.train.images[i], load_image(path))
        assert splits.classes[int(splits.train.labels[i])] == os.path.basename(os.path.dirname(path))


def test_split_folder_layout(tmp_path, cache):
    root = tmp_path / "data"
    make_folder(root / "train", {"cat": 3, "dog": 3})
    make_folder(root / "val", {"cat": 1, "dog": 2})
    make_folder(root / "test", {"dog": 1})
    splits = load_splits(root, cache_dir=cache)
    assert splits.classes == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 1)  # val is the folder's own
    assert splits.test.labels.tolist() == [1]
    assert splits.val.counts() == [1, 2]


def test_sizes_native_resized_or_refused(tmp_path, cache):
    small = make_folder(tmp_path / "small", {"a": 2, "b": 2}, size=8)
    assert load_splits(small, cache_dir=cache, image_size=224).image_size == 8  # small squares stay native
    assert load_splits(small, cache_dir=cache, image_size=4).image_size == 4  # larger than asked: resized
    mixed = make_folder(tmp_path / "mixed", {"a": 2}, size=(12, 9))
    make_folder(mixed, {"b": 2}, size=8)
    with pytest.raises(ValueError, match="image_size") as info:
        load_splits(mixed, cache_dir=cache)
    assert "12x9" in str(info.value)
    splits = load_splits(mixed, cache_dir=cache, image_size=6, val_fraction=0)
    assert splits.image_size == 6 and splits.train.images.shape == (4, 3, 6, 6)
    assert len(splits.val) == 0


def test_folder_errors_name_the_path(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_splits(tmp_path / "nowhere", cache_dir=cache)
    root = make_folder(tmp_path / "data", {"a": 2})
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class") as info:
        load_splits(root, cache_dir=cache)
    assert "empty class folder" in str(info.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no class folders"):
        load_splits(bare, cache_dir=cache)
    only_val = tmp_path / "only_val"
    make_folder(only_val / "val", {"a": 1})
    make_folder(only_val / "test", {"a": 1})
    with pytest.raises(ValueError, match="no train/"):
        load_splits(only_val, cache_dir=cache)
    stray = tmp_path / "stray"
    make_folder(stray / "train", {"a": 1})
    make_folder(stray / "val", {"zebra": 1})
    with pytest.raises(ValueError, match="zebra"):
        load_splits(stray, cache_dir=cache)


def test_cache_is_reused_and_invalidated(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    first = load_splits(root, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".pt")  # no temporary files left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(sources_module, "decode_files", no_decoding)
    second = load_splits(root, cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images) and first.train.paths == second.train.paths
    monkeypatch.undo()

    changed = root / "a" / "001.png"
    write_image(changed, noise(8, seed=999))
    os.utime(changed, ns=(1, 1))  # a different modification time (and content): a new key
    third = load_splits(root, cache_dir=cache, val_fraction=0)
    index = third.train.paths.index(str(changed))
    assert torch.equal(third.train.images[index], load_image(changed))
    assert len(list(cache.iterdir())) == 2

    for path in cache.iterdir():  # a damaged cache file is decoded again, not trusted
        path.write_bytes(b"garbage")
    fourth = load_splits(root, cache_dir=cache, val_fraction=0)
    assert torch.equal(fourth.train.images, third.train.images)


def test_default_cache_under_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "root"))
    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    load_splits(root)
    assert len(list((tmp_path / "root" / "cache").glob("*.pt"))) == 1


def test_resolve_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("VITKIT_DATA")
    assert resolve_data_root() == resolve_data_root(None) == __import__("pathlib").Path.home() / ".cache" / "vitkit"


def _bad_folder(tmp_path):
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    bad = [
        truncated_jpeg(root / "a" / "truncated.jpg"),
        empty_file(root / "a" / "zero.jpg"),
        text_as_jpeg(root / "b" / "text.jpg"),
        png_bomb(root / "b" / "bomb.png"),
    ]
    return root, [str(p) for p in bad]


def test_bad_images_stop_the_run_with_every_path(tmp_path, cache):
    root, bad = _bad_folder(tmp_path)
    with pytest.raises(BadImagesError) as info:
        load_splits(root, cache_dir=cache)
    assert sorted(p for p, _ in info.value.bad) == sorted(bad)
    message = str(info.value)
    assert all(path in message for path in bad) and "--skip-bad-images" in message
    reasons = dict(info.value.bad)
    assert "truncated" in reasons[bad[0]] and "empty" in reasons[bad[1]] and "bomb" in reasons[bad[3]]
    # the bad list is cached with the pixels: the next run refuses just the same, without decoding
    with pytest.raises(BadImagesError):
        load_splits(root, cache_dir=cache)


def test_skip_bad_images_reports_the_count(tmp_path, cache):
    root, bad = _bad_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 4 unreadable"):
        splits = load_splits(root, cache_dir=cache, skip_bad_images=True, val_fraction=0)
    assert len(splits.train) == 6 and sorted(p for p, _ in splits.skipped) == sorted(bad)
    assert "skipped 4" in splits.summary()
    assert not set(bad) & set(splits.train.paths)


def test_holdout_is_deterministic_per_class_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 3 + [3])
    train, val = holdout_split(labels, 0.1, seed=0)
    train2, val2 = holdout_split(labels, 0.1, seed=0)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 2, 1, 0]  # the single image stays in train
    assert not torch.equal(val, holdout_split(labels, 0.1, seed=1)[1])
    assert len(holdout_split(labels, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_split(labels, 1.0)


def test_streamed_set_matches_in_memory(tmp_path, cache):
    root = make_folder(tmp_path / "data", {"a": 4, "b": 4}, size=8)
    held = load_splits(root, cache_dir=cache, val_fraction=0.25)
    streamed = load_splits(root, cache_dir=cache, val_fraction=0.25, in_memory=False)
    assert streamed.train.images is None and streamed.train.paths == held.train.paths
    index = torch.tensor([3, 0, 5])
    assert torch.equal(streamed.train.batch(index), held.train.batch(index))
    batches = [torch.tensor([0, 1, 2]), torch.tensor([5, 4]), torch.tensor([3])]
    for workers in (0, 2):
        got = list(iter_batches(streamed.train, batches, num_workers=workers))
        want = list(iter_batches(held.train, batches))
        assert len(got) == len(want) == 3
        for (gi, gl), (wi, wl) in zip(got, want, strict=True):
            assert torch.equal(gi, wi) and torch.equal(gl, wl)


def test_streamed_bad_file(tmp_path, cache):
    root = make_folder(tmp_path / "data", {"a": 3})
    bad = str(empty_file(root / "a" / "zz_bad.png"))
    streamed = load_splits(root, cache_dir=cache, in_memory=False, val_fraction=0)
    assert streamed.train.paths[-1] == bad
    everything = [torch.arange(4)]
    with pytest.raises(BadImagesError, match="zz_bad"):
        list(iter_batches(streamed.train, everything))
    with pytest.raises(BadImagesError, match="zz_bad"):
        streamed.train.batch(torch.tensor([3]))
    skipping = load_splits(root, cache_dir=cache, in_memory=False, val_fraction=0, skip_bad_images=True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        [(images, labels)] = list(iter_batches(skipping.train, everything))
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 0]
    assert skipping.train.skipped == [(bad, "empty file (0 bytes)")]


def test_inspect_reports_everything(tmp_path):
    root, bad = _bad_folder(tmp_path)
    write_image(root / "b" / "gray.png", noise(8).convert("L"))
    write_image(root / "b" / "wide.png", noise((10, 6)))
    (root / "empty").mkdir()
    (root / "a" / "notes.txt").write_text("x")
    report = inspect_folder(root)
    json.dumps(report)  # --json
    assert report["classes"] == ["a", "b", "empty"]
    assert report["splits"]["train"]["per_class"] == {"a": 5, "b": 7, "empty": 0}
    assert report["total"] == 12 and report["readable"] == 8
    assert report["sizes"] == {"8x8": 7, "10x6": 1} and report["modes"] == {"RGB": 7, "L": 1}
    assert sorted(item["path"] for item in report["unreadable"]) == sorted(bad)
    assert any("empty class folder" in p for p in report["problems"])
    assert report["ignored_files"] == [str(root / "a" / "notes.txt")]
    text = format_inspection(report)
    assert all(path in text for path in bad) and "empty class folder" in text and "8x8 (7)" in text


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 JPEG folder not present")
def test_real_cifar_slice(tmp_path, cache):
    root = tmp_path / "slice"
    classes = sorted(p.name for p in SHARED_CIFAR.iterdir() if p.is_dir())
    assert len(classes) == 10
    for name in classes:
        (root / name).mkdir(parents=True)
        for file in sorted((SHARED_CIFAR / name).iterdir())[:20]:
            (root / name / file.name).symlink_to(file)  # a slice by reference, nothing copied
    splits = load_splits(root, cache_dir=cache, image_size=224)
    assert splits.classes == classes and splits.image_size == 32  # 32x32 stays native for a 224 model
    assert (len(splits.train), len(splits.val)) == (180, 20) and splits.val.counts() == [2] * 10
    first = sorted((SHARED_CIFAR / classes[0]).iterdir())[0]
    assert torch.equal(splits.train.images[0], load_image(first))
    assert 40 < splits.train.images.float().mean() < 200  # real photos, not a gray fill


def test_relative_source_gives_absolute_paths(tmp_path, cache, monkeypatch):
    bad = _bad_folder(tmp_path)[1]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadImagesError) as info:
        load_splits("data", cache_dir=cache)
    assert sorted(p for p, _ in info.value.bad) == sorted(bad)


def test_interpolation_reaches_every_resize_and_the_cache_key(tmp_path, cache):
    """load_splits(interpolation=...) (what `vitkit eval` passes from the checkpoint): held, cached and
    streamed sets all resize with it, and a cached decode with another filter is not reused."""
    from vitkit.data import resize_center_crop

    root = make_folder(tmp_path / "data", {"a": 2, "b": 2}, size=(20, 13))
    bicubic = load_splits(root, cache_dir=cache, image_size=8, val_fraction=0).train
    bilinear = load_splits(root, cache_dir=cache, image_size=8, val_fraction=0, interpolation="bilinear").train
    streamed = load_splits(root, cache_dir=cache, image_size=8, val_fraction=0, interpolation="bilinear",
                           in_memory=False).train
    assert not torch.equal(bicubic.images, bilinear.images)
    assert torch.equal(streamed.batch(torch.arange(4)), bilinear.images)
    for image, path in zip(bilinear.images, bilinear.paths, strict=True):
        native = load_image(path).permute(1, 2, 0).numpy()
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(resize_center_crop(native, 8, "bilinear")))
    assert len(list(cache.glob("*.pt"))) == 2
    with pytest.raises(ValueError, match="'cubic' is not a Pillow filter"):
        load_splits(root, cache_dir=cache, image_size=8, interpolation="cubic")
