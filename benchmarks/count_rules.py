"""Part-count rules for step 10 compared on DESIGN collections only (issue 10; BENCHMARKS.md (l3)).

With `num_parts=None`, step 10 (`parts.cluster_collection`) takes the part count as the largest eigengap of the
joint normalised affinity (`utils.segmentation.eigengap_count`). This script runs `analyze_features` on planted design
collections (`families.py`, families sectors and blobs, seeds 0-999 only), records the true count, the found count,
part NMI, mask Jaccard and the spectrum of step 10's first clustering, and reruns the analysis with a candidate rule
patched in (`parts.factored_spectral_clusters` wrapped so that its count comes from the rule):

- `gap`: today's largest eigengap;
- `stability`: the k whose k-means labels agree best (adjusted Rand) between the two interleaved halves of the points
  (each half clustered in the rows of the top-k eigenvectors, then extended to every point by nearest centroid);
- `rotation`: the k of least Zelnik-Manor and Perona rotation cost (:func:`rotation_cost`);
- `tie`: the largest eigengap, but among gaps within `TIE_MARGIN` of it the k of least rotation cost.

Batches (true counts 2-6 in turn, M = 2, 4, 8, both design families, 8 collections per cell): 1 = seeds 540-867,
2 = seeds 900-957; 0 = the design parts table of `families.py` (3 collections per cell, counts 3/4/5). Usage:
`python benchmarks/count_rules.py --batch 1 2 --rules gap tie`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment" and os.path.dirname(_ROOT) not in sys.path:
        sys.path.insert(0, os.path.dirname(_ROOT))

import cosegment.parts as parts_module  # noqa: E402
from cosegment.benchmarks.families import SPLITS, _analyze, _cell_seeds, make_family_case, score_case  # noqa: E402
from cosegment.utils.segmentation import _top_left_singular, eigengap_count, kmeans  # noqa: E402

TIE_MARGIN = 0.25
_ORIGINAL = parts_module.factored_spectral_clusters


def cases(batch: int) -> list[tuple[str, int, int, int]]:
    """`(family, M, true parts, seed)` of one batch, all on the design split."""
    out = []
    cells = [(family, m) for family in ("sectors", "blobs") for m in (2, 4, 8)]
    for j, (family, m) in enumerate(cells):
        if batch == 0:
            seeds = _cell_seeds(SPLITS["design"], 3, 10 * m)
            out += [(family, m, (3, 4, 5)[i], seed) for i, seed in enumerate(seeds)]
        elif batch == 1:
            first = 500 + 40 * (m // 2) + (200 if family == "blobs" else 0)
            out += [(family, m, 2 + i % 5, first + i) for i in range(8)]
        elif batch == 2:
            out += [(family, m, 2 + (i + 1) % 5, 900 + 10 * j + i) for i in range(8)]
        else:
            raise ValueError(f"unknown batch {batch}")
    assert all(seed in SPLITS["design"].seeds for *_, seed in out)
    return out


def spectrum(embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(values, vectors, degree)` of step 10's normalised affinity, as `factored_spectral_clusters` computes them."""
    degree = embedding @ embedding.sum(0)
    values, vectors = _top_left_singular(embedding / np.sqrt(np.maximum(degree, 1e-12))[:, None])
    return values, vectors, degree


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), a.size * (a.size - 1) / 2
    expected, best = rows * cols / total, 0.5 * (rows + cols)
    return float((both - expected) / (best - expected)) if best != expected else 1.0


def stability(vectors: np.ndarray, degree: np.ndarray, k: int) -> float:
    """Adjusted Rand between the labels of the even and the odd points, each half clustered by `kmeans` in the rows
    of the top-k eigenvectors and extended to every point by nearest centroid (cosine)."""
    rows = _unit_rows(vectors[:, :k])
    labels = []
    for half in (np.arange(0, rows.shape[0], 2), np.arange(1, rows.shape[0], 2)):
        lab = kmeans(rows[half], k, first=int(np.argmax(degree[half])))
        centres = np.stack([rows[half][lab == j].mean(0) if (lab == j).any() else np.zeros(k) for j in range(k)])
        labels.append(np.argmax(rows @ centres.T, axis=1))
    return adjusted_rand(*labels)


