"""A tiny random Stable-Diffusion-2-shaped pipeline built offline, for tests, examples and benchmarks.

Random weights carry no semantics: use it to check shapes, coordinates and plumbing, never method quality.
"""

from __future__ import annotations

import json
import os

import torch

from .utils.files import write_text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (CLIP's tokenizer uses the same)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _write_tokenizer_files(folder: str) -> tuple[str, str]:
    """A byte-level CLIP vocabulary (every byte, alone and word-final, plus the special tokens) and a few merges."""
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "a n", "i n", "o n</w>"]
    vocab_list += [m.replace(" ", "") for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    os.makedirs(folder, exist_ok=True)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    write_text(vocab_file, json.dumps(vocab))
    write_text(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def make_tiny_stable_diffusion(folder: str | None = None, sample_size: int = 32, seed: int = 0, version: str = "2"):
    """Builds (and saves to `folder` when given) a tiny random `StableDiffusionPipeline` shaped like SD 2.x (or 1.x).

    Four UNet levels like SD (so sizes are multiples of 64 and `up_blocks.2` reads 1/2 of the latent grid), a VAE
    with scale factor 8, a 2-layer CLIP text encoder and a byte-level tokenizer with `model_max_length=77`. At
    `sample_size=32` the processing size is 256 px and `up_blocks.2` has 16 x 16 tokens.

    `version="2"` (SD 2.x): linear attention projections, per-level head dimensions (`attention_head_dim` a tuple),
    no safety checker. `version="1"` (SD 1.x): convolutional projections, `attention_head_dim` an int (which diffusers
    reads as the number of heads, as SD 1.x's configs do), and a tiny safety checker with its feature extractor and
    `requires_safety_checker=True`, as in SD 1.x repositories.

    Returns:
        the `StableDiffusionPipeline` (float32, CPU).
    """
    if version not in ("1", "2"):
        raise ValueError(f"`version` must be '1' or '2', got {version!r}.")
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    # the random weights are drawn in this order: UNet, VAE, text encoder, safety checker
    unet = _tiny_unet(sample_size, version)
    vae = _tiny_vae(sample_size)
    text_encoder = _tiny_text_encoder()
    safety_checker, feature_extractor = _tiny_safety_checker() if version == "1" else (None, None)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        unet=unet,
        scheduler=_tiny_scheduler(),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=version == "1",
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def _tiny_unet(sample_size: int, version: str):
    """An SD-shaped `UNet2DConditionModel` (four levels, widths 32-64), random weights from torch's global RNG."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4, 4) if version == "2" else 2,
        use_linear_projection=version == "2",
        norm_num_groups=16,
    )


def _tiny_vae(sample_size: int):
    """An `AutoencoderKL` with scale factor 8 (four levels) and 4 latent channels, random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    )


def _tiny_text_encoder():
    """A 2-layer CLIP text encoder of width 32 with 77 positions, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu",
        )
    )


def _tiny_tokenizer():
    """A `CLIPTokenizer` over the byte-level vocabulary of :func:`_write_tokenizer_files`, `model_max_length=77`."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = _write_tokenizer_files(tmp)
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)


def _tiny_scheduler():
    """SD's `PNDMScheduler` configuration (scaled-linear betas over 1000 training steps)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_safety_checker():
    """SD 1.x's optional components, tiny: a `StableDiffusionSafetyChecker` (random weights) and its
    `CLIPImageProcessor`."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    vision.update({"image_size": 32, "patch_size": 8})
    text = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    safety_checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    return safety_checker, CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
