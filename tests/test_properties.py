"""Property tests of the cross self-attention maths (issue #6), with hypothesis: invariants that hold for any input."""

import math

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cosegment import (
    CoSegmentationFeatures,
    analyze_features,
    attention_row_statistics,
    inverse_mapping_entropy,
    inverse_mapping_error,
    mapping_density,
    neighbourhood_spread,
)
from cosegment.utils.correspondence import merge_passes, pass_statistics

# Example counts and derandomisation come from the profile tests/conftest.py loads (`HYPOTHESIS_PROFILE`).
SETTINGS = settings(deadline=None)
INF = float("inf")
# bounded, finite values; zeros and repeated values (ties) included, as hypothesis likes to draw them
VALUES = st.floats(-50, 50, width=32, allow_subnormal=False)
grids = st.tuples(st.integers(1, 5), st.integers(1, 5))


def tensors(shape) -> st.SearchStrategy[torch.Tensor]:
    return hnp.arrays(np.float32, shape, elements=VALUES).map(torch.from_numpy)


@st.composite
def qk(draw, same_tokens: bool = False):
    """Queries `(H, N_s, d)` and keys `(H, N_t, d)`."""
    heads, dim = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    n_s = draw(st.integers(1, 12))
    n_t = n_s if same_tokens else draw(st.integers(1, 12))
    return draw(tensors((heads, n_s, dim))), draw(tensors((heads, n_t, dim)))


@SETTINGS
@given(qk())
def test_row_entropy_is_between_0_and_log_n(pair):
    q, k = pair
    rows = attention_row_statistics(q, k)
    assert rows.entropy.shape == (q.shape[1],) and torch.isfinite(rows.entropy).all()
    assert (rows.entropy >= 0).all() and (rows.entropy <= math.log(k.shape[1]) + 1e-4).all()
    assert ((rows.max_prob >= 1 / k.shape[1] - 1e-6) & (rows.max_prob <= 1 + 1e-6)).all()


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 10), st.integers(1, 10)), elements=st.floats(0, 1e6, width=32)))
# found by hypothesis in CI: a subnormal row was not renormalised and gave 0.158 nats for a single column
@example(np.array([[6.35998e-40]], dtype=np.float32))
@example(np.full((2, 3), 1e-41, dtype=np.float32))
def test_inverse_mapping_entropy_is_between_0_and_log_n(attn):
    entropy = inverse_mapping_entropy(torch.from_numpy(attn))
    assert torch.isfinite(entropy).all()
    assert (entropy >= 0).all() and (entropy <= math.log(attn.shape[1]) + 1e-4).all()


@SETTINGS
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=40))))
def test_density_counts_every_source_once(case):
    num_targets, forward = case
    density = mapping_density(torch.tensor(forward, dtype=torch.long), num_targets)
    assert density.shape == (num_targets,) and (density >= 0).all()
    assert float(density.sum()) == len(forward)
    assert torch.equal(density, density.round())


@SETTINGS
@given(grids, st.randoms(use_true_random=False))
def test_inverse_error_is_zero_for_a_bijection_and_its_inverse(grid, rng):
    n = grid[0] * grid[1]
    forward = list(range(n))
    rng.shuffle(forward)
    forward = torch.tensor(forward)
    backward = torch.empty_like(forward)
    backward[forward] = torch.arange(n)
    assert torch.equal(inverse_mapping_error(forward, backward, grid), torch.zeros(n))


@SETTINGS
@given(grids, st.data())
def test_inverse_error_is_non_negative_and_bounded_by_the_diagonal(grid, data):
    n = grid[0] * grid[1]
    forward = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n)))
    backward = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n)))
    error = inverse_mapping_error(forward, backward, grid)
    diagonal = math.hypot(grid[0] - 1, grid[1] - 1)
    assert (error >= 0).all() and (error <= diagonal + 1e-5).all()


@SETTINGS
@given(grids, grids, st.data())
def test_constant_mapping_has_no_spread_and_full_collapse(grid, target_grid, data):
    target = data.draw(st.integers(0, target_grid[0] * target_grid[1] - 1))
    forward = torch.full((grid[0] * grid[1],), target, dtype=torch.long)
    spread, collapse = neighbourhood_spread(forward, grid, target_grid)
    assert torch.equal(spread, torch.zeros_like(spread))
    # a 1x1 grid has no neighbours: collapse share 0 by definition
    assert torch.equal(collapse, torch.full_like(collapse, 1.0 if grid != (1, 1) else 0.0))


@st.composite
def image_pair(draw):
    """Queries and keys of two images on one `(h, w)` grid, one or two entries (layers / noise draws)."""
    h, w = draw(grids)
    heads, dim, entries = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 2))
    shape = (heads, h * w, dim)
    qs = [[draw(tensors(shape)) for _ in range(entries)] for _ in range(2)]
    ks = [[draw(tensors(shape)) for _ in range(entries)] for _ in range(2)]
    return (h, w), qs, ks


