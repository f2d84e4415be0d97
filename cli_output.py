"""What `cosegment` writes into `--out`: `results.json` (:func:`results_document`, :func:`dumps_results`),
`results.safetensors` (:func:`results_arrays`) and the PNG pictures (:func:`write_figures`, :func:`write_points_figure`).

Loaded by :mod:`cosegment.cli` when a run writes its results (its names are also importable from `cosegment.cli`), so
that the command's `--help` and input checks need none of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch

RESULTS_FORMAT = "cosegment.results/1"

# The files a `cosegment` run writes into `--out` (relative paths, `/`-separated, as regular expressions): a run owns
# these names. Before `results.json` comes back, a run removes every file matching one of them that it did not write
# itself (what an earlier run into the same folder left), and never touches any other file. `resume/` is not listed:
# `--resume` reuses it (see `runstate.py`). Adding a kind of output file is one line here.
OWNED_FILES = (
    r"results\.json",
    r"results\.safetensors",
    r"points\.png",
    r"annotations\.json",  # --export coco (issue 28)
    r"pairs/pair_\d{3,}_\d{3,}\.png",
    r"images/image_\d{3,}\.png",
    r"masks/mask_\d{3,}\.png",
    r"masks/parts_\d{3,}\.png",
    r"index\.html",  # the viewer (issue 24)
    r"viewer/(?:image_\d{3,}|pair_\d{3,}_\d{3,})\.js",
)
_OWNED = re.compile("|".join(f"(?:{pattern})" for pattern in OWNED_FILES))


def is_owned_file(relative: str) -> bool:
    """Whether `relative` (a path inside `--out`, `/`-separated) is a name a `cosegment` run writes (:data:`OWNED_FILES`)."""
    return _OWNED.fullmatch(relative.replace(os.sep, "/")) is not None


def _files_in(out_dir: str) -> list[str]:
    """Every file in `out_dir` and its sub-folders except `resume/`, as sorted `/`-separated relative paths."""
    found = []
    for folder, subfolders, names in os.walk(out_dir):
        relative_folder = os.path.relpath(folder, out_dir)
        if relative_folder == ".":
            subfolders[:] = [name for name in subfolders if name != "resume"]
        for name in names:
            found.append(os.path.normpath(os.path.join(relative_folder, name)).replace(os.sep, "/"))
    return sorted(found)


def remove_stale_outputs(out_dir: str, written: Sequence[str]) -> tuple[list[str], list[str]]:
    """Removes the files an earlier run left in `out_dir` that this run did not write (`written`: relative paths):
    only names of :data:`OWNED_FILES`; a sub-folder left empty by it goes too.

    Returns:
        the removed files and the other files in `out_dir` that are not this run's (left alone), relative paths.
    """
    from cosegment.utils.files import is_temporary

    mine = {path.replace(os.sep, "/") for path in written}
    removed, foreign = [], []
    for relative in _files_in(out_dir):
        if relative in mine or is_temporary(relative):
            continue
        if is_owned_file(relative):
            os.remove(os.path.join(out_dir, relative))
            removed.append(relative)
        else:
            foreign.append(relative)
    for folder in {os.path.dirname(path) for path in removed if "/" in path}:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(out_dir, folder))  # only when empty
    return removed, foreign


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


def _pass_thresholds(entry: dict) -> dict:
    """A pass's thresholds for results.json: its images as `source_index`/`target_index` (as in `correspondences`)."""
    renamed = {"source": "source_index", "target": "target_index"}
    return {renamed.get(key, key): value for key, value in entry.items()}


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
        "thresholds": [_pass_thresholds(entry) for entry in output.thresholds],
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
    if getattr(output, "orientations", None) is not None:  # --flip (issue 27): what was decided
        document["orientations"] = np.asarray(output.orientations, dtype=bool).tolist()
        for entry, pair in zip(document["correspondences"], output.correspondences):
            entry["flipped"] = bool(pair.flipped)
    return document


# `results.safetensors` holds each mask and part mask at full resolution up to this many pixels (4 MP, 2048 x 2048);
# a larger image's are stored scaled down (nearest neighbour) to fit, so that the file stays small (a 6000 x 4000
# photo: about 6 MB instead of 120 MB). The full-resolution masks are always in `masks/` as PNGs (1-bit masks,
# palette part labels), which results.json names.
MAX_ARRAY_MASK_PIXELS = 1 << 22


def mask_array_size(height: int, width: int) -> tuple[int, int]:
    """`(h, w)` of a mask of an image `height x width` in `results.safetensors` (see :data:`MAX_ARRAY_MASK_PIXELS`)."""
    if height * width <= MAX_ARRAY_MASK_PIXELS:
        return height, width
    scale = math.sqrt(MAX_ARRAY_MASK_PIXELS / (height * width))
    return max(1, int(height * scale)), max(1, int(width * scale))


