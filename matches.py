# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""The collection-level steps on the kept matches (DESIGN steps 8b-9): how much each image shares with the
collection and which images are outliers, the confirmation by third images (8b), the consistency checks (8c), each
pair's correspondences (step 8: both passes joined) and the hit counts and mean maps (step 9).
"""

from dataclasses import replace

import numpy as np
import torch

from .features import CoSegmentationFeatures, PairCorrespondence, PassResult
from .utils.correspondence import field_consistent, reverse_consistent
from .utils.joining import confirm_matches, kept_map, match_scores, merge_passes, token_centres_in_pixels

# An image whose best partner keeps fewer matches than this share of the collection's typical best partner (the
# median over images) shares nothing with the collection: an outlier (`"auto"` only). Set on the design split of
# benchmarks/families.py (M = 5, 8 collections with one outlier and 8 without): inliers' shares were 0.78-1, an
# outlier's 0.05-0.19; 0.35 is about the geometric midpoint of 0.78 and 0.19.
SHARING_CUT = 0.35


def sharing_scores(passes: dict[tuple[int, int], PassResult], num_images: int) -> torch.Tensor:
    """How much each image shares with the collection, `(M,)` float64 in [0, 1], from the kept matches of steps 4-8a.

    An image's *best partner count* is the largest number of matches (both passes) it keeps with one analysed
    partner; its score is that count over the median of the images' best partner counts, capped at 1. An image
    that shows the common object matches its best partner about as well as the others do theirs (design split:
    0.78-1); one without it keeps only the few matches that per-pass adaptive thresholds always let through (0.05-
    0.19). The median makes the score collection-relative; it assumes most images show the object. All ones when
    the collection keeps no match at all."""
    kept = {}  # per analysed pair, its kept matches (both passes): no (M, M) matrix
    for (s, t), result in passes.items():
        pair = (min(s, t), max(s, t))
        kept[pair] = kept.get(pair, 0.0) + float(result.keep.sum())
    best = torch.zeros(num_images, dtype=torch.float64)
    for (s, t), count in kept.items():
        best[s] = max(float(best[s]), count)
        best[t] = max(float(best[t]), count)
    typical = float(np.median(best.numpy()))
    if typical <= 0:
        return torch.ones(num_images, dtype=torch.float64)
    return (best / typical).clamp(0.0, 1.0)


def find_outliers(sharing: torch.Tensor, selection: str) -> torch.Tensor:
    """`(M,)` bool: images whose `sharing` is under `SHARING_CUT`, under the `"auto"` preset with 3+ images (with two
    images both have the same best partner; `"paper"` keeps the note's method: nothing dropped)."""
    flagged = sharing < SHARING_CUT
    return flagged if selection == "auto" and sharing.numel() >= 3 else torch.zeros_like(flagged)


def split_outlier_passes(
    passes: dict[tuple[int, int], PassResult], outliers: torch.Tensor
) -> tuple[dict[tuple[int, int], PassResult], dict[tuple[int, int], PassResult]]:
    """The passes between two non-outlier images (as given), and the passes touching an outlier with nothing kept
    (they take no part in steps 8b-8c and yield empty correspondences)."""
    flagged = set(torch.nonzero(outliers).flatten().tolist())
    inliers, dropped = {}, {}
    for pair, result in passes.items():
        if flagged & set(pair):
            dropped[pair] = replace(result, keep=torch.zeros_like(result.keep))
        else:
            inliers[pair] = result
    return inliers, dropped


def _compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Kept maps s -> u and u -> t (-1 = none) -> s -> t."""
    return torch.where(first >= 0, second[first.clamp_min(0)], first)


def confirm_by_third_images(
    passes: dict[tuple[int, int], PassResult],
    num_images: int,
    grid_size: tuple[int, int],
    longer_paths: bool = False,
) -> dict[tuple[int, int], PassResult]:
    """Step 8b (`"auto"`, three or more images): a pass `s -> t` also keeps the matches that two paths through third
    images confirm, the kept maps `s -> u -> t` landing near them (:func:`confirm_matches`). Every pass is confirmed
    from the keeps it was given. `passes` by `(source, target)`, both orientations of each analysed pair; a third
    image counts only when both its pairs `(s, u)` and `(u, t)` are in `passes`.

    `longer_paths` (a sparse pair graph, `partners`): paths through two third images, `s -> u -> v -> t`, vote too.
    In a sparse graph few images are linked to both `s` and `t` (every pair of M = 16 has 14 such images; with
    `partners=3` most have 0-2), so fewer matches reach the two votes a confirmation needs; the longer paths give them
    back the votes (design M = 16: coverage 0.683 -> 0.706 of every pair's 0.729, precision unchanged,
    BENCHMARKS.md (k2)). Off with every pair analysed, so that output is unchanged."""
    kept_maps = {
        (s, t): kept_map(
            result.statistics.forward, result.keep, passes[(t, s)].statistics.forward, passes[(t, s)].keep
        )
        for (s, t), result in passes.items()
    }
    linked = {image: [] for image in range(num_images)}  # per image, the images it has a pass to, ascending
    for s, u in sorted(kept_maps):
        linked[s].append(u)
    confirmed = {}
    for (s, t), result in passes.items():
        via = [u for u in linked[s] if u != t and (u, t) in kept_maps]
        paths = [_compose(kept_maps[(s, u)], kept_maps[(u, t)]) for u in via]
        if longer_paths:  # along the graph's edges: (degree)^2 candidates per pass, not M^2
            paths += [
                _compose(_compose(kept_maps[(s, u)], kept_maps[(u, v)]), kept_maps[(v, t)])
                for u in linked[s]
                if u != t
                for v in linked[u]
                if v not in (s, t) and (v, t) in kept_maps
            ]
        if not paths:  # no path through third images: nothing to confirm with
            confirmed[(s, t)] = result
            continue
        predictions = torch.stack(paths)
        keep = confirm_matches(
            result.statistics.forward, result.keep, predictions, grid_size, result.thresholds.max_inverse_error
        )
        confirmed[(s, t)] = replace(result, keep=keep)
    return confirmed


def check_consistency(
    passes: dict[tuple[int, int], PassResult], grid_size: tuple[int, int]
) -> dict[tuple[int, int], PassResult]:
    """Step 8c (`"auto"`): a kept match that a kept match of the reverse pass contradicts is dropped
    (:func:`reverse_consistent`), and so is a match with a loose (diagonal or unchecked) cycle that the local affine
    field of its kept neighbours puts elsewhere (:func:`field_consistent`). Every pass is checked against the
    reverse pass's keeps as given."""
    checked = {}
    for (s, t), result in passes.items():
        reverse = passes[(t, s)]
        limits = result.thresholds
        keep = reverse_consistent(
            result.statistics.forward,
            result.keep,
            reverse.statistics.forward,
            reverse.keep,
            grid_size,
            limits.max_inverse_error,
        )
        checked[(s, t)] = replace(result, keep=field_consistent(result.statistics, keep, limits, grid_size))
    return checked


def pair_correspondences(
    passes: dict[tuple[int, int], PassResult], features: CoSegmentationFeatures
) -> list[PairCorrespondence]:
    """Step 8 (end): per analysed pair `s < t` (in order), the kept matches of both passes joined in the
    orientation `s -> t` (a match found by both appears once, `mutual`), with their confidence
    (:func:`match_scores`) and pixel positions."""
    grid = tuple(features.grid_size)
    correspondences = []
    for s, t in sorted(pair for pair in passes if pair[0] < pair[1]):
        forward, backward = passes[(s, t)], passes[(t, s)]
        source_tokens, target_tokens, scores, mutual = merge_passes(
            forward.statistics.forward,
            forward.keep,
            match_scores(forward.max_prob, forward.keep, grid),
            backward.statistics.forward,
            backward.keep,
            match_scores(backward.max_prob, backward.keep, grid),
        )
        correspondences.append(
            PairCorrespondence(
                source_index=s,
                target_index=t,
                source_points=token_centres_in_pixels(source_tokens, grid, features.image_sizes[s]),
                target_points=token_centres_in_pixels(target_tokens, grid, features.image_sizes[t]),
                scores=scores,
                mutual=mutual,
                source_tokens=source_tokens,
                target_tokens=target_tokens,
            )
        )
    return correspondences


def hit_counts(
    correspondences: list[PairCorrespondence], num_images: int, num_tokens: int, device: torch.device
) -> torch.Tensor:
    """Step 9: `(M, N)` float, per token the kept correspondences that start or land on it, all pairs and passes."""
    density = torch.zeros(num_images, num_tokens, device=device)
    for pair in correspondences:
        density[pair.source_index] += torch.bincount(pair.source_tokens, minlength=num_tokens).float()
        density[pair.target_index] += torch.bincount(pair.target_tokens, minlength=num_tokens).float()
    return density


def mean_pass_maps(
    passes: dict[tuple[int, int], PassResult], num_images: int, num_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5 over the collection: `(M, N)` mean IME of each token as a target and `(M, N)` mean IMS of each token
    as a source, over its analysed partners (`M - 1` with every pair)."""
    entropy_sum = torch.zeros(num_images, num_tokens, device=device)
    error_sum = torch.zeros(num_images, num_tokens, device=device)
    partners = torch.zeros(num_images, 1, device=device)
    for result in passes.values():
        entropy_sum[result.target_index] += result.inverse_entropy
        error_sum[result.source_index] += result.statistics.inverse_error
        partners[result.source_index] += 1
    partners = partners.clamp_min(1)
    return entropy_sum / partners, error_sum / partners
