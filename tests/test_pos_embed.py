"""resample_pos_embed against references that do not share its code: a known smooth function of
(row, column) sampled at the patch centres of two grids, and timm's resampling.

Each channel is a different function that is not symmetric under transposition, so a result with
rows and columns swapped, or with channels and positions mixed (a reshape without the permute), is
off by 0.4 or more in some channel, while the interpolation itself stays within 0.05 of the function
(a few hundredths at the border, where bicubic interpolation extrapolates, less than 0.005 inside).
"""

from __future__ import annotations

import pytest
import torch

from vitkit.model import resample_pos_embed

# (old grid, new grid): upsampling and downsampling, including ViT's 224 -> 384 fine-tuning (14 -> 24).
GRIDS = [(8, 12), (12, 8), (14, 24), (24, 14)]
BORDER_TOLERANCE = 0.05
INSIDE_TOLERANCE = 0.005


def smooth_field(grid: int) -> torch.Tensor:
    """(1, grid * grid, 5), row-major: the channels of a known function evaluated at the patch centres.

    With align_corners=False an image is the unit square and patch (i, j) of a g x g grid covers
    [i/g, (i+1)/g] x [j/g, (j+1)/g]: its centre is ((i + 0.5) / g, (j + 0.5) / g) at every resolution.
    """
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    row, col = torch.meshgrid(centres, centres, indexing="ij")
    channels = [torch.sin(3 * row) + 0.3 * col, col**2, torch.cos(2 * col) * row, row, 0.5 * col - row * col]
    return torch.stack(channels, dim=-1).reshape(1, grid * grid, len(channels)).float()


def with_class_slot(grid_part: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    slot = torch.arange(prefix_tokens * grid_part.shape[-1], dtype=torch.float32).reshape(1, prefix_tokens, -1) + 7
    return torch.cat([slot, grid_part], dim=1)


def as_image(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    return tokens.reshape(grid, grid, -1)


@pytest.mark.parametrize("old,new", GRIDS)
def test_resampled_grid_follows_the_function_at_the_new_patch_centres(old, new):
    resampled = resample_pos_embed(with_class_slot(smooth_field(old)), new)
    assert resampled.shape == (1, 1 + new * new, 5)
    got, expected = as_image(resampled[:, 1:], new), as_image(smooth_field(new), new)
    error = (got - expected).abs()
    assert error.max() < BORDER_TOLERANCE, error.amax((0, 1))
    assert error[2:-2, 2:-2].max() < INSIDE_TOLERANCE, error[2:-2, 2:-2].amax((0, 1))
    # The tolerance separates: the transposed function is far off in every channel.
    transposed = (got.transpose(0, 1) - expected).abs().amax((0, 1))
    assert (transposed > 6 * BORDER_TOLERANCE).all(), transposed


@pytest.mark.parametrize("prefix_tokens", [0, 1, 2])
def test_prefix_tokens_are_kept_and_do_not_move_the_grid(prefix_tokens):
    field = smooth_field(8)
    embed = with_class_slot(field, prefix_tokens) if prefix_tokens else field
    resampled = resample_pos_embed(embed, 12, num_prefix_tokens=prefix_tokens)
    assert resampled.shape == (1, prefix_tokens + 144, 5)
    assert torch.equal(resampled[:, :prefix_tokens], embed[:, :prefix_tokens])
    assert torch.equal(resampled[:, prefix_tokens:], resample_pos_embed(field, 12, num_prefix_tokens=0))
    assert (as_image(resampled[:, prefix_tokens:], 12) - as_image(smooth_field(12), 12)).abs().max() < BORDER_TOLERANCE


def test_same_grid_is_unchanged_and_a_non_square_one_is_refused():
    embed = with_class_slot(smooth_field(8))
    assert torch.equal(resample_pos_embed(embed, 8), embed)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(embed[:, :-3], 12)


@pytest.mark.parametrize("old,new", GRIDS)
def test_matches_timm_resample_abs_pos_embed(old, new):
    timm_layers = pytest.importorskip("timm.layers")
    embed = with_class_slot(torch.randn(1, old * old, 32, generator=torch.Generator().manual_seed(old)))
    reference = timm_layers.resample_abs_pos_embed(embed, [new, new], num_prefix_tokens=1, interpolation="bicubic",
                                                   antialias=True)
    torch.testing.assert_close(resample_pos_embed(embed, new), reference, rtol=0, atol=1e-6)
