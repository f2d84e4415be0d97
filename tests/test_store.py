"""Features on disk and collections of thousands (issue 26): the feature store, memory-mapped features, an analysis
that reads one image at a time, the blocked pair graph, step 10 beyond `MAX_CLUSTER_IMAGES` and masks made when
indexed."""

import math
import os
import weakref

import numpy as np
import pytest
import torch

import cosegment.pairs as pairs_module
import cosegment.parts as parts_module
from cosegment import CoSegmentationFeatures, analyze_features
from cosegment.analysis import image_descriptors, partner_pairs
from cosegment.benchmarks.planted import make_planted_features, make_planted_reference, score_output
from cosegment.store import FeatureStore, LazyFeatures, open_features_file


@pytest.fixture(scope="module")
def planted():
    return make_planted_features(num_images=7, seed=3, grid_size=(8, 8), positional=0.3, anomalies=2)


def _assert_same_features(a: CoSegmentationFeatures, b: CoSegmentationFeatures) -> None:
    assert a.num_images == b.num_images and tuple(a.grid_size) == tuple(b.grid_size)
    assert a.image_sizes == b.image_sizes and a.layer_names == b.layer_names and a.metadata == b.metadata
    for i in range(a.num_images):
        for x, y in zip(a.image(i)[0] + a.image(i)[1], b.image(i)[0] + b.image(i)[1]):
            assert x.dtype == y.dtype and torch.equal(x, y)


