"""Mutation testing of the core with mutmut 3 (slow: never run in CI; results go to TESTING.md).

The repository root is the package (`package_dir cosegment = .`), a layout mutmut cannot mutate in place, so each
module group is copied into its own scratch folder laid out as mutmut expects (`cosegment/` and `tests/` side by
side) and mutated there; the checkout is never touched. Each group runs only the fast test files that exercise its
module, with `-x` and one worker (`--max-children 1`): mutmut first records which tests reach which function, then
runs, per mutant, only those tests.

    pip install mutmut            # 3.x
    python benchmarks/mutation.py                     # every group
    python benchmarks/mutation.py processors          # one group
    python benchmarks/mutation.py analysis --sample 0.03   # analysis.py and its step modules: a small sample
    python benchmarks/mutation.py --report-only       # score the last run again, list the survivors

    python benchmarks/mutation.py correspondence --sample 0.15      # all selection-function mutants, 15% of the rest
    python benchmarks/mutation.py processors --workdir /tmp/rerun --mutants NAME...   # rerun chosen mutants
    python benchmarks/mutation.py runstate --without tests/test_bite_resume.py     # the score without a test file

mutmut 3 never mutates decorated functions; each `@contextmanager` function of a group's files is rewritten as a plain
function in the scratch copy (:func:`undecorate_context_managers`), so that it is mutated too.

Score = killed / run, over the mutants that were run; a timeout counts as killed, "no tests" as survived (mutmut's
convention). The survivors are listed and written to `<workdir>/<group>/survivors.txt`; `mutmut show NAME` there prints a diff.
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

# The tests of tests/test_long_runs.py that run no command (the others start `cosegment` runs: minutes)
FAST_LONG_RUN_TESTS = [
    "test_temporary_names",
    "test_write_replaces_and_leaves_no_temporary",
    "test_a_write_failing_midway_keeps_the_old_file",
    "test_a_failing_write_of_a_new_file_leaves_none",
    "test_safetensors_failing_midway_keeps_the_old_file",
    "test_features_save_failing_midway_keeps_the_old_file",
    "test_png_and_temporaries",
    "test_pair_analysis_round_trip",
    "test_pair_analysis_round_trip_without_refinement",
    "test_refinement_is_a_pair_setting",
    "test_pair_analysis_file_refused_when_damaged",
    "test_settings_record_and_differences",
    "test_run_state_refuses_or_recomputes_what_changed",
    "test_stop_on_signals_raises_once_and_restores",
    "test_one_pair_on_two_images_equals_the_collection_call",
    "test_written_files_get_the_umask_permissions",
    "test_a_reference_file_is_recorded_by_content",
]

# group: (files to mutate, relative to the package; the fast test files that exercise them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "processors": (
        ["processors/cross_self_attention.py"],
        ["tests/test_processor.py", "tests/test_capture_check.py"],
    ),
    "correspondence": (
        ["utils/correspondence.py", "utils/joining.py"],
        [
            "tests/test_correspondence.py",
            "tests/test_selection.py",
            "tests/test_device_follows_inputs.py",
            "tests/test_properties.py",
        ],
    ),
    "segmentation": (
        ["utils/segmentation.py"],
        ["tests/test_segmentation.py", "tests/test_device_follows_inputs.py", "tests/test_properties.py"],
    ),
    "reference": (
        ["utils/reference.py"],
        ["tests/test_reference.py", "tests/test_device_follows_inputs.py", "tests/test_bite_reference.py"],
    ),
    "analysis": (
        ["analysis.py", "features.py", "settings.py", "pairs.py", "matches.py", "transfer.py", "parts.py"],
        [
            "tests/test_validation.py",
            "tests/test_faults.py",
            "tests/test_points.py",
            "tests/test_reference.py",
            "tests/test_method.py",
            "tests/test_analysis_mutants.py",
        ],
    ),
    # the collection-level steps added after the first runs (mutants of the functions in FUNCTIONS only)
    "collection": (
        ["pairs.py", "matches.py", "parts.py", "transfer.py"],
        [
            "tests/test_outliers.py",
            "tests/test_partners.py",
            "--deselect=tests/test_partners.py::test_pipeline_partners",
            "--deselect=tests/test_partners.py::test_two_processes_split_the_partner_graph",
            "--deselect=tests/test_partners.py::test_cli_partners_argument_error",
            "tests/test_parts.py",
            "tests/test_points.py",
            "--deselect=tests/test_points.py::test_pipeline_refine_flag",
            "--deselect=tests/test_points.py::test_readme_transfer_points_snippet_runs",
            "tests/test_analysis_mutants.py",
            "tests/test_bite_collection.py",
        ],
    ),
    "runstate": (
        ["runstate.py"],
        [
            *(f"tests/test_long_runs.py::{name}" for name in FAST_LONG_RUN_TESTS),
            "tests/test_bite_resume.py",
        ],
    ),
    "files": (
        ["utils/files.py"],
        [
            *(f"tests/test_long_runs.py::{name}" for name in FAST_LONG_RUN_TESTS),
            "tests/test_safe_files.py",
            "tests/test_bite_files.py",
        ],
    ),
    "refinement": (
        ["utils/refinement.py"],
        ["tests/test_refinement.py", "tests/test_bite_refinement.py"],
    ),
    # the command's split between processes and its `--points` parser (mutants of the functions in FUNCTIONS only)
    "cli_split": (
        ["cli.py"],
        [
            "tests/test_cli.py::test_capture_shares_examples",
            "tests/test_cli.py::test_capture_shares_cover_whole_batches",
            "tests/test_cli.py::test_capture_shares_errors",
            "tests/test_cli.py::test_pair_shares_partition_pairs",
            "tests/test_cli_points.py::test_parse_points_text_and_json",
            "tests/test_cli_points.py::test_parse_points_refuses",
            "tests/test_bite_cli_split.py",
        ],
    ),
}

# Groups that mutate only some functions of their files: mutmut mutates whole files, so the others' mutants are
# generated but neither run nor scored.
FUNCTIONS: dict[str, list[str]] = {
    "collection": [
        "partner_pairs",
        "join_pair_analyses",
        "sharing_scores",
        "find_outliers",
        "confirm_by_third_images",
        "attached_points",
        "typical_points",
        "refine_by_keys",
        "cluster_collection",
        "transfer_points",
    ],
    "cli_split": ["capture_shares", "all_pairs", "pair_shares", "parse_points"],
}


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def existing(tests: list[str]) -> list[str]:
    """`tests` (files, node ids and pytest options) without the files this checkout lacks."""
    return [t for t in tests if t.startswith("-") or (ROOT / t.split("::")[0].split("=")[-1]).is_file()]


CONTEXT_MANAGER = re.compile(r"^@(?:contextlib\.)?contextmanager\ndef (\w+)\(", re.MULTILINE)


def undecorate_context_managers(path: Path) -> list[str]:
    """mutmut 3 never mutates a decorated function, which left the atomic writers (`atomic_path`, `atomic_open`) and
    `stop_on_signals` unmutated. In the scratch copy, each top-level `@contextmanager def f(...)` becomes a plain
    `def f(...)` wrapped after the module's last line (`f = contextlib.contextmanager(f)`): the same objects at run
    time, and its body mutated. Returns the names rewritten."""
    text = path.read_text()
    names = CONTEXT_MANAGER.findall(text)
    if names:
        text = CONTEXT_MANAGER.sub(r"def \1(", text)
        text += "\n\nimport contextlib as _contextlib_for_mutmut  # noqa: E402\n\n"
        text += "".join(f"{name} = _contextlib_for_mutmut.contextmanager({name})\n" for name in names)
        path.write_text(text)
    return names


def prepare(group: str, workdir: Path, without: tuple[str, ...] = ()) -> Path:
    """A fresh scratch folder `workdir/group` holding `cosegment/` (the checkout's tracked and new files, tests
    excluded), `tests/` and a `pyproject.toml` with the pytest options and this group's mutmut settings."""
    targets, tests = GROUPS[group]
    tests = [t for t in tests if t.split("::")[0] not in without]
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
    for target in targets:
        undecorate_context_managers(scratch / "cosegment" / target)
    # tests that run the README's snippets read `tests/../README.md`
    shutil.copy2(ROOT / "README.md", scratch / "README.md")
    (scratch / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
        'addopts = "-p no:cacheprovider"\n\n'
        "[tool.mutmut]\n"
        'source_paths = ["cosegment/"]\n'
        f"only_mutate = {toml_list(['cosegment/' + t for t in targets])}\n"
        f'pytest_add_cli_args = ["-x", "-q"]\n'
        f"pytest_add_cli_args_test_selection = {toml_list(existing(tests))}\n"
        "use_git_change_detection = false\n"
        # a mutant running 6x its tests' time (CPU seconds, +1 s) is a timeout, counted as killed; mutmut's default
        # (30x) let one slowed-down loop hold a shared machine for most of an hour
        "timeout_multiplier = 3.0\n"
        'also_copy = ["README.md"]\n'
    )
    return scratch


