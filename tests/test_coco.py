"""COCO export (`cosegment --export coco`, `cosegment.export.export_coco`): our numpy RLE encoder against hand-computed
strings and against pycocotools, and the written file read back with pycocotools' `COCO`."""

import json
import os

import numpy as np
import PIL.Image
import pytest
from safetensors.numpy import load_file

from cosegment import CoSegmentationPipelineOutput
from cosegment.cli import main
from cosegment.export import check_export_options, coco_file_names, export_coco
from cosegment.utils.coco import (
    coco_document,
    compress_counts,
    decode_mask,
    decompress_counts,
    encode_mask,
    mask_bbox,
    part_keypoints,
    rle_counts,
)

# pycocotools' `decode` on numpy 2 warns about `__array__`'s `copy` keyword: its problem, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _masks(seed: int = 0) -> list[np.ndarray]:
    """Masks of odd sizes: random ones, blobs touching each edge and corner, full, one pixel, a single row/column."""
    rng = np.random.default_rng(seed)
    masks = [rng.random((h, w)) < p for h, w, p in ((7, 5, 0.5), (1, 9, 0.3), (13, 1, 0.6), (31, 17, 0.05))]
    for h, w in ((9, 11), (10, 3), (1, 1), (64, 47)):
        masks += [np.ones((h, w), bool), np.zeros((h, w), bool)]
        for rows, cols in ((slice(0, 3), slice(None)), (slice(-2, None), slice(2, 5)), (slice(None), slice(-1, None))):
            edge = np.zeros((h, w), bool)
            edge[rows, cols] = True
            masks.append(edge)
        corner = np.zeros((h, w), bool)
        corner[0, 0] = corner[-1, -1] = True
        masks.append(corner)
    big = np.zeros((300, 451), bool)  # long runs: counts that need several 5-bit groups
    big[40:260, 100:451] = True
    big[120:140, 200:220] = False
    return masks + [big]


# --- the encoder, by hand ---------------------------------------------------------------------------------------


def test_hand_computed_rle():
    # columns read top to bottom: (0, 0), (1, 0), (1, 1) -> 0 0 1 0 1 1 -> runs 2 zeros, 1 one, 1 zero, 2 ones;
    # the fourth count is stored as 2 - 1 = 1, each small value one character (48 + value): "2111"
    mask = np.array([[0, 1, 1], [0, 0, 1]], bool)
    assert rle_counts(mask) == [2, 1, 1, 2]
    assert encode_mask(mask) == {"size": [2, 3], "counts": "2111"}
    # a first pixel set: the counts start with 0 zeros; the fourth count 2 - 5 = -3 is 5-bit group 0b11101 (sign bit
    # set, so -1 ends it): chr(48 + 29) = "M"
    row = np.array([[1, 1, 1, 1, 1, 0, 1, 1]], bool)
    assert rle_counts(row) == [0, 5, 1, 2]
    assert encode_mask(row)["counts"] == "051M"
    # 100 = 0b11 00100: low group 4 with the continuation bit (4 + 32 + 48 = "T"), then 3 ("3"); 30 = 0b11110 has the
    # sign bit set, so a further group 0 follows: "n" (30 + 32 + 48), "0"
    long = np.zeros((1, 130), bool)
    long[0, 100:] = True
    assert encode_mask(long)["counts"] == "T3n0"
    assert decompress_counts("T3n0") == [100, 30] and decompress_counts("051M") == [0, 5, 1, 2]
    assert rle_counts(np.zeros((3, 4), bool)) == [12] and compress_counts([12]) == "<"


def test_bbox_and_keypoints_by_hand():
    mask = np.zeros((5, 7), bool)
    mask[1:4, 2] = mask[3, 5] = True
    assert mask_bbox(mask) == [2.0, 1.0, 4.0, 3.0]
    assert mask_bbox(np.zeros((4, 4), bool)) == [0.0, 0.0, 0.0, 0.0]
    points = np.array([[3.5, 1.25], [6.0, 2.0]], np.float32)
    assert part_keypoints(points, np.array([3, 1]), 3) == [6.0, 2.0, 2, 0, 0, 0, 3.5, 1.25, 2]
    assert part_keypoints(np.zeros((0, 2)), np.zeros(0, int), 2) == [0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="`parts` must lie in \\[1, 2\\]"):
        part_keypoints(points, np.array([3, 1]), 2)
    with pytest.raises(ValueError, match="`mask` must be 2-D"):
        encode_mask(np.zeros((2, 2, 3), bool))


