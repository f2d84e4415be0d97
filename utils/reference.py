# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""What a model puts into every capture whatever the image shows: a positional component, corner tokens and high-norm
tokens (Loos and Linhardt, "Latent Diffusion U-Net Representations Contain Positional Embeddings and Anomalies",
ICLR 2025 DeLTa workshop), and the two corrections the analysis applies to the queries and keys before step 4.

Pure functions on `(M, H, N, d)` tensors (`M` images, `H` heads, `N` tokens, head size `d`); no pipeline, no files.
"""

import weakref

import numpy as np
import torch

# The MAD of a normal sample times this is its standard deviation.
MAD_TO_STD = 1.4826


def token_norm_bounds(tokens: torch.Tensor, num_mads: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the robust upper bound of its token norms.

    Args:
        tokens (`torch.Tensor`): `(M, H, N, d)` queries or keys.
        num_mads (`float`): how many robust standard deviations (`1.4826 * MAD`) above the median norm the bound lies.

    Returns:
        `(norms, bounds)`: `(M, N)` float32 norm of every token over all its heads (`sqrt(sum_h |x_h|^2)`), and
        `(M, 1)` float32 bound `median + num_mads * 1.4826 * MAD` of each image's norms.
    """
    norms = tokens.float().pow(2).sum(dim=(1, 3)).sqrt()  # [M,N]
    median = norms.median(dim=1, keepdim=True).values
    mad = (norms - median).abs().median(dim=1, keepdim=True).values
    return norms, median + num_mads * MAD_TO_STD * mad


def clamp_high_norm_tokens(tokens: torch.Tensor, num_mads: float) -> torch.Tensor:
    """High-norm (anomaly) tokens rescaled to their image's robust norm bound (:func:`token_norm_bounds`), direction
    kept; every other token unchanged.

    A token of several times the usual norm gives large logits against every token of the other image: as a key it
    draws attention from everywhere (a collapse point of the seed's step 6), as a query its row is sharp whatever it
    matches. Rescaling it to the bound makes it an ordinary token again without moving any other token.

    Args:
        tokens (`torch.Tensor`): `(M, H, N, d)` queries or keys.
        num_mads (`float`): the bound, in robust standard deviations above the median norm.

    Returns:
        `(M, H, N, d)`, same dtype; `tokens` itself (the same object, bitwise the same) when no token exceeds its bound.
    """
    norms, bounds = token_norm_bounds(tokens, num_mads)
    high = norms > bounds
    if not bool(high.any()):
        return tokens
    scale = torch.where(high, bounds / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(norms))
    return tokens * scale[:, None, :, None].to(tokens.dtype)


# The 8 neighbours of a token on the grid, as (row, column) steps.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def inpaint_high_norm_tokens(tokens: torch.Tensor, num_mads: float, grid_size: tuple[int, int]) -> torch.Tensor:
    """High-norm (anomaly) tokens replaced by the mean of their ordinary 8-neighbours on the token grid; a high-norm
    token whose neighbours are all high-norm too is rescaled to its image's bound instead
    (:func:`clamp_high_norm_tokens`). Every other token unchanged.

    What a high-norm token shows of its own patch is little: in vision transformers such tokens arise in redundant
    patches and carry global rather than local information (Darcet et al., "Vision Transformers Need Registers",
    ICLR 2024), and in the U-Net they sit at places unrelated to the image's content (Loos and Linhardt). Rescaling
    keeps its direction, which such tokens share across images: they then match one another, and their own place
    stays unmatched. Its neighbours show the same patch's surroundings, and an object's features vary smoothly over
    it, so their mean is the better guess of what the token would have carried (BENCHMARKS.md (n4)).

    Args:
        tokens (`torch.Tensor`): `(M, H, N, d)` queries or keys.
        num_mads (`float`): the bound, in robust standard deviations above the median norm
            (:func:`token_norm_bounds`).
        grid_size (`tuple[int, int]`): the `(h, w)` token grid, `h * w == N`.

    Returns:
        `(M, H, N, d)`, same dtype and device; `tokens` itself (the same object) when no token exceeds its bound.
    """
    norms, bounds = token_norm_bounds(tokens, num_mads)
    high = norms > bounds  # [M,N]
    if not bool(high.any()):
        return tokens
    h, w = int(grid_size[0]), int(grid_size[1])
    image, token = high.nonzero(as_tuple=True)  # [K] each
    steps = torch.tensor(_NEIGHBOURS, device=tokens.device)  # [8,2]
    rows = (token // w)[:, None] + steps[None, :, 0]  # [K,8]
    cols = (token % w)[:, None] + steps[None, :, 1]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    neighbour = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).long()
    ordinary = inside & ~high[image[:, None], neighbour]  # [K,8]
    values = tokens[image[:, None], :, neighbour, :].float()  # [K,8,H,d]
    count = ordinary.sum(dim=1)  # [K]
    mean = (values * ordinary[:, :, None, None]).sum(dim=1) / count.clamp_min(1)[:, None, None]
    scale = (bounds[image, 0] / norms[image, token].clamp_min(torch.finfo(torch.float32).tiny))[:, None, None]
    rescaled = tokens[image, :, token, :].float() * scale  # [K,H,d]
    out = tokens.clone()
    out[image, :, token, :] = torch.where(count[:, None, None] > 0, mean, rescaled).to(tokens.dtype)
    return out


