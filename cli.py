"""`cosegment`: the command-line tool. Correspondences, maps, masks and pictures for a collection of image files.

    cosegment a.jpg b.jpg c.jpg --out results/ [--model ID_OR_FOLDER] [--seed 0] ...
    accelerate launch --multi_gpu --num_processes 4 -m cosegment a.jpg b.jpg ... --out results/

Writes into `--out`: `results.json` (correspondences, keypoints, parts, settings, model id, versions),
`results.safetensors` (the arrays) and PNG pictures under `pairs/` (top matches of every pair) and `images/` (each
image's density, entropy and inverse-error maps, masks and parts). The output depends only on the inputs, the
settings and `--seed`: not on the number of processes.

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

import numpy as np
import torch

RESULTS_FORMAT = "cosegment.results/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
THRESHOLD_ARGS = ("max_entropy", "max_spread", "max_collapse", "max_inverse_error")

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


def _fit(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image scaled down so its longer side is at most `max_side` pixels, and the scale used."""
    import cv2

    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _write_png(path: str, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def write_figures(
    output, images: Sequence[np.ndarray], out_dir: str, top_k: int = 50, max_side: int = 384
) -> list[str]:
    """PNG pictures: `pairs/pair_S_T.png` (top matches) and `images/image_I.png` (maps, mask, parts).

    Returns:
        the written paths relative to `out_dir`.
    """
    from cosegment.utils.visualization import (
        add_title,
        draw_correspondences,
        overlay_heatmap,
        overlay_mask,
        overlay_parts,
        side_by_side,
    )

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
        picture = add_title(picture, f"images {pair.source_index} - {pair.target_index}: top {shown} of {len(pair)}")
        relative = f"pairs/pair_{pair.source_index:03d}_{pair.target_index:03d}.png"
        _write_png(os.path.join(out_dir, relative), picture)
        written.append(relative)
    for i, (image, _) in enumerate(fitted):
        panels = [
            add_title(overlay_heatmap(image, grid), f"{title} {_range_text(grid)}")
            for grid, title in (
                (output.density_maps[i], "hit count"),
                (output.entropy_maps[i], "inverse entropy (nats)"),
                (output.inverse_error_maps[i], "inverse error (cells)"),
            )
        ]
        size = (image.shape[1], image.shape[0])
        if output.masks is not None:
            mask = _resize_labels(np.asarray(output.masks[i]).astype(np.uint8), size).astype(bool)
            panels.append(add_title(overlay_mask(image, mask, dim_background=0.5), "mask"))
        if output.part_masks is not None:
            labels = _resize_labels(np.asarray(output.part_masks[i]).astype(np.int32), size)
            keypoints = labels_of = None
            if output.keypoints is not None:
                keypoints = np.asarray(output.keypoints[i], dtype=np.float64) * fitted[i][1]
                labels_of = None if output.keypoint_parts is None else output.keypoint_parts[i]
            panels.append(
                add_title(overlay_parts(image, labels, keypoints=keypoints, keypoint_parts=labels_of), "parts")
            )
        picture, _ = side_by_side(panels)
        relative = f"images/image_{i:03d}.png"
        _write_png(os.path.join(out_dir, relative), picture)
        written.append(relative)
    return written


def _range_text(grid) -> str:
    """`"0 to 12"`: the values the colour map spans (blue to red)."""
    grid = np.asarray(grid, dtype=np.float64)
    return f"{grid.min():.3g} to {grid.max():.3g}"


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if (labels.shape[1], labels.shape[0]) == size:
        return labels
    return cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)


# ---------------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------------


