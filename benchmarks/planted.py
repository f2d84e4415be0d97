"""Planted benchmark: queries and keys with a known common object, and the metrics that score an analysis of them.

A collection of `M` "images" is made directly in feature space on an `(h, w)` token grid. One object made of
`num_parts` parts appears in every image under a known warp (scale 0.6-1.4x, shift, horizontal mirror). Its tokens
take their features from one field shared by the whole collection (a per-part embedding plus a smooth per-position
detail field, read in the object's own canonical coordinates), so one object point has similar features in every
image. The background is a patchwork of regions of three confusable kinds: i.i.d. random features, smooth "stuff"
(two stuff embeddings shared by the collection plus a slowly varying field, like sky or grass) and repeated textures
(two periodic tiles shared by the collection, pasted at random phases). Every token gets observation noise; keys and
queries are two different linear maps of the noisy features plus key noise, like a real attention layer
(`q = W_q f`, `k = W_k f + noise`).

Metrics (see :func:`score_output`): correspondence precision (PCK@0.1 of the object's size over all kept
matches), coverage (share of each image's object tokens that take part in a correct kept match, both images of every
pair), mask Jaccard (at each image's own size, against the exact object region) and part NMI (over the object's
pixels of the whole collection, predicted background counting as its own label, so part ids must agree across
images).

**SD-like components** (issue 16; off by default, and then the output is bitwise what it was before they existed):
`make_planted_features(..., positional=, corners=, anomalies=, anomaly_norm=)` adds to the noisy features, before
the projections, a positional field shared by every image, corner tokens alike across images and a few high-norm
tokens per image, exactly as :class:`benchmarks.families.PlantedModel` does, drawn from their own random stream.
:func:`make_planted_reference` makes content-free captures of the same model (background statistics only, the same
components and projections), the `reference` of `analyze_features`.

Run `python benchmarks/planted.py` for the markdown table of the README, `python benchmarks/planted.py --sd` for
issue 16's table (:func:`sd_rows`: the components without and with a 16-image reference, M = 2 and 4, noise low;
`--noise low moderate`, `--seed-offset 100` for the held-out seeds), and `python benchmarks/planted.py --points`
for the sub-token table (:func:`point_rows`: end-point error in cells and PCK@0.05 / 0.1 of correct kept matches at
token centres and refined, and of `transfer_points` on random sub-token object points, against the continuous warp;
this module's collections and the families' design and held-out splits, reported apart).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a checkout named `cosegment`: import that checkout
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment":
        sys.path.insert(0, os.path.dirname(_ROOT))

from cosegment import CoSegmentationFeatures, analyze_features  # noqa: E402

if TYPE_CHECKING:
    from cosegment.benchmarks.families import PlantedModel

NOISE_LEVELS = {"low": 0.15, "moderate": 0.3, "high": 0.5}


@dataclass
class PlantedCase:
    """A planted collection and its ground truth.

    Attributes:
        features: the queries and keys, `(M, H, N, d)` per layer.
        scales, mirrors, centres: each image's warp from canonical object coordinates `u` (cells at scale 1) to grid
            coordinates `(row, col)`: `row = centre_row + scale * u_row`, `col = centre_col + scale * (+/-) u_col`.
        object_radius: the object's mean radius in canonical cells.
        num_parts: planted parts, labelled 1..num_parts.
        token_parts: `(M, h, w)` int, the part under each token centre (0 = background).
        shape: `(a2, phi2, a3, phi3, part_angle)` of the canonical outline and part layout.
        model: the "model" behind the captures (:class:`benchmarks.families.PlantedModel`): projections `w_q`, `w_k`,
            `amp`, observation and key `noise`, the measured `content_norm` and the SD-like components (`positional`
            field `(N, C)`, `corner_vectors`, `corners`, `anomaly_direction`, `anomalies`, `anomaly_norm`), all off
            when the knobs are at their defaults. :func:`make_planted_reference` uses it.
        high_norm: `(M, N)` bool, the high-norm (anomaly) tokens (none when `anomalies = 0`).
        background_regions, part_share: the generator's settings a reference's background repeats.
    """

    features: CoSegmentationFeatures
    scales: np.ndarray
    mirrors: np.ndarray
    centres: np.ndarray
    object_radius: float
    num_parts: int
    token_parts: np.ndarray
    shape: tuple[float, float, float, float, float]
    model: PlantedModel | None = None
    high_norm: np.ndarray | None = None
    background_regions: int = 5
    part_share: float = 0.5

    @property
    def object_masks(self) -> np.ndarray:
        """`(M, h, w)` bool, token centres inside the object."""
        return self.token_parts > 0

    def to_canonical(self, image: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid coordinates of image `image` -> canonical object coordinates."""
        s, (cr, cc) = self.scales[image], self.centres[image]
        sign = -1.0 if self.mirrors[image] else 1.0
        return (rows - cr) / s, sign * (cols - cc) / s

    def from_canonical(self, image: int, u_row: np.ndarray, u_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, (cr, cc) = self.scales[image], self.centres[image]
        sign = -1.0 if self.mirrors[image] else 1.0
        return cr + s * u_row, cc + sign * s * u_col

    def parts_at(self, u_row: np.ndarray, u_col: np.ndarray) -> np.ndarray:
        """Planted part (1..P, 0 outside the object) at canonical coordinates."""
        return _object_parts(u_row, u_col, self.object_radius, self.num_parts, self.shape)

    def pixel_parts(self, image: int) -> np.ndarray:
        """`(H_i, W_i)` int: the exact planted part of every pixel of image `image` at its own size."""
        height, width = self.features.image_sizes[image]
        h, w = self.features.grid_size
        rows = (np.arange(height) + 0.5) * h / height - 0.5
        cols = (np.arange(width) + 0.5) * w / width - 0.5
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        return self.parts_at(*self.to_canonical(image, rr, cc))

    def object_size(self, image: int) -> float:
        """The object's size in image `image`, grid cells: the larger side of its bounding box over tokens."""
        rows, cols = np.nonzero(self.token_parts[image])
        return float(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))


