"""Structural guarantees behind the speed and memory numbers (the numbers themselves: benchmarks/)."""

import math

import pytest
import torch

from cosegment import CoSegmentationFeatures, analyze_features, attention_row_statistics


def test_attention_is_never_materialised_whole_at_n_4096(monkeypatch):
    # a pair at N = 4096 (64 x 64 grid), 10 heads of 64: one (H, N, N) float32 block would be 640 MiB
    heads, n, d = 10, 4096, 64
    largest = []
    softmax = torch.softmax

    def spy(x, *args, **kwargs):
        largest.append(x.numel())
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", spy)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(heads, n, d, generator=gen), torch.randn(heads, n, d, generator=gen)
    stats = attention_row_statistics(q[:, :600], k)  # 600 source rows are enough to need two chunks
    assert stats.argmax.shape == (600,)
    assert len(largest) >= 2
    assert max(largest) * 4 <= 128 * 2**20  # each block stays near 64 MiB, far below the 640 MiB of the whole


def test_unet_passes_are_ceil_of_images_times_draws_over_batch(tiny_pipe, photos):
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    decoder_calls = []
    decoder_handle = tiny_pipe.vae.decoder.register_forward_pre_hook(lambda module, args: decoder_calls.append(1))
    try:
        for images, draws, batch in ((3, 1, 8), (3, 2, 4), (4, 3, 5)):
            calls.clear()
            tiny_pipe.capture_features(photos[:images] * 1, height=64, width=64, ensemble_size=draws, batch_size=batch)
            assert len(calls) == math.ceil(images * draws / batch)
            assert sum(calls) == images * draws
    finally:
        handle.remove()
        decoder_handle.remove()
    assert decoder_calls == []  # the VAE decoder never runs


def test_pairs_are_streamed_memory_does_not_depend_on_pair_count(monkeypatch):
    # analysis keeps per pair only the outputs: count the live (H, rows, N) blocks by watching matmul outputs
    gen = torch.Generator().manual_seed(0)
    m, heads, n, d = 5, 2, 64, 8
    features = CoSegmentationFeatures(
        [torch.randn(m, heads, n, d, generator=gen)],
        [torch.randn(m, heads, n, d, generator=gen)],
        (8, 8),
        [(32, 32)] * m,
    )
    sizes = []
    matmul = torch.matmul

    def spy(a, b, *args, **kwargs):
        out = matmul(a, b, *args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    out = analyze_features(features)
    assert len(out.correspondences) == 10
    assert max(sizes) <= heads * n * n  # never more than one pair-direction block at once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipelines_run_with_float32_maths(tiny_sd_path, photos, dtype):
    from cosegment import StableDiffusionCoSegmentationPipeline
    from cosegment.utils.command_line import dtype_keyword

    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path, **dtype_keyword(dtype))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image=photos[:2],
        height=128,
        width=128,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        return_features=True,
    )
    assert out.features.queries[0].dtype == dtype  # captured in the model's dtype (half the memory)
    assert out.entropy_maps.dtype == torch.float32 and bool(torch.isfinite(out.entropy_maps).all())
    # the maths is float32 whatever the capture dtype: analysing the upcast features gives the same maps
    upcast = analyze_features(out.features.to(dtype=torch.float32), output_type="pt")
    torch.testing.assert_close(upcast.entropy_maps, out.entropy_maps)


@pytest.mark.parametrize(("num_images", "seed"), [(2, 2001), (4, 5)])
def test_bfloat16_capture_agrees_with_float32_on_planted_features(num_images, seed):
    """Stated tolerance: with Q/K stored in bfloat16 (what a bfloat16 pipeline captures), the kept match sets
    overlap by >= 97% (intersection over union), precision and coverage move by <= 0.01, mask Jaccard by <= 0.05
    and part NMI by <= 0.02."""
    from cosegment.benchmarks.planted import make_planted_features, score_output

    case = make_planted_features(num_images, noise=0.3, seed=seed)
    full = analyze_features(case.features)
    half = analyze_features(case.features.to(dtype=torch.bfloat16))

    def matches(out):
        return {
            (p.source_index, p.target_index, s, t)
            for p in out.correspondences
            for s, t in zip(p.source_tokens.tolist(), p.target_tokens.tolist())
        }

    a, b = matches(full), matches(half)
    assert len(a & b) / len(a | b) >= 0.97
    score_full, score_half = score_output(case, full), score_output(case, half)
    assert abs(score_full["precision"] - score_half["precision"]) <= 0.01
    assert abs(score_full["coverage"] - score_half["coverage"]) <= 0.01
    assert abs(score_full["jaccard"] - score_half["jaccard"]) <= 0.05
    assert abs(score_full["nmi"] - score_half["nmi"]) <= 0.02
