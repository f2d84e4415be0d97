"""A new user's first hour (issue 25): what a run leaves in `--out`, what it says, what it accepts."""

import json
import logging
import os
import signal

import numpy as np
import PIL.Image
import pytest
import torch

from cosegment.cli import build_parser, interrupt_message, main
from cosegment.cli_output import (
    MAX_ARRAY_MASK_PIXELS,
    _image_names,
    is_owned_file,
    remove_stale_outputs,
    results_arrays,
    write_mask_files,
)
from cosegment.cli_steps import log_outliers
from cosegment.runstate import RunInterrupted, forget_empty_state
from cosegment.utils.command_line import empty_results_warning, expand_images
from cosegment.utils.visualization import add_title, as_rgb_uint8, draw_correspondences, overlay_mask

MISSING_MODEL = "/no/such/model-folder"
SMALL = ["--height", "128", "--width", "128", "--no-filter", "--quiet"]


@pytest.fixture(scope="module")
def photo_folder(photos, tmp_path_factory):
    """The four photos as JPEGs in one folder, with a note that is not an image and a hidden file."""
    folder = tmp_path_factory.mktemp("photos")
    for name, photo in zip(("chelsea", "coffee", "astronaut", "rocket"), photos):
        PIL.Image.fromarray(photo).save(folder / f"{name}.jpg")
    (folder / "notes.md").write_text("not an image")
    (folder / ".hidden").write_text("")
    return folder


