"""What `--resume` may reuse (runstate.py): cases written for the mutation run of issue 29.

Every recorded setting, changed on the command line, makes a resumed run refuse (`--resume`) or recompute
(`--resume=overwrite`) exactly what it invalidates, and nothing more; the rest of the kept state (unreadable
records, damaged files, what a killed writer left) is handled as documented. These run `RunState` on real kept
files (tiny random features and their pair analyses), never the model.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading

import numpy as np
import PIL.Image
import pytest
import torch

from cosegment import CoSegmentationFeatures, analyze_pairs
from cosegment.cli import build_parser
from cosegment.runstate import (
    RECORDED_SETTINGS,
    RunInterrupted,
    RunState,
    describe_kept,
    file_digest,
    forget_empty_state,
    load_pair_analysis,
    pair_orientation,
    record_settings,
    save_pair_analysis,
    setting_differences,
    stop_on_signals,
)
from cosegment.store import FeatureStore
from cosegment.utils.command_line import threshold_overrides
from cosegment.utils.files import temporary_path, write_text

# What each recorded setting makes stale, and why. "features": it changes what is captured (or how the captured
# features are corrected: the reference is kept with them), so the features and every pair analysis made from them
# are stale; "pairs": it changes the per-pair analysis only (selection, thresholds, the kept sub-token peaks);
# "results": only the collection-level steps and the result files, which every run computes again.
INVALIDATES = {
    "model": "features",
    "images": "features",
    "height": "features",
    "width": "features",
    "seed": "features",
    "timestep": "features",
    "ensemble_size": "features",
    "attention_layers": "features",
    "prompt": "features",
    "dtype": "features",
    "batch_size": "features",  # the UNet batch: SD's attention is not bitwise batch-invariant
    "reference": "features",
    "flip": "features",
    "selection": "pairs",
    "max_entropy": "pairs",
    "max_spread": "pairs",
    "max_collapse": "pairs",
    "max_inverse_error": "pairs",
    "no_refine": "pairs",  # a pair file keeps the sub-token peaks only when refined
    "num_parts": "results",
    "partners": "results",  # which pairs are analysed; an analysed pair is the same in any graph
    "points": "results",
    "no_segment": "results",
}
# Options that are not recorded, because no kept file depends on them.
NOT_RECORDED = {
    "out",  # where the kept files are
    "resume",
    "top_k",  # pictures only
    "figure_size",
    "no_figures",
    "no_viewer",  # index.html and viewer/, written from the results
    "export",  # annotations.json, written from the results
    "category",
    "no_filter",  # recorded through the thresholds it sets (max_* = inf)
    "device",  # where the same computation runs
    "debug",
    "quiet",
}
# A command-line change of each recorded setting.
CHANGES = {
    "model": ["--model", "someone/other-model"],
    "height": ["--height", "256"],
    "width": ["--width", "320"],
    "seed": ["--seed", "1"],
    "timestep": ["--timestep", "500"],
    "ensemble_size": ["--ensemble-size", "2"],
    "attention_layers": ["--attention-layers", "up_blocks"],
    "prompt": ["--prompt", "a photo"],
    "dtype": ["--dtype", "float16"],
    "batch_size": ["--batch-size", "4"],
    "reference": ["--reference", "auto"],
    "flip": ["--flip"],
    "selection": ["--selection", "paper"],
    "max_entropy": ["--max-entropy", "2.0"],
    "max_spread": ["--max-spread", "3.0"],
    "max_collapse": ["--max-collapse", "0.5"],
    "max_inverse_error": ["--max-inverse-error", "1.5"],
    "no_refine": ["--no-refine"],
    "num_parts": ["--num-parts", "3"],
    "partners": ["--partners", "2"],
    "points": ["--points", "1,2"],
    "no_segment": ["--no-segment"],
}
PAIRS = [(0, 1), (1, 2)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three image files and their tiny features (what the run captured)."""
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for i in range(3):
        paths.append(str(folder / f"image_{i}.png"))
        PIL.Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(paths[-1])
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randn(3, 2, 16, 4, generator=generator)]
    keys = [q + 0.3 * torch.randn(q.shape, generator=generator) for q in queries]
    features = CoSegmentationFeatures(queries, keys, (4, 4), [(32, 32)] * 3)
    return paths, features


