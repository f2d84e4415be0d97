"""Long runs lose nothing: atomic writes, the state a run keeps for `--resume`, and clean stops on SIGINT/SIGTERM.

The signal tests run the real `cosegment` command on the tiny pipeline in a child process that pauses at a chosen
point (a wrapper patches one function to write a marker file and wait), send the signal once the marker exists (no
sleeps that race), then check the folder and resume in this process.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import NO_FILTER, assert_same_contents
from safetensors.torch import load_file

import cosegment
from cosegment import CoSegmentationFeatures, analyze_features, analyze_pairs
from cosegment.cli import main
from cosegment.runstate import (
    RECORDED_SETTINGS,
    RunInterrupted,
    RunState,
    describe_kept,
    load_pair_analysis,
    record_settings,
    save_pair_analysis,
    setting_differences,
    stop_on_signals,
)
from cosegment.utils.files import (
    atomic_open,
    atomic_path,
    find_temporaries,
    is_temporary,
    remove_temporaries,
    save_png,
    save_safetensors,
    temporary_path,
    write_text,
)

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cosegment.__file__)))
NO_FILTER_FLAGS = [f"--{name.replace('_', '-')}={value}" for name, value in NO_FILTER.items()]


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------------


def test_temporary_names(tmp_path):
    path = temporary_path(tmp_path / "results.json")
    name = os.path.basename(path)
    assert os.path.dirname(path) == str(tmp_path)  # same folder: the rename stays on one file system
    assert name.startswith(".results.json") and name.endswith(".json") and is_temporary(name)
    assert temporary_path(tmp_path / "a.png") != temporary_path(tmp_path / "a.png")
    assert not is_temporary("results.json") and not is_temporary(".hidden")


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "notes.txt"
    write_text(path, "first")
    write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt(), RunInterrupted(15)])
def test_a_write_failing_midway_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "results.json"
    write_text(path, '{"complete": true}\n')
    with pytest.raises(type(error)):
        with atomic_open(path, "w") as handle:
            handle.write('{"complete": fal')
            handle.flush()
            assert len(find_temporaries(tmp_path)) == 1  # the partial bytes are on disk, under another name
            raise error
    assert json.loads(path.read_text()) == {"complete": True}
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_failing_write_of_a_new_file_leaves_none(tmp_path):
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "new.bin") as temporary:
            with open(temporary, "wb") as handle:
                handle.write(b"half")
            raise OSError("disk full")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        with atomic_path(tmp_path / "new.bin"):
            pass
    assert os.listdir(tmp_path) == []


def _half_then_fail(tensors, filename, metadata=None):
    """A safetensors writer that dies after writing half a file (a full disk)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(data[: len(data) // 2])
    raise OSError("No space left on device")


def test_safetensors_failing_midway_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "arrays.safetensors"
    save_safetensors({"x": torch.arange(6.0)}, path, metadata={"format": "test"})
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_safetensors({"x": torch.zeros(1000)}, path)
    assert torch.equal(load_file(path)["x"], torch.arange(6.0))
    assert os.listdir(tmp_path) == ["arrays.safetensors"]


def test_features_save_failing_midway_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    old = CoSegmentationFeatures([torch.randn(2, 1, 4, 3)], [torch.randn(2, 1, 4, 3)], (2, 2), [(8, 8), (8, 8)])
    new = CoSegmentationFeatures([torch.randn(2, 1, 4, 3)], [torch.randn(2, 1, 4, 3)], (2, 2), [(9, 9), (9, 9)])
    path = tmp_path / "features.safetensors"
    old.save(path)
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_fail)
    with pytest.raises(OSError):
        new.save(path)
    loaded = CoSegmentationFeatures.load(path)
    assert loaded.image_sizes == [(8, 8), (8, 8)] and torch.equal(loaded.queries[0], old.queries[0])
    assert find_temporaries(tmp_path) == []


def test_png_and_temporaries(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "p.png", picture)
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "p.png")), picture)
    (tmp_path / "sub").mkdir()
    left = [temporary_path(tmp_path / "sub" / "x.png"), temporary_path(tmp_path / "y.json")]
    for path in left:
        open(path, "w").close()
    assert find_temporaries(tmp_path) == sorted(left)
    assert remove_temporaries(tmp_path) == sorted(left)
    assert sorted(os.listdir(tmp_path)) == ["p.png", "sub"] and os.listdir(tmp_path / "sub") == []


