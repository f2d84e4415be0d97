"""Capture with fused QKV projections (`pipe.fuse_qkv_projections()`) against the plain UNet, as a ratio measured in
one run on one machine.

    python benchmarks/bench_fused.py                 # SD 2.1-base-shaped random weights, a quarter of the channels
    python benchmarks/bench_fused.py --scale full    # full size (slow on a CPU)

Interleaved repeats of `capture_features` on 2 images at `--size` px, medians; also checks that the captured queries
and keys agree (largest absolute difference). Weights are random: the numbers measure cost, never quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from cosegment.benchmarks.bench_pipeline import build_sd21_shaped, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("small", "full"), default="small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pipe = build_sd21_shaped(args.scale)
    pipe.set_progress_bar_config(disable=True)
    pair = images(2, args.size)
    kwargs = {"height": args.size, "width": args.size}

    def capture():
        return pipe.capture_features(pair, generator=torch.Generator().manual_seed(0), **kwargs)

    plain_features = capture()
    times: dict[str, list[float]] = {"plain": [], "fused": []}
    for _ in range(args.repeats):
        for mode in ("plain", "fused"):
            if mode == "fused":
                pipe.fuse_qkv_projections()
            start = time.perf_counter()
            features = capture()
            times[mode].append(time.perf_counter() - start)
            if mode == "fused":
                pipe.unfuse_qkv_projections()
                difference = max(
                    float((a - b).abs().max())
                    for a, b in zip(plain_features.queries + plain_features.keys, features.queries + features.keys)
                )
    plain, fused = statistics.median(times["plain"]), statistics.median(times["fused"])
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"load average: {os.getloadavg()[0]:.1f}; threads {torch.get_num_threads()}")
    print("| UNet | size | plain capture (s) | fused capture (s) | fused / plain | max abs Q/K difference |")
    print("|---|---|---|---|---|---|")
    print(
        f"| SD 2.1-shaped ({args.scale}) | {args.size} | {plain:.3f} | {fused:.3f} | {fused / plain:.3f} | {difference:.2e} |"
    )
    np.testing.assert_allclose(difference, 0.0, atol=1e-3)


if __name__ == "__main__":
    main()
