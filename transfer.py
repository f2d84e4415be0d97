# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""Points below the token grid: each kept match's landing point refined from its attention row and the local field
of its neighbours' matches (`refine=True`, after step 8: :func:`refine_correspondences`; the rows' peaks are kept
during step 4 by :func:`_peak_hook`), and :func:`transfer_points`, which carries any point of one image into another.
"""

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .features import CoSegmentationFeatures, PairCorrespondence, PassResult, _image_features, _is_int
from .orientation import check_orientations, oriented_features
from .settings import AnalysisSettings, correct_features
from .store import LazyFeatures
from .utils.correspondence import cross_attention_probs, default_chunk_size
from .utils.images import describe as _describe
from .utils.refinement import (
    bilinear_weights,
    grid_to_pixels,
    local_affine_field,
    pixels_to_grid,
    robust_affine_at,
    window_mass,
    window_offsets,
    window_soft_argmax,
)

# Below the grid (refine=True): the window soft-argmax around each argmax (5 x 5 window, weights p ** (1 / 0.5)),
# then the local affine field of the kept matches over the 7 x 7 source window around each match. Chosen on the
# planted DESIGN split (`benchmarks/planted.py --points`; README "Points below the token grid"): a 5 x 5 field gave
# 0.27 cells there, 7 x 7 0.24 (families) and 0.16 -> 0.13 (planted.py).
REFINE_RADIUS = 2
REFINE_TEMPERATURE = 0.5
REFINE_FIELD_RADIUS = 3
# transfer_points fits its robust local field over the 7 x 7 source tokens around a point, Gaussian weights of 2
# cells: a random point has no selection behind it, so it needs more (cycle-checked) neighbours than a kept match.
# Larger windows scored still better on the DESIGN split, whose warps are exactly affine; real warps are not, so
# the window stops at the smallest that met the targets there.
TRANSFER_FIELD_RADIUS = 3
TRANSFER_FIELD_SIGMA = 2.0


def _peak_hook(peaks: torch.Tensor | None, grid_size: tuple[int, int]) -> Callable | None:
    """A `row_hook` of :func:`attention_row_statistics` writing each row's window soft-argmax around its argmax
    (:func:`window_soft_argmax`) into `(N, 2)` `peaks`: the rows are not computed again to refine matches. `None`
    when `peaks` is `None`."""
    if peaks is None:
        return None

    def hook(start: int, probs: torch.Tensor, argmax: torch.Tensor) -> None:
        peaks[start : start + probs.shape[0]] = window_soft_argmax(
            probs, argmax, grid_size, REFINE_RADIUS, REFINE_TEMPERATURE
        )

    return hook


def _refined_rows(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    grid_size: tuple[int, int],
    peaks: torch.Tensor | None,
    chunk_size: int | None,
    refine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `A = mean softmax(Q K^T)` for the `(H, K, d)` queries, `chunk_size` rows at a time (never all K):
    each row's peak (its argmax unless `peaks` is given), the peak's sub-token `(row, col)` on the keys' grid
    (:func:`window_soft_argmax`; the peak token itself when `refine` is False) and the row's mass within one token
    of the peak (:func:`window_mass`). Returns `(K,)` long, `(K, 2)` float32, `(K,)` float32."""
    num_rows = queries[0].shape[1]
    step = chunk_size or default_chunk_size(queries[0].shape[0], keys[0].shape[1])
    found, coords, mass = [], [], []
    for start in range(0, num_rows, step):
        rows = cross_attention_probs([q[:, start : start + step] for q in queries], keys)
        top = rows.argmax(dim=-1) if peaks is None else peaks[start : start + step]
        if refine:
            coords.append(window_soft_argmax(rows, top, grid_size, REFINE_RADIUS, REFINE_TEMPERATURE))
        else:
            coords.append(torch.stack([top // grid_size[1], top % grid_size[1]], dim=-1).float())
        found.append(top)
        mass.append(window_mass(rows, top, grid_size, 1))
    if not found:
        empty = torch.zeros(0, device=queries[0].device)
        return empty.long(), empty.view(0, 2), empty
    return torch.cat(found), torch.cat(coords), torch.cat(mass)


def refined_pass_points(
    result: PassResult, features: CoSegmentationFeatures, chunk_size: int | None, device: torch.device
) -> torch.Tensor:
    """Sub-token landing points of a pass' kept matches: `(N, 2)` float32 `(row, col)` on the target grid per
    source token (kept ones refined, the others their match's token centre).

    Each kept match's attention row gives the window soft-argmax around `f(p)` (kept by :func:`analyze_pair` while
    it computed the rows, `result.peak_points`; else recomputed in row chunks for the kept tokens only); the local
    affine field of those points over the kept matches of the `7 x 7` source window around p
    (:func:`local_affine_field`) then averages out the per-match noise. Points stay within the token centres' hull
    `[0, h - 1] x [0, w - 1]` (inside the image)."""
    grid = tuple(features.grid_size)
    forward = result.statistics.forward
    points = torch.stack([forward // grid[1], forward % grid[1]], dim=-1).float()
    tokens = torch.nonzero(result.keep).flatten()
    if tokens.numel() == 0:
        return points
    if result.peak_points is not None:
        points[tokens] = result.peak_points[tokens]
    else:
        queries, _ = _image_features(features, result.source_index, device)
        _, keys = _image_features(features, result.target_index, device)
        rows = [q[:, tokens] for q in queries]
        points[tokens] = _refined_rows(rows, keys, grid, forward[tokens], chunk_size, refine=True)[1]
    field, defined = local_affine_field(points, result.keep, grid, REFINE_FIELD_RADIUS)
    points = torch.where((result.keep & defined)[:, None], field, points)
    return points.clamp_min(0).minimum(points.new_tensor([grid[0] - 1, grid[1] - 1]))


def refine_correspondences(
    correspondences: list[PairCorrespondence],
    passes: dict[tuple[int, int], PassResult],
    features: CoSegmentationFeatures,
    chunk_size: int | None,
    device: torch.device,
) -> list[PairCorrespondence]:
    """Each kept match's point in the image it lands in, below the token grid (:func:`refined_pass_points`): a
    match of the pass `s -> t` (mutual ones included) moves its `target_points`, a match found only by `t -> s` its
    `source_points`; the query's point stays at its token centre and the tokens are unchanged."""
    grid = tuple(features.grid_size)
    refined = []
    for pair in correspondences:
        s, t = pair.source_index, pair.target_index
        forward, backward = passes[(s, t)], passes[(t, s)]
        by_forward = forward.keep[pair.source_tokens] & (
            forward.statistics.forward[pair.source_tokens] == pair.target_tokens
        )
        target_points, source_points = pair.target_points.clone(), pair.source_points.clone()
        if bool(by_forward.any()):
            points = refined_pass_points(forward, features, chunk_size, device)[pair.source_tokens[by_forward]]
            target_points[by_forward] = grid_to_pixels(points, grid, features.image_sizes[t]).to(target_points)
        if bool((~by_forward).any()):
            points = refined_pass_points(backward, features, chunk_size, device)[pair.target_tokens[~by_forward]]
            source_points[~by_forward] = grid_to_pixels(points, grid, features.image_sizes[s]).to(source_points)
        refined.append(replace(pair, source_points=source_points, target_points=target_points))
    return refined


def _point_queries(
    queries: list[torch.Tensor], coords: torch.Tensor, grid_size: tuple[int, int]
) -> list[torch.Tensor]:
    """Queries at `(K, 2)` sub-token grid points, read bilinearly from the `(H, N, d)` token queries: `(H, K, d)`."""
    indices, weights = bilinear_weights(coords, grid_size)
    return [(q[:, indices].float() * weights[None, :, :, None]).sum(dim=2) for q in queries]


def _point_field(
    source: tuple[list[torch.Tensor], list[torch.Tensor]],
    target: tuple[list[torch.Tensor], list[torch.Tensor]],
    coords: torch.Tensor,
    landed: torch.Tensor,
    grid_size: tuple[int, int],
    chunk_size: int | None,
) -> torch.Tensor:
    """`(K, 2)` landing points of `(K, 2)` source grid points from the local field: the refined matches of the
    source tokens of the 7 x 7 window around each point's nearest token and the point's own `landed` match, fitted by a
    robust affine map (:func:`robust_affine_at`) evaluated at the point; a neighbour's weight is Gaussian in its
    distance to the point times its cycle agreement (`exp(-e^2 / 2)`, `e` how far its match's own match lands from
    it, source cells). `source`, `target`: each image's `(queries, keys)`. Clamped to the target grid's token-centre
    hull."""
    h, w = grid_size
    offsets = window_offsets(TRANSFER_FIELD_RADIUS, coords.device)
    nearest = coords.round().clamp_min(0).minimum(coords.new_tensor([h - 1, w - 1]))
    around = nearest[:, None, :] + offsets[None].float()  # (K, S, 2)
    inside = (around[..., 0] >= 0) & (around[..., 0] < h) & (around[..., 1] >= 0) & (around[..., 1] < w)
    tokens = (around[..., 0].clamp(0, h - 1) * w + around[..., 1].clamp(0, w - 1)).long()
    unique, inverse = torch.unique(tokens.flatten(), return_inverse=True)
    _, matched, _ = _refined_rows([q[:, unique] for q in source[0]], target[1], grid_size, None, chunk_size, True)
    back_queries = _point_queries(target[0], matched, grid_size)
    _, back, _ = _refined_rows(back_queries, source[1], grid_size, None, chunk_size, True)
    home = torch.stack([unique // w, unique % w], dim=-1).float()
    agreement = torch.exp(-0.5 * ((back - home) ** 2).sum(-1))
    targets = torch.cat([matched[inverse].view(*tokens.shape, 2), landed[:, None]], dim=1)
    relative = torch.cat([around - coords[:, None], torch.zeros_like(coords[:, None])], dim=1)
    prior = torch.cat([inside * agreement[inverse].view(tokens.shape), inside.new_ones(inside.shape[0], 1)], 1)
    weights = torch.exp(-0.5 * (relative**2).sum(-1) / TRANSFER_FIELD_SIGMA**2) * prior
    field = robust_affine_at(relative, targets, weights)
    return field.clamp_min(0).minimum(field.new_tensor([h - 1, w - 1]))


def _check_image_index(value: Any, name: str, num_images: int) -> int:
    if not _is_int(value) or not 0 <= value < num_images:
        raise ValueError(f"`{name}` must be an image index in [0, {num_images}), got {_describe(value)}.")
    return int(value)


def _oriented_transfer(features, s, t, points, refine, chunk_size, bits) -> tuple[np.ndarray, np.ndarray]:
    """:func:`transfer_points` in orientation `bits`: the flipped images' mirrored captures, points reflected in and
    out (`x -> W - x`)."""
    try:
        array = np.array(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    except (TypeError, ValueError):
        array = points  # transfer_points names the bad value
    height, width = features.image_sizes[s]
    if bits[s] and getattr(array, "ndim", 0) == 2 and array.shape[-1] == 2:
        inside = np.isfinite(array).all() and (array >= 0).all() and (array <= [width, height]).all()
        if inside:  # (otherwise transfer_points names the points as given)
            array[:, 0] = width - array[:, 0]
    oriented = oriented_features(features, features.mirrored, bits)
    if oriented.mirrored is not None:  # `features` itself (no image flipped): the same, without the mirrored captures
        lazy = isinstance(oriented, LazyFeatures)
        oriented = (
            oriented.derived(oriented.image, reference=oriented.reference)
            if lazy
            else replace(oriented, mirrored=None)
        )
    landed, scores = transfer_points(oriented, s, t, array, refine, chunk_size)
    if bits[t]:
        landed[:, 0] = features.image_sizes[t][1] - landed[:, 0]
    return landed, scores


def transfer_points(
    features: CoSegmentationFeatures,
    source_index: int,
    target_index: int,
    points: np.ndarray | torch.Tensor | Sequence[Sequence[float]],
    refine: bool = True,
    chunk_size: int | None = None,
    orientations: Sequence[bool] | torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Where points of one image land in another: "where does *this* point of image A go in image B?".

    Each point's query is read bilinearly from the source image's token queries at the point (any pixel, not only
    token centres); its row of the cross self-attention `A_st` (mean over heads, layers and noise draws; computed
    in row chunks, never `(H, N, N)`) gives the argmax token. With `refine`, below the grid: the window soft-argmax
    around it (:func:`window_soft_argmax`, 5 x 5 window, temperature 0.5), then the robust local field of the
    matches of the 7 x 7 source tokens around the point, weighted by their distance (Gaussian, 2 cells) and their
    cycle agreement, read at the point (:func:`robust_affine_at`): one row is noisy by about a cell, its
    neighbours' matches average that out.

    The score in [0, 1] says how much to trust a transfer: `mass * exp(-e^2 / 2)`, where `mass` is the share of
    the point's attention row within one token of its peak (peak sharpness: a diffuse or many-peaked row scores
    low) and `e` the cycle error in source cells: the transferred point is carried back the same way (`A_ts` at the
    target point) and `e` is how far it lands from the original point (0 when the round trip returns to it).

    The features are corrected as the analysis corrects them by default (:func:`correct_features`): high-norm tokens
    clamped, and the positional offsets of `features.reference` removed when the features carry one.

    Args:
        features (`CoSegmentationFeatures`): captured queries and keys holding both images.
        source_index (`int`), target_index (`int`): the images, by position in the collection (may be equal).
        points (`(K, 2)` array or tensor): x, y in image `source_index`'s own pixels, inside `[0, W] x [0, H]`.
        refine (`bool`, *optional*, defaults to `True`): refine below the token grid; `False`: token centres of
            the plain argmax.
        chunk_size (`int`, *optional*): attention rows computed at once; automatic by default.
        orientations (`(M,)` bools, *optional*): transfer in the orientation an analysis with mirrored captures
            decided (`output.orientations`; issue 27): an image whose bit is set is read through its mirrored capture
            (`features.mirrored`, required then), the points reflected into it (`x -> W - x`) and the landed
            points back. `None`: the images as they are.

    Returns:
        `(target_points, scores)`: `(K, 2)` float32 x, y in image `target_index`'s own pixels (inside the image)
        and `(K,)` float32 scores in [0, 1].

    Raises:
        `ValueError` naming the argument: indices outside the collection, points not `(K, 2)`, not finite or
        outside the source image; `TypeError` for features or flags of the wrong type.
    """
    if not isinstance(features, CoSegmentationFeatures):
        raise TypeError(f"`features` must be a CoSegmentationFeatures, got {type(features).__name__}.")
    if not isinstance(refine, bool):
        raise TypeError(f"`refine` must be a bool, got {_describe(refine)}.")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {_describe(chunk_size)}.")
    features.validate()
    s = _check_image_index(source_index, "source_index", features.num_images)
    t = _check_image_index(target_index, "target_index", features.num_images)
    if orientations is not None:
        if features.mirrored is None:
            raise ValueError("`orientations` needs `features.mirrored` (the images flipped left-right), got None.")
        return _oriented_transfer(
            features, s, t, points, refine, chunk_size, check_orientations(orientations, features.num_images)
        )
    try:
        array = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`points` must be a (K, 2) array of x, y pixels, got {_describe(points)}.") from error
    if array.size == 0:
        array = array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"`points` must be a (K, 2) array of x, y pixels, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("`points` must be finite, got NaN or inf.")
    height, width = features.image_sizes[s]
    outside = (array[:, 0] < 0) | (array[:, 0] > width) | (array[:, 1] < 0) | (array[:, 1] > height)
    if outside.any():
        raise ValueError(
            f"`points` must lie inside the source image ({width} x {height} px, x in [0, {width}], y in "
            f"[0, {height}]), got {array[outside][0].tolist()} among {int(outside.sum())} outside."
        )
    features = correct_features(features, AnalysisSettings(reference=features.reference))  # no digest needed here
    grid = tuple(features.grid_size)
    device = features.device
    if array.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.float32), np.zeros(0, dtype=np.float32)
    queries_s, keys_s = _image_features(features, s, device)
    queries_t, keys_t = _image_features(features, t, device)
    coords = pixels_to_grid(torch.from_numpy(array).to(device), grid, features.image_sizes[s])
    _, landed, mass = _refined_rows(_point_queries(queries_s, coords, grid), keys_t, grid, None, chunk_size, refine)
    if refine:
        landed = _point_field((queries_s, keys_s), (queries_t, keys_t), coords, landed, grid, chunk_size)
    _, back, _ = _refined_rows(_point_queries(queries_t, landed, grid), keys_s, grid, None, chunk_size, refine)
    cycle = torch.linalg.vector_norm(back - coords.clamp_min(0).minimum(coords.new_tensor(grid) - 1), dim=-1)
    scores = (mass * torch.exp(-0.5 * cycle**2)).clamp(0, 1)
    target_points = grid_to_pixels(landed, grid, features.image_sizes[t])
    return target_points.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32)
