"""Quality against M with step 10's bounded clustering (issue 26): part NMI, mask Jaccard, precision and coverage of
`analyze_features(partners=3)` on the family benchmark (benchmarks/families.py), design and held-out splits apart
(seeds AND families), at M above `MAX_CLUSTER_IMAGES`: clustering the `MAX_CLUSTER_IMAGES` images with most hit points
and assigning the others' points (`bounded`, the default) against clustering every image together (`all`, the
constant raised past M). Nothing is tuned here. Prints a markdown table.

    python benchmarks/bench_scale_quality.py [--sizes 16 48] [--seeds 2] [--outliers 0]
"""

import argparse
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout named `cosegment`: import that checkout
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment":
        sys.path.insert(0, os.path.dirname(_ROOT))

import cosegment.parts as parts  # noqa: E402
from cosegment import analyze_features  # noqa: E402
from cosegment.benchmarks.families import SPLITS, make_family_case, score_case  # noqa: E402

KEYS = ("precision", "coverage", "jaccard", "nmi", "parts_found")


def rows(split_name: str, sizes, seeds: int, outliers: int) -> list[dict]:
    split = SPLITS[split_name]
    out = []
    bounded_limit = parts.MAX_CLUSTER_IMAGES
    for family in split.families:
        for m in sizes:
            scores = {"bounded": [], "all": []}
            seconds = {"bounded": 0.0, "all": 0.0}
            for i in range(seeds):
                seed = split.seeds[(10 * m + i) % len(split.seeds)]
                case = make_family_case(family, m, (3, 4, 5)[i % 3], seed=seed, outlier_images=outliers)
                for mode, limit in (("bounded", bounded_limit), ("all", 10**9)):
                    parts.MAX_CLUSTER_IMAGES = limit
                    start = time.perf_counter()
                    output = analyze_features(case.features, partners=3)
                    seconds[mode] += time.perf_counter() - start
                    scores[mode].append(score_case(case, output, listed_pairs_only=True))
                parts.MAX_CLUSTER_IMAGES = bounded_limit
            for mode in ("bounded", "all"):
                row = {"split": split_name, "family": family, "M": m, "step 10": mode}
                row.update({k: round(float(np.nanmean([s[k] for s in scores[mode]])), 3) for k in KEYS})
                row["s per run"] = round(seconds[mode] / seeds, 1)
                out.append(row)
            print(out[-2], out[-1], sep="\n", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--outliers", type=int, default=0)
    parser.add_argument("--splits", nargs="+", default=["design", "heldout"])
    args = parser.parse_args(argv)
    table = [row for split in args.splits for row in rows(split, args.sizes, args.seeds, args.outliers)]
    keys = list(table[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in table:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