def test_decode_is_the_inverse():
    for mask in _masks(1):
        assert np.array_equal(decode_mask(encode_mask(mask)), mask)
    with pytest.raises(ValueError, match="cover 12 pixels"):
        decode_mask({"size": [3, 5], "counts": "<"})


# --- the encoder against pycocotools ----------------------------------------------------------------------------


def test_rle_is_what_pycocotools_writes():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(2)
    masks = _masks(2) + [rng.random(rng.integers(1, 40, 2)) < rng.random() for _ in range(300)]
    for mask in masks:
        theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = encode_mask(mask)
        assert ours["counts"] == theirs["counts"].decode("ascii") and ours["size"] == list(theirs["size"])
        assert mask_bbox(mask) == mask_api.toBbox(theirs).tolist()
        assert int(mask.sum()) == int(mask_api.area(theirs))
        assert np.array_equal(mask_api.decode(ours).astype(bool), mask)  # pycocotools reads our dict as it is


# --- the file ---------------------------------------------------------------------------------------------------


def _output(masks: list[np.ndarray]) -> CoSegmentationPipelineOutput:
    """An output of 4 images: parts 1..3, part 2 missing from image 1, image 2 an outlier (empty mask)."""
    part_masks, keypoints, parts = [], [], []
    for i, mask in enumerate(masks):
        labels = np.zeros(mask.shape, np.int64)
        ids = [] if not mask.any() else [1, 3] if i == 1 else [1, 2, 3]
        for k, part in enumerate(ids):
            labels[mask & (np.arange(mask.shape[1]) % len(ids) == k)] = part
        part_masks.append(labels)
        keypoints.append(np.array([[1.5 + part, 0.25 * part + i] for part in ids], np.float32).reshape(-1, 2))
        parts.append(np.array(ids, np.int64))
    empty = np.zeros((len(masks), 1, 1), np.float32)
    return CoSegmentationPipelineOutput(
        correspondences=[],
        density_maps=empty,
        entropy_maps=empty,
        inverse_error_maps=empty,
        masks=[labels > 0 for labels in part_masks],
        part_masks=part_masks,
        keypoints=keypoints,
        keypoint_parts=parts,
        outliers=np.array([False, False, True, False]),
    )


