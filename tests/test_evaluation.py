"""`cosegment-eval` on small synthetic datasets written in SPair-71k's and CUB-200-2011's layouts."""

import argparse
import json
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

from cosegment import CoSegmentationFeatures
from cosegment.evaluation import (
    KeypointPair,
    PipelinePredictor,
    correct_keypoints,
    cub_pairs,
    evaluate_cosegmentation,
    evaluate_keypoints,
    format_table,
    jaccard,
    keypoint_tokens,
    load_cub,
    load_spair_pairs,
    main,
    pck_threshold,
    run,
    summarize,
    transfer_keypoints,
)


def test_pck_threshold_and_correct_keypoints():
    assert pck_threshold((10, 20, 110, 70)) == pytest.approx(10.0)  # max(100, 50) * 0.1
    assert pck_threshold((0, 0, 30, 80), alpha=0.05) == pytest.approx(4.0)
    target = np.array([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0]])
    predicted = target + np.array([[3.0, 4.0], [0.0, 5.01], [0.0, 0.0]])
    assert correct_keypoints(predicted, target, 5.0).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="bbox"):
        pck_threshold((0, 0, -1, 5))
    with pytest.raises(ValueError, match="alpha"):
        pck_threshold((0, 0, 1, 1), alpha=0)
    with pytest.raises(ValueError, match="predicted"):
        correct_keypoints(np.zeros((2, 2)), np.zeros((3, 2)), 1.0)


def test_jaccard_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert jaccard(a, b) == pytest.approx(4 / 12)
    assert jaccard(a, a) == 1.0 and jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert jaccard(a, ~a) == 0.0


