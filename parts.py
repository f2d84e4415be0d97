# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""Parts and co-segmentation (DESIGN steps 10-11): the hit tokens of every image clustered into parts over the whole
collection at once (step 10, :func:`cluster_hits`), each part's centre (:func:`part_keypoints`), and every token
assigned to the part of nearest self-attention distribution, or to the background (step 11, :func:`segment_parts`).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .features import CoSegmentationFeatures, PairCorrespondence, _image_features
from .store import LazyFeatures, trim_memory
from .utils.joining import token_centres_in_pixels
from .utils.segmentation import (
    assign_parts,
    attention_rows,
    background_threshold_from_kl,
    factored_spectral_clusters,
    grow_by_one_token,
    parts_and_divergences,
    remove_isolated,
    upsample_assignment,
)

# Hit regions smaller than this many tokens are isolated hits (noise) and dropped before clustering (step 10); a
# part of fewer points is dropped too. 3: a lone hit or a touching pair is what a chance match leaves. Never varied:
# every measurement in BENCHMARKS.md used this value.
MIN_REGION_TOKENS = 3
# Step 11 re-estimates the part distributions from the tokens assigned to them this many times: the clustered points
# are mostly inner tokens, so the first distributions under-weight the object's outline. Each round may move the
# foreground's outline by one token at most (BENCHMARKS.md (o): without that bound one background token assigned in
# the first round drew its whole background region into the part). One round: without it design part NMI fell by up
# to 0.016 (parts rows) and 0.052 (SD rows); two or more were not measured.
SEGMENTATION_REFINEMENTS = 1
# Step 11 keeps every image's self-attention rows (`M N^2` float32) for its rounds when they fit in this many bytes
# (M = 64 images of 32 x 32 tokens, or 4 of 64 x 64); else it computes them again in each round (same values).
STEP11_ROWS_BYTES = 2**28
# Step 10: the columns of the collection embedding are the hit tokens of at most this many images (those with most
# hits), so its width, and the cost of the clustering, stop growing with M beyond them.
MAX_EMBEDDING_IMAGES = 8
# Step 10 clusters the hit points of at most this many images together (those with most hit points; ties to the lower
# index), so that its memory and time stop growing with M: its embedding and spectral factors take about 12 MiB per
# clustered image at N = 1024 (400 MiB for 32 planted images, measured). Each other image's points then go through the
# same tests on their own, with the clustered points' statistics (:func:`assign_points`). 16: every collection the
# benchmarks and tests score (M <= 16) is clustered whole, as before; BENCHMARKS.md (s) measures larger ones.
MAX_CLUSTER_IMAGES = 16
# Step 11 returns the masks as lists up to this many bytes of int64 part ids at the images' own sizes (64 images of
# 512 x 512 px, 16 of 1024 x 1024); beyond, as sequences that make each image's mask when indexed ([`LazyMasks`]):
# at full size the masks of a large collection outweigh its features.
MASKS_IN_MEMORY_BYTES = 2**27
# Step 10b copies the linked embedding rows this many bytes at a time (`link_by_correspondences`).
LINK_CHUNK_BYTES = 2**24
# Step 10: the largest part count the estimate considers (num_parts=None).
MAX_PARTS = 8
# Step 10: a clustered point less than this share as similar to its part as the part's median point is dropped
# (`typical_points`). 0.5 was first read off one planted test collection (`benchmarks/planted.py`, seed 3001: three
# stray off-object points scored 0.14-0.16 against part medians of 0.46-0.48, object points at least 0.19), then
# checked, not tuned, on the design split only (`benchmarks/families.py --split design --tables parts`, sectors and
# blobs, M = 2/4/8) against 0 (off): part NMI +0.001 on average over the 6 rows with 3 collections per row (-0.0003
# with 6), no row down by more than 0.003; Jaccard +0.04 on average (+0.03 with 6; up to +0.08, blobs M = 8). It is
# kept for the masks, not the parts. No other value was tried.
TYPICAL_POINT_SHARE = 0.5
# Step 10: a hit point whose attention mass on the anchor images' points is less than this share of the median
# point's is a stray hit off the object and is dropped before the clustering (`attached_points`). Read off the design
# split only (`benchmarks/families.py --split design`, hidden-part and clean SD cells, seeds 600-602 and 740-742):
# the object's points scored 0.44 and more (5th percentile 0.64 or more), stray background points 0.09-0.58 (most
# under 0.42). Checked on design only, 6 collections per row, against no such test: mask Jaccard parts rows 0.877 vs
# 0.820, hidden-part row 0.873 vs 0.786, SD rows 0.782 vs 0.728; part NMI 0.788 vs 0.788, 0.768 vs 0.773, 0.715 vs
# 0.716. Also tried: 0.4 (3 per row: Jaccard lower, hidden 0.879 vs 0.895 and SD clean M = 2 0.777 vs 0.874) and
# 0.6 (6 per row: Jaccard 0.882 / 0.903 / 0.788, NMI 0.790 / 0.766 / 0.709).
ATTACHED_SHARE = 0.5
# Step 10: at most this many Lloyd iterations on the points' keys after the spectral clustering (`refine_by_keys`).
# A cap, not a tuned value: on the design split (BENCHMARKS.md (l4)) 1, 3 and 20 gave the same parts table.
KEY_ITERATIONS = 10


