"""Pictures of the pipeline's outputs: pure OpenCV/numpy functions, arrays in, RGB uint8 arrays out.

Nothing here reads or writes files or touches the pipeline; a caller saves the arrays however it likes (for example
`PIL.Image.fromarray(picture).save("pair.png")`). Shapes: an image is `(H, W, 3)` RGB (`(H, W)` grayscale and
`(H, W, 4)` RGBA are accepted), uint8 in [0, 255] or float in [0, 1]; points are `(K, 2)` float `(x, y)` in that
image's own pixels, as in `PairCorrespondence`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

# Golden-ratio hue steps: part k's hue does not depend on how many parts there are, and neighbours differ strongly.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _pixels(image, name: str) -> np.ndarray:
    """What the pipeline takes as an image -> a numpy array: a PIL image (RGB, or its 16-bit / float grayscale
    pixels), a torch tensor (HW or CHW, moved to the CPU; bool -> float) or a numpy array (as it is)."""
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "getbands") and hasattr(image, "convert"):  # a PIL image (PIL is not imported for the check)
        if image.width == 0 or image.height == 0:
            raise ValueError(f"`{name}` is an empty image of size {image.size}.")
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            array = np.asarray(image)
            return array.astype(np.uint16) if image.mode != "F" else array
        return np.asarray(image.convert("RGB"))
    if type(image).__module__.split(".")[0] == "torch" and hasattr(image, "detach"):
        array = image.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # CHW, as the pipeline takes tensors
        return array.astype(np.float32) if array.dtype == bool else array
    raise TypeError(f"`{name}` must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """An image as the pipeline takes it (PIL; numpy `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)`; torch HW or
    CHW), uint8, uint16 or float in [0, 1] -> `(H, W, 3)` uint8 (a copy)."""
    image = _pixels(image, name)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"`{name}` must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}.")
    if image.dtype == np.uint8:
        out = image
    elif image.dtype == np.uint16:
        out = (image.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"`{name}` contains non-finite values.")
        out = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    else:
        raise TypeError(f"`{name}` must be uint8, uint16 or float in [0, 1], got dtype {image.dtype}.")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out[:, :, :3]).copy()


def _as_points(points, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"`{name}` must have shape (K, 2) (x, y), got {points.shape}.")
    if not np.isfinite(points).all():
        raise ValueError(f"`{name}` contains non-finite coordinates.")
    return points


def part_colors(num_parts: int) -> np.ndarray:
    """Colours of part ids `0..num_parts`: `(num_parts + 1, 3)` uint8 RGB.

    Row 0 (background) is black; row k is part k's colour, a fixed hue `k * 0.618... (mod 1)` at full saturation, so
    a part id has the same colour in every image and whatever `num_parts` is (`part_colors(5)[:3] ==
    part_colors(2)`).
    """
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)) or num_parts < 0:
        raise ValueError(f"`num_parts` must be a non-negative int, got {num_parts!r}.")
    colors = np.zeros((int(num_parts) + 1, 3), dtype=np.uint8)
    for k in range(1, int(num_parts) + 1):
        hue = (k * _GOLDEN) % 1.0
        hsv = np.array([[[round(hue * 179), 255, 255]]], dtype=np.uint8)  # OpenCV's hue range is [0, 180)
        colors[k] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return colors


def match_colors(points: np.ndarray, image_size: Sequence[int]) -> np.ndarray:
    """`(K, 3)` uint8 RGB colour of each match from its source position: hue follows x, brightness follows y.

    Matches that start near each other get similar colours, so a consistent mapping reads as a smooth gradient in
    the target image too.
    """
    points = _as_points(points, "points")
    height, width = int(image_size[0]), int(image_size[1])
    hue = np.clip(points[:, 0] / max(width, 1), 0.0, 1.0) * 150.0
    value = 155.0 + 100.0 * np.clip(points[:, 1] / max(height, 1), 0.0, 1.0)
    hsv = np.stack([hue, np.full_like(hue, 255.0), value], axis=-1).round().astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].reshape(-1, 3)


def side_by_side(images: Sequence[np.ndarray], gap: int = 8, background: int = 255) -> tuple[np.ndarray, list[int]]:
    """Images next to each other, top-aligned: `(max H, sum W + gaps, 3)` uint8 and each image's x offset."""
    if gap < 0:
        raise ValueError(f"`gap` must be >= 0, got {gap}.")
    rgb = [as_rgb_uint8(image, f"images[{i}]") for i, image in enumerate(images)]
    if not rgb:
        raise ValueError("`images` must hold at least one image.")
    height = max(image.shape[0] for image in rgb)
    width = sum(image.shape[1] for image in rgb) + gap * (len(rgb) - 1)
    canvas = np.full((height, width, 3), background, dtype=np.uint8)
    offsets, x = [], 0
    for image in rgb:
        canvas[: image.shape[0], x : x + image.shape[1]] = image
        offsets.append(x)
        x += image.shape[1] + gap
    return canvas, offsets