def _record(paths, *extra) -> dict:
    """The settings record of `cosegment IMAGES --out x EXTRA`, as the command makes it."""
    args = build_parser().parse_args([*paths, "--out", "x", *extra])
    return record_settings({**vars(args), **threshold_overrides(args)})


@contextlib.contextmanager
def _logged():
    """The lines `cosegment.runstate` logs within the block, INFO and above (the CLI's logger may not propagate)."""
    lines, logger = [], logging.getLogger("cosegment.cli")
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _same_analysis(a, b) -> bool:
    if (a.source_index, a.target_index, a.grid_size, a.settings) != (
        b.source_index,
        b.target_index,
        b.grid_size,
        b.settings,
    ):
        return False
    return all(torch.equal(x.keep, y.keep) and torch.equal(x.max_prob, y.max_prob) for x, y in zip(a.passes, b.passes))


@pytest.fixture(scope="module")
def kept_run(inputs, tmp_path_factory):
    """The folder a finished run with default settings leaves: its settings, features and two pair analyses."""
    paths, features = inputs
    out = tmp_path_factory.mktemp("kept") / "out"
    state = RunState(out, _record(paths))
    state.check()
    state.start()
    assert state.load_features() is None  # a fresh run reuses nothing
    state.save_features(features)
    analyses, reused = state.pair_analyses(features, PAIRS, analyze_pairs)
    assert reused == [] and len(analyses) == 2
    return out, analyses


