# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""The pair graph and the per-pair steps (DESIGN steps 4-8a): which pairs are analysed (:func:`partner_pairs`), the
two passes of one pair (:func:`analyze_pair`: cross self-attention, maps, neighbourhood check, selection, growth),
the pairs of a collection (:func:`analyze_pairs`, the part to split between processes) and the join of pair analyses
made elsewhere (:func:`join_pair_analyses`). This is where the time goes.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from .features import CoSegmentationFeatures, PairAnalysis, PassResult, _is_int
from .orientation import check_orientation_arguments, orient_corrected
from .settings import THRESHOLD_NAMES, AnalysisSettings, _check_features, check_analysis_settings, correct_features
from .store import trim_memory
from .transfer import _peak_hook
from .utils.correspondence import (
    PassStatistics,
    SelectionThresholds,
    attention_row_statistics,
    auto_thresholds,
    grow_matches,
    paper_thresholds,
    pass_statistics,
    select_matches,
)
from .utils.images import describe as _describe


def _every_pair(num_images: int) -> list[tuple[int, int]]:
    """Every unordered pair `(s, t)`, `s < t`, in order."""
    return [(s, t) for s in range(num_images) for t in range(s + 1, num_images)]


# The pair graph's search holds at most this many bytes of similarities (float64) at once: row blocks of the `M x M`
# matrix (64 MiB: one block up to M = 2896, 8 rows at M = 1,000,000).
PARTNER_BLOCK_BYTES = 2**26