def draw_correspondences(
    image_a: np.ndarray,
    image_b: np.ndarray,
    points_a,
    points_b,
    scores=None,
    top_k: int | None = 50,
    color: Sequence[int] | None = None,
    thickness: int = 1,
    radius: int = 2,
    gap: int = 8,
) -> np.ndarray:
    """The two images side by side with a line per match from `points_a[k]` to `points_b[k]`.

    Args:
        image_a, image_b: `(H_a, W_a, 3)` and `(H_b, W_b, 3)` images.
        points_a, points_b: `(K, 2)` float `(x, y)` in each image's own pixels.
        scores: `(K,)` confidences; the `top_k` highest are drawn (ties keep the input order). Without scores the
            first `top_k` are drawn.
        top_k: how many matches to draw; `None` draws all.
        color: one RGB colour for every line; by default each match is coloured by its source position
            (:func:`match_colors`).
        thickness, radius: line width and end-point circle radius in pixels (`radius=0` draws no circles).
        gap: white columns between the images.

    Returns:
        `(max(H_a, H_b), W_a + gap + W_b, 3)` uint8 RGB; image b starts at column `W_a + gap`.
    """
    a = as_rgb_uint8(image_a, "image_a")
    points_a, points_b = _as_points(points_a, "points_a"), _as_points(points_b, "points_b")
    if points_a.shape[0] != points_b.shape[0]:
        raise ValueError(
            f"`points_a` and `points_b` must hold the same number of points, got {points_a.shape[0]} and "
            f"{points_b.shape[0]}."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"`top_k` must be a non-negative int or None, got {top_k!r}.")
    if thickness < 1 or radius < 0:
        raise ValueError(f"`thickness` must be >= 1 and `radius` >= 0, got {thickness} and {radius}.")
    order = np.arange(points_a.shape[0])
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != points_a.shape[0]:
            raise ValueError(f"`scores` must have shape ({points_a.shape[0]},), got {scores.shape}.")
        order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    canvas, offsets = side_by_side([a, image_b], gap=gap)
    if color is not None:
        if len(color) != 3:
            raise ValueError(f"`color` must be an RGB triple, got {color!r}.")
        colors = np.tile(np.asarray(color, dtype=np.uint8), (len(order), 1))
    else:
        colors = match_colors(points_a[order], a.shape[:2]) if len(order) else np.zeros((0, 3), np.uint8)
    shift = 4  # sub-pixel precision of OpenCV's drawing (coordinates times 2**shift)
    for k, index in enumerate(order):
        xa, ya = points_a[index]
        xb, yb = points_b[index]
        start = (round(xa * 2**shift), round(ya * 2**shift))
        end = (round((xb + offsets[1]) * 2**shift), round(yb * 2**shift))
        rgb = tuple(int(c) for c in colors[k])
        cv2.line(canvas, start, end, rgb, thickness, cv2.LINE_AA, shift)
        if radius:
            cv2.circle(canvas, start, radius * 2**shift, rgb, -1, cv2.LINE_AA, shift)
            cv2.circle(canvas, end, radius * 2**shift, rgb, -1, cv2.LINE_AA, shift)
    return canvas


