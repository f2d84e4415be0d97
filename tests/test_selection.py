"""The selection functions of utils/correspondence.py (DESIGN steps 6-8), each on a hand-computed case.

The pipeline tests reach these only through whole analyses, where a wrong comparison or a dropped term changes a
few matches among hundreds; here every function gets a small grid whose right answer is worked out in the
comments, with the boundary values of each threshold. Written from the survivors of a mutation run
(benchmarks/mutation.py, TESTING.md).
"""

import math

import pytest
import torch

from cosegment.utils.correspondence import (
    AttentionRowStatistics,
    PassStatistics,
    SelectionThresholds,
    affine_residual,
    attention_row_statistics,
    auto_thresholds,
    confirm_matches,
    cross_attention_probs,
    default_chunk_size,
    field_consistent,
    grow_matches,
    inverse_mapping_entropy,
    kept_map,
    match_scores,
    otsu_threshold,
    pass_statistics,
    reverse_consistent,
    select_matches,
    supported_spread,
)


def stats_of(forward, inverse_error=None, collapse=None, spread=None, entropy=None) -> PassStatistics:
    n = len(forward)
    zeros = torch.zeros(n)
    return PassStatistics(
        forward=torch.as_tensor(forward),
        target_entropy=zeros if entropy is None else torch.as_tensor(entropy, dtype=torch.float32),
        inverse_error=zeros if inverse_error is None else torch.as_tensor(inverse_error, dtype=torch.float32),
        spread=zeros if spread is None else torch.as_tensor(spread, dtype=torch.float32),
        collapse=zeros if collapse is None else torch.as_tensor(collapse, dtype=torch.float32),
    )


THRESHOLDS = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=0.5, max_inverse_error=1.0)


def test_select_matches_entropy_strictly_below_the_others_at_most():
    stats = stats_of(
        [0, 1, 2, 3, 4],
        entropy=[1.0, 0.99, 0.0, 0.0, 0.0],
        spread=[0.0, 2.0, 2.01, 0.0, 0.0],
        collapse=[0.0, 0.5, 0.0, 0.51, 0.0],
        inverse_error=[0.0, 1.0, 0.0, 0.0, 1.01],
    )
    assert select_matches(stats, THRESHOLDS).tolist() == [False, True, False, False, False]


def test_pass_statistics_hand_computed_on_different_grids():
    # source grid 1 x 2, target grid 1 x 3; f = [2, 0], g = [0, 1, 0]
    forward = AttentionRowStatistics(torch.tensor([2, 0]), torch.tensor([0.9, 0.6]), torch.tensor([0.1, 0.3]))
    backward = AttentionRowStatistics(
        torch.tensor([0, 1, 0]), torch.tensor([0.8, 0.7, 0.6]), torch.tensor([0.5, 0.7, 0.2])
    )
    stats = pass_statistics(forward, backward, (1, 2), (1, 3))
    assert stats.forward.tolist() == [2, 0]
    # g(f(0)) = g(2) = 0: back home; g(f(1)) = g(0) = 0: one cell off
    assert stats.inverse_error.tolist() == [0.0, 1.0]
    torch.testing.assert_close(stats.target_entropy, torch.tensor([0.2, 0.5]))  # IME of f(p), from the backward rows
    # f(0) = (0, 2) and f(1) = (0, 0) on the target grid: 2 cells apart, squared 4; no collapse
    assert stats.spread.tolist() == [4.0, 4.0] and stats.collapse.tolist() == [0.0, 0.0]


def test_auto_thresholds_from_the_passes_own_statistics():
    entropy = torch.tensor([0.1] * 6 + [3.0] * 6)
    spread = torch.tensor([0.0] * 6 + [99.0] * 6)
    thresholds = auto_thresholds(stats_of(list(range(12)), entropy=entropy, spread=spread))
    assert 0.1 < thresholds.max_entropy < 3.0
    assert thresholds.max_entropy == pytest.approx(otsu_threshold(entropy))
    assert 0.0 < thresholds.max_spread < 99.0
    assert thresholds.max_spread == pytest.approx(math.expm1(otsu_threshold(torch.log1p(spread))))
    assert thresholds.max_collapse == pytest.approx(7 / 8)
    assert thresholds.max_inverse_error == pytest.approx(math.sqrt(2))
    constant = auto_thresholds(stats_of(list(range(4)), entropy=[1.0] * 4, spread=[2.0] * 4))
    assert constant.max_entropy == math.inf and constant.max_spread == math.inf