def bounded_mask(mask, parts: bool) -> np.ndarray:
    """A mask (bool) or part mask (uint8 ids, int32 past 255) as `results.safetensors` stores it: full resolution
    up to :data:`MAX_ARRAY_MASK_PIXELS`, else scaled down (nearest)."""
    mask = np.asarray(mask)
    mask = mask.astype(np.uint8 if mask.max(initial=0) <= 255 else np.int32) if parts else mask.astype(bool)
    size = mask_array_size(*mask.shape[:2])
    if size == mask.shape[:2]:
        return mask
    resized = _resize_labels(mask.astype(np.uint8) if mask.dtype == bool else mask, (size[1], size[0]))
    return resized.astype(mask.dtype)


def _listed(output, field: str):
    """The output's masks of `field` (none: `[]`), as they are: `LazyMasks` (thousands of images) make each mask when
    indexed, so that writing them never holds them all."""
    values = getattr(output, field, None)
    return [] if values is None else values


def write_mask_files(output, out_dir: str, document: dict) -> list[str]:
    """Full-resolution PNGs of the masks (`masks/mask_III.png`, 1-bit) and part masks (`masks/parts_III.png`,
    palette: pixel value = part id), named in `document["masks"][i]["file"]` and `document["parts_files"]`.

    Returns:
        the written paths relative to `out_dir`.
    """
    import PIL.Image

    from cosegment.utils.files import atomic_open
    from cosegment.utils.visualization import part_colors

    written = []
    for field, name in (("masks", "mask"), ("part_masks", "parts")):
        for i, value in enumerate(_listed(output, field)):
            value = np.asarray(value)
            if field == "masks":
                picture = PIL.Image.fromarray(value.astype(bool))
            else:
                picture = PIL.Image.frombytes("P", value.shape[::-1], np.ascontiguousarray(value, np.uint8).tobytes())
                palette = part_colors(max(int(value.max(initial=0)), 1)).astype(np.uint8)
                picture.putpalette(palette.reshape(-1).tolist())
            relative = f"masks/{name}_{i:03d}.png"
            os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
            with atomic_open(os.path.join(out_dir, relative), "wb") as handle:
                picture.save(handle, format="PNG", optimize=False)
            written.append(relative)
    if document.get("masks") is not None:
        for i, entry in enumerate(document["masks"]):
            entry["file"] = f"masks/mask_{i:03d}.png"
            entry["array_size"] = list(mask_array_size(*np.asarray(output.masks[i]).shape[:2]))
    if document.get("parts") is not None:
        document["parts_files"] = [f"masks/parts_{i:03d}.png" for i in range(len(document["parts"]))]
    return written


def results_arrays(output) -> dict[str, torch.Tensor]:
    """Every array of the output as named CPU tensors for `results.safetensors`."""
    return {name: make() for name, _, _, make in results_entries(output)}


def results_entries(output) -> list[tuple]:
    """The arrays of `results.safetensors` as `(name, dtype, shape, make)` (`make()` gives the CPU tensor): the
    masks of `LazyMasks` (thousands of images) are made only when written (`save_safetensors_streamed`)."""
    from cosegment.parts import LazyMasks

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
    later = []
    for field in ("masks", "part_masks"):
        parts, values = field == "part_masks", getattr(output, field, None)
        for i in range(0 if values is None else len(values)):
            if isinstance(values, LazyMasks) and (not parts or values.num_parts <= 255):  # uint8 ids: shape known
                make = _mask_maker(values, i, parts)
                later.append(
                    (f"{field}.{i}", torch.uint8 if parts else torch.bool, mask_array_size(*values.sizes[i]), make)
                )
            else:
                arrays[f"{field}.{i}"] = torch.as_tensor(np.ascontiguousarray(bounded_mask(values[i], parts)))
    for field, dtype in (("keypoints", np.float32), ("keypoint_parts", np.int64)):
        values = getattr(output, field, None)
        if values is None:
            continue
        for i, value in enumerate(values):
            arrays[f"{field}.{i}"] = torch.as_tensor(np.ascontiguousarray(np.asarray(value, dtype=dtype)))
    made = [(name, t.dtype, tuple(t.shape), lambda t=t: t.contiguous()) for name, t in arrays.items()]
    return made + later


def _mask_maker(masks, index: int, parts: bool):
    return lambda: torch.as_tensor(np.ascontiguousarray(bounded_mask(masks[index], parts)))


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


