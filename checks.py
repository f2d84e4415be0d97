"""Input checks of `StableDiffusionCoSegmentationPipeline` (DESIGN 2b): every argument is checked once, where it
enters, with a `ValueError`/`TypeError` naming it and the value it got; what the checks resolve travels on as
[`CheckedInputs`], so that nothing is resolved twice.

A root module beside `pipeline_cosegment.py`, which imports it (and `.features`, `.settings`, `.utils.images`, which
it uses) so that diffusers' custom-pipeline loader copies them.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .features import CoSegmentationFeatures, _is_int
from .settings import AnalysisSettings
from .utils.images import describe as _describe


@dataclass
class CheckedInputs:
    """What :meth:`StableDiffusionCoSegmentationPipeline.check_inputs` resolved, so that nothing is resolved twice.

    Attributes:
        images (`list[torch.Tensor]`): the collection converted once, `(3, H_i, W_i)` float32 in [0, 1].
        height (`int`), width (`int`): the processing size in pixels.
        layer_names (`list[str]`): the self-attention modules to read, in the UNet's order.
        grid_size (`tuple[int, int]`): their token grid `(h, w)` at the processing size.
        settings ([`AnalysisSettings`]): the checked analysis arguments.
        timestep (`int`), ensemble_size (`int`), batch_size (`int`): the capture's, as Python ints.
    """

    images: list
    height: int
    width: int
    layer_names: list[str]
    grid_size: tuple[int, int]
    settings: AnalysisSettings
    timestep: int
    ensemble_size: int
    batch_size: int


def check_prompt(
    prompt: str | None, prompt_embeds: torch.Tensor | None, embedding_dim: int, has_text_encoder: bool = True
) -> None:
    """`prompt` (a str or None) and `prompt_embeds` (None or a finite float `(1, L, embedding_dim)` tensor) are
    exclusive, as in diffusers' pipelines, and a pipeline without a text encoder needs `prompt_embeds`;
    `TypeError`/`ValueError` naming the argument otherwise."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str or None, got {type(prompt).__name__}: {_describe(prompt)}.")
    if prompt_embeds is None:
        if not has_text_encoder:
            raise ValueError(
                "`prompt_embeds` is required: this pipeline has no `text_encoder` (it was made with "
                "`text_encoder=None`), so it cannot encode a prompt. Pass `prompt_embeds` (`(1, L, C)`, e.g. from "
                "another pipeline's `encode_prompt`)."
            )
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


def check_capture_numbers(
    height, width, multiple: int, timestep, num_train_timesteps: int, ensemble_size, batch_size
) -> None:
    """`height` and `width` positive multiples of `multiple`, `timestep` an int in `[0, num_train_timesteps)`,
    `ensemble_size` and `batch_size` ints >= 1; `ValueError` naming the first that is not."""
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value <= 0 or value % multiple:
            raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {_describe(value)}.")
    if not _is_int(timestep) or not 0 <= timestep < num_train_timesteps:
        raise ValueError(f"`timestep` must be an int in [0, {num_train_timesteps}), got {_describe(timestep)}.")
    for name, value in (("ensemble_size", ensemble_size), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {_describe(value)}.")


def check_paper_grid(selection: str, grid_size: tuple[int, int], attention_layers, height: int, width: int) -> None:
    """`selection="paper"` scales its entropy limit by `log N` (DESIGN step 7), so it needs a token grid of 2 or more
    tokens; `ValueError` naming the layers and the processing size that gave `grid_size` otherwise."""
    if selection == "paper" and grid_size[0] * grid_size[1] < 2:
        raise ValueError(
            f"`selection`='paper' needs a token grid of 2+ tokens; `attention_layers`={attention_layers!r} at "
            f"{height}x{width} px gives {grid_size}."
        )


def check_generator(generator, num_images: int | None = None) -> None:
    """`generator`: None, a `torch.Generator` or a list of them (`TypeError` otherwise); with `num_images`, a list
    must hold one per image (`ValueError`)."""
    generators = [] if generator is None else generator if isinstance(generator, list) else [generator]
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(
            f"`generator` must be a torch.Generator or a list of them (one per image), got {_describe(generator)}."
        )
    if num_images is not None and isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(
            f"`generator` list must hold one generator per image ({num_images} images), got {len(generator)}."
        )


def select_attention_layers(levels: dict[str, int], attention_layers: str | Sequence[str] | int | None) -> list[str]:
    """The self-attention modules `attention_layers` names, among `levels` (module name -> level: the layer's grid is
    1/2**level of the latent grid, in the UNet's module order). See
    :meth:`StableDiffusionCoSegmentationPipeline.resolve_attention_layers` for the forms it takes; all chosen layers
    must share one level, else `ValueError`."""
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


def check_image_indices(image_indices: Sequence[int], num_images: int) -> list[int]:
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


def check_reference_argument(reference, grid_size: tuple[int, int]) -> CoSegmentationFeatures | str | None:
    """`__call__`'s `reference`: `None`, `"auto"` (returned as they are) or features whose token grid is
    `grid_size` (the capture's; their layers, heads and head size are checked once the features exist,
    :func:`~cosegment.analysis.check_reference`); `ValueError`/`TypeError` otherwise."""
    if reference is None:
        return None
    if isinstance(reference, str):
        if reference != "auto":
            raise ValueError(f"`reference` must be 'auto', None or CoSegmentationFeatures, got {reference!r}.")
        return reference
    if not isinstance(reference, CoSegmentationFeatures):
        raise TypeError(f"`reference` must be 'auto', None or CoSegmentationFeatures, got {_describe(reference)}.")
    if tuple(reference.grid_size) != tuple(grid_size):
        raise ValueError(f"`reference` has token grid {tuple(reference.grid_size)}; this call captures {grid_size}.")
    return reference


def blank_images(num_images: int, size: int) -> torch.Tensor:
    """`capture_reference`'s images: `num_images` (an int >= 2, else `ValueError`) mid-grey `size` x `size` RGB."""
    if not _is_int(num_images) or num_images < 2:
        raise ValueError(f"`num_images` must be an int >= 2, got {_describe(num_images)}.")
    return torch.full((int(num_images), 3, size, size), 0.5)


def check_flip(flip) -> None:
    """`flip` (mirrored captures, issue 27) must be a bool."""
    if not isinstance(flip, bool):
        raise TypeError(f"`flip` must be a bool, got {_describe(flip)}.")
