# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""The analysis of captured features (DESIGN steps 4-11) in one call, :func:`analyze_features`. No UNet here: it runs
on saved features alone.

Read :func:`analyze_checked_features` first: it is the method's steps 4-11 in order, one call each. A step's results
travel as [`PassResult`] objects (one per pass `source -> target`), changed with `dataclasses.replace`. The steps
live beside this file, in modules named for them:

- `features.py`: what the steps hand each other (captured features, pass and pair results, the output);
- `settings.py`: the checked settings, and the feature corrections before step 4 (step 3b);
- `pairs.py`: the pair graph and the per-pair steps 4-8a;
- `matches.py`: outlier images, steps 8b-8c, each pair's correspondences (step 8) and the hit counts (step 9);
- `transfer.py`: points below the token grid (refined matches, :func:`transfer_points`);
- `parts.py`: clustering and co-segmentation (steps 10-11).

Every name they define is also importable from here, as before they moved (`from cosegment.analysis import X`).

diffusers' loader copies these modules beside `pipeline_cosegment.py` only because that file imports each of them
and every `.utils.x` module they import (DESIGN section 3): a new module, or a new `.utils` import in one of them,
needs an import there too.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .features import (  # noqa: F401 (re-exported: importable from here as before the split)
    FEATURES_FORMAT,
    MIRRORED_PREFIX,
    REFERENCE_PREFIX,
    CoSegmentationFeatures,
    CoSegmentationPipelineOutput,
    PairAnalysis,
    PairCorrespondence,
    PassResult,
    _exact_int,
    _image_features,
    _is_int,
    check_mirrored,
)
from .matches import (  # noqa: F401 (re-exported: importable from here as before the split)
    SHARING_CUT,
    _compose,
    check_consistency,
    confirm_by_third_images,
    find_outliers,
    hit_counts,
    mean_pass_maps,
    pair_correspondences,
    sharing_scores,
    split_outlier_passes,
)
from .orientation import (  # noqa: F401 (re-exported)
    OrientationDecision,
    check_orientation_arguments,
    check_orientations,
    collection_orientations,
    decide_checked,
    decide_orientations,
    orient_corrected,
    oriented_features,
    unflip_output,
)
from .pairs import (  # noqa: F401 (re-exported: importable from here as before the split)
    _analyze_pair_list,
    _check_pair_list,
    _every_pair,
    _in_pair,
    _pass_thresholds,
    analyze_pair,
    analyze_pairs,
    image_descriptors,
    join_pair_analyses,
    partner_pairs,
)
from .parts import (  # noqa: F401 (re-exported: importable from here as before the split)
    ATTACHED_SHARE,
    KEY_ITERATIONS,
    MASKS_IN_MEMORY_BYTES,
    MAX_CLUSTER_IMAGES,
    MAX_EMBEDDING_IMAGES,
    MAX_PARTS,
    MIN_REGION_TOKENS,
    SEGMENTATION_REFINEMENTS,
    STEP11_ROWS_BYTES,
    TYPICAL_POINT_SHARE,
    LazyMasks,
    PartModel,
    _embedding_and_mass,
    _keep_points,
    assign_points,
    attached_points,
    cluster_collection,
    cluster_hits,
    collection_embedding,
    key_descriptors,
    link_by_correspondences,
    part_divergences,
    part_keypoints,
    refine_by_keys,
    segment_parts,
    typical_points,
)
from .settings import (  # noqa: F401 (re-exported: importable from here as before the split)
    HIGH_NORM_MADS,
    HIGH_NORM_RULE,
    OUTPUT_TYPES,
    SELECTION_PRESETS,
    THRESHOLD_NAMES,
    AnalysisSettings,
    _check_features,
    _check_partners,
    _is_limit,
    _layer_of,
    check_analysis_settings,
    check_reference,
    correct_features,
    features_digest,
    settings_with_reference,
)
from .store import trim_memory
from .transfer import (  # noqa: F401 (re-exported: importable from here as before the split)
    REFINE_FIELD_RADIUS,
    REFINE_RADIUS,
    REFINE_TEMPERATURE,
    TRANSFER_FIELD_RADIUS,
    TRANSFER_FIELD_SIGMA,
    _check_image_index,
    _peak_hook,
    _point_field,
    _point_queries,
    _refined_rows,
    refine_correspondences,
    refined_pass_points,
    transfer_points,
)
from .utils.correspondence import (  # noqa: F401 (re-exported)
    PassStatistics,
    SelectionThresholds,
    attention_row_statistics,
    auto_thresholds,
    cross_attention_probs,
    default_chunk_size,
    field_consistent,
    grow_matches,
    paper_thresholds,
    pass_statistics,
    reverse_consistent,
    select_matches,
)
from .utils.files import save_safetensors  # noqa: F401 (re-exported)
from .utils.images import describe as _describe  # noqa: F401 (re-exported)
from .utils.joining import (  # noqa: F401 (re-exported)
    confirm_matches,
    kept_map,
    match_scores,
    merge_passes,
    token_centres_in_pixels,
)
from .utils.reference import (  # noqa: F401 (re-exported)
    inpaint_high_norm_tokens,
    reference_offsets,
    remove_offsets,
)
from .utils.refinement import (  # noqa: F401 (re-exported)
    bilinear_weights,
    grid_to_pixels,
    local_affine_field,
    pixels_to_grid,
    robust_affine_at,
    window_mass,
    window_offsets,
    window_soft_argmax,
)
from .utils.segmentation import (  # noqa: F401 (re-exported)
    assign_parts,
    attention_rows,
    background_threshold_from_kl,
    factored_spectral_clusters,
    grow_by_one_token,
    parts_and_divergences,
    remove_isolated,
    upsample_assignment,
)


