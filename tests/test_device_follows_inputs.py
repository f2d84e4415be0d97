"""The maths in utils/ makes every tensor on its inputs' device, never on torch's default device.

No GPU here, but the meta device stands in: under `with torch.device("meta")` a tensor made without an explicit
device lands on meta, and mixing it with the CPU inputs raises; a function that follows its inputs gives the same
CPU result as without the context. (A `device=` dropped from one of the `torch.zeros(...)` calls would pass every
CPU test and fail on a GPU; the mutation run found 40 such survivors.)
"""

import pytest
import torch

from cosegment.utils import correspondence as C
from cosegment.utils import reference as R
from cosegment.utils import segmentation as S

FORWARD = torch.tensor([0, 1, 2, 3, 5, 5, 6, 7, 8])  # a 3 x 3 identity map with the centre one cell off
KEEP = torch.tensor([True, True, True, True, True, True, True, False, True])
G = torch.Generator().manual_seed(0)
Q, K = torch.randn(2, 9, 4, generator=G), torch.randn(2, 9, 4, generator=G)
RAND9 = torch.rand(9, generator=G)
HIGH = torch.stack([Q, K])
HIGH[0, :, 4] *= 20.0  # one high-norm token
STATS = C.PassStatistics(FORWARD, RAND9, torch.tensor([0.0] * 4 + [1.2] + [0.0] * 4), RAND9 * 3, RAND9 / 2)
THRESHOLDS = C.SelectionThresholds(1.0, 2.0, 0.5, 1.0)
VALUES = torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, 9.0])
LABELS = torch.tensor([1, 1, 0, 2, 0, 0, 0, 0, 0])
UNIFORM = torch.full((2, 9), 1 / 9)
KL = torch.rand(9, 2, generator=G)
COLUMNS = torch.tensor([0, 4])
PREDICTIONS = torch.stack([FORWARD, torch.roll(FORWARD, 1), torch.full((9,), -1)])

CALLS = {
    "cross_attention_probs": lambda: C.cross_attention_probs(Q, K, chunk_size=4),
    "cross_attention_probs_empty": lambda: C.cross_attention_probs(Q[:, :0], K, chunk_size=3),
    "attention_row_statistics": lambda: C.attention_row_statistics(Q, K, chunk_size=4),
    "attention_row_statistics_empty": lambda: C.attention_row_statistics(Q[:, :0], K),
    "inverse_mapping_entropy": lambda: C.inverse_mapping_entropy(UNIFORM),
    "inverse_mapping_error": lambda: C.inverse_mapping_error(FORWARD, torch.roll(FORWARD, 1), (3, 3)),
    "mapping_density": lambda: C.mapping_density(FORWARD, 9),
    "neighbourhood_spread": lambda: C.neighbourhood_spread(FORWARD, (3, 3)),
    "pass_statistics": lambda: C.pass_statistics(
        C.attention_row_statistics(Q, K), C.attention_row_statistics(K, Q), (3, 3)
    ),
    "supported_spread": lambda: C.supported_spread(FORWARD, KEEP, (3, 3)),
    "grow_matches": lambda: C.grow_matches(STATS, KEEP, THRESHOLDS, (3, 3)),
    "match_scores": lambda: C.match_scores(RAND9, KEEP, (3, 3)),
    "kept_map": lambda: C.kept_map(FORWARD, KEEP, torch.roll(FORWARD, 1), ~KEEP),
    "confirm_matches": lambda: C.confirm_matches(FORWARD, ~KEEP, PREDICTIONS, (3, 3), 1.0, min_votes=1),
    "reverse_consistent": lambda: C.reverse_consistent(FORWARD, KEEP, torch.roll(FORWARD, 1), KEEP, (3, 3), 1.0),
    "affine_residual": lambda: C.affine_residual(FORWARD, KEEP, (3, 3)),
    "field_consistent": lambda: C.field_consistent(STATS, KEEP, THRESHOLDS, (3, 3)),
    "select_matches": lambda: C.select_matches(STATS, THRESHOLDS),
    "merge_passes": lambda: C.merge_passes(FORWARD, KEEP, RAND9, torch.roll(FORWARD, 1), KEEP, RAND9),
    "merge_passes_empty": lambda: C.merge_passes(FORWARD, KEEP & False, RAND9, FORWARD, KEEP & False, RAND9),
    "token_centres_in_pixels": lambda: C.token_centres_in_pixels(FORWARD, (3, 3), (30, 60)),
    "attention_rows": lambda: S.attention_rows(Q, K, columns=COLUMNS, chunk_size=4),
    "attention_rows_empty": lambda: S.attention_rows(Q, K, rows=LABELS[:0]),
    "attention_rows_list": lambda: S.attention_rows(Q, K, rows=[4, 0]),  # a list of rows, made on Q's device
    "part_distributions": lambda: S.part_distributions(Q, K, LABELS, 3, chunk_size=2),
    "kl_to_parts": lambda: S.kl_to_parts(Q, K, UNIFORM, chunk_size=4),
    "assign_parts": lambda: S.assign_parts(KL, 0.5),
    "assign_parts_no_part": lambda: S.assign_parts(KL[:, :0], 0.5),
    "smooth_over_grid": lambda: R.smooth_over_grid(Q, (3, 3), 1.0),
    "positional_offsets_on_the_grid": lambda: R.positional_offsets(torch.stack([Q, K, Q + K, Q - K]), (3, 3)),
    "offset_smoothing": lambda: R.offset_smoothing(torch.stack([Q, K, Q + K, Q - K]), (3, 3)),
    "remove_offsets": lambda: R.remove_offsets(torch.stack([Q, K]), K),
    "clamp_high_norm_tokens": lambda: R.clamp_high_norm_tokens(torch.stack([Q, 10 * K]), 0.5),
    "inpaint_high_norm_tokens": lambda: R.inpaint_high_norm_tokens(HIGH, 5.0, (3, 3)),
    "reference_offsets": lambda: R.reference_offsets(torch.cat([HIGH, HIGH + 1.0]), (3, 3), 5.0),
    # not the histogram thresholds (otsu_threshold, auto_thresholds, minimum_error_threshold,
    # background_threshold_from_kl): their `torch.as_tensor(values)` moves the input to the default device (meta
    # here), which no GPU run does
}


def flatten(result) -> list:
    if isinstance(result, (tuple, list)):
        return [x for item in result for x in flatten(item)]
    if hasattr(result, "__dataclass_fields__"):
        return [x for name in result.__dataclass_fields__ for x in flatten(getattr(result, name))]
    return [result]


@pytest.mark.parametrize("name", list(CALLS))
def test_results_stay_on_the_inputs_device(name):
    expected = flatten(CALLS[name]())
    with torch.device("meta"):
        got = flatten(CALLS[name]())
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if isinstance(b, torch.Tensor):
            assert a.device == b.device == torch.device("cpu") and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a == b
