"""Step 10: parts found over the whole collection at once (`cluster_hits`, `cluster_collection`,
`factored_spectral_clusters`), on hand-made collections whose parts are known token by token."""

import numpy as np
import pytest
import torch

from cosegment import CoSegmentationFeatures, analyze_features
from cosegment.analysis import (
    PairCorrespondence,
    attached_points,
    cluster_collection,
    cluster_hits,
    collection_embedding,
    key_descriptors,
    link_by_correspondences,
    refine_by_keys,
    typical_points,
)
from cosegment.benchmarks.families import make_family_case, oracle_output
from cosegment.utils.segmentation import eigengap_count, factored_spectral_clusters, spectral_clusters

GRID = (12, 12)
HEADS, DIM = 2, 16


def _features(part_grids: list[np.ndarray], seed: int = 0, strength: float = 6.0) -> CoSegmentationFeatures:
    """Queries = keys: a token of part k carries part k's unit vector (the same in every image) times `strength`,
    plus a little noise; other tokens carry a random unit vector each. `part_grids`: `(h, w)` int per image."""
    rng = np.random.default_rng(seed)
    num_parts = max(int(g.max()) for g in part_grids)
    width = HEADS * DIM
    parts = rng.normal(size=(num_parts + 1, width))
    parts /= np.linalg.norm(parts, axis=1, keepdims=True)
    x = []
    for grid in part_grids:
        flat = grid.reshape(-1)
        own = rng.normal(size=(flat.size, width))
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        tokens = np.where((flat > 0)[:, None], parts[flat] + 0.05 * own, own)
        x.append(strength * tokens)
    x = torch.tensor(np.stack(x), dtype=torch.float32)  # (M, N, H d)
    x = x.view(len(part_grids), -1, HEADS, DIM).permute(0, 2, 1, 3).contiguous()  # (M, H, N, d)
    sizes = [(8 * GRID[0], 8 * GRID[1])] * len(part_grids)
    return CoSegmentationFeatures([x], [x.clone()], GRID, sizes)


def _blocks(parts: list[int], top: int = 2, left: int = 2, height: int = 3, width: int = 2) -> np.ndarray:
    """A grid with parts side by side: part `parts[j]` fills rows `top..top+height`, columns from `left + j*width`."""
    grid = np.zeros(GRID, dtype=np.int64)
    for j, part in enumerate(parts):
        grid[top : top + height, left + j * width : left + (j + 1) * width] = part
    return grid


def _density(part_grids: list[np.ndarray]) -> torch.Tensor:
    """Hits on every part token (what the kept correspondences would touch)."""
    return torch.tensor(np.stack([(g > 0).reshape(-1) for g in part_grids]), dtype=torch.float32)


def _part_of_label(labels: list[torch.Tensor], part_grids: list[np.ndarray]) -> dict[int, set[int]]:
    """For every predicted part id, the planted parts its points sit on (over all images)."""
    found: dict[int, set[int]] = {}
    for image_labels, grid in zip(labels, part_grids):
        for token in torch.nonzero(image_labels).flatten().tolist():
            found.setdefault(int(image_labels[token]), set()).add(int(grid.reshape(-1)[token]))
    return found


