"""What keeping a run's state costs (`cosegment --out DIR`, see README "Long runs"), measured in one process.

Planted features (benchmarks/planted.py, as bench_analysis_split.py) at the shape of SD 2.1's default capture at 512 px
(3 layers, 10 heads x 64, N = 1024 tokens). Times,
interleaved over repeats:
1. `analyze_pairs(features, pairs)`: the pairs in one call (what the CLI did before it kept pairs);
2. `RunState.pair_analyses`: one pair at a time, each saved to `DIR/resume/pairs/` as it finishes (a fresh run);
3. the same call again with every pair kept (a resumed run: load only);
and `CoSegmentationFeatures.save` (atomic, fsync) against `load`. Prints times and ratios; no asserts.

    python benchmarks/bench_resume.py [--images 8] [--pairs 6] [--repeats 3] [--threads 1]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from cosegment import CoSegmentationFeatures, analyze_pairs
from cosegment.benchmarks.planted import make_planted_features
from cosegment.runstate import RunState, record_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=6, help="pairs analysed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    planted = make_planted_features(args.images, noise=0.3, seed=2001, num_heads=10, head_dim=64).features
    features = CoSegmentationFeatures(  # 3 layers, as SD 2.1's default capture reads
        [q.clone() for q in planted.queries * 3],
        [k.clone() for k in planted.keys * 3],
        planted.grid_size,
        planted.image_sizes,
        None,
        planted.metadata,
    )
    pairs = [(s, t) for s in range(args.images) for t in range(s + 1, args.images)][: args.pairs]
    print(f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch thread(s); {args.images} images,")
    print(f"{len(pairs)} pairs, N = 1024, 3 layers x 10 heads x 64")

    one_call, kept, resumed = [], [], []
    for repeat in range(args.repeats):  # interleaved: a shared machine's load changes from minute to minute
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            analyze_pairs(features, pairs)
            one_call.append(time.perf_counter() - started)

            state = RunState(folder, record_settings({}))
            state.check()
            state.start()
            started = time.perf_counter()
            _, reused = state.pair_analyses(features, pairs, analyze_pairs)
            kept.append(time.perf_counter() - started)
            assert not reused

            again = RunState(folder, record_settings({}), resume="reuse")
            again.check()
            started = time.perf_counter()
            _, reused = again.pair_analyses(features, pairs, analyze_pairs)
            resumed.append(time.perf_counter() - started)
            assert len(reused) == len(pairs)

            path = os.path.join(folder, "features.safetensors")
            started = time.perf_counter()
            features.save(path)
            save = time.perf_counter() - started
            started = time.perf_counter()
            CoSegmentationFeatures.load(path)
            load = time.perf_counter() - started
            size = os.path.getsize(path) / 2**20
        print(
            f"repeat {repeat}: one call {one_call[-1]:.2f} s, one at a time and kept {kept[-1]:.2f} s "
            f"(ratio {kept[-1] / one_call[-1]:.2f}), resumed {resumed[-1]:.3f} s"
        )

    ratios = sorted(k / o for k, o in zip(kept, one_call))
    shown = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    print(f"median ratio, one pair at a time and kept / one call: {statistics.median(ratios):.2f} (all: {shown})")
    print(
        f"ratio, resumed with every pair kept / one call: {statistics.median(resumed) / statistics.median(one_call):.4f}"
    )
    print(
        f"features save (atomic, fsync) {save:.2f} s, load {load:.2f} s, {size:.0f} MiB ({size / args.images:.1f}/image)"
    )


if __name__ == "__main__":
    main()