# ---------------------------------------------------------------------------------------------------------------------
# Kept pair analyses and settings
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def features():
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randn(3, 2, 16, 4, generator=generator) for _ in range(2)]
    keys = [q + 0.3 * torch.randn(q.shape, generator=generator) for q in queries]
    return CoSegmentationFeatures(queries, keys, (4, 4), [(32, 32), (40, 32), (32, 48)])


def test_pair_analysis_round_trip(features, tmp_path):
    analyses = analyze_pairs(features, max_entropy=float("inf"))
    for analysis in analyses:
        save_pair_analysis(analysis, tmp_path / f"{analysis.source_index}_{analysis.target_index}.safetensors")
    loaded = [load_pair_analysis(tmp_path / f"{a.source_index}_{a.target_index}.safetensors") for a in analyses]
    for mine, theirs in zip(analyses, loaded):
        assert (theirs.source_index, theirs.target_index, theirs.grid_size) == (
            mine.source_index,
            mine.target_index,
            mine.grid_size,
        )
        assert theirs.settings == mine.settings and theirs.settings["max_entropy"] == float("inf")
        for a, b in zip(mine.passes, theirs.passes):
            assert (a.source_index, a.target_index, a.thresholds) == (b.source_index, b.target_index, b.thresholds)
            for name in ("keep", "max_prob", "inverse_entropy", "peak_points"):
                assert torch.equal(getattr(a, name), getattr(b, name))
            for name, value in a.statistics.__dict__.items():
                assert value.dtype == getattr(b.statistics, name).dtype
                assert torch.equal(value, getattr(b.statistics, name))
    # joined in another order, the loaded analyses give the output of a plain call
    expected = analyze_features(features, max_entropy=float("inf"))
    joined = analyze_features(features, max_entropy=float("inf"), pair_analyses=loaded[::-1])
    assert np.array_equal(joined.density_maps, expected.density_maps)
    for a, b in zip(joined.correspondences, expected.correspondences):
        assert np.array_equal(a.source_tokens, b.source_tokens) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.target_points, b.target_points)  # refined from the kept sub-token peaks


def test_pair_analysis_round_trip_without_refinement(features, tmp_path):
    analysis = analyze_pairs(features, [(0, 2)], refine=False)[0]
    assert all(result.peak_points is None for result in analysis.passes)
    save_pair_analysis(analysis, tmp_path / "pair.safetensors")
    loaded = load_pair_analysis(tmp_path / "pair.safetensors")
    assert all(result.peak_points is None for result in loaded.passes)
    refined = analyze_pairs(features, [(0, 2)])[0]
    assert all(result.peak_points.shape == (16, 2) for result in refined.passes)


def test_refinement_is_a_pair_setting(tmp_path):
    record = _settings(tmp_path)
    differences = setting_differences(record, _settings(tmp_path, no_refine=True, points="1,2"))
    assert differences == {
        "features": [],
        "pairs": ["no_refine was null, now true"],
        "results": ['points was null, now "1,2"'],
    }


def test_pair_analysis_file_refused_when_damaged(features, tmp_path):
    path = tmp_path / "pair.safetensors"
    save_pair_analysis(analyze_pairs(features, [(0, 1)])[0], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="not a complete cosegment pair analysis file"):
        load_pair_analysis(path)
    save_safetensors({"x": torch.zeros(1)}, path, metadata={"format": "other"})
    with pytest.raises(ValueError, match="format 'other'"):
        load_pair_analysis(path)


def _settings(tmp_path, **changes) -> dict:
    image = tmp_path / "a.png"
    if not image.exists():
        PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    arguments = {"model": "m", "images": [str(image), str(image)], "seed": 0, "max_entropy": None, "num_parts": None}
    return record_settings({**arguments, **changes})


def test_settings_record_and_differences(tmp_path):
    record = _settings(tmp_path, max_spread=float("inf"))
    assert set(record) == set(RECORDED_SETTINGS) and record["max_spread"] == float("inf")
    assert len(record["images"]) == 2 and len(record["images"][0]) == 64  # SHA-256 of the file, not its name
    assert json.loads(json.dumps(record)) == record
    differences = setting_differences(record, _settings(tmp_path, max_spread=float("inf"), seed=1, num_parts=3))
    assert differences == {"features": ["seed was 0, now 1"], "pairs": [], "results": ["num_parts was null, now 3"]}
    older = {name: value for name, value in record.items() if name != "prompt"}
    assert setting_differences(older, record)["features"] == ["prompt was not recorded, now null"]


