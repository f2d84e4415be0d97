"""The capture processor: stock output, captured Q/K, restoration of the original processors, early exit."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from cosegment.processors.cross_self_attention import (
    AttentionStore,
    CrossSelfAttentionCaptureProcessor,
    StopForward,
    self_attention_layer_levels,
)


def _unet_inputs(pipe, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    sample = torch.randn(batch, 4, size, size, generator=gen)
    text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor([261] * batch), text


def test_output_matches_attn_processor_2_0_and_captures_qk(tiny_pipe):
    unet = tiny_pipe.unet
    originals = dict(unet.attn_processors)
    sample, t, text = _unet_inputs(tiny_pipe)
    try:
        unet.set_attn_processor(AttnProcessor2_0())
        reference = unet(sample, t, encoder_hidden_states=text).sample
        names = list(self_attention_layer_levels(unet))
        store = AttentionStore(names)
        unet.set_attn_processor(
            {f"{n}.processor": CrossSelfAttentionCaptureProcessor(store, n) for n in names}
            | {k: AttnProcessor2_0() for k in originals if k[: -len(".processor")] not in names}
        )
        captured = unet(sample, t, encoder_hidden_states=text).sample
    finally:
        unet.set_attn_processor(dict(originals))
    torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-5)
    queries, keys = store.take()
    assert len(queries) == len(names)
    # check one layer's capture against its own projections
    name = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"
    attn = dict(unet.named_modules())[name]
    q = queries[names.index(name)]
    assert q.shape == (2, attn.heads, 16 * 16, attn.inner_dim // attn.heads)
    assert keys[names.index(name)].shape == q.shape
    assert not torch.equal(q, keys[names.index(name)])


def test_layer_levels_follow_the_unet(tiny_pipe):
    levels = self_attention_layer_levels(tiny_pipe.unet)
    assert levels["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 0
    assert levels["down_blocks.2.attentions.0.transformer_blocks.0.attn1"] == 2
    assert levels["mid_block.attentions.0.transformer_blocks.0.attn1"] == 3
    assert levels["up_blocks.1.attentions.0.transformer_blocks.0.attn1"] == 2
    assert levels["up_blocks.2.attentions.1.transformer_blocks.0.attn1"] == 1
    assert levels["up_blocks.3.attentions.0.transformer_blocks.0.attn1"] == 0
    assert not any(name.endswith("attn2") for name in levels)


def test_processors_restored_after_success(tiny_pipe, photos):
    before = dict(tiny_pipe.unet.attn_processors)
    tiny_pipe(image=photos[:2], height=64, width=64, generator=torch.Generator().manual_seed(0))
    after = tiny_pipe.unet.attn_processors
    assert before.keys() == after.keys()
    assert all(after[k] is before[k] for k in before)


def test_processors_restored_after_exception_mid_forward(tiny_pipe, photos):
    before = dict(tiny_pipe.unet.attn_processors)
    block = tiny_pipe.unet.up_blocks[2]

    def boom(module, args):
        # the capture processors are installed at this point
        assert any(isinstance(p, CrossSelfAttentionCaptureProcessor) for p in tiny_pipe.unet.attn_processors.values())
        raise RuntimeError("boom in the middle of the UNet")

    handle = block.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            tiny_pipe(image=photos[:2], height=64, width=64, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    after = tiny_pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    # and the pipeline still works
    out = tiny_pipe(image=photos[:2], height=64, width=64, generator=torch.Generator().manual_seed(0))
    assert out.density_maps.shape == (2, 4, 4)


def test_early_exit_captures_the_same_qk_as_a_full_forward(tiny_pipe, photos):
    kwargs = {"image": photos[:3], "height": 128, "width": 128, "batch_size": 2}
    early = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(3), stop_early=True, **kwargs)
    full = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(3), stop_early=False, **kwargs)
    assert len(early.queries) == len(full.queries) == 2
    for a, b in zip(early.queries + early.keys, full.queries + full.keys):
        assert torch.equal(a, b)


def test_early_exit_skips_the_rest_of_the_unet(tiny_pipe, photos):
    calls = []
    handle = tiny_pipe.unet.up_blocks[3].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        tiny_pipe.capture_features(photos[:2], height=64, width=64, generator=torch.Generator().manual_seed(0))
        assert calls == []
        tiny_pipe.capture_features(photos[:2], height=64, width=64, stop_early=False)
        assert calls == [1]
    finally:
        handle.remove()


def test_store_raises_stop_only_after_every_layer():
    store = AttentionStore(["a", "b"], stop_after_last=True)
    store.begin_forward()
    x = torch.zeros(1, 1, 2, 2)
    store.add("a", x, x)
    with pytest.raises(StopForward):
        store.add("b", x, x)
    store.begin_forward()
    store.add("a", x, x)  # a new forward starts counting again
    queries, keys = store.take()
    assert queries[0].shape == (2, 1, 2, 2) and queries[1].shape == (1, 1, 2, 2)


def test_layer_levels_on_a_hand_built_unet():
    """Blocks without a `downsamplers`/`upsamplers` attribute do not change the level; only `Attention` modules named
    `attn1` that are not cross-attention count; a module without down or up blocks has no levels."""
    from diffusers.models.attention_processor import Attention

    class Block(torch.nn.Module):
        def __init__(self, sampler: str | None = None):
            super().__init__()
            self.attn1 = Attention(8, heads=1, dim_head=8)
            self.attn2 = Attention(8, heads=1, dim_head=8)  # self-attention, but not named attn1
            self.cross = torch.nn.Module()
            self.cross.attn1 = Attention(8, cross_attention_dim=4, heads=1, dim_head=8)  # cross-attention
            self.other = torch.nn.Module()
            self.other.attn1 = torch.nn.Identity()  # named attn1, not an Attention
            if sampler:
                setattr(self, sampler, torch.nn.ModuleList([torch.nn.Identity()]))

    unet = torch.nn.Module()
    unet.down_blocks = torch.nn.ModuleList([Block("downsamplers"), Block()])
    unet.mid_block = Block()
    unet.up_blocks = torch.nn.ModuleList([Block("upsamplers"), Block()])
    assert self_attention_layer_levels(unet) == {
        "down_blocks.0.attn1": 0,
        "down_blocks.1.attn1": 1,
        "mid_block.attn1": 1,
        "up_blocks.0.attn1": 1,
        "up_blocks.1.attn1": 0,
    }
    assert self_attention_layer_levels(torch.nn.Linear(2, 2)) == {}
