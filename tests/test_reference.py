"""Reference captures and high-norm tokens (issue 16): the corrections of `utils/reference.py` on hand-made features,
`analyze_features(reference=, clamp_high_norm=)`, the pipeline's `capture_reference` cache, save/load, the CLI flag."""

import gc
import math

import numpy as np
import pytest
import torch
from conftest import NO_FILTER

from cosegment import CoSegmentationFeatures, analyze_features, analyze_pairs
from cosegment.analysis import check_analysis_settings, correct_features
from cosegment.benchmarks.planted import make_planted_features
from cosegment.utils.reference import (
    OFFSET_SIGMAS,
    clamp_high_norm_tokens,
    inpaint_high_norm_tokens,
    offset_smoothing,
    positional_offsets,
    reference_offsets,
    remove_offsets,
    smooth_over_grid,
    token_norm_bounds,
)


def _features(queries, keys=None, grid=(4, 4), names=None):
    keys = [q.clone() for q in queries] if keys is None else keys
    sizes = [(32, 32)] * queries[0].shape[0]
    return CoSegmentationFeatures(list(queries), list(keys), grid, sizes, names or [])


def _outputs_equal(a, b) -> bool:
    if len(a.correspondences) != len(b.correspondences):
        return False
    for pa, pb in zip(a.correspondences, b.correspondences):
        for name in ("source_tokens", "target_tokens", "scores", "mutual"):
            if not np.array_equal(getattr(pa, name), getattr(pb, name)):
                return False
    maps = ("density_maps", "entropy_maps", "inverse_error_maps")
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in maps) and all(
        np.array_equal(x, y) for x, y in zip(a.part_masks, b.part_masks)
    )


class TestOffsets:
    def test_shape_and_zero_sum(self):
        ref = torch.randn(5, 2, 16, 3)
        offsets = positional_offsets(ref)
        assert offsets.shape == (2, 16, 3)
        assert torch.allclose(offsets.sum(dim=1), torch.zeros(2, 3), atol=1e-5)

    def test_planted_positional_component_removed_content_kept(self):
        gen = torch.Generator().manual_seed(0)
        heads, tokens, dim = 2, 64, 16
        positional = 3.0 * torch.randn(heads, tokens, dim, generator=gen)
        positional -= positional.mean(dim=1, keepdim=True)
        reference = positional + 0.3 * torch.randn(32, heads, tokens, dim, generator=gen)
        content = torch.randn(3, heads, tokens, dim, generator=gen)
        corrected = remove_offsets(content + positional, positional_offsets(reference))
        # the positional component is gone up to the reference's estimation noise (0.3 / sqrt(32) per entry) ...
        residual = corrected - content
        assert residual.pow(2).mean().sqrt() < 0.1
        # ... and the content is what remains (uncorrected, the error would be the whole component, RMS 3)
        assert (content + positional - content).pow(2).mean().sqrt() > 2.5

    def test_offsets_of_pure_noise_are_shrunk_to_almost_nothing(self):
        # a reference without a shared component: its mean is estimation noise, which must not be subtracted
        ref = torch.randn(16, 2, 64, 16, generator=torch.Generator().manual_seed(1))
        raw = ref.mean(0) - ref.mean(0).mean(dim=1, keepdim=True)
        shrunk = positional_offsets(ref)
        assert shrunk.norm() < 0.25 * raw.norm()

    def test_constant_reference_gives_no_offsets(self):
        # the same vector at every position (a uniform image's own features) cancels in the centring
        ref = torch.randn(1, 2, 1, 4).expand(8, 2, 16, 4) + 0.01 * torch.randn(8, 2, 16, 4)
        assert positional_offsets(ref).abs().max() < 0.01

    def test_dtype_kept(self):
        tokens = torch.randn(2, 1, 4, 3, dtype=torch.float64)
        assert remove_offsets(tokens, torch.zeros(1, 4, 3)).dtype == torch.float64


