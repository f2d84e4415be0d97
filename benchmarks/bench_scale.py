"""Collections of thousands (issue 26): time per image and peak memory of `analyze_features(features, partners=3)`
against the number of images M, features in memory or on disk (`CoSegmentationFeatures.load(folder, mmap=True)`).

Two shapes of synthetic features, each collection written once, batch by batch, to a
:class:`~cosegment.store.FeatureStore` under `--folder` (never held whole in memory):

- `planted`: this package's planted generator (`benchmarks/planted.py`: one object of 4 parts under a known warp in
  every image, confusable backgrounds, noise 0.6), 4 heads x 32, one layer, N = 1024 tokens: 1 MiB of queries and keys
  per image. Each image is drawn from its own random stream (`[seed, i]`), the object, backgrounds' shared stuff and
  projections from the collection's (`seed`), so a collection of any size is made one batch at a time. Scored against
  the planted truth (precision, coverage, mask Jaccard, part NMI; `benchmarks/planted.py`'s metrics).
- `sd`: the same generator at SD 2.1's default capture shape at 512 px (3 layers, 10 heads x 64, N = 1024: 15 MiB per
  image); synthetic values (no model runs here).

Each (shape, M, mode) runs in a fresh process, which loads the features (`memory`: all read into memory; `mmap`: kept
on disk) and then measures the analysis alone: its wall time, and its peak memory growth over the process's memory
after loading (resident set sampled every 5 ms; `peak MiB`), against the features' size. Prints one markdown table and
the machine; no asserts.

    python benchmarks/bench_scale.py [--sizes 64 256 1024 4096] [--shape planted] [--modes memory mmap]
        [--threads 1] [--folder /tmp/cosegment-scale]
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a checkout named `cosegment`: import that checkout
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment":
        sys.path.insert(0, os.path.dirname(_ROOT))

from cosegment import CoSegmentationFeatures, analyze_features  # noqa: E402
from cosegment.benchmarks.planted import PlantedCase, _background, _object_parts, _unit, score_output  # noqa: E402

SHAPES = {
    "planted": {"num_heads": 4, "head_dim": 32, "num_layers": 1},
    "sd": {"num_heads": 10, "head_dim": 64, "num_layers": 3},
}
BATCH = 64
PARTNERS = 3


def _planted_truth_and_batches(
    folder: str, num_images: int, seed: int, num_heads: int, head_dim: int, num_layers: int
):
    """Writes a planted collection of `num_images` images to a feature store in `folder`, `BATCH` images at a time,
    and its truth to `folder/truth.json` (as `make_planted_features`, noise 0.6, 4 parts, 32 x 32 tokens; each image
    from its own stream)."""
    from cosegment.store import FeatureStore

    h = w = 32
    channels, noise, radius, num_parts, part_share, sharpness = 64, 0.6, 8.0, 4, 0.5, 30.0
    rng = np.random.default_rng(seed)
    shape = (rng.uniform(0.0, 0.15), rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.1))
    shape += (rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi))
    part_embed = _unit(rng.normal(size=(num_parts + 1, channels)))
    detail_freqs = rng.normal(0.0, 1.0, size=(64, 2))
    detail_phases = rng.uniform(0.0, 2 * np.pi, size=64)
    detail_amps = rng.normal(0.0, 1.0 / math.sqrt(channels), size=(64, channels))
    stuff_embed = _unit(rng.normal(size=(2, channels)))
    tiles = [_unit(rng.normal(size=(p, p, channels))) for p in (3, 4)]
    amp = math.sqrt(sharpness * math.sqrt(head_dim))
    w_q = [rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=(num_heads, head_dim, channels)) for _ in range(num_layers)]
    w_k = [q + 0.3 * rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=q.shape) for q in w_q]
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    coords = np.stack([rows, cols], axis=-1)
    names = [f"layer_{i}" for i in range(num_layers)]
    store = FeatureStore.create(folder, num_images, (h, w), names, {"planted": "bench_scale", "seed": seed})
    truth = {"scales": [], "mirrors": [], "centres": [], "token_parts": [], "shape": list(shape)}
    for first in range(0, num_images, BATCH):
        images = range(first, min(first + BATCH, num_images))
        queries = [[] for _ in range(num_layers)]
        keys = [[] for _ in range(num_layers)]
        sizes = []
        for i in images:
            image_rng = np.random.default_rng([seed, i])
            scale, mirror = image_rng.uniform(0.6, 1.4), bool(image_rng.random() < 0.5)
            extent = radius * scale * 1.3
            cr, cc = image_rng.uniform(extent, h - 1 - extent), image_rng.uniform(extent, w - 1 - extent)
            u = np.stack([(rows - cr) / scale, (-1.0 if mirror else 1.0) * (cols - cc) / scale], axis=-1)
            parts = _object_parts(u[..., 0], u[..., 1], radius, num_parts, shape)
            detail = math.sqrt(2.0 / 64) * np.cos(u @ detail_freqs.T + detail_phases) @ detail_amps
            obj = math.sqrt(part_share) * part_embed[parts] + math.sqrt(1 - part_share) * detail
            background = _background(image_rng, coords, 5, stuff_embed, tiles, part_share)
            f = np.where((parts > 0)[..., None], obj, background)
            f = (f + noise * _unit(image_rng.normal(size=f.shape))).reshape(h * w, channels)
            for layer in range(num_layers):
                q = amp * np.einsum("hdc,nc->hnd", w_q[layer], f)
                key_noise = noise * amp * image_rng.normal(0.0, 1.0 / math.sqrt(head_dim), size=q.shape)
                queries[layer].append(torch.from_numpy(q.astype(np.float32)))
                keys[layer].append(torch.from_numpy((amp * np.einsum("hdc,nc->hnd", w_k[layer], f) + key_noise)))
            sizes.append((int(h * 8 * (1 + 0.25 * (i % 3))), int(w * 8 * (1 + 0.25 * ((i + 1) % 2)))))
            truth["scales"].append(scale)
            truth["mirrors"].append(mirror)
            truth["centres"].append([cr, cc])
            truth["token_parts"].append(parts.tolist())
        store.write(
            first,
            [torch.stack(q) for q in queries],
            [torch.stack(k).float() for k in keys],
            sizes,
        )
    with open(os.path.join(folder, "truth.json"), "w", encoding="utf-8") as handle:
        json.dump(truth, handle)


def _case(features: CoSegmentationFeatures, folder: str) -> PlantedCase:
    with open(os.path.join(folder, "truth.json"), encoding="utf-8") as handle:
        truth = json.load(handle)
    return PlantedCase(
        features=features,
        scales=np.asarray(truth["scales"]),
        mirrors=np.asarray(truth["mirrors"]),
        centres=np.asarray(truth["centres"]),
        object_radius=8.0,
        num_parts=4,
        token_parts=np.asarray(truth["token_parts"]),
        shape=tuple(truth["shape"]),
    )


def _resident_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(folder: str, mode: str, score: bool) -> dict:
    """In this process: load the store in `folder` (`mode` `"memory"` or `"mmap"`), analyse it, measure."""
    if mode == "file":  # one features file, read into memory (for earlier versions, which read no store)
        features = CoSegmentationFeatures.load(os.path.join(folder, "features.safetensors"))
    else:
        features = CoSegmentationFeatures.load(folder, mmap=mode == "mmap")
    shapes = [tuple(q.shape) for q in features.queries] if mode != "mmap" else features.shapes
    feature_mib = 2 * sum(math.prod(shape) for shape in shapes) * 4 / 2**20
    base = _resident_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_mib())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    output = analyze_features(features, partners=PARTNERS)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    row = {
        "M": features.num_images,
        "mode": mode,
        "pairs": len(output.correspondences),
        "features MiB": round(feature_mib, 1),
        "s per image": round(seconds / features.num_images, 3),
        "peak MiB": round(max(peak[0], _resident_mib()) - base, 1),
    }
    row["peak / features"] = round(row["peak MiB"] / feature_mib, 3)
    if mode == "mmap":
        row["reads per image"] = round(float(np.mean(features.reads)), 2)
    if score:
        row.update(
            {k: round(v, 3) for k, v in score_output(_case(features, folder), output).items() if k != "matches"}
        )
    return row


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="planted")
    parser.add_argument("--modes", nargs="+", choices=["memory", "mmap", "file"], default=["memory", "mmap"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--folder", default="/tmp/cosegment-scale")
    parser.add_argument("--no-score", action="store_true", help="skip the quality metrics (planted truth)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the measured runs")
    parser.add_argument("--case", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], not args.no_score)), flush=True)
        return
    rows = []
    for size in args.sizes:
        folder = os.path.join(args.folder, f"{args.shape}-{size}-{args.seed}")
        if not os.path.isfile(os.path.join(folder, "truth.json")):
            _planted_truth_and_batches(folder, size, args.seed, **SHAPES[args.shape])
        if "file" in args.modes and not os.path.isfile(os.path.join(folder, "features.safetensors")):
            CoSegmentationFeatures.load(folder).save(os.path.join(folder, "features.safetensors"))
        for mode in args.modes:
            command = [args.python, os.path.abspath(__file__), "--case", folder, mode, "--threads", str(args.threads)]
            command += ["--no-score"] if args.no_score else []
            result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                continue
            row = {"shape": args.shape, **json.loads(result.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    first = {row["mode"]: row["s per image"] for row in rows if row["M"] == min(args.sizes)}
    for row in rows:
        row[f"time / M={min(args.sizes)}"] = round(row["s per image"] / first[row["mode"]], 2)
    print(markdown(rows))
    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
