"""Atomic file writing: a file appears under its final name complete, or not at all.

Every writer here writes to a temporary file in the destination's folder (a hidden name holding
:data:`TEMPORARY_MARK`, ending with the destination's extension), flushes it to disk (`fsync`), then renames it over
the destination (`os.replace`, atomic on POSIX and Windows within one file system). An exception or a signal while
writing (a full disk, Ctrl-C) removes the temporary file and leaves the previous file, or none, under the final name.
Only a process killed outright (SIGKILL, power loss) can leave a temporary file behind: :func:`remove_temporaries`
clears them.

This module imports nothing from its `utils/` siblings (diffusers' loader rule, DESIGN section 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator

# In the name of every temporary file, and nowhere else: `.results.json.partial-1234-9f3a.json`.
TEMPORARY_MARK = ".partial-"


def temporary_path(path: str | os.PathLike) -> str:
    """A fresh temporary name beside `path`: hidden, holding :data:`TEMPORARY_MARK`, same extension (writers such as
    OpenCV choose the format from it)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    extension = os.path.splitext(name)[1]
    return os.path.join(folder, f".{name}{TEMPORARY_MARK}{os.getpid()}-{secrets.token_hex(4)}{extension}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one :func:`temporary_path` makes."""
    name = os.path.basename(name)
    return name.startswith(".") and TEMPORARY_MARK in name


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path for a writer that takes a file name; when the block ends without an exception, the
    file written there gets a new file's usual permissions (`0666 & ~umask`), is flushed to disk and renamed to
    `path`. On any exception (`KeyboardInterrupt` included) the
    temporary file is removed and the exception re-raised: `path` keeps its previous content, or stays absent.

    Example:
        `with atomic_path("out.safetensors") as temporary: save_file(tensors, temporary)`
    """
    path = os.fspath(path)
    temporary = temporary_path(path)
    try:
        yield temporary
        if not os.path.isfile(temporary):
            raise FileNotFoundError(f"the writer of {path!r} wrote nothing at {temporary!r}")
        # A new file's usual permissions (`0666 & ~umask`), also where the writer made a private file (safetensors
        # writes `0600` files)
        os.chmod(temporary, 0o666 & ~_umask())
        descriptor = os.open(temporary, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_folder(os.path.dirname(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = None) -> Iterator:
    """`open(path, mode)` made atomic (see :func:`atomic_path`): `mode` is `"w"` (text, `encoding` defaults to
    UTF-8) or `"wb"`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"`mode` must be 'w' or 'wb', got {mode!r}.")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as temporary:
        with open(temporary, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically, in UTF-8."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, document, **dumps_arguments) -> None:
    """Writes `json.dumps(document, **dumps_arguments)` and a newline to `path` atomically."""
    write_text(path, json.dumps(document, **dumps_arguments) + "\n")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata)`, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


# safetensors' names of the dtypes `save_safetensors_streamed` writes
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def save_safetensors_streamed(entries, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of tensors made one at a time, atomically: `entries` lists `(name, dtype, shape, make)`,
    `make()` returning that tensor when its turn comes, so that at most one is in memory (thousands of masks). The
    same format as `save_safetensors` (8-byte header length, JSON header, then each tensor's bytes, the larger
    element sizes first so that every tensor stays aligned); `ValueError` when a made tensor has another dtype or
    shape than announced."""
    import math
    import struct

    import torch

    def size_of(dtype) -> int:
        return torch.empty(0, dtype=dtype).element_size()

    entries = sorted(entries, key=lambda entry: (-size_of(entry[1]), entry[0]))
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name, dtype, shape, _ in entries:
        end = offset + math.prod(shape) * size_of(dtype)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")], "shape": list(shape)}
        header[name]["data_offsets"] = [offset, end]
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape, make in entries:
            tensor = make().detach().contiguous().cpu()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"`{name}` was announced {dtype} {tuple(shape)}, made {tensor.dtype} {tuple(tensor.shape)}."
                )
            handle.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def save_png(path: str | os.PathLike, picture) -> None:
    """Saves an `(H, W, 3)` or `(H, W)` uint8 array (or a PIL image) as a PNG file, atomically (PIL's encoder)."""
    import numpy as np
    import PIL.Image

    image = picture if isinstance(picture, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(picture))
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG")


def copy_file(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """`shutil.copyfile(source, destination)`, atomically."""
    import shutil

    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)


def find_temporaries(folder: str | os.PathLike) -> list[str]:
    """Paths of the temporary files (see :func:`is_temporary`) under `folder`, recursively, sorted."""
    found = []
    for root, _, names in os.walk(os.fspath(folder)):
        found.extend(os.path.join(root, name) for name in names if is_temporary(name))
    return sorted(found)


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
    """Removes the temporary files a killed writer left under `folder` (recursively); returns their paths. Call it
    only when no other process writes there."""
    removed = []
    for path in find_temporaries(folder):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
    return removed