def test_export_coco_reads_back_with_pycocotools(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    masks = [np.zeros((37, 53), bool), np.zeros((20, 9), bool), np.zeros((11, 12), bool), np.ones((8, 5), bool)]
    masks[0][0:10, 40:] = True  # touches the top and right edges
    masks[0][30:, 0:3] = True  # and the bottom and left ones, apart from the first blob
    masks[1][5:15, 2:7] = True
    output = _output(masks)
    paths = [str(tmp_path / "a" / name) for name in ("x.jpg", "y.png", "z.jpg", "w.jpg")]
    path = tmp_path / "annotations.json"
    document = export_coco(output, paths, path, category="cat")
    assert json.loads(path.read_text()) == document
    coco = coco_api.COCO(str(path))
    assert [image["file_name"] for image in coco.dataset["images"]] == ["x.jpg", "y.png", "z.jpg", "w.jpg"]
    assert [(image["height"], image["width"]) for image in coco.dataset["images"]] == [m.shape for m in masks]
    (category,) = coco.dataset["categories"]
    assert category["name"] == "cat" and category["keypoints"] == ["part_1", "part_2", "part_3"]
    assert category["skeleton"] == []
    assert coco.getAnnIds(imgIds=[3]) == []  # the outlier's empty mask: no annotation
    for image_id in (1, 2, 4):
        (annotation,) = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        mask = masks[image_id - 1]
        assert np.array_equal(coco.annToMask(annotation).astype(bool), mask)
        assert annotation["area"] == int(mask.sum()) and annotation["iscrowd"] == 0
        assert annotation["category_id"] == 1
    annotations = {a["image_id"]: a for a in coco.dataset["annotations"]}
    assert annotations[1]["bbox"] == [0.0, 0.0, 53.0, 37.0]
    assert annotations[2]["bbox"] == [2.0, 5.0, 5.0, 10.0]
    # x, y, v per part; part 2 is absent from image 2 (id 2): 0, 0, 0
    assert annotations[2]["keypoints"] == [2.5, 1.25, 2, 0, 0, 0, 4.5, 1.75, 2]
    assert annotations[2]["num_keypoints"] == 2
    assert annotations[4]["keypoints"] == [2.5, 3.25, 2, 3.5, 3.5, 2, 4.5, 3.75, 2]


def test_export_coco_takes_torch_outputs_and_names_mistakes(tmp_path):
    import torch

    masks = [np.eye(4, dtype=bool), np.ones((3, 2), bool), np.zeros((2, 2), bool), np.ones((1, 1), bool)]
    output = _output(masks)
    as_torch = CoSegmentationPipelineOutput(
        correspondences=[],
        density_maps=output.density_maps,
        entropy_maps=output.entropy_maps,
        inverse_error_maps=output.inverse_error_maps,
        masks=[torch.from_numpy(m) for m in output.masks],
        part_masks=[torch.from_numpy(m) for m in output.part_masks],
        keypoints=[torch.from_numpy(k) for k in output.keypoints],
        keypoint_parts=[torch.from_numpy(p) for p in output.keypoint_parts],
    )
    paths = ["i0.png", "i1.png", "i2.png", "i3.png"]
    assert export_coco(as_torch, paths, tmp_path / "t.json") == export_coco(output, paths, tmp_path / "n.json")
    with pytest.raises(ValueError, match="`image_paths` names 2 files for 4 images"):
        export_coco(output, paths[:2], tmp_path / "x.json")
    with pytest.raises(ValueError, match="`category` must be a non-empty string"):
        export_coco(output, paths, tmp_path / "x.json", category=" ")
    without_masks = CoSegmentationPipelineOutput([], *([output.density_maps] * 3))
    with pytest.raises(ValueError, match="no masks"):
        export_coco(without_masks, paths, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_coco_document_without_parts():
    document = coco_document([np.ones((2, 3), bool)], ["a.png"], category="object")
    assert "keypoints" not in document["categories"][0] and "keypoints" not in document["annotations"][0]


def test_file_names_are_relative_to_the_common_folder(tmp_path):
    assert coco_file_names([tmp_path / "a.jpg", tmp_path / "b.jpg"]) == ["a.jpg", "b.jpg"]
    nested = [tmp_path / "x" / "a.jpg", tmp_path / "y" / "z" / "a.jpg"]
    assert coco_file_names(nested) == ["x/a.jpg", "y/z/a.jpg"]


def test_check_export_options():
    check_export_options("coco", "object")
    with pytest.raises(ValueError, match="`--category` must be a non-empty name"):
        check_export_options("coco", "")
    with pytest.raises(ValueError, match="cannot be combined with `--no-segment`"):
        check_export_options("coco", "object", segment=False)
    with pytest.raises(ValueError, match="`--export` must be one of coco"):
        check_export_options("voc", "object")


# --- the command --------------------------------------------------------------------------------------------------


def test_cli_export_coco_matches_the_results(photos, tiny_sd_path, tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    paths = []
    for i, photo in enumerate(photos[:3]):
        paths.append(str(tmp_path / f"photo_{i}.png"))
        PIL.Image.fromarray(photo).save(paths[-1])
    out = str(tmp_path / "out")
    args = paths + ["--model", tiny_sd_path, "--out", out, "--height", "128", "--width", "128", "--no-figures"]
    assert main(args + ["--quiet", "--export", "coco", "--category", "thing"]) == 0
    arrays = load_file(os.path.join(out, "results.safetensors"))
    with open(os.path.join(out, "results.json")) as handle:
        keypoints = json.load(handle)["keypoints"]
    coco = coco_api.COCO(os.path.join(out, "annotations.json"))
    assert coco.dataset["categories"][0]["name"] == "thing"
    assert [image["file_name"] for image in coco.dataset["images"]] == ["photo_0.png", "photo_1.png", "photo_2.png"]
    annotated = 0
    for i in range(3):
        mask = arrays[f"masks.{i}"]
        found = coco.loadAnns(coco.getAnnIds(imgIds=[i + 1]))
        assert len(found) == int(mask.any())
        if found:
            annotated += 1
            assert np.array_equal(coco.annToMask(found[0]).astype(bool), mask)
            values = found[0]["keypoints"]
            for (x, y), part in zip(keypoints[i]["points"], keypoints[i]["parts"]):
                assert values[3 * part - 3 : 3 * part] == pytest.approx([x, y, 2])
    assert annotated >= 1  # the tiny random model finds a mask in one image of three at this size


def test_cli_refuses_export_without_masks_before_loading(photos, tmp_path, capsys):
    path = str(tmp_path / "a.png")
    PIL.Image.fromarray(photos[0]).save(path)
    with pytest.raises(SystemExit) as error:
        main([path, path, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
             + ["--export", "coco", "--no-segment"])  # fmt: skip
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and "cannot be combined with `--no-segment`" in err
    assert not (tmp_path / "out").exists()