def _copy(kept_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(kept_run[0], out)
    return out


def test_every_option_is_recorded_or_changes_no_kept_file():
    options = {action.dest for action in build_parser()._actions} - {"help", "images"}
    assert set(RECORDED_SETTINGS) == set(INVALIDATES) == set(CHANGES) | {"images"}
    assert options - set(RECORDED_SETTINGS) == NOT_RECORDED


@pytest.mark.parametrize("name", sorted(INVALIDATES))
def test_a_changed_setting_invalidates_exactly_what_depends_on_it(name, inputs, kept_run, tmp_path):
    paths, features = inputs
    out = _copy(kept_run, tmp_path)
    base = _record(paths)
    changed = _record(paths[::-1]) if name == "images" else _record(paths, *CHANGES[name])
    stale = INVALIDATES[name]
    differences = setting_differences(base, changed)
    assert {group: len(found) for group, found in differences.items()} == {
        group: int(group == stale) for group in ("features", "pairs", "results")
    }
    assert differences[stale][0].startswith(f"{name} was ")

    # --resume: refused, naming the setting, when kept files depend on it
    reuse = RunState(out, changed, resume="reuse")
    if stale == "results":
        reuse.check()
        assert reuse.stale == () and reuse.changes == differences["results"]
    else:
        with pytest.raises(ValueError, match=f"`--resume`: .*{name} was ") as refusal:
            reuse.check()
        assert "\n" not in str(refusal.value) and "--resume=overwrite" in str(refusal.value)

    # --resume=overwrite: recomputes what it invalidates and reuses the rest
    overwrite = RunState(out, changed, resume="overwrite")
    overwrite.check()
    overwrite.start()
    loaded = overwrite.load_features()
    if stale == "features":
        assert loaded is None and not os.path.exists(overwrite.features_path)
    else:
        assert torch.equal(loaded.queries[0], features.queries[0]) and loaded.image_sizes == features.image_sizes
    for (s, t), made in zip(PAIRS, kept_run[1]):
        pair = overwrite.load_pair(s, t)
        if stale == "results":
            assert _same_analysis(pair, made)
        else:
            assert pair is None and not os.path.exists(overwrite.pair_path(s, t))
    # the folder now belongs to the new settings: the same run resumed again reuses what is left, refuses nothing
    with open(overwrite.settings_path, encoding="utf-8") as handle:
        assert json.load(handle) == {"format": "cosegment.run/1", "settings": changed}
    again = RunState(out, changed, resume="reuse")
    again.check()
    assert again.stale == () and again.changes == []


def test_no_filter_is_a_change_of_every_threshold(inputs):
    paths, _ = inputs
    differences = setting_differences(_record(paths), _record(paths, "--no-filter"))
    assert differences["features"] == differences["results"] == []
    assert sorted(differences["pairs"]) == [
        f"{name} was null, now Infinity" for name in ("max_collapse", "max_entropy", "max_inverse_error", "max_spread")
    ]


def test_images_are_recorded_by_content_and_order(inputs, tmp_path):
    paths, _ = inputs
    record = _record(paths[:2])
    assert record["images"] == [hashlib.sha256(open(path, "rb").read()).hexdigest() for path in paths[:2]]
    copy = tmp_path / "renamed.png"
    shutil.copyfile(paths[0], copy)  # another name, the same content: nothing changed
    assert setting_differences(record, _record([str(copy), paths[1]])) == {"features": [], "pairs": [], "results": []}
    for other in ([paths[1], paths[0]], [paths[0], paths[2]], paths):
        found = setting_differences(record, _record(other))
        assert found["pairs"] == found["results"] == []
        assert found["features"] == [f"images was 2 files, now {len(other)} files of other content or order"]


def test_a_reference_file_is_recorded_by_name_and_content(tmp_path):
    reference = tmp_path / "blank.safetensors"
    reference.write_bytes(b"x" * 10)
    record = record_settings({"reference": str(reference)})
    assert record["reference"] == {"file": "blank.safetensors", "sha256": hashlib.sha256(b"x" * 10).hexdigest()}
    assert set(record) == set(RECORDED_SETTINGS) and record["model"] is None  # a missing argument: None
    assert record_settings({"reference": "none"})["reference"] == "none"
    assert record_settings({"max_spread": float("inf")})["max_spread"] == float("inf")


def test_file_digest_of_a_file_larger_than_one_block(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (1 << 20) + 12345, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty.bin").write_bytes(b"")
    assert file_digest(tmp_path / "empty.bin") == hashlib.sha256(b"").hexdigest()


def test_long_values_are_shortened_in_messages():
    long = "a" * 100
    found = setting_differences({**record_settings({}), "prompt": long}, record_settings({"prompt": "b"}))
    (line,) = found["features"]
    was = line.removeprefix("prompt was ").split(", now ")[0]
    assert was == json.dumps(long)[:37] + "..." and len(was) == 40
    assert line.endswith(', now "b"')
    exact = "c" * 38  # 40 characters with its quotes: shown whole
    (line,) = setting_differences(record_settings({"prompt": exact}), record_settings({}))["features"]
    assert line == f'prompt was "{exact}", now null'
    (line,) = setting_differences(record_settings({"prompt": exact + "c"}), record_settings({}))["features"]
    assert line == f'prompt was "{exact[:36]}..., now null'  # 41: shortened to 40


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "nothing kept in"),
        ("{not json", "is unreadable"),
        ('{"format": "cosegment.run/0", "settings": {}}', "nothing kept in"),
        ('{"format": "cosegment.run/1", "settings": [1, 2]}', "nothing kept in"),
        ('{"format": "cosegment.run/1"}', "is unreadable"),
        ("[1, 2]", "is unreadable"),
    ],
)
def test_a_missing_or_unreadable_record_reuses_nothing(inputs, kept_run, tmp_path, content, why):
    paths, _ = inputs
    out = _copy(kept_run, tmp_path)
    settings = out / "resume" / "settings.json"
    if content is None:
        settings.unlink()
    else:
        settings.write_text(content)
    for mode in ("reuse", "overwrite"):
        state = RunState(out, _record(paths), resume=mode)
        state.check()  # no record to compare: nothing refused, nothing reused
        assert state.stale == ("features", "pairs")
        assert len(state.changes) == 1 and why in state.changes[0]
    state.start()
    assert state.load_features() is None and state.load_pair(0, 1) is None
    assert describe_kept(out) == "nothing kept yet"