def test_otsu_threshold_hand_computed_with_an_empty_bin_plateau():
    # values [0, 0, 1, 3], 4 bins of width 0.75: counts [2, 1, 0, 1], centres 0.375, 1.125, 1.875, 2.625.
    # between-class variance per cut: k=0: 2*2*(0.375-1.875)^2 = 9; k=1: 3*1*(0.625-2.625)^2 = 12; k=2: 12 (empty
    # bin). Best plateau k in {1, 2}, middle 1.5 -> threshold (1.5 + 1) * 3 / 4 = 1.875.
    assert otsu_threshold(torch.tensor([0.0, 0.0, 1.0, 3.0]), bins=4) == pytest.approx(1.875)
    # two equal modes at 0 and 10, 256 bins: every cut from bin 0 to 254 ties; middle 127 -> (128) * 10 / 256 = 5
    assert otsu_threshold(torch.tensor([0.0] * 50 + [10.0] * 50)) == pytest.approx(5.0)
    assert otsu_threshold(torch.tensor([1.0, float("nan"), 3.0, float("inf")]), bins=2) == pytest.approx(2.0)
    # values [0, 1, 2, 2, 3], 4 bins: counts [1, 1, 2, 1]; variances per cut 4*1.5^2 = 9, 6*1.375^2 = 11.34,
    # 4*1.3125^2 = 6.89: a unique best cut k = 1 -> (1 + 1) * 3 / 4 = 1.5
    assert otsu_threshold(torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0]), bins=4) == pytest.approx(1.5)
    # a sample centred on 0 (lo + hi = 0), 4 bins of width 0.5: counts [2, 0, 1, 1], centres -0.75 .. 0.75;
    # cuts 0 and 1 (the empty bin) give 2*2*1.25^2 = 6.25, cut 2 gives 3*1*1.1667^2 = 4.08: middle 0.5 -> -0.25
    assert otsu_threshold(torch.tensor([-1.0, -1.0, 0.0, 1.0]), bins=4) == pytest.approx(-0.25)
    assert otsu_threshold(torch.tensor([0.0, 1.0]), bins=1) == pytest.approx(1.0)  # one bin: the only cut, at hi
    # the default 256 bins on [0, 7]: 3 falls in bin 109 and 7 in bin 255; every cut in the empty gap between them
    # ties, and the middle of cuts 109..254 is 181.5 -> (181.5 + 1) * 7 / 256
    assert otsu_threshold(torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, 7.0])) == pytest.approx(182.5 * 7 / 256)


def test_supported_spread_counts_only_kept_neighbours():
    # source grid 1 x 3 into a 2 x 2 target grid: f = [0, 3, 1] -> (0, 0), (1, 1), (0, 1)
    forward = torch.tensor([0, 3, 1])
    spread, support = supported_spread(forward, torch.tensor([True, False, True]), (1, 3), (2, 2))
    # token 1: kept neighbours 0 and 2 at squared distances 2 and 1 -> mean 1.5; tokens 0, 2: neighbour 1 not kept
    assert spread.tolist() == [0.0, 1.5, 0.0] and support.tolist() == [0.0, 2.0, 0.0]
    spread, support = supported_spread(forward, torch.ones(3, dtype=torch.bool), (1, 3), (2, 2))
    assert spread.tolist() == [2.0, 1.5, 1.0] and support.tolist() == [1.0, 2.0, 1.0]


