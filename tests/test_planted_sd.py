"""Stable-Diffusion-like components in `benchmarks/planted.py` (issue 16): the knobs at their defaults leave the
generator's output as it was, each component has the structure asked for, and `make_planted_reference` makes
content-free captures of the same model."""

import numpy as np
import pytest
import torch

from cosegment import analyze_features
from cosegment.benchmarks.planted import (
    make_planted_features,
    make_planted_reference,
    score_output,
    sd_rows,
)

# C = 64 = H * d, so the features behind the queries come back exactly through the pseudo-inverse of `W_q`
SMALL = {"grid_size": (16, 16), "num_heads": 2, "head_dim": 32, "channels": 64, "object_radius": 4.0}
ALL_THREE = {"positional": 0.5, "corners": 0.9, "anomalies": 6, "anomaly_norm": 3.0}


def make(**knobs):
    return make_planted_features(3, noise=0.15, seed=5, **SMALL, **knobs)


def content(case, features=None) -> np.ndarray:
    """The features `x` `(M, N, C)` behind the queries (`Q = amp W_q x`, no query noise), by least squares."""
    features = case.features if features is None else features
    w_q = case.model.amp * case.model.w_q[0]  # (H, d, C)
    q = features.queries[0].double().numpy()  # (M, H, N, d)
    q = np.transpose(q, (0, 2, 1, 3)).reshape(q.shape[0], q.shape[2], -1)  # (M, N, H d)
    return q @ np.linalg.pinv(w_q.reshape(-1, w_q.shape[-1])).T


def cosine(a, b) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def same_tensors(a, b) -> bool:
    pairs = list(zip(a.queries, b.queries)) + list(zip(a.keys, b.keys))
    return all(torch.equal(x, y) for x, y in pairs)


@pytest.fixture(scope="module")
def clean():
    return make()


@pytest.fixture(scope="module")
def all_three():
    return make(**ALL_THREE)


# ---------------------------------------------------------------------------------------------------------------
# Defaults: today's output, bit for bit
# ---------------------------------------------------------------------------------------------------------------


def test_knobs_at_zero_give_the_default_output_bitwise(clean):
    explicit = make(positional=0.0, corners=0.0, anomalies=0, anomaly_norm=3.0, positional_length=5.0)
    assert same_tensors(clean.features, explicit.features)
    # the knobs of components that are off change nothing either
    assert same_tensors(clean.features, make(anomaly_norm=7.0, positional_length=2.0).features)
    assert not clean.high_norm.any()
    assert not clean.model.positional.any()


def test_a_recorded_small_case_is_unchanged():
    """Values of the generator before the components existed (commit 44b688c): any change to the main random
    stream's draws would move them by far more than the tolerance (which allows another CPU's last bits)."""
    case = make_planted_features(
        2, noise=0.15, seed=7, grid_size=(8, 8), num_heads=2, head_dim=4, channels=8, object_radius=2.5
    )
    q, k = case.features.queries[0], case.features.keys[0]
    np.testing.assert_allclose(
        q[0, 0, :3, 0].numpy(), [-0.37592074275016785, -6.109506607055664, -3.1157491207122803], rtol=1e-5
    )
    assert q[1, 1, 5, 2].item() == pytest.approx(-1.4317344427108765, rel=1e-5)
    assert k[0, 0, 0, 0].item() == pytest.approx(-2.1598193645477295, rel=1e-5)
    assert int(case.token_parts.sum()) == 131


def test_components_leave_the_main_stream_alone(clean, all_three):
    """Object, warps and projections are those of the clean case: the components have their own stream."""
    np.testing.assert_array_equal(clean.token_parts, all_three.token_parts)
    np.testing.assert_array_equal(clean.scales, all_three.scales)
    np.testing.assert_array_equal(clean.model.w_q[0], all_three.model.w_q[0])
    assert clean.model.content_norm == all_three.model.content_norm


# ---------------------------------------------------------------------------------------------------------------
# The three components
# ---------------------------------------------------------------------------------------------------------------


def test_positional_is_a_function_of_position_only(clean):
    case = make(positional=0.5)
    added = content(case) - content(clean)  # (M, N, C)
    field = case.model.positional
    # the same field in every image, zero mean over positions, RMS norm 0.5 x the content norm
    for image in range(3):
        np.testing.assert_allclose(added[image], field, atol=1e-4)
    np.testing.assert_allclose(field.mean(0), 0.0, atol=1e-12)
    rms = np.sqrt((field**2).sum(-1).mean())
    assert rms == pytest.approx(0.5 * case.model.content_norm, rel=1e-9)
    assert 0.9 < case.model.content_norm < 1.2  # unit features plus noise 0.15
    # smooth: neighbours along a row are far more alike than far-apart positions
    grid = field.reshape(16, 16, -1)
    assert cosine(grid[:, :-1], grid[:, 1:]).mean() > 0.8
    assert abs(cosine(grid[:, :4], grid[:, -4:]).mean()) < 0.5


