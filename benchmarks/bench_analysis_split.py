"""Where the analysis' time goes: the per-pair stage (`analyze_pairs`, steps 4-8a, what several processes split)
against the collection-level stage (`analyze_features(pair_analyses=...)`, steps 8b-11, on the main process).

    python benchmarks/bench_analysis_split.py [--collections 4 8 16] [--repeats 3]

Planted features (benchmarks/planted.py) at SD 2.1-base's read-layer shape (10 heads of 64, 32 x 32 tokens, i.e.
512 px), default `"auto"` selection. Prints one markdown table from one run: medians of interleaved repeats, the
per-pair share of the analysis, and the speed-up of the whole analysis that splitting the pairs over P processes
allows at best (Amdahl: the collection stage stays on one process).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from cosegment import analyze_features, analyze_pairs
from cosegment.benchmarks.planted import make_planted_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collections", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" threads {torch.get_num_threads()}, device cpu"
    )
    rows = []
    for m in args.collections:
        features = make_planted_features(m, noise=0.3, seed=2001, num_heads=10, head_dim=64).features
        pair_times, collection_times = [], []
        analyze_features(features)  # warm up
        for _ in range(args.repeats):
            start = time.perf_counter()
            analyses = analyze_pairs(features)
            middle = time.perf_counter()
            analyze_features(features, pair_analyses=analyses)
            pair_times.append(middle - start)
            collection_times.append(time.perf_counter() - middle)
        pairs, collection = statistics.median(pair_times), statistics.median(collection_times)
        total = pairs + collection
        rows.append(
            [m, m * (m - 1) // 2, f"{pairs:.2f}", f"{collection:.2f}", f"{pairs / total:.2f}"]
            + [f"{total / (pairs / p + collection):.2f}" for p in args.processes]
        )
    header = ["M", "pairs", "analyze_pairs s", "collection steps s", "per-pair share"]
    header += [f"best speed-up, {p} processes" for p in args.processes]
    print(f"\n### analysis split, planted features 10 heads x 64, 32 x 32 tokens, medians of {args.repeats}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