def test_grow_matches_grows_row_by_row_and_drops_lone_matches():
    # 3 x 3 identity map, the top row kept; token 8 fails the cycle check
    identity = list(range(9))
    stats = stats_of(identity, inverse_error=[0.0] * 8 + [5.0])
    top = torch.tensor([True] * 3 + [False] * 6)
    loose = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=0.5, max_inverse_error=1.0)
    # round 1 adds row 1 (tokens 3 and 5 have 2 kept neighbours, 4 has 3), round 2 row 2 except the ineligible 8
    assert grow_matches(stats, top, loose, (3, 3)).tolist() == [True] * 8 + [False]
    # a spread limit of 1.2 admits no token (each has a diagonal kept neighbour, mean >= 1.5); then tokens 0 and 2,
    # with a single kept neighbour each, are dropped as lone matches; token 1 has two
    tight = SelectionThresholds(max_entropy=1.0, max_spread=1.2, max_collapse=0.5, max_inverse_error=1.0)
    assert grow_matches(stats, top, tight, (3, 3)).tolist() == [False, True] + [False] * 7
    # the collapse check also bars growth
    collapsed = stats_of(identity, collapse=[0.0] * 3 + [0.6] * 6)
    assert grow_matches(collapsed, top, loose, (3, 3)).tolist() == [False, True] + [False] * 7
    # the cycle and collapse limits are inclusive
    boundary = stats_of(identity, inverse_error=[1.0] * 8 + [5.0], collapse=[0.5] * 9)
    assert grow_matches(boundary, top, loose, (3, 3)).tolist() == [True] * 8 + [False]
    # the target grid sets the geometry: the same map into a 3 x 4 target grid grows the same way
    wide = stats_of([0, 1, 2, 4, 5, 6, 8, 9, 10], inverse_error=[0.0] * 8 + [5.0])
    assert grow_matches(wide, top, loose, (3, 3), (3, 4)).tolist() == [True] * 8 + [False]
    # exactly min_support kept neighbours and a spread exactly at the limit are enough: 1 x 3 grid, ends kept,
    # the middle grows (2 neighbours, spread 1); then the ends, with one kept neighbour each, are dropped
    ends = torch.tensor([True, False, True])
    at_limit = SelectionThresholds(max_entropy=1.0, max_spread=1.0, max_collapse=0.5, max_inverse_error=1.0)
    assert grow_matches(stats_of([0, 1, 2]), ends, at_limit, (1, 3)).tolist() == [False, True, False]
    # min_support=1 keeps the top row's ends; the input mask is not modified
    assert grow_matches(stats, top, tight, (3, 3), min_support=1).tolist() == [True] * 3 + [False] * 6
    assert top.tolist() == [True] * 3 + [False] * 6
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="`min_support` must be a positive int"):
            grow_matches(stats, top, tight, (3, 3), min_support=bad)


def test_match_scores_weight_the_attention_by_the_kept_neighbour_share():
    scores = match_scores(torch.tensor([0.5, 0.8, 1.2]), torch.tensor([True, True, False]), (1, 3))
    # token 0: its one neighbour kept -> 0.5; token 1: 1 of 2 -> 0.4; token 2: 1 of 1, attention clamped to 1 -> 1
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.4, 1.0]))
    # the attention is clamped to 1 before the share: 1.6 with half the neighbours kept scores 0.5, not 0.8
    scores = match_scores(torch.tensor([0.5, 1.6, 1.2, 0.3]), torch.tensor([True, True, False, True]), (1, 4))
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.5, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"`max_prob` \(2,\) and `keep` \(3,\) must both have 3 entries"):
        match_scores(torch.ones(2), torch.ones(3, dtype=torch.bool), (1, 3))


def test_kept_map_prefers_the_forward_pass_then_the_largest_backward_target():
    forward, keep_forward = torch.tensor([2, 0, 1, 3]), torch.tensor([True, False, False, False])
    backward, keep_backward = torch.tensor([1, 1, 0, 2]), torch.tensor([True, True, False, True])
    # source 0: kept forward -> 2; source 1: kept targets 0 and 1 point back to it -> the larger, 1; source 2:
    # target 3 -> 3; source 3: nothing -> -1 (target 2 points to 0 but is not kept)
    assert kept_map(forward, keep_forward, backward, keep_backward).tolist() == [2, 1, 3, -1]
    # a single target: the forward pass still decides where it keeps a match
    one = torch.zeros(2, dtype=torch.long)
    assert kept_map(one, torch.tensor([True, False]), one[:1], torch.tensor([False])).tolist() == [0, -1]