# With `--sample F`, every mutant of these functions is run, and a seeded random share F of the others.
ALWAYS = re.compile(
    r"CrossSelfAttentionCaptureProcessor|AttentionStore|self_attention_layer_levels"  # processors/
    r"|select_matches|pass_statistics|auto_thresholds|supported_spread|grow_matches|match_scores|kept_map"
    r"|confirm_matches|reverse_consistent|affine_residual|field_consistent|merge_passes|paper_thresholds"
    r"|otsu_threshold|SelectionThresholds"  # the selection functions of utils/correspondence.py and joining.py
)


def function_of(mutant: str) -> str:
    """`cosegment.utils.correspondence.x_grow_matches__mutmut_3` -> `grow_matches`; methods (mutmut joins class and
    method with U+01C1) -> `Class.method`."""
    body = re.search(r"\.x(.*)__mutmut_\d+$", mutant).group(1)
    return body[1:].replace("\u01c1", ".")


def in_group(group: str, mutant: str) -> bool:
    """Whether `mutant` is one of the group's: any mutant of its files, or only those of its FUNCTIONS."""
    return group not in FUNCTIONS or function_of(mutant) in FUNCTIONS[group]


def generate_mutants(scratch: Path) -> list[str]:
    """Generates the group's mutants (and mutmut's test statistics) without running them; returns their names."""
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
    return names


