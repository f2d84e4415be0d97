"""The `cosegment` command: work split, per-pair analysis, files, pictures, and 2 processes == 1 process."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import NO_FILTER, assert_same_contents
from safetensors.torch import load_file

import cosegment
from cosegment.cli import all_pairs, capture_shares, main, pair_shares

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cosegment.__file__)))
NO_FILTER_FLAGS = [
    "--max-entropy",
    "inf",
    "--max-spread",
    "inf",
    "--max-collapse",
    "inf",
    "--max-inverse-error",
    "inf",
]


def child_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize(
    "num_images, batch_size, processes, expected",
    [
        (4, 2, 2, [[0, 1], [2, 3]]),
        (5, 2, 2, [[0, 1, 2, 3, 4], []]),  # the last batch alone would be a 1-image share
        (7, 2, 2, [[0, 1, 2, 3], [4, 5, 6]]),
        (3, 1, 2, [[0, 1, 2], []]),
        (2, 8, 3, [[0, 1], [], []]),
        (9, 3, 1, [list(range(9))]),
    ],
)
def test_capture_shares_examples(num_images, batch_size, processes, expected):
    assert capture_shares(num_images, batch_size, processes) == expected


@pytest.mark.parametrize("num_images", [2, 3, 5, 8, 13])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_capture_shares_cover_whole_batches(num_images, batch_size, processes):
    shares = capture_shares(num_images, batch_size, processes)
    assert len(shares) == processes
    assert sorted(i for share in shares for i in share) == list(range(num_images))
    for share in shares:
        assert len(share) != 1
        assert share == sorted(share)
        if share:  # starts at a batch boundary and is made of whole batches (or ends the collection)
            assert share[0] % batch_size == 0
            assert (share[-1] + 1) % batch_size == 0 or share[-1] == num_images - 1
            assert share == list(range(share[0], share[-1] + 1))


def test_capture_shares_errors():
    with pytest.raises(ValueError, match="num_images"):
        capture_shares(1, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        capture_shares(4, 0, 2)


def test_pair_shares_partition_pairs():
    shares = pair_shares(5, 3)
    assert sorted(p for share in shares for p in share) == all_pairs(5)
    assert [len(s) for s in shares] == [4, 3, 3]


@pytest.fixture(scope="module")
def small_features(tiny_pipe, photos):
    return tiny_pipe.capture_features(
        photos, height=64, width=128, batch_size=2, generator=torch.Generator().manual_seed(5)
    )


def test_capture_features_image_indices_match_full_run(tiny_pipe, photos, small_features):
    share = tiny_pipe.capture_features(
        photos, height=64, width=128, batch_size=2, generator=torch.Generator().manual_seed(5), image_indices=[2, 3]
    )
    assert share.num_images == 2
    assert share.image_sizes == [small_features.image_sizes[2], small_features.image_sizes[3]]
    for full, part in zip(small_features.queries + small_features.keys, share.queries + share.keys):
        assert torch.equal(full[2:4], part)
    for bad in ([3], [2, 1], [0, 9], [0, 0]):
        with pytest.raises(ValueError, match="image_indices"):
            tiny_pipe.capture_features(photos, height=64, width=64, image_indices=bad)


def test_prepare_noise_slice_is_the_full_draw(tiny_pipe):
    cpu = torch.device("cpu")  # older diffusers' `randn_tensor` needs a `torch.device`, not a string
    full = tiny_pipe.prepare_noise(4, 2, (4, 8, 8), torch.Generator().manual_seed(1), cpu, torch.float32)
    part = tiny_pipe.prepare_noise(4, 2, (4, 8, 8), torch.Generator().manual_seed(1), cpu, torch.float32, [1, 3])
    assert part.shape == (4, 4, 8, 8)
    assert torch.equal(part[:2], full[2:4]) and torch.equal(part[2:], full[6:8])


@pytest.fixture(scope="module")
def image_files(photos, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, photo in enumerate(photos):
        path = str(folder / f"photo_{i}.png")
        PIL.Image.fromarray(photo).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cli_run(image_files, tiny_sd_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli-out"))
    args = image_files[:3] + [
        "--model",
        tiny_sd_path,
        "--out",
        out,
        "--seed",
        "7",
        "--height",
        "128",
        "--width",
        "128",
    ]
    assert main(args + NO_FILTER_FLAGS + ["--top-k", "5"]) == 0
    return out, args


def test_cli_results_match_the_pipeline(cli_run, tiny_pipe, photos):
    out, _ = cli_run
    with open(os.path.join(out, "results.json")) as handle:
        document = json.load(handle)
    expected = tiny_pipe(
        image=photos[:3], height=128, width=128, generator=torch.Generator().manual_seed(7), **NO_FILTER
    )
    assert document["format"] == "cosegment.results/1"
    assert document["versions"]["cosegment"] == cosegment.__version__
    assert document["settings"]["seed"] == 7 and document["settings"]["height"] == 128
    assert document["grid_size"] == [8, 8]
    assert [(im["height"], im["width"]) for im in document["images"]] == [p.shape[:2] for p in photos[:3]]
    assert len(document["correspondences"]) == 3
    for pair, theirs in zip(document["correspondences"], expected.correspondences):
        assert (pair["source_index"], pair["target_index"]) == (theirs.source_index, theirs.target_index)
        assert pair["num_matches"] == len(theirs) > 0
        assert np.array_equal(np.array(pair["source_points"], np.float32), theirs.source_points)
        assert np.array_equal(np.array(pair["target_points"], np.float32), theirs.target_points)
        assert np.array_equal(np.array(pair["scores"], np.float32), theirs.scores)
        assert pair["mutual"] == theirs.mutual.tolist()
    arrays = load_file(os.path.join(out, "results.safetensors"))
    assert np.array_equal(arrays["density_maps"].numpy(), expected.density_maps)
    assert np.array_equal(arrays["entropy_maps"].numpy(), expected.entropy_maps)
    assert np.array_equal(arrays["pairs.0.2.target_tokens"].numpy(), expected.correspondences[1].target_tokens)
    assert len(document["parts"]) == 3
    for i in range(3):
        assert np.array_equal(arrays[f"part_masks.{i}"].numpy(), expected.part_masks[i])


def test_cli_pictures(cli_run, photos):
    out, _ = cli_run
    with open(os.path.join(out, "results.json")) as handle:
        figures = json.load(handle)["figures"]
    assert figures[:3] == ["pairs/pair_000_001.png", "pairs/pair_000_002.png", "pairs/pair_001_002.png"]
    assert figures[3:6] == ["images/image_000.png", "images/image_001.png", "images/image_002.png"]
    pair = np.asarray(PIL.Image.open(os.path.join(out, figures[0])))
    scale = [min(1.0, 384 / max(p.shape[:2])) for p in photos[:2]]
    widths = [round(p.shape[1] * s) for p, s in zip(photos[:2], scale)]
    heights = [round(p.shape[0] * s) for p, s in zip(photos[:2], scale)]
    # two title bands (18 px each: the files, then the matches) + the images side by side
    assert pair.shape == (max(heights) + 36, widths[0] + 8 + widths[1], 3)
    panel = np.asarray(PIL.Image.open(os.path.join(out, figures[3])))
    # the image's title band (18 px: index and file) + each panel's title band (18 px) + image + colour bar under
    # each heat-map (a 10 px bar and two 15 px text lines, 44 px)
    assert panel.shape[0] == heights[0] + 36 + 44 and panel.shape[1] >= 3 * widths[0]
    # the hit-count colour bar spans the colour map, blue on the left to red on the right
    bar_row = panel[36 + heights[0] + 2 + 5, : widths[0]]
    left, right = bar_row[6].astype(int), bar_row[widths[0] - 6].astype(int)
    assert left[2] > 100 and left[0] < 60 and right[0] > 100 and right[2] < 60


def test_cli_is_deterministic(cli_run, tmp_path):
    out, args = cli_run
    again = str(tmp_path)  # as deep as `out`: results.json's image paths are relative to --out
    args = [again if a == out else a for a in args]
    assert main(args + NO_FILTER_FLAGS + ["--top-k", "5", "--no-figures"]) == 0
    with open(os.path.join(out, "results.json")) as a, open(os.path.join(again, "results.json")) as b:
        first, second = json.load(a), json.load(b)
    first.pop("figures")
    assert [
        name for name in first.pop("files") if not name.endswith(".png") or name.startswith("masks/")
    ] == second.pop("files")
    assert first == second
    with (
        open(os.path.join(out, "results.safetensors"), "rb") as a,
        open(os.path.join(again, "results.safetensors"), "rb") as b,
    ):
        assert a.read() == b.read()


def test_cli_errors(image_files, tiny_sd_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main([image_files[0], "--model", tiny_sd_path, "--out", str(tmp_path)])
    assert error.value.code == 2 and "2 or more" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(SystemExit):
        main([image_files[0], str(broken), "--model", tiny_sd_path, "--out", str(tmp_path)])
    assert "broken.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(image_files[:2] + ["--out", str(tmp_path), "--max-entropy", "-1"])


def _run_cli(command: list[str], out: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command + ["--out", out], env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _free_port() -> int:
    """A TCP port nobody listens on now (accelerate's default, 29500, may be taken by another job on the machine)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_process_launch() -> list[str]:
    """`accelerate launch` of 2 CPU processes (gloo), one torch thread each, on a free port."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + ["--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port())]


def test_two_processes_write_what_one_process_writes(image_files, tiny_sd_path, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo) against a plain one-process run.

    Both use one torch thread per process: PyTorch's CPU UNet forward changes in the last bits with the intra-op
    thread count (not with the process count), so the comparison fixes it.
    """
    cli = ["-m", "cosegment"] + image_files + ["--model", tiny_sd_path, "--batch-size", "2", "--seed", "3"]
    cli += ["--height", "128", "--width", "128", "--top-k", "10"] + NO_FILTER_FLAGS
    one = str(tmp_path / "one")
    _run_cli([sys.executable] + cli, one)
    two = str(tmp_path / "two")
    result = _run_cli(two_process_launch() + cli, two)
    assert "[rank 0/2] capturing images 0-1" in result.stderr
    assert "[rank 1/2] capturing images 2-3" in result.stderr
    assert "[rank 1/2] analysed 3 pairs" in result.stderr
    files = sorted(os.path.relpath(os.path.join(r, f), one) for r, _, fs in os.walk(one) for f in fs)
    assert "results.json" in files and "pairs/pair_002_003.png" in files
    # results, pictures of 6 pairs and 4 images, 4 masks and 4 part masks, what a resumed run reuses: settings,
    # the features (a store: its index and a shard per batch of 2, each written by the process that captured it),
    # 6 pair analyses, and the viewer: index.html, viewer/ with a script per image and per pair
    assert len(files) == 2 + 6 + 4 + 8 + 1 + 3 + 6 + 1 + 4 + 6 and "resume/pairs/pair_002_003.safetensors" in files
    assert "resume/features/images-00000002-00000003.safetensors" in files
    assert files == sorted(os.path.relpath(os.path.join(r, f), two) for r, _, fs in os.walk(two) for f in fs)
    for name in files:
        assert_same_contents(os.path.join(one, name), os.path.join(two, name))


def test_cli_no_segment_skips_the_segmentation(cli_run, tmp_path, monkeypatch):
    import cosegment.analysis

    def refuse(*args, **kwargs):
        raise AssertionError("steps 10-11 ran under --no-segment")

    monkeypatch.setattr(cosegment.analysis, "cluster_hits", refuse)
    out, args = cli_run
    skipped = str(tmp_path / "skipped")
    args = [skipped if a == out else a for a in args]
    assert main(args + NO_FILTER_FLAGS + ["--top-k", "5", "--no-figures", "--no-segment"]) == 0
    with_masks, without = (
        load_file(os.path.join(out, "results.safetensors")),
        load_file(os.path.join(skipped, "results.safetensors")),
    )
    assert "part_masks.0" in with_masks and not any(name.startswith(("masks", "part_masks")) for name in without)
    assert torch.equal(without["density_maps"], with_masks["density_maps"])
    with open(os.path.join(skipped, "results.json")) as handle:
        assert json.load(handle)["settings"]["segment"] is False


# --- a newcomer's mistakes: every argument and image is checked before any model loads ------------------------------

MISSING_MODEL = "/no/such/model-folder"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "notes.jpg"
    path.write_text("not an image")
    return str(path)


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--height", "500"], "`--height` must be a positive multiple of 64 for this model, got 500"),
        (["--width", "0"], "argument --width: must be a positive int, got '0'"),
        (["--timestep", "5000"], "`--timestep` must be an int in [0, 1000), got 5000"),
        (["--selection", "strict"], "argument --selection: invalid choice: 'strict'"),
        (["--top-k", "-1"], "argument --top-k: must be an int >= 0, got '-1'"),
        (["--max-entropy", "nan"], "argument --max-entropy: must be a non-negative number or inf, got 'nan'"),
        (["--attention-layers", "("], "`--attention-layers` '(' is not a valid regex"),
        (["--device", "gpu"], "argument --device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    ],
)
def test_bad_arguments_are_named_before_the_model_loads(image_files, tmp_path, capsys, extra, named):
    """A model path that does not exist: the error must be the argument's, so no load was tried."""
    with pytest.raises(SystemExit) as error:
        main(image_files[:2] + ["--model", MISSING_MODEL, "--out", str(tmp_path / "out")] + extra)
    err = capsys.readouterr().err
    assert error.value.code == 2
    assert err.startswith("cosegment: error: ") and err.count("\n") == 1, err
    assert named in err and MISSING_MODEL not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_device_is_named_before_the_model_loads(image_files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `--device cuda` is valid here")
    with pytest.raises(SystemExit) as error:
        main(image_files[:2] + ["--model", MISSING_MODEL, "--out", str(tmp_path), "--device", "cuda"])
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and "`--device` 'cuda'" in err and MISSING_MODEL not in err


def test_bad_image_files_are_named_before_the_model_loads(image_files, text_file, tmp_path, capsys):
    cases = [
        ([image_files[0]], "`IMAGE` must name 2 or more files, got 1"),
        ([image_files[0], str(tmp_path / "missing.jpg")], "missing.jpg': no such file"),
        ([image_files[0], text_file], "1 file(s) cannot be read as images: '" + text_file + "' (Unidentified"),
        ([image_files[0], str(tmp_path)], f"`IMAGE` '{tmp_path}': the folder holds no image file"),
    ]
    for images, named in cases:
        with pytest.raises(SystemExit) as error:
            main(images + ["--model", MISSING_MODEL, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert error.value.code == 2 and err.count("\n") == 1 and named in err, err
        assert MISSING_MODEL not in err
    with pytest.raises(SystemExit) as error:  # --out names a file
        main(image_files[:2] + ["--model", MISSING_MODEL, "--out", text_file])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "`--out`" in err and "is a file, not a folder" in err


def test_model_that_cannot_load_is_one_line(image_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COSEGMENT_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, where in (
        (MISSING_MODEL, f"there is no folder '{MISSING_MODEL}'"),
        ("nobody/no-such-model", "is not in the local cache and could not be downloaded (HF_HUB_OFFLINE is set)"),
        (str(tmp_path), "is not a diffusers pipeline"),
    ):
        with pytest.raises(SystemExit) as error:
            main(image_files[:2] + ["--model", model, "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert error.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"cosegment: error: could not load the model '{model}': ") and where in err
        assert "`--model FOLDER`" in err and "python examples/make_tiny_pipeline.py tiny-sd/" in err
        assert "local_files_only" not in err  # diffusers' advice names an option the user cannot pass
    with pytest.raises(SystemExit):
        main(image_files[:2] + ["--model", MISSING_MODEL, "--out", str(tmp_path / "out"), "--debug"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("cosegment: error: could not load")


def test_every_option_has_help():
    from cosegment.cli import build_parser

    for action in build_parser()._actions:
        assert action.help, action.dest


def test_no_filter_is_the_four_inf_flags(cli_run, tmp_path):
    out, args = cli_run
    again = str(tmp_path)  # as deep as `out`: results.json's image paths are relative to --out
    args = [again if a == out else a for a in args]
    assert main(args + ["--no-filter", "--top-k", "5", "--no-figures", "--quiet"]) == 0
    with open(os.path.join(out, "results.json")) as a, open(os.path.join(again, "results.json")) as b:
        first, second = json.load(a), json.load(b)
    first.pop("figures")
    assert set(second.pop("files")) < set(first.pop("files"))  # without the pictures
    assert first == second and first["settings"]["analysis"]["max_entropy"] is None


def test_output_files_follow_the_umask(cli_run):
    out, _ = cli_run
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    for name in ("results.json", "results.safetensors", "pairs/pair_000_001.png", "images/image_000.png"):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == expected, name


def test_empty_results_warn_once_and_quiet_prints_nothing_else(image_files, tiny_sd_path, tmp_path):
    """`--max-entropy 0` keeps no match whatever the model (entropy is >= 0 and the check is strict)."""
    command = [sys.executable, "-m", "cosegment"] + image_files[:3] + ["--model", tiny_sd_path, "--height", "64"]
    command += ["--width", "64", "--no-figures", "--quiet", "--max-entropy", "0", "--out", str(tmp_path / "empty")]
    result = subprocess.run(command, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "] warning: every pair kept 0 matches" in lines[0], result.stderr
    assert "`--no-filter`" in lines[0] and "`--selection paper`" in lines[0]
    with open(tmp_path / "empty" / "results.json") as handle:
        assert all(pair["num_matches"] == 0 for pair in json.load(handle)["correspondences"])
    # With every threshold off the same run finds matches, prints no warning and (with --quiet) nothing at all.
    command[command.index("--max-entropy") : command.index("--max-entropy") + 2] = ["--no-filter"]
    command[-1] = str(tmp_path / "full")
    result = subprocess.run(command, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr[-3000:]


def test_accelerate_cpu_launch_warns_that_one_process_runs(image_files, tiny_sd_path, tmp_path):
    """`accelerate launch --cpu --num_processes 2` (no `--multi_gpu`) starts one process: the tool says so."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cli = ["-m", "cosegment"] + image_files[:2] + ["--model", tiny_sd_path, "--height", "64", "--width", "64"]
    cli += ["--no-figures", "--no-filter", "--out", str(tmp_path / "out")]
    result = subprocess.run(launch + cli, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 0/1] `accelerate launch` was asked for 2 processes but started 1" in result.stderr
    assert "--multi_gpu --num_processes 2" in result.stderr
