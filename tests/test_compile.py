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
from cosegment.processors.cross_self_attention import (
    AttentionStore,
    CrossSelfAttentionCaptureProcessor,
    capture_stops_early,
    compile_context,
    compiled_prefix,
    prefix_stop,
    runs_compiled,
    unet_prefix_forward,
    unwrap_module,
)

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
    assert compiled_prefix(pipe.unet, names) is not None  # the compiled capture stops after the last read layer
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

    # a layer the compiled prefix runs (the last read layer itself)
    handle = pipe.unet.get_submodule(pipe.resolve_attention_layers()[-1]).register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _capture(pipe)
    finally:
        handle.remove()
    after = pipe.unet.attn_processors
    assert all(after[k] is processors[k] for k in processors)


def _record(unet, names, run) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Queries and keys of `names` recorded while `run()` calls `unet`, with the order the layers ran in."""
    store = AttentionStore(names)
    order = []
    originals = dict(unet.attn_processors)
    processors = dict(originals)
    for name in names:
        processors[f"{name}.processor"] = CrossSelfAttentionCaptureProcessor(store, name)
    unet.set_attn_processor(dict(processors))
    handles = [unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        unet.set_attn_processor(dict(originals))
        for handle in handles:
            handle.remove()
    queries = [torch.cat(store.queries[name]) for name in names if store.queries[name]]
    keys = [torch.cat(store.keys[name]) for name in names if store.keys[name]]
    return queries, keys, order


def _inputs(unet, batch=2, size=8):
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    condition = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.full((batch,), 261, dtype=torch.long), condition


@pytest.mark.parametrize("model", ["sd2", "sd1"])
@pytest.mark.parametrize("layers", ["default", "first up layer", "mid", "down"])
def test_prefix_forward_records_bitwise_the_queries_and_keys_of_a_full_forward(
    tiny_sd_path, tiny_sd1_path, model, layers
):
    """In eager, the prefix forward runs the read layers with the same inputs as the UNet's own forward: bitwise equal
    queries and keys, and it returns right after the last read layer (no layer after it runs)."""
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path if model == "sd2" else tiny_sd1_path)
    unet = pipe.unet
    every = [name for name, _ in unet.attn_processors.items()]
    every = [name[: -len(".processor")] for name in every if name.endswith("attn1.processor")]
    names = {
        "default": pipe.resolve_attention_layers(),
        "first up layer": [n for n in every if n.startswith("up_blocks")][:1],
        "mid": [n for n in every if n.startswith("mid_block")],
        "down": [n for n in every if n.startswith("down_blocks")][-1:],
    }[layers]
    assert names
    stop = prefix_stop(unet, names)
    assert stop is not None and stop[0] == {"mid": "mid", "down": "down"}.get(layers, "up")
    sample, timestep, condition = _inputs(unet)
    full_q, full_k, _ = _record(unet, names, lambda: unet(sample, timestep, condition, return_dict=False))
    everything_q, _, full_order = _record(unet, every, lambda: unet(sample, timestep, condition, return_dict=False))
    prefix_q, prefix_k, _ = _record(unet, names, lambda: unet_prefix_forward(unet, sample, timestep, condition, stop))
    _, _, prefix_order = _record(unet, every, lambda: unet_prefix_forward(unet, sample, timestep, condition, stop))
    assert len(prefix_q) == len(names)
    for a, b in zip(prefix_q + prefix_k, full_q + full_k, strict=True):
        assert torch.equal(a, b)
    # the prefix runs the layers up to the last read one, in the forward's order, and none after it
    last = max(full_order.index(n) for n in names)
    assert prefix_order == full_order[: last + 1]
    assert len(everything_q) == len(every)


def test_prefix_does_not_apply_where_the_forward_differs(tiny_sd_path):
    """FreeU, hooks on the UNet, accelerate/offloading hooks and unknown layer names keep the whole forward."""
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path)
    unet, names = pipe.unet, pipe.resolve_attention_layers()
    assert prefix_stop(unet, names) is not None
    assert prefix_stop(unet, ["no.such.layer"]) is None and prefix_stop(unet, []) is None
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert prefix_stop(unet, names) is None
    unet.disable_freeu()
    handle = unet.register_forward_pre_hook(lambda module, args: None)
    assert prefix_stop(unet, names) is None
    handle.remove()
    unet.down_blocks[0]._hf_hook = object()
    assert prefix_stop(unet, names) is None
    del unet.down_blocks[0]._hf_hook
    assert prefix_stop(unet, names) is not None
    assert compiled_prefix(unet, names) is None  # eager: the exception ends the forward


@pytest.mark.parametrize("form", ["torch.compile(unet)", "unet.compile()"])
def test_compiled_prefix_uses_the_unets_own_compile_settings(fresh_pipe, form):
    """The prefix is compiled with the context the user compiled the UNet with (here the `eager` backend), and it
    returns what the eager prefix returns."""
    pipe = fresh_pipe
    _compile(pipe, form)
    context = compile_context(pipe.unet)
    assert context is not None
    names = pipe.resolve_attention_layers()
    unet = unwrap_module(pipe.unet)
    sample, timestep, condition = _inputs(unet)
    with torch.no_grad():
        expected = unet_prefix_forward(unet, sample, timestep, condition, prefix_stop(unet, names))
        got = compiled_prefix(pipe.unet, names)(sample, timestep, condition)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1
    assert compile_context(unet) is None or form == "unet.compile()"
