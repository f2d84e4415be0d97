"""Exports of a co-segmentation to annotation formats that labelling tools import: `cosegment --export coco`.

COCO (`annotations.json`): per image one annotation holding the common mask (compressed RLE), its box and area, and
the part centres as keypoints `part_1` .. `part_K` (the same part id in every image). See :func:`export_coco`.
"""

import os
from collections.abc import Sequence

import numpy as np

from .utils.coco import coco_document
from .utils.files import write_json

EXPORT_FORMATS = ("coco",)


def check_export_options(export: str, category: str, segment: bool = True) -> None:
    """The export options, checked before any model runs: `export` one of :data:`EXPORT_FORMATS`, `category` a
    non-empty name, and the masks computed (`segment`)."""
    if export not in EXPORT_FORMATS:
        raise ValueError(f"`--export` must be one of {', '.join(EXPORT_FORMATS)}, got {export!r}.")
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"`--category` must be a non-empty name, got {category!r}.")
    if not segment:
        raise ValueError(f"`--export {export}` writes the masks: it cannot be combined with `--no-segment`.")


def coco_file_names(image_paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each image's `file_name`: its path relative to the folder that holds all the images, with `/` separators (the
    bare file names when they share one folder, as annotation tools match them against the uploaded images)."""
    paths = [os.path.abspath(os.fspath(path)) for path in image_paths]
    if not paths:
        return []
    common = os.path.commonpath([os.path.dirname(path) for path in paths])
    return [os.path.relpath(path, common).replace(os.sep, "/") for path in paths]


def _numpy(value) -> np.ndarray:
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def export_coco(
    output, image_paths: Sequence[str | os.PathLike], path: str | os.PathLike, category: str = "object"
) -> dict:
    """Writes the co-segmentation `output` as a COCO annotation file at `path` (atomically) and returns the document.

    - `images`: one entry per image (`id` = index + 1, `file_name` from :func:`coco_file_names`, `width`, `height`
      from the mask, which has the image's own size).
    - `categories`: one, named `category`; with parts, `keypoints` = `["part_1", ..., "part_K"]` and an empty
      `skeleton`, K the largest part id of the collection.
    - `annotations`: one per image whose mask is not empty (`id` = `image_id`): the mask as compressed RLE
      (`segmentation`, what pycocotools' `mask.encode` writes), `bbox` `[x, y, w, h]`, `area` (pixels), `iscrowd` 0,
      and `keypoints` `[x, y, v] * K` in the image's pixels: `v = 2` for a part found in that image, `0, 0, 0` for a
      part it lacks. An image with an empty mask (an outlier, or nothing found) is listed without an annotation.

    Args:
        output: a [`CoSegmentationPipelineOutput`] with masks (numpy or torch), e.g. the pipeline's or
            :func:`cosegment.analyze_features`'s.
        image_paths: the image files, in the order of the collection.
        path: the file to write (`annotations.json`).
        category (`str`, *optional*, defaults to `"object"`): the category's name.
    """
    import cosegment

    masks = getattr(output, "masks", None)
    if masks is None:
        raise ValueError("`output` has no masks (the analysis ran with `segment=False`): nothing to export.")
    if len(image_paths) != len(masks):
        raise ValueError(f"`image_paths` names {len(image_paths)} files for {len(masks)} images.")
    masks = [_numpy(mask).astype(bool) for mask in masks]
    keypoints, parts = getattr(output, "keypoints", None), getattr(output, "keypoint_parts", None)
    num_parts = 0
    if keypoints is not None and parts is not None:
        keypoints = [_numpy(points) for points in keypoints]
        parts = [_numpy(ids).astype(np.int64) for ids in parts]
        num_parts = max([int(ids.max()) for ids in parts if ids.size] + [0])
    part_masks = getattr(output, "part_masks", None)
    if part_masks is not None:
        num_parts = max([num_parts] + [int(_numpy(labels).max(initial=0)) for labels in part_masks])
    document = coco_document(
        masks,
        coco_file_names(image_paths),
        keypoints,
        parts,
        num_parts=num_parts,
        category=category,
        description=f"co-segmentation by cosegment {cosegment.__version__}",
    )
    write_json(os.fspath(path), document)
    return document
