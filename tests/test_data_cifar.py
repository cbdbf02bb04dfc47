"""CIFAR in the official python format: a fake archive served on 127.0.0.1, verified download, tampering."""

import dataclasses
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from vitkit.data import bench_data, cifar, format_inspection, inspect_folder, load_splits

NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def batch_bytes(count: int, seed: int, label_key: bytes = b"labels", classes: int = 10) -> bytes:
    """One batch as the official files hold it: a protocol-2 pickle of a dict with bytes keys."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30  # red, green, blue planes of image 0
    batch = {
        b"batch_label": b"fake batch",
        label_key: [int(i % classes) for i in range(count)],
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(count)],
    }
    return pickle.dumps(batch, protocol=2)


def cifar10_files(per_batch: int = 10) -> dict[str, bytes]:
    files = {f"data_batch_{i}": batch_bytes(per_batch, seed=i) for i in range(1, 6)}
    files["test_batch"] = batch_bytes(per_batch, seed=9)
    files["batches.meta"] = pickle.dumps({b"label_names": NAMES, b"num_cases_per_batch": per_batch}, protocol=2)
    return files


def make_archive(path, folder: str, files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**{f"{folder}/{k}": v for k, v in files.items()}, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fake_cifar10(tmp_path, server, monkeypatch):
    """Serve a fake cifar-10-python.tar.gz and point the spec's URL and MD5s at it."""
    www, url = server
    files = cifar10_files()
    archive = make_archive(www / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    spec = dataclasses.replace(
        cifar.CIFAR_SPECS["cifar10"],
        url=f"{url}/cifar-10-python.tar.gz",
        archive_md5=md5(archive),
        md5={name: md5(data) for name, data in files.items()},
    )
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", spec)
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "root"))
    return tmp_path / "root", www, files


def test_official_checksums_are_the_published_ones():
    spec = cifar.CIFAR_SPECS["cifar10"]
    assert spec.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert spec.archive_md5 == "c58f30108f718f92721af3b95e74349a"
    assert spec.md5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert spec.md5["batches.meta"] == "5ff9c542aee3614f3951f8cda6e48888"
    assert cifar.CIFAR_SPECS["cifar100"].archive_md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_missing_without_download_says_how(fake_cifar10):
    with pytest.raises(FileNotFoundError, match="--download"):
        load_splits("cifar10")


def test_download_verify_extract_load(fake_cifar10):
    root, _, _ = fake_cifar10
    splits = load_splits("CIFAR-10", download=True, val_fraction=0.1)
    assert (root / "cifar-10-python.tar.gz").is_file() and not list(root.glob("*.part"))
    assert splits.classes == [n.decode() for n in NAMES] and splits.image_size == 32
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 10)
    assert splits.val.counts() == [1] * 10  # 10% of 5 per class rounds to 0: at least one is held out
    first = cifar._load_batch(root / "cifar-10-batches-py" / "data_batch_1", cifar.CIFAR_SPECS["cifar10"])[0][0]
    assert first[:, 0, 0].tolist() == [10, 20, 30]  # planes land in the right channels
    assert splits.train.images.dtype == torch.uint8 and splits.train.paths is None
    # later runs need no network, and the extracted folder itself is a valid source too
    again = load_splits("cifar10", image_size=16)
    assert again.image_size == 16 and again.train.images.shape[-1] == 16
    direct = load_splits(root / "cifar-10-batches-py", val_fraction=0)
    assert len(direct.train) == 50 and len(direct.val) == 0
    # resized as image folders are: the one resize, image by image
    from vitkit.data import resize_center_crop

    small = load_splits(root / "cifar-10-batches-py", val_fraction=0, image_size=16).train.images
    for image, resized in zip(direct.train.images[:5], small[:5], strict=True):
        assert np.array_equal(resize_center_crop(image.permute(1, 2, 0).numpy(), 16), resized.permute(1, 2, 0).numpy())