def test_a_fresh_run_removes_what_an_earlier_run_kept(inputs, kept_run, tmp_path):
    paths, _ = inputs
    out = _copy(kept_run, tmp_path)
    assert describe_kept(out) == f"the features and 2 pair analyses in {out / 'resume'}"
    state = RunState(out, _record(paths))  # no --resume, the same settings
    state.check()
    assert state.stale == ("features", "pairs") and state.changes == []  # nothing to report either
    state.start()
    assert describe_kept(out) == "nothing kept yet"
    assert state.load_features() is None and state.load_pair(0, 1) is None


def test_start_removes_what_a_killed_writer_left_and_only_that(inputs, kept_run, tmp_path):
    paths, _ = inputs
    out = _copy(kept_run, tmp_path)
    left = [
        temporary_path(out / "results.json"),
        temporary_path(out / "resume" / "pairs" / "pair_000_002.safetensors"),
    ]
    for path in left:
        write_text(path, "half")
    write_text(out / "notes.txt", "mine")
    state = RunState(out, _record(paths), resume="reuse")
    state.check()
    with _logged() as lines:
        state.start()
    assert not any(os.path.exists(path) for path in left)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(lines) == sorted(f"removed {path}, left by an interrupted writer" for path in left)
    assert state.load_features() is not None and state.load_pair(0, 1) is not None


def test_kept_pairs_are_reused_and_missing_ones_analysed(inputs, kept_run, tmp_path):
    paths, features = inputs
    out = _copy(kept_run, tmp_path)
    state = RunState(out, _record(paths), resume="reuse")
    state.check()
    state.start()
    calls, progress = [], []

    def analyze(two, pairs, **analysis):
        calls.append((two.num_images, pairs, analysis))
        return analyze_pairs(two, pairs, **analysis)

    pairs = [(0, 2), (0, 1), (1, 2)]
    analyses, reused = state.pair_analyses(features, pairs, analyze, progress=progress.append, max_spread=9.0)
    assert reused == [(0, 1), (1, 2)] and progress == [1, 1, 1]
    assert calls == [(2, [(0, 1)], {"max_spread": 9.0})]  # only the missing pair, on its two images
    assert [(a.source_index, a.target_index) for a in analyses] == pairs
    assert _same_analysis(analyses[0], analyze_pairs(features, [(0, 2)], max_spread=9.0)[0])
    assert _same_analysis(analyses[1], kept_run[1][0])
    assert _same_analysis(load_pair_analysis(state.pair_path(0, 2)), analyses[0])  # kept as it finished
    assert describe_kept(out) == f"the features and 3 pair analyses in {out / 'resume'}"


def test_damaged_kept_files_are_computed_again(inputs, kept_run, tmp_path):
    paths, _ = inputs
    out = _copy(kept_run, tmp_path)
    state = RunState(out, _record(paths), resume="reuse")
    state.check()
    state.start()
    (shard,) = [name for name in os.listdir(state.features_path) if name.startswith("images-")]
    write_text(os.path.join(state.features_path, shard), "not features")
    write_text(state.pair_path(0, 1), "not a pair")
    with _logged() as lines:
        assert state.load_features() is None
        assert state.load_pair(0, 1) is None
    assert len(lines) == 2
    damaged = os.path.join(state.features_path, shard)
    assert lines[0].startswith(f"cannot reuse {[damaged]} (`{damaged}` is not a safetensors file")
    assert lines[0].endswith("): capturing its images again")
    assert not os.path.exists(damaged) and os.path.isfile(os.path.join(state.features_path, "store.json"))
    assert state.missing_images() == [0, 1, 2]  # the images of the damaged batch
    write_text(os.path.join(state.features_path, "store.json"), "not an index")
    with _logged() as again:
        assert state.missing_images() == [0, 1, 2] and not os.path.exists(state.features_path)
    assert again == [
        f"cannot reuse {state.features_path} (`{state.features_path}/store.json` is not a cosegment "
        "feature store index: Expecting value: line 1 column 1 (char 0)): capturing again"
    ]
    assert lines[1].startswith(f"cannot reuse {state.pair_path(0, 1)} (`{state.pair_path(0, 1)}` is not a complete ")
    assert lines[1].endswith("): analysing the pair again")
    assert state.load_pair(1, 2) is not None and state.load_pair(0, 2) is None  # kept / never made


