"""`cosegment-eval`: keypoint transfer (PCK) on SPair-71k and CUB-200-2011, co-segmentation (Jaccard) on CUB.

    cosegment-eval spair /data/SPair-71k --split test --categories cat dog --limit 50 --out spair.json
    cosegment-eval cub /data/CUB_200_2011 --limit 20 --out cub.json

Keypoint transfer: a source keypoint at pixel `(x, y)` falls in one token of the source grid; its prediction is the
centre, in the target image's pixels, of the target token that this token's row of the cross self-attention `A_st`
(heads, layers and noise draws averaged, seed Eq. 2.4-2.6) peaks on: the full argmax, with no selection threshold,
so every keypoint gets a prediction and an unreliable one simply counts as a miss. The precision is limited by the
token grid (32 x 32 at 512 px: 16 px cells).

PCK@alpha: a prediction is correct when it lies within `alpha * max(w, h)` of the true target keypoint, `(w, h)` the
target's bounding box (SPair-71k's convention; CUB uses its `bounding_boxes.txt`, or the image size without it).
"PCK per image" averages each pair's fraction of correct keypoints, "PCK per keypoint" pools all keypoints.

The scoring (:func:`pck_threshold`, :func:`correct_keypoints`, :func:`jaccard`, :func:`summarize`) and the dataset
readers are pure and testable without a model; :class:`PipelinePredictor` binds them to a pipeline.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads with the model, so that `cosegment-eval --help` and the dataset checks stay quick
    import torch

EVAL_FORMAT = "cosegment.evaluation/1"
SPAIR_SPLITS = ("trn", "val", "test")


# ---------------------------------------------------------------------------------------------------------------------
# Scoring (pure)
# ---------------------------------------------------------------------------------------------------------------------


def pck_threshold(bbox: Sequence[float], alpha: float = 0.1) -> float:
    """`alpha * max(w, h)` of a bounding box `(x1, y1, x2, y2)` in pixels."""
    if len(bbox) != 4:
        raise ValueError(f"`bbox` must be (x1, y1, x2, y2), got {bbox!r}.")
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"`alpha` must be a positive number, got {alpha!r}.")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"`bbox` must have x2 >= x1 and y2 >= y1, got {bbox!r}.")
    return alpha * max(x2 - x1, y2 - y1)


def correct_keypoints(predicted, target, threshold: float) -> np.ndarray:
    """`(K,)` bool: `||predicted_k - target_k||_2 <= threshold` for `(K, 2)` x, y keypoints."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1, 2)
    target = np.asarray(target, dtype=np.float64).reshape(-1, 2)
    if predicted.shape != target.shape:
        raise ValueError(f"`predicted` {predicted.shape} and `target` {target.shape} must have the same shape.")
    if not threshold >= 0:
        raise ValueError(f"`threshold` must be >= 0, got {threshold!r}.")
    return np.linalg.norm(predicted - target, axis=1) <= threshold


def jaccard(predicted, target) -> float:
    """Intersection over union of two `(H, W)` masks (1.0 when both are empty)."""
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    if predicted.shape != target.shape:
        raise ValueError(f"`predicted` {predicted.shape} and `target` {target.shape} must have the same shape.")
    union = np.logical_or(predicted, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, target).sum() / union)


def summarize(records: Sequence[dict]) -> dict:
    """Per category and overall: pairs, keypoints, PCK per image and per keypoint, mean Jaccard.

    Args:
        records: dicts with `category` and either `correct` (list of bool, one per keypoint: a keypoint pair) or
            `jaccard` (float: a segmented image).

    Returns:
        `{"categories": {name: metrics}, "overall": metrics}`; a metric with nothing to average is `None`.
    """

    def metrics(group: list[dict]) -> dict:
        pairs = [r for r in group if "correct" in r and len(r["correct"])]
        masks = [r for r in group if r.get("jaccard") is not None]
        keypoints = sum(len(r["correct"]) for r in pairs)
        return {
            "pairs": len(pairs),
            "keypoints": keypoints,
            "pck_per_image": float(np.mean([np.mean(r["correct"]) for r in pairs])) if pairs else None,
            "pck_per_keypoint": float(sum(sum(r["correct"]) for r in pairs) / keypoints) if keypoints else None,
            "segmented_images": len(masks),
            "jaccard": float(np.mean([r["jaccard"] for r in masks])) if masks else None,
        }

    categories = sorted({r["category"] for r in records})
    return {
        "categories": {c: metrics([r for r in records if r["category"] == c]) for c in categories},
        "overall": metrics(list(records)),
    }