def _givens(angles: np.ndarray, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The rotation `G_1 ... G_P` of the Givens angles (planes (0, 1), (0, 2), ...) and its derivative per angle."""
    factors, derivatives = [], []
    for (a, b), theta in zip([(a, b) for a in range(k - 1) for b in range(a + 1, k)], angles):
        g, dg = np.eye(k), np.zeros((k, k))
        c, s = np.cos(theta), np.sin(theta)
        g[a, a] = g[b, b] = c
        g[a, b], g[b, a] = -s, s
        dg[a, a] = dg[b, b] = -s
        dg[a, b], dg[b, a] = -c, c
        factors.append(g)
        derivatives.append(dg)
    prefix, suffix = [np.eye(k)], [np.eye(k)]
    for g in factors:
        prefix.append(prefix[-1] @ g)
    for g in reversed(factors):
        suffix.append(g @ suffix[-1])
    suffix = suffix[::-1]
    return prefix[-1], [prefix[p] @ derivatives[p] @ suffix[p + 1] for p in range(len(factors))]


def rotation_cost(rows: np.ndarray, steps: int = 100, tolerance: float = 1e-6) -> float:
    """Zelnik-Manor and Perona ("Self-tuning spectral clustering", NIPS 2004): `min_Q sum_ij Z_ij^2 / max_j Z_ij^2`
    with `Z = X Q` over rotations `Q` (gradient descent on the Givens angles from the identity, backtracking), `X` the
    unit rows; returned as `(J - R) / (R (k - 1))` in [0, 1] (0: every row on one axis). The cost has local minima:
    another optimiser (scipy L-BFGS-B) found other minima for some k (BENCHMARKS.md (l3))."""
    x = _unit_rows(np.asarray(rows, dtype=np.float64))
    r, k = x.shape
    if k < 2:
        return 0.0
    idx = np.arange(r)

    def evaluate(angles: np.ndarray, gradient: bool):
        rotation, grads = _givens(angles, k)
        z = x @ rotation
        squares = z**2
        top = np.argmax(squares, axis=1)
        peak = np.maximum(squares[idx, top], 1e-300)
        cost = float((squares / peak[:, None]).sum())
        if not gradient:
            return cost, None
        weight = 2.0 * z / peak[:, None]
        weight[idx, top] -= 2.0 * z[idx, top] * squares.sum(1) / peak**2
        return cost, np.array([float((weight * (x @ g)).sum()) for g in grads])

    angles = np.zeros(k * (k - 1) // 2)
    cost, _ = evaluate(angles, False)
    step = 1.0 / r
    for _ in range(steps):
        grad = evaluate(angles, True)[1]
        while step > 1e-12:
            trial = angles - step * grad
            trial_cost = evaluate(trial, False)[0]
            if trial_cost < cost:
                break
            step *= 0.5
        else:
            break
        improvement = (cost - trial_cost) / (r * (k - 1))
        angles, cost, step = trial, trial_cost, 2.0 * step
        if improvement < tolerance:
            break
    return (cost - r) / (r * (k - 1))


def rule_gap(values, vectors, degree, top):
    return eigengap_count(values, top)


def rule_stability(values, vectors, degree, top):
    scores = [stability(vectors, degree, k) for k in range(2, top + 1)]
    return int(np.argmax(scores)) + 2  # ties: the smaller k


def rule_rotation(values, vectors, degree, top):
    return int(np.argmin([rotation_cost(vectors[:, :k]) for k in range(2, top + 1)])) + 2


def rule_tie(values, vectors, degree, top):
    gaps = values[1:top] - values[2 : top + 1]  # gaps[k - 2] = lambda_k - lambda_k+1
    candidates = [k for k in range(2, top + 1) if gaps[k - 2] >= (1.0 - TIE_MARGIN) * gaps.max()]
    return candidates[int(np.argmin([rotation_cost(vectors[:, :k]) for k in candidates]))]


RULES = {"gap": rule_gap, "stability": rule_stability, "rotation": rule_rotation, "tie": rule_tie}


def run(case_list, rule=None) -> list[dict]:
    """`analyze_features` on each case, its count from `rule` (None: as the package does it)."""
    records = []
    for family, m, parts, seed in case_list:
        case = make_family_case(family, m, parts, seed=seed)
        spectra = []

        def patched(embedding, num_clusters, max_clusters):
            e = np.asarray(embedding, dtype=np.float64)
            values, vectors, degree = spectrum(e)
            spectra.append(values[:10])
            top = min(int(max_clusters), values.shape[0] - 1)
            if num_clusters is None and rule is not None and top >= 2:
                num_clusters = rule(values, vectors, degree, top)
            return _ORIGINAL(embedding, num_clusters, max_clusters)

        parts_module.factored_spectral_clusters = patched
        try:
            start = time.perf_counter()
            output = _analyze(case.features)
            seconds = time.perf_counter() - start
        finally:
            parts_module.factored_spectral_clusters = _ORIGINAL
        score = score_case(case, output)
        records.append(
            {
                "case": (family, m, parts, seed),
                "found": int(score["parts_found"]),
                "nmi": score["nmi"],
                "jaccard": score["jaccard"],
                "seconds": seconds,
                "spectrum": spectra[0],
            }
        )
    return records


def summary(records: list[dict]) -> dict[str, float]:
    return {
        "exact": float(np.mean([r["found"] == r["case"][2] for r in records])),
        "mean |error|": float(np.mean([abs(r["found"] - r["case"][2]) for r in records])),
        "nmi": float(np.mean([r["nmi"] for r in records])),
        "jaccard": float(np.mean([r["jaccard"] for r in records])),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], choices=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", default=["gap", "tie"], choices=sorted(RULES))
    args = parser.parse_args(argv)
    case_list = [c for b in args.batch for c in cases(b)]
    print(f"design batches {args.batch}: {len(case_list)} collections")
    results = {name: run(case_list, RULES[name]) for name in args.rules}
    base = results.get("gap")
    print("| rule | exact | mean abs error | part NMI | Jaccard |\n|---|---|---|---|---|")
    for name, records in results.items():
        s = summary(records)
        print(f"| {name} | {s['exact']:.3f} | {s['mean |error|']:.3f} | {s['nmi']:.4f} | {s['jaccard']:.4f} |")
    for name, records in results.items():
        if base is None or name == "gap":
            continue
        for old, new in zip(base, records):
            if old["found"] != new["found"]:
                print(
                    f"{name}: {old['case']} count {old['found']} -> {new['found']}, "
                    f"NMI {old['nmi']:.3f} -> {new['nmi']:.3f}, spectrum {np.round(old['spectrum'][:8], 3)}"
                )


if __name__ == "__main__":
    main()