def upsample_grid(grid, size: Sequence[int], interpolation: str = "nearest") -> np.ndarray:
    """`(h, w)` token-grid values -> `(H, W)` float32 over the image, each token covering its own cell.

    `interpolation` is `"nearest"` (token cells stay visible) or `"bilinear"` (values at token centres).
    """
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"`heatmap_grid` must be a non-empty (h, w) array, got shape {grid.shape}.")
    modes = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR}
    if interpolation not in modes:
        raise ValueError(f"`interpolation` must be one of {tuple(modes)}, got {interpolation!r}.")
    height, width = int(size[0]), int(size[1])
    return cv2.resize(grid, (width, height), interpolation=modes[interpolation])


def normalize_heatmap(grid, value_range: Sequence[float] | None = None) -> np.ndarray:
    """Values -> [0, 1] float32 by `value_range = (low, high)` (default: the grid's finite min and max).

    A constant grid maps to 0; NaN stays NaN.
    """
    grid = np.asarray(grid, dtype=np.float32)
    finite = grid[np.isfinite(grid)]
    if value_range is None:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    else:
        low, high = float(value_range[0]), float(value_range[1])
        if not (math.isfinite(low) and math.isfinite(high)) or high < low:
            raise ValueError(f"`value_range` must be finite (low, high) with low <= high, got {value_range!r}.")
    scale = high - low
    out = (grid - low) / scale if scale > 0 else np.zeros_like(grid)
    return np.clip(out, 0.0, 1.0)


