"""Co-segment a collection, then repaint every image's background (or its common object) with Stable Diffusion
inpainting, from the same weights.

    python examples/repaint_background.py a.jpg b.jpg c.jpg --prompt "on a sandy beach" --out repainted/
    python examples/repaint_background.py a.jpg b.jpg --prompt "a bronze statue" --repaint object --out repainted/
    python examples/repaint_background.py a.jpg b.jpg --prompt "grass" --out repainted/ --model ./tiny-sd  # offline

The inpainting pipeline is `StableDiffusionInpaintPipeline.from_pipe(pipe)`: it shares the co-segmentation pipeline's
UNet, VAE and text encoder (no second copy of the weights), whose attention processors the co-segmentation put back
after its pass. That UNet is a plain Stable Diffusion one (4 latent channels): diffusers' inpainting pipeline runs it
by putting the kept region's noised latents back at every step. (An inpainting checkpoint's 9-channel UNet would repaint
better but cannot run the co-segmentation; load it separately for that.)

Writes to --out, per image (`N_stem`: its position and file name): `N_stem_mask.png`, the repainted region (white),
and `N_stem_repainted.png` at the image's own size: inpainted pixels inside the region, the original pixels outside.
An image whose co-segmentation mask is empty (an outlier, or no common object found) gives the repaint nothing to
go by: it is skipped with a message, unless `--if-empty whole` asks to repaint all of it. A region that covers
nothing (repainting the background of an image that is all object) is skipped too.

Every option and image is checked before the model loads; a mistake is one line (`--debug` shows the traceback).
"""

import argparse
import os
import sys

import numpy as np
import PIL.Image
import torch

from cosegment import DEFAULT_MODEL_ID
from cosegment.utils.command_line import (
    DTYPE_NAMES,
    TINY_PIPELINE_HINT,
    ArgumentParser,
    add_common_arguments,
    check_output_folder,
    load_pipeline,
    non_negative_int,
    positive_float,
    positive_int,
    read_image,
    resolve_device,
    run_command,
)
from cosegment.utils.files import save_png


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="repaint_background.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="two or more image files showing a common object")
    parser.add_argument("--prompt", required=True, help="what to paint into the region")
    parser.add_argument("--negative-prompt", default=None, help="what to keep out of it")
    parser.add_argument("--repaint", choices=("background", "object"), default="background", help="default background")
    parser.add_argument("--out", default="repainted", help="output folder (created; default repainted)")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help=f"default {DEFAULT_MODEL_ID}; " + TINY_PIPELINE_HINT)
    parser.add_argument("--seed", type=int, default=0, help="seed of the co-segmentation's and the inpainting's noise")
    parser.add_argument("--steps", type=positive_int, default=30, help="inpainting steps (default 30)")
    parser.add_argument("--guidance-scale", type=positive_float, default=7.5, help="classifier-free guidance (7.5)")
    parser.add_argument(
        "--size", type=positive_int, default=None, help="longer side the inpainting runs at (default: the model's)"
    )
    parser.add_argument(
        "--grow", type=non_negative_int, default=0, help="pixels the object mask is grown by first (keeps its edge)"
    )
    parser.add_argument(
        "--if-empty", choices=("skip", "whole"), default="skip", help="images whose mask is empty: skip or repaint all"
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="model dtype (default float32)")
    add_common_arguments(parser)
    return parser


