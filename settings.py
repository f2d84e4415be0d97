# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""The analysis settings, checked once where the user passes them (:func:`check_analysis_settings`, and the features
against them: :func:`check_reference`), and the feature corrections applied before step 4 (step 3b,
:func:`correct_features`: high-norm tokens, a reference's positional offsets).
"""

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .features import CoSegmentationFeatures, _is_int
from .store import DEFAULT_CACHE_BYTES, LazyFeatures, lazy_view
from .utils.images import describe as _describe
from .utils.reference import inpaint_high_norm_tokens, reference_offsets, remove_offsets

SELECTION_PRESETS = ("paper", "auto")
OUTPUT_TYPES = ("np", "pt")
THRESHOLD_NAMES = ("max_entropy", "max_spread", "max_collapse", "max_inverse_error")
# High-norm tokens (correct_features): a token whose query or key norm exceeds its image's median token norm by more
# than this many robust standard deviations (1.4826 MAD) is replaced by its ordinary neighbours' mean. Fixed before
# measuring (a normal sample almost never reaches 5 robust SDs); BENCHMARKS.md (j), (n4): a few content tokens of
# noisy clean planted collections pass it too, which moves their metrics by -0.004 to +0.015.
HIGH_NORM_MADS = 5.0
# The rule applied to them, recorded in the pair analyses' settings (`"neighbours"`: the mean of the ordinary
# 8-neighbours, :func:`~cosegment.utils.reference.inpaint_high_norm_tokens`; it replaced a rescaling to the bound).
HIGH_NORM_RULE = "neighbours"


def _is_limit(value: Any) -> bool:
    """A non-negative number (`inf` included), not a bool or NaN."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value) and value >= 0


@dataclass(frozen=True)
class AnalysisSettings:
    """The checked settings of one analysis (made by :func:`check_analysis_settings`, where the user passes them).

    Attributes:
        selection (`str`): threshold preset, `"paper"` or `"auto"`.
        thresholds (`dict[str, float | None]`): `max_entropy`, `max_spread`, `max_collapse`, `max_inverse_error`
            overriding the preset (`None`: the preset's value).
        num_parts (`int` or `None`), background_threshold (`float` or `None`): steps 10-11 (`None`: from the data).
        chunk_size (`int` or `None`): attention rows computed at once.
        output_type (`str`): `"np"` or `"pt"`.
        segment (`bool`): run steps 10-11 (clustering and co-segmentation).
        refine (`bool`): refine each match's landing point below the token grid (:func:`refine_correspondences`).
        clamp_high_norm (`bool`): replace high-norm tokens by their neighbours' mean before step 4
            (:func:`correct_features`).
        reference ([`CoSegmentationFeatures`] or `None`): content-free captures whose positional offsets are removed
            before step 4 (:func:`correct_features`); `reference_digest` fingerprints it (SHA-256 of its tensors), so
            pair analyses made elsewhere can be checked to have used the same one.
        partners (`int` or `None`): each image analysed with its `partners` most similar images, plus the bridges
            that keep the graph connected (:func:`partner_pairs`); `None`: every pair.
    """

    selection: str = "auto"
    thresholds: dict = field(default_factory=lambda: dict.fromkeys(THRESHOLD_NAMES))
    num_parts: int | None = None
    background_threshold: float | None = None
    chunk_size: int | None = None
    output_type: str = "np"
    segment: bool = True
    refine: bool = True
    clamp_high_norm: bool = True
    partners: int | None = None
    reference: "CoSegmentationFeatures | None" = field(default=None, compare=False, repr=False)
    reference_digest: str | None = None

    @property
    def pair_settings(self) -> dict:
        """What the per-pair steps depend on: `selection`, the threshold overrides and the feature corrections (see
        [`PairAnalysis`])."""
        corrections = {"clamp_high_norm": self.clamp_high_norm, "reference": self.reference_digest}
        if self.clamp_high_norm:  # the rule, so that pairs made by the earlier one (a rescaling) are not mixed in
            corrections["high_norm_rule"] = HIGH_NORM_RULE
        return {"selection": self.selection, **self.thresholds, **corrections}


def check_analysis_settings(
    selection: str = "auto",
    max_entropy: float | None = None,
    max_spread: float | None = None,
    max_collapse: float | None = None,
    max_inverse_error: float | None = None,
    num_parts: int | None = None,
    background_threshold: float | None = None,
    chunk_size: int | None = None,
    output_type: str = "np",
    segment: bool = True,
    refine: bool = True,
    reference: "CoSegmentationFeatures | None" = None,
    clamp_high_norm: bool = True,
    partners: int | None = None,
) -> AnalysisSettings:
    """Checks the analysis arguments once, where the user passes them; errors name the argument and the value
    (`reference` is checked against the features by :func:`check_reference`)."""
    if selection not in SELECTION_PRESETS:
        raise ValueError(f"`selection` must be one of {SELECTION_PRESETS}, got {selection!r}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    thresholds = dict(zip(THRESHOLD_NAMES, (max_entropy, max_spread, max_collapse, max_inverse_error)))
    for name, value in thresholds.items():
        if value is not None and not _is_limit(value):
            raise ValueError(f"`{name}` must be a non-negative number (inf disables it) or None, got {value!r}.")
    if num_parts is not None and (not _is_int(num_parts) or num_parts < 1):
        raise ValueError(f"`num_parts` must be a positive int or None, got {num_parts!r}.")
    if background_threshold is not None and not _is_limit(background_threshold):
        raise ValueError(
            f"`background_threshold` must be a non-negative number (nats; inf keeps every token) or None, got "
            f"{background_threshold!r}."
        )
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {_describe(chunk_size)}.")
    if not isinstance(segment, bool):
        raise TypeError(f"`segment` must be a bool, got {_describe(segment)}.")
    if not isinstance(refine, bool):
        raise TypeError(f"`refine` must be a bool, got {_describe(refine)}.")
    if not isinstance(clamp_high_norm, bool):
        raise TypeError(f"`clamp_high_norm` must be a bool, got {_describe(clamp_high_norm)}.")
    if reference is not None and not isinstance(reference, CoSegmentationFeatures):
        raise TypeError(f"`reference` must be a CoSegmentationFeatures or None, got {_describe(reference)}.")
    partners = _check_partners(partners)
    settings = AnalysisSettings(
        selection,
        thresholds,
        None if num_parts is None else int(num_parts),
        background_threshold,
        None if chunk_size is None else int(chunk_size),
        output_type,
        segment,
        refine,
        clamp_high_norm,
        partners,
    )
    return settings_with_reference(settings, reference) if reference is not None else settings


def features_digest(features: CoSegmentationFeatures) -> str:
    """SHA-256 (hex) of the features' tensors, layer names and grid: two equal digests mean the same captures."""
    digest = hashlib.sha256(json.dumps([list(features.grid_size), list(features.layer_names)]).encode())
    for tensor in (*features.queries, *features.keys):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _layer_of(name: str) -> str:
    """The layer of a feature entry (`"name#k"` is noise draw k of layer `"name"`)."""
    return name.split("#")[0]


def check_reference(features: CoSegmentationFeatures, reference: CoSegmentationFeatures | None) -> list[int] | None:
    """Checks that `reference` was captured like `features`: the same token grid and, for every entry of `features`
    (layer, noise draw), an entry of the same layer (by name, or by layer name without its `#draw` suffix) with the
    same heads and head size. Returns, per entry of `features`, the index of its reference entry (`None` without a
    reference).

    Raises:
        `ValueError` naming `reference` when it does not match.
    """
    if reference is None:
        return None
    if not isinstance(reference, CoSegmentationFeatures):
        raise TypeError(f"`reference` must be a CoSegmentationFeatures or None, got {_describe(reference)}.")
    reference.validate()
    if tuple(reference.grid_size) != tuple(features.grid_size):
        raise ValueError(
            f"`reference` has token grid {tuple(reference.grid_size)}, the features {tuple(features.grid_size)}: "
            "capture it at the same size and layers."
        )
    names = list(reference.layer_names)
    bases = [_layer_of(name) for name in names]
    indices = []
    for i, name in enumerate(features.layer_names):
        if name in names:
            j = names.index(name)
        elif _layer_of(name) in bases:
            j = bases.index(_layer_of(name))
        else:
            raise ValueError(
                f"`reference` has no entry for layer {name!r} of the features (it holds {names}): capture it with the "
                "same `attention_layers`."
            )
        shape, reference_shape = features.shapes[i], reference.shapes[j]
        if (shape[1], shape[3]) != (reference_shape[1], reference_shape[3]):
            raise ValueError(
                f"`reference` entry {names[j]!r} has {reference_shape[1]} heads of size {reference_shape[3]}, the "
                f"features' {name!r} {shape[1]} heads of size {shape[3]}."
            )
        indices.append(j)
    return indices


def settings_with_reference(settings: AnalysisSettings, reference: CoSegmentationFeatures | None) -> AnalysisSettings:
    """`settings` with `reference` (and its digest) in place of theirs."""
    digest = None if reference is None else features_digest(reference)
    return replace(settings, reference=reference, reference_digest=digest)


def correct_features(features: CoSegmentationFeatures, settings: AnalysisSettings) -> CoSegmentationFeatures:
    """The feature corrections applied before step 4, so that every later step (pairs, clustering, co-segmentation)
    sees corrected queries and keys. Per entry (layer, noise draw), queries and keys alike:

    1. with `settings.clamp_high_norm`, each high-norm token (norm over its heads above its image's bound `median +
       5 * 1.4826 * MAD` of its token norms, `HIGH_NORM_MADS`) is replaced by the mean of its ordinary 8-neighbours
       on the token grid, or rescaled to the bound where it has none (:func:`inpaint_high_norm_tokens`);
    2. with `settings.reference`, the reference's per-position mean, centred over positions and denoised (smoothed
       over the token grid as far as the reference's own split-half cross-validation supports, each position shrunk
       by its noise), is subtracted at every image (:func:`positional_offsets`, :func:`remove_offsets`, which
       explains why the softmax allows it); the reference's own high-norm tokens are replaced first (step 1) when
       `clamp_high_norm` is on, so its anomalies, at random places, do not leak into the mean.

    Both act on each image alone, so they are applied as each image is read: the result is a
    :class:`~cosegment.store.LazyFeatures` over `features` (no copy of the collection; with features on disk, nothing
    read before a step needs it). An image with no token above its bound and no reference comes back as read, so
    that the analysis is then bitwise the one without corrections. `features` itself when both are off.
    """
    reference = settings.reference
    entries = check_reference(features, reference)
    grid = features.grid_size
    num_mads = HIGH_NORM_MADS if settings.clamp_high_norm else None
    if num_mads is None and entries is None:
        return features
    offsets = None
    if entries is not None:
        offsets = [
            (
                reference_offsets(reference.queries[j], grid, num_mads),
                reference_offsets(reference.keys[j], grid, num_mads),
            )
            for j in entries
        ]

    def correct(tokens: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:  # (H, N, d)
        if num_mads is not None:
            tokens = inpaint_high_norm_tokens(tokens[None], num_mads, grid)[0]
        return tokens if offset is None else remove_offsets(tokens[None], offset)[0]

    def read(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        queries, keys = features.image(index)
        if offsets is None:
            return [correct(q, None) for q in queries], [correct(k, None) for k in keys]
        return (
            [correct(q, offset[0]) for q, offset in zip(queries, offsets)],
            [correct(k, offset[1]) for k, offset in zip(keys, offsets)],
        )

    # features on disk keep their recent images already: correct them again at each read rather than keep copies
    return lazy_view(features, read, cache_bytes=0 if isinstance(features, LazyFeatures) else DEFAULT_CACHE_BYTES)


def _check_partners(partners: Any) -> int | None:
    """`partners`: `None` or an int >= 1 (`TypeError` for another type, `ValueError` below 1)."""
    if partners is None:
        return None
    if not _is_int(partners):
        raise TypeError(f"`partners` must be an int >= 1 or None, got {_describe(partners)}.")
    if partners < 1:
        raise ValueError(f"`partners` must be an int >= 1 or None, got {partners!r}.")
    return int(partners)


def _check_features(
    features: CoSegmentationFeatures,
    settings: AnalysisSettings,
    device: torch.device | str | None,
    progress: Callable[[int], Any] | None,
) -> torch.device:
    """Checks the features (validated once per call) and the arguments that depend on them; returns the device."""
    if not isinstance(features, CoSegmentationFeatures):
        raise TypeError(f"`features` must be a CoSegmentationFeatures, got {type(features).__name__}.")
    features.validate()
    check_reference(features, settings.reference)
    if progress is not None and not callable(progress):
        raise TypeError(f"`progress` must be callable or None, got {_describe(progress)}.")
    grid = tuple(features.grid_size)
    if settings.selection == "paper" and grid[0] * grid[1] < 2:
        raise ValueError(f"`selection`='paper' needs a token grid of 2+ tokens, got `grid_size` {grid}.")
    try:
        return torch.device(device) if device is not None else features.device
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device` {device!r} is not a torch device: {error}") from error
