"""GPU memory and time of the memory-saving modes (issue 12), SD 2.1-base-shaped random weights in float16.

    python benchmarks/bench_offload_gpu.py            # needs a CUDA GPU; prints a markdown table
    python benchmarks/bench_offload_gpu.py --images 4 --size 512

For each mode -- plain `.to("cuda")`, `enable_model_cpu_offload()`, block-level group offloading (with and without
CUDA streams) and leaf-level group offloading -- one warm-up call, then: peak GPU memory during the capture
(`torch.cuda.max_memory_allocated` over `capture_features`), GPU memory allocated when the analysis starts and its
peak during the analysis, the time of a whole `__call__` (median of 3) over the plain run's, and how many offloading
groups still hold weights on the GPU after the call (0 expected). Weights are random: cost only, never quality.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from cosegment import analyze_features
from cosegment.benchmarks.bench_pipeline import build_sd21_shaped, images
from cosegment.processors.cross_self_attention import offloading_groups

INF = float("inf")
NO_FILTER = {"max_entropy": INF, "max_spread": INF, "max_collapse": INF, "max_inverse_error": INF}
MODES = ("plain", "model_cpu_offload", "group_block", "group_block_stream", "group_leaf")


def prepare(mode: str):
    pipe = build_sd21_shaped("full", dtype=torch.float16)
    cuda = torch.device("cuda")
    if mode == "plain":
        pipe.to(cuda)
    elif mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload()
    else:
        pipe.vae.to(cuda)
        pipe.text_encoder.to(cuda)
        pipe.unet.enable_group_offload(
            onload_device=cuda,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level" if mode == "group_leaf" else "block_level",
            num_blocks_per_group=None if mode == "group_leaf" else 1,
            use_stream=mode == "group_block_stream",
        )
    return pipe


def groups_on_gpu(unet) -> int:
    on_gpu = 0
    for group in offloading_groups(unet):
        tensors = [p for m in group.modules for p in m.parameters()] + list(group.parameters)
        on_gpu += any(t.device.type == "cuda" for t in tensors)
    return on_gpu


def measure(mode: str, batch, size: int) -> dict:
    pipe = prepare(mode)
    call = dict(height=size, width=size, **NO_FILTER)
    pipe(batch, generator=torch.Generator().manual_seed(0), **call)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    features = pipe.capture_features(batch, height=size, width=size, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    capture_peak = torch.cuda.max_memory_allocated()
    analysis_start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    analyze_features(features, **NO_FILTER)
    torch.cuda.synchronize()
    analysis_peak = torch.cuda.max_memory_allocated()
    del features
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(batch, generator=torch.Generator().manual_seed(0), **call)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    left = groups_on_gpu(pipe.unet)
    unet_device = next(pipe.unet.parameters()).device
    del pipe
    torch.cuda.empty_cache()
    return {
        "capture_peak": capture_peak,
        "analysis_start": analysis_start,
        "analysis_peak": analysis_peak,
        "time": statistics.median(times),
        "groups_on_gpu": left,
        "unet_after": str(unet_device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU: nothing measured.")
        sys.exit(2)
    batch = images(args.images, args.size)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, M = {args.images}, {args.size} px, float16\n")
    results = {}
    for mode in args.modes:
        results[mode] = measure(mode, batch, args.size)
        print(f"{mode}: {results[mode]}", flush=True)
    plain = results.get("plain")
    gib = 2**30
    print(
        "\n| mode | capture peak (GiB) | at analysis start (GiB) | analysis peak (GiB) | call (s) | time / plain |"
        " groups on GPU after | UNet after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        ratio = f"{r['time'] / plain['time']:.2f}" if plain else "-"
        print(
            f"| {mode} | {r['capture_peak'] / gib:.2f} | {r['analysis_start'] / gib:.2f} | "
            f"{r['analysis_peak'] / gib:.2f} | {r['time']:.2f} | {ratio} | {r['groups_on_gpu']} | {r['unet_after']} |"
        )


if __name__ == "__main__":
    main()
