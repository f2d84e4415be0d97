"""Faults (issue #6): whatever goes wrong inside a call, the original attention processors come back (identity), the
pipeline stays usable and gives the results it gave before; a failure on one pair of a collection names the pair."""

import numpy as np
import pytest
import torch
from conftest import NO_FILTER

import cosegment.matches as matches_module
import cosegment.pairs as pairs_module
import cosegment.pipeline_cosegment as pipeline_module
from cosegment import CoSegmentationFeatures, analyze_features

IMAGES = [np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8) for i in range(3)]


def _run(pipe):
    return pipe(image=IMAGES, height=64, width=64, generator=torch.Generator().manual_seed(0), **NO_FILTER)


@pytest.fixture
def reference(tiny_pipe):
    """The processors before the fault and the output of a clean call."""
    return dict(tiny_pipe.unet.attn_processors), _run(tiny_pipe)


def _assert_restored_and_usable(pipe, reference) -> None:
    before, clean = reference
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before), "an attention processor was left replaced"
    again = _run(pipe)
    np.testing.assert_array_equal(again.entropy_maps, clean.entropy_maps)
    np.testing.assert_array_equal(again.density_maps, clean.density_maps)


class Boom(Exception):
    pass


def _raise(error):
    def hook(*_):
        raise error

    return hook


@pytest.mark.parametrize("error", [Boom("boom"), KeyboardInterrupt(), MemoryError("out of memory")])
@pytest.mark.parametrize("where", ["unet-down-block", "unet-before-captured-layer", "vae-encoder", "text-encoder"])
def test_fault_in_a_model_forward_restores_the_processors(tiny_pipe, reference, where, error):
    module = {
        "unet-down-block": tiny_pipe.unet.down_blocks[1],
        "unet-before-captured-layer": tiny_pipe.unet.up_blocks[2].attentions[0].transformer_blocks[0].norm1,
        "vae-encoder": tiny_pipe.vae.encoder,
        "text-encoder": tiny_pipe.text_encoder,
    }[where]
    handle = module.register_forward_pre_hook(_raise(error))
    try:
        with pytest.raises(type(error)) as info:
            _run(tiny_pipe)
        assert info.value is error  # the caller's own exception, not a wrapped one
    finally:
        handle.remove()
    _assert_restored_and_usable(tiny_pipe, reference)


def test_fault_inside_the_capture_processor_restores_the_processors(tiny_pipe, reference, monkeypatch):
    calls = []

    def failing_add(self, name, query, key):
        calls.append(name)
        raise Boom(f"capture failed at {name}")

    monkeypatch.setattr(pipeline_module.AttentionStore, "add", failing_add)
    with pytest.raises(Boom, match="capture failed"):
        _run(tiny_pipe)
    monkeypatch.undo()
    assert len(calls) == 1
    _assert_restored_and_usable(tiny_pipe, reference)


def test_interrupt_right_after_installing_restores_the_processors(tiny_pipe, reference, monkeypatch):
    """An interrupt between installing the capture processors and the forward still restores the originals."""
    original = type(tiny_pipe.unet).set_attn_processor
    installs = []

    def set_then_interrupt(self, processor):
        original(self, processor)
        installs.append(1)
        if len(installs) == 1:
            raise KeyboardInterrupt()

    monkeypatch.setattr(type(tiny_pipe.unet), "set_attn_processor", set_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_pipe)
    monkeypatch.undo()
    assert len(installs) == 2  # installed, then restored in `finally`
    _assert_restored_and_usable(tiny_pipe, reference)


def test_capture_processors_are_installed_only_during_the_forward(tiny_pipe, reference):
    seen = []

    def spy(module, args):
        seen.append(type(tiny_pipe.unet.attn_processors[module_name + ".processor"]).__name__)

    module_name = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"
    handle = tiny_pipe.unet.get_submodule(module_name).register_forward_pre_hook(spy)
    try:
        _run(tiny_pipe)
    finally:
        handle.remove()
    assert seen == ["CrossSelfAttentionCaptureProcessor"]
    _assert_restored_and_usable(tiny_pipe, reference)


# --- analysis faults: named by pair ------------------------------------------------------------------------------


def _features(m: int = 3) -> CoSegmentationFeatures:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(m, 2, 6, 4, generator=g), torch.randn(m, 2, 6, 4, generator=g)
    return CoSegmentationFeatures([q], [k], (2, 3), [(20, 30)] * m)


class TwoArgumentError(Exception):
    """An exception type that cannot be re-made from a message alone."""

    def __init__(self, code: int, detail: str):
        super().__init__(code, detail)


@pytest.mark.parametrize(
    ("error", "expected_type"),
    [
        (ValueError("bad statistics"), ValueError),
        (IndexError("index 7 is out of bounds"), IndexError),
        (TwoArgumentError(3, "odd"), RuntimeError),
    ],
)
def test_failure_on_one_pair_names_the_pair(monkeypatch, error, expected_type):
    calls = []
    original = pairs_module.pass_statistics

    def failing(*args, **kwargs):
        calls.append(1)
        # passes run in pair order (0, 1), (0, 2), (1, 2), two passes each: the fifth call belongs to pair (1, 2)
        if len(calls) == 5:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(pairs_module, "pass_statistics", failing)
    with pytest.raises(expected_type) as info:
        analyze_features(_features(), **NO_FILTER)
    assert "pair (1, 2)" in str(info.value)
    assert type(error).__name__ in str(info.value)
    assert info.value.__cause__ is error
    monkeypatch.undo()
    out = analyze_features(_features(), **NO_FILTER)
    assert len(out.correspondences) == 3


def test_interrupt_during_analysis_is_not_wrapped(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(matches_module, "merge_passes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze_features(_features(), **NO_FILTER)


def test_analysis_failure_after_capture_leaves_the_pipeline_usable(tiny_pipe, reference, monkeypatch):
    def failing(*args, **kwargs):
        raise Boom("selection failed")

    monkeypatch.setattr(pairs_module, "select_matches", failing)
    with pytest.raises(Boom, match=r"pair \(0, 1\).*selection failed"):
        _run(tiny_pipe)
    monkeypatch.undo()
    _assert_restored_and_usable(tiny_pipe, reference)
