"""A compiled UNet, in both forms: layer names, eager results, no recompilation after the first call, restoration.

dynamo's `backend="eager"` keeps these tests short: it traces, guards and caches exactly as any backend does (which is
what recompiles), and runs the captured graphs without code generation.
"""

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from cosegment import StableDiffusionCoSegmentationPipeline
from cosegment.processors.cross_self_attention import capture_stops_early, runs_compiled

SIZE = {"height": 64, "width": 64}


@pytest.fixture
def fresh_pipe(tiny_sd_path):
    """A pipeline of its own (compiling changes its UNet) and a clean dynamo cache before and after."""
    torch._dynamo.reset()
    counters.clear()
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch._dynamo.reset()


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (48 + 16 * i, 64, 3), dtype=np.uint8) for i in range(2)]


def _capture(pipe):
    return pipe.capture_features(_images(), generator=torch.Generator().manual_seed(2), **SIZE)


def _compile(pipe, form: str) -> None:
    if form == "torch.compile(unet)":
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    else:
        pipe.unet.compile(backend="eager")


@pytest.mark.parametrize("form", ["torch.compile(unet)", "unet.compile()"])
def test_compiled_unet_gives_eager_results_and_compiles_only_once(fresh_pipe, form):
    pipe = fresh_pipe
    names = pipe.resolve_attention_layers()
    reference = _capture(pipe)
    reference_out = pipe(image=_images(), generator=torch.Generator().manual_seed(2), output_type="pt", **SIZE)
    processors = dict(pipe.unet.attn_processors)
    assert not runs_compiled(pipe.unet) and capture_stops_early(pipe.unet, True)

    _compile(pipe, form)
    assert runs_compiled(pipe.unet) and not capture_stops_early(pipe.unet, True)
    assert pipe.resolve_attention_layers() == names  # no `_orig_mod.` in the names
    first = _capture(pipe)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the UNet did run compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        later = [_capture(pipe), _capture(pipe)]
        out = pipe(image=_images(), generator=torch.Generator().manual_seed(2), output_type="pt", **SIZE)
    assert counters["stats"]["unique_graphs"] == graphs

    for features in [first, *later]:
        assert features.layer_names == reference.layer_names
        for a, b in zip(features.queries + features.keys, reference.queries + reference.keys):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.density_maps, reference_out.density_maps, rtol=1e-5, atol=1e-5)
    # the UNet (which from_pipe siblings share) got its own processors back after every call
    after = pipe.unet.attn_processors
    assert after.keys() == processors.keys() and all(after[k] is processors[k] for k in processors)


def test_compiled_unet_restores_processors_after_a_fault(fresh_pipe):
    pipe = fresh_pipe
    processors = dict(pipe.unet.attn_processors)
    _compile(pipe, "torch.compile(unet)")

    def boom(module, args):
        raise RuntimeError("boom in the middle of the compiled UNet")

    handle = pipe.unet.up_blocks[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _capture(pipe)
    finally:
        handle.remove()
    after = pipe.unet.attn_processors
    assert all(after[k] is processors[k] for k in processors)