def _image_names(document: dict) -> list[str]:
    """Each image's label in the pictures: its file name, and "outlier" when the run found it to share nothing."""
    outliers = document.get("outliers") or [False] * len(document["images"])
    return [
        os.path.basename(entry["path"]) + (" (outlier)" if outlier else "")
        for entry, outlier in zip(document["images"], outliers)
    ]


def write_figures(
    output,
    images: Sequence[np.ndarray],
    out_dir: str,
    top_k: int = 50,
    max_side: int = 384,
    names: Sequence[str] | None = None,
) -> list[str]:
    """PNG pictures: `pairs/pair_SSS_TTT.png` (top matches) and `images/image_III.png` (maps, mask, parts), numbers
    zero-padded to 3 digits; `names` labels each image in the titles (default: its index).

    Returns:
        the written paths relative to `out_dir`.
    """
    from cosegment.utils.visualization import add_title, draw_correspondences, side_by_side

    names = [f"image {i}" for i in range(len(images))] if names is None else list(names)
    written = []
    os.makedirs(os.path.join(out_dir, "pairs"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    fitted = [_fit(image, max_side) for image in images]
    for pair in output.correspondences:
        s, t = pair.source_index, pair.target_index
        (a, scale_a), (b, scale_b) = fitted[s], fitted[t]
        picture = draw_correspondences(
            a,
            b,
            np.asarray(pair.source_points, dtype=np.float64) * scale_a,
            np.asarray(pair.target_points, dtype=np.float64) * scale_b,
            scores=pair.scores,
            top_k=top_k,
        )
        shown = min(len(pair), top_k)
        found = f"top {shown} of {len(pair)} matches" if len(pair) else "no match kept"
        picture = add_title(picture, found + (" (colour = position in the left image)" if len(pair) else ""))
        picture = add_title(picture, f"{s}: {names[s]}  |  {t}: {names[t]}")  # on top: which files
        relative = f"pairs/pair_{s:03d}_{t:03d}.png"
        _write_png(os.path.join(out_dir, relative), picture)
        written.append(relative)
    for i, (image, scale) in enumerate(fitted):
        picture, _ = side_by_side(image_panels(output, i, image, scale))
        picture = add_title(picture, f"image {i}: {names[i]}")
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


def point_transfers(features, points: np.ndarray, refine: bool, orientations=None) -> list[dict]:
    """`transfer_points` of `points` (image 0's pixels) into every other image: one dict per target image (in the
    analysis's `orientations`, with `--flip`)."""
    from cosegment import transfer_points

    transfers = []
    for target in range(1, features.num_images):
        landed, scores = transfer_points(features, 0, target, points, refine=refine, orientations=orientations)
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
    """A disabled (infinite) threshold -> `null` (JSON has no infinity); numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else (None if value > 0 else "-inf" if value < 0 else "nan")
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
    also_written: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Writes the files of a run into `out_dir`: `results.safetensors`, the pictures (`figures`), the transfers of
    `points` (image 0's pixels, transferred with `features`) and `results.json`, adding `figures`, `points` and
    `files` (every file of the run, `results.json` and `also_written` included: what the caller writes after) to
    `document`.

    Each file is written atomically (a complete file or none). `results.json`, which names the others, goes first and
    comes back last: whenever it exists, the files it names are from the same run. Just before it comes back, the
    files an earlier run left that this run does not write are removed (:func:`remove_stale_outputs`: only names a
    run writes, :data:`OWNED_FILES`).

    Returns:
        the files removed, and the files of `out_dir` that are not a run's (left alone), relative paths.
    """
    from cosegment.utils.files import save_safetensors_streamed, write_text

    os.makedirs(out_dir, exist_ok=True)
    results_json = os.path.join(out_dir, "results.json")
    if os.path.exists(results_json):
        os.remove(results_json)
    path, metadata = os.path.join(out_dir, "results.safetensors"), {"format": RESULTS_FORMAT}
    save_safetensors_streamed(results_entries(output), path, metadata=metadata)  # masks made one at a time
    written = ["results.json", "results.safetensors", *write_mask_files(output, out_dir, document)]
    if figures:
        document["figures"] = write_figures(
            output, images, out_dir, top_k=top_k, max_side=figure_size, names=_image_names(document)
        )
    if points is not None:  # --points (issue 11)
        transfers = point_transfers(features, points, refine, getattr(output, "orientations", None))
        document["points"] = {"source_index": 0, "points": _floats(points), "transfers": transfers}
        if figures:
            document["figures"].append(write_points_figure(images, points, transfers, out_dir, figure_size))
    written += document.get("figures", []) + list(also_written)
    document["files"] = sorted(set(written))
    stale = remove_stale_outputs(out_dir, document["files"])
    write_text(results_json, dumps_results(document))
    return stale
