"""The collection steps added after the first mutation runs (the pair graph, outliers, confirmation by third images,
joint parts, `transfer_points`): cases written for the mutation run of issue 29. Each pins a value a user depends
on, on a hand-made input where it is known."""

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import cosegment.transfer
from cosegment import CoSegmentationFeatures, transfer_points
from cosegment.analysis import SHARING_CUT, cluster_collection, find_outliers, sharing_scores
from cosegment.utils.reference import token_norm_bounds

# ---------------------------------------------------------------------------------------------------------------------
# Outliers: how much each image shares, and the cut
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    keep: torch.Tensor


def _kept(counts: dict[tuple[int, int], int], num_tokens: int = 100) -> dict:
    """Stand-in passes keeping `counts[(s, t)]` matches in the pass s -> t (each orientation given on its own)."""
    passes = {}
    for pair, count in counts.items():
        keep = torch.zeros(num_tokens, dtype=torch.bool)
        keep[:count] = True
        passes[pair] = _Pass(keep)
    return passes


def test_a_pair_counts_the_matches_of_both_its_passes():
    # pair (0, 1) keeps 10 + 30, (0, 2) 20 + 0, (1, 2) 5 + 5: best partner counts 40, 40, 20 -> median 40
    passes = _kept({(0, 1): 10, (1, 0): 30, (0, 2): 20, (2, 0): 0, (1, 2): 5, (2, 1): 5})
    sharing = sharing_scores(passes, 3)
    assert sharing.dtype == torch.float64
    assert sharing.tolist() == [1.0, 1.0, 0.5]


def test_the_best_partner_counts_not_the_sum_over_partners():
    # image 3 keeps a little with every partner (4 + 4 per pair, 24 in all), image 0's best partner keeps 40
    counts = {(0, 1): 20, (1, 0): 20, (0, 2): 20, (2, 0): 20, (1, 2): 20, (2, 1): 20}
    counts.update({(i, 3): 4 for i in range(3)} | {(3, i): 4 for i in range(3)})
    sharing = sharing_scores(_kept(counts), 4)
    np.testing.assert_allclose(sharing.numpy(), [1.0, 1.0, 1.0, 8 / 40])


def test_the_typical_best_partner_is_the_median_image():
    # best partner counts 60, 60, 30, 10, 10: the median is 30 (the mean would be 34)
    counts = {(0, 1): 30, (1, 0): 30, (2, 0): 30, (3, 4): 5, (4, 3): 5}
    sharing = sharing_scores(_kept(counts), 5)
    np.testing.assert_allclose(sharing.numpy(), [1.0, 1.0, 1.0, 10 / 30, 10 / 30])
    # an image analysed with no partner at all (a partner graph leaves none out, but nothing kept is the same)
    np.testing.assert_allclose(sharing_scores(_kept({(0, 1): 8, (1, 0): 8}), 3).numpy(), [1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "sharing, flagged",
    [
        ([1.0, 0.9, 0.78, 0.19], [False, False, False, True]),  # the design split's inlier and outlier ranges
        ([1.0, 1.0, 0.34], [False, False, True]),
        ([1.0, 1.0, 0.36], [False, False, False]),
        ([1.0, 1.0, SHARING_CUT], [False, False, False]),  # at the cut: kept
        ([1.0, 0.05, 0.1, 0.2, 1.0], [False, True, True, True, False]),
    ],
)
def test_the_outlier_cut(sharing, flagged):
    assert find_outliers(torch.tensor(sharing, dtype=torch.float64), "auto").tolist() == flagged
    assert find_outliers(torch.tensor(sharing, dtype=torch.float64), "paper").tolist() == [False] * len(sharing)


def test_outliers_need_three_images():
    # with two images both have the same best partner: nothing can stand out, whatever the scores
    assert find_outliers(torch.tensor([1.0, 0.0], dtype=torch.float64), "auto").tolist() == [False, False]
    assert find_outliers(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), "auto").tolist() == [False, False, True]
    assert find_outliers(torch.tensor([0.1], dtype=torch.float64), "auto").dtype == torch.bool


# ---------------------------------------------------------------------------------------------------------------------
# transfer_points: scores, edges, chunks, input checks, the reference
# ---------------------------------------------------------------------------------------------------------------------

CELL = 8  # pixels per token in the hand-made features below


def _one_hot_features(back: dict[int, int], grid=(4, 4), strength: float = 12.0, size=None) -> CoSegmentationFeatures:
    """Two images whose attention is one-hot: token i of image 0 attends only to token i of image 1 and to itself;
    token j of image 1 attends back to token `back.get(j, j)` of image 0 (the round trip's end)."""
    n = grid[0] * grid[1]
    eye = strength * torch.eye(n)
    returns = torch.tensor([back.get(j, j) for j in range(n)])
    queries = torch.stack([eye, eye[returns]])[:, None]  # (2, 1, N, N): one head, d = N
    keys = torch.stack([eye, eye])[:, None]
    size = size or (grid[0] * CELL, grid[1] * CELL)
    return CoSegmentationFeatures([queries], [keys], grid, [size, size])


