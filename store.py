# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""Features that stay on disk (issue 26): collections of thousands of images, whose queries and keys do not fit in
memory, are read one image at a time when a step needs it.

- :class:`LazyFeatures`: a [`CoSegmentationFeatures`] whose images come from a reader, one at a time
  (`features.image(i)`), with a small cache of the images read last. Every analysis step reads images this way, so
  the analysis never holds every image's queries and keys. It also carries the feature corrections applied on the
  fly (:func:`~cosegment.settings.correct_features`).
- :func:`open_features_file`: a file written by :meth:`CoSegmentationFeatures.save`, memory-mapped
  (`CoSegmentationFeatures.load(path, mmap=True)`).
- :class:`FeatureStore`: a folder of features written batch by batch (one safetensors *shard* per batch, each
  self-describing), read as one lazy features object (:meth:`FeatureStore.features`). Shards are written atomically
  and independently (several processes may write theirs into one store), so a capture can write as it goes and a
  resumed one asks which images are still missing (:meth:`FeatureStore.missing`).

Files are safetensors (tensors) and JSON (sizes and settings), never pickle.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .features import FEATURES_FORMAT, REFERENCE_PREFIX, CoSegmentationFeatures, _exact_int
from .utils.files import is_temporary, save_safetensors, write_json
from .utils.images import describe as _describe

STORE_FORMAT = "cosegment.feature-store/1"
SHARD_FORMAT = "cosegment.feature-shard/1"
# A store folder: this index (grid, layers, number of images, settings), one shard per written batch, and the
# reference (content-free captures, :meth:`CoSegmentationFeatures.save` format) when there is one.
STORE_INDEX = "store.json"
STORE_REFERENCE = "reference.safetensors"
_SHARD_NAME = re.compile(r"^images-(\d{8})-(\d{8})\.safetensors$")
# The images a lazy features object keeps after reading them (least recently used dropped first): the two images of
# a pair and the anchor images of step 10 are read again soon after. 16 MiB: 16 planted images (a pair's source image
# stays for its next partner, step 10's 8 anchor images and the image they are compared with stay); at least
# `CACHE_MIN_IMAGES` whatever their size (2 of SD 2.1's default layers at 512 px, about 15 MiB each). Was 64 MiB: at
# M = 1024 planted 48 MiB less for 7.35 instead of 7.09 reads per image (BENCHMARKS.md (t2)).
DEFAULT_CACHE_BYTES = 2**24
CACHE_MIN_IMAGES = 2
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HEADER_LIMIT = 2**27


def _entry_names(count: int, prefix: str = "") -> list[tuple[str, str]]:
    return [(f"{prefix}queries.{i}", f"{prefix}keys.{i}") for i in range(count)]


