"""The pipeline as a diffusers citizen (issue 12): a Tiny VAE, precomputed prompt embeddings, and the early exit
cooperating with diffusers' and accelerate's offloading hooks."""

import numpy as np
import pytest
import torch
from conftest import NO_FILTER, needs_diffusers
from diffusers import AutoencoderTiny

try:
    from diffusers.hooks import HookRegistry
except ImportError:  # diffusers < 0.33: the tests of its hooks skip
    HookRegistry = None

from cosegment import StableDiffusionCoSegmentationPipeline
from cosegment.utils.images import preferred_memory_format


def _images(count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (56 + 8 * i, 72, 3), dtype=np.uint8) for i in range(count)]


CALL = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def fresh_pipe(tiny_sd_path):
    """A pipeline of its own: tests here install hooks and swap components."""

    def make(**components):
        pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path, **components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def tiny_autoencoder(seed: int = 0, **config) -> AutoencoderTiny:
    """A TAESD-shaped `AutoencoderTiny` (scale factor 8, 4 latent channels) with random weights."""
    torch.manual_seed(seed)
    widths = (8, 8, 8, 8)
    return AutoencoderTiny(
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        **config,
    )


# ---------------------------------------------------------------------------------------------------------------
# Tiny VAE (AutoencoderTiny / TAESD)
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_vae_latents_are_its_encoder_output_times_scaling_factor(fresh_pipe):
    pipe = fresh_pipe(vae=tiny_autoencoder())
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.vae_scale_factor == 8
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = pipe.vae.encoder(pixels)  # TAESD's encoder output is what the UNet reads (scaling_factor 1.0)
    torch.testing.assert_close(pipe._encode(pixels, 8), expected, rtol=0, atol=0)
    assert expected.shape == (2, 4, 8, 8)
    # a VAE with another scaling factor scales its latents
    scaled = fresh_pipe(vae=tiny_autoencoder(scaling_factor=0.5))
    torch.testing.assert_close(scaled._encode(pixels, 8), 0.5 * expected, rtol=0, atol=0)
    # AutoencoderKL keeps its convention: the mode of the latent distribution times its scaling factor
    kl = fresh_pipe()
    # (the pipeline hands the VAE its input in the device's fastest memory format: the same here, for exact equality)
    laid_out = pixels.contiguous(memory_format=preferred_memory_format(pixels.device))
    want = kl.vae.encode(laid_out).latent_dist.mode() * kl.vae.config.scaling_factor
    torch.testing.assert_close(kl._encode(pixels, 8), want, rtol=0, atol=0)


def test_tiny_vae_runs_end_to_end(fresh_pipe):
    pipe = fresh_pipe(vae=tiny_autoencoder())
    images = _images(3)
    out = pipe(images, generator=torch.Generator().manual_seed(0), return_features=True, **CALL, **NO_FILTER)
    assert out.density_maps.shape == (3, 4, 4) and np.isfinite(out.entropy_maps).all()
    assert [m.shape for m in out.masks] == [im.shape[:2] for im in images]
    # the Tiny VAE's latents reach the UNet: other latents than the KL VAE's, other features
    kl = fresh_pipe().capture_features(images, generator=torch.Generator().manual_seed(0), **CALL)
    assert not torch.allclose(kl.queries[0], out.features.queries[0])


# ---------------------------------------------------------------------------------------------------------------
# prompt_embeds and encode_prompt's default device
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_embeds_equal_the_encoded_prompt(tiny_pipe):
    images = _images()
    embeds = tiny_pipe.encode_prompt("a cat")[0]  # device defaults to the execution device
    assert embeds.shape == (1, 77, 32) and embeds.device == tiny_pipe._execution_device
    torch.testing.assert_close(embeds, tiny_pipe.encode_prompt("a cat", "cpu")[0], rtol=0, atol=0)
    by_text = tiny_pipe.capture_features(images, prompt="a cat", generator=torch.Generator().manual_seed(2), **CALL)
    by_embeds = tiny_pipe.capture_features(
        images, prompt_embeds=embeds, generator=torch.Generator().manual_seed(2), **CALL
    )
    for a, b in zip(by_text.queries + by_text.keys, by_embeds.queries + by_embeds.keys):
        assert torch.equal(a, b)
    assert by_text.metadata["prompt"] == "a cat" and by_embeds.metadata["prompt"] is None
    # neither given: the empty prompt
    default = tiny_pipe.capture_features(images, generator=torch.Generator().manual_seed(2), **CALL)
    assert default.metadata["prompt"] == "" and not torch.equal(default.queries[0], by_text.queries[0])


