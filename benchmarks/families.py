"""Planted generator families with a design / held-out split, Stable-Diffusion-like feature components, content-free
reference captures, and the metrics and table that score `analyze_features` on them.

Independent of :func:`benchmarks.planted.make_planted_features`: its own object layouts, warp (with rotation),
background process and projections. The SD-like components below are shared: planted.py adds them with
:class:`PlantedModel` and :func:`model_components`.

**Families** (the object's outline and its part layout in canonical coordinates `u = (row, col)`, radius `R`):

- `"sectors"`: a wobbly disc cut into `P` angular sectors of unequal widths around its centre;
- `"blobs"`: `P` overlapping discs at the ends of spokes from the centre, one part per disc;
- `"bands"`: an elongated, tapered body along a random axis, cut into `P` bands across that axis;
- `"chain"`: `P` discs of unequal radii along a random bent path, one part per disc.

**Split.** `SPLITS["design"]`: families `sectors` and `blobs`, seeds 0-999: tune only here.
`SPLITS["heldout"]`: families `bands` and `chain` (never used while designing) plus `sectors` at held-out seeds,
seeds 1000-1999: report only. The cells of :func:`run_table` draw their seeds from the split's range.

**One collection.** Every image shows the same object under its own warp (scale 0.7-1.3x, rotation +/-30 deg,
horizontal mirror, shift), unless it is an *outlier* (background only) or has a *hidden* part (that part's tokens
show background: occluded). Object features are a per-part embedding plus a smooth detail field read in canonical
coordinates plus a small per-image appearance shift; the background mixes a per-image smooth field with two "stuff"
embeddings shared by the collection. Observation noise on every token. Queries and keys are projections of the same
feature `x` (`Q = W_q x`, `K = W_k x + key noise`, one pair of projections per layer), as in an attention layer.

**SD-like components** (Loos and Linhardt, "Latent Diffusion U-Net Representations Contain Positional Embeddings and
Anomalies", ICLR 2025 DeLTa workshop), properties of the *model*, hence identical for every image of a collection and
for its reference captures; each is added to `x` before the projections, so it reaches `Q` and `K` alike:

- `positional`: a smooth function of grid position, RMS norm over positions = `positional` x the mean content norm;
- `corners`: the four corner tokens become `sqrt(1 - a^2) content + a |content| c_k` with `a = corners` and `c_k` a
  per-corner vector shared across images (so corners of different images are highly similar);
- `anomalies` high-norm tokens per image at random non-corner positions, `anomaly_norm` x the mean content norm,
  along one direction shared by the model (plus a little per-token variation); their content is replaced.

**Symmetric objects** (issue 27; off unless `symmetric=True`): the family's layout is folded into a bilaterally
symmetric object (:func:`symmetric_layout`: the layout on the right of the object's axis `u_col = 0`, its mirror image
on the left); part `k` on the right has the mirror twin `k + P` on the left, and the two share everything (part
embedding, detail field read at `(u_row, |u_col|)`) but two terms: a "which side of the object" term
`object_side * sign(u_col) * v_obj` (object coordinates: it moves with the object's mirror) and a "which side of the
picture" term `picture_side * sign(col - centre col) * v_pic` (picture coordinates: it does not follow the object's
mirror, as diffusion features carry position and viewpoint cues). `mirror="half"` mirrors half of the images (`"none"`:
none, the collection is the same way round). :func:`make_mirrored` makes the *mirrored capture* of a case: the same
images flipped left-right (see there for what is reflected and what is not).

:func:`make_reference` makes `R` content-free captures of the same model: background statistics only (a per-image
smooth field and noise, no object and none of the collection's shared stuff), the same components, projections,
grid and heads.

Run `python benchmarks/families.py --split design` (or `heldout`, `--quick`) for the tables of the README.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a checkout named `cosegment`: import that checkout
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment":
        sys.path.insert(0, os.path.dirname(_ROOT))

from cosegment import CoSegmentationFeatures, analyze_features  # noqa: E402
from cosegment.benchmarks.planted import _to_numpy, _unit, normalized_mutual_information  # noqa: E402
from cosegment.orientation import decide_orientations, orientation_evidence  # noqa: E402
from cosegment.utils.segmentation import upsample_assignment  # noqa: E402

FAMILIES = ("sectors", "blobs", "bands", "chain")


@dataclass(frozen=True)
class Split:
    """Families and seed range of one side of the benchmark."""

    families: tuple[str, ...]
    seeds: range


SPLITS = {
    "design": Split(("sectors", "blobs"), range(0, 1000)),
    "heldout": Split(("bands", "chain", "sectors"), range(1000, 2000)),
}


def _smooth(rng: np.random.Generator, coords: np.ndarray, channels: int, length: float, waves: int = 48):
    """Random smooth field at `(..., 2)` coords, `E|f|^2 = 1`, correlation length `length`; returns `(..., C)`."""
    freqs = rng.normal(0.0, 1.0 / length, size=(waves, 2))
    phases = rng.uniform(0.0, 2 * np.pi, size=waves)
    amps = rng.normal(0.0, 1.0 / math.sqrt(channels), size=(waves, channels))
    return math.sqrt(2.0 / waves) * np.cos(coords @ freqs.T + phases) @ amps


# ---------------------------------------------------------------------------------------------------------------
# Layouts: canonical outline and parts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """An object's outline and part layout in canonical coordinates (cells at scale 1).

    Attributes:
        family: one of :data:`FAMILIES`.
        num_parts: parts, labelled 1..num_parts.
        radius: nominal radius `R`.
        params: the family's random parameters (see :func:`make_layout`).
        fold: `None`, or `(scale, shift)` of a symmetric object (:func:`symmetric_layout`): the point `u` shows the
            family's layout at `(u_row / scale, |u_col| / scale - shift)`, labelled `k` where `u_col >= 0` and
            `k + num_parts` (its mirror twin) where `u_col < 0`.
    """

    family: str
    num_parts: int
    radius: float
    params: dict
    fold: tuple[float, float] | None = None

    @property
    def num_labels(self) -> int:
        """Part labels: `num_parts`, or `2 num_parts` for a symmetric object (each part and its twin)."""
        return self.num_parts if self.fold is None else 2 * self.num_parts

    def parts_at(self, u_row: np.ndarray, u_col: np.ndarray) -> np.ndarray:
        """Part (1..`num_labels`, 0 outside) at canonical coordinates of any shape."""
        if self.fold is None:
            return self._unfolded_parts(u_row, u_col)
        scale, shift = self.fold
        u_row, u_col = np.asarray(u_row, dtype=float), np.asarray(u_col, dtype=float)
        base = self._unfolded_parts(u_row / scale, np.abs(u_col) / scale - shift)
        return np.where((u_col < 0) & (base > 0), base + self.num_parts, base)

    def _unfolded_parts(self, u_row: np.ndarray, u_col: np.ndarray) -> np.ndarray:
        p, r = self.params, self.radius
        if self.family == "sectors":
            theta = np.arctan2(u_row, u_col)
            outline = r * (1.0 + p["wobble"] * np.cos(2 * theta + p["wobble_phase"]))
            inside = np.hypot(u_row, u_col) < outline
            rel = np.mod(theta - p["start"], 2 * np.pi)
            part = np.searchsorted(p["bounds"], rel, side="right") + 1
            return np.where(inside, np.minimum(part, self.num_parts), 0)
        if self.family == "bands":
            ca, sa = math.cos(p["axis"]), math.sin(p["axis"])
            along = (u_row * sa + u_col * ca) / (p["length"] * r)  # in [-1, 1] on the body
            across = (-u_row * ca + u_col * sa) / (p["width"] * r)
            half = 1.0 - p["taper"] * along**2
            inside = (np.abs(along) < 1.0) & (np.abs(across) < half)
            part = np.searchsorted(p["bounds"], (along + 1.0) / 2.0, side="right") + 1
            return np.where(inside, np.clip(part, 1, self.num_parts), 0)
        # blobs, chain: union of discs, a point belongs to the disc it is deepest inside (relative to its radius)
        centres, radii = p["centres"], p["radii"]
        rel = np.hypot(u_row[..., None] - centres[:, 0], u_col[..., None] - centres[:, 1]) / radii
        return np.where(rel.min(-1) < 1.0, rel.argmin(-1) + 1, 0)

    def area(self) -> float:
        """The object's area in canonical cells squared (sampled every 0.15 cell)."""
        g = np.arange(-4.0 * self.radius, 4.0 * self.radius, 0.15)
        rr, cc = np.meshgrid(g, g, indexing="ij")
        return float((self.parts_at(rr, cc) > 0).sum() * 0.15**2)

    def extent(self) -> float:
        """Largest distance from the canonical origin of a point of the object."""
        g = np.linspace(-4.0 * self.radius, 4.0 * self.radius, 321)
        rr, cc = np.meshgrid(g, g, indexing="ij")
        inside = self.parts_at(rr, cc) > 0
        return float(np.hypot(rr[inside], cc[inside]).max())


