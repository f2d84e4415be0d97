# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""What a model puts into every capture whatever the image shows: a positional component, corner tokens and high-norm
tokens (Loos and Linhardt, "Latent Diffusion U-Net Representations Contain Positional Embeddings and Anomalies",
ICLR 2025 DeLTa workshop), and the two corrections the analysis applies to the queries and keys before step 4.

Pure functions on `(M, H, N, d)` tensors (`M` images, `H` heads, `N` tokens, head size `d`); no pipeline, no files.
"""

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


def positional_offsets(reference: torch.Tensor) -> torch.Tensor:
    """What content-free captures share position by position: their per-position mean, centred over positions, each
    position's offset shrunk by its estimation noise (positive-part James-Stein).

    With `R` captures, the mean at position `p` misses the model's true offset by noise of expected squared norm
    `v_p / R` (`v_p`: the captures' variance at `p`, summed over heads and head dims). Subtracting that noise would add
    a positional component of its own (the same at `p` in every image), so each position's offset is scaled by
    `max(0, 1 - (v_p / R) / |o_p|^2)`: kept where it stands well above its noise (a positional embedding, corner
    tokens), dropped where it is mostly noise (a model without such components), then centred again.

    Args:
        reference (`torch.Tensor`): `(R, H, N, d)` queries or keys of `R >= 2` content-free captures (no object, the
            same model, layer, grid and timestep).

    Returns:
        `(H, N, d)` float32 offsets, which sum to zero over positions.
    """
    reference = reference.float()
    mean = reference.mean(dim=0)  # [H,N,d]
    offsets = mean - mean.mean(dim=1, keepdim=True)
    noise = reference.var(dim=0).sum(dim=(0, 2)) / reference.shape[0]  # [N]: expected |error|^2 of the mean
    energy = offsets.pow(2).sum(dim=(0, 2)).clamp_min(torch.finfo(torch.float32).tiny)  # [N]
    offsets = offsets * (1.0 - noise / energy).clamp_min(0.0)[None, :, None]
    return offsets - offsets.mean(dim=1, keepdim=True)


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
