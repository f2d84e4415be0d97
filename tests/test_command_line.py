"""What the commands share (`cosegment.utils.command_line`, `cosegment.utils.files`): checks before loading, one-line
errors, the device option, the model-load message, the empty-result warning, process counts, file modes, the wheel."""

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cosegment
from cosegment.utils.command_line import (
    ArgumentParser,
    ModelLoadError,
    check_capture_arguments,
    check_output_file,
    check_output_folder,
    empty_results_warning,
    launch_num_processes,
    model_limits,
    model_load_message,
    process_count_warning,
    read_image,
    resolve_device,
    run_command,
    threshold_overrides,
)
from cosegment.utils.files import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cosegment.__file__)))


def child_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    return env


# --- device -----------------------------------------------------------------------------------------------------------


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"`--device` 'cuda'.*sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="`--device` must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"`--device` 'cuda:2': torch sees 2 CUDA GPU"):
        resolve_device("cuda:2")


# --- checks before loading --------------------------------------------------------------------------------------------


def write_config(folder: Path, relative: str, config: dict) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))


def test_model_limits_read_the_folder_configs(tmp_path, tiny_sd_path):
    # The tiny SD pipeline: a VAE with 4 levels (scale 8) and 4 UNet levels (3 downsamplings): 64, like SD.
    assert model_limits(tiny_sd_path) == {"size_multiple": 64, "num_train_timesteps": 1000}
    write_config(tmp_path, "unet/config.json", {"down_block_types": ["A", "B"]})
    write_config(tmp_path, "vae/config.json", {"block_out_channels": [8, 8, 8]})
    write_config(tmp_path, "scheduler/scheduler_config.json", {"num_train_timesteps": 500})
    assert model_limits(str(tmp_path)) == {"size_multiple": 4 * 2, "num_train_timesteps": 500}
    check_capture_arguments(str(tmp_path), 16, 24, 499)
    with pytest.raises(ValueError, match=r"`--height` must be a positive multiple of 8 for this model, got 12"):
        check_capture_arguments(str(tmp_path), 12, 24, 0)
    with pytest.raises(ValueError, match=r"`--timestep` must be an int in \[0, 500\), got 500"):
        check_capture_arguments(str(tmp_path), None, None, 500)
    # No config on this machine: Stable Diffusion's values.
    assert model_limits(str(tmp_path / "missing")) == {"size_multiple": 64, "num_train_timesteps": 1000}
    with pytest.raises(ValueError, match=r"`--width` must be a positive multiple of 64 for this model, got 500"):
        check_capture_arguments("nobody/no-such-model", None, 500, 0)
    with pytest.raises(ValueError, match=r"`--attention-layers` '\(' is not a valid regex"):
        check_capture_arguments("nobody/no-such-model", None, None, 0, "(")


def test_read_image_and_output_checks(tmp_path):
    with pytest.raises(ValueError, match=r"`image_a` '.*missing.jpg': no such file"):
        read_image(str(tmp_path / "missing.jpg"), "image_a")
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        read_image(str(tmp_path), "image_a")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"`image_b` '.*notes.jpg' cannot be read as an image"):
        read_image(str(text), "image_b")
    with pytest.raises(ValueError, match=r"`--out` '.*notes.jpg' is a file, not a folder"):
        check_output_folder(str(text))
    check_output_folder(str(tmp_path / "new" / "deeper"))  # created later: fine
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        check_output_file(str(tmp_path))


def test_threshold_overrides():
    args = argparse.Namespace(max_entropy=3.0, max_spread=None, max_collapse=None, max_inverse_error=None)
    assert threshold_overrides(args) == {"max_entropy": 3.0}
    args.no_filter = True
    inf = float("inf")
    assert threshold_overrides(args) == {
        "max_entropy": 3.0,
        "max_spread": inf,
        "max_collapse": inf,
        "max_inverse_error": inf,
    }


# --- errors -----------------------------------------------------------------------------------------------------------