def image_means(features: CoSegmentationFeatures, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per captured entry, each image's mean unit query (heads concatenated): one `(len(indices), H * d)` float32
    tensor per entry, one read per image of `indices` (default: every image). What :func:`image_descriptors` needs of
    each image, so that processes can each compute their images' share and gather them (`cosegment --partners`)."""
    indices = range(features.num_images) if indices is None else indices
    if len(indices) == 0:
        raise ValueError("`indices` must name one image or more, got none.")
    means = [[] for _ in features.layer_names]
    for position, index in enumerate(indices):
        queries, _ = features.image(index)
        for entry, query in enumerate(queries):
            tokens = query.detach().float().permute(1, 0, 2).flatten(1)  # (N, H * d)
            means[entry].append(torch.nn.functional.normalize(tokens, dim=-1).mean(dim=0))
        if position % 32 == 31:  # the reads' freed buffers, between the means, back to the system
            trim_memory()
    trim_memory()
    return [torch.stack(entry) for entry in means]


def image_descriptors(features: CoSegmentationFeatures, means: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """A cheap global descriptor per image, `(M, D)` float32 with unit rows (zero rows when every image is alike).

    Per captured layer: each token's query (heads concatenated, `H * d`) scaled to unit length, averaged over the
    image's tokens (:func:`image_means`; or `means`, one `(M, H * d)` tensor per entry, as it returns them), minus the
    mean of that over the collection (what every image has alike, e.g. a positional component, cancels), scaled to
    unit length; the layers' descriptors concatenated, each weighted `1 / sqrt(layers)`, and the whole scaled to unit
    length. Two images' cosine similarity is the dot product of their rows. Computed image by image (one read of each
    image), `O(M N H d)`, next to the `O(N^2 H d)` of one pair's attention; holds `M x D` floats (`D = layers * H *
    d`: 1,920 for SD 2.1's default layers).
    """
    means = image_means(features) if means is None else means
    parts = []
    for mean in means:  # (M, H * d)
        mean = mean - mean.mean(dim=0, keepdim=True)
        parts.append(torch.nn.functional.normalize(mean, dim=-1) / math.sqrt(len(means)))
    return torch.nn.functional.normalize(torch.cat(parts, dim=1).cpu(), dim=-1)


def _similarity_rows(descriptors: torch.Tensor, start: int, stop: int, symmetric: bool = False) -> torch.Tensor:
    """`(stop - start, M)` cosine similarities of images `start .. stop - 1` to every image, `-inf` with themselves.
    `symmetric`, when the block is the whole matrix: each pair's value is the one above the diagonal (`(s, t)`,
    `s < t`) in both places (a matrix product need not be symmetric to the last bit)."""
    block = descriptors[start:stop] @ descriptors.T
    if symmetric and stop - start == descriptors.shape[0]:
        block = torch.where(torch.ones_like(block, dtype=torch.bool).triu(1), block, block.T)
    rows = torch.arange(stop - start)
    block[rows, rows + start] = -math.inf
    return block


def _row_blocks(num_images: int) -> list[tuple[int, int]]:
    step = max(1, PARTNER_BLOCK_BYTES // (8 * num_images))
    return [(start, min(start + step, num_images)) for start in range(0, num_images, step)]


def _nearest(similarity: torch.Tensor, count: int) -> torch.Tensor:
    """`(B, M)` bool: in each row the `count` largest similarities, ties to the lower index (exactly the first
    `count` of the row sorted by decreasing similarity, then index)."""
    kth = similarity.topk(count, dim=1).values[:, -1:]
    above = similarity > kth
    equal = similarity == kth
    need = count - above.sum(dim=1, keepdim=True)
    return above | (equal & (equal.cumsum(dim=1) <= need))


def _bridges(descriptors: torch.Tensor, pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The pairs that join the components of `pairs` into one: Kruskal's rule (the most similar pair of images in two
    different components first, ties to the lower indices), found component by component (Boruvka: each component's
    most similar pair to another joins it, until one is left; with a strict order of the pairs this is the same tree)
    with the similarities in row blocks, never the whole matrix."""
    num_images = descriptors.shape[0]
    component = list(range(num_images))  # union-find: each image's representative

    def root(i: int) -> int:
        while component[i] != i:
            component[i] = component[component[i]]
            i = component[i]
        return i

    for s, t in pairs:
        component[root(s)] = root(t)
    added = set()
    while True:
        labels = torch.tensor([root(i) for i in range(num_images)])
        if bool((labels == labels[0]).all()):
            return added
        best = {}  # per component: (-similarity, s, t) of its most similar pair leaving it
        for start, stop in _row_blocks(num_images):
            similarity = _similarity_rows(descriptors, start, stop, symmetric=True)
            similarity[labels[start:stop, None] == labels[None, :]] = -math.inf
            values, partner = similarity.max(dim=1)  # ties: the first (lowest) index
            for row, (value, j) in enumerate(zip(values.tolist(), partner.tolist())):
                i = start + row
                key = (-value, min(i, j), max(i, j))
                if value > -math.inf and key < best.get(int(labels[i]), (math.inf,)):
                    best[int(labels[i])] = key
        for _, s, t in sorted(best.values()):
            if root(s) != root(t):
                component[root(s)] = root(t)
                added.add((s, t))


def partner_pairs(
    features: CoSegmentationFeatures, partners: int | None, means: Sequence[torch.Tensor] | None = None
) -> list[tuple[int, int]]:
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
    :func:`correct_features` (the analysis and the CLI's split between processes use the same graph).

    The search is exact and never holds the `M x M` similarities: rows in blocks of `PARTNER_BLOCK_BYTES` (one block
    up to M = 2896), `O(M^2 D)` time for the neighbours and again per round of bridges (a few). Past about 10^5
    images that time (hours on a CPU) calls for an approximate nearest-neighbour index instead (README, "Large
    collections"). `means`: :func:`image_means` of every image when already computed (the command's processes each
    compute their own images' and gather them), else read here."""
    num_images = features.num_images
    if partners is None or partners >= num_images - 1:
        return _every_pair(num_images)
    descriptors = image_descriptors(features, means).double()
    pairs = set()
    for start, stop in _row_blocks(num_images):
        rows, columns = torch.nonzero(_nearest(_similarity_rows(descriptors, start, stop), partners), as_tuple=True)
        pairs.update((min(i, j), max(i, j)) for i, j in zip((rows + start).tolist(), columns.tolist()))
    return sorted(pairs | _bridges(descriptors, pairs))


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


def analyze_pair(
    features: CoSegmentationFeatures, source: int, target: int, settings: AnalysisSettings, device: torch.device
) -> PairAnalysis:
    """Steps 4-8a for one pair `source < target` of checked features and settings: both passes."""
    grid = tuple(features.grid_size)
    num_tokens = grid[0] * grid[1]
    queries_s, keys_s = features.image(source)  # read one image at a time: features may be on disk
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


def compact_pass(result: PassResult) -> PassResult:
    """`result` without the statistics that only the selection of steps 7-8a reads (`target_entropy`, `spread`,
    `collapse`: left empty, `(0,)`); steps 8b-11 read `forward`, `inverse_error`, `keep`, `max_prob`,
    `inverse_entropy` and `peak_points`. 3 of a pass's 9 `(N,)` tensors' 41 KiB at N = 1024: the per-pair results
    are what grows with the collection (BENCHMARKS.md (t2))."""
    stats = result.statistics
    kept = [
        stats.forward,
        stats.inverse_error,
        result.max_prob,
        result.inverse_entropy,
        result.peak_points,
        result.keep,
    ]
    kept = _packed([t for t in kept if t is not None])  # widest dtype first, so that each view is aligned
    forward, inverse_error, max_prob, inverse_entropy = kept[:4]
    empty = stats.target_entropy[:0].clone()
    statistics = replace(
        stats, forward=forward, inverse_error=inverse_error, target_entropy=empty, spread=empty, collapse=empty
    )
    peak_points = None if result.peak_points is None else kept[4]
    return replace(
        result,
        statistics=statistics,
        keep=kept[-1],
        max_prob=max_prob,
        inverse_entropy=inverse_entropy,
        peak_points=peak_points,
    )


def _packed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (contiguous, one device) as views of one buffer: one allocation instead of several small
    ones, which a heap shared with large transient buffers does not give back (measured: a pair's results took
    2.3 times their size in resident memory when each tensor was its own allocation)."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    buffer = torch.cat(flat)
    views, start = [], 0
    for tensor, part in zip(tensors, flat):
        views.append(buffer[start : start + part.numel()].view(tensor.dtype).view(tensor.shape))
        start += part.numel()
    return views


def _analyze_pair_list(
    features: CoSegmentationFeatures,
    pairs: list[tuple[int, int]],
    settings: AnalysisSettings,
    device: torch.device,
    progress: Callable[[int], Any] | None,
    compact: bool = False,
) -> list[PairAnalysis]:
    """:func:`analyze_pair` for each of `pairs` (checked), naming the pair in any error. `compact`: each pass keeps
    only what steps 8b-11 read (:func:`compact_pass`), for the analysis that joins them in this process."""
    analyses = []
    for s, t in pairs:
        try:
            analysis = analyze_pair(features, s, t, settings, device)
        except Exception as error:  # name the pair; keep the type where it can take a message
            raise _in_pair(error, s, t) from error
        if compact:
            analysis = replace(analysis, passes=tuple(compact_pass(result) for result in analysis.passes))
        analyses.append(analysis)
        trim_memory()  # the pair's attention blocks, freed, go back to the system
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
    mirrored: CoSegmentationFeatures | None = None,
    orientations: Sequence[bool] | torch.Tensor | None = None,
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
        mirrored, orientations: as in :func:`analyze_features`: each pair analysed in the orientation decided (from
            every pair, or the partner graph with `partners`) or given. To split between processes, decide once
            (:func:`~cosegment.orientation.collection_orientations`) and pass the same `orientations` to every
            process and to :func:`analyze_features`.

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
    mirrored, orientations = check_orientation_arguments(features, mirrored, orientations)
    graph = partner_pairs(features, partners) if pairs is None or mirrored is not None else None
    pairs = graph if pairs is None else _check_pair_list(pairs, features.num_images)
    corrected = correct_features(features, settings)
    if mirrored is not None:  # issue 27: the orientation decided over the pair graph (or given)
        corrected = orient_corrected(corrected, mirrored, orientations, settings, graph, device)[0]
    return _analyze_pair_list(corrected, pairs, settings, device, progress)


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
