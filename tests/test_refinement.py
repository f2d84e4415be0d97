"""Pure maths of utils/refinement.py (points below the token grid): shape, hand-computed and edge cases."""

import math

import pytest
import torch

from cosegment.utils.refinement import (
    bilinear_weights,
    gather_windows,
    grid_to_pixels,
    local_affine_field,
    pixels_to_grid,
    quadratic_peak,
    robust_affine_at,
    window_mass,
    window_offsets,
    window_soft_argmax,
)


def _row(grid, values: dict) -> torch.Tensor:
    """A `(1, h * w)` row with `values[(r, c)]` at those tokens and 0 elsewhere."""
    h, w = grid
    row = torch.zeros(1, h * w)
    for (r, c), v in values.items():
        row[0, r * w + c] = v
    return row


class TestWindows:
    def test_offsets_shape_and_order(self):
        offsets = window_offsets(1)
        assert offsets.shape == (9, 2)
        assert offsets[0].tolist() == [-1, -1] and offsets[4].tolist() == [0, 0] and offsets[5].tolist() == [0, 1]

    def test_gather_masks_outside_the_grid(self):
        rows = torch.arange(12.0).view(1, 12)  # (3, 4) grid, value = token index
        values, coords, inside = gather_windows(rows, torch.tensor([0]), (3, 4), 1)
        assert values.shape == (1, 9) and coords.shape == (1, 9, 2) and inside.shape == (1, 9)
        assert inside[0].tolist() == [False, False, False, False, True, True, False, True, True]
        assert values[0, [4, 5, 7, 8]].tolist() == [0.0, 1.0, 4.0, 5.0]
        assert values[0, ~inside[0]].abs().sum() == 0

    def test_bad_peaks(self):
        with pytest.raises(ValueError, match="peaks"):
            gather_windows(torch.ones(1, 12), torch.tensor([12]), (3, 4))
        with pytest.raises(ValueError, match="rows"):
            gather_windows(torch.ones(1, 11), torch.tensor([0]), (3, 4))


class TestWindowSoftArgmax:
    def test_two_equal_tokens_give_the_midpoint(self):
        row = _row((5, 5), {(2, 2): 0.4, (2, 3): 0.4, (0, 0): 0.2})  # (0, 0) is outside the 3 x 3 window
        out = window_soft_argmax(row, torch.tensor([12]), (5, 5), radius=1, temperature=1.0)
        assert out.shape == (1, 2) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor([[2.0, 2.5]]), atol=1e-5, rtol=0)

    def test_temperature_hand_computed(self):
        # p = 0.6 at (1, 1), 0.2 at (1, 2): weights p ** 2 at T = 0.5 -> 0.36 and 0.04 -> col 1 + 0.04 / 0.40
        row = _row((3, 3), {(1, 1): 0.6, (1, 2): 0.2})
        out = window_soft_argmax(row, torch.tensor([4]), (3, 3), radius=1, temperature=0.5)
        torch.testing.assert_close(out, torch.tensor([[1.0, 1.1]]), atol=1e-5, rtol=0)
        plain = window_soft_argmax(row, torch.tensor([4]), (3, 3), radius=1, temperature=1.0)
        torch.testing.assert_close(plain, torch.tensor([[1.0, 1.25]]), atol=1e-5, rtol=0)

    def test_corner_peak_stays_inside_the_grid(self):
        row = torch.full((1, 16), 1.0 / 16)
        out = window_soft_argmax(row, torch.tensor([0]), (4, 4), radius=2, temperature=1.0)
        # only the 3 x 3 inside part of the window counts: its centre of mass is (1, 1)
        torch.testing.assert_close(out, torch.tensor([[1.0, 1.0]]))
        assert (out >= 0).all() and (out <= 3).all()

    def test_empty_and_bad_temperature(self):
        assert window_soft_argmax(torch.zeros(0, 9), torch.zeros(0, dtype=torch.long), (3, 3)).shape == (0, 2)
        with pytest.raises(ValueError, match="temperature"):
            window_soft_argmax(torch.ones(1, 9), torch.tensor([4]), (3, 3), temperature=0)


