"""utils/refinement.py (points below the token grid): cases written for the mutation run of issue 29. Windows at
the far edges of the grid, bilinear reading beyond the token centres' hull, the robust fit against a least-squares
fit computed another way, input checks naming the value, and every tensor on the inputs' device."""

import numpy as np
import pytest
import torch

from cosegment.transfer import REFINE_RADIUS, REFINE_TEMPERATURE
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

# ---------------------------------------------------------------------------------------------------------------------
# Windows at the grid's far edges
# ---------------------------------------------------------------------------------------------------------------------


def test_a_window_at_the_bottom_right_corner_stays_on_the_grid():
    h, w = 3, 5  # wider than high: rows and columns have different bounds
    rows = torch.arange(1.0, h * w + 1).view(1, -1)  # value = token index + 1
    values, coords, inside = gather_windows(rows, torch.tensor([h * w - 1]), (h, w), 1)
    assert inside[0].tolist() == [True, True, False, True, True, False, False, False, False]
    assert values[0].tolist() == [9.0, 10.0, 0.0, 14.0, 15.0, 0.0, 0.0, 0.0, 0.0]
    # the soft-argmax of a flat row there is the centre of mass of the window's part on the grid
    flat = torch.full((1, h * w), 1.0 / (h * w))
    for radius in (1, 2):
        out = window_soft_argmax(flat, torch.tensor([h * w - 1]), (h, w), radius=radius, temperature=1.0)
        expected = torch.tensor([[h - 1 - radius / 2, w - 1 - radius / 2]])
        torch.testing.assert_close(out, expected)
    # a peak on the last row of a wide grid: the row below is off the grid even where its columns exist
    values, coords, inside = gather_windows(rows, torch.tensor([(h - 1) * w + 1]), (h, w), 1)
    assert inside[0].tolist() == [True, True, True, True, True, True, False, False, False]


def test_soft_argmax_of_any_row_stays_within_the_token_centres():
    g = torch.Generator().manual_seed(0)
    for grid in ((3, 5), (6, 2), (1, 4)):
        n = grid[0] * grid[1]
        rows = torch.rand(40, n, generator=g) ** 4
        peaks = torch.randint(0, n, (40,), generator=g)
        out = window_soft_argmax(rows, peaks, grid, radius=2, temperature=0.7)
        assert (out >= 0).all() and (out[:, 0] <= grid[0] - 1).all() and (out[:, 1] <= grid[1] - 1).all()


def test_default_window_is_the_analysis_choice():
    g = torch.Generator().manual_seed(1)
    rows = torch.rand(3, 64, generator=g) ** 3
    peaks = rows.argmax(dim=1)
    explicit = window_soft_argmax(rows, peaks, (8, 8), REFINE_RADIUS, REFINE_TEMPERATURE)
    assert (REFINE_RADIUS, REFINE_TEMPERATURE) == (2, 0.5)  # 5 x 5, weights p ** 2 (module docstring)
    torch.testing.assert_close(window_soft_argmax(rows, peaks, (8, 8)), explicit)
    assert gather_windows(rows, peaks, (8, 8))[0].shape == (3, 25)
    assert not torch.allclose(window_soft_argmax(rows, peaks, (8, 8), 3, 0.5), explicit)
    assert not torch.allclose(window_soft_argmax(rows, peaks, (8, 8), 2, 1.5), explicit)


def test_window_mass_is_a_share_of_each_rows_own_total():
    rows = torch.zeros(2, 16)
    rows[0, [5, 6, 15]] = torch.tensor([1.0, 0.4, 0.6])  # total 2: 1.4 within one token of token 5
    rows[1, [0, 15]] = torch.tensor([0.1, 0.3])  # total 0.4: 0.3 at the peak, token 0 far away
    torch.testing.assert_close(window_mass(rows, torch.tensor([5, 15]), (4, 4), 1), torch.tensor([0.7, 0.75]))


def test_window_mass_reads_a_three_by_three_window_by_default():
    rows = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]]) / 4
    assert window_mass(rows, torch.tensor([0]), (1, 5)).tolist() == [0.5]  # tokens 0 and 1: the grid's part of it
    assert window_mass(rows, torch.tensor([0]), (1, 5), 2).tolist() == [0.75]


def test_window_mass_stays_in_zero_one_for_rows_with_negative_values():
    # documented as a share in [0, 1]: a row whose window outweighs its (partly negative) total reads 1, a window
    # of negative values in a positive total reads 0
    rows = torch.tensor([[2.0, 0.0, 0.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 5.0, 0.0], [3.0, 0.0, 0.0, -2.0, 0.0]])
    mass = window_mass(rows, torch.tensor([0, 0, 0]), (1, 5), 1)
    assert mass.tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# Bilinear reading