# Gaussian widths (in token cells) among which each reference chooses how much to smooth its offsets over the token
# grid, by split-half cross-validation on its own captures (:func:`offset_smoothing`); 0 = no smoothing.
OFFSET_SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def _centred_mean(reference: torch.Tensor) -> torch.Tensor:
    """`(R, H, N, d)` -> `(H, N, d)`: the mean over captures minus its mean over positions."""
    mean = reference.mean(dim=0)
    return mean - mean.mean(dim=1, keepdim=True)


def _smoothing_matrix(length: int, sigma: float, device: torch.device) -> torch.Tensor:
    """`(length, length)` 1-D Gaussian smoothing of `sigma` cells, each row renormalised over the positions inside
    the grid (row `i`: `k(i - j) / sum_j k(i - j)`)."""
    taps = torch.arange(length, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * ((taps[:, None] - taps[None, :]) / sigma) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def smooth_over_grid(values: torch.Tensor, grid_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """`values` `(H, N, d)` smoothed over the `(h, w)` token grid by a Gaussian of `sigma` cells (normalised
    convolution: each position's weights are renormalised over the positions inside the grid, so the border is not
    pulled towards zero; the 2-D kernel is the product of a row and a column smoothing). `sigma = 0` returns `values`
    unchanged. Returns `(H, N, d)` float32."""
    if sigma == 0:
        return values
    heads, tokens, dim = values.shape
    h, w = int(grid_size[0]), int(grid_size[1])
    rows = _smoothing_matrix(h, sigma, values.device)
    cols = _smoothing_matrix(w, sigma, values.device)
    grid = values.float().reshape(heads, h, w, dim)
    out = torch.einsum("ia,hawd->hiwd", rows, grid)
    out = torch.einsum("jb,hibd->hijd", cols, out)
    return out.reshape(heads, tokens, dim)


def offset_smoothing(reference: torch.Tensor, grid_size: tuple[int, int]) -> float:
    """How much to smooth a reference's offsets over the grid: the width of :data:`OFFSET_SIGMAS` whose smoothed
    offsets of one half of the captures (even indices) best predict those of the other half (odd indices), and the
    other way round (summed squared error; the smaller width on a tie). The two halves share the model's true offsets
    but not their estimation noise, so the error is smallest where smoothing removes more noise than signal: a smooth
    positional field picks a width of about a cell or more, a field that changes from one token to the next (or pure
    noise at its largest width, which :func:`positional_offsets` then shrinks away) picks what fits it; corner tokens
    are kept by the per-position residual there in any case.

    Args:
        reference (`torch.Tensor`): `(R, H, N, d)`, `R >= 2`.
        grid_size: `(h, w)`, `h * w == N`.
    """
    reference = reference.float()
    first, second = _centred_mean(reference[0::2]), _centred_mean(reference[1::2])
    errors = [
        float(
            (smooth_over_grid(first, grid_size, s) - second).pow(2).sum()
            + (smooth_over_grid(second, grid_size, s) - first).pow(2).sum()
        )
        for s in OFFSET_SIGMAS
    ]
    return OFFSET_SIGMAS[int(np.argmin(errors))]


def _shrink(offsets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Each position's offset `(H, N, d)` scaled by `max(0, 1 - noise_p / |offset_p|^2)` (positive-part
    James-Stein), `noise` `(N,)` the expected squared norm of its estimation error."""
    energy = offsets.pow(2).sum(dim=(0, 2)).clamp_min(torch.finfo(torch.float32).tiny)  # [N]
    return offsets * (1.0 - noise / energy).clamp_min(0.0)[None, :, None]


def positional_offsets(reference: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """What content-free captures share position by position: their per-position mean, centred over positions,
    denoised, then centred again.

    With `R` captures, the mean at position `p` misses the model's true offset by noise of expected squared norm
    `v_p / R` (`v_p`: the captures' variance at `p`, summed over heads and head dims). Subtracting that noise would
    add a positional component of its own (the same at `p` in every image), so it is removed as far as the data
    allow:

    - without `grid_size` (or when the reference's own cross-validation, :func:`offset_smoothing`, picks no
      smoothing), each position's offset is scaled by `max(0, 1 - (v_p / R) / |o_p|^2)` (positive-part
      James-Stein): kept where it stands well above its noise (a positional embedding, corner tokens), dropped where
      it is mostly noise (a model without such components);
    - with `grid_size`, each capture is split into its trend, a Gaussian smoothing over the token grid at the width
      the reference picks (:func:`offset_smoothing`), and its residual. The centred mean of the trends and that of
      the residuals (what changes from one token to the next: corner tokens, or noise) are each shrunk as above by
      their own noise, measured over the captures (the variance of the captures' trends, resp. residuals, over `R`:
      the content of a capture is correlated over neighbouring tokens, so the smoothing's noise cannot be derived
      from `v_p` as if each token's were independent). A smooth positional embedding is then estimated from many
      positions' captures instead of one's (BENCHMARKS.md (n3)).

    With `grid_size` and `R >= 4`, the offsets must also show that they are reproducible: the offsets estimated as
    above from the even-numbered captures, and from the odd-numbered ones, must predict the other half's centred mean
    better (summed squared error over both directions) than no offsets at all. A reference whose halves do not agree
    carries no positional structure its captures can tell from noise (a model without such components), and its
    offsets are exactly zero, so that the analysis with it is the analysis without it; what shrinkage leaves of
    pure noise is itself a small shared perturbation, to which step 11's cut can be sensitive (BENCHMARKS.md (n4)).

    Args:
        reference (`torch.Tensor`): `(R, H, N, d)` queries or keys of `R >= 2` content-free captures (no object, the
            same model, layer, grid and timestep).
        grid_size (`tuple[int, int]`, *optional*): the `(h, w)` token grid, `h * w == N`; `None` keeps the
            per-position estimate.

    Returns:
        `(H, N, d)` float32 offsets, which sum to zero over positions.
    """
    reference = reference.float()
    if grid_size is not None and reference.shape[0] >= 4 and not _halves_agree(reference, grid_size):
        return torch.zeros_like(reference[0])
    return _denoised_offsets(reference, grid_size)


def _halves_agree(reference: torch.Tensor, grid_size: tuple[int, int]) -> bool:
    """Whether the offsets estimated from the even captures (:func:`_denoised_offsets`) predict the odd captures'
    centred mean better than no offsets do, and the other way round (squared errors summed over both)."""
    first, second = reference[0::2], reference[1::2]
    estimated = [_denoised_offsets(first, grid_size), _denoised_offsets(second, grid_size)]
    raw = [_centred_mean(second), _centred_mean(first)]
    error = sum(float((e - r).pow(2).sum()) for e, r in zip(estimated, raw))
    return error < sum(float(r.pow(2).sum()) for r in raw)


def _denoised_offsets(reference: torch.Tensor, grid_size: tuple[int, int] | None) -> torch.Tensor:
    """:func:`positional_offsets` without the test of :func:`_halves_agree`."""
    count = reference.shape[0]
    sigma = 0.0 if grid_size is None else offset_smoothing(reference, grid_size)
    if sigma == 0:
        noise = reference.var(dim=0).sum(dim=(0, 2)) / count  # [N]: expected |error|^2 of the mean
        offsets = _shrink(_centred_mean(reference), noise)
    else:
        # each capture split into its trend and residual, so that each part's noise is measured, not assumed: a
        # capture's content is spatially correlated (regions, stuff), which a smoothing does not average away
        smoothed = smooth_over_grid(reference.flatten(0, 1), grid_size, sigma).view(reference.shape)
        residual = reference - smoothed
        trend = _shrink(_centred_mean(smoothed), smoothed.var(dim=0).sum(dim=(0, 2)) / count)
        offsets = trend + _shrink(_centred_mean(residual), residual.var(dim=0).sum(dim=(0, 2)) / count)
    return offsets - offsets.mean(dim=1, keepdim=True)


# Offsets already computed (:func:`reference_offsets`), per reference tensor while it lives: `id(tensor)` ->
# (weak reference to it, {(grid, num_mads, tensor version): offsets}).
_OFFSETS_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def reference_offsets(
    reference: torch.Tensor, grid_size: tuple[int, int] | None = None, num_mads: float | None = None
) -> torch.Tensor:
    """:func:`positional_offsets` of `reference`, computed once per reference tensor. With `num_mads`, its high-norm
    tokens are first replaced as the analysis replaces them (:func:`inpaint_high_norm_tokens`; rescaled by
    :func:`clamp_high_norm_tokens` when `grid_size` is `None`), so its anomalies, at random places, stay out of the
    mean.

    A reference is made once and used for many collections (`pipe.capture_reference` caches it on the pipeline), and
    its smoothed offsets cost far more than their use (about 2 s per layer and query or key for a 64 x 64 grid on a
    CPU, BENCHMARKS.md (n3)). They are kept for as long as `reference` itself lives, keyed by `grid_size`,
    `num_mads` and the tensor's version counter, so an in-place change of `reference` computes them again. A tensor
    made under `torch.inference_mode()` has no version counter: its offsets are computed on every call. The returned
    tensor is shared between callers: do not modify it in place.

    Args:
        reference (`torch.Tensor`): `(R, H, N, d)` content-free captures, as for :func:`positional_offsets`.
        grid_size (`tuple[int, int]`, *optional*): the `(h, w)` token grid.
        num_mads (`float`, *optional*): the high-norm rule's width (`HIGH_NORM_MADS` in the analysis); `None`: no
            replacement.

    Returns:
        `(H, N, d)` float32 offsets on `reference`'s device.
    """
    if reference.is_inference():  # no version counter to tell an in-place change: computed each time
        return _offsets_after_high_norm_rule(reference, grid_size, num_mads)
    key = (None if grid_size is None else (int(grid_size[0]), int(grid_size[1])), num_mads, reference._version)
    ident = id(reference)
    held = _OFFSETS_CACHE.get(ident)
    if held is None or held[0]() is not reference:
        held = (weakref.ref(reference, lambda _, ident=ident: _OFFSETS_CACHE.pop(ident, None)), {})
        _OFFSETS_CACHE[ident] = held
    entries = held[1]
    if key not in entries:
        for stale in [k for k in entries if k[2] != reference._version]:
            del entries[stale]
        entries[key] = _offsets_after_high_norm_rule(reference, grid_size, num_mads)
    return entries[key]


def _offsets_after_high_norm_rule(
    reference: torch.Tensor, grid_size: tuple[int, int] | None, num_mads: float | None
) -> torch.Tensor:
    """What :func:`reference_offsets` keeps: the offsets of `reference` after the high-norm rule."""
    if num_mads is None:
        tokens = reference
    elif grid_size is None:
        tokens = clamp_high_norm_tokens(reference, num_mads)
    else:
        tokens = inpaint_high_norm_tokens(reference, num_mads, grid_size)
    return positional_offsets(tokens, grid_size)


def remove_offsets(tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`tokens` `(M, H, N, d)` minus `offsets` `(H, N, d)` (:func:`positional_offsets`) at every image, in the
    tokens' dtype.

    Why it is safe for the softmax of step 4: a logit is `q_p . k_y`. Subtracting `o^K` from the keys changes row `p`
    by `-q_p . o^K_y`; since `o^K` sums to zero over `y`, the row's mean logit is unchanged, and any part of the
    reference mean that is the same at every position (a per-row constant once dotted with `q_p`, which the softmax
    cancels) is not touched. Subtracting `o^Q` from the queries changes row `p` by `-o^Q_p . k_y`: a different
    direction per query position, which is exactly the positional part of `q_p`; the shared (position-independent)
    query bias, which weights keys by their content, stays. With queries `c_p + P^Q_p` and keys `c'_y + P^K_y`, both
    subtractions together leave `c_p . c'_y` up to the reference's estimation error: the `P^Q_p . P^K_y` term that
    makes "the same place in the other image" a match, and the cross terms, are gone. An object's own features never
    enter the offsets (the reference shows none), unlike the collection's own per-position mean, which would remove
    the object wherever the images agree on its place.
    """
    return tokens - offsets.to(device=tokens.device, dtype=tokens.dtype)
