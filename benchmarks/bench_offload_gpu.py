"""GPU memory and time of the memory-saving modes (issue 12), SD 2.1-base-shaped random weights in float16.

    python benchmarks/bench_offload_gpu.py            # needs a CUDA GPU; prints a markdown table
    python benchmarks/bench_offload_gpu.py --images 4 --size 512
    python benchmarks/bench_offload_gpu.py --device cpu --scale small --size 256   # smoke test of the script only

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


def prepare(mode: str, device: torch.device, scale: str):
    pipe = build_sd21_shaped(scale, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    cuda = device
    if mode == "plain":
        pipe.to(cuda)
    elif mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
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
        on_gpu += any(t.device != group.offload_device for t in tensors)
    return on_gpu


class _Memory:
    """`torch.cuda` memory statistics, or zeros on another device (the smoke test)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        self.sync()
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0


def measure(mode: str, batch, size: int, device: torch.device, scale: str) -> dict:
    memory = _Memory(device)
    pipe = prepare(mode, device, scale)
    call = dict(height=size, width=size, **NO_FILTER)
    pipe(batch, generator=torch.Generator().manual_seed(0), **call)  # warm-up
    memory.reset()
    features = pipe.capture_features(batch, height=size, width=size, generator=torch.Generator().manual_seed(0))
    capture_peak = memory.peak()
    analysis_start = memory.now()
    memory.reset()
    analyze_features(features, **NO_FILTER)
    analysis_peak = memory.peak()
    del features
    times = []
    for _ in range(3):
        memory.sync()
        start = time.perf_counter()
        pipe(batch, generator=torch.Generator().manual_seed(0), **call)
        memory.sync()
        times.append(time.perf_counter() - start)
    left = groups_on_gpu(pipe.unet)
    unet_device = next(pipe.unet.parameters()).device
    del pipe
    if device.type == "cuda":
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
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a smoke test of the script")
    parser.add_argument("--scale", default="full", choices=("full", "small"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU: nothing measured.")
        sys.exit(2)
    modes = [m for m in args.modes if device.type == "cuda" or m != "group_block_stream"]  # streams need a GPU
    batch = images(args.images, args.size)
    named = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test: no memory figures)"
    print(f"{named}, torch {torch.__version__}, M = {args.images}, {args.size} px, {args.scale} size\n")
    results = {}
    for mode in modes:
        results[mode] = measure(mode, batch, args.size, device, args.scale)
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
