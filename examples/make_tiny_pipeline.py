"""Save a tiny random SD2-shaped pipeline to a folder, to try every command offline.

    python examples/make_tiny_pipeline.py tiny-sd/

Its weights are random: outputs show shapes and plumbing, never semantics.
"""

import argparse

from cosegment.testing import make_tiny_stable_diffusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to save the pipeline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_stable_diffusion(args.folder, seed=args.seed)
    print(f"saved a tiny random Stable Diffusion pipeline to {args.folder}")


if __name__ == "__main__":
    main()
