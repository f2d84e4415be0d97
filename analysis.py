# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""The analysis of captured features (DESIGN steps 4-11): the feature container, the per-pair steps, then the
collection steps, each a named function. No UNet here: :func:`analyze_features` runs on saved features alone.

Read :func:`analyze_features` first: it is the method's steps 4-11 in order, one call each. A step's results travel
as [`PassResult`] objects (one per pass `source -> target`), changed with `dataclasses.replace`.

diffusers' loader copies this module beside `pipeline_cosegment.py` only because that file imports `.analysis` and
every `.utils.x` module imported here (DESIGN section 3): a new `.utils` import here needs one there too.
"""

import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput
from safetensors.torch import load_file

from .utils.correspondence import (
    PassStatistics,
    SelectionThresholds,
    attention_row_statistics,
    auto_thresholds,
    confirm_matches,
    cross_attention_probs,
    default_chunk_size,
    field_consistent,
    grow_matches,
    kept_map,
    match_scores,
    merge_passes,
    paper_thresholds,
    pass_statistics,
    reverse_consistent,
    select_matches,
    token_centres_in_pixels,
)
from .utils.files import save_safetensors
from .utils.images import describe as _describe
from .utils.reference import inpaint_high_norm_tokens, reference_offsets, remove_offsets
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
from .utils.segmentation import (
    assign_parts,
    attention_rows,
    background_threshold_from_kl,
    factored_spectral_clusters,
    grow_by_one_token,
    parts_and_divergences,
    remove_isolated,
    upsample_assignment,
)

FEATURES_FORMAT = "cosegment.features/1"
# Names of a saved reference's tensors and header entries start with this (CoSegmentationFeatures.save).
REFERENCE_PREFIX = "reference."
SELECTION_PRESETS = ("paper", "auto")
OUTPUT_TYPES = ("np", "pt")
THRESHOLD_NAMES = ("max_entropy", "max_spread", "max_collapse", "max_inverse_error")
# Hit regions smaller than this many tokens are isolated hits (noise) and dropped before clustering (step 10); a
# part of fewer points is dropped too. 3: a lone hit or a touching pair is what a chance match leaves. Never varied:
# every measurement in BENCHMARKS.md used this value.
MIN_REGION_TOKENS = 3
# Step 11 re-estimates the part distributions from the tokens assigned to them this many times: the clustered points
# are mostly inner tokens, so the first distributions under-weight the object's outline. Each round may move the
# foreground's outline by one token at most (BENCHMARKS.md (o): without that bound one background token assigned in
# the first round drew its whole background region into the part). One round: without it design part NMI fell by up
# to 0.016 (parts rows) and 0.052 (SD rows); two or more were not measured.
SEGMENTATION_REFINEMENTS = 1
# Step 11 keeps every image's self-attention rows (`M N^2` float32) for its rounds when they fit in this many bytes
# (M = 64 images of 32 x 32 tokens, or 4 of 64 x 64); else it computes them again in each round (same values).
STEP11_ROWS_BYTES = 2**28
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
# High-norm tokens (correct_features): a token whose query or key norm exceeds its image's median token norm by more
# than this many robust standard deviations (1.4826 MAD) is replaced by its ordinary neighbours' mean. Fixed before
# measuring (a normal sample almost never reaches 5 robust SDs); BENCHMARKS.md (j), (n4): a few content tokens of
# noisy clean planted collections pass it too, which moves their metrics by -0.004 to +0.015.
HIGH_NORM_MADS = 5.0
# The rule applied to them, recorded in the pair analyses' settings (`"neighbours"`: the mean of the ordinary
# 8-neighbours, :func:`~cosegment.utils.reference.inpaint_high_norm_tokens`; it replaced a rescaling to the bound).
HIGH_NORM_RULE = "neighbours"
# Step 10: the columns of the collection embedding are the hit tokens of at most this many images (those with most
# hits), so its width, and the cost of the clustering, stop growing with M beyond them.
MAX_EMBEDDING_IMAGES = 8
# Step 10: the largest part count the estimate considers (num_parts=None).
MAX_PARTS = 8
# Step 10: a clustered point less than this share as similar to its part as the part's median point is dropped
# (`typical_points`). 0.5 was first read off one planted test collection (`benchmarks/planted.py`, seed 3001: three
# stray off-object points scored 0.14-0.16 against part medians of 0.46-0.48, object points at least 0.19), then
# checked, not tuned, on the design split only (`benchmarks/families.py --split design --tables parts`, sectors and
# blobs, M = 2/4/8) against 0 (off): part NMI +0.001 on average over the 6 rows with 3 collections per row (-0.0003
# with 6), no row down by more than 0.003; Jaccard +0.04 on average (+0.03 with 6; up to +0.08, blobs M = 8). It is
# kept for the masks, not the parts. No other value was tried.
TYPICAL_POINT_SHARE = 0.5
# Step 10: a hit point whose attention mass on the anchor images' points is less than this share of the median
# point's is a stray hit off the object and is dropped before the clustering (`attached_points`). Read off the design
# split only (`benchmarks/families.py --split design`, hidden-part and clean SD cells, seeds 600-602 and 740-742):
# the object's points scored 0.44 and more (5th percentile 0.64 or more), stray background points 0.09-0.58 (most
# under 0.42). Checked on design only, 6 collections per row, against no such test: mask Jaccard parts rows 0.877 vs
# 0.820, hidden-part row 0.873 vs 0.786, SD rows 0.782 vs 0.728; part NMI 0.788 vs 0.788, 0.768 vs 0.773, 0.715 vs
# 0.716. Also tried: 0.4 (3 per row: Jaccard lower, hidden 0.879 vs 0.895 and SD clean M = 2 0.777 vs 0.874) and
# 0.6 (6 per row: Jaccard 0.882 / 0.903 / 0.788, NMI 0.790 / 0.766 / 0.709).
ATTACHED_SHARE = 0.5
# Step 10: at most this many Lloyd iterations on the points' keys after the spectral clustering (`refine_by_keys`).
# A cap, not a tuned value: on the design split (BENCHMARKS.md (l4)) 1, 3 and 20 gave the same parts table.
KEY_ITERATIONS = 10
# An image whose best partner keeps fewer matches than this share of the collection's typical best partner (the
# median over images) shares nothing with the collection: an outlier (`"auto"` only). Set on the design split of
# benchmarks/families.py (M = 5, 8 collections with one outlier and 8 without): inliers' shares were 0.78-1, an
# outlier's 0.05-0.19; 0.35 is about the geometric midpoint of 0.78 and 0.19.
SHARING_CUT = 0.35


@dataclass
class PairCorrespondence:
    """Kept correspondences between images `source_index < target_index`, both passes joined.

    Attributes:
        source_index (`int`), target_index (`int`): positions of the two images in the collection.
        source_points (`(K, 2)` float): x, y of the matched token centres in image `source_index`'s own pixels.
        target_points (`(K, 2)` float): x, y of their matches in image `target_index`'s own pixels.
        scores (`(K,)` float): confidence in [0, 1]: `A_st[p, f(p)]` times the share of p's 3x3 neighbours whose
            matches are kept (the larger of the two passes for a mutual match); sorting by it puts the most reliable
            matches first.
        mutual (`(K,)` bool): found by both passes (s -> t and t -> s).
        source_tokens (`(K,)` int), target_tokens (`(K,)` int): the matched token indices on the `(h, w)` grid.
    """

    source_index: int
    target_index: int
    source_points: np.ndarray | torch.Tensor
    target_points: np.ndarray | torch.Tensor
    scores: np.ndarray | torch.Tensor
    mutual: np.ndarray | torch.Tensor
    source_tokens: np.ndarray | torch.Tensor
    target_tokens: np.ndarray | torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass
class CoSegmentationPipelineOutput(BaseOutput):
    """Output of :class:`StableDiffusionCoSegmentationPipeline` and :func:`analyze_features`.

    `M` images, an `(h, w)` token grid.

    Attributes:
        correspondences (`list[PairCorrespondence]`): one per analysed unordered pair `(s, t)`, `s < t`, in order
            (every pair, or the pairs of the partner graph with `partners=K`).
        density_maps (`(M, h, w)` float): per token, the kept correspondences that start or land on it, over all
            pairs and both passes (hit counts, seed Fig. 3-4).
        entropy_maps (`(M, h, w)` float): per token, the mean inverse mapping entropy (nats, Eq. 2.10) of the token
            as a target, over all partners.
        inverse_error_maps (`(M, h, w)` float): per token, the mean inverse mapping error (grid cells, Eq. 2.8) of
            the token as a source, over all partners.
        masks (`list[(H_i, W_i)]` bool): common foreground at each image's own size (`part_masks > 0`).
        part_masks (`list[(H_i, W_i)]` int64): part ids `1..K`, 0 = background; the same id is the same part in
            every image (step 11: nearest part in KL of self-attention rows; at pixel size the tokens' labels
            smoothed by half a token cell and resized, outlines and part boundaries midway between tokens).
        keypoints (`list[(K_i, 2)]` float32): part centres, x, y in each image's own pixels: the mean of the part's
            clustered hit tokens in that image (step 10); `(0, 2)` when nothing survives.
        keypoint_parts (`list[(K_i,)]` int64): the part id of each keypoint, ascending.
        features (`CoSegmentationFeatures` or `None`): the captured queries and keys, when requested.
        thresholds (`list[dict]`): per pair and pass, the thresholds applied.
        sharing (`(M,)` float): how much each image shares with the collection, in [0, 1]: the matches kept with its
            best analysed partner over the median of that number over the images (capped at 1; see
            :func:`sharing_scores`). About 1 for an image showing the common object, near 0 for one without it.
        outliers (`(M,)` bool): images found to share nothing (`sharing < SHARING_CUT`, `"auto"` preset, 3+
            images): their correspondences are dropped (their pairs stay listed, empty), they confirm nothing
            (step 8b) and their masks are empty.
    """

    correspondences: list[PairCorrespondence]
    density_maps: np.ndarray | torch.Tensor
    entropy_maps: np.ndarray | torch.Tensor
    inverse_error_maps: np.ndarray | torch.Tensor
    masks: list | None = None
    part_masks: list | None = None
    keypoints: list | None = None
    keypoint_parts: list | None = None
    features: "CoSegmentationFeatures | None" = None
    thresholds: list | None = None
    sharing: np.ndarray | torch.Tensor | None = None
    outliers: np.ndarray | torch.Tensor | None = None


@dataclass
class CoSegmentationFeatures:
    """Queries and keys captured from the UNet: everything the analysis (DESIGN steps 4-11) needs.

    Attributes:
        queries (`list[torch.Tensor]`): one `(M, H, N, d)` tensor per (layer, noise draw).
        keys (`list[torch.Tensor]`): same shapes as `queries`.
        grid_size (`tuple[int, int]`): `(h, w)`, `h * w == N`.
        image_sizes (`list[tuple[int, int]]`): each image's original `(height, width)` in pixels.
        layer_names (`list[str]`): the layer of each entry of `queries`.
        metadata (`dict`): JSON-serialisable settings of the capture (model, timestep, sizes...).
        reference (`CoSegmentationFeatures`, *optional*): content-free captures of the same model, layers, grid and
            timestep (:meth:`StableDiffusionCoSegmentationPipeline.capture_reference`) that the analysis used
            (`analyze_features(features, reference=features.reference)` repeats it); saved and loaded with the
            features, in the same file. Only stored here: :func:`analyze_features` uses its own `reference` argument.
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    grid_size: tuple[int, int]
    image_sizes: list[tuple[int, int]]
    layer_names: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    reference: "CoSegmentationFeatures | None" = None

    def __post_init__(self) -> None:
        try:
            self.grid_size = tuple(_exact_int(v) for v in self.grid_size)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`grid_size` must be two positive ints (h, w), got {_describe(self.grid_size)}."
            ) from error
        try:
            self.image_sizes = [tuple(_exact_int(v) for v in size) for size in self.image_sizes]
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`image_sizes` must be a list of (height, width) int pairs, got {_describe(self.image_sizes)}."
            ) from error
        if not self.layer_names:
            self.layer_names = [f"layer_{i}" for i in range(len(self.queries))]
        self.validate()

    @property
    def num_images(self) -> int:
        return int(self.queries[0].shape[0])

    def validate(self) -> None:
        """Raises `ValueError` when the tensors and sizes disagree."""
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"`grid_size` must be two positive ints (h, w), got {self.grid_size}.")
        if not self.queries or len(self.queries) != len(self.keys):
            raise ValueError(
                f"`queries` and `keys` must be non-empty lists of equal length, got {len(self.queries)} and "
                f"{len(self.keys)}."
            )
        if not isinstance(self.layer_names, list) or not all(isinstance(n, str) for n in self.layer_names):
            raise ValueError(f"`layer_names` must be a list of str, got {_describe(self.layer_names)}.")
        if len(self.layer_names) != len(self.queries):
            raise ValueError(f"`layer_names` has {len(self.layer_names)} names for {len(self.queries)} tensors.")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"`metadata` must be a dict, got {_describe(self.metadata)}.")
        if self.reference is not None and not isinstance(self.reference, CoSegmentationFeatures):
            raise ValueError(f"`reference` must be a CoSegmentationFeatures or None, got {_describe(self.reference)}.")
        n = self.grid_size[0] * self.grid_size[1]
        first = self.queries[0]
        if not isinstance(first, torch.Tensor) or first.ndim != 4:
            raise ValueError(f"`queries[0]` must be a (M, H, N, d) tensor, got {_describe(first)}.")
        for name, tensors in (("queries", self.queries), ("keys", self.keys)):
            for i, t in enumerate(tensors):
                if not isinstance(t, torch.Tensor) or t.ndim != 4:
                    raise ValueError(f"`{name}[{i}]` must be a (M, H, N, d) tensor, got {_describe(t)}.")
                if t.shape[0] != first.shape[0] or t.shape[2] != n:
                    raise ValueError(
                        f"`{name}[{i}]` has shape {tuple(t.shape)}; expected M={first.shape[0]} images and "
                        f"N={n} tokens for grid {self.grid_size}."
                    )
                if t.shape[1] < 1 or t.shape[3] < 1:
                    raise ValueError(f"`{name}[{i}]` has shape {tuple(t.shape)}: no heads or an empty head size.")
                if not t.dtype.is_floating_point:
                    raise ValueError(f"`{name}[{i}]` must be a float tensor, got dtype {t.dtype}.")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"`{name}[{i}]` ({self.layer_names[i]}) contains NaN or inf; in float16 the UNet can "
                        f"overflow: run it in float32 or bfloat16."
                    )
        for i, (q, k) in enumerate(zip(self.queries, self.keys)):
            if q.shape != k.shape:
                raise ValueError(f"`queries[{i}]` {tuple(q.shape)} and `keys[{i}]` {tuple(k.shape)} differ in shape.")
        if first.shape[0] < 2:
            raise ValueError(f"Features must hold at least 2 images, got {first.shape[0]}.")
        if len(self.image_sizes) != first.shape[0]:
            raise ValueError(f"`image_sizes` has {len(self.image_sizes)} sizes for {first.shape[0]} images.")
        for i, size in enumerate(self.image_sizes):
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"`image_sizes[{i}]` must be a positive (height, width), got {size}.")

    def image(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Queries and keys of one image: two lists of `(H, N, d)` tensors."""
        return [q[index] for q in self.queries], [k[index] for k in self.keys]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "CoSegmentationFeatures":
        return CoSegmentationFeatures(
            [q.to(device=device, dtype=dtype) for q in self.queries],
            [k.to(device=device, dtype=dtype) for k in self.keys],
            self.grid_size,
            self.image_sizes,
            list(self.layer_names),
            dict(self.metadata),
            None if self.reference is None else self.reference.to(device, dtype),
        )

    def _tensors_and_header(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and header entries :meth:`save` writes, names starting with `prefix`."""
        tensors = {}
        for i, (q, k) in enumerate(zip(self.queries, self.keys)):
            tensors[f"{prefix}queries.{i}"] = q.detach().contiguous().cpu()
            tensors[f"{prefix}keys.{i}"] = k.detach().contiguous().cpu()
        header = {
            f"{prefix}grid_size": json.dumps(list(self.grid_size)),
            f"{prefix}image_sizes": json.dumps([list(s) for s in self.image_sizes]),
            f"{prefix}layer_names": json.dumps(list(self.layer_names)),
            f"{prefix}metadata": json.dumps(self.metadata),
        }
        return tensors, header

    def save(self, path: str | os.PathLike) -> None:
        """Saves to one `.safetensors` file (tensors, and the sizes and metadata as JSON in its header); a
        `reference` goes into the same file, its tensors and header entries named `reference.*`. Atomic: an
        interruption leaves the previous file, or none, never a partial one."""
        tensors, header = self._tensors_and_header()
        header["format"] = FEATURES_FORMAT
        if self.reference is not None:
            reference_tensors, reference_header = self.reference._tensors_and_header(REFERENCE_PREFIX)
            tensors.update(reference_tensors)
            header.update(reference_header)
        save_safetensors(tensors, path, metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "CoSegmentationFeatures":
        """Loads a file written by :meth:`save` (safetensors and JSON only, never pickle).

        Raises:
            `FileNotFoundError` when there is no such file; `ValueError` when the file is not a cosegment features
            file (not safetensors, another safetensors file, a truncated or inconsistent one).
        """
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`path` {path!r} is not a file.")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"`device` {device!r} is not a torch device: {error}") from error
        try:
            with safe_open(path, framework="pt") as handle:
                header = handle.metadata() or {}
                names = set(handle.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"`{path}` is not a safetensors file: {error}") from error
        if header.get("format") != FEATURES_FORMAT:
            raise ValueError(f"`{path}` is not a cosegment features file (format {header.get('format')!r}).")
        count = len([name for name in names if name.startswith("queries.")])
        reference_count = len([name for name in names if name.startswith(f"{REFERENCE_PREFIX}queries.")])
        expected = {
            f"{prefix}{kind}.{i}"
            for prefix, n in (("", count), (REFERENCE_PREFIX, reference_count))
            for kind in ("queries", "keys")
            for i in range(n)
        }
        if names != expected:
            raise ValueError(
                f"`{path}` is a damaged cosegment features file: tensors {sorted(names)}, expected {sorted(expected)}."
            )
        try:
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"`{path}` is a damaged cosegment features file: {error}") from error

        def make(prefix: str, n: int, reference=None) -> "CoSegmentationFeatures":
            return cls(
                [tensors[f"{prefix}queries.{i}"] for i in range(n)],
                [tensors[f"{prefix}keys.{i}"] for i in range(n)],
                json.loads(header[f"{prefix}grid_size"]),
                json.loads(header[f"{prefix}image_sizes"]),
                json.loads(header[f"{prefix}layer_names"]),
                json.loads(header.get(f"{prefix}metadata", "{}")),
                reference,
            )

        try:
            return make("", count, make(REFERENCE_PREFIX, reference_count) if reference_count else None)
        except (KeyError, TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"`{path}` is a damaged cosegment features file: {error}") from error


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _exact_int(value: Any) -> int:
    """`int(value)` for whole numbers only (no silent truncation of 2.5 or "3")."""
    if _is_int(value) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise TypeError(f"expected an int, got {value!r}")


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
        shape, reference_shape = features.queries[i].shape, reference.queries[j].shape
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

    Returns `features` itself when nothing changes (no reference, and no token above its bound or the clamp off), so
    that the analysis is then bitwise the one without corrections; otherwise new features (same sizes, names and
    metadata).
    """
    reference = settings.reference
    entries = check_reference(features, reference)

    grid = features.grid_size
    num_mads = HIGH_NORM_MADS if settings.clamp_high_norm else None

    def clamp(tokens: torch.Tensor) -> torch.Tensor:
        return tokens if num_mads is None else inpaint_high_norm_tokens(tokens, num_mads, grid)

    queries, keys = [], []
    for i, (q, k) in enumerate(zip(features.queries, features.keys)):
        q, k = clamp(q), clamp(k)
        if entries is not None:
            q = remove_offsets(q, reference_offsets(reference.queries[entries[i]], grid, num_mads))
            k = remove_offsets(k, reference_offsets(reference.keys[entries[i]], grid, num_mads))
        queries.append(q)
        keys.append(k)
    unchanged = all(a is b for a, b in zip(queries + keys, features.queries + features.keys))
    if unchanged:
        return features
    return replace(features, queries=queries, keys=keys, reference=None)


def _check_partners(partners: Any) -> int | None:
    """`partners`: `None` or an int >= 1 (`TypeError` for another type, `ValueError` below 1)."""
    if partners is None:
        return None
    if not _is_int(partners):
        raise TypeError(f"`partners` must be an int >= 1 or None, got {_describe(partners)}.")
    if partners < 1:
        raise ValueError(f"`partners` must be an int >= 1 or None, got {partners!r}.")
    return int(partners)


@dataclass
class PassResult:
    """One pass `source -> target` of a pair after DESIGN steps 4-8a (selection, and growth under `"auto"`).

    Attributes:
        source_index (`int`), target_index (`int`): the images, by position in the collection.
        statistics ([`PassStatistics`]): per source token `f(p)`, target IME, IMS, spread, collapse.
        keep (`torch.Tensor`): `(N,)` bool, the matches kept so far (steps 8b-8c make new results with other `keep`).
        max_prob (`torch.Tensor`): `(N,)` float32, `A_st[p, f(p)]`.
        inverse_entropy (`torch.Tensor`): `(N,)` float32, IME of every target token (Eq. 2.10, nats): this pass'
            contribution to the target's `entropy_maps`.
        thresholds ([`SelectionThresholds`]): the limits applied.
        peak_points (`torch.Tensor` or `None`): `(N, 2)` float32 `(row, col)` on the target grid, the window
            soft-argmax of each source token's row around `f(p)` (kept while the rows are computed, for
            `refine=True`); `None`: computed again for the kept matches when needed.
    """

    source_index: int
    target_index: int
    statistics: PassStatistics
    keep: torch.Tensor
    max_prob: torch.Tensor
    inverse_entropy: torch.Tensor
    thresholds: SelectionThresholds
    peak_points: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PassResult":
        """A copy with every tensor on `device`."""
        stats = PassStatistics(**{name: value.to(device) for name, value in self.statistics.__dict__.items()})
        return replace(
            self,
            statistics=stats,
            keep=self.keep.to(device),
            max_prob=self.max_prob.to(device),
            inverse_entropy=self.inverse_entropy.to(device),
            peak_points=None if self.peak_points is None else self.peak_points.to(device),
        )


@dataclass
class PairAnalysis:
    """The per-pair part of :func:`analyze_features` (DESIGN steps 4-8a) for images `s < t`: both passes.

    Made by :func:`analyze_pairs`; :func:`analyze_features` joins a collection's pair analyses (`pair_analyses=`)
    and runs the collection-level steps (8b-11). This is how several processes share one analysis: each analyses its
    share of the pairs, the main process joins them, and the result equals a one-process analysis.

    Attributes:
        source_index (`int`), target_index (`int`): `s < t`.
        passes (`tuple[PassResult, PassResult]`): `s -> t`, then `t -> s`.
        grid_size (`tuple[int, int]`): the token grid `(h, w)`.
        settings (`dict`): `selection` and the threshold overrides the passes were made with.
    """

    source_index: int
    target_index: int
    passes: tuple
    grid_size: tuple
    settings: dict

    def to(self, device: torch.device | str) -> "PairAnalysis":
        """A copy with every tensor on `device` (e.g. `"cpu"` before sending it to another process)."""
        return replace(
            self,
            passes=tuple(result.to(device) for result in self.passes),
            grid_size=tuple(self.grid_size),
            settings=dict(self.settings),
        )


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
        return torch.device(device) if device is not None else features.queries[0].device
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device` {device!r} is not a torch device: {error}") from error


def _every_pair(num_images: int) -> list[tuple[int, int]]:
    """Every unordered pair `(s, t)`, `s < t`, in order."""
    return [(s, t) for s in range(num_images) for t in range(s + 1, num_images)]


def image_descriptors(features: CoSegmentationFeatures) -> torch.Tensor:
    """A cheap global descriptor per image, `(M, D)` float32 with unit rows (zero rows when every image is alike).

    Per captured layer: each token's query (heads concatenated, `H * d`) scaled to unit length, averaged over the
    image's tokens, minus the mean of that over the collection (what every image has alike, e.g. a positional
    component, cancels), scaled to unit length; the layers' descriptors concatenated, each weighted
    `1 / sqrt(layers)`, and the whole scaled to unit length. Two images' cosine similarity is the dot product of their
    rows. Cost: one pass over the features, `O(M N H d)`, next to the `O(N^2 H d)` of one pair's attention.
    """
    parts = []
    for queries in features.queries:
        tokens = queries.detach().float().permute(0, 2, 1, 3).flatten(2)  # (M, N, H * d)
        mean = torch.nn.functional.normalize(tokens, dim=-1).mean(dim=1)
        mean = mean - mean.mean(dim=0, keepdim=True)
        parts.append(torch.nn.functional.normalize(mean, dim=-1) / math.sqrt(len(features.queries)))
    return torch.nn.functional.normalize(torch.cat(parts, dim=1).cpu(), dim=-1)


def partner_pairs(features: CoSegmentationFeatures, partners: int | None) -> list[tuple[int, int]]:
    """The pair graph: each image with its `partners` most similar images (cosine similarity of
    :func:`image_descriptors`; ties to the lower index), then *bridges* that join the groups this leaves apart: while
    the graph has several connected components, the most similar pair of images in two different components is
    added (Kruskal's rule; ties to the lower indices). The union as `(s, t)`, `s < t`, in order.

    Why bridges: nearest neighbours alone can split a collection into groups that share no pair (every design
    M = 16 collection checked split in two), and then no correspondence ties one group's parts to the other's. A
    component holds at least `partners + 1` images, so at most `M / (partners + 1) - 1` bridges are added: at most
    `M * partners + M / (partners + 1)` pairs, and the analysis grows as `M * K`. (An earlier graph joined every image
    to a hub image instead: up to `M - 1` more pairs, about 1/4 more analysis at M = 16, BENCHMARKS.md (k2).) `None`,
    or `partners >= M - 1`: every pair. Computed from the features as captured, before the corrections of
    :func:`correct_features` (the analysis and the CLI's split between processes use the same graph)."""
    num_images = features.num_images
    if partners is None or partners >= num_images - 1:
        return _every_pair(num_images)
    descriptors = image_descriptors(features).double()
    similarity = descriptors @ descriptors.T
    similarity.fill_diagonal_(-math.inf)
    pairs = set()
    for i in range(num_images):
        order = sorted(range(num_images), key=lambda j: (-float(similarity[i, j]), j))
        pairs.update((min(i, j), max(i, j)) for j in order[:partners])
    component = list(range(num_images))  # union-find: each image's representative

    def root(i: int) -> int:
        while component[i] != i:
            component[i] = component[component[i]]
            i = component[i]
        return i

    for s, t in pairs:
        component[root(s)] = root(t)
    candidates = sorted((-float(similarity[s, t]), s, t) for s, t in _every_pair(num_images) if root(s) != root(t))
    for _, s, t in candidates:
        if root(s) != root(t):
            component[root(s)] = root(t)
            pairs.add((s, t))
    return sorted(pairs)


def _check_pair_list(pairs, num_images: int) -> list[tuple[int, int]]:
    """`pairs` (or `None`: every pair) -> a list of distinct `(s, t)` int pairs, `0 <= s < t < num_images`."""
    if pairs is None:
        return _every_pair(num_images)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"`pairs` must be a list of (s, t) image index pairs or None, got {_describe(pairs)}.")
    checked = []
    for pair in pairs:
        if (
            not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(_is_int(i) for i in pair)
            or not 0 <= pair[0] < pair[1] < num_images
        ):
            raise ValueError(
                f"`pairs` must hold (s, t) with 0 <= s < t < {num_images} (the number of images), got {pair!r}."
            )
        checked.append((int(pair[0]), int(pair[1])))
    if len(set(checked)) != len(checked):
        raise ValueError(f"`pairs` must not repeat a pair, got {checked}.")
    return checked


def _pass_thresholds(settings: AnalysisSettings, stats: PassStatistics, num_tokens: int) -> SelectionThresholds:
    """Step 7: the preset's thresholds for one pass, with the user's overrides."""
    base = paper_thresholds(num_tokens) if settings.selection == "paper" else auto_thresholds(stats)
    values = {name: getattr(base, name) for name in THRESHOLD_NAMES}
    values.update({name: value for name, value in settings.thresholds.items() if value is not None})
    return SelectionThresholds(**values)


def _in_pair(error: Exception, source: int, target: int) -> Exception:
    """`error` re-made with "pair (s, t)" in front of its message: the same type when it takes a message, else a
    `RuntimeError` (raise it `from error`)."""
    message = f"pair ({source}, {target}): {type(error).__name__}: {error}"
    try:
        wrapped = type(error)(message)
    except Exception:
        return RuntimeError(message)
    return wrapped if str(wrapped) == message else RuntimeError(message)


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


def analyze_pair(
    features: CoSegmentationFeatures, source: int, target: int, settings: AnalysisSettings, device: torch.device
) -> PairAnalysis:
    """Steps 4-8a for one pair `source < target` of checked features and settings: both passes."""
    grid = tuple(features.grid_size)
    num_tokens = grid[0] * grid[1]
    queries_s, keys_s = features.image(source)
    queries_t, keys_t = features.image(target)
    queries_s, keys_s = [q.to(device) for q in queries_s], [k.to(device) for k in keys_s]
    queries_t, keys_t = [q.to(device) for q in queries_t], [k.to(device) for k in keys_t]
    # 4. Cross self-attention, row statistics of A_st and A_ts (Eq. 2.4-2.6), and each row's sub-token peak
    peaks_st = peaks_ts = None
    if settings.refine:
        peaks_st, peaks_ts = torch.zeros(num_tokens, 2, device=device), torch.zeros(num_tokens, 2, device=device)
    rows_st = attention_row_statistics(queries_s, keys_t, None, settings.chunk_size, _peak_hook(peaks_st, grid))
    rows_ts = attention_row_statistics(queries_t, keys_s, None, settings.chunk_size, _peak_hook(peaks_ts, grid))
    # 5-8a. Maps, neighbourhood check, selection (and growth under "auto"), both passes
    passes = []
    directions = ((rows_st, rows_ts, peaks_st, source, target), (rows_ts, rows_st, peaks_ts, target, source))
    for forward_rows, backward_rows, peaks, s, t in directions:
        stats = pass_statistics(forward_rows, backward_rows, grid)
        limits = _pass_thresholds(settings, stats, num_tokens)
        keep = select_matches(stats, limits)
        if settings.selection == "auto":
            keep = grow_matches(stats, keep, limits, grid)
        passes.append(PassResult(s, t, stats, keep, forward_rows.max_prob, backward_rows.entropy, limits, peaks))
    return PairAnalysis(source, target, tuple(passes), grid, settings.pair_settings)


def _analyze_pair_list(
    features: CoSegmentationFeatures,
    pairs: list[tuple[int, int]],
    settings: AnalysisSettings,
    device: torch.device,
    progress: Callable[[int], Any] | None,
) -> list[PairAnalysis]:
    """:func:`analyze_pair` for each of `pairs` (checked), naming the pair in any error."""
    analyses = []
    for s, t in pairs:
        try:
            analyses.append(analyze_pair(features, s, t, settings, device))
        except Exception as error:  # name the pair; keep the type where it can take a message
            raise _in_pair(error, s, t) from error
        if progress is not None:
            progress(1)
    return analyses


def analyze_pairs(
    features: CoSegmentationFeatures,
    pairs: Sequence[tuple[int, int]] | None = None,
    selection: str = "auto",
    max_entropy: float | None = None,
    max_spread: float | None = None,
    max_collapse: float | None = None,
    max_inverse_error: float | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], Any] | None = None,
    refine: bool = True,
    reference: CoSegmentationFeatures | None = None,
    clamp_high_norm: bool = True,
    partners: int | None = None,
) -> list[PairAnalysis]:
    r"""The per-pair part of :func:`analyze_features` (DESIGN steps 4-8a): cross self-attention row statistics of
    both directions, maps, neighbourhood check, selection (and growth under `"auto"`) of both passes.

    This is where the time goes (two `(N, N)` attention matrices per pair, in row chunks), so it is the part to
    split between processes: give each process its share of `pairs`, gather the results (`.to("cpu")` first) and
    pass them all to `analyze_features(features, pair_analyses=...)` with the same `selection` and thresholds.

    Args:
        features (`CoSegmentationFeatures`): captured queries and keys of `M >= 2` images.
        pairs (`list[tuple[int, int]]`, *optional*): the pairs `(s, t)`, `0 <= s < t < M`, to analyse; every pair
            by default.
        selection, max_entropy, max_spread, max_collapse, max_inverse_error, chunk_size, device, progress,
            reference, clamp_high_norm: as in :func:`analyze_features` (pass the same to both).
        refine (`bool`, *optional*, defaults to `True`): also keep each row's sub-token peak for `refine=True` in
            :func:`analyze_features` (without them it computes the kept matches' rows again).
        partners (`int`, *optional*): with `pairs=None`, the pairs of the partner graph (:func:`partner_pairs`: each
            image with its `partners` most similar images, plus bridges), as `analyze_features(partners=...)` analyses
            them. Give `pairs` or `partners`, not both (to split the graph between processes, split
            `partner_pairs(features, K)` and pass each share as `pairs`).

    Returns:
        `list[PairAnalysis]`, one per pair, in the order of `pairs`.
    """
    settings = check_analysis_settings(
        selection,
        max_entropy,
        max_spread,
        max_collapse,
        max_inverse_error,
        chunk_size=chunk_size,
        refine=refine,
        reference=reference,
        clamp_high_norm=clamp_high_norm,
        partners=partners,
    )
    device = _check_features(features, settings, device, progress)
    if pairs is not None and partners is not None:
        raise ValueError(f"Give `pairs` or `partners`, not both; got `partners`={partners!r} and a list of pairs.")
    pairs = partner_pairs(features, partners) if pairs is None else _check_pair_list(pairs, features.num_images)
    return _analyze_pair_list(correct_features(features, settings), pairs, settings, device, progress)