def test_model_load_message_names_the_model_and_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = model_load_message("nobody/no-such-model", OSError("not cached"))
    assert "'nobody/no-such-model'" in hub and "could not be downloaded (HF_HUB_OFFLINE is set)" in hub
    assert "--model FOLDER" in hub and "python examples/make_tiny_pipeline.py" in hub and "\n" not in hub
    assert "no folder '/no/such/folder'" in model_load_message("/no/such/folder", ValueError("x"))
    assert "could not be downloaded" not in model_load_message("/no/such/folder", ValueError("x"))
    folder = model_load_message(str(tmp_path), OSError("no model_index.json"))
    assert "is not a diffusers pipeline" in folder and "[OSError: no model_index.json]" in folder
    long = model_load_message("x", OSError("y" * 1000))  # the reason comes last: the line is cut there
    assert long.index("--model FOLDER") < long.index("[OSError")


def test_long_errors_are_cut_at_a_word_boundary_and_debug_shows_all():
    from cosegment.utils.command_line import MAX_ERROR_LENGTH, error_line, shorten

    assert shorten("a  b\n c") == "a b c"
    text = " ".join(f"word{i:03d}" for i in range(200))  # 1599 characters
    short = shorten(text, 50, " ...")
    assert short == "word000 word001 word002 word003 word004 ..." and len(short) <= 50
    line = error_line(ModelLoadError(text), debug=False)
    assert line.endswith(" ... (--debug shows the full message)") and len(line) < MAX_ERROR_LENGTH + 40
    assert line.split(" ... ")[0] in text and line.split(" ... ")[0].split()[-1] in text.split()  # whole words
    assert error_line(ModelLoadError(text), debug=True) == text
    usage = ValueError("`--x` must be positive, got -1.")
    usage.input_error = True
    assert error_line(usage, debug=False) == "`--x` must be positive, got -1."  # no --debug for input mistakes
    assert error_line(ValueError("deep"), debug=False) == "deep (--debug shows the traceback)"  # unexpected


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--fail", default="")
    return parser


def _failing_run(args):
    if args.fail == "value":
        raise ValueError("`--x` must be positive, got -1.")
    if args.fail == "model":
        raise ModelLoadError("could not load the model 'm'")
    if args.fail == "bug":
        raise KeyError("a bug")


