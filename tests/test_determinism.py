"""Determinism (issue #6): randomness comes only from the caller's generator, image by image, in image order."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import NO_FILTER
from diffusers import DDIMScheduler

from cosegment import PairCorrespondence

IMAGES = [np.random.default_rng(i).integers(0, 256, (48, 40 + 8 * i, 3), dtype=np.uint8) for i in range(3)]
KWARGS = {"height": 64, "width": 64, "return_features": True, **NO_FILTER}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_outputs_equal(a, b) -> None:
    """Bitwise equality of every field, correspondences and features included."""
    assert len(a.correspondences) == len(b.correspondences)
    for pa, pb in zip(a.correspondences, b.correspondences):
        for f in dataclasses.fields(PairCorrespondence):
            va, vb = getattr(pa, f.name), getattr(pb, f.name)
            assert np.array_equal(va, vb), f.name
    for name in ("density_maps", "entropy_maps", "inverse_error_maps"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("masks", "part_masks", "keypoints", "keypoint_parts"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None)
        if va is not None:
            assert all(np.array_equal(x, y) for x, y in zip(va, vb)), name
    assert a.thresholds == b.thresholds
    for qa, qb in zip(a.features.queries + a.features.keys, b.features.queries + b.features.keys):
        assert torch.equal(qa, qb)


def test_same_generator_gives_bitwise_the_same_output(tiny_pipe):
    first = tiny_pipe(image=IMAGES, generator=_gen(0), **KWARGS)
    second = tiny_pipe(image=IMAGES, generator=_gen(0), **KWARGS)
    _assert_outputs_equal(first, second)


def test_different_seeds_give_different_noise_and_maps(tiny_pipe):
    first = tiny_pipe(image=IMAGES, generator=_gen(0), **KWARGS)
    second = tiny_pipe(image=IMAGES, generator=_gen(1), **KWARGS)
    assert not torch.equal(first.features.queries[0], second.features.queries[0])
    assert not np.array_equal(first.entropy_maps, second.entropy_maps)


@pytest.fixture
def recorded_noise(monkeypatch):
    """Records the noise the pipeline adds (the `noise` argument of DDIM's `add_noise`)."""
    noises = []
    original = DDIMScheduler.add_noise

    def spy(self, original_samples, noise, timesteps):
        noises.append(noise.clone())
        return original(self, original_samples, noise, timesteps)

    monkeypatch.setattr(DDIMScheduler, "add_noise", spy)
    return noises


def test_noise_of_each_image_is_independent_of_batch_size(tiny_pipe, recorded_noise):
    kwargs = {"height": 64, "width": 64, "ensemble_size": 2}
    one = tiny_pipe.capture_features(IMAGES, generator=_gen(5), batch_size=1, **kwargs)
    eight = tiny_pipe.capture_features(IMAGES, generator=_gen(5), batch_size=8, **kwargs)
    assert len(recorded_noise) == 2
    assert torch.equal(recorded_noise[0], recorded_noise[1])  # bitwise
    # image i's draws are the generator's (2 i)-th and (2 i + 1)-th: a collection's prefix gets the same noise
    tiny_pipe.capture_features(IMAGES[:2], generator=_gen(5), **kwargs)
    assert torch.equal(recorded_noise[2], recorded_noise[0][:4])
    # The features agree to float32 rounding only: CPU convolutions pick different kernels per batch size.
    for a, b in zip(one.queries + one.keys, eight.queries + eight.keys):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_continuous_maps(tiny_pipe):
    one = tiny_pipe(image=IMAGES, generator=_gen(2), batch_size=1, **KWARGS)
    eight = tiny_pipe(image=IMAGES, generator=_gen(2), batch_size=8, **KWARGS)
    np.testing.assert_allclose(one.entropy_maps, eight.entropy_maps, rtol=1e-5, atol=1e-5)
    assert [len(p) for p in one.correspondences] == [len(p) for p in eight.correspondences]


def test_per_image_generators_give_each_image_its_own_stream(tiny_pipe, recorded_noise):
    """With one generator per image, image i's noise is the first draw of `generator[i]`: the same as when that
    generator drives a one-generator call in which image i comes first."""
    tiny_pipe.capture_features(IMAGES, generator=[_gen(10), _gen(11), _gen(12)], height=64, width=64)
    tiny_pipe.capture_features(IMAGES[2:] + IMAGES[:2], generator=_gen(12), height=64, width=64)
    tiny_pipe.capture_features(IMAGES, generator=_gen(10), height=64, width=64)
    listed, single_12, single_10 = recorded_noise
    assert torch.equal(listed[2], single_12[0])
    assert torch.equal(listed[0], single_10[0])
    assert not torch.equal(listed[1], single_10[1])  # a single generator continues its stream instead


def test_per_image_generators_make_results_follow_a_reordering(tiny_pipe):
    """Permuting the images together with their generators permutes the features and the maps."""
    order = [2, 0, 1]
    gens = [_gen(10), _gen(11), _gen(12)]
    base = tiny_pipe(image=IMAGES, generator=gens, batch_size=1, **KWARGS)
    gens = [_gen(10), _gen(11), _gen(12)]
    permuted = tiny_pipe(image=[IMAGES[i] for i in order], generator=[gens[i] for i in order], batch_size=1, **KWARGS)
    # batch_size=1: every image runs alone through the UNet, so its features are bitwise the same
    for a, b in zip(base.features.queries + base.features.keys, permuted.features.queries + permuted.features.keys):
        assert torch.equal(a[order], b)
    assert permuted.features.image_sizes == [base.features.image_sizes[i] for i in order]
    np.testing.assert_allclose(base.entropy_maps[order], permuted.entropy_maps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(base.inverse_error_maps[order], permuted.inverse_error_maps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(base.density_maps[order], permuted.density_maps)

    def matches(out, relabel):
        found = set()
        for pair in out.correspondences:
            s, t = relabel[pair.source_index], relabel[pair.target_index]
            for a, b in zip(pair.source_tokens.tolist(), pair.target_tokens.tolist()):
                found.add((s, a, t, b) if s < t else (t, b, s, a))
        return found

    assert matches(base, [0, 1, 2]) == matches(permuted, order)
