"""Reference captures and the high-norm clamp (issue 16): what they cost on clean data, and what a reference costs.

Prints, in one run:

1. the high-norm clamp on clean data: `analyze_features` with `clamp_high_norm=False` and `True` on the cells of
   `benchmarks/planted.py` (M = 2, 4; its three noise levels) and on the clean cells of `benchmarks/families.py`
   (M = 2, 4; design and held-out): every metric, and the largest change;
2. a reference made without SD-like components (`make_reference` of a clean collection): `analyze_features` with
   and without it on the families' clean cells, every metric and the largest change;
3. the tiny random pipeline: seconds of `capture_reference(num_images=16)` against a normal capture of 2 and 4
   images, a cached second call, and the split-half agreement of the offsets (blank images vs noise-only latents);
4. the reference's offsets at full size (a `(16, 5, 4096, 64)` reference per query or key tensor, a 64 x 64 grid,
   one layer, random values plus a smooth field shared by the captures, so that its offsets pass the halves test): seconds of `correct_features` for two images the first time (offsets computed) and
   the second time (offsets kept with the reference, `reference_offsets`), and their ratio.

Run `python benchmarks/bench_reference.py [--seeds 3] [--skip-planted] [--skip-pipeline] [--skip-offsets]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a checkout named `cosegment`: import that checkout
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(_ROOT) == "cosegment":
        sys.path.insert(0, os.path.dirname(_ROOT))

from cosegment import analyze_features  # noqa: E402
from cosegment.benchmarks.families import (  # noqa: E402
    SPLITS,
    _cell_seeds,
    make_family_case,
    make_reference,
    markdown,
    score_case,
)
from cosegment.benchmarks.planted import NOISE_LEVELS, make_planted_features, score_output  # noqa: E402

KEYS = ("precision", "coverage", "jaccard", "nmi")


def _row(cell: str, label: str, scores: list[dict]) -> dict:
    row = {"cell": cell, "analysis": label}
    row.update({k: float(np.nanmean([s[k] for s in scores])) for k in KEYS})
    return row


def _compare(cell: str, labels: tuple[str, str], scores: dict[str, list[dict]]) -> list[dict]:
    rows = [_row(cell, label, scores[label]) for label in labels]
    rows.append({"cell": cell, "analysis": "largest change", **{k: abs(rows[1][k] - rows[0][k]) for k in KEYS}})
    return rows


def planted_clamp_rows(seeds: int) -> list[dict]:
    rows = []
    for m in (2, 4):
        for level, noise in NOISE_LEVELS.items():
            scores = {"no clamp": [], "clamp": []}
            for i in range(seeds):
                case = make_planted_features(m, noise=noise, seed=1000 * m + i)
                for label, clamp in (("no clamp", False), ("clamp", True)):
                    scores[label].append(score_output(case, analyze_features(case.features, clamp_high_norm=clamp)))
            rows += _compare(f"planted.py M = {m}, noise {level}", ("no clamp", "clamp"), scores)
    return rows


def families_clean_rows(seeds: int) -> tuple[list[dict], list[dict]]:
    """Clamp off / on, and clean reference without / with, on the families' clean cells (the SD table's seeds)."""
    clamp_rows, reference_rows = [], []
    for split_name, split in SPLITS.items():
        for m in (2, 4):
            scores = {"no clamp": [], "clamp": [], "no reference": [], "clean 16-image reference": []}
            for i, seed in enumerate(_cell_seeds(split, seeds, 700 + 10 * m)):
                case = make_family_case(split.families[i % len(split.families)], m, 4, seed=seed)
                reference = make_reference(case, 16, seed=seed)
                plain = score_case(case, analyze_features(case.features))
                scores["no clamp"].append(score_case(case, analyze_features(case.features, clamp_high_norm=False)))
                scores["clamp"].append(plain)
                scores["no reference"].append(plain)
                scores["clean 16-image reference"].append(
                    score_case(case, analyze_features(case.features, reference=reference))
                )
            cell = f"{split_name} clean, M = {m}"
            clamp_rows += _compare(cell, ("no clamp", "clamp"), scores)
            reference_rows += _compare(cell, ("no reference", "clean 16-image reference"), scores)
    return clamp_rows, reference_rows


def _split_half_agreement(tokens: torch.Tensor) -> float:
    """Cosine similarity of the offsets of the first and second half of `R` captures `(R, H, N, d)`."""
    from cosegment.utils.reference import positional_offsets

    half = tokens.shape[0] // 2
    a, b = positional_offsets(tokens[:half]).flatten(), positional_offsets(tokens[half:]).flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def pipeline_rows() -> tuple[list[dict], list[dict]]:
    from cosegment import StableDiffusionCoSegmentationPipeline
    from cosegment.testing import make_tiny_stable_diffusion

    folder = tempfile.mkdtemp()
    make_tiny_stable_diffusion(folder)
    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8) for _ in range(4)]

    def seconds(fn, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    capture = {m: seconds(lambda m=m: pipe.capture_features(photos[:m], generator=torch.Generator())) for m in (2, 4)}

    def fresh_reference():
        pipe.reference_cache.clear()
        return pipe.capture_reference()

    first = seconds(fresh_reference)
    cached = seconds(pipe.capture_reference)
    rows = [
        {"what": "capture_features, 2 images", "seconds": capture[2], "ratio to reference": capture[2] / first},
        {"what": "capture_features, 4 images", "seconds": capture[4], "ratio to reference": capture[4] / first},
        {"what": "capture_reference, 16 blank images", "seconds": first, "ratio to reference": 1.0},
        {"what": "capture_reference, cached", "seconds": cached, "ratio to reference": cached / first},
    ]
    # blank images (what capture_reference uses) vs noise-only latents, 16 each: how well 8 captures agree with 8
    blank = pipe.capture_reference()
    layers = blank.metadata["layers"]
    size = blank.metadata["height"] // pipe.vae_scale_factor
    latents = torch.randn(16, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    timesteps = torch.full((16,), 261, dtype=torch.long)
    queries, _ = pipe._run_unet(latents, timesteps, pipe.encode_prompt("")[0], layers, 8, True)
    agreement = [
        {
            "captures": "16 blank images (capture_reference)",
            "cosine, offsets of 8 vs 8": _split_half_agreement(blank.queries[0]),
        },
        {"captures": "16 noise-only latents", "cosine, offsets of 8 vs 8": _split_half_agreement(queries[0])},
    ]
    return rows, agreement


def offsets_rows(repeats: int = 3) -> list[dict]:
    """Section 4: `correct_features` with a full-size reference, first and later calls (best of `repeats` each, a
    fresh reference for every first call)."""
    from cosegment import CoSegmentationFeatures
    from cosegment.analysis import check_analysis_settings, correct_features

    gen = torch.Generator().manual_seed(0)
    grid, shape = (64, 64), (5, 4096, 64)

    from cosegment.utils.reference import smooth_over_grid

    # a smooth field shared by every capture, so that the reference's halves agree and its offsets are estimated
    field = 20.0 * smooth_over_grid(torch.randn(*shape, generator=gen), grid, 3.0)

    def features(count: int) -> CoSegmentationFeatures:
        q, k = torch.randn(count, *shape, generator=gen), torch.randn(count, *shape, generator=gen)
        return CoSegmentationFeatures([q + field], [k + field], grid, [(512, 512)] * count)

    images = features(2)
    first, again = float("inf"), float("inf")
    for _ in range(repeats):
        settings = check_analysis_settings(reference=features(16))
        start = time.perf_counter()
        one = correct_features(images, settings)
        middle = time.perf_counter()
        two = correct_features(images, settings)
        end = time.perf_counter()
        assert all(torch.equal(a, b) for a, b in zip(one.queries + one.keys, two.queries + two.keys))
        first, again = min(first, middle - start), min(again, end - middle)
    return [
        {"what": "correct_features, offsets computed (first use of the reference)", "seconds": first, "ratio": 1.0},
        {"what": "correct_features, offsets kept with the reference", "seconds": again, "ratio": again / first},
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="collections per cell")
    parser.add_argument("--skip-planted", action="store_true", help="skip the planted.py and families cells")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip the tiny pipeline timings")
    parser.add_argument("--skip-offsets", action="store_true", help="skip the full-size offsets timing")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not args.skip_offsets:
        print(f"reference offsets, 64 x 64 grid, one layer, {torch.get_num_threads()} thread(s)\n")
        print(markdown(offsets_rows()), flush=True)
        print()
    if not args.skip_pipeline:
        print("tiny random pipeline (256 px, N = 256)\n")
        timing, agreement = pipeline_rows()
        print(markdown(timing))
        print()
        print(markdown(agreement), flush=True)
    if not args.skip_planted:
        print("\nhigh-norm clamp, planted.py cells\n")
        print(markdown(planted_clamp_rows(args.seeds)), flush=True)
        clamp_rows, reference_rows = families_clean_rows(args.seeds)
        print("\nhigh-norm clamp, families clean cells\n")
        print(markdown(clamp_rows))
        print("\nclean reference, families clean cells (clamp on)\n")
        print(markdown(reference_rows))
    print(f"\n{args.seeds} collection(s) per cell; {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