def _assert_same_output(a, b) -> None:
    for name in ("density_maps", "entropy_maps", "inverse_error_maps", "sharing", "outliers"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert [(c.source_index, c.target_index) for c in a.correspondences] == [
        (c.source_index, c.target_index) for c in b.correspondences
    ]
    for x, y in zip(a.correspondences, b.correspondences):
        for name in ("source_points", "target_points", "scores", "mutual", "source_tokens", "target_tokens"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name
    for x, y in zip(list(a.part_masks) + list(a.keypoints), list(b.part_masks) + list(b.keypoints)):
        assert np.array_equal(x, y)


def test_store_round_trip(planted, tmp_path):
    features = planted.features
    reference = make_planted_reference(planted, num_images=3)
    features.reference = reference
    try:
        store = FeatureStore.from_features(tmp_path / "store", features, images_per_shard=3)
    finally:
        features.reference = None
    assert [images for _, images in store.shards()] == [[0, 1, 2], [3, 4, 5], [6]]
    assert store.missing() == [] and store.captured().all()
    lazy = store.features()
    assert isinstance(lazy, LazyFeatures) and lazy.reads == [0] * 7  # nothing read before it is needed
    _assert_same_features(lazy, features)
    assert lazy.reads == [1] * 7
    assert lazy.shapes == features.shapes and lazy.dtype == torch.float32
    _assert_same_features(lazy.reference, reference)
    # the whole store into memory, and through `load`
    _assert_same_features(CoSegmentationFeatures.load(tmp_path / "store"), features)
    loaded = CoSegmentationFeatures.load(tmp_path / "store", mmap=True)
    assert isinstance(loaded, LazyFeatures)
    assert all(torch.equal(x, y) for x, y in zip(loaded.queries, features.queries))  # assembled on access


def test_memory_mapped_file(planted, tmp_path):
    features = planted.features
    features.save(tmp_path / "f.safetensors")
    lazy = CoSegmentationFeatures.load(tmp_path / "f.safetensors", mmap=True)
    assert isinstance(lazy, LazyFeatures) and lazy.reference is None
    _assert_same_features(lazy, features)
    # the cache keeps recent images: a second read of image 3 is not counted; without a cache every read is
    lazy.image(3)
    assert lazy.reads[3] == 1
    uncached = open_features_file(tmp_path / "f.safetensors", cache_bytes=0)
    uncached.image(3), uncached.image(3)
    assert uncached.reads[3] == 2
    # a selection of images, in memory
    two = lazy.select([5, 2])
    assert two.num_images == 2 and torch.equal(two.queries[0][0], features.queries[0][5])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a cosegment features file"):
        CoSegmentationFeatures.load(tmp_path / "other.safetensors", mmap=True)
    (tmp_path / "text.safetensors").write_text("not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        CoSegmentationFeatures.load(tmp_path / "text.safetensors", mmap=True)


def test_store_written_by_two_processes_and_resumed(planted, tmp_path):
    features = planted.features
    store = FeatureStore.create(tmp_path / "s", 7, (8, 8), features.layer_names, {"model": "m"})
    # "process 0" writes the even images, "process 1" the odd ones, in batches of two, in any order
    for images in ([0, 2], [1, 3], [5], [4, 6]):
        if images == [5]:
            assert store.missing() == [4, 5, 6]
            with pytest.raises(ValueError, match=r"lacks 3 of its 7 images \(\[4, 5, 6\]\)"):
                store.features()
        index = torch.tensor(images)
        store.write(
            images,
            [q[index] for q in features.queries],
            [k[index] for k in features.keys],
            [features.image_sizes[i] for i in images],
        )
    _assert_same_features(
        store.features(),
        CoSegmentationFeatures(
            features.queries,
            features.keys,
            features.grid_size,
            features.image_sizes,
            features.layer_names,
            {"model": "m"},
        ),
    )
    # a resumed capture opens the same store; one with other settings is refused, naming what differs
    again = FeatureStore.create(tmp_path / "s", 7, (8, 8), features.layer_names, {"model": "m"})
    assert again.missing() == []
    with pytest.raises(ValueError, match="`grid_size`"):
        FeatureStore.create(tmp_path / "s", 7, (4, 16), features.layer_names, {"model": "m"})
    with pytest.raises(ValueError, match="`metadata`"):
        FeatureStore.create(tmp_path / "s", 7, (8, 8), features.layer_names, {"model": "other"})
    # an image written twice (in two shards) is an error
    store.write(3, [q[3:5] for q in features.queries], [k[3:5] for k in features.keys], features.image_sizes[3:5])
    with pytest.raises(ValueError, match="held by two shards"):
        store.features()


def test_store_refuses_bad_batches(planted, tmp_path):
    features = planted.features
    store = FeatureStore.create(tmp_path / "s", 7, (8, 8), features.layer_names)
    q, k = features.queries[0][:2], features.keys[0][:2]
    with pytest.raises(ValueError, match="one tensor per entry"):
        store.write(0, [q, q], [k, k], features.image_sizes[:2])
    with pytest.raises(ValueError, match=r"`queries\[0\]` must be a \(2, H, 64, d\)"):
        store.write([0, 1], [q[:, :, :10]], [k], features.image_sizes[:2])
    with pytest.raises(ValueError, match="distinct indices in"):
        store.write([5, 7], [q], [k], features.image_sizes[:2])
    bad = q.clone()
    bad[1, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        store.write(0, [bad], [k], features.image_sizes[:2])
    with pytest.raises(ValueError, match="one positive"):
        store.write(0, [q], [k], features.image_sizes[:1])
    # a shard cut short is found when an image is read from it
    path = store.write(0, [q], [k], features.image_sizes[:2])
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 100)
    store.write(2, [f[2:] for f in features.queries], [f[2:] for f in features.keys], features.image_sizes[2:])
    lazy = store.features()
    lazy.image(0)
    with pytest.raises(ValueError, match="truncated"):
        lazy.image(1)
    with pytest.raises(FileNotFoundError):
        FeatureStore(tmp_path / "nothing")


@pytest.mark.parametrize("settings", [{}, {"partners": 2, "selection": "paper"}, {"reference": True, "partners": 3}])
def test_analysis_of_features_on_disk_is_bitwise_the_same(planted, tmp_path, settings):
    settings = dict(settings)
    if settings.pop("reference", False):
        settings["reference"] = make_planted_reference(planted, num_images=4)
    planted.features.save(tmp_path / "f.safetensors")
    FeatureStore.from_features(tmp_path / "s", planted.features, images_per_shard=2)
    expected = analyze_features(planted.features, **settings)
    for lazy in (
        CoSegmentationFeatures.load(tmp_path / "f.safetensors", mmap=True),
        FeatureStore(tmp_path / "s").features(cache_bytes=0),
    ):
        _assert_same_output(analyze_features(lazy, **settings), expected)


class _Tracked:
    """Images read as fresh copies, counting how many images' tensors are alive at once."""

    def __init__(self, features: CoSegmentationFeatures):
        self.features, self.alive, self.most = features, {}, 0

    def __call__(self, index: int):
        queries, keys = self.features.image(index)
        queries, keys = [q.clone() for q in queries], [k.clone() for k in keys]
        for tensor in queries + keys:
            self.alive[index] = self.alive.get(index, 0) + 1
            weakref.finalize(tensor, self._dead, index)
        self.most = max(self.most, len(self.alive))
        return queries, keys

    def _dead(self, index: int) -> None:
        self.alive[index] -= 1
        if self.alive[index] == 0:
            del self.alive[index]


def test_analysis_never_holds_every_image(monkeypatch):
    # 24 images, 5 of them clustered together in step 10 (the others each on its own): the analysis reads each image a
    # few times and never holds more than the two images of a pair, the step-10 anchors and the image at hand
    monkeypatch.setattr(parts_module, "MAX_CLUSTER_IMAGES", 5)
    features = make_planted_features(num_images=24, seed=5, grid_size=(8, 8), object_radius=2.5).features
    tracked = _Tracked(features)
    lazy = LazyFeatures(
        tracked, [s[1:] for s in features.shapes], features.dtype, (8, 8), features.image_sizes, cache_bytes=0
    )
    output = analyze_features(lazy, partners=2, clamp_high_norm=False)
    anchors = parts_module.MAX_EMBEDDING_IMAGES
    assert tracked.most <= min(anchors, 5) + 2 < features.num_images
    degree = np.bincount(np.array([(c.source_index, c.target_index) for c in output.correspondences]).ravel())
    # per image: its descriptor, twice per pair (two passes read both images... as source and target), step 10's
    # reads (a few, or once per clustered image for an anchor) and step 11's two rounds
    assert max(r - 2 * d for r, d in zip(lazy.reads, degree)) <= 5 + 8
    assert sum(lazy.reads) <= 2 * degree.sum() + 10 * features.num_images


def test_step_10_beyond_the_clustered_images(monkeypatch):
    case = make_planted_features(num_images=10, seed=7, grid_size=(16, 16), object_radius=4.0)
    full = analyze_features(case.features, partners=3)
    monkeypatch.setattr(parts_module, "MAX_CLUSTER_IMAGES", 4)
    sampled = analyze_features(case.features, partners=3)
    # the same correspondences; parts numbered alike in the clustered images, and every image has some
    _assert_same_output_without_parts(full, sampled)
    assert all(int(np.asarray(m).max()) > 0 for m in sampled.part_masks)
    full_scores, sampled_scores = score_output(case, full), score_output(case, sampled)
    assert sampled_scores["nmi"] > 0.6 and sampled_scores["nmi"] > full_scores["nmi"] - 0.1
    assert sampled_scores["jaccard"] > full_scores["jaccard"] - 0.1


def _assert_same_output_without_parts(a, b) -> None:
    assert np.array_equal(a.density_maps, b.density_maps)
    for x, y in zip(a.correspondences, b.correspondences):
        assert np.array_equal(x.target_points, y.target_points)


def test_masks_made_when_indexed(planted, monkeypatch):
    expected = analyze_features(planted.features, output_type="np")
    monkeypatch.setattr(parts_module, "MASKS_IN_MEMORY_BYTES", 0)
    for output_type in ("np", "pt"):
        lazy = analyze_features(planted.features, output_type=output_type)
        assert isinstance(lazy.part_masks, parts_module.LazyMasks) and len(lazy.part_masks) == 7
        assert isinstance(lazy.part_masks[0], np.ndarray if output_type == "np" else torch.Tensor)
        for mask, part_mask, want_mask, want_parts in zip(
            lazy.masks, lazy.part_masks, expected.masks, expected.part_masks
        ):
            assert np.array_equal(np.asarray(part_mask), want_parts) and np.asarray(part_mask).dtype == np.int64
            assert np.array_equal(np.asarray(mask), want_mask) and np.asarray(mask).dtype == bool
        assert len(lazy.masks[1:3]) == 2


def _old_partner_pairs(descriptors: torch.Tensor, partners: int) -> list[tuple[int, int]]:
    """The pair graph as it was computed from the whole similarity matrix (before issue 26)."""
    num_images = descriptors.shape[0]
    similarity = descriptors @ descriptors.T
    similarity.fill_diagonal_(-math.inf)
    pairs = set()
    for i in range(num_images):
        order = sorted(range(num_images), key=lambda j: (-float(similarity[i, j]), j))
        pairs.update((min(i, j), max(i, j)) for j in order[:partners])
    component = list(range(num_images))

    def root(i):
        while component[i] != i:
            i = component[i]
        return i

    for s, t in pairs:
        component[root(s)] = root(t)
    every = [(s, t) for s in range(num_images) for t in range(s + 1, num_images)]
    for _, s, t in sorted((-float(similarity[s, t]), s, t) for s, t in every if root(s) != root(t)):
        if root(s) != root(t):
            component[root(s)] = root(t)
            pairs.add((s, t))
    return sorted(pairs)


@pytest.mark.parametrize("block_bytes", [2**26, 8 * 40 * 7])
def test_pair_graph_in_blocks_is_the_exact_graph(monkeypatch, block_bytes):
    # clusters of images (so that nearest neighbours leave several groups and bridges are needed), one block of rows
    # or blocks of 7 rows
    monkeypatch.setattr(pairs_module, "PARTNER_BLOCK_BYTES", block_bytes)
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 5, generator=generator)
    directions = centres.repeat_interleave(7, dim=0)[:40] + 0.2 * torch.randn(40, 5, generator=generator)
    tokens = directions[:, None, None, :].expand(40, 1, 4, 5).contiguous()
    features = CoSegmentationFeatures([tokens], [tokens.clone()], (2, 2), [(8, 8)] * 40)
    descriptors = image_descriptors(features).double()
    for partners in (1, 2, 4):
        assert partner_pairs(features, partners) == _old_partner_pairs(descriptors, partners)
    # every image alike: every similarity 0, every tie to the lower index
    same = CoSegmentationFeatures(
        [tokens[:1].expand(9, -1, -1, -1)], [tokens[:1].expand(9, -1, -1, -1)], (2, 2), [(8, 8)] * 9
    )
    # image 0's two nearest are 1 and 2, image 1's 0 and 2, every other image's 0 and 1; connected: no bridge
    expected = sorted({(0, 1), (0, 2), (1, 2)} | {(s, i) for i in range(3, 9) for s in (0, 1)})
    assert partner_pairs(same, 2) == _old_partner_pairs(image_descriptors(same).double(), 2) == expected
