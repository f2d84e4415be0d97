"""Pure functions of `utils/segmentation.py` (DESIGN steps 10-11): shape, hand-computed case and edge case each."""

import math

import numpy as np
import pytest
import torch

from cosegment import CoSegmentationFeatures
from cosegment.utils.segmentation import (
    assign_parts,
    attention_rows,
    background_threshold_from_kl,
    grow_by_one_token,
    kl_to_parts,
    kmeans,
    minimum_error_threshold,
    part_distributions,
    parts_and_divergences,
    remove_isolated,
    spectral_clusters,
    upsample_assignment,
)


def _qk(num_tokens: int = 12, heads: int = 2, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, num_tokens, dim, generator=g), torch.randn(heads, num_tokens, dim, generator=g)


def _full_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(0)


class TestAttentionRows:
    def test_shape_and_equals_full_matrix_in_any_chunking(self):
        q, k = _qk()
        full = _full_attention(q, k)
        rows, cols = torch.tensor([5, 0, 7]), torch.tensor([1, 2])
        for chunk in (None, 1, 2):
            out = attention_rows(q, k, rows, cols, chunk_size=chunk)
            assert out.shape == (3, 2)
            torch.testing.assert_close(out, full[rows][:, cols])
        torch.testing.assert_close(attention_rows(q, k).sum(1), torch.ones(12))

    def test_hand_computed_two_tokens(self):
        # one head, d = 1: logits [[1*1, 1*0], [0, 0]] -> row 0 = softmax([1, 0]), row 1 uniform
        q = torch.tensor([[[1.0], [0.0]]])
        k = torch.tensor([[[1.0], [0.0]]])
        e = math.e
        expected = torch.tensor([[e / (e + 1), 1 / (e + 1)], [0.5, 0.5]])
        torch.testing.assert_close(attention_rows(q, k), expected)

    def test_layers_averaged_and_empty_rows(self):
        q1, k1 = _qk(seed=1)
        q2, k2 = _qk(seed=2)
        both = attention_rows([q1, q2], [k1, k2])
        torch.testing.assert_close(both, 0.5 * (_full_attention(q1, k1) + _full_attention(q2, k2)))
        assert attention_rows(q1, k1, rows=torch.zeros(0, dtype=torch.long)).shape == (0, 12)
        with pytest.raises(ValueError, match="chunk_size"):
            attention_rows(q1, k1, chunk_size=0)


class TestPartDistributionsAndKL:
    def test_part_distribution_is_mean_of_its_rows(self):
        q, k = _qk()
        labels = torch.tensor([1, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0])
        dist = part_distributions(q, k, labels, num_parts=3, chunk_size=1)
        full = _full_attention(q, k)
        assert dist.shape == (3, 12)
        torch.testing.assert_close(dist[0], full[[0, 1]].mean(0))
        torch.testing.assert_close(dist[1], full[3])
        torch.testing.assert_close(dist[2], torch.full((12,), 1 / 12))  # no points: uniform
        with pytest.raises(ValueError, match="labels"):
            part_distributions(q, k, labels, num_parts=1)

    def test_kl_matches_hand_formula_and_is_zero_for_own_row(self):
        q, k = _qk()
        full = _full_attention(q, k)
        parts = torch.stack([full[4], torch.full((12,), 1 / 12)])
        kl = kl_to_parts(q, k, parts, chunk_size=5)
        assert kl.shape == (12, 2)
        expected = (full * (full.log() - parts[1].log())).sum(1)
        torch.testing.assert_close(kl[:, 1], expected, atol=1e-5, rtol=1e-5)
        assert float(kl[4, 0]) < 1e-5

    def test_kl_finite_with_zero_probabilities(self):
        q, k = _qk()
        parts = torch.zeros(1, 12)
        parts[0, 0] = 1.0  # zeros everywhere else: the floor keeps the log finite
        kl = kl_to_parts(q, k, parts)
        assert torch.isfinite(kl).all() and (kl >= 0).all()
        assert float(kl.min()) > 1.0  # far from a one-hot part

    def test_assign_parts_hand_case_and_no_part(self):
        kl = torch.tensor([[0.1, 2.0], [3.0, 0.5], [4.0, 5.0], [math.inf, math.inf]])
        labels, min_kl = assign_parts(kl, threshold=1.0)
        assert labels.tolist() == [1, 2, 0, 0]
        torch.testing.assert_close(min_kl[:3], torch.tensor([0.1, 0.5, 4.0]))
        assert assign_parts(kl, math.inf)[0].tolist() == [1, 2, 1, 0]  # inf never assigned
        empty, _ = assign_parts(torch.zeros(3, 0), 1.0)
        assert empty.tolist() == [0, 0, 0]
        with pytest.raises(ValueError, match="threshold"):
            assign_parts(kl, float("nan"))


