"""Points below the token grid: sub-token refinement of attention matches and bilinear reading of a token grid.

Pure torch functions, tensors in and out, float32 inside. Grid coordinates are continuous `(row, col)` in cells on
an `(h, w)` token grid flattened row-major (token index `row * w + col`), token `(r, c)`'s centre at `(r, c)`; pixel
coordinates are `(x, y)` in an image of `(H, W)` pixels, the token centre `(r, c)` at `((c + 0.5) W / w,
(r + 0.5) H / h)`. This module may not import its siblings in `utils/` (DESIGN section 3).

What the analysis uses and why (measured on the planted DESIGN split, `benchmarks/planted.py --points`): the argmax
of an attention row is a token and the row's mass around it says where between tokens the match lies, but one row
is noisy by about a cell. The window soft-argmax (:func:`window_soft_argmax`, 5 x 5, temperature 0.5) alone took the
median end-point error of correct kept matches from 0.66 to 0.54-0.56 cells; a per-axis parabola through the
log-values (:func:`quadratic_peak`, kept for that comparison) to 0.58. Averaging over neighbours does most of the
work: the least-squares affine field of the kept matches (:func:`local_affine_field`) over a 7 x 7 source window
brought it to 0.24, and soft-argmax then field beat argmax or parabola then field. For a single arbitrary point
(`transfer_points`) the neighbours are not selected, so their fit is robust (:func:`robust_affine_at`). A soft-argmax
stays inside the grid; a fit may extrapolate, and the analysis clamps it to the token-centre hull (inside the image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Probabilities are floored at this value before a log.
PROBABILITY_FLOOR = 1e-12


def _grid(grid_size: Sequence[int]) -> tuple[int, int]:
    if len(grid_size) != 2 or any(int(v) != v or v < 1 for v in grid_size):
        raise ValueError(f"`grid_size` must be two positive ints (h, w), got {tuple(grid_size)!r}.")
    return int(grid_size[0]), int(grid_size[1])


def _check_rows(rows: torch.Tensor, peaks: torch.Tensor, num_tokens: int) -> None:
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.shape[1] != num_tokens:
        raise ValueError(f"`rows` must be a (K, {num_tokens}) tensor, got {getattr(rows, 'shape', type(rows))}.")
    if not isinstance(peaks, torch.Tensor) or peaks.shape != rows.shape[:1] or peaks.dtype.is_floating_point:
        raise ValueError(f"`peaks` must be a ({rows.shape[0]},) integer tensor, got {getattr(peaks, 'shape', peaks)}.")
    if peaks.numel() and (int(peaks.min()) < 0 or int(peaks.max()) >= num_tokens):
        raise ValueError(f"`peaks` holds token indices outside [0, {num_tokens}).")


def window_offsets(radius: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`((2 radius + 1)^2, 2)` long `(d_row, d_col)` offsets of a square window, row-major."""
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"`radius` must be a non-negative int, got {radius!r}.")
    steps = torch.arange(-radius, radius + 1, device=device)
    return torch.stack(torch.meshgrid(steps, steps, indexing="ij"), dim=-1).reshape(-1, 2)


