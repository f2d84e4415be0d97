# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""Outlier images and the sparse pair graph (issue 10) on the planted generator families (benchmarks/families.py).

Tables (each printed as markdown; times and ratios measured in this one run):

- `outlier`: one background-only image among 5 (the families runner's cell), with the outlier's `sharing` and the
  inliers' smallest `sharing`;
- `clean`: collections without an outlier (M = 4 and 8, the split's families in turn): inliers flagged (must be 0)
  and the smallest inlier `sharing`;
- `planted`: the cells of benchmarks/planted.py (its seeds, `1000 M + i`, every noise level): images flagged (must
  be 0: with none flagged the output is bit for bit the one without the outlier rule) and the smallest `sharing`;
- `partners`: M = 16, every pair against `partners=3`: analysis time and its ratio, precision, coverage (over the
  analysed pairs, and over every pair), Jaccard, NMI;
- `timing`: analysis time against M for every pair and `partners=3` (and the time to build the graph). Where whole
  analyses would take too long (`--sample-above`, default M > 16), the per-pair steps are timed on a sample of pairs
  and extrapolated to both pair counts (collection steps 8b-11 left out of both).

`--repeats R` times each analysis R times, the settings interleaved, and keeps the fastest (the run least disturbed
by other jobs on a shared machine).

Usage: `python benchmarks/bench_graph.py --split design|heldout [--tables outlier clean partners timing]`.
"""

import argparse
import math
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cosegment import analyze_features, analyze_pairs  # noqa: E402
from cosegment.analysis import partner_pairs  # noqa: E402
from cosegment.benchmarks.families import (  # noqa: E402
    SPLITS,
    _cell_seeds,
    _mean,
    make_family_case,
    markdown,
    outlier_rows,
    score_case,
)
from cosegment.benchmarks.planted import NOISE_LEVELS, make_planted_features  # noqa: E402

PARTNERS = 3


def _timed(features, **kwargs):
    start = time.perf_counter()
    output = analyze_features(features, **kwargs)
    return output, time.perf_counter() - start


def outlier_table(split, seeds: int) -> list[dict]:
    """The families runner's outlier cell, plus the sharing scores of the outlier and of the inliers."""
    row = outlier_rows(split, seeds)[0]
    outlier_sharing, inlier_sharing, flagged = [], [], 0
    for i, seed in enumerate(_cell_seeds(split, seeds, 500)):
        case = make_family_case(split.families[i % len(split.families)], 5, 4, seed=seed, outlier_images=1)
        output = analyze_features(case.features, segment=False)
        outlier_sharing += output.sharing[case.outliers].tolist()
        inlier_sharing += output.sharing[~case.outliers].tolist()
        flagged += int((output.outliers != case.outliers).sum())
    row["outlier sharing (max)"] = float(max(outlier_sharing))
    row["inlier sharing (min)"] = float(min(inlier_sharing))
    row["wrongly flagged"] = flagged
    return [row]


def clean_table(split, seeds: int, sizes=(4, 8)) -> list[dict]:
    """Collections without an outlier: no image may be flagged."""
    rows = []
    for m in sizes:
        flagged, low, count = 0, [], 0
        for i, seed in enumerate(_cell_seeds(split, seeds, 800 + 10 * m)):
            case = make_family_case(split.families[i % len(split.families)], m, 3 + i % 3, seed=seed)
            output = analyze_features(case.features, segment=False)
            flagged += int(output.outliers.sum())
            low.append(float(output.sharing.min()))
            count += m
        rows.append({"cell": f"clean, M = {m}", "images": count, "flagged": flagged, "smallest sharing": min(low)})
    return rows


def planted_table(seeds: int, sizes=(4, 8)) -> list[dict]:
    """benchmarks/planted.py's cells (no outlier there): no image may be flagged."""
    rows = []
    for m in sizes:
        for level, noise in NOISE_LEVELS.items():
            flagged, low = 0, []
            for seed in range(seeds):
                case = make_planted_features(m, noise=noise, seed=1000 * m + seed)
                output = analyze_features(case.features, segment=False)
                flagged += int(output.outliers.sum())
                low.append(float(output.sharing.min()))
            rows.append(
                {
                    "cell": f"planted.py M = {m}, {level}",
                    "images": m * seeds,
                    "flagged": flagged,
                    "smallest sharing": min(low),
                }
            )
            print(markdown(rows[-1:]), flush=True)
    return rows


def _fastest(features, settings, repeats: int) -> dict:
    """Each of `settings` (`partners` values) timed `repeats` times, interleaved: `{partners: (output, fastest s)}`.
    The fastest of the repeats is the least disturbed by other jobs on a shared machine."""
    result = {}
    for _ in range(repeats):
        for partners in settings:
            output, elapsed = _timed(features, partners=partners)
            if partners not in result or elapsed < result[partners][1]:
                result[partners] = (output, elapsed)
    return result


def partners_table(split, seeds: int, num_images: int = 16, every: bool = True, repeats: int = 1) -> list[dict]:
    """Every pair against `partners=3` on the same collections (`every=False`: `partners=3` only); each time the
    fastest of `repeats` interleaved runs."""
    keys = ("precision", "coverage", "jaccard", "nmi")
    scores = {None: [], PARTNERS: []}
    listed = {None: [], PARTNERS: []}
    times = {None: math.nan, PARTNERS: 0.0}
    pairs = {None: 0, PARTNERS: 0}
    settings = (None, PARTNERS) if every else (PARTNERS,)
    times.update(dict.fromkeys(settings, 0.0))
    for i, seed in enumerate(_cell_seeds(split, seeds, 900)):
        case = make_family_case(split.families[i % len(split.families)], num_images, 4, seed=seed)
        runs = _fastest(case.features, settings if i % 2 == 0 else settings[::-1], repeats)  # order alternating
        for partners in settings:
            output, elapsed = runs[partners]
            times[partners] += elapsed
            pairs[partners] += len(output.correspondences)
            scores[partners].append(score_case(case, output))
            listed[partners].append(score_case(case, output, listed_pairs_only=True))
    rows = []
    for partners in settings:
        row = {"cell": f"M = {num_images}, " + ("every pair" if partners is None else f"partners = {partners}")}
        row["pairs"] = pairs[partners] / seeds
        row["time s"] = times[partners] / seeds
        row["time ratio"] = times[partners] / times[None]
        row.update({k: _mean(listed[partners], k) for k in keys})
        row["coverage (every pair)"] = _mean(scores[partners], "coverage")
        rows.append(row)
    return rows


def timing_table(
    split, sizes=(4, 8, 16, 32, 64), sample_above: int = 16, sample: int = 24, repeats: int = 1
) -> list[dict]:
    """Analysis time against M, every pair and `partners=3`, one collection per M (the split's first family).

    Up to `sample_above` both are whole `analyze_features` calls. Above it, the per-pair steps (4-8a) are timed on
    `sample` pairs spread over the collection and extrapolated to each pair count (every pair: `M (M - 1) / 2`; K = 3:
    the graph's): the collection steps (8b-11) are left out of both, so the ratio is then the ratio of pair counts."""
    rows = []
    for m in sizes:
        case = make_family_case(split.families[0], m, 4, seed=split.seeds[m])
        start = time.perf_counter()
        num_sparse = len(partner_pairs(case.features, PARTNERS))
        graph_time = time.perf_counter() - start
        num_pairs = m * (m - 1) // 2
        if m <= sample_above:
            runs = _fastest(case.features, (None, PARTNERS), repeats)
            dense, sparse = runs[None][1], runs[PARTNERS][1]
            note = "whole analysis, measured" + (f", fastest of {repeats}" if repeats > 1 else "")
        else:
            every = [(s, t) for s in range(m) for t in range(s + 1, m)]
            chosen = sorted({every[k] for k in np.linspace(0, num_pairs - 1, sample).round().astype(int)})
            per_pair = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                analyze_pairs(case.features, chosen)
                per_pair = min(per_pair, (time.perf_counter() - start) / len(chosen))
            dense, sparse = per_pair * num_pairs, per_pair * num_sparse + graph_time
            note = f"pair steps: {len(chosen)} pairs timed, extrapolated"
        rows.append(
            {
                "M": m,
                "pairs (every)": num_pairs,
                "time every pair s": dense,
                "pairs (K = 3)": num_sparse,
                "time K = 3 s": sparse,
                "ratio": sparse / dense,
                "graph s": graph_time,
                "how": note,
            }
        )
        print(markdown(rows[-1:]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="design")
    parser.add_argument("--tables", nargs="+", default=["outlier", "clean", "partners", "timing"])
    parser.add_argument("--seeds", type=int, default=3, help="collections per cell")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="timing / planted tables: M")
    parser.add_argument("--sample-above", type=int, default=16, help="timing: sample pairs above this M")
    parser.add_argument("--sparse-only", action="store_true", help="partners table: partners=3 only")
    parser.add_argument("--sample", type=int, default=24, help="timing: pairs timed when sampling")
    parser.add_argument("--repeats", type=int, default=1, help="partners / timing: fastest of this many runs")
    args = parser.parse_args(argv)
    split = SPLITS[args.split]
    start = time.perf_counter()
    print(f"split {args.split}: families {', '.join(split.families)}; seeds from {split.seeds.start}")
    makers = {
        "outlier": lambda: outlier_table(split, args.seeds),
        "clean": lambda: clean_table(split, args.seeds),
        "planted": lambda: planted_table(args.seeds, tuple(args.sizes)),
        "partners": lambda: partners_table(split, args.seeds, every=not args.sparse_only, repeats=args.repeats),
        "timing": lambda: timing_table(split, tuple(args.sizes), args.sample_above, args.sample, args.repeats),
    }
    for name in args.tables:
        print(f"\n{name}\n", flush=True)
        print(markdown(makers[name]()), flush=True)
    print(f"\n32 x 32 tokens, 4 heads, d = 32, noise 0.3, selection 'auto'; {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