def _object_parts(u_row, u_col, radius, num_parts, shape) -> np.ndarray:
    a2, p2, a3, p3, part_angle = shape
    theta = np.arctan2(u_row, u_col)
    outline = radius * (1.0 + a2 * np.cos(2 * theta + p2) + a3 * np.cos(3 * theta + p3))
    inside = np.hypot(u_row, u_col) < outline
    # parts: Voronoi cells of `num_parts` seeds on a ring at half the radius
    angles = part_angle + 2 * np.pi * np.arange(num_parts) / num_parts
    seeds = 0.5 * radius * np.stack([np.sin(angles), np.cos(angles)], axis=-1)
    dist = (u_row[..., None] - seeds[:, 0]) ** 2 + (u_col[..., None] - seeds[:, 1]) ** 2
    return np.where(inside, dist.argmin(axis=-1) + 1, 0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _smooth_field(rng, coords: np.ndarray, channels: int, length: float, components: int = 64) -> np.ndarray:
    """A random smooth field (random Fourier features of a squared-exponential kernel) at `(..., 2)` coords, with
    `E|f|^2 = 1` and correlation `exp(-|du|^2 / (2 length^2))`."""
    freqs = rng.normal(0.0, 1.0 / length, size=(components, 2))
    phases = rng.uniform(0.0, 2 * np.pi, size=components)
    amps = rng.normal(0.0, 1.0 / math.sqrt(channels), size=(components, channels))
    waves = np.cos(coords @ freqs.T + phases)
    return math.sqrt(2.0 / components) * waves @ amps


def _background(rng, coords: np.ndarray, regions: int, stuff_embed: np.ndarray, tiles: list, part_share: float):
    """`(h, w, C)` background at `coords` `(h, w, 2)`: `regions` Voronoi regions of three kinds (each kind present
    where there are enough regions): i.i.d. random unit features, smooth stuff (one of `stuff_embed` `(2, C)` plus a
    slowly varying field) and a texture (one of the periodic `tiles` `(p, p, C)` at a random phase)."""
    h, w = coords.shape[:2]
    channels = stuff_embed.shape[-1]
    grid_rows, grid_cols = coords[..., 0], coords[..., 1]
    seeds = rng.uniform(0, [h, w], size=(regions, 2))
    region = ((coords[..., None, :] - seeds) ** 2).sum(-1).argmin(-1)
    kinds = rng.permutation(np.resize(np.arange(3), regions))
    bg = np.empty((h, w, channels))
    for r in range(regions):
        where = region == r
        if kinds[r] == 0:
            bg[where] = _unit(rng.normal(size=(int(where.sum()), channels)))
        elif kinds[r] == 1:
            field_ = _smooth_field(rng, coords, channels, length=5.0)
            stuff = stuff_embed[rng.integers(len(stuff_embed))]
            bg[where] = (math.sqrt(part_share) * stuff + math.sqrt(1 - part_share) * field_)[where]
        else:
            k = rng.integers(len(tiles))
            p = tiles[k].shape[0]
            off = rng.integers(0, p, size=2)
            tile_rows = (grid_rows.astype(int) + off[0]) % p
            tile_cols = (grid_cols.astype(int) + off[1]) % p
            bg[where] = tiles[k][tile_rows, tile_cols][where]
    return bg


def make_planted_features(
    num_images: int = 2,
    noise: float = 0.6,
    seed: int = 0,
    grid_size: tuple[int, int] = (32, 32),
    num_heads: int = 4,
    head_dim: int = 32,
    channels: int = 64,
    num_layers: int = 1,
    num_parts: int = 4,
    object_radius: float = 8.0,
    scale_range: tuple[float, float] = (0.6, 1.4),
    sharpness: float = 30.0,
    part_share: float = 0.5,
    detail_length: float = 1.0,
    background_regions: int = 5,
    image_sizes: list[tuple[int, int]] | None = None,
    positional: float = 0.0,
    corners: float = 0.0,
    anomalies: int = 0,
    anomaly_norm: float = 3.0,
    positional_length: float = 5.0,
) -> PlantedCase:
    """Planted queries and keys of `num_images` images sharing one object (see the module docstring).

    Args:
        num_images: `M`.
        noise: observation noise, as a share of a feature's norm (also the key noise).
        seed: everything random comes from `numpy.random.default_rng(seed)`.
        grid_size: `(h, w)` token grid.
        num_heads, head_dim, channels: `H`, `d` and the width `C` of the features behind the queries and keys.
        num_layers: layers, each with its own projections of the same features.
        num_parts: planted parts of the object.
        object_radius: the object's mean radius in cells at scale 1.
        scale_range: each image's object scale is uniform in this range.
        sharpness: logit of a noise-free token with itself (sets how peaked attention is).
        part_share: share of an object feature's energy in its part embedding (the rest is position detail).
        detail_length: correlation length of the object's position detail, canonical cells.
        background_regions: Voronoi regions of each image's background, each random, smooth stuff or texture.
        image_sizes: each image's original `(height, width)`; defaults to varied sizes around 8 px per token.
        positional, corners, anomalies, anomaly_norm, positional_length: Stable-Diffusion-like components of the
            model (issue 16), added to the noisy features before the projections exactly as in
            :class:`benchmarks.families.PlantedModel` (``add_components``), with strengths in units of the
            collection's mean content norm (noise included): a smooth positional field (correlation length
            `positional_length` cells, zero mean over positions, RMS norm `positional` x the content norm, the same
            in every image); the four corner tokens mixed with per-corner vectors shared by all images (`sqrt(1 -
            a^2) x + a |x| c_k`, `a = corners` in [0, 1]); `anomalies` high-norm tokens per image at random
            non-corner positions, `anomaly_norm` x the content norm, along one direction of the model (their
            content replaced). They come from their own stream `numpy.random.default_rng([seed, 16])`, never from the
            main one: with every knob at its default the output is bitwise the generator's without them.

    Returns:
        A :class:`PlantedCase`.
    """
    from cosegment.benchmarks.families import PlantedModel, model_components

    if not (isinstance(positional, (int, float)) and positional >= 0):
        raise ValueError(f"`positional` must be a number >= 0, got {positional!r}.")
    if not (isinstance(corners, (int, float)) and 0 <= corners <= 1):
        raise ValueError(f"`corners` must be a number in [0, 1], got {corners!r}.")
    if not (isinstance(anomalies, int) and 0 <= anomalies <= grid_size[0] * grid_size[1] - 4):
        raise ValueError(f"`anomalies` must be an int in [0, tokens - 4], got {anomalies!r}.")
    if not (isinstance(anomaly_norm, (int, float)) and anomaly_norm > 0):
        raise ValueError(f"`anomaly_norm` must be a number > 0, got {anomaly_norm!r}.")
    rng = np.random.default_rng(seed)
    h, w = grid_size
    n = h * w
    shape = (
        rng.uniform(0.0, 0.15),
        rng.uniform(0, 2 * np.pi),
        rng.uniform(0.0, 0.1),
        rng.uniform(0, 2 * np.pi),
        rng.uniform(0, 2 * np.pi),
    )
    # shared by the collection: part embeddings, position detail, stuff embeddings, texture tiles
    part_embed = _unit(rng.normal(size=(num_parts + 1, channels)))
    detail_freqs = rng.normal(0.0, 1.0 / detail_length, size=(64, 2))
    detail_phases = rng.uniform(0.0, 2 * np.pi, size=64)
    detail_amps = rng.normal(0.0, 1.0 / math.sqrt(channels), size=(64, channels))
    stuff_embed = _unit(rng.normal(size=(2, channels)))
    periods = [3, 4]
    tiles = [_unit(rng.normal(size=(p, p, channels))) for p in periods]

    grid_rows, grid_cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    coords = np.stack([grid_rows, grid_cols], axis=-1)
    scales = rng.uniform(*scale_range, size=num_images)
    mirrors = rng.random(num_images) < 0.5
    if mirrors.all() or not mirrors.any():
        mirrors[rng.integers(num_images)] ^= True  # at least one mirrored and one not
    feats, token_parts, centres = [], [], []
    for i in range(num_images):
        extent = object_radius * scales[i] * 1.3
        cr = rng.uniform(extent, h - 1 - extent) if h - 1 > 2 * extent else (h - 1) / 2
        cc = rng.uniform(extent, w - 1 - extent) if w - 1 > 2 * extent else (w - 1) / 2
        centres.append((cr, cc))
        sign = -1.0 if mirrors[i] else 1.0
        u = np.stack([(grid_rows - cr) / scales[i], sign * (grid_cols - cc) / scales[i]], axis=-1)
        parts = _object_parts(u[..., 0], u[..., 1], object_radius, num_parts, shape)
        detail = math.sqrt(2.0 / 64) * np.cos(u @ detail_freqs.T + detail_phases) @ detail_amps
        obj = math.sqrt(part_share) * part_embed[parts] + math.sqrt(1 - part_share) * detail
        bg = _background(rng, coords, background_regions, stuff_embed, tiles, part_share)
        f = np.where((parts > 0)[..., None], obj, bg)
        f = f + noise * _unit(rng.normal(size=f.shape))
        feats.append(f.reshape(n, channels))
        token_parts.append(parts)

    feats = np.stack(feats)  # (M, N, C)
    # the model's SD-like components, from their own stream (the main one stays as it was)
    content_norm = float(np.linalg.norm(feats, axis=-1).mean())
    component_rng = np.random.default_rng([seed, 16])
    pos, corner_vectors, anomaly_direction = model_components(
        component_rng, grid_size, channels, positional, positional_length
    )
    amp = math.sqrt(sharpness * math.sqrt(head_dim))
    model = PlantedModel(
        grid_size=(h, w),
        channels=channels,
        w_q=[],
        w_k=[],
        amp=amp,
        noise=noise,
        content_norm=content_norm,
        positional=pos * content_norm,
        corner_vectors=corner_vectors,
        corners=float(corners),
        anomaly_direction=anomaly_direction,
        anomalies=int(anomalies),
        anomaly_norm=float(anomaly_norm),
    )
    high_norm = np.zeros((num_images, n), dtype=bool)
    if positional > 0 or corners > 0 or anomalies > 0:
        feats, high_norm = model.add_components(feats, component_rng)
    queries, keys = [], []
    for _ in range(num_layers):
        w_q = rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=(num_heads, head_dim, channels))
        w_k = w_q + 0.3 * rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=(num_heads, head_dim, channels))
        model.w_q.append(w_q)
        model.w_k.append(w_k)
        q = amp * np.einsum("hdc,mnc->mhnd", w_q, feats)
        key_noise = noise * amp * rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=q.shape)
        k = amp * np.einsum("hdc,mnc->mhnd", w_k, feats) + key_noise
        queries.append(torch.from_numpy(q.astype(np.float32)))
        keys.append(torch.from_numpy(k.astype(np.float32)))
    if image_sizes is None:
        image_sizes = [
            (int(h * 8 * (1 + 0.25 * (i % 3))), int(w * 8 * (1 + 0.25 * ((i + 1) % 2)))) for i in range(num_images)
        ]
    features = CoSegmentationFeatures(queries, keys, grid_size, image_sizes)
    return PlantedCase(
        features=features,
        scales=scales,
        mirrors=mirrors,
        centres=np.asarray(centres),
        object_radius=object_radius,
        num_parts=num_parts,
        token_parts=np.stack(token_parts),
        shape=shape,
        model=model,
        high_norm=high_norm,
        background_regions=background_regions,
        part_share=part_share,
    )