def test_run_state_refuses_or_recomputes_what_changed(tmp_path):
    out = tmp_path / "out"
    first = RunState(out, _settings(tmp_path))
    first.check()
    first.start()
    assert json.loads((out / "resume" / "settings.json").read_text())["settings"] == _settings(tmp_path)
    os.makedirs(first.features_path)
    write_text(os.path.join(first.features_path, "images-00000000-00000001.safetensors"), "stand-in")
    write_text(first.pair_path(0, 1), "stand-in")

    changed = RunState(out, _settings(tmp_path, max_entropy=2.0, seed=5), resume="reuse")
    with pytest.raises(ValueError) as refusal:
        changed.check()
    message = str(refusal.value)
    assert "\n" not in message and "seed was 0, now 5" in message and "max_entropy was null, now 2.0" in message
    assert "--resume=overwrite" in message

    same = RunState(out, _settings(tmp_path, num_parts=4), resume="reuse")
    same.check()
    assert same.stale == () and same.changes == ["num_parts was null, now 4"]

    thresholds = RunState(out, _settings(tmp_path, max_entropy=2.0), resume="overwrite")
    thresholds.check()
    thresholds.start()
    assert thresholds.stale == ("pairs",)
    assert os.path.exists(first.features_path) and not os.path.exists(first.pair_path(0, 1))
    assert describe_kept(out) == f"the features in {out / 'resume'}"

    fresh = RunState(out, _settings(tmp_path, max_entropy=2.0))  # no --resume: nothing is reused
    fresh.check()
    fresh.start()
    assert not os.path.exists(first.features_path) and describe_kept(out) == "nothing kept yet"
    with pytest.raises(ValueError, match="resume"):
        RunState(out, {}, resume="yes")


