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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from cosegment.utils.command_line import DTYPES, THRESHOLD_NAMES

RESULTS_FORMAT = "cosegment.results/1"
THRESHOLD_ARGS = THRESHOLD_NAMES

logger = logging.getLogger("cosegment.cli")

if TYPE_CHECKING:
    from cosegment import CoSegmentationFeatures


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
# Files
# ---------------------------------------------------------------------------------------------------------------------


def _floats(array) -> list:
    """Numpy array -> nested lists of Python floats (exact float32 values, shortest repr in JSON)."""
    return np.asarray(array, dtype=np.float64).tolist()


def _part_summary(part_mask: np.ndarray) -> list[dict]:
    """Per part id present in `(H, W)` ids: its pixel area and centroid `(x, y)`."""
    parts = []
    for part in np.unique(part_mask):
        if part == 0:
            continue
        rows, cols = np.nonzero(part_mask == part)
        parts.append(
            {"id": int(part), "area": int(rows.size), "centroid": [float(cols.mean() + 0.5), float(rows.mean() + 0.5)]}
        )
    return parts


def results_document(
    output, image_paths: Sequence[str], image_sizes: Sequence[Sequence[int]], grid_size, settings: dict, model: str
) -> dict:
    """The JSON document of `results.json` from a `CoSegmentationPipelineOutput`-like object (numpy fields)."""
    import diffusers

    import cosegment

    document = {
        "format": RESULTS_FORMAT,
        "model": model,
        "versions": {
            "cosegment": cosegment.__version__,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
        "settings": settings,
        "grid_size": [int(v) for v in grid_size],
        "images": [
            {"index": i, "path": path, "height": int(size[0]), "width": int(size[1])}
            for i, (path, size) in enumerate(zip(image_paths, image_sizes))
        ],
        "sharing": None if getattr(output, "sharing", None) is None else _floats(output.sharing),
        "outliers": None
        if getattr(output, "outliers", None) is None
        else np.asarray(output.outliers, dtype=bool).tolist(),
        "correspondences": [
            {
                "source_index": int(pair.source_index),
                "target_index": int(pair.target_index),
                "num_matches": len(pair),
                "source_points": _floats(pair.source_points),
                "target_points": _floats(pair.target_points),
                "scores": _floats(pair.scores),
                "mutual": np.asarray(pair.mutual, dtype=bool).tolist(),
            }
            for pair in output.correspondences
        ],
        "thresholds": output.thresholds,
        "masks": None,
        "parts": None,
        "keypoints": None,
        "arrays": "results.safetensors",
    }
    if output.masks is not None:
        document["masks"] = [
            {"foreground_fraction": float(np.asarray(mask, dtype=bool).mean())} for mask in output.masks
        ]
    if output.part_masks is not None:
        document["parts"] = [_part_summary(np.asarray(mask)) for mask in output.part_masks]
    if output.keypoints is not None:
        parts = output.keypoint_parts or [None] * len(output.keypoints)
        document["keypoints"] = [
            {
                "points": _floats(points),
                "parts": None if labels is None else np.asarray(labels).astype(int).tolist(),
            }
            for points, labels in zip(output.keypoints, parts)
        ]
    return document


def results_arrays(output) -> dict[str, torch.Tensor]:
    """Every array of the output as named CPU tensors for `results.safetensors`."""
    arrays = {
        name: torch.as_tensor(np.ascontiguousarray(getattr(output, name)), dtype=torch.float32)
        for name in ("density_maps", "entropy_maps", "inverse_error_maps")
    }
    for pair in output.correspondences:
        prefix = f"pairs.{pair.source_index}.{pair.target_index}"
        for name in ("source_points", "target_points", "scores"):
            arrays[f"{prefix}.{name}"] = torch.as_tensor(np.asarray(getattr(pair, name), dtype=np.float32))
        arrays[f"{prefix}.mutual"] = torch.as_tensor(np.asarray(pair.mutual, dtype=bool))
        for name in ("source_tokens", "target_tokens"):
            arrays[f"{prefix}.{name}"] = torch.as_tensor(np.asarray(getattr(pair, name), dtype=np.int64))
    for field, dtype in (
        ("masks", bool),
        ("part_masks", np.int32),
        ("keypoints", np.float32),
        ("keypoint_parts", np.int64),
    ):
        values = getattr(output, field, None)
        if values is None:
            continue
        for i, value in enumerate(values):
            arrays[f"{field}.{i}"] = torch.as_tensor(np.ascontiguousarray(np.asarray(value, dtype=dtype)))
    return {name: tensor.contiguous() for name, tensor in arrays.items()}


# Pictured images smaller than this (longer side, px) are scaled up to it (never beyond `--figure-size`): a panel's
# title and colour-bar caption need about 250 px.
MIN_FIGURE_SIDE = 256


def _fit(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image scaled so its longer side is at most `max_side` pixels and, if smaller, at least
    `min(MIN_FIGURE_SIDE, max_side)`; and the scale used."""
    import cv2

    longer = max(image.shape[:2])
    scale = min(max_side, max(longer, MIN_FIGURE_SIDE)) / longer
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR), scale


def _write_png(path: str, rgb: np.ndarray) -> None:
    import cv2

    from cosegment.utils.files import write_bytes

    encoded, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not encoded:
        raise OSError(f"could not encode {path}")
    write_bytes(path, data.tobytes())  # atomic: a complete file or none


# The three per-image maps: output field, panel title, what the colour bar measures (with its unit).
MAP_PANELS = (
    ("density_maps", "hit count", "kept matches per token"),
    ("entropy_maps", "inverse-mapping entropy", "nats (low = confident)"),
    ("inverse_error_maps", "inverse-mapping error", "cells (low = consistent)"),
)


def image_panels(output, index: int, image: np.ndarray, scale: float = 1.0) -> list[np.ndarray]:
    """Image `index`'s pictures: the three heat-maps, each with a colour bar (range and unit), then the mask and the
    parts with their legends when the output has them. `image` is the picture's copy of the image, `scale` its size
    over the original's (points are scaled by it).

    Returns:
        `(H_k, W_k, 3)` uint8 RGB panels, titled.
    """
    from cosegment.utils.visualization import (
        add_colorbar,
        add_legend,
        add_title,
        heatmap_range,
        mask_legend,
        overlay_heatmap,
        overlay_mask,
        overlay_parts,
        parts_legend,
    )

    panels = []
    for field, title, unit in MAP_PANELS:
        grid = np.asarray(getattr(output, field)[index])
        heat = add_colorbar(overlay_heatmap(image, grid), heatmap_range(grid), f"{title}: {unit}")
        panels.append(add_title(heat, title))
    size = (image.shape[1], image.shape[0])
    if output.masks is not None:
        mask = _resize_labels(np.asarray(output.masks[index]).astype(np.uint8), size).astype(bool)
        picture = overlay_mask(image, mask, dim_background=0.5)
        panels.append(add_title(add_legend(picture, mask_legend(dim_background=0.5)), "common foreground"))
    if output.part_masks is not None:
        labels = _resize_labels(np.asarray(output.part_masks[index]).astype(np.int32), size)
        keypoints = labels_of = None
        if output.keypoints is not None:
            keypoints = np.asarray(output.keypoints[index], dtype=np.float64) * scale
            labels_of = None if output.keypoint_parts is None else output.keypoint_parts[index]
        picture = overlay_parts(image, labels, keypoints=keypoints, keypoint_parts=labels_of)
        found = set(np.unique(labels).tolist()) | set(np.asarray(labels_of if labels_of is not None else []).tolist())
        entries = parts_legend(found) or [((0, 0, 0), "no part found")]
        title = "parts (dots: part centres)" if keypoints is not None and len(keypoints) else "parts"
        panels.append(add_title(add_legend(picture, entries), title))
    return panels


def write_figures(
    output, images: Sequence[np.ndarray], out_dir: str, top_k: int = 50, max_side: int = 384
) -> list[str]:
    """PNG pictures: `pairs/pair_SSS_TTT.png` (top matches) and `images/image_III.png` (maps, mask, parts), numbers
    zero-padded to 3 digits.

    Returns:
        the written paths relative to `out_dir`.
    """
    from cosegment.utils.visualization import add_title, draw_correspondences, side_by_side

    written = []
    os.makedirs(os.path.join(out_dir, "pairs"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    fitted = [_fit(image, max_side) for image in images]
    for pair in output.correspondences:
        (a, scale_a), (b, scale_b) = fitted[pair.source_index], fitted[pair.target_index]
        picture = draw_correspondences(
            a,
            b,
            np.asarray(pair.source_points, dtype=np.float64) * scale_a,
            np.asarray(pair.target_points, dtype=np.float64) * scale_b,
            scores=pair.scores,
            top_k=top_k,
        )
        shown = min(len(pair), top_k)
        title = f"images {pair.source_index} - {pair.target_index}: top {shown} of {len(pair)} matches"
        picture = add_title(picture, title + " (colour = position in the left image)")
        relative = f"pairs/pair_{pair.source_index:03d}_{pair.target_index:03d}.png"
        _write_png(os.path.join(out_dir, relative), picture)
        written.append(relative)
    for i, (image, scale) in enumerate(fitted):
        picture, _ = side_by_side(image_panels(output, i, image, scale))
        relative = f"images/image_{i:03d}.png"
        _write_png(os.path.join(out_dir, relative), picture)
        written.append(relative)
    return written


# --- `--points`: points of the first image transferred into every other image (issue 11) --------------------------


def parse_points(text: str) -> np.ndarray:
    """`--points` -> `(K, 2)` float64 x, y: `"x1,y1;x2,y2"`, or a JSON file holding `[[x, y], ...]` or
    `{"points": [[x, y], ...]}`."""
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


def point_transfers(features, points: np.ndarray, refine: bool) -> list[dict]:
    """`transfer_points` of `points` (image 0's pixels) into every other image: one dict per target image."""
    from cosegment import transfer_points

    transfers = []
    for target in range(1, features.num_images):
        landed, scores = transfer_points(features, 0, target, points, refine=refine)
        transfers.append({"target_index": target, "points": _floats(landed), "scores": _floats(scores)})
    return transfers


def write_points_figure(images: Sequence[np.ndarray], points: np.ndarray, transfers, out_dir: str, max_side: int):
    """`points.png`: every image in a row, the points in the first and where they land in the others, numbered,
    same colour = same point (titles: image index, and the mean score of its transfers), short titles so that
    small images show them whole. Returns the path relative to `out_dir`."""
    from cosegment.utils.visualization import add_title, draw_points, part_colors, side_by_side

    colors = part_colors(len(points))[1:]
    labels = [str(k) for k in range(len(points))]
    panels = [(0, images[0], points, "points")]
    for t in transfers:
        index = t["target_index"]
        panels.append((index, images[index], np.asarray(t["points"]), f"score {np.mean(t['scores']):.2f}"))
    for i, (index, image, where, title) in enumerate(panels):
        fitted, scale = _fit(image, max_side)
        panels[i] = add_title(draw_points(fitted, where * scale, colors, labels=labels), f"{index}: {title}")
    picture, _ = side_by_side(panels)
    _write_png(os.path.join(out_dir, "points.png"), picture)
    return "points.png"


# --- end of `--points` ------------------------------------------------------------------------------------------------


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if (labels.shape[1], labels.shape[0]) == size:
        return labels
    return cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)


# ---------------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------------


def _reference_argument(text: str) -> str:
    """`--reference`: "auto", "none" or an existing features file (:meth:`CoSegmentationFeatures.save`)."""
    if text in ("auto", "none") or os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"must be 'auto', 'none' or a features file, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from cosegment import DEFAULT_MODEL_ID
    from cosegment.pipeline_cosegment import SELECTION_PRESETS
    from cosegment.utils.command_line import (
        ArgumentParser,
        add_common_arguments,
        non_negative_float,
        non_negative_int,
        positive_int,
    )

    parser = ArgumentParser(
        prog="cosegment",
        description="Correspondences, confidence maps and co-segmentation of an image collection from Stable "
        "Diffusion self-attention. Every option and image is checked before the model loads. Run under "
        "`accelerate launch` to use several processes / GPUs.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="two or more image files")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"Hub id or local folder of a Stable Diffusion pipeline (default {DEFAULT_MODEL_ID}); "
        "`python examples/make_tiny_pipeline.py tiny-sd/` makes a tiny random one to try the tool offline",
    )
    parser.add_argument("--height", type=positive_int, default=None, help="processing height (default: the model's)")
    parser.add_argument("--width", type=positive_int, default=None, help="processing width (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (the only randomness; default 0)")
    parser.add_argument("--timestep", type=int, default=261, help="diffusion timestep of the noise (default 261)")
    parser.add_argument("--ensemble-size", type=positive_int, default=1, help="noise draws averaged per image")
    parser.add_argument("--attention-layers", default=None, help="regex of the self-attention layers to read")
    parser.add_argument("--prompt", default="", help="text conditioning (default empty)")
    parser.add_argument(
        "--selection", choices=SELECTION_PRESETS, default=None, help="threshold preset (default: auto)"
    )
    for name in THRESHOLD_ARGS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=non_negative_float,
            default=None,
            help="override the preset's limit (inf disables the check)",
        )
    parser.add_argument(
        "--no-filter",
        action="store_true",
        help="disable every threshold not given explicitly: keep every forward match (shows the raw matches)",
    )
    parser.add_argument("--num-parts", type=positive_int, default=None, help="number of parts (default: estimated)")
    parser.add_argument(
        "--partners",
        type=positive_int,
        default=None,
        metavar="K",
        help="analyse each image with its K most similar images, plus bridges that keep the graph connected (cost ~ M*K; default: every pair)",
    )
    parser.add_argument("--no-segment", action="store_true", help="do not write masks and parts (files and pictures)")
    parser.add_argument(
        "--reference",
        type=_reference_argument,
        default="none",
        metavar="auto|none|FILE",
        help="content-free captures whose positional offsets are removed: 'auto' captures 16 blank images (once per "
        "process), FILE loads saved features, 'none' (default) removes nothing",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per UNet forward (default 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--top-k", type=non_negative_int, default=50, help="matches drawn per pair picture")
    parser.add_argument("--figure-size", type=positive_int, default=384, help="longer side of pictured images")
    parser.add_argument("--no-figures", action="store_true", help="write no PNG pictures")
    parser.add_argument("--no-viewer", action="store_true", help="write no index.html viewer (see `cosegment view`)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="reuse",
        choices=("reuse", "overwrite"),
        default=None,
        help="reuse the features and pair analyses an earlier run with the same settings kept in --out/resume "
        "(refused, naming them, when settings differ); --resume=overwrite recomputes what changed settings make "
        "stale and reuses the rest. Put it after the images.",
    )
    parser.add_argument(  # --points and --no-refine: issue 11
        "--points", default=None, help="'x1,y1;x2,y2' or a JSON file: points of the first image to transfer"
    )
    parser.add_argument("--no-refine", action="store_true", help="points at token centres (no sub-token refinement)")
    add_common_arguments(parser)
    return parser


def load_image(path: str) -> np.ndarray:
    """An image file -> `(H, W, 3)` uint8 RGB (a one-line `ValueError` naming the file when it cannot be read)."""
    from cosegment.utils.command_line import read_image

    return read_image(path, "IMAGE")


def check_arguments(args: argparse.Namespace) -> list[np.ndarray]:
    """Every check that needs no model: options, the output folder, the device and every image file.

    Returns:
        the images, `(H, W, 3)` uint8 RGB.
    """
    from cosegment.utils.command_line import check_capture_arguments, check_output_folder, resolve_device

    if len(args.images) < 2:
        raise ValueError(f"`IMAGE` must name 2 or more files, got {len(args.images)}: {args.images}.")
    resolve_device(args.device)
    check_output_folder(args.out)
    check_capture_arguments(args.model, args.height, args.width, args.timestep, args.attention_layers)
    return [load_image(path) for path in args.images]


def _accelerate_state(device: str):
    """accelerate's `PartialState` for `--device`, and the torch device this process runs on."""
    from accelerate import PartialState

    from cosegment.utils.command_line import resolve_device

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

    Every argument and image file is checked before accelerate starts or the model loads.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from cosegment import analyze_features, analyze_pairs
    from cosegment.analysis import partner_pairs
    from cosegment.runstate import RunState, record_settings
    from cosegment.utils.command_line import empty_results_warning, process_count_warning, threshold_overrides
    from cosegment.utils.files import save_safetensors, write_text

    images = check_arguments(args)
    points = None if args.points is None else parse_points(args.points)  # --points (issue 11)
    if points is not None:
        check_points(points, images[0])
    state, device = _accelerate_state(args.device)
    rank, world = state.process_index, state.num_processes
    _set_up_logging(rank, world, args.quiet)
    main = state.is_main_process
    started = time.perf_counter()
    if main and (warning := process_count_warning(world)):
        logger.warning(warning)
    logger.info("device %s, %d images, %d process(es)", device, len(images), world)

    # Settings of the analysis (thresholds left out take the preset's values)
    analysis = threshold_overrides(args)
    if args.selection is not None:
        analysis["selection"] = args.selection
    collection_only = {"num_parts": args.num_parts} if args.num_parts is not None else {}
    if args.partners is not None:
        collection_only["partners"] = args.partners
    segment = not args.no_segment
    bars = not (args.quiet or not main)

    # What an earlier run kept in --out/resume that this one may reuse (see runstate.py)
    kept = RunState(args.out, record_settings({**vars(args), **analysis}), resume=args.resume)
    kept.check()  # every process: the one-line refusal when settings differ
    if main:
        kept.start()
        for change in kept.changes:
            logger.info("resume: %s", change)
    state.wait_for_everyone()

    features = kept.load_features()
    if features is not None:
        logger.info("resume: reused the features of %d images from %s", features.num_images, kept.features_path)
    else:
        features = _capture(args, images, state, device, bars)
        if main:
            kept.save_features(features)

    # 4-8a. Per-pair analysis (the expensive part): each process its share of the pairs, each kept as it finishes.
    graph = partner_pairs(features, args.partners)  # every pair, or the partner graph: the same on every process
    my_pairs = pair_shares(features.num_images, world, graph)[rank]
    with tqdm(total=len(my_pairs), desc="pair analysis (pairs)", disable=not bars) as bar:
        my_analyses, reused = kept.pair_analyses(
            features,
            my_pairs,
            analyze_pairs,
            progress=bar.update,
            device=device,
            refine=not args.no_refine,
            reference=features.reference,
            **analysis,
        )
    if reused:
        shown = ", ".join(map(str, reused[:8])) + (" ..." if len(reused) > 8 else "")
        logger.info("resume: reused %d of %d pair analyses: %s", len(reused), len(my_pairs), shown)
    logger.info("analysed %d pairs", len(my_pairs) - len(reused))
    pair_analyses = gather_object(my_analyses)

    document = None
    if main:
        # 8b-11. The collection-level steps on the main process, from every pair's analysis: the same output as a
        # one-process `analyze_features(features)`.
        output = analyze_features(
            features,
            output_type="np",
            device=device,
            pair_analyses=pair_analyses,
            segment=segment,
            **analysis,
            **collection_only,
            refine=not args.no_refine,
            reference=features.reference,
        )
        filtered = not all(math.isinf(analysis.get(name, 0.0)) for name in THRESHOLD_ARGS)
        if warning := empty_results_warning(output, filtered=filtered):
            logger.warning("warning: %s", warning)
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
            "segment": segment,
            "refine": not args.no_refine,
            "reference": args.reference,
        }
        document = results_document(
            output, args.images, features.image_sizes, features.grid_size, settings, args.model
        )
        os.makedirs(args.out, exist_ok=True)
        # Atomic writes (a complete file or none). results.json, which names the others, goes first and comes back
        # last: whenever it exists, the files it names are from the same run.
        if os.path.exists(os.path.join(args.out, "results.json")):
            os.remove(os.path.join(args.out, "results.json"))
        save_safetensors(
            results_arrays(output), os.path.join(args.out, "results.safetensors"), metadata={"format": RESULTS_FORMAT}
        )
        if not args.no_figures:
            document["figures"] = write_figures(output, images, args.out, top_k=args.top_k, max_side=args.figure_size)
        if points is not None:  # --points (issue 11)
            transfers = point_transfers(features, points, not args.no_refine)
            document["points"] = {"source_index": 0, "points": _floats(points), "transfers": transfers}
            if not args.no_figures:
                document["figures"].append(write_points_figure(images, points, transfers, args.out, args.figure_size))
        if not args.no_viewer:  # OUT/index.html and OUT/viewer/ (issue 24)
            from cosegment.viewer import write_viewer

            names = [os.path.basename(path) for path in args.images]
            with tqdm(total=2 * len(output.correspondences), desc="viewer (ordered pairs)", disable=not bars) as bar:
                refine, size = not args.no_refine, args.figure_size
                write_viewer(args.out, images, output, features, refine, size, names, progress=bar.update)
        write_text(os.path.join(args.out, "results.json"), dumps_results(document))
        logger.info("wrote %s in %.1f s", os.path.join(args.out, "results.json"), time.perf_counter() - started)
    state.wait_for_everyone()
    return document


def _capture(
    args: argparse.Namespace, images: list[np.ndarray], state, device: torch.device, bars: bool
) -> "CoSegmentationFeatures":
    """1-3. Capture: each process its share of whole batches, with the noise of a one-process run; the features of
    every image, gathered to every process."""
    from accelerate.utils import gather_object

    from cosegment import CoSegmentationFeatures
    from cosegment.utils.command_line import load_pipeline

    rank, world = state.process_index, state.num_processes
    pipe = load_pipeline(args.model, device, DTYPES[args.dtype], quiet=args.quiet or not state.is_main_process)
    pipe.set_progress_bar_config(disable=not bars, desc="capture (UNet batches)")
    shares = capture_shares(len(images), args.batch_size, world)
    mine = shares[rank]
    payload = []
    if mine:
        logger.info("capturing images %s", mine)
        features = pipe.capture_features(
            images,
            prompt=args.prompt,
            height=args.height,
            width=args.width,
            timestep=args.timestep,
            ensemble_size=args.ensemble_size,
            attention_layers=args.attention_layers,
            batch_size=args.batch_size,
            generator=torch.Generator().manual_seed(args.seed),
            image_indices=mine,
        )
        payload = [
            {
                "indices": mine,
                "queries": [q.cpu() for q in features.queries],
                "keys": [k.cpu() for k in features.keys],
                "grid_size": features.grid_size,
                "image_sizes": features.image_sizes,
                "layer_names": features.layer_names,
                "metadata": features.metadata,
            }
        ]
    else:
        logger.info("no images to capture (fewer batches than processes)")
    parts = sorted(gather_object(payload), key=lambda part: part["indices"][0])
    first = parts[0]
    features = CoSegmentationFeatures(
        [torch.cat([part["queries"][i] for part in parts]) for i in range(len(first["queries"]))],
        [torch.cat([part["keys"][i] for part in parts]) for i in range(len(first["keys"]))],
        first["grid_size"],
        [size for part in parts for size in part["image_sizes"]],
        first["layer_names"],
        first["metadata"],
    )
    logger.info("features of %d images gathered", features.num_images)
    if args.reference == "auto":  # the same captures on every process (a fixed seed), kept with the features
        features.reference = pipe.capture_reference(
            args.height,
            args.width,
            timestep=args.timestep,
            attention_layers=args.attention_layers,
            batch_size=args.batch_size,
        ).to("cpu")
        logger.info("reference: %d blank images captured", features.reference.num_images)
    elif args.reference != "none":
        features.reference = CoSegmentationFeatures.load(args.reference)
    return features


def dumps_results(document: dict) -> str:
    """`results.json` text: indented, with lists of numbers or booleans on one line each (points stay readable)."""
    text = json.dumps(_json_safe(document), indent=1, allow_nan=False)
    flat = re.compile(r"\[[\s0-9eE+\-.,]*\]|\[[\s,a-z]*\]")

    def join(match: re.Match) -> str:
        items = [item.strip() for item in match.group(0)[1:-1].split(",")]
        if any(item not in ("true", "false", "null") and not _NUMBER.fullmatch(item) for item in items if item):
            return match.group(0)
        return "[" + ", ".join(item for item in items if item) + "]"

    return flat.sub(join, text) + "\n"


_NUMBER = re.compile(r"-?[0-9.]+(?:[eE][+\-]?[0-9]+)?")


def _json_safe(value):
    """Infinite thresholds -> the string "inf" (JSON has no infinity); numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The `cosegment` command. A bad option or image file, or a model that cannot be loaded, is one line on stderr
    (exit status 2 or 1); `--debug` or `COSEGMENT_DEBUG=1` adds the traceback. SIGINT or SIGTERM stops it cleanly:
    one line saying what was kept for `--resume`, exit status 130 or 143."""
    from cosegment.utils.command_line import run_command

    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["view"]:  # `cosegment view OUT`: the path of OUT/index.html, opened where a browser is
        from cosegment.viewer import view_main

        return view_main(arguments[1:])
    return run_command(build_parser(), _run_until_stopped, argv)


def _run_until_stopped(args: argparse.Namespace) -> dict | None:
    """`run`, with SIGINT/SIGTERM turned into a clean stop (`SystemExit(128 + signal)` after one line), and under
    `accelerate launch` a failing process named before its error."""
    from cosegment.runstate import RunInterrupted, describe_kept, stop_on_signals

    try:
        with stop_on_signals():  # SIGINT, SIGTERM -> RunInterrupted: writers clean up, no partial file
            return run(args)
    except RunInterrupted as stop:
        _say(f"{stop}: kept {describe_kept(args.out)}; run the same command with --resume to continue")
        raise SystemExit(stop.exit_code) from None
    except Exception as error:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # `accelerate launch`: name the failing process
            _say(f"failed: {type(error).__name__}: {error}")
        raise


def _say(line: str) -> None:
    """One line on stderr, through the run's logger (time and process) once `run` has set it up."""
    if logger.handlers:
        logger.error("%s", line)
    else:
        print(f"cosegment: {line}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
