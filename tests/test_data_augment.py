"""Batched augmentation: per-sample randomness, exact replay, each op against its definition, mixing, speed."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from vitkit.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    VIT_MEAN,
    VIT_STD,
    AugmentConfig,
    BatchAugment,
    bench_augment,
    preprocess,
)
from vitkit.data import augment as aug


def images(batch=8, size=8, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen(seed))


def rnd(seed=0):
    return aug._Random(torch.Generator().manual_seed(seed), torch.device("cpu"))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


FULL = AugmentConfig(crop_padding=4, auto_augment="trivial", random_erasing=0.5, mixup_alpha=0.8, cutmix_alpha=1.0)


def test_shapes_devices_and_targets():
    x, y = images(16, 32), torch.arange(16) % 10
    out, targets = BatchAugment(FULL, 32, 10, CIFAR10_MEAN, CIFAR10_STD)(x, y, gen())
    assert out.dtype == torch.float32 and out.shape == (16, 3, 32, 32)
    assert targets.dtype == torch.float32 and targets.shape == (16, 10)
    assert torch.allclose(targets.sum(1), torch.ones(16))
    _, labels = BatchAugment(AugmentConfig(), 32, 10, CIFAR10_MEAN, CIFAR10_STD)(x, y, gen())
    assert labels.dtype == torch.int64 and torch.equal(labels, y)
    big, _ = BatchAugment(FULL, 64, 10, VIT_MEAN, VIT_STD)(x, y, gen())  # 32x32 data for a 64 model
    assert big.shape == (16, 3, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment(FULL, 32, 10, CIFAR10_MEAN, CIFAR10_STD)(x.float(), y)


def test_replay_is_exact_and_seeds_differ():
    x, y = images(16, 16), torch.arange(16) % 10
    for config in (FULL, AugmentConfig(random_resized_crop=True, auto_augment="randaugment", random_erasing=0.5)):
        module = BatchAugment(config, 16, 10, CIFAR10_MEAN, CIFAR10_STD)
        a, ta = module(x, y, gen(1))
        b, tb = module(x, y, gen(1))
        c, _ = module(x, y, gen(2))
        assert torch.equal(a, b) and torch.equal(ta, tb)
        assert not torch.equal(a, c)


def test_randomness_is_per_sample():
    x = images(1, 16).expand(32, -1, -1, -1).contiguous()  # 32 copies of one image
    config = AugmentConfig(crop_padding=4, auto_augment="trivial")
    out, _ = BatchAugment(config, 16, 10, CIFAR10_MEAN, CIFAR10_STD)(x, torch.zeros(32, dtype=torch.long), gen())
    distinct = {tuple(o.flatten()[:200].tolist()) for o in out}
    assert len(distinct) > 20


def test_padded_crop_is_a_window_of_the_padded_image():
    x = images(12, 8)
    for mode in ("constant", "reflect"):
        out = aug.crop_flip(x, *aug.draw_crop_flip(len(x), 3, True, rnd()), mode, reach=3)
        padded = F.pad(x.float(), (3, 3, 3, 3), mode=mode).to(torch.uint8)
        for i in range(len(x)):
            windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(7) for dx in range(7)]
            windows += [w.flip(-1) for w in windows]
            assert any(torch.equal(out[i], w) for w in windows), (mode, i)
    flips = aug.crop_flip(images(64, 8), *aug.draw_crop_flip(64, 0, True, rnd()), "constant", reach=0)
    original = images(64, 8)
    same = sum(torch.equal(a, b) for a, b in zip(flips, original, strict=True))
    mirrored = sum(torch.equal(a, b.flip(-1)) for a, b in zip(flips, original, strict=True))
    assert same + mirrored == 64 and 15 < same < 49


def test_random_resized_crop():
    x = images(8, 16)
    identity = aug.random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), False, rnd())
    assert torch.equal(identity, x)  # the whole image at its own size: exactly the input
    crops = aug.random_resized_crop(x, (0.1, 0.5), (0.75, 1.33), True, rnd())
    assert crops.shape == x.shape and crops.dtype == torch.uint8 and not torch.equal(crops, x)


def _one(name, x, value):
    n = len(x)
    return aug.apply_ops(x, torch.full((n,), aug._OP[name]), torch.full((n,), float(value)))


def test_pixel_ops_match_torchvision():
    x = images(4, 16)
    assert torch.equal(_one("identity", x, 0), x)
    assert torch.equal(_one("posterize", x, 3), TF.posterize(x, 3))
    assert torch.equal(_one("solarize", x, 128), TF.solarize(x, 128))
    assert torch.equal(_one("equalize", x, 0), TF.equalize(x))
    # torchvision truncates where these ops round (and truncates its gray first): allow a level or two
    for name, theirs, tolerance in (
        ("brightness", TF.adjust_brightness(x, 1.5), 1),
        ("color", TF.adjust_saturation(x, 0.3), 2),
        ("contrast", TF.adjust_contrast(x, 1.4), 2),
        ("sharpness", TF.adjust_sharpness(x, 1.8), 2),
        ("autocontrast", TF.autocontrast(x), 1),
    ):
        value = {"brightness": 0.5, "color": -0.7, "contrast": 0.4, "sharpness": 0.8, "autocontrast": 0}[name]
        diff = (_one(name, x, value).int() - theirs.int()).abs().max().item()
        assert diff <= tolerance, (name, diff)


def test_geometric_ops():
    x = images(2, 8)
    moved = _one("translate_x", x, 2)
    assert torch.equal(moved[..., 2:], x[..., :-2]) and moved[..., :2].eq(0).all()
    down = _one("translate_y", x, -3)
    assert torch.equal(down[..., :-3, :], x[..., 3:, :])
    turned = _one("rotate", x, 90)
    assert torch.equal(turned, x.rot90(1, (2, 3))) or torch.equal(turned, x.rot90(-1, (2, 3)))
    sheared = _one("shear_x", x, 0.5)
    assert sheared.shape == x.shape and not torch.equal(sheared, x)
    # per-sample magnitudes: the two samples move by different amounts in one call
    mixed = aug.apply_ops(x, torch.full((2,), aug._OP["translate_x"]), torch.tensor([1.0, 3.0]))
    assert torch.equal(mixed[0, :, :, 1:], x[0, :, :, :-1]) and torch.equal(mixed[1, :, :, 3:], x[1, :, :, :-3])


def test_magnitude_tables_follow_torchvision():
    trivial = aug.magnitude_table("trivial", 32, 32)
    assert trivial[aug._OP["posterize"]].tolist()[0] == 8 and trivial[aug._OP["posterize"]].tolist()[-1] == 2
    assert trivial[aug._OP["solarize"], 0] == 255 and trivial[aug._OP["solarize"], -1] == 0
    assert trivial[aug._OP["rotate"], -1] == 135 and abs(trivial[aug._OP["shear_x"], -1] - 0.99) < 1e-6
    ra = aug.magnitude_table("randaugment", 32, 32)
    assert abs(ra[aug._OP["shear_x"], 9] - 0.09) < 1e-6 and abs(ra[aug._OP["rotate"], 9] - 9.0) < 1e-5
    assert ra[aug._OP["posterize"], -1] == 4


def test_random_erasing():
    x = torch.zeros(32, 3, 16, 16)
    erased = aug.random_erasing(x, 1.0, rnd())
    changed = (erased != 0).flatten(1).any(1)
    assert changed.all()
    fractions = (erased != 0).float().mean((1, 2, 3))
    assert fractions.min() > 0.01 and fractions.max() < 0.5
    assert torch.equal(aug.random_erasing(x, 0.0, rnd()), x)


def test_mixup_targets_match_the_pixels():
    x, y = images(8, 8), torch.arange(8)
    config = AugmentConfig(hflip=False, mixup_alpha=0.4)
    out, targets = BatchAugment(config, 8, 8, VIT_MEAN, VIT_STD)(x, y, gen(3))
    lam = targets[0, 0].item()
    assert 0 < lam < 1 and torch.allclose(targets[0, 7], torch.tensor(1 - lam))
    clean = preprocess(x, 8, VIT_MEAN, VIT_STD)
    assert torch.allclose(out, lam * clean + (1 - lam) * clean.flip(0), atol=1e-5)


def test_cutmix_box_area_is_the_target_weight():
    x, y = images(8, 16), torch.arange(8)
    config = AugmentConfig(hflip=False, cutmix_alpha=1.0)
    for seed in range(5):
        out, targets = BatchAugment(config, 16, 8, VIT_MEAN, VIT_STD)(x, y, gen(seed))
        clean = preprocess(x, 16, VIT_MEAN, VIT_STD)
        from_partner = (out[0] != clean[0]).any(0)
        assert torch.equal(out[0][:, from_partner], clean[7][:, from_partner])
        assert abs(from_partner.float().mean().item() - targets[0, 7].item()) < 1e-6


def test_mix_prob_and_label_range():
    x, y = images(4, 8), torch.arange(4)
    never = BatchAugment(AugmentConfig(mixup_alpha=1.0, mix_prob=0.0), 8, 4, VIT_MEAN, VIT_STD)
    assert never(x, y, gen())[1].dtype == torch.int64
    with pytest.raises(ValueError, match="labels"):
        BatchAugment(AugmentConfig(mixup_alpha=1.0), 8, 3, VIT_MEAN, VIT_STD)(x, y, gen())


def test_preprocess_normalises_and_resizes():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(preprocess(x, 4, VIT_MEAN, VIT_STD), torch.ones(2, 3, 4, 4))
    assert torch.allclose(preprocess(torch.zeros_like(x), 8, VIT_MEAN, VIT_STD), -torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(x.float(), 4, VIT_MEAN, VIT_STD)


def test_config_errors_name_the_value():
    for bad, pattern in (
        (dict(auto_augment="autoaugment"), "auto_augment='autoaugment'"),
        (dict(crop_padding=-1), "crop_padding=-1"),
        (dict(mix_prob=2.0), "mix_prob=2.0"),
        (dict(randaugment_m=31), "randaugment_m=31"),
        (dict(rrc_scale=(0.5, 0.1)), "rrc_scale"),
    ):
        with pytest.raises(ValueError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
            AugmentConfig(**bad)


def test_bench_reports_throughput():
    result = bench_augment(images(512, 32), FULL, batch_size=64, seconds=0.2)
    assert result["images_per_s"] > 0 and result["batch_size"] == 64 and result["batches"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator():
    x, y = images(64, 32), torch.arange(64) % 10
    config = AugmentConfig(crop_padding=4, auto_augment="trivial", mixup_alpha=0.8, cutmix_alpha=1.0)
    module = BatchAugment(config, 32, 10, CIFAR10_MEAN, CIFAR10_STD)
    cpu, cpu_targets = module(x, y, gen(5))
    cuda, cuda_targets = module(x.cuda(), y.cuda(), gen(5))  # same CPU generator: the same draws
    assert cuda.device.type == "cuda"
    assert (cuda.cpu() - cpu).abs().gt(1e-3).float().mean() < 0.01  # nearest-neighbour ties may differ
    assert torch.allclose(cuda_targets.cpu(), cpu_targets)
    on_device, _ = module(x.cuda(), y.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert on_device.shape == (64, 3, 32, 32)


def test_mix_false_leaves_the_batch_unmixed():
    """A schedule switches mixing off for early steps: the same draw then gives clean images."""
    x, y = images(4, 8), torch.arange(4)
    augment = BatchAugment(AugmentConfig(hflip=False, mixup_alpha=1.0), 8, 4, VIT_MEAN, VIT_STD)
    out, targets = augment(x, y, gen(), mix=False)
    assert targets.dtype == torch.int64 and torch.equal(out, preprocess(x, 8, VIT_MEAN, VIT_STD))


def test_auto_augment_false_leaves_out_only_the_auto_augment_ops():
    """A schedule switches TrivialAugment off for early steps: crop and flip are drawn as before and
    the batch is what the same config without auto_augment gives; switched on, the ops change it."""
    x, y = images(8, 8), torch.arange(8)
    trivial = BatchAugment(AugmentConfig(crop_padding=2, auto_augment="trivial"), 8, 8, VIT_MEAN, VIT_STD)
    plain = BatchAugment(AugmentConfig(crop_padding=2), 8, 8, VIT_MEAN, VIT_STD)
    off, _ = trivial(x, y, gen(3), auto_augment=False)
    assert torch.equal(off, plain(x, y, gen(3))[0])
    assert not torch.equal(trivial(x, y, gen(3))[0], off)


def test_view_targets_see_each_samples_crop_and_are_mixed_as_the_labels():
    """A cached teacher is asked for the view each sample was cropped to: the offsets and flips it is
    handed reproduce the images, asking changes no draw, and mixing weighs its answers by the labels' lam."""
    x, y = images(16, 16), torch.arange(16) % 10
    config = AugmentConfig(crop_padding=4, mixup_alpha=0.8, cutmix_alpha=1.0)
    augment = BatchAugment(config, 16, 10, VIT_MEAN, VIT_STD)
    seen = []

    def one_hot_of_view(offset_y, offset_x, flip):  # answers with the labels, so mixed = the targets
        seen.append((offset_y, offset_x, flip))
        return F.one_hot(y, 10).float()

    for seed in range(4):
        plain, plain_targets = augment(x, y, gen(seed))
        out, targets, soft = augment(x, y, gen(seed), view_targets=one_hot_of_view)
        assert torch.equal(out, plain) and torch.equal(targets, plain_targets)
        assert torch.allclose(soft, targets.float() if targets.ndim == 2 else F.one_hot(y, 10).float())
        unmixed, _, _ = augment(x, y, gen(seed), mix=False, view_targets=one_hot_of_view)
        assert torch.equal(unmixed, preprocess(aug.crop_flip(x, *seen[-1]), 16, VIT_MEAN, VIT_STD))
        offset_y, offset_x, flip = seen[-1]
        assert offset_y.abs().max() <= 4 and offset_x.abs().max() <= 4 and flip.dtype == torch.bool
    assert any(t.ndim == 2 for t in [augment(x, y, gen(s))[1] for s in range(4)])  # some batch was mixed
    with pytest.raises(ValueError, match="random_resized_crop"):
        BatchAugment(AugmentConfig(random_resized_crop=True), 16, 10, VIT_MEAN, VIT_STD)(
            x, y, gen(), view_targets=one_hot_of_view)
