"""`save_pretrained` writes a self-loading folder: the code travels with the weights."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import BLOCK_COSEGMENT, NO_FILTER

import cosegment
from cosegment.pipeline_cosegment import pipeline_code_files

PACKAGE_DIR = os.path.dirname(os.path.abspath(cosegment.__file__))


def listing(folder: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def test_pipeline_code_files_follows_relative_imports(tmp_path):
    files = pipeline_code_files(os.path.join(PACKAGE_DIR, "pipeline_cosegment.py"))
    assert files[0] == "pipeline_cosegment.py"
    assert "processors/cross_self_attention.py" in files and "utils/correspondence.py" in files
    assert "analysis.py" in files and "utils/segmentation.py" in files
    # A new helper module is picked up from the imports alone.
    fake = tmp_path / "pipeline_x.py"
    fake.write_text(
        "import os\nfrom .utils.new_helper import (\n    f,\n)\nfrom .processors.p import Q\nfrom . import z\n"
    )
    assert pipeline_code_files(fake) == ["pipeline_x.py", "utils/new_helper.py", "processors/p.py"]


def test_pipeline_file_names_every_module_the_analysis_imports():
    """diffusers copies only the modules the pipeline file imports (DESIGN section 3): every relative import of
    `analysis.py` and of each root-level module the pipeline file imports (the analysis' steps) must also be one of
    `pipeline_cosegment.py`, or `custom_pipeline=` loading breaks."""
    names_of_pipeline = pipeline_code_files(os.path.join(PACKAGE_DIR, "pipeline_cosegment.py"))
    names_of_analysis = pipeline_code_files(os.path.join(PACKAGE_DIR, "analysis.py"))[1:]
    assert names_of_analysis and set(names_of_analysis) <= set(names_of_pipeline)
    root_modules = [name for name in names_of_pipeline[1:] if "/" not in name]
    assert {"analysis.py", "features.py", "pairs.py", "parts.py"} <= set(root_modules)
    for name in root_modules:
        imported = pipeline_code_files(os.path.join(PACKAGE_DIR, name))[1:]
        assert set(imported) <= set(names_of_pipeline), f"{name} imports {set(imported) - set(names_of_pipeline)}"


@pytest.fixture(scope="module")
def saved_folder(tiny_pipe, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("self-loading"))
    tiny_pipe.save_pretrained(folder)
    return folder


def test_save_pretrained_writes_code_and_list_class_name(saved_folder):
    files = listing(saved_folder)
    for relative in pipeline_code_files(os.path.join(PACKAGE_DIR, "pipeline_cosegment.py")):
        assert relative in files
        with (
            open(os.path.join(saved_folder, relative), "rb") as a,
            open(os.path.join(PACKAGE_DIR, relative), "rb") as b,
        ):
            assert a.read() == b.read()
    with open(os.path.join(saved_folder, "model_index.json")) as handle:
        index = json.load(handle)
    assert index["_class_name"] == ["pipeline_cosegment", "StableDiffusionCoSegmentationPipeline"]
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert any(name.startswith("unet/") and name.endswith(".safetensors") for name in files)


def test_push_to_hub_uploads_after_code_is_written(tiny_pipe, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class Repo:
        repo_id = "someone/my-coseg"

    def fake_create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs.get("private")))
        return Repo()

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, listing(folder_path), kwargs.get("commit_message")))
        with open(os.path.join(folder_path, "model_index.json")) as handle:
            calls.append(("class_name", json.load(handle)["_class_name"]))

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    folder = tmp_path / "my-coseg"
    tiny_pipe.save_pretrained(folder, push_to_hub=True, private=True, commit_message="hello")
    assert calls[0] == ("create_repo", "my-coseg", True)
    assert calls[1][0] == "upload_folder" and calls[1][1] == "someone/my-coseg" and calls[1][3] == "hello"
    uploaded = calls[1][2]
    assert "pipeline_cosegment.py" in uploaded and "utils/correspondence.py" in uploaded
    assert "processors/cross_self_attention.py" in uploaded
    assert calls[2] == ("class_name", ["pipeline_cosegment", "StableDiffusionCoSegmentationPipeline"])


CHILD = BLOCK_COSEGMENT + textwrap.dedent(
    """
    import json, sys

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)]
    inf = float("inf")
    out = pipe(image=images, height=64, width=64, generator=torch.Generator().manual_seed(3), max_entropy=inf,
               max_spread=inf, max_collapse=inf, max_inverse_error=inf)
    print(json.dumps({
        "class": type(pipe).__name__,
        "module": type(pipe).__module__,
        "pairs": [[c.source_index, c.target_index, len(c)] for c in out.correspondences],
        "density": out.density_maps.tolist(),
    }))
    """
)


def test_saved_folder_loads_without_cosegment(saved_folder, tiny_pipe, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(script), saved_folder], env=env, cwd=str(tmp_path), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "StableDiffusionCoSegmentationPipeline"
    assert not report["module"].startswith("cosegment")
    # Same weights, same inputs, same seed: the self-loaded class computes what the package computes.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)]
    expected = tiny_pipe(image=images, height=64, width=64, generator=torch.Generator().manual_seed(3), **NO_FILTER)
    assert report["pairs"] == [[0, 1, len(expected.correspondences[0])]]
    np.testing.assert_allclose(np.array(report["density"]), expected.density_maps, atol=0)
    assert np.array(report["density"]).sum() > 0


def test_the_class_reloads_its_own_folder(saved_folder, tiny_pipe):
    """diffusers' most common round trip: `Class.from_pretrained` on a folder `Class.save_pretrained` wrote returns the
    installed class (not the folder's copy of the code) without `trust_remote_code`, with identical outputs. This
    relies on diffusers reading `model_index.json` through `cls.load_config`: a diffusers upgrade that stops doing so
    fails here."""
    from cosegment import StableDiffusionCoSegmentationPipeline

    reloaded = StableDiffusionCoSegmentationPipeline.from_pretrained(saved_folder)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is StableDiffusionCoSegmentationPipeline
    # trust_remote_code does not change which class the installed class returns
    trusted = StableDiffusionCoSegmentationPipeline.from_pretrained(saved_folder, trust_remote_code=True)
    assert type(trusted) is StableDiffusionCoSegmentationPipeline
    for name in ("unet", "vae", "text_encoder"):
        before, after = getattr(tiny_pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)]
    kwargs = dict(image=images, height=64, width=64, return_features=True, **NO_FILTER)
    want = tiny_pipe(generator=torch.Generator().manual_seed(3), **kwargs)
    got = reloaded(generator=torch.Generator().manual_seed(3), **kwargs)
    for a, b in zip(got.features.queries + got.features.keys, want.features.queries + want.features.keys):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(got.density_maps, want.density_maps)
    # and it saves again as a self-loading folder
    with open(os.path.join(saved_folder, "model_index.json")) as handle:
        assert json.load(handle)["_class_name"][1] == "StableDiffusionCoSegmentationPipeline"


def test_load_config_rewrites_only_this_class_list(saved_folder, tmp_path):
    from diffusers import DiffusionPipeline

    from cosegment import StableDiffusionCoSegmentationPipeline

    config = StableDiffusionCoSegmentationPipeline.load_config(saved_folder)
    assert config["_class_name"] == "StableDiffusionCoSegmentationPipeline"
    # the tuple form (return_unused_kwargs) is rewritten too
    config, unused = StableDiffusionCoSegmentationPipeline.load_config(saved_folder, return_unused_kwargs=True)
    assert config["_class_name"] == "StableDiffusionCoSegmentationPipeline" and unused == {}
    # read through DiffusionPipeline, the folder still names its own code (so it loads itself without the package)
    assert DiffusionPipeline.load_config(saved_folder)["_class_name"] == [
        "pipeline_cosegment",
        "StableDiffusionCoSegmentationPipeline",
    ]
    # a list naming another class is left alone
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": ["my_pipeline", "MyPipeline"]}))
    assert StableDiffusionCoSegmentationPipeline.load_config(str(other))["_class_name"] == [
        "my_pipeline",
        "MyPipeline",
    ]
