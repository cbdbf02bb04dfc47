"""Test-time augmentation (vitkit.model.tta), the one function training's validation and Classifier use."""

import pytest
import torch

from vitkit.model import create_model
from vitkit.model.tta import shift_image, view_averaged_logits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("cifar-mini", img_size=16, depth=1, num_classes=3).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


@torch.no_grad()
def test_views_are_averaged_as_probabilities(model):
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(view_averaged_logits(model, x), model(x))  # no views: the logits themselves
    mirrored = ((model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2).log()
    assert torch.equal(view_averaged_logits(model, x, flip=True), mirrored)  # bit for bit, as validation had it
    assert not torch.allclose(mirrored, model(x).log_softmax(-1), atol=1e-4)

    fill = torch.tensor([-1.0, 0.0, 2.0])
    padded = fill.view(1, 3, 1, 1).expand(4, 3, 20, 20).clone()
    padded[..., 2:18, 2:18] = x
    views = [padded[..., 2 + dy : 18 + dy, 2 + dx : 18 + dx] for dy in (-2, 0, 2) for dx in (-2, 0, 2)]
    expected = torch.stack([model(v).softmax(-1) for v in views]).mean(0).log()
    assert torch.allclose(view_averaged_logits(model, x, shift=2, fill=fill), expected, atol=1e-6)
    views += [v.flip(-1) for v in views]
    expected = torch.stack([model(v).softmax(-1) for v in views]).mean(0).log()
    assert torch.allclose(view_averaged_logits(model, x, flip=True, shift=2, fill=fill), expected, atol=1e-6)
    zeros = view_averaged_logits(model, x, shift=2, fill=torch.zeros(3))
    assert torch.equal(view_averaged_logits(model, x, shift=2), zeros)  # the default fill


def test_shift_image_moves_content_and_fills_the_border():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    down_left = shift_image(x, 1, -2, fill)
    assert torch.equal(down_left[..., 1:, :3], x[..., :3, 2:])
    assert torch.equal(down_left[..., 0, :], fill.view(1, 3, 1).expand(2, 3, 5))
    assert torch.equal(down_left[..., :, 3:], fill.view(1, 3, 1, 1).expand(2, 3, 4, 2))
    assert torch.equal(shift_image(x, 0, 0, fill), x)
    with pytest.raises(ValueError, match="4x5 image"):
        shift_image(x, 4, 0, fill)
