"""The planted generator families of `benchmarks/families.py`: shapes, ground truth, determinism, SD-like components
at the requested strength, content-free reference captures, the metrics and the joint k-means baseline; symmetric
objects, mirrored captures and the orientation metrics (issue 27)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cosegment.benchmarks.families import (
    FAMILIES,
    MIRRORS,
    SPLITS,
    SYMMETRIC,
    FamilyCase,
    OracleCorrespondence,
    PartsOutput,
    flip_scores,
    joint_kmeans_parts,
    make_family_case,
    make_layout,
    make_mirrored,
    make_reference,
    match_correct,
    oracle_output,
    oriented_features,
    score_case,
    symmetric_layout,
    twin_correct,
    twin_share,
    unflip_output,
)


def content(case, features=None) -> np.ndarray:
    """The features `x` `(M, N, C)` behind the queries, recovered by least squares through the case's `W_q`."""
    model = case.model
    features = case.features if features is None else features
    w_q = model.w_q[0]  # (H, d, C)
    a = model.amp * w_q.reshape(-1, w_q.shape[-1])  # (H d, C), full column rank
    q = features.queries[0].double().numpy()  # (M, H, N, d)
    q = np.transpose(q, (0, 2, 1, 3)).reshape(q.shape[0], q.shape[2], -1)  # (M, N, H d)
    return q @ np.linalg.pinv(a).T


def cosine(a, b) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def sd_case():
    return make_family_case("sectors", 4, 4, seed=3, positional=0.5, corners=0.9, anomalies=6, anomaly_norm=3.0)


