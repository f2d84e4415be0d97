"""Steps 1-3 of DESIGN (encode, noise, capture) as functions of the pipeline's modules, which
`StableDiffusionCoSegmentationPipeline` calls in order: the VAE's latents, the noise at one timestep, one UNet forward
per batch with the capture processors installed, and the captured queries and keys as [`CoSegmentationFeatures`].

A root module beside `pipeline_cosegment.py`, which imports it (and `.checks`, `.features`,
`.processors.cross_self_attention`, which it uses) so that diffusers' custom-pipeline loader copies them.
"""

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor

from .checks import CheckedInputs
from .features import CoSegmentationFeatures
from .processors.cross_self_attention import (
    AttentionStore,
    CrossSelfAttentionCaptureProcessor,
    StopForward,
    capture_stops_early,
    compiled_prefix,
    finish_interrupted_forward,
    unwrap_module,
)

NO_TEXT_ENCODER = (
    "This pipeline has no `text_encoder` or `tokenizer` (it was made with `text_encoder=None`): pass `prompt_embeds` "
    "(`(1, L, C)`, e.g. from another pipeline's `encode_prompt`) instead of a prompt."
)


def encode_text(
    tokenizer, text_encoder, prompt: str | list[str], device, clip_skip: int | None = None
) -> torch.Tensor:
    """`prompt` (one str or a list) -> `(B, L, C)` CLIP text embeddings, padded to the tokenizer's maximum length, as
    diffusers' Stable Diffusion pipelines compute them (`clip_skip`: the hidden state that many layers before the last,
    through the final layer norm). `ValueError` naming `prompt_embeds` when the pipeline has no text encoder."""
    if tokenizer is None or text_encoder is None:
        raise ValueError(NO_TEXT_ENCODER)
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"`clip_skip` must be a non-negative int or None, got {clip_skip!r}.")
    tokens = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(device)
    ids = tokens.input_ids.to(device)
    if clip_skip is None:
        return text_encoder(ids, attention_mask=attention_mask)[0]
    hidden = text_encoder(ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it; 5 does not
    return text_model.final_layer_norm(hidden[-(clip_skip + 1)])


@contextlib.contextmanager
def lora_scaled(text_encoder, lora_scale: float | None):
    """LoRA layers of `text_encoder` scaled by `lora_scale` inside the block (PEFT backend, as diffusers does), back to
    their scale on leaving it; nothing without a scale or without PEFT."""
    scaled = lora_scale is not None and USE_PEFT_BACKEND and text_encoder is not None
    if scaled:
        scale_lora_layers(text_encoder, lora_scale)
    try:
        yield
    finally:
        if scaled:
            unscale_lora_layers(text_encoder, lora_scale)


def resize_images(images: list[torch.Tensor], height: int, width: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`(3, H_i, W_i)` images in [0, 1] -> `(M, 3, height, width)` float32 in [-1, 1], each resized (bicubic,
    antialiased, clamped to [0, 1]) to the processing size, and each image's original `(H_i, W_i)`."""
    tensors, sizes = [], []
    for tensor in images:
        sizes.append((int(tensor.shape[1]), int(tensor.shape[2])))
        resized = F.interpolate(tensor[None], size=(height, width), mode="bicubic", antialias=True)
        tensors.append(resized.clamp(0.0, 1.0))
    return torch.cat(tensors) * 2.0 - 1.0, sizes


def encoder_latents(encoder_output) -> torch.Tensor:
    """The latents a VAE encoder returned: the mode of `AutoencoderKL`'s latent distribution, or `AutoencoderTiny`'s
    deterministic `latents` (diffusers' `retrieve_latents(..., sample_mode="argmax")`, written here because importing
    it loads diffusers' Stable Diffusion pipelines and with them transformers' image-processor notices)."""
    if hasattr(encoder_output, "latent_dist"):
        return encoder_output.latent_dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise AttributeError(f"the VAE's encoder returned {type(encoder_output).__name__}, with no latents")


def encode_pixels(vae, pixels: torch.Tensor, batch_size: int, device, memory_format) -> torch.Tensor:
    """Step 1: `(M, 3, H, W)` pixels in [-1, 1] -> `(M, C, h, w)` NCHW latents as the UNet expects them,
    `batch_size` images per `vae.encode`: the mode of an `AutoencoderKL`'s latent distribution or an
    `AutoencoderTiny`'s (TAESD) encoder output, whichever the VAE returns (:func:`encoder_latents`), times
    `vae.config.scaling_factor` (1.0 for TAESD: its `latent_shift`/`latent_magnitude` only pack latents into bytes),
    as diffusers' img2img pipelines do. Each batch goes to `device` in the VAE's dtype and in `memory_format`: the
    input's layout, not the shared module's, decides the VAE convolutions' memory format."""
    latents = []
    for start in range(0, pixels.shape[0], batch_size):
        batch = pixels[start : start + batch_size].to(device=device, dtype=vae.dtype, memory_format=memory_format)
        encoded = encoder_latents(vae.encode(batch))
        latents.append(encoded * vae.config.scaling_factor)
    # the UNet gets NCHW latents whatever the VAE's layout (a channels_last UNet input measured no faster on CPU;
    # a user's `unet.to(memory_format=torch.channels_last)` converts at its first convolution)
    return torch.cat(latents).contiguous()


def noise_latents(
    scheduler_config, latents: torch.Tensor, noise: torch.Tensor, timestep: int, device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: `latents` `(B, C, h, w)` noised with `noise` at `timestep` by DDIM's `add_noise` on the schedule of
    `scheduler_config` (Euler-type schedulers cannot add noise at an arbitrary timestep). Returns the noisy latents
    in `dtype` and the `(B,)` timesteps (long, on `device`)."""
    noise_scheduler = DDIMScheduler.from_config(scheduler_config)
    timesteps = torch.full((latents.shape[0],), timestep, device=device, dtype=torch.long)
    return noise_scheduler.add_noise(latents, noise, timesteps).to(dtype), timesteps


def capture_processors(unet, store: AttentionStore, layer_names: list[str]) -> tuple[dict, dict]:
    """The UNet's processors as they are (to restore), and the same with a capture processor writing to `store` on
    each of `layer_names` (keys as `unet.attn_processors` names them)."""
    originals = dict(unet.attn_processors)
    processors = dict(originals)
    for name in layer_names:
        processors[f"{name}.processor"] = CrossSelfAttentionCaptureProcessor(store, name)
    return originals, processors


def capture_queries_keys(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    layer_names: list[str],
    batch_size: int,
    stop_early: bool,
    progress_bar,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step 3: one UNet forward per batch of `noisy` `(B, C, h, w)` at `timesteps` `(B,)`, conditioned on
    `prompt_embeds` `(1, L, C)`, with the capture processors on `layer_names`; the original processors come back in
    `finally`. `stop_early`: end each forward after the last read layer. `progress_bar(total, label)` makes the bar
    (a context manager with `update()`). Returns the queries and keys, one `(B, H, N, d)` per layer."""
    # eager: the early exit is an exception; compiled: a compiled forward that returns after the last read layer
    # (`compiled_prefix`), or the whole forward where that does not apply (see `capture_stops_early`)
    prefix = compiled_prefix(unet, layer_names) if stop_early else None
    store = AttentionStore(layer_names, stop_after_last=capture_stops_early(unet, stop_early))
    originals, processors = capture_processors(unet, store, layer_names)
    total = noisy.shape[0]
    try:
        # inside the try: an interrupt while installing still restores every original processor
        unet.set_attn_processor(dict(processors))
        with progress_bar(math.ceil(total / batch_size), "capture (UNet batches)") as bar:
            for start in range(0, total, batch_size):
                chunk = noisy[start : start + batch_size]
                condition = prompt_embeds.expand(chunk.shape[0], -1, -1)
                forward_batch(unet, prefix, store, chunk, timesteps[start : start + batch_size], condition)
                bar.update()
    finally:
        unet.set_attn_processor(dict(originals))
    return store.take()


def forward_batch(unet, prefix, store: AttentionStore, latents, timesteps, condition) -> None:
    """Step 3 for one batch: the UNet forward (or the compiled `prefix` that returns after the last read layer) over
    `latents` `(B, C, h, w)` at `timesteps` `(B,)` with `condition` `(B, L, C)`; the capture processors fill `store`.
    An eager early exit (`StopForward`) finishes the hooks of the modules it skipped (offloading) as a whole forward
    would."""
    store.begin_forward()
    try:
        if prefix is not None:
            prefix(latents, timesteps, condition)
        else:
            unet(latents, timesteps, encoder_hidden_states=condition, return_dict=False)
    except StopForward:
        finish_interrupted_forward(unwrap_module(unet), store.stopped_at)


def reference_cache_key(checked: CheckedInputs, num_images: int, config, unet, device) -> tuple:
    """The key of `capture_reference`'s cache: processing size, timestep, layers, `num_images`, the model's
    `_name_or_path`, the UNet object, its dtype and the execution device."""
    size = (checked.height, checked.width, checked.timestep, tuple(checked.layer_names), int(num_images))
    return (*size, getattr(config, "_name_or_path", None), id(unet), str(unet.dtype), str(device))


def draw_noise(
    num_images: int,
    ensemble_size: int,
    shape: tuple[int, ...],
    generator,
    device,
    dtype,
    image_indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """The body of `StableDiffusionCoSegmentationPipeline.prepare_noise` (see there): `ensemble_size` draws of
    `shape` per image, in image order from `generator` (or `generator[i]`), those of `image_indices` kept."""
    noises = []
    for index in range(num_images):
        gen = generator[index] if isinstance(generator, list) else generator
        noises.append(randn_tensor((ensemble_size, *shape), generator=gen, device=device, dtype=dtype))
    if image_indices is not None:
        noises = [noises[index] for index in image_indices]
    return torch.cat(noises)


def features_from_capture(
    checked: CheckedInputs,
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    model: str | None,
    prompt: str | None,
    flip: bool = False,
) -> CoSegmentationFeatures:
    """The captured queries and keys, one `(M * E, H, N, d)` image-major tensor per layer of `checked.layer_names`
    (`E = checked.ensemble_size`), as [`CoSegmentationFeatures`]: one `(M, H, N, d)` entry per (layer, noise draw),
    named `layer#draw` when `E > 1`, with the capture's settings as metadata (`model`: the pipeline's
    `_name_or_path`; `prompt`: None when the caller passed `prompt_embeds`). With `flip`, each tensor holds `2 M * E`
    rows, the originals then the same images flipped left-right: those become `features.mirrored` (metadata
    `"mirrored": True`)."""
    if flip:
        half = len(image_sizes) * checked.ensemble_size
        features = features_from_capture(
            checked, [q[:half] for q in queries], [k[:half] for k in keys], image_sizes, model, prompt
        )
        mirrored = features_from_capture(
            checked, [q[half:] for q in queries], [k[half:] for k in keys], image_sizes, model, prompt
        )
        mirrored.metadata["mirrored"] = True
        features.mirrored = mirrored
        features.validate()
        return features
    num_images, ensemble_size = len(image_sizes), checked.ensemble_size
    entries_q, entries_k, entry_names = [], [], []
    for name, q, k in zip(checked.layer_names, queries, keys):
        q = q.view(num_images, ensemble_size, *q.shape[1:])
        k = k.view(num_images, ensemble_size, *k.shape[1:])
        for draw in range(ensemble_size):
            entries_q.append(q[:, draw])
            entries_k.append(k[:, draw])
            entry_names.append(name if ensemble_size == 1 else f"{name}#{draw}")
    metadata = {
        "model": model,
        "height": checked.height,
        "width": checked.width,
        "timestep": checked.timestep,
        "ensemble_size": ensemble_size,
        "prompt": prompt,  # None when the caller passed `prompt_embeds`
        "layers": checked.layer_names,
    }
    return CoSegmentationFeatures(entries_q, entries_k, checked.grid_size, image_sizes, entry_names, metadata)
