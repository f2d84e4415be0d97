"""COCO annotations (https://cocodataset.org/#format-data) from co-segmentation masks and part keypoints, in numpy.

Masks are written as COCO's compressed run-length encoding, byte for byte what pycocotools' `mask.encode` writes
(column-major runs, each count after the second stored as the difference to the count two before, in 5-bit groups
offset by 48), so `pycocotools.coco.COCO(path).annToMask(annotation)` gives the mask back exactly; pycocotools is not
needed to write the file.
"""

from collections.abc import Sequence

import numpy as np


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of `mask` `(H, W)` read column by column (Fortran order), alternating background and foreground
    and starting with background: a mask whose first pixel is set starts with a count of 0. An empty array gives `[0]`
    (as pycocotools)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return [0] + counts if flat[0] else counts


def compress_counts(counts: Sequence[int]) -> str:
    """COCO's string form of run lengths (pycocotools' `rleToString`): count `i > 2` is stored as `counts[i] -
    counts[i - 2]`, each value as little-endian groups of 5 bits (bit 6 set while more groups follow; the last group
    carries the sign in bit 5), each group plus 48 as one ASCII character."""
    characters = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: a negative value ends at -1
            more = value != -1 if group & 0x10 else value != 0
            characters.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(characters)


def decompress_counts(text: str) -> list[int]:
    """The inverse of :func:`compress_counts` (pycocotools' `rleFrString`)."""
    counts, position = [], 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_mask(mask: np.ndarray) -> dict:
    """`(H, W)` mask -> `{"size": [H, W], "counts": str}`, COCO's compressed RLE (pycocotools' `mask.encode` of the
    Fortran-ordered uint8 mask, its bytes decoded as ASCII)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D (H, W), got shape {tuple(mask.shape)}.")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": compress_counts(rle_counts(mask))}


def decode_mask(rle: dict) -> np.ndarray:
    """COCO's compressed RLE `{"size": [H, W], "counts": str}` -> `(H, W)` bool mask."""
    height, width = (int(v) for v in rle["size"])
    counts = decompress_counts(rle["counts"])
    if sum(counts) != height * width:
        raise ValueError(f"`rle` counts cover {sum(counts)} pixels; its size {height}x{width} has {height * width}.")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((width, height)).T


def mask_bbox(mask: np.ndarray) -> list[float]:
    """`(H, W)` mask -> `[x, y, width, height]` of its set pixels in pixel units (pycocotools' `toBbox`: a box of whole
    pixels, `[0, 0, 0, 0]` for an empty mask)."""
    rows = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=1))
    cols = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def part_keypoints(points: np.ndarray, parts: np.ndarray, num_parts: int) -> list[float]:
    """Part centres -> COCO keypoints `[x_1, y_1, v_1, ..., x_K, y_K, v_K]` for parts `1..num_parts`: `v = 2`
    (labelled, visible) for a part with a centre, `0, 0, 0` for a part absent from the image.

    Args:
        points: `(K_i, 2)` x, y in the image's pixels.
        parts: `(K_i,)` the part id of each point, in `1..num_parts`.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    parts = np.asarray(parts).reshape(-1)
    if parts.shape[0] != points.shape[0]:
        raise ValueError(f"`parts` has {parts.shape[0]} ids for {points.shape[0]} points.")
    if parts.size and (parts.min() < 1 or parts.max() > num_parts):
        raise ValueError(f"`parts` must lie in [1, {num_parts}], got {parts.tolist()}.")
    values: list[float] = [0] * (3 * num_parts)
    for (x, y), part in zip(points.tolist(), parts.tolist()):
        values[3 * (part - 1) : 3 * part] = [x, y, 2]
    return values


def coco_document(
    masks: Sequence[np.ndarray],
    file_names: Sequence[str],
    keypoints: Sequence[np.ndarray] | None = None,
    keypoint_parts: Sequence[np.ndarray] | None = None,
    num_parts: int = 0,
    category: str = "object",
    description: str = "",
) -> dict:
    """A COCO annotation document: one image entry per mask, one category, one annotation per non-empty mask.

    Image `i` has id `i + 1` and its annotation the same id. An annotation holds the mask as compressed RLE, its box
    and area, `iscrowd = 0` and, when `num_parts > 0`, the part keypoints (`"part_1"` .. `"part_K"` in the category,
    an empty skeleton). An empty mask (an outlier image, or nothing found) has no annotation: its image is listed
    unannotated.

    Args:
        masks: per image an `(H_i, W_i)` bool mask at the image's own size.
        file_names: per image its `file_name`.
        keypoints, keypoint_parts: per image the part centres `(K_i, 2)` (x, y) and their part ids `(K_i,)`.
        num_parts: the number of parts of the collection (ids `1..num_parts`); 0 writes no keypoints.
        category: the category's name.
    """
    if len(file_names) != len(masks):
        raise ValueError(f"`file_names` has {len(file_names)} names for {len(masks)} masks.")
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"`category` must be a non-empty string, got {category!r}.")
    with_parts = num_parts > 0 and keypoints is not None and keypoint_parts is not None
    label = {"id": 1, "name": category, "supercategory": category}
    if with_parts:
        label.update(keypoints=[f"part_{k}" for k in range(1, num_parts + 1)], skeleton=[])
    images, annotations = [], []
    for index, (mask, name) in enumerate(zip(masks, file_names)):
        mask = np.asarray(mask, dtype=bool)
        images.append({"id": index + 1, "file_name": name, "width": int(mask.shape[1]), "height": int(mask.shape[0])})
        if not mask.any():
            continue
        annotation = {"id": index + 1, "image_id": index + 1, "category_id": 1, "segmentation": encode_mask(mask)}
        annotation.update(area=int(mask.sum()), bbox=mask_bbox(mask), iscrowd=0)
        if with_parts:
            values = part_keypoints(keypoints[index], keypoint_parts[index], num_parts)
            annotation.update(keypoints=values, num_keypoints=int(sum(v == 2 for v in values[2::3])))
        annotations.append(annotation)
    info = {"description": description} if description else {}
    return {"info": info, "licenses": [], "images": images, "categories": [label], "annotations": annotations}