class TestThresholds:
    def test_minimum_error_splits_unbalanced_classes_between_them(self):
        g = torch.Generator().manual_seed(0)
        small = 1.0 + 0.1 * torch.randn(50, generator=g)
        large = 4.0 + 0.8 * torch.randn(2000, generator=g)
        cut = minimum_error_threshold(torch.cat([small, large]))
        # the Bayes boundary of these two classes lies near 1.2 (the small class is rare and narrow)
        assert 1.1 < cut < 1.6
        assert float((small > cut).float().mean()) < 0.1 and float((large <= cut).float().mean()) < 0.01

    def test_minimum_error_edge_cases(self):
        assert minimum_error_threshold(torch.zeros(0)) == math.inf
        assert minimum_error_threshold(torch.full((5,), 2.0)) == math.inf
        assert minimum_error_threshold(torch.tensor([1.0, math.nan, math.inf, 3.0])) <= 3.0

    def test_background_threshold_in_nats_ignores_inf(self):
        g = torch.Generator().manual_seed(1)
        near = (0.5 + 0.1 * torch.randn(40, generator=g)).clamp_min(0)
        far = 10.0 + 1.0 * torch.randn(400, generator=g)
        cut = background_threshold_from_kl(torch.cat([near, far, torch.full((5,), math.inf)]))
        assert float(near.max()) < cut < float(far.min())
        assert background_threshold_from_kl(torch.full((4,), math.inf)) == math.inf


class TestClustering:
    def test_remove_isolated_hand_case(self):
        mask = np.zeros((6, 6), bool)
        mask[0, 0] = True  # isolated
        mask[2:4, 2:4] = True  # 4 tokens
        mask[5, 5] = mask[4, 4] = True  # 2 tokens joined diagonally (8-connectivity) ... and to the block
        out = remove_isolated(mask, min_size=3)
        assert out.shape == (6, 6) and not out[0, 0]
        assert out[2:4, 2:4].all() and out[4, 4] and out[5, 5]
        assert remove_isolated(mask, 1).sum() == mask.sum()
        assert not remove_isolated(np.zeros((3, 3), bool), 2).any()
        with pytest.raises(ValueError, match="min_size"):
            remove_isolated(mask, 0)

    def test_kmeans_deterministic_two_blobs(self):
        rng = np.random.default_rng(0)
        pts = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (30, 2))])
        labels = kmeans(pts, 2)
        assert labels.shape == (50,)
        assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]
        np.testing.assert_array_equal(labels, kmeans(pts, 2))
        assert (kmeans(pts, 1) == 0).all()
        with pytest.raises(ValueError, match="num_clusters"):
            kmeans(pts, 51)

    def test_spectral_clusters_finds_block_count(self):
        blocks = [5, 7, 6]
        a = np.full((18, 18), 0.01)
        start = 0
        for size in blocks:
            a[start : start + size, start : start + size] = 1.0
            start += size
        labels = spectral_clusters(a, None, max_clusters=6)
        assert labels.shape == (18,) and labels.max() + 1 == 3
        assert [len(set(labels[s : s + n])) for s, n in ((0, 5), (5, 7), (12, 6))] == [1, 1, 1]
        assert spectral_clusters(a, 2, max_clusters=6).max() + 1 == 2
        assert spectral_clusters(np.zeros((0, 0)), None, 3).shape == (0,)