class TestGenerator:
    @pytest.mark.parametrize("family", FAMILIES)
    def test_shapes_and_every_part_present(self, family):
        for num_parts in (2, 4, 6):
            case = make_family_case(family, 3, num_parts, seed=num_parts, grid_size=(24, 28), num_heads=2)
            assert case.features.queries[0].shape == (3, 2, 24 * 28, 32)
            assert case.token_parts.shape == (3, 24, 28) and case.features.grid_size == (24, 28)
            for i in range(3):
                assert set(np.unique(case.token_parts[i])) == set(range(num_parts + 1))
                assert case.pixel_parts(i).shape == case.features.image_sizes[i]

    @pytest.mark.parametrize("family", FAMILIES)
    def test_token_parts_follow_the_warp(self, family):
        case = make_family_case(family, 4, 3, seed=11)
        h, w = case.features.grid_size
        rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
        for i in range(4):
            ur, uc = case.to_canonical(i, rows, cols)
            np.testing.assert_array_equal(case.layout.parts_at(ur, uc), case.token_parts[i])
            back = case.from_canonical(i, ur, uc)
            np.testing.assert_allclose(back[0], rows, atol=1e-9)
            np.testing.assert_allclose(back[1], cols, atol=1e-9)
            # the whole object is on the grid: its area in tokens matches the canonical area times scale^2
            area = case.layout.area() * case.scales[i] ** 2
            assert abs(case.token_parts[i].astype(bool).sum() - area) < 0.15 * area

    def test_layout_areas_agree_across_families(self):
        rng = np.random.default_rng(0)
        for family in FAMILIES:
            for num_parts in range(2, 7):
                assert make_layout(family, num_parts, rng, radius=7.0).area() == pytest.approx(np.pi * 49, rel=0.02)

    def test_deterministic_from_the_seed(self):
        a = make_family_case("chain", 3, 5, seed=21, outlier_images=1, positional=0.3, anomalies=2)
        b = make_family_case("chain", 3, 5, seed=21, outlier_images=1, positional=0.3, anomalies=2)
        c = make_family_case("chain", 3, 5, seed=22, outlier_images=1, positional=0.3, anomalies=2)
        assert torch.equal(a.features.queries[0], b.features.queries[0])
        assert torch.equal(a.features.keys[0], b.features.keys[0])
        np.testing.assert_array_equal(a.token_parts, b.token_parts)
        assert not torch.equal(a.features.queries[0], c.features.queries[0])

    def test_outliers_and_hidden_parts(self):
        case = make_family_case("bands", 6, 4, seed=5, outlier_images=2, hidden_images=2)
        assert case.outliers.sum() == 2 and (case.hidden > 0).sum() == 2
        assert not (case.outliers & (case.hidden > 0)).any()
        for i in range(6):
            if case.outliers[i]:
                assert not case.token_parts[i].any() and not case.pixel_parts(i).any()
                assert math.isnan(case.object_size(i))
            elif case.hidden[i]:
                assert case.hidden[i] not in case.token_parts[i]
                assert case.hidden[i] in case.full_token_parts[i]
                assert case.hidden[i] not in case.pixel_parts(i)
            else:
                np.testing.assert_array_equal(case.token_parts[i], case.full_token_parts[i])
        # the hidden part shows background: its tokens' features are far from the object's
        x = content(case)
        host = int(np.flatnonzero(case.hidden)[0])
        part = case.hidden[host]
        gone = (case.full_token_parts[host] == part).ravel()
        embed = case.part_embeddings[part]
        other = next(i for i in range(6) if not case.outliers[i] and case.hidden[i] != part)
        there = (case.token_parts[other] == part).ravel()
        assert cosine(x[other][there], embed).mean() > 0.4 > 0.2 > cosine(x[host][gone], embed).mean()

    def test_up_to_32_images(self):
        case = make_family_case("blobs", 32, 6, seed=1, outlier_images=3, hidden_images=4, num_heads=1, head_dim=8)
        assert case.features.num_images == 32 and case.token_parts.shape[0] == 32

    def test_without_removes_images_and_their_truth(self):
        case = make_family_case("sectors", 5, 3, seed=2, outlier_images=1)
        out = int(np.flatnonzero(case.outliers)[0])
        rest = case.without(out)
        assert rest.features.num_images == 4 and not rest.outliers.any()
        keep = [i for i in range(5) if i != out]
        assert torch.equal(rest.features.queries[0], case.features.queries[0][keep])
        np.testing.assert_array_equal(rest.token_parts, case.token_parts[keep])
        assert rest.features.image_sizes == [case.features.image_sizes[i] for i in keep]

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"family": "stars"},
            {"num_images": 1},
            {"outlier_images": 3},
            {"hidden_images": 4, "outlier_images": 1},
            {"corners": 1.5},
            {"positional": -0.1},
        ],
    )
    def test_bad_arguments(self, kwargs):
        args = {"family": "sectors", "num_images": 4, "num_parts": 3}
        args.update(kwargs)
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            make_family_case(**args)

    def test_splits_are_disjoint(self):
        design, heldout = SPLITS["design"], SPLITS["heldout"]
        assert not set(design.seeds) & set(heldout.seeds)
        assert set(heldout.families) - set(design.families) == {"bands", "chain"}


class TestComponents:
    def test_positional_strength_in_queries_and_keys(self):
        """Same seed with and without the component: the difference of the queries (and keys) is the projection of
        one field of position, the same in every image, with RMS norm `positional` x the mean content norm."""
        clean = make_family_case("blobs", 3, 3, seed=8)
        for strength in (0.3, 0.5):
            case = make_family_case("blobs", 3, 3, seed=8, positional=strength)
            x, x0 = content(case), content(clean)
            diff = x - x0
            np.testing.assert_allclose(diff, np.broadcast_to(diff[0], diff.shape), atol=1e-6)
            rms = math.sqrt((diff[0] ** 2).sum(-1).mean())
            assert rms == pytest.approx(strength * np.linalg.norm(x0, axis=-1).mean(), rel=0.05)
            # keys carry the same component through W_k
            model = case.model
            dk = (case.features.keys[0] - clean.features.keys[0]).double().numpy()
            expected = model.amp * np.einsum("hdc,nc->hnd", model.w_k[0], diff[0])
            np.testing.assert_allclose(dk[1], expected, atol=1e-3 * np.abs(expected).max())
            # smooth: neighbouring positions are much closer than distant ones
            field = diff[0].reshape(32, 32, -1)
            near = np.linalg.norm(field[:, 1:] - field[:, :-1], axis=-1).mean()
            assert near < 0.3 * np.linalg.norm(field, axis=-1).mean()

    def test_corner_tokens_similar_across_images(self, sd_case):
        x = content(sd_case)
        corners = sd_case.model.corner_tokens
        sims = [cosine(x[i, c], x[j, c]) for c in corners for i in range(4) for j in range(i + 1, 4)]
        assert min(sims) > 0.7
        clean = content(make_family_case("sectors", 4, 4, seed=3, positional=0.5))
        clean_sims = [cosine(clean[i, c], clean[j, c]) for c in corners for i in range(4) for j in range(i + 1, 4)]
        assert np.mean(clean_sims) < np.mean(sims) - 0.3

    def test_high_norm_tokens(self, sd_case):
        x = content(sd_case)
        norms = np.linalg.norm(x, axis=-1)
        assert (sd_case.high_norm.sum(1) == 6).all()
        assert not sd_case.high_norm[:, sd_case.model.corner_tokens].any()
        typical = norms[~sd_case.high_norm].mean()
        np.testing.assert_allclose(norms[sd_case.high_norm], 3.0 * sd_case.model.content_norm, rtol=1e-6)
        assert norms[sd_case.high_norm].mean() / typical == pytest.approx(3.0, rel=0.15)
        # they are the largest queries of each image
        q = sd_case.features.queries[0].norm(dim=-1).mean(1).numpy()  # (M, N)
        for i in range(4):
            assert set(np.argsort(q[i])[-6:]) == set(np.flatnonzero(sd_case.high_norm[i]))


