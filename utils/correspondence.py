"""Cross self-attention maths of the seed note (Eq. 2.4-2.13): pure torch functions, any device, float32 inside.

Shapes: `H` heads, `N_s` source tokens, `N_t` target tokens, `d` head size. Grid positions are `(row, col)` on an
`(h, w)` token grid flattened row-major (token index `row * w + col`); distances are in grid cells.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Row chunks are sized so one float32 `(H, rows, N_t)` logit block holds about this many elements (64 MiB).
_CHUNK_ELEMENTS = 2**24


def _as_heads(x: torch.Tensor, name: str) -> torch.Tensor:
    """`(N, d)` or `(H, N, d)` -> `(H, N, d)`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 2:
        return x.unsqueeze(0)
    if x.ndim == 3:
        return x
    raise ValueError(f"`{name}` must have shape (N, d) or (H, N, d), got {tuple(x.shape)}.")


def _as_head_list(x: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [_as_heads(x, name)]
    items = [_as_heads(t, f"{name}[{i}]") for i, t in enumerate(x)]
    if not items:
        raise ValueError(f"`{name}` must hold at least one tensor, got an empty sequence.")
    return items


def _check_query_key_pairs(queries: list[torch.Tensor], keys: list[torch.Tensor]) -> None:
    if len(queries) != len(keys):
        raise ValueError(f"`queries` and `keys` must have the same length, got {len(queries)} and {len(keys)}.")
    for i, (q, k) in enumerate(zip(queries, keys)):
        if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"`queries[{i}]` {tuple(q.shape)} and `keys[{i}]` {tuple(k.shape)} must share heads and head size."
            )
        if q.shape[1] != queries[0].shape[1] or k.shape[1] != keys[0].shape[1]:
            raise ValueError("All `queries` (and all `keys`) must have the same number of tokens.")
        if q.shape[0] < 1 or q.shape[-1] < 1 or k.shape[1] < 1:
            raise ValueError(
                f"`queries[{i}]` {tuple(q.shape)} / `keys[{i}]` {tuple(k.shape)} need 1+ heads, a head size of 1+ and "
                f"1+ target tokens."
            )
        for name, x in ((f"queries[{i}]", q), (f"keys[{i}]", k)):
            if not x.dtype.is_floating_point:
                raise TypeError(f"`{name}` must be a float tensor, got dtype {x.dtype}.")
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"`{name}` contains NaN or inf.")