def test_summarize_per_image_differs_from_per_keypoint():
    records = [
        {"category": "cat", "correct": [True, True, True, True]},
        {"category": "cat", "correct": [False]},
        {"category": "dog", "correct": [True, False]},
        {"category": "dog", "jaccard": 0.25},
        {"category": "dog", "jaccard": 0.75},
    ]
    summary = summarize(records)
    cat, dog, overall = summary["categories"]["cat"], summary["categories"]["dog"], summary["overall"]
    assert cat["pck_per_image"] == pytest.approx(0.5) and cat["pck_per_keypoint"] == pytest.approx(0.8)
    assert cat["jaccard"] is None and dog["jaccard"] == pytest.approx(0.5) and dog["segmented_images"] == 2
    assert overall["pairs"] == 3 and overall["keypoints"] == 7
    assert overall["pck_per_image"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert overall["pck_per_keypoint"] == pytest.approx(5 / 7)
    table = format_table(summary)
    assert "ALL" in table and "50.0" in table and "80.0" in table and "n/a" in table


# --- SPair-71k layout -------------------------------------------------------------------------------------------------


def write_image(path, height, width, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def spair_root(tmp_path):
    root = tmp_path / "SPair-71k"
    annotations = [
        ("000001-a1-a2:cat", "cat", [[10, 10], [30, 40]], [[20, 20], [40, 50]], [0, 0, 100, 50]),
        ("000002-a2-a3:cat", "cat", [[5, 5], [6, 6], [7, 7]], [[50, 5], [60, 6], [70, 7]], [0, 0, 200, 80]),
        ("000003-b1-b2:dog", "dog", [[1, 2]], [[3, 4]], [10, 10, 40, 70]),
        ("000004-b2-b3:dog", "dog", [[8, 9], [10, 11]], [[12, 13], [14, 15]], [0, 0, 60, 60]),
    ]
    folder = root / "PairAnnotation" / "test"
    folder.mkdir(parents=True)
    for name, category, src, trg, box in annotations:
        src_name, trg_name = name.split(":")[0].split("-")[1:]
        document = {
            "category": category,
            "src_imname": f"{src_name}.jpg",
            "trg_imname": f"{trg_name}.jpg",
            "src_kps": src,
            "trg_kps": trg,
            "src_bndbox": [0, 0, 10, 10],
            "trg_bndbox": box,
            "kps_ids": list(range(len(src))),
        }
        (folder / f"{name}.json").write_text(json.dumps(document))
        for image in (src_name, trg_name):
            path = root / "JPEGImages" / category / f"{image}.jpg"
            if not path.exists():
                write_image(str(path), 64, 96)
    (root / "PairAnnotation" / "trn").mkdir()
    return str(root)


def test_load_spair_pairs_reads_the_layout(spair_root):
    pairs = load_spair_pairs(spair_root)
    assert [p.name for p in pairs] == ["000001-a1-a2:cat", "000002-a2-a3:cat", "000003-b1-b2:dog", "000004-b2-b3:dog"]
    first = pairs[0]
    assert first.category == "cat" and first.target_bbox == (0, 0, 100, 50)
    assert first.source_image.endswith(os.path.join("JPEGImages", "cat", "a1.jpg")) and os.path.isfile(
        first.source_image
    )
    assert first.source_keypoints.tolist() == [[10, 10], [30, 40]]
    assert [p.name for p in load_spair_pairs(spair_root, categories=["dog"])] == [
        "000003-b1-b2:dog",
        "000004-b2-b3:dog",
    ]
    assert [p.category for p in load_spair_pairs(spair_root, limit=1)] == ["cat", "dog"]
    with pytest.raises(ValueError, match="split"):
        load_spair_pairs(spair_root, split="train")
    with pytest.raises(ValueError, match="root"):
        load_spair_pairs(spair_root, split="trn")
    with pytest.raises(ValueError, match="categories"):
        load_spair_pairs(spair_root, categories=["horse"])


def test_perfect_and_shifted_predictors_score_one_and_zero(spair_root):
    pairs = load_spair_pairs(spair_root)
    perfect = summarize(evaluate_keypoints(pairs, lambda p: p.target_keypoints))
    assert perfect["overall"]["pck_per_image"] == 1.0 and perfect["overall"]["pck_per_keypoint"] == 1.0
    assert perfect["overall"]["keypoints"] == 8

    def shifted(fraction):
        return lambda p: (
            p.target_keypoints
            + [fraction * max(p.target_bbox[2] - p.target_bbox[0], p.target_bbox[3] - p.target_bbox[1]), 0]
        )

    assert summarize(evaluate_keypoints(pairs, shifted(0.11)))["overall"]["pck_per_keypoint"] == 0.0
    assert summarize(evaluate_keypoints(pairs, shifted(0.09)))["overall"]["pck_per_keypoint"] == 1.0

    # Only the first keypoint of each pair right: per keypoint 4 / 8, per image mean(1/2, 1/3, 1/1, 1/2).
    def first_only(p):
        out = p.target_keypoints + 1000.0
        out[0] = p.target_keypoints[0]
        return out

    mixed = summarize(evaluate_keypoints(pairs, first_only))["overall"]
    assert mixed["pck_per_keypoint"] == pytest.approx(4 / 8)
    assert mixed["pck_per_image"] == pytest.approx((1 / 2 + 1 / 3 + 1 + 1 / 2) / 4)


class FakePredictor:
    """Transfers keypoints with a known error; segments by returning the ground truth or everything."""

    def __init__(self, shift=0.0, masks=None):
        self.shift, self.masks, self.segment_calls = shift, masks, []

    def transfer(self, pair):
        return pair.target_keypoints + self.shift

    def segment(self, paths):
        self.segment_calls.append(paths)
        return None if self.masks is None else [self.masks(path) for path in paths]


def test_eval_command_writes_json_and_table(spair_root, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = argparse.Namespace(
        dataset="spair", root=spair_root, split="test", categories=["cat"], limit=None, alpha=0.1, model="fake",
        seed=0, no_segmentation=False, out=str(out),
    )  # fmt: skip
    document = run(args, predictor=FakePredictor(shift=0.0))
    printed = capsys.readouterr().out
    assert "cat" in printed and "100.0" in printed and "dog" not in printed
    saved = json.loads(out.read_text())
    assert saved["summary"]["overall"]["pck_per_keypoint"] == 1.0 == document["summary"]["overall"]["pck_per_image"]
    assert [r["name"] for r in saved["records"]] == ["000001-a1-a2:cat", "000002-a2-a3:cat"]


# --- CUB-200-2011 layout ----------------------------------------------------------------------------------------------


@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "CUB_200_2011"
    images = [
        (1, "001.Black_footed_Albatross/a_1.jpg"),
        (2, "001.Black_footed_Albatross/a_2.jpg"),
        (3, "001.Black_footed_Albatross/a_3.jpg"),
        (4, "002.Laysan_Albatross/b_1.jpg"),
        (5, "002.Laysan_Albatross/b_2.jpg"),
    ]
    (root / "parts").mkdir(parents=True)
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in images))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 2.0 4.0 {20 + i}.0 30.0\n" for i, _ in images))
    locations = []
    for image_id, _ in images:
        for part in (1, 2, 3):
            visible = 0 if (image_id, part) in {(2, 3), (5, 1)} else 1
            locations.append(f"{image_id} {part} {5.0 * part + image_id} {4.0 * part} {visible}\n")
    (root / "parts" / "part_locs.txt").write_text("".join(locations))
    for image_id, relative in images:
        write_image(str(root / "images" / relative), 40, 50, seed=image_id)
        mask = np.zeros((40, 50), np.uint8)
        mask[10 : 20 + image_id, 5:35] = 255
        path = root / "segmentations" / (os.path.splitext(relative)[0] + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(mask).save(path)
    return str(root)


def test_load_cub_and_pairs(cub_root):
    cub = load_cub(cub_root)
    assert [im["id"] for im in cub["images"]] == [1, 2, 3, 4, 5]
    assert cub["images"][1]["parts"] == {1: (7.0, 4.0), 2: (12.0, 8.0)}  # part 3 of image 2 is not visible
    assert cub["images"][0]["bbox"] == (2.0, 4.0, 23.0, 34.0)
    pairs = cub_pairs(cub)
    assert [p.name for p in pairs] == ["1-2", "2-3", "4-5"]
    assert pairs[0].keypoint_ids == [1, 2] and pairs[2].keypoint_ids == [2, 3]
    assert pairs[1].target_keypoints.tolist() == [[8.0, 4.0], [13.0, 8.0]]
    assert pairs[1].target_bbox == (2.0, 4.0, 25.0, 34.0)
    assert [im["id"] for im in load_cub(cub_root, categories=["Laysan_Albatross"])["images"]] == [4, 5]
    assert [im["id"] for im in load_cub(cub_root, limit=1)["images"]] == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="root"):
        load_cub(os.path.dirname(cub_root))


def test_cub_cosegmentation_jaccard_known_answers(cub_root):
    from cosegment.evaluation import read_mask

    cub = load_cub(cub_root)
    truth = FakePredictor(
        masks=lambda path: read_mask(path.replace("images", "segmentations").replace(".jpg", ".png"))
    )
    records = evaluate_cosegmentation(cub, truth.segment)
    assert len(records) == 5 and all(r["jaccard"] == 1.0 for r in records)
    assert [len(call) for call in truth.segment_calls] == [3, 2]  # one collection per category
    everything = FakePredictor(masks=lambda path: np.ones((40, 50), bool))
    records = evaluate_cosegmentation(cub, everything.segment)
    expected = [(10 + i) * 30 / (40 * 50) for i in range(1, 6)]
    assert [r["jaccard"] for r in records] == pytest.approx(expected)
    assert evaluate_cosegmentation(cub, FakePredictor(masks=None).segment) == []


def test_cub_command_with_fake_predictor(cub_root, tmp_path, capsys):
    args = argparse.Namespace(
        dataset="cub", root=cub_root, split="test", categories=None, limit=None, alpha=0.1, model="fake", seed=0,
        no_segmentation=False, out=None,
    )  # fmt: skip
    document = run(args, predictor=FakePredictor(shift=100.0, masks=None))
    assert document["summary"]["overall"]["pck_per_keypoint"] == 0.0
    assert document["summary"]["overall"]["jaccard"] is None
    assert document["notes"] == ["this cosegment version returns no masks: Jaccard not measured"]


# --- keypoint transfer from features ----------------------------------------------------------------------------------


def test_keypoint_tokens():
    tokens = keypoint_tokens([[0, 0], [99.9, 49.9], [50, 25], [-3, 200]], (50, 100), (5, 10))
    assert tokens.tolist() == [0, 49, 25, 40]


def test_transfer_keypoints_follows_planted_attention():
    h, w = 4, 6
    n = h * w
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(n) * 30.0
    queries = torch.stack([eye, eye])[:, None]  # (M=2, H=1, N, d=N): token p asks for feature p
    keys = torch.stack([torch.eye(n), torch.eye(n)[torch.argsort(permutation)]])[:, None]
    # In image 1, key of token permutation[p] is feature p: A_01[p] peaks at permutation[p].
    features = CoSegmentationFeatures([queries], [keys], (h, w), [(40, 60), (80, 30)])
    source_points = np.array([[5.0, 5.0], [55.0, 35.0], [31.0, 12.0]])  # tokens 0, 23, 9
    predicted = transfer_keypoints(features, 0, 1, source_points)
    expected_tokens = permutation[[0, 23, 9]]
    rows, cols = expected_tokens // w, expected_tokens % w
    expected = np.stack([(cols.numpy() + 0.5) * 30 / w, (rows.numpy() + 0.5) * 80 / h], axis=1)
    np.testing.assert_allclose(predicted, expected)
    assert transfer_keypoints(features, 0, 1, np.zeros((0, 2))).shape == (0, 2)


def test_pipeline_predictor_on_tiny_pipeline(tiny_pipe, tmp_path):
    write_image(str(tmp_path / "a.jpg"), 48, 64, seed=1)
    write_image(str(tmp_path / "b.jpg"), 80, 40, seed=2)
    pair = KeypointPair("p", "x", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), np.array([[3.0, 4.0], [60.0, 40.0]]),
                        np.zeros((2, 2)), (0, 0, 40, 80))  # fmt: skip
    predictor = PipelinePredictor(tiny_pipe, seed=1, height=64, width=64)
    first, second = predictor.transfer(pair), predictor.transfer(pair)
    assert first.shape == (2, 2) and np.array_equal(first, second)
    # Predictions are token centres of the 4 x 4 grid inside the 40 x 80 target.
    assert set(first[:, 0].tolist()) <= {5.0, 15.0, 25.0, 35.0} and set(first[:, 1].tolist()) <= {
        10.0,
        30.0,
        50.0,
        70.0,
    }
    assert not math.isnan(first.sum())