class TestReference:
    def test_same_model_no_object(self, sd_case):
        ref = make_reference(sd_case, num_images=24, seed=1)
        q = sd_case.features.queries[0]
        assert ref.queries[0].shape == (24,) + tuple(q.shape[1:]) and ref.grid_size == sd_case.features.grid_size
        x = content(sd_case, ref)
        # the positional component: the reference's per-position mean follows it
        mean = x.mean(0)
        assert cosine(mean.ravel(), sd_case.model.positional.ravel()) > 0.85
        # corners and high-norm tokens
        norms = np.linalg.norm(x, axis=-1)
        assert ((norms > 2.5 * sd_case.model.content_norm).sum(1) == 6).all()
        c = sd_case.model.corner_tokens[0]
        assert cosine(x[0, c], content(sd_case)[0, c]) > 0.7
        # no object: no token leans towards any part embedding as the collection's object tokens do
        ordinary = norms < 2.0 * sd_case.model.content_norm
        lean = np.abs(cosine(x[ordinary][:, None, :], sd_case.part_embeddings[None, 1:])).max(-1)
        case_x = content(sd_case)
        on = sd_case.token_parts.reshape(4, -1) > 0
        parts = sd_case.token_parts.reshape(4, -1)[on]
        obj = cosine(case_x[on], sd_case.part_embeddings[parts])
        assert np.median(lean) < 0.25 < 0.4 < np.median(obj)

    def test_deterministic_and_validated(self, sd_case):
        a, b = make_reference(sd_case, 4, seed=2), make_reference(sd_case, 4, seed=2)
        assert torch.equal(a.keys[0], b.keys[0])
        with pytest.raises(ValueError, match="num_images"):
            make_reference(sd_case, 1)


