"""Which way round each image is (`orientation.py`, issue 27): the match strength by hand, the pair evidence on planted
symmetric objects, and the collection's one-bit-per-image decision, including pairs the collection corrects."""

import math

import numpy as np
import pytest
import torch

from cosegment.benchmarks.families import SYMMETRIC, make_family_case, make_mirrored
from cosegment.orientation import (
    CYCLE_LIMIT,
    decide_orientations,
    match_strength,
    match_strength_from_rows,
    orientation_evidence,
    pair_orientation_evidence,
    relative_evidence,
)
from cosegment.utils.correspondence import attention_row_statistics


def softmax_max(logits) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    return float(np.exp(logits.max()) / np.exp(logits).sum())


# ---------------------------------------------------------------------------------------------------------------
# Evidence
# ---------------------------------------------------------------------------------------------------------------


class TestMatchStrength:
    def test_two_tokens_by_hand(self):
        """Grid 1 x 2, one head, d = 2: both images are the tokens `a e1`, `a e2`; every cycle closes, so the strength
        is the four rows' maxima, each `softmax([a^2 / sqrt 2, 0])`."""
        a = 2.0
        x = torch.tensor([[[a, 0.0], [0.0, a]]])  # (H, N, d)
        p = softmax_max([a * a / math.sqrt(2), 0.0])
        assert match_strength(x, x, x, x, (1, 2)) == pytest.approx(4 * p, rel=1e-6)

    def test_a_cycle_that_does_not_close_is_left_out(self):
        """Grid 1 x 3, d = 3. s: tokens e1, e2, 0.9 e1; t: e2, e1, e3 + 0.3 e2. s0 -> t1 -> s0 and s1 -> t0 -> s1
        close; s2 -> t1 -> s0 ends 2 cells away. t0 -> s1 -> t0 and t1 -> s0 -> t1 close; t2 -> s1 -> t0 ends 2 cells
        away. The strength is the four closing rows' maxima."""
        e = torch.eye(3)
        s = torch.stack([e[0], e[1], 0.9 * e[0]])[None] * 3.0
        t = torch.stack([e[1], e[0], e[2] + 0.3 * e[1]])[None] * 3.0
        scale = 1 / math.sqrt(3)
        logits_st = (s[0] @ t[0].T).numpy() * scale
        logits_ts = (t[0] @ s[0].T).numpy() * scale
        expected = sum(softmax_max(logits_st[i]) for i in (0, 1)) + sum(softmax_max(logits_ts[i]) for i in (0, 1))
        assert 2 > CYCLE_LIMIT
        assert match_strength(s, s, t, t, (1, 3)) == pytest.approx(expected, rel=1e-6)

    def test_from_rows_equals_the_direct_form_and_layers_average(self):
        generator = torch.Generator().manual_seed(0)
        qs = [torch.randn(2, 12, 4, generator=generator) for _ in range(2)]
        qt = [torch.randn(2, 12, 4, generator=generator) for _ in range(2)]
        rows_st, rows_ts = attention_row_statistics(qs, qt), attention_row_statistics(qt, qs)
        direct = match_strength(qs, qs, qt, qt, (3, 4), chunk_size=5)
        assert direct == pytest.approx(match_strength_from_rows(rows_st, rows_ts, (3, 4)), rel=1e-6)
        assert 0.0 <= direct <= 2 * 12

    def test_relative_evidence(self):
        assert relative_evidence(3.0, 1.0) == 0.5
        assert relative_evidence(1.0, 3.0) == -0.5
        assert relative_evidence(0.0, 0.0) == 0.0


@pytest.fixture(scope="module")
def mixed_three():
    case = make_family_case("sectors", 3, 4, seed=17, mirror="half", **SYMMETRIC)
    return case, make_mirrored(case)