def symmetric_layout(layout: Layout, keep: float = 0.85) -> Layout:
    """A bilaterally symmetric object made from `layout` (no randomness): the layout moved right until only the share
    `1 - keep` of its extent left of its centre lies left of the axis `u_col = 0`, that part cut off, and the rest
    mirrored onto the left (part `k` there is `k + P`, the twin); scaled so its area is that of a disc of radius `R`,
    like every family's."""
    if layout.fold is not None:
        raise ValueError("`layout` is already symmetric.")
    g = np.linspace(-4.0 * layout.radius, 4.0 * layout.radius, 321)
    rr, cc = np.meshgrid(g, g, indexing="ij")
    shift = -keep * float(cc[layout.parts_at(rr, cc) > 0].min())
    folded = Layout(layout.family, layout.num_parts, layout.radius, layout.params, fold=(1.0, shift))
    folded.fold = (math.sqrt(np.pi * layout.radius**2 / folded.area()), shift)
    return folded


def _cuts(rng: np.random.Generator, num_parts: int, total: float) -> np.ndarray:
    """`num_parts - 1` increasing cut points of [0, total] into pieces of unequal (Dirichlet(6)) sizes."""
    widths = rng.dirichlet(np.full(num_parts, 6.0)) * total
    return np.cumsum(widths)[:-1]


def make_layout(family: str, num_parts: int, rng: np.random.Generator, radius: float = 7.0) -> Layout:
    """A random layout of `family` with `num_parts` parts (2-6 supported; other counts >= 1 work too)."""
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")
    if not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"`num_parts` must be a positive int, got {num_parts!r}.")
    if family == "sectors":
        params = {
            "wobble": rng.uniform(0.0, 0.15),
            "wobble_phase": rng.uniform(0, 2 * np.pi),
            "start": rng.uniform(0, 2 * np.pi),
            "bounds": _cuts(rng, num_parts, 2 * np.pi),
        }
    elif family == "bands":
        params = {
            "axis": rng.uniform(0, np.pi),
            "length": rng.uniform(1.3, 1.6),
            "width": rng.uniform(0.55, 0.75),
            "taper": rng.uniform(0.0, 0.4),
            "bounds": _cuts(rng, num_parts, 1.0),
        }
    elif family == "blobs":
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(num_parts) / num_parts
        angles = angles + rng.uniform(-0.3, 0.3, size=num_parts)
        dist = radius * rng.uniform(0.45, 0.6, size=num_parts) * (num_parts > 1)
        radii = radius * rng.uniform(0.45, 0.6, size=num_parts) * (1.0 + 0.6 * (num_parts == 1))
        params = {"centres": np.stack([dist * np.sin(angles), dist * np.cos(angles)], -1), "radii": radii}
    else:  # chain
        radii = radius * rng.uniform(0.32, 0.55, size=num_parts)
        heading = rng.uniform(0, 2 * np.pi)
        centres = [np.zeros(2)]
        for k in range(1, num_parts):
            heading += rng.uniform(-0.7, 0.7)
            step = 0.75 * (radii[k - 1] + radii[k])
            centres.append(centres[-1] + step * np.array([math.sin(heading), math.cos(heading)]))
        centres = np.stack(centres)
        centres = centres - centres.mean(0)
        params = {"centres": centres, "radii": radii}
    layout = Layout(family, num_parts, radius, params)
    # the area of a disc of radius R in every family, so families differ in layout, not size
    factor = math.sqrt(np.pi * radius**2 / layout.area())
    if family in ("blobs", "chain"):
        layout.params = {"centres": params["centres"] * factor, "radii": params["radii"] * factor}
    elif family == "bands":
        layout.params = {**params, "length": params["length"] * factor, "width": params["width"] * factor}
    return layout


