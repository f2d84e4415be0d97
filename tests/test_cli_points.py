"""`cosegment ... --points`: points of the first image transferred into the others (issue 11), and `--no-refine`."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import NO_FILTER

from cosegment import transfer_points
from cosegment.cli import check_points, main, parse_points, point_transfers, write_points_figure
from cosegment.utils.visualization import draw_points, part_colors

NO_FILTER_FLAGS = [flag for name in NO_FILTER for flag in ("--" + name.replace("_", "-"), "inf")]


def _write_photos(photos, folder) -> list[str]:
    paths = [str(folder / f"photo_{i}.png") for i in range(len(photos))]
    for path, photo in zip(paths, photos):
        PIL.Image.fromarray(photo).save(path)
    return paths


def test_parse_points_text_and_json(tmp_path):
    np.testing.assert_array_equal(parse_points("10,20; 30.5,4"), [[10.0, 20.0], [30.5, 4.0]])
    listed = tmp_path / "points.json"
    listed.write_text(json.dumps([[1, 2], [3, 4]]))
    np.testing.assert_array_equal(parse_points(str(listed)), [[1.0, 2.0], [3.0, 4.0]])
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"points": [[5, 6]]}))
    np.testing.assert_array_equal(parse_points(str(wrapped)), [[5.0, 6.0]])


@pytest.mark.parametrize("text", ["", "1,2,3", "a,b", "1,2;3", "nan,1", "{}"])
def test_parse_points_refuses(text):
    with pytest.raises(ValueError, match="--points"):
        parse_points(text)


def test_check_points_refuses_outside_the_first_image():
    image = np.zeros((20, 30, 3), np.uint8)
    check_points(np.array([[0.0, 0.0], [30.0, 20.0]]), image)
    with pytest.raises(ValueError, match="--points"):
        check_points(np.array([[31.0, 5.0]]), image)


def test_draw_points_colours_the_point():
    image = np.full((40, 40, 3), 255, np.uint8)
    colors = part_colors(2)[1:]
    out = draw_points(image, np.array([[10.0, 10.0], [30.0, 25.0]]), colors, radius=4)
    assert out.shape == image.shape and (image == 255).all()  # a copy
    np.testing.assert_array_equal(out[10, 10], colors[0])
    np.testing.assert_array_equal(out[25, 30], colors[1])
    np.testing.assert_array_equal(out[0, 39], [255, 255, 255])
    with pytest.raises(ValueError, match="colors"):
        draw_points(image, np.zeros((2, 2)), colors[:1])


def test_point_transfers_and_figure_on_planted_features(tmp_path):
    from cosegment.benchmarks.planted import make_planted_features

    case = make_planted_features(3, noise=0.3, seed=3003)
    rows, cols = np.nonzero(case.token_parts[0])
    height, width = case.features.image_sizes[0]
    points = np.stack([(cols[::40] + 0.5) * width / 32, (rows[::40] + 0.5) * height / 32], -1)
    transfers = point_transfers(case.features, points, refine=True)
    assert [t["target_index"] for t in transfers] == [1, 2]
    for t in transfers:
        expected, scores = transfer_points(case.features, 0, t["target_index"], points)
        np.testing.assert_allclose(t["points"], expected, rtol=1e-6)
        np.testing.assert_allclose(t["scores"], scores, rtol=1e-6)
    # pictures of the planted object (its parts in colour) with the points
    palette = part_colors(case.num_parts)
    images = [
        np.asarray(PIL.Image.fromarray(palette[parts]).resize(size[::-1], PIL.Image.NEAREST))
        for parts, size in zip(case.token_parts, case.features.image_sizes)
    ]
    assert write_points_figure(images, points, transfers, str(tmp_path), 384) == "points.png"
    picture = np.asarray(PIL.Image.open(tmp_path / "points.png"))
    sizes = case.features.image_sizes  # all within 384 px: drawn at their own size, 8 px apart, 18 px titles
    assert picture.shape == (max(h for h, _ in sizes) + 18, sum(w for _, w in sizes) + 16, 3)
    # each point's colour is in every panel (same colour = same point)
    for k, colour in enumerate(part_colors(len(points))[1:]):
        x = int(round(points[k, 0]))
        y = int(round(points[k, 1])) + 18
        np.testing.assert_array_equal(picture[y, x], colour)
        lx, ly = np.array(transfers[0]["points"])[k]
        np.testing.assert_array_equal(picture[int(round(ly)) + 18, int(round(lx)) + sizes[0][1] + 8], colour)


def test_cli_points_end_to_end(photos, tiny_sd_path, tmp_path):
    paths = _write_photos(photos[:3], tmp_path)
    height, width = photos[0].shape[:2]
    points = [[width / 4, height / 3], [width / 2, height / 2], [width - 1.0, height - 1.0]]
    common = paths + ["--model", tiny_sd_path, "--seed", "3", "--height", "128", "--width", "128", *NO_FILTER_FLAGS]
    text = ";".join(f"{x},{y}" for x, y in points)
    out = tmp_path / "out"
    assert main(common + ["--out", str(out), "--points", text]) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["refine"] is True
    assert document["points"]["source_index"] == 0
    np.testing.assert_allclose(document["points"]["points"], points)
    assert [t["target_index"] for t in document["points"]["transfers"]] == [1, 2]
    for transfer in document["points"]["transfers"]:
        landed, scores = np.array(transfer["points"]), np.array(transfer["scores"])
        target_height, target_width = photos[transfer["target_index"]].shape[:2]
        assert landed.shape == (3, 2) and scores.shape == (3,)
        assert ((landed >= 0) & (landed <= [target_width, target_height])).all()
        assert ((scores >= 0) & (scores <= 1)).all()
    assert "points.png" in document["figures"] and (out / "points.png").is_file()
    # --no-refine: every transferred point is a token centre
    plain = tmp_path / "plain"
    assert main(common + ["--out", str(plain), "--points", text, "--no-refine"]) == 0
    document = json.loads((plain / "results.json").read_text())
    assert document["settings"]["refine"] is False
    h, w = document["grid_size"]
    for transfer in document["points"]["transfers"]:
        target_height, target_width = photos[transfer["target_index"]].shape[:2]
        cells = np.array(transfer["points"]) / [target_width / w, target_height / h] - 0.5
        np.testing.assert_allclose(cells, np.round(cells), atol=1e-4)
    # a point outside the first image is refused before the model loads
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "bad"), "--points", f"{width + 5},1"])
    assert not (tmp_path / "bad").exists()


def test_cli_refine_matches_the_pipeline(photos, tiny_pipe, tiny_sd_path, tmp_path):
    paths = _write_photos(photos[:2], tmp_path)
    common = paths + ["--model", tiny_sd_path, "--seed", "3", "--height", "128", "--width", "128", "--no-figures"]
    for flags, refine in (([], True), (["--no-refine"], False)):
        out = tmp_path / f"out{refine}"
        assert main(common + NO_FILTER_FLAGS + flags + ["--out", str(out)]) == 0
        document = json.loads((out / "results.json").read_text())
        expected = tiny_pipe(
            image=photos[:2],
            height=128,
            width=128,
            generator=torch.Generator().manual_seed(3),
            refine=refine,
            **NO_FILTER,
        )
        np.testing.assert_array_equal(
            np.array(document["correspondences"][0]["target_points"], np.float32),
            expected.correspondences[0].target_points,
        )
