"""Odd but valid input works (issue #6): every encoding the pipeline accepts gives the pixels of its plain RGB
equivalent, and odd collections give finite maps, points inside each image's own bounds and well-shaped (possibly
empty) arrays."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import NO_FILTER

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (40, 56), dtype=np.uint8)
GRAY_RGB = np.repeat(GRAY[..., None], 3, axis=-1)


def _pixels(pipe, image) -> torch.Tensor:
    """The `(3, 64, 64)` processed pixels of one image (as the first of a two-image collection)."""
    return pipe.prepare_images([image, RGB], 64, 64)[0][0]


EQUIVALENT = [
    ("gray-2d", GRAY, GRAY_RGB, 0),
    ("gray-1-channel", GRAY[..., None], GRAY_RGB, 0),
    ("gray-pil-L", PIL.Image.fromarray(GRAY), GRAY_RGB, 0),
    ("gray-torch-hw", torch.from_numpy(GRAY / 255.0), GRAY_RGB, 1e-6),
    ("rgba-numpy", np.concatenate([RGB, RNG.integers(0, 256, (40, 56, 1), dtype=np.uint8)], -1), RGB, 0),
    ("rgba-pil", PIL.Image.fromarray(RGB).convert("RGBA"), RGB, 0),
    ("palette-pil", PIL.Image.fromarray(GRAY).convert("P"), GRAY_RGB, 0),
    ("uint16", RGB.astype(np.uint16) * 257, RGB, 1e-6),
    ("uint16-pil-I;16", PIL.Image.fromarray(GRAY.astype(np.uint16) * 257), GRAY_RGB, 1e-6),
    ("int32-pil-I", PIL.Image.fromarray(GRAY.astype(np.int32) * 257), GRAY_RGB, 1e-6),
    ("float32", RGB.astype(np.float32) / 255, RGB, 1e-6),
    ("float64", RGB / 255.0, RGB, 1e-6),
    ("float16", (RGB / 255.0).astype(np.float16), RGB, 2e-3),
    ("float-pil-F", PIL.Image.fromarray((GRAY / 255.0).astype(np.float32)), GRAY_RGB, 1e-6),
    ("torch-chw", torch.from_numpy(RGB / 255.0).permute(2, 0, 1), RGB, 1e-6),
    ("torch-uint8-chw", torch.from_numpy(RGB).permute(2, 0, 1), RGB, 0),
    ("bool", GRAY > 127, np.where(GRAY_RGB > 127, 255, 0).astype(np.uint8), 0),
]


@pytest.mark.parametrize(("image", "reference", "atol"), [c[1:] for c in EQUIVALENT], ids=[c[0] for c in EQUIVALENT])
def test_encodings_give_the_pixels_of_their_rgb_equivalent(tiny_pipe, image, reference, atol):
    torch.testing.assert_close(_pixels(tiny_pipe, image), _pixels(tiny_pipe, reference), rtol=0, atol=atol)


def test_float_overshoot_from_resampling_is_clipped(tiny_pipe):
    ringing = np.clip(RGB / 255.0, 0, 1) * 1.04 - 0.02  # within [-0.02, 1.02]
    pixels = _pixels(tiny_pipe, ringing)
    assert pixels.min() >= -1 and pixels.max() <= 1


def _u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


COLLECTIONS = {
    "identical": lambda: [_u8((48, 48, 3))] * 2,
    "constant": lambda: [np.zeros((48, 48, 3), np.uint8), np.full((30, 60, 3), 255, np.uint8), np.full((9, 9), 0.5)],
    "grayscale-mix": lambda: [_u8((48, 40)), _u8((48, 40, 1), 1), PIL.Image.fromarray(_u8((20, 30), 2))],
    "rgba": lambda: [_u8((48, 48, 4)), PIL.Image.fromarray(_u8((33, 21, 4), 1))],
    "16-bit": lambda: [
        (_u8((48, 48, 3)).astype(np.uint16) * 257),
        PIL.Image.fromarray(_u8((20, 20)).astype(np.uint16)),
    ],
    "float": lambda: [np.random.default_rng(0).random((48, 48, 3)), np.random.default_rng(1).random((17, 31, 3))],
    "tiny": lambda: [_u8((1, 1, 3)), _u8((5, 7, 3), 1), _u8((31, 2, 3), 2)],
    "panoramic": lambda: [_u8((20, 300, 3)), _u8((300, 20, 3), 1)],
    "torch-chw": lambda: [torch.rand(3, 48, 48), torch.rand(1, 30, 20), torch.rand(4, 16, 64)],
    "torch-bchw-batch": lambda: torch.rand(3, 3, 40, 24),
    "numpy-bhwc-batch": lambda: _u8((2, 24, 40, 3)),
    "tuple-of-mixed-types": lambda: (PIL.Image.fromarray(_u8((48, 64, 3))), _u8((64, 48, 3), 1), torch.rand(3, 8, 8)),
}


def _sizes(collection) -> list[tuple[int, int]]:
    sizes = []
    for item in collection:
        if isinstance(item, PIL.Image.Image):
            sizes.append((item.height, item.width))
        elif isinstance(item, torch.Tensor):
            sizes.append(tuple(item.shape[-2:]))
        else:
            sizes.append(tuple(item.shape[:2]))
    return sizes


def check_output(out, sizes: list[tuple[int, int]], grid: tuple[int, int]) -> None:
    """Invariants every output must meet: shapes, finiteness, ranges, points inside each image's own pixels."""
    m, n = len(sizes), grid[0] * grid[1]
    for maps in (out.density_maps, out.entropy_maps, out.inverse_error_maps):
        assert maps.shape == (m, *grid) and np.isfinite(maps).all()
    assert (out.entropy_maps >= 0).all() and (out.entropy_maps <= math.log(n) + 1e-4).all()
    assert (out.inverse_error_maps >= 0).all() and (out.density_maps >= 0).all()
    assert [(p.source_index, p.target_index) for p in out.correspondences] == [
        (s, t) for s in range(m) for t in range(s + 1, m)
    ]
    total = 0
    for pair in out.correspondences:
        k = len(pair)
        total += k
        assert pair.source_points.shape == (k, 2) and pair.target_points.shape == (k, 2)
        assert pair.scores.shape == (k,) and pair.mutual.shape == (k,) and pair.mutual.dtype == bool
        assert np.isfinite(pair.scores).all() and ((pair.scores >= 0) & (pair.scores <= 1)).all()
        for points, index in ((pair.source_points, pair.source_index), (pair.target_points, pair.target_index)):
            height, width = sizes[index]
            assert ((points[:, 0] > 0) & (points[:, 0] < width)).all(), (points, sizes[index])
            assert ((points[:, 1] > 0) & (points[:, 1] < height)).all(), (points, sizes[index])
    # every kept match touches one token of each of its two images
    assert out.density_maps.sum() == pytest.approx(2 * total)
    if out.masks is not None:
        assert [tuple(mask.shape) for mask in out.masks] == sizes
    if out.part_masks is not None:
        assert [tuple(mask.shape) for mask in out.part_masks] == sizes