def _check_logit_range(queries: list[torch.Tensor], keys: list[torch.Tensor], scale: float | None) -> None:
    """Refuses inputs whose logits could overflow float32 (they would give NaN probabilities), by Cauchy-Schwarz."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"`scale` must be a finite number or None, got {scale!r}.")
    limit = torch.finfo(torch.float32).max / 4
    for i, (q, k) in enumerate(zip(queries, keys)):
        if q.numel() == 0:
            continue
        s = q.shape[-1] ** -0.5 if scale is None else abs(scale)
        q_norm = float(torch.linalg.vector_norm(q, dim=-1, dtype=torch.float64).max())
        k_norm = float(torch.linalg.vector_norm(k, dim=-1, dtype=torch.float64).max())
        if q_norm * k_norm * s > limit:
            raise ValueError(
                f"`queries[{i}]` and `keys[{i}]` are too large: logits up to {q_norm * k_norm * s:.3g} overflow float32 "
                f"(row norms {q_norm:.3g} and {k_norm:.3g}); rescale them."
            )


def default_chunk_size(num_heads: int, num_targets: int) -> int:
    """Rows per chunk so that one float32 `(H, rows, N_t)` block stays near 64 MiB."""
    return max(1, _CHUNK_ELEMENTS // max(1, num_heads * num_targets))


def _mean_softmax_rows(
    queries: list[torch.Tensor], keys: list[torch.Tensor], start: int, stop: int, scale: float | None
) -> torch.Tensor:
    """Mean over layers and heads of `softmax(Q[start:stop] K^T * scale)`: `(stop - start, N_t)` float32.

    `keys` are `(H, d, N_t)` float32 (already transposed); the scale is applied to the `(H, rows, d)` queries rather
    than to the `(H, rows, N_t)` logits.
    """
    total = None
    for q, k_t in zip(queries, keys):
        s = q.shape[-1] ** -0.5 if scale is None else scale
        logits = torch.matmul(q[:, start:stop].float() * s, k_t)
        probs = torch.softmax(logits, dim=-1).sum(dim=0).div_(q.shape[0])
        total = probs if total is None else total.add_(probs)
    return total.div_(len(queries))


def cross_attention_probs(
    queries: torch.Tensor | Sequence[torch.Tensor],
    keys: torch.Tensor | Sequence[torch.Tensor],
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Head-averaged cross self-attention `A_st = mean_h softmax(Q_s K_t^T * scale)` (Eq. 2.2, 2.4-2.6).

    Args:
        queries: `(H, N_s, d)` or `(N_s, d)` queries of the source image (or a sequence of such tensors, one per
            layer / noise draw, averaged after the softmax).
        keys: `(H, N_t, d)` or `(N_t, d)` keys of the target image (same length as `queries` when a sequence).
        scale: logit scale, defaults to `d ** -0.5`.
        chunk_size: rows computed at once; `None` computes all rows together.

    Returns:
        `(N_s, N_t)` float32, rows sum to 1 (Eq. 2.5).
    """
    qs, ks = _as_head_list(queries, "queries"), _as_head_list(keys, "keys")
    _check_query_key_pairs(qs, ks)
    _check_logit_range(qs, ks, scale)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    num_rows = qs[0].shape[1]
    step = num_rows if chunk_size is None else chunk_size
    keys_t = [k.float().transpose(-1, -2) for k in ks]
    rows = [_mean_softmax_rows(qs, keys_t, i, min(i + step, num_rows), scale) for i in range(0, num_rows, step)]
    if not rows:
        return torch.zeros(0, ks[0].shape[1], device=qs[0].device)
    return torch.cat(rows, dim=0)


