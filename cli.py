"""`cosegment`: the command-line tool. Correspondences, maps, masks and pictures for a collection of image files.

    cosegment a.jpg b.jpg c.jpg --out results/ [--model ID_OR_FOLDER] [--seed 0] ...
    accelerate launch --multi_gpu --num_processes 4 -m cosegment a.jpg b.jpg ... --out results/

Writes into `--out`: `results.json` (correspondences, keypoints, parts, settings, model id, versions),
`results.safetensors` (the arrays) and PNG pictures under `pairs/` (top matches of every pair) and `images/` (each
image's density, entropy and inverse-error maps, masks and parts), each atomically (complete or absent). The output
depends only on the inputs, the settings and `--seed`: not on the number of processes.

Long runs (see `runstate.py`): the captured features and each finished pair analysis are kept in `--out/resume/` as
they are made; `--resume` reuses them (refusing, in one line, settings that differ; `--resume=overwrite` recomputes
what those make stale). SIGINT or SIGTERM stops a run cleanly with one line saying what was kept.

Several processes (`accelerate launch`): images are split for the capture in whole batches (a share of the
collection per process; each image's noise is the noise it gets in a one-process run, see
`capture_features(image_indices=...)`), the features are gathered to every process, the pairs are split for the
per-pair analysis (:func:`cosegment.analyze_pairs`, steps 4-8a: where the time goes), and the main process joins every
pair's analysis in :func:`cosegment.analyze_features` (`pair_analyses=`), which runs the collection-level steps (8b-11:
confirmation through third images, hit counts, parts, masks) exactly as a one-process run does, and writes the files.
These steps, and the work split, are in `cli_steps.py`; the files written, in `cli_output.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

# Torch-free (the command's --help and every input check run without torch, diffusers or transformers; tested in
# tests/test_startup.py): the model, accelerate and the writers load inside `run`, after the checks.
from cosegment.cli_steps import all_pairs, capture_shares, pair_shares  # noqa: F401 (importable from here as before)
from cosegment.utils.command_line import (
    DEFAULT_MODEL_ID,
    DTYPE_NAMES,
    SELECTION_PRESETS,
    THRESHOLD_NAMES,
    ArgumentParser,
    ImageFiles,
    add_common_arguments,
    check_capture_arguments,
    check_image_headers,
    check_output_folder,
    checking_inputs,
    expand_images,
    non_negative_float,
    non_negative_int,
    positive_int,
    process_count_warning,
    read_image,
    resolve_device,
    run_command,
    threshold_overrides,
)

if TYPE_CHECKING:
    import numpy as np


THRESHOLD_ARGS = THRESHOLD_NAMES

logger = logging.getLogger("cosegment.cli")

# What `cosegment.cli_output` (the files of a run) defines, importable from here too; loaded on first use.
_OUTPUT_NAMES = (
    "MAP_PANELS",
    "MIN_FIGURE_SIDE",
    "RESULTS_FORMAT",
    "dumps_results",
    "image_panels",
    "point_transfers",
    "results_arrays",
    "results_document",
    "write_figures",
    "write_points_figure",
    "write_results",
)


def __getattr__(name: str):
    if name in _OUTPUT_NAMES:
        from cosegment import cli_output

        return getattr(cli_output, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments and the checks made before the model loads
# ---------------------------------------------------------------------------------------------------------------------


def _reference_argument(text: str) -> str:
    """`--reference`: "auto", "none" or an existing features file (:meth:`CoSegmentationFeatures.save`)."""
    if text in ("auto", "none") or os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"must be 'auto', 'none' or a features file, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The `cosegment` parser: the images, then the options by topic (model and capture, correspondences,
    segmentation, output, run control)."""
    parser = ArgumentParser(
        prog="cosegment",
        description="Correspondences, confidence maps and co-segmentation of an image collection from Stable "
        "Diffusion self-attention. Every option and image is checked before the model loads. Run under "
        "`accelerate launch` to use several processes / GPUs.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="two or more images in all: image files, folders (their image files, sorted by name), quoted globs "
        'such as "photos/*.jpg" (sorted), or text files (.txt, .lst) listing image paths, one a line, relative to '
        "the list's folder (# comments)",
    )
    _add_capture_arguments(parser.add_argument_group("model and capture"))
    _add_selection_arguments(parser.add_argument_group("correspondences (pair analysis)"))
    segmentation = parser.add_argument_group("segmentation")
    segmentation.add_argument(
        "--num-parts", type=positive_int, default=None, help="number of parts (default: estimated)"
    )
    segmentation.add_argument(
        "--no-segment", action="store_true", help="do not write masks and parts (files and pictures)"
    )
    _add_output_arguments(parser.add_argument_group("output"))
    control = parser.add_argument_group("run control")
    control.add_argument(
        "--resume",
        nargs="?",
        const="reuse",
        choices=("reuse", "overwrite"),
        default=None,
        help="reuse the features and pair analyses an earlier run with the same settings kept in --out/resume "
        "(refused, naming them, when settings differ); --resume=overwrite recomputes what changed settings make "
        "stale and reuses the rest. Put it after the images.",
    )
    add_common_arguments(control)
    return parser