def test_confirm_matches_counts_valid_votes_within_tolerance():
    # target grid 2 x 2; f = [3, 0]: (1, 1) and (0, 0); three third images
    forward, keep = torch.tensor([3, 0]), torch.tensor([False, False])
    predictions = torch.tensor([[3, -1], [2, 0], [3, 0]])
    # token 0: votes at distances 0, 1, 0; token 1: a missing path (-1, not token 0), then 0 and 0
    assert confirm_matches(forward, keep, predictions, (2, 2), tolerance=1.0, min_votes=3).tolist() == [True, False]
    assert confirm_matches(forward, keep, predictions, (2, 2), tolerance=0.99, min_votes=3).tolist() == [False, False]
    assert confirm_matches(forward, keep, predictions, (2, 2), tolerance=0.99).tolist() == [True, True]
    kept = torch.tensor([False, True])
    assert confirm_matches(forward, kept, predictions[:0], (2, 2), tolerance=1.0).tolist() == [False, True]
    # a single third image, one vote enough
    assert confirm_matches(forward, keep, predictions[1:2], (2, 2), 0.5, min_votes=1).tolist() == [False, True]
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="`min_votes` must be a positive int"):
            confirm_matches(forward, keep, predictions, (2, 2), tolerance=1.0, min_votes=bad)
    with pytest.raises(ValueError, match="`target_grid_size` must be two positive ints"):
        confirm_matches(forward, keep, predictions, (0, 2), tolerance=1.0)
    with pytest.raises(ValueError, match="predictions"):
        confirm_matches(forward, keep, predictions[:, :1], (2, 2), tolerance=1.0)
    with pytest.raises(ValueError, match="min_votes"):
        confirm_matches(forward, keep, predictions, (2, 2), tolerance=1.0, min_votes=0)


def test_reverse_consistent_drops_only_contradicted_matches():
    forward, keep = torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool)
    backward, keep_backward = torch.tensor([0, 0, 0]), torch.tensor([True, True, False])
    # token 0 comes back (error 0); token 1's target is kept backward and returns 1 cell off; token 2's target is
    # not kept backward: no evidence, kept although it returns 2 cells off
    assert reverse_consistent(forward, keep, backward, keep_backward, (1, 3), 0.5).tolist() == [True, False, True]
    assert reverse_consistent(forward, keep, backward, keep_backward, (1, 3), 1.0).tolist() == [True, True, True]
    not_kept = torch.tensor([False, True, True])
    assert reverse_consistent(forward, not_kept, backward, keep_backward, (1, 3), 1.0).tolist() == [False, True, True]


def shifted_identity() -> torch.Tensor:
    """3 x 3 identity map whose centre token 4 = (1, 1) goes to 5 = (1, 2), one cell off its neighbours' field."""
    forward = torch.arange(9)
    forward[4] = 5
    return forward


def test_affine_residual_finds_the_off_field_match():
    residual, defined = affine_residual(torch.arange(9), torch.ones(9, dtype=torch.bool), (3, 3))
    assert defined.all() and torch.allclose(residual, torch.zeros(9), atol=1e-5)
    residual, defined = affine_residual(shifted_identity(), torch.ones(9, dtype=torch.bool), (3, 3))
    assert defined.all()
    assert residual[4].item() == pytest.approx(1.0, abs=1e-5)  # all 8 neighbours say (1, 1)
    # only the middle row kept: every token's kept neighbours lie on one line, so no fit is determined
    middle = torch.tensor([False] * 3 + [True] * 3 + [False] * 3)
    residual, defined = affine_residual(shifted_identity(), middle, (3, 3))
    assert not defined.any() and residual.tolist() == [0.0] * 9
    # a 3 x 3 source into a 3 x 4 target: the target grid sets the coordinates (token 4 of a 3 x 4 grid is (1, 0))
    residual, _ = affine_residual(
        torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10]), torch.ones(9, dtype=torch.bool), (3, 3), (3, 4)
    )
    assert torch.allclose(residual, torch.zeros(9), atol=1e-5)
    with pytest.raises(ValueError, match=r"`forward` \(9,\) and `keep` \(8,\) must both have 9 entries"):
        affine_residual(torch.arange(9), torch.ones(8, dtype=torch.bool), (3, 3))
    with pytest.raises(ValueError, match="`target_grid_size` must be two positive ints"):
        affine_residual(torch.arange(9), torch.ones(9, dtype=torch.bool), (3, 3), (3, 0))
    with pytest.raises(ValueError, match=r"`forward` holds indices outside \[0, 4\)"):
        affine_residual(torch.arange(9), torch.ones(9, dtype=torch.bool), (3, 3), (2, 2))


