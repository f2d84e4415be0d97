"""The command at scale (issue 26, item 4): `cosegment LIST.txt --partners 3` on collections of M image files, with
the tiny random pipeline (no weights here), measured as a user runs it: wall time, peak resident memory of the
command's process, and an interrupted capture resumed with `--resume`.

Images: M JPEG photos-like files of `--size` pixels (a smooth random background, noise and one ellipse; each from its
own random stream), listed one a line in a list file. The run processes them at 64 x 64 (`--height/--width`) with the
tiny pipeline, `--no-figures --no-viewer` (pictures of thousands of images are another cost), so what grows with M
is what the command holds per image: before issue 26's item 4 it held every decoded image and every image's
features; now it reads each image file when its batch is captured and each image's features from `resume/features/`
when a step needs it.

`--python OTHER` also runs another checkout's command (e.g. an older commit, PYTHONPATH set by `--pythonpath`) on the
same files, for a ratio measured in one run. Prints one markdown table and the machine; no asserts.

    python benchmarks/bench_scale_cli.py [--sizes 250 1000] [--size 512 384] [--folder /tmp/cosegment-scale-cli]
        [--resume-at 0.5] [--other-pythonpath /path/to/old/checkout/parent]
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image

if __package__ in (None, ""):  # run as a script from a checkout named `cosegment`: import that checkout
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment":
        sys.path.insert(0, os.path.dirname(_ROOT))

# One command, measured in a child that reports the command's peak resident memory (its own child).
_MEASURE = r"""
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
print(code, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def _images(folder: str, count: int, size: tuple[int, int], seed: int = 26) -> str:
    """Writes `count` JPEG files (`size` = width, height) into `folder` and their list file; returns its path."""
    listed = os.path.join(folder, "images.txt")
    if os.path.isfile(listed):
        return listed
    os.makedirs(folder, exist_ok=True)
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    names = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        base = rng.uniform(40, 200, 3) + rng.uniform(-40, 40, 3) * (rows[..., None] / height)
        image = base + rng.normal(0, 12, (height, width, 3))
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.1, 0.25) * height, rng.uniform(0.1, 0.25) * width
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
        image[inside] = rng.uniform(0, 255, 3) + rng.normal(0, 8, (int(inside.sum()), 3))
        names.append(f"photo_{index:05d}.jpg")
        PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, names[-1]), quality=90)
    with open(listed, "w", encoding="utf-8") as handle:
        handle.write("\n".join(names) + "\n")
    return listed


def _command(python: str, listed: str, model: str, out: str, extra: list[str]) -> list[str]:
    flags = [
        "--model",
        model,
        "--out",
        out,
        "--partners",
        "3",
        "--height",
        "64",
        "--width",
        "64",
        "--batch-size",
        "16",
    ]
    return [python, "-m", "cosegment", listed, *flags, "--no-figures", "--no-viewer", "--quiet", *extra]


def _measured(command: list[str], env: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], env=env, capture_output=True, text=True, check=True
    )
    code, seconds, peak = result.stdout.split()[-3:]
    return {"exit": int(code), "seconds": round(float(seconds), 1), "peak MiB": round(float(peak), 1)}


def _interrupted(command: list[str], env: dict, out: str, count: int, fraction: float) -> float:
    """Runs `command` until `fraction` of the images' features are kept, stops it with SIGTERM; returns the seconds
    it ran."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = os.path.join(out, "resume", "features")
    while child.poll() is None:
        shards = [n for n in os.listdir(store) if n.startswith("images-")] if os.path.isdir(store) else []
        if 16 * len(shards) >= fraction * count:
            child.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    child.wait(timeout=300)
    return time.perf_counter() - start


def _results(out: str) -> dict:
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        document = json.load(handle)
    document.pop("images", None)  # paths relative to each --out
    return document


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000])
    parser.add_argument("--size", type=int, nargs=2, default=[512, 384], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--folder", default="/tmp/cosegment-scale-cli")
    parser.add_argument("--resume-at", type=float, default=0.5, help="stop the capture when this share is kept")
    parser.add_argument("--other-pythonpath", default=None, help="also run the checkout found on this PYTHONPATH")
    args = parser.parse_args(argv)

    from cosegment.testing import make_tiny_stable_diffusion

    model = os.path.join(args.folder, "tiny-sd")
    if not os.path.isdir(model):
        make_tiny_stable_diffusion(model, seed=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    versions = {"this checkout": os.environ.get("PYTHONPATH", "")}  # the installed (editable) package
    if args.other_pythonpath:
        versions["other"] = args.other_pythonpath
    rows = []
    for count in args.sizes:
        listed = _images(os.path.join(args.folder, f"images-{count}"), count, tuple(args.size))
        for version, path in versions.items():
            version_env = dict(env, PYTHONPATH=path)
            out = os.path.join(args.folder, f"out-{count}-{version.replace(' ', '-')}")
            shutil.rmtree(out, ignore_errors=True)
            row = {
                "M": count,
                "version": version,
                **_measured(_command(sys.executable, listed, model, out, []), version_env),
            }
            if version == "this checkout":  # interrupted at `--resume-at` of the capture, then resumed
                clean = _results(out)
                resumed = out + "-resumed"
                shutil.rmtree(resumed, ignore_errors=True)
                command = _command(sys.executable, listed, model, resumed, [])
                row["stopped after s"] = round(_interrupted(command, version_env, resumed, count, args.resume_at), 1)
                kept = len(
                    [n for n in os.listdir(os.path.join(resumed, "resume", "features")) if n.startswith("images-")]
                )
                row["batches kept"] = f"{kept} of {-(-count // 16)}"
                again = _measured(command + ["--resume"], version_env)
                row["resumed s"] = again["seconds"]
                row["resumed = uninterrupted"] = _results(resumed) == clean
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = list(dict.fromkeys(name for row in rows for name in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(name, "")) for name in columns) + " |")
    load = os.getloadavg()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, load {load[0]:.1f}")


if __name__ == "__main__":
    main()