def sample_mutants(scratch: Path, fraction: float, seed: int = 0) -> list[str]:
    """The group's mutants (:func:`generate_mutants`, only those of its FUNCTIONS where it has some): every mutant of
    the `ALWAYS` functions plus a seeded random `fraction` of the others."""
    group = scratch.name
    names = [name for name in generate_mutants(scratch) if in_group(group, name)]
    always = [n for n in names if ALWAYS.search(function_of(n))]
    others = [n for n in names if n not in set(always)]
    chosen = random.Random(seed).sample(others, round(fraction * len(others)))
    print(
        f"[{group}] {len(names)} mutants: all {len(always)} of the always-run functions and "
        f"{len(chosen)} of the other {len(others)} (fraction {fraction}, seed {seed})",
        flush=True,
    )
    return sorted(always + chosen)


def mutmut_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # mutmut puts its mutated copy first on sys.path
    return env


def run_group(
    group: str, workdir: Path, timeout: float, fraction: float, mutants: list[str], without: tuple[str, ...] = ()
) -> None:
    scratch = prepare(group, workdir, without)
    start = time.time()
    names = list(mutants) or (sample_mutants(scratch, fraction) if fraction < 1 or group in FUNCTIONS else [])
    result = subprocess.run(
        [MUTMUT, "run", "--max-children", "1", *names], cwd=scratch, env=mutmut_env(), timeout=timeout, text=True
    )
    print(f"[{group}] mutmut run: exit {result.returncode} in {time.time() - start:.0f} s", flush=True)


