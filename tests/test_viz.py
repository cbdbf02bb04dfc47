"""Visualisation: the math on cases with known answers, and the PNGs/HTML that the figures write."""

import csv
import math

import numpy as np
import pytest
import torch

import vitkit
from vitkit.viz import (
    attention_rollout,
    cls_attention_maps,
    mean_attention_distance,
    patch_embedding_components,
    position_embedding_similarity,
    rollout_map,
    save_attention_figures,
    save_figure7,
    write_report,
)

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


def assert_png(path, size, tolerance=1):
    """The PNG exists, is about ``size`` (width, height) pixels and is not a blank canvas."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert abs(width - size[0]) <= tolerance and abs(height - size[1]) <= tolerance, (path.name, image.size)
    assert pixels.std() > 10, f"{path.name} looks blank (pixel std {pixels.std():.1f})"


def uniform_maps(depth, batch, heads, tokens):
    return [torch.full((batch, heads, tokens, tokens), 1.0 / tokens) for _ in range(depth)]


def random_maps(depth, batch, heads, tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=generator).softmax(-1) for _ in range(depth)]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return vitkit.create_model("cifar-mini", depth=2)  # 4 heads, 8x8 grid of 4-px patches, class token


# ---- attention rollout -------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_of_identity_attention_is_identity(residual):
    tokens = 1 + 4 * 4
    eye = torch.eye(tokens).expand(2, 3, tokens, tokens)
    rollout = attention_rollout([eye] * 4, residual=residual)
    assert rollout.shape == (2, tokens, tokens)
    assert torch.allclose(rollout, torch.eye(tokens).expand(2, -1, -1))
    cls_row = rollout[:, 0]  # the class token's row puts all its mass on itself
    assert torch.allclose(cls_row[:, 0], torch.ones(2)) and cls_row[:, 1:].abs().max() == 0


def test_rollout_averages_heads_adds_residual_and_multiplies_last_layer_last():
    first, second = random_maps(2, batch=1, heads=3, tokens=5)
    eye = torch.eye(5)
    a1 = 0.5 * first.mean(1) + 0.5 * eye
    a2 = 0.5 * second.mean(1) + 0.5 * eye
    assert torch.allclose(attention_rollout([first, second]), a2 @ a1, atol=1e-6)
    assert torch.allclose(attention_rollout([first, second], residual=False), second.mean(1) @ first.mean(1), atol=1e-6)
    assert torch.allclose(attention_rollout(random_maps(6, 2, 4, 9)).sum(-1), torch.ones(2, 9), atol=1e-5)


def test_rollout_of_one_uniform_layer():
    rollout = attention_rollout(uniform_maps(1, 1, 2, 10))[0]
    expected = torch.full((10, 10), 0.05) + 0.5 * torch.eye(10)
    assert torch.allclose(rollout, expected)


def test_cls_attention_maps_are_the_last_layers_class_row_in_row_major_order():
    g, heads = 3, 2
    tokens = 1 + g * g
    maps = random_maps(2, batch=2, heads=heads, tokens=tokens)
    maps[-1][:, :, 0] = 0.0
    maps[-1][:, 1, 0, 1 + 5] = 1.0  # head 2: class token looks at patch 5 = row 1, column 2
    out = cls_attention_maps(maps, grid_size=g)
    assert out.shape == (2, heads, g, g)
    assert out[:, 1, 1, 2].eq(1).all() and out[:, 1].sum() == 2
    no_cls = random_maps(1, batch=2, heads=heads, tokens=g * g)  # without a class token: the mean query row
    expected = no_cls[-1].mean(-2).reshape(2, heads, g, g)
    assert torch.allclose(cls_attention_maps(no_cls, g, num_prefix_tokens=0), expected)


def test_rollout_map_peaks_where_the_class_token_looks():
    g = 4
    tokens = 1 + g * g
    attn = torch.eye(tokens).expand(1, 2, tokens, tokens).clone()
    attn[:, :, 0] = 0.0
    attn[:, :, 0, 1 + 6] = 1.0  # patch 6 = row 1, column 2
    out = rollout_map([attn, torch.eye(tokens).expand(1, 2, tokens, tokens)], grid_size=g)
    assert out.shape == (1, g, g)
    assert out[0, 1, 2] == 1 and out.sum() == 1 and out.min() == 0
    random = rollout_map(random_maps(3, 2, 4, tokens), g)
    assert random.min() >= 0 and random.max() <= 1 and torch.allclose(random.amax(dim=(1, 2)), torch.ones(2))


# ---- Figure 7 math ------------------------------------------------------------------------------


def uniform_distance_closed_form(n, patch_size):
    """Mean distance between two independent uniform cells of an n x n grid, in pixels.

    Along one axis, an offset of 0 occurs for n of the n^2 ordered pairs and an offset d > 0 for
    2(n - d) of them; the axes are independent, so the mean is a double sum over offsets.
    """
    count = [n] + [2 * (n - d) for d in range(1, n)]
    total = sum(count[dy] * count[dx] * math.hypot(dx, dy) for dy in range(n) for dx in range(n))
    return patch_size * total / n**4


def test_uniform_distance_closed_form_on_small_grids():
    assert uniform_distance_closed_form(1, 16) == 0
    assert uniform_distance_closed_form(2, 16) == pytest.approx(16 * (2 + math.sqrt(2)) / 4)


@pytest.mark.parametrize("n,patch_size,prefix", [(2, 16, 1), (5, 4, 1), (7, 14, 0)])
def test_mean_attention_distance_of_uniform_attention(n, patch_size, prefix):
    maps = uniform_maps(3, batch=2, heads=4, tokens=prefix + n * n)
    mad = mean_attention_distance(maps, n, patch_size, num_prefix_tokens=prefix)
    assert mad.shape == (3, 4)
    assert torch.allclose(mad, torch.full((3, 4), uniform_distance_closed_form(n, patch_size)), rtol=1e-5)


def test_mean_attention_distance_per_head_and_depth():
    n, p = 4, 8
    tokens = 1 + n * n
    local = torch.eye(tokens)  # every query attends to itself: distance 0
    uniform = torch.full((tokens, tokens), 1.0 / tokens)
    layer = torch.stack([local, uniform])[None]  # head 1 local, head 2 global
    mad = mean_attention_distance([layer, layer.flip(1)], n, p)
    expected = uniform_distance_closed_form(n, p)
    assert torch.allclose(mad, torch.tensor([[0.0, expected], [expected, 0.0]]), atol=1e-5)


def test_position_embedding_similarity_of_sincos_peaks_on_the_diagonal():
    model = vitkit.create_model("cifar-mini", depth=1, pos_embed="sincos")
    g = model.config.grid_size
    sim = position_embedding_similarity(model)
    assert sim.shape == (g, g, g, g)
    flat = sim.reshape(g * g, g * g)
    assert torch.allclose(flat.diagonal(), torch.ones(g * g), atol=1e-5)
    assert torch.equal(flat.argmax(dim=1), torch.arange(g * g))  # each position is most similar to itself
    assert (flat - flat.diagonal()[:, None]).max() <= 1e-6 and torch.allclose(flat, flat.T, atol=1e-6)


def test_position_embedding_similarity_reads_only_patch_slots():
    """Registers and the class token have no position; with no_embed_class pos_embed holds patches only."""
    with_slots = vitkit.create_model("cifar-mini", depth=1, reg_tokens=2)
    patches_only = vitkit.create_model("cifar-mini", depth=1, reg_tokens=2, no_embed_class=True)
    with torch.no_grad():
        patches_only.pos_embed.copy_(with_slots.pos_embed[:, with_slots.config.pos_prefix_tokens :])
    g = with_slots.config.grid_size
    sim = position_embedding_similarity(patches_only)
    assert sim.shape == (g, g, g, g) and sim.std() > 0
    assert torch.equal(sim, position_embedding_similarity(with_slots))


def test_patch_embedding_components_recover_the_dominant_direction(tiny_model):
    comps = patch_embedding_components(tiny_model)
    c, p = tiny_model.config.in_chans, tiny_model.config.patch_size
    assert comps.shape == (28, c, p, p)
    flat = comps.flatten(1)
    assert torch.allclose(flat.amin(1), torch.zeros(28)) and torch.allclose(flat.amax(1), torch.ones(28))

    model = vitkit.create_model("cifar-mini", depth=1)
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(c * p * p, generator=generator)
    d = model.embed_dim
    weight = torch.randn(d, 1, generator=generator) * direction + 1e-4 * torch.randn(d, c * p * p, generator=generator)
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(weight.reshape(d, c, p, p))
    first = patch_embedding_components(model, n=3)[0].flatten()
    scaled = (direction - direction.min()) / (direction.max() - direction.min())
    assert torch.allclose(first, scaled, atol=1e-2) or torch.allclose(first, 1 - scaled, atol=1e-2)
    assert patch_embedding_components(model, n=1000).shape[0] == c * p * p  # capped at the filter rank


# ---- figures ------------------------------------------------------------------------------------


def test_save_attention_figures(tiny_model, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    generator = np.random.default_rng(0)
    originals = [generator.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                 generator.integers(0, 256, (96, 64, 3), dtype=np.uint8)]
    classes = [f"class_{i}" for i in range(10)]
    tiny_model.train()
    paths = save_attention_figures(tiny_model, images, originals, ["cat", "dog"], classes, tmp_path / "attn")
    assert tiny_model.training, "the model's mode must be restored"
    assert [p.name for p in paths] == ["cat.png", "dog.png"]
    # 2 + 4 heads = 6 panels in one row of 2.4-inch panels at 100 dpi, plus a 0.5-inch title band
    for path in paths:
        assert_png(path, (1440, 290))


def test_save_attention_figures_without_class_token(tmp_path):
    model = vitkit.create_model("cifar-mini", depth=1, num_heads=2, class_token=False, global_pool="avg")
    original = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    (path,) = save_attention_figures(model, torch.randn(1, 3, 32, 32), [original], ["img"], None, tmp_path)
    assert_png(path, (960, 290))  # 2 + 2 panels


def test_save_figure7(tiny_model, tmp_path):
    paths = save_figure7(tiny_model, torch.randn(3, 3, 32, 32), tmp_path / "fig7")
    names = ["patch_embedding_pcs.png", "position_embedding_similarity.png", "mean_attention_distance.png"]
    assert [p.name for p in paths] == names
    for path, size in zip(paths, [(800, 520), (700, 600), (650, 480)], strict=True):
        assert_png(path, size)


def test_save_figure7_of_a_hybrid_skips_the_pixel_filters(tmp_path):
    model = vitkit.create_model("cifar-hybrid", depth=2).eval()
    with pytest.raises(ValueError, match="hybrid"):
        patch_embedding_components(model)
    paths = save_figure7(model, torch.randn(2, 3, 32, 32), tmp_path / "fig7")
    assert [p.name for p in paths] == ["position_embedding_similarity.png", "mean_attention_distance.png"]


# ---- run report ---------------------------------------------------------------------------------

CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]


def fake_run(run_dir, steps=True, config=True, images=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"])
        for epoch in range(1, 6):
            writer.writerow([epoch, 20 * epoch, 2 / epoch, 0.2 + 0.1 * epoch, 2.2 / epoch, 0.15 + 0.1 * epoch,
                             1e-3 / epoch, "" if epoch == 1 else 900.0])
    if steps:
        with (run_dir / "steps.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "epoch", "train_loss", "lr"])
            for step in range(0, 100, 5):
                writer.writerow([step, step // 20 + 1, 2.5 * math.exp(-step / 40), 1e-3 * min(1, (step + 5) / 20)])
    if config:
        classes = "\n".join(f"  - {c}" for c in CLASSES)
        (run_dir / "config.yaml").write_text(f"model: cifar-mini\nepochs: 5\nclasses:\n{classes}\n")
    rng = np.random.default_rng(0)
    n = 60
    labels = np.arange(n) % len(CLASSES)
    logits = rng.normal(size=(n, len(CLASSES))) + 3.0 * np.eye(len(CLASSES))[labels] * (rng.random(n) < 0.7)[:, None]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    arrays = dict(probs=probs.astype(np.float32), labels=labels.astype(np.int64))
    if images:
        arrays["images"] = rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
    np.savez(run_dir / "val_predictions.npz", **arrays)
    return probs, labels


def test_write_report(tmp_path):
    probs, labels = fake_run(tmp_path / "run")
    page = write_report(tmp_path / "run")
    assert page == tmp_path / "run" / "report" / "report.html"
    sizes = {"curves_epochs.png": (1400, 420), "curves_steps.png": (1200, 420), "confusion_matrix.png": (850, 750),
             "per_class_accuracy.png": (1000, 480), "predictions.png": (1400, 490)}
    for name, size in sizes.items():
        assert_png(page.parent / name, size)
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == len(sizes)  # self-contained: PNGs embedded
    assert "http" not in text.replace(str(tmp_path), "")  # nothing fetched from elsewhere
    for name in CLASSES:
        assert name in text
    cat = labels == 3
    cat_accuracy = 100 * (probs[cat].argmax(1) == 3).mean()
    assert f"{cat_accuracy:.1f} %" in text
    assert "0.6500" in text  # last epoch's val_acc in the final-metrics table
    assert "<li>" not in text  # nothing missing, no notes


def test_write_report_tolerates_missing_parts(tmp_path):
    fake_run(tmp_path / "run", steps=False, config=False, images=False)
    page = write_report(tmp_path / "run", out_dir=tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    written = sorted(p.name for p in page.parent.glob("*.png"))
    assert written == ["confusion_matrix.png", "curves_epochs.png", "per_class_accuracy.png"]
    text = page.read_text()
    assert "steps.csv" in text and "class names" in text and "no &#x27;images&#x27;" in text
    assert text.count("data:image/png;base64,") == 3


def test_write_report_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="training run"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")
