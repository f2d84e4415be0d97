"""The method of DESIGN steps 6-11 on planted features with a known answer (benchmarks/planted.py), its edge cases,
and the new pure functions of `utils/correspondence.py` (auto thresholds, growth, scores)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from cosegment import CoSegmentationFeatures, analyze_features
from cosegment.benchmarks.planted import make_planted_features, match_correct, score_output
from cosegment.utils.correspondence import (
    PassStatistics,
    SelectionThresholds,
    affine_residual,
    auto_thresholds,
    confirm_matches,
    field_consistent,
    grow_matches,
    kept_map,
    match_scores,
    reverse_consistent,
    supported_spread,
)

INF = float("inf")
NO_FILTER = {"max_entropy": INF, "max_spread": INF, "max_collapse": INF, "max_inverse_error": INF}


@pytest.fixture(scope="module")
def planted2():
    return make_planted_features(2, noise=0.3, seed=2001)


@pytest.fixture(scope="module")
def planted3():
    return make_planted_features(3, noise=0.3, seed=3001)


@pytest.fixture(scope="module")
def auto2(planted2):
    return analyze_features(planted2.features, selection="auto")


@pytest.fixture(scope="module")
def paper2(planted2):
    return analyze_features(planted2.features, selection="paper")


@pytest.fixture(scope="module")
def auto3(planted3):
    return analyze_features(planted3.features, selection="auto")


# ---------------------------------------------------------------------------------------------------------------
# Quality on planted features (fixed seeds, bounds well inside what the benchmark measures)
# ---------------------------------------------------------------------------------------------------------------


class TestPlantedQuality:
    def test_two_images_auto_meets_bounds(self, planted2, auto2):
        score = score_output(planted2, auto2)
        assert score["precision"] >= 0.95
        assert score["coverage"] >= 0.7
        assert score["jaccard"] >= 0.8
        assert score["nmi"] >= 0.65

    def test_three_images_auto_meets_bounds(self, planted3, auto3):
        score = score_output(planted3, auto3)
        assert score["precision"] >= 0.95
        assert score["coverage"] >= 0.7
        assert score["jaccard"] >= 0.8
        assert score["nmi"] >= 0.65

    def test_auto_covers_more_than_paper_at_similar_precision(self, planted2, auto2, paper2):
        auto, paper = score_output(planted2, auto2), score_output(planted2, paper2)
        assert auto["coverage"] > paper["coverage"] + 0.15
        assert auto["precision"] >= paper["precision"] - 0.03
        assert auto["jaccard"] > paper["jaccard"]

    def test_scores_rank_correct_matches_first(self, planted2, planted3, auto2, auto3):
        correct, scores = [], []
        for case, out in ((planted2, auto2), (planted3, auto3)):
            for pair in out.correspondences:
                correct.append(
                    match_correct(case, pair.source_index, pair.target_index, pair.source_tokens, pair.target_tokens)
                )
                scores.append(pair.scores)
        correct, scores = np.concatenate(correct), np.concatenate(scores)
        assert ((scores >= 0) & (scores <= 1)).all()
        order = np.argsort(-scores, kind="stable")
        half = len(order) // 2
        assert correct[order[:half]].mean() >= correct[order[half:]].mean()
        assert correct[order[:half]].mean() >= 0.98

    def test_parts_shared_across_images_and_keypoints_on_the_object(self, planted3, auto3):
        assert len(auto3.keypoints) == len(auto3.keypoint_parts) == 3
        ids = [set(parts.tolist()) for parts in auto3.keypoint_parts]
        assert ids[0] == ids[1] == ids[2] and len(ids[0]) == planted3.num_parts
        for i, (points, parts) in enumerate(zip(auto3.keypoints, auto3.keypoint_parts)):
            height, width = planted3.features.image_sizes[i]
            assert points.shape == (len(parts), 2) and parts.dtype.kind == "i"
            truth = planted3.pixel_parts(i)
            inside = truth[points[:, 1].astype(int).clip(0, height - 1), points[:, 0].astype(int).clip(0, width - 1)]
            assert (inside > 0).all()
            # a part's centre lies on one planted part, a different one for each predicted part
            assert len(set(inside.tolist())) == len(parts)
        # the same predicted part sits on the same planted part in every image
        truths = [
            dict(zip(parts.tolist(), planted3.pixel_parts(i)[pts[:, 1].astype(int), pts[:, 0].astype(int)].tolist()))
            for i, (pts, parts) in enumerate(zip(auto3.keypoints, auto3.keypoint_parts))
        ]
        assert truths[0] == truths[1] == truths[2]

    def test_masks_at_each_images_own_size(self, planted3, auto3):
        for i, (mask, part_mask) in enumerate(zip(auto3.masks, auto3.part_masks)):
            assert mask.shape == part_mask.shape == planted3.features.image_sizes[i]
            assert mask.dtype == bool and part_mask.dtype.kind == "i"
            np.testing.assert_array_equal(mask, part_mask > 0)
            assert set(np.unique(part_mask)) <= {0} | set(auto3.keypoint_parts[i].tolist())


# ---------------------------------------------------------------------------------------------------------------
# Arguments, edge cases, determinism, re-analysis
# ---------------------------------------------------------------------------------------------------------------


class TestAnalysisBehaviour:
    def test_empty_when_no_match_survives(self, planted2):
        out = analyze_features(planted2.features, selection="paper", max_entropy=0.0)
        assert all(len(pair) == 0 for pair in out.correspondences)
        assert out.correspondences[0].source_points.shape == (0, 2)
        assert not out.density_maps.any()
        for i, size in enumerate(planted2.features.image_sizes):
            assert out.masks[i].shape == size and not out.masks[i].any()
            assert out.part_masks[i].shape == size and not out.part_masks[i].any()
            assert out.keypoints[i].shape == (0, 2) and out.keypoint_parts[i].shape == (0,)
        for maps in (out.entropy_maps, out.inverse_error_maps):
            assert np.isfinite(maps).all()

    def test_empty_on_random_features_auto_does_not_crash(self):
        g = torch.Generator().manual_seed(0)
        q = [torch.randn(2, 2, 16, 8, generator=g) * 0.01]
        k = [torch.randn(2, 2, 16, 8, generator=g) * 0.01]
        out = analyze_features(CoSegmentationFeatures(q, k, (4, 4), [(8, 8), (12, 4)]), selection="auto")
        for i in range(2):
            assert out.masks[i].shape == [(8, 8), (12, 4)][i]
            assert out.keypoints[i].ndim == 2 and out.keypoints[i].shape[1] == 2
            assert np.isfinite(out.keypoints[i]).all()

    def test_deterministic(self, planted3, auto3):
        again = analyze_features(planted3.features, selection="auto")
        for a, b in zip(auto3.correspondences, again.correspondences):
            np.testing.assert_array_equal(a.source_tokens, b.source_tokens)
            np.testing.assert_array_equal(a.target_tokens, b.target_tokens)
            np.testing.assert_array_equal(a.scores, b.scores)
        for name in ("masks", "part_masks", "keypoints", "keypoint_parts"):
            for a, b in zip(getattr(auto3, name), getattr(again, name)):
                np.testing.assert_array_equal(a, b)

    def test_thresholds_override_presets(self, planted2, paper2):
        strict = analyze_features(planted2.features, selection="paper", max_inverse_error=0.0, max_spread=2.0)
        assert all(t["max_inverse_error"] == 0.0 and t["max_spread"] == 2.0 for t in strict.thresholds)
        assert all(t["max_collapse"] == 0.5 for t in strict.thresholds)  # the preset's others stay
        assert 0 < len(strict.correspondences[0]) < len(paper2.correspondences[0])
        # every kept match passes the limit in the pass that found it (M = 2: the maps hold that pass alone)
        pair = strict.correspondences[0]
        forward_ok = strict.inverse_error_maps[0].ravel()[pair.source_tokens] <= 0.0
        backward_ok = strict.inverse_error_maps[1].ravel()[pair.target_tokens] <= 0.0
        assert (forward_ok | backward_ok).all()
        auto = analyze_features(planted2.features, selection="auto", max_entropy=1.0)
        assert all(t["max_entropy"] == 1.0 and t["max_inverse_error"] == math.sqrt(2) for t in auto.thresholds)

    def test_auto_thresholds_come_from_each_pass(self, auto2):
        assert len(auto2.thresholds) == 2
        entropies = {round(t["max_entropy"], 6) for t in auto2.thresholds}
        assert len(entropies) == 2  # two passes, two samples, two cuts
        for t in auto2.thresholds:
            assert 0 < t["max_entropy"] < math.log(1024) and 0 < t["max_spread"] < INF

    def test_num_parts_fixed_and_background_threshold(self, planted2, auto2):
        two = analyze_features(planted2.features, num_parts=2)
        assert all(set(p.tolist()) <= {1, 2} for p in two.keypoint_parts)
        assert max(int(m.max()) for m in two.part_masks) == 2
        everything = analyze_features(planted2.features, background_threshold=INF)
        assert all(m.all() for m in everything.masks)
        nothing = analyze_features(planted2.features, background_threshold=0.0)
        assert sum(int(m.sum()) for m in nothing.masks) < 0.1 * sum(int(m.sum()) for m in auto2.masks)
        # the same correspondences whatever the segmentation settings
        np.testing.assert_array_equal(two.correspondences[0].source_tokens, auto2.correspondences[0].source_tokens)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"num_parts": 0}, "num_parts"),
            ({"num_parts": 2.0}, "num_parts"),
            ({"num_parts": True}, "num_parts"),
            ({"background_threshold": -1.0}, "background_threshold"),
            ({"background_threshold": float("nan")}, "background_threshold"),
            ({"selection": "best"}, "selection"),
        ],
    )
    def test_invalid_arguments(self, planted2, kwargs, match):
        with pytest.raises(ValueError, match=match):
            analyze_features(planted2.features, **kwargs)

    def test_rerun_on_saved_features_with_other_thresholds(self, planted2, auto2, tmp_path):
        path = tmp_path / "planted.safetensors"
        planted2.features.save(path)
        loaded = CoSegmentationFeatures.load(path)
        again = analyze_features(loaded)
        np.testing.assert_array_equal(again.part_masks[0], auto2.part_masks[0])
        other = analyze_features(loaded, selection="paper", max_spread=INF, num_parts=3)
        direct = analyze_features(planted2.features, selection="paper", max_spread=INF, num_parts=3)
        np.testing.assert_array_equal(other.correspondences[0].target_tokens, direct.correspondences[0].target_tokens)
        np.testing.assert_array_equal(other.part_masks[1], direct.part_masks[1])
        assert len(other.correspondences[0]) != len(auto2.correspondences[0])

    def test_output_type_pt(self, planted2):
        out = analyze_features(planted2.features, output_type="pt")
        assert isinstance(out.masks[0], torch.Tensor) and out.masks[0].dtype == torch.bool
        assert isinstance(out.part_masks[0], torch.Tensor) and isinstance(out.keypoints[0], torch.Tensor)
        assert isinstance(out.keypoint_parts[0], torch.Tensor)


# ---------------------------------------------------------------------------------------------------------------
# New pure functions of utils/correspondence.py
# ---------------------------------------------------------------------------------------------------------------


def _stats(forward: torch.Tensor, **overrides) -> PassStatistics:
    n = forward.shape[0]
    fields = {
        "forward": forward,
        "target_entropy": torch.zeros(n),
        "inverse_error": torch.zeros(n),
        "spread": torch.zeros(n),
        "collapse": torch.zeros(n),
    }
    fields.update(overrides)
    return PassStatistics(**fields)


class TestSelectionFunctions:
    def test_supported_spread_hand_case(self):
        # 1 x 3 grid, identity mapping onto a 1 x 3 target; only tokens 0 and 2 kept
        forward = torch.tensor([0, 1, 2])
        spread, support = supported_spread(forward, torch.tensor([True, False, True]), (1, 3))
        assert spread.shape == support.shape == (3,)
        assert support.tolist() == [0.0, 2.0, 0.0]
        assert spread.tolist() == [0.0, 1.0, 0.0]  # token 1: neighbours land 1 cell away on either side
        with pytest.raises(ValueError, match="keep"):
            supported_spread(forward, torch.tensor([True]), (1, 3))

    def test_grow_adds_vouched_matches_and_drops_lone_ones(self):
        # 3 x 3 grid, identity mapping; the centre row kept except its middle; a far corner kept alone
        forward = torch.arange(9)
        keep = torch.zeros(9, dtype=torch.bool)
        keep[[3, 5]] = True
        limits = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=0.5, max_inverse_error=1.0)
        grown = grow_matches(_stats(forward), keep, limits, (3, 3))
        assert grown.all()  # 4 joins (support 2), then every other token has enough kept neighbours
        blocked = grow_matches(_stats(forward, inverse_error=torch.full((9,), 3.0)), keep, limits, (3, 3))
        assert blocked.sum() == 0  # nothing eligible, and the two seeds are not neighbours: both dropped
        with pytest.raises(ValueError, match="min_support"):
            grow_matches(_stats(forward), keep, limits, (3, 3), min_support=0)

    def test_grow_respects_spread_limit(self):
        # token 4's match is far from where its kept neighbours land
        forward = torch.arange(9).clone()
        forward[4] = 8
        keep = torch.tensor([True, True, True, True, False, True, True, True, False])
        limits = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=1.0, max_inverse_error=1.0)
        grown = grow_matches(_stats(forward), keep, limits, (3, 3))
        assert not grown[4] and grown[8]

    def test_match_scores_hand_case(self):
        keep = torch.tensor([True, True, False, False])  # 2 x 2 grid: each token has 3 neighbours
        scores = match_scores(torch.tensor([0.9, 0.6, 1.0, 0.3]), keep, (2, 2))
        torch.testing.assert_close(scores, torch.tensor([0.9 / 3, 0.6 / 3, 1.0 * 2 / 3, 0.3 * 2 / 3]))
        assert match_scores(torch.ones(1), torch.ones(1, dtype=torch.bool), (1, 1)).tolist() == [0.0]
        with pytest.raises(ValueError, match="max_prob"):
            match_scores(torch.ones(3), keep, (2, 2))

    def test_auto_thresholds_from_the_sample(self):
        g = torch.Generator().manual_seed(0)
        entropy = torch.cat([1.0 + 0.1 * torch.randn(100, generator=g), 5.0 + 0.1 * torch.randn(100, generator=g)])
        spread = torch.cat([torch.full((100,), 2.0), torch.full((100,), 300.0)])
        limits = auto_thresholds(_stats(torch.zeros(200, dtype=torch.long), target_entropy=entropy, spread=spread))
        assert 1.3 < limits.max_entropy < 4.7
        assert 2.0 <= limits.max_spread < 300.0
        assert limits.max_inverse_error == pytest.approx(math.sqrt(2)) and limits.max_collapse == pytest.approx(7 / 8)
        constant = auto_thresholds(_stats(torch.zeros(4, dtype=torch.long)))
        assert constant.max_entropy == INF and constant.max_spread == INF

    def test_kept_map_hand_case(self):
        forward = torch.tensor([2, 0, 1])
        keep_forward = torch.tensor([True, False, False])
        backward = torch.tensor([1, 1, 0, 2])  # target y -> source g(y)
        keep_backward = torch.tensor([True, True, False, False])
        out = kept_map(forward, keep_forward, backward, keep_backward)
        assert out.tolist() == [2, 1, -1]  # forward wins for 0; source 1 gets the largest y (1); source 2: none
        assert kept_map(
            forward, torch.zeros(3, dtype=torch.bool), backward, torch.zeros(4, dtype=torch.bool)
        ).tolist() == [
            -1,
            -1,
            -1,
        ]

    def test_confirm_matches_needs_votes_within_tolerance(self):
        forward = torch.tensor([0, 4, 8, 2])  # 1 x 4 source onto a 3 x 3 target
        keep = torch.tensor([True, False, False, False])
        predictions = torch.tensor([[0, 4, 6, -1], [0, 5, 8, -1], [-1, 4, -1, 2]])
        out = confirm_matches(forward, keep, predictions, (3, 3), tolerance=1.0, min_votes=2)
        # token 1: predictions 4, 5, 4 all within 1 cell of 4 -> added; token 2: only one of 6, 8 within 1 cell of 8;
        # token 3: a single vote
        assert out.tolist() == [True, True, False, False]
        assert confirm_matches(forward, keep, predictions, (3, 3), 1.0, min_votes=1).tolist() == [True] * 4
        assert confirm_matches(forward, keep, predictions[:0], (3, 3), 1.0).tolist() == keep.tolist()
        with pytest.raises(ValueError, match="min_votes"):
            confirm_matches(forward, keep, predictions, (3, 3), 1.0, min_votes=0)


class TestPipelinePassThrough:
    def test_call_passes_num_parts_and_background_threshold(self, tiny_pipe, photos):
        out = tiny_pipe(
            image=photos[:2],
            generator=torch.Generator().manual_seed(0),
            num_parts=2,
            background_threshold=INF,
            **NO_FILTER,
        )
        assert all(set(parts.tolist()) <= {1, 2} for parts in out.keypoint_parts)
        for mask, photo in zip(out.masks, photos[:2]):
            assert mask.shape == photo.shape[:2] and mask.all()  # every token kept at an infinite threshold

    def test_call_rejects_bad_segmentation_arguments_before_the_unet(self, tiny_pipe, photos):
        def fail(*args, **kwargs):
            raise AssertionError("the UNet ran")

        original = tiny_pipe.capture_features
        tiny_pipe.capture_features = fail
        try:
            with pytest.raises(ValueError, match="num_parts"):
                tiny_pipe(image=photos[:2], num_parts=-1)
            with pytest.raises(ValueError, match="background_threshold"):
                tiny_pipe(image=photos[:2], background_threshold=float("nan"))
        finally:
            tiny_pipe.capture_features = original


class TestConsistencyFunctions:
    def test_reverse_consistent_hand_case(self):
        # 1 x 3 grid, identity forward map, all kept; the reverse pass keeps target 1 but sends it to source 2
        forward, keep = torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool)
        backward, keep_backward = torch.tensor([0, 2, 2]), torch.tensor([True, True, False])
        out = reverse_consistent(forward, keep, backward, keep_backward, (1, 3), 0.5)
        assert out.tolist() == [True, False, True]  # token 2: its target is not kept backwards, no evidence
        assert reverse_consistent(forward, keep, backward, keep_backward, (1, 3), 1.0).all()

    def test_reverse_consistent_edge_nothing_kept(self):
        forward = torch.tensor([0, 1, 2])
        none = torch.zeros(3, dtype=torch.bool)
        assert not reverse_consistent(forward, none, forward, torch.ones(3, dtype=torch.bool), (1, 3), 1.0).any()

    def test_affine_residual_hand_case(self):
        # 3 x 3 source onto a 3 x 5 target, (r, c) -> (r, c); then the centre's match moved 2 cells right
        forward = torch.tensor([r * 5 + c for r in range(3) for c in range(3)])
        keep = torch.ones(9, dtype=torch.bool)
        residual, defined = affine_residual(forward, keep, (3, 3), (3, 5))
        assert defined.all() and torch.allclose(residual, torch.zeros(9), atol=1e-5)
        moved = forward.clone()
        moved[4] = 1 * 5 + 3
        residual, defined = affine_residual(moved, keep, (3, 3), (3, 5))
        assert residual[4].item() == pytest.approx(2.0, abs=1e-5)  # the neighbours still predict (1, 1)

    def test_affine_residual_edge_collinear_neighbours(self):
        # 1 x 3 grid: every token's neighbours lie on one line, so no affine fit is determined
        residual, defined = affine_residual(torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool), (1, 3))
        assert not defined.any() and residual.tolist() == [0.0, 0.0, 0.0]
        with pytest.raises(ValueError, match="keep"):
            affine_residual(torch.tensor([0, 1, 2]), torch.ones(2, dtype=torch.bool), (1, 3))

    def test_field_consistent_checks_only_loose_cycles(self):
        forward = torch.tensor([r * 5 + c for r in range(3) for c in range(3)])
        forward[4] = 1 * 5 + 3  # 2 cells off its neighbours' field
        keep = torch.ones(9, dtype=torch.bool)
        limits = SelectionThresholds(max_entropy=1.0, max_spread=2.0, max_collapse=0.5, max_inverse_error=2**0.5)
        tight = _stats(forward, inverse_error=torch.ones(9))
        assert field_consistent(tight, keep, limits, (3, 3), (3, 5)).all()  # IMS <= 1: never checked
        # only the centre has a diagonal cycle (the corners, whose 3-point fits pass through it, stay: IMS 1)
        loose = _stats(forward, inverse_error=torch.ones(9).index_fill(0, torch.tensor([4]), 2**0.5))
        out = field_consistent(loose, keep, limits, (3, 3), (3, 5))
        assert not out[4] and out.sum() == 8


# ---------------------------------------------------------------------------------------------------------------
# Per-pair analysis joined later (`analyze_pairs` + `analyze_features(pair_analyses=...)`): how several processes
# share one analysis
# ---------------------------------------------------------------------------------------------------------------


def _assert_same_output(mine, theirs):
    for name in ("density_maps", "entropy_maps", "inverse_error_maps"):
        assert np.array_equal(getattr(mine, name), getattr(theirs, name)), name
    assert mine.thresholds == theirs.thresholds
    for a, b in zip(mine.correspondences, theirs.correspondences, strict=True):
        assert (a.source_index, a.target_index) == (b.source_index, b.target_index)
        for name in ("source_tokens", "target_tokens", "scores", "mutual", "source_points", "target_points"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("masks", "part_masks", "keypoints", "keypoint_parts"):
        for a, b in zip(getattr(mine, name), getattr(theirs, name), strict=True):
            assert np.array_equal(a, b), name


@pytest.fixture(scope="module")
def planted4():
    return make_planted_features(4, noise=0.3, seed=4001)


@pytest.fixture(scope="module")
def full4(planted4):
    return analyze_features(planted4.features)


class TestPairAnalysesJoined:
    def test_split_shares_joined_equal_one_analysis(self, planted4, full4):
        """Pairs analysed in two shares (as two processes would), moved to the CPU, joined in another order."""
        from cosegment import analyze_pairs

        features = planted4.features
        pairs = [(s, t) for s in range(4) for t in range(s + 1, 4)]
        shares = [analyze_pairs(features, pairs[0::2]), analyze_pairs(features, pairs[1::2])]
        joined = [analysis.to("cpu") for share in reversed(shares) for analysis in share]
        _assert_same_output(analyze_features(features, pair_analyses=joined), full4)

    def test_pairs_analysed_alone_would_miss_the_third_image_confirmation(self, planted4, full4):
        """Why the join exists: analysing each pair as a 2-image collection skips step 8b, and changes the matches."""
        features = planted4.features
        alone = analyze_features(
            CoSegmentationFeatures(
                [q[[0, 1]] for q in features.queries],
                [k[[0, 1]] for k in features.keys],
                features.grid_size,
                features.image_sizes[:2],
            )
        )
        assert len(alone.correspondences[0]) != len(full4.correspondences[0])

    def test_other_settings_and_partial_sets_are_refused(self, planted4):
        from cosegment import analyze_pairs

        features = planted4.features
        every = analyze_pairs(features, selection="paper")
        with pytest.raises(ValueError, match="pair_analyses.*made with"):
            analyze_features(features, pair_analyses=every)  # "auto" asked
        with pytest.raises(ValueError, match="pair_analyses.*made with"):
            analyze_features(features, selection="paper", max_spread=5.0, pair_analyses=every)
        with pytest.raises(ValueError, match=r"missing \[\(2, 3\)\]"):
            analyze_features(features, selection="paper", pair_analyses=every[:-1])
        with pytest.raises(ValueError, match=r"pair \(0, 1\) twice"):
            analyze_features(features, selection="paper", pair_analyses=every + every[:1])
        with pytest.raises(TypeError, match="PairAnalysis"):
            analyze_features(features, selection="paper", pair_analyses=[{"pair": (0, 1)}])
        with pytest.raises(TypeError, match="pair_analyses"):
            analyze_features(features, selection="paper", pair_analyses="all")
        three = CoSegmentationFeatures(
            [q[:3] for q in features.queries],
            [k[:3] for k in features.keys],
            features.grid_size,
            features.image_sizes[:3],
        )
        with pytest.raises(ValueError, match=r"not in the collection \[\(0, 3\), \(1, 3\), \(2, 3\)\]"):
            analyze_features(three, selection="paper", pair_analyses=every)
        assert (
            len(analyze_features(three, selection="paper", pair_analyses=every[:2] + every[3:4]).correspondences) == 3
        )

    @pytest.mark.parametrize("pairs", [[(1, 0)], [(0, 4)], [(0, 1), (0, 1)], [(0,)], "01", [(0.0, 1)]])
    def test_bad_pairs_are_refused(self, planted4, pairs):
        from cosegment import analyze_pairs

        with pytest.raises((ValueError, TypeError), match="pairs"):
            analyze_pairs(planted4.features, pairs)


class TestSkippingTheSegmentation:
    def test_segment_false_skips_steps_10_11_and_changes_nothing_else(self, planted4, full4, monkeypatch):
        import cosegment.analysis as analysis

        def refuse(*args, **kwargs):
            raise AssertionError("steps 10-11 ran although segment=False")

        monkeypatch.setattr(analysis, "cluster_hits", refuse)
        monkeypatch.setattr(analysis, "segment_parts", refuse)
        out = analyze_features(planted4.features, segment=False)
        assert out.masks is None and out.part_masks is None and out.keypoints is None and out.keypoint_parts is None
        nothing = {"masks": [], "part_masks": [], "keypoints": [], "keypoint_parts": []}
        _assert_same_output(dataclasses.replace(out, **nothing), dataclasses.replace(full4, **nothing))
        assert len(full4.part_masks) == 4  # the fixture itself still has its masks

    @pytest.mark.parametrize("segment", [0, "no", None])
    def test_segment_must_be_a_bool(self, planted2, segment):
        with pytest.raises(TypeError, match="`segment`"):
            analyze_features(planted2.features, segment=segment)