def _fields(stats):
    return [stats.forward, stats.target_entropy, stats.inverse_error, stats.spread, stats.collapse]


@SETTINGS
@given(image_pair())
def test_swapping_source_and_target_swaps_the_passes(case):
    grid, (q_s, q_t), (k_s, k_t) = case
    rows_st, rows_ts = attention_row_statistics(q_s, k_t), attention_row_statistics(q_t, k_s)
    pass_st, pass_ts = pass_statistics(rows_st, rows_ts, grid), pass_statistics(rows_ts, rows_st, grid)
    # the same pair analysed with the images swapped
    rows_st2, rows_ts2 = attention_row_statistics(q_t, k_s), attention_row_statistics(q_s, k_t)
    pass_st2, pass_ts2 = pass_statistics(rows_st2, rows_ts2, grid), pass_statistics(rows_ts2, rows_st2, grid)
    for a, b in zip(_fields(pass_st) + _fields(pass_ts), _fields(pass_ts2) + _fields(pass_st2)):
        assert torch.equal(a, b)
    for stats in (pass_st, pass_ts):
        assert all(torch.isfinite(f.float()).all() for f in _fields(stats))
        assert (stats.spread >= 0).all() and ((stats.collapse >= 0) & (stats.collapse <= 1)).all()
    # merging the passes in the other orientation gives the mirrored matches with the same scores and flags
    keep = [torch.ones_like(pass_st.forward, dtype=torch.bool), torch.ones_like(pass_ts.forward, dtype=torch.bool)]
    src, tgt, score, mutual = merge_passes(
        pass_st.forward, keep[0], rows_st.max_prob, pass_ts.forward, keep[1], rows_ts.max_prob
    )
    src2, tgt2, score2, mutual2 = merge_passes(
        pass_ts.forward, keep[1], rows_ts.max_prob, pass_st.forward, keep[0], rows_st.max_prob
    )
    one = {(a, b): (s, m) for a, b, s, m in zip(src.tolist(), tgt.tolist(), score.tolist(), mutual.tolist())}
    two = {(b, a): (s, m) for a, b, s, m in zip(src2.tolist(), tgt2.tolist(), score2.tolist(), mutual2.tolist())}
    assert one == two


@st.composite
def features(draw):
    m = draw(st.integers(2, 4))
    h, w = draw(grids)
    entries = draw(st.integers(1, 2))
    queries, keys = [], []
    for _ in range(entries):
        heads, dim = draw(st.integers(1, 3)), draw(st.integers(1, 5))
        queries.append(draw(tensors((m, heads, h * w, dim))))
        keys.append(draw(tensors((m, heads, h * w, dim))))
    sizes = draw(st.lists(st.tuples(st.integers(1, 500), st.integers(1, 500)), min_size=m, max_size=m))
    return CoSegmentationFeatures(queries, keys, (h, w), sizes)


thresholds = st.one_of(st.none(), st.just(INF), st.floats(0, 30))


@SETTINGS
@given(features(), st.sampled_from(["auto", "paper"]), thresholds, thresholds, thresholds, thresholds)
def test_analyze_features_never_returns_nan(feats, selection, max_entropy, max_spread, max_collapse, max_error):
    h, w = feats.grid_size
    if selection == "paper" and h * w < 2:
        selection = "auto"  # "paper" needs 2+ tokens (refused with a ValueError, tested elsewhere)
    out = analyze_features(
        feats,
        selection=selection,
        max_entropy=max_entropy,
        max_spread=max_spread,
        max_collapse=max_collapse,
        max_inverse_error=max_error,
    )
    m = feats.num_images
    for maps in (out.density_maps, out.entropy_maps, out.inverse_error_maps):
        assert maps.shape == (m, h, w) and np.isfinite(maps).all()
    assert (out.entropy_maps >= 0).all() and (out.entropy_maps <= math.log(h * w) + 1e-4).all()
    assert len(out.correspondences) == m * (m - 1) // 2
    total = 0
    for pair in out.correspondences:
        total += len(pair)
        assert np.isfinite(pair.scores).all() and np.isfinite(pair.source_points).all()
        for points, (height, width) in (
            (pair.source_points, feats.image_sizes[pair.source_index]),
            (pair.target_points, feats.image_sizes[pair.target_index]),
        ):
            assert points.shape == (len(pair), 2)
            assert ((points >= 0) & (points <= np.array([width, height]))).all()
    assert out.density_maps.sum() == 2 * total
    for limits in out.thresholds:
        assert not any(isinstance(v, float) and math.isnan(v) for v in limits.values())