def test_eval_main_end_to_end_on_tiny_model(spair_root, tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "spair.json"
    code = main(["spair", spair_root, "--model", tiny_sd_path, "--limit", "1", "--height", "64", "--width", "64",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["summary"]["overall"]["pairs"] == 2 and saved["summary"]["overall"]["keypoints"] == 3
    assert "PCK@0.1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["spair", str(tmp_path), "--model", tiny_sd_path])


# --- a newcomer's mistakes: the dataset, its images and every option are checked before any model loads --------------

MISSING_MODEL = "/no/such/model-folder"


def eval_error(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as error:
        main(argv)
    return error.value.code, capsys.readouterr().err


def test_eval_mistakes_are_one_line_before_the_model_loads(spair_root, cub_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COSEGMENT_DEBUG", raising=False)
    model = ["--model", MISSING_MODEL]
    cases = [
        (["spair", str(tmp_path)] + model, "`root` '" + str(tmp_path) + "' has no SPair-71k annotations"),
        (["cub", spair_root] + model, "is not a CUB-200-2011 folder (no images.txt)"),
        (["spair", spair_root, "--limit", "0"] + model, "argument --limit: must be a positive int, got '0'"),
        (["spair", spair_root, "--alpha", "-1"] + model, "argument --alpha: must be a positive number, got '-1'"),
        (["spair", spair_root, "--height", "500"] + model, "`--height` must be a positive multiple of 64"),
        (["spair", spair_root, "--timestep", "-1"] + model, "`--timestep` must be an int in [0, 1000), got -1"),
        (["spair", spair_root, "--dtype", "half"] + model, "argument --dtype: invalid choice: 'half'"),
        (
            ["spair", spair_root, "--device", "tpu"] + model,
            "argument --device: must be auto, cpu, cuda, cuda:N or mps",
        ),
        (["spair", spair_root, "--categories", "horse"] + model, "`categories` ['horse'] match no pair"),
        (["spair", spair_root, "--out", spair_root] + model, "`--out` '" + spair_root + "' is a folder"),
    ]
    for argv, named in cases:
        code, err = eval_error(argv, capsys)
        assert code == 2 and err.startswith("cosegment-eval: error: ") and err.count("\n") == 1, err
        assert named in err and MISSING_MODEL not in err
    # an image the annotations name is missing
    os.remove(os.path.join(spair_root, "JPEGImages", "dog", "b3.jpg"))
    code, err = eval_error(["spair", spair_root] + model, capsys)
    assert code == 2 and "b3.jpg', which does not exist" in err and MISSING_MODEL not in err


def test_eval_model_that_cannot_load_is_one_line(spair_root, capsys, monkeypatch):
    monkeypatch.delenv("COSEGMENT_DEBUG", raising=False)
    code, err = eval_error(["spair", spair_root, "--model", MISSING_MODEL, "--quiet"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"could not load the model '{MISSING_MODEL}'" in err and "`--model FOLDER`" in err
    assert "python examples/make_tiny_pipeline.py tiny-sd/" in err
    monkeypatch.setenv("COSEGMENT_DEBUG", "1")
    code, err = eval_error(["spair", spair_root, "--model", MISSING_MODEL], capsys)
    assert code == 1 and "Traceback" in err


def test_eval_every_option_has_help_and_device_dtype_reach_the_pipeline(
    spair_root, tiny_sd_path, tmp_path, capsys, monkeypatch
):
    from cosegment.evaluation import build_parser
    from cosegment.utils import command_line

    loaded = []
    original = command_line.load_pipeline

    def recording_load(model, device, dtype=torch.float32, quiet=False):
        pipe = original(model, device, dtype, quiet)
        loaded.append((device, pipe.unet.dtype, quiet))
        return pipe

    monkeypatch.setattr(command_line, "load_pipeline", recording_load)

    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    assert {"--device", "--dtype", "--debug", "--quiet"} <= set(parser._option_string_actions)
    out = tmp_path / "bf16.json"
    argv = ["spair", spair_root, "--model", tiny_sd_path, "--limit", "1", "--height", "64", "--width", "64"]
    assert main(argv + ["--device", "cpu", "--dtype", "bfloat16", "--quiet", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bars, no library notices
    assert json.loads(out.read_text())["summary"]["overall"]["keypoints"] == 3
    assert loaded == [("cpu", torch.bfloat16, True)]


def test_cub_command_warns_when_every_mask_is_empty(cub_root, capsys):
    args = argparse.Namespace(
        dataset="cub", root=cub_root, split="test", categories=None, limit=None, alpha=0.1, model="fake", seed=0,
        no_segmentation=False, out=None, quiet=True,
    )  # fmt: skip
    document = run(args, predictor=FakePredictor(masks=lambda path: np.zeros((40, 50), bool)))
    assert document["summary"]["overall"]["jaccard"] == 0.0
    assert document["notes"] == [
        "every predicted mask is empty (no common foreground found): Jaccard is 0 wherever the truth is not"
    ]
    assert capsys.readouterr().err.count("warning: every predicted mask is empty") == 1
    full = run(args, predictor=FakePredictor(masks=lambda path: np.ones((40, 50), bool)))
    assert full["notes"] == [] and "warning" not in capsys.readouterr().err