# mutmut's exit codes (mutmut/stats.py): a timeout or an internal pytest error counts as killed, "no tests" as survived.
KILLED = {1, 3, 24, -24, 36, 152, 255}
SURVIVED = {0, 5, 33}


def report(group: str, workdir: Path) -> dict:
    """Scores the mutants that were run (`exit code` not None) from mutmut's `.meta` files, and writes the
    survivors' names to `<workdir>/<group>/survivors.txt` (`mutmut show NAME` in that folder prints a diff)."""
    scratch = workdir / group
    codes = {}
    for meta in sorted((scratch / "mutants").rglob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    codes = {name: code for name, code in codes.items() if in_group(group, name)}
    run = {name: code for name, code in codes.items() if code is not None}
    killed = sorted(name for name, code in run.items() if code in KILLED)
    survivors = sorted(name for name, code in run.items() if code in SURVIVED)
    other = sorted(name for name, code in run.items() if code not in KILLED | SURVIVED)
    (scratch / "survivors.txt").write_text("".join(f"{name}\n" for name in survivors))
    return {"generated": len(codes), "run": len(run), "killed": killed, "survivors": survivors, "other": other}


def print_breakdown(result: dict) -> None:
    """Killed / scored per module and per function (the module of `cosegment.pairs.x_f__mutmut_3` is `pairs`)."""
    rows: dict[tuple[str, str], list[int]] = {}
    for status in ("killed", "survivors"):
        for name in result[status]:
            module = name.split(".x")[0].removeprefix("cosegment.")
            row = rows.setdefault((module, function_of(name)), [0, 0])
            row[0] += status == "killed"
            row[1] += 1
    modules: dict[str, list[int]] = {}
    for (module, _), (killed, scored) in rows.items():
        total = modules.setdefault(module, [0, 0])
        total[0] += killed
        total[1] += scored
    for module, (killed, scored) in sorted(modules.items()):
        print(f"    {module}: {killed}/{scored} killed = {100 * killed / scored:.1f}%")
        for (name, function), (k, n) in sorted(rows.items()):
            if name == module:
                print(f"        {function}: {k}/{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="*", help=f"any of {list(GROUPS)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cosegment-mutation"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per group (default 3600)")
    parser.add_argument(
        "--sample", type=float, default=1.0, help="share of the mutants outside the always-run functions (default 1)"
    )
    parser.add_argument("--mutants", nargs="+", default=[], help="run only these mutants (fnmatch patterns)")
    parser.add_argument("--report-only", action="store_true", help="score the last run without running mutmut")
    parser.add_argument(
        "--without", nargs="+", default=[], help="leave these test files out (the score before they were written)"
    )
    args = parser.parse_args()
    groups = args.groups or list(GROUPS)
    unknown = [group for group in groups if group not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {list(GROUPS)}")
    total_killed = total_run = 0
    for group in groups:
        if not args.report_only:
            run_group(group, args.workdir, args.timeout, args.sample, args.mutants, tuple(args.without))
        result = report(group, args.workdir)
        killed, scored = len(result["killed"]), len(result["killed"]) + len(result["survivors"])
        total_killed, total_run = total_killed + killed, total_run + scored
        print(
            f"[{group}] {killed}/{scored} killed = {100 * killed / max(scored, 1):.1f}% "
            f"({result['run']} of {result['generated']} mutants run; {len(result['other'])} suspicious or "
            f"segfaults, not scored: {result['other']}); survivors in {args.workdir / group / 'survivors.txt'}"
        )
        print_breakdown(result)
        for name in result["survivors"]:
            print(f"    survived: {name}")
    if total_run:
        print(f"[all] {total_killed}/{total_run} killed = {100 * total_killed / total_run:.1f}%")


if __name__ == "__main__":
    main()