def test_corner_tokens_become_alike_across_images(clean):
    case = make(corners=0.9)
    corners = case.model.corner_tokens
    np.testing.assert_array_equal(corners, [0, 15, 240, 255])
    before, after = content(clean), content(case)
    for other in (1, 2):
        assert cosine(before[0, corners], before[other, corners]).max() < 0.5
        assert cosine(after[0, corners], after[other, corners]).min() > 0.7
    # nothing but the corners moves
    np.testing.assert_allclose(np.delete(after - before, corners, axis=1), 0.0, atol=1e-4)


def test_exactly_the_asked_high_norm_tokens_per_image(clean):
    case = make(anomalies=6, anomaly_norm=3.0)
    x = content(case)
    norms = np.linalg.norm(x, axis=-1) / case.model.content_norm
    assert (np.linalg.norm(content(clean), axis=-1) / case.model.content_norm).max() < 2.0
    np.testing.assert_array_equal((norms > 2.0).sum(1), [6, 6, 6])
    np.testing.assert_array_equal(norms > 2.0, case.high_norm.reshape(3, -1))
    np.testing.assert_allclose(norms[case.high_norm], 3.0, rtol=1e-4)
    assert not case.high_norm[:, case.model.corner_tokens].any()
    assert not np.array_equal(case.high_norm[0], case.high_norm[1])  # new positions in every image
    # along the model's one direction, with a little per-token variation
    assert cosine(x[case.high_norm], case.model.anomaly_direction).min() > 0.8


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"positional": -0.1}, "`positional`"),
        ({"corners": 1.5}, "`corners`"),
        ({"anomalies": 2.0}, "`anomalies`"),
        ({"anomalies": 16 * 16 - 3}, "`anomalies`"),
        ({"anomaly_norm": 0}, "`anomaly_norm`"),
    ],
)
def test_bad_knobs_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        make(**knobs)


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------


def test_the_reference_has_the_case_shape_and_is_deterministic(all_three):
    reference = make_planted_reference(all_three, 4, seed=3)
    assert reference.num_images == 4
    assert reference.grid_size == all_three.features.grid_size
    assert reference.queries[0].shape == (4, 2, 256, 32)
    assert same_tensors(reference, make_planted_reference(all_three, 4, seed=3))
    assert not torch.equal(reference.queries[0], make_planted_reference(all_three, 4, seed=4).queries[0])
    with pytest.raises(ValueError, match="`num_images`"):
        make_planted_reference(all_three, 1)


def test_the_reference_has_no_object(clean):
    reference = content(clean, make_planted_reference(clean, 16, seed=1)).reshape(-1, 64)
    x = content(clean)
    parts = clean.token_parts.reshape(3, -1)
    for part in range(1, 5):
        embedding = x[parts == part].mean(0)  # the part's shared direction
        assert (cosine(x[parts == part], embedding) > 0.5).mean() > 0.9
        assert (cosine(reference, embedding) > 0.5).mean() < 0.01


def test_the_reference_carries_the_case_positional_field():
    case = make(positional=0.5)
    reference = make_planted_reference(case, 16, seed=1)
    # after projection: the reference's per-position mean query, centred over positions, against W_q of the field
    projected = np.einsum("hdc,nc->hnd", case.model.amp * case.model.w_q[0], case.model.positional)
    mean = reference.queries[0].double().mean(0)
    mean = (mean - mean.mean(1, keepdim=True)).numpy()
    assert np.corrcoef(mean.ravel(), projected.ravel())[0, 1] > 0.8
    # a reference of a model without the field does not correlate with it
    blank = make_planted_reference(make(), 16, seed=1).queries[0].double().mean(0)
    blank = (blank - blank.mean(1, keepdim=True)).numpy()
    assert abs(np.corrcoef(blank.ravel(), projected.ravel())[0, 1]) < 0.2


def test_the_reference_has_the_case_corners_and_high_norm_tokens(all_three):
    reference = content(all_three, make_planted_reference(all_three, 4, seed=2))
    corners = all_three.model.corner_tokens
    x = content(all_three)
    for image in range(4):
        assert cosine(x[0, corners], reference[image, corners]).min() > 0.6
    norms = np.linalg.norm(reference, axis=-1) / all_three.model.content_norm
    np.testing.assert_array_equal((norms > 2.0).sum(1), [6, 6, 6, 6])


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def test_sd_rows_scores_the_run_benchmark_collections():
    rows = sd_rows(sizes=(2,), seeds=1, conditions={"clean": {}}, reference_images=4)
    assert [(r["condition"], r["M"], r["reference"]) for r in rows] == [("clean", 2, "none"), ("clean", 2, "4 images")]
    case = make_planted_features(2, noise=0.15, seed=2000)
    expected = score_output(case, analyze_features(case.features))
    for metric in ("precision", "coverage", "jaccard", "nmi"):
        assert rows[0][metric] == pytest.approx(expected[metric], abs=1e-12)
        assert 0.0 <= rows[1][metric] <= 1.0