# ---------------------------------------------------------------------------------------------------------------------


def test_bilinear_weights_read_the_four_tokens_around_the_clamped_point():
    h, w = 5, 7
    g = torch.Generator().manual_seed(2)
    points = torch.rand(200, 2, generator=g) * torch.tensor([h + 3.0, w + 3.0]) - 1.5  # inside and beyond the hull
    points = torch.cat([points, torch.tensor([[h - 1.0, w - 1.0], [h - 1.5, 0.5], [0.0, w - 1.25]])])
    indices, weights = bilinear_weights(points, (h, w))
    clamped = torch.stack([points[:, 0].clamp(0, h - 1), points[:, 1].clamp(0, w - 1)], -1)
    rows, cols = indices // w, indices % w
    assert (weights >= 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(points)))
    assert ((rows - clamped[:, :1]).abs() <= 1).all() and ((cols - clamped[:, 1:]).abs() <= 1).all()
    # a linear field is read exactly at the clamped point
    field = (3.0 * torch.arange(h)[:, None] - 2.0 * torch.arange(w)[None, :] + 1.0).reshape(-1)
    torch.testing.assert_close((field[indices] * weights).sum(-1), 3.0 * clamped[:, 0] - 2.0 * clamped[:, 1] + 1.0)


def test_bilinear_weights_message_names_what_it_got():
    with pytest.raises(ValueError, match=r"^`coords` must be a \(K, 2\) tensor, got torch.Size\(\[3\]\)\.$"):
        bilinear_weights(torch.zeros(3), (2, 2))
    with pytest.raises(ValueError, match=r"^`coords` must be a \(K, 2\) tensor, got <class 'list'>\.$"):
        bilinear_weights([[0.0, 0.0]], (2, 2))


def test_pixels_and_grid_of_several_points():
    coords = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.5, -0.5]])
    pixels = grid_to_pixels(coords, (4, 8), (40, 160))
    assert pixels.shape == (3, 2)
    torch.testing.assert_close(pixels, torch.tensor([[10.0, 5.0], [50.0, 15.0], [0.0, 30.0]]))
    torch.testing.assert_close(pixels_to_grid(pixels, (4, 8), (40, 160)), coords)


# ---------------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(3,), (3, 4, 1), (0, 4), (3, -1), (2.5, 4)])
def test_grid_size_must_be_two_positive_ints(grid):
    with pytest.raises(ValueError, match=r"^`grid_size` must be two positive ints \(h, w\), got ") as error:
        gather_windows(torch.ones(1, 12), torch.tensor([0]), grid)
    assert str(error.value).endswith(f"got {tuple(grid)!r}.")


def test_rows_and_peaks_messages_name_what_they_got():
    with pytest.raises(ValueError, match=r"^`rows` must be a \(K, 12\) tensor, got torch.Size\(\[1, 11\]\)\.$"):
        gather_windows(torch.ones(1, 11), torch.tensor([0]), (3, 4))
    with pytest.raises(ValueError, match=r"^`rows` must be a \(K, 12\) tensor, got torch.Size\(\[1, 12, 2\]\)\.$"):
        gather_windows(torch.ones(1, 12, 2), torch.tensor([0]), (3, 4))
    with pytest.raises(ValueError, match=r"^`rows` must be a \(K, 12\) tensor, got <class 'list'>\.$"):
        gather_windows([[1.0] * 12], torch.tensor([0]), (3, 4))
    with pytest.raises(ValueError, match=r"^`peaks` must be a \(1,\) integer tensor, got torch.Size\(\[2\]\)\.$"):
        gather_windows(torch.ones(1, 12), torch.tensor([0, 1]), (3, 4))
    with pytest.raises(ValueError, match=r"^`peaks` must be a \(1,\) integer tensor, got \[0\]\.$"):
        gather_windows(torch.ones(1, 12), [0], (3, 4))
    with pytest.raises(ValueError, match=r"^`peaks` must be a \(2,\) integer tensor, got torch.Size\(\[2\]\)\.$"):
        gather_windows(torch.ones(2, 12), torch.tensor([0.0, 1.0]), (3, 4))


@pytest.mark.parametrize("radius", [-1, 1.5, True])
def test_window_radius_must_be_a_non_negative_int(radius):
    if radius is True:  # a bool is an int to Python: radius 1
        assert window_offsets(radius).shape == (9, 2)
        return
    with pytest.raises(ValueError, match=rf"^`radius` must be a non-negative int, got {radius}\.$"):
        window_offsets(radius)