def _add_capture_arguments(group) -> None:
    """Steps 1-3: the model, the noise and the captured layers."""
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"Hub id or local folder of a Stable Diffusion pipeline (default {DEFAULT_MODEL_ID}); "
        "`python examples/make_tiny_pipeline.py tiny-sd/` makes a tiny random one to try the tool offline",
    )
    group.add_argument("--height", type=positive_int, default=None, help="processing height (default: the model's)")
    group.add_argument("--width", type=positive_int, default=None, help="processing width (default: the model's)")
    group.add_argument("--seed", type=int, default=0, help="seed of the noise (the only randomness; default 0)")
    group.add_argument("--timestep", type=int, default=261, help="diffusion timestep of the noise (default 261)")
    group.add_argument(
        "--ensemble-size", type=positive_int, default=1, help="noise draws averaged per image (default 1)"
    )
    group.add_argument(
        "--attention-layers", default=None, help="regex of the self-attention layers to read (default: the model's)"
    )
    group.add_argument("--prompt", default="", help="text conditioning (default empty)")
    group.add_argument(
        "--reference",
        type=_reference_argument,
        default="none",
        metavar="auto|none|FILE",
        help="content-free captures whose positional offsets are removed: 'auto' captures 16 blank images (once per "
        "process), FILE loads saved features, 'none' (default) removes nothing",
    )
    group.add_argument(
        "--flip",
        action="store_true",
        help="also capture every image flipped left-right and analyse each image the way round the collection "
        "decides (symmetric objects facing opposite ways; 2x the capture; unmeasured on real weights)",
    )
    group.add_argument("--batch-size", type=positive_int, default=8, help="images per UNet forward (default 8)")
    group.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32", help="model dtype (default float32)")


def _add_selection_arguments(group) -> None:
    """Steps 4-8: which matches are kept, and between which images."""
    group.add_argument("--selection", choices=SELECTION_PRESETS, default=None, help="threshold preset (default: auto)")
    for name in THRESHOLD_ARGS:
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=non_negative_float,
            default=None,
            help="override the preset's limit (inf disables the check)",
        )
    group.add_argument(
        "--no-filter",
        action="store_true",
        help="disable every threshold not given explicitly: keep every forward match (shows the raw matches)",
    )
    group.add_argument(
        "--partners",
        type=positive_int,
        default=None,
        metavar="K",
        help="analyse each image with its K most similar images, plus bridges that keep the graph connected (cost ~ "
        "M*K; default: every pair)",
    )
    group.add_argument("--no-refine", action="store_true", help="points at token centres (no sub-token refinement)")


def _add_output_arguments(group) -> None:
    """What is written into `--out`."""
    group.add_argument(
        "--out",
        default=None,
        help="output folder (required; created). A run owns the files it writes there: those an earlier run left "
        "that this one does not write are removed (other files are left alone and named)",
    )
    group.add_argument(
        "--top-k", type=non_negative_int, default=50, help="matches drawn per pair picture (default 50)"
    )
    group.add_argument(
        "--figure-size", type=positive_int, default=384, help="longer side of pictured images, px (default 384)"
    )
    group.add_argument("--no-figures", action="store_true", help="write no PNG pictures")
    group.add_argument(  # --points (issue 11)
        "--points", default=None, help="'x1,y1;x2,y2' or a JSON file: points of the first image to transfer"
    )
    group.add_argument("--no-viewer", action="store_true", help="write no index.html viewer (see `cosegment view`)")
    # --export and --category (issue 28): annotations.json for labelling tools, see cosegment/export.py
    group.add_argument("--export", choices=("coco",), default=None, help="also write annotations.json (COCO)")
    group.add_argument("--category", default="object", help="category name in --export (default object)")


