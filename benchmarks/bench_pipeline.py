"""Speed and memory of the co-segmentation pipeline, as ratios measured in one run on one machine.

    python benchmarks/bench_pipeline.py                 # SD 2.1-base-shaped random weights (full size), CPU
    python benchmarks/bench_pipeline.py --scale small   # a quarter of the channels, for a quick look
    python benchmarks/bench_pipeline.py --profile       # also print where the time of one call goes

Prints markdown tables:
 (a) one pair at 512 px: `__call__` time over the DIFT-equivalent work (VAE encode + UNet forward up to the end of
     the block that holds the read layers, stock processors) and over a full UNet forward;
 (a3) capture alone over the DIFT-equivalent work, each with its VAE input in NCHW and in channels_last (NHWC);
 (b) M = 2, 4, 8, 16: capture time, analysis time, peak memory growth;
 (c) 256, 512, 768 px: analysis time and peak memory growth of one pair;
 (g) eager vs compiled capture: `torch.compile(pipe.unet)` and `pipe.unet.compile()`, graphs per call, after
     warm-up (`--compile-size`, `--compile-mode`);
 (d) with a CUDA GPU: SD 2.1-base size in float16 at 512 and 768 px, eager and compiled: capture and DIFT-equivalent
     time per image, peak memory, analysis time per pair at N = 1024 and 4096; absolute times, device named.
Weights are random: the numbers measure cost, never quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import numpy as np
import psutil
import torch
from diffusers.utils.torch_utils import unwrap_module

from cosegment import CoSegmentationFeatures, StableDiffusionCoSegmentationPipeline, analyze_features
from cosegment.processors.cross_self_attention import StopForward
from cosegment.testing import _write_tokenizer_files, make_tiny_stable_diffusion
from cosegment.utils.images import preferred_memory_format


def build_sd21_shaped(scale: str = "full", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight pipeline with SD 2.1-base's architecture (`scale="small"`: a quarter of the channels)."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    div = 1 if scale == "full" else 4
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=tuple(c // div for c in (320, 640, 1280, 1280)),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024 // div,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32 // div,
    )
    vae = AutoencoderKL(
        block_out_channels=tuple(c // div for c in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32 // div,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=1024 // div,
            intermediate_size=4096 // div,
            num_attention_heads=16 // div,
            num_hidden_layers=23,
            projection_dim=512 // div,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer(*_write_tokenizer_files(tmp), model_max_length=77)
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True)
    pipe = StableDiffusionCoSegmentationPipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


class PeakMemory:
    """Peak growth of this process's resident memory (CPU) or of CUDA allocations, over a `with` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.process = psutil.Process(os.getpid())
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.growth = torch.cuda.max_memory_allocated() - self.base
            return
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.growth = self.peak - self.base


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size + 32 * (i % 3), 3), dtype=np.uint8) for i in range(count)]


@torch.no_grad()
def dift_equivalent(
    pipe, batch: list[np.ndarray], size: int, stop_block: int, memory_format=torch.contiguous_format
) -> None:
    """What DIFT costs: VAE encode (its input in `memory_format`), noise, prompt, UNet forward with stock processors
    until `up_blocks[stop_block]` has run. Always the eager UNet (its early exit is an exception, which a compiled
    forward would not keep in one graph)."""
    device = pipe._execution_device
    unet = unwrap_module(pipe.unet)
    pixels, _ = pipe.prepare_images(batch, size, size)
    pixels = pixels.to(device, pipe.vae.dtype, memory_format=memory_format)
    latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(device, latents.dtype)
    t = torch.full((latents.shape[0],), 261, device=device)
    noisy = pipe.scheduler.add_noise(latents, noise, t)
    text = pipe.encode_prompt("", device)[0].expand(latents.shape[0], -1, -1)

    def stop(module, args, output):
        raise StopForward()

    handle = unet.up_blocks[stop_block].register_forward_hook(stop)
    try:
        unet(noisy, t, encoder_hidden_states=text)
    except StopForward:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def full_forward(pipe, batch: list[np.ndarray], size: int) -> None:
    device = pipe._execution_device
    pixels, _ = pipe.prepare_images(batch, size, size)
    latents = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor
    t = torch.full((latents.shape[0],), 261, device=device)
    text = pipe.encode_prompt("", device)[0].expand(latents.shape[0], -1, -1)
    pipe.unet(latents, t, encoder_hidden_states=text)