class TestPlantedEvidence:
    @pytest.mark.parametrize("seed", [11, 12, 13])
    def test_a_pair_says_which_way_round(self, seed):
        """Two images of a symmetric object: the evidence is negative when they face opposite ways, positive when the
        same way (the same draws but for the mirrors)."""
        for mirror, sign in (("half", -1), ("none", 1)):
            case = make_family_case("blobs", 2, 3, seed=seed, mirror=mirror, **SYMMETRIC)
            mirrored = make_mirrored(case)
            images = [case.features.image(0), case.features.image(1)]
            flipped = [mirrored.features.image(0), mirrored.features.image(1)]
            grid = case.features.grid_size
            both = pair_orientation_evidence(images[0], images[1], flipped[0], flipped[1], grid)
            one = pair_orientation_evidence(images[0], images[1], None, flipped[1], grid)
            assert sign * both > 0.02 and sign * one > 0.02
            # symmetric in the two images when all four captures weigh in
            assert pair_orientation_evidence(images[1], images[0], flipped[1], flipped[0], grid) == pytest.approx(both)

    def test_matrix_and_decision(self, mixed_three):
        case, mirrored = mixed_three
        evidence = orientation_evidence(case.features, mirrored.features)
        assert evidence.shape == (3, 3) and evidence.dtype == torch.float64
        assert torch.equal(evidence, evidence.T) and not evidence.diagonal().any()
        truth = case.mirrors[:, None] != case.mirrors[None, :]
        np.testing.assert_array_equal((evidence < 0).numpy() & ~np.eye(3, dtype=bool), truth)
        decision = decide_orientations(evidence)
        np.testing.assert_array_equal(decision.pair_flipped.numpy(), truth)
        assert int(decision.flipped.sum()) == 1  # one of three mirrored: the majority stays as it is

    def test_the_collection_corrects_planted_pairs(self):
        """A weak object-side term (0.1, picture side 0.4; design seed 503): two of the six pairs of this collection
        of four, alone, would pick the wrong orientation; the collection's decision gets every pair right and says
        which pairs it overruled."""
        case = make_family_case(
            "sectors", 4, 3, seed=503, mirror="half", symmetric=True, object_side=0.1, picture_side=0.4, num_heads=2
        )
        evidence = orientation_evidence(case.features, make_mirrored(case).features).numpy()
        truth = case.mirrors[:, None] != case.mirrors[None, :]
        alone_wrong = ((evidence < 0) != truth) & ~np.eye(4, dtype=bool)
        assert alone_wrong.sum() == 4  # two pairs, both entries
        decision = decide_orientations(evidence)
        np.testing.assert_array_equal(decision.pair_flipped.numpy(), truth)
        np.testing.assert_array_equal(decision.overruled.numpy(), alone_wrong)
        assert int(decision.flipped.sum()) == 2 and not decision.flipped[0]

    def test_pairs_subset_and_checks(self, mixed_three):
        case, mirrored = mixed_three
        some = orientation_evidence(case.features, mirrored.features, pairs=[(0, 2)])
        assert some[0, 2] != 0 and some[0, 1] == 0 and some[1, 2] == 0
        with pytest.raises(ValueError, match="pairs"):
            orientation_evidence(case.features, mirrored.features, pairs=[(2, 1)])
        with pytest.raises(ValueError, match="mirrored"):
            orientation_evidence(case.features, case.without(0).features)
        with pytest.raises(TypeError, match="mirrored"):
            orientation_evidence(case.features, mirrored.features.queries)


# ---------------------------------------------------------------------------------------------------------------
# The collection's decision
# ---------------------------------------------------------------------------------------------------------------


def objective(evidence: np.ndarray, flipped) -> float:
    s = 1.0 - 2.0 * np.asarray(flipped, dtype=float)
    return float(sum(evidence[i, j] * s[i] * s[j] for i in range(len(s)) for j in range(i + 1, len(s))))