def test_prompt_embeds_on_call_condition_the_unet(tiny_pipe):
    images = _images()
    kwargs = dict(generator=torch.Generator().manual_seed(5), return_features=True, **CALL, **NO_FILTER)
    text = tiny_pipe(images, prompt="a dog", **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(5)
    embeds = tiny_pipe(images, prompt_embeds=tiny_pipe.encode_prompt("a dog")[0], **kwargs)
    np.testing.assert_array_equal(text.density_maps, embeds.density_maps)
    assert torch.equal(text.features.keys[0], embeds.features.keys[0])
    # other embeddings (a shorter sequence, in float64: cast to the UNet's dtype) give other features
    kwargs["generator"] = torch.Generator().manual_seed(5)
    other = tiny_pipe(images, prompt_embeds=torch.randn(1, 5, 32, dtype=torch.float64), **kwargs)
    assert other.features.keys[0].dtype == torch.float32
    assert not torch.allclose(other.features.keys[0], text.features.keys[0])


# ---------------------------------------------------------------------------------------------------------------
# Early exit and offloading hooks (observed on the CPU: onload and offload device are both the CPU, and the state of
# each group is recorded from its `onload_`/`offload_` calls)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def onloaded(monkeypatch):
    """The set of `ModuleGroup`s onloaded now (by id), kept up to date from their `onload_`/`offload_` calls."""
    from diffusers.hooks.group_offloading import ModuleGroup

    state, calls = set(), {"onload": 0}
    original_onload, original_offload = ModuleGroup.onload_, ModuleGroup.offload_

    def onload(self):
        state.add(id(self))
        calls["onload"] += 1
        return original_onload(self)

    def offload(self):
        state.discard(id(self))
        return original_offload(self)

    monkeypatch.setattr(ModuleGroup, "onload_", onload)
    monkeypatch.setattr(ModuleGroup, "offload_", offload)
    return state, calls


def _group_names(unet) -> dict[int, str]:
    """id(group) -> the name of its offload leader (the UNet's own group is "")."""
    from diffusers.hooks.group_offloading import GroupOffloadingHook

    names = {}
    for name, module in unet.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            if isinstance(hook, GroupOffloadingHook) and hook.group.offload_leader is module:
                names[id(hook.group)] = name
    return names


def _install_lazy_prefetch(unet) -> None:
    """The hook structure `use_stream=True` gives (a lazy-prefetch hook after the UNet's own group hook, which
    records the execution order in its first forward and then chains the groups for prefetching), without a CUDA
    stream: diffusers refuses streams on the CPU. Block level only (the UNet has its own group there)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import LazyPrefetchGroupOffloadingHook

    HookRegistry.check_if_exists_or_initialize(unet).register_hook(
        LazyPrefetchGroupOffloadingHook(), "lazy_prefetch_group_offloading"
    )


@needs_diffusers("0.33", "group offloading and diffusers hooks")
@pytest.mark.parametrize(
    "mode",
    ["block_level", "block_level_2_per_group", "block_level_prefetch", "block_level_prefetch_chained", "leaf_level"],
)
def test_no_group_is_left_onloaded_after_a_call(fresh_pipe, onloaded, mode):
    state, calls = onloaded
    pipe = fresh_pipe()
    reference = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
    offload_type = "leaf_level" if mode.startswith("leaf") else "block_level"
    blocks = 2 if mode == "block_level_2_per_group" else None if offload_type == "leaf_level" else 1
    pipe.unet.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        num_blocks_per_group=blocks,
    )
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    if "prefetch" in mode:
        _install_lazy_prefetch(pipe.unet)
    if mode.endswith("chained"):
        # a whole forward first (a sibling pipeline's): the prefetch chain runs on past the exit, up_blocks.2 -> .3
        pipe.unet(latents, 10, encoder_hidden_states=pipe.encode_prompt("")[0], return_dict=False)
    names = _group_names(pipe.unet)
    for seed in range(3):
        before = calls["onload"]
        out = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
        assert calls["onload"] > before, "no group was onloaded: the test would prove nothing"
        assert {names.get(i, "?") for i in state} == set(), f"left onloaded after call {seed}"
        np.testing.assert_array_equal(out.density_maps, reference.density_maps)
    features = pipe.capture_features(_images(), generator=torch.Generator().manual_seed(0), **CALL)
    assert features.num_images == 2 and not state
    if mode.endswith("prefetch"):
        # the lazy-prefetch hook settled after the first call (removed, groups chained) instead of recording forever
        registry = pipe.unet._diffusers_hook
        assert registry.get_hook("lazy_prefetch_group_offloading") is None
        tracked = [
            name
            for name, m in pipe.unet.named_modules()
            if "layer_execution_tracker" in getattr(m, "_diffusers_hook", HookRegistry(m)).hooks
        ]
        # diffusers removes the trackers of the modules that ran; the one after the exit keeps its own
        assert tracked == ["up_blocks.3"]
        assert registry.get_hook("group_offloading").next_group is not None
    # the shared UNet still runs whole forwards (e.g. a sibling pipeline made with from_pipe), offloading everything
    pipe.unet(latents, 10, encoder_hidden_states=pipe.encode_prompt("")[0], return_dict=False)
    assert not state


@pytest.fixture
def placements(monkeypatch):
    """Every `.to(device)` of a UNet or a safety checker, as `(class name, torch.device)`, and "analysis" when the
    analysis starts. The CPU stands in for the accelerator: the execution device is `cpu:0` (with an index), the
    offload device `cpu` (without)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    import cosegment.pipeline_cosegment as module

    events = []
    for cls in (UNet2DConditionModel, StableDiffusionSafetyChecker):
        original = cls.to

        def to(self, *args, _original=original, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if isinstance(device, (str, torch.device)):
                events.append((type(self).__name__, torch.device(device)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "to", to)
    analyze = module.analyze_checked_features

    def analyze_checked_features(*args, **kwargs):
        events.append("analysis")
        return analyze(*args, **kwargs)

    monkeypatch.setattr(module, "analyze_checked_features", analyze_checked_features)
    return events


EXECUTION = torch.device("cpu", 0)


def test_model_cpu_offload_moves_the_unet_off_before_the_analysis(fresh_pipe, placements):
    pipe = fresh_pipe()
    reference = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._execution_device == EXECUTION
    placements.clear()
    out = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
    np.testing.assert_array_equal(out.density_maps, reference.density_maps)
    unet_moves = [e for e in placements[: placements.index("analysis")] if e[0] == "UNet2DConditionModel"]
    assert unet_moves[0][1] == EXECUTION, "the UNet never went to the execution device: the test proves nothing"
    assert unet_moves[-1][1] == torch.device("cpu"), f"the UNet stayed on the execution device: {unet_moves}"
    # capture_features releases the hooks the same way
    placements.clear()
    pipe.capture_features(_images(), generator=torch.Generator().manual_seed(0), **CALL)
    unet_moves = [e for e in placements if e[0] == "UNet2DConditionModel"]
    assert unet_moves[0][1] == EXECUTION and unet_moves[-1][1] == torch.device("cpu")


def test_the_safety_checker_never_goes_to_the_execution_device(tiny_sd1_path, placements):
    """(Sequential offload cannot be run on the CPU: accelerate's own `post_forward` fails there.)"""
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd1_path)
    pipe.set_progress_bar_config(disable=True)
    ran = []
    pipe.safety_checker.register_forward_pre_hook(lambda *_: ran.append(True))
    reference = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
    pipe.enable_model_cpu_offload(device="cpu")
    out = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
    np.testing.assert_array_equal(out.density_maps, reference.density_maps)
    assert ("UNet2DConditionModel", EXECUTION) in placements
    assert ("StableDiffusionSafetyChecker", EXECUTION) not in placements, placements
    assert not ran


@needs_diffusers("0.33", "group offloading and diffusers hooks")
def test_every_hook_that_saw_a_forward_start_sees_it_end(fresh_pipe):
    """Hooks (diffusers' and accelerate's) on the modules the early exit leaves in flight -- the UNet, up_blocks.2 and
    the read layer -- get one `post_forward` per `pre_forward`, innermost first, as after a completed forward."""
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module
    from diffusers.hooks import ModelHook

    pipe = fresh_pipe()
    log = []

    def counting(base, name):
        class Counting(base):
            def pre_forward(self, module, *args, **kwargs):
                log.append(("pre", name))
                return args, kwargs

            def post_forward(self, module, output):
                log.append(("post", name))
                return output

        return Counting()

    last = pipe.resolve_attention_layers()[-1]
    watched = {"unet": "", "block": "up_blocks.2", "layer": last, "after": "up_blocks.3"}
    for label, name in watched.items():
        module = pipe.unet.get_submodule(name)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(counting(ModelHook, label), "counting")
    add_hook_to_module(pipe.unet, counting(AccelerateHook, "unet-accelerate"), append=True)
    pipe.capture_features(_images(3), batch_size=2, generator=torch.Generator().manual_seed(0), **CALL)
    posts = [name for kind, name in log if kind == "post"]
    assert [name for kind, name in log if kind == "pre"] == ["unet-accelerate", "unet", "block", "layer"] * 2
    assert posts == ["layer", "block", "unet", "unet-accelerate"] * 2


@pytest.mark.parametrize(
    "mode",
    [
        "attention_slicing",
        pytest.param("layerwise_casting_fp8", marks=needs_diffusers("0.33", "enable_layerwise_casting")),
        "bfloat16",
    ],
)
def test_other_memory_saving_modes_keep_working(fresh_pipe, mode):
    pipe = fresh_pipe()
    kwargs = dict(generator=torch.Generator().manual_seed(0), **CALL)
    plain = pipe.capture_features(_images(), **kwargs)
    if mode == "attention_slicing":
        pipe.enable_attention_slicing(1)
        tolerance = 1e-5  # other layers slice: the same maths in another order
    elif mode == "layerwise_casting_fp8":
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        tolerance = 0.2  # weights rounded to fp8
    else:
        pipe.to(torch.bfloat16)
        tolerance = 0.1
    kwargs["generator"] = torch.Generator().manual_seed(0)
    features = pipe.capture_features(_images(), **kwargs)
    for a, b in zip(features.queries + features.keys, plain.queries + plain.keys):
        assert torch.isfinite(a).all()
        scale = b.abs().max()
        assert (a.float() - b).abs().max() <= tolerance * scale
    if mode == "attention_slicing":
        from diffusers.models.attention_processor import SlicedAttnProcessor

        assert isinstance(
            pipe.unet.attn_processors["up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor"],
            SlicedAttnProcessor,
        )
    out = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
    assert np.isfinite(out.entropy_maps).all()


def test_the_safety_checker_need_not_load(tiny_sd1_path):
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd1_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and "safety_checker" in pipe.components
    out = pipe(_images(), generator=torch.Generator().manual_seed(0), **CALL, **NO_FILTER)
    assert out.density_maps.shape == (2, 4, 4)


def test_progress_bars_are_labelled_unless_the_user_labels_them(tiny_pipe, photos):
    import io

    buffer = io.StringIO()
    tiny_pipe.set_progress_bar_config(file=buffer, mininterval=0)
    try:
        tiny_pipe(photos[:3], height=64, width=64, generator=torch.Generator().manual_seed(0))
        text = buffer.getvalue()
        assert "capture (UNet batches)" in text and "pair analysis (pairs)" in text and "3/3" in text
        buffer.seek(0)
        buffer.truncate()
        tiny_pipe.set_progress_bar_config(file=buffer, mininterval=0, desc="mine")
        tiny_pipe(photos[:2], height=64, width=64, generator=torch.Generator().manual_seed(0))
        text = buffer.getvalue()
        assert "mine" in text and "capture (UNet batches)" not in text and "pair analysis" not in text
    finally:
        tiny_pipe.set_progress_bar_config(disable=True)