def overlay_heatmap(
    image: np.ndarray,
    heatmap_grid,
    alpha: float = 0.5,
    value_range: Sequence[float] | None = None,
    colormap: int = cv2.COLORMAP_JET,
    interpolation: str = "nearest",
) -> np.ndarray:
    """A token-grid map (density, entropy, inverse error) coloured and blended over the image.

    Args:
        image: `(H, W, 3)` image.
        heatmap_grid: `(h, w)` values on the token grid (e.g. `output.density_maps[i]`), upsampled to `(H, W)`.
        alpha: weight of the colours, in [0, 1] (1 shows the colour map alone).
        value_range: `(low, high)` mapped to the ends of the colour map; default the map's min and max.
        colormap: an OpenCV colour map (`cv2.COLORMAP_*`); low values get its first colour, high values its last.
        interpolation: `"nearest"` or `"bilinear"` (see :func:`upsample_grid`).

    Returns:
        `(H, W, 3)` uint8 RGB. NaN cells leave the image unchanged.
    """
    rgb = as_rgb_uint8(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    values = normalize_heatmap(heatmap_grid, value_range)
    dense = upsample_grid(values, rgb.shape[:2], interpolation)
    missing = ~np.isfinite(dense)
    levels = (np.nan_to_num(dense, nan=0.0) * 255.0).round().astype(np.uint8)
    colors = cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(colors, alpha, rgb, 1.0 - alpha, 0.0)
    out[missing] = rgb[missing]
    return out


def _part_boundaries(part_mask: np.ndarray) -> np.ndarray:
    """Pixels of a labelled region that touch a pixel of another label (inside the region, never background)."""
    padded = np.pad(part_mask, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(part_mask.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy : dy + part_mask.shape[0], dx : dx + part_mask.shape[1]] != centre
    return differs & (part_mask != 0)


def overlay_parts(
    image: np.ndarray,
    part_mask,
    alpha: float = 0.5,
    colors: np.ndarray | None = None,
    boundaries: bool = True,
    keypoints=None,
    keypoint_parts=None,
    radius: int = 4,
) -> np.ndarray:
    """Part labels blended over the image; background (0) pixels are left exactly as they were.

    Args:
        image: `(H, W, 3)` image.
        part_mask: `(H, W)` int part ids, 0 = background (as `output.part_masks[i]`).
        alpha: weight of the part colours in [0, 1].
        colors: `(P + 1, 3)` uint8 colours by id; defaults to :func:`part_colors` so an id has one colour
            everywhere.
        boundaries: draw each part's border (its pixels next to another label) in its full colour.
        keypoints: optional `(K, 2)` x, y part centres, drawn as filled circles with a white rim.
        keypoint_parts: optional `(K,)` part id of each keypoint (its circle's colour).

    Returns:
        `(H, W, 3)` uint8 RGB.
    """
    rgb = as_rgb_uint8(image)
    labels = np.asarray(part_mask)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"`part_mask` must have the image's shape {rgb.shape[:2]}, got {labels.shape}.")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"`part_mask` must hold integer part ids, got dtype {labels.dtype}.")
    if labels.size and labels.min() < 0:
        raise ValueError(f"`part_mask` must hold ids >= 0, got {labels.min()}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    num_parts = int(labels.max()) if labels.size else 0
    if keypoint_parts is not None:
        keypoint_parts = np.asarray(keypoint_parts, dtype=np.int64).reshape(-1)
        num_parts = max(num_parts, int(keypoint_parts.max()) if keypoint_parts.size else 0)
    colors = part_colors(num_parts) if colors is None else np.asarray(colors, dtype=np.uint8)
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] <= num_parts:
        raise ValueError(f"`colors` must have shape (>= {num_parts + 1}, 3), got {colors.shape}.")
    out = rgb.copy()
    foreground = labels != 0
    painted = colors[labels].astype(np.float32)
    blended = alpha * painted + (1.0 - alpha) * rgb.astype(np.float32)
    out[foreground] = blended[foreground].round().astype(np.uint8)
    if boundaries:
        edge = _part_boundaries(labels)
        out[edge] = colors[labels[edge]]
    if keypoints is not None:
        keypoints = _as_points(keypoints, "keypoints")
        if keypoint_parts is None:
            keypoint_parts = np.zeros(keypoints.shape[0], dtype=np.int64)
        if keypoint_parts.shape[0] != keypoints.shape[0]:
            raise ValueError(f"`keypoint_parts` must have shape ({keypoints.shape[0]},), got {keypoint_parts.shape}.")
        for (x, y), part in zip(keypoints, keypoint_parts):
            centre = (int(round(x)), int(round(y)))
            cv2.circle(out, centre, radius + 1, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(out, centre, radius, tuple(int(c) for c in colors[part]), -1, cv2.LINE_AA)
    return out


def overlay_mask(
    image: np.ndarray,
    mask,
    color: Sequence[int] = (0, 200, 0),
    alpha: float = 0.5,
    dim_background: float = 0.0,
    contour: bool = True,
) -> np.ndarray:
    """A foreground mask blended over the image.

    Args:
        image: `(H, W, 3)` image.
        mask: `(H, W)` bool foreground (as `output.masks[i]`).
        color: RGB of the foreground tint and contour.
        alpha: weight of the tint on foreground pixels, in [0, 1].
        dim_background: darken background pixels by this fraction in [0, 1] (0 leaves them unchanged).
        contour: draw the mask's border (its foreground pixels next to background) in `color`.

    Returns:
        `(H, W, 3)` uint8 RGB.
    """
    rgb = as_rgb_uint8(image)
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"`mask` must have the image's shape {rgb.shape[:2]}, got {mask.shape}.")
    if not (0.0 <= alpha <= 1.0 and 0.0 <= dim_background <= 1.0):
        raise ValueError(f"`alpha` and `dim_background` must be in [0, 1], got {alpha} and {dim_background}.")
    mask = mask.astype(bool)
    out = rgb.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32).reshape(1, 3)
    out[mask] = alpha * tint + (1.0 - alpha) * out[mask]
    out[~mask] *= 1.0 - dim_background
    out = out.round().astype(np.uint8)
    if contour:
        edge = _part_boundaries(mask.astype(np.int32))
        out[edge] = np.asarray(color, dtype=np.uint8)
    return out


def add_title(image: np.ndarray, title: str, height: int = 18) -> np.ndarray:
    """The image with a white band of `height` pixels on top holding `title` in black (in smaller type when it would
    not fit the width, down to a legible minimum)."""
    rgb = as_rgb_uint8(image)
    band = np.full((height, rgb.shape[1], 3), 255, dtype=np.uint8)
    scale = max(0.3, (height - 6) / 22.0)
    while scale > 0.3 and _text_width(title, scale) + 6 > rgb.shape[1]:
        scale = max(0.3, scale - 0.05)
    cv2.putText(band, title, (3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, rgb], axis=0)


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]