# ---------------------------------------------------------------------------------------------------------------
# The "model": projections and SD-like components
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PlantedModel:
    """What every capture of one "model" shares: projections and the SD-like components.

    Attributes:
        w_q, w_k: one `(H, d, C)` array per layer; `Q = amp W_q x`, `K = amp W_k x + key noise`.
        amp: feature-to-logit amplitude (`sqrt(sharpness sqrt(d))`).
        noise: observation noise (share of a feature's norm) and key noise.
        content_norm: mean norm of the collection's content tokens (noise included, components not), the unit of the
            component strengths.
        positional: `(N, C)` positional component (zeros when off).
        corner_vectors: `(4, C)` unit vectors of the corner tokens (top-left, top-right, bottom-left, bottom-right).
        corners: corner mixing weight `a` in [0, 1] (0 = off).
        anomaly_direction: `(C,)` unit direction of the high-norm tokens.
        anomalies: high-norm tokens per image; anomaly_norm: their norm, multiples of `content_norm`.
    """

    grid_size: tuple[int, int]
    channels: int
    w_q: list
    w_k: list
    amp: float
    noise: float
    content_norm: float
    positional: np.ndarray
    corner_vectors: np.ndarray
    corners: float
    anomaly_direction: np.ndarray
    anomalies: int
    anomaly_norm: float

    @property
    def corner_tokens(self) -> np.ndarray:
        """`(4,)` token indices of the grid's corners."""
        h, w = self.grid_size
        return np.array([0, w - 1, (h - 1) * w, h * w - 1])

    def add_components(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Adds the components to content features `x` `(M, N, C)`; returns the new features and the `(M, N)` bool
        map of high-norm tokens."""
        x = x + self.positional
        if self.corners > 0:
            c = self.corner_tokens
            norms = np.linalg.norm(x[:, c], axis=-1, keepdims=True)
            x[:, c] = math.sqrt(1.0 - self.corners**2) * x[:, c] + self.corners * norms * self.corner_vectors
        high = np.zeros(x.shape[:2], dtype=bool)
        if self.anomalies > 0:
            candidates = np.setdiff1d(np.arange(x.shape[1]), self.corner_tokens)
            for i in range(x.shape[0]):
                where = rng.choice(candidates, size=self.anomalies, replace=False)
                jitter = 0.3 * _unit(rng.normal(size=(self.anomalies, self.channels)))
                x[i, where] = self.anomaly_norm * self.content_norm * _unit(self.anomaly_direction + jitter)
                high[i, where] = True
        return x, high

    def project(
        self, x: np.ndarray, rng: np.random.Generator, flip_noise: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Queries and keys, one `(M, H, N, d)` float32 tensor per layer, of features `x` `(M, N, C)`; with
        `flip_noise` the key noise (the same draws) is flipped left-right on the grid (a mirrored capture)."""
        queries, keys = [], []
        h, w = self.grid_size
        for w_q, w_k in zip(self.w_q, self.w_k):
            q = self.amp * np.einsum("hdc,mnc->mhnd", w_q, x)
            k = self.amp * np.einsum("hdc,mnc->mhnd", w_k, x)
            key_noise = rng.normal(0.0, 1.0 / math.sqrt(w_q.shape[1]), size=k.shape)
            if flip_noise:
                key_noise = key_noise.reshape(k.shape[:2] + (h, w, -1))[:, :, :, ::-1].reshape(k.shape)
            k = k + self.noise * self.amp * key_noise
            queries.append(torch.from_numpy(q.astype(np.float32)))
            keys.append(torch.from_numpy(k.astype(np.float32)))
        return queries, keys


def model_components(
    rng: np.random.Generator, grid_size: tuple[int, int], channels: int, positional: float, positional_length: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random parts of a model's SD-like components, drawn from `rng` in this order.

    Returns:
        `(N, C)` positional field (a smooth function of position, zero mean over positions, RMS norm over positions
        `positional`; scale it by the content norm), `(4, C)` unit corner vectors (one shared direction plus a
        per-corner part) and the `(C,)` unit direction of the high-norm tokens.
    """
    h, w = grid_size
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    pos = _smooth(rng, np.stack([rows, cols], -1).reshape(h * w, 2), channels, positional_length)
    pos = pos - pos.mean(0)  # a pure function of position: no constant offset
    pos = positional * pos / math.sqrt((pos**2).sum(-1).mean())  # times the content norm once it is measured
    shared_corner = rng.normal(size=channels)
    corner_vectors = _unit(shared_corner + 0.5 * rng.normal(size=(4, channels)))
    return pos, corner_vectors, _unit(rng.normal(size=channels))


def _make_model(
    rng,
    grid_size,
    channels,
    num_heads,
    head_dim,
    num_layers,
    sharpness,
    noise,
    positional,
    corners,
    anomalies,
    anomaly_norm,
    positional_length,
) -> PlantedModel:
    h, w = grid_size
    content_norm = math.sqrt(1.0 + noise**2)  # expected; the collection's measured value replaces it
    w_q, w_k = [], []
    for _ in range(num_layers):
        wq = rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=(num_heads, head_dim, channels))
        w_q.append(wq)
        w_k.append(wq + 0.4 * rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=wq.shape))
    pos, corner_vectors, anomaly_direction = model_components(rng, grid_size, channels, positional, positional_length)
    return PlantedModel(
        grid_size=(h, w),
        channels=channels,
        w_q=w_q,
        w_k=w_k,
        amp=math.sqrt(sharpness * math.sqrt(head_dim)),
        noise=noise,
        content_norm=content_norm,
        positional=pos,
        corner_vectors=corner_vectors,
        corners=float(corners),
        anomaly_direction=anomaly_direction,
        anomalies=int(anomalies),
        anomaly_norm=float(anomaly_norm),
    )


# ---------------------------------------------------------------------------------------------------------------
# A collection and its ground truth
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FamilyCase:
    """A planted collection of one family and its ground truth.

    Attributes:
        features: queries and keys, `(M, H, N, d)` per layer.
        layout: the object's canonical outline and parts.
        scales, angles, mirrors, centres: each image's warp from canonical `u` to grid `(row, col)`:
            `(row, col) = centre + scale * Rot(angle) (u_row, m u_col)`, `m = -1` when mirrored.
        token_parts: `(M, h, w)` int, the *visible* part under each token centre (0 = background, hidden part or
            outlier image).
        full_token_parts: `(M, h, w)` the same with no part hidden (outliers still 0).
        hidden: `(M,)` int, the part hidden in each image (0 = none).
        outliers: `(M,)` bool, images without the object (background only).
        high_norm: `(M, N)` bool, the high-norm anomaly tokens.
        model: the :class:`PlantedModel` (for :func:`make_reference`).
        seed: the seed the collection was made from.
        part_embeddings: `(L + 1, C)` unit part embeddings of the object features, one per label (row 0 unused; a
            symmetric object's twins share theirs).
        options: the arguments of :func:`make_family_case` (for :func:`make_mirrored`).
        kept: `(M,)` the images of the original collection this case keeps (after :meth:`without`), or `None`.
    """

    features: CoSegmentationFeatures
    layout: Layout
    scales: np.ndarray
    angles: np.ndarray
    mirrors: np.ndarray
    centres: np.ndarray
    token_parts: np.ndarray
    full_token_parts: np.ndarray
    hidden: np.ndarray
    outliers: np.ndarray
    high_norm: np.ndarray
    model: PlantedModel
    seed: int
    part_embeddings: np.ndarray | None = None
    options: dict | None = None
    kept: np.ndarray | None = None

    @property
    def num_parts(self) -> int:
        """Planted part labels (a symmetric object: each part and its mirror twin)."""
        return self.layout.num_labels

    @property
    def object_masks(self) -> np.ndarray:
        """`(M, h, w)` bool: token centres on a visible part of the object."""
        return self.token_parts > 0

    def to_canonical(self, image: int, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Grid coordinates of image `image` -> canonical object coordinates."""
        s, a, (cr, cc) = self.scales[image], self.angles[image], self.centres[image]
        dr, dc = (np.asarray(rows) - cr) / s, (np.asarray(cols) - cc) / s
        ur, uc = math.cos(a) * dr + math.sin(a) * dc, -math.sin(a) * dr + math.cos(a) * dc
        return ur, (-uc if self.mirrors[image] else uc)

    def from_canonical(self, image: int, u_row, u_col) -> tuple[np.ndarray, np.ndarray]:
        """Canonical object coordinates -> grid coordinates of image `image`."""
        s, a, (cr, cc) = self.scales[image], self.angles[image], self.centres[image]
        uc = -np.asarray(u_col) if self.mirrors[image] else np.asarray(u_col)
        ur = np.asarray(u_row)
        return cr + s * (math.cos(a) * ur - math.sin(a) * uc), cc + s * (math.sin(a) * ur + math.cos(a) * uc)

    def pixel_parts(self, image: int) -> np.ndarray:
        """`(H_i, W_i)` int: the visible planted part of every pixel of image `image` at its own size."""
        height, width = self.features.image_sizes[image]
        if self.outliers[image]:
            return np.zeros((height, width), dtype=np.int64)
        h, w = self.features.grid_size
        rows = (np.arange(height) + 0.5) * h / height - 0.5
        cols = (np.arange(width) + 0.5) * w / width - 0.5
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        parts = self.layout.parts_at(*self.to_canonical(image, rr, cc))
        return np.where(parts == self.hidden[image], 0, parts) if self.hidden[image] else parts

    def object_size(self, image: int) -> float:
        """The whole object's size in image `image`, grid cells: larger side of its token bounding box (hidden part
        included); NaN for an outlier."""
        if self.outliers[image]:
            return float("nan")
        rows, cols = np.nonzero(self.full_token_parts[image])
        return float(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))

    def without(self, images) -> "FamilyCase":
        """The same collection with images `images` (indices) removed: features and every ground truth field."""
        keep = np.setdiff1d(np.arange(self.features.num_images), np.atleast_1d(images))
        f = self.features
        features = CoSegmentationFeatures(
            [q[keep] for q in f.queries],
            [k[keep] for k in f.keys],
            f.grid_size,
            [f.image_sizes[i] for i in keep],
            list(f.layer_names),
            dict(f.metadata),
        )
        pick = {
            name: getattr(self, name)[keep]
            for name in ("scales", "angles", "mirrors", "centres", "token_parts", "full_token_parts", "hidden")
        }
        return FamilyCase(
            features=features,
            layout=self.layout,
            outliers=self.outliers[keep],
            high_norm=self.high_norm[keep],
            model=self.model,
            seed=self.seed,
            part_embeddings=self.part_embeddings,
            options=self.options,
            kept=(np.arange(f.num_images) if self.kept is None else self.kept)[keep],
            **pick,
        )


def _background(rng, coords, channels, stuff) -> np.ndarray:
    """One image's background `(h, w, C)`: a per-image smooth field, with the collection's stuff embeddings (if any)
    mixed in by a smooth per-image weight; unit expected energy."""
    length = rng.uniform(2.5, 6.0)
    base = _smooth(rng, coords, channels, length)
    if stuff is None:
        return base
    weight = 0.5 + 0.5 * np.tanh(2.0 * _smooth(rng, coords, 1, 6.0)[..., 0])  # in (0, 1), smooth
    which = stuff[rng.integers(len(stuff))]
    return np.sqrt(1.0 - 0.6 * weight)[..., None] * base + np.sqrt(0.6 * weight)[..., None] * which


MIRRORS = ("random", "half", "none")


def make_family_case(
    family: str = "sectors",
    num_images: int = 4,
    num_parts: int = 4,
    seed: int = 0,
    noise: float = 0.3,
    hidden_images: int = 0,
    outlier_images: int = 0,
    positional: float = 0.0,
    corners: float = 0.0,
    anomalies: int = 0,
    anomaly_norm: float = 3.0,
    grid_size: tuple[int, int] = (32, 32),
    num_heads: int = 4,
    head_dim: int = 32,
    channels: int = 64,
    num_layers: int = 1,
    radius: float = 7.0,
    sharpness: float = 25.0,
    part_share: float = 0.45,
    appearance: float = 0.15,
    detail_length: float = 1.5,
    positional_length: float = 5.0,
    symmetric: bool = False,
    object_side: float = 0.0,
    picture_side: float = 0.0,
    mirror: str = "random",
) -> FamilyCase:
    """A planted collection of `family` (see the module docstring); everything random comes from
    `numpy.random.default_rng(seed)`.

    Args:
        family: one of :data:`FAMILIES`.
        num_images: `M` (2-32 and more).
        num_parts: planted parts (2-6).
        seed: the collection's seed (take it from a :data:`SPLITS` range).
        noise: observation noise as a share of a feature's norm (also the key noise).
        hidden_images: images (among those with the object) in which one random part is occluded by background.
        outlier_images: images with no object at all (random positions in the collection); at least 2 must keep it.
        positional: positional component, RMS norm as a multiple of the mean content norm (0 = off).
        corners: corner mixing weight `a` in [0, 1] (0 = off; 0.9 makes corner tokens of different images about
            0.85 cosine-similar).
        anomalies: high-norm tokens per image (0 = off); anomaly_norm: their norm in multiples of the content norm.
        grid_size, num_heads, head_dim, channels, num_layers: `(h, w)`, `H`, `d`, feature width `C`, layers.
        radius: the object's nominal radius in cells at scale 1.
        sharpness: logit of a noise-free token with itself (how peaked attention is).
        part_share: share of an object feature's energy in its part embedding (the rest: detail and appearance).
        appearance: share of an object feature's energy in a per-image appearance shift (lighting, colour).
        detail_length: correlation length of the object's detail field, canonical cells.
        positional_length: correlation length of the positional component, grid cells.
        symmetric: a bilaterally symmetric object (:func:`symmetric_layout`): `2 P` part labels, each part with a
            mirror twin that shares its features but for the two side terms.
        object_side: amplitude of the "which side of the object" term, `sign(u_col) v_obj` (symmetric only).
        picture_side: amplitude of the "which side of the picture" term, `sign(col - centre col) v_pic` (symmetric
            only). The rest of an object feature is scaled by `sqrt(1 - object_side^2 - picture_side^2)`; `v_obj`,
            `v_pic` are unit vectors drawn from the detail field's stream after it, so every other draw is unchanged.
        mirror: which images are mirrored: `"random"` (each with probability 1/2, the default), `"half"` (exactly
            `M // 2`, the images of the smallest draws), `"none"` (no image: the collection is the same way round).
            The same draws in every case, so only the mirrors differ between the three.

    Returns:
        A :class:`FamilyCase`.
    """
    options = dict(locals())
    _check_options(options)
    return _build_case(options)


def _check_options(o: dict) -> None:
    """Checks the arguments of :func:`make_family_case`."""
    num_images = o["num_images"]
    if not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"`num_images` must be an int >= 2, got {num_images!r}.")
    if not 0 <= o["outlier_images"] <= num_images - 2:
        raise ValueError(f"`outlier_images` must be in [0, num_images - 2], got {o['outlier_images']!r}.")
    if not 0 <= o["hidden_images"] <= num_images - o["outlier_images"]:
        raise ValueError(f"`hidden_images` must be in [0, images with the object], got {o['hidden_images']!r}.")
    if not 0.0 <= o["corners"] <= 1.0:
        raise ValueError(f"`corners` must be in [0, 1], got {o['corners']!r}.")
    if o["positional"] < 0 or o["anomalies"] < 0 or o["anomaly_norm"] < 0:
        raise ValueError(
            f"`positional`, `anomalies` and `anomaly_norm` must be >= 0, got {o['positional']!r}, "
            f"{o['anomalies']!r}, {o['anomaly_norm']!r}."
        )
    if o["mirror"] not in MIRRORS:
        raise ValueError(f"`mirror` must be one of {MIRRORS}, got {o['mirror']!r}.")
    sides = (o["object_side"], o["picture_side"])
    if min(sides) < 0 or o["object_side"] ** 2 + o["picture_side"] ** 2 >= 1:
        raise ValueError(
            f"`object_side` and `picture_side` must be >= 0 with squares summing below 1, got {sides[0]!r}, "
            f"{sides[1]!r}."
        )
    if any(sides) and not o["symmetric"]:
        raise ValueError(
            f"`object_side` and `picture_side` need `symmetric`=True, got `symmetric`={o['symmetric']!r}."
        )


def _draw_warps(rng: np.random.Generator, o: dict, extent: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's scale (0.7-1.3x, capped so the whole object fits on the grid), angle and mirror."""
    h, w = o["grid_size"]
    num_images = o["num_images"]
    scales = np.minimum(rng.uniform(0.7, 1.3, size=num_images), ((min(h, w) - 1) / 2 - 0.5) / extent)
    angles = rng.uniform(-np.pi / 6, np.pi / 6, size=num_images)
    draws = rng.random(num_images)
    if o["mirror"] == "half":
        return scales, angles, np.argsort(np.argsort(draws)) < num_images // 2
    if o["mirror"] == "none":
        return scales, angles, np.zeros(num_images, dtype=bool)
    return scales, angles, draws < 0.5


def _object_features(case: FamilyCase, i: int, coords: np.ndarray, look: np.ndarray, o: dict, streams: dict):
    """Image `i`'s part label `(h, w)` and object feature `(h, w, C)` at every token (wherever the object is)."""
    layout = case.layout
    u = np.stack(case.to_canonical(i, coords[..., 0], coords[..., 1]), -1)
    full = layout.parts_at(u[..., 0], u[..., 1])
    freqs, phases, amps = streams["detail"]
    if layout.fold is None:
        detail = math.sqrt(2.0 / 64) * np.cos(u @ freqs.T + phases) @ amps
        part = full
    else:  # symmetric: the twins share the part embedding and the detail field, read at (u_row, |u_col|)
        part = np.where(full > layout.num_parts, full - layout.num_parts, full)
        u = np.stack([u[..., 0], np.abs(u[..., 1])], -1)
        detail = math.sqrt(2.0 / 64) * np.cos(u @ freqs.T + phases) @ amps
    part_share, appearance = o["part_share"], o["appearance"]
    obj = (
        math.sqrt(part_share) * streams["parts"][part]
        + math.sqrt(1.0 - part_share - appearance) * detail
        + math.sqrt(appearance) * look
    )
    if layout.fold is not None:
        a, b = o["object_side"], o["picture_side"]
        object_side = np.where(full > layout.num_parts, -1.0, 1.0)[..., None]
        picture_side = np.sign(coords[..., 1] - case.centres[i][1])[..., None]
        v_obj, v_pic = streams["sides"]
        obj = math.sqrt(1.0 - a**2 - b**2) * obj + a * object_side * v_obj + b * picture_side * v_pic
    return full, obj


def _draw_images(case: FamilyCase, rng: np.random.Generator, o: dict, streams: dict, reflect: bool) -> np.ndarray:
    """Every image's centre, background and appearance draws and its content features `(M, h, w, C)` (fills the
    case's centres and part maps). `reflect`: the mirrored capture (centre column and background reflected)."""
    h, w = o["grid_size"]
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    coords = np.stack([rows, cols], -1)
    extent = case.layout.extent()
    feats = np.empty((o["num_images"], h, w, o["channels"]))
    for i in range(o["num_images"]):
        reach = extent * case.scales[i] + 0.5
        case.centres[i] = [
            rng.uniform(reach, h - 1 - reach) if h - 1 > 2 * reach else (h - 1) / 2,
            rng.uniform(reach, w - 1 - reach) if w - 1 > 2 * reach else (w - 1) / 2,
        ]
        bg = _background(rng, coords, o["channels"], streams["stuff"])
        look = _unit(rng.normal(size=o["channels"]))
        if reflect:
            case.centres[i][1] = w - 1 - case.centres[i][1]
            bg = bg[:, ::-1]
        if case.outliers[i]:
            full = np.zeros((h, w), dtype=np.int64)
        else:
            full, obj = _object_features(case, i, coords, look, o, streams)
        hidden = case.hidden[i]
        visible = np.where(full == hidden, 0, full) if hidden else full
        case.full_token_parts[i], case.token_parts[i] = full, visible
        feats[i] = np.where((visible > 0)[..., None], obj, bg) if visible.any() else bg
    return feats


def _build_case(o: dict, reflect: bool = False, content_norm: float | None = None) -> FamilyCase:
    """The collection of checked options `o`; `reflect`: its mirrored capture (see :func:`make_mirrored`), with the
    model's content norm `content_norm` (the original capture's)."""
    rng = np.random.default_rng(o["seed"])
    h, w = o["grid_size"]
    num_images, num_parts, channels = o["num_images"], o["num_parts"], o["channels"]
    layout = make_layout(o["family"], num_parts, rng, o["radius"])
    if o["symmetric"]:
        layout = symmetric_layout(layout)
    model_args = ("num_heads", "head_dim", "num_layers", "sharpness", "noise", "positional", "corners", "anomalies")
    model = _make_model(
        rng, o["grid_size"], channels, *(o[k] for k in model_args), o["anomaly_norm"], o["positional_length"]
    )
    part_embed = _unit(rng.normal(size=(num_parts + 1, channels)))
    detail_rng = np.random.default_rng(rng.integers(2**63))  # the detail field: one draw, read in every image
    detail_freqs = detail_rng.normal(0.0, 1.0 / o["detail_length"], size=(64, 2))
    detail_phases = detail_rng.uniform(0.0, 2 * np.pi, size=64)
    detail_amps = detail_rng.normal(0.0, 1.0 / math.sqrt(channels), size=(64, channels))
    streams = {"detail": (detail_freqs, detail_phases, detail_amps), "stuff": _unit(rng.normal(size=(2, channels)))}
    if o["symmetric"]:  # the twins' shared embeddings, and the two side directions (after the detail draws)
        part_embed = np.concatenate([part_embed, part_embed[1:]])
        streams["sides"] = _unit(detail_rng.normal(size=(2, channels)))
    streams["parts"] = part_embed

    outliers = np.zeros(num_images, dtype=bool)
    outliers[rng.choice(num_images, size=o["outlier_images"], replace=False)] = True
    hidden = np.zeros(num_images, dtype=np.int64)
    hosts = rng.choice(np.flatnonzero(~outliers), size=o["hidden_images"], replace=False)
    hidden[hosts] = rng.integers(1, layout.num_labels + 1, size=o["hidden_images"])
    scales, angles, mirrors = _draw_warps(rng, o, layout.extent())
    if reflect:  # flipped left-right: Flip Rot(a) diag(1, m) = Rot(-a) diag(1, -m) Flip
        angles, mirrors = -angles, ~mirrors
    case = FamilyCase(
        features=None,
        layout=layout,
        scales=scales,
        angles=angles,
        mirrors=mirrors,
        centres=np.zeros((num_images, 2)),
        token_parts=np.zeros((num_images, h, w), dtype=np.int64),
        full_token_parts=np.zeros((num_images, h, w), dtype=np.int64),
        hidden=hidden,
        outliers=outliers,
        high_norm=None,
        model=model,
        seed=o["seed"],
        part_embeddings=part_embed,
        options=dict(o),
    )
    feats = _draw_images(case, rng, o, streams, reflect)
    observation = _unit(rng.normal(size=feats.shape))
    feats = feats + o["noise"] * (observation[:, :, ::-1] if reflect else observation)
    model.content_norm = float(np.linalg.norm(feats, axis=-1).mean()) if content_norm is None else content_norm
    model.positional = model.positional * model.content_norm
    x, case.high_norm = model.add_components(feats.reshape(num_images, h * w, channels), rng)
    queries, keys = model.project(x, rng, flip_noise=reflect)
    image_sizes = [(int(h * rng.choice([6, 8, 10])), int(w * rng.choice([6, 8, 10]))) for _ in range(num_images)]
    meta = {"family": o["family"], "seed": int(o["seed"]), "planted": "families"}
    if reflect:
        meta["mirrored"] = True
    case.features = CoSegmentationFeatures(queries, keys, o["grid_size"], image_sizes, metadata=meta)
    return case


def make_mirrored(case: FamilyCase) -> FamilyCase:
    """The mirrored capture of `case`: the same images flipped left-right, as the pipeline's `flip=True` captures them.

    Everything the *image* holds is reflected: the object (its mirror toggled, its angle negated, its centre column
    `c -> w - 1 - c`, so the token at column `w - 1 - c` shows what column `c` showed), the background fields, the
    observation noise and the key noise (the same draws, flipped: the pipeline's flipped capture reuses the original
    image's noise flipped left-right, so it draws nothing new and the original capture is unchanged). The "which side
    of the picture" term follows the new picture, so it changes sign. What belongs to the *model's grid* is not
    reflected: the positional component, the corner tokens and the high-norm tokens' positions and values. Returns a
    :class:`FamilyCase` with the mirrored geometry (its `token_parts` are `case.token_parts` flipped left-right) and
    `metadata["mirrored"] = True`.
    """
    if case.options is None:
        raise ValueError("`case` has no `options`: make it with make_family_case.")
    mirrored = _build_case(case.options, reflect=True, content_norm=case.model.content_norm)
    if case.kept is not None:
        mirrored = mirrored.without(np.setdiff1d(np.arange(case.options["num_images"]), case.kept))
    return mirrored


def make_reference(case: FamilyCase, num_images: int = 16, seed: int = 0) -> CoSegmentationFeatures:
    """`num_images` content-free captures of `case`'s model: background statistics only (a per-image smooth field and
    noise; no object, none of the collection's shared stuff), the same components (positional, corners, high-norm
    tokens at new random positions), projections, grid and heads. Randomness from `default_rng(seed)`."""
    if not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"`num_images` must be an int >= 2, got {num_images!r}.")
    model = case.model
    rng = np.random.default_rng(seed)
    h, w = model.grid_size
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    coords = np.stack([rows, cols], -1)
    content = np.stack([_background(rng, coords, model.channels, None) for _ in range(num_images)])
    content = content + model.noise * _unit(rng.normal(size=content.shape))
    x, _ = model.add_components(content.reshape(num_images, h * w, model.channels), rng)
    queries, keys = model.project(x, rng)
    size = (h * 8, w * 8)
    meta = {"planted": "reference", "seed": int(seed)}
    return CoSegmentationFeatures(queries, keys, (h, w), [size] * num_images, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def match_correct(case: FamilyCase, s: int, t: int, source_tokens, target_tokens, pck: float = 0.1) -> np.ndarray:
    """`(K,)` bool: neither image is an outlier, the source token lies on a visible part of image `s`, that part is
    visible in image `t` where the warp sends it, and the match lands within `pck` times the object's size (in
    image `t`) of that place."""
    if case.outliers[s] or case.outliers[t]:
        return np.zeros(len(_to_numpy(source_tokens)), dtype=bool)
    h, w = case.features.grid_size
    src, tgt = _to_numpy(source_tokens).astype(int), _to_numpy(target_tokens).astype(int)
    er, ec = case.from_canonical(t, *case.to_canonical(s, (src // w).astype(float), (src % w).astype(float)))
    part = case.token_parts[s].ravel()[src]
    ok = (part > 0) & (part != case.hidden[t])
    return ok & (np.hypot(tgt // w - er, tgt % w - ec) <= pck * case.object_size(t))


def coverable(case: FamilyCase, s: int, t: int) -> np.ndarray:
    """`(N,)` bool: tokens of image `s` that can have a correct match in image `t` (visible in both)."""
    if case.outliers[s] or case.outliers[t]:
        return np.zeros(case.token_parts[s].size, dtype=bool)
    part = case.token_parts[s].ravel()
    return (part > 0) & (part != case.hidden[t])


def score_case(case: FamilyCase, output, pck: float = 0.1, listed_pairs_only: bool = False) -> dict[str, float]:
    """Scores an analysis of `case`.

    `output` needs `correspondences` (with `source_index`, `target_index`, `source_tokens`, `target_tokens`), and
    `masks` / `part_masks` (lists at each image's own size, or None). Returns:

    - `precision`: PCK@`pck` (of the object's size) over all kept matches; a match touching an outlier image, or
      starting on a part hidden in the other image, is wrong;
    - `coverage`: over every pair of images that both show the object and both sides of it, the share of the
      side's coverable tokens (:func:`coverable`) that take part in a correct kept match, averaged (with
      `listed_pairs_only`, over the pairs `output.correspondences` lists: a sparse pair graph's analysed pairs);
    - `jaccard`: mask Jaccard at each image's own size against the visible object, mean over non-outlier images;
    - `nmi`: part NMI over the visible object pixels of all non-outlier images pooled (predicted background is its
      own label, so ids must agree across images);
    - `outlier_share`: share of kept matches with an outlier image at either end (NaN without outliers);
    - `outlier_foreground`: mean foreground share of the outlier images' masks (NaN without outliers);
    - `matches`: kept matches in all; `parts_found`: distinct part ids in `part_masks` (the estimated count).
    """
    correct_total, kept_total, touching, coverage = 0, 0, 0, []
    for pair in output.correspondences:
        s, t = pair.source_index, pair.target_index
        src, tgt = _to_numpy(pair.source_tokens).astype(int), _to_numpy(pair.target_tokens).astype(int)
        ok = match_correct(case, s, t, src, tgt, pck)
        correct_total += int(ok.sum())
        kept_total += int(ok.size)
        touching += int(ok.size) if (case.outliers[s] or case.outliers[t]) else 0
    for s in range(case.features.num_images):
        for t in range(s + 1, case.features.num_images):
            if case.outliers[s] or case.outliers[t]:
                continue
            pair = next((p for p in output.correspondences if (p.source_index, p.target_index) == (s, t)), None)
            if pair is None and listed_pairs_only:
                continue
            src = _to_numpy(pair.source_tokens).astype(int) if pair is not None else np.zeros(0, int)
            tgt = _to_numpy(pair.target_tokens).astype(int) if pair is not None else np.zeros(0, int)
            ok = match_correct(case, s, t, src, tgt, pck)
            for a, b, tokens in ((s, t, src[ok]), (t, s, tgt[ok])):
                can = coverable(case, a, b)
                covered = np.zeros(can.size, dtype=bool)
                covered[tokens] = True
                coverage.append(float((covered & can).sum() / can.sum()) if can.any() else float("nan"))
    nan = float("nan")
    result = {
        "precision": correct_total / kept_total if kept_total else nan,
        "coverage": float(np.nanmean(coverage)) if coverage else nan,
        "jaccard": nan,
        "nmi": nan,
        "outlier_share": touching / kept_total
        if case.outliers.any() and kept_total
        else (0.0 if case.outliers.any() else nan),
        "outlier_foreground": nan,
        "matches": float(kept_total),
        "parts_found": nan,
    }
    if output.masks is not None:
        scores, fg = [], []
        for i, mask in enumerate(output.masks):
            mask = _to_numpy(mask).astype(bool)
            if case.outliers[i]:
                fg.append(float(mask.mean()))
                continue
            truth = case.pixel_parts(i) > 0
            union = (truth | mask).sum()
            scores.append(float((truth & mask).sum() / union) if union else 1.0)
        result["jaccard"] = float(np.mean(scores))
        result["outlier_foreground"] = float(np.mean(fg)) if fg else nan
    if output.part_masks is not None:
        truths, preds, ids = [], [], set()
        for i, part_mask in enumerate(output.part_masks):
            pm = _to_numpy(part_mask)
            ids |= set(np.unique(pm).tolist()) - {0}
            if case.outliers[i]:
                continue
            truth = case.pixel_parts(i)
            on = truth > 0
            truths.append(truth[on])
            preds.append(pm[on])
        result["nmi"] = normalized_mutual_information(np.concatenate(truths), np.concatenate(preds))
        result["parts_found"] = float(len(ids))
    return result


@dataclass
class OracleCorrespondence:
    source_index: int
    target_index: int
    source_tokens: np.ndarray
    target_tokens: np.ndarray


@dataclass
class PartsOutput:
    """An analysis-like result: what :func:`score_case` reads (and `density_maps`, `(M, h, w)`, hit counts)."""

    correspondences: list
    masks: list
    part_masks: list
    density_maps: np.ndarray | None = None


def oracle_output(case: FamilyCase) -> PartsOutput:
    """The answer from the ground truth: for every pair and both directions, each coverable token matched to the token
    nearest to where the warp sends it; masks and part masks at each image's own size from :meth:`FamilyCase.pixel_parts`. A match whose rounded
    landing token is not on the other image's coverable object is left out. It scores precision 1, coverage about
    0.98-1 (the rest is rounding at the object's edges), Jaccard 1 and NMI 1: a check of
    the metrics and an upper bound."""
    h, w = case.features.grid_size
    m = case.features.num_images

    def warp(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        src = np.flatnonzero(coverable(case, a, b))
        er, ec = case.from_canonical(b, *case.to_canonical(a, (src // w).astype(float), (src % w).astype(float)))
        er, ec = np.rint(er).astype(int), np.rint(ec).astype(int)
        inside = (er >= 0) & (er < h) & (ec >= 0) & (ec < w)
        src, tgt = src[inside], (er * w + ec)[inside]
        lands = coverable(case, b, a)[tgt]  # rounding may step off the visible object
        return src[lands], tgt[lands]

    pairs, density = [], np.zeros((m, h * w))
    for s in range(m):
        for t in range(s + 1, m):
            (fs, ft), (bt, bs) = warp(s, t), warp(t, s)  # both passes, stored with image s's tokens first
            src, tgt = np.concatenate([fs, bs]), np.concatenate([ft, bt])
            pairs.append(OracleCorrespondence(s, t, src, tgt))
            np.add.at(density[s], src, 1.0)
            np.add.at(density[t], tgt, 1.0)
    part_masks = [case.pixel_parts(i) for i in range(m)]
    return PartsOutput(pairs, [p > 0 for p in part_masks], part_masks, density.reshape(m, h, w))


# ---------------------------------------------------------------------------------------------------------------
# Second parts baseline: joint k-means over all images' hit tokens
# ---------------------------------------------------------------------------------------------------------------


def joint_kmeans_parts(
    features: CoSegmentationFeatures, output, num_parts: int | None = None, seed: int = 0, render: str = "nearest"
):
    """Parts by one k-means over the hit tokens of **all** images together, keeping `output`'s masks.

    What it clusters: every token with at least one kept correspondence (`output.density_maps > 0`) in any image,
    described by its key averaged over layers (and noise draws) with the heads concatenated, `(H d,)`, L2-normalised.
    `num_parts` clusters (default: the count `output` found, i.e. distinct ids in its `part_masks`; at least 1),
    k-means++ seeded with `seed` (OpenCV, 3 attempts). Every token whose centre lies inside `output`'s mask takes the label of its
    nearest centre. `render="nearest"`: the label grid is resized to each image's own size (nearest) and cut by the mask (the
    baseline of BENCHMARKS.md (l)). `render="votes"`: the labels are drawn at pixel size as the method's step 11 draws its own
    (:func:`~cosegment.utils.segmentation.upsample_assignment`: indicators smoothed by half a token cell, resized bilinearly), then
    cut by the mask, so that the two differ in their token labels only. Returns a :class:`PartsOutput` with `output`'s
    correspondences and masks.
    """
    if render not in ("nearest", "votes"):
        raise ValueError(f"`render` must be 'nearest' or 'votes', got {render!r}.")
    h, w = features.grid_size
    m = features.num_images
    keys = torch.stack([k.float() for k in features.keys]).mean(0)  # (M, H, N, d)
    keys = keys.permute(0, 2, 1, 3).reshape(m, h * w, -1).numpy()
    keys = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
    if num_parts is None:
        num_parts = len(set(np.unique(np.concatenate([_to_numpy(p).ravel() for p in output.part_masks]))) - {0})
    num_parts = max(1, int(num_parts))
    hits = _to_numpy(output.density_maps).reshape(m, h * w) > 0
    labels = np.ones((m, h * w), dtype=np.int32)
    if hits.sum() >= num_parts and num_parts > 1:
        cv2.setRNGSeed(seed)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-4)
        _, _, centres = cv2.kmeans(keys[hits].astype(np.float32), num_parts, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        labels = (((keys[:, :, None, :] - centres[None, None]) ** 2).sum(-1).argmin(-1) + 1).astype(np.int32)
    part_masks = []
    for i in range(m):
        height, width = features.image_sizes[i]
        mask = _to_numpy(output.masks[i]).astype(bool)
        # the mask at each token centre (the same sampling as the grid-to-image resize)
        rows = np.clip(((np.arange(h) + 0.5) * height / h).astype(int), 0, height - 1)
        cols = np.clip(((np.arange(w) + 0.5) * width / w).astype(int), 0, width - 1)
        token_mask = mask[np.ix_(rows, cols)]
        grid = np.where(token_mask, labels[i].reshape(h, w), 0).astype(np.int32)
        if render == "votes":  # token k of part j: divergence 0 to part j, 1 to the others; background 1 to all
            ids = np.arange(1, num_parts + 1)
            divergence = (grid.reshape(-1, 1) != ids[None, :]).astype(np.float32)
            drawn = upsample_assignment(torch.from_numpy(divergence), (h, w), 0.5, (height, width))
        else:
            drawn = cv2.resize(grid, (width, height), interpolation=cv2.INTER_NEAREST)
        part_masks.append(drawn * mask)
    return PartsOutput(output.correspondences, output.masks, part_masks, output.density_maps)


# ---------------------------------------------------------------------------------------------------------------
# Mirrored captures: which way round each image is (issue 27)
# ---------------------------------------------------------------------------------------------------------------

# The symmetric-object knobs of the orientation table, chosen on design seeds only (docs/FLIP_NOTES.md): with them
# today's analysis keeps mostly twin matches on a mixed pair, in the regime the issue measured.
SYMMETRIC = {"symmetric": True, "object_side": 0.2, "picture_side": 0.4}


def twin_correct(case: FamilyCase, s: int, t: int, source_tokens, target_tokens, pck: float = 0.1) -> np.ndarray:
    """`(K,)` bool: the match lands within `pck` times the object's size of where the warp sends the source point's
    mirror twin `(u_row, -u_col)`, and not within it of the right place (:func:`match_correct`): a twin match."""
    if case.outliers[s] or case.outliers[t]:
        return np.zeros(len(_to_numpy(source_tokens)), dtype=bool)
    w = case.features.grid_size[1]
    src, tgt = _to_numpy(source_tokens).astype(int), _to_numpy(target_tokens).astype(int)
    u_row, u_col = case.to_canonical(s, (src // w).astype(float), (src % w).astype(float))
    er, ec = case.from_canonical(t, u_row, -u_col)
    twin = np.hypot(tgt // w - er, tgt % w - ec) <= pck * case.object_size(t)
    return twin & ~match_correct(case, s, t, src, tgt, pck)


def twin_share(case: FamilyCase, output, pck: float = 0.1) -> float:
    """Share of `output`'s kept matches that are twin matches (:func:`twin_correct`); NaN when none is kept."""
    twins, kept = 0, 0
    for pair in output.correspondences:
        s, t = pair.source_index, pair.target_index
        twins += int(twin_correct(case, s, t, pair.source_tokens, pair.target_tokens, pck).sum())
        kept += len(_to_numpy(pair.source_tokens))
    return twins / kept if kept else float("nan")


def oriented_features(case: FamilyCase, mirrored: FamilyCase, flipped) -> CoSegmentationFeatures:
    """`case`'s features with each image `i` where `flipped[i]` replaced by its mirrored capture (`mirrored`, from
    :func:`make_mirrored`): the collection as it is analysed once its orientations are decided."""
    flipped = torch.as_tensor(np.asarray(flipped, dtype=bool))
    f, g = case.features, mirrored.features
    pick = flipped[:, None, None, None]
    return CoSegmentationFeatures(
        [torch.where(pick, b, a) for a, b in zip(f.queries, g.queries)],
        [torch.where(pick, b, a) for a, b in zip(f.keys, g.keys)],
        f.grid_size,
        list(f.image_sizes),
        list(f.layer_names),
        {**f.metadata, "flipped": [bool(v) for v in flipped]},
    )


def unflip_output(output, flipped, grid_size: tuple[int, int]) -> PartsOutput:
    """An analysis of :func:`oriented_features` mapped back to the original images: every token of a flipped image
    `(row, col) -> (row, w - 1 - col)`, its masks and density map flipped left-right."""
    flipped = np.asarray(flipped, dtype=bool)
    w = grid_size[1]

    def back(tokens, image: int) -> np.ndarray:
        tokens = _to_numpy(tokens).astype(np.int64)
        return (tokens // w) * w + (w - 1 - tokens % w) if flipped[image] else tokens

    pairs = []
    for pair in output.correspondences:
        s, t = pair.source_index, pair.target_index
        pairs.append(OracleCorrespondence(s, t, back(pair.source_tokens, s), back(pair.target_tokens, t)))

    def images(values):
        if values is None:
            return None
        return [np.fliplr(_to_numpy(v)) if flipped[i] else _to_numpy(v) for i, v in enumerate(values)]

    density = None if output.density_maps is None else np.array(images(list(output.density_maps)))
    return PartsOutput(pairs, images(output.masks), images(output.part_masks), density)


def flip_scores(case: FamilyCase, mirrored: FamilyCase, segment: bool = False) -> dict[str, float]:
    """Today's analysis of `case` against the oriented one: the evidence of every pair
    (:func:`~cosegment.orientation.orientation_evidence`), the collection's decision
    (:func:`~cosegment.orientation.decide_orientations`), `analyze_features` of :func:`oriented_features` mapped back
    by :func:`unflip_output`. Keys: `precision`, `coverage`, `twins` (today), the same with `flip `, `decided right`
    (1 when every pair's choice matches the truth, images mirrored differently), `pairs right alone` (share of pairs
    whose own evidence has the right sign), `flipped` (images flipped)."""
    plain = _analyze(case.features, segment=segment)
    evidence = orientation_evidence(case.features, mirrored.features)
    decision = decide_orientations(evidence)
    oriented = _analyze(oriented_features(case, mirrored, decision.flipped), segment=segment)
    mapped = unflip_output(oriented, decision.flipped.numpy(), case.features.grid_size)
    truth = case.mirrors[:, None] != case.mirrors[None, :]
    upper = np.triu(np.ones_like(truth), 1)
    alone = ((evidence.numpy() < 0) == truth)[upper]
    result = {}
    for prefix, output in (("", plain), ("flip ", mapped)):
        score = score_case(case, output)
        result.update({prefix + "precision": score["precision"], prefix + "coverage": score["coverage"]})
        result[prefix + "twins"] = twin_share(case, output)
    result["decided right"] = float((decision.pair_flipped.numpy() == truth).all())
    result["pairs right alone"] = float(alone.mean())
    result["flipped"] = float(decision.flipped.sum())
    return result


def flip_rows(split: Split, families, sizes, seeds: int, parts=(3, 4, 5)) -> list[dict]:
    """Per (family, M): symmetric objects (:data:`SYMMETRIC`), half of the images mirrored (`mixed`) and the same
    collections with none mirrored (`same way round`, the same draws otherwise); today's analysis and the oriented
    one (:func:`flip_scores`). `coverage, same-way level` of a mixed row: today's coverage of its same-way-round
    twins, what the oriented analysis can hope for."""
    rows = []
    for family in families:
        for m in sizes:
            cells = {"half": [], "none": []}
            for i, seed in enumerate(_cell_seeds(split, seeds, 900 + 10 * m)):
                for mode in cells:
                    case = make_family_case(family, m, parts[i % len(parts)], seed=seed, mirror=mode, **SYMMETRIC)
                    cells[mode].append(flip_scores(case, make_mirrored(case)))
            for mode, name in (("half", "mixed"), ("none", "same way round")):
                scores = cells[mode]
                row = {"cell": f"{family}, M = {m}, {name}"}
                for key in ("precision", "flip precision", "coverage", "flip coverage"):
                    row[key] = _mean(scores, key)
                row["coverage, same-way level"] = _mean(cells["none"], "coverage")
                for key in ("twins", "flip twins", "decided right", "pairs right alone", "flipped"):
                    row[key] = _mean(scores, key)
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------

SD_CONDITIONS = {
    "clean": {},
    "positional 0.3": {"positional": 0.3},
    "positional 0.5": {"positional": 0.5},
    "all three": {"positional": 0.5, "corners": 0.9, "anomalies": 6, "anomaly_norm": 3.0},
}


def _analyze(features: CoSegmentationFeatures, reference: CoSegmentationFeatures | None = None, **kwargs):
    """`analyze_features` with the default preset; passes `reference` only when the installed version accepts it."""
    if reference is not None and "reference" in inspect.signature(analyze_features).parameters:
        kwargs["reference"] = reference
    return analyze_features(features, **kwargs)


def _mean(scores: list[dict], key: str) -> float:
    values = [s[key] for s in scores if not math.isnan(s[key])]
    return float(np.mean(values)) if values else float("nan")


def _cell_seeds(split: Split, count: int, offset: int) -> list[int]:
    return [split.seeds[(offset + i) % len(split.seeds)] for i in range(count)]


def parts_rows(split: Split, families, sizes, seeds: int, parts=(3, 4, 5)) -> list[dict]:
    """One row per (family, M): the method and the joint k-means baseline (its labels drawn at pixel size by nearest
    token, as in BENCHMARKS.md (l), and voted as the method draws its own), part counts cycling through `parts`."""
    rows = []
    for family in families:
        for m in sizes:
            method, kmeans, voted, truth = [], [], [], []
            for i, seed in enumerate(_cell_seeds(split, seeds, 10 * m)):
                case = make_family_case(family, m, parts[i % len(parts)], seed=seed)
                out = _analyze(case.features)
                method.append(score_case(case, out))
                kmeans.append(score_case(case, joint_kmeans_parts(case.features, out)))
                voted.append(score_case(case, joint_kmeans_parts(case.features, out, render="votes")))
                truth.append(case.num_parts)
            row = {"cell": f"{family}, M = {m}", "true parts": "/".join(map(str, truth))}
            row.update({k: _mean(method, k) for k in ("precision", "coverage", "jaccard", "nmi", "parts_found")})
            row["k-means nmi"] = _mean(kmeans, "nmi")
            row["k-means nmi, voted"] = _mean(voted, "nmi")
            rows.append(row)
    return rows


def outlier_rows(split: Split, seeds: int, num_images: int = 5) -> list[dict]:
    """One outlier among `num_images`; also the same collection without it (Jaccard of the others)."""
    scores, without = [], []
    for i, seed in enumerate(_cell_seeds(split, seeds, 500)):
        family = split.families[i % len(split.families)]
        case = make_family_case(family, num_images, 4, seed=seed, outlier_images=1)
        scores.append(score_case(case, _analyze(case.features)))
        clean = case.without(np.flatnonzero(case.outliers))
        without.append(score_case(clean, _analyze(clean.features)))
    row = {"cell": f"1 outlier of {num_images}"}
    row.update(
        {k: _mean(scores, k) for k in ("precision", "coverage", "jaccard", "outlier_share", "outlier_foreground")}
    )
    row["jaccard without outlier"] = _mean(without, "jaccard")
    row["nmi"] = _mean(scores, "nmi")
    return [row]


def hidden_rows(split: Split, seeds: int, num_images: int = 4) -> list[dict]:
    """One image of `num_images` with one part hidden (4 parts)."""
    method, kmeans, voted = [], [], []
    for i, seed in enumerate(_cell_seeds(split, seeds, 600)):
        family = split.families[i % len(split.families)]
        case = make_family_case(family, num_images, 4, seed=seed, hidden_images=1)
        out = _analyze(case.features)
        method.append(score_case(case, out))
        kmeans.append(score_case(case, joint_kmeans_parts(case.features, out)))
        voted.append(score_case(case, joint_kmeans_parts(case.features, out, render="votes")))
    row = {"cell": f"1 part hidden in 1 of {num_images}"}
    row.update({k: _mean(method, k) for k in ("precision", "coverage", "jaccard", "nmi", "parts_found")})
    row["k-means nmi"] = _mean(kmeans, "nmi")
    row["k-means nmi, voted"] = _mean(voted, "nmi")
    return [row]


def sd_rows(split: Split, sizes, seeds: int, conditions=None, reference_images: int = 16) -> list[dict]:
    """SD-like components; with a `reference_images` reference when `analyze_features` takes `reference`."""
    conditions = SD_CONDITIONS if conditions is None else conditions
    takes_reference = "reference" in inspect.signature(analyze_features).parameters
    rows = []
    for name, knobs in conditions.items():
        for m in sizes:
            plain, referenced = [], []
            for i, seed in enumerate(_cell_seeds(split, seeds, 700 + 10 * m)):
                family = split.families[i % len(split.families)]
                case = make_family_case(family, m, 4, seed=seed, **knobs)
                plain.append(score_case(case, _analyze(case.features)))
                if takes_reference:
                    ref = make_reference(case, reference_images, seed=seed)
                    referenced.append(score_case(case, _analyze(case.features, reference=ref)))
            for label, scores in (("", plain), (f", {reference_images}-image reference", referenced)):
                if scores:
                    row = {"cell": f"{name}, M = {m}{label}"}
                    row.update({k: _mean(scores, k) for k in ("precision", "coverage", "jaccard", "nmi")})
                    rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """A markdown table of `rows` (dicts with the same keys; floats with 3 decimals)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_table(
    split_name: str = "design",
    quick: bool = False,
    seeds: int | None = None,
    tables=("parts", "outlier", "hidden", "sd"),
    families: tuple[str, ...] | None = None,
) -> dict[str, list[dict]]:
    """The benchmark's tables for one split, `{name: rows}` for each name in `tables`.

    `parts`: M = 2, 4, 8 (quick: 2, 4) for each of the split's families (or `families`, which must belong to the
    split), part counts 3, 4, 5 in turn over the seeds. `outlier`: one background-only image among 5. `hidden`: one image of 4 lacks one part. `sd`: clean,
    positional 0.3 / 0.5 and all three components (positional 0.5, corners 0.9, 6 high-norm tokens at 3x) at M = 2
    and 4. `flip` (not among the defaults): symmetric objects, mixed and same-way-round collections of M = 2, 3, 4
    per family, today's analysis against the oriented one (:func:`flip_rows`). `seeds` collections per cell (default
    3, quick 1), taken in order from the split's seed range; the outlier, hidden and SD cells take the split's
    families in turn.
    """
    split = SPLITS[split_name]
    families = split.families if families is None else tuple(families)
    if not set(families) <= set(split.families):
        raise ValueError(f"`families` must be families of the {split_name} split {split.families}, got {families}.")
    seeds = (1 if quick else 3) if seeds is None else seeds
    sizes = (2, 4) if quick else (2, 4, 8)
    makers = {
        "parts": lambda: parts_rows(split, families, sizes, seeds),
        "outlier": lambda: outlier_rows(split, seeds),
        "hidden": lambda: hidden_rows(split, seeds),
        "sd": lambda: sd_rows(split, (2, 4), seeds),
        "flip": lambda: flip_rows(split, families, (2, 3, 4), seeds),
    }
    unknown = set(tables) - set(makers)
    if unknown:
        raise ValueError(f"`tables` must name tables of {sorted(makers)}, got {sorted(unknown)}.")
    return {name: makers[name]() for name in tables}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="design", help="design (tune) or heldout (report)")
    parser.add_argument("--quick", action="store_true", help="one collection per cell, M <= 4")
    parser.add_argument("--seeds", type=int, default=None, help="collections per cell (default 3, quick 1)")
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["parts", "outlier", "hidden", "sd"],
        choices=["parts", "outlier", "hidden", "sd", "flip"],
    )
    parser.add_argument(
        "--families", nargs="+", default=None, help="parts and flip tables: these families of the split only"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    split = SPLITS[args.split]
    seeds = (1 if args.quick else 3) if args.seeds is None else args.seeds
    print(f"split {args.split}: families {', '.join(split.families)}; seeds from {split.seeds.start}")
    for name in args.tables:
        print(f"\n{name}\n")
        print(markdown(run_table(args.split, args.quick, seeds, (name,), args.families)[name]), flush=True)
    print(
        f"\n{seeds} collection(s) per row, 32 x 32 tokens, 4 heads, d = 32, noise 0.3, analyze_features(selection="
        f"'auto'); {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
