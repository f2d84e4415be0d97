"""What refining below the token grid costs: `analyze_features(refine=True)` against `refine=False` in one run.

    python benchmarks/bench_refine.py [--collections 2 4] [--repeats 5]

Planted features (benchmarks/planted.py) at SD 2.1-base's read-layer shape (10 heads of 64, 32 x 32 tokens: N =
1024, i.e. 512 px), default `"auto"` selection, full method (steps 4-11). The two settings alternate within each
repeat, so both see the same load on a shared machine; the table gives the medians and the ratio of the medians.
`--threads` defaults to 1: on a loaded 2-core machine two OpenMP threads spin-wait for a busy core on every small
operation (measured: the sub-token hook's 25-value windows took 0.25 s per chunk with 2 threads, 0.0008 s with 1).
Also the part that grows with N: the row statistics of one pair (`attention_row_statistics`, both directions) with
and without the hook that keeps each row's sub-token peak; and `transfer_points` of 10 and 100 points against one
pair's `analyze_features`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from cosegment import analyze_features, attention_row_statistics, transfer_points
from cosegment.analysis import _peak_hook
from cosegment.benchmarks.planted import make_planted_features


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collections", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" threads {torch.get_num_threads()}, device cpu"
    )
    rows = []
    for m in args.collections:
        case = make_planted_features(m, noise=0.3, seed=2001, num_heads=10, head_dim=64)
        features = case.features
        analyze_features(features)  # warm up
        kept = sum(len(p) for p in analyze_features(features, segment=False).correspondences)
        plain, refined = [], []
        for _ in range(args.repeats):
            plain.append(_seconds(lambda: analyze_features(features, refine=False)))
            refined.append(_seconds(lambda: analyze_features(features, refine=True)))
        a, b = statistics.median(plain), statistics.median(refined)
        rows.append([m, kept, f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}"])
    header = ["M", "kept matches", "refine=False s", "refine=True s", "ratio"]
    print(f"\n### refine cost, planted features 10 heads x 64, 32 x 32 tokens, medians of {args.repeats}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")

    case = make_planted_features(2, noise=0.3, seed=2001, num_heads=10, head_dim=64)
    features = case.features
    (q_s, k_s), (q_t, k_t) = features.image(0), features.image(1)
    n = q_s[0].shape[1]
    without, with_hook = [], []
    for _ in range(args.repeats):
        without.append(_seconds(lambda: (attention_row_statistics(q_s, k_t), attention_row_statistics(q_t, k_s))))
        peaks = torch.zeros(n, 2)
        hook = _peak_hook(peaks, features.grid_size)
        with_hook.append(
            _seconds(
                lambda: (
                    attention_row_statistics(q_s, k_t, row_hook=hook),
                    attention_row_statistics(q_t, k_s, row_hook=hook),
                )
            )
        )
    a, b = statistics.median(without), statistics.median(with_hook)
    print(f"\n### row statistics of one pair (N = {n}, both directions), medians of {args.repeats}\n")
    print("| without peaks s | with peaks s | ratio |")
    print("|---|---|---|")
    print(f"| {a:.3f} | {b:.3f} | {b / a:.3f} |")

    height, width = features.image_sizes[0]
    rng = np.random.default_rng(0)
    pair, ten, hundred = [], [], []
    for _ in range(args.repeats):
        pair.append(_seconds(lambda: analyze_features(features, segment=False)))
        ten.append(_seconds(lambda: transfer_points(features, 0, 1, rng.uniform(0, 1, (10, 2)) * [width, height])))
        hundred.append(
            _seconds(lambda: transfer_points(features, 0, 1, rng.uniform(0, 1, (100, 2)) * [width, height]))
        )
    base = statistics.median(pair)
    print(f"\n### transfer_points, same features (M = 2), medians of {args.repeats}\n")
    print("| call | s | ratio to one pair's analyze_features (segment=False) |")
    print("|---|---|---|")
    print(f"| analyze_features, one pair | {base:.3f} | 1 |")
    for label, times in (("transfer_points, 10 points", ten), ("transfer_points, 100 points", hundred)):
        print(f"| {label} | {statistics.median(times):.3f} | {statistics.median(times) / base:.3f} |")


if __name__ == "__main__":
    main()