def _image_bytes(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of one image's queries and keys: `shapes` per entry `(H, N, d)`."""
    return 2 * sum(int(np.prod(shape)) for shape in shapes) * torch.empty(0, dtype=dtype).element_size()


class LazyFeatures(CoSegmentationFeatures):
    """Captured features read one image at a time: `image(i)` calls `read(i)`, keeping the images read last (up to
    `cache_bytes`) for the next call. Everything the analysis reads goes through `image(i)`, so with features on
    disk (:func:`open_features_file`, :meth:`FeatureStore.features`) the memory an analysis needs does not grow with
    the collection.

    `queries` and `keys` (`(M, H, N, d)` per entry, as in-memory features have them) are assembled on access, which
    reads every image into memory: the analysis never uses them; :meth:`in_memory` makes that copy once.

    Args:
        read (`Callable[[int], tuple[list[torch.Tensor], list[torch.Tensor]]]`): image `i`'s queries and keys, one
            `(H, N, d)` tensor per entry (layer, noise draw), each entry's shape `shapes[e]`, dtype `dtype`.
        shapes (`list[tuple[int, int, int]]`): per entry `(H, N, d)`.
        dtype (`torch.dtype`), device (`torch.device`): of the tensors `read` returns.
        grid_size, image_sizes, layer_names, metadata, reference: as in [`CoSegmentationFeatures`].
        cache_bytes (`int`, *optional*): images kept after reading (0: none; else at least the last
            `CACHE_MIN_IMAGES` = 2 read, whatever their size: a pair's two images).
        check_values (`bool`, *optional*, defaults to `True`): check each image read for NaN and inf; `False` for
            images read from features already checked (:func:`lazy_view`: corrected or oriented as read).

    Attributes:
        reads (`list[int]`): per image, how many times `read` was called for it (cache misses).
    """

    def __init__(
        self,
        read: Callable[[int], tuple[list[torch.Tensor], list[torch.Tensor]]],
        shapes: Sequence[tuple[int, int, int]],
        dtype: torch.dtype,
        grid_size: tuple[int, int],
        image_sizes: list[tuple[int, int]],
        layer_names: list[str] | None = None,
        metadata: dict | None = None,
        reference: CoSegmentationFeatures | None = None,
        device: torch.device | str = "cpu",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        check_values: bool = True,
    ) -> None:
        if not callable(read):
            raise TypeError(f"`read` must be callable, got {_describe(read)}.")
        if not _is_count(cache_bytes):
            raise ValueError(f"`cache_bytes` must be an int >= 0, got {_describe(cache_bytes)}.")
        self._read = read
        self._shapes = [tuple(_exact_int(v) for v in shape) for shape in shapes]
        self._dtype = dtype
        self._device = torch.device(device)
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._check_values = bool(check_values)
        self.grid_size = grid_size
        self.image_sizes = image_sizes
        self.layer_names = list(layer_names) if layer_names else []
        self.metadata = {} if metadata is None else metadata
        self.reference = reference
        self._normalise_sizes()
        self.reads = [0] * len(self.image_sizes)
        self.validate()

    def __repr__(self) -> str:
        return (
            f"LazyFeatures({self.num_images} images, grid {tuple(self.grid_size)}, entries {self.layer_names}, "
            f"{self._dtype}, {self._device})"
        )

    def __eq__(self, other) -> bool:
        return self is other

    __hash__ = object.__hash__

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        return [(self.num_images, *shape) for shape in self._shapes]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def queries(self) -> list[torch.Tensor]:
        return self.in_memory().queries

    @property
    def keys(self) -> list[torch.Tensor]:
        return self.in_memory().keys

    def validate(self) -> None:
        """Raises `ValueError` when the sizes, names and entry shapes disagree (the values are checked as each image
        is read: `ValueError` for NaN or inf)."""
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"`grid_size` must be two positive ints (h, w), got {self.grid_size}.")
        if not self._shapes:
            raise ValueError("`shapes` must name at least one entry (layer, noise draw).")
        if not self.layer_names:
            self.layer_names = [f"layer_{i}" for i in range(len(self._shapes))]
        if len(self.layer_names) != len(self._shapes) or not all(isinstance(n, str) for n in self.layer_names):
            raise ValueError(f"`layer_names` {self.layer_names!r} must be {len(self._shapes)} str, one per entry.")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"`metadata` must be a dict, got {_describe(self.metadata)}.")
        if self.reference is not None and not isinstance(self.reference, CoSegmentationFeatures):
            raise ValueError(f"`reference` must be a CoSegmentationFeatures or None, got {_describe(self.reference)}.")
        n = self.grid_size[0] * self.grid_size[1]
        for i, shape in enumerate(self._shapes):
            if len(shape) != 3 or shape[1] != n or min(shape) < 1:
                raise ValueError(
                    f"entry {i} has image shape {shape}; expected (H, N={n}, d) for grid {self.grid_size}."
                )
        if not self._dtype.is_floating_point:
            raise ValueError(f"queries and keys must be float tensors, got dtype {self._dtype}.")
        if self.num_images < 2:
            raise ValueError(f"Features must hold at least 2 images, got {self.num_images}.")
        for i, size in enumerate(self.image_sizes):
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"`image_sizes[{i}]` must be a positive (height, width), got {size}.")

    def image(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Queries and keys of one image: two lists of `(H, N, d)` tensors (read, or kept from a recent read; do not
        modify them in place)."""
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} is outside the collection of {self.num_images} images.")
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        queries, keys = self._read(index)
        self.reads[index] += 1
        expected = [(*shape,) for shape in self._shapes]
        for name, tensors in (("queries", queries), ("keys", keys)):
            for entry, tensor in enumerate(tensors):
                if tuple(tensor.shape) != expected[entry]:
                    raise ValueError(
                        f"`{name}[{entry}]` of image {index} has shape {tuple(tensor.shape)}, expected {expected[entry]}."
                    )
                if self._check_values and not _all_finite(tensor):
                    raise ValueError(
                        f"`{name}[{entry}]` ({self.layer_names[entry]}) of image {index} contains NaN or inf; in "
                        "float16 the UNet can overflow: run it in float32 or bfloat16."
                    )
        if self._cache_bytes > 0:
            self._cache[index] = (queries, keys)
            size = _image_bytes(self._shapes, self._dtype)
            while len(self._cache) * size > self._cache_bytes and len(self._cache) > CACHE_MIN_IMAGES:
                self._cache.popitem(last=False)
        return queries, keys

    def forget(self) -> None:
        """Drops the images kept from recent reads."""
        self._cache.clear()

    def in_memory(self) -> CoSegmentationFeatures:
        """Every image read into ordinary in-memory features (`(M, H, N, d)` per entry; the reads are counted)."""
        images = [self.image(i) for i in range(self.num_images)]
        queries = [torch.stack([image[0][e] for image in images]) for e in range(len(self._shapes))]
        keys = [torch.stack([image[1][e] for image in images]) for e in range(len(self._shapes))]
        return CoSegmentationFeatures(
            queries,
            keys,
            self.grid_size,
            self.image_sizes,
            list(self.layer_names),
            dict(self.metadata),
            self.reference,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LazyFeatures":
        """Lazy features reading the same images, each moved to `device` and `dtype` as it is read."""
        target_device = self._device if device is None else torch.device(device)
        target_dtype = self._dtype if dtype is None else dtype

        def read(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            queries, keys = self.image(index)
            return (
                [q.to(device=target_device, dtype=target_dtype) for q in queries],
                [k.to(device=target_device, dtype=target_dtype) for k in keys],
            )

        return self.derived(read, dtype=target_dtype, device=target_device, reference=self.reference)

    def derived(
        self,
        read: Callable[[int], tuple[list[torch.Tensor], list[torch.Tensor]]],
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        reference: CoSegmentationFeatures | None = None,
    ) -> "LazyFeatures":
        """Lazy features of the same images, sizes and names, read by `read` (e.g. corrected as they are read)."""
        return lazy_view(self, read, dtype, device, reference, self._cache_bytes)

    def close(self) -> None:
        """Forgets the kept images and closes the files behind the reader, when it has any (it reopens them on the
        next read)."""
        self.forget()
        close = getattr(self._read, "close", None)
        if close is not None:
            close()


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. For float32 / float16 / bfloat16 one float64 sum, which finite values cannot
    overflow (a NaN or inf makes it NaN or inf): half the time of `torch.isfinite(tensor).all()` at SD 2.1's shapes."""
    if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) and tensor.numel() < 2**60:
        return math.isfinite(float(tensor.sum(dtype=torch.float64)))
    return bool(torch.isfinite(tensor).all())


