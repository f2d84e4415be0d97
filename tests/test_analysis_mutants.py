"""Written for survivors of the mutation sample of `analysis.py` (TESTING.md): each asserts a value, default or
message the code must give, on a case where a one-token change of the code gives another."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cosegment import analyze_features, analyze_pairs, transfer_points
from cosegment.analysis import (
    AnalysisSettings,
    CoSegmentationFeatures,
    _in_pair,
    check_analysis_settings,
    join_pair_analyses,
)
from cosegment.benchmarks.planted import make_planted_features


@pytest.fixture(scope="module")
def small():
    return make_planted_features(2, noise=0.3, seed=7, grid_size=(8, 8), num_heads=2)


def test_clamp_high_norm_is_on_by_default():
    assert check_analysis_settings().clamp_high_norm is True
    assert AnalysisSettings().clamp_high_norm is True
    assert check_analysis_settings(clamp_high_norm=False).clamp_high_norm is False


def test_in_pair_keeps_the_type_only_when_the_message_survives():
    wrapped = _in_pair(ValueError("bad"), 0, 1)
    assert type(wrapped) is ValueError and str(wrapped) == "pair (0, 1): ValueError: bad"
    # str(KeyError(m)) quotes m, so the message would change: a RuntimeError instead
    wrapped = _in_pair(KeyError("k"), 2, 3)
    assert type(wrapped) is RuntimeError and str(wrapped) == "pair (2, 3): KeyError: 'k'"


def test_transfer_points_accepts_the_image_edges(small):
    height, width = small.features.image_sizes[0]
    points = np.array([[0.0, 0.0], [0.5, height], [width, 0.0], [width, height]])
    landed, scores = transfer_points(small.features, 0, 1, points)
    t_height, t_width = small.features.image_sizes[1]
    assert landed.shape == (4, 2) and scores.shape == (4,)
    assert (landed >= 0).all() and (landed[:, 0] <= t_width).all() and (landed[:, 1] <= t_height).all()


def test_features_validate_messages(small):
    features = small.features
    bad_grid = features.to("cpu")
    bad_grid.grid_size = (0, 8)
    with pytest.raises(ValueError, match=r"`grid_size` must be two positive ints \(h, w\), got \(0, 8\)"):
        bad_grid.validate()
    fewer_keys = features.to("cpu")
    fewer_keys.keys = fewer_keys.keys[:-1]
    n = len(features.queries)
    with pytest.raises(ValueError, match=f"non-empty lists of equal length, got {n} and {n - 1}"):
        fewer_keys.validate()


def test_pair_analyses_with_other_settings_say_what_to_do(small):
    analyses = analyze_pairs(small.features, selection="paper", refine=False)
    with pytest.raises(ValueError, match="pass the same `selection` and thresholds to analyze_pairs"):
        analyze_features(small.features, pair_analyses=analyses, selection="auto", refine=False, segment=False)


def test_to_moves_every_tensor(small):
    # the meta device stands in for a GPU: a `.to(None)` would leave tensors on the CPU
    analysis = analyze_pairs(small.features, [(0, 1)], refine=False)[0]
    moved = analysis.to("meta")
    for result in moved.passes:
        assert result.max_prob.device.type == "meta" and result.keep.device.type == "meta"


def test_transfer_to_an_identical_image_near_the_edges():
    # image 1 is image 0 (random queries, keys = 3 x queries, so each token attends most to itself): a point lands
    # on itself, clamped to the hull of the token centres ([4, 60] px on an 8 x 8 grid of 64 x 64 px)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 64, 16, generator=g).repeat(2, 1, 1, 1)
    features = CoSegmentationFeatures([q], [3.0 * q], (8, 8), [(64, 64), (64, 64)], ["layer"], {})
    points = np.array([[60.0, 62.0], [62.0, 30.0], [30.0, 63.0], [63.5, 63.5], [2.0, 3.0]])
    landed, _ = transfer_points(features, 0, 1, points)
    np.testing.assert_allclose(landed, np.clip(points, 4.0, 60.0), atol=0.5)


def test_load_a_file_without_metadata(small, tmp_path):
    path = tmp_path / "features.safetensors"
    small.features.save(path)
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    del header["metadata"]
    save_file(tensors, str(path), metadata=header)
    assert CoSegmentationFeatures.load(path).metadata == {}


def test_join_pair_analyses_moves_them_to_the_device(small):
    analyses = analyze_pairs(small.features, refine=False)
    passes = join_pair_analyses(analyses, small.features, analyses[0].settings, torch.device("meta"))
    assert sorted(passes) == [(0, 1), (1, 0)]
    assert all(result.max_prob.device.type == "meta" for result in passes.values())
