"""The command at scale (issue 26, item 4): the capture kept batch by batch in a feature store as it goes, resumed
from it, and each process reading only the features it needs (its share of the images for the pair graph, the
images of its pairs).

The whole command (one and two processes, interrupted and resumed) is tested in test_long_runs.py and test_cli.py;
these test the pieces on the tiny random pipeline and planted features.
"""

import argparse
import os
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from cosegment import CoSegmentationFeatures, analyze_pairs
from cosegment.benchmarks.planted import make_planted_features
from cosegment.cli import pair_shares
from cosegment.cli_steps import analyse_pairs
from cosegment.pairs import image_means, partner_pairs
from cosegment.runstate import RECORDED_SETTINGS, RunState, capture_units
from cosegment.store import FeatureStore
from cosegment.utils.command_line import ImageFiles

CAPTURE = {"height": 64, "width": 64, "timestep": 261}


def test_capture_units_are_the_runs_batches_of_two_or_more_images():
    assert capture_units(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert capture_units(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5, 6]]  # a lone last image joins the unit before
    assert capture_units(list(range(5)), 1) == [[0, 1], [2, 3, 4]]  # batch size 1: two batches a unit
    assert capture_units([8, 9, 10, 11, 12], 4) == [[8, 9, 10, 11, 12]]
    assert capture_units([4, 5], 8) == [[4, 5]] and capture_units([], 2) == []


def _state(out, num_images: int, flip: bool = False) -> RunState:
    settings = {**dict.fromkeys(RECORDED_SETTINGS), "images": [f"digest {i}" for i in range(num_images)], "flip": flip}
    state = RunState(out, settings)
    state.check()
    state.start()
    state.started()
    return state


@pytest.mark.parametrize("batch_size, flip", [(2, False), (1, True)])
def test_the_capture_kept_unit_by_unit_equals_one_capture(tiny_pipe, photos, tmp_path, batch_size, flip):
    images = (photos * 2)[:5]
    whole = tiny_pipe.capture_features(
        images, batch_size=batch_size, generator=torch.Generator().manual_seed(4), flip=flip, **CAPTURE
    )
    state = _state(tmp_path / "out", 5, flip)
    progress = []
    captured = state.capture(
        tiny_pipe,
        images,
        list(range(5)),
        batch_size,
        torch.Generator().manual_seed(4),
        progress.append,
        flip=flip,
        **CAPTURE,
    )
    assert captured == 5 and sum(progress) == 5 and len(progress) == len(capture_units(range(5), batch_size))
    assert "prepare_noise" not in vars(tiny_pipe)  # the pipeline's own method again
    kept = state.load_features()
    assert kept.num_images == 5 and kept.metadata == whole.metadata and kept.image_sizes == whole.image_sizes
    for a, b in zip(kept.queries + kept.keys, whole.queries + whole.keys):
        assert torch.equal(a, b)  # every image with its own noise: bitwise the capture of the whole collection
    if flip:
        assert kept.mirrored.metadata["mirrored"] is True
        for a, b in zip(kept.mirrored.queries, whole.mirrored.queries):
            assert torch.equal(a, b)


def test_a_resumed_capture_captures_only_what_is_missing(tiny_pipe, photos, tmp_path, monkeypatch):
    images = (photos * 2)[:6]
    whole = tiny_pipe.capture_features(images, batch_size=2, generator=torch.Generator().manual_seed(1), **CAPTURE)
    state = _state(tmp_path / "out", 6)
    first = state.capture(tiny_pipe, images, [0, 1, 2, 3, 4, 5], 2, torch.Generator().manual_seed(1), **CAPTURE)
    assert first == 6 and state.missing_images() == []
    os.remove(os.path.join(state.features_path, "images-00000002-00000003.safetensors"))  # as if never captured
    assert state.missing_images() == [2, 3] and not state.has_features()
    calls = []
    capture = tiny_pipe.capture_features

    def counting(batch, **kwargs):
        calls.append(len(batch))
        return capture(batch, **kwargs)

    monkeypatch.setattr(tiny_pipe, "capture_features", counting)
    progress = []
    again = RunState(tmp_path / "out", state.settings, resume="reuse")
    again.check()
    assert again.missing_images() == [2, 3]
    assert (
        again.capture(
            tiny_pipe, images, list(range(6)), 2, torch.Generator().manual_seed(1), progress.append, **CAPTURE
        )
        == 2
    )
    assert calls == [2] and progress == [2]  # only the missing batch, after drawing the noise of the one before it
    for a, b in zip(again.load_features().queries, whole.queries):
        assert torch.equal(a, b)
    # a process whose share starts later draws the noise of the images before it
    other = _state(tmp_path / "share", 6)
    assert other.capture(tiny_pipe, images, [4, 5], 2, torch.Generator().manual_seed(1), **CAPTURE) == 2
    assert other.missing_images() == [0, 1, 2, 3]
    shard = load_file(os.path.join(other.features_path, "images-00000004-00000005.safetensors"))
    assert torch.equal(shard["queries.0"], whole.queries[0][4:]) and torch.equal(shard["keys.1"], whole.keys[1][4:])


