"""End-to-end on the tiny random pipeline: shapes, coordinates, plumbing (every threshold disabled: a random UNet
has no semantics, so quality is tested on planted features elsewhere)."""

import numpy as np
import pytest
import torch
from conftest import NO_FILTER

from cosegment import CoSegmentationFeatures, CoSegmentationPipelineOutput, analyze_features


@pytest.fixture(scope="module")
def result(tiny_pipe, photos):
    # three real photographs of different sizes, processed at 256 px: up_blocks.2 has 16 x 16 tokens
    return tiny_pipe(image=photos[:3], generator=torch.Generator().manual_seed(0), return_features=True, **NO_FILTER)


def test_output_shapes(result, photos):
    assert isinstance(result, CoSegmentationPipelineOutput)
    assert result.density_maps.shape == result.entropy_maps.shape == result.inverse_error_maps.shape == (3, 16, 16)
    assert [(p.source_index, p.target_index) for p in result.correspondences] == [(0, 1), (0, 2), (1, 2)]
    features = result.features
    assert features.grid_size == (16, 16)
    assert features.image_sizes == [im.shape[:2] for im in photos[:3]]
    assert len(features.queries) == 2  # the two up_blocks.2 self-attention layers of the tiny UNet
    for q in features.queries:
        assert q.shape == (3, 4, 256, 8)