@pytest.mark.parametrize("name", list(COLLECTIONS))
def test_odd_collections_work(tiny_pipe, name):
    collection = COLLECTIONS[name]()
    out = tiny_pipe(
        image=collection, height=64, width=64, generator=torch.Generator().manual_seed(0), return_features=True,
        **NO_FILTER,
    )  # fmt: skip
    sizes = _sizes(collection)
    assert out.features.image_sizes == sizes
    check_output(out, sizes, (4, 4))
    # no threshold: every token keeps its match in both passes, so each pair has at least N matches
    assert all(len(pair) >= 16 for pair in out.correspondences)


def test_collection_of_twelve_at_the_default_size(tiny_pipe):
    collection = [_u8((64, 64 - 4 * i, 3), i) for i in range(12)]
    out = tiny_pipe(image=collection, generator=torch.Generator().manual_seed(0), **NO_FILTER)
    assert len(out.correspondences) == 66
    check_output(out, _sizes(collection), (16, 16))


def test_identical_images_with_identical_noise_have_identical_maps(tiny_pipe):
    image = _u8((48, 48, 3))
    generators = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    out = tiny_pipe(image=[image, image.copy()], height=64, width=64, generator=generators, batch_size=1, **NO_FILTER)
    np.testing.assert_array_equal(out.entropy_maps[0], out.entropy_maps[1])
    np.testing.assert_array_equal(out.density_maps[0], out.density_maps[1])
    np.testing.assert_array_equal(out.inverse_error_maps[0], out.inverse_error_maps[1])


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_nothing_kept_gives_empty_arrays(tiny_pipe, output_type):
    collection = [_u8((48, 48, 3)), _u8((20, 30, 3), 1), _u8((30, 20, 3), 2)]
    # an entropy limit of 0 keeps nothing (a match is kept when its entropy is strictly below the limit)
    out = tiny_pipe(
        image=collection, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type=output_type,
        **{**NO_FILTER, "max_entropy": 0.0},
    )  # fmt: skip
    for pair in out.correspondences:
        assert tuple(pair.source_points.shape) == (0, 2) and tuple(pair.target_points.shape) == (0, 2)
        assert tuple(pair.scores.shape) == (0,) and tuple(pair.mutual.shape) == (0,)
        assert tuple(pair.source_tokens.shape) == (0,)
    assert float(out.density_maps.sum()) == 0
    if output_type == "np":
        check_output(out, _sizes(collection), (4, 4))