def _non_negative_float(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number or inf, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from cosegment import DEFAULT_MODEL_ID

    parser = argparse.ArgumentParser(
        prog="cosegment",
        description="Correspondences, confidence maps and co-segmentation of an image collection from Stable "
        "Diffusion self-attention. Run under `accelerate launch` to use several processes / GPUs.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="two or more image files")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help=f"model id or folder (default {DEFAULT_MODEL_ID})")
    parser.add_argument("--height", type=_positive_int, default=None, help="processing height (default: the model's)")
    parser.add_argument("--width", type=_positive_int, default=None, help="processing width (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (the only randomness)")
    parser.add_argument("--timestep", type=int, default=261, help="diffusion timestep of the noise (default 261)")
    parser.add_argument("--ensemble-size", type=_positive_int, default=1, help="noise draws averaged per image")
    parser.add_argument("--attention-layers", default=None, help="regex of the self-attention layers to read")
    parser.add_argument("--prompt", default="", help="text conditioning (default empty)")
    parser.add_argument("--selection", default=None, help="threshold preset, e.g. 'auto' or 'paper'")
    for name in THRESHOLD_ARGS:
        parser.add_argument(
            "--" + name.replace("_", "-"), type=_non_negative_float, default=None, help="override (inf disables)"
        )
    parser.add_argument("--num-parts", type=_positive_int, default=None, help="number of parts (if supported)")
    parser.add_argument(
        "--partners",
        type=_positive_int,
        default=None,
        metavar="K",
        help="analyse each image with its K most similar images only (cost ~ M*K; default: every pair)",
    )
    parser.add_argument("--no-segment", action="store_true", help="do not write masks and parts (files and pictures)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per UNet forward")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype")
    parser.add_argument("--top-k", type=int, default=50, help="matches drawn per pair picture")
    parser.add_argument("--figure-size", type=_positive_int, default=384, help="longer side of pictured images")
    parser.add_argument("--no-figures", action="store_true", help="write no PNG pictures")
    return parser


def _dtype_argument(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype keyword: `dtype` in diffusers >= 0.36 (`torch_dtype` is deprecated there)."""
    import diffusers
    from packaging.version import Version

    if dtype == torch.float32:
        return {}
    name = "dtype" if Version(diffusers.__version__).release >= (0, 36) else "torch_dtype"
    return {name: dtype}


def load_image(path: str) -> np.ndarray:
    """An image file -> `(H, W, 3)` uint8 RGB."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(f"`image` {path!r} cannot be read as an image: {error}") from error


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}/{world}]"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.prefix
        return True


def run(args: argparse.Namespace) -> dict:
    """Runs the tool for parsed arguments; returns the results document (on every process)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from cosegment import (
        CoSegmentationFeatures,
        StableDiffusionCoSegmentationPipeline,
        analyze_features,
        analyze_pairs,
    )
    from cosegment.analysis import partner_pairs

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank, world))
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    main = state.is_main_process
    started = time.perf_counter()

    if len(args.images) < 2:
        raise ValueError(f"`images` must name 2 or more files, got {len(args.images)}.")
    images = [load_image(path) for path in args.images]
    logger.info("device %s, %d images, %d process(es)", state.device, len(images), world)

    # Settings of the analysis (thresholds left out take the preset's values)
    analysis = {name: getattr(args, name) for name in THRESHOLD_ARGS if getattr(args, name) is not None}
    if args.selection is not None:
        analysis["selection"] = args.selection
    collection_only = {"num_parts": args.num_parts} if args.num_parts is not None else {}
    if args.partners is not None:
        collection_only["partners"] = args.partners
    segment = not args.no_segment

    # 1-3. Capture: each process its share of whole batches, with the noise of a one-process run.
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(args.model, **_dtype_argument(DTYPES[args.dtype]))
    pipe = pipe.to(state.device)
    pipe.set_progress_bar_config(disable=not main, desc="capture")
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

    # 4-8a. Per-pair analysis (the expensive part): each process its share of the pairs.
    graph = partner_pairs(features, args.partners)  # every pair, or the partner graph: the same on every process
    my_pairs = pair_shares(features.num_images, world, graph)[rank]
    with tqdm(total=len(my_pairs), desc="pairs", disable=not main) as bar:
        my_analyses = analyze_pairs(features, my_pairs, device=state.device, progress=bar.update, **analysis)
    logger.info("analysed %d pairs", len(my_pairs))
    pair_analyses = gather_object([pair.to("cpu") for pair in my_analyses])

    document = None
    if main:
        # 8b-11. The collection-level steps on the main process, from every pair's analysis: the same output as a
        # one-process `analyze_features(features)`.
        output = analyze_features(
            features,
            output_type="np",
            device=state.device,
            pair_analyses=pair_analyses,
            segment=segment,
            **analysis,
            **collection_only,
        )
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
        }
        document = results_document(
            output, args.images, features.image_sizes, features.grid_size, settings, args.model
        )
        os.makedirs(args.out, exist_ok=True)
        from safetensors.torch import save_file

        save_file(
            results_arrays(output), os.path.join(args.out, "results.safetensors"), metadata={"format": RESULTS_FORMAT}
        )
        if not args.no_figures:
            document["figures"] = write_figures(output, images, args.out, top_k=args.top_k, max_side=args.figure_size)
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
            handle.write(dumps_results(document))
        logger.info("wrote %s in %.1f s", os.path.join(args.out, "results.json"), time.perf_counter() - started)
    state.wait_for_everyone()
    return document


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