def interleaved_medians(runs: dict, repeats: int, device: torch.device, warmup: int = 1) -> dict[str, float]:
    """Median time of each run, the runs interleaved (so drifts in machine speed hit all alike), after `warmup`."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def capture_vs_dift_by_memory_format(pipe, pair, size: int, stop_block: int, repeats: int, device) -> None:
    """(a3): `capture_features` against the DIFT-equivalent work, each with its VAE input in NCHW and in NHWC."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    runs = {}
    for label, memory_format in formats.items():

        def capture(memory_format=memory_format) -> None:
            pipe.vae_input_memory_format = memory_format
            try:
                pipe.capture_features(pair, generator=torch.Generator().manual_seed(0))
            finally:
                pipe.vae_input_memory_format = None

        runs[f"capture {label}"] = capture
        runs[f"DIFT {label}"] = lambda memory_format=memory_format: dift_equivalent(
            pipe, pair, size, stop_block, memory_format
        )
    med = interleaved_medians(runs, repeats, device)
    best_capture = min((med[f"capture {label}"], label) for label in formats)
    best_dift = min((med[f"DIFT {label}"], label) for label in formats)
    table(
        f"(a3) capture vs DIFT-equivalent, one pair at {size} px, VAE input in each memory format, medians of "
        f"{repeats} interleaved",
        [*(f"{name} s" for name in runs), "best capture / best DIFT", "channels_last / contiguous (capture, DIFT)"],
        [
            [
                *med.values(),
                f"{best_capture[0] / best_dift[0]:.3g} ({best_capture[1]} / {best_dift[1]})",
                f"{med['capture channels_last'] / med['capture contiguous']:.3g}, "
                f"{med['DIFT channels_last'] / med['DIFT contiguous']:.3g}",
            ]
        ],
    )
    print(f"default VAE input format on {device.type}: {preferred_memory_format(device)}")


def compiled_vs_eager_capture(args, device, size: int) -> None:
    """(g): capture with `torch.compile(pipe.unet)` (diffusers' advice) and `pipe.unet.compile()` against eager.

    Each compiled pipeline is warmed up by two calls; the graphs dynamo has compiled are counted after every call, so
    a call that compiles again shows up as a growing count."""
    from torch._dynamo.utils import counters

    pair = images(2, size)
    scale = args.compile_scale or args.scale

    def build():
        if scale != "tiny":
            return build_sd21_shaped(scale).to(device)
        sd = make_tiny_stable_diffusion()
        parts = {
            k: v for k, v in sd.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        }
        pipe = StableDiffusionCoSegmentationPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    eager, wrapped, in_place = build(), build(), build()
    wrapped.unet = torch.compile(wrapped.unet, mode=args.compile_mode)
    in_place.unet.compile(mode=args.compile_mode)
    pipes = {"eager": eager, "torch.compile(unet)": wrapped, "unet.compile()": in_place}

    def capture(pipe, stop_early=True):
        return pipe.capture_features(
            pair, height=size, width=size, generator=torch.Generator().manual_seed(0), stop_early=stop_early
        )

    reference = capture(eager)
    rows = []
    for name, pipe in list(pipes.items())[1:]:
        counters.clear()
        graphs, first = [], None
        for call in range(3):
            start = time.perf_counter()
            features = capture(pipe)
            seconds = time.perf_counter() - start
            first = seconds if call == 0 else first
            graphs.append(counters["stats"]["unique_graphs"])
        error = max(float((a - b).abs().max()) for a, b in zip(features.queries, reference.queries))
        rows.append([name, first, " -> ".join(map(str, graphs)), f"{error:.2g}"])
    table(
        f"(g1) compiling the UNet ({scale}, {size} px, mode={args.compile_mode}): 3 calls each",
        ["form", "first call s (compiles)", "graphs after calls 1, 2, 3", "max |Q - Q_eager|"],
        rows,
    )
    # the compiled prefix (the default) against the compiled whole forward (`stop_early=False`, what a compiled capture
    # ran before the prefix), warmed up the same way
    for _ in range(2):
        capture(wrapped, stop_early=False)
    runs = {name: lambda pipe=pipe: capture(pipe) for name, pipe in pipes.items()}
    runs["torch.compile(unet), whole forward"] = lambda: capture(wrapped, stop_early=False)
    med = interleaved_medians(runs, args.repeats, device)
    table(
        f"(g2) capture after warm-up ({scale}), one pair at {size} px, medians of {args.repeats} interleaved",
        [*(f"{name} s" for name in med), *(f"{name} / eager" for name in list(med)[1:])],
        [[*med.values(), *(med[name] / med["eager"] for name in list(med)[1:])]],
    )