def test_the_pipelines_noise_comes_back_when_a_capture_fails(tiny_pipe, photos, tmp_path):
    state = _state(tmp_path / "out", 4)
    with pytest.raises(ValueError, match="timestep"):
        state.capture(tiny_pipe, photos[:4], [2, 3], 2, torch.Generator(), height=64, width=64, timestep=-3)
    assert "prepare_noise" not in vars(tiny_pipe) and state.missing_images() == [0, 1, 2, 3]


def test_image_means_of_shares_make_the_same_pair_graph():
    features = make_planted_features(num_images=9, seed=2).features
    shares = [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    parts = [image_means(features, share) for share in shares]
    means = [torch.cat([part[e] for part in parts]) for e in range(len(features.layer_names))]
    whole = image_means(features)
    assert all(torch.equal(a, b) for a, b in zip(means, whole)) and whole[0].shape == (9, 4 * 32)
    assert partner_pairs(features, 2, means) == partner_pairs(features, 2)
    with pytest.raises(ValueError, match="indices"):
        image_means(features, [])


def test_each_process_reads_its_share_and_its_pairs_images_only(tmp_path, monkeypatch):
    """Process 1 of 2 (the other simulated): it reads its half of the images for the pair graph (the other half's
    means come gathered) and then only the images of its pairs."""
    case = make_planted_features(num_images=12, seed=5)
    FeatureStore.from_features(tmp_path / "store", case.features, images_per_shard=4)
    other, mine, third = (FeatureStore(tmp_path / "store").features(cache_bytes=0) for _ in range(3))

    def gather(parts):  # every process's share of the means (each process computed its own, as `parts`)
        assert len(parts) == 1 and len(parts[0][0]) == 6
        return [(list(range(6)), image_means(third, range(6))), (list(range(6, 12)), image_means(third, range(6, 12)))]

    monkeypatch.setattr("accelerate.utils.gather_object", gather)
    waits = []
    state = SimpleNamespace(process_index=1, num_processes=2, is_main_process=False)
    state.wait_for_everyone = lambda: waits.append(1)
    kept = _state(tmp_path / "out", 12)
    args = argparse.Namespace(partners=2, no_refine=False)
    assert analyse_pairs(args, mine, kept, state, "cpu", {}, False) == (None, None)  # the main process joins
    graph = partner_pairs(case.features, 2)
    my_pairs = pair_shares(12, 2, graph)[1]
    read = {i for i, count in enumerate(mine.reads) if count}
    assert read == set(range(6, 12)) | {i for pair in my_pairs for i in pair} and len(read) < 12
    assert waits == [1] and sorted(os.listdir(os.path.join(kept.folder, "pairs"))) == [
        f"pair_{s:03d}_{t:03d}.safetensors" for s, t in my_pairs
    ]
    expected = analyze_pairs(case.features, my_pairs[:1])[0]
    assert torch.equal(kept.load_pair(*my_pairs[0]).passes[0].keep, expected.passes[0].keep)
    # the main process: its own pairs, and the others' from their kept files (in the graph's order)
    state = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True, wait_for_everyone=lambda: None)
    analyses, _ = analyse_pairs(args, other, kept, state, "cpu", {}, False)
    assert [(a.source_index, a.target_index) for a in analyses] == graph
    os.remove(kept.pair_path(*my_pairs[-1]))  # a process that kept its pairs where the main one cannot see them
    with pytest.raises(RuntimeError, match=f"pairs {my_pairs[-1][0]}-{my_pairs[-1][1]} are not in .*every process"):
        analyse_pairs(args, other, kept, state, "cpu", {}, False)


