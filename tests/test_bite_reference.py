"""utils/reference.py: cases written for the second mutation run of issue 29 (the two `offset_smoothing` survivors).
The smoothing width is chosen by how well each half of the captures predicts the other; that choice must not
depend on the offsets' sign nor on which half is called the first."""

import pytest
import torch

from cosegment.utils.reference import OFFSET_SIGMAS, offset_smoothing, smooth_over_grid


def _field(grid: tuple[int, int], seed: int) -> torch.Tensor:
    """`(2, h * w, 4)` smooth positional field: white noise smoothed over the grid, zero mean over positions."""
    gen = torch.Generator().manual_seed(seed)
    field = smooth_over_grid(torch.randn(2, grid[0] * grid[1], 4, generator=gen), grid, 1.5)
    return field - field.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 4.0])
def test_the_width_ignores_the_offsets_sign_and_which_half_comes_first(scale):
    grid = (8, 8)
    gen = torch.Generator().manual_seed(11 + int(10 * scale))
    field = _field(grid, seed=11)
    reference = field + scale * torch.randn(8, *field.shape, generator=gen)
    width = offset_smoothing(reference, grid)
    assert width in OFFSET_SIGMAS
    # a model whose offsets are the opposite ones, with the opposite noise, is just as smooth
    assert offset_smoothing(-reference, grid) == width
    # the even captures become the odd ones and back: the same two halves, the same sum of both predictions
    swapped = reference[[1, 0, 3, 2, 5, 4, 7, 6]]
    assert offset_smoothing(swapped, grid) == width
    # and the field is smooth: it is smoothed at all
    assert width > 0