def test_field_consistent_drops_a_loose_cycle_the_field_does_not_predict():
    keep = torch.ones(9, dtype=torch.bool)
    thresholds = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=0.5, max_inverse_error=0.5)
    loose_centre = stats_of(shifted_identity(), inverse_error=[0.0] * 4 + [1.2] + [0.0] * 4)
    assert field_consistent(loose_centre, keep, thresholds, (3, 3)).tolist() == [True] * 4 + [False] + [True] * 4
    # a cycle of exactly 1 cell is the note's own limit: not loose, kept whatever the field says
    exact_centre = stats_of(shifted_identity(), inverse_error=[0.0] * 4 + [1.0] + [0.0] * 4)
    assert field_consistent(exact_centre, keep, thresholds, (3, 3)).all()
    # the target grid sets the geometry: the same maps into a 3 x 4 target grid
    wide = stats_of([0, 1, 2, 4, 6, 6, 8, 9, 10], inverse_error=[0.0] * 4 + [1.2] + [0.0] * 4)
    assert field_consistent(wide, keep, thresholds, (3, 3), (3, 4)).tolist() == [True] * 4 + [False] + [True] * 4
    # the tolerance is inclusive: the centre's residual is exactly 1 cell
    at_one = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=0.5, max_inverse_error=1.0)
    assert field_consistent(loose_centre, keep, at_one, (3, 3)).all()
    # a field residual within the tolerance keeps it
    lenient = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=0.5, max_inverse_error=1.5)
    assert field_consistent(loose_centre, keep, lenient, (3, 3)).all()


def test_row_statistics_edges_and_chunk_size():
    q, k = torch.randn(2, 0, 4), torch.randn(2, 5, 4)
    stats = attention_row_statistics(q, k)
    assert stats.argmax.shape == stats.max_prob.shape == stats.entropy.shape == (0,)
    assert stats.argmax.dtype == torch.long
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            attention_row_statistics(torch.randn(3, 4), torch.randn(5, 4), chunk_size=bad)
    assert default_chunk_size(4, 2**22) == 1
    assert default_chunk_size(1, 1) == 2**24 and default_chunk_size(0, 0) == 2**24
    assert default_chunk_size(2, 2**10) == 2**13


def test_explicit_scale_and_logit_overflow_guard():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = math.exp(3.0)
    torch.testing.assert_close(cross_attention_probs(q, k, scale=3.0), torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    # a negative scale flips the preference; the guard uses its magnitude
    torch.testing.assert_close(cross_attention_probs(q, k, scale=-3.0), torch.tensor([[1 / (e + 1), e / (e + 1)]]))
    with pytest.raises(ValueError, match="too large"):
        cross_attention_probs(q * 1e20, k * 1e20)
    with pytest.raises(ValueError, match="too large"):
        cross_attention_probs(q * 1e18, k * 1e18, scale=-1e4)
    cross_attention_probs(q * 1e17, k * 1e18)  # logits about 7e34, below float32's max / 4: accepted
    for bad in (True, float("inf"), "1"):
        with pytest.raises(ValueError, match="scale"):
            cross_attention_probs(q, k, scale=bad)


def test_entropy_of_zero_and_subnormal_rows():
    assert inverse_mapping_entropy(torch.zeros(2, 3)).tolist() == [0.0, 0.0]
    tiny = torch.tensor([[1e-45, 1e-45, 0.0]])  # subnormal float32: renormalised through the row maximum
    assert inverse_mapping_entropy(tiny)[0].item() == pytest.approx(math.log(2))