def _row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of `(R, N)` non-negative float32 probabilities, rows renormalised."""
    # Divide by the row maximum first: a row of subnormal values (below float32's `tiny`) would otherwise not be
    # renormalised to sum 1, and its "entropy" could exceed log N. All-zero rows stay zero (entropy 0).
    peak = probs.amax(dim=-1, keepdim=True)
    probs = probs / peak.masked_fill(peak == 0, 1.0)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1.0)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    return entropy.clamp(0.0, math.log(probs.shape[-1]) if probs.shape[-1] else 0.0)


@dataclass
class AttentionRowStatistics:
    """Per-row statistics of an attention matrix `A_st` that was never stored whole.

    Attributes:
        argmax: `(N_s,)` long, `f(p) = argmax_y A_st[p, y]` (Eq. 2.12).
        max_prob: `(N_s,)` float32, `A_st[p, f(p)]`.
        entropy: `(N_s,)` float32, entropy of row p in nats (Eq. 2.10 when `A_st` is read as the inverse map).
    """

    argmax: torch.Tensor
    max_prob: torch.Tensor
    entropy: torch.Tensor


def attention_row_statistics(
    queries: torch.Tensor | Sequence[torch.Tensor],
    keys: torch.Tensor | Sequence[torch.Tensor],
    scale: float | None = None,
    chunk_size: int | None = None,
    row_hook: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> AttentionRowStatistics:
    """Argmax, maximum and entropy of each row of `A_st` (see :func:`cross_attention_probs`), in row chunks.

    Memory stays bounded by one `(H, chunk_size, N_t)` block whatever `N_s`; `chunk_size=None` picks a chunk of about
    64 MiB. Results equal those computed from the full `(N_s, N_t)` matrix. `row_hook(start, probs, argmax)`, when
    given, also sees each chunk (rows `start:start + len(probs)`, `(rows, N_t)` float32, `(rows,)` long): e.g. to keep
    a window of every row around its argmax without computing the rows again.
    """
    qs, ks = _as_head_list(queries, "queries"), _as_head_list(keys, "keys")
    _check_query_key_pairs(qs, ks)
    _check_logit_range(qs, ks, scale)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    num_rows, num_targets = qs[0].shape[1], ks[0].shape[1]
    step = chunk_size or default_chunk_size(max(q.shape[0] for q in qs), num_targets)
    keys_t = [k.float().transpose(-1, -2) for k in ks]
    argmax, max_prob, entropy = [], [], []
    for start in range(0, num_rows, step):
        probs = _mean_softmax_rows(qs, keys_t, start, min(start + step, num_rows), scale)
        value, index = probs.max(dim=-1)
        if row_hook is not None:
            row_hook(start, probs, index)
        argmax.append(index)
        max_prob.append(value)
        entropy.append(_row_entropy(probs))
    device = qs[0].device
    if not argmax:
        empty = torch.zeros(0, device=device)
        return AttentionRowStatistics(empty.long(), empty, empty)
    return AttentionRowStatistics(torch.cat(argmax), torch.cat(max_prob), torch.cat(entropy))


def argmax_matches(attn: torch.Tensor) -> torch.Tensor:
    """Forward matches `f(p) = argmax_y A[p, y]` (Eq. 2.12).

    Args:
        attn: `(N_s, N_t)` attention.

    Returns:
        `(N_s,)` long target indices (the first maximum on ties).
    """
    if not isinstance(attn, torch.Tensor) or attn.ndim != 2:
        raise ValueError(f"`attn` must be a 2-D tensor (N_s, N_t), got {getattr(attn, 'shape', type(attn))}.")
    if attn.shape[1] == 0:
        raise ValueError("`attn` has no target columns to match to.")
    return attn.argmax(dim=-1)


def _check_grid(grid_size: Sequence[int], name: str = "grid_size") -> tuple[int, int]:
    if len(grid_size) != 2 or any(int(v) != v or v < 1 for v in grid_size):
        raise ValueError(f"`{name}` must be two positive ints (h, w), got {tuple(grid_size)!r}.")
    return int(grid_size[0]), int(grid_size[1])


def _check_indices(indices: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D tensor of token indices, got {getattr(indices, 'shape', indices)}.")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer token indices, got dtype {indices.dtype}.")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(
            f"`{name}` holds indices outside [0, {size}): min {int(indices.min())}, max {int(indices.max())}."
        )
    return indices.long()


def token_coordinates(grid_size: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """`(h * w, 2)` float32 `(row, col)` of every token of an `(h, w)` grid, row-major."""
    h, w = _check_grid(grid_size)
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([rows, cols], dim=-1)


def inverse_mapping_error(forward: torch.Tensor, backward: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """Inverse mapping error `IMS(p) = ||p - g(f(p))||_2` in source grid cells (Eq. 2.7-2.8).

    Args:
        forward: `(N_s,)` long, `f`: source token -> target token.
        backward: `(N_t,)` long, `g`: target token -> source token.
        grid_size: `(h, w)` of the source grid, `h * w == N_s`.

    Returns:
        `(N_s,)` float32, 0 where the mapping is cycle-consistent.
    """
    h, w = _check_grid(grid_size)
    forward = _check_indices(forward, backward.shape[0] if isinstance(backward, torch.Tensor) else 0, "forward")
    if forward.shape[0] != h * w:
        raise ValueError(f"`forward` has {forward.shape[0]} tokens but `grid_size` {(h, w)} has {h * w}.")
    backward = _check_indices(backward, h * w, "backward")
    coords = token_coordinates((h, w), device=forward.device)
    return torch.linalg.vector_norm(coords - coords[backward[forward]], dim=-1)


def mapping_density(forward: torch.Tensor, num_targets: int) -> torch.Tensor:
    """Mapping density `MD(y) = #{p : f(p) = y}` (Eq. 2.9).

    Args:
        forward: `(N_s,)` long target index of each source token.
        num_targets: `N_t`.

    Returns:
        `(N_t,)` float32 counts, summing to `N_s`.
    """
    if int(num_targets) != num_targets or num_targets < 1:
        raise ValueError(f"`num_targets` must be a positive int, got {num_targets!r}.")
    forward = _check_indices(forward, int(num_targets), "forward")
    return torch.bincount(forward, minlength=int(num_targets)).float()


def inverse_mapping_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Inverse mapping entropy `IME(y) = -sum_x P(x | y) log P(x | y)` in nats (Eq. 2.10).

    Args:
        attn: `(N_t, N_s)` inverse attention `A_ts` (rows are renormalised to sum to 1; non-negative).

    Returns:
        `(N_t,)` float32 in `[0, log N_s]`.
    """
    if not isinstance(attn, torch.Tensor) or attn.ndim != 2:
        raise ValueError(f"`attn` must be a 2-D tensor (N_t, N_s), got {getattr(attn, 'shape', type(attn))}.")
    if attn.numel() and not bool(torch.isfinite(attn).all()):
        raise ValueError("`attn` contains NaN or inf.")
    if attn.numel() and bool((attn < 0).any()):
        raise ValueError("`attn` must be non-negative.")
    return _row_entropy(attn.float())


