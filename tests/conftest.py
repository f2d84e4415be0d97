import os

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import settings
from packaging.version import Version

from cosegment.testing import make_tiny_stable_diffusion

# Property tests: "ci" (the default) draws the same 30 examples every run, so a CI result depends on the code only;
# `HYPOTHESIS_PROFILE=explore` draws 1000 fresh random examples per test, to hunt for new edge cases locally.
settings.register_profile("ci", max_examples=30, derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INF = float("inf")
# Every threshold disabled: on a random UNet nothing is semantic, so plumbing tests keep every match.
NO_FILTER = {"max_entropy": INF, "max_spread": INF, "max_collapse": INF, "max_inverse_error": INF}

# Prepended to a child process's script: `import cosegment` fails there, as for a Hub user without the package.
BLOCK_COSEGMENT = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "cosegment" or name.startswith("cosegment."):
            raise ImportError("cosegment is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
try:
    import cosegment  # noqa: F401
    raise SystemExit("cosegment is importable: the test would prove nothing")
except ImportError:
    pass
"""


def needs_diffusers(minimum: str, feature: str):
    """Skip a test of `feature` where the installed diffusers predates it (CI's minimum environment runs older ones)."""
    return pytest.mark.skipif(
        Version(diffusers.__version__) < Version(minimum),
        reason=f"{feature} needs diffusers >= {minimum}; this is {diffusers.__version__}",
    )


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    """A tiny random SD2-shaped `StableDiffusionPipeline`, saved once per test session."""
    folder = str(tmp_path_factory.mktemp("tiny-sd"))
    make_tiny_stable_diffusion(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory) -> str:
    """A tiny random SD1-shaped `StableDiffusionPipeline` (int `attention_head_dim`, conv projections, a safety
    checker and feature extractor, `requires_safety_checker=True`), saved once per test session."""
    folder = str(tmp_path_factory.mktemp("tiny-sd1"))
    make_tiny_stable_diffusion(folder, version="1")
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd_path):
    from cosegment import StableDiffusionCoSegmentationPipeline

    pipe = StableDiffusionCoSegmentationPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real photographs of different sizes (scikit-image's samples, shipped with the package)."""
    import skimage.data

    return [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # The tiny models gain nothing from threads, and on a shared machine OpenMP threads spin-wait for a busy core:
    # measured here, the suite took 139 s (101 s of CPU) with torch's default 2 threads under load, 16 s with one.
    # Set OMP_NUM_THREADS to choose another count.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def assert_same_contents(path_a: str, path_b: str) -> None:
    """Two files hold the same data: equal bytes, or for `.safetensors` equal tensors and header metadata (the
    safetensors writer orders metadata keys differently from one process to the next)."""
    if path_a.endswith(".safetensors"):
        from safetensors import safe_open

        opened = []
        for path in (path_a, path_b):
            with safe_open(path, framework="pt") as handle:
                opened.append((handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}))
        (meta_a, tensors_a), (meta_b, tensors_b) = opened
        assert meta_a == meta_b, path_b
        assert sorted(tensors_a) == sorted(tensors_b), path_b
        for name, tensor in tensors_a.items():
            assert tensor.dtype == tensors_b[name].dtype and torch.equal(tensor, tensors_b[name]), (path_b, name)
        return
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        assert a.read() == b.read(), path_b