def _put_text(canvas: np.ndarray, text: str, x: int, baseline: int, scale: float) -> None:
    cv2.putText(canvas, text, (int(x), int(baseline)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _format_value(value: float) -> str:
    return f"{value:.3g}"


def heatmap_range(heatmap_grid) -> tuple[float, float]:
    """The `(low, high)` that :func:`overlay_heatmap` maps to the ends of its colour map by default (finite min and
    max; `(0, 1)` when nothing is finite)."""
    grid = np.asarray(heatmap_grid, dtype=np.float64)
    finite = grid[np.isfinite(grid)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def colorbar(
    width: int,
    value_range: Sequence[float],
    label: str,
    colormap: int = cv2.COLORMAP_JET,
    bar_height: int = 10,
    text_scale: float = 0.38,
) -> np.ndarray:
    """A horizontal colour bar with its range and what it measures, to put under a heat-map.

    The bar runs from the colour of `low` (left) to that of `high` (right), as :func:`overlay_heatmap` maps them; the
    low and high values are printed under its ends and `label` (the quantity and its unit, e.g.
    `"inverse-mapping entropy (nats)"`) under its middle. A constant map (`low == high`) says so instead.

    Returns:
        `(bar_height + 34, width, 3)` uint8 RGB on white.
    """
    if width < 1:
        raise ValueError(f"`width` must be >= 1, got {width}.")
    low, high = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(low) and math.isfinite(high)) or high < low:
        raise ValueError(f"`value_range` must be finite (low, high) with low <= high, got {value_range!r}.")
    line = 15
    band = np.full((bar_height + 4 + 2 * line, width, 3), 255, dtype=np.uint8)
    margin = min(4, max(0, (width - 1) // 2))
    levels = np.linspace(0, 255, max(1, width - 2 * margin)).round().astype(np.uint8)[None, :]
    if high == low:
        levels[:] = 0  # overlay_heatmap paints a constant map with the colour map's first colour
    colors = cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB)
    band[2 : 2 + bar_height, margin : margin + colors.shape[1]] = colors
    first = bar_height + 2 + line - 3
    if high == low:
        numbers = f"every value is {_format_value(low)}"
        _put_text(band, numbers, max(0, (width - _text_width(numbers, text_scale)) // 2), first, text_scale)
    else:
        left, right = _format_value(low), _format_value(high)
        _put_text(band, left, margin, first, text_scale)
        _put_text(band, right, max(margin, width - margin - _text_width(right, text_scale)), first, text_scale)
    _put_text(band, label, max(0, (width - _text_width(label, text_scale)) // 2), first + line, text_scale)
    return band


def add_colorbar(
    picture: np.ndarray, value_range: Sequence[float], label: str, colormap: int = cv2.COLORMAP_JET
) -> np.ndarray:
    """`picture` (a heat-map made by :func:`overlay_heatmap`) with :func:`colorbar` under it, as wide as it."""
    rgb = as_rgb_uint8(picture, "picture")
    return np.concatenate([rgb, colorbar(rgb.shape[1], value_range, label, colormap)], axis=0)


def legend(
    entries: Sequence[tuple[Sequence[int], str]], width: int, text_scale: float = 0.38, marker: str = "square"
) -> np.ndarray:
    """Colour swatches with their meaning, wrapped onto as many rows as `width` needs.

    Args:
        entries: `(rgb, text)` pairs, e.g. `[((0, 200, 0), "common foreground")]`.
        width: the band's width in pixels (usually the picture's).
        marker: `"square"` swatches, or `"dot"` (a filled circle with a white rim, as part centres are drawn).

    Returns:
        `(rows * 16 + 4, width, 3)` uint8 RGB on white.
    """
    if width < 1:
        raise ValueError(f"`width` must be >= 1, got {width}.")
    if marker not in ("square", "dot"):
        raise ValueError(f"`marker` must be 'square' or 'dot', got {marker!r}.")
    row_height, swatch, gap = 16, 10, 10
    placed, x, row = [], 3, 0
    for color, text in entries:
        if len(color) != 3:
            raise ValueError(f"`entries` colours must be RGB triples, got {color!r}.")
        size = swatch + 4 + _text_width(text, text_scale)
        if x > 3 and x + size > width:
            x, row = 3, row + 1
        placed.append((x, row, tuple(int(c) for c in color), text))
        x += size + gap
    band = np.full((row_height * (row + 1) + 4, width, 3), 255, dtype=np.uint8)
    for x, row, color, text in placed:
        top = 3 + row * row_height
        if marker == "dot":
            centre = (x + swatch // 2, top + swatch // 2)
            cv2.circle(band, centre, swatch // 2, (160, 160, 160), -1, cv2.LINE_AA)
            cv2.circle(band, centre, swatch // 2 - 1, color, -1, cv2.LINE_AA)
        else:
            band[top : top + swatch, x : x + swatch] = color
            cv2.rectangle(band, (x, top), (x + swatch - 1, top + swatch - 1), (120, 120, 120), 1)
        _put_text(band, text, x + swatch + 4, top + swatch, text_scale)
    return band


def add_legend(
    picture: np.ndarray, entries: Sequence[tuple[Sequence[int], str]], marker: str = "square"
) -> np.ndarray:
    """`picture` with :func:`legend` under it, as wide as it."""
    rgb = as_rgb_uint8(picture, "picture")
    return np.concatenate([rgb, legend(entries, rgb.shape[1], marker=marker)], axis=0)


def mask_legend(color: Sequence[int] = (0, 200, 0), dim_background: float = 0.5) -> list[tuple[tuple, str]]:
    """Legend entries of :func:`overlay_mask`: its tint (and, when dimmed, the darkened background)."""
    entries = [(tuple(int(c) for c in color), "common foreground (mask)")]
    if dim_background > 0:
        grey = int(round(128 * (1.0 - dim_background)))
        entries.append(((grey, grey, grey), "background (darkened)"))
    return entries


def parts_legend(part_ids: Sequence[int], colors: np.ndarray | None = None) -> list[tuple[tuple, str]]:
    """Legend entries of :func:`overlay_parts`: each part id's colour (`part_colors` by default)."""
    ids = sorted({int(p) for p in part_ids if int(p) != 0})
    if colors is None:
        colors = part_colors(max(ids, default=0))
    return [(tuple(int(c) for c in colors[k]), f"part {k}") for k in ids]


def draw_points(image: np.ndarray, points, colors, radius: int = 5, labels: Sequence[str] | None = None) -> np.ndarray:
    """The image with a filled circle (dark outline) per point, optionally labelled: same colour = same point.

    Args:
        image: `(H, W, 3)` image.
        points: `(K, 2)` float `(x, y)` in the image's pixels.
        colors: `(K, 3)` uint8 RGB, one per point (e.g. `part_colors(K)[1:]`).
        radius: circle radius in pixels (>= 1).
        labels: `K` short texts drawn beside the points (e.g. their numbers).

    Returns:
        `(H, W, 3)` uint8 RGB (a copy).
    """
    out = as_rgb_uint8(image)
    points = _as_points(points, "points")
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if colors.shape[0] != points.shape[0]:
        raise ValueError(f"`colors` must hold one colour per point ({points.shape[0]}), got {colors.shape[0]}.")
    if radius < 1:
        raise ValueError(f"`radius` must be >= 1, got {radius}.")
    if labels is not None and len(labels) != points.shape[0]:
        raise ValueError(f"`labels` must hold one text per point ({points.shape[0]}), got {len(labels)}.")
    shift = 4
    for k, (x, y) in enumerate(points):
        centre = (round(x * 2**shift), round(y * 2**shift))
        cv2.circle(out, centre, (radius + 1) * 2**shift, (0, 0, 0), -1, cv2.LINE_AA, shift)
        cv2.circle(out, centre, radius * 2**shift, tuple(int(c) for c in colors[k]), -1, cv2.LINE_AA, shift)
        if labels is not None:
            origin = (int(round(x)) + radius + 2, int(round(y)) - radius)
            cv2.putText(out, str(labels[k]), origin, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 2, cv2.LINE_AA)
            cv2.putText(out, str(labels[k]), origin, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out