def accelerator_section(args, device: torch.device) -> None:
    """(d): SD 2.1-base-shaped random weights in float16 on the GPU (`--d-on-cpu`: the quarter-size model in float32
    on the CPU at 128 and 256 px, a smoke test of this code), eager and `torch.compile(pipe.unet)`: capture time per
    image, the DIFT-equivalent's, analysis time per pair at N = 1024 and 4096 (synthetic Q/K of the read layers'
    shape), peak memory growth."""
    scale, dtype, sizes = (
        ("full", torch.float16, [512, 768]) if device.type == "cuda" else ("small", torch.float32, [128, 256])
    )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke test)"
    rows = []
    for compiled in (False, True):
        pipe = build_sd21_shaped(scale, dtype).to(device)
        if compiled:
            pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
        for px in sizes:
            pair = images(2, px)

            def capture(pipe=pipe, pair=pair, px=px):
                return pipe.capture_features(pair, height=px, width=px, generator=torch.Generator().manual_seed(0))

            capture(), capture()  # warm-up (compiles, then checks that nothing compiles again)
            with PeakMemory(device) as memory:
                capture()
            med = interleaved_medians(
                {
                    "capture": capture,
                    "dift": lambda pipe=pipe, pair=pair, px=px: dift_equivalent(
                        pipe, pair, px, 2, preferred_memory_format(device)
                    ),
                },
                args.repeats,
                device,
                warmup=0,
            )
            rows.append(
                [
                    px,
                    "compiled" if compiled else "eager",
                    med["capture"] / 2,
                    med["dift"] / 2,
                    med["capture"] / med["dift"],
                    memory.growth / 2**20,
                ]
            )
        del pipe
    table(
        f"(d) {name}: SD 2.1-base-shaped ({scale}) random weights in {dtype}, one pair, medians of {args.repeats}",
        ["px", "UNet", "capture s / image", "DIFT-equivalent s / image", "capture / DIFT", "capture peak MiB"],
        rows,
    )
    heads, head_dim = (10, 64) if scale == "full" else (10, 16)
    rows = []
    for side in (32, 64):  # N = 1024 and 4096: the read layers' grid at 512 and 1024 px
        gen = torch.Generator().manual_seed(0)
        qk = [torch.randn(2, heads, side * side, head_dim, generator=gen).to(device, dtype) for _ in range(6)]
        features = CoSegmentationFeatures(qk[:3], qk[3:], (side, side), [(16 * side, 16 * side)] * 2)
        analyze_features(features)  # warm-up
        with PeakMemory(device) as memory:
            seconds = timed(lambda: analyze_features(features), device)
        rows.append([side * side, seconds, memory.growth / 2**20])
    table(
        f"(d2) {name}: analysis of one pair, 3 layers of {heads} heads of {head_dim} (synthetic), {dtype}",
        ["N tokens", "analysis s / pair", "peak MiB"],
        rows,
    )


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["full", "small"], default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--collections", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "u", "m", "b", "c", "g", "d"])
    parser.add_argument("--compile-size", type=int, default=512, help="image size of the compile section (g)")
    parser.add_argument(
        "--compile-scale", choices=["full", "small", "tiny"], default=None, help="model of (g); --scale by default"
    )
    parser.add_argument("--compile-mode", default=None, help="`mode` of torch.compile in (g) and (d)")
    parser.add_argument("--d-on-cpu", action="store_true", help="run (d) without a GPU: a smoke test of its code")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" threads {torch.get_num_threads()}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    )
    pipe = build_sd21_shaped(args.scale).to(device)
    size = 512
    pair = images(2, size)
    stop_block = 2  # the block holding the default layers (up_blocks.2)
    gen = torch.Generator().manual_seed(0)

    if "a" not in args.skip:
        call = lambda: pipe(image=pair, generator=gen)  # noqa: E731
        # DIFT at the VAE input format our capture uses (section (a3) compares both formats on both sides)
        dift = lambda: dift_equivalent(pipe, pair, size, stop_block, preferred_memory_format(device))  # noqa: E731
        full = lambda: full_forward(pipe, pair, size)  # noqa: E731

        def no_exit():  # the same call with the early exit switched off
            analyze_features(pipe.capture_features(pair, generator=gen, stop_early=False))

        runs = {"call": call, "dift": dift, "full": full, "no_exit": no_exit}
        med = interleaved_medians(runs, args.repeats, device)
        table(
            f"(a) one pair at {size} px, SD 2.1-shaped ({args.scale}) random weights, medians of {args.repeats}",
            [
                "__call__ s",
                "DIFT-equivalent s",
                "full UNet s",
                "no early exit s",
                "__call__ / DIFT",
                "__call__ / full",
                "__call__ / no early exit",
            ],
            [
                [
                    med["call"],
                    med["dift"],
                    med["full"],
                    med["no_exit"],
                    med["call"] / med["dift"],
                    med["call"] / med["full"],
                    med["call"] / med["no_exit"],
                ]
            ],
        )

    if "u" not in args.skip:
        # (a2) the UNet alone, inputs prepared once: what the early exit saves, without VAE and noise in the timing
        latents = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device)
        t = torch.full((2,), 261, device=device)
        text = pipe.encode_prompt("", device)[0].expand(2, -1, -1)
        names = pipe.resolve_attention_layers()
        from cosegment.processors.cross_self_attention import AttentionStore, CrossSelfAttentionCaptureProcessor

        def unet(stop: bool) -> None:
            store = AttentionStore(names, stop_after_last=stop)
            originals = dict(pipe.unet.attn_processors)
            procs = dict(originals)
            procs.update({f"{n}.processor": CrossSelfAttentionCaptureProcessor(store, n) for n in names})
            pipe.unet.set_attn_processor(procs)
            try:
                with torch.no_grad():
                    pipe.unet(latents, t, encoder_hidden_states=text)
            except StopForward:
                pass
            finally:
                pipe.unet.set_attn_processor(originals)

        unet(True), unet(False)
        early, full_ = [], []
        for _ in range(max(args.repeats, 5)):
            early.append(timed(lambda: unet(True), device))
            full_.append(timed(lambda: unet(False), device))
        e, f = statistics.median(early), statistics.median(full_)
        table(
            "(a2) UNet forward alone, one pair at 512 px: capture with early exit vs the whole forward",
            ["early exit s", "whole UNet s", "early / whole"],
            [[e, f, e / f]],
        )

    if "m" not in args.skip:
        capture_vs_dift_by_memory_format(pipe, pair, size, stop_block, args.repeats, device)

    if "b" not in args.skip:
        rows = []
        for m in args.collections:
            batch = images(m, size)
            start = time.perf_counter()
            with PeakMemory(device) as cap_mem:
                features = pipe.capture_features(batch, generator=torch.Generator().manual_seed(0))
            capture = time.perf_counter() - start
            start = time.perf_counter()
            with PeakMemory(device) as ana_mem:
                analyze_features(features)
            analysis = time.perf_counter() - start
            rows.append([m, m * (m - 1) // 2, capture, analysis, cap_mem.growth / 2**20, ana_mem.growth / 2**20])
        table(
            f"(b) collections at {size} px",
            ["M", "pairs", "capture s", "analysis s", "capture peak MiB", "analysis peak MiB"],
            rows,
        )

    if "c" not in args.skip:
        rows = []
        for px in args.sizes:
            features = pipe.capture_features(images(2, px), height=px, width=px)
            n = features.grid_size[0] * features.grid_size[1]
            start = time.perf_counter()
            with PeakMemory(device) as mem:
                analyze_features(features)
            rows.append([px, n, time.perf_counter() - start, mem.growth / 2**20])
        # N = 4096 (a 64 x 64 grid, 10 heads of 64: SD 2.1's up_blocks.2 at 1024 px), synthetic features
        gen4k = torch.Generator().manual_seed(0)
        qk = [torch.randn(2, 10, 4096, 64, generator=gen4k).to(device) for _ in range(2)]
        features = CoSegmentationFeatures([qk[0]], [qk[1]], (64, 64), [(1024, 1024)] * 2)
        start = time.perf_counter()
        with PeakMemory(device) as mem:
            analyze_features(features)
        rows.append(["1024 (synthetic, 1 layer)", 4096, time.perf_counter() - start, mem.growth / 2**20])
        table("(c) one pair by resolution: analysis", ["px", "N tokens", "analysis s", "peak MiB"], rows)

    if "g" not in args.skip:
        compiled_vs_eager_capture(args, device, args.compile_size)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pipe(image=pair, generator=gen)
        print("\n### profile of one pair call (top 15 by total CPU time)\n")
        print("```")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
        print("```")

    if (device.type == "cuda" or args.d_on_cpu) and "d" not in args.skip:
        accelerator_section(args, device)


if __name__ == "__main__":
    main()