def _tree(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


# --- 1. a run owns its output folder ---------------------------------------------------------------------------------


def test_owned_names_and_stale_files_removal(tmp_path):
    for name in ("results.json", "pairs/pair_000_002.png", "images/image_003.png", "annotations.json"):
        assert is_owned_file(name)
    for name in ("notes.txt", "pairs/my_pair.png", "images/image_3.png", "resume/settings.json"):
        assert not is_owned_file(name)
    for name in (
        "results.json",
        "pairs/pair_000_001.png",
        "pairs/pair_002_003.png",
        "images/image_003.png",
        "annotations.json",
        "notes.txt",
        "pairs/mine.png",
        "resume/settings.json",
        "masks/mask_003.png",
    ):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    removed, foreign = remove_stale_outputs(str(tmp_path), ["results.json", "pairs/pair_000_001.png"])
    assert removed == ["annotations.json", "images/image_003.png", "masks/mask_003.png", "pairs/pair_002_003.png"]
    assert foreign == ["notes.txt", "pairs/mine.png"]  # named, never removed; resume/ is not looked at
    kept = ["notes.txt", "pairs/mine.png", "pairs/pair_000_001.png", "resume/settings.json", "results.json"]
    assert _tree(tmp_path) == sorted(kept)
    assert not (tmp_path / "images").exists() and not (tmp_path / "masks").exists()  # emptied by the removal


def test_second_run_into_the_same_folder_leaves_only_its_files(photo_folder, tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "r1"
    assert main([str(photo_folder), "--model", tiny_sd_path, "--out", str(out), *SMALL]) == 0
    assert "pairs/pair_002_003.png" in _tree(out) and "images/image_003.png" in _tree(out)
    (out / "annotations.json").write_text("{}")  # as an earlier `--export coco` run leaves it
    (out / "my notes.txt").write_text("mine")
    two = [str(photo_folder / "chelsea.jpg"), str(photo_folder / "coffee.jpg")]
    capsys.readouterr()
    assert main([*two, "--model", tiny_sd_path, "--out", str(out), *SMALL[:-1]]) == 0
    with open(out / "results.json") as handle:
        document = json.load(handle)
    outside = sorted(name for name in _tree(out) if not name.startswith("resume/"))
    assert outside == sorted(document["files"] + ["my notes.txt"])
    assert document["files"] == sorted(
        [
            "results.json",
            "results.safetensors",
            "pairs/pair_000_001.png",
            "images/image_000.png",
            "images/image_001.png",
            "masks/mask_000.png",
            "masks/mask_001.png",
            "masks/parts_000.png",
            "masks/parts_001.png",
            "index.html",  # the viewer (issue 24)
            "viewer/image_000.js",
            "viewer/image_001.js",
            "viewer/pair_000_001.js",
        ]
    )
    assert set(document["figures"]) <= set(document["files"])
    log = capsys.readouterr().err
    assert "removed 12 file(s) an earlier run left in" in log and "annotations.json" in log
    assert "left 1 file(s) in" in log and "my notes.txt" in log
    # 9. the image paths are relative to --out, disabled thresholds are null, passes named as correspondences are
    assert document["images"][0]["path"] == os.path.relpath(two[0], out)
    assert document["settings"]["analysis"]["max_entropy"] is None
    assert {"source_index", "target_index"} <= set(document["thresholds"][0]) and "source" not in document[
        "thresholds"
    ][0]


# --- 2. the picture helpers take what the pipeline takes -------------------------------------------------------------


def test_picture_helpers_take_pil_images_and_tensors(photos):
    photo = photos[0]
    pil = PIL.Image.fromarray(photo)
    assert np.array_equal(as_rgb_uint8(pil), photo)
    assert np.array_equal(as_rgb_uint8(pil.convert("L")), np.repeat(np.asarray(pil.convert("L"))[:, :, None], 3, 2))
    assert np.array_equal(as_rgb_uint8(torch.from_numpy(photo).permute(2, 0, 1)), photo)  # CHW, as the pipeline
    points = np.array([[10.0, 20.0], [30.0, 40.0]])
    from_pil = draw_correspondences(pil, PIL.Image.fromarray(photos[1]), points, points)
    assert np.array_equal(from_pil, draw_correspondences(photo, photos[1], points, points))
    mask = np.zeros(photo.shape[:2], dtype=bool)
    assert np.array_equal(overlay_mask(pil, mask), overlay_mask(photo, mask))
    with pytest.raises(TypeError, match="PIL image, a numpy array or a torch tensor, got list"):
        as_rgb_uint8([[0]], "image_a")


# --- 3. folders, globs and lists of images --------------------------------------------------------------------------


def test_folders_globs_and_list_files(photo_folder, tmp_path):
    names = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    paths, notes = expand_images([str(photo_folder)])
    assert paths == [str(photo_folder / name) for name in names]  # sorted, non-recursive, hidden files unnamed
    assert notes == [f"folder {str(photo_folder)!r}: 4 image(s), skipped 'notes.md'"]
    paths, notes = expand_images([str(photo_folder / "c*.jpg")])
    assert paths == [str(photo_folder / "chelsea.jpg"), str(photo_folder / "coffee.jpg")]
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# my photos\n\n{os.path.relpath(photo_folder / 'rocket.jpg', tmp_path)}\n  {photo_folder / 'coffee.jpg'}  \n"
    )
    paths, notes = expand_images([str(photo_folder / "coffee.jpg"), str(listing)])  # relative to the list's folder
    assert [os.path.basename(p) for p in paths] == ["coffee.jpg", "rocket.jpg"]
    assert notes[-1] == "1 image(s) already named, not added again"
    assert expand_images([str(listing)] * 2)[0] == paths[::-1]  # a list given twice adds its images once
    same = str(photo_folder / "coffee.jpg")
    assert expand_images([same, same])[0] == [same, same]  # a file named twice: twice, as asked
    assert os.path.samefile(paths[1], photo_folder / "rocket.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.csv").write_text("1")
    with pytest.raises(ValueError, match=r"the folder holds no image file .*; it holds 'a.csv'"):
        expand_images([str(empty)])
    with pytest.raises(ValueError, match=r"the glob holds no image file"):
        expand_images([str(tmp_path / "*.png")])
    listing.write_text("missing.jpg\n")
    with pytest.raises(ValueError, match=r"listed in .*missing.jpg': no such file"):
        expand_images([str(listing)])


def test_a_folder_is_a_run_and_broken_images_are_all_named(photo_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.png"):
        (broken / name).write_text("not an image")
    with pytest.raises(SystemExit) as error:
        main([str(broken), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "2 file(s) cannot be read as images: " in err and "b.png" in err
    assert "--debug" not in err and not (tmp_path / "out").exists()


# --- 4. interrupt lines ----------------------------------------------------------------------------------------------


def test_interrupt_line_says_what_was_kept(tmp_path):
    stop = RunInterrupted(signal.SIGINT)
    assert interrupt_message(stop, str(tmp_path)) == (
        "interrupted by SIGINT before anything was kept for --resume; run the same command to start again"
    )
    (tmp_path / "resume" / "pairs").mkdir(parents=True)
    (tmp_path / "resume" / "features").mkdir()
    (tmp_path / "resume" / "features" / "images-00000000-00000007.safetensors").write_bytes(b"x")  # a batch
    (tmp_path / "resume" / "pairs" / "pair_000_001.safetensors").write_bytes(b"x")
    assert interrupt_message(stop, str(tmp_path)) == (
        f"interrupted by SIGINT: kept the features and 1 pair analysis in {tmp_path / 'resume'}; run the same "
        "command with --resume to continue"
    )


# --- 5. outliers named -----------------------------------------------------------------------------------------------


def test_outliers_are_logged_by_file_name_and_labelled_in_pictures(caplog):
    class Output:
        outliers = np.array([False, False, True, True])

    paths = ["photos/a.jpg", "photos/b.jpg", "photos/c.jpg", "photos/d.jpg"]
    with caplog.at_level(logging.INFO, logger="cosegment.cli"):
        log_outliers(Output(), paths)
    assert "outliers: c.jpg (2), d.jpg (3) share nothing with the other images" in caplog.text
    document = {"images": [{"path": "../" + p} for p in paths], "outliers": [False, False, True, True]}
    assert _image_names(document) == ["a.jpg", "b.jpg", "c.jpg (outlier)", "d.jpg (outlier)"]
    assert _image_names({"images": [{"path": "x/a.png"}], "outliers": None}) == ["a.png"]
    wide = add_title(np.zeros((10, 200, 3), np.uint8), "a long title " * 10)  # smaller type, same band
    assert wide.shape == (28, 200, 3)


# --- 6. large masks stay small in results.safetensors ----------------------------------------------------------------


def test_large_masks_are_stored_compactly(tmp_path):
    height, width = 4000, 6000  # a 24 MP photo
    mask = np.zeros((height, width), dtype=bool)
    mask[1000:3000, 1500:4500] = True
    parts = mask.astype(np.int32) * 3

    class Output:
        correspondences = []
        density_maps, entropy_maps, inverse_error_maps = (np.zeros((1, 8, 8), np.float32) for _ in range(3))
        masks, part_masks, keypoints, keypoint_parts = [mask], [parts], None, None

    arrays = results_arrays(Output())
    assert arrays["masks.0"].dtype == torch.bool and arrays["part_masks.0"].dtype == torch.uint8
    stored = arrays["masks.0"].shape
    assert stored[0] * stored[1] <= MAX_ARRAY_MASK_PIXELS and abs(stored[1] / stored[0] - 1.5) < 0.01
    from cosegment.utils.files import save_safetensors

    save_safetensors(arrays, str(tmp_path / "results.safetensors"))
    assert os.path.getsize(tmp_path / "results.safetensors") < 10e6  # 120 MB at full resolution in int32 + bool
    document = {"masks": [{}], "parts": [[]]}
    written = write_mask_files(Output(), str(tmp_path), document)
    assert written == ["masks/mask_000.png", "masks/parts_000.png"]
    assert document["masks"][0] == {"file": "masks/mask_000.png", "array_size": list(stored)}
    with PIL.Image.open(tmp_path / "masks/mask_000.png") as image:
        assert image.mode == "1" and np.array_equal(np.asarray(image), mask)
    with PIL.Image.open(tmp_path / "masks/parts_000.png") as image:
        assert image.mode == "P" and np.array_equal(np.asarray(image), parts)
    assert sum(os.path.getsize(tmp_path / name) for name in written) < 1e6
    small = np.ones((300, 400), dtype=bool)  # small images: full resolution, as before
    Output.masks, Output.part_masks = [small], [small.astype(np.int32)]
    assert load_file_shapes(results_arrays(Output())) == {"masks.0": (300, 400), "part_masks.0": (300, 400)}


def load_file_shapes(arrays) -> dict:
    return {name: tuple(value.shape) for name, value in arrays.items() if "masks" in name}


# --- 7, 8. errors: the most specific first, --debug only where it shows more, nothing left behind ------------------


def test_missing_file_is_named_before_missing_out(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main([str(tmp_path / "missing.jpg")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "missing.jpg': no such file" in err and "--out" not in err
    assert "--debug" not in err
    photo = tmp_path / "a.png"
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(SystemExit) as error:
        main([str(photo), str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "`--out` is required" in err and "--debug" not in err


def test_failed_model_load_leaves_the_folder_as_it_was(image_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("COSEGMENT_DEBUG", raising=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as error:
        main(image_files[:2] + ["--model", "nobody/no-such-model", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert error.value.code == 1 and not out.exists() and err.count("\n") == 1 and len(err) < 600
    # an earlier run's resume state stays as it was
    (out / "resume" / "pairs").mkdir(parents=True)
    (out / "resume" / "settings.json").write_text('{"format": "cosegment.run/1", "settings": {}}')
    (out / "resume" / "pairs" / "pair_000_001.safetensors").write_bytes(b"x")
    before = {name: (out / name).read_bytes() for name in _tree(out)}
    with pytest.raises(SystemExit):
        main(image_files[:2] + ["--model", MISSING_MODEL, "--out", str(out), "--quiet"])
    assert {name: (out / name).read_bytes() for name in _tree(out)} == before


def test_forget_empty_state_keeps_kept_files(tmp_path):
    (tmp_path / "resume" / "pairs").mkdir(parents=True)
    (tmp_path / "resume" / "settings.json").write_text("{}")
    assert len(forget_empty_state(tmp_path, remove_out=True)) == 4 and not tmp_path.exists()
    (tmp_path / "resume" / "pairs").mkdir(parents=True)
    (tmp_path / "resume" / "settings.json").write_text("{}")
    (tmp_path / "resume" / "features").mkdir()
    (tmp_path / "resume" / "features" / "images-00000000-00000007.safetensors").write_bytes(b"x")  # a batch
    assert forget_empty_state(tmp_path, remove_out=True) == [] and (tmp_path / "resume" / "settings.json").exists()


@pytest.fixture()
def image_files(photos, tmp_path):
    paths = []
    for i, photo in enumerate(photos[:2]):
        paths.append(str(tmp_path / f"photo_{i}.png"))
        PIL.Image.fromarray(photo[:64, :64]).save(paths[-1])
    return paths


# --- 9. the smaller things -------------------------------------------------------------------------------------------


def test_help_shows_every_default():
    text = build_parser().format_help()
    for option in ("--top-k", "--figure-size", "--ensemble-size", "--attention-layers"):
        entry = text[text.index(f"\n  {option}") :].split("\n  -")[1]
        assert "(default" in " ".join(entry.split()), entry


def test_empty_results_warning_names_the_other_preset():
    class Output:
        correspondences = []
        masks = [np.zeros((4, 4), bool)]

    assert "`--selection paper` for the other preset" in empty_results_warning(Output(), selection="auto")
    assert "`--selection auto` for the other preset" in empty_results_warning(Output(), selection="paper")
    assert "--selection auto`" not in empty_results_warning(Output())
