"""Joining kept matches (DESIGN step 8): the two passes of a pair as one map (:func:`kept_map`) and as the pair's
correspondences (:func:`merge_passes`, with their confidence :func:`match_scores` and pixel positions
:func:`token_centres_in_pixels`), and the matches that paths through third images confirm (step 8b,
:func:`confirm_matches`). Pure torch functions with the conventions of `correspondence.py`: `(row, col)` grid
positions on an `(h, w)` token grid flattened row-major, distances in grid cells.

A module inside `utils/` imports no sibling (DESIGN section 3): the few helpers of `correspondence.py` these functions
need are copied here, marked `# Copied from`, and tests/test_copies.py keeps the copies identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


# Copied from cosegment.utils.correspondence._check_grid
def _check_grid(grid_size: Sequence[int], name: str = "grid_size") -> tuple[int, int]:
    if len(grid_size) != 2 or any(int(v) != v or v < 1 for v in grid_size):
        raise ValueError(f"`{name}` must be two positive ints (h, w), got {tuple(grid_size)!r}.")
    return int(grid_size[0]), int(grid_size[1])


# Copied from cosegment.utils.correspondence.token_coordinates
def token_coordinates(grid_size: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """`(h * w, 2)` float32 `(row, col)` of every token of an `(h, w)` grid, row-major."""
    h, w = _check_grid(grid_size)
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([rows, cols], dim=-1)


# Copied from cosegment.utils.correspondence._NEIGHBOUR_OFFSETS
# The 3x3 neighbourhood of Eq. 2.11 without the centre.
_NEIGHBOUR_OFFSETS = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]


# Copied from cosegment.utils.correspondence._neighbour_slices
def _neighbour_slices(h: int, w: int):
    """For each 3x3 offset `(di, dj)` of an `(h, w)` grid: `(di, dj, centre, neighbour)`, where `grid[centre]` are
    the tokens whose neighbour at that offset is inside the grid and `grid[neighbour]` those neighbours (both 2-D
    slice pairs of the same shape). Offsets with no such token (a 1-row or 1-column grid) are skipped."""
    for di, dj in _NEIGHBOUR_OFFSETS:
        r0, r1 = max(0, -di), min(h, h - di)
        c0, c1 = max(0, -dj), min(w, w - dj)
        if r0 < r1 and c0 < c1:
            yield di, dj, (slice(r0, r1), slice(c0, c1)), (slice(r0 + di, r1 + di), slice(c0 + dj, c1 + dj))


def match_scores(max_prob: torch.Tensor, keep: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """Confidence of each match after selection, in [0, 1]: `A_st[p, f(p)]` (the share of p's attention on its
    match, Eq. 2.12) times the share of p's 3x3 neighbours (inside the grid, Eq. 2.11) whose matches are kept.

    A match that takes most of its row's attention and sits among kept neighbours scores near 1; a lone match or a
    diffuse row scores near 0. On the planted benchmark the top-scored half of the kept matches is more precise
    than the rest (see `tests/test_method.py`).

    Args:
        max_prob: `(N_s,)` float, `A_st[p, f(p)]`.
        keep: `(N_s,)` bool, the kept matches.
        grid_size: `(h, w)` of the source grid.

    Returns:
        `(N_s,)` float32 (defined for every token; only kept ones are reported).
    """
    h, w = _check_grid(grid_size)
    if max_prob.shape != (h * w,) or keep.shape != (h * w,):
        raise ValueError(
            f"`max_prob` {tuple(max_prob.shape)} and `keep` {tuple(keep.shape)} must both have {h * w} entries."
        )
    kept = torch.zeros(h, w, device=keep.device)
    inside = torch.zeros(h, w, device=keep.device)
    grid_keep = keep.view(h, w).float()
    for _, _, centre, neighbour in _neighbour_slices(h, w):
        kept[centre] += grid_keep[neighbour]
        inside[centre] += 1
    share = (kept / inside.clamp_min(1)).flatten()
    return (max_prob.float().clamp(0, 1) * share).clamp(0, 1)


def kept_map(
    forward: torch.Tensor, keep_forward: torch.Tensor, backward: torch.Tensor, keep_backward: torch.Tensor
) -> torch.Tensor:
    """The kept matches of both passes of a pair as one map from source tokens to target tokens.

    Args:
        forward, keep_forward: `(N_s,)` pass s -> t: `f` and its kept mask.
        backward, keep_backward: `(N_t,)` pass t -> s: `g` and its kept mask.

    Returns:
        `(N_s,)` long: `f(p)` where p -> f(p) is kept; else the largest y with a kept `g(y) = p`; else -1.
    """
    num_source, num_target = forward.shape[0], backward.shape[0]
    targets = torch.nonzero(keep_backward).flatten()
    out = torch.full((num_source,), -1, dtype=torch.long, device=forward.device)
    out = out.scatter_reduce(0, backward[targets], targets, reduce="amax")
    if num_target == 0:
        return out
    return torch.where(keep_forward, forward, out)


def confirm_matches(
    forward: torch.Tensor,
    keep: torch.Tensor,
    predictions: torch.Tensor,
    target_grid_size: Sequence[int],
    tolerance: float,
    min_votes: int = 2,
) -> torch.Tensor:
    """Adds matches that other images confirm (the `"auto"` preset with three or more images).

    For a third image u, `predictions[u, p] = m_ut(m_su(p))` composes the kept maps s -> u and u -> t (see
    :func:`kept_map`). A match `p -> f(p)` that was not kept is added when at least `min_votes` predictions land
    within `tolerance` target cells of `f(p)`: paths through other images agree with the argmax of `A_st` (two
    votes by default: one path alone is about as often wrong as the matches it composes).

    Args:
        forward: `(N_s,)` long, `f`.
        keep: `(N_s,)` bool.
        predictions: `(U, N_s)` long target tokens, -1 where a path is missing.
        target_grid_size: `(h_t, w_t)`.
        tolerance: cells.
        min_votes: third images that must agree.

    Returns:
        `(N_s,)` bool, a superset of `keep`.
    """
    if isinstance(min_votes, bool) or not isinstance(min_votes, int) or min_votes < 1:
        raise ValueError(f"`min_votes` must be a positive int, got {min_votes!r}.")
    ht, wt = _check_grid(target_grid_size, "target_grid_size")
    if predictions.ndim != 2 or predictions.shape[1] != forward.shape[0]:
        raise ValueError(f"`predictions` must be (U, {forward.shape[0]}), got {tuple(predictions.shape)}.")
    if predictions.shape[0] == 0:
        return keep.clone()
    coords = token_coordinates((ht, wt), device=forward.device)
    valid = predictions >= 0
    distance = torch.linalg.vector_norm(coords[predictions.clamp_min(0)] - coords[forward][None], dim=-1)
    return keep | ((valid & (distance <= tolerance)).sum(dim=0) >= min_votes)


def merge_passes(
    forward: torch.Tensor,
    keep_forward: torch.Tensor,
    score_forward: torch.Tensor,
    backward: torch.Tensor,
    keep_backward: torch.Tensor,
    score_backward: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joins the kept matches of both passes of a pair in the first image's orientation (DESIGN step 8).

    Args:
        forward, keep_forward, score_forward: `(N_s,)` pass s -> t: `f`, kept mask, confidence.
        backward, keep_backward, score_backward: `(N_t,)` pass t -> s: `g`, kept mask, confidence.

    Returns:
        `(source_index, target_index, score, mutual)`, each `(K,)`: token indices in s and t (sorted by
        `source_index * N_t + target_index`), the larger confidence of the passes that found the match, and whether
        both passes found it.
    """
    num_target = backward.shape[0]
    src1 = torch.nonzero(keep_forward).flatten()
    tgt1 = forward[src1]
    tgt2 = torch.nonzero(keep_backward).flatten()
    src2 = backward[tgt2]
    key = torch.cat([src1 * num_target + tgt1, src2 * num_target + tgt2])
    score = torch.cat([score_forward[src1], score_backward[tgt2]])
    if key.numel() == 0:
        empty = key.new_zeros(0)
        return empty, empty.clone(), score.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=key.device)
    unique, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    best = score.new_full((unique.shape[0],), -1.0).scatter_reduce(0, inverse, score, reduce="amax")
    return unique // num_target, unique % num_target, best, counts > 1


def token_centres_in_pixels(
    indices: torch.Tensor, grid_size: Sequence[int], image_size: Sequence[int]
) -> torch.Tensor:
    """Token indices -> `(K, 2)` float32 `(x, y)` of the token centres in an image of `image_size = (H, W)` pixels."""
    h, w = _check_grid(grid_size)
    height, width = image_size
    rows = torch.div(indices, w, rounding_mode="floor").float()
    cols = (indices % w).float()
    return torch.stack([(cols + 0.5) * (width / w), (rows + 0.5) * (height / h)], dim=-1)
