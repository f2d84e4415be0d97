"""The command's split between processes and its `--points` parser: cases written for the mutation run of issue 29
(each pins behaviour a user of `cosegment` depends on, not a mutant's text)."""

import json

import numpy as np
import pytest

from cosegment.cli import capture_shares, pair_shares, parse_points


@pytest.mark.parametrize(
    "num_images, batch_size, processes, expected",
    [
        # three batches on two processes: two and one, not all three on the first
        (6, 2, 2, [[0, 1, 2, 3], [4, 5]]),
        # five one-image batches on three processes: 2, 2, 1 batches; the lone last image joins its neighbour
        (5, 1, 3, [[0, 1], [2, 3, 4], []]),
        # seven batches on three processes: 3, 2, 2
        (14, 2, 3, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]),
    ],
)
def test_capture_shares_are_as_even_as_whole_batches_allow(num_images, batch_size, processes, expected):
    assert capture_shares(num_images, batch_size, processes) == expected


@pytest.mark.parametrize("num_batches", range(2, 12))
@pytest.mark.parametrize("processes", [2, 3, 4])
def test_no_process_gets_two_batches_more_than_another(num_batches, processes):
    shares = capture_shares(2 * num_batches, 2, processes)  # two-image batches: no share is ever merged
    counts = [len(share) // 2 for share in shares]
    assert sum(counts) == num_batches and max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # the larger shares first


@pytest.mark.parametrize(
    "arguments, name",
    [
        ((1, 2, 2), "num_images"),
        ((4, 0, 2), "batch_size"),
        ((4, 2, 0), "num_processes"),
        ((4, True, 2), "batch_size"),  # a bool is not a count
        ((4, 2, True), "num_processes"),
        ((4.0, 2, 2), "num_images"),
        ((4, 2.0, 2), "batch_size"),
        ((4, 2, 2.0), "num_processes"),
    ],
)
def test_capture_shares_names_the_bad_argument(arguments, name):
    with pytest.raises(ValueError, match=rf"^`{name}` must be an int >= \d, got "):
        capture_shares(*arguments)


def test_pair_shares_split_the_given_pairs():
    graph = [(0, 1), (0, 4), (2, 3), (2, 5), (4, 5)]  # a partner graph, not every pair
    assert pair_shares(6, 2, graph) == [[(0, 1), (2, 3), (4, 5)], [(0, 4), (2, 5)]]
    assert pair_shares(6, 1, graph) == [graph]
    assert pair_shares(6, 3, iter(graph)) == [[(0, 1), (2, 5)], [(0, 4), (4, 5)], [(2, 3)]]
    assert pair_shares(3, 2) == [[(0, 1), (1, 2)], [(0, 2)]]  # default: every pair


def test_parse_points_skips_empty_items():
    expected = [[1.0, 2.0], [3.0, 4.0]]
    for text in ("1,2;3,4;", ";1,2;;3,4", "1,2; ;3,4", " 1,2 ; 3,4 ; "):
        np.testing.assert_array_equal(parse_points(text), expected)
    for text in (";", " ; ; "):
        with pytest.raises(ValueError, match="one or more finite x,y pairs"):
            parse_points(text)


def test_parse_points_returns_float64_from_json_integers(tmp_path):
    listed = tmp_path / "points.json"
    listed.write_text(json.dumps({"points": [[1, 2], [3, 4]]}))
    points = parse_points(str(listed))
    assert points.dtype == np.float64 and points.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert parse_points("1,2").dtype == np.float64


def test_a_points_file_with_other_text_reads_whatever_the_locale(tmp_path, monkeypatch):
    import builtins

    import cosegment.cli

    def ascii_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        """`open` where the locale's encoding is ASCII (a C locale without Python's UTF-8 mode)."""
        if "b" not in mode and encoding is None:
            encoding = "ascii"
        return builtins.open(file, mode, buffering, encoding, *args, **kwargs)

    monkeypatch.setattr(cosegment.cli, "open", ascii_open, raising=False)
    listed = tmp_path / "points.json"
    listed.write_text(json.dumps({"label": "Ångström's café", "points": [[1, 2]]}, ensure_ascii=False), "utf-8")
    assert parse_points(str(listed)).tolist() == [[1.0, 2.0]]
