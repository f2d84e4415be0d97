# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""What the analysis steps hand each other (DESIGN steps 3-11): the captured features ([`CoSegmentationFeatures`],
saved and loaded with safetensors), the results of the per-pair steps 4-8a ([`PassResult`] per pass, [`PairAnalysis`]
per pair) and the output ([`PairCorrespondence`], [`CoSegmentationPipelineOutput`]). No step runs here.
"""

import json
import numbers
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput
from safetensors.torch import load_file

from .utils.correspondence import PassStatistics, SelectionThresholds
from .utils.files import save_safetensors
from .utils.images import describe as _describe

FEATURES_FORMAT = "cosegment.features/1"
# Names of a saved reference's tensors and header entries start with this (CoSegmentationFeatures.save).
REFERENCE_PREFIX = "reference."
# The same for the mirrored captures (`features.mirrored`, issue 27): the images flipped left-right.
MIRRORED_PREFIX = "mirrored."


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
        flipped (`bool` or `None`): with mirrored captures (`analyze_features(mirrored=...)`), whether the pair was
            analysed with one image flipped left-right (`orientations[s] != orientations[t]`: the two images show
            their object opposite ways round); points and tokens are in the original images either way. `None`
            without mirrored captures.
    """

    source_index: int
    target_index: int
    source_points: np.ndarray | torch.Tensor
    target_points: np.ndarray | torch.Tensor
    scores: np.ndarray | torch.Tensor
    mutual: np.ndarray | torch.Tensor
    source_tokens: np.ndarray | torch.Tensor
    target_tokens: np.ndarray | torch.Tensor
    flipped: bool | None = None

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
        masks (`list[(H_i, W_i)]` bool): common foreground at each image's own size (`part_masks > 0`). For a large
            collection (masks over `MASKS_IN_MEMORY_BYTES`, 128 MiB) `masks` and `part_masks` are sequences that make
            each mask when indexed ([`~cosegment.parts.LazyMasks`], same values; `list(masks)` makes them all).
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
    orientations: np.ndarray | torch.Tensor | None = None


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
        mirrored (`CoSegmentationFeatures`, *optional*): the same images flipped left-right, captured with the same
            layers, grid, heads and sizes (`pipe(..., flip=True)`; issue 27): what
            `analyze_features(features, mirrored=features.mirrored)` decides the images' orientations from. Saved and
            loaded with the features (`mirrored.*` in the same file; its own `reference` and `mirrored` are not
            kept: the features' reference serves both). Only stored here, like `reference`.
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    grid_size: tuple[int, int]
    image_sizes: list[tuple[int, int]]
    layer_names: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    reference: "CoSegmentationFeatures | None" = None
    mirrored: "CoSegmentationFeatures | None" = None

    def __post_init__(self) -> None:
        self._normalise_sizes()
        if not self.layer_names:
            self.layer_names = [f"layer_{i}" for i in range(len(self.queries))]
        self.validate()

    def _normalise_sizes(self) -> None:
        """`grid_size` and `image_sizes` as tuples of ints (`ValueError` naming the argument otherwise)."""
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

    @property
    def num_images(self) -> int:
        return int(self.queries[0].shape[0])

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        """Per entry (layer, noise draw), the `(M, H, N, d)` shape of its queries (and keys)."""
        return [tuple(q.shape) for q in self.queries]

    @property
    def dtype(self) -> torch.dtype:
        """The queries' and keys' dtype."""
        return self.queries[0].dtype

    @property
    def device(self) -> torch.device:
        """Where the queries and keys are (where reads of :meth:`image` return them)."""
        return self.queries[0].device

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
        if self.mirrored is not None and not isinstance(self.mirrored, CoSegmentationFeatures):
            raise ValueError(f"`mirrored` must be a CoSegmentationFeatures or None, got {_describe(self.mirrored)}.")
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
        if self.mirrored is not None:
            check_mirrored(self, self.mirrored)

    def image(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Queries and keys of one image: two lists of `(H, N, d)` tensors. Every analysis step reads the features
        this way, one image at a time (features on disk, `load(path, mmap=True)`, read the image then)."""
        return [q[index] for q in self.queries], [k[index] for k in self.keys]

    def select(self, indices: list[int]) -> "CoSegmentationFeatures":
        """In-memory features of the images `indices` (2 or more, in that order), with their sizes, names and
        metadata; reads only those images (of features on disk too)."""
        images = [self.image(i) for i in indices]
        return CoSegmentationFeatures(
            [torch.stack([image[0][e] for image in images]) for e in range(len(self.layer_names))],
            [torch.stack([image[1][e] for image in images]) for e in range(len(self.layer_names))],
            self.grid_size,
            [self.image_sizes[i] for i in indices],
            list(self.layer_names),
            dict(self.metadata),
        )

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
            None if self.mirrored is None else self.mirrored.to(device, dtype),
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
        `reference` goes into the same file, its tensors and header entries named `reference.*`, and so do the
        `mirrored` captures (`mirrored.*`). Atomic: an interruption leaves the previous file, or none, never a partial
        one."""
        tensors, header = self._tensors_and_header()
        header["format"] = FEATURES_FORMAT
        for prefix, extra in ((REFERENCE_PREFIX, self.reference), (MIRRORED_PREFIX, self.mirrored)):
            if extra is not None:
                extra_tensors, extra_header = extra._tensors_and_header(prefix)
                tensors.update(extra_tensors)
                header.update(extra_header)
        save_safetensors(tensors, path, metadata=header)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", mmap: bool = False
    ) -> "CoSegmentationFeatures":
        """Loads a file written by :meth:`save`, or a folder written by a :class:`~cosegment.store.FeatureStore`
        (safetensors and JSON only, never pickle).

        Args:
            path (`str`): the file, or the store's folder.
            device (`torch.device`, *optional*, defaults to `"cpu"`): where the tensors go.
            mmap (`bool`, *optional*, defaults to `False`): keep the queries and keys on disk, memory-mapped, and read
                each image when a step needs it (a :class:`~cosegment.store.LazyFeatures`): for collections whose
                features do not fit in memory. `False` reads everything into memory.

        Raises:
            `FileNotFoundError` when there is no such file; `ValueError` when the file is not a cosegment features
            file (not safetensors, another safetensors file, a truncated or inconsistent one).
        """
        from safetensors import SafetensorError, safe_open

        if not isinstance(mmap, bool):
            raise TypeError(f"`mmap` must be a bool, got {_describe(mmap)}.")
        path = os.fspath(path)
        if os.path.isdir(path) or mmap:
            from .store import FeatureStore, open_features_file

            lazy = FeatureStore(path).features(device) if os.path.isdir(path) else open_features_file(path, device)
            return lazy if mmap else lazy.in_memory()
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
        mirrored_count = len([name for name in names if name.startswith(f"{MIRRORED_PREFIX}queries.")])
        expected = {
            f"{prefix}{kind}.{i}"
            for prefix, n in (("", count), (REFERENCE_PREFIX, reference_count), (MIRRORED_PREFIX, mirrored_count))
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

        def make(prefix: str, n: int, reference=None, mirrored=None) -> "CoSegmentationFeatures":
            return cls(
                [tensors[f"{prefix}queries.{i}"] for i in range(n)],
                [tensors[f"{prefix}keys.{i}"] for i in range(n)],
                json.loads(header[f"{prefix}grid_size"]),
                json.loads(header[f"{prefix}image_sizes"]),
                json.loads(header[f"{prefix}layer_names"]),
                json.loads(header.get(f"{prefix}metadata", "{}")),
                reference,
                mirrored,
            )

        try:
            reference = make(REFERENCE_PREFIX, reference_count) if reference_count else None
            mirrored = make(MIRRORED_PREFIX, mirrored_count) if mirrored_count else None
            return make("", count, reference, mirrored)
        except (KeyError, TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"`{path}` is a damaged cosegment features file: {error}") from error


def check_mirrored(features: CoSegmentationFeatures, mirrored: Any) -> None:
    """Checks that `mirrored` holds captures of the same images flipped left-right, made like `features`: a
    `CoSegmentationFeatures` with the same token grid, layer names, image sizes and, per entry, the same
    `(M, H, N, d)` shape and dtype.

    Raises:
        `TypeError`/`ValueError` naming `mirrored` and the value.
    """
    if not isinstance(mirrored, CoSegmentationFeatures):
        raise TypeError(f"`mirrored` must be a CoSegmentationFeatures or None, got {_describe(mirrored)}.")
    differences = (
        ("token grid", tuple(mirrored.grid_size), tuple(features.grid_size)),
        ("layer_names", list(mirrored.layer_names), list(features.layer_names)),
        ("image_sizes", list(mirrored.image_sizes), list(features.image_sizes)),
        ("query shapes", [tuple(s) for s in mirrored.shapes], [tuple(s) for s in features.shapes]),
        ("dtype", str(mirrored.dtype), str(features.dtype)),  # (read without loading features on disk)
    )
    for what, theirs, ours in differences:
        if theirs != ours:
            raise ValueError(
                f"`mirrored` must be the same images flipped left-right, captured alike: its {what} {theirs} differ "
                f"from the features' {ours}."
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _exact_int(value: Any) -> int:
    """`int(value)` for whole numbers only (no silent truncation of 2.5 or "3")."""
    if _is_int(value) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise TypeError(f"expected an int, got {value!r}")


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


def _image_features(
    features: CoSegmentationFeatures, index: int, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Queries and keys of image `index` on `device`: two lists of `(H, N, d)` tensors."""
    queries, keys = features.image(index)
    return [q.to(device) for q in queries], [k.to(device) for k in keys]
