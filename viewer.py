"""The offline viewer: one page that shows every result of a run and answers clicks (issue 24).

    from cosegment.viewer import write_viewer, show_viewer
    write_viewer("results/", images, output, features)     # results/index.html (+ results/viewer/*.js)
    show_viewer(images, output, features)                   # inline in Jupyter (one self-contained iframe)

The page opens from `file://` with no server and makes no network request: its code and styles are inline (from
`viewer_assets/`), a Content-Security-Policy forbids anything but the page's own files and `data:` images, and each
image's data (a JPEG at the figure size, its overlays and its transfers) is a `viewer/image_III.js` file that the page
adds as a `<script>` when the image scrolls into view (`fetch` of local files is blocked under `file://`). In the
notebook form everything is inline.

What the page shows: every image with overlays that toggle (common mask, parts with a legend, hit counts,
inverse-mapping entropy and error with a colour bar and unit), each image's `sharing` score and outlier flag, the
pairs with their match counts, a pair view with the matches as lines (score on hover), and clicks: a click is snapped
to the nearest token centre, marked, and in every image analysed with that one (every other image, or the partner
graph under `partners=K`) the page marks where it goes, with its score as the marker's opacity.

Exactness of clicks: for every source token centre of every image `i` and every image `j` analysed with it, the
result of :func:`cosegment.transfer_points` is precomputed (one call per ordered pair, with all `N` centres, on the
features of the two images: the feature corrections are per image, so this equals the call on the whole collection,
and a test checks it). A click shows the stored values: what `transfer_points(features, i, j, [centre])` returns, up
to float32 rounding between a call with one point and a call with N (measured below 1e-4 px). The data grow as
`M x partners x N`, never `M^2 x N^2`.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

VIEWER_FORMAT = "cosegment.viewer/1"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "viewer_assets")
VIEWER_FILES = "viewer"  # folder of the per-image and per-pair data scripts, beside index.html
JPEG_QUALITY = 85
# The three per-image maps: output field, overlay key, title, unit (as in the PNG pictures' colour bars).
MAPS = (
    ("density_maps", "density", "hit count", "kept matches per token"),
    ("entropy_maps", "entropy", "inverse-mapping entropy", "nats (low = confident)"),
    ("inverse_error_maps", "error", "inverse-mapping error", "grid cells (low = consistent)"),
)
MASK_RGBA = ((0, 200, 0, 110), (0, 0, 0, 128), (0, 200, 0, 255))  # foreground tint, darkened background, outline


# ---------------------------------------------------------------------------------------------------------------------
# Pairs and transfers
# ---------------------------------------------------------------------------------------------------------------------


def analysed_pairs(output) -> list[tuple[int, int]]:
    """The pairs `(s, t)`, `s < t`, the run analysed: one per `PairCorrespondence` (every pair, or the partner graph
    under `partners=K`; an outlier's pairs stay listed, empty)."""
    return [(int(pair.source_index), int(pair.target_index)) for pair in output.correspondences]


def partner_lists(num_images: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Per image, the images it was analysed with (ascending)."""
    partners = [set() for _ in range(num_images)]
    for s, t in pairs:
        partners[s].add(t)
        partners[t].add(s)
    return [sorted(p) for p in partners]


def token_centres(grid_size: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """`(N, 2)` float64 x, y of the token centres in an image of `image_size = (H, W)` pixels, token `k = row * w +
    col`: `((col + 0.5) * (W / w), (row + 0.5) * (H / h))`, the formula the page uses to snap a click."""
    h, w = int(grid_size[0]), int(grid_size[1])
    height, width = int(image_size[0]), int(image_size[1])
    rows, cols = np.divmod(np.arange(h * w, dtype=np.float64), w)
    return np.stack([(cols + 0.5) * (width / w), (rows + 0.5) * (height / h)], axis=-1)


def _two_images(features, i: int, j: int):
    """The features of images `i` and `j` only (the corrections of :func:`transfer_points` are per image, so the
    transfers are the same; one call then costs the same at any M)."""
    two = features.select([i, j])  # reads the two images only (of features on disk too)
    two.reference = features.reference
    two.mirrored = None if features.mirrored is None else _two_images(features.mirrored, i, j)
    return two


def precompute_transfers(
    features,
    pairs: Sequence[tuple[int, int]],
    refine: bool = True,
    progress: Callable[[int], object] | None = None,
    orientations=None,
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """For each analysed pair, both ways, `transfer_points(features, i, j, token_centres(i), refine=refine)` (in the
    analysis's `orientations` when given: `--flip`, issue 27).

    Returns:
        `{(i, j): (points, scores)}`: `(N, 2)` float32 x, y in image `j`'s pixels and `(N,)` float32 scores, row `k`
        for token `k` of image `i`. `progress(1)` is called after each ordered pair.
    """
    from cosegment import transfer_points

    if not isinstance(refine, bool):
        raise TypeError(f"`refine` must be a bool, got {type(refine).__name__}.")
    transfers = {}
    for s, t in pairs:
        both = _two_images(features, s, t)
        for i, j, a, b in ((s, t, 0, 1), (t, s, 1, 0)):
            centres = token_centres(features.grid_size, features.image_sizes[i])
            bits = None if orientations is None else [bool(orientations[s]), bool(orientations[t])]
            transfers[(i, j)] = transfer_points(both, a, b, centres, refine=refine, orientations=bits)
            if progress is not None:
                progress(1)
    return transfers


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _floats_b64(array) -> str:
    """Little-endian float32 bytes in base64 (the page reads them as a `Float32Array`: exact float32 values)."""
    return base64.b64encode(np.ascontiguousarray(_numpy(array), dtype="<f4").tobytes()).decode("ascii")


def _data_uri(picture: np.ndarray, kind: str) -> str:
    """`(H, W, 3)` RGB or `(H, W, 4)` RGBA uint8 -> a `data:` URI of a JPEG or PNG."""
    import cv2

    code = cv2.COLOR_RGB2BGR if picture.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if kind == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 9]
    ok, data = cv2.imencode(".jpg" if kind == "jpeg" else ".png", cv2.cvtColor(picture, code), params)
    if not ok:
        raise OSError(f"could not encode a {kind} picture of shape {picture.shape}")
    return f"data:image/{kind};base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _display_size(image_size: Sequence[int], figure_size: int) -> tuple[int, int]:
    """`(height, width)` of the page's copy: the longer side at most `figure_size` (never enlarged)."""
    height, width = int(image_size[0]), int(image_size[1])
    scale = min(1.0, figure_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    import cv2

    if array.shape[:2] == size:
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(array, (size[1], size[0]), interpolation=interpolation)


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels of a labelled region next to another label (outlines and part boundaries)."""
    padded = np.pad(labels, 1, mode="edge")
    differs = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy : dy + labels.shape[0], dx : dx + labels.shape[1]] != labels
    return differs & (labels != 0)


def _mask_picture(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGBA overlay of a foreground mask: green tint and outline, background darkened (as the PNG pictures)."""
    mask = _resize(mask.astype(np.uint8), size, nearest=True).astype(bool)
    rgba = np.empty(mask.shape + (4,), dtype=np.uint8)
    rgba[mask], rgba[~mask] = MASK_RGBA[0], MASK_RGBA[1]
    rgba[_edges(mask.astype(np.int32))] = MASK_RGBA[2]
    return rgba


def _parts_picture(parts: np.ndarray, size: tuple[int, int], colors: np.ndarray) -> np.ndarray:
    """RGBA overlay of part ids: each part in its colour (half transparent, boundaries opaque), background clear."""
    labels = _resize(parts.astype(np.int32), size, nearest=True)
    rgba = np.zeros(labels.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = colors[labels]
    rgba[..., 3] = np.where(labels != 0, 128, 0)
    rgba[_edges(labels), 3] = 255
    return rgba


def _jet_lut() -> str:
    """OpenCV's JET colour map (the PNG pictures' heat-map colours) as 256 hex RGB triples."""
    import cv2

    levels = np.arange(256, dtype=np.uint8)[None, :]
    rgb = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0]
    return "".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in rgb)


# ---------------------------------------------------------------------------------------------------------------------
# Viewer data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ViewerData:
    """Everything the page shows: `manifest` (inline in the page) and per image / per pair the data of one script."""

    manifest: dict
    images: list[dict] = field(default_factory=list)
    pairs: dict[tuple[int, int], dict] = field(default_factory=dict)


def _check_inputs(images, output, features) -> Sequence[np.ndarray]:
    """Images as `(H, W, 3)` uint8; `ValueError` naming the argument when they do not fit the output/features. A list
    or tuple is converted and checked here; other sequences (`cosegment`'s image files, read when indexed) as each
    image is used, so that thousands of them are never held at once."""
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):  # a list, or files read when indexed
        raise TypeError(f"`images` must be a list of images, got {type(images).__name__}.")
    maps = getattr(output, "density_maps", None)
    if maps is None or not hasattr(output, "correspondences"):
        raise TypeError(f"`output` must be a CoSegmentationPipelineOutput, got {type(output).__name__}.")
    num_images = int(_numpy(maps).shape[0])
    if len(images) != num_images:
        raise ValueError(f"`images` must hold the output's {num_images} images, got {len(images)}.")
    if features is not None and features.num_images != num_images:
        raise ValueError(f"`features` must hold the output's {num_images} images, got {features.num_images}.")
    checked = _CheckedImages(images, None if features is None else features.image_sizes)
    return [checked[i] for i in range(num_images)] if isinstance(images, (list, tuple)) else checked


class _CheckedImages(Sequence):
    """`images[i]` as `(H, W, 3)` uint8, checked against the features' image size `sizes[i]`, when indexed."""

    def __init__(self, images: Sequence, sizes: Sequence | None) -> None:
        self.images, self.sizes = images, sizes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        from cosegment.utils.visualization import as_rgb_uint8

        image = as_rgb_uint8(np.asarray(self.images[i]), f"images[{i}]")
        if self.sizes is not None and tuple(image.shape[:2]) != tuple(self.sizes[i]):
            raise ValueError(f"`images[{i}]` is {image.shape[:2]} px but the features say {tuple(self.sizes[i])}.")
        return image


def _map_ranges(output) -> list[dict]:
    """Per map: key, title, unit and the collection-wide finite `[low, high]` (one scale for every image)."""
    entries = []
    for name, key, title, unit in MAPS:
        values = _numpy(getattr(output, name)).astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        entries.append({"key": key, "field": name, "title": title, "unit": unit, "range": [low, high]})
    return entries


def _image_entry(i: int, image: np.ndarray, name: str, output, partners: list[int], figure_size: int) -> dict:
    height, width = image.shape[:2]
    shown = _display_size((height, width), figure_size)
    sharing, outliers = getattr(output, "sharing", None), getattr(output, "outliers", None)
    entry = {
        "index": i,
        "name": name,
        "width": int(width),
        "height": int(height),
        "display": [shown[1], shown[0]],
        "sharing": None if sharing is None else float(_numpy(sharing)[i]),
        "outlier": bool(outliers is not None and bool(_numpy(outliers)[i])),
        "partners": partners,
        "file": f"{VIEWER_FILES}/image_{i:03d}.js",
    }
    if output.masks is not None:
        entry["foreground"] = float(_numpy(output.masks[i]).astype(bool).mean())
    return entry


def _image_record(i: int, image: np.ndarray, output, transfers: dict, entry: dict, colors: np.ndarray) -> dict:
    """Image `i`'s data: its JPEG, the three maps `(3, h, w)`, mask/parts overlays, part centres, and its transfers
    into each partner (`(N, 3)` x, y, score)."""
    size = (entry["display"][1], entry["display"][0])
    record = {
        "image": _data_uri(_resize(image, size, nearest=False), "jpeg"),
        "maps": _floats_b64(np.stack([_numpy(getattr(output, name)[i]) for name, *_ in MAPS])),
        "mask": None,
        "parts": None,
        "keypoints": [],
        "transfers": {},
    }
    if output.masks is not None:
        record["mask"] = _data_uri(_mask_picture(_numpy(output.masks[i]), size), "png")
    if output.part_masks is not None:
        record["parts"] = _data_uri(_parts_picture(_numpy(output.part_masks[i]), size, colors), "png")
    if output.keypoints is not None:
        points = _numpy(output.keypoints[i]).reshape(-1, 2).astype(np.float64)
        labels = output.keypoint_parts[i] if output.keypoint_parts is not None else np.zeros(len(points))
        record["keypoints"] = [[float(x), float(y), int(p)] for (x, y), p in zip(points, _numpy(labels).reshape(-1))]
    for j in entry["partners"]:
        if (i, j) in transfers:
            landed, scores = transfers[(i, j)]
            record["transfers"][str(j)] = _floats_b64(np.concatenate([landed, scores[:, None]], axis=1))
    return record


def _pair_record(pair) -> dict:
    """A pair's matches: `(K, 5)` source x, y, target x, y, score (float32), and `mutual` as a 0/1 string."""
    table = np.zeros((len(pair), 5), dtype=np.float32)
    if len(pair):
        table[:, 0:2] = _numpy(pair.source_points)
        table[:, 2:4] = _numpy(pair.target_points)
        table[:, 4] = _numpy(pair.scores)
    mutual = "".join("1" if m else "0" for m in _numpy(pair.mutual).astype(bool).reshape(-1))
    return {"matches": _floats_b64(table), "mutual": mutual}


def _part_ids(output) -> list[int]:
    """The part ids found anywhere in the collection (masks and keypoints), ascending, background left out."""
    found = set()
    for labels in itertools.chain(output.part_masks or [], output.keypoint_parts or []):  # masks made one at a time
        found.update(int(p) for p in np.unique(_numpy(labels)) if int(p) != 0)
    return sorted(found)


def build_viewer(
    images: Sequence,
    output,
    features=None,
    refine: bool = True,
    figure_size: int = 384,
    names: Sequence[str] | None = None,
    title: str | None = None,
    progress: Callable[[int], object] | None = None,
    transfers: dict | None = None,
) -> ViewerData:
    """The viewer's data (see :func:`write_viewer` for the arguments); computes the transfers unless given."""
    from cosegment.utils.visualization import part_colors

    features = features if features is not None else getattr(output, "features", None)
    rgb = _check_inputs(images, output, features)
    if isinstance(figure_size, bool) or not isinstance(figure_size, int) or figure_size < 1:
        raise ValueError(f"`figure_size` must be a positive int, got {figure_size!r}.")
    names = [f"image {i}" for i in range(len(rgb))] if names is None else [str(n) for n in names]
    if len(names) != len(rgb):
        raise ValueError(f"`names` must hold {len(rgb)} names, got {len(names)}.")
    pairs = analysed_pairs(output)
    partners = partner_lists(len(rgb), pairs)
    if transfers is None:
        transfers = (
            {}
            if features is None
            else precompute_transfers(features, pairs, refine, progress, getattr(output, "orientations", None))
        )
    part_ids = _part_ids(output)
    colors = part_colors(max(part_ids, default=0))
    grid = list(_numpy(output.density_maps).shape[1:3])
    entries = [_image_entry(i, image, names[i], output, partners[i], figure_size) for i, image in enumerate(rgb)]
    manifest = {
        "format": VIEWER_FORMAT,
        "title": title or f"cosegment: {len(rgb)} images",
        "grid": grid,
        "refine": bool(refine),
        "transfers": bool(transfers),
        "all_pairs": len(pairs) == len(rgb) * (len(rgb) - 1) // 2,
        "images": entries,
        "pairs": [
            {
                "source": s,
                "target": t,
                "matches": len(pair),
                "mutual": int(_numpy(pair.mutual).astype(bool).sum()),
                "file": f"{VIEWER_FILES}/pair_{s:03d}_{t:03d}.js",
            }
            for (s, t), pair in zip(pairs, output.correspondences)
        ],
        "maps": _map_ranges(output),
        "segmented": output.masks is not None,
        "parts": [{"id": k, "color": [int(c) for c in colors[k]]} for k in part_ids],
        "jet": _jet_lut(),
    }
    data = ViewerData(manifest)
    data.images = [_image_record(i, rgb[i], output, transfers, entries[i], colors) for i in range(len(rgb))]
    data.pairs = {(s, t): _pair_record(pair) for (s, t), pair in zip(pairs, output.correspondences)}
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------------------------


def _script_json(value) -> str:
    """JSON safe inside a `<script>` element (no `</script>` can close it early)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _image_script(i: int, record: dict) -> str:
    return f"cosegmentViewer.registerImage({i},{_script_json(record)});\n"


def _pair_script(s: int, t: int, record: dict) -> str:
    return f"cosegmentViewer.registerPair({s},{t},{_script_json(record)});\n"


def _asset(name: str) -> str:
    with open(os.path.join(ASSETS, name), encoding="utf-8") as handle:
        return handle.read()


def render_page(manifest: dict, inline_data: str | None = None) -> str:
    """The page: the template with its styles, code and `manifest` inline; `inline_data` (scripts that register every
    image and pair) for a self-contained page, or `None` to load `viewer/*.js` as images scroll into view."""
    script_source = "'unsafe-inline'" if inline_data is not None else "'unsafe-inline' 'self' file:"
    data = "" if inline_data is None else f"<script>\n{inline_data}</script>"
    values = {
        "TITLE": html.escape(manifest["title"]),
        "CSP": f"default-src 'none'; script-src {script_source}; style-src 'unsafe-inline'; img-src data:",
        "CSS": _asset("viewer.css"),
        "JS": _asset("viewer.js"),
        "MANIFEST": _script_json(manifest),
        "DATA": data,
    }
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda match: values[match.group(1)], _asset("viewer.html"))


def _remove_stale(folder: str, kept: set[str]) -> None:
    """Data scripts of an earlier viewer in `folder` that this one does not use (e.g. a run with more images)."""
    pattern = re.compile(r"(image_\d{3,}|pair_\d{3,}_\d{3,})\.js")
    for name in os.listdir(folder):
        if pattern.fullmatch(name) and name not in kept:
            os.remove(os.path.join(folder, name))


def write_viewer(
    out_dir: str | os.PathLike,
    images: Sequence,
    output,
    features=None,
    refine: bool = True,
    figure_size: int = 384,
    names: Sequence[str] | None = None,
    title: str | None = None,
    progress: Callable[[int], object] | None = None,
    transfers: dict | None = None,
) -> str:
    """Writes `out_dir/index.html` and its data scripts `out_dir/viewer/image_III.js`, `pair_SSS_TTT.js`.

    Args:
        out_dir (`str`): the output folder (created).
        images (`list`): the collection as `(H, W, 3)` arrays (or PIL images), at their own sizes.
        output (`CoSegmentationPipelineOutput`): the analysis of these images (numpy or torch fields).
        features (`CoSegmentationFeatures`, *optional*): the captured features; defaults to `output.features`.
            Without them the page shows everything but the click transfers.
        refine (`bool`, *optional*, defaults to `True`): the `refine` of :func:`cosegment.transfer_points` (the run's
            setting: `False` under `--no-refine`).
        figure_size (`int`, *optional*, defaults to 384): longer side of the page's copies of the images, in pixels.
        names (`list[str]`, *optional*): a name per image (e.g. file names).
        title (`str`, *optional*): the page's title.
        progress (*optional*): called with 1 after each ordered pair's transfers.
        transfers (`dict`, *optional*): what :func:`precompute_transfers` returned for these features, pairs and
            `refine` (to write the page again, e.g. at another figure size, without recomputing them).

    Returns:
        the path of `index.html`. Every file is written atomically, `index.html` last.
    """
    from cosegment.utils.files import write_text

    data = build_viewer(images, output, features, refine, figure_size, names, title, progress, transfers)
    folder = os.path.join(os.fspath(out_dir), VIEWER_FILES)
    os.makedirs(folder, exist_ok=True)
    written = set()
    for i, record in enumerate(data.images):
        name = os.path.basename(data.manifest["images"][i]["file"])
        write_text(os.path.join(folder, name), _image_script(i, record))
        written.add(name)
    for entry in data.manifest["pairs"]:
        name = os.path.basename(entry["file"])
        s, t = entry["source"], entry["target"]
        write_text(os.path.join(folder, name), _pair_script(s, t, data.pairs[(s, t)]))
        written.add(name)
    _remove_stale(folder, written)
    path = os.path.join(os.fspath(out_dir), "index.html")
    write_text(path, render_page(data.manifest))
    return path


def viewer_html(
    images: Sequence,
    output,
    features=None,
    refine: bool = True,
    figure_size: int = 384,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """The viewer as one self-contained HTML page (every image and pair inline); arguments as :func:`write_viewer`."""
    data = build_viewer(images, output, features, refine, figure_size, names, title)
    scripts = [_image_script(i, record) for i, record in enumerate(data.images)]
    scripts += [_pair_script(s, t, record) for (s, t), record in data.pairs.items()]
    return render_page(data.manifest, "".join(scripts))


class ViewerHTML:
    """A self-contained viewer page; Jupyter shows it inline (`_repr_html_`: an iframe whose `srcdoc` is the page).

    Attributes:
        html (`str`): the page.
        height (`int`): the iframe's height in pixels.
    """

    def __init__(self, page: str, height: int = 760) -> None:
        self.html = page
        self.height = height

    def _repr_html_(self) -> str:
        return (
            f'<iframe class="cosegment-viewer" srcdoc="{html.escape(self.html, quote=True)}" '
            f'style="width: 100%; height: {int(self.height)}px; border: 1px solid #ccc" sandbox="allow-scripts">'
            "</iframe>"
        )

    def save(self, path: str | os.PathLike) -> str:
        """Writes the page to `path` (one file, opens from `file://`); returns the path."""
        from cosegment.utils.files import write_text

        write_text(path, self.html)
        return os.fspath(path)


def show_viewer(
    images: Sequence,
    output,
    features=None,
    refine: bool = True,
    figure_size: int = 384,
    names: Sequence[str] | None = None,
    title: str | None = None,
    height: int = 760,
) -> ViewerHTML:
    """The viewer inline in a notebook: `show_viewer(images, output)` as the last line of a cell shows it.

    Arguments as :func:`write_viewer`; `features` defaults to `output.features` (run the pipeline with
    `return_features=True` to click points). Everything is inline, so the notebook grows by about the size of
    `write_viewer`'s files: for large collections write the files and open `index.html` instead.
    """
    return ViewerHTML(viewer_html(images, output, features, refine, figure_size, names, title), height)


# ---------------------------------------------------------------------------------------------------------------------
# `cosegment view OUT`
# ---------------------------------------------------------------------------------------------------------------------


def browser_available() -> bool:
    """Whether opening a browser can show a window without blocking: never under CI, on Linux only with a display."""
    if os.environ.get("CI") or os.environ.get("COSEGMENT_NO_BROWSER"):
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return sys.platform in ("darwin", "win32")


def view_main(argv: Sequence[str]) -> int:
    """`cosegment view OUT [--no-open]`: prints the path of `OUT/index.html` and opens it where a browser is."""
    import argparse
    import pathlib
    import webbrowser

    parser = argparse.ArgumentParser(prog="cosegment view", description=view_main.__doc__)
    parser.add_argument("out", metavar="OUT", help="output folder of a `cosegment` run")
    parser.add_argument("--no-open", action="store_true", help="only print the path")
    args = parser.parse_args(list(argv))
    path = os.path.abspath(os.path.join(args.out, "index.html"))
    if not os.path.isfile(path):
        print(
            f"cosegment view: no viewer at {path} (run `cosegment ... --out {args.out}` without --no-viewer)",
            file=sys.stderr,
        )
        return 1
    print(path)
    if not args.no_open and browser_available():
        webbrowser.open(pathlib.Path(path).as_uri())
    return 0