def test_describe_kept_counts_pair_files_only(tmp_path):
    assert describe_kept(tmp_path) == "nothing kept yet"  # no resume folder at all
    (tmp_path / "resume" / "features").mkdir(parents=True)
    write_text(tmp_path / "resume" / "features" / "store.json", "{}")
    assert describe_kept(tmp_path) == "nothing kept yet"  # a store, no captured batch in it
    shard = tmp_path / "resume" / "features" / "images-00000000-00000001.safetensors"
    write_text(temporary_path(shard), "x")
    assert describe_kept(tmp_path) == "nothing kept yet"  # an interrupted write
    write_text(shard, "x")
    assert describe_kept(tmp_path) == f"the features in {tmp_path / 'resume'}"  # no pairs folder
    shard.unlink()
    pairs = tmp_path / "resume" / "pairs"
    pairs.mkdir(parents=True)
    assert describe_kept(tmp_path) == "nothing kept yet"
    write_text(pairs / "pair_000_001.safetensors", "x")
    write_text(pairs / "notes.txt", "x")
    write_text(temporary_path(pairs / "pair_000_002.safetensors"), "x")
    assert describe_kept(tmp_path) == f"1 pair analysis in {tmp_path / 'resume'}"
    write_text(shard, "x")
    assert describe_kept(tmp_path) == f"the features and 1 pair analysis in {tmp_path / 'resume'}"
    (pairs / "pair_000_001.safetensors").unlink()
    assert describe_kept(tmp_path) == f"the features in {tmp_path / 'resume'}"


def _empty_state(out):
    """A resume folder that keeps nothing: the settings record and an empty pairs folder."""
    (out / "resume" / "pairs").mkdir(parents=True)
    write_text(out / "resume" / "settings.json", "{}")


def test_a_failed_run_that_kept_nothing_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"  # made by the run: it goes
    _empty_state(out)
    removed = forget_empty_state(out, remove_out=True)
    resume = out / "resume"
    assert removed == [str(resume / "settings.json"), str(resume / "pairs"), str(resume), str(out)]
    assert not out.exists()
    out = tmp_path / "given"  # the user's folder: it stays, emptied of the run's state
    _empty_state(out)
    assert forget_empty_state(out) == [str(out / "resume" / "settings.json"), str(out / "resume" / "pairs")] + [
        str(out / "resume")
    ]
    assert out.is_dir() and os.listdir(out) == []
    # the user's other files stay, and so does the folder holding them
    _empty_state(out)
    write_text(out / "photo.png", "x")
    assert forget_empty_state(out, remove_out=True)[-1] == str(out / "resume")
    assert os.listdir(out) == ["photo.png"]


@pytest.mark.parametrize("kept", ["features/images-00000000-00000007.safetensors", "pairs/pair_000_001.safetensors"])
def test_a_failed_run_never_removes_kept_files(tmp_path, kept):
    _empty_state(tmp_path)
    (tmp_path / "resume" / "features").mkdir()
    write_text(tmp_path / "resume" / "features" / "store.json", "{}")
    write_text(tmp_path / "resume" / kept, "x")
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    assert forget_empty_state(tmp_path, remove_out=True) == []
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


def test_a_temporary_left_in_the_pairs_folder_is_not_kept_but_not_removed_either(tmp_path):
    _empty_state(tmp_path)
    leftover = temporary_path(tmp_path / "resume" / "pairs" / "pair_000_001.safetensors")
    write_text(leftover, "x")
    assert forget_empty_state(tmp_path, remove_out=True) == [str(tmp_path / "resume" / "settings.json")]
    assert os.path.isfile(leftover)