def _smooth_field(grid=(16, 16), heads=2, dim=8, seed=3) -> torch.Tensor:
    """`(heads, h * w, dim)` smooth positional field (12 low-frequency cosines), zero mean over positions, RMS 1."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    freqs = 0.25 * torch.randn(12, 2, generator=gen)
    phases = 2 * math.pi * torch.rand(12, generator=gen)
    amps = torch.randn(12, heads * dim, generator=gen)
    field = torch.cos(rows.reshape(-1, 1) * freqs[:, 0] + cols.reshape(-1, 1) * freqs[:, 1] + phases) @ amps
    field = field.reshape(h * w, heads, dim).permute(1, 0, 2)
    field = field - field.mean(dim=1, keepdim=True)
    return field / field.pow(2).mean().sqrt()


class TestSmoothedOffsets:
    grid = (16, 16)

    def test_smooth_field_is_estimated_from_neighbours(self):
        # 16 captures, noise of the field's own RMS per entry: the per-position estimate keeps noise of RMS 1/4; the
        # grid estimate averages neighbouring positions (it measured 0.12-0.13 here against 0.24)
        field = _smooth_field(self.grid)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            reference = field + torch.randn(16, *field.shape, generator=gen)
            per_position = (positional_offsets(reference) - field).pow(2).mean().sqrt()
            on_grid = (positional_offsets(reference, self.grid) - field).pow(2).mean().sqrt()
            assert 0.2 < per_position < 0.3
            assert on_grid < 0.6 * per_position
            assert offset_smoothing(reference, self.grid) > 0

    def test_corner_tokens_survive_the_smoothing(self):
        # spikes at the four corners (what Stable Diffusion's corner tokens look like), nothing elsewhere
        h, w = self.grid
        gen = torch.Generator().manual_seed(5)
        corners = torch.tensor([0, w - 1, (h - 1) * w, h * w - 1])
        spikes = torch.zeros(2, h * w, 8)
        spikes[:, corners] = 4.0 * torch.randn(2, 4, 8, generator=gen)
        spikes -= spikes.mean(dim=1, keepdim=True)
        reference = spikes + torch.randn(16, *spikes.shape, generator=gen)
        error = positional_offsets(reference, self.grid) - spikes
        elsewhere = torch.ones(h * w, dtype=torch.bool)
        elsewhere[corners] = False
        assert error[:, corners].pow(2).mean().sqrt() < 0.1 * 4.0  # a corner keeps its spike up to noise
        assert error[:, elsewhere].pow(2).mean().sqrt() < 0.1  # and is not smeared over its neighbours

    def test_field_without_smoothness_keeps_the_per_position_estimate(self):
        gen = torch.Generator().manual_seed(6)
        white = 3.0 * torch.randn(2, 256, 8, generator=gen)
        white -= white.mean(dim=1, keepdim=True)
        reference = white + 0.3 * torch.randn(16, *white.shape, generator=gen)
        assert offset_smoothing(reference, self.grid) == 0.0
        assert torch.equal(positional_offsets(reference, self.grid), positional_offsets(reference))

    def test_pure_noise_is_shrunk_on_the_grid_too(self):
        reference = torch.randn(16, 2, 256, 8, generator=torch.Generator().manual_seed(7))
        raw = reference.mean(0) - reference.mean(0).mean(dim=1, keepdim=True)
        offsets = positional_offsets(reference, self.grid)
        assert offsets.norm() < 0.25 * raw.norm()
        assert torch.allclose(offsets.sum(dim=1), torch.zeros(2, 8), atol=1e-4)

    def test_a_reference_whose_halves_do_not_agree_subtracts_nothing(self):
        # captures with their own smooth content and nothing shared (a model without positional components): what
        # the even half estimates does not predict the odd half's mean better than zero, so the offsets are zero
        noise_only = torch.stack([3.0 * _smooth_field(self.grid, seed=100 + r) for r in range(16)])
        first, second = noise_only[0::2], noise_only[1::2]
        raw = [second.mean(0) - second.mean(0).mean(1, keepdim=True), first.mean(0) - first.mean(0).mean(1, True)]
        from cosegment.utils.reference import _denoised_offsets  # the estimate before the test

        by_half = [_denoised_offsets(first, self.grid), _denoised_offsets(second, self.grid)]
        assert by_half[0].abs().sum() > 0  # each half alone keeps some of its noise
        errors = sum(float((e - r).pow(2).sum()) for e, r in zip(by_half, raw))
        assert errors >= sum(float(r.pow(2).sum()) for r in raw)  # the documented test fails
        assert torch.equal(positional_offsets(noise_only, self.grid), torch.zeros(2, 256, 8))
        # the same captures sharing a smooth field: the halves agree, and the offsets find it
        shared = noise_only + 2.0 * _smooth_field(self.grid, seed=99)
        estimate = positional_offsets(shared, self.grid)
        truth = 2.0 * _smooth_field(self.grid, seed=99)
        assert (estimate - truth).norm() < 0.5 * truth.norm()

    def test_a_weak_smooth_field_is_kept_when_the_grid_estimate_reproduces_it(self):
        # a shared field of 0.12 of the noise per entry: each half's grid estimate predicts the other half (the
        # field is kept, and estimated better than by zero) where per-position estimates would not
        from cosegment.utils.reference import _centred_mean, _denoised_offsets

        truth = 0.12 * _smooth_field(self.grid, seed=99)
        reference = truth + torch.randn(16, 2, 256, 8, generator=torch.Generator().manual_seed(1))
        first, second = reference[0::2], reference[1::2]

        def halves_error(grid):
            estimates = [_denoised_offsets(first, grid), _denoised_offsets(second, grid)]
            return sum(
                float((e - r).pow(2).sum()) for e, r in zip(estimates, [_centred_mean(second), _centred_mean(first)])
            )

        zero = float(_centred_mean(second).pow(2).sum() + _centred_mean(first).pow(2).sum())
        assert halves_error(self.grid) < zero <= halves_error(None)
        offsets = positional_offsets(reference, self.grid)
        assert (offsets - truth).norm() < truth.norm()

    def test_four_captures_are_enough_for_the_halves_test(self):
        noise_only = torch.stack([3.0 * _smooth_field(self.grid, seed=100 + r) for r in range(4)])
        assert torch.equal(positional_offsets(noise_only, self.grid), torch.zeros(2, 256, 8))

    def test_the_width_is_the_one_whose_halves_predict_each_other_best(self):
        # the documented rule, computed here by hand: even captures' smoothed offsets against the odd ones' and back
        field = 0.5 * _smooth_field(self.grid)
        gen = torch.Generator().manual_seed(9)
        for scale in (0.5, 2.0, 8.0):
            reference = field + scale * torch.randn(10, *field.shape, generator=gen)

            def centred(x):
                return x.mean(0) - x.mean(0).mean(dim=1, keepdim=True)

            even, odd = centred(reference[0::2]), centred(reference[1::2])
            errors = [
                float(
                    (smooth_over_grid(even, self.grid, s) - odd).pow(2).sum()
                    + (smooth_over_grid(odd, self.grid, s) - even).pow(2).sum()
                )
                for s in OFFSET_SIGMAS
            ]
            assert offset_smoothing(reference, self.grid) == OFFSET_SIGMAS[int(np.argmin(errors))]
        # and the noisier the captures, the wider: the last (noisiest) picks the widest width
        assert offset_smoothing(reference, self.grid) == OFFSET_SIGMAS[-1]

    def test_offsets_follow_the_tokens_device(self):
        # the meta device stands in for a GPU: offsets computed on the CPU (the reference's device) are moved to the
        # tokens' device, never mixed with them
        tokens = torch.empty(2, 2, 16, 4, device="meta")
        corrected = remove_offsets(tokens, torch.randn(2, 16, 4))
        assert corrected.device == torch.device("meta") and corrected.shape == tokens.shape

    def test_low_precision_tokens_keep_their_dtype(self):
        tokens = torch.randn(2, 2, 16, 4).to(torch.bfloat16)
        offsets = positional_offsets(torch.randn(4, 2, 16, 4), (4, 4))  # float32
        assert remove_offsets(tokens, offsets).dtype == torch.bfloat16
        tokens[0, :, 3] *= 50.0  # one high-norm token: the clamp rescales it in the tokens' own dtype
        clamped = clamp_high_norm_tokens(tokens, 5.0)
        assert clamped.dtype == torch.bfloat16 and not torch.equal(clamped, tokens)

    def test_smoothing_kernel_is_the_documented_gaussian(self):
        # a spike in the middle of a 31 x 31 grid (the border far enough not to renormalise the rows measurably):
        # a token at (dr, dc) from it gets exp(-0.5 (dr^2 + dc^2) / sigma^2) of what the spike keeps
        spike = torch.zeros(1, 31 * 31, 1)
        spike[0, 15 * 31 + 15] = 1.0
        for sigma in (1.0, 2.0):
            out = smooth_over_grid(spike, (31, 31), sigma)[0, :, 0].reshape(31, 31)
            assert out[15, 16] / out[15, 15] == pytest.approx(math.exp(-0.5 / sigma**2), rel=1e-5)
            assert out[17, 18] / out[15, 15] == pytest.approx(math.exp(-0.5 * (4 + 9) / sigma**2), rel=1e-4)

    def test_smoothing_keeps_a_constant_up_to_the_border(self):
        constant = torch.full((1, 12 * 10, 3), 2.5)
        for sigma in OFFSET_SIGMAS[1:]:
            assert torch.allclose(smooth_over_grid(constant, (12, 10), sigma), constant, atol=1e-5)
        assert smooth_over_grid(constant, (12, 10), 0.0) is constant


inpaint = inpaint_high_norm_tokens


class TestOffsetsCache:
    """`reference_offsets`: the smoothed offsets of a reference tensor computed once while it lives."""

    def _reference(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        field = 4.0 * smooth_over_grid(torch.randn(2, 36, 4, generator=gen), (6, 6), 1.5)  # smooth on a 6 x 6 grid
        captures = field + 0.5 * torch.randn(8, 2, 36, 4, generator=gen)
        captures[3, :, 7] *= 40.0  # one high-norm token, so the clamp matters
        return captures

    def test_same_as_computed_directly_and_kept_per_grid_and_rule(self):
        reference = self._reference()
        cases = [((6, 6), None), ((6, 6), 5.0), ((4, 9), 5.0), (None, 5.0)]
        assert offset_smoothing(reference, (6, 6)) > 0  # smoothed, so the grid matters
        first = {}
        for grid, mads in cases:  # the reference's high-norm tokens replaced as the analysis does (no grid: rescaled)
            if mads is None:
                tokens = reference
            else:
                tokens = clamp_high_norm_tokens(reference, mads) if grid is None else inpaint(reference, mads, grid)
            first[grid, mads] = reference_offsets(reference, grid, mads)
            assert torch.equal(first[grid, mads], positional_offsets(tokens, grid))
        for grid, mads in cases:  # the second time, the very same tensors
            assert reference_offsets(reference, grid, mads) is first[grid, mads]
        assert not torch.equal(first[(6, 6), None], first[(6, 6), 5.0])
        assert not torch.equal(first[(6, 6), 5.0], first[(4, 9), 5.0])

    def test_an_in_place_change_computes_them_again(self):
        reference = self._reference()
        before = reference_offsets(reference, (6, 6), 5.0)
        reference[:, :, :6] += 3.0  # the first row of the grid moves
        after = reference_offsets(reference, (6, 6), 5.0)
        assert torch.equal(after, positional_offsets(inpaint(reference, 5.0, (6, 6)), (6, 6)))
        assert not torch.equal(after, before)

    def test_equal_values_in_another_tensor_are_not_a_hit_and_entries_go_with_their_tensor(self, monkeypatch):
        import cosegment.utils.reference as R

        calls = []
        direct = R.positional_offsets
        monkeypatch.setattr(R, "positional_offsets", lambda *a: calls.append(1) or direct(*a))
        reference = self._reference()
        copy = reference.clone()
        a, b = R.reference_offsets(reference, (6, 6)), R.reference_offsets(copy, (6, 6))
        assert len(calls) == 2 and a is not b and torch.equal(a, b)
        ident = id(copy)
        assert ident in R._OFFSETS_CACHE
        del copy, b
        gc.collect()
        assert ident not in R._OFFSETS_CACHE and id(reference) in R._OFFSETS_CACHE

    def test_an_inference_mode_reference_is_computed_each_time(self, monkeypatch):
        # inference tensors track no version counter, so nothing is kept for them; the offsets are still right
        import cosegment.utils.reference as R

        calls = []
        direct = R.positional_offsets
        monkeypatch.setattr(R, "positional_offsets", lambda *a: calls.append(1) or direct(*a))
        plain = self._reference()
        with torch.inference_mode():
            frozen = plain.clone()
        first, again = R.reference_offsets(frozen, (6, 6), 5.0), R.reference_offsets(frozen, (6, 6), 5.0)
        assert len(calls) == 2 and id(frozen) not in R._OFFSETS_CACHE
        assert torch.equal(first, again) and torch.equal(first, R.reference_offsets(plain, (6, 6), 5.0))

    def test_the_analysis_computes_a_references_offsets_once(self, planted, monkeypatch):
        import cosegment.utils.reference as R

        calls = []
        direct = R.positional_offsets
        monkeypatch.setattr(R, "positional_offsets", lambda *a: calls.append(1) or direct(*a))
        f = planted.features
        gen = torch.Generator().manual_seed(5)
        reference = _features([torch.randn(6, *q.shape[1:], generator=gen) for q in f.queries], grid=f.grid_size)
        settings = check_analysis_settings(reference=reference)
        first = correct_features(f, settings)
        assert len(calls) == 2 * len(f.queries)  # queries and keys of every layer
        second = correct_features(f, settings)
        assert len(calls) == 2 * len(f.queries)  # none again
        assert all(torch.equal(x, y) for x, y in zip(first.queries + first.keys, second.queries + second.keys))
        correct_features(f, check_analysis_settings(reference=reference, clamp_high_norm=False))
        assert len(calls) == 4 * len(f.queries)  # another rule for the reference's own high-norm tokens


class TestHighNorm:
    def test_hand_made_case(self):
        # 2 images, 1 head, 9 tokens of norm 1, 1.1, ..., and one of norm 10 in image 0
        base = torch.zeros(2, 1, 9, 2)
        base[..., 0] = torch.linspace(1.0, 1.8, 9)
        base[0, 0, 4] = torch.tensor([6.0, 8.0])  # norm 10
        norms, bounds = token_norm_bounds(base, 5.0)
        # image 0: norms 1.0 .. 1.8 with 1.4 replaced by 10 -> median 1.5; deviations 0, .1, .2, .2, .3, .3, .4, .5, 8.5: MAD .3
        assert norms.shape == (2, 9) and bounds.shape == (2, 1)
        assert bounds[0, 0].item() == pytest.approx(1.5 + 5.0 * 1.4826 * 0.3, rel=1e-5)
        clamped = clamp_high_norm_tokens(base, 5.0)
        assert clamped[0, 0, 4].norm().item() == pytest.approx(bounds[0, 0].item(), rel=1e-5)
        # direction kept, every other token untouched
        assert torch.allclose(clamped[0, 0, 4] / clamped[0, 0, 4].norm(), torch.tensor([0.6, 0.8]))
        others = torch.ones(2, 9, dtype=torch.bool)
        others[0, 4] = False
        assert torch.equal(clamped[:, 0][others], base[:, 0][others])

    def test_nothing_high_returns_same_object(self):
        tokens = torch.ones(2, 2, 8, 4)
        assert clamp_high_norm_tokens(tokens, 5.0) is tokens

    def test_norm_over_heads(self):
        # a token high in one head only counts by its norm over all heads
        tokens = torch.ones(1, 2, 10, 1)
        tokens[0, 0, 3] = 10.0
        norms, _ = token_norm_bounds(tokens, 5.0)
        assert norms[0, 3].item() == pytest.approx(math.sqrt(101.0))


class TestInpaint:
    """`inpaint_high_norm_tokens`: each high-norm token replaced by the mean of its ordinary 8-neighbours."""

    def _grid(self, seed=0, images=2, grid=(5, 6)):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(images, 2, grid[0] * grid[1], 3, generator=gen) + 2.0  # norms about 5 +- 1

    def _by_hand(self, tokens, high, grid):
        h, w = grid
        out = tokens.clone()
        for m, n in high:
            r, c = divmod(n, w)
            near = [
                (r + a) * w + c + b
                for a in (-1, 0, 1)
                for b in (-1, 0, 1)
                if (a, b) != (0, 0) and 0 <= r + a < h and 0 <= c + b < w and (m, (r + a) * w + c + b) not in high
            ]
            out[m, :, n] = tokens[m, :, near].mean(dim=1)
        return out

    def test_the_mean_of_the_ordinary_neighbours_inside_corners_and_edges(self):
        grid = (5, 6)
        tokens = self._grid()
        # two adjacent, a corner, the last corner, an edge; and in image 1 a corner whose only ordinary neighbour is
        # its diagonal one (0 with 1 and 6 high: the mean of one token)
        high = {(0, 8), (0, 9), (0, 0), (1, 29), (1, 17), (1, 0), (1, 1), (1, 6)}
        for m, n in high:
            tokens[m, :, n] *= 20.0
        out = inpaint_high_norm_tokens(tokens, 5.0, grid)
        assert torch.allclose(out, self._by_hand(tokens, high, grid), atol=1e-6)
        moved = {(m, n) for m, n in (out != tokens).any(dim=3).any(dim=1).nonzero().tolist()}
        assert moved == high  # no other token moves
        assert torch.equal(out[1, :, 0], tokens[1, :, 7])

    def test_a_token_without_ordinary_neighbours_is_rescaled_instead(self):
        grid = (5, 5)
        tokens = self._grid(1, images=1, grid=grid)
        block = [r * 5 + c for r in (1, 2, 3) for c in (1, 2, 3)]  # a 3 x 3 block: its centre (12) sees only highs
        tokens[0, :, block] *= 20.0
        out = inpaint_high_norm_tokens(tokens, 5.0, grid)
        assert torch.equal(out[0, :, 12], clamp_high_norm_tokens(tokens, 5.0)[0, :, 12])
        others = {(0, n) for n in block}
        expected = self._by_hand(
            tokens, others, grid
        )  # (the centre, which has no ordinary neighbour, is not compared)
        for n in set(block) - {12}:
            assert torch.allclose(out[0, :, n], expected[0, :, n], atol=1e-6)

    def test_nothing_high_returns_same_object_and_dtype_is_kept(self):
        tokens = torch.ones(2, 2, 12, 4)
        assert inpaint_high_norm_tokens(tokens, 5.0, (3, 4)) is tokens
        tokens = self._grid().to(torch.bfloat16)
        tokens[0, :, 7] *= 20.0
        out = inpaint_high_norm_tokens(tokens, 5.0, (5, 6))
        assert out.dtype == torch.bfloat16 and not torch.equal(out, tokens)

    def test_closer_to_the_content_than_rescaling_on_planted_anomalies(self):
        # the planted anomalies replace a token's content; its neighbours tell more of it than its rescaled self
        clean = make_planted_features(2, noise=0.15, seed=2003, grid_size=(16, 16))
        case = make_planted_features(2, noise=0.15, seed=2003, grid_size=(16, 16), anomalies=6)
        truth, tokens, where = clean.features.keys[0], case.features.keys[0], torch.from_numpy(case.high_norm)
        inpainted = inpaint_high_norm_tokens(tokens, 5.0, (16, 16))
        rescaled = clamp_high_norm_tokens(tokens, 5.0)

        def error(x):
            return (x - truth).pow(2).sum(dim=(1, 3))[where].mean().item()

        assert error(inpainted) < 0.5 * error(rescaled)


@pytest.fixture(scope="module")
def planted():
    return make_planted_features(2, noise=0.3, seed=2001, grid_size=(16, 16))


class TestAnalysis:
    def test_none_is_bitwise_the_old_result(self, planted):
        # clamp off and no reference: correct_features returns the very same features object
        settings = check_analysis_settings(clamp_high_norm=False)
        assert correct_features(planted.features, settings) is planted.features
        old = analyze_features(planted.features, clamp_high_norm=False)
        again = analyze_features(planted.features, reference=None, clamp_high_norm=False)
        assert _outputs_equal(old, again)

    def test_clamp_changes_only_when_a_token_is_high(self, planted):
        # corrected as each image is read (issue 26): an image's tensors change only where one of its tokens is high
        anomalous = make_planted_features(2, noise=0.3, seed=2001, grid_size=(16, 16), anomalies=2).features
        changed = []
        for features in (planted.features, anomalous):
            corrected = correct_features(features, check_analysis_settings())
            for i in range(features.num_images):
                for original, new in zip(sum(features.image(i), []), sum(corrected.image(i), [])):
                    norms, bounds = token_norm_bounds(original[None], 5.0)
                    assert torch.equal(original, new) == (not bool((norms > bounds).any()))
                    changed.append(not torch.equal(original, new))
        assert any(changed) and not all(changed)

    def test_reference_changes_the_features_and_the_result_depends_on_it(self, planted):
        f = planted.features
        gen = torch.Generator().manual_seed(3)
        shift = [10.0 * torch.randn(1, *q.shape[1:], generator=gen) for q in f.queries]
        shift = [s - s.mean(dim=2, keepdim=True) for s in shift]
        # features carrying a strong positional component, and a reference with the same component
        shifted = _features(
            [q + s for q, s in zip(f.queries, shift)], [k + s for k, s in zip(f.keys, shift)], f.grid_size
        )
        noise = [0.05 * torch.randn(8, *q.shape[1:], generator=gen) for q in f.queries]
        reference = _features([s + n for s, n in zip(shift, noise)], grid=f.grid_size)
        corrected = correct_features(shifted, check_analysis_settings(reference=reference, clamp_high_norm=False))
        error_before = (shifted.queries[0] - f.queries[0]).norm()
        error_after = (corrected.queries[0] - f.queries[0]).norm()
        assert error_after < 0.05 * error_before

    def test_validation_names_reference(self, planted):
        f = planted.features
        wrong_grid = _features([torch.randn(3, 4, 16, f.queries[0].shape[3])])
        with pytest.raises(ValueError, match="`reference`"):
            analyze_features(f, reference=wrong_grid)
        q = f.queries[0]
        wrong_heads = _features([torch.randn(3, q.shape[1] + 1, q.shape[2], q.shape[3])], grid=f.grid_size)
        with pytest.raises(ValueError, match="`reference`.*heads"):
            analyze_features(f, reference=wrong_heads)
        wrong_dim = _features([torch.randn(3, q.shape[1], q.shape[2], q.shape[3] + 1)], grid=f.grid_size)
        with pytest.raises(ValueError, match="`reference`.*size"):
            analyze_features(f, reference=wrong_dim)
        wrong_name = _features([torch.randn(3, *q.shape[1:])], grid=f.grid_size, names=["up_blocks.9.attn1"])
        with pytest.raises(ValueError, match="`reference` has no entry for layer"):
            analyze_features(f, reference=wrong_name)
        with pytest.raises(TypeError, match="`reference`"):
            analyze_features(f, reference="auto")
        with pytest.raises(TypeError, match="`clamp_high_norm`"):
            analyze_features(f, clamp_high_norm=1)

    def test_pair_analyses_must_use_the_same_reference(self, planted):
        f = planted.features
        reference = _features([torch.randn(4, *q.shape[1:]) for q in f.queries], grid=f.grid_size)
        pairs = analyze_pairs(f, reference=reference)
        joined = analyze_features(f, pair_analyses=pairs, reference=reference)
        assert _outputs_equal(joined, analyze_features(f, reference=reference))
        with pytest.raises(ValueError, match="pair_analyses"):
            analyze_features(f, pair_analyses=pairs)
        with pytest.raises(ValueError, match="pair_analyses"):
            analyze_features(f, pair_analyses=pairs, reference=reference, clamp_high_norm=False)

    def test_a_reference_without_positional_structure_changes_nothing(self, planted):
        # content-free captures with no shared component: the analysis with them is the analysis without them
        f = planted.features
        gen = torch.Generator().manual_seed(8)
        reference = _features([torch.randn(16, *q.shape[1:], generator=gen) for q in f.queries], grid=f.grid_size)
        assert _outputs_equal(analyze_features(f, reference=reference), analyze_features(f))

    def test_pairs_made_by_the_earlier_high_norm_rule_are_refused(self, planted):
        # a pair analysis saved before the neighbours rule records only `clamp_high_norm`: it is not mixed in
        from dataclasses import replace

        f = planted.features
        assert check_analysis_settings().pair_settings["high_norm_rule"] == "neighbours"
        assert "high_norm_rule" not in check_analysis_settings(clamp_high_norm=False).pair_settings
        pairs = analyze_pairs(f)
        assert _outputs_equal(analyze_features(f, pair_analyses=pairs), analyze_features(f))
        earlier = {k: v for k, v in pairs[0].settings.items() if k != "high_norm_rule"}
        with pytest.raises(ValueError, match="pair_analyses"):
            analyze_features(f, pair_analyses=[replace(pairs[0], settings=earlier)])


class TestSaveLoad:
    def test_reference_survives_save_and_load(self, planted, tmp_path):
        f = planted.features
        reference = _features([torch.randn(3, *q.shape[1:]) for q in f.queries], grid=f.grid_size)
        reference.metadata["reference"] = "blank"
        with_ref = f.to()
        with_ref.reference = reference
        assert with_ref.to("cpu").reference is not None
        path = tmp_path / "features.safetensors"
        with_ref.save(path)
        loaded = CoSegmentationFeatures.load(path)
        assert loaded.reference is not None and loaded.reference.reference is None
        assert loaded.reference.metadata == {"reference": "blank"}
        for a, b in zip(loaded.reference.queries + loaded.reference.keys, reference.queries + reference.keys):
            assert torch.equal(a, b)
        for a, b in zip(loaded.queries, f.queries):
            assert torch.equal(a, b)
        # a file without a reference loads as before
        f.save(tmp_path / "plain.safetensors")
        assert CoSegmentationFeatures.load(tmp_path / "plain.safetensors").reference is None

    def test_bad_reference_attribute(self, planted):
        f = planted.features
        with pytest.raises(ValueError, match="`reference`"):
            CoSegmentationFeatures(f.queries, f.keys, f.grid_size, f.image_sizes, reference="x")


class _UNetCalls:
    """Counts forwards of the UNet through a forward pre-hook."""

    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


class TestPipeline:
    def test_capture_reference_is_cached(self, tiny_pipe):
        tiny_pipe.reference_cache.clear()
        calls = _UNetCalls(tiny_pipe.unet)
        try:
            first = tiny_pipe.capture_reference(num_images=4, batch_size=2)
            after_first = calls.count
            second = tiny_pipe.capture_reference(num_images=4, batch_size=2)
            assert after_first == 2 and calls.count == after_first  # two batches, then the cache
            assert second is first
            assert first.num_images == 4 and first.metadata["reference"] == "blank"
            # another timestep is another reference
            other = tiny_pipe.capture_reference(num_images=4, timestep=100, batch_size=4)
            assert other is not first and calls.count == after_first + 1
        finally:
            calls.handle.remove()
            tiny_pipe.reference_cache.clear()

    def test_capture_reference_reproducible_and_argument_checks(self, tiny_pipe):
        a = tiny_pipe.capture_reference(num_images=2)
        tiny_pipe.reference_cache.clear()
        b = tiny_pipe.capture_reference(num_images=2)
        assert a is not b and torch.equal(a.queries[0], b.queries[0])
        with pytest.raises(ValueError, match="`num_images`"):
            tiny_pipe.capture_reference(num_images=1)
        with pytest.raises(ValueError, match="`height`"):
            tiny_pipe.capture_reference(height=30)
        tiny_pipe.reference_cache.clear()

    def test_call_with_reference(self, tiny_pipe, photos):
        images = photos[:2]
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        auto = tiny_pipe(images, generator=gen(), reference="auto", return_features=True, **NO_FILTER)
        reference = auto.features.reference
        assert reference is not None and reference.num_images == 16
        assert reference is next(iter(tiny_pipe.reference_cache.values()))
        # the same reference given explicitly, and the features' own re-analysis, give the same output
        given = tiny_pipe(images, generator=gen(), reference=reference, **NO_FILTER)
        assert _outputs_equal(auto, given)
        again = analyze_features(auto.features, reference=auto.features.reference, **NO_FILTER)
        assert _outputs_equal(auto, again)
        with pytest.raises(ValueError, match="`reference`"):
            tiny_pipe(images, reference="yes")
        with pytest.raises(TypeError, match="`reference`"):
            tiny_pipe(images, reference=3)
        with pytest.raises(ValueError, match="`reference` has token grid"):
            tiny_pipe(images, reference=_features([torch.randn(2, 1, 4, 2)], grid=(2, 2)))
        tiny_pipe.reference_cache.clear()


class TestCli:
    def test_flag_parsing(self, tmp_path):
        from cosegment.cli import build_parser

        parser = build_parser()
        base = ["a.png", "b.png", "--out", str(tmp_path)]
        assert parser.parse_args(base).reference == "none"
        assert parser.parse_args(base + ["--reference", "auto"]).reference == "auto"
        saved = tmp_path / "reference.safetensors"
        saved.write_bytes(b"")
        assert parser.parse_args(base + ["--reference", str(saved)]).reference == str(saved)
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--reference", str(tmp_path / "missing.safetensors")])

    def test_cli_reference_file_matches_the_pipeline(self, tiny_pipe, tiny_sd_path, photos, tmp_path):
        import json
        import os

        import PIL.Image

        from cosegment.cli import main

        paths = []
        for i, photo in enumerate(photos[:2]):
            paths.append(str(tmp_path / f"photo_{i}.png"))
            PIL.Image.fromarray(photo).save(paths[-1])
        reference = tiny_pipe.capture_reference(128, 128, num_images=4)
        reference.save(tmp_path / "reference.safetensors")
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in NO_FILTER.items()]
        out = str(tmp_path / "out")
        args = paths + ["--model", tiny_sd_path, "--out", out, "--height", "128", "--width", "128", "--no-figures"]
        assert main(args + flags + ["--reference", str(tmp_path / "reference.safetensors")]) == 0
        with open(os.path.join(out, "results.json")) as handle:
            document = json.load(handle)
        expected = tiny_pipe(
            photos[:2],
            height=128,
            width=128,
            generator=torch.Generator().manual_seed(0),
            reference=reference,
            **NO_FILTER,
        )
        plain = tiny_pipe(photos[:2], height=128, width=128, generator=torch.Generator().manual_seed(0), **NO_FILTER)
        assert document["settings"]["reference"].endswith("reference.safetensors")
        assert document["correspondences"][0]["num_matches"] == len(expected.correspondences[0])
        theirs = np.array(document["correspondences"][0]["source_points"], np.float32)
        assert np.array_equal(theirs, expected.correspondences[0].source_points)
        # the reference changed something (else the comparison would prove nothing)
        assert not np.array_equal(plain.entropy_maps, expected.entropy_maps)
        tiny_pipe.reference_cache.clear()

    def test_cli_reference_auto_is_kept_with_the_features_and_resumed(self, tiny_sd_path, photos, tmp_path):
        import json
        import os

        import PIL.Image

        from cosegment.cli import main

        paths = []
        for i, photo in enumerate(photos[:2]):
            paths.append(str(tmp_path / f"photo_{i}.png"))
            PIL.Image.fromarray(photo).save(paths[-1])
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in NO_FILTER.items()]
        out = str(tmp_path / "out")
        args = paths + ["--model", tiny_sd_path, "--out", out, "--height", "128", "--width", "128", "--no-figures"]
        assert main(args + flags + ["--reference", "auto", "--quiet"]) == 0
        with open(os.path.join(out, "results.json")) as handle:
            first = json.load(handle)
        kept = CoSegmentationFeatures.load(os.path.join(out, "resume", "features"), mmap=True)  # the kept store
        assert kept.reference is not None and kept.reference.num_images == 16
        assert kept.reference.grid_size == kept.grid_size
        assert main(args + flags + ["--reference", "auto", "--quiet", "--resume"]) == 0
        with open(os.path.join(out, "results.json")) as handle:
            again = json.load(handle)
        assert again["correspondences"] == first["correspondences"] and again["settings"]["reference"] == "auto"
        with pytest.raises(SystemExit) as refusal:  # without the reference the kept features are stale
            main(args + flags + ["--reference", "none", "--quiet", "--resume"])
        assert refusal.value.code != 0


def test_readme_reference_snippet_runs(tiny_pipe, photos, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "capture_reference(" in b)
    monkeypatch.chdir(tmp_path)
    namespace = {"pipe": tiny_pipe, "images": photos[:2], "analyze_features": analyze_features}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].features.reference is namespace["reference"]
    assert _outputs_equal(namespace["out"], namespace["again"])
    assert CoSegmentationFeatures.load(tmp_path / "features.safetensors").reference.num_images == 16
    tiny_pipe.reference_cache.clear()
