"""Mutation testing of the core with mutmut 3 (slow: never run in CI; results go to TESTING.md).

The repository root is the package (`package_dir cosegment = .`), a layout mutmut cannot mutate in place, so each
module group is copied into its own scratch folder laid out as mutmut expects (`cosegment/` and `tests/` side by
side) and mutated there; the checkout is never touched. Each group runs only the fast test files that exercise its
module, with `-x` and one worker (`--max-children 1`): mutmut first records which tests reach which function, then
runs, per mutant, only those tests.

    pip install mutmut            # 3.x
    python benchmarks/mutation.py                     # every group
    python benchmarks/mutation.py processors          # one group
    python benchmarks/mutation.py --report-only       # score the last run again, list the survivors

Score = killed / (all mutants - skipped); a timeout counts as killed, "no tests" as survived (mutmut's convention).
The survivors are printed with their diffs (`mutmut show`) and written to `<workdir>/<group>/survivors.txt`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = str(Path(sys.executable).with_name("mutmut"))

# group: (files to mutate, relative to the package; the fast test files that exercise them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "processors": (
        ["processors/cross_self_attention.py"],
        ["tests/test_processor.py", "tests/test_capture_check.py"],
    ),
    "correspondence": (
        ["utils/correspondence.py"],
        ["tests/test_correspondence.py", "tests/test_selection.py", "tests/test_properties.py"],
    ),
    "segmentation": (
        ["utils/segmentation.py"],
        ["tests/test_segmentation.py", "tests/test_properties.py"],
    ),
}


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(group: str, workdir: Path) -> Path:
    """A fresh scratch folder `workdir/group` holding `cosegment/` (the checkout's tracked and new files, tests
    excluded), `tests/` and a `pyproject.toml` with the pytest options and this group's mutmut settings."""
    targets, tests = GROUPS[group]
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--name-only", "HEAD", "--", *targets], capture_output=True, text=True
    ).stdout.split()
    if changed:
        raise SystemExit(f"{changed} differ from HEAD (a planted fault left over?): commit or revert first.")
    scratch = workdir / group
    shutil.rmtree(scratch, ignore_errors=True)
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for name in filter(None, files):
        source = ROOT / name
        if not source.is_file():
            continue
        target = scratch / ("tests" if name.startswith("tests/") else "cosegment") / name.removeprefix("tests/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (scratch / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
        'addopts = "-p no:cacheprovider"\n\n'
        "[tool.mutmut]\n"
        'source_paths = ["cosegment/"]\n'
        f"only_mutate = {toml_list(['cosegment/' + t for t in targets])}\n"
        f'pytest_add_cli_args = ["-x", "-q"]\n'
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        "use_git_change_detection = false\n"
    )
    return scratch


# With `--sample F`, every mutant of these functions is run, and a seeded random share F of the others.
ALWAYS = re.compile(
    r"CrossSelfAttentionCaptureProcessor|AttentionStore|self_attention_layer_levels"  # processors/
    r"|select_matches|pass_statistics|auto_thresholds|supported_spread|grow_matches|match_scores|kept_map"
    r"|confirm_matches|reverse_consistent|affine_residual|field_consistent|merge_passes|paper_thresholds"
    r"|otsu_threshold|SelectionThresholds"  # the selection functions of utils/correspondence.py
)


def function_of(mutant: str) -> str:
    """`cosegment.utils.correspondence.x_grow_matches__mutmut_3` -> `grow_matches`; methods (mutmut joins class and
    method with U+01C1) -> `Class.method`."""
    body = re.search(r"\.x(.*)__mutmut_\d+$", mutant).group(1)
    return body[1:].replace("\u01c1", ".")