def make_planted_reference(case: PlantedCase, num_images: int = 16, seed: int = 0) -> CoSegmentationFeatures:
    """`num_images` content-free captures of `case`'s model, like a reference of blank images.

    Each capture is background only, with the background's statistics but nothing of the collection: a patchwork of
    `case.background_regions` regions (i.i.d. random, smooth stuff and texture) whose stuff embeddings and texture
    tiles are the capture's own (never the collection's shared ones), plus observation noise. The model is the
    case's: the same components (positional field, corner vectors; `anomalies` high-norm tokens per capture at new
    random positions), projections, key noise, grid and heads. Everything random comes from
    `numpy.random.default_rng(seed)`.

    Returns:
        :class:`CoSegmentationFeatures`, `(num_images, H, N, d)` per layer, images of `(8 h, 8 w)` pixels.
    """
    if not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"`num_images` must be an int >= 2, got {num_images!r}.")
    model = case.model
    if model is None:
        raise ValueError("`case` has no model: make it with `make_planted_features`.")
    rng = np.random.default_rng(seed)
    h, w = model.grid_size
    channels = model.channels
    grid_rows, grid_cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    coords = np.stack([grid_rows, grid_cols], axis=-1)
    content = []
    for _ in range(num_images):
        stuff_embed = _unit(rng.normal(size=(2, channels)))
        tiles = [_unit(rng.normal(size=(p, p, channels))) for p in (3, 4)]
        bg = _background(rng, coords, case.background_regions, stuff_embed, tiles, case.part_share)
        content.append((bg + model.noise * _unit(rng.normal(size=bg.shape))).reshape(h * w, channels))
    x, _ = model.add_components(np.stack(content), rng)
    queries, keys = model.project(x, rng)
    meta = {"planted": "planted reference", "seed": int(seed)}
    return CoSegmentationFeatures(queries, keys, (h, w), [(8 * h, 8 * w)] * num_images, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def normalized_mutual_information(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI with the arithmetic-mean normalisation (scikit-learn's default); 1 for identical partitions."""
    labels_true, labels_pred = np.asarray(labels_true).ravel(), np.asarray(labels_pred).ravel()
    if labels_true.size == 0:
        return float("nan")
    _, a = np.unique(labels_true, return_inverse=True)
    _, b = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1.0)
    p = table / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    if ha == 0 and hb == 0:
        return 1.0
    return max(0.0, mi) / (0.5 * (ha + hb)) if ha + hb > 0 else 0.0


def match_correct(case: PlantedCase, s: int, t: int, source_tokens, target_tokens, pck: float = 0.1) -> np.ndarray:
    """`(K,)` bool: the source token lies on the object and its match lands within `pck` times the object's size
    (in image `t`) of where the warp sends it."""
    h, w = case.features.grid_size
    src, tgt = _to_numpy(source_tokens).astype(int), _to_numpy(target_tokens).astype(int)
    sr, sc = src // w, src % w
    tr, tc = tgt // w, tgt % w
    er, ec = case.from_canonical(t, *case.to_canonical(s, sr.astype(float), sc.astype(float)))
    on_object = case.token_parts[s].ravel()[src] > 0
    return on_object & (np.hypot(tr - er, tc - ec) <= pck * case.object_size(t))


def score_output(case: PlantedCase, output, pck: float = 0.1) -> dict[str, float]:
    """Precision, coverage, mask Jaccard and part NMI of an analysis of `case` (see the module docstring).

    `output` needs `correspondences` (with `source_index`, `target_index`, `source_tokens`, `target_tokens`),
    `masks` and `part_masks` (lists at each image's own size, or None).
    """
    objects = case.token_parts.reshape(case.token_parts.shape[0], -1) > 0
    correct_total, kept_total, coverage = 0, 0, []
    for pair in output.correspondences:
        s, t = pair.source_index, pair.target_index
        src, tgt = _to_numpy(pair.source_tokens).astype(int), _to_numpy(pair.target_tokens).astype(int)
        ok = match_correct(case, s, t, src, tgt, pck)
        correct_total += int(ok.sum())
        kept_total += int(ok.size)
        for image, tokens in ((s, src[ok]), (t, tgt[ok])):
            covered = np.zeros(objects.shape[1], dtype=bool)
            covered[tokens] = True
            coverage.append(float((covered & objects[image]).sum() / objects[image].sum()))
    result = {
        "precision": correct_total / kept_total if kept_total else float("nan"),
        "coverage": float(np.mean(coverage)) if coverage else float("nan"),
        "matches": float(kept_total),
        "jaccard": float("nan"),
        "nmi": float("nan"),
    }
    if output.masks is not None:
        scores = []
        for i, mask in enumerate(output.masks):
            truth = case.pixel_parts(i) > 0
            mask = _to_numpy(mask).astype(bool)
            union = (truth | mask).sum()
            scores.append(float((truth & mask).sum() / union) if union else 1.0)
        result["jaccard"] = float(np.mean(scores))
    if output.part_masks is not None:
        truths, preds = [], []
        for i, part_mask in enumerate(output.part_masks):
            truth = case.pixel_parts(i)
            on = truth > 0
            truths.append(truth[on])
            preds.append(_to_numpy(part_mask)[on])
        result["nmi"] = normalized_mutual_information(np.concatenate(truths), np.concatenate(preds))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Naive baseline
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class NaiveOutput:
    correspondences: list
    masks: list
    part_masks: list


def naive_baseline(features: CoSegmentationFeatures, num_parts: int, seed: int = 0, paper_output=None) -> NaiveOutput:
    """The paper's thresholds pair by pair; mask = tokens with any hit, closed by a 3x3 kernel; parts = k-means
    (`num_parts` clusters, the true count, k-means++ seeded with `seed`) of the hit tokens' keys (mean over layers,
    heads concatenated), every mask token taking its nearest centre; masks resized to each image (nearest).

    `paper_output`: an `analyze_features(features, selection="paper")` output to reuse (its correspondences and
    hit counts are the baseline's).
    """
    out = paper_output if paper_output is not None else analyze_features(features, selection="paper")
    h, w = features.grid_size
    num_images = features.num_images
    keys = torch.stack([k.float() for k in features.keys]).mean(0)  # (M, H, N, d)
    keys = keys.permute(0, 2, 1, 3).reshape(num_images, h * w, -1).numpy()
    hits = _to_numpy(out.density_maps) > 0
    kernel = np.ones((3, 3), np.uint8)
    token_masks = [cv2.morphologyEx(hm.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool) for hm in hits]
    hit_feats = keys[hits.reshape(num_images, -1)]
    labels_grid = np.zeros((num_images, h * w), dtype=np.int64)
    if hit_feats.shape[0] >= num_parts:
        cv2.setRNGSeed(seed)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-4)
        _, _, centres = cv2.kmeans(hit_feats.astype(np.float32), num_parts, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        dist = ((keys[:, :, None, :] - centres[None, None]) ** 2).sum(-1)
        labels_grid = dist.argmin(-1) + 1
    masks, part_masks = [], []
    for i in range(num_images):
        height, width = features.image_sizes[i]
        tm = token_masks[i]
        labels = np.where(tm.ravel(), labels_grid[i], 0).reshape(h, w).astype(np.int32)
        masks.append(cv2.resize(tm.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool))
        part_masks.append(cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST))
    return NaiveOutput(out.correspondences, masks, part_masks)


# ---------------------------------------------------------------------------------------------------------------
# Points below the token grid (`--points`)
# ---------------------------------------------------------------------------------------------------------------


def _case_parts_at(case, image: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The planted part (0 outside the object) at sub-token grid points of image `image` (a `PlantedCase` or a
    `benchmarks.families.FamilyCase`; a part hidden in that image counts as outside)."""
    u = case.to_canonical(image, rows, cols)
    parts = case.parts_at(*u) if hasattr(case, "parts_at") else case.layout.parts_at(*u)
    hidden = getattr(case, "hidden", None)
    return np.where(parts == hidden[image], 0, parts) if hidden is not None and hidden[image] else parts


def _pixels_to_cells(points, image_size, grid_size) -> np.ndarray:
    """`(K, 2)` x, y pixels -> `(K, 2)` (row, col) grid coordinates (token centre `(r, c)` at `(r, c)`)."""
    points = _to_numpy(points).astype(np.float64).reshape(-1, 2)
    (height, width), (h, w) = image_size, grid_size
    return np.stack([points[:, 1] * h / height - 0.5, points[:, 0] * w / width - 0.5], axis=-1)


def correspondence_point_errors(case, output, correct=None) -> tuple[np.ndarray, np.ndarray]:
    """End-point errors of the correct kept matches, in target grid cells, and the same divided by the object's size
    in the image they land in. A match's query is the side at its token centre (the other side, where it lands,
    is the refined one); the truth is where the continuous warp sends the query's centre. Correct: the matched
    tokens pass `match_correct` (PCK@0.1 of the tokens), so refined and plain outputs are scored on the same
    matches. `correct`: the `match_correct` of the case's module (this module's by default)."""
    grid = case.features.grid_size
    correct = match_correct if correct is None else correct
    errors, relative = [], []
    for pair in output.correspondences:
        s, t = pair.source_index, pair.target_index
        src, tgt = _to_numpy(pair.source_tokens).astype(int), _to_numpy(pair.target_tokens).astype(int)
        ok = correct(case, s, t, src, tgt)
        gs = _pixels_to_cells(pair.source_points, case.features.image_sizes[s], grid)
        gt = _pixels_to_cells(pair.target_points, case.features.image_sizes[t], grid)
        forward = np.all(np.abs(gs - np.stack([src // grid[1], src % grid[1]], -1)) < 1e-3, axis=-1)
        fr, fc = case.from_canonical(t, *case.to_canonical(s, gs[:, 0], gs[:, 1]))
        br, bc = case.from_canonical(s, *case.to_canonical(t, gt[:, 0], gt[:, 1]))
        error = np.where(forward, np.hypot(gt[:, 0] - fr, gt[:, 1] - fc), np.hypot(gs[:, 0] - br, gs[:, 1] - bc))
        size = np.where(forward, case.object_size(t), case.object_size(s))
        errors.append(error[ok])
        relative.append((error / size)[ok])
    return np.concatenate(errors), np.concatenate(relative)


def transfer_point_errors(case, points_per_pair: int = 20, seed: int = 0, refine: bool = True):
    """`transfer_points` of random sub-token object points, every ordered pair of images: the points are uniform
    in the object tokens' cells (the point's own planted part present in both images), the truth their continuous
    warp. Returns `(errors in target cells, errors / object size, scores)`, each `(K,)`."""
    from cosegment import transfer_points

    rng = np.random.default_rng(seed)
    grid = case.features.grid_size
    errors, relative, scores = [], [], []
    for s in range(case.features.num_images):
        rows, cols = np.nonzero(case.token_parts[s])
        for t in range(case.features.num_images):
            if s == t or rows.size == 0 or not case.token_parts[t].any():
                continue
            pick = rng.integers(rows.size, size=points_per_pair)
            r = rows[pick] + rng.uniform(-0.5, 0.5, points_per_pair)
            c = cols[pick] + rng.uniform(-0.5, 0.5, points_per_pair)
            ok = (_case_parts_at(case, s, r, c) > 0) & (
                _case_parts_at(case, t, *case.from_canonical(t, *case.to_canonical(s, r, c))) > 0
            )
            if not ok.any():
                continue
            height, width = case.features.image_sizes[s]
            pixels = np.stack([(c[ok] + 0.5) * width / grid[1], (r[ok] + 0.5) * height / grid[0]], -1)
            landed, score = transfer_points(case.features, s, t, pixels, refine=refine)
            er, ec = case.from_canonical(t, *case.to_canonical(s, r[ok], c[ok]))
            cells = _pixels_to_cells(landed, case.features.image_sizes[t], grid)
            error = np.hypot(cells[:, 0] - er, cells[:, 1] - ec)
            errors.append(error)
            relative.append(error / case.object_size(t))
            scores.append(score)
    return np.concatenate(errors), np.concatenate(relative), np.concatenate(scores)


def _point_summary(errors: np.ndarray, relative: np.ndarray) -> dict[str, float]:
    return {
        "median EPE (cells)": float(np.median(errors)) if errors.size else float("nan"),
        "PCK@0.05": float(np.mean(relative <= 0.05)) if relative.size else float("nan"),
        "PCK@0.1": float(np.mean(relative <= 0.1)) if relative.size else float("nan"),
        "n": float(errors.size),
    }


def point_rows(cases: dict[str, tuple]) -> list[dict]:
    """Per name, `(cases, match_correct, score)` (the functions of the cases' module): correct kept matches at token centres (`refine=False`) and refined, with precision
    and coverage of both (the tokens are the same), and `transfer_points` of random object points, plain argmax and
    refined."""
    rows = []
    for name, (group, correct, score_fn) in cases.items():
        for refine in (False, True):
            kept, kept_rel, transfer, transfer_rel, quality = [], [], [], [], []
            for i, case in enumerate(group):
                output = analyze_features(case.features, segment=False, refine=refine)
                score = score_fn(case, output)
                quality.append((score["precision"], score["coverage"]))
                e, r = correspondence_point_errors(case, output, correct)
                kept.append(e)
                kept_rel.append(r)
                e, r, _ = transfer_point_errors(case, seed=i, refine=refine)
                transfer.append(e)
                transfer_rel.append(r)
            label = "refined" if refine else "token centres (argmax)"
            precision, coverage = np.nanmean(np.array(quality), axis=0)
            for what, e, r in (
                ("kept matches", kept, kept_rel),
                ("transfer_points, object points", transfer, transfer_rel),
            ):
                row = {"cases": name, "evaluated": what, "method": label}
                row.update(_point_summary(np.concatenate(e), np.concatenate(r)))
                row["precision"], row["coverage"] = (precision, coverage) if what == "kept matches" else ("", "")
                rows.append(row)
    return rows


def point_cases(seeds: int = 5, num_images: int = 3) -> dict[str, tuple]:
    """The cells of the sub-token table: this module's collections (noise 0.3; design seeds `3000 + i`, held-out
    `3100 + i`) and the families' DESIGN and HELD-OUT splits (families in turn, 4 parts), `seeds` collections of
    `num_images` images each."""
    from cosegment.benchmarks import families

    cells = {}
    for name, offset in (("planted, design", 3000), ("planted, held-out", 3100)):
        group = [make_planted_features(num_images, noise=0.3, seed=offset + i) for i in range(seeds)]
        cells[name] = (group, match_correct, score_output)
    for name in ("design", "heldout"):
        split = families.SPLITS[name]
        group = [
            families.make_family_case(split.families[i % len(split.families)], num_images, 4, seed=split.seeds[i])
            for i in range(seeds)
        ]
        cells[f"families, {name}"] = (group, families.match_correct, families.score_case)
    return cells


def markdown_points(rows_or_cases) -> str:
    """The sub-token table in markdown, from :func:`point_rows`' rows or from cells for it."""
    rows = point_rows(rows_or_cases) if isinstance(rows_or_cases, dict) else rows_or_cases
    keys = list(rows[0])

    def cell(key, value) -> str:
        if not isinstance(value, float):
            return str(value)
        return f"{value:.0f}" if key == "n" else f"{value:.3f}"

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Script
# ---------------------------------------------------------------------------------------------------------------

