"""Image collections -> validated float tensors (DESIGN 2b "Inputs"): pure functions, no pipeline.

Accepted: PIL images (any mode; 16-bit and float kept exact), numpy HW/HWC (uint8, uint16, bool, float in [0, 1]),
torch HW/CHW (float in [0, 1], uint8, bool); a list or tuple is the collection, one 4-D batch (torch BCHW, numpy
BHWC) with B >= 2 too. Grayscale and RGBA become RGB. Errors are `ValueError`/`TypeError` naming `image[i]`.
"""

from typing import Any

import numpy as np
import PIL.Image
import torch

# Float pixels must lie in [0, 1]. Values further outside than this are another convention ([0, 255], [-1, 1]) and
# are refused rather than clipped into a near-constant image; smaller overshoots (resampling ringing) are clipped.
FLOAT_IMAGE_TOLERANCE = 0.05


def preferred_memory_format(device: torch.device | str) -> torch.memory_format:
    """The memory format in which image-like `(B, C, H, W)` inputs run fastest through convolutions on `device`.

    `torch.channels_last` on CPU (oneDNN's convolutions are faster on NHWC data: measured in BENCHMARKS.md) and on
    CUDA (cuDNN's tensor-core convolutions are NHWC; PyTorch's and diffusers' advice, not measured here);
    `torch.contiguous_format` elsewhere. Only the input's layout is chosen: a convolution whose input is
    `channels_last` returns `channels_last`, so the layout carries through a module without converting its weights.
    """
    device_type = torch.device(device).type
    return torch.channels_last if device_type in ("cpu", "cuda") else torch.contiguous_format


class CheckedImages(list):
    """Images already validated and converted by `check_inputs`: `(3, H_i, W_i)` float32 tensors in [0, 1]."""


def describe(value: Any, limit: int = 80) -> str:
    """A short description of an argument for error messages (arrays by type, shape and dtype, not by value)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__module__.split('.')[0]}.{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, PIL.Image.Image):
        return f"PIL image (mode {value.mode}, size {value.size})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({type(value).__name__})"


def collect_images(image) -> list[torch.Tensor]:
    """The collection -> a list of `(3, H_i, W_i)` float32 tensors in [0, 1], each validated.

    A list (or tuple) is the collection; a 4-D torch (BCHW) or numpy (BHWC) batch is a collection of B images.
    A `CheckedImages` list (what this function returns) is returned as is.
    """
    if isinstance(image, CheckedImages):
        return image
    if image is None:
        raise ValueError("`image` must be a list of at least 2 images, got None.")
    if isinstance(image, (torch.Tensor, np.ndarray)):
        if image.ndim != 4:
            layout = "BCHW tensor" if isinstance(image, torch.Tensor) else "BHWC array"
            raise ValueError(
                f"`image` must be a list of 2+ images or a 4-D {layout} with B >= 2, got one "
                f"{describe(image)}; a single image is not a collection."
            )
        items = list(image)
    elif isinstance(image, (list, tuple)):
        items = list(image)
    elif isinstance(image, PIL.Image.Image):
        raise ValueError(f"`image` must be a list of 2+ images, got a single image {describe(image)}.")
    else:
        raise TypeError(
            f"`image` must be a list of 2+ images (PIL, numpy HWC or torch CHW) or a 4-D batch, got {describe(image)}."
        )
    if len(items) < 2:
        raise ValueError(f"`image` must hold at least 2 images (a collection), got {len(items)}.")
    return CheckedImages(image_to_tensor(item, index) for index, item in enumerate(items))


def image_to_tensor(image, index: int) -> torch.Tensor:
    """One image (PIL, numpy HW/HWC, torch HW/CHW) -> `(3, H, W)` float32 in [0, 1].

    Accepts uint8 (0-255), 16-bit (0-65535), bool and float (in [0, 1]) pixels; 1 channel (grayscale) and 4
    (RGBA, alpha dropped) become RGB. Anything else is a `ValueError` or `TypeError` naming `image[index]`.
    """
    name = f"image[{index}]"
    if isinstance(image, PIL.Image.Image):
        image = _pil_to_array(image, name)
    if isinstance(image, np.ndarray):
        tensor, is_float, layout = _array_to_tensor(image, name)
    elif isinstance(image, torch.Tensor):
        tensor, is_float, layout = _torch_to_tensor(image, name)
    else:
        raise TypeError(f"`{name}` must be a PIL image, a numpy array or a torch tensor, got {describe(image)}.")
    _check_pixels(tensor, name, is_float, f"shape {tuple(image.shape)}; {layout}")
    return _to_rgb(tensor).clamp(0.0, 1.0)


def _pil_to_array(image: PIL.Image.Image, name: str) -> np.ndarray:
    """A PIL image -> its pixels as a numpy array: RGB uint8 for 8-bit modes, 16-bit and float grayscale kept exact
    (uint16 / float32 HW). `ValueError` naming `name` for an empty or unreadable image."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"`{name}` is an empty image of size {image.size}.")
    try:
        if not (image.mode in ("I", "F") or image.mode.startswith("I;16")):
            return np.asarray(image.convert("RGB"))
        # 16/32-bit grayscale and float: PIL's convert("RGB") would clip them at 255
        array = np.asarray(image)
    except OSError as error:  # truncated or unreadable file behind the PIL image
        raise ValueError(f"`{name}` could not be read ({image.mode} {image.size}): {error}") from error
    if image.mode == "I":  # how PIL opens 16-bit PNGs
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(
                f"`{name}` is a 32-bit integer image with values in [{array.min()}, {array.max()}]; "
                f"expected 16-bit values in [0, 65535]."
            )
        array = array.astype(np.uint16)
    return array


