"""The offline viewer's data (cosegment.viewer): what the page is given, without a browser
(tests/test_viewer_browser.py drives the page itself)."""

import base64
import html
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cosegment import analyze_features, transfer_points
from cosegment.benchmarks.planted import make_planted_features, make_planted_reference
from cosegment.viewer import (
    analysed_pairs,
    build_viewer,
    partner_lists,
    precompute_transfers,
    render_page,
    show_viewer,
    token_centres,
    view_main,
    viewer_html,
    write_viewer,
)

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")
NO_FILTER = {"max_entropy": INF, "max_spread": INF, "max_collapse": INF, "max_inverse_error": INF}


def _floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def _record(path) -> dict:
    """The JSON record a data script registers."""
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text[text.index("{") : text.rindex(")")])


@pytest.fixture(scope="module")
def planted():
    """Six planted images (8 x 8 tokens) with high-norm tokens and a reference (so the corrections are active),
    analysed with `partners=2`; random pictures of the images' sizes."""
    case = make_planted_features(num_images=6, grid_size=(8, 8), seed=3, anomalies=2)
    features = case.features
    features.reference = make_planted_reference(case, num_images=4)
    output = analyze_features(features, partners=2, reference=features.reference, **NO_FILTER)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in features.image_sizes]
    return images, output, features


def test_token_centres_hand_computed():
    centres = token_centres((2, 2), (4, 6))  # H = 4, W = 6: cells of 3 x 2 px
    np.testing.assert_array_equal(centres, [[1.5, 1.0], [4.5, 1.0], [1.5, 3.0], [4.5, 3.0]])
    assert centres.dtype == np.float64 and token_centres((3, 5), (7, 9)).shape == (15, 2)


def test_partner_lists_follow_the_pairs():
    assert partner_lists(4, [(0, 1), (0, 3), (2, 3)]) == [[1, 3], [0], [3], [0, 2]]
    assert partner_lists(3, []) == [[], [], []]


def test_precomputed_transfers_are_transfer_points(planted):
    """One call per ordered pair on the two images' features = `transfer_points` on the whole collection with all
    centres (bitwise), and = a call with the one centre up to float32 rounding."""
    images, output, features = planted
    pairs = analysed_pairs(output)
    assert len(pairs) < 15  # the partner graph, not every pair
    transfers = precompute_transfers(features, pairs[:2], refine=True)
    assert set(transfers) == {(s, t) for s, t in pairs[:2]} | {(t, s) for s, t in pairs[:2]}
    for (i, j), (points, scores) in transfers.items():
        centres = token_centres(features.grid_size, features.image_sizes[i])
        whole, whole_scores = transfer_points(features, i, j, centres, refine=True)
        np.testing.assert_array_equal(points, whole)
        np.testing.assert_array_equal(scores, whole_scores)
        for k in (0, 27, 63):
            one, one_score = transfer_points(features, i, j, centres[k : k + 1], refine=True)
            np.testing.assert_allclose(points[k], one[0], atol=1e-3, rtol=0)
            np.testing.assert_allclose(scores[k], one_score[0], atol=1e-5, rtol=0)
    plain = precompute_transfers(features, [pairs[0]], refine=False)[pairs[0]]
    centres = token_centres(features.grid_size, features.image_sizes[pairs[0][0]])
    expected = transfer_points(features, *pairs[0], centres, refine=False)
    np.testing.assert_array_equal(plain[0], expected[0])


def test_data_grow_as_images_times_partners_times_tokens(planted):
    images, output, features = planted
    data = build_viewer(images, output, features)
    partners = partner_lists(6, analysed_pairs(output))
    n = 64
    for i, record in enumerate(data.images):
        assert sorted(int(j) for j in record["transfers"]) == partners[i]
        for j, b64 in record["transfers"].items():
            assert _floats(b64).shape == (n * 3,)  # x, y, score per source token: no N x N anywhere
        assert _floats(record["maps"]).shape == (3 * n,)
    stored = sum(len(r["transfers"]) for r in data.images)
    assert stored == 2 * len(analysed_pairs(output)) == sum(len(p) for p in partners)
    entries = data.manifest["images"]
    assert [e["partners"] for e in entries] == partners and not data.manifest["all_pairs"]
    # the stored values are the precomputed transfers, exactly (float32)
    i, j = 0, partners[0][0]
    table = _floats(data.images[i]["transfers"][str(j)]).reshape(n, 3)
    points, scores = precompute_transfers(features, [(min(i, j), max(i, j))])[(i, j)]
    np.testing.assert_array_equal(table[:, :2], points)
    np.testing.assert_array_equal(table[:, 2], scores)
    # maps in the order density, entropy, inverse error
    maps = _floats(data.images[2]["maps"]).reshape(3, 8, 8)
    np.testing.assert_array_equal(maps[1], np.asarray(output.entropy_maps[2], dtype=np.float32))