METHODS = ("auto", "paper", "naive")
METRICS = ("precision", "coverage", "jaccard", "nmi")


def run_benchmark(
    sizes: tuple[int, ...] = (2, 4, 8),
    seeds: int = 5,
    noise_levels: dict[str, float] | None = None,
    seed_offset: int = 0,
) -> list[dict]:
    """Scores every method on `seeds` planted collections per (M, noise level), seeds
    `1000 * M + seed_offset + i`; one row per cell and method, the metrics averaged over the seeds."""
    noise_levels = NOISE_LEVELS if noise_levels is None else noise_levels
    rows = []
    for num_images in sizes:
        for level, noise in noise_levels.items():
            scores = {method: [] for method in METHODS}
            for seed in range(seeds):
                case = make_planted_features(num_images, noise=noise, seed=1000 * num_images + seed_offset + seed)
                outputs = {method: analyze_features(case.features, selection=method) for method in ("auto", "paper")}
                outputs["naive"] = naive_baseline(case.features, case.num_parts, paper_output=outputs["paper"])
                for method in METHODS:
                    scores[method].append(score_output(case, outputs[method]))
            for method in METHODS:
                row = {"M": num_images, "noise": level, "method": method}
                for metric in METRICS + ("matches",):
                    row[metric] = float(np.nanmean([s[metric] for s in scores[method]]))
                rows.append(row)
    return rows


