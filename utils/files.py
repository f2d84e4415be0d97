"""Writing files the way the rest of the process does (no pickle: safetensors and JSON only)."""

from __future__ import annotations

import os

import torch


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, with the file's permissions taken from the umask like any other file.

    safetensors writes through a private temporary file and renames it, so its files come out `0600` (readable by
    the owner only) while the JSON and PNG files written beside them are `0666 & ~umask` (usually `0644`).
    """
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