def _array_to_tensor(image: np.ndarray, name: str) -> tuple[torch.Tensor, bool, str]:
    """A numpy HW/HWC array -> `(C, H, W)` float32 scaled by its dtype (uint8 / 255, uint16 / 65535, bool and float
    as they are), whether its pixels were floats, and its layout for error messages."""
    if image.ndim not in (2, 3):
        raise ValueError(f"`{name}` must be a HW or HWC array, got shape {image.shape}.")
    kind, itemsize = image.dtype.kind, image.dtype.itemsize
    if kind == "b":
        tensor = torch.from_numpy(image.astype(np.float32))
    elif kind == "u" and itemsize == 1:
        tensor = torch.from_numpy(image.astype(np.float32) / 255.0)
    elif kind == "u" and itemsize == 2:
        tensor = torch.from_numpy(image.astype(np.float32) / 65535.0)
    elif kind == "f":
        tensor = torch.from_numpy(image.astype(np.float32))
    else:
        raise TypeError(
            f"`{name}` has unsupported dtype {image.dtype}; use uint8 (0-255), uint16 (0-65535), bool or float (0-1)."
        )
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor, kind == "f", "numpy arrays are HWC"


def _torch_to_tensor(image: torch.Tensor, name: str) -> tuple[torch.Tensor, bool, str]:
    """A torch HW/CHW tensor -> `(C, H, W)` float32 on the CPU (uint8 / 255, bool and float as they are), whether its
    pixels were floats, and its layout for error messages."""
    if image.ndim not in (2, 3):
        raise ValueError(f"`{name}` must be a HW or CHW tensor, got shape {tuple(image.shape)}.")
    image = image.detach().cpu()
    if image.dtype.is_floating_point:
        tensor = image.float()
    elif image.dtype == torch.uint8:
        tensor = image.float() / 255.0
    elif image.dtype == torch.bool:
        tensor = image.float()
    else:
        raise TypeError(
            f"`{name}` has unsupported dtype {image.dtype}; use a float tensor in [0, 1] (or uint8, bool)."
        )
    tensor = tensor[None] if tensor.ndim == 2 else tensor
    return tensor, image.dtype.is_floating_point, "torch tensors are CHW"


def _check_pixels(tensor: torch.Tensor, name: str, is_float: bool, described: str) -> None:
    """`(C, H, W)` pixels: not empty, 1, 3 or 4 channels and, for float pixels, finite and in [0, 1] up to
    `FLOAT_IMAGE_TOLERANCE`; `ValueError` naming `name` (and `described`, the input's shape and layout) otherwise."""
    channels, height, width = tensor.shape
    if tensor.numel() == 0:
        raise ValueError(f"`{name}` has zero size: {channels} channels of {height}x{width} pixels.")
    if channels not in (1, 3, 4):
        raise ValueError(f"`{name}` must have 1, 3 or 4 channels, got {channels} ({described}).")
    if not is_float:
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise ValueError(
            f"`{name}` contains {int((~finite).sum())} non-finite values (NaN or inf) out of {tensor.numel()}."
        )
    low, high = (float(v) for v in tensor.aminmax())
    if low < -FLOAT_IMAGE_TOLERANCE or high > 1.0 + FLOAT_IMAGE_TOLERANCE:
        raise ValueError(
            f"`{name}` is a float image with values in [{low:.4g}, {high:.4g}]; float pixels must lie in "
            f"[0, 1] (pass 0-255 data as uint8, map [-1, 1] data with (x + 1) / 2)."
        )


def _to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    """`(1 | 3 | 4, H, W)` -> `(3, H, W)`: grayscale repeated (a view), alpha dropped."""
    channels, height, width = tensor.shape
    if channels == 1:
        return tensor.expand(3, height, width)
    if channels == 4:
        return tensor[:3]
    return tensor