class TestUpsampleAssignment:
    def test_same_size_equals_token_assignment(self):
        kl = torch.tensor([[0.1, 3.0], [3.0, 0.2], [5.0, 6.0], [0.3, 0.1]])
        out = upsample_assignment(kl, (2, 2), threshold=1.0, size=(2, 2))
        assert out.tolist() == [[1, 2], [0, 2]]

    def test_larger_size_shape_and_outline_midway(self):
        # left column foreground (part 1), right column background
        kl = torch.tensor([[0.1], [9.0], [0.1], [9.0]])
        out = upsample_assignment(kl, (2, 2), threshold=1.0, size=(20, 40))
        assert out.shape == (20, 40) and out.dtype == np.int64
        assert (out[:, :20] == 1).all() and (out[:, 20:] == 0).all()

    def test_part_boundary_midway_whatever_the_kl(self):
        # 4 x 8 tokens: columns 0-3 part 1, 4-7 part 2, all foreground; the KL to the other part differs (20 vs 2),
        # so bilinearly resized KL maps would cross at 0.91 of the way (pixel column 35), not midway (32)
        part1 = [0.1, 20.0]
        part2 = [2.0, 0.1]
        kl = torch.tensor([part1 if c < 4 else part2 for r in range(4) for c in range(8)])
        out = upsample_assignment(kl, (4, 8), threshold=30.0, size=(32, 64))
        assert (out[:, :32] == 1).all() and (out[:, 32:] == 2).all()

    def test_lone_token_and_one_token_line_survive_the_smoothing(self):
        # 9 x 9 tokens at 8 pixels each: background (KL 9 to both parts), one token of part 1 at (2, 4) and the
        # whole row 6 of part 2; a Gaussian wider than about 0.55 cells (UPSAMPLE_SIGMA) would erase the token,
        # one wider than 0.8 the line
        kl = torch.full((9, 9, 2), 9.0)
        kl[2, 4] = torch.tensor([0.1, 9.0])
        kl[6, :] = torch.tensor([9.0, 0.1])
        out = upsample_assignment(kl.reshape(81, 2), (9, 9), threshold=1.0, size=(72, 72))
        lone = np.argwhere(out == 1)
        assert 0 < len(lone) < 64  # kept, but smoothed to less than its cell
        assert lone.min(0).tolist() >= [16, 32] and lone.max(0).tolist() <= [23, 39]  # inside its own cell
        assert (out[51:53, :] == 2).all()  # the line's centre pixels, edge to edge
        assert not (out[:40] == 2).any() and not (out[64:] == 2).any()

    def test_absent_parts_and_no_part(self):
        kl = torch.tensor([[math.inf, 0.1], [math.inf, 0.2]])
        assert set(np.unique(upsample_assignment(kl, (1, 2), 1.0, (3, 3)))) == {2}
        assert not upsample_assignment(torch.zeros(4, 0), (2, 2), 1.0, (5, 5)).any()
        with pytest.raises(ValueError, match="grid_size"):
            upsample_assignment(kl, (2, 2), 1.0, (3, 3))


