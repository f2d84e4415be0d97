"""The sparse pair graph (issue 10): `partners=K` on analyze_features / analyze_pairs / the pipeline / the CLI."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import assert_same_contents
from test_cli import NO_FILTER_FLAGS, _run_cli, image_files, two_process_launch  # noqa: F401 (image_files: a fixture)

from cosegment import CoSegmentationFeatures, analyze_features, analyze_pairs
from cosegment.analysis import confirm_by_third_images, image_descriptors, join_pair_analyses, partner_pairs
from cosegment.benchmarks.families import make_family_case
from cosegment.cli import pair_shares


def _constant_features(directions: list[list[float]], grid=(4, 4), heads: int = 1) -> CoSegmentationFeatures:
    """Every token of image i has the query (and key) `directions[i]` in every head."""
    base = torch.tensor(directions, dtype=torch.float32)  # (M, d)
    tensor = base[:, None, None, :].expand(len(directions), heads, grid[0] * grid[1], base.shape[1]).contiguous()
    return CoSegmentationFeatures([tensor], [tensor.clone()], grid, [(8, 8)] * len(directions))


def test_partner_pairs_by_hand():
    # images 0, 1 point along e0, images 2, 3 along e1, images 4, 5 along e2 (4 a little towards e0)
    features = _constant_features(
        [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0.3, 0, 1], [0, 0, 1]],
    )
    descriptors = image_descriptors(features)
    assert descriptors.shape == (6, 3)
    np.testing.assert_allclose(descriptors.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    similarity = descriptors @ descriptors.T
    # 4 leans towards 0 and 1: the closest pairs across the three groups are (0, 4) and (1, 4) (a tie), then (2, 5)
    # and (3, 5) join group {2, 3} to the rest
    assert similarity[0, 4] == similarity[1, 4] > similarity[2, 5] == similarity[3, 5] > similarity[0, 2]
    assert similarity[2, 5] > similarity[2, 4]
    # K = 1: each image's twin leaves three groups; bridges join them, most similar first, ties to the lower index
    assert partner_pairs(features, 1) == [(0, 1), (0, 4), (2, 3), (2, 5), (4, 5)]
    # K = 2: the twin, then the closest other group; the graph is connected already, so no bridge
    assert partner_pairs(features, 2) == [(0, 1), (0, 4), (1, 4), (2, 3), (2, 5), (3, 5), (4, 5)]
    # K >= M - 1: every pair
    every = [(s, t) for s in range(6) for t in range(s + 1, 6)]
    assert partner_pairs(features, 5) == partner_pairs(features, 9) == partner_pairs(features, None) == every


def test_descriptor_ignores_what_every_image_shares():
    # a common offset (e.g. a positional component) added to every image changes nothing after centring
    plain = _constant_features([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0.9, 0.1, 0]])
    shifted = _constant_features([[1, 0, 0, 3], [0.9, 0.1, 0, 3], [0, 1, 0, 3], [0, 0.9, 0.1, 3]])
    for features in (plain, shifted):
        similarity = image_descriptors(features) @ image_descriptors(features).T
        similarity.fill_diagonal_(-2.0)
        assert similarity.argmax(dim=1).tolist() == [1, 0, 3, 2]  # each image's twin, offset or not
        graph = partner_pairs(features, 1)
        assert {(0, 1), (2, 3)} <= set(graph) and len(graph) == 3  # the twins, and one bridge between the groups


@pytest.fixture(scope="module")
def case():
    return make_family_case("sectors", 6, 3, seed=30, grid_size=(24, 24), radius=5.0)


def _same_output(a, b):
    assert [(p.source_index, p.target_index) for p in a.correspondences] == [
        (p.source_index, p.target_index) for p in b.correspondences
    ]
    for p, q in zip(a.correspondences, b.correspondences):
        for name in ("source_tokens", "target_tokens", "scores", "mutual", "source_points"):
            np.testing.assert_array_equal(getattr(p, name), getattr(q, name))
    for name in ("density_maps", "entropy_maps", "inverse_error_maps", "sharing", "outliers"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for x, y in zip(a.part_masks, b.part_masks):
        np.testing.assert_array_equal(x, y)


def test_partners_none_or_at_least_m_minus_1_is_every_pair(case):
    features = case.features
    every = analyze_features(features)
    assert len(every.correspondences) == 15
    _same_output(every, analyze_features(features, partners=None))
    _same_output(every, analyze_features(features, partners=5))
    _same_output(every, analyze_features(features, partners=40))
    # and the same as joining every pair's analysis explicitly
    _same_output(every, analyze_features(features, pair_analyses=analyze_pairs(features), partners=5))


def test_a_sparse_graph_uses_only_its_pairs(case):
    features = case.features
    graph = partner_pairs(features, 1)
    assert 5 <= len(graph) <= 6 * 1 + 6 // 2 and len(graph) < 15
    # every pair is a nearest-neighbour pair (K = 1) or a bridge between the groups those leave apart
    descriptors = image_descriptors(features).double()
    similarity = descriptors @ descriptors.T
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.argmax(dim=1).tolist()
    neighbours = {(min(s, nearest[s]), max(s, nearest[s])) for s in range(6)}
    group = list(range(6))
    for _ in range(6):
        for s, t in neighbours:
            group[s] = group[t] = min(group[s], group[t])
    groups = set(group)
    bridges = sorted(set(graph) - neighbours, key=lambda pair: -float(similarity[pair]))
    assert neighbours <= set(graph) and len(bridges) == len(groups) - 1
    assert all(group[s] != group[t] for s, t in bridges)
    if bridges:  # the first bridge is the most similar pair across groups
        across = [(s, t) for s in range(6) for t in range(s + 1, 6) if group[s] != group[t]]
        assert float(similarity[bridges[0]]) == max(float(similarity[pair]) for pair in across)
    reached, frontier = {0}, [0]  # the graph is connected
    while frontier:
        node = frontier.pop()
        for s, t in graph:
            for a, b in ((s, t), (t, s)):
                if a == node and b not in reached:
                    reached.add(b)
                    frontier.append(b)
    assert reached == set(range(6))
    output = analyze_features(features, partners=1)
    assert [(p.source_index, p.target_index) for p in output.correspondences] == graph
    # hit counts come from the listed (analysed) pairs only
    density = np.zeros_like(output.density_maps).reshape(6, -1)
    for pair in output.correspondences:
        np.add.at(density[pair.source_index], pair.source_tokens, 1)
        np.add.at(density[pair.target_index], pair.target_tokens, 1)
    np.testing.assert_array_equal(density, output.density_maps.reshape(6, -1))
    assert density.sum() > 0
    # the graph's pair analyses, split in any order, give the same output; other pair sets are refused
    shares = pair_shares(6, 2, graph)
    analyses = analyze_pairs(features, shares[1]) + analyze_pairs(features, shares[0])
    _same_output(output, analyze_features(features, partners=1, pair_analyses=analyses))
    _same_output(output, analyze_features(features, partners=1, pair_analyses=analyze_pairs(features, partners=1)))
    with pytest.raises(ValueError, match="partner graph"):
        analyze_features(features, partners=1, pair_analyses=analyses[1:])
    outside = next(pair for pair in [(s, t) for s in range(6) for t in range(s + 1, 6)] if pair not in graph)
    with pytest.raises(ValueError, match=rf"not in the pair graph \[\({outside[0]}, {outside[1]}\)\]"):
        analyze_features(features, partners=1, pair_analyses=analyses + analyze_pairs(features, [outside]))
    with pytest.raises(ValueError, match="every pair"):
        analyze_features(features, pair_analyses=analyses)


def test_third_image_confirmation_only_through_images_linked_to_both(case):
    features = case.features
    pairs = [(0, 1), (0, 2), (1, 2), (2, 3)]
    analyses = analyze_pairs(features, pairs)
    settings = analyses[0].settings
    passes = join_pair_analyses(analyses, features, settings, torch.device("cpu"), pairs)
    confirmed = confirm_by_third_images(passes, 6, features.grid_size)
    # (2, 3) and (3, 2): no third image linked to both, so nothing can be confirmed
    for pair in [(2, 3), (3, 2)]:
        assert torch.equal(confirmed[pair].keep, passes[pair].keep)
    # (0, 1): one third image (2) only, but a confirmation needs two votes
    assert torch.equal(confirmed[(0, 1)].keep, passes[(0, 1)].keep)
    # with every pair, third images 2..5 can vote for (0, 1)
    every = analyze_pairs(features)
    all_passes = join_pair_analyses(every, features, settings, torch.device("cpu"))
    full = confirm_by_third_images(all_passes, 6, features.grid_size)
    assert torch.equal(all_passes[(0, 1)].keep, passes[(0, 1)].keep)
    assert full[(0, 1)].keep.sum() >= passes[(0, 1)].keep.sum()


@pytest.mark.parametrize("bad", [1.5, "2", True, [2]])
def test_partners_type_errors(case, bad):
    with pytest.raises(TypeError, match="`partners`"):
        analyze_features(case.features, partners=bad)
    with pytest.raises(TypeError, match="`partners`"):
        analyze_pairs(case.features, partners=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_partners_value_errors(case, bad):
    with pytest.raises(ValueError, match=f"`partners`.*{bad}"):
        analyze_features(case.features, partners=bad)
    with pytest.raises(ValueError, match="`partners`"):
        analyze_pairs(case.features, partners=bad)


def test_pairs_and_partners_together_are_refused(case):
    with pytest.raises(ValueError, match="`pairs` or `partners`"):
        analyze_pairs(case.features, [(0, 1)], partners=2)


def test_pipeline_partners(tiny_pipe, photos):
    with pytest.raises(ValueError, match="`partners`"):
        tiny_pipe(photos[:3], partners=0)
    generator = torch.Generator().manual_seed(0)
    output = tiny_pipe(photos[:4], partners=1, generator=generator, height=128, width=128, return_features=True)
    graph = partner_pairs(output.features, 1)
    assert [(p.source_index, p.target_index) for p in output.correspondences] == graph
    assert output.sharing.shape == (4,) and output.outliers.shape == (4,)


def test_two_processes_split_the_partner_graph(image_files, tiny_sd_path, tmp_path):  # noqa: F811
    """As test_cli's two-process test, with `--partners 1`: both runs analyse the same graph, split in two."""
    cli = ["-m", "cosegment"] + image_files + ["--model", tiny_sd_path, "--batch-size", "2", "--seed", "3"]
    cli += ["--height", "128", "--width", "128", "--top-k", "10", "--partners", "1"] + NO_FILTER_FLAGS
    one = str(tmp_path / "one")
    _run_cli([sys.executable] + cli, one)
    two = str(tmp_path / "two")
    result = _run_cli(two_process_launch() + cli, two)
    with open(os.path.join(one, "results.json")) as handle:
        document = json.load(handle)
    pairs = [(p["source_index"], p["target_index"]) for p in document["correspondences"]]
    assert 3 <= len(pairs) <= 6 and document["settings"]["analysis"]["partners"] == 1
    assert len(document["sharing"]) == 4 and document["outliers"] == [False] * 4
    assert f"[rank 1/2] analysed {len(pairs) // 2} pairs" in result.stderr
    files = sorted(os.path.relpath(os.path.join(r, f), one) for r, _, fs in os.walk(one) for f in fs)
    assert len([name for name in files if name.startswith("pairs/")]) == len(pairs)
    assert files == sorted(os.path.relpath(os.path.join(r, f), two) for r, _, fs in os.walk(two) for f in fs)
    assert len([name for name in files if name.startswith("resume/pairs/")]) == len(pairs)  # kept for --resume
    for name in files:
        assert_same_contents(os.path.join(one, name), os.path.join(two, name))


