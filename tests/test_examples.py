"""The README's main job, `examples/cosegment_pair.py`, run as a newcomer runs it (against a saved tiny pipeline)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cosegment_pair_writes_pictures(tiny_sd_path, photos, tmp_path):
    a, b = tmp_path / "A.jpg", tmp_path / "B.jpg"
    PIL.Image.fromarray(photos[0]).save(a)
    PIL.Image.fromarray(photos[1]).save(b)
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cosegment_pair.py"), str(a), str(b), "--out", str(out)]
        + ["--model", tiny_sd_path, "--no-filter", "--top-k", "20"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = np.asarray(PIL.Image.open(out / "correspondences.png"))
    h0, w0 = photos[0].shape[:2]
    h1, w1 = photos[1].shape[:2]
    # a title band on top of the two images side by side (8 px gap)
    assert lines.shape[1] == w0 + 8 + w1 and lines.shape[0] > max(h0, h1)
    # lines are drawn across the white gap between the images
    band = lines[-max(h0, h1) :, w0 : w0 + 8]
    assert (band != 255).any()
    maps = np.asarray(PIL.Image.open(out / "maps.png"))
    # per image a row: its label (A or B and the file name, 18 px), the panel titles (18 px), the image, its colour
    # bars (44 px), then 8 px of white
    assert maps.shape[0] == (36 + h0 + 44 + 8) + (36 + h1 + 44 + 8) and maps.shape[1] >= 3 * max(w0, w1)
    assert (maps[:18, :120] < 100).any() and (maps[:18, 120:] == 255).all()  # row A's label band: "A: A.jpg" only
    bar = maps[36 + h0 + 2 + 5, 4 : w0 - 4].astype(int)  # the first image's hit-count colour bar: blue to red
    assert bar[0, 2] > 100 and bar[0, 0] < 60 and bar[-1, 0] > 100 and bar[-1, 2] < 60
    segmentation = np.asarray(PIL.Image.open(out / "segmentation.png"))
    # mask and parts panels with their legends (one 20 px row each at these widths)
    assert segmentation.shape[0] == (36 + h0 + 20 + 8) + (36 + h1 + 20 + 8)
    legend = segmentation[36 + h0 + 3 : 36 + h0 + 13, 3:13].reshape(-1, 3)  # the mask legend's first swatch
    assert (legend == [0, 200, 0]).all(axis=1).mean() > 0.5
    assert result.stdout.count("wrote") == 3
    assert "requires torchvision" not in result.stderr and "float32" not in result.stderr
    # labelled progress bars
    assert "capture (UNet batches)" in result.stderr and "pair analysis (pairs)" in result.stderr


def run_example(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cosegment_pair.py")] + args,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", COSEGMENT_DEBUG=""),
        timeout=300,
    )


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cosegment_pair_mistakes_are_one_line_before_loading(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COSEGMENT_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = load_example("cosegment_pair")
    a = tmp_path / "A.jpg"
    PIL.Image.fromarray(photos[0]).save(a)
    text = tmp_path / "B.jpg"
    text.write_text("not an image")
    missing_model = str(tmp_path / "no-such-model")

    def run(args: list[str]) -> tuple[int, str]:
        with pytest.raises(SystemExit) as error:
            example.main(args + ["--model", missing_model, "--out", str(tmp_path / "out")])
        return error.value.code, capsys.readouterr().err

    for args, named in (
        ([str(a), str(tmp_path / "nope.jpg")], "`image_b` '" + str(tmp_path / "nope.jpg") + "': no such file"),
        ([str(a), str(text)], "cannot be read as an image"),
        ([str(a), str(tmp_path)], "is a folder, not an image file"),
        ([str(a), str(a), "--height", "500"], "`--height` must be a positive multiple of 64 for this model, got 500"),
        ([str(a), str(a), "--selection", "strict"], "argument --selection: invalid choice: 'strict'"),
        ([str(a), str(a), "--device", "gpu"], "argument --device: must be auto, cpu, cuda, cuda:N or mps"),
    ):
        code, err = run(args)
        assert code == 2 and err.count("\n") == 1 and named in err and missing_model not in err, err
    code, err = run([str(a), str(a)])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"could not load the model '{missing_model}'" in err
    assert "`--model FOLDER`" in err and "python examples/make_tiny_pipeline.py" in err
    code, err = run([str(a), str(a), "--debug"])
    assert code == 1 and "Traceback" in err
    assert not (tmp_path / "out").exists()


def test_cosegment_pair_warns_when_nothing_is_kept(tiny_sd_path, photos, tmp_path):
    a, b = tmp_path / "A.jpg", tmp_path / "B.jpg"
    PIL.Image.fromarray(photos[0]).save(a)
    PIL.Image.fromarray(photos[1]).save(b)
    result = run_example([str(a), str(b), "--model", tiny_sd_path, "--out", str(tmp_path / "out"), "--quiet"]
                         + ["--height", "64", "--width", "64", "--selection", "paper"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # the tiny random UNet keeps nothing under the note's thresholds at a 4 x 4 grid
    assert result.stderr.count("warning: every pair kept 0 matches") == 1, result.stderr
    assert "`--no-filter`" in result.stderr


# --- examples/repaint_background.py (issue 28): co-segment, then repaint with the same weights ----------------------


@pytest.fixture(scope="module")
def repaint_images(photos, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("repaint-images")
    paths = []
    for name, photo in zip(("cat", "coffee", "astronaut"), photos):
        paths.append(str(folder / f"{name}.png"))
        PIL.Image.fromarray(photo[:90, :121]).save(paths[-1])
    return paths


def test_repaint_background_skips_empty_masks_or_repaints_all(tiny_sd_path, repaint_images, tmp_path, capsys):
    example = load_example("repaint_background")
    common = ["--prompt", "a beach", "--model", tiny_sd_path, "--steps", "2", "--size", "64", "--quiet"]
    # the tiny random model finds no common object at its default size: every image is skipped, saying why
    assert example.main(repaint_images + common + ["--out", str(tmp_path / "skip")]) == 0
    out = capsys.readouterr().out
    assert out.count("the co-segmentation found no common object in it") == 3 and "wrote" not in out
    assert os.listdir(tmp_path / "skip") == []
    # the explicit fallback repaints every image whole, at its own size
    assert example.main(repaint_images + common + ["--out", str(tmp_path / "all"), "--if-empty", "whole"]) == 0
    out = capsys.readouterr().out
    assert out.count("(100% repainted)") == 3
    for index, path in enumerate(repaint_images):
        stem = f"{index}_{os.path.splitext(os.path.basename(path))[0]}"
        painted = np.asarray(PIL.Image.open(tmp_path / "all" / f"{stem}_repainted.png"))
        original = np.asarray(PIL.Image.open(path))
        assert painted.shape == original.shape == (90, 121, 3) and not np.array_equal(painted, original)
        assert (np.asarray(PIL.Image.open(tmp_path / "all" / f"{stem}_mask.png")) == 255).all()


def test_repaint_background_mistakes_are_one_line_before_loading(repaint_images, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COSEGMENT_DEBUG", raising=False)
    example = load_example("repaint_background")
    missing_model = str(tmp_path / "no-such-model")
    for args, named in (
        ([repaint_images[0]], "`IMAGE` must name 2 or more files, got 1"),
        ([repaint_images[0], str(tmp_path / "nope.png")], "no such file"),
        (repaint_images[:2] + ["--repaint", "sky"], "argument --repaint: invalid choice: 'sky'"),
        (repaint_images[:2] + ["--grow", "-1"], "argument --grow: must be an int >= 0"),
    ):
        with pytest.raises(SystemExit) as error:
            example.main(args + ["--prompt", "x", "--model", missing_model, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert error.value.code == 2 and err.count("\n") == 1 and named in err and missing_model not in err, err
    assert not (tmp_path / "out").exists()