def lazy_view(
    features: CoSegmentationFeatures,
    read: Callable[[int], tuple[list[torch.Tensor], list[torch.Tensor]]],
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    reference: CoSegmentationFeatures | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> LazyFeatures:
    """:class:`LazyFeatures` over the images of `features` (in memory or lazy), read by `read` (which typically reads
    `features.image(i)` and transforms it): same grid, sizes, names and metadata. The values are not checked again
    (`features` checked them: in-memory features when made, lazy ones as each image is read; `read` must keep them
    finite): at SD 2.1's shapes the check took 1.4 of the 1.75 s of 32 reads through the corrected view."""
    return LazyFeatures(
        read,
        [shape[1:] for shape in features.shapes],
        features.dtype if dtype is None else dtype,
        tuple(features.grid_size),
        list(features.image_sizes),
        list(features.layer_names),
        dict(features.metadata),
        reference,
        features.device if device is None else device,
        cache_bytes,
        check_values=False,
    )


def trim_memory() -> None:
    """Gives the memory the C allocator holds free back to the system (glibc's `malloc_trim`; nothing elsewhere).

    The analysis calls it after each pair and after the large steps: each pair's attention blocks are freed, but the
    small results it keeps sit between them in the allocator's heap, which then cannot shrink, and the process's
    memory grew by about 3 MiB per pair at N = 1024 (measured, BENCHMARKS.md (s)). A few milliseconds per call."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str) -> tuple[int, dict]:
    """The JSON header of a safetensors file and where its data starts: `(data_offset, header)`; `header` maps each
    tensor name to `{"dtype", "shape", "data_offsets"}` (offsets from `data_offset`) and `"__metadata__"` to the
    string metadata. Raises `ValueError` for a file that is not safetensors."""
    with open(path, "rb") as handle:
        size = handle.read(8)
        length = int.from_bytes(size, "little") if len(size) == 8 else -1
        if not 2 <= length <= _HEADER_LIMIT:
            raise ValueError(f"`{path}` is not a safetensors file (header length {length}).")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"`{path}` is not a safetensors file: its header is not JSON ({error}).") from error
    if not isinstance(header, dict):
        raise ValueError(f"`{path}` is not a safetensors file: its header is not a JSON object.")
    return 8 + length, header


class _MappedFile:
    """One safetensors file holding the `(B, H, N, d)` queries and keys of `B` images, memory-mapped on the first
    read. Reading an image copies its bytes out of the mapping, then releases the mapping's pages
    (`madvise(MADV_DONTNEED)` where the platform has it), so the pages read do not stay in the process's memory."""

    def __init__(self, path: str, entries: list[tuple[str, str]], data_offset: int, header: dict):
        self.path = path
        self._offset, self._map = data_offset, None
        self.layout = []  # per entry: ((begin, end) of queries, (begin, end) of keys), dtype, (B, H, N, d)
        shapes, dtypes = set(), set()
        for query_name, key_name in entries:
            spans = []
            for name in (query_name, key_name):
                info = header.get(name)
                if not isinstance(info, dict) or info.get("dtype") not in _DTYPES or len(info.get("shape", ())) != 4:
                    raise ValueError(f"`{path}`: tensor {name!r} is missing or not a (B, H, N, d) float tensor.")
                begin, end = info["data_offsets"]
                spans.append((int(begin), int(end)))
                shapes.add((name.split(".")[-1], tuple(info["shape"])))
                dtypes.add(info["dtype"])
            self.layout.append((spans, _DTYPES[header[query_name]["dtype"]], tuple(header[query_name]["shape"])))
        if len(dtypes) != 1:
            raise ValueError(f"`{path}`: queries and keys must share one dtype, got {sorted(dtypes)}.")
        counts = {shape[0] for _, _, shape in self.layout}
        if len(counts) != 1:
            raise ValueError(f"`{path}`: every entry must hold the same images, got counts {sorted(counts)}.")
        for spans, dtype, shape in self.layout:
            size = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            if any(end - begin != size for begin, end in spans):
                raise ValueError(f"`{path}`: a tensor's byte range does not match its shape {shape}.")
        self.count = counts.pop()
        self.dtype = self.layout[0][1]
        self.shapes = [shape[1:] for _, _, shape in self.layout]

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _copy(self, begin: int, end: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        mapping = self._mapping()
        start = self._offset + begin
        if start + end - begin > len(mapping):
            raise ValueError(f"`{self.path}` is truncated: it ends before byte {start + end - begin}.")
        buffer = np.empty(end - begin, dtype=np.uint8)
        buffer[:] = np.frombuffer(mapping, dtype=np.uint8, count=end - begin, offset=start)
        if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            page = start - start % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, page, start + (end - begin) - page)
        return torch.from_numpy(buffer).view(dtype).view(shape)

    def read(self, local: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        queries, keys = [], []
        for spans, dtype, shape in self.layout:
            step = (spans[0][1] - spans[0][0]) // shape[0]
            for (begin, _), out in zip(spans, (queries, keys)):
                out.append(self._copy(begin + local * step, begin + (local + 1) * step, dtype, shape[1:]))
        return queries, keys

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class _Reader:
    """Image `i` from the file that holds it: `places[i]` is `(file, position in the file)`."""

    def __init__(self, files: list[_MappedFile], places: list[tuple[int, int]], device: torch.device):
        self.files, self.places, self.device = files, places, device

    def __call__(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        file, position = self.places[index]
        queries, keys = self.files[file].read(position)
        if self.device.type != "cpu":
            queries, keys = [q.to(self.device) for q in queries], [k.to(self.device) for k in keys]
        return queries, keys

    def close(self) -> None:
        for file in self.files:
            file.close()


def _load_reference(path: str, names: set[str], meta: dict, device: torch.device) -> CoSegmentationFeatures:
    """The reference saved in a features file (`reference.*` tensors and header entries), in memory."""
    from safetensors import safe_open

    count = len([n for n in names if n.startswith(f"{REFERENCE_PREFIX}queries.")])
    with safe_open(path, framework="pt", device=str(device)) as handle:
        tensors = {name: handle.get_tensor(name) for pair in _entry_names(count, REFERENCE_PREFIX) for name in pair}
    return CoSegmentationFeatures(
        [tensors[q] for q, _ in _entry_names(count, REFERENCE_PREFIX)],
        [tensors[k] for _, k in _entry_names(count, REFERENCE_PREFIX)],
        json.loads(meta[f"{REFERENCE_PREFIX}grid_size"]),
        json.loads(meta[f"{REFERENCE_PREFIX}image_sizes"]),
        json.loads(meta[f"{REFERENCE_PREFIX}layer_names"]),
        json.loads(meta.get(f"{REFERENCE_PREFIX}metadata", "{}")),
    )


def open_features_file(
    path: str | os.PathLike, device: torch.device | str = "cpu", cache_bytes: int = DEFAULT_CACHE_BYTES
) -> LazyFeatures:
    """A file written by :meth:`CoSegmentationFeatures.save`, memory-mapped: the queries and keys stay on disk and
    each image is read when a step needs it (`CoSegmentationFeatures.load(path, mmap=True)`). The reference saved
    with them (small) is loaded into memory.

    Raises:
        `FileNotFoundError`, or `ValueError` when the file is not a cosegment features file (as :meth:`load`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`path` {path!r} is not a file.")
    device = torch.device(device)
    offset, header = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FEATURES_FORMAT:
        raise ValueError(f"`{path}` is not a cosegment features file (format {meta.get('format')!r}).")
    names = {name for name in header if name != "__metadata__"}
    count = len([n for n in names if n.startswith("queries.")])
    reference_count = len([n for n in names if n.startswith(f"{REFERENCE_PREFIX}queries.")])
    expected = {n for pair in _entry_names(count) + _entry_names(reference_count, REFERENCE_PREFIX) for n in pair}
    if names != expected or count == 0:
        raise ValueError(
            f"`{path}` is a damaged cosegment features file: tensors {sorted(names)}, expected {sorted(expected)}."
        )
    try:
        file = _MappedFile(path, _entry_names(count), offset, header)
        image_sizes = json.loads(meta["image_sizes"])
        if len(image_sizes) != file.count:
            raise ValueError(f"{len(image_sizes)} image sizes for {file.count} images")
        reference = _load_reference(path, names, meta, device) if reference_count else None
        return LazyFeatures(
            _Reader([file], [(0, i) for i in range(file.count)], device),
            file.shapes,
            file.dtype,
            tuple(json.loads(meta["grid_size"])),
            image_sizes,
            json.loads(meta["layer_names"]),
            json.loads(meta.get("metadata", "{}")),
            reference,
            device,
            cache_bytes,
        )
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ValueError) and str(error).startswith(f"`{path}`"):
            raise
        raise ValueError(f"`{path}` is a damaged cosegment features file: {error}") from error


class FeatureStore:
    """A folder of captured features written batch by batch, read image by image.

    Layout: `store.json` (format, number of images, token grid, entry names, capture metadata), one safetensors
    *shard* per written batch (`images-<first>-<last>.safetensors`: the batch's `(B, H, N, d)` queries and keys per
    entry, and in its header the image indices it holds, their sizes, the grid and the entry names), and
    `reference.safetensors` when a reference was saved. Each shard is written atomically and on its own, so a capture
    writes as it goes, several processes may write their own batches into one store, an interrupted capture leaves
    whole shards only, and a resumed one captures :meth:`missing` images. :meth:`features` reads the shards as one
    :class:`LazyFeatures` (memory-mapped; nothing is read until an image is needed).

    Example:
        ```py
        store = FeatureStore.create("out/features", num_images=1000, grid_size=(32, 32), layer_names=names)
        for first in range(0, 1000, 8):  # one captured batch at a time
            batch = pipe.capture(...)  # CoSegmentationFeatures of images first .. first + 7
            store.write(first, batch.queries, batch.keys, batch.image_sizes)
        features = store.features()  # or CoSegmentationFeatures.load("out/features", mmap=True)
        output = analyze_features(features, partners=5)
        ```
    """

    def __init__(
        self, folder: str | os.PathLike, read_header: Callable[[str], tuple[int, dict]] | None = None
    ) -> None:
        folder = os.fspath(folder)
        # How a shard's header is read: `read_safetensors_header`, or a run's reader that reads each once (`RunState`)
        self._header = read_safetensors_header if read_header is None else read_header
        index = os.path.join(folder, STORE_INDEX)
        if not os.path.isfile(index):
            raise FileNotFoundError(f"`folder` {folder!r} holds no feature store (no {STORE_INDEX}).")
        try:
            with open(index, encoding="utf-8") as handle:
                document = json.load(handle)
            if document.get("format") != STORE_FORMAT:
                raise ValueError(f"format {document.get('format')!r}, expected {STORE_FORMAT!r}")
            self.num_images = int(document["num_images"])
            self.grid_size = tuple(int(v) for v in document["grid_size"])
            self.layer_names = [str(name) for name in document["layer_names"]]
            self.metadata = dict(document.get("metadata") or {})
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"`{index}` is not a cosegment feature store index: {error}") from error
        self.folder = folder

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        num_images: int,
        grid_size: tuple[int, int],
        layer_names: Sequence[str],
        metadata: dict | None = None,
    ) -> "FeatureStore":
        """A new store in `folder` (made if absent) for `num_images` images, or the store already there when it was
        made with the same number of images, grid, entry names and metadata (to resume a capture).

        Raises:
            `ValueError` naming the argument that differs from the store already in `folder`.
        """
        if not _is_count(num_images) or num_images < 2:
            raise ValueError(f"`num_images` must be an int >= 2, got {_describe(num_images)}.")
        try:
            grid = tuple(_exact_int(v) for v in grid_size)
        except (TypeError, ValueError) as error:
            raise ValueError(f"`grid_size` must be two positive ints (h, w), got {_describe(grid_size)}.") from error
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"`grid_size` must be two positive ints (h, w), got {grid_size!r}.")
        if isinstance(layer_names, str) or not layer_names or not all(isinstance(n, str) for n in layer_names):
            raise ValueError(f"`layer_names` must be a non-empty list of str, got {_describe(layer_names)}.")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise ValueError(f"`metadata` must be a dict, got {_describe(metadata)}.")
        document = {
            "format": STORE_FORMAT,
            "num_images": int(num_images),
            "grid_size": list(grid),
            "layer_names": list(layer_names),
            "metadata": json.loads(json.dumps(metadata)),
        }
        folder = os.fspath(folder)
        if os.path.isfile(os.path.join(folder, STORE_INDEX)):
            store = cls(folder)
            for name, value in (("num_images", store.num_images), ("grid_size", list(store.grid_size))):
                if value != document[name]:
                    raise ValueError(f"`{name}` {document[name]!r} differs from the store in {folder!r}: {value!r}.")
            for name, value in (("layer_names", store.layer_names), ("metadata", store.metadata)):
                if value != document[name]:
                    raise ValueError(f"`{name}` {document[name]!r} differs from the store in {folder!r}: {value!r}.")
            return store
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, STORE_INDEX), document, indent=1)
        return cls(folder)

    @classmethod
    def from_features(
        cls, folder: str | os.PathLike, features: CoSegmentationFeatures, images_per_shard: int = 64
    ) -> "FeatureStore":
        """A store holding `features` (in memory or lazy), `images_per_shard` images per shard, with their
        reference when they carry one."""
        if not _is_count(images_per_shard) or images_per_shard < 1:
            raise ValueError(f"`images_per_shard` must be a positive int, got {_describe(images_per_shard)}.")
        store = cls.create(folder, features.num_images, features.grid_size, features.layer_names, features.metadata)
        for first in range(0, features.num_images, images_per_shard):
            images = list(range(first, min(first + images_per_shard, features.num_images)))
            read = [features.image(i) for i in images]
            store.write(
                images,
                [torch.stack([q[e] for q, _ in read]) for e in range(len(features.layer_names))],
                [torch.stack([k[e] for _, k in read]) for e in range(len(features.layer_names))],
                [features.image_sizes[i] for i in images],
            )
        if features.reference is not None:
            store.save_reference(features.reference)
        return store

    def write(
        self,
        images: int | Sequence[int],
        queries: Sequence[torch.Tensor],
        keys: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> str:
        """Writes one batch as a shard, atomically; returns its path. A shard holding the same first and last image
        is replaced.

        Args:
            images (`int` or `list[int]`): the batch's image indices in the collection, or the first of `B`
                consecutive ones.
            queries, keys (`list[torch.Tensor]`): one `(B, H, N, d)` tensor per entry (layer, noise draw), in the
                store's entry order.
            image_sizes (`list[tuple[int, int]]`): each image's original `(height, width)`.
        """
        queries, keys = list(queries), list(keys)
        if len(queries) != len(self.layer_names) or len(keys) != len(self.layer_names):
            raise ValueError(
                f"`queries` and `keys` must hold one tensor per entry ({len(self.layer_names)}: {self.layer_names}), "
                f"got {len(queries)} and {len(keys)}."
            )
        count = queries[0].shape[0] if isinstance(queries[0], torch.Tensor) and queries[0].ndim == 4 else -1
        indices = list(range(images, images + max(count, 0))) if _is_count(images) else images
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
            raise ValueError(f"`images` must be an image index or a list of them, got {_describe(images)}.")
        if not all(_is_count(i) and i < self.num_images for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"`images` must be distinct indices in [0, {self.num_images}), got {_describe(images)}.")
        indices = [int(i) for i in indices]
        image_sizes = _check_batch(self, indices, queries, keys, image_sizes)
        tensors = {}
        for i, (q, k) in enumerate(zip(queries, keys)):
            tensors[f"queries.{i}"] = q.detach().contiguous().cpu()
            tensors[f"keys.{i}"] = k.detach().contiguous().cpu()
        header = {
            "format": SHARD_FORMAT,
            "images": json.dumps(indices),
            "image_sizes": json.dumps([[int(v) for v in size] for size in image_sizes]),
            "grid_size": json.dumps(list(self.grid_size)),
            "layer_names": json.dumps(self.layer_names),
        }
        path = os.path.join(self.folder, f"images-{min(indices):08d}-{max(indices):08d}.safetensors")
        save_safetensors(tensors, path, metadata=header)
        return path

    def shards(self) -> list[tuple[str, list[int]]]:
        """The shards written so far: `(path, image indices)` each, by file name (temporary files of an interrupted
        write are skipped)."""
        found = []
        for name in sorted(os.listdir(self.folder)):
            if is_temporary(name) or not _SHARD_NAME.match(name):
                continue
            path = os.path.join(self.folder, name)
            meta = self._header(path)[1].get("__metadata__") or {}
            if meta.get("format") != SHARD_FORMAT:
                raise ValueError(f"`{path}` is not a cosegment feature shard (format {meta.get('format')!r}).")
            try:
                images = [int(i) for i in json.loads(meta["images"])]
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"`{path}` is a damaged cosegment feature shard: {error}") from error
            found.append((path, images))
        return found

    def remove_damaged(self) -> list[str]:
        """Removes the shards whose header cannot be read (e.g. a disk that filled up); returns their paths. Their
        images are then :meth:`missing` (to capture again)."""
        removed = []
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            if is_temporary(name) or not _SHARD_NAME.match(name):
                continue
            try:
                meta = self._header(path)[1].get("__metadata__") or {}
                if meta.get("format") != SHARD_FORMAT:
                    raise ValueError(meta.get("format"))
                [int(i) for i in json.loads(meta["images"])]
            except (KeyError, TypeError, ValueError):
                os.remove(path)
                removed.append(path)
        return removed

    def captured(self) -> np.ndarray:
        """`(M,)` bool: the images some shard holds."""
        held = np.zeros(self.num_images, dtype=bool)
        for _, images in self.shards():
            held[[i for i in images if 0 <= i < self.num_images]] = True
        return held

    def missing(self) -> list[int]:
        """The images no shard holds yet, ascending (what a resumed capture still has to capture)."""
        return np.flatnonzero(~self.captured()).tolist()

    def save_reference(self, reference: CoSegmentationFeatures) -> None:
        """Saves the reference (content-free captures of the same model, layers and grid) beside the shards."""
        if not isinstance(reference, CoSegmentationFeatures):
            raise TypeError(f"`reference` must be a CoSegmentationFeatures, got {_describe(reference)}.")
        reference.save(os.path.join(self.folder, STORE_REFERENCE))

    @property
    def reference(self) -> CoSegmentationFeatures | None:
        """The saved reference, or `None`."""
        path = os.path.join(self.folder, STORE_REFERENCE)
        return CoSegmentationFeatures.load(path) if os.path.isfile(path) else None

    def features(self, device: torch.device | str = "cpu", cache_bytes: int = DEFAULT_CACHE_BYTES) -> LazyFeatures:
        """Every image of the store as one :class:`LazyFeatures` (shards memory-mapped, images read when needed),
        with the saved reference.

        Raises:
            `ValueError` when images are missing (listing the first ones: resume the capture) or held by two shards,
            or when a shard disagrees with the store (grid, entries, shapes, dtype).
        """
        device = torch.device(device)
        files, places = [], [None] * self.num_images
        sizes: list = [None] * self.num_images
        for path, images in self.shards():
            offset, header = self._header(path)
            meta = header.get("__metadata__") or {}
            try:
                file = _MappedFile(path, _entry_names(len(self.layer_names)), offset, header)
                image_sizes = json.loads(meta["image_sizes"])
                shard_grid, shard_names = json.loads(meta["grid_size"]), json.loads(meta["layer_names"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"`{path}` is a damaged cosegment feature shard: {error}") from error
            if tuple(shard_grid) != self.grid_size or shard_names != self.layer_names:
                raise ValueError(f"`{path}` has grid {shard_grid} and entries {shard_names}, the store another.")
            if file.count != len(images) or len(image_sizes) != len(images) or len(header) - 1 != 2 * len(shard_names):
                raise ValueError(f"`{path}` holds {file.count} images for {len(images)} indices: a damaged shard.")
            if files and (file.shapes, file.dtype) != (files[0].shapes, files[0].dtype):
                raise ValueError(f"`{path}` has shapes {file.shapes} {file.dtype}, `{files[0].path}` another.")
            for position, (image, size) in enumerate(zip(images, image_sizes)):
                if places[image] is not None:
                    raise ValueError(
                        f"image {image} is held by two shards: `{files[places[image][0]].path}`, `{path}`."
                    )
                places[image], sizes[image] = (len(files), position), size
            files.append(file)
        missing = [i for i, place in enumerate(places) if place is None]
        if missing:
            raise ValueError(
                f"the store in {self.folder!r} lacks {len(missing)} of its {self.num_images} images "
                f"({missing[:5]}{' ...' if len(missing) > 5 else ''}): capture them first (`missing()`)."
            )
        return LazyFeatures(
            _Reader(files, places, device),
            files[0].shapes,
            files[0].dtype,
            self.grid_size,
            sizes,
            list(self.layer_names),
            dict(self.metadata),
            self.reference,
            device,
            cache_bytes,
        )


def _check_batch(
    store: FeatureStore,
    indices: list[int],
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Checks one batch for :meth:`FeatureStore.write`: `(B, H, N, d)` float tensors, finite, one size per image."""
    n = store.grid_size[0] * store.grid_size[1]
    for name, tensors in (("queries", queries), ("keys", keys)):
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[0] != len(indices) or t.shape[2] != n:
                raise ValueError(
                    f"`{name}[{i}]` must be a ({len(indices)}, H, {n}, d) tensor (one row per image of `images`, the "
                    f"store's grid {store.grid_size}), got {_describe(t)}."
                )
            if t.shape != queries[i].shape or t.dtype != queries[0].dtype or not t.dtype.is_floating_point:
                raise ValueError(f"`{name}[{i}]` {tuple(t.shape)} {t.dtype} must match `queries[{i}]` and be float.")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"`{name}[{i}]` ({store.layer_names[i]}) contains NaN or inf.")
    try:
        sizes = [tuple(_exact_int(v) for v in size) for size in image_sizes]
    except (TypeError, ValueError) as error:
        raise ValueError(f"`image_sizes` must be (height, width) int pairs, got {_describe(image_sizes)}.") from error
    if len(sizes) != len(indices) or any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise ValueError(f"`image_sizes` must hold one positive (height, width) per image, got {image_sizes!r}.")
    return sizes
