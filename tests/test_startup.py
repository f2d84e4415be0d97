"""The commands start quickly (issue 23): `--help` and every input error found before the model loads import no torch,
diffusers or transformers, and Ctrl-C (SIGINT) at any moment is one line on stderr and exit status 130.

The import behaviour is asserted in child processes (here, the test process has torch loaded already); the time it
saves is measured by `benchmarks/bench_startup.py`, never asserted.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

import cosegment

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cosegment.__file__)))
HEAVY = ("torch", "diffusers", "transformers")

# Calls a command's `main(argv)` in a fresh interpreter; the last stdout line says how it ended and what it loaded.
MAIN_IN_CHILD = """
import json, sys
from {module} import main
try:
    code = main({argv!r})
except SystemExit as end:
    code = end.code
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""

# Runs a command, pausing forever at a point (writing PAUSE_MARK first): the import of the module PAUSE_AT, or with
# PAUSE_AT=load inside the model's loading. The test then sends SIGINT.
PAUSING_COMMAND = """
import importlib.abc, os, sys, time

def pause():
    open(os.environ["PAUSE_MARK"], "w").close()
    while True:
        time.sleep(0.05)  # the signal handler raises here

class PauseAtImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == os.environ["PAUSE_AT"]:
            pause()
        return None

sys.meta_path.insert(0, PauseAtImport())
if os.environ["PAUSE_AT"] == "load":
    import cosegment.utils.command_line as command_line
    command_line.load_pipeline = lambda *args, **kwargs: pause()
module = __import__(os.environ["COMMAND"], fromlist=["main"])
sys.exit(module.main(sys.argv[1:]))
"""


def child_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_main(module: str, argv: list[str], cwd=None) -> dict:
    """`module.main(argv)` in a child: `{"code": exit status, "heavy": the modules of HEAVY it imported}`."""
    script = MAIN_IN_CHILD.format(module=module, argv=argv, heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), timeout=300, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    outcome["stderr"] = result.stderr
    return outcome


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(40, 60), (50, 30)]):
        path = str(folder / f"image_{i}.png")
        pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["cosegment.cli", "cosegment.evaluation"])
def test_help_imports_no_torch(module):
    outcome = run_main(module, ["--help"])
    assert outcome == {"code": 0, "heavy": [], "stderr": ""}