def test_run_command_prints_one_line_and_traceback_on_request(capsys, monkeypatch):
    monkeypatch.delenv("COSEGMENT_DEBUG", raising=False)
    assert run_command(_parser(), _failing_run, []) == 0
    for fail, status in (("value", 2), ("model", 1)):
        with pytest.raises(SystemExit) as error:
            run_command(_parser(), _failing_run, ["--fail", fail])
        assert error.value.code == status
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tool: error: ") and "Traceback" not in err
        assert ("--debug shows the traceback" in err) == (fail == "value")  # an unexpected ValueError only
    with pytest.raises(SystemExit):
        run_command(_parser(), _failing_run, ["--fail", "value", "--debug"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("tool: error: `--x` must be positive, got -1.")
    monkeypatch.setenv("COSEGMENT_DEBUG", "1")
    with pytest.raises(SystemExit):
        run_command(_parser(), _failing_run, ["--fail", "model"])
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug is not a user mistake: its traceback propagates
        run_command(_parser(), _failing_run, ["--fail", "bug"])
    with pytest.raises(SystemExit) as error:  # argparse's own mistakes: one line too, no usage block
        run_command(_parser(), _failing_run, ["--nope"])
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments: --nope" in err


# --- results ----------------------------------------------------------------------------------------------------------


def fake_output(matches: list[int], masks: list[bool] | None):
    pairs = [np.zeros((k, 2)) for k in matches]  # anything with len() stands for a PairCorrespondence
    mask_list = None if masks is None else [np.full((3, 3), value) for value in masks]
    return SimpleNamespace(correspondences=pairs, masks=mask_list)


def test_empty_results_warning():
    assert empty_results_warning(fake_output([0, 4, 0], [False, True, False])) is None
    message = empty_results_warning(fake_output([0, 0, 0], [False, False, False]))
    assert message.startswith("every pair kept 0 matches and every mask is empty")
    assert "--no-filter" in message and "--selection" in message and "tiny random test pipeline" in message
    masks_only = empty_results_warning(fake_output([2, 0, 1], [False, False, False]))
    assert masks_only.startswith("every mask is empty") and "0 matches" not in masks_only
    assert empty_results_warning(fake_output([0], None)).startswith("every pair kept 0 matches:")
    unfiltered = empty_results_warning(fake_output([0], None), filtered=False)
    assert "--no-filter" not in unfiltered and "--height" in unfiltered


def test_launch_num_processes_and_the_warning():
    assert launch_num_processes(["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]) == 2
    assert launch_num_processes(["/v/bin/python", "/v/bin/accelerate", "launch", "--num-processes=3", "a.py"]) == 3
    assert launch_num_processes(["/v/bin/python", "/v/bin/accelerate", "launch", "a.py"]) is None
    assert launch_num_processes(["/v/bin/python", "/v/bin/accelerate", "config", "--num_processes", "2"]) is None
    assert launch_num_processes(["python", "a.py", "--num_processes", "2"]) is None
    warning = process_count_warning(1, requested=2)
    assert "asked for 2 processes but started 1" in warning and "--multi_gpu --num_processes 2" in warning
    assert process_count_warning(2, requested=2) is None and process_count_warning(1, requested=1) is None


def test_requested_processes_reads_the_parent_command_line():
    """A parent process whose command line reads like `accelerate launch --num_processes 3` (its arguments after
    `-c CODE` are `accelerate launch --num_processes 3`)."""
    if not os.path.exists(f"/proc/{os.getpid()}/cmdline"):
        pytest.skip("no /proc: the parent's command line cannot be read here")
    child = "from cosegment.utils.command_line import requested_processes; print(requested_processes())"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    result = subprocess.run(
        [sys.executable, "-c", parent, "accelerate", "launch", "--num_processes", "3"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "3"


# --- files ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_save_safetensors_follows_the_umask(tmp_path, umask):
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "ours.safetensors", metadata={"k": "v"})
        (tmp_path / "text.json").write_text("{}")
    finally:
        os.umask(previous)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    # what safetensors itself writes, the reason for the helper: 0o600 (older safetensors followed the umask)
    assert mode("plain.safetensors") in (0o600, 0o666 & ~umask)
    assert mode("ours.safetensors") == mode("text.json") == 0o666 & ~umask


def test_features_save_follows_the_umask(tiny_pipe, photos, tmp_path):
    features = tiny_pipe.capture_features(photos[:2], height=64, width=64, generator=torch.Generator().manual_seed(0))
    previous = os.umask(0o022)
    try:
        features.save(tmp_path / "features.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "features.safetensors").stat().st_mode & 0o777 == 0o644


# --- a command prints only its own lines ------------------------------------------------------------------------------


def test_import_prints_nothing():
    """`import cosegment` is silent (transformers' "requires torchvision" notice came from importing
    `CLIPImageProcessor`; diffusers' Stable Diffusion module imports `SiglipImageProcessor` while a model loads)."""
    result = subprocess.run(
        [sys.executable, "-c", "import cosegment"], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr


# --- the wheel --------------------------------------------------------------------------------------------------------


def test_wheel_holds_the_package_only(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PIP_NO_INDEX="1"),
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("diffusers_cosegment-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {n for n in names if n.endswith(".py")}
    assert "cosegment/conftest.py" not in modules and "cosegment/setup.py" not in modules
    assert {"cosegment/__init__.py", "cosegment/cli.py", "cosegment/testing.py", "cosegment/utils/files.py"} <= modules
    assert not any(n.startswith(("tests/", "cosegment/tests/", "examples/", "cosegment/examples/")) for n in names)