def inpainting_pipeline(pipe):
    """`StableDiffusionInpaintPipeline.from_pipe(pipe)`: the same UNet, VAE, text encoder and scheduler objects (no
    second copy of the weights). diffusers' notice "modules ... that should be kept in float32: []", which `from_pipe`
    prints for models that have no such module, is dropped while it runs."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging

    def keep(record) -> bool:
        return "should be kept in float32: []." not in record.getMessage()

    model_logger = logging.get_logger("diffusers.models.modeling_utils")
    model_logger.addFilter(keep)
    try:
        return StableDiffusionInpaintPipeline.from_pipe(pipe)
    finally:
        model_logger.removeFilter(keep)


def repaint_region(mask: np.ndarray, repaint: str = "background", grow: int = 0) -> np.ndarray:
    """The pixels to repaint: the object mask `(H, W)` grown by `grow` pixels (a square neighbourhood), or the rest of
    the image (`repaint="background"`)."""
    mask = np.asarray(mask, dtype=bool)
    if grow:
        padded = np.pad(mask, grow)
        grown = np.zeros_like(mask)
        for dy in range(2 * grow + 1):
            for dx in range(2 * grow + 1):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
        mask = grown
    return ~mask if repaint == "background" else mask


def inpaint_size(height: int, width: int, longest: int, multiple: int = 8) -> tuple[int, int]:
    """The inpainting size for an `height` x `width` image: the longer side `longest`, the aspect kept, both sides
    multiples of `multiple` (the VAE's scale factor), at least `multiple`."""
    scale = longest / max(height, width)
    return tuple(max(multiple, int(round(side * scale / multiple)) * multiple) for side in (height, width))


def repaint(
    inpaint, image: np.ndarray, region: np.ndarray, prompt: str, generator: torch.Generator, size: int, **options
) -> np.ndarray:
    """Inpaints `region` `(H, W)` bool of `image` `(H, W, 3)` uint8 with `inpaint` (a `StableDiffusionInpaintPipeline`)
    at :func:`inpaint_size`, resized back; returns `(H, W, 3)` uint8: the inpainting inside `region`, `image` outside.

    `options` go to the inpainting call (`num_inference_steps`, `guidance_scale`, `negative_prompt`)."""
    height, width = image.shape[:2]
    work_h, work_w = inpaint_size(height, width, size, inpaint.vae_scale_factor)
    painted = inpaint(
        prompt=prompt,
        image=PIL.Image.fromarray(image),
        mask_image=PIL.Image.fromarray(region.astype(np.uint8) * 255),
        height=work_h,
        width=work_w,
        generator=generator,
        output_type="pil",
        **options,
    ).images[0]
    painted = np.asarray(painted.convert("RGB").resize((width, height), PIL.Image.BICUBIC))
    return np.where(region[..., None], painted, image)


def run(args) -> None:
    # Everything that needs no model first: a mistake costs no download.
    if len(args.images) < 2:
        raise ValueError(f"`IMAGE` must name 2 or more files, got {len(args.images)}.")
    images = [read_image(path, "IMAGE") for path in args.images]
    device = resolve_device(args.device)
    check_output_folder(args.out)

    pipe = load_pipeline(args.model, device, args.dtype, quiet=args.quiet)
    pipe.set_progress_bar_config(disable=args.quiet)
    output = pipe(image=images, generator=torch.Generator().manual_seed(args.seed))
    inpaint = inpainting_pipeline(pipe)
    inpaint.set_progress_bar_config(disable=args.quiet)
    size = args.size or pipe.default_size
    generator = torch.Generator().manual_seed(args.seed)
    options = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    options["negative_prompt"] = args.negative_prompt
    os.makedirs(args.out, exist_ok=True)
    for index, (path, image, mask) in enumerate(zip(args.images, images, output.masks)):
        name = f"{index}_{os.path.splitext(os.path.basename(path))[0]}"
        if not mask.any() and args.if_empty == "skip":
            print(f"skipped {path}: the co-segmentation found no common object in it (`--if-empty whole`: all of it)")
            continue
        region = np.ones(mask.shape, bool) if not mask.any() else repaint_region(mask, args.repaint, args.grow)
        if not region.any():
            print(f"skipped {path}: no {args.repaint} to repaint (the object covers the whole image)")
            continue
        save_png(os.path.join(args.out, f"{name}_mask.png"), region.astype(np.uint8) * 255)
        painted = repaint(inpaint, image, region, args.prompt, generator, size, **options)
        save_png(os.path.join(args.out, f"{name}_repainted.png"), painted)
        print(f"wrote {os.path.join(args.out, name + '_repainted.png')} ({region.mean():.0%} repainted)")
    sys.stdout.flush()


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
