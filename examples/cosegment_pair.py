"""Correspondences, maps and co-segmentation of one image pair, as pictures.

    python examples/cosegment_pair.py A.jpg B.jpg --out results/
    python examples/cosegment_pair.py A.jpg B.jpg --out results/ --model ./tiny-sd   # a local pipeline folder

Writes to --out:
    correspondences.png   the top matches as lines between the two images (colour = position in A)
    maps.png              per image (rows, titled A and B with the file names): hit counts, inverse-mapping entropy, inverse-mapping error (columns),
                          each with a colour bar giving its range and unit
    segmentation.png      per image (rows A and B): the common-foreground mask and the part labels (same colour = same part),
                          with legends

Every option and both images are checked before the model loads; a mistake, or a model that cannot be loaded, is one
line (`--debug` or COSEGMENT_DEBUG=1 shows the traceback).
"""

import argparse
import logging
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from cosegment import DEFAULT_MODEL_ID, analyze_features
from cosegment.cli import MAP_PANELS, image_panels
from cosegment.pipeline_cosegment import SELECTION_PRESETS
from cosegment.utils.command_line import (
    TINY_PIPELINE_HINT,
    ArgumentParser,
    add_common_arguments,
    check_capture_arguments,
    check_output_folder,
    empty_results_warning,
    load_pipeline,
    non_negative_int,
    positive_int,
    read_image,
    resolve_device,
    run_command,
    threshold_overrides,
)
from cosegment.utils.files import save_png
from cosegment.utils.visualization import add_title, draw_correspondences, side_by_side

logger = logging.getLogger("cosegment_pair")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="cosegment_pair.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image_a", help="the first image file")
    parser.add_argument("image_b", help="the second image file")
    parser.add_argument("--out", default="results", help="output folder (created; default results)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"Hub id or local pipeline folder (default {DEFAULT_MODEL_ID}); " + TINY_PIPELINE_HINT,
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--height", type=positive_int, default=None, help="processing height (default: the model's)")
    parser.add_argument("--width", type=positive_int, default=None, help="processing width (default: the model's)")
    parser.add_argument(
        "--top-k", type=non_negative_int, default=60, help="matches drawn (highest scores; default 60)"
    )
    parser.add_argument(
        "--selection", choices=SELECTION_PRESETS, default=None, help="threshold preset (default: the pipeline's, auto)"
    )
    parser.add_argument(
        "--no-filter", action="store_true", help="disable every threshold (keeps every forward match; for plumbing)"
    )
    add_common_arguments(parser)
    return parser


def run(args) -> None:
    # Everything that needs no model first: a mistake costs no download.
    images = [read_image(args.image_a, "image_a"), read_image(args.image_b, "image_b")]
    device = resolve_device(args.device)
    check_output_folder(args.out)
    check_capture_arguments(args.model, args.height, args.width, timestep=261)
    logger.handlers[:] = [logging.StreamHandler(sys.stderr)]
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False

    pipe = load_pipeline(args.model, device, quiet=args.quiet)
    pipe.set_progress_bar_config(disable=args.quiet, desc="capture (UNet batches)")
    options = threshold_overrides(args)
    if args.selection is not None:
        options["selection"] = args.selection
    features = pipe.capture_features(
        images, height=args.height, width=args.width, generator=torch.Generator().manual_seed(args.seed)
    )
    with tqdm(total=1, desc="pair analysis (pairs)", disable=args.quiet) as bar:
        out = analyze_features(features, device=device, progress=bar.update, **options)
    if warning := empty_results_warning(out, filtered=not args.no_filter):
        logger.warning("warning: %s", warning)
    os.makedirs(args.out, exist_ok=True)

    pair = out.correspondences[0]
    lines = draw_correspondences(images[0], images[1], pair.source_points, pair.target_points, pair.scores, args.top_k)
    title = f"{len(pair)} matches ({int(pair.mutual.sum())} mutual), top {min(args.top_k, len(pair))} drawn"
    labels = [f"A: {os.path.basename(args.image_a)}", f"B: {os.path.basename(args.image_b)}"]
    lines = add_title(add_title(lines, title + " (colour = position in A)"), f"{labels[0]}  |  {labels[1]}")
    written = {"correspondences.png": lines}

    panels = [image_panels(out, i, image) for i, image in enumerate(images)]
    maps = len(MAP_PANELS)
    written["maps.png"] = _stack([add_title(side_by_side(row[:maps])[0], label) for row, label in zip(panels, labels)])
    if out.masks is not None:
        rows = [add_title(side_by_side(row[maps:])[0], label) for row, label in zip(panels, labels)]
        written["segmentation.png"] = _stack(rows)

    for name, picture in written.items():
        save_png(os.path.join(args.out, name), picture)  # atomic: a complete file or none
        print(f"wrote {os.path.join(args.out, name)} {picture.shape[1]}x{picture.shape[0]}")


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