def test_python_m_help_lists_every_option():
    from cosegment.cli import build_parser

    result = subprocess.run(
        [sys.executable, "-m", "cosegment", "--help"], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr
    options = {option for action in build_parser()._actions for option in action.option_strings}
    assert len(options) > 30
    words = {word.strip(",") for word in result.stdout.split()}
    assert sorted(options - words) == []
    for group in ("model and capture", "correspondences", "segmentation", "output", "run control"):
        assert group in result.stdout


def _input_errors(images: list[str], folder) -> dict[str, list[str]]:
    """Command lines that fail a check made before the model loads, by what they get wrong."""
    unreadable = folder / "not_an_image.jpg"
    unreadable.write_text("text, not pixels")
    a_file = folder / "a_file"
    a_file.write_text("")
    two = [*images, "--out", str(folder / "out")]
    return {
        "missing image": ["missing.jpg", "other.jpg", "--out", str(folder / "X")],
        "unreadable image": [images[0], str(unreadable), "--out", str(folder / "out")],
        "image is a folder": [images[0], str(folder), "--out", str(folder / "out")],
        "one image": [images[0], "--out", str(folder / "out")],
        "out is a file": [*images, "--out", str(a_file)],
        "bad option value": [*two, "--top-k", "-1"],
        "bad threshold": [*two, "--max-entropy", "nan"],
        "unknown option": [*two, "--no-such-option"],
        "bad device form": [*two, "--device", "gpu"],
        "height": [*two, "--height", "100"],
        "timestep": [*two, "--timestep", "5000"],
        "layers regex": [*two, "--attention-layers", "up_blocks.(2"],
        "points syntax": [*two, "--points", "1,2,3"],
        "points outside": [*two, "--points", "1,2;500,500"],
        "reference file": [*two, "--reference", str(folder / "no_such_features.safetensors")],
    }


def test_every_input_error_before_the_model_imports_no_torch(image_files, tmp_path):
    cases = _input_errors(image_files, tmp_path)
    script = "\n".join(
        [
            "import contextlib, io, json, sys",
            "from cosegment.cli import main",
            "codes = {}",
            "for name, argv in json.loads(sys.argv[1]).items():",
            "    with contextlib.redirect_stderr(io.StringIO()) as err:",
            "        try:",
            "            codes[name] = [main(argv), err.getvalue()]",
            "        except SystemExit as end:",
            "            codes[name] = [end.code, err.getvalue()]",
            f"heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)",
            "print(json.dumps({'codes': codes, 'heavy': heavy}))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (code, stderr) in outcome["codes"].items():
        assert code == 2, (name, stderr)
        assert stderr.startswith("cosegment: error: ") and stderr.count("\n") == 1, (name, stderr)
    assert outcome["codes"]["missing image"][1].startswith("cosegment: error: `IMAGE` 'missing.jpg': no such file.")
    assert outcome["heavy"] == []


def test_missing_image_error_alone_imports_no_torch(tmp_path):
    outcome = run_main("cosegment.cli", ["missing.jpg", "other.jpg", "--out", str(tmp_path / "X")])
    assert outcome["code"] == 2 and outcome["heavy"] == []
    assert "'missing.jpg': no such file" in outcome["stderr"]


def test_eval_input_errors_import_no_torch(tmp_path):
    outcome = run_main("cosegment.evaluation", ["spair", str(tmp_path / "no-dataset")])
    assert outcome["code"] == 2 and outcome["heavy"] == []
    assert "has no SPair-71k annotations" in outcome["stderr"]
    outcome = run_main("cosegment.evaluation", ["cub", str(tmp_path), "--out", str(tmp_path)])
    assert outcome["code"] == 2 and outcome["heavy"] == []
    assert "is a folder" in outcome["stderr"]


def test_import_cosegment_is_lazy_and_complete():
    script = """
import json, sys
import cosegment
loaded = sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules)
version = cosegment.__version__
listed = sorted(set(cosegment.__all__) - set(dir(cosegment)))
namespace = {}
exec("from cosegment import " + ", ".join(cosegment.__all__), namespace)
found = sorted(name for name in cosegment.__all__ if namespace[name] is getattr(cosegment, name))
try:
    cosegment.no_such_name
    missing = "no error"
except AttributeError as error:
    missing = str(error)
print(json.dumps({"loaded": loaded, "version": version, "not_in_dir": listed, "found": found, "missing": missing}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["loaded"] == [] and outcome["version"] == cosegment.__version__
    assert outcome["not_in_dir"] == []
    assert outcome["found"] == sorted(cosegment.__all__)
    assert outcome["missing"] == "module 'cosegment' has no attribute 'no_such_name'"


def test_public_names_are_the_defining_modules_objects():
    from cosegment import pipeline_cosegment
    from cosegment.utils import correspondence

    assert set(cosegment.__all__) == set(cosegment._EXPORTS)
    for name in cosegment.__all__:
        module = pipeline_cosegment if cosegment._EXPORTS[name] == ".pipeline_cosegment" else correspondence
        assert getattr(cosegment, name) is getattr(module, name), name


def test_parser_constants_equal_the_originals():
    """The torch-free copies in `utils/command_line.py` that the parsers use."""
    import torch

    from cosegment.analysis import SELECTION_PRESETS
    from cosegment.pipeline_cosegment import DEFAULT_MODEL_ID
    from cosegment.utils import command_line
    from cosegment.utils.correspondence import SelectionThresholds

    assert command_line.DEFAULT_MODEL_ID == DEFAULT_MODEL_ID
    assert command_line.SELECTION_PRESETS == SELECTION_PRESETS
    assert command_line.THRESHOLD_NAMES == tuple(SelectionThresholds.__dataclass_fields__)
    assert {name: getattr(torch, name) for name in command_line.DTYPE_NAMES} == {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }


def test_cli_output_names_are_importable_from_cli():
    from cosegment import cli, cli_output

    for name in cli._OUTPUT_NAMES:
        assert getattr(cli, name) is getattr(cli_output, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        cli.no_such_name


# ---------------------------------------------------------------------------------------------------------------------
# SIGINT
# ---------------------------------------------------------------------------------------------------------------------


def _interrupt(command: str, point: str, arguments: list[str], folder) -> subprocess.CompletedProcess:
    """Runs `command`'s main in a child until it pauses at `point`, sends SIGINT, waits for it to end."""
    script, marker = folder / "pausing_command.py", folder / "paused"
    script.write_text(PAUSING_COMMAND)
    env = child_env(COMMAND=command, PAUSE_AT=point, PAUSE_MARK=str(marker))
    child = subprocess.Popen(
        [sys.executable, str(script), *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the child never paused at {point}: {child.communicate()[1][-3000:]}")
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "point",
    [
        "cosegment.runstate",  # before the run's own handler: during the start-up imports
        "torch",  # the first import of torch, in the run (after every input check)
        "diffusers",  # torch loaded, the model's libraries loading
        "load",  # the model loading
    ],
)
def test_sigint_at_any_moment_is_one_line_and_130(point, image_files, tmp_path):
    arguments = [*image_files, "--out", str(tmp_path / "out"), "--model", "no-such-model-folder/", "--quiet"]
    stopped = _interrupt("cosegment.cli", point, arguments, tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    lines = stopped.stderr.splitlines()
    # "cosegment: ..." before the run's logging starts, "HH:MM:SS [rank 0/1] ..." after
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0], stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_sigint_in_eval_is_one_line_and_130(tmp_path):
    stopped = _interrupt("cosegment.evaluation", "tqdm.auto", ["spair", str(tmp_path)], tmp_path)
    assert stopped.returncode == 130
    assert stopped.stderr == "cosegment-eval: interrupted by SIGINT\n"


def test_sigint_while_parsing_leaves_the_handler_as_it_was():
    """`main` called in a process restores the SIGINT handler it found (here pytest's)."""
    from cosegment.cli import main

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert signal.getsignal(signal.SIGINT) is before