def test_tampered_download_is_deleted_unextracted(fake_cifar10):
    root, www, _ = fake_cifar10
    data = bytearray((www / "cifar-10-python.tar.gz").read_bytes())
    data[-10] ^= 0xFF
    (www / "cifar-10-python.tar.gz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="MD5"):
        load_splits("cifar10", download=True)
    assert not list(root.iterdir())  # no archive, no .part, nothing extracted


def test_tampered_archive_on_disk_is_deleted(fake_cifar10):
    root = fake_cifar10[0]
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz") as info:
        load_splits("cifar10", download=True)
    assert "MD5" in str(info.value)
    assert not list(root.iterdir())


def test_tampered_batch_is_not_unpickled(fake_cifar10, monkeypatch):
    root, _, _ = fake_cifar10
    load_splits("cifar10", download=True)
    target = root / "cifar-10-batches-py" / "data_batch_3"
    target.write_bytes(batch_bytes(10, seed=123))  # a valid pickle, but not the published file
    real_load = cifar._CifarUnpickler.load
    loaded = []

    def spy(self):
        result = real_load(self)
        loaded.append(result)
        return result

    monkeypatch.setattr(cifar._CifarUnpickler, "load", spy)
    with pytest.raises(ValueError, match="data_batch_3") as info:
        load_splits("cifar10")
    assert "MD5" in str(info.value)
    # meta, data_batch_1 and data_batch_2 were unpickled; the tampered data_batch_3 never was
    assert len(loaded) == 3


def test_unpickler_refuses_code_even_with_matching_md5(fake_cifar10, monkeypatch):
    root = fake_cifar10[0]
    load_splits("cifar10", download=True)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = pickle.dumps({b"label_names": Evil()}, protocol=2)
    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(evil)
    spec = cifar.CIFAR_SPECS["cifar10"]
    spec = dataclasses.replace(spec, md5={**spec.md5, "batches.meta": md5(evil)})
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", spec)
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.print"):
        load_splits("cifar10")


def test_member_escaping_the_target_is_refused(fake_cifar10, monkeypatch):
    root, www, files = fake_cifar10
    archive = make_archive(www / "cifar-10-python.tar.gz", "cifar-10-batches-py", files, {"../escaped.txt": b"x"})
    spec = cifar.CIFAR_SPECS["cifar10"]
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", dataclasses.replace(spec, archive_md5=md5(archive)))
    with pytest.raises(ValueError, match=r"escaped\.txt") as info:
        load_splits("cifar10", download=True)
    assert "cifar-10-python.tar.gz" in str(info.value)
    assert not (root / "cifar-10-batches-py").exists()
    assert not (root.parent / "escaped.txt").exists() and not (root / "escaped.txt").exists()


def test_download_failure_names_the_url(tmp_path, monkeypatch):
    spec = dataclasses.replace(cifar.CIFAR_SPECS["cifar10"], url="http://127.0.0.1:9/none.tar.gz")
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", spec)
    with pytest.raises(OSError, match=r"127\.0\.0\.1:9/none\.tar\.gz"):
        load_splits("cifar10", download=True, data_root=tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_cifar100_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    files = {
        "train": batch_bytes(40, seed=1, label_key=b"fine_labels", classes=4),
        "test": batch_bytes(8, seed=2, label_key=b"fine_labels", classes=4),
        "meta": pickle.dumps({b"fine_label_names": [b"apple", b"bear", b"bed", b"bee"]}, protocol=2),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    spec = dataclasses.replace(cifar.CIFAR_SPECS["cifar100"], md5={n: md5(d) for n, d in files.items()})
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar100", spec)
    splits = load_splits(folder, val_fraction=0.3)
    assert splits.classes == ["apple", "bear", "bed", "bee"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (28, 12, 8)
    assert splits.val.counts() == [3, 3, 3, 3]


def test_inspect_cifar(fake_cifar10):
    load_splits("cifar10", download=True)
    report = inspect_folder("cifar10")
    assert report["layout"] == "cifar" and report["total"] == 60 and report["sizes"] == {"32x32": 60}
    assert report["splits"]["test"]["per_class"]["airplane"] == 1
    assert "airplane" in format_inspection(report)


def test_bench_data_on_fake_cifar(fake_cifar10):
    load_splits("cifar10", download=True)
    result = bench_data("cifar10", batch_size=16, seconds=0.1, image_size=48)
    assert result["images_per_s"] > 0 and result["image_size"] == 48 and result["train_images"] == 40
    assert result["config"]["auto_augment"] == "trivial" and result["config"]["mixup_alpha"] > 0