class TestDecision:
    def test_the_collection_corrects_a_pair(self):
        """Images 0 and 1 face one way, image 2 the other. Pair (1, 2)'s own evidence says "the same way" (0.3 > 0):
        deciding it alone would analyse it unflipped. The other two pairs outweigh it: 1.0 + 0.8 - 0.3 = 1.5 against
        1.0 - 0.8 + 0.3 = 0.5 with nothing flipped."""
        evidence = torch.tensor([[0.0, 1.0, -0.8], [1.0, 0.0, 0.3], [-0.8, 0.3, 0.0]])
        decision = decide_orientations(evidence)
        assert decision.flipped.tolist() == [False, False, True]
        assert decision.pair_flipped.tolist() == [[False, False, True], [False, False, True], [True, True, False]]
        assert decision.overruled.nonzero().tolist() == [[1, 2], [2, 1]]
        assert decision.agreement == pytest.approx(1.5)
        assert decision.exact

    def test_two_images(self):
        assert decide_orientations(np.array([[0.0, -0.2], [-0.2, 0.0]])).flipped.tolist() == [False, True]
        assert decide_orientations(np.array([[0.0, 0.2], [0.2, 0.0]])).flipped.tolist() == [False, False]
        none = decide_orientations(np.zeros((2, 2)))
        assert none.flipped.tolist() == [False, False] and not none.overruled.any() and none.agreement == 0.0

    def test_all_the_same_way_round(self):
        rng = np.random.default_rng(0)
        evidence = rng.uniform(0.01, 0.3, size=(6, 6))
        evidence = evidence + evidence.T
        decision = decide_orientations(evidence)
        assert not decision.flipped.any() and not decision.pair_flipped.any() and not decision.overruled.any()
        assert decision.agreement == pytest.approx(np.triu(evidence, 1).sum())

    def test_the_majority_stays_unflipped(self):
        # image 0 is the odd one out: it is the one flipped, not images 1 and 2
        evidence = np.array([[0.0, -0.5, -0.4], [-0.5, 0.0, 0.6], [-0.4, 0.6, 0.0]])
        assert decide_orientations(evidence).flipped.tolist() == [True, False, False]

    def test_a_tie_keeps_image_0_unflipped(self):
        # two against two: {0, 1} one way, {2, 3} the other
        signs = np.array([1, 1, -1, -1])
        evidence = 0.5 * np.outer(signs, signs)
        assert decide_orientations(evidence).flipped.tolist() == [False, False, True, True]
        assert decide_orientations(evidence[::-1, ::-1].copy()).flipped.tolist() == [False, False, True, True]

    def test_groups_without_evidence_between_them_decide_apart(self):
        """Images {0, 1} and {2, 3} are joined by no evidence (a sparse pair graph): each group keeps its own lowest
        image unflipped; an image with no evidence at all stays unflipped."""
        evidence = np.zeros((5, 5))
        evidence[0, 1] = evidence[1, 0] = -1.0
        evidence[2, 3] = evidence[3, 2] = -0.3
        assert decide_orientations(evidence).flipped.tolist() == [False, True, False, True, False]
        assert decide_orientations(evidence, exact_limit=2).flipped.tolist() == [False, True, False, True, False]

    def test_the_diagonal_is_ignored(self):
        evidence = np.array([[5.0, -0.2], [-0.2, -7.0]])
        decision = decide_orientations(evidence)
        assert decision.flipped.tolist() == [False, True] and decision.agreement == pytest.approx(0.2)

    @pytest.mark.parametrize("num_images", [5, 9])
    def test_the_search_beyond_the_exact_limit_agrees(self, num_images):
        """Noisy evidence around a planted orientation: the spectral search (forced by `exact_limit=1`) reaches the
        exact optimum."""
        rng = np.random.default_rng(num_images)
        for _ in range(5):
            signs = rng.choice([-1.0, 1.0], size=num_images)
            noise = rng.normal(0.0, 0.5, size=(num_images, num_images))
            evidence = np.outer(signs, signs) * rng.uniform(0.2, 1.0, size=(num_images, num_images)) + noise
            evidence = (evidence + evidence.T) / 2
            exact, searched = decide_orientations(evidence), decide_orientations(evidence, exact_limit=1)
            assert exact.exact and not searched.exact
            assert searched.agreement == pytest.approx(exact.agreement)
            assert objective(evidence, exact.flipped) == pytest.approx(exact.agreement)
            for flipped in range(2**num_images):  # nothing beats it
                bits = [(flipped >> k) & 1 for k in range(num_images)]
                assert objective(evidence, bits) <= exact.agreement + 1e-9

    def test_many_images_recover_the_planted_orientation(self):
        rng = np.random.default_rng(3)
        signs = rng.choice([-1.0, 1.0], size=40)
        signs[0] = 1.0
        signs[1:21] = 1.0  # a majority one way round, so the planted bits are the canonical ones
        evidence = 0.1 * np.outer(signs, signs) + rng.normal(0.0, 0.25, size=(40, 40))
        evidence = (evidence + evidence.T) / 2
        # about a third of the pairs alone say the wrong thing ...
        upper = np.triu_indices(40, 1)
        wrong = (np.sign(evidence) != np.outer(signs, signs))[upper].mean()
        assert 0.2 < wrong < 0.45
        # ... and the collection gets every image right
        decision = decide_orientations(evidence)
        assert not decision.exact
        np.testing.assert_array_equal(decision.flipped.numpy(), signs < 0)

    @pytest.mark.parametrize(
        "evidence, error, match",
        [
            (np.zeros((2, 3)), ValueError, "square"),
            (np.zeros(3), ValueError, "square"),
            (np.zeros((0, 0)), ValueError, "square"),
            (np.array([[0.0, 1.0], [0.5, 0.0]]), ValueError, "symmetric"),
            (np.array([[0.0, np.nan], [np.nan, 0.0]]), ValueError, "NaN"),
            ([["a", "b"], ["c", "d"]], TypeError, "evidence"),
        ],
    )
    def test_bad_evidence(self, evidence, error, match):
        with pytest.raises(error, match=match):
            decide_orientations(evidence)

    @pytest.mark.parametrize("limit", [0, -1, 2.5, True])
    def test_bad_exact_limit(self, limit):
        with pytest.raises(ValueError, match="exact_limit"):
            decide_orientations(np.zeros((2, 2)), exact_limit=limit)