def sd_rows(
    sizes: tuple[int, ...] = (2, 4),
    seeds: int = 10,
    noise_levels: dict[str, float] | None = None,
    seed_offset: int = 0,
    conditions: dict[str, dict] | None = None,
    reference_images: int = 16,
) -> list[dict]:
    """Issue 16's table: SD-like components (the families' `SD_CONDITIONS`: clean, positional 0.3 / 0.5, all three =
    positional 0.5, corners 0.9, 6 high-norm tokens at 3x) on the collections of :func:`run_benchmark` (seeds
    `1000 * M + seed_offset + i`, so the clean rows without a reference are its "auto" rows), each analysed by
    `analyze_features` with its defaults, without and with a `reference_images`-image
    :func:`make_planted_reference` (seed `100000 + the collection's seed`; for `clean`, a reference of the model
    without components). One row per (noise level, condition, M, reference), the metrics averaged over the seeds."""
    from cosegment.benchmarks.families import SD_CONDITIONS

    noise_levels = {"low": NOISE_LEVELS["low"]} if noise_levels is None else noise_levels
    conditions = SD_CONDITIONS if conditions is None else conditions
    rows = []
    for level, noise in noise_levels.items():
        for name, knobs in conditions.items():
            for num_images in sizes:
                plain, referenced = [], []
                for i in range(seeds):
                    seed = 1000 * num_images + seed_offset + i
                    case = make_planted_features(num_images, noise=noise, seed=seed, **knobs)
                    plain.append(score_output(case, analyze_features(case.features)))
                    reference = make_planted_reference(case, reference_images, seed=100000 + seed)
                    referenced.append(score_output(case, analyze_features(case.features, reference=reference)))
                for label, scores in (("none", plain), (f"{reference_images} images", referenced)):
                    row = {"noise": level, "condition": name, "M": num_images, "reference": label}
                    row.update({metric: float(np.nanmean([s[metric] for s in scores])) for metric in METRICS})
                    rows.append(row)
    return rows