class TestQuadraticPeak:
    def test_symmetric_peak_stays(self):
        row = _row((3, 3), {(1, 1): 0.5, (0, 1): 0.1, (2, 1): 0.1, (1, 0): 0.1, (1, 2): 0.1})
        torch.testing.assert_close(quadratic_peak(row, torch.tensor([4]), (3, 3)), torch.tensor([[1.0, 1.0]]))

    def test_gaussian_peak_is_recovered(self):
        # log p is an exact parabola with its top at (1.3, 0.8): the fit finds it
        h = w = 3
        rr, cc = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        row = torch.exp(-((rr - 1.3) ** 2 + (cc - 0.8) ** 2)).view(1, -1)
        torch.testing.assert_close(quadratic_peak(row, torch.tensor([4]), (3, 3)), torch.tensor([[1.3, 0.8]]))

    def test_edge_peak_is_not_moved(self):
        row = _row((3, 3), {(0, 0): 0.7, (0, 1): 0.3})
        torch.testing.assert_close(quadratic_peak(row, torch.tensor([0]), (3, 3)), torch.tensor([[0.0, 0.0]]))


class TestWindowMass:
    def test_hand_computed(self):
        row = _row((4, 4), {(1, 1): 0.5, (1, 2): 0.2, (3, 3): 0.3})
        torch.testing.assert_close(window_mass(row, torch.tensor([5]), (4, 4), 1), torch.tensor([0.7]))


class TestPixelsAndGrid:
    def test_token_centre_round_trip(self):
        coords = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-0.5, 7.5]])
        pixels = grid_to_pixels(coords, (4, 8), (40, 160))
        # token (0, 0) centre at (x, y) = (10, 5); (3, 1) at (30, 35); the grid's corner (-0.5, 7.5) at (160, 0)
        torch.testing.assert_close(pixels, torch.tensor([[10.0, 5.0], [30.0, 35.0], [160.0, 0.0]]))
        torch.testing.assert_close(pixels_to_grid(pixels, (4, 8), (40, 160)), coords)


class TestBilinearWeights:
    def test_hand_computed(self):
        indices, weights = bilinear_weights(torch.tensor([[0.25, 1.5]]), (3, 4))
        assert indices.shape == (1, 4) and weights.shape == (1, 4)
        assert indices[0].tolist() == [1, 2, 5, 6]
        torch.testing.assert_close(weights[0], torch.tensor([0.375, 0.375, 0.125, 0.125]))

    def test_token_centre_reads_that_token_and_edges_clamp(self):
        indices, weights = bilinear_weights(torch.tensor([[2.0, 3.0], [-0.5, -0.5], [1.0, 1.0]]), (3, 4))
        values = torch.arange(12.0)
        read = (values[indices] * weights).sum(-1)
        torch.testing.assert_close(read, torch.tensor([11.0, 0.0, 5.0]))
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))

    def test_one_token_grid(self):
        indices, weights = bilinear_weights(torch.tensor([[0.3, -0.2]]), (1, 1))
        assert indices.unique().tolist() == [0] and math.isclose(float(weights.sum()), 1.0, rel_tol=1e-6)

    def test_bad_shape(self):
        with pytest.raises(ValueError, match="coords"):
            bilinear_weights(torch.zeros(3), (2, 2))


class TestLocalAffineField:
    def test_affine_map_is_reproduced_and_noise_averaged(self):
        h, w = 6, 6
        rr, cc = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        exact = torch.stack([0.5 + 1.2 * rr - 0.3 * cc, 2.0 + 0.1 * rr + 0.9 * cc], -1).view(-1, 2)
        keep = torch.ones(h * w, dtype=torch.bool)
        field, defined = local_affine_field(exact, keep, (h, w), radius=1)
        assert field.shape == (h * w, 2) and defined.all()
        torch.testing.assert_close(field, exact, atol=1e-4, rtol=0)
        # alternating +-0.3 noise on an inner token's match is averaged away by its neighbours
        noisy = exact + 0.3 * ((rr + cc) % 2 * 2 - 1).view(-1, 1)
        field, _ = local_affine_field(noisy, keep, (h, w), radius=2)
        inner = 2 * w + 2
        assert (field[inner] - exact[inner]).norm() < 0.5 * (noisy[inner] - exact[inner]).norm()

    def test_window_wider_than_the_grid(self):
        # radius 3 on a 2 x 3 grid: every kept token is in every window; an affine map is fitted exactly
        rr, cc = torch.meshgrid(torch.arange(2).float(), torch.arange(3).float(), indexing="ij")
        exact = torch.stack([1.0 + 2.0 * rr, 3.0 - cc], -1).view(-1, 2)
        field, defined = local_affine_field(exact, torch.ones(6, dtype=torch.bool), (2, 3), radius=3)
        assert defined.all()
        torch.testing.assert_close(field, exact, atol=1e-4, rtol=0)

    def test_undetermined_keeps_the_input(self):
        coords = torch.randn(9, 2)
        keep = torch.zeros(9, dtype=torch.bool)
        keep[[0, 1]] = True  # two points cannot fix an affine map
        field, defined = local_affine_field(coords, keep, (3, 3), radius=1)
        assert not defined.any()
        torch.testing.assert_close(field, coords)


