"""Start-up time of the commands (issue 23): `cosegment --help`, `cosegment-eval --help` and an input error (a missing
image), each against the time of importing the pipeline (`from cosegment import StableDiffusionCoSegmentationPipeline`:
what `import cosegment` cost before it became lazy).

Every command runs as a fresh subprocess, the commands interleaved round by round (so a change in the machine's load
touches them alike); the script prints each one's median wall time and its ratio to the pipeline import's median.
Usage: `python benchmarks/bench_startup.py [--rounds 7]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# The folder that holds the package folder `cosegment` (the repository root is the package).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_ROOT = os.path.dirname(_ROOT) if os.path.basename(_ROOT) == "cosegment" else None


def commands(folder: str) -> dict[str, list[str]]:
    python = [sys.executable]
    return {
        "import pipeline (reference)": python + ["-c", "from cosegment import StableDiffusionCoSegmentationPipeline"],
        "import cosegment": python + ["-c", "import cosegment"],
        "cosegment --help": python + ["-m", "cosegment", "--help"],
        "cosegment-eval --help": python + ["-m", "cosegment.evaluation", "--help"],
        "cosegment missing image": python
        + ["-m", "cosegment", "missing.jpg", "other.jpg", "--out", os.path.join(folder, "X")],
    }


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{os.cpu_count()} cores {platform.machine()} {model}; load average (1, 5, 15 min) {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs of each command, interleaved (default 7)")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if IMPORT_ROOT is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    print(f"machine: {machine()}")
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('cosegment').origin)"],
        env=env,
        capture_output=True,
        text=True,
    )
    print(f"cosegment: {found.stdout.strip()}")
    with tempfile.TemporaryDirectory() as folder:
        runs = commands(folder)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, command in runs.items():
                started = time.perf_counter()
                result = subprocess.run(command, env=env, capture_output=True, cwd=folder)
                times[name].append(time.perf_counter() - started)
                expected = 2 if "missing" in name else 0
                if result.returncode != expected:
                    raise SystemExit(f"{name}: exit status {result.returncode}: {result.stderr.decode()[-2000:]}")
    reference = statistics.median(times["import pipeline (reference)"])
    print(f"{'command':30s} {'median s':>9s} {'min s':>7s} {'ratio':>6s}   ({args.rounds} interleaved rounds)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:30s} {median:9.3f} {min(values):7.3f} {median / reference:6.3f}")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