class TestCollectionParts:
    def test_part_ids_agree_across_images(self):
        # three images, the same three parts at different places and in a different order
        grids = [_blocks([1, 2, 3]), _blocks([3, 1, 2], top=6, left=1), _blocks([2, 3, 1], top=1, left=5)]
        labels, num_parts = cluster_hits(_features(grids), _density(grids), [], None, None, "cpu")
        assert num_parts == 3
        found = _part_of_label(labels, grids)
        # each predicted id sits on exactly one planted part, a different one for each id, in every image
        assert sorted(found) == [1, 2, 3] and all(len(parts) == 1 for parts in found.values())
        assert {next(iter(parts)) for parts in found.values()} == {1, 2, 3}
        for image_labels, grid in zip(labels, grids):
            flat = grid.reshape(-1)
            np.testing.assert_array_equal((image_labels > 0).numpy(), flat > 0)  # every hit kept, nothing else
            for part in (1, 2, 3):
                ids = set(image_labels[torch.from_numpy(flat == part)].tolist())
                assert ids == {k for k, parts in found.items() if part in parts}

    def test_part_missing_from_the_image_with_most_hits_still_exists(self):
        # image 0 has the most hits (two large parts) but not part 3, which the two others show (under the old rule
        # image 0 was the reference and its parts the only ones); the count is fixed: a small part among large ones
        # is where the eigengap estimate is weakest
        grids = [_blocks([1, 2], height=5, width=4), _blocks([1, 2, 3]), _blocks([3, 2, 1], top=7)]
        assert int((grids[0] > 0).sum()) > max(int((g > 0).sum()) for g in grids[1:])
        labels, num_parts = cluster_hits(_features(grids), _density(grids), [], 3, None, "cpu")
        assert num_parts == 3
        found = _part_of_label(labels, grids)
        third = [k for k, parts in found.items() if parts == {3}]
        assert len(third) == 1
        assert third[0] not in labels[0].tolist()
        assert all(third[0] in image_labels.tolist() for image_labels in labels[1:])

    @pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
    def test_estimated_count_on_clear_collections(self, count):
        order = list(range(1, count + 1))
        grids = [
            _blocks(order, left=0),
            _blocks(order[::-1], top=7, left=0),
            _blocks(order[1:] + order[:1], top=4, left=0),
        ]
        labels, num_parts = cluster_hits(_features(grids, seed=count), _density(grids), [], None, None, "cpu")
        assert num_parts == count
        assert all(len(parts) == 1 for parts in _part_of_label(labels, grids).values())

    def test_num_parts_fixes_the_count(self):
        grids = [_blocks([1, 2, 3, 4]), _blocks([4, 3, 2, 1], top=7)]
        features, density = _features(grids), _density(grids)
        for fixed in (2, 3, 5):
            labels, num_parts = cluster_hits(features, density, [], fixed, None, "cpu")
            assert num_parts == fixed
            assert set(torch.cat(labels).tolist()) == set(range(fixed + 1))
        labels, _ = cluster_hits(features, density, [], 4, None, "cpu")
        assert all(len(parts) == 1 for parts in _part_of_label(labels, grids).values())

    def test_deterministic(self):
        grids = [_blocks([1, 2, 3]), _blocks([2, 3, 1], top=6)]
        features, density = _features(grids, seed=5, strength=1.5), _density(grids)
        first, count = cluster_hits(features, density, [], None, None, "cpu")
        again, count_again = cluster_hits(features, density, [], None, None, "cpu")
        assert count == count_again
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b)

    def test_no_hits_and_an_image_without_hits(self):
        grids = [_blocks([1, 2]), _blocks([2, 1], top=7), np.zeros(GRID, dtype=np.int64)]
        features = _features(grids)
        labels, num_parts = cluster_hits(features, torch.zeros(3, GRID[0] * GRID[1]), [], None, None, "cpu")
        assert num_parts == 0 and all(not image_labels.any() for image_labels in labels)
        labels, num_parts = cluster_hits(features, _density(grids), [], None, None, "cpu")
        assert num_parts == 2 and not labels[2].any()
        assert all(set(image_labels.tolist()) == {0, 1, 2} for image_labels in labels[:2])
        # end to end: the image without hits gets empty masks and no keypoints
        out = analyze_features(features, selection="paper", max_spread=float("inf"), max_collapse=float("inf"))
        assert len(out.part_masks) == 3 and len(out.keypoints) == 3

    def test_isolated_hits_and_tiny_parts_are_dropped(self):
        grids = [_blocks([1, 2]), _blocks([2, 1], top=7)]
        density = _density(grids)
        density[0, 11 * GRID[1] + 11] = 1.0  # a lone hit in a corner: noise
        labels, num_parts = cluster_hits(_features(grids), density, [], None, None, "cpu")
        assert num_parts == 2 and labels[0][11 * GRID[1] + 11] == 0

    def test_collection_embedding_rows_are_hellinger(self):
        grids = [_blocks([1, 2]), _blocks([2, 1], top=7)]
        points = [torch.from_numpy(np.flatnonzero(g.reshape(-1) > 0)) for g in grids]
        embedding = collection_embedding(_features(grids), points, None, "cpu")
        assert embedding.shape == (12 + 12, 24)
        # each row holds one distribution per anchor image, each of squared norm 1 / #anchors
        torch.testing.assert_close((embedding**2).sum(1), torch.ones(24))
        assert (embedding >= 0).all()

    def test_cluster_collection_returns_points_per_image(self):
        grids = [_blocks([1, 2]), _blocks([2, 1], top=7)]
        points = [torch.from_numpy(np.flatnonzero(g.reshape(-1) > 0)) for g in grids]
        kept, regions = cluster_collection(_features(grids), points, [], None, None, "cpu")
        assert [p.numel() for p in kept] == [r.numel() for r in regions] == [12, 12]
        assert set(torch.cat(regions).tolist()) == {0, 1}


