"""Pure maths of utils/correspondence.py: shape, hand-computed and edge cases (kornia style)."""

import math

import pytest
import torch

from cosegment.utils.correspondence import (
    SelectionThresholds,
    argmax_matches,
    attention_row_statistics,
    cross_attention_probs,
    inverse_mapping_entropy,
    inverse_mapping_error,
    mapping_density,
    merge_passes,
    neighbourhood_spread,
    otsu_threshold,
    paper_thresholds,
    token_centres_in_pixels,
    token_coordinates,
)


class TestCrossAttentionProbs:
    def test_shape_and_rows_sum_to_one(self):
        q, k = torch.randn(3, 10, 8), torch.randn(3, 7, 8)
        attn = cross_attention_probs(q, k)
        assert attn.shape == (10, 7) and attn.dtype == torch.float32
        torch.testing.assert_close(attn.sum(-1), torch.ones(10))

    def test_hand_computed_single_head(self):
        # one query [1, 0], keys [1, 0] and [0, 1], d = 2: logits 1/sqrt(2) and 0
        q = torch.tensor([[1.0, 0.0]])
        k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        a = math.exp(2**-0.5)
        expected = torch.tensor([[a / (a + 1), 1 / (a + 1)]])
        torch.testing.assert_close(cross_attention_probs(q, k), expected)

    def test_mean_over_heads_and_layers(self):
        q, k = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
        per_head = [torch.softmax(q[h] @ k[h].T * 0.5, dim=-1) for h in range(2)]
        torch.testing.assert_close(cross_attention_probs(q, k), sum(per_head) / 2)
        q2, k2 = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
        both = cross_attention_probs([q, q2], [k, k2])
        torch.testing.assert_close(both, (cross_attention_probs(q, k) + cross_attention_probs(q2, k2)) / 2)

    def test_chunks_equal_whole_and_half_precision_is_float32_inside(self):
        q, k = torch.randn(2, 33, 8), torch.randn(2, 20, 8)
        whole = cross_attention_probs(q, k)
        torch.testing.assert_close(cross_attention_probs(q, k, chunk_size=7), whole)
        half = cross_attention_probs(q.bfloat16(), k.bfloat16())
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, whole, atol=2e-2, rtol=0)

    def test_rejects_mismatched_heads(self):
        with pytest.raises(ValueError, match="heads"):
            cross_attention_probs(torch.randn(2, 5, 4), torch.randn(3, 5, 4))
        with pytest.raises(ValueError, match="chunk_size"):
            cross_attention_probs(torch.randn(5, 4), torch.randn(5, 4), chunk_size=0)


class TestRowStatistics:
    def test_equal_full_matrix(self):
        q, k = torch.randn(4, 50, 16) * 3, torch.randn(4, 40, 16) * 3
        attn = cross_attention_probs(q, k)
        stats = attention_row_statistics(q, k, chunk_size=9)
        assert torch.equal(stats.argmax, attn.argmax(-1))
        torch.testing.assert_close(stats.max_prob, attn.max(-1).values)
        torch.testing.assert_close(stats.entropy, inverse_mapping_entropy(attn))


class TestArgmaxMatches:
    def test_hand_computed(self):
        attn = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
        assert argmax_matches(attn).tolist() == [1, 0]

    def test_edge_no_targets(self):
        with pytest.raises(ValueError):
            argmax_matches(torch.zeros(3, 0))


class TestInverseMappingError:
    def test_identity_is_zero(self):
        identity = torch.arange(12)
        assert torch.equal(inverse_mapping_error(identity, identity, (3, 4)), torch.zeros(12))

    def test_hand_computed_non_square(self):
        # grid 2 x 3; f sends every token to target 0, g sends target 0 back to source 5 = (1, 2)
        forward = torch.zeros(6, dtype=torch.long)
        backward = torch.tensor([5, 0, 0, 0, 0, 0])
        err = inverse_mapping_error(forward, backward, (2, 3))
        # token 0 = (0, 0) -> distance to (1, 2) = sqrt(5); token 5 itself -> 0
        assert err[0].item() == pytest.approx(math.sqrt(5))
        assert err[5].item() == 0
        assert err[3].item() == pytest.approx(2.0)  # (1, 0) -> (1, 2)

    def test_rejects_out_of_range(self):
        with pytest.raises(ValueError, match="backward"):
            inverse_mapping_error(torch.zeros(4, dtype=torch.long), torch.tensor([9, 0]), (2, 2))
        with pytest.raises(ValueError, match="grid_size"):
            inverse_mapping_error(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), (3, 2))