def gather_windows(
    rows: torch.Tensor, peaks: torch.Tensor, grid_size: Sequence[int], radius: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The values of each row in a square window around its peak token.

    Args:
        rows: `(K, N)` values on the `(h, w)` grid (e.g. attention probabilities).
        peaks: `(K,)` long token indices (e.g. each row's argmax).
        grid_size: `(h, w)`, `h * w == N`.
        radius: the window is `(2 radius + 1)^2` tokens.

    Returns:
        `(values, coords, inside)`: `(K, S)` float32 values (0 outside the grid), `(K, S, 2)` float32 `(row, col)` of
        each window token, `(K, S)` bool inside the grid; `S = (2 radius + 1)^2`.
    """
    h, w = _grid(grid_size)
    _check_rows(rows, peaks, h * w)
    offsets = window_offsets(radius, rows.device)
    peaks = peaks.long()
    coords = torch.stack([peaks // w, peaks % w], dim=-1)[:, None, :] + offsets[None]  # (K, S, 2)
    inside = (coords[..., 0] >= 0) & (coords[..., 0] < h) & (coords[..., 1] >= 0) & (coords[..., 1] < w)
    index = (coords[..., 0].clamp(0, h - 1) * w + coords[..., 1].clamp(0, w - 1)).long()
    values = torch.gather(rows.float(), 1, index) * inside
    return values, coords.float(), inside


def window_soft_argmax(
    rows: torch.Tensor,
    peaks: torch.Tensor,
    grid_size: Sequence[int],
    radius: int = 2,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Sub-token position of each row's peak: the soft-argmax of the row over a window around the peak token.

    Inside the window (clipped to the grid) the weights are `p ** (1 / temperature)`, normalised: `temperature = 1`
    is the plain centre of mass, smaller values lean towards the peak (`-> 0`: the peak token itself). The result
    is a convex combination of window token positions, so it stays inside the grid's `[0, h - 1] x [0, w - 1]`.

    Args:
        rows: `(K, N)` non-negative values (attention probabilities) on the `(h, w)` grid.
        peaks: `(K,)` long token indices (each row's argmax).
        grid_size: `(h, w)`.
        radius: window half-size in tokens (2: a 5 x 5 window).
        temperature: positive sharpening temperature.

    Returns:
        `(K, 2)` float32 `(row, col)` grid coordinates.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    values, coords, inside = gather_windows(rows, peaks, grid_size, radius)
    logits = values.clamp_min(PROBABILITY_FLOOR).log() / temperature
    weights = torch.softmax(logits.masked_fill(~inside, float("-inf")), dim=-1)
    return (weights[..., None] * coords).sum(dim=1)


def quadratic_peak(rows: torch.Tensor, peaks: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """Sub-token position of each row's peak from a parabola through the log-values at the peak and its two
    neighbours, per axis (offset `(l_- - l_+) / (2 (l_- - 2 l_0 + l_+))`, clamped to half a cell; 0 at the grid's
    edge or where the three values are not concave).

    Args:
        rows: `(K, N)` positive values on the `(h, w)` grid; peaks: `(K,)` long peak tokens; grid_size: `(h, w)`.

    Returns:
        `(K, 2)` float32 `(row, col)` grid coordinates.
    """
    values, coords, inside = gather_windows(rows, peaks, grid_size, 1)
    logs = values.clamp_min(PROBABILITY_FLOOR).log()
    centre = coords[:, 4]
    shifts = []
    for minus, plus in ((1, 7), (3, 5)):  # rows: (-1, 0), (+1, 0); cols: (0, -1), (0, +1) in the 3 x 3 window
        lm, l0, lp = logs[:, minus], logs[:, 4], logs[:, plus]
        curvature = lm - 2 * l0 + lp
        ok = inside[:, minus] & inside[:, plus] & (curvature < 0)
        shift = 0.5 * (lm - lp) / torch.where(ok, curvature, torch.ones_like(curvature))
        shifts.append(torch.where(ok, shift.clamp(-0.5, 0.5), torch.zeros_like(shift)))
    return centre + torch.stack(shifts, dim=-1)


def window_mass(rows: torch.Tensor, peaks: torch.Tensor, grid_size: Sequence[int], radius: int = 1) -> torch.Tensor:
    """`(K,)` float32 in [0, 1]: the share of each row's total that lies in the window around its peak (peak
    sharpness: 1 when all of a probability row sits within `radius` tokens of its peak)."""
    values, _, _ = gather_windows(rows, peaks, grid_size, radius)
    return (values.sum(dim=1) / rows.float().sum(dim=1).clamp_min(PROBABILITY_FLOOR)).clamp(0, 1)


def pixels_to_grid(points: torch.Tensor, grid_size: Sequence[int], image_size: Sequence[int]) -> torch.Tensor:
    """`(K, 2)` `(x, y)` pixels of an `(H, W)` image -> `(K, 2)` float32 `(row, col)` grid coordinates."""
    h, w = _grid(grid_size)
    height, width = image_size
    points = points.float()
    return torch.stack([points[:, 1] * (h / height) - 0.5, points[:, 0] * (w / width) - 0.5], dim=-1)


def grid_to_pixels(coords: torch.Tensor, grid_size: Sequence[int], image_size: Sequence[int]) -> torch.Tensor:
    """`(K, 2)` `(row, col)` grid coordinates -> `(K, 2)` float32 `(x, y)` pixels of an `(H, W)` image (the inverse
    of :func:`pixels_to_grid`)."""
    h, w = _grid(grid_size)
    height, width = image_size
    coords = coords.float()
    return torch.stack([(coords[:, 1] + 0.5) * (width / w), (coords[:, 0] + 0.5) * (height / h)], dim=-1)


def bilinear_weights(coords: torch.Tensor, grid_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The four tokens around each point and their bilinear weights; points are clamped to the token centres'
    hull `[0, h - 1] x [0, w - 1]` first (a point in an edge token's outer half reads that token).

    Args:
        coords: `(K, 2)` `(row, col)` grid coordinates.
        grid_size: `(h, w)`.

    Returns:
        `(indices, weights)`: `(K, 4)` long token indices and `(K, 4)` float32 weights summing to 1 (a token may
        repeat at the grid's edge, with the weights adding up).
    """
    h, w = _grid(grid_size)
    if not isinstance(coords, torch.Tensor) or coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"`coords` must be a (K, 2) tensor, got {getattr(coords, 'shape', type(coords))}.")
    row = coords[:, 0].float().clamp(0, h - 1)
    col = coords[:, 1].float().clamp(0, w - 1)
    r0 = row.floor().clamp(max=max(h - 2, 0))
    c0 = col.floor().clamp(max=max(w - 2, 0))
    fr, fc = row - r0, col - c0
    r1 = (r0 + 1).clamp(max=h - 1)
    c1 = (c0 + 1).clamp(max=w - 1)
    indices = torch.stack([r0 * w + c0, r0 * w + c1, r1 * w + c0, r1 * w + c1], dim=-1).long()
    weights = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=-1)
    return indices, weights