def parse_points(text: str) -> np.ndarray:
    """`--points` -> `(K, 2)` float64 x, y: `"x1,y1;x2,y2"`, or a JSON file holding `[[x, y], ...]` or
    `{"points": [[x, y], ...]}`."""
    import numpy as np

    try:
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as handle:
                data = json.load(handle)
            data = data["points"] if isinstance(data, dict) else data
        else:
            data = [[float(v) for v in item.split(",")] for item in text.split(";") if item.strip()]
        points = np.asarray(data, dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"`--points` must be 'x1,y1;x2,y2' or a JSON file of [[x, y], ...], got {text!r}: {error}"
        ) from error
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0 or not np.isfinite(points).all():
        raise ValueError(f"`--points` must hold one or more finite x,y pairs, got {text!r}.")
    return points


def check_points(points: np.ndarray, image: np.ndarray) -> None:
    """Refuses points outside the first image before any model runs."""
    height, width = image.shape[:2]
    outside = (points < 0).any(axis=1) | (points[:, 0] > width) | (points[:, 1] > height)
    if outside.any():
        raise ValueError(
            f"`--points` must lie inside the first image ({width} x {height} px), got {points[outside][0].tolist()}."
        )


def load_image(path: str) -> np.ndarray:
    """An image file -> `(H, W, 3)` uint8 RGB (a one-line `ValueError` naming the file when it cannot be read)."""
    return read_image(path, "IMAGE")


def check_arguments(args: argparse.Namespace) -> tuple[ImageFiles, np.ndarray | None]:
    """Every check that needs no model, the most specific first: the images (folders, globs and lists expanded into
    `args.images`, what they gave in `args.image_notes`; each file's header, then its pixels), `--out`, the options,
    `--points` and the device (last: only it may need torch, for `--device auto`/`cuda`/`mps`). Its errors are
    input errors (:func:`checking_inputs`: one line, no `--debug` advice).

    Returns:
        the images (:class:`ImageFiles`: `(H, W, 3)` uint8 RGB, each read when indexed) and the `--points`
        (`(K, 2)` x, y) or None.
    """
    with checking_inputs():
        args.images, args.image_notes = expand_images(args.images, "IMAGE")
        if len(args.images) < 2:
            raise ValueError(f"`IMAGE` must name 2 or more files, got {len(args.images)}: {args.images}.")
        check_image_headers(args.images, "IMAGE")
        if args.out is None:
            raise ValueError("`--out` is required: the folder to write the results into (created).")
        check_output_folder(args.out)
        check_capture_arguments(args.model, args.height, args.width, args.timestep, args.attention_layers)
        if args.export is not None:  # --export (issue 28)
            from cosegment.export import check_export_options

            check_export_options(args.export, args.category, segment=not args.no_segment)
        for path in args.images:  # every file's pixels decode (not kept: the capture reads them again in batches)
            load_image(path)
        images = ImageFiles(args.images, "IMAGE")
        points = None if args.points is None else parse_points(args.points)  # --points (issue 11)
        if points is not None:
            check_points(points, images[0])
        resolve_device(args.device)
    return images, points


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _accelerate_state(device: str):
    """accelerate's `PartialState` for `--device`, and the torch device this process runs on."""
    import torch
    from accelerate import PartialState

    resolved = resolve_device(device)
    state = PartialState(cpu=resolved == "cpu")
    if device.startswith("cuda:") and state.num_processes > 1:
        raise ValueError(
            f"`--device` {device!r} names one GPU but {state.num_processes} processes run; use `--device cuda` "
            "(each process takes its own GPU)."
        )
    return state, (state.device if device in ("auto", "cpu", "cuda") else torch.device(resolved))


def _set_up_logging(rank: int, world: int, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank, world))
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}/{world}]"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.prefix
        return True