class TestMappingDensity:
    def test_hand_computed(self):
        density = mapping_density(torch.tensor([0, 2, 2, 2]), 4)
        assert density.tolist() == [1, 0, 3, 0]
        assert density.sum() == 4

    def test_edge_empty(self):
        assert mapping_density(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


class TestInverseMappingEntropy:
    def test_uniform_is_log_n_and_one_hot_is_zero(self):
        attn = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
        torch.testing.assert_close(inverse_mapping_entropy(attn), torch.tensor([math.log(4), 0.0]))

    def test_hand_computed_and_renormalised(self):
        # unnormalised row [1, 3] -> probabilities [1/4, 3/4]
        expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
        assert inverse_mapping_entropy(torch.tensor([[1.0, 3.0]]))[0].item() == pytest.approx(expected)

    def test_rejects_negative(self):
        with pytest.raises(ValueError, match="non-negative"):
            inverse_mapping_entropy(torch.tensor([[-0.5, 1.5]]))


class TestNeighbourhoodSpread:
    def test_identity_on_non_square_grid(self):
        spread, collapse = neighbourhood_spread(torch.arange(6), (2, 3))
        # corner (0, 0): neighbours (0, 1), (1, 0), (1, 1) at squared distances 1, 1, 2 -> mean 4/3
        assert spread[0].item() == pytest.approx(4 / 3)
        # edge (0, 1): 5 neighbours (0,0) (0,2) (1,0) (1,1) (1,2): 1 + 1 + 2 + 1 + 2 = 7 -> 7/5
        assert spread[1].item() == pytest.approx(7 / 5)
        assert torch.equal(collapse, torch.zeros(6))

    def test_constant_mapping_collapses(self):
        spread, collapse = neighbourhood_spread(torch.full((12,), 4), (3, 4))
        assert torch.equal(spread, torch.zeros(12)) and torch.equal(collapse, torch.ones(12))

    def test_hand_computed_partial_collapse_and_target_grid(self):
        # source grid 1 x 3 into a 2 x 2 target grid: f = [0, 0, 3]
        spread, collapse = neighbourhood_spread(torch.tensor([0, 0, 3]), (1, 3), (2, 2))
        # token 1 = centre: neighbours map to 0 (same) and 3 = (1, 1), squared distance 2 -> spread 1, collapse 1/2
        assert spread[1].item() == pytest.approx(1.0) and collapse[1].item() == pytest.approx(0.5)
        assert spread[2].item() == pytest.approx(2.0) and collapse[2].item() == 0

    def test_single_token_grid(self):
        spread, collapse = neighbourhood_spread(torch.tensor([0]), (1, 1))
        assert spread.tolist() == [0.0] and collapse.tolist() == [0.0]


class TestSelectionHelpers:
    def test_paper_thresholds_scale_with_log_n(self):
        assert paper_thresholds(1024).max_entropy == pytest.approx(2.0)
        assert paper_thresholds(4096).max_entropy == pytest.approx(2.0 * math.log(4096) / math.log(1024))
        assert paper_thresholds(256).max_spread == 20 and paper_thresholds(256).max_inverse_error == 1

    @pytest.mark.parametrize("bad", [-1.0, float("nan"), "2"])
    def test_thresholds_reject_bad_values(self, bad):
        with pytest.raises(ValueError, match="max_spread"):
            SelectionThresholds(max_entropy=1.0, max_spread=bad, max_collapse=0.5, max_inverse_error=1.0)

    def test_otsu_splits_two_modes(self):
        values = torch.cat([torch.zeros(50), torch.ones(50) * 10])
        assert 0 < otsu_threshold(values) < 10
        assert otsu_threshold(torch.ones(5)) == math.inf
        assert otsu_threshold(torch.zeros(0)) == math.inf

    def test_merge_passes_marks_mutual_once(self):
        # pass s->t keeps 0->1 and 1->2; pass t->s keeps 1->0 (same match as 0->1) and 0->2
        forward = torch.tensor([1, 2, 0])
        backward = torch.tensor([2, 0, 1])
        src, tgt, score, mutual = merge_passes(
            forward,
            torch.tensor([True, True, False]),
            torch.tensor([0.9, 0.5, 0.1]),
            backward,
            torch.tensor([True, True, False]),
            torch.tensor([0.3, 0.95, 0.1]),
        )
        pairs = list(zip(src.tolist(), tgt.tolist()))
        assert pairs == [(0, 1), (1, 2), (2, 0)]
        assert mutual.tolist() == [True, False, False]
        torch.testing.assert_close(score, torch.tensor([0.95, 0.5, 0.3]))

    def test_merge_passes_empty(self):
        none = torch.zeros(4, dtype=torch.bool)
        src, tgt, score, mutual = merge_passes(
            torch.arange(4), none, torch.ones(4), torch.arange(4), none, torch.ones(4)
        )
        assert src.shape == tgt.shape == score.shape == mutual.shape == (0,)


def test_token_coordinates_and_pixels():
    coords = token_coordinates((2, 3))
    assert coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # token 5 = (row 1, col 2) of a 2 x 3 grid in a 100 (H) x 300 (W) image: centre x = 250, y = 75
    points = token_centres_in_pixels(torch.tensor([0, 5]), (2, 3), (100, 300))
    assert points.tolist() == [[50.0, 25.0], [250.0, 75.0]]


class TestEdgesAndMessages:
    """Edge cases and error messages found by the mutation run (benchmarks/mutation.py, TESTING.md)."""

    def test_no_source_rows_gives_an_empty_matrix(self):
        attn = cross_attention_probs(torch.randn(2, 0, 4), torch.randn(2, 5, 4), chunk_size=4)
        assert attn.shape == (0, 5) and attn.dtype == torch.float32

    def test_errors_name_the_argument_and_the_value(self):
        with pytest.raises(TypeError, match=r"`queries\[0\]` must be a torch.Tensor, got list"):
            cross_attention_probs([[1.0]], torch.randn(3, 4))
        with pytest.raises(
            ValueError, match=r"`attn` must be a 2-D tensor \(N_s, N_t\), got torch.Size\(\[2, 2, 2\]\)"
        ):
            argmax_matches(torch.zeros(2, 2, 2))
        with pytest.raises(
            ValueError, match=r"`attn` must be a 2-D tensor \(N_t, N_s\), got torch.Size\(\[2, 2, 2\]\)"
        ):
            inverse_mapping_entropy(torch.zeros(2, 2, 2))
        with pytest.raises(ValueError, match="`attn` contains NaN or inf"):
            inverse_mapping_entropy(torch.tensor([[math.nan, 1.0]]))
        with pytest.raises(ValueError, match="`num_tokens` must be at least 2, got 1"):
            paper_thresholds(1)

    def test_paper_thresholds_accept_the_smallest_grid(self):
        assert paper_thresholds(2).max_entropy == pytest.approx(2.0 * math.log(2) / math.log(1024))

    def test_more_errors_name_the_argument_and_the_value(self):
        with pytest.raises(ValueError, match=r"must have shape \(N, d\) or \(H, N, d\), got \(1, 2, 3, 4\)"):
            cross_attention_probs(torch.zeros(1, 2, 3, 4), torch.zeros(3, 4))
        with pytest.raises(ValueError, match="`queries` and `keys` must have the same length, got 2 and 1"):
            cross_attention_probs([torch.zeros(3, 4)] * 2, [torch.zeros(3, 4)])
        with pytest.raises(ValueError, match=r"All `queries` \(and all `keys`\) must have the same number of tokens"):
            cross_attention_probs([torch.zeros(3, 4), torch.zeros(2, 4)], [torch.zeros(3, 4)] * 2)
        with pytest.raises(ValueError, match="`grid_size` must be two positive ints"):
            token_coordinates((0, 2))
        with pytest.raises(ValueError, match=r"`forward` must be a 1-D tensor of token indices, got \[0, 1\]"):
            mapping_density([0, 1], 2)
        with pytest.raises(ValueError, match=r"`forward` holds indices outside \[0, 0\)"):
            inverse_mapping_error(torch.zeros(4, dtype=torch.long), [0, 0, 0, 0], (2, 2))
        with pytest.raises(ValueError, match="`target_grid_size` must be two positive ints"):
            neighbourhood_spread(torch.zeros(4, dtype=torch.long), (2, 2), (0, 2))
        with pytest.raises(ValueError, match=r"`forward` holds indices outside \[0, 4\)"):
            neighbourhood_spread(torch.full((4,), 4), (2, 2))

    def test_overflow_guard_uses_the_largest_row_norms_in_float64(self):
        # rows of norm 1e19 on both sides, d = 2: logits up to 1e38 / sqrt(2) = 7.1e37, below float32's max / 4 =
        # 8.5e37, so accepted (the norm of the whole tensor, 1.41e19, would refuse it)
        big = torch.tensor([[1e19, 0.0], [1e19, 0.0]])
        attn = cross_attention_probs(big, big)
        assert torch.isfinite(attn).all()
        # a row of norm 2e19 has a float32 norm of inf; in float64 it is 2e19, and 2e19 * 1e18 / sqrt(2) is fine
        assert torch.isfinite(cross_attention_probs(torch.tensor([[2e19, 0.0]]), torch.tensor([[1e18, 0.0]]))).all()

    def test_row_statistics_accept_one_row_chunks(self):
        q, k = torch.randn(2, 5, 4), torch.randn(2, 6, 4)
        stats = attention_row_statistics(q, k, chunk_size=1)
        assert torch.equal(stats.argmax, cross_attention_probs(q, k).argmax(-1))
