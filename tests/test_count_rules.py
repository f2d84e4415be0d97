"""The part-count rules of `benchmarks/count_rules.py` (BENCHMARKS.md (l3)): the rotation cost, the adjusted Rand
index and the design-only batches."""

import numpy as np

from cosegment.benchmarks.count_rules import SPLITS, adjusted_rand, cases, rotation_cost, rule_tie
from cosegment.utils.segmentation import eigengap_count


def _rotation(k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))
    return q


def test_rotation_cost_zero_for_rotated_clusters_and_large_for_spread_rows():
    rng = np.random.default_rng(0)
    k = 3
    labels = np.arange(90) % k
    clusters = np.eye(k)[labels] + 0.01 * rng.normal(size=(90, k))
    # k tight clusters at orthogonal directions, turned by a rotation: the descent rotates them back onto the axes
    assert rotation_cost(clusters @ _rotation(k, 1)) < 0.01
    # rows spread over the sphere cannot all sit on one axis (a uniform spread gives about 0.3 in 3-D)
    assert rotation_cost(rng.normal(size=(300, k))) > 0.2
    assert rotation_cost(np.ones((5, 1))) == 0.0


def test_adjusted_rand():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand(a, np.array([2, 2, 0, 0, 1, 1])) == 1.0  # same partition, other ids
    assert adjusted_rand(a, np.array([0, 1, 0, 1, 0, 1])) < 0.0  # crossing every pair: below chance
    # two of three groups merged: pairs together in both 3, in a 3, in b 6 + 1 = 7, of 15; expected 3 * 7 / 15 = 1.4,
    # mean (3 + 7) / 2 = 5, so (3 - 1.4) / (5 - 1.4) = 4/9
    assert abs(adjusted_rand(a, np.array([0, 0, 0, 0, 1, 1])) - 4 / 9) < 1e-12


def test_tie_rule_decides_a_near_tie_by_rotation_cost():
    # Four tight clusters at orthogonal directions; the spectrum has gaps 0.30 at k = 2 and 0.28 at k = 4 (a
    # near-tie, within 25%): the eigengap says 2, the rotation cost of the top-4 rows says 4.
    rng = np.random.default_rng(3)
    rows = np.eye(4)[np.arange(200) % 4] + 0.02 * rng.normal(size=(200, 4))
    vectors = np.concatenate([rows @ _rotation(4, 2), rng.normal(size=(200, 4))], axis=1)
    values = np.array([1.0, 0.95, 0.65, 0.60, 0.32, 0.30, 0.28, 0.26, 0.24, 0.2])
    assert eigengap_count(values, 8) == 2
    assert rule_tie(values, vectors, np.ones(200), 8) == 4
    values_far = np.array([1.0, 0.95, 0.35, 0.30, 0.25, 0.20, 0.18, 0.16, 0.14, 0.1])  # k = 2 alone: gap 0.6
    assert rule_tie(values_far, vectors, np.ones(200), 8) == 2


def test_batches_are_design_only_and_disjoint():
    one, two, table = cases(1), cases(2), cases(0)
    assert len(one) == len(two) == 48 and len(table) == 18
    seeds = [c[3] for c in one + two]
    assert len(set(seeds)) == 96 and not set(seeds) & {c[3] for c in table}
    assert all(c[0] in SPLITS["design"].families and c[3] in SPLITS["design"].seeds for c in one + two + table)
    assert sorted({c[2] for c in one}) == [2, 3, 4, 5, 6]
