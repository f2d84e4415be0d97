"""Mirrored captures through the real API (issue 27, phase 2): `analyze_features(features, mirrored=...)` against
`analyze_features(features)` on planted symmetric objects (`families.py`, knobs `SYMMETRIC`), and the cost.

    python benchmarks/flip_api.py --split design --seeds 8        # design seeds (920-927 at M = 2, ...)
    python benchmarks/flip_api.py --split heldout --seeds 8       # held-out: run once, nothing tuned on it
    python benchmarks/flip_api.py --split design --sd --seeds 8   # SD-like components + a reference
    python benchmarks/flip_api.py --cost                           # analysis time with / without mirrored

Per (family, M): `mixed` collections (exactly M // 2 images mirrored) and `same way round` ones (the same seeds and
draws, none mirrored), the same cells and seeds as docs/FLIP_NOTES.md section 4. Precision and coverage by
`score_case` (PCK@0.1, twin matches count wrong), the twin share, whether the decision (`output.orientations`,
`flipped` per pair) is right, and for same-way-round cells the largest difference from no `mirrored`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout named `cosegment`: import that checkout
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment":
        sys.path.insert(0, os.path.dirname(_ROOT))

from cosegment import analyze_features  # noqa: E402
from cosegment.benchmarks.families import (  # noqa: E402
    SPLITS,
    SYMMETRIC,
    _cell_seeds,
    _mean,
    make_family_case,
    make_mirrored,
    make_reference,
    markdown,
    score_case,
    twin_share,
)

SD_LIKE = {"positional": 0.5, "corners": 0.9, "anomalies": 6, "anomaly_norm": 3.0}


def scores(case, sd: bool = False, segment: bool = False) -> dict[str, float]:
    """Today's analysis of `case` and the one with its mirrored captures, through the API."""
    reference = make_reference(case) if sd else None
    plain = analyze_features(case.features, segment=segment, reference=reference)
    oriented = analyze_features(
        case.features, segment=segment, reference=reference, mirrored=make_mirrored(case).features
    )
    truth = case.mirrors[:, None] != case.mirrors[None, :]
    result = {}
    for prefix, output in (("", plain), ("flip ", oriented)):
        score = score_case(case, output)
        result[prefix + "precision"] = score["precision"]
        result[prefix + "coverage"] = score["coverage"]
        result[prefix + "twins"] = twin_share(case, output)
    pairs_right = [
        pair.flipped == bool(truth[pair.source_index, pair.target_index]) for pair in oriented.correspondences
    ]
    result["decided right"] = float(all(pairs_right))
    result["flipped"] = float(np.asarray(oriented.orientations).sum())
    result["max |diff|"] = max(
        abs(result["precision"] - result["flip precision"]), abs(result["coverage"] - result["flip coverage"])
    )
    return result


def rows(split_name: str, seeds: int, sd: bool, sizes=(2, 3, 4), parts=(3, 4, 5)) -> list[dict]:
    split = SPLITS[split_name]
    table = []
    for family in split.families:
        for m in sizes:
            cells = {"half": [], "none": []}
            for i, seed in enumerate(_cell_seeds(split, seeds, 900 + 10 * m)):
                for mode in cells:
                    options = {**SYMMETRIC, **(SD_LIKE if sd else {})}
                    case = make_family_case(family, m, parts[i % len(parts)], seed=seed, mirror=mode, **options)
                    cells[mode].append(scores(case, sd))
            for mode, name in (("half", "mixed"), ("none", "same way round")):
                row = {"cell": f"{family}, M = {m}, {name}"}
                for key in ("precision", "flip precision", "coverage", "flip coverage"):
                    row[key] = _mean(cells[mode], key)
                row["same-way level"] = _mean(cells["none"], "coverage")
                for key in ("twins", "flip twins", "decided right", "flipped"):
                    row[key] = _mean(cells[mode], key)
                row["max |diff|"] = max(s["max |diff|"] for s in cells[mode])
                table.append(row)
                print(markdown([row]).splitlines()[-1], flush=True)
    return table


def cost(repeats: int = 1) -> None:
    """One run: `analyze_features` of an M = 4 mixed collection (32 x 32 tokens, 4 heads) with and without mirrored."""
    case = make_family_case("sectors", 4, 4, seed=940, mirror="half", **SYMMETRIC)
    mirrored = make_mirrored(case).features
    analyze_features(case.features, segment=False)  # warm-up
    for segment in (True, False):
        start = time.perf_counter()
        analyze_features(case.features, segment=segment)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        analyze_features(case.features, segment=segment, mirrored=mirrored)
        flipped = time.perf_counter() - start
        print(f"segment={segment}: without mirrored {plain:.2f} s, with {flipped:.2f} s, ratio {flipped / plain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="design")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--sd", action="store_true", help="SD-like components and a 16-image reference")
    parser.add_argument("--cost", action="store_true")
    args = parser.parse_args()
    if args.cost:
        cost()
        return
    start = time.perf_counter()
    table = rows(args.split, args.seeds, args.sd)
    print()
    print(markdown(table))
    print(f"\n{args.split}, {args.seeds} seeds per cell, sd={args.sd}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