def join_pair_analyses(
    pair_analyses: Sequence[PairAnalysis],
    features: CoSegmentationFeatures,
    settings: dict,
    device: torch.device,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> dict[tuple[int, int], PassResult]:
    """Checks that `pair_analyses` cover `pairs` (default: every pair of `features`; see :func:`partner_pairs`) once,
    made with `settings` (`selection` and the threshold overrides); returns their passes by `(source, target)` on
    `device`, in pair order (`(s, t)` then `(t, s)` for each `s < t`)."""
    if isinstance(pair_analyses, (str, bytes)) or not isinstance(pair_analyses, Sequence):
        raise TypeError(f"`pair_analyses` must be a list of PairAnalysis or None, got {_describe(pair_analyses)}.")
    num_images, grid = features.num_images, tuple(features.grid_size)
    by_pair = {}
    for analysis in pair_analyses:
        if not isinstance(analysis, PairAnalysis):
            raise TypeError(f"`pair_analyses` must hold PairAnalysis objects, got {type(analysis).__name__}.")
        pair = (analysis.source_index, analysis.target_index)
        if pair in by_pair:
            raise ValueError(f"`pair_analyses` holds pair {pair} twice.")
        if tuple(analysis.grid_size) != grid:
            raise ValueError(f"`pair_analyses` pair {pair} has grid {analysis.grid_size}, the features {grid}.")
        if analysis.settings != settings:
            raise ValueError(
                f"`pair_analyses` pair {pair} was made with {analysis.settings}, this call asks for {settings}: "
                "pass the same `selection` and thresholds to analyze_pairs and analyze_features."
            )
        by_pair[pair] = analysis.to(device)
    pairs = _every_pair(num_images) if pairs is None else sorted(pairs)
    expected = set(pairs)
    if set(by_pair) != expected:
        missing, extra = sorted(expected - set(by_pair)), sorted(set(by_pair) - expected)
        graph = "every pair" if len(pairs) == num_images * (num_images - 1) // 2 else "each pair of the partner graph"
        outside = [pair for pair in extra if max(pair) >= num_images]
        beside = [pair for pair in extra if max(pair) < num_images]
        raise ValueError(
            f"`pair_analyses` must hold {graph} of the {num_images} images once: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, not in the collection {outside[:5]}, not in the pair graph "
            f"{beside[:5]}."
        )
    passes = {}
    for pair in pairs:
        for result in by_pair[pair].passes:
            passes[(result.source_index, result.target_index)] = result
    return passes


def sharing_scores(passes: dict[tuple[int, int], PassResult], num_images: int) -> torch.Tensor:
    """How much each image shares with the collection, `(M,)` float64 in [0, 1], from the kept matches of steps 4-8a.

    An image's *best partner count* is the largest number of matches (both passes) it keeps with one analysed
    partner; its score is that count over the median of the images' best partner counts, capped at 1. An image
    that shows the common object matches its best partner about as well as the others do theirs (design split:
    0.78-1); one without it keeps only the few matches that per-pass adaptive thresholds always let through (0.05-
    0.19). The median makes the score collection-relative; it assumes most images show the object. All ones when
    the collection keeps no match at all."""
    kept = torch.zeros(num_images, num_images, dtype=torch.float64)
    for (s, t), result in passes.items():
        count = float(result.keep.sum())
        kept[s, t] += count
        kept[t, s] += count
    best = kept.max(dim=1).values
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


def transfer_points(
    features: CoSegmentationFeatures,
    source_index: int,
    target_index: int,
    points: np.ndarray | torch.Tensor | Sequence[Sequence[float]],
    refine: bool = True,
    chunk_size: int | None = None,
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
    device = features.queries[0].device
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


def _image_features(
    features: CoSegmentationFeatures, index: int, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Queries and keys of image `index` on `device`: two lists of `(H, N, d)` tensors."""
    queries, keys = features.image(index)
    return [q.to(device) for q in queries], [k.to(device) for k in keys]


def collection_embedding(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    chunk_size: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Step 10a: one Hellinger embedding of every image's clustered `points` (a list of `(P_i,)` token indices), so
    that tokens of different images can be compared.

    A point p of image s is described, for each anchor image u (the `MAX_EMBEDDING_IMAGES` images with most points,
    s among them when it is one), by its attention over u's points, `A_su[p, points_u]` renormalised to sum to 1
    (cross self-attention for `u != s`, its own self-attention for `u = s`); the embedding is the square roots of
    these distributions side by side, each block divided by sqrt(#anchors). The dot product of two points' embeddings
    is then the mean over anchors of the Bhattacharyya coefficient of their distributions over the anchor's points:
    two tokens are alike when they attend to the same tokens of the same images, whichever image they sit in.

    Returns:
        `(R, D)` float32 on `device`, rows in image order (`R = sum P_i`, `D = sum of P_u over the anchors`).
    """
    return _embedding_and_mass(features, points, chunk_size, device)[0]


def _embedding_and_mass(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    chunk_size: int | None,
    device: torch.device,
    blocks: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`collection_embedding` `(R, D)` and each point's attention mass on the anchors' points before the
    renormalisation `(R, len(anchors))`.

    `blocks` (step 10 embeds the points, drops some and embeds the rest again): a dict kept between calls on the
    same collection. The first call stores its `points` (`blocks["points"]`) and each attention block it computes,
    image s's rows over anchor u's points (`blocks[(s, u)]`, `(P_s, P_u)` float32, before the renormalisation); a
    later call whose `points` are subsets of those (per image, ascending token indices, as :func:`_keep_points`
    leaves them) takes its blocks' rows and columns from there instead of computing them again. Each row is its own
    softmax over every token of u, so the values are those a new computation gives (the matrix product of a block
    of fewer than about 4 rows may take another BLAS path and differ in the last bit)."""
    sizes = [p.numel() for p in points]
    anchors = sorted(np.argsort([-n for n in sizes], kind="stable")[:MAX_EMBEDDING_IMAGES].tolist())
    anchors = [u for u in anchors if sizes[u] > 0]
    if blocks is not None:
        base = blocks.setdefault("points", points)
        where = [
            torch.searchsorted(b, p.contiguous()) if b.numel() != p.numel() else None for b, p in zip(base, points)
        ]
        for b, p, w in zip(base, points, where):
            found = b if w is None else b[w.clamp_max(b.numel() - 1)] if b.numel() else b
            if found.shape != p.shape or not torch.equal(found, p):
                raise ValueError("`points` must be subsets of the points the kept `blocks` were computed for.")
    blocks_out, masses = [], []
    for s in range(features.num_images):
        queries = None
        row, mass = [], []
        for u in anchors:
            if blocks is None or (s, u) not in blocks:
                if queries is None:
                    queries, _ = _image_features(features, s, device)
                _, keys = _image_features(features, u, device)
                source = points if blocks is None else base
                rows = attention_rows(queries, keys, source[s], source[u], chunk_size)
                if blocks is not None:
                    blocks[(s, u)] = rows
            if blocks is not None:
                rows = blocks[(s, u)]
                rows = rows if where[s] is None else rows[where[s]]
                rows = rows if where[u] is None else rows[:, where[u]]
            mass.append(rows.sum(dim=1))
            rows = rows / rows.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            row.append(rows.sqrt() / math.sqrt(len(anchors)))
        blocks_out.append(torch.cat(row, dim=1) if row else torch.zeros(sizes[s], 0, device=device))
        masses.append(torch.stack(mass, dim=1) if mass else torch.zeros(sizes[s], 0, device=device))
    return torch.cat(blocks_out), torch.cat(masses)


def attached_points(mass: np.ndarray) -> np.ndarray:
    """Step 10c (start): `(R,)` bool, False for a point whose attention mass on the anchor images' points (`mass`
    `(R, U)`, one column per anchor; each column divided by its median over all points, then averaged over the
    anchors) is under `ATTACHED_SHARE`. An object token attends mostly to the object, where the other points are;
    a stray hit off the object attends to the background. The embedding renormalises each distribution over the
    points, which hides this, so such a point is clustered like any other and in step 11 stretches its part's
    distribution over the background."""
    if mass.shape[0] == 0 or mass.shape[1] == 0:
        return np.ones(mass.shape[0], dtype=bool)
    median = np.median(mass, axis=0, keepdims=True)
    relative = (mass / np.maximum(median, np.finfo(np.float64).tiny)).mean(axis=1)
    return relative >= ATTACHED_SHARE


def link_by_correspondences(
    embedding: torch.Tensor,
    points: list[torch.Tensor],
    correspondences: list[PairCorrespondence],
    num_tokens: int,
) -> torch.Tensor:
    """Step 10b: the kept correspondences tie the points of different images together: each point's row of
    `embedding` `(R, D)` (rows in image order, `points` a list of `(P_i,)` token indices) becomes the mean of its own
    row and the rows of the points it is matched to (in any pair, either pass; a link counted once). Returns
    `(R, D)`."""
    offsets = np.cumsum([0] + [p.numel() for p in points]).tolist()
    device = embedding.device
    rows_of = []  # per image: (N,) row of each token in `embedding`, -1 for a token that is no point
    for i, image_points in enumerate(points):
        rows = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        rows[image_points] = torch.arange(offsets[i], offsets[i + 1], device=device)
        rows_of.append(rows)
    links = [torch.zeros(2, 0, dtype=torch.long, device=device)]
    for pair in correspondences:
        a = rows_of[pair.source_index][pair.source_tokens.to(device)]
        b = rows_of[pair.target_index][pair.target_tokens.to(device)]
        both = (a >= 0) & (b >= 0)
        links += [torch.stack([a[both], b[both]]), torch.stack([b[both], a[both]])]
    links = torch.unique(torch.cat(links, dim=1), dim=1)
    total = embedding.clone().index_add_(0, links[0], embedding[links[1]])
    count = 1.0 + torch.bincount(links[0], minlength=embedding.shape[0]).to(embedding.dtype)
    return total / count[:, None]


def _keep_points(
    points: list[torch.Tensor], regions: np.ndarray, keep: np.ndarray
) -> tuple[list[torch.Tensor], np.ndarray]:
    """`points` (per image, in the order of `regions` `(R,)`) and `regions` where `keep` `(R,)` bool."""
    offsets = np.cumsum([0] + [p.numel() for p in points])
    kept = [p[torch.from_numpy(keep[offsets[i] : offsets[i + 1]]).to(p.device)] for i, p in enumerate(points)]
    return kept, regions[keep]


def typical_points(embedding: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Step 10c (end): `(R,)` bool, False for a point less than `TYPICAL_POINT_SHARE` times as similar to its part
    (cosine to the mean `embedding` row of the part) as the part's median point. Such points are mostly stray hits
    off the object that the clustering had to put somewhere: in step 11 they would stretch their part's distribution
    over the background."""
    keep = np.ones(regions.shape[0], dtype=bool)
    unit = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    for part in np.unique(regions):
        members = regions == part
        centre = unit[members].mean(0)
        similarity = unit[members] @ (centre / max(np.linalg.norm(centre), 1e-12))
        keep[members] = similarity >= TYPICAL_POINT_SHARE * np.median(similarity)
    return keep


def key_descriptors(features: CoSegmentationFeatures, points: list[torch.Tensor], device: torch.device) -> np.ndarray:
    """Step 10c: `(R, D)` float64, each clustered point's own key (rows in image order, `points` a list of `(P_i,)`
    token indices). Per captured layer (and noise draw) the token's key with the heads concatenated (`H * d`), scaled
    to unit length; the layers' keys concatenated, each weighted `1 / sqrt(layers)`, so rows have unit length and a
    squared distance is the mean over layers of the squared distance of unit keys (with one layer, the descriptor of
    the joint k-means baseline, `benchmarks/families.py` `joint_kmeans_parts`)."""
    rows = []
    for i, image_points in enumerate(points):
        _, keys = _image_features(features, i, device)
        index = image_points.to(device)
        layers = [torch.nn.functional.normalize(k.float().permute(1, 0, 2).flatten(1)[index], dim=-1) for k in keys]
        rows.append(torch.cat(layers, dim=1) / math.sqrt(len(keys)))  # (P_i, layers * H * d)
    return torch.cat(rows).double().cpu().numpy()


def refine_by_keys(descriptors: np.ndarray, regions: np.ndarray, iterations: int | None = None) -> np.ndarray:
    """Step 10c: Lloyd (k-means) iterations on the points' keys (`descriptors` `(R, D)`, :func:`key_descriptors`)
    started from the spectral parts `regions` `(R,)`: each part's centre is the mean key of its points, each point
    goes to the nearest centre (squared Euclidean), until no point moves or after `iterations` steps (default
    `KEY_ITERATIONS`; 0 keeps `regions`). A step that
    would leave a part with fewer than `MIN_REGION_TOKENS` points (or fewer than it had, if it had fewer) is not
    taken, so the count stays the one the clustering found (or `num_parts`). Returns the new `(R,)` parts.

    Why: a token's attention row concentrates on the tokens most like it, so near a part boundary it reaches across
    the boundary and its collection embedding lies between the two parts; the spectral clustering, which reads that
    embedding, then puts some boundary points in the neighbouring part, and step 11 spreads the error (a part's
    distribution is the mean of its points' attention rows). A key is linear in the token's own feature, so the part
    under the token keeps its full weight there. The spectral clustering keeps what it does well (the count, and
    parts tied across images through attention and correspondences); the keys only move points between its parts.
    Measured on the design split (BENCHMARKS.md (l4)): where the method was below joint k-means, step 10 had put
    1-3% of its points in the wrong part, all next to a part boundary, while k-means' labels of the same points were
    exact; with this refinement the two agree there.
    """
    labels = np.asarray(regions, dtype=np.int64).copy()
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"`descriptors` {x.shape} must have one row per entry of `regions` {labels.shape}.")
    if labels.size == 0:
        return labels
    num_parts = int(labels.max()) + 1
    squared = (x * x).sum(1, keepdims=True)
    for _ in range(KEY_ITERATIONS if iterations is None else int(iterations)):
        counts = np.bincount(labels, minlength=num_parts)
        present = counts > 0
        centres = np.zeros((num_parts, x.shape[1]))
        np.add.at(centres, labels, x)
        centres[present] /= counts[present, None]
        distance = squared - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
        distance[:, ~present] = np.inf
        moved = distance.argmin(1)
        if (moved == labels).all():
            break
        if (np.bincount(moved, minlength=num_parts) < np.minimum(counts, MIN_REGION_TOKENS)).any():
            break
        labels = moved
    return labels


def cluster_collection(
    features: CoSegmentationFeatures,
    points: list[torch.Tensor],
    correspondences: list[PairCorrespondence],
    num_parts: int | None,
    chunk_size: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], np.ndarray]:
    """Step 10c: the clustered `points` of **every** image (a list of `(P_i,)` token indices) grouped into parts at
    once: spectral clustering (:func:`factored_spectral_clusters`) of the affinity `E E^T` of their collection
    embedding (:func:`collection_embedding`) tied by the kept correspondences (:func:`link_by_correspondences`).
    Hit points attending little to the other points are dropped first (:func:`attached_points`). With
    `num_parts=None` the count is the largest eigengap of that joint affinity among 2..`MAX_PARTS`. A part of
    fewer than `MIN_REGION_TOKENS` points (over the collection) is noise: its points are dropped and the rest
    clustered again. The points then move between these parts by Lloyd iterations on their own keys
    (:func:`refine_by_keys`, :func:`key_descriptors`): attention reaches across part boundaries, keys do not, so this
    corrects the boundary points the embedding misplaces, without changing the count. Last, points far from their
    part's typical point are dropped (:func:`typical_points`).

    No image is a reference: every point is described in the same coordinates (its attention over the anchor images'
    points), so the clustering sees all images at once and its ids are shared by construction, with no vote to carry
    them. Measured on the planted families (BENCHMARKS.md (l)): the estimated count is steadier than with one
    reference image, but held-out part NMI stays at 0.74-0.85 and an outlier image's stray hits join the parts.

    Returns the kept points per image and their parts `(P'_i,)`, numbered `0..K-1` over the collection (one id, one
    part in every image; a part may have no point in some image).
    """
    num_tokens = features.grid_size[0] * features.grid_size[1]
    blocks = {}  # attention blocks of the first embedding, reused after points are dropped
    mass = _embedding_and_mass(features, points, chunk_size, device, blocks)[1]
    attached = attached_points(mass.double().cpu().numpy())
    if attached.sum() >= 2:
        points = _keep_points(points, np.zeros(attached.shape[0], dtype=np.int64), attached)[0]
    while True:
        embedding = _embedding_and_mass(features, points, chunk_size, device, blocks)[0]
        embedding = link_by_correspondences(embedding, points, correspondences, num_tokens).double().cpu().numpy()
        total = embedding.shape[0]
        regions = factored_spectral_clusters(embedding, num_parts, min(MAX_PARTS, max(1, total - 1)))
        small = np.bincount(regions)[regions] < MIN_REGION_TOKENS
        if not small.any() or small.all():
            break
        points, regions = _keep_points(points, regions, ~small)
    regions = refine_by_keys(key_descriptors(features, points, device), regions)
    points, regions = _keep_points(points, regions, typical_points(embedding, regions))
    regions = np.unique(regions, return_inverse=True)[1].reshape(-1)
    offsets = np.cumsum([0] + [p.numel() for p in points])
    return points, [torch.from_numpy(regions[offsets[i] : offsets[i + 1]]) for i in range(len(points))]


def cluster_hits(
    features: CoSegmentationFeatures,
    density: torch.Tensor,
    correspondences: list[PairCorrespondence],
    num_parts: int | None,
    chunk_size: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], int]:
    """Step 10. Per image, its hit tokens (`density` `(M, N)` > 0) minus isolated ones (regions under
    `MIN_REGION_TOKENS`); then the points of all images are clustered together into K parts
    (:func:`cluster_collection`), numbered 1..K. No image is a reference: one id is one part in every image, and a
    part that one image lacks (hidden, or without hits there) still exists in the others.

    Returns one `(N,)` long label tensor per image (0 = not a clustered point) and the number of parts K.
    """
    num_images, grid = features.num_images, features.grid_size
    num_tokens = grid[0] * grid[1]
    hits = (density > 0).view(num_images, *grid).cpu().numpy()
    points = [
        torch.from_numpy(np.flatnonzero(remove_isolated(hits[i], MIN_REGION_TOKENS))).to(device)
        for i in range(num_images)
    ]
    labels = [torch.zeros(num_tokens, dtype=torch.long, device=device) for _ in range(num_images)]
    if sum(p.numel() for p in points) < 2:
        return labels, 0
    points, regions = cluster_collection(features, points, correspondences, num_parts, chunk_size, device)
    for image_labels, image_points, image_regions in zip(labels, points, regions):
        image_labels[image_points] = image_regions.to(device) + 1
    return labels, int(max(int(r.max()) for r in regions if r.numel()) + 1)


