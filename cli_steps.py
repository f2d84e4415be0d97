"""The steps of a `cosegment` run (:func:`cosegment.cli.run`): how the work is split between processes, the capture
kept in `--out/resume/`, the features read back, the per-pair analysis split between processes, and the
collection-level steps and the files on the main process.

Torch-free at import, like `cosegment.cli` (torch, accelerate and the analysis load inside the steps).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence

from cosegment.utils.command_line import THRESHOLD_NAMES, empty_results_warning

logger = logging.getLogger("cosegment.cli")


# ---------------------------------------------------------------------------------------------------------------------
# Work split (pure)
# ---------------------------------------------------------------------------------------------------------------------


def capture_shares(num_images: int, batch_size: int, num_processes: int) -> list[list[int]]:
    """Images each process captures: whole batches of the one-process run, contiguous, as even as possible.

    A UNet batch is then the same in every process count (`[0, b)`, `[b, 2b)`, ...), so no result can depend on how
    batches were formed. A share of a single image is merged into its neighbour (features hold 2 or more images); a
    process may get nothing when there are fewer batches than processes.

    Returns:
        `num_processes` lists of image indices, increasing, covering `range(num_images)` once.
    """
    for name, value, low in (
        ("num_images", num_images, 2),
        ("batch_size", batch_size, 1),
        ("num_processes", num_processes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    batches = [list(range(start, min(start + batch_size, num_images))) for start in range(0, num_images, batch_size)]
    base, extra = divmod(len(batches), num_processes)
    shares, position = [], 0
    for process in range(num_processes):
        count = base + (1 if process < extra else 0)
        shares.append([index for batch in batches[position : position + count] for index in batch])
        position += count
    for process, share in enumerate(shares):
        if len(share) == 1:
            before = [p for p in range(process) if shares[p]]
            after = [p for p in range(process + 1, num_processes) if shares[p]]
            target = before[-1] if before else after[0]
            shares[target] = sorted(shares[target] + share)
            shares[process] = []
    return shares


def all_pairs(num_images: int) -> list[tuple[int, int]]:
    """Unordered pairs `(s, t)`, `s < t`, in the order of :func:`cosegment.analyze_features`."""
    return [(s, t) for s in range(num_images) for t in range(s + 1, num_images)]


def pair_shares(
    num_images: int, num_processes: int, pairs: Sequence[tuple[int, int]] | None = None
) -> list[list[tuple[int, int]]]:
    """Pairs each process analyses: every `num_processes`-th pair of `pairs` (default: every pair; with `--partners`
    the partner graph) (balanced, since pairs cost the same)."""
    pairs = all_pairs(num_images) if pairs is None else list(pairs)
    return [pairs[process::num_processes] for process in range(num_processes)]


# ---------------------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------------------


def capture_images(args: argparse.Namespace, pipe, images: Sequence, state, kept, bars: bool) -> None:
    """1-3. Capture: each process its share of whole batches, with the noise of a one-process run, kept in
    --out/resume/features/ batch by batch as captured (`RunState.capture`: what an earlier run kept is not captured
    again); then, with `--reference auto`, the main process captures the reference and keeps it with them."""
    import torch
    from tqdm.auto import tqdm

    rank, world = state.process_index, state.num_processes
    mine = capture_shares(len(images), args.batch_size, world)[rank]
    missing = len(set(kept.missing_images()).intersection(mine))
    if len(mine) - missing:
        logger.info("resume: %d of this process's %d images captured already", len(mine) - missing, len(mine))
    if mine:
        logger.info("capturing images %s", _span(mine))
    with tqdm(total=missing, desc="capture (images)", disable=not bars) as bar:
        kept.capture(
            pipe,
            images,
            mine,
            args.batch_size,
            torch.Generator().manual_seed(args.seed),
            progress=bar.update,
            prompt=args.prompt,
            height=args.height,
            width=args.width,
            timestep=args.timestep,
            ensemble_size=args.ensemble_size,
            attention_layers=args.attention_layers,
            flip=args.flip,
        )
    state.wait_for_everyone()
    if state.is_main_process and args.reference == "auto" and not kept.has_features():
        reference = pipe.capture_reference(
            args.height,
            args.width,
            timestep=args.timestep,
            attention_layers=args.attention_layers,
            batch_size=args.batch_size,
        ).to("cpu")
        kept.save_reference(reference)
        logger.info("reference: %d blank images captured", reference.num_images)
    state.wait_for_everyone()


def _span(indices: Sequence[int]) -> str:
    """`[0, 1, 2, 3]` -> `"0-3"`; other lists as they are, shortened."""
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return _listed([str(i) for i in indices], 16)


def kept_features(args: argparse.Namespace, kept):
    """The features kept in --out/resume, read from disk image by image as the steps need them (each process reads
    only what its pairs need), with the reference of `--reference` (a file) when one was given."""
    from cosegment import CoSegmentationFeatures

    features = kept.load_features()
    if features is None:
        missing = kept.missing_images()
        raise RuntimeError(
            f"the features of {len(missing)} images ({_listed([str(i) for i in missing])}) are not in "
            f"{kept.features_path} after the capture: with several processes, --out must be on a disk that every "
            "process sees."
        )
    if args.reference not in ("auto", "none"):
        features.reference = CoSegmentationFeatures.load(args.reference)
    logger.info("features of %d images in %s", features.num_images, kept.features_path)
    return features


def analyse_pairs(args, features, kept, state, device, analysis: dict, bars: bool) -> list:
    """4-8a. Per-pair analysis (the expensive part): each process its share of the pairs, each kept in --out/resume as
    it finishes. Returns, on the main process, every pair's analysis (its own, and the others' read from their kept
    files once every process is done), None on the others; and the orientations (`--flip`)."""
    from tqdm.auto import tqdm

    from cosegment import analyze_pairs
    from cosegment.analysis import partner_pairs
    from cosegment.runstate import pair_bits

    graph = partner_pairs(features, args.partners, gathered_means(features, args.partners, state))
    my_pairs = pair_shares(features.num_images, state.num_processes, graph)[state.process_index]
    oriented, orientations = orient(features, my_pairs, analysis, device)
    with tqdm(total=len(my_pairs), desc="pair analysis (pairs)", disable=not bars) as bar:
        my_analyses, reused = kept.pair_analyses(
            oriented,
            my_pairs,
            analyze_pairs,
            progress=bar.update,
            orientations=orientations,
            device=device,
            refine=not args.no_refine,
            reference=features.reference,
            **analysis,
        )
    if reused:
        shown = ", ".join(map(str, reused[:8])) + (" ..." if len(reused) > 8 else "")
        logger.info("resume: reused %d of %d pair analyses: %s", len(reused), len(my_pairs), shown)
    logger.info("analysed %d pairs", len(my_pairs) - len(reused))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None, orientations
    mine = dict(zip(my_pairs, my_analyses))
    analyses = [
        mine[pair] if pair in mine else kept.load_pair(*pair, pair_bits(orientations, *pair)) for pair in graph
    ]
    if any(one is None for one in analyses):
        missing = [f"{s}-{t}" for (s, t), one in zip(graph, analyses) if one is None]
        raise RuntimeError(
            f"the analyses of pairs {_listed(missing)} are not in {kept.folder} after the analysis: with several "
            "processes, --out must be on a disk that every process sees."
        )
    return analyses, orientations


def gathered_means(features, partners: int | None, state) -> list | None:
    """--partners: what the pair graph needs of each image (`image_means`), each process reading its share of the
    images and every process getting all (so that each reads only its share and its pairs' images); None without."""
    if partners is None or partners >= features.num_images - 1:
        return None
    import torch
    from accelerate.utils import gather_object

    from cosegment.pairs import image_means

    rank, world, count = state.process_index, state.num_processes, features.num_images
    share = list(range(count * rank // world, count * (rank + 1) // world))
    parts = sorted(gather_object([(share, image_means(features, share))] if share else []), key=lambda p: p[0][0])
    return [torch.cat([means[entry] for _, means in parts]) for entry in range(len(features.layer_names))]


def orient(features, my_pairs, analysis: dict, device):
    """--flip (issue 27): each process weighs the orientation evidence of its share of the pairs; every process then
    decides from the gathered evidence (the same on each). Returns the features in the chosen orientation (what the
    pairs are analysed on) and the orientations; without --flip, `(features, None)`."""
    if features.mirrored is None:
        return features, None
    from accelerate.utils import gather_object

    from cosegment.orientation import collection_orientations, decide_orientations, oriented_features

    mine = collection_orientations(features, features.mirrored, my_pairs, features.reference, device=device)
    evidence = sum(gather_object([mine.evidence]))
    orientations = decide_orientations(evidence).flipped
    logger.info("orientations: images %s analysed flipped", orientations.nonzero().flatten().tolist())
    return oriented_features(features, features.mirrored, orientations), orientations


def finish(args, features, pair_analyses, images, points, device, analysis: dict, orientations=None) -> dict:
    """8b-11 on the main process, from every pair's analysis (the same output as a one-process
    `analyze_features(features)`), then the files. Returns the results document."""
    from cosegment import analyze_features
    from cosegment.cli_output import results_document, write_results

    collection_only = {"num_parts": args.num_parts} if args.num_parts is not None else {}
    if args.partners is not None:
        collection_only["partners"] = args.partners
    output = analyze_features(
        features,
        output_type="np",
        device=device,
        pair_analyses=pair_analyses,
        # the pair graph of `analyse_pairs` (the analyses come in its order), not made again (a read of every image)
        pairs=[(one.source_index, one.target_index) for one in pair_analyses],
        segment=not args.no_segment,
        **analysis,
        num_parts=args.num_parts,
        refine=not args.no_refine,
        reference=features.reference,
        mirrored=features.mirrored,
        orientations=orientations,
    )
    filtered = not all(math.isinf(analysis.get(name, 0.0)) for name in THRESHOLD_NAMES)
    if warning := empty_results_warning(output, filtered=filtered, selection=analysis.get("selection", "auto")):
        logger.warning("warning: %s", warning)
    log_outliers(output, args.images)
    settings = {
        "height": features.metadata.get("height"),
        "width": features.metadata.get("width"),
        "seed": args.seed,
        "timestep": args.timestep,
        "ensemble_size": args.ensemble_size,
        "attention_layers": features.metadata.get("layers"),
        "prompt": args.prompt,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "analysis": {**analysis, **collection_only},
        "segment": not args.no_segment,
        "refine": not args.no_refine,
        "reference": args.reference,
    }
    if args.flip:  # (only then, so that results.json without --flip is as before)
        settings["flip"] = True
    paths = [_relative_to(path, args.out) for path in args.images]  # results.json's paths: from --out
    document = results_document(output, paths, features.image_sizes, features.grid_size, settings, args.model)
    extra = _write_viewer(args, images, output, features) + (["annotations.json"] if args.export == "coco" else [])
    removed, foreign = write_results(
        args.out,
        document,
        output,
        images,
        figures=not args.no_figures,
        top_k=args.top_k,
        figure_size=args.figure_size,
        points=points,
        features=features,
        refine=not args.no_refine,
        also_written=extra,
    )
    if removed:
        logger.info("removed %d file(s) an earlier run left in %s: %s", len(removed), args.out, _listed(removed))
    if foreign:
        logger.info("left %d file(s) in %s that cosegment did not write: %s", len(foreign), args.out, _listed(foreign))
    if args.export == "coco":  # --export (issue 28): after results.json, main process only
        from cosegment.export import export_coco

        export_coco(output, args.images, os.path.join(args.out, "annotations.json"), category=args.category)
    return document


def _write_viewer(args, images, output, features) -> list[str]:
    """`OUT/index.html` and `OUT/viewer/` (issue 24) unless `--no-viewer`; returns the files it wrote (relative)."""
    if args.no_viewer:
        return []
    from tqdm.auto import tqdm

    from cosegment.viewer import write_viewer

    names = [os.path.basename(path) for path in args.images]
    pairs = [(c.source_index, c.target_index) for c in output.correspondences]
    with tqdm(total=2 * len(pairs), desc="viewer (ordered pairs)", disable=args.quiet) as bar:
        refine, size = not args.no_refine, args.figure_size
        write_viewer(args.out, images, output, features, refine, size, names, progress=bar.update)
    return (
        ["index.html"]
        + [f"viewer/image_{i:03d}.js" for i in range(len(images))]
        + [f"viewer/pair_{s:03d}_{t:03d}.js" for s, t in pairs]
    )


def _relative_to(path: str, folder: str) -> str:
    """`path` relative to `folder` (`/`-separated), or absolute where it cannot be (another drive)."""
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(folder)).replace(os.sep, "/")
    except ValueError:
        return os.path.abspath(path)


def _listed(names: Sequence[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def log_outliers(output, paths: Sequence[str]) -> None:
    """One warning naming the images the run found to share nothing with the others (by file name and index)."""
    outliers = getattr(output, "outliers", None)
    if outliers is None or not any(bool(flag) for flag in outliers):
        return
    named = [f"{os.path.basename(paths[i])} ({i})" for i, flag in enumerate(outliers) if bool(flag)]
    verb = "shares" if len(named) == 1 else "share"
    logger.warning(
        "outliers: %s %s nothing with the other images: their matches are dropped (their pictures say 'outlier')",
        _listed(named),
        verb,
    )
