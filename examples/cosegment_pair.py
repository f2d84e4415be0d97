"""Correspondences, maps and co-segmentation of one image pair, as pictures.

    python examples/cosegment_pair.py A.jpg B.jpg --out results/
    python examples/cosegment_pair.py A.jpg B.jpg --out results/ --model ./tiny-sd   # a local pipeline folder

Writes to --out:
    correspondences.png   the top matches as lines between the two images (colour = position in A)
    maps.png              per image (rows): hit counts, inverse-mapping entropy, inverse-mapping error (columns)
    segmentation.png      per image: the common-foreground mask and the part labels (same colour = same part)
"""

import argparse
import os

import numpy as np
import torch
from diffusers.utils import load_image

from cosegment import DEFAULT_MODEL_ID, StableDiffusionCoSegmentationPipeline
from cosegment.utils.files import save_png
from cosegment.utils.visualization import (
    add_title,
    draw_correspondences,
    overlay_heatmap,
    overlay_mask,
    overlay_parts,
    side_by_side,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_a")
    parser.add_argument("image_b")
    parser.add_argument("--out", default="results", help="output folder (created)")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="model id on the Hub or a local folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=60, help="matches drawn (highest scores)")
    parser.add_argument(
        "--selection", default=None, help="threshold preset, 'paper' or 'auto' (default: the pipeline's)"
    )
    parser.add_argument(
        "--no-filter", action="store_true", help="disable every threshold (keeps every forward match; for plumbing)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(args.model).to(args.device)
    images = [np.asarray(load_image(path)) for path in (args.image_a, args.image_b)]
    options = {} if args.selection is None else {"selection": args.selection}
    if args.no_filter:
        options.update(
            {name: float("inf") for name in ("max_entropy", "max_spread", "max_collapse", "max_inverse_error")}
        )
    out = pipe(
        image=images,
        height=args.height,
        width=args.width,
        generator=torch.Generator().manual_seed(args.seed),
        **options,
    )
    os.makedirs(args.out, exist_ok=True)

    pair = out.correspondences[0]
    lines = draw_correspondences(images[0], images[1], pair.source_points, pair.target_points, pair.scores, args.top_k)
    title = f"{len(pair)} matches ({int(pair.mutual.sum())} mutual), top {min(args.top_k, len(pair))} drawn"
    written = {"correspondences.png": add_title(lines, title)}

    rows = []
    for i, image in enumerate(images):
        panels = [
            add_title(overlay_heatmap(image, out.density_maps[i]), "hit counts"),
            add_title(overlay_heatmap(image, out.entropy_maps[i]), "inverse-mapping entropy"),
            add_title(overlay_heatmap(image, out.inverse_error_maps[i]), "inverse-mapping error"),
        ]
        rows.append(side_by_side(panels)[0])
    written["maps.png"] = _stack(rows)

    if out.masks is not None:
        rows = []
        for i, image in enumerate(images):
            mask = add_title(overlay_mask(image, out.masks[i]), "common foreground")
            parts = overlay_parts(
                image, out.part_masks[i], keypoints=out.keypoints[i], keypoint_parts=out.keypoint_parts[i]
            )
            rows.append(side_by_side([mask, add_title(parts, "parts")])[0])
        written["segmentation.png"] = _stack(rows)

    for name, picture in written.items():
        save_png(os.path.join(args.out, name), picture)  # atomic: a complete file or none
        print(f"wrote {os.path.join(args.out, name)} {picture.shape[1]}x{picture.shape[0]}")


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)


if __name__ == "__main__":
    main()