def test_image_files_are_read_when_indexed(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        PIL.Image.fromarray(np.full((5, 7, 3), 50 * i, np.uint8)).save(paths[-1])
    files = ImageFiles(paths, "IMAGE")
    assert len(files) == 3 and files[2].shape == (5, 7, 3) and int(files[2][0, 0, 0]) == 100
    assert [int(image[0, 0, 0]) for image in files[1:]] == [50, 100] and repr(files) == "ImageFiles(3 files)"
    os.remove(paths[1])  # read when indexed: a file gone since the check is named then
    with pytest.raises(ValueError, match="1.png"):
        files[1]


def test_a_store_of_another_collection_size_is_not_reused(tmp_path, caplog):
    state = _state(tmp_path / "out", 4)
    features = CoSegmentationFeatures([torch.ones(3, 1, 4, 2)], [torch.ones(3, 1, 4, 2)], (2, 2), [(8, 8)] * 3)
    FeatureStore.from_features(state.features_path, features)
    assert state.missing_images() == [0, 1, 2, 3] and not os.path.exists(state.features_path)
    assert "a store of 3 images, the run has 4" in caplog.text


def test_a_streamed_safetensors_file_loads_as_the_tensors_it_was_given(tmp_path):
    from safetensors import safe_open

    from cosegment.utils.files import find_temporaries, save_safetensors_streamed

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bool": torch.rand(3, 5, generator=g) > 0.5,
        "b.uint8": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        "c.int64": torch.randint(-9, 9, (2, 3), generator=g),
        "d.float32": torch.randn(4, 1, 3, generator=g),
        "e.bfloat16": torch.randn(5, generator=g).to(torch.bfloat16),
        "f.empty": torch.zeros(0, 3),
        "g.int32": torch.arange(3, dtype=torch.int32),
    }
    made = []

    def maker(name):
        def make():
            made.append(name)
            return tensors[name]

        return make

    entries = [(name, t.dtype, tuple(t.shape), maker(name)) for name, t in tensors.items()]
    save_safetensors_streamed(entries, tmp_path / "x.safetensors", metadata={"format": "test"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert sorted(loaded) == sorted(tensors)
    assert all(torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype for name, t in tensors.items())
    assert made[0] == "c.int64" and made.index("d.float32") < made.index("e.bfloat16") < made.index("a.bool")
    with safe_open(tmp_path / "x.safetensors", framework="pt") as handle:  # memory-mapped reads: aligned
        assert handle.metadata() == {"format": "test"} and torch.equal(
            handle.get_tensor("c.int64"), tensors["c.int64"]
        )
    wrong = [("x", torch.float32, (2,), lambda: torch.zeros(3))]
    with pytest.raises(ValueError, match=r"`x` was announced torch.float32 \(2,\), made torch.float32 \(3,\)"):
        save_safetensors_streamed(wrong, tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists() and find_temporaries(tmp_path) == []


def test_results_of_lazy_masks_are_written_one_mask_at_a_time(tmp_path, monkeypatch):
    import cosegment.parts as parts_module
    from cosegment import analyze_features
    from cosegment.cli_output import results_arrays, results_entries, write_results

    features = make_planted_features(num_images=4, seed=1).features
    listed = analyze_features(features, output_type="np")
    monkeypatch.setattr(parts_module, "MASKS_IN_MEMORY_BYTES", 0)
    lazy = analyze_features(features, output_type="np")
    assert isinstance(lazy.part_masks, parts_module.LazyMasks) and lazy.part_masks.num_parts >= 2
    assert lazy.part_masks.sizes == [tuple(np.asarray(m).shape) for m in listed.part_masks]
    indexed = []
    real = parts_module.LazyMasks.__getitem__

    def counted(self, index):
        indexed.append(index)
        return real(self, index)

    monkeypatch.setattr(parts_module.LazyMasks, "__getitem__", counted)
    entries = results_entries(lazy)
    assert indexed == []  # the masks' shapes and dtypes are known: none is made before it is written
    assert [(dtype, shape) for name, dtype, shape, _ in entries if name == "part_masks.2"] == [
        (torch.uint8, lazy.part_masks.sizes[2])
    ]
    for name, output in (("listed", listed), ("lazy", lazy)):
        document = {"masks": [{} for _ in range(4)], "parts": [[] for _ in range(4)]}
        write_results(str(tmp_path / name), document, output, [], figures=False)
    expected = results_arrays(listed)
    written = load_file(tmp_path / "lazy" / "results.safetensors")
    assert sorted(written) == sorted(expected) == sorted(load_file(tmp_path / "listed" / "results.safetensors"))
    assert all(torch.equal(written[name], expected[name]) for name in expected)
    assert written["part_masks.0"].dtype == torch.uint8 and written["masks.3"].dtype == torch.bool
    assert {0, 1, 2, 3} <= set(indexed)


def test_the_viewer_reads_image_files_one_at_a_time(tmp_path):
    """`build_viewer` on `ImageFiles` (the command's images, read when indexed) gives the data of the in-memory list,
    converting each image when it is used; a file that changed size since the capture is named then."""
    from cosegment import analyze_features
    from cosegment.viewer import build_viewer

    features = make_planted_features(num_images=4, grid_size=(8, 8), seed=3).features
    output = analyze_features(features, partners=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in features.image_sizes]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        PIL.Image.fromarray(image).save(paths[-1])
    files = ImageFiles(paths)
    expected = build_viewer(images, output, features, figure_size=32)
    lazy = build_viewer(files, output, features, figure_size=32)
    assert lazy.manifest == expected.manifest and lazy.images == expected.images and lazy.pairs == expected.pairs
    PIL.Image.fromarray(images[2][:-1]).save(paths[2])  # one row shorter
    with pytest.raises(ValueError, match=r"`images\[2\]` is \(\d+, \d+\) px but the features say"):
        build_viewer(files, output, features, figure_size=32)


def test_pair_bits_are_the_pairs_two_orientations():
    from cosegment.runstate import pair_bits

    orientations = torch.tensor([True, False, True])
    assert pair_bits(orientations, 0, 1) == [True, False] and pair_bits(orientations, 1, 2) == [False, True]
    assert all(type(bit) is bool for bit in pair_bits(orientations, 0, 2))  # JSON-ready, not tensors
    assert pair_bits(None, 0, 1) is None


def _photo_files(photos, folder, count: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"photo_{i}.png"))
        PIL.Image.fromarray(photos[i % len(photos)][: 80 + 8 * i]).save(paths[-1])  # each file its own content
    return paths


def test_a_run_reads_each_shard_header_once(photos, tiny_sd_path, tmp_path, monkeypatch):
    """A run asks several times what is kept (before the model loads, after `start`, before and after the capture,
    when it reads the features back): each shard's header is read once a run, fresh or resumed (at 10^4 images, 1,250
    shards a store, every extra pass is seconds of reads)."""
    import collections

    import cosegment.store
    from cosegment.cli import main

    reads = collections.Counter()
    read_header = cosegment.store.read_safetensors_header

    def counted(path):
        if os.path.basename(path).startswith("images-"):
            reads[os.path.relpath(path, tmp_path)] += 1
        return read_header(path)

    monkeypatch.setattr(cosegment.store, "read_safetensors_header", counted)
    out = str(tmp_path / "out")
    command = _photo_files(photos, tmp_path / "images", 6) + ["--model", tiny_sd_path, "--out", out, "--quiet"]
    command += ["--height", "64", "--width", "64", "--batch-size", "2", "--flip", "--partners", "2", "--no-figures"]
    shards = [
        os.path.join("out", "resume", store, name)
        for store in ("features", "mirrored")
        for name in ("images-00000000-00000001.safetensors", "images-00000002-00000003.safetensors")
        + ("images-00000004-00000005.safetensors",)
    ]
    for reference in ("none", "auto"):  # auto: the reference is captured after the images, then kept beside them
        for extra in ([], ["--resume"]):
            reads.clear()
            main(command + ["--no-viewer", "--reference", reference] + extra)
            assert sorted(reads) == sorted(shards) and set(reads.values()) == {1}, (reference, extra, dict(reads))
    # (before the headers were kept: 3 reads of each shard in a fresh run, 4 with --reference auto, 5 resumed)


def test_kept_shards_are_seen_as_other_processes_write_them(tmp_path, monkeypatch):
    """What a run knows of the kept shards is read once, and read again where a file is new or another: the shards
    other processes write during the capture count, and a shard replaced is read again."""
    import cosegment.store

    features = make_planted_features(num_images=6, seed=1).features
    reads = []
    read_header = cosegment.store.read_safetensors_header
    monkeypatch.setattr(
        cosegment.store, "read_safetensors_header", lambda path: reads.append(path) or read_header(path)
    )
    state = _state(tmp_path / "out", 6)
    assert state.missing_images() == [0, 1, 2, 3, 4, 5] and reads == []
    other = FeatureStore.create(state.features_path, 6, features.grid_size, features.layer_names, features.metadata)

    def write(images, queries=features.queries):  # as another process does
        other.write(images, [q[images] for q in queries], [k[images] for k in features.keys], [(8, 8)] * len(images))

    write([0, 1])
    write([2, 3])
    assert state.missing_images() == [4, 5] and len(reads) == 2
    assert state.missing_images() == [4, 5] and not state.has_features() and len(reads) == 2  # nothing read again
    write([4, 5])
    assert state.has_features() and len(reads) == 3  # the new shard only
    kept = state.load_features()
    assert len(reads) == 3 and torch.equal(kept.queries[0], features.queries[0])
    write([2, 3], [q + 1 for q in features.queries])  # the same shard name, written again (atomically)
    assert torch.equal(state.load_features().queries[0][2:4], features.queries[0][2:4] + 1)
    assert len(reads) == 4 and os.path.basename(reads[-1]) == "images-00000002-00000003.safetensors"


def test_a_given_pair_graph_gives_the_output_of_partners_without_reading_the_images_again(tmp_path):
    """`analyze_features(pairs=partner_pairs(features, K))` (what the command gives, having made the graph to split
    it) is `analyze_features(partners=K)` bitwise, one read of each image fewer."""
    from cosegment import analyze_features
    from cosegment.cli_output import results_arrays

    case = make_planted_features(num_images=6, seed=7)
    FeatureStore.from_features(tmp_path / "store", case.features, images_per_shard=2)
    graph = partner_pairs(case.features, 2)
    analyses = analyze_pairs(case.features, graph)
    outputs, reads = [], []
    for given in ({"partners": 2}, {"pairs": graph}):
        lazy = FeatureStore(tmp_path / "store").features(cache_bytes=0)  # every image() call a read
        outputs.append(results_arrays(analyze_features(lazy, pair_analyses=analyses, **given)))
        reads.append(sum(lazy.reads))
    assert sorted(outputs[0]) == sorted(outputs[1]) and len(graph) < 15  # a sparse graph: not every pair
    assert all(torch.equal(outputs[0][name], outputs[1][name]) for name in outputs[0])
    assert reads[0] - reads[1] == 6  # the graph's read of every image
    with pytest.raises(ValueError, match="not both"):
        analyze_features(case.features, partners=2, pairs=graph)
    with pytest.raises(ValueError, match=r"`pairs` must hold \(s, t\) with 0 <= s < t < 6"):
        analyze_features(case.features, pairs=[(0, 6)])
    with pytest.raises(
        ValueError, match=r"`pair_analyses` must hold each pair .* not in the pair graph \[\(0, \d\)\]"
    ):
        analyze_features(case.features, pair_analyses=analyses, pairs=graph[1:])


def test_a_run_with_partners_computes_each_images_mean_once(photos, tiny_sd_path, tmp_path, monkeypatch):
    """`--partners`: the image means the pair graph needs are computed once a run (each process its share), not again
    for the collection-level steps on the main process."""
    import cosegment.pairs
    from cosegment.cli import main

    computed = []
    means = cosegment.pairs.image_means

    def counted(features, indices=None):
        computed.extend(range(features.num_images) if indices is None else indices)
        return means(features, indices)

    monkeypatch.setattr(cosegment.pairs, "image_means", counted)
    command = _photo_files(photos, tmp_path / "images", 5) + ["--model", tiny_sd_path, "--out", str(tmp_path / "out")]
    main(command + ["--height", "64", "--width", "64", "--partners", "1", "--quiet", "--no-figures", "--no-viewer"])
    assert sorted(computed) == [0, 1, 2, 3, 4]  # (twice each before)
