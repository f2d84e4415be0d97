"""The README's main job, `examples/cosegment_pair.py`, run as a newcomer runs it (against a saved tiny pipeline)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parents[1]


def test_cosegment_pair_writes_pictures(tiny_sd_path, photos, tmp_path):
    a, b = tmp_path / "A.jpg", tmp_path / "B.jpg"
    PIL.Image.fromarray(photos[0]).save(a)
    PIL.Image.fromarray(photos[1]).save(b)
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cosegment_pair.py"), str(a), str(b), "--out", str(out)]
        + ["--model", tiny_sd_path, "--no-filter", "--top-k", "20"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = np.asarray(PIL.Image.open(out / "correspondences.png"))
    h0, w0 = photos[0].shape[:2]
    h1, w1 = photos[1].shape[:2]
    # a title band on top of the two images side by side (8 px gap)
    assert lines.shape[1] == w0 + 8 + w1 and lines.shape[0] > max(h0, h1)
    # lines are drawn across the white gap between the images
    band = lines[-max(h0, h1) :, w0 : w0 + 8]
    assert (band != 255).any()
    maps = np.asarray(PIL.Image.open(out / "maps.png"))
    assert maps.shape[0] > h0 + h1 and maps.shape[1] >= 3 * max(w0, w1)
    assert "wrote" in result.stdout