def part_keypoints(
    labels: list[torch.Tensor], features: CoSegmentationFeatures, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step 10 (end): per image, each part's centre `(K_i, 2)` (x, y in the image's own pixels: the mean of the
    part's clustered tokens) and the part ids `(K_i,)`, ascending."""
    keypoints, keypoint_parts = [], []
    for image_labels, size in zip(labels, features.image_sizes):
        ids = torch.unique(image_labels[image_labels > 0])
        centres = [
            token_centres_in_pixels(torch.nonzero(image_labels == k).flatten(), features.grid_size, size)
            for k in ids.tolist()
        ]
        keypoints.append(torch.stack([c.mean(0) for c in centres]) if centres else torch.zeros(0, 2, device=device))
        keypoint_parts.append(ids.long())
    return keypoints, keypoint_parts


def part_divergences(
    features: CoSegmentationFeatures,
    labels: list[torch.Tensor],
    num_parts: int,
    chunk_size: int | None,
    device: torch.device,
    rows: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Step 11a: per image, each part's distribution is the mean of its labelled tokens' self-attention rows; every
    token gets its KL(token row || part) to each part, `(N, K)` per image (`inf` for a part absent there).

    `rows`: per image its `(N, N)` self-attention rows (:func:`attention_rows`), when the caller keeps them for
    several calls (:func:`segment_parts`); the same values, computed here otherwise."""
    divergences = []
    for i in range(features.num_images):
        queries, keys = _image_features(features, i, device)
        image_rows = None if rows is None else rows[i]
        kl = parts_and_divergences(queries, keys, labels[i], num_parts, chunk_size, image_rows)[1]
        present = torch.bincount(labels[i], minlength=num_parts + 1)[1:] > 0
        divergences.append(kl.masked_fill(~present[None, :], math.inf))
    return divergences


def segment_parts(
    features: CoSegmentationFeatures,
    labels: list[torch.Tensor],
    num_parts: int,
    background_threshold: float | None,
    chunk_size: int | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """Step 11. Every token goes to the part of nearest distribution in KL (:func:`part_divergences`), or to the
    background when its smallest KL exceeds `background_threshold` (`None`: the minimum-error cut of
    log(1 + smallest KL) over the collection). The distributions are then re-estimated from every token assigned to
    a part (`SEGMENTATION_REFINEMENTS` times) and the tokens assigned again, the foreground now limited to the
    previous one and its 8 neighbours (:func:`grow_by_one_token`): the re-estimate brings in the outline that the
    clustered (inner) points under-weight, and the bound keeps it from growing further, since a background token
    assigned to a part in one round makes its part's distribution attend to that token's background region, whose
    other tokens would then join the part in the next. At each image's own size a pixel takes
    the label its tokens vote for (:func:`upsample_assignment`: foreground and part indicators smoothed by a Gaussian
    of half a token cell, `UPSAMPLE_SIGMA`, and resized bilinearly), so part boundaries lie midway between tokens of
    different parts, whatever the KL values.

    The images' self-attention rows are computed once for every round when they fit in `STEP11_ROWS_BYTES` (`M N^2`
    float32), else again in each round.

    Returns one `(H_i, W_i)` int64 part mask per image at its own size (0 = background).
    """
    grid = features.grid_size
    num_tokens = grid[0] * grid[1]
    # without parts every token is background: no KL to compute
    divergences = [torch.zeros(num_tokens, 0, device=device) for _ in range(features.num_images)]
    threshold = math.inf
    rows = None
    if num_parts > 0 and SEGMENTATION_REFINEMENTS > 0 and features.num_images * num_tokens**2 * 4 <= STEP11_ROWS_BYTES:
        rows = [
            attention_rows(*_image_features(features, i, device), chunk_size=chunk_size)
            for i in range(features.num_images)
        ]
    foreground = [None] * features.num_images
    for round_ in range(1 + SEGMENTATION_REFINEMENTS if num_parts > 0 else 0):
        divergences = part_divergences(features, labels, num_parts, chunk_size, device, rows)
        threshold = background_threshold
        if threshold is None:
            threshold = background_threshold_from_kl(torch.cat([kl.min(dim=1).values for kl in divergences]))
        labels = [assign_parts(kl, threshold)[0] for kl in divergences]
        if round_ > 0:  # the outline moves by one token at most
            labels = [
                torch.where(grow_by_one_token(previous, grid), image_labels, torch.zeros_like(image_labels))
                for previous, image_labels in zip(foreground, labels)
            ]
        foreground = [image_labels > 0 for image_labels in labels]
    return [
        torch.from_numpy(upsample_assignment(kl, grid, threshold, size, foreground=image_foreground))
        for kl, size, image_foreground in zip(divergences, features.image_sizes, foreground)
    ]


def _convert_output(output: CoSegmentationPipelineOutput, output_type: str) -> CoSegmentationPipelineOutput:
    """Moves every tensor of the output to the CPU, as numpy arrays for `output_type="np"`."""

    def convert(value):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            return value.numpy() if output_type == "np" else value
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, PairCorrespondence):
            return PairCorrespondence(**{k: convert(v) for k, v in value.__dict__.items()})
        return value

    fields = ("correspondences", "density_maps", "entropy_maps", "inverse_error_maps", "masks", "part_masks")
    fields += ("sharing", "outliers")
    for name in fields + ("keypoints", "keypoint_parts"):
        setattr(output, name, convert(getattr(output, name)))
    return output


def analyze_checked_features(
    features: CoSegmentationFeatures,
    settings: AnalysisSettings,
    device: torch.device,
    progress: Callable[[int], Any] | None = None,
    pair_analyses: Sequence[PairAnalysis] | None = None,
    pairs: list[tuple[int, int]] | None = None,
) -> CoSegmentationPipelineOutput:
    """:func:`analyze_features` for features and settings already checked (`settings` from
    :func:`check_analysis_settings`, `features` validated): the method's steps 4-11 in order. `pairs`: the pair
    graph `partner_pairs(features, settings.partners)` when the caller has it already."""
    num_images, grid = features.num_images, tuple(features.grid_size)
    num_tokens = grid[0] * grid[1]
    # The pair graph, from the captured features (as the CLI splits it between processes)
    if pairs is None:
        pairs = partner_pairs(features, settings.partners)
    # 3b. Feature corrections: high-norm tokens, a reference's positional offsets
    features = correct_features(features, settings)
    # 4-8a. Per pair of the pair graph (the expensive part), unless done already (e.g. split between processes)
    if pair_analyses is None:
        pair_analyses = _analyze_pair_list(features, pairs, settings, device, progress)
    passes = join_pair_analyses(pair_analyses, features, settings.pair_settings, device, pairs)
    thresholds = [
        {"source": result.source_index, "target": result.target_index, **result.thresholds.__dict__}
        for result in passes.values()
    ]
    # How much each image shares with the collection; an outlier's matches are dropped before 8b
    sharing = sharing_scores(passes, num_images)
    outliers = find_outliers(sharing, settings.selection)
    if settings.selection == "auto":
        inliers, dropped = split_outlier_passes(passes, outliers)
        # 8b. With three or more images: matches that third images confirm
        if num_images > 2:
            sparse = len(pairs) < num_images * (num_images - 1) // 2
            inliers = confirm_by_third_images(inliers, num_images, grid, longer_paths=sparse)
        # 8c. Final consistency with the reverse pass and the local affine field
        inliers = check_consistency(inliers, grid)
        passes = {pair: inliers[pair] if pair in inliers else dropped[pair] for pair in passes}
    # 8. Both passes of each pair joined into its correspondences
    correspondences = pair_correspondences(passes, features)
    if settings.refine:  # below the token grid (the tokens stay as they are)
        correspondences = refine_correspondences(correspondences, passes, features, settings.chunk_size, device)
    # 9. Hit counts, and the mean IME and IMS maps of step 5
    density = hit_counts(correspondences, num_images, num_tokens, device)
    entropy, inverse_error = mean_pass_maps(passes, num_images, num_tokens, device)
    output = CoSegmentationPipelineOutput(
        correspondences=correspondences,
        density_maps=density.view(num_images, *grid),
        entropy_maps=entropy.view(num_images, *grid),
        inverse_error_maps=inverse_error.view(num_images, *grid),
        thresholds=thresholds,
        sharing=sharing,
        outliers=outliers,
    )
    if settings.segment:
        # 10. Clustering: hit regions per image, linked across images into shared parts
        labels, num_parts = cluster_hits(
            features, density, correspondences, settings.num_parts, settings.chunk_size, device
        )
        output.keypoints, output.keypoint_parts = part_keypoints(labels, features, device)
        # 11. Co-segmentation: every token to the part of nearest self-attention distribution (KL), or background
        output.part_masks = segment_parts(
            features, labels, num_parts, settings.background_threshold, settings.chunk_size, device
        )
        output.masks = [mask > 0 for mask in output.part_masks]
    return _convert_output(output, settings.output_type)


def analyze_features(
    features: CoSegmentationFeatures,
    selection: str = "auto",
    max_entropy: float | None = None,
    max_spread: float | None = None,
    max_collapse: float | None = None,
    max_inverse_error: float | None = None,
    num_parts: int | None = None,
    background_threshold: float | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    output_type: str = "np",
    progress: Callable[[int], Any] | None = None,
    pair_analyses: Sequence[PairAnalysis] | None = None,
    segment: bool = True,
    refine: bool = True,
    reference: CoSegmentationFeatures | None = None,
    clamp_high_norm: bool = True,
    partners: int | None = None,
) -> CoSegmentationPipelineOutput:
    r"""Correspondences, hit counts, parts and co-segmentation masks from captured features alone (DESIGN steps
    4-11); no UNet needed, so a caller can re-run it with other thresholds.

    Args:
        features (`CoSegmentationFeatures`): captured queries and keys of `M >= 2` images.
        selection (`str`, *optional*, defaults to `"auto"`): threshold preset. `"auto"`: per pass, Otsu cuts of
            the pass's own target-IME and log-spread values, a cycle that returns to p's 3x3 neighbourhood and no
            complete collapse; then matches vouched for by at least two kept neighbours are added and lone ones
            dropped (`grow_matches`), and with four or more images a match that two third images confirm is added
            (`confirm_matches`); finally a match that a kept match of the reverse pass contradicts is dropped
            (`reverse_consistent`), as is one with a diagonal or unchecked cycle that the local affine field of its
            kept neighbours puts more than `max_inverse_error` cells away (`field_consistent`). `"paper"`: the
            note's fixed numbers (IME < 2 nats at N = 1024 scaled by log N / log 1024, spread <= 20 cells^2,
            collapse <= 0.5, IMS <= 1 cell), nothing added. `"auto"` is the default: on the planted benchmark it
            keeps about twice the correct matches at nearly the same precision, which also gives better masks and
            parts.
        max_entropy (`float`, *optional*): IME limit of a match's target, nats (overrides the preset).
        max_spread (`float`, *optional*): neighbourhood spread limit, target cells squared.
        max_collapse (`float`, *optional*): collapse share limit in [0, 1].
        max_inverse_error (`float`, *optional*): inverse mapping error limit, source cells (under `"auto"` also
            the tolerance, in target cells, of the confirmation by third images).
            Each threshold accepts `float("inf")` to disable its check. Under `"auto"` a grown or confirmed match
            is exempt from `max_entropy` and from the all-neighbour spread (see `grow_matches`).
        num_parts (`int`, *optional*): number of parts; `None` estimates it (largest eigengap, among 2..8 parts, of
            the joint affinity of every image's hit tokens: see :func:`cluster_collection`).
        background_threshold (`float`, *optional*): KL limit (nats) above which a token is background; `None`
            takes the minimum-error (Kittler-Illingworth) cut of the logarithm of every token's smallest KL to a
            part, pooled over the collection (Otsu's cut lands inside the far larger background class).
        chunk_size (`int`, *optional*): attention rows computed at once (bounds memory); automatic by default.
        device (`torch.device`, *optional*): where to compute, defaults to the features' device.
        output_type (`str`, *optional*, defaults to `"np"`): `"np"` for numpy arrays, `"pt"` for torch tensors.
        progress (`Callable`, *optional*): called with 1 after each pair (e.g. a tqdm bar's `update`).
        pair_analyses (`list[PairAnalysis]`, *optional*): the per-pair steps 4-8a already done by
            :func:`analyze_pairs` (every pair of the graph once, any order, e.g. gathered from several processes, made with the
            same `selection` and thresholds as this call); only steps 8b-11 then run here. The output is the same
            as without them.
        segment (`bool`, *optional*, defaults to `True`): run steps 10-11; with `False` the clustering and the
            co-segmentation are skipped and `masks`, `part_masks`, `keypoints` and `keypoint_parts` are `None`
            (the other fields are unchanged).
        refine (`bool`, *optional*, defaults to `True`): refine each kept match's point in the image it lands in
            below the token grid (:func:`refine_correspondences`: window soft-argmax of its attention row, then the
            local affine field of the pass's kept matches); the query side stays at its token centre and
            `source_tokens` / `target_tokens` are unchanged. `False`: every point is a token centre.
        reference (`CoSegmentationFeatures`, *optional*): content-free captures of the same model with the same
            layers, grid and timestep (:meth:`StableDiffusionCoSegmentationPipeline.capture_reference`: blank
            mid-grey images). What they share position by position, their per-position mean centred over positions
            and denoised (smoothed over the token grid as far as the reference's own split-half cross-validation
            supports, then shrunk by its noise: :func:`~cosegment.utils.reference.positional_offsets`), is
            subtracted from every image's queries and keys before step 4: a positional embedding and corner tokens
            (Loos and Linhardt 2025) otherwise make "the same place in the other image" a confident, cycle-consistent
            match. Safe for the softmax: the offsets sum to zero over positions, so no row's mean logit moves, and
            a part shared by every position is kept (see :func:`~cosegment.utils.reference.remove_offsets`).
            `None` (default): no such correction, the result bitwise that of earlier versions when no token is
            clamped. Checked against `features`: a `ValueError` naming `reference` when its grid, layers, heads or
            head size differ.
        clamp_high_norm (`bool`, *optional*, defaults to `True`): rescale high-norm (anomaly) tokens, whose query or
            key norm exceeds their image's median token norm by more than 5 robust standard deviations (1.4826 MAD),
            to that bound before step 4. On by default: it costs nothing measurable on clean planted collections
            (BENCHMARKS.md); `False` turns it off.
        partners (`int`, *optional*): the sparse pair graph: each image is analysed with its `partners` most
            similar images (cosine similarity of :func:`image_descriptors`, a mean of unit-length queries per image),
            plus the most similar pairs that join groups this leaves apart (bridges, which keep the graph
            connected); the union of those pairs is analysed (:func:`partner_pairs`; at most
            `M * partners + M / (partners + 1)` pairs, so the cost grows as `M * K`). Hit counts, parts and masks
            come from those pairs, `correspondences` lists only them, and step 8b confirms through paths of one or
            two third images along analysed pairs. `None` (default), or
            `partners >= M - 1`: every pair. With `pair_analyses`, they must cover exactly this graph.

    Returns:
        [`CoSegmentationPipelineOutput`]

    Raises:
        `TypeError`/`ValueError` for bad arguments, before any pair is analysed. An error while analysing a pair is
        re-raised with "pair (s, t)" in its message, as the same type where that type takes a message (else a
        `RuntimeError`), chained to the original.
    """
    settings = check_analysis_settings(
        selection,
        max_entropy,
        max_spread,
        max_collapse,
        max_inverse_error,
        num_parts=num_parts,
        background_threshold=background_threshold,
        chunk_size=chunk_size,
        output_type=output_type,
        segment=segment,
        refine=refine,
        reference=reference,
        clamp_high_norm=clamp_high_norm,
        partners=partners,
    )
    device = _check_features(features, settings, device, progress)
    return analyze_checked_features(features, settings, device, progress, pair_analyses)