def test_kept_features_are_reused_only_when_their_settings_match(inputs, tmp_path):
    paths, features = inputs
    settings = _record(paths)
    first = RunState(tmp_path, settings)
    first.check()
    assert not first.has_features() and first.missing_images() == [0, 1, 2]
    first.start()
    first.save_features(features)
    stale = RunState(tmp_path, settings)
    stale.check()
    assert not stale.has_features()  # a fresh run captures, whatever the folder holds
    again = RunState(tmp_path, settings, resume="reuse")
    again.check()
    assert again.has_features()
    other_pairs = RunState(tmp_path, {**settings, "max_spread": 3.0}, resume="overwrite")
    other_pairs.check()
    assert other_pairs.has_features()  # only the pair analyses are stale
    other_capture = RunState(tmp_path, {**settings, "seed": 1}, resume="overwrite")
    other_capture.check()
    assert not other_capture.has_features()
    shutil.rmtree(first.features_path)
    assert not again.has_features() and again.missing_images() == [0, 1, 2]  # nothing to reuse


def test_the_settings_record_lists_one_setting_per_line(tmp_path):
    # so that two runs' records can be compared with `diff` (which setting changed)
    state = RunState(tmp_path, dict.fromkeys(RECORDED_SETTINGS))
    state.start()
    lines = (tmp_path / "resume" / "settings.json").read_text().splitlines()
    for name in RECORDED_SETTINGS:
        assert sum(line.strip() == f'"{name}": null,' or line.strip() == f'"{name}": null' for line in lines) == 1


def test_pair_files_are_named_by_their_pair(tmp_path):
    state = RunState(tmp_path, {})
    assert state.pair_path(3, 12) == os.path.join(tmp_path, "resume", "pairs", "pair_003_012.safetensors")
    assert state.features_path == os.path.join(tmp_path, "resume", "features")  # a FeatureStore folder
    assert state.mirrored_path == os.path.join(tmp_path, "resume", "mirrored")
    assert state.settings_path == os.path.join(tmp_path, "resume", "settings.json")


def test_a_pair_file_keeps_indices_grid_settings_and_thresholds(inputs, tmp_path):
    _, features = inputs
    analysis = analyze_pairs(features, [(1, 2)], max_entropy=float("inf"), refine=False)[0]
    save_pair_analysis(analysis, tmp_path / "pair.safetensors")
    loaded = load_pair_analysis(tmp_path / "pair.safetensors")
    assert (loaded.source_index, loaded.target_index, loaded.grid_size) == (1, 2, (4, 4))
    assert loaded.settings == analysis.settings
    assert [(p.source_index, p.target_index) for p in loaded.passes] == [(1, 2), (2, 1)]
    assert [p.thresholds for p in loaded.passes] == [p.thresholds for p in analysis.passes]
    assert all(p.peak_points is None for p in loaded.passes)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_with_the_shells_exit_code(signum, code):
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(RunInterrupted) as stop:
        with stop_on_signals():
            signal.raise_signal(signum)
    assert stop.value.signum == signum and stop.value.exit_code == code
    assert not isinstance(stop.value, Exception)  # no `except Exception` takes it
    assert {number: signal.getsignal(number) for number in before} == before
    # only the signals asked for are handled
    other = signal.SIGTERM if signum == signal.SIGINT else signal.SIGINT
    with stop_on_signals([signum]):
        assert signal.getsignal(other) == before[other] and signal.getsignal(signum) != before[signum]
    assert {number: signal.getsignal(number) for number in before} == before


def test_stop_on_signals_outside_the_main_thread_does_nothing():
    seen = []

    def body():
        with stop_on_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("name", ["seed", "max_entropy"])
def test_stale_files_are_not_reused_even_before_they_are_removed(name, inputs, kept_run, tmp_path):
    # every process decides what is stale (check); only the main one removes it (start): the others must not load it
    paths, _ = inputs
    out = _copy(kept_run, tmp_path)
    state = RunState(out, _record(paths, *CHANGES[name]), resume="overwrite")
    state.check()
    assert os.path.exists(state.features_path) and os.path.exists(state.pair_path(0, 1))
    assert (state.load_features() is None) == (INVALIDATES[name] == "features")
    assert state.load_pair(0, 1) is None and state.load_pair(1, 2) is None


