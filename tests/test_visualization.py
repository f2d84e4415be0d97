import cv2
import numpy as np
import pytest

from cosegment.utils.visualization import (
    add_colorbar,
    add_legend,
    as_rgb_uint8,
    colorbar,
    draw_correspondences,
    heatmap_range,
    legend,
    mask_legend,
    match_colors,
    overlay_heatmap,
    overlay_mask,
    overlay_parts,
    part_colors,
    parts_legend,
    side_by_side,
    upsample_grid,
)


def gray(height: int, width: int, value: int = 128) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_as_rgb_uint8_converts_gray_float_and_rgba():
    assert as_rgb_uint8(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    out = as_rgb_uint8(np.full((2, 2, 3), 0.5, np.float32))
    assert out.dtype == np.uint8 and int(out[0, 0, 0]) == 128
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 7
    assert as_rgb_uint8(rgba)[0, 0].tolist() == [7, 0, 0]
    with pytest.raises(ValueError, match="image"):
        as_rgb_uint8(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError, match="image"):
        as_rgb_uint8([[0]])


def test_side_by_side_offsets_and_padding():
    canvas, offsets = side_by_side([gray(10, 4, 1), gray(6, 3, 2)], gap=2)
    assert canvas.shape == (10, 9, 3)
    assert offsets == [0, 6]
    assert canvas[9, 7].tolist() == [255, 255, 255]  # below the shorter image: background
    assert canvas[5, 7].tolist() == [2, 2, 2]
    assert canvas[5, 4].tolist() == [255, 255, 255]  # the gap


def test_draw_correspondences_line_midpoint_has_line_colour():
    a, b = gray(40, 60), gray(50, 30)
    red = (255, 0, 0)
    canvas = draw_correspondences(a, b, [[10.0, 20.0]], [[15.0, 20.0]], color=red, gap=10, radius=0, thickness=3)
    assert canvas.shape == (50, 60 + 10 + 30, 3)
    # The line runs from (10, 20) to (60 + 10 + 15, 20): horizontal, its midpoint at x = 47.5.
    assert canvas[20, 47].tolist() == list(red)
    assert canvas[20, 30].tolist() == list(red)
    assert canvas[5, 30].tolist() == [128, 128, 128]  # far from the line: untouched
    assert canvas[45, 65].tolist() == [255, 255, 255]  # padding under image a


def test_draw_correspondences_keeps_top_scores():
    a, b = gray(40, 40), gray(40, 40)
    points_a = np.array([[5.0, 5.0], [5.0, 30.0]])
    points_b = np.array([[5.0, 5.0], [5.0, 30.0]])
    canvas = draw_correspondences(
        a, b, points_a, points_b, scores=[0.1, 0.9], top_k=1, color=(0, 0, 255), radius=0, thickness=3
    )
    mid_x = (5 + 48 + 5) // 2
    assert canvas[30, mid_x].tolist() == [0, 0, 255]  # the high-score match is drawn
    assert canvas[5, mid_x].tolist() == [255, 255, 255] or canvas[5, mid_x].tolist() == [128, 128, 128]
    assert canvas[5, mid_x].tolist() != [0, 0, 255]  # the low-score one is not


def test_draw_correspondences_default_colours_follow_source_position():
    a, b = gray(32, 32, 0), gray(32, 32, 0)
    points = np.array([[4.0, 8.0], [28.0, 24.0]])
    canvas = draw_correspondences(a, b, points, points, radius=3, gap=0)
    expected = match_colors(points, (32, 32))
    assert canvas[8, 4].tolist() == expected[0].tolist()
    assert canvas[24, 28].tolist() == expected[1].tolist()
    assert canvas[24, 32 + 28].tolist() == expected[1].tolist()  # end point in image b
    assert expected[0].tolist() != expected[1].tolist()


def test_draw_correspondences_empty_and_errors():
    canvas = draw_correspondences(gray(8, 8), gray(8, 8), np.zeros((0, 2)), np.zeros((0, 2)), gap=0)
    assert (canvas == 128).all()
    with pytest.raises(ValueError, match="points_b"):
        draw_correspondences(gray(8, 8), gray(8, 8), [[1, 1]], [[1, 1], [2, 2]])
    with pytest.raises(ValueError, match="top_k"):
        draw_correspondences(gray(8, 8), gray(8, 8), [[1, 1]], [[1, 1]], top_k=-1)
    with pytest.raises(ValueError, match="scores"):
        draw_correspondences(gray(8, 8), gray(8, 8), [[1, 1]], [[1, 1]], scores=[1, 2])


def test_upsample_grid_nearest_covers_token_cells():
    grid = np.arange(6, dtype=np.float32).reshape(2, 3)
    dense = upsample_grid(grid, (20, 30))
    assert dense.shape == (20, 30)
    assert dense[0, 0] == 0 and dense[19, 29] == 5 and dense[5, 15] == 1 and dense[15, 5] == 3


def test_overlay_heatmap_hottest_cell_gets_hottest_colour():
    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 7.0
    image = gray(40, 80)
    out = overlay_heatmap(image, grid, alpha=1.0)
    jet = cv2.cvtColor(cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0]
    # Cell (row 1, col 2) covers rows 10-19 and columns 40-59 of the 40 x 80 image.
    assert out[15, 50].tolist() == jet[1].tolist()
    assert out[5, 5].tolist() == jet[0].tolist()
    hot = (out == jet[1]).all(axis=-1)
    rows, cols = np.nonzero(hot)
    assert rows.min() == 10 and rows.max() == 19 and cols.min() == 40 and cols.max() == 59


def test_overlay_heatmap_blends_and_respects_value_range():
    image = gray(8, 8, 100)
    grid = np.full((2, 2), 5.0)
    zero = overlay_heatmap(image, grid, alpha=0.0)
    assert (zero == 100).all()
    out = overlay_heatmap(image, grid, alpha=1.0, value_range=(0.0, 10.0))
    mid = cv2.cvtColor(cv2.applyColorMap(np.array([[128]], np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0, 0]
    assert out[3, 3].tolist() == mid.tolist()
    nan_grid = np.array([[np.nan, 1.0], [0.0, 1.0]])
    out = overlay_heatmap(image, nan_grid, alpha=1.0)
    assert out[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, grid, alpha=2.0)
    with pytest.raises(ValueError, match="heatmap_grid"):
        overlay_heatmap(image, np.zeros(3))


def test_part_colors_fixed_per_id_and_distinct():
    five = part_colors(5)
    assert five.shape == (6, 3) and five.dtype == np.uint8
    assert five[0].tolist() == [0, 0, 0]
    assert (part_colors(2) == five[:3]).all()
    assert len({tuple(c) for c in five[1:].tolist()}) == 5
    with pytest.raises(ValueError, match="num_parts"):
        part_colors(-1)


def test_overlay_parts_background_unchanged_and_colours_consistent():
    rng = np.random.default_rng(0)
    image_a = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image_b = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    parts_a = np.zeros((20, 30), np.int64)
    parts_a[2:10, 3:12] = 1
    parts_a[12:18, 15:28] = 3
    parts_b = np.zeros((16, 12), np.int64)
    parts_b[4:12, 2:10] = 3
    out_a = overlay_parts(image_a, parts_a, alpha=1.0, boundaries=False)
    out_b = overlay_parts(image_b, parts_b, alpha=1.0, boundaries=False)
    colors = part_colors(3)
    assert (out_a[parts_a == 0] == image_a[parts_a == 0]).all()
    assert (out_b[parts_b == 0] == image_b[parts_b == 0]).all()
    assert (out_a[parts_a == 3] == colors[3]).all() and (out_b[parts_b == 3] == colors[3]).all()
    assert (out_a[parts_a == 1] == colors[1]).all()
    half = overlay_parts(image_a, parts_a, alpha=0.5, boundaries=True)
    assert (half[parts_a == 0] == image_a[parts_a == 0]).all()
    expected = np.round(0.5 * colors[1].astype(np.float32) + 0.5 * image_a[5, 6].astype(np.float32))
    assert half[5, 6].tolist() == expected.astype(np.uint8).tolist()  # inside part 1, off its border
    assert half[2, 5].tolist() == colors[1].tolist()  # on the border of part 1


def test_overlay_parts_keypoints_and_errors():
    image = gray(20, 20, 0)
    parts = np.zeros((20, 20), np.int64)
    out = overlay_parts(image, parts, keypoints=[[10.0, 10.0]], keypoint_parts=[2], radius=3)
    assert out[10, 10].tolist() == part_colors(2)[2].tolist()
    with pytest.raises(ValueError, match="part_mask"):
        overlay_parts(image, np.zeros((3, 3), np.int64))
    with pytest.raises(TypeError, match="part_mask"):
        overlay_parts(image, np.zeros((20, 20), np.float32))


def test_overlay_mask_tints_foreground_only():
    image = gray(10, 10, 100)
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    out = overlay_mask(image, mask, color=(0, 200, 0), alpha=0.5, contour=True)
    assert (out[~mask] == 100).all()
    assert out[4, 4].tolist() == [50, 150, 50]
    assert out[2, 4].tolist() == [0, 200, 0]
    dimmed = overlay_mask(image, mask, dim_background=0.5, contour=False)
    assert dimmed[0, 0].tolist() == [50, 50, 50]


# --- colour bars and legends ------------------------------------------------------------------------------------------


def jet(level: int) -> np.ndarray:
    return cv2.cvtColor(cv2.applyColorMap(np.array([[level]], np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0, 0]


def test_colorbar_spans_the_colour_map_with_its_range_and_label():
    band = colorbar(200, (0.0, 12.0), "hit count: kept matches per token")
    assert band.shape == (10 + 4 + 30, 200, 3) and band.dtype == np.uint8
    bar = band[2:12]
    # the ends carry the colours overlay_heatmap gives the low and high values
    assert np.abs(bar[:, 4].astype(int) - jet(0)).max() <= 1
    assert np.abs(bar[:, 195].astype(int) - jet(255)).max() <= 1
    assert (bar[:, :4] == 255).all() and (bar[:, 196:] == 255).all()  # 4 px white margins
    numbers, label = band[12:29], band[29:]
    assert (numbers[:, :30] < 128).any() and (numbers[:, 170:] < 128).any()  # "0" on the left, "12" on the right
    assert not (numbers[:, 60:140] < 128).any()  # nothing between them
    assert (label[:, 20:180] < 128).any()  # the label, centred
    # what the bar shows matches what overlay_heatmap paints for the same range
    image = np.zeros((1, 3, 3), np.uint8)
    heat = overlay_heatmap(image, np.array([[0.0, 6.0, 12.0]]), alpha=1.0)
    assert (
        np.abs(heat[0, 0].astype(int) - bar[5, 4]).max() <= 1
        and np.abs(heat[0, 2].astype(int) - bar[5, 195]).max() <= 1
    )


def test_colorbar_of_a_constant_map_and_errors():
    band = colorbar(120, (3.0, 3.0), "x")
    bar = band[2:12, 4:116].reshape(-1, 3)
    assert (np.abs(bar.astype(int) - jet(0)).max(axis=1) <= 1).all()  # one colour, as overlay_heatmap paints it
    assert heatmap_range(np.array([[1.0, np.nan], [5.0, np.inf]])) == (1.0, 5.0)
    assert heatmap_range(np.full((2, 2), np.nan)) == (0.0, 1.0)
    with pytest.raises(ValueError, match="value_range"):
        colorbar(100, (2.0, 1.0), "x")
    with pytest.raises(ValueError, match="width"):
        colorbar(0, (0.0, 1.0), "x")
    picture = add_colorbar(gray(30, 80), (0.0, 1.0), "x")
    assert picture.shape == (30 + 44, 80, 3) and (picture[:30] == 128).all()


def test_legend_swatches_and_wrapping():
    entries = [((255, 0, 0), "red thing"), ((0, 0, 255), "blue thing")]
    wide = legend(entries, 400)
    assert wide.shape == (20, 400, 3)
    assert (wide[5, 5] == [255, 0, 0]).all()  # first swatch at (3, 3), 10 x 10 with a grey rim
    blue = np.argwhere((wide == [0, 0, 255]).all(axis=2))
    assert blue.size and blue[:, 1].min() > 60 and blue[:, 0].max() < 14  # second swatch: same row, further right
    narrow = legend(entries, 90)
    assert narrow.shape == (36, 90, 3)  # wrapped onto a second row
    blue = np.argwhere((narrow == [0, 0, 255]).all(axis=2))
    assert blue[:, 0].min() >= 19 and blue[:, 1].min() < 10
    dots = legend(entries, 400, marker="dot")
    assert (dots[8, 8] == [255, 0, 0]).all() and not (dots[3, 3] == [255, 0, 0]).all()  # a disc, not a square
    with pytest.raises(ValueError, match="marker"):
        legend(entries, 100, marker="star")
    with pytest.raises(ValueError, match="RGB"):
        legend([((1, 2), "x")], 100)
    assert add_legend(gray(10, 50), entries).shape[0] > 10


def test_mask_and_parts_legends_name_the_colours_drawn():
    assert mask_legend() == [((0, 200, 0), "common foreground (mask)"), ((64, 64, 64), "background (darkened)")]
    assert mask_legend(dim_background=0.0) == [((0, 200, 0), "common foreground (mask)")]
    colors = part_colors(3)
    entries = parts_legend([0, 3, 1, 3])
    assert entries == [(tuple(int(c) for c in colors[1]), "part 1"), (tuple(int(c) for c in colors[3]), "part 3")]
    # the legend's colour is the one overlay_parts draws on a part's border
    labels = np.zeros((6, 6), np.int64)
    labels[1:5, 1:5] = 3
    drawn = overlay_parts(gray(6, 6), labels)
    assert tuple(int(c) for c in drawn[1, 1]) == entries[1][0]
    assert parts_legend([0]) == []