def markdown_sd(rows: list[dict]) -> str:
    """:func:`sd_rows`' rows as a markdown table."""
    lines = [
        "| noise | condition | M | reference | precision | coverage | Jaccard | NMI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['noise']} | {row['condition']} | {row['M']} | {row['reference']} | {row['precision']:.3f} | "
            f"{row['coverage']:.3f} | {row['jaccard']:.3f} | {row['nmi']:.3f} |"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| M | noise | method | precision | coverage | Jaccard | NMI | matches / pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pairs = row["M"] * (row["M"] - 1) // 2
        lines.append(
            f"| {row['M']} | {row['noise']} | {row['method']} | {row['precision']:.3f} | {row['coverage']:.3f} | "
            f"{row['jaccard']:.3f} | {row['nmi']:.3f} | {row['matches'] / pairs:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="collection sizes M (default 2 4 8; --sd: 2 4)"
    )
    parser.add_argument("--seeds", type=int, default=5, help="planted collections per cell")
    parser.add_argument(
        "--seed-offset", type=int, default=0, help="collections 1000 * M + offset + i (100: the validation seeds)"
    )
    parser.add_argument(
        "--points",
        action="store_true",
        help="the sub-token table instead: planted and families collections, design and held-out seeds apart",
    )
    parser.add_argument(
        "--sd",
        action="store_true",
        help="issue 16's table instead: SD-like components without and with a 16-image reference (M = 2, 4)",
    )
    parser.add_argument(
        "--noise",
        nargs="+",
        choices=sorted(NOISE_LEVELS),
        default=None,
        help="noise levels (default: all for the main table, low for --sd)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    levels = None if args.noise is None else {level: NOISE_LEVELS[level] for level in args.noise}
    if args.sd:
        sizes = (2, 4) if args.sizes is None else tuple(args.sizes)
        print(markdown_sd(sd_rows(sizes, args.seeds, levels, args.seed_offset)))
        print(
            f"\n{args.seeds} planted collections per row, seeds 1000 * M + {args.seed_offset} + i (32 x 32 tokens, 4 "
            f"heads, d = 32, 4 parts), analyze_features defaults; {time.perf_counter() - start:.0f} s."
        )
        return
    if args.points:
        print(markdown_points(point_cases(args.seeds)))
        print(f"\n{time.perf_counter() - start:.0f} s.")
        return
    sizes = (2, 4, 8) if args.sizes is None else tuple(args.sizes)
    rows = run_benchmark(sizes, args.seeds, levels, seed_offset=args.seed_offset)
    print(markdown_table(rows))
    noise = ", ".join(f"{k} = {v}" for k, v in (NOISE_LEVELS if levels is None else levels).items())
    print(
        f"\n{args.seeds} planted collections per row (32 x 32 tokens, 4 heads, d = 32, 4 parts; noise {noise}); "
        f"{time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