class TestRobustAffine:
    def test_outlier_is_ignored(self):
        offsets = window_offsets(1).float()[None]  # (1, 9, 2)
        targets = 3.0 + 2.0 * offsets  # c = (3, 3), A = 2 I
        targets[0, 0] = torch.tensor([20.0, -20.0])  # one wrong neighbour
        weights = torch.ones(1, 9)
        out = robust_affine_at(offsets, targets, weights, iterations=5)
        assert out.shape == (1, 2)
        torch.testing.assert_close(out, torch.tensor([[3.0, 3.0]]), atol=0.05, rtol=0)

    def test_undetermined_gives_the_weighted_mean(self):
        offsets = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
        targets = torch.tensor([[[1.0, 1.0], [3.0, 1.0]]])
        out = robust_affine_at(offsets, targets, torch.tensor([[1.0, 3.0]]))
        torch.testing.assert_close(out, torch.tensor([[2.5, 1.0]]))

    def test_bad_shapes(self):
        with pytest.raises(ValueError, match="weights"):
            robust_affine_at(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(3))


def _loop_affine_field(coords, keep, grid_size, radius):
    """The field as first written: one window offset at a time, each neighbour's terms added in the window's order."""
    h, w = grid_size
    target = coords.float().view(h, w, 2)
    kept = keep.view(h, w).float()
    gram = torch.zeros(h, w, 3, 3)
    moment = torch.zeros(h, w, 3, 2)
    for di, dj in window_offsets(radius).tolist():
        if abs(di) >= h or abs(dj) >= w:
            continue
        centre = (slice(max(0, -di), h - max(0, di)), slice(max(0, -dj), w - max(0, dj)))
        neighbour = (slice(max(0, di), h + min(0, di)), slice(max(0, dj), w + min(0, dj)))
        x = torch.tensor([1.0, float(di), float(dj)])
        weight = kept[neighbour][..., None, None]
        gram[centre] += weight * torch.outer(x, x)
        moment[centre] += weight * x[:, None] * target[neighbour][..., None, :]
    defined = torch.linalg.det(gram).abs() > 0.5
    eye = torch.eye(3).expand_as(gram)
    beta = torch.linalg.solve(torch.where(defined[..., None, None], gram, eye), moment)
    field = torch.where(defined[..., None], beta[..., 0, :], target)
    return field.reshape(h * w, 2), defined.flatten()


@pytest.mark.parametrize("grid_size", [(9, 7), (2, 3), (1, 5), (12, 12)])
@pytest.mark.parametrize("radius", [0, 1, 3, 6])
def test_local_affine_field_is_bitwise_the_offset_loop(grid_size, radius):
    """All windows at once (unfold, one Gram product, an exact determinant, a solve of the determined fits only)
    give bit for bit what the loop over window offsets gives, kept share low to full, wide windows included."""
    g = torch.Generator().manual_seed(radius + 10 * grid_size[0])
    h, w = grid_size
    for share in (0.2, 0.6, 1.0):
        coords = torch.rand(h * w, 2, generator=g) * torch.tensor([h + 3.0, w + 3.0]) - 1.5
        keep = torch.rand(h * w, generator=g) < share
        field, defined = local_affine_field(coords, keep, grid_size, radius)
        expected_field, expected_defined = _loop_affine_field(coords, keep, grid_size, radius)
        assert torch.equal(defined, expected_defined)
        assert torch.equal(field.view(torch.int32), expected_field.view(torch.int32))  # same bits, signs of 0 too