def test_the_refusal_names_every_setting_and_what_to_do(inputs, kept_run, tmp_path):
    paths, _ = inputs
    out = _copy(kept_run, tmp_path)
    state = RunState(out, _record(paths, "--seed", "5", "--max-entropy", "2", "--num-parts", "3"), resume="reuse")
    with pytest.raises(ValueError) as refusal:
        state.check()
    assert str(refusal.value) == (
        f"`--resume`: {out / 'resume'} was made with other settings: seed was 0, now 5; max_entropy was null, now "
        "2.0. Run with the same settings, or with --resume=overwrite to recompute what they change, or choose "
        "another --out."
    )


def test_kept_features_are_loaded_onto_the_runs_device(inputs, kept_run, tmp_path, monkeypatch):
    paths, features = inputs
    out = _copy(kept_run, tmp_path)
    state = RunState(out, _record(paths), resume="reuse")
    state.check()
    devices = []
    real = FeatureStore.features

    def features_on(self, device="cpu", **kwargs):
        devices.append(device)
        return real(self, "cpu", **kwargs)

    monkeypatch.setattr(FeatureStore, "features", features_on)
    assert state.load_features(device="cuda:1") is not None and devices == ["cuda:1"]


def test_one_pair_keeps_the_layer_names_the_reference_is_matched_by(inputs):
    from cosegment.runstate import analyze_one_pair

    _, features = inputs
    g = torch.Generator().manual_seed(5)
    named = CoSegmentationFeatures(
        features.queries * 2, features.keys * 2, (4, 4), features.image_sizes, ["down.attn1", "up.attn1"]
    )
    # the reference holds the layers in the other order, with other content: matched by name, not position
    captures = [torch.randn(6, 2, 16, 4, generator=g) + 2.0 * torch.randn(1, 2, 16, 4, generator=g) for _ in range(2)]
    reference = CoSegmentationFeatures(
        captures, [c.clone() for c in captures], (4, 4), [(32, 32)] * 6, ["up.attn1", "down.attn1"]
    )
    expected = analyze_pairs(named, [(0, 2)], reference=reference)[0]
    mine = analyze_one_pair(named, 0, 2, analyze_pairs, reference=reference)
    assert (mine.source_index, mine.target_index) == (0, 2) and mine.settings == expected.settings
    for a, b in zip(mine.passes, expected.passes):
        assert torch.equal(a.keep, b.keep) and torch.equal(a.max_prob, b.max_prob)


def test_with_flip_a_kept_pair_is_reused_only_in_the_orientation_it_was_analysed_in(inputs, kept_run, tmp_path):
    """--flip --resume: the decided orientations depend on the pairs analysed (e.g. --partners changed), so a kept pair
    analysed the other way round must be analysed again, and one analysed without --flip is not reused with it."""
    paths, features = inputs
    out = _copy(kept_run, tmp_path)
    state = RunState(out, _record(paths), resume="reuse")
    state.check()
    state.start()
    calls = []

    def analyze(two, pairs, **analysis):
        calls.append(pairs)
        return analyze_pairs(two, pairs, **analysis)

    flipped = [False, True, False]
    _, reused = state.pair_analyses(features, PAIRS, analyze, orientations=flipped)
    assert reused == [] and len(calls) == 2  # the kept pairs were analysed without --flip
    assert pair_orientation(state.pair_path(0, 1)) == [False, True]
    assert pair_orientation(state.pair_path(1, 2)) == [True, False]
    _, reused = state.pair_analyses(features, PAIRS, analyze, orientations=flipped)
    assert reused == PAIRS and len(calls) == 2  # the same decision: both reused
    _, reused = state.pair_analyses(features, PAIRS, analyze, orientations=[False, False, True])
    assert reused == [] and len(calls) == 4  # image 1 now the right way round, image 2 flipped: both pairs again
    _, reused = state.pair_analyses(features, PAIRS, analyze)
    assert reused == [] and len(calls) == 6  # without --flip: none of the flipped analyses
    assert pair_orientation(state.pair_path(0, 1)) is None
