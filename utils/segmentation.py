"""Clustering of hits and co-segmentation by KL divergence of self-attention rows (DESIGN steps 10-11).

Pure functions: tensors or arrays in, tensors or arrays out; torch, numpy and OpenCV only. This module may not import
its siblings in `utils/`: loaded from the Hub, diffusers resolves a helper's relative imports from the repository
root, so `from .correspondence import f` fails there (a module at the root, like `analysis.py`, may import
`.utils.x`; DESIGN section 3). Code both need is copied here, marked `# Copied from cosegment.utils.<module>.<name>`,
and `tests/test_copies.py` keeps the copies identical. Shapes: `H` heads, `N` tokens of an `(h, w)` grid
flattened row-major, `d` head size, `K` parts. Probabilities, logs and KL are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

# Copied from cosegment.utils.correspondence._CHUNK_ELEMENTS
# Row chunks are sized so one float32 `(H, rows, N_t)` logit block holds about this many elements (64 MiB).
_CHUNK_ELEMENTS = 2**24
# Probabilities are floored at this value before a log, so KL stays finite.
PROBABILITY_FLOOR = 1e-12
# Step 11 at the image's own size (`upsample_assignment`): the token grid's foreground and part indicators are
# smoothed by a Gaussian of this many token cells before the bilinear resize. Half a cell, not fitted: a round number
# under which nothing the grid resolves is erased (the 2-D kernel keeps 0.62 of a lone token at its centre, a
# one-token line keeps 0.79, both above the 1/2 cut, and a lone token keeps 4-12 pixels at 6-10 pixels per cell;
# at 0.55 cells it keeps no pixel, from 0.57 its centre falls under 1/2, from 0.8 a one-token line's does), while
# the staircase that the bare bilinear resize leaves along an oblique outline or part boundary is smoothed.
# Measured on the DESIGN split only (BENCHMARKS.md (l2)); wider kernels scored higher there (0.8: part NMI +0.04)
# but erase lone tokens and one-token lines, which real objects have.
UPSAMPLE_SIGMA = 0.5
# Step 10's eigensolver (`_top_left_singular`): where the smaller side of the embedding has more than this many
# entries, the leading eigenpairs come from a block Krylov subspace of this many vectors a step (started from a
# fixed random block), until each pair's residual is at most this share of the largest eigenvalue, with a full
# eigensolver past this many basis vectors. Set so that the pairs read by the clustering match a full `eigh` (to
# 1e-14 on the design M = 16 collections checked; BENCHMARKS.md (k3)); under the size limit the full eigensolver is
# cheap and used as before.
KRYLOV_ABOVE = 256
KRYLOV_BLOCK = 16
KRYLOV_TOLERANCE = 1e-10
KRYLOV_MAX_BASIS = 400


def _head_list(x: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """`(N, d)`, `(H, N, d)` or a sequence of them -> list of `(H, N, d)`."""
    items = [x] if isinstance(x, torch.Tensor) else list(x)
    if not items:
        raise ValueError(f"`{name}` must hold at least one tensor, got an empty sequence.")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}[{i}]` must be a torch.Tensor, got {type(t).__name__}.")
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3:
            raise ValueError(f"`{name}[{i}]` must have shape (N, d) or (H, N, d), got {tuple(t.shape)}.")
        out.append(t)
    return out


def _check_qk(queries, keys) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    qs, ks = _head_list(queries, "queries"), _head_list(keys, "keys")
    if len(qs) != len(ks):
        raise ValueError(f"`queries` and `keys` must have the same length, got {len(qs)} and {len(ks)}.")
    for i, (q, k) in enumerate(zip(qs, ks)):
        if (
            q.shape[0] != k.shape[0]
            or q.shape[-1] != k.shape[-1]
            or q.shape[1] != qs[0].shape[1]
            or k.shape[1] != ks[0].shape[1]
        ):
            raise ValueError(f"`queries[{i}]` {tuple(q.shape)} and `keys[{i}]` {tuple(k.shape)} do not match.")
    return qs, ks


def _chunk(qs: list[torch.Tensor], ks: list[torch.Tensor], chunk_size: int | None) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(1, max(q.shape[0] for q in qs) * ks[0].shape[1]))


def _rows(qs: list[torch.Tensor], ks: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Mean over layers and heads of `softmax(Q[index] K^T / sqrt(d))`: `(len(index), N_k)` float32."""
    total = None
    for q, k in zip(qs, ks):
        logits = torch.matmul(q[:, index].float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(logits, dim=-1).mean(dim=0)
        total = probs if total is None else total.add_(probs)
    return total / len(qs)


def attention_rows(
    queries: torch.Tensor | Sequence[torch.Tensor],
    keys: torch.Tensor | Sequence[torch.Tensor],
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Chosen rows and columns of the head- and layer-averaged attention `A = mean softmax(Q K^T / sqrt(d))`
    (Eq. 2.1-2.2), computed in row chunks (never a whole `(H, N, N)` block).

    Args:
        queries: `(H, N_q, d)` or `(N_q, d)`, or a sequence of them (layers / noise draws, averaged after softmax).
        keys: same layout with `N_k` tokens.
        rows: `(R,)` long query tokens, all by default.
        columns: `(C,)` long key tokens kept after the softmax over all `N_k` keys (not renormalised), all by default.
        chunk_size: rows computed at once; about 64 MiB of logits by default.

    Returns:
        `(R, C)` float32.
    """
    qs, ks = _check_qk(queries, keys)
    num_q = qs[0].shape[1]
    device = qs[0].device
    rows = torch.arange(num_q, device=device) if rows is None else torch.as_tensor(rows, device=device).long()
    step = _chunk(qs, ks, chunk_size)
    parts = []
    for start in range(0, rows.shape[0], step):
        block = _rows(qs, ks, rows[start : start + step])
        parts.append(block if columns is None else block[:, torch.as_tensor(columns, device=device).long()])
    if not parts:
        width = ks[0].shape[1] if columns is None else len(columns)
        return torch.zeros(0, width, device=device)
    return torch.cat(parts)


def part_distributions(
    queries: torch.Tensor | Sequence[torch.Tensor],
    keys: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    num_parts: int,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Each part's distribution: the mean of the attention rows of its points (DESIGN step 11).

    Args:
        queries, keys: of one image, as in :func:`attention_rows` (`N` tokens each).
        labels: `(N,)` int, part `1..num_parts` of each clustered point, 0 for tokens that are no part's point.
        num_parts: `K`.

    Returns:
        `(K, N)` float32, rows sum to 1; a part without points gets a uniform row.
    """
    qs, ks = _check_qk(queries, keys)
    labels = _check_labels(labels, qs[0].shape[1], num_parts, qs[0].device)
    return _distributions_from(
        lambda index: _rows(qs, ks, index), labels, num_parts, ks[0].shape[1], _chunk(qs, ks, chunk_size)
    )


def _check_labels(labels, num_tokens: int, num_parts: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(labels, device=device).long().flatten()
    if labels.shape[0] != num_tokens:
        raise ValueError(f"`labels` has {labels.shape[0]} entries for {num_tokens} tokens.")
    if num_parts < 0 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_parts)):
        raise ValueError(f"`labels` must lie in [0, num_parts={num_parts}].")
    return labels


def _distributions_from(rows_of, labels: torch.Tensor, num_parts: int, num_keys: int, step: int) -> torch.Tensor:
    """:func:`part_distributions` from `rows_of(index)`, the `(len(index), N)` attention rows of the tokens `index`,
    asked for `step` points at a time (the labels already checked)."""
    sums = torch.zeros(num_parts + 1, num_keys, device=labels.device)
    points = torch.nonzero(labels > 0).flatten()
    for start in range(0, points.shape[0], step):
        index = points[start : start + step]
        sums.index_add_(0, labels[index], rows_of(index))
    counts = torch.bincount(labels[points], minlength=num_parts + 1).float()[1:]
    dist = sums[1:] / counts.clamp_min(1)[:, None]
    empty = counts == 0
    dist[empty] = 1.0 / max(num_keys, 1)
    return dist


def kl_to_parts(
    queries: torch.Tensor | Sequence[torch.Tensor],
    keys: torch.Tensor | Sequence[torch.Tensor],
    parts: torch.Tensor,
    chunk_size: int | None = None,
    floor: float = PROBABILITY_FLOOR,
) -> torch.Tensor:
    """`KL(A[p] || parts[k])` in nats for every token p and part k, in row chunks.

    Args:
        queries, keys: of one image (`N` tokens each), as in :func:`attention_rows`.
        parts: `(K, N)` part distributions (see :func:`part_distributions`).
        floor: probabilities are clamped to at least this before the log (never inf or NaN).

    Returns:
        `(N, K)` float32, non-negative.
    """
    qs, ks = _check_qk(queries, keys)
    parts = torch.as_tensor(parts, device=qs[0].device).float()
    if parts.ndim != 2 or parts.shape[1] != ks[0].shape[1]:
        raise ValueError(f"`parts` must have shape (K, {ks[0].shape[1]}), got {tuple(parts.shape)}.")
    if not floor > 0:
        raise ValueError(f"`floor` must be positive, got {floor!r}.")
    num_q = qs[0].shape[1]
    device = qs[0].device
    return _kl_from(lambda index: _rows(qs, ks, index), num_q, parts, _chunk(qs, ks, chunk_size), floor, device)


def _kl_from(rows_of, num_q: int, parts: torch.Tensor, step: int, floor: float, device) -> torch.Tensor:
    """:func:`kl_to_parts` from `rows_of(index)`, the `(len(index), N)` attention rows of the tokens `index`, asked
    for `step` consecutive tokens at a time (the arguments already checked)."""
    log_parts = parts.clamp_min(floor).log()  # (K, N)
    out = []
    for start in range(0, num_q, step):
        rows = rows_of(torch.arange(start, min(start + step, num_q), device=device))
        rows = rows.clamp_min(floor)
        rows = rows / rows.sum(dim=-1, keepdim=True)
        self_term = (rows * rows.log()).sum(dim=-1, keepdim=True)  # (R, 1)
        out.append((self_term - rows @ log_parts.T).clamp_min(0.0))
    if not out:
        return torch.zeros(0, parts.shape[0], device=device)
    return torch.cat(out)


def parts_and_divergences(
    queries: torch.Tensor | Sequence[torch.Tensor],
    keys: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    num_parts: int,
    chunk_size: int | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`part_distributions` and then :func:`kl_to_parts` of every token to them, for one image (DESIGN step 11).

    Args:
        queries, keys, labels, num_parts, chunk_size: as in :func:`part_distributions` (one image, `N` tokens).
        rows: optional `(N, N)` float32 attention rows of the image, `attention_rows(queries, keys)`, computed
            beforehand (step 11 keeps them for its rounds): then no row is computed again. They are read in the
            chunks that the two functions compute rows in, so the values are theirs.

    Returns:
        `(distributions, kl)`: `(K, N)` float32 (rows sum to 1; uniform for a part without points) and `(N, K)`
        float32 KL in nats.
    """
    qs, ks = _check_qk(queries, keys)
    labels = _check_labels(labels, qs[0].shape[1], num_parts, qs[0].device)
    num, num_keys = qs[0].shape[1], ks[0].shape[1]
    if rows is None:

        def rows_of(index: torch.Tensor) -> torch.Tensor:
            return _rows(qs, ks, index)

    else:
        if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (num, num_keys):
            raise ValueError(f"`rows` must be a ({num}, {num_keys}) tensor, got {getattr(rows, 'shape', rows)}.")

        def rows_of(index: torch.Tensor) -> torch.Tensor:
            return rows[index].float()

    step = _chunk(qs, ks, chunk_size)
    distributions = _distributions_from(rows_of, labels, num_parts, num_keys, step)
    return distributions, _kl_from(rows_of, num, distributions, step, PROBABILITY_FLOOR, qs[0].device)


def assign_parts(kl: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token to its nearest part, or to background when even the nearest is too far (DESIGN step 11).

    Args:
        kl: `(N, K)` KL divergences (see :func:`kl_to_parts`); `inf` marks a part absent from the image.
        threshold: a token whose smallest KL exceeds this is background; `inf` keeps every token.

    Returns:
        `(labels, min_kl)`: `(N,)` long in `0..K` (0 = background) and `(N,)` float32 smallest KL.
    """
    if not isinstance(kl, torch.Tensor) or kl.ndim != 2:
        raise ValueError(f"`kl` must be a (N, K) tensor, got {getattr(kl, 'shape', type(kl))}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"`threshold` must be a number, got {threshold!r}.")
    if kl.shape[1] == 0:
        return torch.zeros(kl.shape[0], dtype=torch.long, device=kl.device), torch.full(
            (kl.shape[0],), math.inf, device=kl.device
        )
    min_kl, nearest = kl.min(dim=1)
    near = (min_kl <= threshold) & torch.isfinite(min_kl)
    labels = torch.where(near, nearest + 1, torch.zeros_like(nearest))
    return labels, min_kl


# Copied from cosegment.utils.correspondence._finite_sample
def _finite_sample(values: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """A 1-D sample's finite values `(K,)` float32 and their min and max (`inf`, `-inf` for an empty sample): the
    set-up of a histogram threshold."""
    values = torch.as_tensor(values).detach().float().flatten()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return values, math.inf, -math.inf
    return values, float(values.min()), float(values.max())


# Step 11's cut: cuts whose two-class fit is within this many nats of the best one's log-likelihood count as equally
# good, and the middle of them is taken (half the 95 % quantile of chi-square with one degree of freedom, 3.84 / 2).
CUT_LIKELIHOOD_MARGIN = 1.92


def minimum_error_threshold(values: torch.Tensor, bins: int = 256, margin: float = CUT_LIKELIHOOD_MARGIN) -> float:
    """Kittler and Illingworth's minimum-error threshold of a 1-D sample: the cut that best explains the sample as
    two Gaussian classes (unlike Otsu's cut it is not dragged into the larger class when the classes differ much in
    size or spread), taken in the middle of the cuts that explain it as well.

    The criterion is, per value, twice the negative log-likelihood of the two fitted classes (up to a constant), so
    `K / 2` times a difference of criteria is a difference of log-likelihoods. Across a sparse stretch between two
    classes the criterion is nearly flat (a cut moves a handful of values at most), and the best bin there is decided
    by differences far below what the sample supports: a small change of the features (a reference's estimation
    noise) then moves the cut from one end of the stretch to the other, and a band of background with it
    (BENCHMARKS.md (n4)). So the cut is the middle of the run of cuts around the best one whose log-likelihood is
    within `margin` nats of it; `margin = 0` gives the middle of the bins tied for the best (an empty stretch).

    Args:
        values: `(K,)` values; non-finite ones are ignored.
        bins: histogram bins.
        margin: nats of log-likelihood (:data:`CUT_LIKELIHOOD_MARGIN`).

    Returns:
        The threshold, between the sample's min and max; `inf` when the sample is empty, constant or cannot be split
        into two classes that both have spread.
    """
    values, lo, hi = _finite_sample(values)
    if values.numel() == 0 or hi <= lo:
        return math.inf
    hist = torch.histc(values, bins=bins, min=lo, max=hi).double()
    hist = hist / hist.sum()
    centres = lo + (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) * (hi - lo) / bins
    p1 = hist.cumsum(0)[:-1]
    p2 = 1.0 - p1
    m1 = (hist * centres).cumsum(0)[:-1]
    s1 = (hist * centres**2).cumsum(0)[:-1]
    total_m, total_s = float((hist * centres).sum()), float((hist * centres**2).sum())
    mean1 = m1 / p1.clamp_min(1e-300)
    mean2 = (total_m - m1) / p2.clamp_min(1e-300)
    var1 = s1 / p1.clamp_min(1e-300) - mean1**2
    var2 = (total_s - s1) / p2.clamp_min(1e-300) - mean2**2
    floor = ((hi - lo) / bins) ** 2 / 12.0  # a class inside one bin has at least the bin's own spread
    valid = (p1 > 0) & (p2 > 0)
    if not bool(valid.any()):
        return math.inf
    cost = (
        p1 * var1.clamp_min(floor).log()
        + p2 * var2.clamp_min(floor).log()
        - 2.0 * (p1.clamp_min(1e-300).log() * p1 + p2.clamp_min(1e-300).log() * p2)
    )
    cost = torch.where(valid, cost, torch.full_like(cost, math.inf))
    k = int(cost.argmin())
    alike = (0.5 * values.numel() * (cost - cost[k]) <= margin).cpu().tolist()  # log-likelihood within `margin`
    first = last = k
    while first > 0 and alike[first - 1]:
        first -= 1
    while last < len(alike) - 1 and alike[last + 1]:
        last += 1
    return lo + (0.5 * (first + last) + 1) * (hi - lo) / bins


def background_threshold_from_kl(min_kl: torch.Tensor) -> float:
    """The KL above which a token is background, found from the data (DESIGN step 11): the minimum-error cut of
    `log(1 + KL)` over every token's smallest KL to a part (object tokens near their part, background far from all;
    the log evens the two classes' spreads, the `1 +` keeps a token equal to its part's distribution from becoming
    an outlier).

    Args:
        min_kl: `(N,)` smallest KL of each token (nats); non-finite values (images without parts) are ignored.

    Returns:
        The threshold in nats; `inf` when the sample cannot be split.
    """
    min_kl = torch.as_tensor(min_kl).detach().float().flatten()
    min_kl = min_kl[torch.isfinite(min_kl)]
    cut = minimum_error_threshold(torch.log1p(min_kl.clamp_min(0.0)))
    return math.expm1(cut) if math.isfinite(cut) else math.inf


# ---------------------------------------------------------------------------------------------------------------
# Clustering (DESIGN step 10)
# ---------------------------------------------------------------------------------------------------------------


def grow_by_one_token(mask: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """`(N,)` bool tokens of an `(h, w)` grid and their 8 neighbours (a 3 x 3 dilation); `(N,)` bool."""
    h, w = int(grid_size[0]), int(grid_size[1])
    if mask.numel() != h * w:
        raise ValueError(f"`grid_size` {(h, w)} does not hold the {mask.numel()} tokens of `mask`.")
    grown = torch.nn.functional.max_pool2d(mask.view(1, 1, h, w).float(), 3, stride=1, padding=1)
    return grown.view(-1) > 0


def remove_isolated(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drops the 8-connected regions of a boolean grid mask smaller than `min_size` tokens.

    Args:
        mask: `(h, w)` bool.
        min_size: smallest region kept, tokens (1 keeps everything).

    Returns:
        `(h, w)` bool.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D (h, w), got shape {mask.shape}.")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"`min_size` must be a positive int, got {min_size!r}.")
    if not mask.any():
        return mask.copy()
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False
    return keep[labels]


def _maximin_init(x: np.ndarray, k: int, first: int) -> np.ndarray:
    """Deterministic k-means seeding: start at `first`, then repeatedly the point farthest from every seed."""
    seeds = [first]
    dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        nxt = int(dist.argmax())
        seeds.append(nxt)
        dist = np.minimum(dist, ((x - x[nxt]) ** 2).sum(1))
    return ((x[:, None, :] - x[seeds][None]) ** 2).sum(-1).argmin(1)


def kmeans(points: np.ndarray, num_clusters: int, first: int = 0, iterations: int = 50) -> np.ndarray:
    """OpenCV k-means with a deterministic farthest-point start (no random state).

    Args:
        points: `(R, D)` float.
        num_clusters: `k`, at most `R`.
        first: index of the first seed.

    Returns:
        `(R,)` int64 labels in `0..k-1`.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.ndim != 2:
        raise ValueError(f"`points` must be (R, D), got shape {points.shape}.")
    r = points.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters:
        raise ValueError(f"`num_clusters` must be a positive int, got {num_clusters!r}.")
    if num_clusters > r:
        raise ValueError(f"`num_clusters`={num_clusters} exceeds the {r} points.")
    if num_clusters == 1:
        return np.zeros(r, dtype=np.int64)
    labels = _maximin_init(points, num_clusters, first).astype(np.int32).reshape(-1, 1)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, iterations, 1e-5)
    _, labels, _ = cv2.kmeans(points, num_clusters, labels, criteria, 1, cv2.KMEANS_USE_INITIAL_LABELS)
    return labels.ravel().astype(np.int64)


def spectral_clusters(affinity: np.ndarray, num_clusters: int | None, max_clusters: int) -> np.ndarray:
    """Spectral clustering (Ng, Jordan and Weiss) of points given their affinities, with OpenCV k-means.

    The normalised affinity `D^-1/2 A D^-1/2` is diagonalised; the points' rows of its top-k eigenvectors,
    scaled to unit length, are clustered by :func:`kmeans` (seeded at the point of largest degree). With
    `num_clusters=None`, k is the largest eigengap among `2..max_clusters`.

    Args:
        affinity: `(R, R)` symmetric non-negative.
        num_clusters: `k`, or None to estimate it.
        max_clusters: largest k considered when estimating.
        overwrite: `B` may be made in `embedding` itself when it is a float64 array (the caller's copy, not read
            again): no second `(R, D)` float64 array (step 10's largest buffer).

    Returns:
        `(R,)` int64 labels in `0..k-1` (k is `labels.max() + 1`; at most R).
    """
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"`affinity` must be square (R, R), got shape {a.shape}.")
    if num_clusters is not None and (
        isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1
    ):
        raise ValueError(f"`num_clusters` must be a positive int or None, got {num_clusters!r}.")
    r = a.shape[0]
    if r == 0:
        return np.zeros(0, dtype=np.int64)
    a = 0.5 * (a + a.T)
    degree = a.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    values, vectors = np.linalg.eigh(inv[:, None] * a * inv[None, :])
    values, vectors = values[::-1], vectors[:, ::-1]  # descending
    if num_clusters is None:
        num_clusters = eigengap_count(values, max_clusters)
    k = min(num_clusters, r)
    embedding = vectors[:, :k]
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    return kmeans(embedding, k, first=int(np.argmax(degree)))


def eigengap_count(values: np.ndarray, max_clusters: int) -> int:
    """The number of clusters `k` in `2..max_clusters` after which the descending eigenvalues `values` of a
    normalised affinity drop most (`values[k - 1] - values[k]` largest); 1 when fewer than three values."""
    values = np.asarray(values, dtype=np.float64)
    top = min(int(max_clusters), values.shape[0] - 1)
    if top < 2:
        return 1
    gaps = values[:top] - values[1 : top + 1]  # gaps[k - 1] = lambda_k - lambda_k+1
    return int(np.argmax(gaps[1:]) + 2)


def _leading_eigenpairs(
    apply, size: int, count: int, block: int = KRYLOV_BLOCK, max_basis: int = KRYLOV_MAX_BASIS
) -> tuple[np.ndarray, np.ndarray] | None:
    """The `count` largest eigenvalues (descending) and their unit eigenvectors `(size, count)` of a symmetric
    positive semi-definite `(size, size)` matrix given only through `apply(x)` (its product with an `(size, p)`
    block), from a block Krylov subspace: a fixed Gaussian start block (seed 0, so the result is reproducible), each
    new block orthogonalised twice against the basis, and the Rayleigh-Ritz pairs of the basis. Stops once every
    one of the `count` Ritz pairs has a residual `|G v - theta v|` of at most `KRYLOV_TOLERANCE` times the largest
    value (an eigenvector's error is then at most that over its gap to the other eigenvalues, and an eigenvalue's at
    most its square over that gap); `None` when the basis would pass `max_basis` (or half of `size`) first, for the
    caller to fall back on a full eigensolver."""
    limit = min(max_basis, size // 2)
    if count < 1 or block + count > limit:
        return None
    start = np.random.default_rng(0).standard_normal((size, max(block, count)))
    basis = [np.linalg.qr(start)[0]]
    images = [apply(basis[0])]
    while True:
        q, gq = np.hstack(basis), np.hstack(images)
        small = q.T @ gq
        theta, y = np.linalg.eigh(0.5 * (small + small.T))
        theta, y = theta[::-1][:count], y[:, ::-1][:, :count]
        vectors = q @ y
        residual = np.linalg.norm(gq @ y - vectors * theta, axis=0)
        if residual.max() <= KRYLOV_TOLERANCE * max(float(theta[0]), 1e-300):
            return theta, vectors / np.linalg.norm(vectors, axis=0)
        if q.shape[1] + basis[-1].shape[1] > limit:
            return None
        new = images[-1]
        for _ in range(2):
            new = new - q @ (q.T @ new)
        basis.append(np.linalg.qr(new)[0])
        images.append(apply(basis[-1]))


def _top_left_singular(b: np.ndarray, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(values, vectors)` of `B B^T` for `b` `(R, D)`: its eigenvalues in descending order (squared singular values
    of `B`, zeros past its rank), `R` of them, and the left singular vectors `(R, min(R, D))` in the same order; with
    `count`, only the first `min(count, R)` values and `min(count, R, D)` vectors.

    From the eigendecomposition of the Gram matrix of the smaller side: `B^T B` `(D, D)` when `D <= R` (then
    `U = B V / s`), else `B B^T`. A matrix product and a symmetric eigensolver instead of an SVD: about 3x faster at
    the sizes of step 10 (R = 2266 hit tokens, D = 1426, measured in BENCHMARKS.md (k2)). With `count` and a
    smaller side over `KRYLOV_ABOVE`, the leading pairs come from a block Krylov subspace of products with `B` and
    `B^T` (:func:`_leading_eigenpairs`; the Gram matrix is never formed), about 3x faster again at those sizes
    (BENCHMARKS.md (k3)); where it does not converge, the full eigensolver. Squaring costs precision only in the
    small singular values; the clustering reads the leading ones (values >= 1e-6 of the largest keep their vectors;
    with `D <= R` a vector of a smaller value is set to zero rather than divided by a value near zero)."""
    r, d = b.shape
    pairs = None
    if count is not None and min(r, d) > KRYLOV_ABOVE:
        if d <= r:
            pairs = _leading_eigenpairs(lambda x: b.T @ (b @ x), d, min(count, d))
        else:
            pairs = _leading_eigenpairs(lambda x: b @ (b.T @ x), r, min(count, r))
    if pairs is None:
        gram_values, gram_vectors = np.linalg.eigh(b.T @ b if d <= r else b @ b.T)
        gram_values, gram_vectors = gram_values[::-1], gram_vectors[:, ::-1]
    else:
        gram_values, gram_vectors = pairs
    if d <= r:
        singular = np.sqrt(np.clip(gram_values, 0.0, None))
        usable = singular > 1e-3 * max(float(singular[0]), 1e-300)
        vectors = np.zeros((r, gram_values.shape[0]))
        vectors[:, usable] = (b @ gram_vectors[:, usable]) / singular[usable]
    else:
        vectors = gram_vectors
    values = np.zeros(r)
    values[: gram_values.shape[0]] = np.clip(gram_values, 0.0, None)
    if count is not None:
        values, vectors = values[:count], vectors[:, :count]
    return values, np.ascontiguousarray(vectors)


def factored_spectral_clusters(
    embedding: np.ndarray, num_clusters: int | None, max_clusters: int, overwrite: bool = False
) -> np.ndarray:
    """Spectral clustering (Ng, Jordan and Weiss) of points whose affinity is `A = E E^T` for a non-negative
    `embedding` `E`, without forming `A`: the normalised affinity `D^-1/2 A D^-1/2` is `B B^T` with `B = D^-1/2 E`
    (`D = diag(E E^T 1)`), so its top eigenvectors are the left singular vectors of `B` and its eigenvalues the
    squared singular values (:func:`_top_left_singular`, from the smaller Gram matrix). Cost `O(R D min(R, D))`
    instead of `O(R^3)`. The points' rows of the top-k vectors,
    scaled to unit length, are clustered by :func:`kmeans` (seeded at the point of largest degree). With
    `num_clusters=None`, k is the largest eigengap among `2..max_clusters` (:func:`eigengap_count`).

    Args:
        embedding: `(R, D)` non-negative (e.g. Hellinger embeddings: square roots of probabilities).
        num_clusters: `k`, or None to estimate it.
        max_clusters: largest k considered when estimating.
        overwrite: `B` may be made in `embedding` itself when it is a float64 array (the caller's copy, not read
            again): no second `(R, D)` float64 array (step 10's largest buffer).

    Returns:
        `(R,)` int64 labels in `0..k-1` (k is `labels.max() + 1`; at most R).
    """
    e = np.asarray(embedding, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"`embedding` must be (R, D), got shape {e.shape}.")
    if (e < 0).any():
        raise ValueError("`embedding` must be non-negative (its affinity E E^T is then non-negative).")
    if num_clusters is not None and (
        isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1
    ):
        raise ValueError(f"`num_clusters` must be a positive int or None, got {num_clusters!r}.")
    r = e.shape[0]
    if r == 0:
        return np.zeros(0, dtype=np.int64)
    degree = e @ e.sum(0)
    if overwrite and e is embedding:  # the same quotients, in place
        b = np.divide(e, np.sqrt(np.maximum(degree, 1e-12))[:, None], out=e)
    else:
        b = e / np.sqrt(np.maximum(degree, 1e-12))[:, None]
    # the count reads the values up to max_clusters + 1, the clustering the first num_clusters vectors
    values, vectors = _top_left_singular(b, max(int(max_clusters) + 1, int(num_clusters or 0)))
    if num_clusters is None:
        num_clusters = eigengap_count(values, max_clusters)
    k = min(int(num_clusters), r, vectors.shape[1])
    rows = vectors[:, :k]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return kmeans(rows, k, first=int(np.argmax(degree)))


def upsample_assignment(
    kl: torch.Tensor,
    grid_size: Sequence[int],
    threshold: float,
    size: Sequence[int],
    foreground: torch.Tensor | None = None,
) -> np.ndarray:
    """Part labels at an image's own size (DESIGN step 11, the image's own pixels).

    The tokens' labels are samples of the object at the token centres; a pixel takes the label that the tokens
    around it vote for. The foreground indicator of the tokens (smallest KL within `threshold`) is smoothed by a
    Gaussian of `UPSAMPLE_SIGMA` (half a token cell), resized bilinearly (pixel-centre aligned) and cut at 1/2.
    Each foreground pixel then takes the part whose indicator (foreground tokens whose nearest part it is), smoothed
    and resized the same way, is largest there. The indicators of the parts sum to the foreground's, so a
    foreground pixel always has a part with a vote of at least 1/(2K). The smoothing removes the staircase that a
    bare bilinear resize leaves along oblique outlines and part boundaries; at half a cell it erases nothing the
    grid resolves (a lone token keeps its centre, a one-token line survives). Borders are replicated, so an object
    touching the image's edge is not eroded there. On the design split (BENCHMARKS.md (l2)) this raised part NMI
    by about 0.025 and mask Jaccard by about 0.006 over the bilinear resize with part boundaries at the crossings
    of the bilinearly resized KL maps (which follow the KL's large values far from a boundary).

    Args:
        kl: `(N, K)` KL of each token to each part (see :func:`kl_to_parts`); `inf` marks an absent part.
        grid_size: `(h, w)`, `h * w == N`.
        threshold: background KL limit in nats (`inf` keeps every pixel of an image with a part).
        size: `(H, W)` pixels.
        foreground: `(N,)` bool, the foreground tokens when decided otherwise (step 11's refinement, which may move
            the outline by one token only); `None`: the tokens whose smallest KL is within `threshold`.

    Returns:
        `(H, W)` int64: 0 = background, `k + 1` = part k.
    """
    if not isinstance(kl, torch.Tensor) or kl.ndim != 2:
        raise ValueError(f"`kl` must be a (N, K) tensor, got {getattr(kl, 'shape', type(kl))}.")
    h, w = int(grid_size[0]), int(grid_size[1])
    if h * w != kl.shape[0]:
        raise ValueError(f"`grid_size` {(h, w)} does not hold the {kl.shape[0]} tokens of `kl`.")
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"`size` must be two positive ints (H, W), got {tuple(size)!r}.")
    height, width = int(size[0]), int(size[1])

    def vote(indicator: np.ndarray) -> np.ndarray:
        """`(h, w)` bool -> `(H, W)` float32: smoothed on the grid, then resized bilinearly."""
        smooth = cv2.GaussianBlur(
            indicator.astype(np.float32), (0, 0), UPSAMPLE_SIGMA, borderType=cv2.BORDER_REPLICATE
        )
        return cv2.resize(smooth, (width, height), interpolation=cv2.INTER_LINEAR)

    out = np.zeros((height, width), dtype=np.int64)
    maps = kl.detach().float().cpu().numpy().reshape(h, w, -1)
    present = [k for k in range(maps.shape[-1]) if np.isfinite(maps[..., k]).all()]
    if not present:
        return out
    tokens = maps[..., present]
    if foreground is None:
        foreground = tokens.min(axis=-1) <= threshold
    else:
        foreground = torch.as_tensor(foreground).detach().cpu().numpy().reshape(h, w).astype(bool)
    nearest = tokens.argmin(axis=-1)  # index into `present`
    pixels = vote(foreground) >= 0.5
    best = np.full((height, width), -np.inf, dtype=np.float32)
    for i, k in enumerate(present):
        value = vote(foreground & (nearest == i))
        better = pixels & (value > best)
        out[better] = k + 1
        best[better] = value[better]
    return out