def test_points_are_token_centres_in_each_images_own_pixels(result, photos):
    plain = analyze_features(result.features, refine=False, **NO_FILTER)  # refined points: tests/test_points.py
    for pair in plain.correspondences:
        for points, tokens, index in (
            (pair.source_points, pair.source_tokens, pair.source_index),
            (pair.target_points, pair.target_tokens, pair.target_index),
        ):
            height, width = photos[index].shape[:2]
            assert points.shape == (len(pair), 2) and points.dtype == np.float32
            expected_x = (tokens % 16 + 0.5) * width / 16
            expected_y = (tokens // 16 + 0.5) * height / 16
            np.testing.assert_allclose(points[:, 0], expected_x, rtol=1e-6)
            np.testing.assert_allclose(points[:, 1], expected_y, rtol=1e-6)
            assert (points[:, 0] > 0).all() and (points[:, 0] < width).all()
            assert (points[:, 1] > 0).all() and (points[:, 1] < height).all()


def test_no_filter_keeps_every_forward_match_and_counts_hits(result):
    features = result.features
    for pair in result.correspondences:
        # with every check off, pass s->t keeps f(p) for every p: the union holds them all
        from cosegment import attention_row_statistics

        q_s, k_s = features.image(pair.source_index)
        q_t, k_t = features.image(pair.target_index)
        forward = attention_row_statistics(q_s, k_t).argmax.numpy()
        backward = attention_row_statistics(q_t, k_s).argmax.numpy()
        found = set(zip(pair.source_tokens.tolist(), pair.target_tokens.tolist()))
        assert {(p, int(forward[p])) for p in range(256)} <= found
        assert {(int(backward[y]), y) for y in range(256)} <= found
        assert len(found) == len(pair)
        mutual = {(p, int(forward[p])) for p in range(256) if backward[forward[p]] == p}
        assert set(zip(pair.source_tokens[pair.mutual].tolist(), pair.target_tokens[pair.mutual].tolist())) == mutual
        assert ((pair.scores >= 0) & (pair.scores <= 1)).all()
    # density: every kept match touches one token of each of its two images
    total = sum(len(p) for p in result.correspondences)
    assert result.density_maps.sum() == pytest.approx(2 * total)
    for i in range(3):
        touching = sum(len(p) for p in result.correspondences if i in (p.source_index, p.target_index))
        assert result.density_maps[i].sum() == pytest.approx(touching)


def test_entropy_and_inverse_error_maps(result):
    n = 256
    assert (result.entropy_maps >= 0).all() and (result.entropy_maps <= np.log(n) + 1e-4).all()
    # a random UNet attends almost uniformly (DESIGN section 4): median IME close to log N
    assert np.median(result.entropy_maps) > 0.9 * np.log(n)
    assert (result.inverse_error_maps >= 0).all()
    assert result.inverse_error_maps.max() <= np.hypot(15, 15) + 1e-4


def test_analyze_features_reruns_without_the_unet(result, tmp_path):
    again = analyze_features(result.features, **NO_FILTER)
    for a, b in zip(again.correspondences, result.correspondences):
        np.testing.assert_array_equal(a.source_points, b.source_points)
        np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(again.entropy_maps, result.entropy_maps)
    # stricter thresholds keep a subset
    strict = analyze_features(result.features, **{**NO_FILTER, "max_inverse_error": 0.0})
    for a, b in zip(strict.correspondences, result.correspondences):
        assert set(zip(a.source_tokens.tolist(), a.target_tokens.tolist())) <= set(
            zip(b.source_tokens.tolist(), b.target_tokens.tolist())
        )
        assert len(a) < len(b)
    # saved and loaded with safetensors, the analysis is identical
    path = tmp_path / "features.safetensors"
    result.features.save(path)
    loaded = CoSegmentationFeatures.load(path)
    assert loaded.grid_size == result.features.grid_size and loaded.image_sizes == result.features.image_sizes
    reloaded = analyze_features(loaded, **NO_FILTER)
    np.testing.assert_array_equal(reloaded.density_maps, result.density_maps)


def test_output_type_pt_and_tuple(tiny_pipe, photos):
    kwargs = dict(image=photos[:2], height=64, width=64, **NO_FILTER)
    out = tiny_pipe(generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs)
    assert isinstance(out.density_maps, torch.Tensor) and isinstance(
        out.correspondences[0].source_points, torch.Tensor
    )
    as_tuple = tiny_pipe(generator=torch.Generator().manual_seed(1), return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 9
    np.testing.assert_array_equal(as_tuple[1], out.density_maps.numpy())
    np.testing.assert_array_equal(as_tuple[2], out.entropy_maps.numpy())
    np.testing.assert_array_equal(as_tuple[3], out.inverse_error_maps.numpy())
    for got, want in zip(as_tuple[4], out.masks):
        np.testing.assert_array_equal(got, want.numpy())
    for got, want in zip(as_tuple[7], out.keypoint_parts):
        np.testing.assert_array_equal(got, want.numpy())
    assert as_tuple[8] == out.thresholds
    with_features = tiny_pipe(
        generator=torch.Generator().manual_seed(1), return_dict=False, return_features=True, **kwargs
    )
    assert len(with_features) == 10 and isinstance(with_features[9], CoSegmentationFeatures)
    np.testing.assert_array_equal(analyze_features(with_features[9], **NO_FILTER).density_maps, as_tuple[1])
    assert sum(len(parts) for parts in as_tuple[7]) > 0


def test_timestep_and_prompt_change_the_features(tiny_pipe, photos):
    kwargs = {"image": photos[:2], "height": 64, "width": 64}
    base = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(0), **kwargs)
    later = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(0), timestep=700, **kwargs)
    prompted = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(0), prompt="a cat", **kwargs)
    assert not torch.equal(base.queries[0], later.queries[0])
    assert not torch.equal(base.queries[0], prompted.queries[0])
    assert later.metadata["timestep"] == 700


def test_ensemble_and_named_layers(tiny_pipe, photos):
    kwargs = {"image": photos[:2], "height": 64, "width": 64}
    one = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(0), ensemble_size=1, **kwargs)
    three = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(0), ensemble_size=3, **kwargs)
    assert len(three.queries) == 3 * len(one.queries)
    # the first draw of each image is the same noise as a single-draw run only when draws are image-major
    name = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
    named = tiny_pipe.capture_features(attention_layers=[name + ".processor"], **kwargs)
    assert named.layer_names == [name]
    pattern = tiny_pipe.capture_features(attention_layers=r"up_blocks\.3\..*attn1", **kwargs)
    assert pattern.grid_size == (8, 8)
    coarse = tiny_pipe.capture_features(attention_layers=4, **kwargs)
    assert coarse.grid_size == (2, 2) and all(n.startswith("up_blocks.1.") for n in coarse.layer_names)


def test_batching_gives_identical_features(tiny_pipe, photos):
    kwargs = {"image": photos[:3], "height": 64, "width": 64, "ensemble_size": 2}
    one = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(5), batch_size=1, **kwargs)
    many = tiny_pipe.capture_features(generator=torch.Generator().manual_seed(5), batch_size=4, **kwargs)
    for a, b in zip(one.queries + one.keys, many.queries + many.keys):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