def run(args: argparse.Namespace) -> dict:
    """Runs the tool for parsed arguments; returns the results document (on every process).

    Every argument and image file is checked before torch, accelerate or the model loads, and the model loads before
    anything is written: a run that fails or is stopped before it keeps anything leaves `--out` as it was (see
    :func:`cosegment.runstate.forget_empty_state`).
    """
    images, points = check_arguments(args)
    from cosegment.cli_steps import analyse_pairs, capture_images, finish, kept_features
    from cosegment.runstate import RunState, forget_empty_state, record_settings

    state, device = _accelerate_state(args.device)
    rank, world = state.process_index, state.num_processes
    _set_up_logging(rank, world, args.quiet)
    main = state.is_main_process
    started = time.perf_counter()
    if main and (warning := process_count_warning(world)):
        logger.warning(warning)
    for note in args.image_notes:
        logger.info("images: %s", note)
    logger.info("device %s, %d images, %d process(es)", device, len(images), world)
    analysis = _analysis_settings(args)
    bars = not (args.quiet or not main)

    # What an earlier run kept in --out/resume that this one may reuse (see runstate.py)
    kept = RunState(args.out, record_settings({**vars(args), **analysis}), resume=args.resume)
    kept.check()  # every process: the one-line refusal when settings differ
    pipe = None if kept.has_features() else _load_pipeline(args, state, device, bars)  # fails before any write
    created = not os.path.exists(args.out)
    try:
        if main:
            kept.start()
            for change in kept.changes:
                logger.info("resume: %s", change)
        state.wait_for_everyone()
        kept.started()

        if kept.has_features():
            logger.info("resume: reused the features of %d images from %s", len(images), kept.features_path)
        else:
            pipe = pipe or _load_pipeline(args, state, device, bars)
            capture_images(args, pipe, images, state, kept, bars)
        features = kept_features(args, kept)
        pair_analyses, orientations = analyse_pairs(args, features, kept, state, device, analysis, bars)
    except BaseException:
        if main:  # nothing kept: no resume/settings.json or empty folders left behind
            forget_empty_state(args.out, remove_out=created)
        raise

    document = None
    if main:
        document = finish(args, features, pair_analyses, images, points, device, analysis, orientations)
        logger.info("wrote %s in %.1f s", os.path.join(args.out, "results.json"), time.perf_counter() - started)
    state.wait_for_everyone()
    return document


def _load_pipeline(args: argparse.Namespace, state, device, bars: bool):
    """The pipeline of `--model` on `device` (a one-line `ModelLoadError` when it cannot be loaded)."""
    from cosegment.utils.command_line import load_pipeline

    pipe = load_pipeline(args.model, device, args.dtype, quiet=args.quiet or not state.is_main_process)
    pipe.set_progress_bar_config(disable=True)  # the command's own bar counts the images (`capture_images`)
    return pipe


def _analysis_settings(args: argparse.Namespace) -> dict:
    """The settings of the per-pair analysis given on the command line (thresholds left out take the preset's)."""
    analysis = threshold_overrides(args)
    if args.selection is not None:
        analysis["selection"] = args.selection
    return analysis


# ---------------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The `cosegment` command. A bad option or image file, or a model that cannot be loaded, is one line on stderr
    (exit status 2 or 1); `--debug` or `COSEGMENT_DEBUG=1` adds the traceback. SIGINT or SIGTERM stops it cleanly:
    one line saying what was kept for `--resume`, exit status 130 or 143; SIGINT while the arguments are parsed is
    one line too, exit status 130. `--help` and every input check import no torch, diffusers or transformers.
    `cosegment view OUT` prints the path of a run's viewer and opens it where a browser is available."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["view"]:
        from cosegment.viewer import view_main

        return view_main(arguments[1:])
    return run_command(build_parser(), _run_until_stopped, argv)


def _run_until_stopped(args: argparse.Namespace) -> dict | None:
    """`run`, with SIGINT/SIGTERM turned into a clean stop (`SystemExit(128 + signal)` after one line), and under
    `accelerate launch` a failing process named before its error."""
    from cosegment.runstate import RunInterrupted, stop_on_signals

    try:
        with stop_on_signals():  # SIGINT, SIGTERM -> RunInterrupted: writers clean up, no partial file
            return run(args)
    except RunInterrupted as stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a second Ctrl-C adds no line (main restores)
        _say(interrupt_message(stop, args.out))
        raise SystemExit(stop.exit_code) from None
    except Exception as error:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # `accelerate launch`: name the failing process
            _say(f"failed: {type(error).__name__}: {error}")
        raise


def interrupt_message(stop, out_dir: str) -> str:
    """The line a stopped run ends with: what it kept for `--resume`, or that it kept nothing."""
    from cosegment.runstate import describe_kept

    kept = describe_kept(out_dir)
    if kept == "nothing kept yet":
        return f"{stop} before anything was kept for --resume; run the same command to start again"
    return f"{stop}: kept {kept}; run the same command with --resume to continue"


def _say(line: str) -> None:
    """One line on stderr, through the run's logger (time and process) once `run` has set it up."""
    if logger.handlers:
        logger.error("%s", line)
    else:
        print(f"cosegment: {line}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