@pytest.mark.parametrize("temperature", [True, "0.5", 0.0, -1.0, float("nan")])
def test_temperature_must_be_a_positive_number(temperature):
    with pytest.raises(ValueError, match="`temperature` must be a positive number"):
        window_soft_argmax(torch.ones(1, 9), torch.tensor([4]), (3, 3), temperature=temperature)


def test_local_affine_field_checks_each_shape():
    coords, keep = torch.zeros(9, 2), torch.ones(9, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^`coords` \(8, 2\) and `keep` \(9,\) must be \(9, 2\), \(9,\)\.$"):
        local_affine_field(coords[:8], keep, (3, 3))
    with pytest.raises(ValueError, match=r"^`coords` \(9, 2\) and `keep` \(8,\) must be \(9, 2\), \(9,\)\.$"):
        local_affine_field(coords, keep[:8], (3, 3))


def test_local_affine_field_default_window_is_three_by_three():
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(36, 2, generator=g) * 6
    keep = torch.rand(36, generator=g) < 0.8
    default = local_affine_field(coords, keep, (6, 6))
    explicit = local_affine_field(coords, keep, (6, 6), radius=1)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    assert not torch.equal(default[0], local_affine_field(coords, keep, (6, 6), radius=2)[0])


# ---------------------------------------------------------------------------------------------------------------------
# The parabola's vertex
# ---------------------------------------------------------------------------------------------------------------------


def test_quadratic_peak_moves_only_on_a_concave_peak_and_at_most_half_a_cell():
    def row(values):  # a 3 x 3 grid: values along the middle row, 1e-3 elsewhere
        out = torch.full((1, 9), 1e-3)
        out[0, 3:6] = torch.tensor(values)
        return out

    peak = torch.tensor([4])
    # flat (no curvature) and convex (a valley) middle rows: no shift along the columns
    for values in ([0.3, 0.3, 0.3], [0.3, 0.25, 0.3], [0.3, 0.2, 0.25]):
        assert quadratic_peak(row(values), peak, (3, 3))[0, 1].item() == 1.0
    # a concave ramp whose vertex lies beyond the next token: half a cell, either way
    assert quadratic_peak(row([0.1, 0.5, 0.9]), peak, (3, 3))[0, 1].item() == 1.5
    assert quadratic_peak(row([0.9, 0.5, 0.1]), peak, (3, 3))[0, 1].item() == 0.5
    out = quadratic_peak(row([0.2, 0.5, 0.4]), peak, (3, 3))
    expected = 1.0 + 0.5 * (np.log(0.2) - np.log(0.4)) / (np.log(0.2) - 2 * np.log(0.5) + np.log(0.4))
    torch.testing.assert_close(out, torch.tensor([[1.0, expected]], dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------------
# The robust fit, against least squares computed by numpy
# ---------------------------------------------------------------------------------------------------------------------


def _reweighted_least_squares(offsets, targets, weights, iterations, scale):
    """`iterations` Cauchy reweightings after a first weighted least-squares fit (numpy's lstsq on rows scaled by
    sqrt(weight)); the fit's value at offset 0."""
    design = np.concatenate([np.ones((len(offsets), 1)), offsets], axis=1)
    current = weights.copy()
    for _ in range(iterations + 1):
        root = np.sqrt(current)[:, None]
        beta = np.linalg.lstsq(design * root, targets * root, rcond=None)[0]
        residual = np.linalg.norm(design @ beta - targets, axis=1)
        current = weights / (1.0 + (residual / scale) ** 2)
    return beta[0]


def _outlier_case():
    offsets = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3)], dtype=np.float64)
    targets = np.array([4.0, -1.0]) + offsets @ np.array([[1.2, 0.3], [-0.2, 0.9]])
    targets[[12, 7, 13, 11, 17, 6]] += np.array([1.5, 1.0])  # six matches around the point off by 1.8 cells
    weights = np.exp(-0.5 * (offsets**2).sum(1) / 4.0) * np.linspace(0.5, 1.5, 25)
    return offsets, targets, weights


def test_robust_fit_is_least_squares_reweighted_by_cauchy():
    offsets, targets, weights = _outlier_case()
    tensors = [torch.tensor(x, dtype=torch.float32)[None] for x in (offsets, targets, weights)]
    expected = {}
    for iterations, scale in ((0, 1.0), (1, 1.0), (2, 0.5), (3, 1.0), (4, 1.0), (3, 2.0)):
        expected[iterations, scale] = _reweighted_least_squares(offsets, targets, weights, iterations, scale)
        out = robust_affine_at(*tensors, iterations=iterations, scale=scale)
        np.testing.assert_allclose(out[0].numpy(), expected[iterations, scale], atol=2e-4)
    # the defaults: three reweightings at a scale of one cell
    np.testing.assert_allclose(robust_affine_at(*tensors)[0].numpy(), expected[3, 1.0], atol=2e-4)
    assert np.abs(expected[3, 1.0] - expected[4, 1.0]).max() > 1e-3
    assert np.abs(expected[3, 1.0] - expected[3, 2.0]).max() > 1e-3
    # the fit does not depend on the weights' scale
    small = robust_affine_at(tensors[0], tensors[1], 1e-4 * tensors[2])
    np.testing.assert_allclose(small[0].numpy(), expected[3, 1.0], atol=2e-4)


