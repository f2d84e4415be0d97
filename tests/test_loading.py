"""Loading the pipeline the ways users do: from_pretrained, custom_pipeline (without the package), from_pipe."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BLOCK_COSEGMENT
from diffusers import StableDiffusionPipeline

import cosegment
from cosegment import StableDiffusionCoSegmentationPipeline

PIPELINE_FILE = Path(cosegment.__file__).parent / "pipeline_cosegment.py"


def run_child(code: str, tmp_path: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_COSEGMENT + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_from_pretrained_registers_sd_components(tiny_pipe):
    assert isinstance(tiny_pipe, StableDiffusionCoSegmentationPipeline)
    assert tiny_pipe.safety_checker is None and tiny_pipe.feature_extractor is None
    assert tiny_pipe.default_size == 256 and tiny_pipe.size_multiple == 64


def test_sd1_shaped_folder_loads_and_runs(tiny_sd1_path, photos):
    """SD 1.x: `attention_head_dim` is an int that diffusers reads as the head count, projections are convolutions,
    and the repository carries a safety checker, which loads (so the folder does) but never runs."""
    from conftest import NO_FILTER
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd1_path)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker) and pipe.feature_extractor is not None
    assert pipe.config.requires_safety_checker is True
    assert not pipe.unet.config.use_linear_projection and isinstance(pipe.unet.config.attention_head_dim, int)
    assert pipe.resolve_attention_layers() == [
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
    ]

    def refuse(*args, **kwargs):
        raise AssertionError("the safety checker ran")

    hook = pipe.safety_checker.register_forward_pre_hook(refuse)
    try:
        out = pipe(
            image=photos[:2],
            height=128,
            width=128,
            generator=torch.Generator().manual_seed(0),
            return_features=True,
            **NO_FILTER,
        )
    finally:
        hook.remove()
    heads = pipe.unet.config.attention_head_dim  # SD 1.x: the number of heads
    channels = pipe.unet.config.block_out_channels[::-1][2]
    assert out.features.queries[0].shape == (2, heads, 64, channels // heads)
    assert out.features.grid_size == (8, 8) and out.density_maps.shape == (2, 8, 8)
    assert len(out.correspondences[0]) >= 64 and np.isfinite(out.entropy_maps).all()
    assert [m.shape for m in out.masks] == [p.shape[:2] for p in photos[:2]]


@pytest.mark.parametrize("folder", ["tiny_sd_path", "tiny_sd1_path"])
def test_custom_pipeline_file_loads_without_the_package(folder, request, tmp_path):
    tiny_sd_path = request.getfixturevalue(folder)
    code = f"""
    import json, torch, numpy as np
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(
        {tiny_sd_path!r}, custom_pipeline={str(PIPELINE_FILE)!r}, trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in range(2)]
    inf = float("inf")
    out = pipe(image=images, height=64, width=64, generator=torch.Generator().manual_seed(0),
               max_entropy=inf, max_spread=inf, max_collapse=inf, max_inverse_error=inf)
    print(json.dumps({{"cls": type(pipe).__name__, "module": type(pipe).__module__,
                      "density": list(out.density_maps.shape), "matches": len(out.correspondences[0].scores),
                      "entropy": float(out.entropy_maps.mean())}}))
    """
    info = run_child(code, tmp_path)
    assert info["cls"] == "StableDiffusionCoSegmentationPipeline"
    assert not info["module"].startswith("cosegment")
    assert info["density"] == [2, 4, 4]
    # with every check off, each pass keeps all N = 16 tokens; the union holds N to 2N distinct matches
    assert 16 <= info["matches"] <= 32
    assert 0 < info["entropy"] <= np.log(16) + 1e-5


def _txt2img(pipe: StableDiffusionPipeline) -> np.ndarray:
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


@pytest.mark.parametrize("folder", ["tiny_sd_path", "tiny_sd1_path"])
def test_from_pipe_both_ways_and_sibling_unchanged(folder, request, photos):
    sd = StableDiffusionPipeline.from_pretrained(request.getfixturevalue(folder))
    sd.set_progress_bar_config(disable=True)
    before = _txt2img(sd)
    coseg = StableDiffusionCoSegmentationPipeline.from_pipe(sd)
    coseg.set_progress_bar_config(disable=True)
    assert coseg.unet is sd.unet and coseg.vae is sd.vae
    processors = dict(sd.unet.attn_processors)
    out = coseg(image=photos[:2], height=64, width=64, generator=torch.Generator().manual_seed(0))
    assert out.density_maps.shape == (2, 4, 4)
    assert all(sd.unet.attn_processors[k] is v for k, v in processors.items())
    after = _txt2img(sd)
    np.testing.assert_array_equal(before, after)
    back = StableDiffusionPipeline.from_pipe(coseg)
    back.set_progress_bar_config(disable=True)
    assert back.unet is sd.unet and back.safety_checker is sd.safety_checker
    np.testing.assert_array_equal(_txt2img(back), before)


def test_from_pipe_prints_no_empty_float32_notice(tiny_sd_path):
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records, model_logger = Records(), logging.getLogger("diffusers.models.modeling_utils")
    model_logger.addHandler(records)
    try:
        sd = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
        sd.unet.to(dtype=torch.float32)  # the notice diffusers 0.42 prints for an empty list, so this test can see it
        if not any("should be kept in float32: []" in m for m in records.messages):
            pytest.skip("this diffusers version prints no notice for an empty list of float32 modules")
        records.messages.clear()
        StableDiffusionCoSegmentationPipeline.from_pipe(sd)
        assert not any("should be kept in float32" in m for m in records.messages)
        sd.unet.to(dtype=torch.float32)  # the filter is gone after the call
        assert any("should be kept in float32: []" in m for m in records.messages)
    finally:
        model_logger.removeHandler(records)