def test_manifest_describes_the_collection(planted):
    images, output, features = planted
    manifest = build_viewer(images, output, features, names=[f"p{i}.jpg" for i in range(6)]).manifest
    assert manifest["grid"] == [8, 8] and manifest["refine"] is True and manifest["transfers"] is True
    assert [e["name"] for e in manifest["images"]] == [f"p{i}.jpg" for i in range(6)]
    assert [(e["height"], e["width"]) for e in manifest["images"]] == [tuple(s) for s in features.image_sizes]
    assert [e["sharing"] for e in manifest["images"]] == pytest.approx(np.asarray(output.sharing).tolist())
    pairs = [(p["source"], p["target"], p["matches"]) for p in manifest["pairs"]]
    assert pairs == [(p.source_index, p.target_index, len(p)) for p in output.correspondences]
    density = manifest["maps"][0]
    assert density["key"] == "density" and density["unit"] == "kept matches per token"
    assert density["range"] == [float(np.min(output.density_maps)), float(np.max(output.density_maps))]
    assert len(manifest["jet"]) == 256 * 6 and manifest["jet"][:6] == "000080"  # OpenCV's JET: dark blue first
    assert [p["id"] for p in manifest["parts"]] == sorted(
        {int(v) for m in output.part_masks for v in np.unique(m)} - {0}
    )


def test_outliers_and_sharing_reach_the_page(planted):
    from dataclasses import replace

    images, output, features = planted
    flagged = replace(output, sharing=np.linspace(1, 0, 6), outliers=np.array([0, 0, 0, 0, 0, 1], dtype=bool))
    entries = build_viewer(images, flagged, None, figure_size=32).manifest["images"]
    assert [e["outlier"] for e in entries] == [False] * 5 + [True]
    assert [e["sharing"] for e in entries] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2, 0])


def test_written_viewer_is_offline_and_lazy(planted, tmp_path):
    images, output, features = planted
    path = write_viewer(tmp_path, images, output, features, figure_size=64)
    assert path == os.path.join(tmp_path, "index.html")
    page = Path(path).read_text(encoding="utf-8")
    names = sorted(os.listdir(tmp_path / "viewer"))
    assert names == [f"image_{i:03d}.js" for i in range(6)] + [
        f"pair_{s:03d}_{t:03d}.js" for s, t in analysed_pairs(output)
    ]
    # no address outside the folder: every src/href is a data: URI (no http, no CDN), scripts load from viewer/
    assert re.findall(r"(?:src|href)=\"(?!data:)", page) == []
    assert "https://" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "default-src 'none'" in page and "cosegmentViewer.registerImage(0" not in page
    manifest = json.loads(re.search(r'id="cosegment-manifest">(.*?)</script>', page, re.S).group(1))
    assert [e["file"] for e in manifest["images"]] == [f"viewer/image_{i:03d}.js" for i in range(6)]
    record = _record(tmp_path / "viewer" / "image_001.js")
    assert record["image"].startswith("data:image/jpeg;base64,")
    assert record["mask"].startswith("data:image/png;base64,") and record["parts"].startswith("data:image/png;")
    assert max(manifest["images"][1]["display"]) == 64  # the figure size
    pair = _record(tmp_path / "viewer" / names[6])
    first = output.correspondences[0]
    table = _floats(pair["matches"]).reshape(-1, 5)
    np.testing.assert_array_equal(table[:, 4], np.asarray(first.scores, dtype=np.float32))
    np.testing.assert_array_equal(table[:, 2:4], np.asarray(first.target_points, dtype=np.float32))
    assert pair["mutual"] == "".join("1" if m else "0" for m in np.asarray(first.mutual))


def test_rewriting_removes_stale_data_scripts(planted, tmp_path):
    images, output, features = planted
    (tmp_path / "viewer").mkdir()
    (tmp_path / "viewer" / "image_007.js").write_text("old")
    (tmp_path / "viewer" / "notes.txt").write_text("kept")
    write_viewer(tmp_path, images, output, features, figure_size=32)
    assert not (tmp_path / "viewer" / "image_007.js").exists() and (tmp_path / "viewer" / "notes.txt").exists()


def test_notebook_form_is_self_contained(planted):
    images, output, features = planted
    page = viewer_html(images, output, features, figure_size=32)
    assert len(re.findall(r"cosegmentViewer\.registerImage\(\d", page)) == 6
    assert len(re.findall(r"cosegmentViewer\.registerPair\(\d", page)) == len(output.correspondences)
    assert "file:" not in page.split("<style>")[0]  # no local script source allowed in this form's policy
    shown = show_viewer(images, output, features, figure_size=32, height=500)
    frame = shown._repr_html_()
    assert frame.startswith('<iframe class="cosegment-viewer" srcdoc="') and "height: 500px" in frame
    assert "<script" not in frame and "&lt;script" in frame  # the page is escaped into the attribute
    assert html.unescape(re.search(r'srcdoc="(.*?)" style', frame, re.S).group(1)) == shown.html