def local_affine_field(
    coords: torch.Tensor, keep: torch.Tensor, grid_size: Sequence[int], radius: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the local affine field of the kept matches puts each source token's match.

    For each source token p, the least-squares affine map `y(n) ~ c + A (n - p)` is fitted over the kept tokens n
    of the `(2 radius + 1)^2` window around p (p included when kept); `c` is the field's value at p. Averaging over
    the window smooths the per-match noise of a locally smooth map (a warp: scale, rotation, shift, mirror).

    Args:
        coords: `(N, 2)` float `(row, col)` target coordinates of each source token's match.
        keep: `(N,)` bool, the kept matches (only these are fitted).
        grid_size: `(h, w)` of the source grid, `h * w == N`.
        radius: window half-size in source tokens.

    Returns:
        `(field, defined)`: `(N, 2)` float32 (the input coordinates where undefined) and `(N,)` bool where the kept
        tokens of the window determine an affine fit (three or more, not all on one line).
    """
    h, w = _grid(grid_size)
    if coords.shape != (h * w, 2) or keep.shape != (h * w,):
        raise ValueError(
            f"`coords` {tuple(coords.shape)} and `keep` {tuple(keep.shape)} must be ({h * w}, 2), ({h * w},)."
        )
    device = coords.device
    target = coords.float().view(h, w, 2)
    # Every window position of every token at once, from the grids padded by `radius` (a neighbour off the grid has
    # weight 0). The Gram sums are small integers, exact in any order; the moments are added offset by offset in
    # the window's row-major order (as a loop over the offsets would), so the field does not depend on this layout.
    offsets = window_offsets(radius, device).float()  # (S, 2)
    size = 2 * radius + 1
    grids = torch.cat([keep.view(1, h, w).float(), target.permute(2, 0, 1)])  # (3, h, w): kept, row, col
    windows = torch.nn.functional.unfold(grids[None], size, padding=radius)[0].view(3, size * size, h * w)
    weight, neighbour = windows[0], windows[1:].permute(1, 2, 0)  # (S, N), (S, N, 2)
    x = torch.cat([torch.ones(offsets.shape[0], 1, device=device), offsets], dim=1)  # (S, 3): 1, di, dj
    gram = (weight.T @ (x[:, :, None] * x[:, None, :]).view(-1, 9)).view(h * w, 3, 3)
    terms = (weight[..., None, None] * x[:, None, :, None]) * neighbour[:, :, None, :]  # (S, N, 3, 2)
    moment = torch.zeros(h * w, 3, 2, device=device)
    for term in terms:
        moment += term
    # integer design points: a determined fit has |det| >= 1 (the cofactor expansion is exact in float64 here)
    g = gram.double()
    det = (
        g[:, 0, 0] * (g[:, 1, 1] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 1])
        - g[:, 0, 1] * (g[:, 1, 0] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 0])
        + g[:, 0, 2] * (g[:, 1, 0] * g[:, 2, 1] - g[:, 1, 1] * g[:, 2, 0])
    )
    defined = det.abs() > 0.5
    field = target.reshape(h * w, 2).clone()
    if bool(defined.any()):
        field[defined] = torch.linalg.solve(gram[defined], moment[defined])[:, 0, :]
    return field, defined


def robust_affine_at(
    offsets: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, iterations: int = 3, scale: float = 1.0
) -> torch.Tensor:
    """The value at offset 0 of a robust weighted affine fit `y ~ c + A x` of each point's neighbours.

    Iteratively reweighted least squares: each round fits with `weights * 1 / (1 + (r / scale)^2)` (Cauchy), `r` the
    neighbour's residual from the previous fit (the first fit uses `weights` alone), so a few wrong matches among
    the neighbours barely move `c`. Where the fit is undetermined (fewer than three weighted neighbours, or all on
    a line) the weighted mean of `targets` is returned.

    Args:
        offsets: `(K, S, 2)` float neighbour positions relative to each point (source cells).
        targets: `(K, S, 2)` float their matches (target cells).
        weights: `(K, S)` non-negative prior weights.
        iterations: reweighting rounds after the first fit.
        scale: residual scale of the Cauchy weights, target cells.

    Returns:
        `(K, 2)` float32 `c`.
    """
    if offsets.ndim != 3 or offsets.shape[-1] != 2 or targets.shape != offsets.shape:
        raise ValueError(f"`offsets` {tuple(offsets.shape)} and `targets` {tuple(targets.shape)} must be (K, S, 2).")
    if weights.shape != offsets.shape[:2]:
        raise ValueError(f"`weights` must be {tuple(offsets.shape[:2])}, got {tuple(weights.shape)}.")
    design = torch.cat([torch.ones_like(offsets[..., :1]), offsets], dim=-1).float()  # (K, S, 3)
    targets = targets.float()
    mean = (weights[..., None] * targets).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-12)
    current = weights.float()
    value = mean
    for _ in range(iterations + 1):
        gram = torch.einsum("ks,ksi,ksj->kij", current, design, design)
        moment = torch.einsum("ks,ksi,ksj->kij", current, design, targets)
        ok = torch.linalg.det(gram).abs() > 1e-6 * gram.diagonal(dim1=-2, dim2=-1).prod(-1).clamp_min(1e-12)
        eye = torch.eye(3, device=gram.device).expand_as(gram)
        beta = torch.linalg.solve(torch.where(ok[:, None, None], gram, eye), moment)
        value = torch.where(ok[:, None], beta[:, 0], mean)
        residual = torch.linalg.vector_norm(torch.einsum("ksi,kij->ksj", design, beta) - targets, dim=-1)
        current = weights * torch.where(ok[:, None], 1.0 / (1.0 + (residual / scale) ** 2), torch.ones_like(residual))
    return value
