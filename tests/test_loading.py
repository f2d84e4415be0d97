"""Loading the pipeline the ways users do: from_pretrained, custom_pipeline (without the package), from_pipe."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
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


def test_custom_pipeline_file_loads_without_the_package(tiny_sd_path, tmp_path):
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


def test_from_pipe_both_ways_and_sibling_unchanged(tiny_sd_path, photos):
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
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
    assert back.unet is sd.unet
    np.testing.assert_array_equal(_txt2img(back), before)
