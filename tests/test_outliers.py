"""Outlier images (issue 10): `sharing` scores, the `outliers` flag, and what happens to a flagged image."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cosegment import analyze_features
from cosegment.analysis import SHARING_CUT, find_outliers, sharing_scores, split_outlier_passes
from cosegment.benchmarks.families import make_family_case


@dataclass
class _Pass:
    """A stand-in pass: only `keep` matters to the sharing scores."""

    keep: torch.Tensor


def _passes(counts: dict[tuple[int, int], int], num_tokens: int = 64) -> dict:
    """Stand-in passes: only `keep` matters to the sharing scores; `counts[(s, t)]` kept in each of both passes."""
    passes = {}
    for (s, t), count in counts.items():
        keep = torch.zeros(num_tokens, dtype=torch.bool)
        keep[:count] = True
        passes[(s, t)] = _Pass(keep)
        passes[(t, s)] = _Pass(keep.clone())
    return passes


def test_sharing_scores_by_hand():
    # best partner counts (both passes): image 0: 2*40, 1: 2*40, 2: 2*30 (with 1), 3: 2*2 -> median 2*35
    passes = _passes({(0, 1): 40, (0, 2): 20, (1, 2): 30, (0, 3): 2, (1, 3): 1, (2, 3): 0})
    sharing = sharing_scores(passes, 4)
    np.testing.assert_allclose(sharing.numpy(), [1.0, 1.0, 30 / 35, 2 / 35])
    assert find_outliers(sharing, "auto").tolist() == [False, False, False, True]
    assert find_outliers(sharing, "paper").tolist() == [False] * 4  # the paper preset drops nothing
    # two images: the same best partner, so nothing can stand out
    assert find_outliers(sharing_scores(_passes({(0, 1): 3}), 2), "auto").tolist() == [False, False]
    # nothing kept anywhere: no evidence against any image
    assert sharing_scores(_passes({(0, 1): 0, (0, 2): 0, (1, 2): 0}), 3).tolist() == [1.0, 1.0, 1.0]


def test_split_outlier_passes_empties_every_pass_touching_an_outlier():
    passes = _passes({(0, 1): 5, (0, 2): 5, (1, 2): 5})
    inliers, dropped = split_outlier_passes(passes, torch.tensor([False, False, True]))
    assert sorted(inliers) == [(0, 1), (1, 0)]
    assert sorted(dropped) == [(0, 2), (1, 2), (2, 0), (2, 1)]
    assert not any(result.keep.any() for result in dropped.values())
    assert all(passes[pair].keep.sum() == 5 for pair in dropped)  # the given passes are unchanged


@pytest.fixture(scope="module")
def outlier_case():
    # design split (seeds 0-999): one background-only image among 5
    return make_family_case("sectors", 5, 4, seed=1, outlier_images=1)


def test_an_outlier_is_flagged_and_keeps_nothing(outlier_case):
    case = outlier_case
    output = analyze_features(case.features)
    outlier = int(np.flatnonzero(case.outliers)[0])
    assert output.sharing.shape == (5,) and output.sharing.dtype == np.float64
    assert output.outliers.tolist() == case.outliers.tolist()
    assert output.sharing[outlier] < SHARING_CUT <= output.sharing[~case.outliers].min()
    touching = [pair for pair in output.correspondences if outlier in (pair.source_index, pair.target_index)]
    assert len(touching) == 4 and all(len(pair) == 0 for pair in touching)  # listed, empty
    assert output.density_maps[outlier].sum() == 0
    assert output.masks[outlier].mean() <= 0.02
    assert len(output.keypoints[outlier]) == 0

    # the others come out as in the collection without the outlier: it confirms nothing and joins no part
    others = np.flatnonzero(~case.outliers)
    clean = analyze_features(case.without([outlier]).features)
    assert not clean.outliers.any()
    kept = [pair for pair in output.correspondences if outlier not in (pair.source_index, pair.target_index)]
    assert len(kept) == len(clean.correspondences) == 6
    for pair, reference in zip(kept, clean.correspondences):
        assert (others[reference.source_index], others[reference.target_index]) == (
            pair.source_index,
            pair.target_index,
        )
        np.testing.assert_array_equal(pair.source_tokens, reference.source_tokens)
        np.testing.assert_array_equal(pair.target_tokens, reference.target_tokens)
    for i, j in enumerate(others):
        np.testing.assert_array_equal(output.part_masks[j], clean.part_masks[i])


def test_the_paper_preset_reports_sharing_but_drops_nothing(outlier_case):
    output = analyze_features(outlier_case.features, selection="paper", segment=False)
    outlier = int(np.flatnonzero(outlier_case.outliers)[0])
    assert not output.outliers.any()
    assert output.sharing[outlier] == output.sharing.min()
    assert ((output.sharing >= 0) & (output.sharing <= 1)).all()


@pytest.mark.parametrize(
    "family, num_images, num_parts, seed",
    [("sectors", 4, 3, 20), ("blobs", 4, 5, 21), ("bands", 4, 4, 1020), ("chain", 5, 2, 1021)],
)
def test_no_inlier_is_flagged_on_clean_collections(family, num_images, num_parts, seed):
    case = make_family_case(family, num_images, num_parts, seed=seed)
    output = analyze_features(case.features, segment=False)
    assert not output.outliers.any(), output.sharing
    assert output.sharing.max() == 1.0  # at least half the images reach the median
    assert all(len(pair) > 0 for pair in output.correspondences)
