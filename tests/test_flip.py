"""Mirrored captures through the analysis, the pipeline and the command (issue 27, phase 2): the collection's
orientation decided inside `analyze_features`, points mapped back to the original images, save/load, checks,
`pipe(..., flip=True)` and `cosegment --flip`."""

import dataclasses
import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from test_evaluation import spair_root  # noqa: F401 (a fixture)

from cosegment import CoSegmentationFeatures, analyze_features, analyze_pairs, transfer_points
from cosegment.benchmarks.families import SYMMETRIC, make_family_case, make_mirrored, score_case, twin_share
from cosegment.orientation import collection_orientations, flip_points, flip_tokens
from cosegment.utils.joining import token_centres_in_pixels

FAST = {"segment": False}


@pytest.fixture(scope="module")
def mixed_pair():
    """Two images of a symmetric object facing opposite ways (image 1 mirrored), and their mirrored captures."""
    case = make_family_case("sectors", 2, 4, seed=920, mirror="half", **SYMMETRIC)
    assert case.mirrors.tolist() == [False, True]
    return case, make_mirrored(case)


def _same_output(a, b) -> None:
    for name in ("density_maps", "entropy_maps", "inverse_error_maps", "sharing", "outliers"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.thresholds == b.thresholds
    for x, y in zip(a.correspondences, b.correspondences, strict=True):
        for field in ("source_points", "target_points", "scores", "mutual", "source_tokens", "target_tokens"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    for name in ("masks", "part_masks", "keypoints", "keypoint_parts"):
        for x, y in zip(getattr(a, name) or [], getattr(b, name) or [], strict=True):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------------------------


def test_a_mixed_pair_matches_the_right_part(mixed_pair):
    """Without mirrored captures a mixed pair's matches go to the mirror twin; with them, image 1 is analysed
    flipped and its points, mapped back to its own pixels, land on the right part."""
    case, mirrored = mixed_pair
    plain = analyze_features(case.features, **FAST)
    oriented = analyze_features(case.features, mirrored=mirrored.features, **FAST)
    assert plain.orientations is None and plain.correspondences[0].flipped is None
    assert oriented.orientations.tolist() == [False, True] and oriented.correspondences[0].flipped is True
    assert score_case(case, plain)["precision"] < 0.3 and twin_share(case, plain) > 0.6
    assert score_case(case, oriented)["precision"] > 0.9 and twin_share(case, oriented) < 0.05
    # tokens and points agree in the original image's frame (no refinement: points are token centres)
    unrefined = analyze_features(case.features, mirrored=mirrored.features, refine=False, **FAST)
    pair = unrefined.correspondences[0]
    size = case.features.image_sizes[1]
    centres = token_centres_in_pixels(torch.from_numpy(pair.target_tokens), case.features.grid_size, size)
    np.testing.assert_allclose(pair.target_points, centres.numpy(), atol=1e-4)


def test_maps_and_masks_come_back_flipped(mixed_pair):
    """The oriented analysis is the plain analysis of the oriented collection, with every map and mask of the flipped
    image reflected left-right and its tokens' columns `c -> w - 1 - c`."""
    case, mirrored = mixed_pair
    oriented = analyze_features(case.features, mirrored=mirrored.features, orientations=[False, True])
    chosen = [case.features.queries, mirrored.features.queries], [case.features.keys, mirrored.features.keys]
    by_hand = dataclasses.replace(
        case.features,
        queries=[torch.stack([a[0], b[1]]) for a, b in zip(*chosen[0])],
        keys=[torch.stack([a[0], b[1]]) for a, b in zip(*chosen[1])],
    )
    plain = analyze_features(by_hand)
    np.testing.assert_array_equal(oriented.density_maps[1], plain.density_maps[1][:, ::-1])
    np.testing.assert_array_equal(oriented.density_maps[0], plain.density_maps[0])
    np.testing.assert_array_equal(oriented.part_masks[1], plain.part_masks[1][:, ::-1])
    np.testing.assert_array_equal(oriented.masks[0], plain.masks[0])
    width = case.features.image_sizes[1][1]
    np.testing.assert_allclose(oriented.keypoints[1][:, 0], width - plain.keypoints[1][:, 0])
    ours, theirs = oriented.correspondences[0], plain.correspondences[0]
    w = case.features.grid_size[1]
    np.testing.assert_array_equal(
        ours.target_tokens, theirs.target_tokens // w * w + (w - 1 - theirs.target_tokens % w)
    )
    np.testing.assert_array_equal(ours.source_tokens, theirs.source_tokens)
    np.testing.assert_allclose(ours.target_points[:, 0], width - theirs.target_points[:, 0])


def test_flip_tokens_and_points_are_exact():
    """Token column `c -> w - 1 - c` is pixel `x -> W - x`, also when the image width is no multiple of the grid."""
    grid, size = (3, 5), (11, 37)
    tokens = torch.arange(15)
    flipped = flip_tokens(tokens, grid)
    assert flipped.tolist() == [4, 3, 2, 1, 0, 9, 8, 7, 6, 5, 14, 13, 12, 11, 10]
    centres = token_centres_in_pixels(tokens, grid, size)
    np.testing.assert_allclose(flip_points(centres, size[1]), token_centres_in_pixels(flipped, grid, size), atol=1e-5)
    assert flip_tokens(flipped, grid).tolist() == tokens.tolist()


def test_the_collection_fixes_what_a_pair_alone_gets_wrong():
    """A weak object-side term (0.1; design seed 503): on the corrected features two of the six pairs' own evidence
    points the wrong way; the collection's decision, inside analyze_features, gets every pair right."""
    case = make_family_case(
        "sectors", 4, 3, seed=503, mirror="half", symmetric=True, object_side=0.1, picture_side=0.4, num_heads=2
    )
    mirrored = make_mirrored(case)
    truth = case.mirrors[:, None] != case.mirrors[None, :]
    evidence = collection_orientations(case.features, mirrored.features).evidence.numpy()
    alone_wrong = ((evidence < 0) != truth) & ~np.eye(4, dtype=bool)
    assert alone_wrong.sum() >= 2  # at least one pair, both entries
    output = analyze_features(case.features, mirrored=mirrored.features, **FAST)
    flipped = np.asarray(output.orientations)
    assert flipped.tolist() == case.mirrors.tolist() or flipped.tolist() == (~case.mirrors).tolist()
    for pair in output.correspondences:
        assert pair.flipped == bool(truth[pair.source_index, pair.target_index])
    plain = analyze_features(case.features, **FAST)
    assert score_case(case, output)["precision"] > 0.8 > 0.6 > score_case(case, plain)["precision"]


def test_same_way_round_and_none_are_todays_output():
    """`mirrored=None` is today's analysis; a collection already the same way round flips nothing, so its output
    is bitwise today's too (but for the decision it reports)."""
    case = make_family_case("sectors", 3, 3, seed=931, mirror="none", **SYMMETRIC)
    today = analyze_features(case.features)
    _same_output(today, analyze_features(case.features, mirrored=None))
    same = analyze_features(case.features, mirrored=make_mirrored(case).features)
    assert same.orientations.tolist() == [False] * 3
    assert [pair.flipped for pair in same.correspondences] == [False] * 3
    _same_output(today, same)


def test_analyze_pairs_with_mirrored_joins_to_the_same_output(mixed_pair):
    case, mirrored = mixed_pair
    whole = analyze_features(case.features, mirrored=mirrored.features, **FAST)
    pairs = analyze_pairs(case.features, mirrored=mirrored.features)
    joined = analyze_features(
        case.features, mirrored=mirrored.features, orientations=whole.orientations, pair_analyses=pairs, **FAST
    )
    _same_output(whole, joined)


def test_transfer_points_in_the_decided_orientation(mixed_pair):
    """Points on image 0's object carried into the mirrored image 1 land on the right part, not on its twin."""
    case, mirrored = mixed_pair
    features = dataclasses.replace(case.features, mirrored=mirrored.features)
    grid, size = case.features.grid_size, case.features.image_sizes
    object_tokens = np.flatnonzero(case.token_parts[0].reshape(-1) > 0)[::7]
    points = token_centres_in_pixels(torch.from_numpy(object_tokens), grid, size[0]).numpy()

    def right_share(landed):
        cols = np.clip((landed[:, 0] * grid[1] / size[1][1]).astype(int), 0, grid[1] - 1)
        rows = np.clip((landed[:, 1] * grid[0] / size[1][0]).astype(int), 0, grid[0] - 1)
        return score_like(case, object_tokens, rows * grid[1] + cols)

    plain, _ = transfer_points(features, 0, 1, points)
    oriented, scores = transfer_points(features, 0, 1, points, orientations=[False, True])
    assert scores.shape == (len(points),)
    assert right_share(oriented) > 0.8 > 0.4 > right_share(plain)
    with pytest.raises(ValueError, match="orientations"):
        transfer_points(case.features, 0, 1, points, orientations=[False, True])
    with pytest.raises(ValueError, match=r"`points`.*\[-5\.0, 3\.0\]"):  # named as given, not reflected
        transfer_points(features, 0, 1, [[-5.0, 3.0]], orientations=[True, False])


def score_like(case, source_tokens, target_tokens) -> float:
    from cosegment.benchmarks.families import match_correct

    return float(match_correct(case, 0, 1, source_tokens, target_tokens).mean())


# ---------------------------------------------------------------------------------------------------------------
# Features: save, load, checks
# ---------------------------------------------------------------------------------------------------------------


def test_save_and_load_with_mirrored_and_reference(mixed_pair, tmp_path):
    case, mirrored = mixed_pair
    reference = make_family_case("blobs", 2, 3, seed=5).features  # any features of the same grid: stored, not used
    features = dataclasses.replace(case.features, mirrored=mirrored.features, reference=reference)
    path = tmp_path / "features.safetensors"
    features.save(path)
    loaded = CoSegmentationFeatures.load(path)
    for a, b in ((loaded, features), (loaded.mirrored, mirrored.features), (loaded.reference, reference)):
        assert a.grid_size == b.grid_size and a.image_sizes == b.image_sizes and a.layer_names == b.layer_names
        for x, y in zip(a.queries + a.keys, b.queries + b.keys, strict=True):
            assert torch.equal(x, y)
    assert loaded.mirrored.metadata == mirrored.features.metadata and loaded.mirrored.mirrored is None
    # a file without mirrored captures loads as before
    case.features.save(tmp_path / "plain.safetensors")
    assert CoSegmentationFeatures.load(tmp_path / "plain.safetensors").mirrored is None
    moved = features.to(dtype=torch.float64)
    assert moved.mirrored.queries[0].dtype == torch.float64


def test_bad_mirrored_and_orientations(mixed_pair):
    case, mirrored = mixed_pair
    other = make_family_case("sectors", 3, 4, seed=921, **SYMMETRIC)
    smaller = make_family_case("sectors", 2, 4, seed=920, grid_size=(16, 16), **SYMMETRIC)
    with pytest.raises(TypeError, match="`mirrored` must be a CoSegmentationFeatures or None"):
        analyze_features(case.features, mirrored=mirrored.features.queries)
    with pytest.raises(ValueError, match="`mirrored`.*image_sizes"):
        analyze_features(case.features, mirrored=other.features)
    heads = dataclasses.replace(
        mirrored.features,
        queries=[q[:, :2] for q in mirrored.features.queries],
        keys=[k[:, :2] for k in mirrored.features.keys],
    )
    with pytest.raises(ValueError, match=r"`mirrored`.*query shapes \[\(2, 2, 1024, 32\)\]"):
        analyze_features(case.features, mirrored=heads)
    with pytest.raises(ValueError, match="`mirrored`.*token grid"):
        analyze_pairs(case.features, mirrored=smaller.features)
    sizes = dataclasses.replace(mirrored.features, image_sizes=[(64, 64), (64, 80)])
    with pytest.raises(ValueError, match=r"`mirrored`.*image_sizes \[\(64, 64\), \(64, 80\)\]"):
        analyze_features(case.features, mirrored=sizes)
    with pytest.raises(ValueError, match="`mirrored`"):
        dataclasses.replace(case.features, mirrored=other.features)
    with pytest.raises(ValueError, match="`orientations` needs `mirrored`"):
        analyze_features(case.features, orientations=[True, False])
    with pytest.raises(ValueError, match="`orientations`.*shape \\(3,\\)"):
        analyze_features(case.features, mirrored=mirrored.features, orientations=[True, False, True])
    with pytest.raises(TypeError, match="`orientations`"):
        analyze_features(case.features, mirrored=mirrored.features, orientations=[1, 0])


# ---------------------------------------------------------------------------------------------------------------
# The pipeline and the command
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flipped_run(tiny_pipe, photos):
    generator = torch.Generator().manual_seed(3)
    return tiny_pipe(photos[:3], height=128, width=128, generator=generator, flip=True, return_features=True)


def test_pipeline_flip(tiny_pipe, photos, flipped_run):
    output = flipped_run
    features = output.features
    assert features.mirrored is not None and features.mirrored.metadata["mirrored"] is True
    assert output.orientations.shape == (3,) and output.orientations.dtype == bool
    bits = output.orientations.tolist()
    assert [pair.flipped for pair in output.correspondences] == [
        bits[s] != bits[t] for s, t in [(0, 1), (0, 2), (1, 2)]
    ]
    # the originals are captured as without flip; the mirrored capture is a different one
    plain = tiny_pipe.capture_features(photos[:3], height=128, width=128, generator=torch.Generator().manual_seed(3))
    for a, b, m in zip(features.queries, plain.queries, features.mirrored.queries):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(a, m)
    # the mirrored capture is the capture of the images flipped left-right, with each noise draw flipped
    draw = tiny_pipe.prepare_noise
    try:
        tiny_pipe.prepare_noise = lambda *args, **kwargs: draw(*args, **kwargs).flip(-1)
        flipped_photos = [np.ascontiguousarray(photo[:, ::-1]) for photo in photos[:3]]
        by_hand = tiny_pipe.capture_features(
            flipped_photos, height=128, width=128, generator=torch.Generator().manual_seed(3)
        )
    finally:
        del tiny_pipe.prepare_noise
    for a, b in zip(features.mirrored.queries + features.mirrored.keys, by_hand.queries + by_hand.keys):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    again = analyze_features(features, mirrored=features.mirrored, reference=features.reference)
    assert again.orientations.tolist() == bits
    np.testing.assert_array_equal(again.density_maps, output.density_maps)
    with pytest.raises(TypeError, match="`flip`"):
        tiny_pipe(photos[:2], height=128, width=128, flip="yes")


def test_cli_flip(tiny_sd_path, photos, flipped_run, tmp_path):
    from cosegment.cli import main

    paths = []
    for i, photo in enumerate(photos[:3]):
        paths.append(str(tmp_path / f"photo_{i}.png"))
        PIL.Image.fromarray(photo).save(paths[-1])
    out = str(tmp_path / "out")
    common = ["--model", tiny_sd_path, "--out", out, "--seed", "3", "--height", "128", "--width", "128"]
    assert main(paths + common + ["--flip", "--no-figures", "--points", "10,10;40,30"]) == 0
    with open(os.path.join(out, "results.json")) as handle:
        document = json.load(handle)
    expected = flipped_run
    assert document["settings"]["flip"] is True
    assert document["orientations"] == expected.orientations.tolist()
    for entry, pair in zip(document["correspondences"], expected.correspondences, strict=True):
        assert entry["flipped"] == pair.flipped
        assert np.array_equal(np.array(entry["target_points"], np.float32).reshape(-1, 2), pair.target_points)
    assert len(document["points"]["transfers"]) == 2
    from cosegment.store import FeatureStore

    mirrored = FeatureStore(os.path.join(out, "resume", "mirrored"))  # the mirrored captures, kept as a store
    assert mirrored.missing() == [] and mirrored.metadata["mirrored"] is True


def test_eval_flip_on_tiny_model(spair_root, tiny_sd_path, tmp_path, capsys):  # noqa: F811
    from cosegment.evaluation import main

    out = tmp_path / "spair.json"
    argv = ["spair", spair_root, "--model", tiny_sd_path, "--limit", "1", "--height", "64", "--width", "64"]
    assert main(argv + ["--flip", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["flip"] is True and saved["summary"]["overall"]["keypoints"] == 3
    assert "PCK@0.1" in capsys.readouterr().out


def test_cli_flip_two_processes_write_what_one_process_writes(tiny_sd_path, photos, tmp_path):
    """`--flip` split between 2 CPU processes (each weighs its share of the orientation evidence, every process
    decides from the sum) writes the results of a one-process run."""
    from conftest import assert_same_contents
    from test_cli import _run_cli, two_process_launch

    paths = []
    for i, photo in enumerate(photos):
        paths.append(str(tmp_path / f"photo_{i}.png"))
        PIL.Image.fromarray(photo).save(paths[-1])
    cli = ["-m", "cosegment"] + paths + ["--model", tiny_sd_path, "--batch-size", "2", "--seed", "3", "--flip"]
    cli += ["--height", "128", "--width", "128", "--no-figures", "--no-viewer"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run_cli([sys.executable] + cli, one)
    result = _run_cli(two_process_launch() + cli, two)
    assert "[rank 1/2] analysed 3 pairs" in result.stderr
    kept = [
        f"resume/{store}/images-0000000{i}-0000000{i + 1}.safetensors"
        for store in ("features", "mirrored")
        for i in (0, 2)
    ]
    for name in ("results.json", "results.safetensors", *kept):  # each process kept the batch it captured
        assert_same_contents(os.path.join(one, name), os.path.join(two, name))
    with open(os.path.join(one, "results.json")) as handle:
        document = json.load(handle)
    assert len(document["orientations"]) == 4 and all("flipped" in pair for pair in document["correspondences"])


def test_mirrored_features_on_disk_give_the_in_memory_output_reading_images_one_at_a_time(mixed_pair, tmp_path):
    """Issues 26 and 27 together: features and mirrored captures loaded with `mmap=True` are analysed in the decided
    orientation without reading the collection into memory at once, and give the in-memory output."""
    case, mirrored = mixed_pair
    case.features.save(tmp_path / "features.safetensors")
    mirrored.features.save(tmp_path / "mirrored.safetensors")
    lazy = CoSegmentationFeatures.load(tmp_path / "features.safetensors", mmap=True)
    lazy_mirrored = CoSegmentationFeatures.load(tmp_path / "mirrored.safetensors", mmap=True)
    expected = analyze_features(case.features, mirrored=mirrored.features)
    assert expected.orientations.tolist() in ([False, True], [True, False])
    output = analyze_features(lazy, mirrored=lazy_mirrored)
    assert output.orientations.tolist() == expected.orientations.tolist()
    _same_output(output, expected)
    assert min(lazy.reads) > 0 and max(lazy_mirrored.reads) > 0  # both sides read, image by image