class TestOutlineBound:
    def test_grow_by_one_token_is_the_eight_neighbourhood(self):
        mask = torch.zeros(5, 6, dtype=torch.bool)
        mask[2, 0] = True
        mask[4, 5] = True
        grown = grow_by_one_token(mask.flatten(), (5, 6)).view(5, 6)
        expected = torch.zeros(5, 6, dtype=torch.bool)
        expected[1:4, 0:2] = True
        expected[3:5, 4:6] = True
        assert torch.equal(grown, expected)
        with pytest.raises(ValueError, match="grid_size"):
            grow_by_one_token(mask.flatten(), (5, 5))

    def test_foreground_argument_overrides_the_threshold(self):
        # every token within the threshold; the given foreground (left column) decides, the KL still picks the part
        kl = torch.tensor([[0.1, 3.0], [0.1, 3.0], [3.0, 0.2], [3.0, 0.2]])
        foreground = torch.tensor([True, False, True, False])
        out = upsample_assignment(kl, (2, 2), threshold=1.0, size=(2, 2), foreground=foreground)
        assert out.tolist() == [[1, 0], [2, 0]]
        assert upsample_assignment(kl, (2, 2), threshold=1.0, size=(2, 2)).tolist() == [[1, 1], [2, 2]]

    def test_refinement_moves_the_outline_by_one_token_only(self, monkeypatch):
        # 1 x 8 tokens, one part. Round 0 (from the clustered points 0-1): tokens 0-2 within the threshold. Round 1
        # (from the assigned tokens, 2 among them): the part's distribution now covers 2's region, so tokens 0-6 are
        # within it; the bound keeps 0-3 (the round-0 foreground and its neighbour 3), not the whole region
        import cosegment.parts as parts

        rounds = []

        def fake_divergences(features, labels, num_parts, chunk_size, device, rows=None):
            near = 3 if not rounds else 7
            rounds.append([lab.clone() for lab in labels])
            kl = torch.full((8, 1), 9.0)
            kl[:near] = 0.1
            return [kl, torch.full((8, 1), 9.0)]  # the second image: background everywhere

        monkeypatch.setattr(parts, "part_divergences", fake_divergences)
        tokens = [torch.zeros(2, 1, 8, 2)]
        features = CoSegmentationFeatures(tokens, [t.clone() for t in tokens], (1, 8), [(1, 8), (1, 8)])
        points = [torch.tensor([1, 1, 0, 0, 0, 0, 0, 0]), torch.zeros(8, dtype=torch.long)]
        masks = parts.segment_parts(features, points, 1, 1.0, None, torch.device("cpu"))
        assert len(rounds) == 2
        assert rounds[1][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # round 1 starts from round 0's assignment
        assert masks[0].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
        assert not masks[1].any()


class TestMutationSurvivors:
    """Written for the survivors of the mutation run on this module (TESTING.md): each asserts a value or message the
    code must give, on a case where a one-token change of the code gives another."""

    def test_two_dim_inputs_are_one_head(self):
        q, k = _qk(heads=1)
        torch.testing.assert_close(attention_rows(q[0], k[0]), _full_attention(q, k))

    def test_messages_name_the_bad_argument(self):
        q, k = _qk()
        with pytest.raises(TypeError, match=r"`keys\[1\]` must be a torch.Tensor, got list"):
            attention_rows([q, q], [k, [[0.0]]])
        with pytest.raises(
            ValueError, match=r"`queries\[0\]` must have shape \(N, d\) or \(H, N, d\), got \(1, 1, 12, 4\)"
        ):
            attention_rows(q[None, :1], k)
        with pytest.raises(ValueError, match=r"`parts` must have shape \(K, 12\), got \(2, 5\)"):
            kl_to_parts(q, k, torch.ones(2, 5))
        with pytest.raises(ValueError, match="`labels` has 5 entries for 12 tokens"):
            part_distributions(q, k, torch.zeros(5, dtype=torch.long), 1)

    def test_head_count_mismatch_raises(self):
        # same head size, one head against two: matmul would broadcast it silently
        q, k = _qk(heads=2)
        with pytest.raises(ValueError, match="do not match"):
            attention_rows(q[:1], k)
        with pytest.raises(ValueError, match="do not match"):
            attention_rows(q, k[..., :3])
        # layers whose keys hold different token counts (was a RuntimeError from adding their rows)
        with pytest.raises(ValueError, match=r"`queries\[1\]` \(2, 12, 4\) and `keys\[1\]` \(2, 11, 4\) do not match"):
            attention_rows([q, q], [k, k[:, :11]])

    def test_no_tokens_gives_no_rows(self):
        q, k = torch.zeros(2, 0, 4), torch.zeros(2, 0, 4)
        assert kl_to_parts(q, k, torch.zeros(3, 0)).shape == (0, 3)

    def test_assign_parts_without_parts_gives_inf_per_token(self):
        labels, min_kl = assign_parts(torch.zeros(3, 0), 1.0)
        assert labels.dtype == torch.long and min_kl.shape == (3,) and torch.isinf(min_kl).all()

    def test_minimum_error_floor_decides_between_spikes(self):
        # [-3, -1.5] in 3 bins of width 0.5 (centres -2.75, -2.25, -1.75), histogram (0.6, 0.2, 0.2), floor
        # 0.5^2 / 12 = 1/48 (a one-bin class has no spread of its own). Cut after bin 0: 0.6 ln(1/48) + 0.4 ln(1/16) - 2 (0.6 ln 0.6 + 0.4 ln 0.4) = -2.086;
        # after bin 1 (first class variance 3/64): 0.8 ln(3/64) + 0.2 ln(1/48) - 2 (0.8 ln 0.8 + 0.2 ln 0.2) = -2.222,
        # the smaller, so the cut is lo + 2 * 0.5 = -2.0. (A floor of 0.5^3 / 12 would make it -2.5.)
        values = torch.tensor([-3.0, -3.0, -3.0, -2.25, -1.5])
        assert minimum_error_threshold(values, bins=3, margin=0.0) == pytest.approx(-2.0)
        # with 5 values the two cuts differ by 5 / 2 * 0.136 = 0.34 nats of log-likelihood, under the margin: the
        # sample does not tell them apart, and the cut is their middle
        assert minimum_error_threshold(values, bins=3) == pytest.approx(-2.25)

    def test_minimum_error_takes_the_middle_of_the_cuts_alike(self):
        # two classes, and two stray values at 3.0 and 4.5 in the sparse stretch between them: the best bin lies
        # in the first part of the stretch (below 3.0), but the cuts up to 4.5 fit within the margin, so the cut is
        # the middle of the stretch from the low class's top to 4.5
        g = torch.Generator().manual_seed(3)
        low = 1.0 + 0.3 * torch.randn(400, generator=g).clamp(-3, 3)
        high = 7.0 + 0.6 * torch.randn(400, generator=g).clamp(-3, 3)
        values = torch.cat([low, high, torch.tensor([3.0, 4.5])])
        bin_width = float(values.max() - values.min()) / 256
        exact = minimum_error_threshold(values, margin=0.0)
        assert float(low.max()) < exact < 3.0
        cut = minimum_error_threshold(values)
        assert abs(cut - 0.5 * (float(low.max()) + 4.5)) < 2 * bin_width
        # an empty stretch: every cut in it is tied, and either rule takes its middle
        plain = torch.cat([low, high])
        middle = 0.5 * (float(low.max()) + float(high.min()))
        assert abs(minimum_error_threshold(plain, margin=0.0) - middle) < 2 * bin_width

    def test_maximin_seeds_and_exact_kmeans_labels(self):
        from cosegment.utils.segmentation import _maximin_init

        pts = np.array([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 0.1], [0.0, 10.0]])
        # from point 0 the farthest is point 3 (100.01), then point 4 (100 from point 0, 198.01 from point 3)
        assert _maximin_init(pts, 3, 0).tolist() == [0, 0, 1, 1, 2]
        # from point 4: point 2 (200), then point 0 (100 from 4, 100 from 2; point 1 is 98.01 from 4)
        assert _maximin_init(pts, 3, 4).tolist() == [2, 2, 1, 1, 0]
        assert kmeans(pts, 3).tolist() == [0, 0, 1, 1, 2]
        assert kmeans(pts, 3, first=4).tolist() == [2, 2, 1, 1, 0]
        one = kmeans(pts, 1)
        assert one.shape == (5,) and one.dtype == np.int64 and not one.any()

    def test_spectral_seed_is_largest_degree_and_top_two(self):
        a = np.full((18, 18), 0.01)
        for start, size in ((0, 5), (5, 7), (12, 6)):
            a[start : start + size, start : start + size] = 1.0
        labels = spectral_clusters(a, 3, max_clusters=6)
        assert (labels[5:12] == 0).all()  # the 7-block holds the largest degree: the first seed, label 0
        # estimating among 2..2 clusters: top = 2 leaves one gap to compare, and gives 2
        two = spectral_clusters(a[:12, :12], None, max_clusters=2)
        assert two.max() == 1 and len(set(two[:5])) == 1 and len(set(two[5:])) == 1 and two[0] != two[5]

    def test_spectral_rows_scaled_to_unit_length(self):
        # point 8 hangs on the pair {0, 1} by weight 0.1: its embedding row is short (low degree) but points at the
        # pair; only rows scaled to unit length put it with the pair rather than nearer the big block's centre
        a = np.zeros((9, 9))
        a[:2, :2] = 1.0
        a[2:8, 2:8] = 1.0
        a[8, :2] = a[:2, 8] = 0.1
        labels = spectral_clusters(a, 2, max_clusters=4)
        assert labels[8] == labels[0] == labels[1] != labels[2]
        assert len(set(labels[2:8])) == 1

    def test_upsample_bad_input_messages(self):
        with pytest.raises(ValueError, match=r"`kl` must be a \(N, K\) tensor, got <class 'list'>"):
            upsample_assignment([[0.1]], (1, 1), 1.0, (2, 2))
        with pytest.raises(ValueError, match=r"`kl` must be a \(N, K\) tensor, got torch.Size\(\[4\]\)"):
            upsample_assignment(torch.zeros(4), (2, 2), 1.0, (2, 2))
        for size in ((0, 5), (5, 0), (5,)):
            with pytest.raises(ValueError, match="`size` must be two positive ints"):
                upsample_assignment(torch.zeros(4, 1), (2, 2), 1.0, size)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