class TestMetrics:
    def test_oracle_scores_perfect(self):
        case = make_family_case("chain", 5, 4, seed=4, outlier_images=1, hidden_images=1)
        score = score_case(case, oracle_output(case))
        assert score["precision"] == 1.0 and score["coverage"] > 0.95
        assert score["jaccard"] == 1.0 and score["nmi"] == pytest.approx(1.0)
        assert score["outlier_share"] == 0.0 and score["outlier_foreground"] == 0.0 and score["parts_found"] == 4

    def test_matches_to_an_outlier_and_to_a_hidden_part_are_wrong(self):
        case = make_family_case("sectors", 4, 4, seed=6, outlier_images=1, hidden_images=1)
        oracle = oracle_output(case)
        out = int(np.flatnonzero(case.outliers)[0])
        s, t = [i for i in range(4) if i != out][:2]
        tokens = np.arange(50)
        bad = OracleCorrespondence(min(s, out), max(s, out), tokens, tokens)
        extra = PartsOutput(oracle.correspondences + [bad], oracle.masks, oracle.part_masks)
        good = sum(len(p.source_tokens) for p in oracle.correspondences)
        score = score_case(case, extra)
        assert score["outlier_share"] == pytest.approx(50 / (good + 50))
        assert score["precision"] == pytest.approx(good / (good + 50))
        # a mask that fills the outlier image
        masks = [np.ones_like(m) if i == out else m for i, m in enumerate(oracle.masks)]
        assert score_case(case, PartsOutput([], masks, oracle.part_masks))["outlier_foreground"] == 1.0
        # a match from a part hidden in the other image is wrong even when it lands where the warp says
        host = int(np.flatnonzero(case.hidden)[0])
        other = next(i for i in range(4) if i not in (host, out))
        w = case.features.grid_size[1]
        src = np.flatnonzero(case.token_parts[other].ravel() == case.hidden[host])
        er, ec = case.from_canonical(host, *case.to_canonical(other, (src // w).astype(float), src % w))
        tgt = np.rint(er).astype(int) * w + np.rint(ec).astype(int)
        a, b = min(other, host), max(other, host)
        pair = OracleCorrespondence(a, b, src, tgt) if a == other else OracleCorrespondence(a, b, tgt, src)
        assert score_case(case, PartsOutput([pair], oracle.masks, oracle.part_masks))["precision"] == 0.0

    def test_joint_kmeans_labels_inside_the_mask_with_the_found_count(self):
        case = make_family_case("blobs", 3, 3, seed=9)
        oracle = oracle_output(case)
        parts = joint_kmeans_parts(case.features, oracle)
        for i in range(3):
            assert parts.part_masks[i].shape == case.features.image_sizes[i]
            assert not parts.part_masks[i][~oracle.masks[i]].any()
        assert set(np.unique(np.concatenate([p.ravel() for p in parts.part_masks]))) == {0, 1, 2, 3}
        two = joint_kmeans_parts(case.features, oracle, num_parts=2)
        assert set(np.unique(np.concatenate([p.ravel() for p in two.part_masks]))) == {0, 1, 2}
        assert score_case(case, parts)["nmi"] > score_case(case, two)["nmi"]

    def test_joint_kmeans_voted_labels_drawn_like_the_method(self):
        # the same token labels; only pixels near part boundaries move (under 1% here), and on the oracle's masks the
        # voted drawing scores higher NMI than nearest-token pixels (0.89 vs 0.85 on this collection)
        case = make_family_case("blobs", 3, 3, seed=9)
        oracle = oracle_output(case)
        nearest = joint_kmeans_parts(case.features, oracle)
        voted = joint_kmeans_parts(case.features, oracle, render="votes")
        for i in range(3):
            assert not voted.part_masks[i][~oracle.masks[i]].any()
            assert 0.99 < np.mean(voted.part_masks[i] == nearest.part_masks[i]) < 1.0
        assert score_case(case, voted)["nmi"] > score_case(case, nearest)["nmi"] + 0.02
        with pytest.raises(ValueError, match="render"):
            joint_kmeans_parts(case.features, oracle, render="bilinear")


def test_benchmarks_snippet_runs_as_written():
    """The families snippet of BENCHMARKS.md (R2), moved there from the README."""
    text = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "make_family_case" in b)
    namespace: dict = {}
    exec(compile(block, "BENCHMARKS.md", "exec"), namespace)
    case, score = namespace["case"], namespace["score"]
    assert namespace["reference"].num_images == 16 and case.outliers.sum() == 1
    assert 0.0 <= score["outlier_share"] <= 1.0 and 0.0 <= score["precision"] <= 1.0


def test_run_table_checks_its_arguments():
    from cosegment.benchmarks.families import markdown, run_table

    with pytest.raises(ValueError, match="families"):
        run_table("design", tables=("parts",), families=("bands",))  # a held-out family in the design split
    with pytest.raises(ValueError, match="tables"):
        run_table("heldout", tables=("speed",))
    table = markdown([{"cell": "a", "nmi": 0.5}, {"cell": "b", "nmi": float("nan")}])
    assert table.splitlines() == ["| cell | nmi |", "|---|---|", "| a | 0.500 |", "| b | nan |"]


# ---------------------------------------------------------------------------------------------------------------
# Symmetric objects and mirrored captures (issue 27)
# ---------------------------------------------------------------------------------------------------------------


def test_a_recorded_default_case_is_unchanged():
    """Values of the generator before symmetric objects existed (commit 5a57450): the new knobs, off, change none of
    the main stream's draws (the tolerance allows another CPU's last bits)."""
    case = make_family_case(
        "chain", 3, 4, seed=21, outlier_images=1, hidden_images=1, positional=0.3, corners=0.5, anomalies=2,
        grid_size=(12, 12), num_heads=2, head_dim=4, channels=8,
    )  # fmt: skip
    q, k = case.features.queries[0], case.features.keys[0]
    np.testing.assert_allclose(q[0, 0, :3, 0].numpy(), [0.9093862771987915, 3.6531331539154053, 4.6292548179626465],
                               rtol=1e-5)  # fmt: skip
    assert q[2, 1, 50, 2].item() == pytest.approx(0.3516840934753418, rel=1e-5)
    assert k[1, 0, 7, 3].item() == pytest.approx(0.00930176954716444, rel=1e-4, abs=1e-6)
    assert int(case.token_parts.sum()) == 98 and case.mirrors.tolist() == [True, True, False]
    assert case.features.image_sizes == [(72, 120), (96, 72), (96, 120)]
    assert case.hidden.tolist() == [2, 0, 0] and case.outliers.tolist() == [False, False, True]


def test_the_new_knobs_off_are_the_default_bitwise():
    plain = make_family_case("blobs", 3, 4, seed=8, positional=0.3)
    explicit = make_family_case(
        "blobs", 3, 4, seed=8, positional=0.3, symmetric=False, object_side=0.0, picture_side=0.0, mirror="random"
    )
    assert torch.equal(plain.features.queries[0], explicit.features.queries[0])
    assert torch.equal(plain.features.keys[0], explicit.features.keys[0])
    np.testing.assert_array_equal(plain.token_parts, explicit.token_parts)


class TestSymmetric:
    @pytest.mark.parametrize("family", FAMILIES)
    def test_layout_is_mirror_symmetric_with_twin_labels(self, family):
        layout = symmetric_layout(make_layout(family, 4, np.random.default_rng(5)))
        assert layout.num_labels == 8 and layout.area() == pytest.approx(np.pi * 49, rel=0.02)
        g = np.linspace(-20, 20, 161)
        rr, cc = np.meshgrid(g, g, indexing="ij")
        right, left = layout.parts_at(rr, cc), layout.parts_at(rr, -cc)
        on = cc > 0
        np.testing.assert_array_equal(left[on], np.where(right[on] > 0, right[on] + 4, 0))
        assert set(np.unique(right[on])) - {0} <= {1, 2, 3, 4} and len(set(np.unique(right[on])) - {0}) >= 3
        with pytest.raises(ValueError, match="symmetric"):
            symmetric_layout(layout)

    def test_twins_differ_by_the_two_side_terms_only(self):
        """Noise-free: the same draws with and without the side terms. On the object, `x - sqrt(1 - a^2 - b^2) x0`
        is `a v_obj` times the side of the object (labels 1..P: +1, twins: -1) plus `b v_pic` times the side of the
        picture (column against the object's centre column): four values, pairwise opposite."""
        a, b = 0.2, 0.4
        args = {"family": "sectors", "num_images": 2, "num_parts": 3, "seed": 4, "noise": 0.0, "mirror": "half"}
        case = make_family_case(**args, symmetric=True, object_side=a, picture_side=b)
        base = make_family_case(**args, symmetric=True)
        residual = content(case) - math.sqrt(1 - a * a - b * b) * content(base)  # (M, N, C)
        groups = {}
        for i in range(2):
            parts = case.token_parts[i].ravel()
            cols = np.tile(np.arange(32), 32)
            picture = np.sign(cols - case.centres[i][1])
            obj = np.where(parts > 3, -1, 1)
            for token in np.flatnonzero((parts > 0) & (picture != 0)):
                groups.setdefault((obj[token], picture[token]), []).append(residual[i, token])
        assert set(groups) == {(1, 1), (1, -1), (-1, 1), (-1, -1)}  # a mirrored image puts twins on either side
        mean = {key: np.mean(value, 0) for key, value in groups.items()}
        for key, value in groups.items():
            np.testing.assert_allclose(value, np.broadcast_to(mean[key], np.shape(value)), atol=1e-4)
        np.testing.assert_allclose(mean[1, 1], -mean[-1, -1], atol=1e-4)
        np.testing.assert_allclose(mean[1, -1], -mean[-1, 1], atol=1e-4)
        v_obj, v_pic = (mean[1, 1] + mean[1, -1]) / (2 * a), (mean[1, 1] - mean[1, -1]) / (2 * b)
        assert np.linalg.norm(v_obj) == pytest.approx(1.0, rel=1e-3)  # unit directions, amplitudes a and b
        assert np.linalg.norm(v_pic) == pytest.approx(1.0, rel=1e-3)

    def test_mirror_modes_change_only_the_mirrors(self):
        cases = {mode: make_family_case("bands", 5, 3, seed=9, mirror=mode, **SYMMETRIC) for mode in MIRRORS}
        assert cases["half"].mirrors.sum() == 2 and not cases["none"].mirrors.any()
        for mode in ("half", "none"):
            np.testing.assert_array_equal(cases[mode].scales, cases["random"].scales)
            np.testing.assert_array_equal(cases[mode].centres, cases["random"].centres)
            same = cases[mode].mirrors == cases["random"].mirrors
            q, q0 = cases[mode].features.queries[0], cases["random"].features.queries[0]
            assert torch.equal(q[same], q0[same]) and not torch.equal(q[~same], q0[~same])

    @pytest.mark.parametrize(
        "kwargs, name",
        [
            ({"mirror": "left"}, "mirror"),
            ({"object_side": 0.2}, "symmetric"),
            ({"symmetric": True, "object_side": 0.8, "picture_side": 0.7}, "object_side"),
            ({"symmetric": True, "picture_side": -0.1}, "picture_side"),
        ],
    )
    def test_bad_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=name):
            make_family_case("sectors", 3, 3, **kwargs)


class TestMirrored:
    def test_without_side_terms_or_components_it_is_the_flipped_capture(self):
        case = make_family_case("blobs", 3, 3, seed=5, symmetric=True, mirror="half")
        mirrored = make_mirrored(case)
        flip = lambda t: t.reshape(t.shape[:2] + (32, 32, -1)).flip(3).reshape(t.shape)  # noqa: E731
        np.testing.assert_allclose(flip(mirrored.features.queries[0]), case.features.queries[0], atol=1e-5)
        np.testing.assert_allclose(flip(mirrored.features.keys[0]), case.features.keys[0], atol=1e-5)
        np.testing.assert_array_equal(mirrored.token_parts, case.token_parts[:, :, ::-1])
        np.testing.assert_array_equal(mirrored.mirrors, ~case.mirrors)
        np.testing.assert_array_equal(mirrored.angles, -case.angles)
        np.testing.assert_allclose(mirrored.centres[:, 1], 31 - case.centres[:, 1])
        assert mirrored.features.metadata["mirrored"] and mirrored.features.image_sizes == case.features.image_sizes

    def test_the_picture_side_changes_sign_and_the_model_grid_stays(self):
        """With the picture-side term and the SD-like components: flipped back, the mirrored capture's features differ
        from the original's by `-2 b v_pic sign` on the object, and by the positional field's own reflection minus
        itself on the background; the high-norm tokens stay where the model puts them."""
        knobs = {"positional": 0.3, "anomalies": 3, "noise": 0.0, "mirror": "half"}
        case = make_family_case("sectors", 2, 3, seed=6, **SYMMETRIC, **knobs)
        mirrored = make_mirrored(case)
        x, xm = content(case), content(mirrored)
        back = xm.reshape(2, 32, 32, -1)[:, :, ::-1].reshape(x.shape)
        np.testing.assert_array_equal(mirrored.high_norm, case.high_norm)
        pos = case.model.positional
        pos_flipped = pos.reshape(32, 32, -1)[:, ::-1].reshape(pos.shape)
        ordinary = ~case.high_norm & ~case.high_norm.reshape(2, 32, 32)[:, :, ::-1].reshape(2, -1)
        background = (case.token_parts.reshape(2, -1) == 0) & ordinary
        np.testing.assert_allclose((back - x)[background], (pos_flipped - pos)[np.nonzero(background)[1]], atol=1e-3)
        obj = (case.token_parts.reshape(2, -1) > 0) & ordinary
        diff = (back - x - (pos_flipped - pos)[None])[obj]
        cols = np.tile(np.arange(32), 32)
        picture = np.sign(cols[None] - case.centres[:, 1:2])[obj]
        v = diff[picture > 0].mean(0)
        np.testing.assert_allclose(diff[picture > 0], np.broadcast_to(v, diff[picture > 0].shape), atol=1e-3)
        np.testing.assert_allclose(diff[picture < 0], np.broadcast_to(-v, diff[picture < 0].shape), atol=1e-3)

    def test_after_without_and_checked(self):
        case = make_family_case("chain", 4, 3, seed=3, **SYMMETRIC)
        rest = case.without(1)
        assert torch.equal(make_mirrored(rest).features.queries[0], make_mirrored(case).without(1).features.queries[0])
        bare = FamilyCase(**{**case.__dict__, "options": None})
        with pytest.raises(ValueError, match="options"):
            make_mirrored(bare)


class TestOrientationMetrics:
    def test_twin_matches_are_wrong_and_counted(self):
        case = make_family_case("blobs", 2, 3, seed=2, **SYMMETRIC)
        w = 32
        src = np.flatnonzero(case.token_parts[0].ravel() > 0)
        ur, uc = case.to_canonical(0, (src // w).astype(float), (src % w).astype(float))
        er, ec = case.from_canonical(1, ur, -uc)
        er, ec = np.rint(er).astype(int), np.rint(ec).astype(int)
        inside = (er >= 0) & (er < 32) & (ec >= 0) & (ec < 32)
        src, tgt = src[inside], (er * w + ec)[inside]
        twin = twin_correct(case, 0, 1, src, tgt)
        right = match_correct(case, 0, 1, src, tgt)
        assert not (twin & right).any() and twin.mean() > 0.7  # near the axis the twin is the right place
        output = PartsOutput([OracleCorrespondence(0, 1, src, tgt)], None, None)
        assert twin_share(case, output) == pytest.approx(twin.mean())
        assert score_case(case, output)["precision"] == pytest.approx(right.mean())

    def test_oriented_features_and_mapping_back(self):
        case = make_family_case("sectors", 3, 3, seed=1, **SYMMETRIC)
        mirrored = make_mirrored(case)
        oriented = oriented_features(case, mirrored, [False, True, False])
        assert torch.equal(oriented.queries[0][1], mirrored.features.queries[0][1])
        assert torch.equal(oriented.keys[0][0], case.features.keys[0][0])
        assert oriented.metadata["flipped"] == [False, True, False]
        mask = np.zeros((4, 6), dtype=bool)
        mask[:, :2] = True
        output = PartsOutput([OracleCorrespondence(0, 1, np.array([0, 31]), np.array([0, 33]))], [mask] * 3, None)
        back = unflip_output(output, [False, True, False], (32, 32))
        pair = back.correspondences[0]
        assert pair.source_tokens.tolist() == [0, 31] and pair.target_tokens.tolist() == [31, 62]
        assert back.masks[1][:, 4:].all() and not back.masks[1][:, :4].any() and back.masks[0][:, :2].all()

    def test_flip_scores_on_a_mixed_pair(self):
        """Today's analysis keeps mostly twin matches of a mixed pair; the oriented one keeps right ones."""
        case = make_family_case("sectors", 2, 3, seed=3, mirror="half", **SYMMETRIC)
        scores = flip_scores(case, make_mirrored(case))
        assert scores["decided right"] == 1.0 and scores["flipped"] == 1.0
        assert scores["precision"] < 0.4 < 0.9 < scores["flip precision"]
        assert scores["twins"] > 0.5 > 0.1 > scores["flip twins"]
        assert scores["flip coverage"] > scores["coverage"] + 0.3