def format_table(summary: dict, alpha: float = 0.1) -> str:
    """A plain-text table of :func:`summarize`'s output."""

    def cell(value) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    header = ("category", "pairs", "kps", f"PCK@{alpha:g} img", f"PCK@{alpha:g} kp", "images", "Jaccard")
    rows = [header]
    for name, m in list(summary["categories"].items()) + [("ALL", summary["overall"])]:
        rows.append(
            (
                name,
                str(m["pairs"]),
                str(m["keypoints"]),
                cell(m["pck_per_image"]),
                cell(m["pck_per_keypoint"]),
                str(m["segmented_images"]),
                cell(m["jaccard"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets (their published layouts)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class KeypointPair:
    """One evaluation pair: keypoints of the same parts in two images, x, y in each image's own pixels."""

    name: str
    category: str
    source_image: str
    target_image: str
    source_keypoints: np.ndarray
    target_keypoints: np.ndarray
    target_bbox: tuple[float, float, float, float]
    keypoint_ids: list[int] = field(default_factory=list)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive int or None, got {limit!r}.")


def load_spair_pairs(
    root: str, split: str = "test", categories: Sequence[str] | None = None, limit: int | None = None
) -> list[KeypointPair]:
    """SPair-71k pairs from `root/PairAnnotation/<split>/*.json` and images under `root/JPEGImages/<category>/`.

    Args:
        root: the dataset folder (holding `PairAnnotation/` and `JPEGImages/`).
        split: `"trn"`, `"val"` or `"test"`.
        categories: keep only these categories (e.g. `["cat", "dog"]`); all by default.
        limit: at most this many pairs per category (the first by file name).
    """
    if split not in SPAIR_SPLITS:
        raise ValueError(f"`split` must be one of {SPAIR_SPLITS}, got {split!r}.")
    _check_limit(limit)
    folder = os.path.join(root, "PairAnnotation", split)
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not files:
        raise ValueError(f"`root` {root!r} has no SPair-71k annotations in {folder}.")
    wanted = set(categories) if categories else None
    pairs, counts = [], {}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            a = json.load(handle)
        category = a["category"]
        if wanted is not None and category not in wanted:
            continue
        if limit is not None and counts.get(category, 0) >= limit:
            continue
        counts[category] = counts.get(category, 0) + 1
        pairs.append(
            KeypointPair(
                name=os.path.splitext(os.path.basename(path))[0],
                category=category,
                source_image=os.path.join(root, "JPEGImages", category, a["src_imname"]),
                target_image=os.path.join(root, "JPEGImages", category, a["trg_imname"]),
                source_keypoints=np.asarray(a["src_kps"], dtype=np.float64).reshape(-1, 2),
                target_keypoints=np.asarray(a["trg_kps"], dtype=np.float64).reshape(-1, 2),
                target_bbox=tuple(float(v) for v in a["trg_bndbox"]),
                keypoint_ids=[int(v) for v in a.get("kps_ids", [])],
            )
        )
    if wanted is not None and not pairs:
        raise ValueError(f"`categories` {sorted(wanted)} match no pair in {folder}.")
    return pairs


def _read_table(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8") as handle:
        return [line.split() for line in handle if line.strip()]


def _cub_category(relative_path: str) -> str:
    return relative_path.replace("\\", "/").split("/")[0]


def _cub_matches(category: str, wanted: set[str] | None) -> bool:
    """`001.Black_footed_Albatross` matches itself, `Black_footed_Albatross` and `001`."""
    if wanted is None:
        return True
    number, _, name = category.partition(".")
    return bool({category, name, number} & wanted)


def load_cub(root: str, categories: Sequence[str] | None = None, limit: int | None = None) -> dict:
    """CUB-200-2011's `images.txt`, `parts/part_locs.txt`, `bounding_boxes.txt` and `segmentations/` (optional).

    Returns:
        `{"images": [{"id", "path", "category", "bbox" (x1, y1, x2, y2) or None, "mask" path or None,
        "parts": {part_id: (x, y)} (visible parts only)}, ...]}`: per category at most `limit + 1` images (the first
        by id), so that `limit` consecutive pairs can be formed.
    """
    _check_limit(limit)
    images_file = os.path.join(root, "images.txt")
    if not os.path.isfile(images_file):
        raise ValueError(f"`root` {root!r} is not a CUB-200-2011 folder (no images.txt).")
    wanted = set(categories) if categories else None
    boxes = {}
    if os.path.isfile(os.path.join(root, "bounding_boxes.txt")):
        for image_id, x, y, w, h in _read_table(os.path.join(root, "bounding_boxes.txt")):
            x, y, w, h = float(x), float(y), float(w), float(h)
            boxes[int(image_id)] = (x, y, x + w, y + h)
    parts: dict[int, dict[int, tuple[float, float]]] = {}
    parts_file = os.path.join(root, "parts", "part_locs.txt")
    if os.path.isfile(parts_file):
        for image_id, part_id, x, y, visible in _read_table(parts_file):
            if int(float(visible)):
                parts.setdefault(int(image_id), {})[int(part_id)] = (float(x), float(y))
    images, counts = [], {}
    for image_id, relative in sorted(_read_table(images_file), key=lambda row: int(row[0])):
        category = _cub_category(relative)
        if not _cub_matches(category, wanted):
            continue
        if limit is not None and counts.get(category, 0) >= limit + 1:
            continue
        counts[category] = counts.get(category, 0) + 1
        mask = os.path.join(root, "segmentations", os.path.splitext(relative)[0] + ".png")
        images.append(
            {
                "id": int(image_id),
                "path": os.path.join(root, "images", relative),
                "category": category,
                "bbox": boxes.get(int(image_id)),
                "mask": mask if os.path.isfile(mask) else None,
                "parts": parts.get(int(image_id), {}),
            }
        )
    if wanted is not None and not images:
        raise ValueError(f"`categories` {sorted(wanted)} match no CUB-200-2011 image in {root}.")
    return {"images": images}


def cub_pairs(cub: dict) -> list[KeypointPair]:
    """Consecutive images of each category as pairs, over the parts visible in both; pairs without any are skipped."""
    import PIL.Image

    pairs = []
    by_category: dict[str, list[dict]] = {}
    for image in cub["images"]:
        by_category.setdefault(image["category"], []).append(image)
    for category, images in by_category.items():
        for source, target in zip(images, images[1:]):
            shared = sorted(set(source["parts"]) & set(target["parts"]))
            if not shared:
                continue
            bbox = target["bbox"]
            if bbox is None:
                with PIL.Image.open(target["path"]) as handle:
                    bbox = (0.0, 0.0, float(handle.width), float(handle.height))
            pairs.append(
                KeypointPair(
                    name=f"{source['id']}-{target['id']}",
                    category=category,
                    source_image=source["path"],
                    target_image=target["path"],
                    source_keypoints=np.array([source["parts"][p] for p in shared], dtype=np.float64),
                    target_keypoints=np.array([target["parts"][p] for p in shared], dtype=np.float64),
                    target_bbox=tuple(bbox),
                    keypoint_ids=shared,
                )
            )
    return pairs


def read_mask(path: str) -> np.ndarray:
    """A CUB segmentation PNG -> `(H, W)` bool (foreground where the annotators' mean exceeds one half)."""
    import PIL.Image

    with PIL.Image.open(path) as handle:
        return np.asarray(handle.convert("L")) > 127


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation loops (any predictor)
# ---------------------------------------------------------------------------------------------------------------------

TransferFn = Callable[[KeypointPair], np.ndarray]
SegmentFn = Callable[[list[str]], "list[np.ndarray] | None"]


def evaluate_keypoints(
    pairs: Sequence[KeypointPair], transfer: TransferFn, alpha: float = 0.1, progress: Callable | None = None
) -> list[dict]:
    """One record per pair: `name`, `category`, `correct` (per keypoint), `threshold`, `predicted`.

    Args:
        transfer: maps a pair to its predicted `(K, 2)` target keypoints (e.g. :meth:`PipelinePredictor.transfer`).
    """
    records = []
    for pair in pairs:
        predicted = np.asarray(transfer(pair), dtype=np.float64).reshape(-1, 2)
        threshold = pck_threshold(pair.target_bbox, alpha)
        correct = correct_keypoints(predicted, pair.target_keypoints, threshold)
        records.append(
            {
                "name": pair.name,
                "category": pair.category,
                "correct": correct.tolist(),
                "threshold": threshold,
                "predicted": predicted.tolist(),
            }
        )
        if progress is not None:
            progress(1)
    return records


def evaluate_cosegmentation(cub: dict, segment: SegmentFn, progress: Callable | None = None) -> list[dict]:
    """Segments each category's images together; one record per image with a ground-truth mask: its Jaccard.

    `segment` maps a list of image paths to `(H_i, W_i)` bool masks, or `None` when it cannot segment (then no
    record is made).
    """
    records = []
    by_category: dict[str, list[dict]] = {}
    for image in cub["images"]:
        if image["mask"] is not None:
            by_category.setdefault(image["category"], []).append(image)
    for category, images in by_category.items():
        if len(images) < 2:
            continue
        masks = segment([image["path"] for image in images])
        if progress is not None:
            progress(1)
        if masks is None:
            continue
        for image, mask in zip(images, masks):
            truth = read_mask(image["mask"])
            records.append({"name": str(image["id"]), "category": category, "jaccard": jaccard(mask, truth)})
    return records


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline as a predictor
# ---------------------------------------------------------------------------------------------------------------------


def keypoint_tokens(keypoints, image_size: Sequence[int], grid_size: Sequence[int]) -> torch.Tensor:
    """`(K, 2)` x, y pixels of an image of `(H, W)` -> `(K,)` long index of the token (row-major) holding each."""
    import torch

    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    height, width = image_size
    h, w = grid_size
    cols = np.clip(np.floor(keypoints[:, 0] / width * w), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(keypoints[:, 1] / height * h), 0, h - 1).astype(np.int64)
    return torch.from_numpy(rows * w + cols)


def transfer_keypoints(
    features, source: int, target: int, keypoints, refine: bool = True, orientations=None
) -> np.ndarray:
    """Source keypoints -> predicted target keypoints by :func:`cosegment.transfer_points` (each keypoint's query
    read bilinearly at the keypoint; refined below the token grid unless `refine=False`, which gives the token
    centre of the plain argmax of the keypoint's row of `A_st`).

    Args:
        features: `CoSegmentationFeatures` holding both images.
        source, target: image indices in `features`.
        keypoints: `(K, 2)` x, y in the source image's own pixels; annotations just outside the image (datasets
            have a few on or past the border) are moved onto its border first.
        refine: refine below the token grid.
        orientations: `(M,)` bools, transfer in this orientation (`features.mirrored` needed; `--flip`).

    Returns:
        `(K, 2)` float x, y in the target image's own pixels.
    """
    from cosegment import transfer_points

    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    height, width = features.image_sizes[source]
    keypoints = np.clip(keypoints, 0, [width, height])
    points, _ = transfer_points(features, source, target, keypoints, refine=refine, orientations=orientations)
    return points.astype(np.float64)


class PipelinePredictor:
    """Binds a `StableDiffusionCoSegmentationPipeline` to the evaluation loops.

    `refine`: keypoints transferred below the token grid (`False`: token centres of the plain argmax). Every call
    captures its images afresh with a generator seeded by `seed`, so results do not depend on the order
    in which pairs are evaluated. `flip` (`--flip`, issue 27): capture each image flipped left-right too; a pair's
    keypoints are transferred in the orientation its two images' evidence decides
    (:func:`cosegment.orientation.collection_orientations`), and the co-segmentation decides over the whole category.
    """

    def __init__(self, pipe, seed: int = 0, refine: bool = True, flip: bool = False, **capture) -> None:
        self.pipe = pipe
        self.seed = seed
        self.refine = refine
        self.flip = flip
        self.capture = capture

    def _generator(self) -> torch.Generator:
        import torch

        return torch.Generator().manual_seed(self.seed)

    @staticmethod
    def _load(path: str) -> np.ndarray:
        import PIL.Image

        with PIL.Image.open(path) as handle:
            return np.asarray(handle.convert("RGB"))

    def transfer(self, pair: KeypointPair) -> np.ndarray:
        images = [self._load(pair.source_image), self._load(pair.target_image)]
        features = self.pipe.capture_features(images, generator=self._generator(), flip=self.flip, **self.capture)
        orientations = None
        if self.flip:
            from cosegment.orientation import collection_orientations

            orientations = collection_orientations(features, features.mirrored).flipped
        return transfer_keypoints(features, 0, 1, pair.source_keypoints, self.refine, orientations)

    def segment(self, paths: list[str]) -> list[np.ndarray] | None:
        images = [self._load(path) for path in paths]
        output = self.pipe(image=images, generator=self._generator(), flip=self.flip, **self.capture)
        return None if output.masks is None else [np.asarray(mask, dtype=bool) for mask in output.masks]


# ---------------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from cosegment.utils.command_line import (
        DEFAULT_MODEL_ID,
        DTYPE_NAMES,
        TINY_PIPELINE_HINT,
        ArgumentParser,
        add_common_arguments,
        positive_float,
        positive_int,
    )

    parser = ArgumentParser(prog="cosegment-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=("spair", "cub"), help="which benchmark: spair (SPair-71k) or cub")
    parser.add_argument("root", help="the dataset folder, in its published layout")
    parser.add_argument("--split", default="test", choices=SPAIR_SPLITS, help="SPair-71k split (default test)")
    parser.add_argument(
        "--categories", nargs="+", default=None, help="only these categories (CUB: number, name or both)"
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="at most this many pairs per category (default all)"
    )
    parser.add_argument(
        "--alpha", type=positive_float, default=0.1, help="PCK threshold as a fraction of the bbox size (default 0.1)"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"Hub id or local pipeline folder (default {DEFAULT_MODEL_ID}); {TINY_PIPELINE_HINT}",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise, the same for every pair (default 0)")
    parser.add_argument("--height", type=positive_int, default=None, help="processing height (default: the model's)")
    parser.add_argument("--width", type=positive_int, default=None, help="processing width (default: the model's)")
    parser.add_argument("--timestep", type=int, default=261, help="diffusion timestep of the noise (default 261)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default="float32", help="model dtype (default float32)"
    )
    parser.add_argument("--no-segmentation", action="store_true", help="CUB: skip the co-segmentation Jaccard")
    parser.add_argument("--out", default=None, help="write the results JSON to this file (default: print only)")
    parser.add_argument(
        "--no-refine",
        action="store_true",
        help="keypoints at token centres of the plain argmax (default: refined below the token grid)",
    )
    parser.add_argument(
        "--flip",
        action="store_true",
        help="also capture every image flipped left-right and transfer in the orientation the evidence decides "
        "(issue 27; unmeasured on real weights)",
    )
    add_common_arguments(parser)
    return parser


def _check_image_files(pairs: Sequence[KeypointPair], cub: dict | None) -> None:
    """Every image the evaluation will read exists (before the model loads)."""
    paths = [path for pair in pairs for path in (pair.source_image, pair.target_image)]
    if cub is not None:
        paths += [image["path"] for image in cub["images"]]
    for path in dict.fromkeys(paths):
        if not os.path.isfile(path):
            raise ValueError(f"`root`: the annotations name the image {path!r}, which does not exist.")


def run(args: argparse.Namespace, predictor: PipelinePredictor | None = None) -> dict:
    """Runs an evaluation; `predictor` defaults to the pipeline named by `--model`.

    The dataset, its image files and every option are checked before the model loads.
    """
    from tqdm.auto import tqdm

    import cosegment
    from cosegment.utils.command_line import check_capture_arguments, check_output_file, resolve_device

    quiet = getattr(args, "quiet", False)
    if args.out:
        check_output_file(args.out)
    if args.dataset == "spair":
        pairs = load_spair_pairs(args.root, args.split, args.categories, args.limit)
        cub = None
    else:
        cub = load_cub(args.root, args.categories, args.limit)
        pairs = cub_pairs(cub)
    _check_image_files(pairs, cub)
    if predictor is None:
        from cosegment.utils.command_line import load_pipeline

        device = resolve_device(getattr(args, "device", "auto"))
        check_capture_arguments(args.model, args.height, args.width, args.timestep)
        pipe = load_pipeline(args.model, device, args.dtype, quiet=quiet)
        pipe.set_progress_bar_config(disable=True)
        capture = {"height": args.height, "width": args.width, "timestep": args.timestep}
        refine, flip = not getattr(args, "no_refine", False), getattr(args, "flip", False)
        predictor = PipelinePredictor(pipe, seed=args.seed, refine=refine, flip=flip, **capture)
    with tqdm(total=len(pairs), desc="keypoint transfer (pairs)", file=sys.stderr, disable=quiet) as bar:
        records = evaluate_keypoints(pairs, predictor.transfer, alpha=args.alpha, progress=bar.update)
    notes = []
    if cub is not None and not args.no_segmentation:
        if not any(image["mask"] is not None for image in cub["images"]):
            notes.append("no segmentations/ folder: Jaccard not measured")
        else:
            categories = len({image["category"] for image in cub["images"] if image["mask"] is not None})
            found = []  # per segmented image: whether its mask has any foreground

            def segment(paths: list[str]) -> list[np.ndarray] | None:
                masks = predictor.segment(paths)
                found.extend(bool(np.asarray(mask).any()) for mask in masks or [])
                return masks

            with tqdm(total=categories, desc="co-segmentation (categories)", file=sys.stderr, disable=quiet) as bar:
                segmented = evaluate_cosegmentation(cub, segment, progress=bar.update)
            if found and not any(found):
                note = "every predicted mask is empty (no common foreground found): Jaccard is 0 wherever the truth is not"
                notes.append(note)
                print(f"warning: {note}; check the model (`--model`) and the processing size", file=sys.stderr)
            if not segmented:
                notes.append("this cosegment version returns no masks: Jaccard not measured")
            records += segmented
    summary = summarize(records)
    document = {
        "format": EVAL_FORMAT,
        "dataset": args.dataset,
        "split": args.split if args.dataset == "spair" else None,
        "categories": args.categories,
        "limit": args.limit,
        "alpha": args.alpha,
        "model": args.model,
        "seed": args.seed,
        "refine": not getattr(args, "no_refine", False),
        **({"flip": True} if getattr(args, "flip", False) else {}),
        "cosegment_version": cosegment.__version__,
        "summary": summary,
        "notes": notes,
        "records": records,
    }
    print(format_table(summary, args.alpha))
    for note in notes:
        print(f"note: {note}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from cosegment.utils.files import write_json

        write_json(args.out, document, indent=1)
    return document


def main(argv: Sequence[str] | None = None) -> int:
    """The `cosegment-eval` command: a bad option, a dataset folder in the wrong layout or a model that cannot be
    loaded is one line on stderr (exit status 2 or 1); `--debug` or `COSEGMENT_DEBUG=1` adds the traceback."""
    from cosegment.utils.command_line import run_command

    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