def _convert_output(output: CoSegmentationPipelineOutput, output_type: str) -> CoSegmentationPipelineOutput:
    """Moves every tensor of the output to the CPU, as numpy arrays for `output_type="np"`."""

    def convert(value):
        if isinstance(value, LazyMasks):
            return value.recast(output_type=output_type)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            return value.numpy() if output_type == "np" else value
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, PairCorrespondence):
            return PairCorrespondence(**{k: convert(v) for k, v in value.__dict__.items()})
        return value

    fields = ("correspondences", "density_maps", "entropy_maps", "inverse_error_maps", "masks", "part_masks")
    fields += ("sharing", "outliers", "orientations")
    for name in fields + ("keypoints", "keypoint_parts"):
        setattr(output, name, convert(getattr(output, name)))
    return output


def _collection_checks(
    passes: dict[tuple[int, int], PassResult],
    outliers: torch.Tensor,
    num_images: int,
    grid: tuple[int, int],
    num_pairs: int,
) -> dict[tuple[int, int], PassResult]:
    """Steps 8b-8c (`"auto"`) on the passes of every analysed pair: an outlier's passes keep nothing, the others are
    confirmed by third images (three or more images) and checked for consistency."""
    inliers, dropped = split_outlier_passes(passes, outliers)
    # 8b. With three or more images: matches that third images confirm
    if num_images > 2:
        sparse = num_pairs < num_images * (num_images - 1) // 2
        inliers = confirm_by_third_images(inliers, num_images, grid, longer_paths=sparse)
    # 8c. Final consistency with the reverse pass and the local affine field
    inliers = check_consistency(inliers, grid)
    return {pair: inliers[pair] if pair in inliers else dropped[pair] for pair in passes}


