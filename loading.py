"""Saving and loading `StableDiffusionCoSegmentationPipeline` (DESIGN section 3): which code files a self-loading
folder copies, its list-form `_class_name`, the Hub upload after the code is written, the list read back as the plain
class name, and diffusers' empty float32 notice dropped in `from_pipe`.

A root module beside `pipeline_cosegment.py`, which imports it and `.utils.files` (which this module uses) so that
diffusers' custom-pipeline loader copies both.
"""

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from diffusers.utils import logging

from .utils.files import copy_file, write_text

# `save_pretrained(push_to_hub=True, ...)` arguments that go to the upload, not to diffusers' save
HUB_ARGUMENTS = ("repo_id", "token", "private", "commit_message", "create_pr")


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


def write_code_files(save_directory: str, pipeline_file: str, class_name: str) -> None:
    """Copies `pipeline_file` and the modules it imports relatively (:func:`pipeline_code_files`, from its folder)
    into `save_directory`, and names the class in the folder's `model_index.json` in list form, `[module name of
    pipeline_file, class_name]`, so that the folder loads itself with only diffusers installed."""
    source_dir = os.path.dirname(os.path.abspath(pipeline_file))
    for relative in pipeline_code_files(pipeline_file):
        destination = os.path.join(save_directory, relative)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        copy_file(os.path.join(source_dir, relative), destination)
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as handle:
        model_index = json.load(handle)
    module_name = os.path.splitext(os.path.basename(pipeline_file))[0]
    model_index["_class_name"] = [module_name, class_name]
    write_text(index_path, json.dumps(model_index, indent=2, sort_keys=True) + "\n")


def push_folder(save_directory: str, hub: dict, class_name: str) -> None:
    """Uploads `save_directory` to the Hugging Face Hub; `hub` holds the caller's :data:`HUB_ARGUMENTS` (`repo_id`
    defaults to the folder's name, the commit message to "Upload `class_name`"), as diffusers' `push_to_hub`."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = hub.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
    repo_id = create_repo(repo_id, exist_ok=True, private=hub.get("private"), token=hub.get("token")).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=save_directory,
        token=hub.get("token"),
        commit_message=hub.get("commit_message") or f"Upload {class_name}",
        create_pr=hub.get("create_pr", False),
    )


def plain_class_name(loaded, own_names: set[str], class_name: str):
    """`ConfigMixin.load_config`'s result (a config or a tuple starting with it), with a list-form `_class_name`
    whose class is one of `own_names` replaced by the plain `class_name` (in place); other lists are left as they are.

    :func:`write_code_files` writes `["pipeline_cosegment", "StableDiffusionCoSegmentationPipeline"]` so that the
    folder loads itself with only diffusers (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`).
    Diffusers would load the folder's copy of the code for that list even when the caller names a class (and refuse
    without `trust_remote_code`); read through the pipeline class, the list becomes the plain class name.
    """
    config = loaded[0] if isinstance(loaded, tuple) else loaded
    listed = config.get("_class_name")
    if isinstance(listed, (list, tuple)) and len(listed) == 2 and listed[1] in own_names:
        config["_class_name"] = class_name
    return loaded


def drop_empty_fp32_notice(record) -> bool:
    """A `logging` filter: False (drop) for diffusers' float32-modules notice when its list is empty.

    diffusers 0.42's `ModelMixin.to(dtype=...)` warns "There are modules in UNet2DConditionModel that should be kept in
    float32: []" whenever a dtype is passed, even for an empty list, and `from_pipe` always passes one: the notice
    printed once per model (UNet, VAE) says nothing. A real list of float32 modules is still reported.
    """
    return "should be kept in float32: []." not in record.getMessage()


@contextmanager
def without_empty_fp32_notice() -> Iterator[None]:
    """While the block runs, diffusers' model logger drops its empty float32-modules notice
    (:func:`drop_empty_fp32_notice`); the filter is removed afterwards, whatever happens."""
    model_logger = logging.get_logger("diffusers.models.modeling_utils")
    model_logger.addFilter(drop_empty_fp32_notice)
    try:
        yield
    finally:
        model_logger.removeFilter(drop_empty_fp32_notice)
