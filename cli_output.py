"""What `cosegment` writes into `--out`: `results.json` (:func:`results_document`, :func:`dumps_results`),
`results.safetensors` (:func:`results_arrays`) and the PNG pictures (:func:`write_figures`, :func:`write_points_figure`).

Loaded by :mod:`cosegment.cli` when a run writes its results (its names are also importable from `cosegment.cli`), so
that the command's `--help` and input checks need none of it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch

RESULTS_FORMAT = "cosegment.results/1"


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


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if (labels.shape[1], labels.shape[0]) == size:
        return labels
    return cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)


# `--points` (issue 11): points of the first image transferred into every other image


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


def write_results(
    out_dir: str,
    document: dict,
    output,
    images: Sequence[np.ndarray],
    *,
    figures: bool = True,
    top_k: int = 50,
    figure_size: int = 384,
    points: np.ndarray | None = None,
    features=None,
    refine: bool = True,
) -> None:
    """Writes the files of a run into `out_dir`: `results.safetensors`, the pictures (`figures`), the transfers of
    `points` (image 0's pixels, transferred with `features`) and `results.json`, adding `figures` and `points` to
    `document`.

    Each file is written atomically (a complete file or none). `results.json`, which names the others, goes first and
    comes back last: whenever it exists, the files it names are from the same run.
    """
    from cosegment.utils.files import save_safetensors, write_text

    os.makedirs(out_dir, exist_ok=True)
    results_json = os.path.join(out_dir, "results.json")
    if os.path.exists(results_json):
        os.remove(results_json)
    arrays = results_arrays(output)
    save_safetensors(arrays, os.path.join(out_dir, "results.safetensors"), metadata={"format": RESULTS_FORMAT})
    if figures:
        document["figures"] = write_figures(output, images, out_dir, top_k=top_k, max_side=figure_size)
    if points is not None:  # --points (issue 11)
        transfers = point_transfers(features, points, refine)
        document["points"] = {"source_index": 0, "points": _floats(points), "transfers": transfers}
        if figures:
            document["figures"].append(write_points_figure(images, points, transfers, out_dir, figure_size))
    write_text(results_json, dumps_results(document))