def analyze_checked_features(
    features: CoSegmentationFeatures,
    settings: AnalysisSettings,
    device: torch.device,
    progress: Callable[[int], Any] | None = None,
    pair_analyses: Sequence[PairAnalysis] | None = None,
    pairs: list[tuple[int, int]] | None = None,
    mirrored: CoSegmentationFeatures | None = None,
    orientations: torch.Tensor | None = None,
) -> CoSegmentationPipelineOutput:
    """:func:`analyze_features` for features and settings already checked (`settings` from
    :func:`check_analysis_settings`, `features` validated, `mirrored` checked against them, `orientations` an `(M,)`
    bool tensor or `None`): the method's steps 4-11 in order. `pairs`: the pair graph
    `partner_pairs(features, settings.partners)` when the caller has it already."""
    num_images, grid = features.num_images, tuple(features.grid_size)
    num_tokens = grid[0] * grid[1]
    # The pair graph, from the captured features (as the CLI splits it between processes)
    if pairs is None:
        pairs = partner_pairs(features, settings.partners)
    # 3b. Feature corrections: high-norm tokens, a reference's positional offsets
    features = correct_features(features, settings)
    if mirrored is not None:  # 3c. Each image's orientation, from the whole collection; analysed that way round
        features, orientations = orient_corrected(features, mirrored, orientations, settings, pairs, device)
    # 4-8a. Per pair of the pair graph (the expensive part), unless done already (e.g. split between processes)
    if pair_analyses is None:
        pair_analyses = _analyze_pair_list(features, pairs, settings, device, progress, compact=True)
    passes = join_pair_analyses(pair_analyses, features, settings.pair_settings, device, pairs)
    del pair_analyses  # the passes hold what is needed of them (freed before steps 10-11 when they were made here)
    thresholds = [
        {"source": result.source_index, "target": result.target_index, **result.thresholds.__dict__}
        for result in passes.values()
    ]
    # How much each image shares with the collection; an outlier's matches are dropped before 8b
    sharing = sharing_scores(passes, num_images)
    outliers = find_outliers(sharing, settings.selection)
    if settings.selection == "auto":  # 8b-8c
        passes = _collection_checks(passes, outliers, num_images, grid, len(pairs))
    # 8. Both passes of each pair joined into its correspondences
    correspondences = pair_correspondences(passes, features)
    if settings.refine:  # below the token grid (the tokens stay as they are)
        correspondences = refine_correspondences(correspondences, passes, features, settings.chunk_size, device)
    # 9. Hit counts, and the mean IME and IMS maps of step 5
    density = hit_counts(correspondences, num_images, num_tokens, device)
    entropy, inverse_error = mean_pass_maps(passes, num_images, num_tokens, device)
    del passes  # per pair and pass `(N,)` statistics: not needed by steps 10-11
    trim_memory()  # their memory back to the system before step 10's buffers (else counted twice at the peak)
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
        if isinstance(output.part_masks, LazyMasks):  # a large collection: masks made when indexed
            output.masks = output.part_masks.recast(kind="foreground")
        else:
            output.masks = [mask > 0 for mask in output.part_masks]
    if mirrored is not None:  # back to the original images' pixels
        output = unflip_output(output, orientations, grid, features.image_sizes)
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
    mirrored: CoSegmentationFeatures | None = None,
    orientations: Sequence[bool] | torch.Tensor | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
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
        mirrored (`CoSegmentationFeatures`, *optional*): the same images flipped left-right, captured alike (same
            layers, grid, heads and sizes: `pipe(..., flip=True)`, `features.mirrored`; issue 27). Diffusion features
            barely tell a left part from its right twin, so a symmetric object seen facing the other way matches its
            mirror twin. With `mirrored`, one bit per image is decided from the whole collection
            (:func:`~cosegment.orientation.collection_orientations`: every analysed pair's evidence from its four
            captures, on the corrected features, then :func:`~cosegment.orientation.decide_orientations`), each pair
            is analysed in that orientation (an image whose bit is set through its mirrored capture; the reference
            correction applies to both) and every point, token, map and mask is mapped back to the original image
            (`x -> W - x`, token column `c -> w - 1 - c`). The output says what was decided: `orientations` per image
            and `flipped` per pair. Cost: 8 more attention row passes per pair beside its 2 (about 3x the analysis
            without, BENCHMARKS.md (s)). `None` (default): the output bitwise that of earlier versions.
        orientations (`(M,)` bools, *optional*): with `mirrored`, the decision to use instead of deciding here (e.g.
            `collection_orientations(...).flipped`, as :func:`analyze_pairs` was given when `pair_analyses` come
            from there).
        pairs (`list[tuple[int, int]]`, *optional*): the pairs `(s, t)`, `0 <= s < t < M`, to analyse, in place of
            the graph `partners` makes: e.g. `partner_pairs(features, K)` computed once and split between processes
            for :func:`analyze_pairs`, then given here with their `pair_analyses` (as the `cosegment` command does),
            so that the graph (a read of every image and a search among them) is not made twice. Give `pairs` or
            `partners`, not both.

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
    if pairs is not None and partners is not None:
        raise ValueError(f"Give `pairs` or `partners`, not both; got `partners`={partners!r} and a list of pairs.")
    device = _check_features(features, settings, device, progress)
    pairs = None if pairs is None else _check_pair_list(pairs, features.num_images)
    mirrored, orientations = check_orientation_arguments(features, mirrored, orientations)
    return analyze_checked_features(features, settings, device, progress, pair_analyses, pairs, mirrored, orientations)
