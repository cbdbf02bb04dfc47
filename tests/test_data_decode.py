"""Decoding: every image mode to RGB, EXIF orientation, every extension, and broken files with reasons."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from data_images import empty_file, noise, png_bomb, text_as_jpeg, truncated_jpeg, write_image
from vitkit.data import BadImagesError, decode_image, load_image
from vitkit.data import decode as decode_module


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor -> (H, W, 3) array, to compare with what was drawn."""
    return tensor.permute(1, 2, 0).numpy()


def blend(value: int, alpha: int, background: int = 255) -> int:
    return (value * alpha + background * (255 - alpha) + 127) // 255


def test_gray_and_bilevel(tmp_path):
    gray = write_image(tmp_path / "l.png", Image.fromarray(np.array([[0, 100, 255]], np.uint8)))
    out = load_image(gray)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 3)
    assert out[:, 0, 1].tolist() == [100, 100, 100]
    bilevel = Image.fromarray(np.array([[False, True]])).convert("1")
    assert bilevel.mode == "1"
    for ext in ("png", "bmp", "tif"):
        path = write_image(tmp_path / f"one.{ext}", bilevel)
        assert pixels(load_image(path))[0].tolist() == [[0, 0, 0], [255, 255, 255]], ext


def test_alpha_is_composited_on_white(tmp_path):
    background = decode_module.ALPHA_BACKGROUND
    assert background == (255, 255, 255)
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], np.uint8)
    out = pixels(load_image(write_image(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA"))))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent: the background, not the stored colour
    assert out[0, 1].tolist() == [10, 20, 30]
    assert out[0, 2].tolist() == [blend(200, 128), blend(100, 128), blend(0, 128)]
    la = Image.fromarray(np.array([[[50, 0], [50, 255], [50, 64]]], np.uint8), "LA")
    out = pixels(load_image(write_image(tmp_path / "la.png", la)))
    assert out[0, :, 0].tolist() == [255, 50, blend(50, 64)]


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_transparency(tmp_path, ext):
    image = Image.fromarray(np.array([[0, 1, 1]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    path = write_image(tmp_path / f"p.{ext}", image, transparency=1)
    assert Image.open(path).mode == "P"
    out = pixels(load_image(path))
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [255, 255, 255]]
    opaque = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    opaque.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = pixels(load_image(write_image(tmp_path / f"opaque.{ext}", opaque)))
    assert out[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    exact = pixels(load_image(write_image(tmp_path / "c.tif", cmyk)))
    assert exact[0, 0].tolist() == [255, 0, 0]
    lossy = pixels(load_image(write_image(tmp_path / "c.jpg", cmyk, quality=95))).astype(int)
    assert np.abs(lossy[4, 4] - [255, 0, 0]).max() <= 8


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    for name in ("g16.png", "g16.tif"):
        path = write_image(tmp_path / name, Image.fromarray(values))
        assert Image.open(path).mode.startswith("I;16")
        assert pixels(load_image(path))[0, :, 0].tolist() == [0, 1, 128, 255], name


def test_int32_and_float_modes(tmp_path):
    wide = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    path = write_image(tmp_path / "i.tif", wide)
    assert Image.open(path).mode == "I"
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 128, 255]
    signed = write_image(tmp_path / "signed.tif", Image.fromarray(np.array([[-1000, 0, 1000]], np.int32)))
    assert pixels(load_image(signed))[0, :, 0].tolist() == [0, 128, 255]  # outside 16-bit: stretched
    unit = write_image(tmp_path / "f.tif", Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))
    assert Image.open(unit).mode == "F"
    assert pixels(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    big = write_image(tmp_path / "f2.tif", Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32)))
    assert pixels(load_image(big))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, 20:] = 255  # left half black, right half white; 40 wide, 20 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = write_image(tmp_path / "rotated.jpg", Image.fromarray(array), exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (3, 40, 20)
    assert out[:, :18].float().mean() < 20 and out[:, 22:].float().mean() > 235  # black on top after rotating


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "JPG"])
def test_every_extension(tmp_path, ext):
    if ext == "webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    solid = Image.new("RGB", (6, 5), (200, 40, 90))
    save_args = {"quality": 95} if ext.lower() in ("jpg", "jpeg", "webp") else {}
    out = load_image(write_image(tmp_path / f"x.{ext}", solid, **save_args))
    assert out.shape == (3, 5, 6)
    assert (out[:, 2, 2].int() - torch.tensor([200, 40, 90])).abs().max() <= 6


def test_resize_shorter_side_then_center_crop(tmp_path):
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, 20:60] = 255  # white center band, exactly the center square after resizing to 20x40
    path = write_image(tmp_path / "wide.png", Image.fromarray(array))
    out = decode_image(path, 20)
    assert out.shape == (20, 20, 3)
    assert out[:, 2:-2].min() >= 250  # the black sides were cropped away (edges soften a little)


def test_bad_files_have_reasons(tmp_path, monkeypatch):
    cases = {
        "truncated": (truncated_jpeg(tmp_path / "t.jpg"), "truncated"),
        "empty": (empty_file(tmp_path / "e.jpg"), "empty file"),
        "text": (text_as_jpeg(tmp_path / "text.jpg"), "not an image"),
        "bomb": (png_bomb(tmp_path / "bomb.png"), "decompression bomb"),
    }
    for name, (path, expected) in cases.items():
        with pytest.raises(BadImagesError) as info:
            load_image(path)
        assert info.value.bad[0][0] == str(path), name
        assert expected in info.value.bad[0][1], (name, info.value.bad)
        assert str(path) in str(info.value)
    # our own pixel limit (Pillow's, lowered here) also refuses images between 1x and 2x of it
    monkeypatch.setattr(decode_module, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImagesError, match="decompression bomb"):
        load_image(write_image(tmp_path / "big.png", noise(40)))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")


def test_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(BadImagesError([("a.jpg", "empty file (0 bytes)")])))
    assert error.bad == [("a.jpg", "empty file (0 bytes)")] and "a.jpg: empty file" in str(error)


def test_process_pool_matches_in_process(tmp_path, monkeypatch):
    paths = [write_image(tmp_path / f"{i}.png", noise(8, seed=i)) for i in range(6)]
    paths.append(empty_file(tmp_path / "bad.png"))
    serial = decode_module.decode_files(paths, None, workers=1)
    monkeypatch.setattr(decode_module, "POOL_MIN_FILES", 1)
    pooled = decode_module.decode_files(paths, None, workers=2)
    assert len(pooled) == len(serial) == 7
    for (a, info_a, reason_a), (b, info_b, reason_b) in zip(serial, pooled, strict=True):
        assert reason_a == reason_b and info_a == info_b
        assert (a is None and b is None) or np.array_equal(a, b)
    assert serial[-1][2] == "empty file (0 bytes)"