def test_without_features_the_page_has_no_transfers(planted):
    images, output, _ = planted
    data = build_viewer(images, output, None, figure_size=32)
    assert data.manifest["transfers"] is False and all(r["transfers"] == {} for r in data.images)


def test_bad_inputs_name_the_argument(planted):
    images, output, features = planted
    with pytest.raises(ValueError, match="`images` must hold the output's 6 images, got 5"):
        build_viewer(images[:5], output, features)
    swapped = [images[1], images[0]] + images[2:]
    with pytest.raises(ValueError, match=r"`images\[0\]`"):
        build_viewer(swapped, output, features)
    with pytest.raises(ValueError, match="`figure_size`"):
        build_viewer(images, output, features, figure_size=0)
    with pytest.raises(ValueError, match="`names`"):
        build_viewer(images, output, features, names=["a"])
    with pytest.raises(TypeError, match="`output`"):
        build_viewer(images, {"density_maps": None}, features)
    with pytest.raises(TypeError, match="`refine`"):
        precompute_transfers(features, [(0, 1)], refine=1)


def test_page_template_fills_every_slot():
    page = render_page({"title": "a <b>", "images": []})
    assert "{{" not in page and "a &lt;b&gt;" in page
    assert render_page({"title": "</script>"}).count("</script>") == render_page({"title": "x"}).count("</script>")


def test_view_command_prints_the_path(planted, tmp_path, capsys):
    images, output, features = planted
    assert view_main([str(tmp_path), "--no-open"]) == 1
    assert "no viewer at" in capsys.readouterr().err
    write_viewer(tmp_path, images, output, None, figure_size=32)
    assert view_main([str(tmp_path), "--no-open"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(str(tmp_path), "index.html")


def test_cli_writes_the_viewer_unless_told_not_to(tmp_path, tiny_sd_path):
    """`cosegment ... --out OUT` writes OUT/index.html; `--no-viewer` does not; `cosegment view OUT` prints it
    (and, under CI, opens nothing)."""
    import PIL.Image

    from cosegment.cli import main

    rng = np.random.default_rng(1)
    files = []
    for i, size in enumerate([(40, 56), (48, 48), (64, 40)]):
        files.append(str(tmp_path / f"im{i}.png"))
        PIL.Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(files[-1])
    flags = ["--model", tiny_sd_path, "--height", "64", "--width", "64", "--no-figures", "--quiet", "--no-filter"]
    assert main(files + flags + ["--out", str(tmp_path / "a")]) == 0
    manifest_text = (tmp_path / "a" / "index.html").read_text(encoding="utf-8")
    assert '"name":"im0.png"' in manifest_text and len(os.listdir(tmp_path / "a" / "viewer")) == 3 + 3
    assert main(files + flags + ["--no-viewer", "--no-refine", "--out", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / "index.html").exists() and not (tmp_path / "b" / "viewer").exists()
    result = subprocess.run(
        [sys.executable, "-m", "cosegment", "view", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=dict(os.environ, CI="true"),
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == str(tmp_path / "a" / "index.html"), result.stderr


def test_wheel_ships_the_assets(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PIP_NO_INDEX="1"),
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("diffusers_cosegment-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = {f"cosegment/viewer_assets/{name}" for name in ("viewer.html", "viewer.js", "viewer.css")}
    assert {"cosegment/viewer.py"} | assets <= names


def test_notebook_snippet_with_pil_images_and_torch_output(tiny_pipe, photos, tmp_path, monkeypatch):
    """The README's notebook lines: PIL images, the pipeline's output (torch fields) carrying its features."""
    import PIL.Image
    import torch

    images = [PIL.Image.fromarray(photo) for photo in photos[:3]]
    out = tiny_pipe(image=images, generator=torch.Generator().manual_seed(0), return_features=True, output_type="pt")
    monkeypatch.chdir(tmp_path)
    view = show_viewer(images, out)
    write_viewer("results/", images, out)
    assert 'srcdoc="' in view._repr_html_() and '"transfers":true' in view.html
    record = _record(tmp_path / "results" / "viewer" / "image_002.js")
    landed, scores = transfer_points(out.features, 2, 0, token_centres(out.features.grid_size, photos[2].shape[:2]))
    table = _floats(record["transfers"]["0"]).reshape(-1, 3)
    np.testing.assert_array_equal(table[:, :2], landed)
    np.testing.assert_array_equal(table[:, 2], scores)