def collection_embedding(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    chunk_size: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Step 10a: one Hellinger embedding of every image's clustered `points` (a list of `(P_i,)` token indices), so
    that tokens of different images can be compared.

    A point p of image s is described, for each anchor image u (the `MAX_EMBEDDING_IMAGES` images with most points,
    s among them when it is one), by its attention over u's points, `A_su[p, points_u]` renormalised to sum to 1
    (cross self-attention for `u != s`, its own self-attention for `u = s`); the embedding is the square roots of
    these distributions side by side, each block divided by sqrt(#anchors). The dot product of two points' embeddings
    is then the mean over anchors of the Bhattacharyya coefficient of their distributions over the anchor's points:
    two tokens are alike when they attend to the same tokens of the same images, whichever image they sit in.

    Returns:
        `(R, D)` float32 on `device`, rows in image order (`R = sum P_i`, `D = sum of P_u over the anchors`).
    """
    return _embedding_and_mass(features, points, chunk_size, device)[0]


def _embedding_and_mass(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    chunk_size: int | None,
    device: torch.device,
    base: list[torch.Tensor] | None = None,
    blocks: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`collection_embedding` `(R, D)` and each point's attention mass on the anchors' points before the
    renormalisation `(R, len(anchors))`.

    `base` (step 10 embeds the points, drops some and embeds the rest again): the points of the first embedding, of
    which `points` are subsets (per image, ascending token indices, as :func:`_keep_points` leaves them). Each
    attention block (image s's rows over anchor u's points) is then computed for the `base` points, as in the first
    embedding, and its rows and columns of `points` taken: each row is its own softmax over every token of u, so the
    values are the first embedding's (a new computation for fewer points may differ in the last bit: the matrix
    product of a block of fewer than about 4 rows may take another BLAS path). `blocks`, a dict kept between the
    calls (the first one without `base`), holds each block `(s, u)` once computed, for the later calls to take it
    from; without it the blocks are computed again in each call, which keeps them out of step 10's peak (one more
    `(R, D)` float32 array) at the cost of their computation."""
    sizes = [p.numel() for p in points]
    anchors = _anchors(sizes)
    where = [None] * len(points)
    if base is not None:
        where = [
            torch.searchsorted(b, p.contiguous()) if b.numel() != p.numel() else None for b, p in zip(base, points)
        ]
        for b, p, w in zip(base, points, where):
            found = b if w is None else b[w.clamp_max(b.numel() - 1)] if b.numel() else b
            if found.shape != p.shape or not torch.equal(found, p):
                raise ValueError("`points` must be subsets of the `base` points.")
    source = points if base is None else base
    offsets = np.cumsum([0] + sizes).tolist()
    columns = np.cumsum([0] + [sizes[u] for u in anchors]).tolist()
    embedding = torch.empty(offsets[-1], columns[-1], device=device)  # written block by block: no second copy
    mass = torch.empty(offsets[-1], len(anchors), device=device)
    for s in range(features.num_images):
        queries = None
        for j, u in enumerate(anchors):
            rows = None if blocks is None else blocks.get((s, u))
            if rows is None:
                if queries is None:
                    queries, _ = _image_features(features, s, device)
                _, keys = _image_features(features, u, device)
                rows = attention_rows(queries, keys, source[s], source[u], chunk_size)
                if blocks is not None:
                    blocks[(s, u)] = rows
            rows = rows if where[s] is None else rows[where[s]]
            rows = rows if where[u] is None else rows[:, where[u]]
            mass[offsets[s] : offsets[s + 1], j] = rows.sum(dim=1)
            rows = rows / rows.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            embedding[offsets[s] : offsets[s + 1], columns[j] : columns[j + 1]] = rows.sqrt() / math.sqrt(len(anchors))
    return embedding, mass


def _anchors(sizes: list[int]) -> list[int]:
    """The anchor images of :func:`collection_embedding`: the `MAX_EMBEDDING_IMAGES` images with most points (ties to
    the lower index) that have any, ascending."""
    anchors = sorted(np.argsort([-n for n in sizes], kind="stable")[:MAX_EMBEDDING_IMAGES].tolist())
    return [u for u in anchors if sizes[u] > 0]


def attached_points(mass: np.ndarray) -> np.ndarray:
    """Step 10c (start): `(R,)` bool, False for a point whose attention mass on the anchor images' points (`mass`
    `(R, U)`, one column per anchor; each column divided by its median over all points, then averaged over the
    anchors) is under `ATTACHED_SHARE`. An object token attends mostly to the object, where the other points are;
    a stray hit off the object attends to the background. The embedding renormalises each distribution over the
    points, which hides this, so such a point is clustered like any other and in step 11 stretches its part's
    distribution over the background."""
    if mass.shape[0] == 0 or mass.shape[1] == 0:
        return np.ones(mass.shape[0], dtype=bool)
    median = np.median(mass, axis=0, keepdims=True)
    relative = (mass / np.maximum(median, np.finfo(np.float64).tiny)).mean(axis=1)
    return relative >= ATTACHED_SHARE


def link_by_correspondences(
    embedding: torch.Tensor,
    points: list[torch.Tensor],
    correspondences: list[PairCorrespondence],
    num_tokens: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 10b: the kept correspondences tie the points of different images together: each point's row of
    `embedding` `(R, D)` (rows in image order, `points` a list of `(P_i,)` token indices) becomes the mean of its own
    row and the rows of the points it is matched to (in any pair, either pass; a link counted once). Returns
    `(R, D)`, written in `out` when given (same shape and dtype, not `embedding` itself)."""
    offsets = np.cumsum([0] + [p.numel() for p in points]).tolist()
    device = embedding.device
    rows_of = []  # per image: (N,) row of each token in `embedding`, -1 for a token that is no point
    for i, image_points in enumerate(points):
        rows = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        rows[image_points] = torch.arange(offsets[i], offsets[i + 1], device=device)
        rows_of.append(rows)
    links = [torch.zeros(2, 0, dtype=torch.long, device=device)]
    for pair in correspondences:
        a = rows_of[pair.source_index][pair.source_tokens.to(device)]
        b = rows_of[pair.target_index][pair.target_tokens.to(device)]
        both = (a >= 0) & (b >= 0)
        links += [torch.stack([a[both], b[both]]), torch.stack([b[both], a[both]])]
    links = torch.unique(torch.cat(links, dim=1), dim=1)
    total = embedding.clone() if out is None else out.copy_(embedding)
    step = max(1, LINK_CHUNK_BYTES // max(1, embedding.shape[1] * embedding.element_size()))
    for start in range(0, links.shape[1], step):  # the same sums in the same order, a bounded copy at a time
        total.index_add_(0, links[0, start : start + step], embedding[links[1, start : start + step]])
    count = 1.0 + torch.bincount(links[0], minlength=embedding.shape[0]).to(embedding.dtype)
    return total.div_(count[:, None])


def _linked_float64(
    make_embedding: Callable[[], torch.Tensor],
    points: list[torch.Tensor],
    correspondences: list[PairCorrespondence],
    num_tokens: int,
) -> np.ndarray:
    """`link_by_correspondences(make_embedding(), ...)` as a float64 array `(R, D)` (the spectral clustering's input),
    the same values as `.double()` of it, in the memory of two float32 copies rather than three (the linked float32
    array beside its float64 copy): on the CPU, the linked rows are written as float32 in the first half of the
    float64 array's bytes (its other pages not yet touched), the unlinked rows freed, and each value then widened in
    place, from the last rows back (row i's float64 bytes are float32 rows 2i and 2i + 1, widened already)."""
    embedding = make_embedding()
    if embedding.device.type != "cpu":
        return link_by_correspondences(embedding, points, correspondences, num_tokens).double().cpu().numpy()
    rows, width = embedding.shape
    wide = np.empty((rows, width), dtype=np.float64)
    narrow = wide.reshape(-1).view(np.float32)[: rows * width].reshape(rows, width)
    link_by_correspondences(embedding, points, correspondences, num_tokens, out=torch.from_numpy(narrow))
    del embedding
    end = rows
    while end > 1:
        start = (end + 1) // 2  # rows start..end-1 widen into float32 rows 2 start.. 2 end - 1, past `end`: no overlap
        wide[start:end] = narrow[start:end]
        end = start
    if rows:
        wide[0] = narrow[0].copy()
    return wide


def _keep_points(
    points: list[torch.Tensor], regions: np.ndarray, keep: np.ndarray
) -> tuple[list[torch.Tensor], np.ndarray]:
    """`points` (per image, in the order of `regions` `(R,)`) and `regions` where `keep` `(R,)` bool."""
    offsets = np.cumsum([0] + [p.numel() for p in points])
    kept = [p[torch.from_numpy(keep[offsets[i] : offsets[i + 1]]).to(p.device)] for i, p in enumerate(points)]
    return kept, regions[keep]


def typical_points(embedding: np.ndarray, regions: np.ndarray, centres: dict | None = None) -> np.ndarray:
    """Step 10c (end): `(R,)` bool, False for a point less than `TYPICAL_POINT_SHARE` times as similar to its part
    (cosine to the mean `embedding` row of the part) as the part's median point. Such points are mostly stray hits
    off the object that the clustering had to put somewhere: in step 11 they would stretch their part's distribution
    over the background. `centres`, when given, receives per part its unit mean row and median similarity (to test
    other points the same way)."""
    keep = np.ones(regions.shape[0], dtype=bool)
    for part in np.unique(regions):
        members = regions == part
        rows = embedding[members]  # unit rows of one part at a time: no unit copy of the whole `(R, D)` embedding
        unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        del rows
        centre = unit.mean(0)
        similarity = unit @ (centre / max(np.linalg.norm(centre), 1e-12))
        del unit
        keep[members] = similarity >= TYPICAL_POINT_SHARE * np.median(similarity)
        if centres is not None:
            centres[int(part)] = (centre / max(np.linalg.norm(centre), 1e-12), float(np.median(similarity)))
    return keep


def key_descriptors(features: CoSegmentationFeatures, points: list[torch.Tensor], device: torch.device) -> np.ndarray:
    """Step 10c: `(R, D)` float64, each clustered point's own key (rows in image order, `points` a list of `(P_i,)`
    token indices). Per captured layer (and noise draw) the token's key with the heads concatenated (`H * d`), scaled
    to unit length; the layers' keys concatenated, each weighted `1 / sqrt(layers)`, so rows have unit length and a
    squared distance is the mean over layers of the squared distance of unit keys (with one layer, the descriptor of
    the joint k-means baseline, `benchmarks/families.py` `joint_kmeans_parts`)."""
    rows = []
    for i, image_points in enumerate(points):
        _, keys = _image_features(features, i, device)
        rows.append(_key_rows(keys, image_points.to(device), numpy=False))
    return torch.cat(rows).double().cpu().numpy()


def _key_rows(keys: list[torch.Tensor], points: torch.Tensor, numpy: bool = True) -> torch.Tensor | np.ndarray:
    """The rows of :func:`key_descriptors` for one image's `(H, N, d)` `keys` at its `points` `(P,)`: `(P, D)`."""
    layers = [torch.nn.functional.normalize(k.float().permute(1, 0, 2).flatten(1)[points], dim=-1) for k in keys]
    rows = torch.cat(layers, dim=1) / math.sqrt(len(keys))  # (P, layers * H * d)
    return rows.double().cpu().numpy() if numpy else rows


def refine_by_keys(descriptors: np.ndarray, regions: np.ndarray, iterations: int | None = None) -> np.ndarray:
    """Step 10c: Lloyd (k-means) iterations on the points' keys (`descriptors` `(R, D)`, :func:`key_descriptors`)
    started from the spectral parts `regions` `(R,)`: each part's centre is the mean key of its points, each point
    goes to the nearest centre (squared Euclidean), until no point moves or after `iterations` steps (default
    `KEY_ITERATIONS`; 0 keeps `regions`). A step that
    would leave a part with fewer than `MIN_REGION_TOKENS` points (or fewer than it had, if it had fewer) is not
    taken, so the count stays the one the clustering found (or `num_parts`). Returns the new `(R,)` parts.

    Why: a token's attention row concentrates on the tokens most like it, so near a part boundary it reaches across
    the boundary and its collection embedding lies between the two parts; the spectral clustering, which reads that
    embedding, then puts some boundary points in the neighbouring part, and step 11 spreads the error (a part's
    distribution is the mean of its points' attention rows). A key is linear in the token's own feature, so the part
    under the token keeps its full weight there. The spectral clustering keeps what it does well (the count, and
    parts tied across images through attention and correspondences); the keys only move points between its parts.
    Measured on the design split (BENCHMARKS.md (l4)): where the method was below joint k-means, step 10 had put
    1-3% of its points in the wrong part, all next to a part boundary, while k-means' labels of the same points were
    exact; with this refinement the two agree there.
    """
    labels = np.asarray(regions, dtype=np.int64).copy()
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"`descriptors` {x.shape} must have one row per entry of `regions` {labels.shape}.")
    if labels.size == 0:
        return labels
    num_parts = int(labels.max()) + 1
    squared = (x * x).sum(1, keepdims=True)
    for _ in range(KEY_ITERATIONS if iterations is None else int(iterations)):
        counts = np.bincount(labels, minlength=num_parts)
        present = counts > 0
        centres = np.zeros((num_parts, x.shape[1]))
        np.add.at(centres, labels, x)
        centres[present] /= counts[present, None]
        distance = squared - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
        distance[:, ~present] = np.inf
        moved = distance.argmin(1)
        if (moved == labels).all():
            break
        if (np.bincount(moved, minlength=num_parts) < np.minimum(counts, MIN_REGION_TOKENS)).any():
            break
        labels = moved
    return labels


def cluster_collection(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    correspondences: list[PairCorrespondence],
    num_parts: int | None,
    chunk_size: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], np.ndarray]:
    """Step 10c: the clustered `points` of **every** image (a list of `(P_i,)` token indices) grouped into parts at
    once: spectral clustering (:func:`factored_spectral_clusters`) of the affinity `E E^T` of their collection
    embedding (:func:`collection_embedding`) tied by the kept correspondences (:func:`link_by_correspondences`).
    Hit points attending little to the other points are dropped first (:func:`attached_points`). With
    `num_parts=None` the count is the largest eigengap of that joint affinity among 2..`MAX_PARTS`. A part of
    fewer than `MIN_REGION_TOKENS` points (over the collection) is noise: its points are dropped and the rest
    clustered again. The points then move between these parts by Lloyd iterations on their own keys
    (:func:`refine_by_keys`, :func:`key_descriptors`): attention reaches across part boundaries, keys do not, so this
    corrects the boundary points the embedding misplaces, without changing the count. Last, points far from their
    part's typical point are dropped (:func:`typical_points`).

    No image is a reference: every point is described in the same coordinates (its attention over the anchor images'
    points), so the clustering sees all images at once and its ids are shared by construction, with no vote to carry
    them. Measured on the planted families (BENCHMARKS.md (l)): the estimated count is steadier than with one
    reference image, but held-out part NMI stays at 0.74-0.85 and an outlier image's stray hits join the parts.

    Returns the kept points per image and their parts `(P'_i,)`, numbered `0..K-1` over the collection (one id, one
    part in every image; a part may have no point in some image).
    """
    # the attention blocks held between the embeddings when step 11 would hold more (its rows): the peak is step 11's
    # then; else computed again for each embedding (the same values)
    hold = _step11_holds_rows(features.num_images, features.grid_size[0] * features.grid_size[1])
    return _cluster_points(features, points, correspondences, num_parts, chunk_size, device, hold)[:2]


@dataclass
class PartModel:
    """What step 10 learnt from the images it clustered, to give the points of the other images their parts
    (:func:`assign_points`). Image indices are those of the clustered features.

    Attributes:
        mass_anchors (`list[tuple[int, torch.Tensor]]`): the anchor images and points of the first embedding, whose
            mass decides :func:`attached_points`; `mass_median` `(U,)`: the clustered points' median mass on each
            (`None` when the test was not applied).
        anchors (`list[tuple[int, torch.Tensor]]`): the anchor images and points of the final embedding.
        centres (`np.ndarray`): `(K, D)` unit mean embedding row of each part; `typical` `(K,)` its points' median
            similarity to it (:func:`typical_points`).
        key_centres (`np.ndarray`): `(K, D_k)` mean key descriptor of each part's points (:func:`key_descriptors`).
    """

    mass_anchors: list
    mass_median: np.ndarray | None
    anchors: list
    centres: np.ndarray
    typical: np.ndarray
    key_centres: np.ndarray


def _cluster_points(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    correspondences: list[PairCorrespondence],
    num_parts: int | None,
    chunk_size: int | None,
    device: torch.device,
    hold_blocks: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], PartModel]:
    """:func:`cluster_collection`, and the [`PartModel`] it leaves (for :func:`assign_points`). `hold_blocks`: the
    first embedding's attention blocks are held for the later ones (else computed again: the same values)."""
    num_tokens = features.grid_size[0] * features.grid_size[1]
    base = points  # the points of the first embedding, whose attention blocks later embeddings take theirs from
    mass_anchors = [(u, points[u]) for u in _anchors([p.numel() for p in points])]
    blocks = {} if hold_blocks else None
    mass = _embedding_and_mass(features, points, chunk_size, device, None, blocks)[1].double().cpu().numpy()
    trim_memory()  # between the large steps below, so that what one frees is not counted twice
    attached = attached_points(mass)
    mass_median = None
    if attached.sum() >= 2:
        points = _keep_points(points, np.zeros(attached.shape[0], dtype=np.int64), attached)[0]
        mass_median = np.median(mass, axis=0)
    while True:
        embedding = _linked_float64(  # float64, which the clustering divides in place
            lambda: _embedding_and_mass(features, points, chunk_size, device, base, blocks)[0],
            points,
            correspondences,
            num_tokens,
        )
        trim_memory()
        total = embedding.shape[0]
        regions = factored_spectral_clusters(embedding, num_parts, min(MAX_PARTS, max(1, total - 1)), overwrite=True)
        del embedding
        trim_memory()
        small = np.bincount(regions)[regions] < MIN_REGION_TOKENS
        if not small.any() or small.all():
            break
        points, regions = _keep_points(points, regions, ~small)
    # the last embedding again (the same values), rather than a copy held through the clustering
    embedding = _linked_float64(
        lambda: _embedding_and_mass(features, points, chunk_size, device, base, blocks)[0],
        points,
        correspondences,
        num_tokens,
    )
    blocks = None
    anchors = [(u, points[u]) for u in _anchors([p.numel() for p in points])]
    descriptors = key_descriptors(features, points, device)
    regions = refine_by_keys(descriptors, regions)
    centres = {}
    typical = typical_points(embedding, regions, centres)
    embedding_width = embedding.shape[1]
    del embedding
    points, regions = _keep_points(points, regions, typical)
    ids, regions = np.unique(regions, return_inverse=True)
    regions = regions.reshape(-1)
    width = (descriptors.shape[1], embedding_width)
    model = PartModel(
        mass_anchors,
        mass_median,
        anchors,
        np.stack([centres[int(part)][0] for part in ids]) if len(ids) else np.zeros((0, width[1])),
        np.array([centres[int(part)][1] for part in ids]),
        np.stack([descriptors[typical][regions == k].mean(0) for k in range(len(ids))])
        if len(ids)
        else np.zeros((0, width[0])),
    )
    offsets = np.cumsum([0] + [p.numel() for p in points])
    return points, [torch.from_numpy(regions[offsets[i] : offsets[i + 1]]) for i in range(len(points))], model


def assign_points(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    points: torch.Tensor,
    anchor_keys: dict[int, list[torch.Tensor]],
    model: PartModel,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 10 for an image that was not clustered with the others (collections of more than `MAX_CLUSTER_IMAGES`):
    its hit `points` `(P,)` go through the tests the clustered points went through, with the clustered points'
    statistics (`model`, [`PartModel`]): a point attending less than `ATTACHED_SHARE` as much as their median to the
    anchors' points is dropped (:func:`attached_points`); a kept one takes the part of nearest key centre (the rule
    the clustered points end with, :func:`refine_by_keys`), and is dropped when it is less than `TYPICAL_POINT_SHARE`
    times as similar to that part's mean embedding row as the part's median point (:func:`typical_points`).

    Args:
        queries, keys: the image's `(H, N, d)` per entry; `anchor_keys`: each anchor image's keys.

    Returns:
        the kept points `(P',)` and their parts `(P',)` (`0..K-1`).
    """
    empty = points[:0]
    if points.numel() == 0 or model.centres.shape[0] == 0:
        return empty, empty
    used = sorted({u for u, _ in model.mass_anchors} | {u for u, _ in model.anchors})
    rows = {u: attention_rows(queries, anchor_keys[u], points, None, chunk_size) for u in used}  # (P, N) each
    keep = torch.ones(points.numel(), dtype=torch.bool)
    if model.mass_median is not None:
        mass = torch.stack([rows[u][:, p].sum(dim=1) for u, p in model.mass_anchors], dim=1).double().cpu().numpy()
        relative = (mass / np.maximum(model.mass_median[None], np.finfo(np.float64).tiny)).mean(axis=1)
        keep = torch.from_numpy(relative >= ATTACHED_SHARE)
    points = points[keep.to(points.device)]
    if points.numel() == 0:
        return empty, empty
    blocks = []
    for u, anchor_points in model.anchors:
        block = rows[u][keep.to(rows[u].device)][:, anchor_points]
        block = block / block.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        blocks.append(block.sqrt() / math.sqrt(len(model.anchors)))
    embedding = torch.cat(blocks, dim=1).double().cpu().numpy()
    descriptors = _key_rows(keys, points)
    distance = ((descriptors[:, None, :] - model.key_centres[None]) ** 2).sum(-1)
    parts = distance.argmin(axis=1)
    unit = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    similarity = (unit * model.centres[parts]).sum(axis=1)
    typical = torch.from_numpy(similarity >= TYPICAL_POINT_SHARE * model.typical[parts])
    return points[typical.to(points.device)], torch.from_numpy(parts)[typical]


def cluster_hits(
    features: CoSegmentationFeatures,
    density: torch.Tensor,
    correspondences: list[PairCorrespondence],
    num_parts: int | None,
    chunk_size: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], int]:
    """Step 10. Per image, its hit tokens (`density` `(M, N)` > 0) minus isolated ones (regions under
    `MIN_REGION_TOKENS`); then the points of all images are clustered together into K parts
    (:func:`cluster_collection`), numbered 1..K. No image is a reference: one id is one part in every image, and a
    part that one image lacks (hidden, or without hits there) still exists in the others. In a collection of more
    than `MAX_CLUSTER_IMAGES` images, the points of the `MAX_CLUSTER_IMAGES` images with most points are clustered
    together, and each other image's points then take their parts on their own (:func:`assign_points`).

    Returns one `(N,)` long label tensor per image (0 = not a clustered point) and the number of parts K.
    """
    num_images, grid = features.num_images, features.grid_size
    num_tokens = grid[0] * grid[1]
    hits = (density > 0).view(num_images, *grid).cpu().numpy()
    points = [
        torch.from_numpy(np.flatnonzero(remove_isolated(hits[i], MIN_REGION_TOKENS))).to(device)
        for i in range(num_images)
    ]
    labels = [torch.zeros(num_tokens, dtype=torch.long, device=device) for _ in range(num_images)]
    if sum(p.numel() for p in points) < 2:
        return labels, 0
    sizes = [p.numel() for p in points]
    clustered = sorted(np.argsort([-n for n in sizes], kind="stable")[:MAX_CLUSTER_IMAGES].tolist())
    if len(clustered) < num_images:
        return _cluster_some(features, points, clustered, correspondences, num_parts, chunk_size, device)
    points, regions = cluster_collection(features, points, correspondences, num_parts, chunk_size, device)
    trim_memory()
    for image_labels, image_points, image_regions in zip(labels, points, regions):
        image_labels[image_points] = image_regions.to(device) + 1
    return labels, int(max(int(r.max()) for r in regions if r.numel()) + 1)


def _cluster_some(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    clustered: list[int],
    correspondences: list[PairCorrespondence],
    num_parts: int | None,
    chunk_size: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], int]:
    """:func:`cluster_hits` for more images than the clustering takes: the points of the `clustered` images (ascending)
    are clustered together (:func:`cluster_collection`, their correspondences tying them), then each other image's
    points are given their parts on their own (:func:`assign_points`), one image read at a time."""
    num_tokens = features.grid_size[0] * features.grid_size[1]
    labels = [torch.zeros(num_tokens, dtype=torch.long, device=device) for _ in range(features.num_images)]
    position = {image: i for i, image in enumerate(clustered)}
    linked = [
        replace(pair, source_index=position[pair.source_index], target_index=position[pair.target_index])
        for pair in correspondences
        if pair.source_index in position and pair.target_index in position
    ]
    subset = LazyFeatures(
        lambda i: features.image(clustered[i]),
        [shape[1:] for shape in features.shapes],
        features.dtype,
        features.grid_size,
        [features.image_sizes[i] for i in clustered],
        list(features.layer_names),
        device=features.device,
        cache_bytes=0,
        check_values=False,  # read from `features`, which checked them
    )
    kept, regions, model = _cluster_points(
        subset,
        [points[i] for i in clustered],
        linked,
        num_parts,
        chunk_size,
        device,
        _step11_holds_rows(features.num_images, num_tokens),  # of the whole collection, as step 11 decides
    )
    trim_memory()
    for image, image_points, image_regions in zip(clustered, kept, regions):
        labels[image][image_points] = image_regions.to(device) + 1
    model.mass_anchors = [(clustered[u], p) for u, p in model.mass_anchors]
    model.anchors = [(clustered[u], p) for u, p in model.anchors]
    anchor_keys = {u: features.image(u)[1] for u, _ in model.mass_anchors + model.anchors}
    for image in range(features.num_images):
        if image not in position:
            queries, keys = _image_features(features, image, device)
            image_points, image_parts = assign_points(queries, keys, points[image], anchor_keys, model, chunk_size)
            labels[image][image_points] = image_parts.to(device) + 1
            trim_memory()
    return labels, int(model.centres.shape[0])


def part_keypoints(
    labels: list[torch.Tensor], features: CoSegmentationFeatures, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step 10 (end): per image, each part's centre `(K_i, 2)` (x, y in the image's own pixels: the mean of the
    part's clustered tokens) and the part ids `(K_i,)`, ascending."""
    keypoints, keypoint_parts = [], []
    for image_labels, size in zip(labels, features.image_sizes):
        ids = torch.unique(image_labels[image_labels > 0])
        centres = [
            token_centres_in_pixels(torch.nonzero(image_labels == k).flatten(), features.grid_size, size)
            for k in ids.tolist()
        ]
        keypoints.append(torch.stack([c.mean(0) for c in centres]) if centres else torch.zeros(0, 2, device=device))
        keypoint_parts.append(ids.long())
    return keypoints, keypoint_parts


def part_divergences(
    features: CoSegmentationFeatures,
    labels: list[torch.Tensor],
    num_parts: int,
    chunk_size: int | None,
    device: torch.device,
    rows: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Step 11a: per image, each part's distribution is the mean of its labelled tokens' self-attention rows; every
    token gets its KL(token row || part) to each part, `(N, K)` per image (`inf` for a part absent there).

    `rows`: per image its `(N, N)` self-attention rows (:func:`attention_rows`), when the caller keeps them for
    several calls (:func:`segment_parts`); the same values, computed here otherwise."""
    divergences = []
    for i in range(features.num_images):
        queries, keys = _image_features(features, i, device)
        image_rows = None if rows is None else rows[i]
        kl = parts_and_divergences(queries, keys, labels[i], num_parts, chunk_size, image_rows)[1]
        present = torch.bincount(labels[i], minlength=num_parts + 1)[1:] > 0
        divergences.append(kl.masked_fill(~present[None, :], math.inf))
        if image_rows is None:  # the image's attention rows were computed here: give them back
            trim_memory()
    return divergences


def segment_parts(
    features: CoSegmentationFeatures,
    labels: list[torch.Tensor],
    num_parts: int,
    background_threshold: float | None,
    chunk_size: int | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """Step 11. Every token goes to the part of nearest distribution in KL (:func:`part_divergences`), or to the
    background when its smallest KL exceeds `background_threshold` (`None`: the minimum-error cut of
    log(1 + smallest KL) over the collection). The distributions are then re-estimated from every token assigned to
    a part (`SEGMENTATION_REFINEMENTS` times) and the tokens assigned again, the foreground now limited to the
    previous one and its 8 neighbours (:func:`grow_by_one_token`): the re-estimate brings in the outline that the
    clustered (inner) points under-weight, and the bound keeps it from growing further, since a background token
    assigned to a part in one round makes its part's distribution attend to that token's background region, whose
    other tokens would then join the part in the next. At each image's own size a pixel takes
    the label its tokens vote for (:func:`upsample_assignment`: foreground and part indicators smoothed by a Gaussian
    of half a token cell, `UPSAMPLE_SIGMA`, and resized bilinearly), so part boundaries lie midway between tokens of
    different parts, whatever the KL values.

    The images' self-attention rows are computed once for every round when they fit in `STEP11_ROWS_BYTES` (`M N^2`
    float32), else again in each round.

    Returns one `(H_i, W_i)` int64 part mask per image at its own size (0 = background).
    """
    grid = features.grid_size
    num_tokens = grid[0] * grid[1]
    # without parts every token is background: no KL to compute
    divergences = [torch.zeros(num_tokens, 0, device=device) for _ in range(features.num_images)]
    threshold = math.inf
    rows = None
    if num_parts > 0 and SEGMENTATION_REFINEMENTS > 0 and _step11_holds_rows(features.num_images, num_tokens):
        rows = [
            attention_rows(*_image_features(features, i, device), chunk_size=chunk_size)
            for i in range(features.num_images)
        ]
    foreground = [None] * features.num_images
    for round_ in range(1 + SEGMENTATION_REFINEMENTS if num_parts > 0 else 0):
        divergences = part_divergences(features, labels, num_parts, chunk_size, device, rows)
        threshold = background_threshold
        if threshold is None:
            threshold = background_threshold_from_kl(torch.cat([kl.min(dim=1).values for kl in divergences]))
        labels = [assign_parts(kl, threshold)[0] for kl in divergences]
        if round_ > 0:  # the outline moves by one token at most
            labels = [
                torch.where(grow_by_one_token(previous, grid), image_labels, torch.zeros_like(image_labels))
                for previous, image_labels in zip(foreground, labels)
            ]
        foreground = [image_labels > 0 for image_labels in labels]
    del rows
    trim_memory()
    masks = LazyMasks(divergences, grid, threshold, features.image_sizes, foreground)
    return masks if masks.nbytes > MASKS_IN_MEMORY_BYTES else list(masks)


def _step11_holds_rows(num_images: int, num_tokens: int) -> bool:
    """Whether step 11 holds the images' self-attention rows (`M N^2` float32) for its rounds: when they fit in
    `STEP11_ROWS_BYTES`."""
    return num_images * num_tokens**2 * 4 <= STEP11_ROWS_BYTES


class LazyMasks(Sequence):
    """The part masks (or foreground masks) of a collection, each made when indexed from what step 11 leaves per
    image: its tokens' KL to each part `(N, K)` and foreground `(N,)` (:func:`upsample_assignment`, the same values
    as a list of masks). :func:`segment_parts` returns one in place of a list when the masks at the images' own sizes
    would take more than `MASKS_IN_MEMORY_BYTES`; `list(masks)` makes them all.

    Items: `(H_i, W_i)` int64 part ids (`kind="parts"`) or bool foreground (`kind="foreground"`), torch tensors
    (`output_type="pt"`) or numpy arrays (`"np"`).
    """

    def __init__(self, divergences, grid_size, threshold, sizes, foreground, output_type="pt", kind="parts"):
        self._divergences, self._foreground = divergences, foreground
        self._grid, self._threshold, self._sizes = tuple(grid_size), threshold, [tuple(s) for s in sizes]
        self.output_type, self.kind = output_type, kind

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Each mask's `(H_i, W_i)`."""
        return list(self._sizes)

    @property
    def num_parts(self) -> int:
        """The number of parts `K` (part ids `1..K`)."""
        return int(self._divergences[0].shape[1]) if len(self._divergences) else 0

    @property
    def nbytes(self) -> int:
        """Bytes the masks take as a list (`int64` labels, or bool foreground)."""
        return sum(h * w for h, w in self._sizes) * (8 if self.kind == "parts" else 1)

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        kl, size, foreground = self._divergences[index], self._sizes[index], self._foreground[index]
        mask = upsample_assignment(kl, self._grid, self._threshold, size, foreground=foreground)
        mask = mask > 0 if self.kind == "foreground" else mask
        return mask if self.output_type == "np" else torch.from_numpy(mask)

    def __repr__(self) -> str:
        return f"LazyMasks({len(self)} {self.kind} masks, made when indexed)"

    def recast(self, output_type: str | None = None, kind: str | None = None) -> "LazyMasks":
        """The same masks as `output_type` (`"pt"` or `"np"`) items, or their foreground (`kind="foreground"`)."""
        return LazyMasks(
            self._divergences,
            self._grid,
            self._threshold,
            self._sizes,
            self._foreground,
            output_type or self.output_type,
            kind or self.kind,
        )
