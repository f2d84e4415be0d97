"""The pipeline as a diffusers citizen (issue 12): a Tiny VAE, precomputed prompt embeddings, and the early exit
cooperating with diffusers' and accelerate's offloading hooks."""

import numpy as np
import pytest
import torch
from conftest import NO_FILTER
from diffusers import AutoencoderTiny

from cosegment import StableDiffusionCoSegmentationPipeline


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
    torch.testing.assert_close(pipe._encode_latents(pixels), expected, rtol=0, atol=0)
    assert expected.shape == (2, 4, 8, 8)
    # a VAE with another scaling factor scales its latents
    scaled = fresh_pipe(vae=tiny_autoencoder(scaling_factor=0.5))
    torch.testing.assert_close(scaled._encode_latents(pixels), 0.5 * expected, rtol=0, atol=0)
    # AutoencoderKL keeps its convention: the mode of the latent distribution times its scaling factor
    kl = fresh_pipe()
    want = kl.vae.encode(pixels).latent_dist.mode() * kl.vae.config.scaling_factor
    torch.testing.assert_close(kl._encode_latents(pixels), want, rtol=0, atol=0)


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
    embeds = tiny_pipe.encode_prompt("a cat")  # device defaults to the execution device
    assert embeds.shape == (1, 77, 32) and embeds.device == tiny_pipe._execution_device
    torch.testing.assert_close(embeds, tiny_pipe.encode_prompt("a cat", "cpu"), rtol=0, atol=0)
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
    embeds = tiny_pipe(images, prompt_embeds=tiny_pipe.encode_prompt("a dog"), **kwargs)
    np.testing.assert_array_equal(text.density_maps, embeds.density_maps)
    assert torch.equal(text.features.keys[0], embeds.features.keys[0])
    # other embeddings (a shorter sequence, in float64: cast to the UNet's dtype) give other features
    kwargs["generator"] = torch.Generator().manual_seed(5)
    other = tiny_pipe(images, prompt_embeds=torch.randn(1, 5, 32, dtype=torch.float64), **kwargs)
    assert other.features.keys[0].dtype == torch.float32
    assert not torch.allclose(other.features.keys[0], text.features.keys[0])