def _centres(tokens, grid=(4, 4)) -> np.ndarray:
    """Pixel centres `(x, y)` of tokens on a grid of CELL-pixel cells."""
    rows, cols = np.divmod(np.asarray(tokens), grid[1])
    return np.stack([(cols + 0.5) * CELL, (rows + 0.5) * CELL], -1).astype(np.float64)


@pytest.mark.parametrize("refine", [False, True])
def test_the_score_is_the_round_trips_agreement(refine):
    # round trips from tokens 5 = (1, 1), 10 = (2, 2), 0 = (0, 0) end 1, sqrt(2) and 2 cells away; 15 and 3 return
    features = _one_hot_features({5: 6, 10: 15, 0: 2})
    points = _centres([5, 10, 0, 15, 3])
    landed, scores = transfer_points(features, 0, 1, points, refine=refine)
    np.testing.assert_allclose(landed, points, atol=1e-3)  # image 1's token i is where image 0's token i goes
    np.testing.assert_allclose(scores, np.exp(-0.5 * np.array([1.0, 2.0, 4.0, 0.0, 0.0])), rtol=1e-4)
    assert landed.dtype == scores.dtype == np.float32


@pytest.mark.parametrize("refine", [False, True])
def test_points_at_the_image_corners_come_back_to_themselves(refine):
    # within the outer half of an edge token a point reads that token: the round trip ends on it, score 1
    features = _one_hot_features({})
    corners = np.array([[0.0, 0.0], [32.0, 32.0], [32.0, 0.0], [0.0, 32.0], [2.0, 30.0], [31.0, 20.0]])
    landed, scores = transfer_points(features, 0, 1, corners, refine=refine)
    np.testing.assert_allclose(scores, 1.0, rtol=1e-4)
    np.testing.assert_allclose(landed, np.clip(corners, 4.0, 28.0), atol=1e-3)  # the token centres' hull
    landed, scores = transfer_points(features, 0, 0, corners, refine=refine)  # the same image
    np.testing.assert_allclose(scores, 1.0, rtol=1e-4)


