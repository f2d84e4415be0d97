"""What the analysis keeps while it runs (issue 26 item 2): compact per-pair results, the read cache's bounds, the
values check of lazy features, the sharing scores without an `M x M` matrix."""

import math

import numpy as np
import pytest
import torch

from cosegment.analysis import analyze_features, analyze_pairs, sharing_scores
from cosegment.benchmarks.planted import make_planted_features
from cosegment.pairs import compact_pass
from cosegment.store import CACHE_MIN_IMAGES, LazyFeatures, lazy_view


@pytest.fixture(scope="module")
def planted():
    return make_planted_features(num_images=6, seed=5, grid_size=(8, 8), anomalies=1)


def test_compact_pass_keeps_what_steps_8b_to_11_read_in_one_buffer(planted):
    result = analyze_pairs(planted.features, pairs=[(0, 1)])[0].passes[1]
    compact = compact_pass(result)
    stats, kept = result.statistics, compact.statistics
    read_later = [
        (stats.forward, kept.forward),
        (stats.inverse_error, kept.inverse_error),
        (result.keep, compact.keep),
        (result.max_prob, compact.max_prob),
        (result.inverse_entropy, compact.inverse_entropy),
        (result.peak_points, compact.peak_points),
    ]
    for full, small in read_later:  # the same values, dtypes and shapes
        assert small.dtype == full.dtype and small.shape == full.shape and torch.equal(small, full)
    storages = {small.untyped_storage().data_ptr() for _, small in read_later}
    assert len(storages) == 1  # one allocation per pass ...
    n = 64
    assert compact.keep.untyped_storage().nbytes() == n * (8 + 4 + 1 + 4 + 4 + 2 * 4)  # ... of exactly their bytes
    for name in ("target_entropy", "spread", "collapse"):  # read by the selection (steps 7-8a) only
        assert getattr(kept, name).numel() == 0 and getattr(stats, name).numel() == n
    assert (compact.source_index, compact.target_index, compact.thresholds) == (1, 0, result.thresholds)


def test_analysis_from_compact_results_is_the_one_from_full_results(planted):
    features = planted.features
    made_here = analyze_features(features, partners=2, output_type="pt")  # compact pair results
    given = analyze_features(features, partners=2, output_type="pt", pair_analyses=analyze_pairs(features, partners=2))
    for a, b in zip(made_here.correspondences, given.correspondences):
        assert torch.equal(a.source_tokens, b.source_tokens) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.target_points, b.target_points)
    for name in ("density_maps", "entropy_maps", "inverse_error_maps", "sharing"):
        assert torch.equal(getattr(made_here, name), getattr(given, name))
    for a, b in zip(made_here.part_masks, given.part_masks):
        assert torch.equal(a, b)


def _lazy(images: list[torch.Tensor], cache_bytes: int) -> LazyFeatures:
    return LazyFeatures(
        lambda i: ([images[i]], [images[i]]),
        [tuple(images[0].shape)],
        images[0].dtype,
        (2, 2),
        [(16, 16)] * len(images),
        cache_bytes=cache_bytes,
    )


def test_cache_keeps_the_last_two_images_whatever_their_size():
    images = [torch.full((1, 4, 2), float(i)) for i in range(4)]  # 64 bytes per image (queries and keys)
    features = _lazy(images, cache_bytes=1)  # smaller than one image
    assert CACHE_MIN_IMAGES == 2
    features.image(0), features.image(1), features.image(0), features.image(1)
    assert features.reads == [1, 1, 0, 0]  # a pair's two images read once
    features.image(2), features.image(0)
    assert features.reads == [2, 1, 1, 0]  # image 0 was dropped for image 2
    bounded = _lazy(images, cache_bytes=3 * 64)
    for i in [0, 1, 2, 3, 1, 0]:
        bounded.image(i)
    assert bounded.reads == [2, 1, 1, 1]  # three images kept: 1 still there, 0 read again
    uncached = _lazy(images, cache_bytes=0)
    uncached.image(0), uncached.image(0)
    assert uncached.reads[0] == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_lazy_features_refuse_non_finite_values_as_read(bad, dtype):
    images = [torch.ones(1, 4, 2, dtype=dtype) for _ in range(3)]
    images[1][0, 2, 1] = bad
    features = _lazy(images, cache_bytes=0)
    features.image(0)
    with pytest.raises(ValueError, match="of image 1 contains NaN or inf"):
        features.image(1)
    huge = [torch.full((1, 4, 2), torch.finfo(dtype).max, dtype=dtype) for _ in range(2)]
    _lazy(huge, cache_bytes=0).image(1)  # finite values whose sum overflows the dtype are finite
    # a view over checked features does not check again (its reads come from checked images)
    view = lazy_view(_lazy(images, cache_bytes=0), lambda i: ([images[0] * 2], [images[0] * 2]))
    assert torch.equal(view.image(1)[0][0], images[0] * 2)


def test_sharing_scores_from_pair_counts_as_from_the_matrix():
    generator = torch.Generator().manual_seed(0)
    num_images, passes = 9, {}
    pairs = [(0, 1), (0, 4), (1, 2), (2, 7), (3, 4), (4, 8), (5, 6), (6, 7), (1, 8)]

    class Kept:  # what sharing_scores reads of a pass
        def __init__(self, count):
            self.keep = torch.arange(20) < count

    for s, t in pairs:
        for pair in ((s, t), (t, s)):
            passes[pair] = Kept(int(torch.randint(0, 20, (1,), generator=generator)))
    matrix = torch.zeros(num_images, num_images, dtype=torch.float64)  # the former computation
    for (s, t), result in passes.items():
        matrix[s, t] += float(result.keep.sum())
        matrix[t, s] += float(result.keep.sum())
    best = matrix.max(dim=1).values
    expected = (best / float(np.median(best.numpy()))).clamp(0.0, 1.0)
    assert torch.equal(sharing_scores(passes, num_images), expected)