def sample_mutants(scratch: Path, fraction: float, seed: int = 0) -> list[str]:
    """Generates the group's mutants (and mutmut's test statistics) without running them, and returns every mutant
    of the `ALWAYS` functions plus a seeded random `fraction` of the others."""
    subprocess.run(
        [MUTMUT, "run", "--max-children", "1", "no-such-mutant"],
        cwd=scratch,
        env=mutmut_env(),
        capture_output=True,
        text=True,
    )
    names = []
    for meta in sorted((scratch / "mutants").rglob("*.py.meta")):
        names += sorted(json.loads(meta.read_text())["exit_code_by_key"])
    always = [n for n in names if ALWAYS.search(function_of(n))]
    others = [n for n in names if n not in set(always)]
    chosen = random.Random(seed).sample(others, round(fraction * len(others)))
    print(
        f"[{scratch.name}] {len(names)} mutants: all {len(always)} of the always-run functions and "
        f"{len(chosen)} of the other {len(others)} (fraction {fraction}, seed {seed})",
        flush=True,
    )
    return sorted(always + chosen)


def mutmut_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # mutmut puts its mutated copy first on sys.path
    return env


def run_group(group: str, workdir: Path, timeout: float, fraction: float) -> None:
    scratch = prepare(group, workdir)
    start = time.time()
    names = sample_mutants(scratch, fraction) if fraction < 1 else []
    result = subprocess.run(
        [MUTMUT, "run", "--max-children", "1", *names], cwd=scratch, env=mutmut_env(), timeout=timeout, text=True
    )
    print(f"[{group}] mutmut run: exit {result.returncode} in {time.time() - start:.0f} s", flush=True)


def report(group: str, workdir: Path) -> dict:
    scratch = workdir / group
    env = mutmut_env()
    subprocess.run([MUTMUT, "export-cicd-stats"], cwd=scratch, env=env, capture_output=True, check=True)
    stats = json.loads((scratch / "mutants" / "mutmut-cicd-stats.json").read_text())
    tested = stats["total"] - stats.get("skipped", 0)
    killed = stats.get("killed", 0) + stats.get("timeout", 0)
    stats["score"] = killed / tested if tested else 0.0
    listing = subprocess.run([MUTMUT, "results"], cwd=scratch, env=env, capture_output=True, text=True).stdout
    survivors = [line.split(":")[0].strip() for line in listing.splitlines() if ": " in line]
    diffs = []
    for name in survivors:
        shown = subprocess.run([MUTMUT, "show", name], cwd=scratch, env=env, capture_output=True, text=True).stdout
        diffs.append(f"## {name}\n{shown}")
    (scratch / "survivors.txt").write_text("\n".join(diffs))
    stats["survivors"] = survivors
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="*", help=f"any of {list(GROUPS)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cosegment-mutation"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per group (default 3600)")
    parser.add_argument(
        "--sample", type=float, default=1.0, help="share of the mutants outside the always-run functions (default 1)"
    )
    parser.add_argument("--report-only", action="store_true", help="score the last run without running mutmut")
    args = parser.parse_args()
    groups = args.groups or list(GROUPS)
    unknown = [group for group in groups if group not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {list(GROUPS)}")
    total = {"killed": 0, "tested": 0}
    for group in groups:
        if not args.report_only:
            run_group(group, args.workdir, args.timeout, args.sample)
        stats = report(group, args.workdir)
        killed = stats.get("killed", 0) + stats.get("timeout", 0)
        tested = stats["total"] - stats.get("skipped", 0)
        total["killed"] += killed
        total["tested"] += tested
        print(
            f"[{group}] {killed}/{tested} killed = {100 * stats['score']:.1f}% "
            f"(survived {stats.get('survived', 0)}, no tests {stats.get('no_tests', 0)}, "
            f"timeout {stats.get('timeout', 0)}, suspicious {stats.get('suspicious', 0)}); "
            f"survivors in {args.workdir / group / 'survivors.txt'}"
        )
        for name in stats["survivors"]:
            print(f"    survived: {name}")
    if total["tested"]:
        print(f"[all] {total['killed']}/{total['tested']} killed = {100 * total['killed'] / total['tested']:.1f}%")


if __name__ == "__main__":
    main()