def test_parts_and_divergences_from_kept_rows_are_the_two_functions(chunk_size):
    """Step 11 keeps each image's attention rows for its rounds: the distributions and KL from those rows are bit
    for bit the ones `part_distributions` and `kl_to_parts` compute from the queries and keys."""
    q, k = _qk(num_tokens=40, seed=3)
    labels = torch.zeros(40, dtype=torch.long)
    labels[[0, 1, 2, 7, 8]] = 1
    labels[[20, 21, 22, 23]] = 3  # part 2 has no point: uniform
    rows = attention_rows(q, k, chunk_size=chunk_size)
    expected = part_distributions(q, k, labels, 3, chunk_size)
    expected_kl = kl_to_parts(q, k, expected, chunk_size)
    for kept in (None, rows):
        distributions, kl = parts_and_divergences(q, k, labels, 3, chunk_size, rows=kept)
        assert torch.equal(distributions, expected) and torch.equal(kl, expected_kl)
    torch.testing.assert_close(distributions[1], torch.full((40,), 1 / 40))
    with pytest.raises(ValueError, match="rows"):
        parts_and_divergences(q, k, labels, 3, rows=rows[:10])
    with pytest.raises(ValueError, match="labels"):
        parts_and_divergences(q, k, labels, 2, rows=rows)