def test_undetermined_fits_give_each_points_weighted_mean():
    # point 0: two neighbours; point 1: three on a line that misses offset 0 (the value there is not determined);
    # point 2: a determined fit; weights summing to less than one
    offsets = torch.tensor(
        [
            [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]],
            [[-1.0, 0.0], [1.0, 2.0], [3.0, 4.0]],
            [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
        ]
    )
    targets = torch.tensor(
        [
            [[1.0, 1.0], [3.0, 1.0], [1.0, 1.0]],
            [[2.0, 0.0], [4.0, 2.0], [9.0, 1.0]],
            [[1.0, 2.0], [2.0, 2.0], [1.0, 3.0]],
        ]
    )
    weights = torch.tensor([[0.1, 0.3, 0.0], [0.2, 0.2, 0.1], [0.3, 0.3, 0.3]])
    out = robust_affine_at(offsets, targets, weights)
    expected_mean = (weights[..., None] * targets).sum(1) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(out[:2], expected_mean[:2])
    torch.testing.assert_close(out[2], torch.tensor([1.0, 2.0]))


def test_nearly_collinear_neighbours_are_undetermined():
    # five neighbours on the line row = col + 1 (to 1e-4): the value at offset 0 is not determined by them
    cols = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    offsets = torch.stack([cols + 1.0 + 1e-4 * torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0]), cols], -1)[None]
    targets = torch.stack([2.0 * cols, cols + 3.0], -1)[None]
    weights = torch.ones(1, 5)
    torch.testing.assert_close(robust_affine_at(offsets, targets, weights), targets.mean(1))


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 3, 2), (1, 4, 2), (1, 3)), r"^`offsets` \(1, 3, 2\) and `targets` \(1, 4, 2\) must be \(K, S, 2\)\.$"),
        (((3, 2), (3, 2), (3,)), r"^`offsets` \(3, 2\) and `targets` \(3, 2\) must be \(K, S, 2\)\.$"),
        (((1, 3, 3), (1, 3, 3), (1, 3)), r"^`offsets` \(1, 3, 3\) and `targets` \(1, 3, 3\) must be \(K, S, 2\)\.$"),
        (((1, 3, 2), (1, 3, 2), (3,)), r"^`weights` must be \(1, 3\), got \(3,\)\.$"),
    ],
)
def test_robust_fit_checks_shapes(shapes, message):
    with pytest.raises(ValueError, match=message):
        robust_affine_at(*(torch.zeros(shape) for shape in shapes))


# ---------------------------------------------------------------------------------------------------------------------
# Every tensor on the inputs' device
# ---------------------------------------------------------------------------------------------------------------------

G = torch.Generator().manual_seed(4)
ROWS = torch.rand(3, 20, generator=G)
PEAKS = torch.tensor([0, 9, 19])
COORDS = torch.rand(20, 2, generator=G) * 4
KEEP = torch.rand(20, generator=G) < 0.7
OFFSETS, TARGETS, WEIGHTS = (torch.tensor(x, dtype=torch.float32)[None] for x in _outlier_case())

CALLS = {
    "gather_windows": lambda: gather_windows(ROWS, PEAKS, (4, 5), 2),
    "window_soft_argmax": lambda: window_soft_argmax(ROWS, PEAKS, (4, 5)),
    "quadratic_peak": lambda: quadratic_peak(ROWS, PEAKS, (4, 5)),
    "window_mass": lambda: window_mass(ROWS, PEAKS, (4, 5)),
    "bilinear_weights": lambda: bilinear_weights(COORDS, (4, 5)),
    "local_affine_field": lambda: local_affine_field(COORDS, KEEP, (4, 5), 2),
    "robust_affine_at": lambda: robust_affine_at(OFFSETS, TARGETS, WEIGHTS),
    "pixels_to_grid": lambda: pixels_to_grid(COORDS, (4, 5), (40, 50)),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_tensors_follow_the_inputs_device(name):
    expected = CALLS[name]()
    with torch.device("meta"):  # stands in for a GPU: a tensor made without the inputs' device lands here
        out = CALLS[name]()
    for a, b in zip(expected if isinstance(expected, tuple) else [expected], out if isinstance(out, tuple) else [out]):
        assert b.device.type == "cpu" and torch.equal(a, b)