class TestLinks:
    def test_rows_averaged_with_their_matched_points(self):
        points = [torch.tensor([0, 5]), torch.tensor([2, 3, 7])]  # rows 0-1 of image 0, rows 2-4 of image 1
        embedding = torch.arange(10, dtype=torch.float64).view(5, 2)
        tokens = [torch.tensor([5, 5, 9]), torch.tensor([3, 3, 2])]  # 5 -> 3 twice (one link), 9 is no point
        pair = PairCorrespondence(0, 1, None, None, None, None, *tokens)
        out = link_by_correspondences(embedding, points, [pair], num_tokens=10)
        expected = embedding.clone()
        expected[1] = expected[3] = (embedding[1] + embedding[3]) / 2  # token 5 of image 0 <-> token 3 of image 1
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(link_by_correspondences(embedding, points, [], 10), embedding)

    @pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 64, 101])
    def test_linked_float64_widened_in_place_is_the_linked_embedding_as_float64(self, rows):
        """Step 10 writes the linked rows as float32 into its float64 array and widens them in place: the values
        of `link_by_correspondences(...).double()`, bit for bit, whatever the row count."""
        from cosegment.parts import _linked_float64

        generator = torch.Generator().manual_seed(rows)
        embedding = torch.rand(rows, 13, generator=generator)
        points = [torch.arange(rows // 2), torch.arange(rows - rows // 2)]
        count = min(rows // 2, rows - rows // 2)
        tokens = [torch.randint(0, max(count, 1), (3 * count,), generator=generator) for _ in range(2)]
        pairs = [PairCorrespondence(0, 1, None, None, None, None, *tokens)] if count else []
        expected = link_by_correspondences(embedding, points, pairs, num_tokens=rows).double().numpy()
        wide = _linked_float64(lambda: embedding.clone(), points, pairs, rows)
        assert wide.dtype == np.float64 and wide.shape == (rows, 13)
        assert np.array_equal(wide, expected)
        if count:
            assert not np.array_equal(wide, embedding.double().numpy())  # the links changed rows


class TestTypicalPoints:
    def test_a_stray_point_is_dropped_per_part(self):
        # part 0: four points along e0 and one stray along e2 (cosine to the part's mean about 0.24 against a median
        # of about 0.97); part 1: three points along e1, one of them tilted (cosine about 0.91, kept)
        embedding = np.array(
            [[1, 0, 0], [1, 0, 0.05], [1, 0.05, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0], [0.6, 0.8, 0]]
        )
        regions = np.array([0, 0, 0, 0, 0, 1, 1, 1])
        assert typical_points(embedding, regions).tolist() == [True, True, True, True, False, True, True, True]
        # the same points as one part each: nothing to compare, nothing dropped
        assert typical_points(embedding, np.arange(8)).all()
        assert typical_points(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)).shape == (0,)


class TestAttachedPoints:
    def test_a_point_attending_off_the_points_is_dropped(self):
        # two anchors; the last point's mass on both anchors' points is a fifth of the median's (0.2 < 0.5), the
        # fourth's about 0.55 and 0.6 of it (kept)
        mass = np.array([[0.8, 0.5], [0.9, 0.6], [1.0, 0.5], [0.5, 0.3], [0.16, 0.1]])
        assert attached_points(mass).tolist() == [True, True, True, True, False]
        # relative to each anchor's median: a column of larger masses weighs no more
        assert attached_points(mass * np.array([[10.0, 1.0]])).tolist() == [True, True, True, True, False]
        assert attached_points(np.zeros((3, 0))).all() and attached_points(np.zeros((0, 2))).shape == (0,)

    def test_a_stray_hit_off_the_object_is_not_clustered(self):
        grids = [_blocks([1, 2]), _blocks([2, 1], top=7)]
        points = [torch.from_numpy(np.flatnonzero(g.reshape(-1) > 0)) for g in grids]
        stray = 11 * GRID[1] + 11  # a background token of image 0
        points[0] = torch.cat([points[0], torch.tensor([stray])])
        kept, _ = cluster_collection(_features(grids), points, [], None, None, "cpu")
        assert stray not in kept[0].tolist() and [p.numel() for p in kept] == [12, 12]


def _oracle_hits(case) -> tuple[torch.Tensor, list[PairCorrespondence]]:
    """Hit counts `(M, N)` and correspondences of a planted collection's true matches (`oracle_output`), so that
    only the clustering is tested."""
    oracle = oracle_output(case)
    density = torch.as_tensor(oracle.density_maps, dtype=torch.float32).reshape(case.features.num_images, -1)
    links = [
        PairCorrespondence(
            p.source_index,
            p.target_index,
            None,
            None,
            None,
            None,
            torch.as_tensor(p.source_tokens),
            torch.as_tensor(p.target_tokens),
        )
        for p in oracle.correspondences
    ]
    return density, links


class TestHiddenPartOnPlantedFamilies:
    def test_a_part_hidden_in_one_image_keeps_its_id_elsewhere(self):
        # the true correspondences of a planted collection (oracle), so only the clustering is tested
        case = make_family_case("sectors", 4, 4, seed=7, hidden_images=1)
        host = int(np.flatnonzero(case.hidden)[0])
        density, links = _oracle_hits(case)
        labels, num_parts = cluster_hits(case.features, density, links, 4, None, "cpu")
        assert num_parts == 4
        # the majority id of the hidden part's tokens in the other images is absent from the host's points
        hidden = case.hidden[host]
        votes = np.concatenate(
            [labels[i][torch.from_numpy(case.token_parts[i].reshape(-1) == hidden)].numpy() for i in range(4)]
        )
        winner = np.bincount(votes[votes > 0]).argmax()
        on_host = labels[host].numpy()
        assert (on_host == winner).sum() <= 0.1 * (on_host > 0).sum()
        assert all((labels[i].numpy() == winner).any() for i in range(4) if i != host)


class TestRefineByKeys:
    def test_a_boundary_point_moves_to_the_part_its_key_belongs_to(self):
        # keys: part 0 along e0, part 1 along e1; the spectral labels put the fourth point (a key of part 1, tilted
        # a little towards part 0, as a token next to the boundary) in part 0
        keys = np.array([[1.0, 0.0], [0.98, 0.2], [0.99, -0.1], [0.3, 0.95], [0.0, 1.0], [0.1, 0.99], [-0.1, 0.99]])
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        regions = np.array([0, 0, 0, 0, 1, 1, 1])
        assert refine_by_keys(keys, regions).tolist() == [0, 0, 0, 1, 1, 1, 1]
        # no step: the spectral labels as they are; labels are not renumbered
        assert refine_by_keys(keys, regions, iterations=0).tolist() == regions.tolist()
        assert refine_by_keys(keys, regions + 2).tolist() == [2, 2, 2, 3, 3, 3, 3]

    def test_a_part_is_not_left_below_min_region_tokens(self):
        # part 1 holds three points, the last of them a key of part 0: the Lloyd step would move it and leave part 1
        # with two points (< MIN_REGION_TOKENS = 3), so the step is not taken and the count the clustering found stays
        keys = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.95, 0.0], [0.0, 1.0], [0.0, 1.0], [0.9, 0.1]])
        regions = np.array([0, 0, 0, 0, 1, 1, 1])
        centres = np.stack([keys[:4].mean(0), keys[4:].mean(0)])
        plain = ((keys[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        assert plain.tolist() == [0, 0, 0, 0, 1, 1, 0]  # what an unguarded Lloyd step would do
        assert refine_by_keys(keys, regions).tolist() == regions.tolist()
        # with a fourth point in part 1 the same move leaves three: taken
        keys4 = np.vstack([keys, [[0.0, 1.0]]])
        assert refine_by_keys(keys4, np.append(regions, 1)).tolist() == [0, 0, 0, 0, 1, 1, 0, 1]

    def test_edge_cases(self):
        assert refine_by_keys(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)).shape == (0,)
        assert refine_by_keys(np.ones((2, 3)), np.array([0, 0])).tolist() == [0, 0]
        with pytest.raises(ValueError, match="one row per entry"):
            refine_by_keys(np.ones((3, 2)), np.array([0, 1]))

    def test_key_descriptors_are_the_points_unit_keys(self):
        grids = [_blocks([1, 2]), _blocks([2, 1], top=7)]
        features = _features(grids)
        points = [torch.tensor([0, 30, 143]), torch.tensor([5])]
        out = key_descriptors(features, points, "cpu")
        keys = features.keys[0]  # (M, H, N, d)
        expected = [keys[i].permute(1, 0, 2).reshape(-1, HEADS * DIM)[p] for i, p in enumerate(points)]
        expected = torch.nn.functional.normalize(torch.cat(expected), dim=-1).double().numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
        # two layers: each layer's unit key, weighted 1 / sqrt(2): unit rows, the layers side by side
        two = CoSegmentationFeatures(features.queries * 2, [keys, -keys], GRID, features.image_sizes)
        both = key_descriptors(two, points, "cpu")
        np.testing.assert_allclose(both, np.concatenate([expected, -expected], 1) / np.sqrt(2), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-6)

    def test_boundary_points_of_a_planted_collection_are_relabelled(self, monkeypatch):
        # the true correspondences of a planted collection (design split), so only step 10 is tested: the spectral
        # clustering of the attention embedding puts 10 boundary points of 370 in a neighbouring part; with the
        # keys' Lloyd iterations every part's points are pure
        case = make_family_case("sectors", 2, 4, seed=21)
        density, links = _oracle_hits(case)

        def misplaced(labels):
            # points not in their true part's majority id
            count = 0
            for part in range(1, 5):
                ids = np.concatenate([labels[i].numpy()[case.token_parts[i].reshape(-1) == part] for i in range(2)])
                ids = ids[ids > 0]
                count += int((ids != np.bincount(ids).argmax()).sum())
            return count

        labels, num_parts = cluster_hits(case.features, density, links, 4, None, "cpu")
        assert num_parts == 4 and misplaced(labels) == 0
        monkeypatch.setattr("cosegment.parts.KEY_ITERATIONS", 0)  # the spectral labels alone
        labels, num_parts = cluster_hits(case.features, density, links, 4, None, "cpu")
        assert num_parts == 4 and misplaced(labels) >= 5


class TestFactoredSpectralClusters:
    def test_matches_spectral_clusters_on_the_product(self):
        rng = np.random.default_rng(0)
        centres = np.kron(np.eye(3), np.ones((1, 4))) + 0.1  # three groups attending mostly to their own columns
        embedding = np.repeat(centres, 7, axis=0) + 0.05 * rng.random((21, 12))
        labels = factored_spectral_clusters(embedding, None, 6)
        assert labels.max() + 1 == 3
        reference = spectral_clusters(embedding @ embedding.T, None, 6)
        # the same partition, block by block
        for block in range(3):
            assert len(set(labels[7 * block : 7 * block + 7])) == 1
        assert len(set(zip(labels.tolist(), reference.tolist()))) == 3
        assert factored_spectral_clusters(embedding, 2, 6).max() + 1 == 2

    def test_bad_input_and_edge_cases(self):
        assert factored_spectral_clusters(np.zeros((0, 4)), None, 3).shape == (0,)
        assert factored_spectral_clusters(np.ones((1, 4)), None, 3).tolist() == [0]
        with pytest.raises(ValueError, match="embedding"):
            factored_spectral_clusters(-np.ones((3, 2)), None, 3)
        with pytest.raises(ValueError, match="embedding"):
            factored_spectral_clusters(np.ones(3), None, 3)
        with pytest.raises(ValueError, match="num_clusters"):
            factored_spectral_clusters(np.ones((3, 2)), 0, 3)

    def test_eigengap_count(self):
        assert eigengap_count(np.array([1.0, 0.99, 0.98, 0.2, 0.1]), 4) == 3
        assert eigengap_count(np.array([1.0, 0.5]), 4) == 1
        # only 2..max_clusters is considered: the gap after the 4th value is out of reach at max_clusters=3
        assert eigengap_count(np.array([1.0, 0.9, 0.85, 0.8, 0.1]), 3) in (2, 3)


@pytest.mark.parametrize("shape", [(60, 25), (25, 60)])
def test_top_left_singular_vectors_from_the_gram_matrix_match_an_svd(shape):
    """Step 10's eigensolver: the Gram matrix of the smaller side gives the SVD's leading values and vectors."""
    from cosegment.utils.segmentation import _top_left_singular

    rng = np.random.default_rng(4)
    b = rng.random(shape) ** 2
    b[:, :3] *= 4.0  # a few strong directions: well separated leading values
    values, vectors = _top_left_singular(b)
    u, s, _ = np.linalg.svd(b, full_matrices=False)
    assert values.shape == (shape[0],) and vectors.shape == (shape[0], min(shape))
    np.testing.assert_allclose(values[: len(s)], s**2, rtol=1e-9, atol=1e-9)
    assert (values[len(s) :] == 0).all()
    overlap = np.abs((vectors[:, :5] * u[:, :5]).sum(axis=0))  # same vectors up to sign
    np.testing.assert_allclose(overlap, 1.0, atol=1e-8)


def test_top_left_singular_leaves_null_directions_at_zero():
    """Rank 2 (more rows than columns): the vectors of (numerically) zero values are zero, not noise
    divided by nearly zero."""
    from cosegment.utils.segmentation import _top_left_singular

    rng = np.random.default_rng(5)
    b = rng.random((40, 2)) @ rng.random((2, 6))  # rank 2, D = 6 < R = 40
    values, vectors = _top_left_singular(b)
    assert values[0] > values[1] > 1e-6 * values[0] and (values[2:] < 1e-9 * values[0]).all()
    np.testing.assert_allclose(np.linalg.norm(vectors[:, :2], axis=0), 1.0, rtol=1e-9)
    assert (vectors[:, 2:] == 0).all()


def test_leading_eigenpairs_match_a_full_eigensolver():
    """Step 10's block Krylov solver: the leading values and vectors of a PSD matrix with a clustered spectrum (four
    values near 1, a slow tail, as the normalised affinity has) are numpy's `eigh`'s."""
    from cosegment.utils.segmentation import _leading_eigenpairs

    rng = np.random.default_rng(7)
    size = 600
    basis = np.linalg.qr(rng.standard_normal((size, size)))[0]
    spectrum = np.concatenate([[1.0, 0.93, 0.9, 0.84], 0.45 * np.exp(-np.linspace(0.0, 12.0, size - 4))])
    matrix = (basis * spectrum) @ basis.T
    values, vectors = _leading_eigenpairs(lambda x: matrix @ x, size, 9)
    expected_values, expected_vectors = np.linalg.eigh(matrix)
    expected_values, expected_vectors = expected_values[::-1][:9], expected_vectors[:, ::-1][:, :9]
    np.testing.assert_allclose(values, expected_values, atol=1e-12)
    np.testing.assert_allclose(values[:4], [1.0, 0.93, 0.9, 0.84], atol=1e-12)
    np.testing.assert_allclose(np.abs((vectors * expected_vectors).sum(0)), 1.0, atol=1e-9)  # up to sign
    # no convergence within the basis allowed: None, for the caller's full eigensolver
    assert _leading_eigenpairs(lambda x: matrix @ x, size, 9, max_basis=32) is None
    assert _leading_eigenpairs(lambda x: matrix @ x, 20, 9) is None  # too small a matrix for a Krylov basis


@pytest.mark.parametrize("shape", [(700, 400), (400, 700)])
def test_top_left_singular_with_a_count_matches_the_full_solver(shape, monkeypatch):
    """Above `KRYLOV_ABOVE` the first `count` values and vectors come from the Krylov solver; they match the full
    Gram eigensolver's (vectors up to sign), on either side of the Gram matrix, and so do the clusters."""
    from cosegment.utils import segmentation

    rng = np.random.default_rng(8)
    embedding = rng.random(shape) ** 8  # sparse-ish non-negative rows
    embedding[: shape[0] // 3, : shape[1] // 3] += 0.5  # three blocks: well separated leading values
    embedding[shape[0] // 3 : 2 * shape[0] // 3, shape[1] // 3 : 2 * shape[1] // 3] += 0.5
    embedding[2 * shape[0] // 3 :, 2 * shape[1] // 3 :] += 0.5
    degree = embedding @ embedding.sum(0)
    b = embedding / np.sqrt(degree)[:, None]
    assert min(shape) > segmentation.KRYLOV_ABOVE
    values, vectors = segmentation._top_left_singular(b, 9)
    assert values.shape == (9,) and vectors.shape == (shape[0], 9)
    full_values, full_vectors = segmentation._top_left_singular(b)
    np.testing.assert_allclose(values, full_values[:9], atol=1e-12)
    np.testing.assert_allclose(values[0], 1.0, atol=1e-12)  # the normalised affinity's top value
    np.testing.assert_allclose(np.abs((vectors * full_vectors[:, :9]).sum(0)), 1.0, atol=1e-9)
    labels = factored_spectral_clusters(embedding, None, 8)
    monkeypatch.setattr(segmentation, "KRYLOV_ABOVE", 10**9)  # the full eigensolver everywhere
    assert np.array_equal(factored_spectral_clusters(embedding, None, 8), labels)
    assert labels.max() + 1 == 3


def test_embedding_of_a_subset_from_the_first_points_blocks_gives_the_same_embedding():
    """Step 10 embeds its points, drops some and embeds the rest: the second embedding, from the attention blocks of
    the first points (`base`), is the one computed afresh (the anchors change too: image 2 loses most points)."""
    from cosegment.analysis import _embedding_and_mass

    grids = [_blocks([1, 2]), _blocks([2, 1], top=7), _blocks([1, 2, 1], top=5, height=4)]
    features = _features(grids)
    points = [torch.from_numpy(np.flatnonzero(g.reshape(-1) > 0)) for g in grids]
    first, mass = _embedding_and_mass(features, points, None, "cpu")
    assert torch.equal(first, collection_embedding(features, points, None, "cpu"))
    assert torch.equal(_embedding_and_mass(features, points, None, "cpu", points)[0], first)
    subset = [points[0][::2], points[1][1:], points[2][:5]]
    again, again_mass = _embedding_and_mass(features, subset, None, "cpu", points)
    blocks = {}  # the blocks held from the first call: the same values as computed again
    assert torch.equal(_embedding_and_mass(features, points, None, "cpu", None, blocks)[0], first)
    held, held_mass = _embedding_and_mass(features, subset, None, "cpu", points, blocks)
    assert torch.equal(held, again) and torch.equal(held_mass, again_mass)
    fresh, fresh_mass = _embedding_and_mass(features, subset, None, "cpu")
    torch.testing.assert_close(again, fresh, rtol=0, atol=1e-7)
    torch.testing.assert_close(again_mass, fresh_mass, rtol=0, atol=1e-7)
    assert again.shape == (6 + 11 + 5, 6 + 11 + 5)


def test_step_11_masks_with_kept_rows_equal_the_masks_computed_each_round(monkeypatch):
    """Step 11 keeps the images' self-attention rows for its rounds when they fit in `STEP11_ROWS_BYTES`; with no
    room for them (rows computed again each round, the path of large grids) the part masks are the same, bit for
    bit, and both are the masks of a design collection's analysis."""
    from cosegment import parts

    case = make_family_case("sectors", 3, 3, seed=12)
    kept = analyze_features(case.features)
    assert parts.STEP11_ROWS_BYTES >= 3 * (32 * 32) ** 2 * 4  # this collection's rows fit: kept
    monkeypatch.setattr(parts, "STEP11_ROWS_BYTES", 0)
    again = analyze_features(case.features)
    assert any((mask > 0).any() for mask in kept.part_masks)
    for a, b in zip(kept.part_masks, again.part_masks):
        assert np.array_equal(a, b)


def test_embedding_refuses_points_that_are_not_subsets_of_the_base_points():
    from cosegment.analysis import _embedding_and_mass

    grids = [_blocks([1, 2]), _blocks([2, 1], top=7)]
    features = _features(grids)
    points = [torch.from_numpy(np.flatnonzero(g.reshape(-1) > 0)) for g in grids]
    base = [points[0][:6], points[1]]
    with pytest.raises(ValueError, match="subsets"):
        _embedding_and_mass(features, points, None, "cpu", base)  # image 0 has points the base lacks
    with pytest.raises(ValueError, match="subsets"):
        _embedding_and_mass(features, [points[0][:6] + 1, points[1]], None, "cpu", base)


def test_step_10_holds_its_attention_blocks_only_when_step_11_holds_its_rows(monkeypatch):
    """Step 10 holds the attention blocks of its first embedding for the later ones when step 11 holds its rows (a
    small collection), else computes them again (a large one: not held at its peak); the parts are the same, bit for
    bit, and only the number of blocks computed differs."""
    from cosegment import parts

    case = make_family_case("sectors", 3, 3, seed=12)
    computed = []
    attention_rows = parts.attention_rows

    def counting(*args, **kwargs):
        if len(args) == 5:  # step 10's blocks, (queries, keys, points of s, points of u, chunk_size); not step 11's
            computed.append(1)
        return attention_rows(*args, **kwargs)

    monkeypatch.setattr(parts, "attention_rows", counting)
    monkeypatch.setattr(parts, "STEP11_ROWS_BYTES", 0)  # nothing held: blocks computed again, rows each round
    again = analyze_features(case.features)
    computed_again = len(computed)
    computed.clear()
    monkeypatch.setattr(parts, "STEP11_ROWS_BYTES", 2**40)
    held = analyze_features(case.features)
    assert 0 < len(computed) < computed_again
    assert any((mask > 0).any() for mask in held.part_masks)
    for a, b in zip(held.part_masks, again.part_masks):
        assert np.array_equal(a, b)
    for a, b in zip(held.keypoints, again.keypoints):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