def test_cli_partners_argument_error(image_files, tmp_path, capsys):  # noqa: F811
    from cosegment.cli import main

    with pytest.raises(SystemExit):
        main(image_files[:2] + ["--out", str(tmp_path), "--partners", "0"])
    assert "--partners" in capsys.readouterr().err


def test_longer_paths_vote_only_in_a_sparse_graph(case, monkeypatch):
    """`longer_paths`: paths s -> u -> v -> t along analysed pairs vote too (counted here by hand for one graph)."""
    import cosegment.matches as matches_module
    from cosegment.utils.correspondence import kept_map

    features = case.features
    # (0, 1) has no third image linked to both, but two paths through two: 0-2-3-1 and 0-4-5-1
    pairs = [(0, 1), (0, 2), (0, 4), (1, 3), (1, 5), (2, 3), (4, 5)]
    analyses = analyze_pairs(features, pairs)
    passes = join_pair_analyses(analyses, features, analyses[0].settings, torch.device("cpu"), pairs)
    seen = {}
    real = matches_module.confirm_matches

    def spy(forward, keep, predictions, grid_size, tolerance):
        seen[len(seen)] = (forward, predictions)
        return real(forward, keep, predictions, grid_size, tolerance)

    monkeypatch.setattr(matches_module, "confirm_matches", spy)
    short = confirm_by_third_images(passes, 6, features.grid_size)
    assert torch.equal(short[(0, 1)].keep, passes[(0, 1)].keep) and torch.equal(
        short[(1, 0)].keep, passes[(1, 0)].keep
    )
    # with only one-image paths, (0, 1) and (1, 0) are never voted on (no third image linked to both)
    assert all(not torch.equal(forward, passes[(0, 1)].statistics.forward) for forward, _ in seen.values())
    seen.clear()
    longer = confirm_by_third_images(passes, 6, features.grid_size, longer_paths=True)

    def kept(s, t):
        r, b = passes[(s, t)], passes[(t, s)]
        return kept_map(r.statistics.forward, r.keep, b.statistics.forward, b.keep)

    voted = [p for f, p in seen.values() if torch.equal(f, passes[(0, 1)].statistics.forward)]
    assert len(voted) == 1 and voted[0].shape[0] == 2
    expected = [
        matches_module._compose(matches_module._compose(kept(0, u), kept(u, v)), kept(v, 1))
        for u, v in ((2, 3), (4, 5))
    ]
    assert torch.equal(voted[0], torch.stack(expected))
    for pair in passes:  # only ever adds
        assert bool((longer[pair].keep >= passes[pair].keep).all())