def test_stop_on_signals_raises_once_and_restores(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as stop:
        with stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here, at once
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second signal during the clean-up is ignored
                write_text(tmp_path / "cleanup.txt", "done")
    assert stop.value.exit_code == 143 and "SIGTERM" in str(stop.value)
    assert (tmp_path / "cleanup.txt").read_text() == "done"
    assert signal.getsignal(signal.SIGTERM) == before


# ---------------------------------------------------------------------------------------------------------------------
# The command, resumed
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(photos, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("long-images")
    paths = []
    for i, photo in enumerate(photos):
        paths.append(str(folder / f"photo_{i}.png"))
        PIL.Image.fromarray(photo).save(paths[-1])
    return paths


def _arguments(image_files, tiny_sd_path, out) -> list[str]:
    flags = ["--model", tiny_sd_path, "--out", str(out), "--seed", "2", "--height", "128", "--width", "128"]
    return image_files + flags + ["--batch-size", "2", "--top-k", "5"] + NO_FILTER_FLAGS


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def clean_run(image_files, tiny_sd_path, tmp_path_factory):
    """An uninterrupted run: what every resumed run must write."""
    out = tmp_path_factory.mktemp("clean")
    assert main(_arguments(image_files, tiny_sd_path, out)) == 0
    return out


def _assert_same_as(clean, out) -> None:
    assert _files(out) == _files(clean)
    for name in _files(clean):
        if name == "results.json":  # the image paths are relative to each --out: compared as absolute paths
            assert _results_document(clean) == _results_document(out)
            continue
        assert_same_contents(os.path.join(clean, name), os.path.join(out, name))


def _results_document(folder) -> dict:
    with open(os.path.join(folder, "results.json")) as handle:
        document = json.load(handle)
    for entry in document["images"]:
        entry["path"] = os.path.normpath(os.path.join(folder, entry["path"]))
    return document


def _inode(path) -> int:
    """An atomic write makes a new file: the same inode means the file was not written again."""
    return os.stat(path).st_ino


def _feature_inodes(out) -> dict[str, int]:
    """The inodes of the kept feature store's files (its index and one shard per captured batch)."""
    return {name: _inode(out / "resume" / "features" / name) for name in os.listdir(out / "resume" / "features")}


def test_resume_after_a_complete_run_reuses_everything(clean_run, image_files, tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(clean_run, out)
    features = _feature_inodes(out)
    assert sorted(features) == ["images-00000000-00000001.safetensors", "images-00000002-00000003.safetensors"] + [
        "store.json"
    ]  # one shard per batch of 2
    pairs = {name: _inode(out / "resume" / "pairs" / name) for name in os.listdir(out / "resume" / "pairs")}
    capsys.readouterr()
    assert main(_arguments(image_files, tiny_sd_path, out) + ["--resume"]) == 0
    log = capsys.readouterr().err
    assert "resume: reused the features of 4 images" in log and "reused 6 of 6 pair analyses" in log
    assert "analysed 0 pairs" in log and "capturing" not in log
    assert _feature_inodes(out) == features
    assert {name: _inode(out / "resume" / "pairs" / name) for name in pairs} == pairs
    _assert_same_as(clean_run, out)


def test_resume_refuses_other_settings_and_overwrite_recomputes(
    clean_run, image_files, tiny_sd_path, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(clean_run, out)
    features = _feature_inodes(out)
    changed = [a if a != "--max-spread=inf" else "--max-spread=30" for a in _arguments(image_files, tiny_sd_path, out)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as refusal:
        main(changed + ["--resume"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refusal.value.code == 2 and "max_spread was Infinity, now 30.0" in error and "seed" not in error
    assert _files(out) == _files(clean_run)  # nothing touched

    assert main(changed + ["--resume=overwrite"]) == 0
    log = capsys.readouterr().err
    assert "resume: max_spread was Infinity, now 30.0" in log and "reused the features of 4 images" in log
    assert "analysed 6 pairs" in log and "reused 6" not in log
    assert _feature_inodes(out) == features
    fresh = tmp_path / "fresh"
    assert main([a if a != str(out) else str(fresh) for a in changed]) == 0
    _assert_same_as(fresh, out)

    kept = {name: os.stat(out / "resume" / "features" / name).st_mtime_ns for name in features}
    assert main(changed) == 0  # no --resume: a fresh run, nothing reused
    log = capsys.readouterr().err
    assert "reused" not in log and "captured already" not in log and "capturing images 0-3" in log
    # every file written again (an inode number alone may be reused by the file system once the old file is gone)
    again = {
        name: os.stat(out / "resume" / "features" / name).st_mtime_ns
        for name in os.listdir(out / "resume" / "features")
    }
    assert sorted(again) == sorted(kept) and all(again[name] > kept[name] for name in kept)


# ---------------------------------------------------------------------------------------------------------------------
# Interrupted by a signal
# ---------------------------------------------------------------------------------------------------------------------

# Runs `cosegment` with one function patched to write the marker file $PAUSE_MARK and wait for a signal at a point:
# "capture" (at the second UNet forward, attention processors installed), "pair:N" (inside the analysis of the pair
# after N finished and kept ones),
# "write:NAME" (NAME written completely under its temporary name, not yet renamed).
PAUSING_CLI = r"""
import os, sys, time

point, marker = os.environ["PAUSE_AT"], os.environ["PAUSE_MARK"] + os.environ.get("RANK", "")  # one per process

def pause():
    open(marker, "w").close()
    while True:
        time.sleep(0.05)  # the signal handler raises here

import cosegment
if point == "capture":
    import diffusers
    forward, calls = diffusers.UNet2DConditionModel.forward, []
    def paused_forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first batch is captured (the capture may end a forward early by an exception)
            pause()
        return forward(self, *args, **kwargs)
    diffusers.UNet2DConditionModel.forward = paused_forward
elif point.startswith("pair:"):  # inside the next pair's analysis (pass_statistics runs twice per pair)
    module = sys.modules[cosegment.analyze_pairs.__module__]
    statistics, calls = module.pass_statistics, []
    def paused_statistics(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * int(point[5:]) + 1:
            pause()
        return statistics(*args, **kwargs)
    module.pass_statistics = paused_statistics
elif point.startswith("write:"):  # the atomic writers' rename of the complete temporary file
    replace = os.replace
    def paused_replace(source, destination, *args, **kwargs):
        if os.path.basename(os.fspath(source)).startswith("." + point[6:]):
            pause()
        return replace(source, destination, *args, **kwargs)
    os.replace = paused_replace

from cosegment.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _interrupt(
    arguments: list[str], point: str, signum: int, folder, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Runs the command in a child process (or `launcher` with 2 processes) until it pauses at `point` (every process),
    sends `signum` to the child, waits for it to end."""
    script, marker = folder / "pausing_cli.py", folder / "paused"
    script.write_text(PAUSING_CLI)
    markers = [marker] if launcher is None else [folder / "paused0", folder / "paused1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PAUSE_AT=point, PAUSE_MARK=str(marker))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    child = subprocess.Popen(
        (launcher or [sys.executable]) + [str(script), *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not all(path.exists() for path in markers):
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the child never paused at {point}: {child.communicate()[1][-3000:]}")
            time.sleep(0.05)
        child.send_signal(signum)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def _assert_every_file_complete(out) -> None:
    """Every final file absent or complete and loadable; no temporary file."""
    assert find_temporaries(out) == []
    for name in _files(out):
        path = os.path.join(out, name)
        if name.endswith(".json"):
            with open(path) as handle:
                json.load(handle)
        elif name == "results.safetensors":
            assert "density_maps" in load_file(path)
        elif name.startswith("resume/features/images-"):  # a shard: one captured batch
            assert {name.split(".")[0] for name in load_file(path)} == {"keys", "queries"}
        elif name.startswith("resume/pairs/"):
            load_pair_analysis(path)
        elif name.endswith(".png"):
            with PIL.Image.open(path) as image:
                image.load()
        elif name == "index.html" or (name.startswith("viewer/") and name.endswith(".js")):  # the viewer (issue 24)
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            assert text.rstrip().endswith("</html>" if name == "index.html" else ");"), name
        else:
            raise AssertionError(f"unexpected file {name}")


@pytest.mark.parametrize(
    "point, signum, kept_pairs",
    [
        ("capture", signal.SIGTERM, 0),
        ("pair:2", signal.SIGINT, 2),
        ("write:results.safetensors", signal.SIGTERM, 6),
    ],
)
def test_interrupted_run_keeps_complete_files_and_resumes(
    point, signum, kept_pairs, clean_run, image_files, tiny_sd_path, tmp_path, capsys
):
    out = tmp_path / "out"
    if point.startswith("write:"):  # over an earlier run's results
        out.mkdir()
        for name in ("results.json", "results.safetensors"):
            shutil.copy(clean_run / name, out / name)
    arguments = _arguments(image_files, tiny_sd_path, out)
    stopped = _interrupt(arguments, point, signum, tmp_path)
    name = signal.Signals(signum).name
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if "] interrupted by" in line]
    assert len(lines) == 1 and f"interrupted by {name}: kept " in lines[0], stopped.stderr[-3000:]
    assert lines[0].endswith("run the same command with --resume to continue")
    assert "Traceback" not in stopped.stderr
    _assert_every_file_complete(out)
    # results.json goes before the arrays are written: it never names files of another run
    assert not (out / "results.json").exists()
    if point.startswith("write:"):  # the earlier arrays, whole
        assert_same_contents(str(clean_run / "results.safetensors"), str(out / "results.safetensors"))
    else:
        assert not (out / "results.safetensors").exists()
    # the capture keeps each batch as it is captured (issue 26): stopped in the second batch, the first is kept
    kept_features = point != "capture"
    shards = sorted(name for name in os.listdir(out / "resume" / "features") if name.startswith("images-"))
    assert (
        shards
        == ["images-00000000-00000001.safetensors", "images-00000002-00000003.safetensors"][
            : 2 if kept_features else 1
        ]
    )
    assert kept_pairs == len(os.listdir(out / "resume" / "pairs"))
    if kept_features:
        assert f"kept the features and {kept_pairs} pair analyses in {out / 'resume'};" in lines[0]
    else:
        assert f"kept the features in {out / 'resume'};" in lines[0]
    inodes = {name: _inode(out / "resume" / name) for name in _files(out / "resume") if name != "settings.json"}

    capsys.readouterr()
    assert main(arguments + ["--resume"]) == 0
    log = capsys.readouterr().err
    assert ("reused the features of 4 images" in log) == kept_features
    assert ("capturing images 0-3" in log) != kept_features
    assert ("resume: 2 of this process's 4 images captured already" in log) != kept_features
    assert f"analysed {6 - kept_pairs} pairs" in log
    assert (f"reused {kept_pairs} of 6 pair analyses" in log) == (kept_pairs > 0)
    # what was kept was reused, not written again; the resumed capture draws the noise of the batches it skips, so
    # the run writes what the uninterrupted one wrote (features included)
    assert {name: _inode(out / "resume" / name) for name in inodes} == inodes
    _assert_same_as(clean_run, out)


# ---------------------------------------------------------------------------------------------------------------------
# Several processes: a failing rank stops the run
# ---------------------------------------------------------------------------------------------------------------------

FAILING_RANK_CLI = r"""
import os, sys
import cosegment

analyze = cosegment.analyze_pairs
def failing_analyze(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise ValueError("planted failure")
    return analyze(*args, **kwargs)
cosegment.analyze_pairs = failing_analyze

from cosegment.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_stops_two_processes_with_its_error(image_files, tiny_sd_path, tmp_path):
    script = tmp_path / "failing_cli.py"
    script.write_text(FAILING_RANK_CLI)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    out = tmp_path / "out"
    result = subprocess.run(
        _launch_two() + [str(script)] + _arguments(image_files, tiny_sd_path, out),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang fails here
    )
    assert result.returncode != 0
    assert "[rank 1/2] failed: ValueError: planted failure" in result.stderr, result.stderr[-4000:]
    assert not (out / "results.json").exists()
    _assert_every_file_complete(out)


def _launch_two() -> list[str]:
    from test_cli import _free_port

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + ["--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port())]


def test_one_process_run_resumes_with_two(clean_run, image_files, tiny_sd_path, tmp_path):
    """Kept pairs are found whichever process gets them: 1 process stopped after 2 pairs, 2 processes finish."""
    out = tmp_path / "out"
    arguments = _arguments(image_files, tiny_sd_path, out)
    assert _interrupt(arguments, "pair:2", signal.SIGTERM, tmp_path).returncode == 143
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    command = _launch_two() + ["-m", "cosegment"] + arguments + ["--resume"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):  # kept: (0, 1) and (0, 2); rank 0 analyses (0, 1), (0, 3), (1, 3), rank 1 the others
        assert f"[rank {rank}/2] resume: reused the features of 4 images" in result.stderr
        assert f"[rank {rank}/2] resume: reused 1 of 3 pair analyses" in result.stderr
        assert f"[rank {rank}/2] analysed 2 pairs" in result.stderr
    assert "capturing" not in result.stderr
    _assert_same_as(clean_run, out)


def test_one_pair_on_two_images_equals_the_collection_call(features):
    from cosegment.runstate import analyze_one_pair

    expected = analyze_pairs(features, [(0, 2)], max_spread=50.0)[0]
    mine = analyze_one_pair(features, 0, 2, analyze_pairs, max_spread=50.0)
    assert (mine.source_index, mine.target_index, mine.settings) == (0, 2, expected.settings)
    for a, b in zip(mine.passes, expected.passes):
        assert (a.source_index, a.target_index, a.thresholds) == (b.source_index, b.target_index, b.thresholds)
        assert torch.equal(a.keep, b.keep) and torch.equal(a.max_prob, b.max_prob)
        assert torch.equal(a.inverse_entropy, b.inverse_entropy)
        for name, value in a.statistics.__dict__.items():
            assert torch.equal(value, getattr(b.statistics, name))
    assert [p.source_index for p in mine.passes] == [0, 2]


def test_sigterm_to_the_launcher_stops_every_process(clean_run, image_files, tiny_sd_path, tmp_path, capsys):
    """`accelerate launch` passes SIGTERM on: each process stops cleanly and says so; the run resumes."""
    out = tmp_path / "out"
    arguments = _arguments(image_files, tiny_sd_path, out)
    stopped = _interrupt(arguments, "pair:1", signal.SIGTERM, tmp_path, launcher=_launch_two())
    assert stopped.returncode != 0
    for rank in (0, 1):  # each stopped inside its second pair: (0, 1) and (0, 2) are kept
        assert f"[rank {rank}/2] interrupted by SIGTERM: kept the features and " in stopped.stderr, stopped.stderr[
            -3000:
        ]
    _assert_every_file_complete(out)
    assert sorted(os.listdir(out / "resume" / "pairs")) == ["pair_000_001.safetensors", "pair_000_002.safetensors"]
    capsys.readouterr()
    assert main(arguments + ["--resume"]) == 0
    assert "reused 2 of 6 pair analyses" in capsys.readouterr().err
    _assert_same_as(clean_run, out)


def test_written_files_get_the_umask_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")  # safetensors itself writes 0600 files
        write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(previous)
    assert oct(os.stat(tmp_path / "a.safetensors").st_mode & 0o777) == oct(0o640)
    assert oct(os.stat(tmp_path / "b.json").st_mode & 0o777) == oct(0o640)


def test_a_reference_file_is_recorded_by_content(tmp_path):
    reference = tmp_path / "reference.safetensors"
    reference.write_bytes(b"one")
    first = _settings(tmp_path, reference=str(reference))
    assert first["reference"]["sha256"] == hashlib.sha256(b"one").hexdigest()
    assert _settings(tmp_path, reference="auto")["reference"] == "auto"
    reference.write_bytes(b"two")  # same name, other captures: the features (which keep it) are stale
    differences = setting_differences(first, _settings(tmp_path, reference=str(reference)))
    assert len(differences["features"]) == 1 and differences["features"][0].startswith("reference was")
