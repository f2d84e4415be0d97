"""Which way round each image is: orientation evidence from mirrored captures, and the collection's decision (issue 27).

Diffusion features barely tell a left part from its right twin: when two images show a bilaterally symmetric object
facing opposite ways, matches land on the mirror twin of the right part. Given each image's *mirrored capture* (the
same image flipped left-right, captured with the same layers and grid), every pair says whether it matches better as
it is, `(i, j)`, or with `j` flipped, `(i, flip j)` (:func:`pair_orientation_evidence`). The collection then decides
one bit per image, "analyse this image's mirrored capture", so that every pair's choice follows from two images' bits
and agrees with all the others (:func:`decide_orientations`, Z2 synchronization). Pure functions: tensors in, tensors
out; features are read through `features.image(i)` and `features.grid_size` (a `CoSegmentationFeatures`).

Cost: the evidence of one pair weighs all four captures, `(i, j)`, `(flip i, flip j)`, `(i, flip j)`, `(flip i, j)`,
two cross-attention row passes each (both directions): 8 passes, four times a pair's steps 4-5 (`both_ways=False`:
`(i, j)` and `(i, flip j)` only, 4 passes, less reliable). The analysis computes the rows of the orientation it keeps
anyway, so :func:`match_strength_from_rows` lets it reuse them. The decision itself is negligible (`2^(M-1)` sign
patterns of `M <= EXACT_LIMIT` images; an eigenvector and a few sweeps beyond).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .features import CoSegmentationFeatures, check_mirrored
from .settings import AnalysisSettings, correct_features, settings_with_reference
from .store import LazyFeatures, lazy_view
from .utils.correspondence import AttentionRowStatistics, attention_row_statistics, inverse_mapping_error
from .utils.images import describe as _describe

# A match counts as evidence when its cycle returns to p's 3x3 neighbourhood (IMS <= sqrt(2) cells, Eq. 2.8): the
# `"auto"` preset's cycle check (DESIGN step 7), not a tuned number. Twin matches of a symmetric object close their
# cycles too; what tells the orientation apart is how strongly the consistent matches attend (`A_st[p, f(p)]`).
CYCLE_LIMIT = math.sqrt(2.0)
# Up to this many images the decision is exact (every one of the 2^(M-1) sign patterns is scored).
EXACT_LIMIT = 12


def match_strength_from_rows(
    rows_st: AttentionRowStatistics, rows_ts: AttentionRowStatistics, grid_size: Sequence[int]
) -> float:
    """How strongly two images match as they are, from the row statistics of `A_st` and `A_ts` (one grid): over both
    passes, the sum of `A_st[p, f(p)]` over the tokens whose inverse mapping error is at most `CYCLE_LIMIT` cells.

    Args:
        rows_st, rows_ts: :class:`~cosegment.utils.correspondence.AttentionRowStatistics` of `A_st` `(N,)` and
            `A_ts` `(N,)`.
        grid_size: `(h, w)`, `h * w == N`.

    Returns:
        A float in `[0, 2 N]`.
    """
    error_st = inverse_mapping_error(rows_st.argmax, rows_ts.argmax, grid_size)
    error_ts = inverse_mapping_error(rows_ts.argmax, rows_st.argmax, grid_size)
    kept_st = (rows_st.max_prob * (error_st <= CYCLE_LIMIT)).sum()
    kept_ts = (rows_ts.max_prob * (error_ts <= CYCLE_LIMIT)).sum()
    return float(kept_st + kept_ts)


def match_strength(
    queries_s: torch.Tensor | Sequence[torch.Tensor],
    keys_s: torch.Tensor | Sequence[torch.Tensor],
    queries_t: torch.Tensor | Sequence[torch.Tensor],
    keys_t: torch.Tensor | Sequence[torch.Tensor],
    grid_size: Sequence[int],
    chunk_size: int | None = None,
) -> float:
    """:func:`match_strength_from_rows` of images s and t (cross self-attention, Eq. 2.4-2.6, in row chunks).

    Args:
        queries_s, keys_s, queries_t, keys_t: `(H, N, d)` (or one such tensor per layer / noise draw) of each image.
        grid_size: `(h, w)`, `h * w == N`.
        chunk_size: attention rows computed at once (`None`: automatic).
    """
    rows_st = attention_row_statistics(queries_s, keys_t, None, chunk_size)
    rows_ts = attention_row_statistics(queries_t, keys_s, None, chunk_size)
    return match_strength_from_rows(rows_st, rows_ts, grid_size)


def relative_evidence(same: float, opposite: float) -> float:
    """`(same - opposite) / (same + opposite)` in [-1, 1] (0 when both are 0): > 0 says "the same way round"."""
    total = same + opposite
    return 0.0 if total <= 0 else (same - opposite) / total


def pair_orientation_evidence(
    image_i: tuple,
    image_j: tuple,
    mirrored_i: tuple | None,
    mirrored_j: tuple,
    grid_size: Sequence[int],
    chunk_size: int | None = None,
) -> float:
    """Whether images i and j show their object the same way round: the :func:`relative_evidence` of the
    :func:`match_strength` of the pair as it is against with one image flipped.

    With `mirrored_i` (the default of :func:`orientation_evidence`), all four captures weigh in:
    `S(i, j) + S(flip i, flip j)` against `S(i, flip j) + S(flip i, j)`, symmetric in i and j (8 attention row
    passes). Without, `S(i, j)` against `S(i, flip j)` (4 passes).

    Args:
        image_i, image_j: `(queries, keys)` of images i and j, each `(H, N, d)` or one such tensor per layer / noise
            draw.
        mirrored_i, mirrored_j: the same of their mirrored captures (flipped left-right); `mirrored_i` may be `None`.
        grid_size: `(h, w)`, `h * w == N`.
        chunk_size: attention rows computed at once (`None`: automatic).

    Returns:
        A float in [-1, 1]: > 0 "the same way round", < 0 "opposite" (analyse `(i, flip j)`).
    """
    same = match_strength(*image_i, *image_j, grid_size, chunk_size)
    opposite = match_strength(*image_i, *mirrored_j, grid_size, chunk_size)
    if mirrored_i is not None:
        same += match_strength(*mirrored_i, *mirrored_j, grid_size, chunk_size)
        opposite += match_strength(*mirrored_i, *image_j, grid_size, chunk_size)
    return relative_evidence(same, opposite)


def _check_mirrored(features: Any, mirrored: Any) -> None:
    for name, value in (("features", features), ("mirrored", mirrored)):
        if not all(hasattr(value, attr) for attr in ("queries", "keys", "grid_size", "image")):
            raise TypeError(f"`{name}` must be a CoSegmentationFeatures, got {type(value).__name__}.")
    if tuple(mirrored.grid_size) != tuple(features.grid_size):
        raise ValueError(f"`mirrored` has grid {tuple(mirrored.grid_size)}, the features {tuple(features.grid_size)}.")
    ours, theirs = [tuple(shape) for shape in features.shapes], [tuple(shape) for shape in mirrored.shapes]
    if ours != theirs:
        raise ValueError(f"`mirrored` must hold the same images, layers and heads: query shapes {theirs}, not {ours}.")


def orientation_evidence(
    features: Any,
    mirrored: Any,
    pairs: Sequence[tuple[int, int]] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    both_ways: bool = True,
) -> torch.Tensor:
    """The evidence matrix of a collection: :func:`pair_orientation_evidence` of every pair.

    Args:
        features (`CoSegmentationFeatures`): the captures of `M` images.
        mirrored (`CoSegmentationFeatures`): the same images flipped left-right (same layers, grid, shapes).
        pairs: the pairs `(i, j)`, `i < j`, to weigh (default: every pair).
        chunk_size: attention rows computed at once (`None`: automatic).
        device: where to compute (default: the features').
        both_ways: weigh all four captures of a pair (8 attention row passes); `False`: `(i, j)` against
            `(i, flip j)` only (4 passes; on 120 design pairs right for 118 against 120, docs/FLIP_NOTES.md).

    Returns:
        `(M, M)` float64, symmetric, 0 on the diagonal and for pairs not weighed.
    """
    _check_mirrored(features, mirrored)
    if not isinstance(both_ways, bool):
        raise TypeError(f"`both_ways` must be a bool, got {type(both_ways).__name__}.")
    num_images = features.num_images
    if pairs is None:
        pairs = [(i, j) for i in range(num_images) for j in range(i + 1, num_images)]

    def capture(source: Any, index: int) -> tuple:
        queries, keys = source.image(index)
        if device is None:
            return queries, keys
        return [q.to(device) for q in queries], [k.to(device) for k in keys]

    evidence = torch.zeros(num_images, num_images, dtype=torch.float64)
    for i, j in pairs:
        if not 0 <= i < j < num_images:
            raise ValueError(f"`pairs` must hold (i, j) with 0 <= i < j < {num_images}, got {(i, j)!r}.")
        mirrored_i = capture(mirrored, i) if both_ways else None
        value = pair_orientation_evidence(
            capture(features, i),
            capture(features, j),
            mirrored_i,
            capture(mirrored, j),
            features.grid_size,
            chunk_size,
        )
        evidence[i, j] = evidence[j, i] = value
    return evidence


@dataclass
class OrientationDecision:
    """Which images to analyse flipped left-right (their mirrored capture), decided for the whole collection.

    Attributes:
        flipped (`torch.Tensor`): `(M,)` bool, one bit per image: analyse its mirrored capture.
        pair_flipped (`torch.Tensor`): `(M, M)` bool, `flipped[i] != flipped[j]`: pair `(i, j)` is analysed as
            `(i, flip j)` (the two images opposite ways round).
        agreement (`float`): the objective reached, `sum_{i<j} J_ij s_i s_j` with `s = 1 - 2 flipped`.
        overruled (`torch.Tensor`): `(M, M)` bool, pairs whose own evidence (a non-zero `J_ij`) says the opposite
            of the decision: the collection corrected them.
        exact (`bool`): the decision was found by enumeration (the best one); otherwise spectral and local search.
        evidence (`torch.Tensor` or `None`): the `(M, M)` evidence decided from, when :func:`collection_orientations`
            made the decision.
    """

    flipped: torch.Tensor
    pair_flipped: torch.Tensor
    agreement: float
    overruled: torch.Tensor
    exact: bool
    evidence: torch.Tensor | None = None


def _check_evidence(evidence: Any) -> np.ndarray:
    """`(M, M)` symmetric finite evidence -> float64 array with a zero diagonal."""
    array = evidence.detach().cpu().double().numpy() if isinstance(evidence, torch.Tensor) else evidence
    try:
        array = np.array(array, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`evidence` must be an (M, M) array of numbers, got {type(evidence).__name__}.") from error
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 1:
        raise ValueError(f"`evidence` must be a square (M, M) matrix, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("`evidence` contains NaN or inf.")
    if not np.allclose(array, array.T, rtol=1e-9, atol=1e-12):
        raise ValueError("`evidence` must be symmetric: J[i, j] == J[j, i].")
    np.fill_diagonal(array, 0.0)
    return array


def _exact_signs(evidence: np.ndarray) -> np.ndarray:
    """The best `(M,)` signs, `s_0 = +1`, by scoring every pattern (the first best in counting order)."""
    num_images = evidence.shape[0]
    codes = np.arange(2 ** (num_images - 1))
    bits = (codes[:, None] >> np.arange(num_images - 1)) & 1  # (2^(M-1), M-1): image k + 1 flipped
    signs = np.concatenate([np.ones((len(codes), 1)), 1.0 - 2.0 * bits], axis=1)
    scores = 0.5 * np.einsum("ci,ij,cj->c", signs, evidence, signs)
    return signs[int(np.argmax(scores))]


def _spectral_signs(evidence: np.ndarray) -> np.ndarray:
    """Signs of the leading eigenvector, then single flips that raise the objective while any does."""
    _, vectors = np.linalg.eigh(evidence)
    signs = np.where(vectors[:, -1] < 0, -1.0, 1.0)
    scale = max(float(np.abs(evidence).sum()), 1.0)
    for _ in range(10 * evidence.shape[0]):  # each flip raises the objective; a cap for float safety
        gains = -2.0 * signs * (evidence @ signs)  # objective change when flipping one image
        best = int(np.argmax(gains))
        if gains[best] <= 1e-12 * scale:
            break
        signs[best] = -signs[best]
    return signs


def _components(evidence: np.ndarray) -> list[np.ndarray]:
    """Connected components of the graph of non-zero evidence, each as sorted image indices."""
    num_images = evidence.shape[0]
    label = -np.ones(num_images, dtype=np.int64)
    for start in range(num_images):
        if label[start] >= 0:
            continue
        label[start], stack = start, [start]
        while stack:
            node = stack.pop()
            for other in np.flatnonzero(evidence[node] != 0):
                if label[other] < 0:
                    label[other] = start
                    stack.append(other)
    return [np.flatnonzero(label == root) for root in np.unique(label)]


def decide_orientations(evidence: torch.Tensor | np.ndarray, exact_limit: int = EXACT_LIMIT) -> OrientationDecision:
    """One bit per image from every pair's evidence (Z2 synchronization).

    Maximises `sum_{i<j} J_ij s_i s_j` over `s` in `{+1, -1}^M` (`s_i = -1`: analyse image i's mirrored capture):
    a pair's choice is `s_i s_j`, so every pair's choice is consistent with the others', and a pair whose own evidence
    is outweighed by the rest of the collection is corrected. Exact by enumeration for `M <= exact_limit`; beyond,
    the signs of the leading eigenvector of `J`, then single flips while one raises the objective. Flipping every
    image gives the same objective, so within each group of images joined by non-zero evidence the majority stays
    unflipped (a tie: its lowest image unflipped); an image with no evidence stays unflipped.

    Args:
        evidence: `(M, M)` symmetric `J` (:func:`orientation_evidence`: > 0 "the same way round"); the diagonal is
            ignored, 0 means no evidence.
        exact_limit: largest `M` decided by enumeration.

    Returns:
        :class:`OrientationDecision`.
    """
    matrix = _check_evidence(evidence)
    if isinstance(exact_limit, bool) or not isinstance(exact_limit, int) or exact_limit < 1:
        raise ValueError(f"`exact_limit` must be a positive int, got {exact_limit!r}.")
    num_images = matrix.shape[0]
    exact = num_images <= exact_limit
    signs = _exact_signs(matrix) if exact else _spectral_signs(matrix)
    for members in _components(matrix):
        flipped = int((signs[members] < 0).sum())
        if 2 * flipped > len(members) or (2 * flipped == len(members) and signs[members[0]] < 0):
            signs[members] = -signs[members]
    agree = np.outer(signs, signs)
    overruled = (matrix * agree) < 0
    return OrientationDecision(
        flipped=torch.from_numpy(signs < 0),
        pair_flipped=torch.from_numpy(agree < 0),
        agreement=float(0.5 * signs @ matrix @ signs),
        overruled=torch.from_numpy(overruled),
        exact=exact,
    )


def collection_orientations(
    features: CoSegmentationFeatures,
    mirrored: CoSegmentationFeatures,
    pairs: Sequence[tuple[int, int]] | None = None,
    reference: CoSegmentationFeatures | None = None,
    clamp_high_norm: bool = True,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> OrientationDecision:
    """Which images to analyse flipped: :func:`orientation_evidence` of `pairs` on the corrected features (high-norm
    tokens, `reference`: :func:`~cosegment.settings.correct_features`, applied to the mirrored captures alike; on raw
    features the positional field rewards the orientation that puts the two objects at nearer grid positions), then
    :func:`decide_orientations`. What `analyze_features(features, mirrored=...)` does before step 4; call it once
    and pass `orientations=decision.flipped` to :func:`analyze_pairs` / :func:`analyze_features` to split an analysis
    between processes.

    Args:
        features, mirrored (`CoSegmentationFeatures`): the captures and the same images flipped left-right.
        pairs: the pairs weighed (default: every pair; give the analysis's pair graph, `partner_pairs`).
        reference, clamp_high_norm, chunk_size, device: as in :func:`~cosegment.analysis.analyze_features`.

    Returns:
        :class:`OrientationDecision` with its `evidence`.
    """
    if not isinstance(features, CoSegmentationFeatures):
        raise TypeError(f"`features` must be a CoSegmentationFeatures, got {_describe(features)}.")
    check_mirrored(features, mirrored)
    if not isinstance(clamp_high_norm, bool):
        raise TypeError(f"`clamp_high_norm` must be a bool, got {_describe(clamp_high_norm)}.")
    settings = settings_with_reference(AnalysisSettings(clamp_high_norm=clamp_high_norm), reference)
    return decide_checked(
        correct_features(features, settings), correct_features(mirrored, settings), pairs, chunk_size, device
    )


def decide_checked(
    features: CoSegmentationFeatures,
    mirrored: CoSegmentationFeatures,
    pairs: Sequence[tuple[int, int]] | None,
    chunk_size: int | None,
    device: torch.device | str | None,
) -> OrientationDecision:
    """:func:`collection_orientations` of features and mirrored captures already checked and corrected."""
    evidence = orientation_evidence(features, mirrored, pairs, chunk_size, device)
    return replace(decide_orientations(evidence), evidence=evidence)


def check_orientations(orientations: Any, num_images: int) -> torch.Tensor:
    """`orientations` (`M` bools: `True` = analyse the image's mirrored capture) -> `(M,)` bool CPU tensor.

    Raises:
        `TypeError`/`ValueError` naming `orientations` and the value.
    """
    if isinstance(orientations, OrientationDecision):
        orientations = orientations.flipped
    if isinstance(orientations, torch.Tensor):
        array = orientations.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(orientations)
        except (TypeError, ValueError) as error:
            raise TypeError(f"`orientations` must be {num_images} bools, got {_describe(orientations)}.") from error
    if array.dtype != np.bool_:
        raise TypeError(f"`orientations` must be {num_images} bools, got {_describe(orientations)}.")
    if array.shape != (num_images,):
        raise ValueError(f"`orientations` must be {num_images} bools (one per image), got shape {array.shape}.")
    return torch.from_numpy(array.copy())


def check_orientation_arguments(features: Any, mirrored: Any, orientations: Any) -> tuple[Any, torch.Tensor | None]:
    """`analyze_features`' `mirrored` (checked against `features`) and `orientations` (an `(M,)` bool tensor, or
    `None`: decided from the evidence). `orientations` needs `mirrored`."""
    if mirrored is None:
        if orientations is not None:
            raise ValueError(
                f"`orientations` needs `mirrored` captures, got `orientations`={_describe(orientations)}."
            )
        return None, None
    check_mirrored(features, mirrored)
    return mirrored, None if orientations is None else check_orientations(orientations, features.num_images)


def orient_corrected(
    features: CoSegmentationFeatures,
    mirrored: CoSegmentationFeatures,
    orientations: torch.Tensor | None,
    settings: AnalysisSettings,
    pairs: Sequence[tuple[int, int]] | None,
    device: torch.device | str | None,
) -> tuple[CoSegmentationFeatures, torch.Tensor]:
    """Step 3c of the analysis: `features` already corrected (:func:`correct_features`), `mirrored` corrected here
    alike; `orientations` decided from the evidence of `pairs` when `None`. Returns the oriented features
    (:func:`oriented_features`) and the `(M,)` bool orientations."""
    mirrored = correct_features(mirrored, settings)
    if orientations is None:
        orientations = decide_checked(features, mirrored, pairs, settings.chunk_size, device).flipped
    return oriented_features(features, mirrored, orientations), orientations


def oriented_features(
    features: CoSegmentationFeatures, mirrored: CoSegmentationFeatures, flipped: torch.Tensor
) -> CoSegmentationFeatures:
    """The collection in the chosen orientation: image i's queries and keys from `mirrored` where `flipped[i]`, from
    `features` elsewhere (sizes, names, metadata and `reference` of `features`; no `mirrored`). `features` itself
    when no image is flipped, so that the analysis is then bitwise the one without mirrored captures. Lazy features
    (on disk, or corrected as read) give a :class:`~cosegment.store.LazyFeatures` that reads each image from one
    side when a step needs it: nothing of the collection is copied."""
    if not bool(flipped.any()):
        return features
    if isinstance(features, LazyFeatures) or isinstance(mirrored, LazyFeatures):
        bits = [bool(bit) for bit in flipped.tolist()]
        sides = (features, mirrored)
        return lazy_view(features, lambda index: sides[bits[index]].image(index), reference=features.reference)
    choose = flipped.to(features.queries[0].device).view(-1, 1, 1, 1)
    queries = [torch.where(choose, m, q) for q, m in zip(features.queries, mirrored.queries)]
    keys = [torch.where(choose, m, k) for k, m in zip(features.keys, mirrored.keys)]
    return replace(features, queries=queries, keys=keys, mirrored=None)


def flip_tokens(tokens: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """Token indices on an `(h, w)` grid, reflected left-right: column `c -> w - 1 - c`, the row kept."""
    width = int(grid_size[1])
    return tokens + (width - 1 - 2 * (tokens % width))


def flip_points(points: torch.Tensor, width: int) -> torch.Tensor:
    """`(K, 2)` x, y pixels of an image `width` pixels wide, reflected left-right: `x -> width - x` (pixel
    coordinates run from 0 at the left edge to `width` at the right, pixel k covering `[k, k + 1]`, so the token
    centre `(c + 0.5) W / w` goes to `(w - 1 - c + 0.5) W / w` exactly, and pixel column k to `width - 1 - k`)."""
    flipped = points.clone()
    flipped[:, 0] = width - points[:, 0]
    return flipped


def unflip_output(output: Any, flipped: torch.Tensor, grid_size: Sequence[int], image_sizes: Sequence) -> Any:
    """The output of an analysis of :func:`oriented_features`, back in the original images (in place; torch
    tensors): every point, token, map and mask of a flipped image reflected left-right (:func:`flip_points`,
    :func:`flip_tokens`, maps and masks along their last axis). Records the decision: `output.orientations` and
    each pair's `flipped` (`flipped[s] != flipped[t]`)."""
    bits = [bool(b) for b in flipped.tolist()]
    for pair in output.correspondences:
        s, t = pair.source_index, pair.target_index
        if bits[s]:
            pair.source_points = flip_points(pair.source_points, image_sizes[s][1])
            pair.source_tokens = flip_tokens(pair.source_tokens, grid_size)
        if bits[t]:
            pair.target_points = flip_points(pair.target_points, image_sizes[t][1])
            pair.target_tokens = flip_tokens(pair.target_tokens, grid_size)
        pair.flipped = bits[s] != bits[t]
    for name in ("density_maps", "entropy_maps", "inverse_error_maps"):
        maps = getattr(output, name)
        setattr(output, name, torch.where(flipped.to(maps.device).view(-1, 1, 1), maps.flip(-1), maps))
    for name in ("masks", "part_masks"):
        masks = getattr(output, name)
        if masks is not None:
            setattr(output, name, [mask.flip(-1) if bit else mask for mask, bit in zip(masks, bits)])
    if output.keypoints is not None:
        output.keypoints = [
            flip_points(points, size[1]) if bit else points
            for points, size, bit in zip(output.keypoints, image_sizes, bits)
        ]
    output.orientations = flipped.clone()
    return output