# The 3x3 neighbourhood of Eq. 2.11 without the centre.
_NEIGHBOUR_OFFSETS = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]


def _neighbour_slices(h: int, w: int):
    """For each 3x3 offset `(di, dj)` of an `(h, w)` grid: `(di, dj, centre, neighbour)`, where `grid[centre]` are
    the tokens whose neighbour at that offset is inside the grid and `grid[neighbour]` those neighbours (both 2-D
    slice pairs of the same shape). Offsets with no such token (a 1-row or 1-column grid) are skipped."""
    for di, dj in _NEIGHBOUR_OFFSETS:
        r0, r1 = max(0, -di), min(h, h - di)
        c0, c1 = max(0, -dj), min(w, w - dj)
        if r0 < r1 and c0 < c1:
            yield di, dj, (slice(r0, r1), slice(c0, c1)), (slice(r0 + di, r1 + di), slice(c0 + dj, c1 + dj))


def neighbourhood_spread(
    forward: torch.Tensor, grid_size: Sequence[int], target_grid_size: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbourhood check of Eq. 2.11-2.13 (DESIGN step 6).

    For each source token p and its 3x3 neighbours n inside the grid:
    spread `S(p) = mean_n ||f(n) - f(p)||^2` (target cells squared) and collapse share
    `C(p) = mean_n [f(n) == f(p)]`.

    Args:
        forward: `(N_s,)` long, `f`: source token -> target token.
        grid_size: `(h, w)` of the source grid.
        target_grid_size: `(h_t, w_t)` of the target grid, defaults to `grid_size`.

    Returns:
        `(spread, collapse_share)`, each `(N_s,)` float32. A 1x1 grid (no neighbours) gives 0 and 0.
    """
    h, w = _check_grid(grid_size)
    ht, wt = _check_grid(target_grid_size if target_grid_size is not None else grid_size, "target_grid_size")
    forward = _check_indices(forward, ht * wt, "forward")
    if forward.shape[0] != h * w:
        raise ValueError(f"`forward` has {forward.shape[0]} tokens but `grid_size` {(h, w)} has {h * w}.")
    target = token_coordinates((ht, wt), device=forward.device)[forward].view(h, w, 2)
    index = forward.view(h, w)
    spread = torch.zeros(h, w, device=forward.device)
    same = torch.zeros(h, w, device=forward.device)
    count = torch.zeros(h, w, device=forward.device)
    for _, _, centre, neighbour in _neighbour_slices(h, w):
        spread[centre] += ((target[neighbour] - target[centre]) ** 2).sum(dim=-1)
        same[centre] += (index[neighbour] == index[centre]).float()
        count[centre] += 1
    count = count.clamp_min(1)
    return (spread / count).flatten(), (same / count).flatten()


# ---------------------------------------------------------------------------------------------------------------
# Selection (DESIGN steps 7-8)
# ---------------------------------------------------------------------------------------------------------------

# The paper preset's entropy limit (2 nats) was read off grids of this many tokens; it scales with log N.
_PAPER_REFERENCE_TOKENS = 1024
_PAPER_MAX_ENTROPY = 2.0
_PAPER_MAX_SPREAD = 20.0
_PAPER_MAX_COLLAPSE = 0.5
_PAPER_MAX_INVERSE_ERROR = 1.0


@dataclass
class SelectionThresholds:
    """Limits a correspondence `p -> f(p)` must meet to be kept; `inf` disables a check.

    Attributes:
        max_entropy: IME of the target `f(p)` in nats, strictly below (Eq. 2.10).
        max_spread: neighbourhood spread in target cells squared, at most (Eq. 2.11-2.13).
        max_collapse: share of neighbours landing on `f(p)` itself, at most.
        max_inverse_error: `||p - g(f(p))||` in source cells, at most (Eq. 2.8).
    """

    max_entropy: float
    max_spread: float
    max_collapse: float
    max_inverse_error: float

    def __post_init__(self) -> None:
        for name in ("max_entropy", "max_spread", "max_collapse", "max_inverse_error"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number (inf disables it), got {value!r}.")
            setattr(self, name, float(value))


def paper_thresholds(num_tokens: int) -> SelectionThresholds:
    """The research note's limits: IME < 2 nats at N = 1024 scaled by `log N / log 1024`, spread <= 20 cells^2,
    collapse share <= 0.5, IMS <= 1 cell."""
    if num_tokens < 2:
        raise ValueError(f"`num_tokens` must be at least 2, got {num_tokens}.")
    scale = math.log(num_tokens) / math.log(_PAPER_REFERENCE_TOKENS)
    return SelectionThresholds(
        max_entropy=_PAPER_MAX_ENTROPY * scale,
        max_spread=_PAPER_MAX_SPREAD,
        max_collapse=_PAPER_MAX_COLLAPSE,
        max_inverse_error=_PAPER_MAX_INVERSE_ERROR,
    )


def _finite_sample(values: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """A 1-D sample's finite values `(K,)` float32 and their min and max (`inf`, `-inf` for an empty sample): the
    set-up of a histogram threshold."""
    values = torch.as_tensor(values).detach().float().flatten()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return values, math.inf, -math.inf
    return values, float(values.min()), float(values.max())


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the cut maximising the between-class variance.

    Args:
        values: `(K,)` finite values (non-finite ones are ignored).
        bins: histogram bins.

    Returns:
        The threshold (a float between the sample's min and max); `inf` for an empty or constant sample, so that
        nothing is cut.
    """
    values, lo, hi = _finite_sample(values)
    if values.numel() == 0 or hi <= lo:
        return math.inf
    hist = torch.histc(values, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, device=values.device, dtype=torch.float32) + 0.5) * (hi - lo) / bins
    weight0 = hist.cumsum(0)
    weight1 = hist.sum() - weight0
    mean0 = (hist * centres).cumsum(0) / weight0.clamp_min(1)
    mean1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / weight1.clamp_min(1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    between = between[:-1] if bins > 1 else between
    # every cut inside an empty gap scores the same: take the middle of the best plateau
    best = torch.nonzero(between >= between.max() * (1 - 1e-6)).flatten().float()
    k = float(best.mean())
    return lo + (k + 1) * (hi - lo) / bins


@dataclass
class PassStatistics:
    """Everything the selection of one pass (source -> target) looks at, per source token p.

    Attributes:
        forward: `(N_s,)` long `f(p)`.
        target_entropy: `(N_s,)` IME of `f(p)` in nats (Eq. 2.10).
        inverse_error: `(N_s,)` IMS(p) in source cells (Eq. 2.8).
        spread: `(N_s,)` neighbourhood spread in target cells squared.
        collapse: `(N_s,)` collapse share in [0, 1].
    """

    forward: torch.Tensor
    target_entropy: torch.Tensor
    inverse_error: torch.Tensor
    spread: torch.Tensor
    collapse: torch.Tensor


def pass_statistics(
    forward_rows: AttentionRowStatistics,
    backward_rows: AttentionRowStatistics,
    grid_size: Sequence[int],
    target_grid_size: Sequence[int] | None = None,
) -> PassStatistics:
    """Statistics of one pass from the row statistics of `A_st` (forward) and `A_ts` (backward): `f`, the IME of
    each match's target, IMS, neighbourhood spread and collapse share (Eq. 2.7-2.13)."""
    target_grid_size = grid_size if target_grid_size is None else target_grid_size
    forward, backward = forward_rows.argmax, backward_rows.argmax
    inverse_error = inverse_mapping_error(forward, backward, grid_size)
    spread, collapse = neighbourhood_spread(forward, grid_size, target_grid_size)
    target_entropy = backward_rows.entropy[forward]
    return PassStatistics(forward, target_entropy, inverse_error, spread, collapse)


def auto_thresholds(stats: PassStatistics) -> SelectionThresholds:
    """Thresholds from one pass's own statistics (the `"auto"` preset of DESIGN step 7).

    - `max_entropy`: Otsu's cut of the pass's target IME values (nats): the pass's peaked targets against its
      diffuse ones.
    - `max_spread`: Otsu's cut of `log(1 + spread)` (cells^2): locally coherent mappings against scattered ones.
    - `max_inverse_error`: `sqrt(2)` cells: the cycle `g(f(p))` must come back to p or one of the 3x3 neighbours of
      Eq. 2.11 (a geometric definition, not a tuned number: one grid step of tolerance whatever the scales).
    - `max_collapse`: `1 - 1/8`: only a complete collapse (every neighbour on `f(p)`) is rejected; a partial one is
      what a correct match into a smaller copy of the object looks like.

    A sample that Otsu cannot split (empty or constant) disables that check (`inf`).
    """
    max_entropy = otsu_threshold(stats.target_entropy)
    max_spread = math.expm1(otsu_threshold(torch.log1p(stats.spread)))
    return SelectionThresholds(
        max_entropy=max_entropy,
        max_spread=max_spread if math.isfinite(max_spread) else math.inf,
        max_collapse=1.0 - 1.0 / len(_NEIGHBOUR_OFFSETS),
        max_inverse_error=math.sqrt(2.0),
    )


def supported_spread(
    forward: torch.Tensor,
    keep: torch.Tensor,
    grid_size: Sequence[int],
    target_grid_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spread of Eq. 2.11-2.13 measured over kept neighbours only.

    Args:
        forward: `(N_s,)` long, `f`.
        keep: `(N_s,)` bool, the matches kept so far.
        grid_size, target_grid_size: `(h, w)` of the source and target grids.

    Returns:
        `(spread, support)`, each `(N_s,)` float32: `mean ||f(n) - f(p)||^2` over the kept 3x3 neighbours n of p
        (0 where there are none) and their number.
    """
    h, w = _check_grid(grid_size)
    ht, wt = _check_grid(target_grid_size if target_grid_size is not None else grid_size, "target_grid_size")
    forward = _check_indices(forward, ht * wt, "forward")
    if forward.shape[0] != h * w or keep.shape != forward.shape:
        raise ValueError(
            f"`forward` {tuple(forward.shape)} and `keep` {tuple(keep.shape)} must both have {h * w} entries."
        )
    target = token_coordinates((ht, wt), device=forward.device)[forward].view(h, w, 2)
    kept = keep.view(h, w).float()
    total = torch.zeros(h, w, device=forward.device)
    count = torch.zeros(h, w, device=forward.device)
    for _, _, centre, neighbour in _neighbour_slices(h, w):
        weight = kept[neighbour]
        step = ((target[neighbour] - target[centre]) ** 2).sum(dim=-1)
        total[centre] += weight * step
        count[centre] += weight
    return (total / count.clamp_min(1)).flatten(), count.flatten()


def grow_matches(
    stats: PassStatistics,
    keep: torch.Tensor,
    thresholds: SelectionThresholds,
    grid_size: Sequence[int],
    target_grid_size: Sequence[int] | None = None,
    min_support: int = 2,
) -> torch.Tensor:
    """Adds matches that the kept ones vouch for (the `"auto"` preset's neighbourhood check, DESIGN step 6).

    The spread of Eq. 2.11-2.13 averages over all eight neighbours, so a correct match on an object's outline,
    whose outer neighbours fall on the background and map anywhere, fails it. Here a match `p -> f(p)` that passes
    the cycle check (`max_inverse_error`) and the collapse check is added when at least `min_support` neighbours
    are kept and its spread over those kept neighbours is within `max_spread`; repeated until nothing changes. Only
    the entropy check is waived: a grown match is one the geometry of its kept neighbours confirms. Finally a kept
    match with fewer than `min_support` kept neighbours is dropped: on planted data such lone matches are mostly
    wrong (a chance cycle in the background).

    Args:
        stats: the pass's statistics.
        keep: `(N_s,)` bool, matches kept by :func:`select_matches`.
        thresholds: the pass's limits.
        grid_size, target_grid_size: `(h, w)` of the source and target grids.
        min_support: kept neighbours needed (2: a match is never vouched for by a single chain).

    Returns:
        `(N_s,)` bool.
    """
    if isinstance(min_support, bool) or not isinstance(min_support, int) or min_support < 1:
        raise ValueError(f"`min_support` must be a positive int, got {min_support!r}.")
    eligible = (stats.inverse_error <= thresholds.max_inverse_error) & (stats.collapse <= thresholds.max_collapse)
    keep = keep.clone()
    for _ in range(keep.shape[0]):
        spread, support = supported_spread(stats.forward, keep, grid_size, target_grid_size)
        grown = keep | (eligible & (support >= min_support) & (spread <= thresholds.max_spread))
        if bool((grown == keep).all()):
            break
        keep = grown
    # a kept match that no `min_support` kept neighbours accompany stands alone: drop it (one pass, no cascade)
    _, support = supported_spread(stats.forward, keep, grid_size, target_grid_size)
    return keep & (support >= min_support)


def reverse_consistent(
    forward: torch.Tensor,
    keep: torch.Tensor,
    backward: torch.Tensor,
    keep_backward: torch.Tensor,
    grid_size: Sequence[int],
    tolerance: float,
) -> torch.Tensor:
    """Drops kept matches that a kept match of the reverse pass contradicts (the `"auto"` preset, after confirmation).

    A kept `p -> f(p)` whose target is itself kept in the pass t -> s must come back: `||p - g(f(p))|| <= tolerance`
    source cells. A match checked by Eq. 2.8 already does; a match added by :func:`confirm_matches` was not checked,
    and when the reverse pass keeps `f(p)` for another source token the two cannot both be right (the object is
    matched one to one). Targets the reverse pass does not keep give no evidence and leave the match alone.

    Args:
        forward, keep: `(N_s,)` pass s -> t: `f` (long) and its kept mask (bool).
        backward, keep_backward: `(N_t,)` pass t -> s: `g` (long) and its kept mask (bool).
        grid_size: `(h, w)` of the source grid, `h * w == N_s`.
        tolerance: source cells (the pass's `max_inverse_error`).

    Returns:
        `(N_s,)` bool, a subset of `keep`.
    """
    error = inverse_mapping_error(forward, backward, grid_size)
    return keep & (~keep_backward[forward] | (error <= tolerance))


def affine_residual(
    forward: torch.Tensor,
    keep: torch.Tensor,
    grid_size: Sequence[int],
    target_grid_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far `f(p)` lies from where its kept 3x3 neighbours (Eq. 2.11) put it.

    For each source token p, the least-squares affine map `f(n) - f(p) ~ c + A (n - p)` is fitted over the kept
    neighbours n of p (the 3x3 offsets are the design points, so no iteration is needed); `c` is then the
    displacement between where the neighbours predict p's match and `f(p)`, and the residual is `||c||` in target
    cells. A locally smooth map (a warp of the object: scale, shift, mirror) gives about 0; a match one or two cells
    off the neighbours' field gives that many cells.

    Args:
        forward: `(N_s,)` long, `f`.
        keep: `(N_s,)` bool, the kept matches (only these neighbours are fitted).
        grid_size, target_grid_size: `(h, w)` of the source and target grids.

    Returns:
        `(residual, defined)`, each `(N_s,)`: float32 cells, and bool where the kept neighbours determine an
        affine fit (three or more, not all on one line); the residual is 0 elsewhere.
    """
    h, w = _check_grid(grid_size)
    ht, wt = _check_grid(target_grid_size if target_grid_size is not None else grid_size, "target_grid_size")
    forward = _check_indices(forward, ht * wt, "forward")
    if forward.shape[0] != h * w or keep.shape != forward.shape:
        raise ValueError(
            f"`forward` {tuple(forward.shape)} and `keep` {tuple(keep.shape)} must both have {h * w} entries."
        )
    device = forward.device
    target = token_coordinates((ht, wt), device=device)[forward].view(h, w, 2)
    kept = keep.view(h, w).float()
    gram = torch.zeros(h, w, 3, 3, device=device)
    moment = torch.zeros(h, w, 3, 2, device=device)
    for di, dj, centre, neighbour in _neighbour_slices(h, w):
        x = torch.tensor([1.0, float(di), float(dj)], device=device)
        weight = kept[neighbour][..., None, None]
        step = target[neighbour] - target[centre]
        gram[centre] += weight * torch.outer(x, x)
        moment[centre] += weight * x[:, None] * step[..., None, :]
    # integer design points: a determined fit has |det| >= 1, a degenerate one exactly 0
    defined = torch.linalg.det(gram).abs() > 0.5
    eye = torch.eye(3, device=device).expand_as(gram)
    beta = torch.linalg.solve(torch.where(defined[..., None, None], gram, eye), moment)
    residual = torch.linalg.vector_norm(beta[..., 0, :], dim=-1) * defined
    return residual.flatten(), defined.flatten()


def field_consistent(
    stats: PassStatistics,
    keep: torch.Tensor,
    thresholds: SelectionThresholds,
    grid_size: Sequence[int],
    target_grid_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Final neighbourhood agreement of the `"auto"` preset: drops a kept match that only the loose part of the
    cycle tolerance let in and that its kept neighbours' field does not predict.

    A match whose cycle returns exactly to p or to a 4-neighbour (`IMS <= 1` cell, the note's own limit) stays. A
    match with a diagonal cycle (`1 < IMS <= sqrt(2)`) or none checked (a confirmed match) stays only if the affine
    fit of its kept neighbours (:func:`affine_residual`) predicts `f(p)` within `max_inverse_error` target cells,
    the same one-step tolerance as its cycle; undetermined fits leave it alone. One pass, no cascade.

    Args:
        stats: the pass's statistics.
        keep: `(N_s,)` bool, the kept matches.
        thresholds: the pass's limits (`max_inverse_error`, cells).
        grid_size, target_grid_size: `(h, w)` of the source and target grids.

    Returns:
        `(N_s,)` bool, a subset of `keep`.
    """
    residual, defined = affine_residual(stats.forward, keep, grid_size, target_grid_size)
    loose = stats.inverse_error > 1.0
    return keep & ~(loose & defined & (residual > thresholds.max_inverse_error))


def select_matches(stats: PassStatistics, thresholds: SelectionThresholds) -> torch.Tensor:
    """`(N_s,)` bool: which `p -> f(p)` pass every check (DESIGN step 7)."""
    return (
        (stats.target_entropy < thresholds.max_entropy)
        & (stats.spread <= thresholds.max_spread)
        & (stats.collapse <= thresholds.max_collapse)
        & (stats.inverse_error <= thresholds.max_inverse_error)
    )


# Moved to `joining.py` (DESIGN step 8) and still importable from here, though not by a relative import: a module
# inside `utils/` imports no sibling (diffusers' Hub loader resolves its relative imports from the repository root,
# DESIGN section 3). `pipeline_cosegment.py` imports `.utils.joining`, so the module is there wherever this one is.
_MOVED_TO_JOINING = ("confirm_matches", "kept_map", "match_scores", "merge_passes", "token_centres_in_pixels")


def __getattr__(name: str):
    """`from cosegment.utils.correspondence import kept_map` and the like, as before the move (PEP 562)."""
    if name in _MOVED_TO_JOINING:
        return getattr(importlib.import_module(".joining", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED_TO_JOINING])