def _gaussian_features(grid=(12, 12), sharpness: float = 2.0) -> CoSegmentationFeatures:
    """Two identical images whose attention rows are Gaussians: a query read at any grid point p (bilinearly, so
    exactly `[p, 1]`) attends to token y in proportion to `exp(-sharpness |p - y|^2 / 2)`, so its window soft-argmax
    is p itself (up to the window's truncation, far below 1e-3 cells inside the grid)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    rows, cols = rows.reshape(-1).float(), cols.reshape(-1).float()
    zero = torch.zeros_like(rows)
    # logits q.k / sqrt(4) = sharpness (p.y - |y|^2 / 2) = -sharpness |p - y|^2 / 2 + (a constant per row)
    queries = 2 * sharpness * torch.stack([rows, cols, torch.ones_like(rows), zero], -1)
    keys = torch.stack([rows, cols, -(rows**2 + cols**2) / 2, zero], -1)
    size = (h * CELL, w * CELL)
    return CoSegmentationFeatures(
        [queries[None, None].repeat(2, 1, 1, 1)], [keys[None, None].repeat(2, 1, 1, 1)], grid, [size, size]
    )


def test_refined_transfer_lands_below_the_grid_and_its_round_trip_returns():
    features = _gaussian_features()
    for tokens in features.queries + features.keys:  # no token is corrected away as a high-norm token
        norms, bounds = token_norm_bounds(tokens, 5.0)
        assert not (norms > bounds).any()
    grid_points = np.array([[5.3, 4.6], [6.0, 6.0], [4.2, 7.45], [5.5, 5.5], [6.75, 5.5]])
    points = (grid_points[:, ::-1] + 0.5) * CELL
    refined, refined_scores = transfer_points(features, 0, 1, points, refine=True)
    plain, plain_scores = transfer_points(features, 0, 1, points, refine=False)
    # refined: the point itself (the point's own soft-argmax and its neighbours' matches agree)
    np.testing.assert_allclose(refined, points, atol=0.002 * CELL)
    # plain: the nearest token centre
    np.testing.assert_allclose(plain, (np.floor(grid_points[:, ::-1] + 0.5 - 1e-6) + 0.5) * CELL, atol=1e-3)
    # the same peak sharpness; the refined round trip ends on the point (e = 0), the plain one on the token centre
    offset = np.linalg.norm(grid_points - np.floor(grid_points + 0.5 - 1e-6), axis=1)
    np.testing.assert_allclose(refined_scores / plain_scores, np.exp(0.5 * offset**2), rtol=2e-3)
    assert (refined_scores < 1).all() and (refined_scores > 0.8).all()


def test_rows_are_computed_chunk_by_chunk(monkeypatch):
    features = _gaussian_features()
    points = (np.random.default_rng(0).random((9, 2)) * 80 + 8).round(1)
    expected = transfer_points(features, 0, 1, points)
    rows_seen = []
    original = cosegment.transfer.cross_attention_probs

    def recording(queries, keys, *args, **kwargs):
        rows_seen.append(queries[0].shape[-2])
        return original(queries, keys, *args, **kwargs)

    monkeypatch.setattr(cosegment.transfer, "cross_attention_probs", recording)
    for chunk_size in (1, 2):
        rows_seen.clear()
        landed, scores = transfer_points(features, 0, 1, points, chunk_size=chunk_size)
        assert max(rows_seen) == chunk_size
        np.testing.assert_allclose(landed, expected[0], atol=1e-3)
        np.testing.assert_allclose(scores, expected[1], atol=1e-4)


def test_one_point_no_point_and_other_point_types():
    features = _one_hot_features({})
    for empty in ([], np.zeros((0, 2)), torch.zeros(0, 2)):
        landed, scores = transfer_points(features, 0, 1, empty)
        assert landed.shape == (0, 2) and scores.shape == (0,)
        assert landed.dtype == scores.dtype == np.float32
    landed, scores = transfer_points(features, 0, 1, [[12, 20]])  # one point, as ints
    assert landed.shape == (1, 2) and scores.shape == (1,)
    np.testing.assert_allclose(landed, [[12.0, 20.0]], atol=1e-3)
    point = torch.tensor([[12.0, 20.0]], requires_grad=True)  # a tensor that takes part in a graph
    np.testing.assert_allclose(transfer_points(features, 0, 1, point)[0], landed)


def test_points_are_checked_against_the_source_images_width_and_height():
    features = _one_hot_features({}, size=(64, 32))  # 32 px wide, 64 px high
    transfer_points(features, 0, 1, [[32.0, 64.0], [10.0, 50.0], [0.0, 40.0]])  # y beyond the width: inside
    for outside in ([33.0, 10.0], [10.0, 65.0], [-0.5, 10.0], [10.0, -0.5]):
        with pytest.raises(ValueError, match=r"^`points` must lie inside the source image \(32 x 64 px"):
            transfer_points(features, 0, 1, [[5.0, 5.0], outside])


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"features": "features"}, TypeError, r"^`features` must be a CoSegmentationFeatures, got str\.$"),
        ({"refine": 1}, TypeError, r"^`refine` must be a bool, got 1\.$"),
        ({"chunk_size": 0}, ValueError, r"^`chunk_size` must be a positive int or None, got 0\.$"),
        ({"chunk_size": 2.0}, ValueError, r"^`chunk_size` must be a positive int or None, got 2\.0\.$"),
        ({"points": "a,b"}, ValueError, r"^`points` must be a \(K, 2\) array of x, y pixels, got 'a,b'\.$"),
        ({"points": [[np.nan, 1.0]]}, ValueError, r"^`points` must be finite"),
        ({"points": [[1.0, 2.0, 3.0]]}, ValueError, r"got shape \(1, 3\)\.$"),
    ],
)
def test_bad_input_names_the_argument_and_the_value(arguments, error, message):
    call = {"features": _one_hot_features({}), "source_index": 0, "target_index": 1, "points": [[4.0, 4.0]]}
    with pytest.raises(error, match=message):
        transfer_points(**{**call, **arguments})


def test_the_reference_of_the_features_is_removed():
    # a strong positional component, the same in both images, hides that image 1 is image 0 with its tokens
    # reversed; removing the reference's offsets (as the analysis does) shows it
    generator = torch.Generator().manual_seed(0)
    n, d = 16, 32
    content = 3.0 * torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)
    positional = 10.0 * torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)
    positional -= positional.mean(0)
    tokens = torch.stack([content, content.flip(0)]) + positional  # (2, N, d)
    captures = positional + 0.02 * torch.randn(8, n, d, generator=generator)
    reference = CoSegmentationFeatures([captures[:, None]], [captures[:, None].clone()], (4, 4), [(32, 32)] * 8)
    plain = CoSegmentationFeatures([tokens[:, None]], [tokens[:, None].clone()], (4, 4), [(32, 32)] * 2)
    with_reference = CoSegmentationFeatures(
        [tokens[:, None]], [tokens[:, None].clone()], (4, 4), [(32, 32)] * 2, reference=reference
    )
    points = _centres(range(n))
    landed, _ = transfer_points(plain, 0, 1, points, refine=False)
    np.testing.assert_allclose(landed, points)  # the positional component decides
    landed, _ = transfer_points(with_reference, 0, 1, points, refine=False)
    np.testing.assert_allclose(landed, points[::-1])  # the content decides


# ---------------------------------------------------------------------------------------------------------------------
# Step 10: the joint parts of the collection
# ---------------------------------------------------------------------------------------------------------------------


def _part_features(part_grids: list[np.ndarray], seed: int = 0, strength: float = 6.0) -> CoSegmentationFeatures:
    """As tests/test_parts.py's: queries = keys, a token of part k carries part k's unit vector (the same in every
    image) times `strength` plus a little noise, any other token a random unit vector times `strength`; two heads
    of 16. Any grid shape."""
    rng = np.random.default_rng(seed)
    grid = part_grids[0].shape
    num_parts = max(int(g.max()) for g in part_grids)
    parts = rng.normal(size=(num_parts + 1, 32))
    parts /= np.linalg.norm(parts, axis=1, keepdims=True)
    x = []
    for part_grid in part_grids:
        flat = part_grid.reshape(-1)
        own = rng.normal(size=(flat.size, 32))
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        x.append(strength * np.where((flat > 0)[:, None], parts[flat] + 0.05 * own, own))
    x = torch.tensor(np.stack(x), dtype=torch.float32).view(len(part_grids), -1, 2, 16).permute(0, 2, 1, 3)
    x = x.contiguous()
    return CoSegmentationFeatures([x], [x.clone()], grid, [(8 * grid[0], 8 * grid[1])] * len(part_grids))


def _grid(blocks: dict[int, tuple[slice, slice]], shape=(12, 12)) -> np.ndarray:
    grid = np.zeros(shape, dtype=np.int64)
    for part, where in blocks.items():
        grid[where] = part
    return grid


def _points(part_grids) -> list[torch.Tensor]:
    return [torch.from_numpy(np.flatnonzero(g.reshape(-1) > 0)) for g in part_grids]


def _scale_tokens(features, tokens: dict[int, list[int]], factor: float) -> None:
    for image, chosen in tokens.items():
        for tensor in features.queries + features.keys:
            tensor[image, :, chosen] *= factor


def _two_large_parts(small: list[tuple[int, int, int]]) -> tuple[CoSegmentationFeatures, list[torch.Tensor]]:
    """Parts 1 and 2 of six tokens in each of two images, and part 3 at the `(image, row, col)` tokens of `small`."""
    grids = [
        _grid({1: (slice(2, 5), slice(2, 4)), 2: (slice(2, 5), slice(4, 6))}),
        _grid({2: (slice(6, 9), slice(2, 4)), 1: (slice(6, 9), slice(4, 6))}),
    ]
    for image, row, col in small:
        grids[image][row, col] = 3
    features = _part_features(grids)
    # part 3's tokens attend to the one or two others a little more, so that they stay attached (step 10c)
    _scale_tokens(features, {i: [r * 12 + c for j, r, c in small if j == i] for i in range(2)}, 1.4)
    return features, _points(grids)


def test_a_part_of_fewer_than_three_points_is_dropped_and_the_rest_clustered_again():
    features, points = _two_large_parts([(0, 10, 10), (1, 1, 10)])
    kept, regions = cluster_collection(features, points, [], None, None, "cpu")
    assert [p.tolist() for p in kept] == [[t for t in p.tolist() if t not in (130, 22)] for p in points]
    assert sorted(set(torch.cat(regions).tolist())) == [0, 1]
    for image_points, image_regions in zip(kept, regions):  # the two large parts, one id each
        rows, cols = np.divmod(image_points.numpy(), 12)
        left = cols < 4 if image_points.numel() and rows[0] < 6 else cols >= 4
        assert len(set(image_regions[left].tolist())) == 1 and len(set(image_regions[~left].tolist())) == 1


def test_a_part_of_three_points_is_kept():
    features, points = _two_large_parts([(0, 10, 10), (0, 10, 11), (1, 1, 10)])
    kept, regions = cluster_collection(features, points, [], None, None, "cpu")
    assert [p.tolist() for p in kept] == [p.tolist() for p in points]
    third = [regions[0][-2:].tolist(), regions[1][:1].tolist()]
    assert third[0][0] == third[0][1] == third[1][0]
    assert sorted(set(torch.cat(regions).tolist())) == [0, 1, 2]
    assert int((torch.cat(regions) == third[1][0]).sum()) == 3


def test_two_attached_points_are_clustered_without_the_strays():
    # one object token per image and one stray token per image that attends to nothing in particular (a small
    # vector): the strays' attention mass on the points is about 0.05 times the object tokens'
    grids = [_grid({1: (3, 3)}), _grid({1: (7, 7)})]
    features = _part_features(grids)
    _scale_tokens(features, {0: [100], 1: [20]}, 0.05)
    kept, regions = cluster_collection(
        features, [torch.tensor([39, 100]), torch.tensor([20, 91])], [], None, None, "cpu"
    )
    assert [p.tolist() for p in kept] == [[39], [91]] and [r.tolist() for r in regions] == [[0], [0]]


@pytest.mark.parametrize(
    "points, expected",
    [
        ([[39, 40], []], [[0, 0], []]),  # two points of one part: one part
        ([[39, 40, 104], []], [[0, 0, 1], []]),  # three points, two parts: the count can reach 2
    ],
)
def test_the_fewest_points_give_at_most_as_many_parts_as_they_allow(points, expected):
    grid = _grid({1: (3, slice(3, 5)), 2: (8, 8)})
    features = _part_features([grid, np.zeros((12, 12), dtype=np.int64)])
    kept, regions = cluster_collection(
        features, [torch.tensor(p, dtype=torch.long) for p in points], [], None, None, "cpu"
    )
    assert [p.tolist() for p in kept] == points and [r.tolist() for r in regions] == expected


def test_step_10_computes_each_attention_block_once_in_chunks(monkeypatch):
    import cosegment.parts

    features, points = _two_large_parts([(0, 10, 10), (1, 1, 10)])  # points are dropped, the rest embedded again
    calls = []
    real = cosegment.parts.attention_rows

    def counting(queries, keys, rows, columns, chunk_size):
        calls.append(chunk_size)
        return real(queries, keys, rows, columns, chunk_size)

    monkeypatch.setattr(cosegment.parts, "attention_rows", counting)
    expected = cluster_collection(features, points, [], None, None, "cpu")
    assert len(calls) == 4  # two images, each over both anchor images' points
    calls.clear()
    kept, regions = cluster_collection(features, points, [], None, 5, "cpu")
    assert calls == [5] * 4
    assert [p.tolist() for p in kept] == [p.tolist() for p in expected[0]]
    assert [r.tolist() for r in regions] == [r.tolist() for r in expected[1]]


def test_correspondences_tie_the_points_of_a_grid_taller_than_wide():
    # 12 x 6 tokens: token indices beyond 6 * 6 must be linked as well
    from cosegment.analysis import PairCorrespondence

    grids = [
        _grid({1: (slice(7, 10), slice(0, 3)), 2: (slice(7, 10), slice(3, 6))}, (12, 6)),
        _grid({2: (slice(8, 11), slice(0, 3)), 1: (slice(8, 11), slice(3, 6))}, (12, 6)),
    ]
    features = _part_features(grids, strength=1.5)  # weak parts: the links decide
    points = _points(grids)
    links = [
        PairCorrespondence(
            0,
            1,
            None,
            None,
            None,
            None,
            points[0],
            torch.cat(
                [points[1][3:6], points[1][:3], points[1][9:12], points[1][6:9], points[1][15:18], points[1][12:15]]
            ),
        )
    ]
    kept, regions = cluster_collection(features, points, links, 2, None, "cpu")
    assert [p.tolist() for p in kept] == [p.tolist() for p in points]
    for image, grid in enumerate(grids):
        parts = grid.reshape(-1)[kept[image].numpy()]
        for part in (1, 2):
            assert len(set(regions[image][torch.from_numpy(parts == part)].tolist())) == 1


def test_attached_points_cut_and_empty_input():
    from cosegment.analysis import attached_points

    # relative masses 1, 1, exactly 0.5 (kept) and 0.49 (dropped), in both anchor columns
    mass = np.array([[1.0, 2.0], [1.0, 2.0], [0.5, 1.0], [0.49, 0.98], [1.0, 2.0]])
    out = attached_points(mass)
    assert out.dtype == bool and out.tolist() == [True, True, True, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" on an empty input
        for empty in (np.zeros((0, 2)), np.zeros((3, 0)), np.zeros((0, 0))):
            out = attached_points(empty)
            assert out.dtype == bool and out.shape == (empty.shape[0],) and out.all()


def test_keys_move_points_by_squared_distance_to_each_parts_mean_key():
    from cosegment.analysis import refine_by_keys

    # one-dimensional keys of different lengths: part 1's mean key is three times part 0's; the point at 2.6 is
    # nearer part 1's mean (3.0) than part 0's (1.4)
    keys = np.array([[1.0], [1.1], [0.9], [2.6], [3.0], [3.1], [2.9]])
    regions = np.array([0, 0, 0, 0, 1, 1, 1])
    assert refine_by_keys(keys, regions).tolist() == [0, 0, 0, 1, 1, 1, 1]
    # nearer part 0's mean (1.125) than part 1's (3.0): the point at 1.5 stays
    keys = np.array([[0.9], [1.0], [1.1], [1.5], [2.9], [3.0], [3.1]])
    assert refine_by_keys(keys, regions).tolist() == regions.tolist()
    # a step that would leave the last part empty is not taken (its point sits on part 0's mean)
    keys = np.array([[1.0], [1.1], [0.9], [1.0], [3.0], [3.1], [2.9], [1.0]])
    assert refine_by_keys(keys, np.array([0, 0, 0, 0, 1, 1, 1, 2])).tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    # a part of one point keeps it and may take others: the point at 9 joins the lone point at 10
    keys = np.array([[1.0], [1.1], [0.9], [3.0], [3.1], [2.9], [3.05], [9.0], [10.0]])
    assert refine_by_keys(keys, np.array([0, 0, 0, 1, 1, 1, 1, 1, 2])).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_a_step_that_moves_every_point_is_taken():
    from cosegment.analysis import refine_by_keys

    # four parts of three keys around the vertices of a tetrahedron: each key of part a lies past its own part's mean,
    # towards one of the other three vertices, and is nearest that vertex's part mean; every part gives one key to
    # each other part and gets one from each, so the first step moves every point and keeps every part's size
    vertices = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    keys, regions, towards = [], [], []
    for a in range(4):
        others = [b for b in range(4) if b != a]
        directions = np.array(
            [(vertices[b] - vertices[a]) / np.linalg.norm(vertices[b] - vertices[a]) for b in others]
        )
        for b, direction in zip(others, directions):
            keys.append(vertices[a] + 6.0 * (direction - directions.mean(0)))
            regions.append(a)
            towards.append(b)
    keys, regions = np.array(keys), np.array(regions)

    def nearest_mean(labels):
        means = np.stack([keys[labels == k].mean(0) for k in range(4)])
        return ((keys[:, None] - means[None]) ** 2).sum(-1).argmin(1)

    assert (nearest_mean(regions) != regions).all()  # the start is no Lloyd fixed point: every key is elsewhere
    out = refine_by_keys(keys, regions)
    assert out.tolist() == towards and np.bincount(out).tolist() == [3, 3, 3, 3]
    assert (nearest_mean(out) == out).all()  # where it stops, each key is nearest its own part's mean


def test_key_distances_are_computed_in_float64_and_labels_are_int64():
    from cosegment.analysis import refine_by_keys

    g = np.random.default_rng(0)
    # keys sharing a large common component: float32 arithmetic would lose the differences between them
    keys = g.normal(0.0, 0.002, (6, 3)) + np.array([[0.0, 0.0, 0.0]] * 3 + [[0.05, 0.0, 0.0]] * 3)
    keys = (keys + 1000.0).astype(np.float32)
    regions = np.array([0, 0, 1, 1, 1, 0], dtype=np.int32)
    expected = refine_by_keys(keys.astype(np.float64), regions.astype(np.int64))
    assert expected.tolist() == [0, 0, 0, 1, 1, 1]
    out = refine_by_keys(keys, regions)
    assert out.dtype == np.int64 and out.tolist() == expected.tolist()
    assert refine_by_keys(keys, regions, iterations=0).dtype == np.int64


# ---------------------------------------------------------------------------------------------------------------------
# Step 8b: confirmation by third images, on stand-in passes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Statistics:
    forward: torch.Tensor


@dataclass
class _Limits:
    max_inverse_error: float


@dataclass
class _FullPass:
    statistics: _Statistics
    keep: torch.Tensor
    thresholds: _Limits


def _identity_passes(pairs, keeps=None, tolerance=1.0, shift=None, n=4):
    """Both passes of each of `pairs` on a 1 x n grid, every forward map the identity (shifted by `shift[(s, t)]`
    tokens where given); `keeps[(s, t)]` the kept tokens of a pass (default all)."""
    keeps, shift = keeps or {}, shift or {}
    passes = {}
    for s, t in pairs:
        for a, b in ((s, t), (t, s)):
            forward = (torch.arange(n) + shift.get((a, b), 0)).clamp(0, n - 1)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[keeps.get((a, b), list(range(n)))] = True
            passes[(a, b)] = _FullPass(_Statistics(forward), keep, _Limits(tolerance))
    return passes


def _kept_tokens(passes, pair):
    return torch.nonzero(passes[pair].keep).flatten().tolist()


def test_two_third_images_confirm_a_match_one_does_not():
    from cosegment.analysis import confirm_by_third_images

    every = [(s, t) for s in range(4) for t in range(s + 1, 4)]
    # (0, 1) keeps nothing in either pass; third images 2 and 3 both carry tokens 0-3 of image 0 to image 1
    passes = _identity_passes(every, {(0, 1): [], (1, 0): []})
    confirmed = confirm_by_third_images(passes, 4, (1, 4))
    assert sorted(confirmed) == sorted(passes)
    assert _kept_tokens(confirmed, (0, 1)) == _kept_tokens(confirmed, (1, 0)) == [0, 1, 2, 3]
    assert all(_kept_tokens(confirmed, pair) == [0, 1, 2, 3] for pair in passes)
    assert _kept_tokens(passes, (0, 1)) == []  # the given passes are unchanged
    # image 3 carries only tokens 0 and 1 (its pairs with 0 keep nothing else): tokens 2 and 3 get one vote
    passes = _identity_passes(every, {(0, 1): [], (1, 0): [], (0, 3): [0, 1], (3, 0): [0, 1]})
    confirmed = confirm_by_third_images(passes, 4, (1, 4))
    assert _kept_tokens(confirmed, (0, 1)) == [0, 1]
    # three images: one third image, one vote: nothing added
    passes = _identity_passes([(0, 1), (0, 2), (1, 2)], {(0, 1): [], (1, 0): []})
    confirmed = confirm_by_third_images(passes, 3, (1, 4))
    assert _kept_tokens(confirmed, (0, 1)) == [] and _kept_tokens(confirmed, (1, 0)) == []


@pytest.mark.parametrize("tolerance, expected", [(1.0, [0, 1, 2, 3]), (0.5, [3])])
def test_a_vote_lands_within_the_passes_own_tolerance(tolerance, expected):
    from cosegment.analysis import confirm_by_third_images

    every = [(s, t) for s in range(4) for t in range(s + 1, 4)]
    # the paths through 2 and 3 carry token p to p + 1 (token 3 to 3, the grid's end); (0, 1)'s own match of p is p
    shift = {(2, 1): 1, (3, 1): 1}
    passes = _identity_passes(every, {(0, 1): [], (1, 0): [], (1, 2): [], (1, 3): []}, tolerance, shift)
    confirmed = confirm_by_third_images(passes, 4, (1, 4))
    assert _kept_tokens(confirmed, (0, 1)) == expected


def test_longer_paths_go_through_two_other_images_and_never_back():
    from cosegment.analysis import confirm_by_third_images

    # (0, 1) has no third image linked to both; paths 0-2-3-1 and 0-4-5-1 carry all of image 0 to image 1
    graph = [(0, 1), (0, 2), (2, 3), (1, 3), (0, 4), (4, 5), (1, 5)]
    passes = _identity_passes(graph, {(0, 1): [], (1, 0): []})
    assert _kept_tokens(confirm_by_third_images(passes, 6, (1, 4)), (0, 1)) == []
    assert _kept_tokens(confirm_by_third_images(passes, 6, (1, 4), longer_paths=True), (0, 1)) == [0, 1, 2, 3]
    # one longer path (0-4-5-1 keeps nothing), and (1, 0) keeps token 2: a path back through image 0 itself
    # (0-2-0-1) would be the pass's own map voting for itself; it does not count, so token 2 has one vote
    keeps = {(0, 1): [], (1, 0): [2], (4, 5): [], (5, 4): []}
    confirmed = confirm_by_third_images(_identity_passes(graph, keeps), 6, (1, 4), longer_paths=True)
    assert _kept_tokens(confirmed, (0, 1)) == []


def test_longer_paths_add_to_the_paths_through_one_image():
    from cosegment.analysis import confirm_by_third_images

    # (0, 1): one path through image 2 and one through images 3 and 4: two votes only together
    graph = [(0, 1), (0, 2), (1, 2), (0, 3), (3, 4), (1, 4)]
    passes = _identity_passes(graph, {(0, 1): [], (1, 0): []})
    assert _kept_tokens(confirm_by_third_images(passes, 5, (1, 4)), (0, 1)) == []
    assert _kept_tokens(confirm_by_third_images(passes, 5, (1, 4), longer_paths=True), (0, 1)) == [0, 1, 2, 3]


def test_typical_points_compare_directions_not_lengths():
    from cosegment.analysis import typical_points

    # one part, every point in the same direction but of very different lengths: all typical
    embedding = np.array([[1.0, 0.0], [0.1, 0.0], [3.0, 0.0], [1e-3, 0.0], [0.5, 0.01]])
    assert typical_points(embedding, np.zeros(5, dtype=np.int64)).all()
    # cosines 2/3 (four points) and exactly 1/3, half their median: kept at the cut
    vectors = np.array([[2, 1, 2], [2, -1, -2], [2, 2, 1], [2, -2, -1], [1, 2, 2], [1, -2, -2]], dtype=np.float64)
    assert typical_points(vectors, np.zeros(6, dtype=np.int64)).all()
    # just under it: dropped
    vectors[4:, 0] = 0.99
    assert typical_points(vectors, np.zeros(6, dtype=np.int64)).tolist() == [True] * 4 + [False] * 2


def test_sharing_with_a_typical_best_partner_of_one_match():
    # best partner counts 1, 1, 0: the median is one match, and the image with none shares nothing
    sharing = sharing_scores(_kept({(0, 1): 1, (1, 0): 0, (0, 2): 0, (2, 0): 0, (1, 2): 0, (2, 1): 0}), 3)
    assert sharing.tolist() == [1.0, 1.0, 0.0]
    nothing = sharing_scores(_kept({(0, 1): 0, (1, 0): 0}), 2)
    assert nothing.dtype == torch.float64 and nothing.tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# The pair graph and the join of pair analyses
# ---------------------------------------------------------------------------------------------------------------------


def _constant_features(directions, grid=(4, 4)) -> CoSegmentationFeatures:
    """Every token of image i has the query (and key) `directions[i]` (as in tests/test_partners.py)."""
    base = torch.tensor(directions, dtype=torch.float32)
    tensor = base[:, None, None, :].expand(len(directions), 1, grid[0] * grid[1], base.shape[1]).contiguous()
    return CoSegmentationFeatures([tensor], [tensor.clone()], grid, [(8, 8)] * len(directions))


def test_m_minus_two_partners_can_leave_a_pair_out():
    from cosegment.analysis import partner_pairs

    # a chain e0 - (e0 + e1) - (e1 + e2) - e2; centred over the collection, images 0 and 2 point in opposite
    # directions (cosine -0.99), and so do 1 and 3: with M - 2 = 2 partners each leaves out its opposite
    features = _constant_features([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert partner_pairs(features, 2) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    every = [(s, t) for s in range(4) for t in range(s + 1, 4)]
    assert partner_pairs(features, 3) == partner_pairs(features, 4) == partner_pairs(features, None) == every
    five = _constant_features([[float(i in (j, j - 1)) for i in range(4)] for j in range(5)])
    assert (1, 3) not in partner_pairs(five, 3) and len(partner_pairs(five, 3)) == 9


@pytest.fixture(scope="module")
def small_pairs():
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randn(4, 2, 16, 4, generator=generator)]
    keys = [q + 0.3 * torch.randn(q.shape, generator=generator) for q in queries]
    features = CoSegmentationFeatures(queries, keys, (4, 4), [(32, 32)] * 4)
    from cosegment import analyze_pairs

    return features, analyze_pairs(features, refine=False)


def _join(analyses, features, pairs=None):
    from cosegment.analysis import join_pair_analyses

    settings = analyze_pairs_settings()
    return join_pair_analyses(analyses, features, settings, torch.device("cpu"), pairs)


def analyze_pairs_settings() -> dict:
    """The settings a default `analyze_pairs(refine=False)` records in each pair analysis."""
    from cosegment.settings import check_analysis_settings

    return check_analysis_settings(refine=False).pair_settings


def test_join_gives_both_passes_of_each_pair_in_pair_order(small_pairs):
    features, analyses = small_pairs
    passes = _join(analyses[::-1], features)
    order = [(s, t) for s in range(4) for t in range(s + 1, 4)]
    assert list(passes) == [p for s, t in order for p in ((s, t), (t, s))]
    for analysis in analyses:
        for result in analysis.passes:
            assert passes[(result.source_index, result.target_index)] is not result  # moved to the device
            assert torch.equal(passes[(result.source_index, result.target_index)].keep, result.keep)
    graph = [(0, 2), (1, 3), (0, 1)]
    chosen = [a for a in analyses if (a.source_index, a.target_index) in graph]
    assert list(_join(chosen, features, graph)) == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 3), (3, 1)]


def test_join_messages_name_what_is_wrong(small_pairs):
    from dataclasses import replace

    features, analyses = small_pairs
    with pytest.raises(TypeError, match=r"^`pair_analyses` must be a list of PairAnalysis or None, got "):
        _join(iter(analyses), features)  # an iterator, not a list
    with pytest.raises(TypeError, match=r"^`pair_analyses` must hold PairAnalysis objects, got str\.$"):
        _join([analyses[0], "pair"], features)
    with pytest.raises(ValueError, match=r"^`pair_analyses` holds pair \(0, 1\) twice\.$"):
        _join([analyses[0], analyses[0]], features)
    other_grid = replace(analyses[1], grid_size=(2, 8))
    with pytest.raises(
        ValueError, match=r"^`pair_analyses` pair \(0, 2\) has grid \(2, 8\), the features \(4, 4\)\.$"
    ):
        _join([analyses[0], other_grid], features)
    other = replace(analyses[1], settings={**analyses[1].settings, "max_spread": 3.0})
    with pytest.raises(ValueError, match=r"^`pair_analyses` pair \(0, 2\) was made with \{.*'max_spread': 3\.0.*\}, "):
        _join([analyses[0], other], features)
    # missing pairs: the first five, then " ..."
    with pytest.raises(ValueError) as error:
        _join(analyses[:1], features)
    assert str(error.value) == (
        "`pair_analyses` must hold every pair of the 4 images once: missing [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], "
        "not in the collection [], not in the pair graph []."
    )
    with pytest.raises(ValueError) as error:
        _join(analyses[:1], _constant_features([[float(i == j) for j in range(8)] for i in range(8)]))
    assert "missing [(0, 2), (0, 3), (0, 4), (0, 5), (0, 6)] ..., " in str(error.value)
    # pairs outside the collection and outside the graph
    outside = replace(analyses[0], source_index=3, target_index=7)
    with pytest.raises(ValueError) as error:
        _join([analyses[0], analyses[5], outside], features, [(0, 1), (2, 3), (0, 2)])
    assert str(error.value) == (
        "`pair_analyses` must hold each pair of the partner graph of the 4 images once: missing [(0, 2)], not in the "
        "collection [(3, 7)], not in the pair graph []."
    )
    with pytest.raises(
        ValueError, match=r"missing \[\], not in the collection \[\], not in the pair graph \[\(1, 2\)\]"
    ):
        _join(analyses, features, [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)])


def test_join_messages_at_their_limits(small_pairs):
    from dataclasses import replace

    features, analyses = small_pairs
    with pytest.raises(TypeError, match=r"got <generator object .*\(generator\)\.$"):
        _join((a for a in analyses), features)  # the message names what was passed
    other = replace(analyses[1], settings={**analyses[1].settings, "max_spread": 3.0})
    with pytest.raises(ValueError, match=r": pass the same `selection` and thresholds to analyze_pairs and analyze_"):
        _join([analyses[0], other], features)
    # image index M is outside a collection of M images (indices 0..M-1)
    edge = replace(analyses[0], source_index=1, target_index=4)
    with pytest.raises(ValueError, match=r"not in the collection \[\(1, 4\)\], not in the pair graph \[\]\.$"):
        _join([*analyses, edge], features)
    # exactly six missing pairs: five shown, then " ..."
    with pytest.raises(ValueError, match=r"missing \[\(0, 1\), \(0, 2\), \(0, 3\), \(1, 2\), \(1, 3\)\] \.\.\., "):
        _join([], features)
    # six pairs outside the collection, and six outside the graph: five of each shown
    outside = [replace(analyses[0], source_index=0, target_index=4 + i) for i in range(6)]
    with pytest.raises(ValueError) as error:
        _join([*analyses, *outside], features)
    assert "not in the collection [(0, 4), (0, 5), (0, 6), (0, 7), (0, 8)], not in" in str(error.value)
    with pytest.raises(ValueError) as error:
        _join(analyses, features, [])
    assert str(error.value).endswith("not in the pair graph [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)].")


def test_two_points_of_different_parts_make_one_part():
    # two points cannot be told apart from noise: a part needs three (MIN_REGION_TOKENS), so the count is one
    grids = [_grid({1: (3, 3)}), _grid({2: (7, 7)})]
    features = _part_features(grids)
    kept, regions = cluster_collection(features, _points(grids), [], None, None, "cpu")
    assert [p.tolist() for p in kept] == [[3 * 12 + 3], [7 * 12 + 7]]
    assert [r.tolist() for r in regions] == [[0], [0]]
