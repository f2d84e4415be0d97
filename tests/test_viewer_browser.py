"""The viewer in a real browser: headless Chromium from the system packages, driven by Selenium.

One browser and one `cosegment` run (the tiny pipeline on four real photos, `--no-filter`) serve the whole module.
Without Chromium, chromedriver or selenium the tests skip, except under CI (`CI` or `COSEGMENT_REQUIRE_BROWSER`
set, as `.ci/run` does), where they fail: the browser tests must run there.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest

from cosegment import CoSegmentationFeatures, analyze_features, transfer_points
from cosegment.viewer import show_viewer, token_centres

CHROMIUM = os.environ.get("COSEGMENT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("COSEGMENT_CHROMEDRIVER", "/usr/bin/chromedriver")
INF = float("inf")
NO_FILTER = {"max_entropy": INF, "max_spread": INF, "max_collapse": INF, "max_inverse_error": INF}
ALLOWED = ("file://", "data:", "about:")  # about:srcdoc and about:blank: the notebook form's iframe


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)) and not shutil.which(path):
            return f"{path} is missing (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") or os.environ.get("COSEGMENT_REQUIRE_BROWSER"):
            pytest.fail(f"the viewer's browser tests must run in CI: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # the driver's path is given, so Selenium Manager (which would download one) never runs
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sd_path, photos):
    """`cosegment` on astronaut, chelsea, coffee and rocket: the output folder, the images and the features."""
    import PIL.Image

    from cosegment.cli import main

    folder = tmp_path_factory.mktemp("viewer-run")
    files = []
    for i, photo in enumerate(photos):
        files.append(str(folder / f"photo_{i}.png"))
        PIL.Image.fromarray(photo).save(files[-1])
    out = folder / "out"
    flags = ["--model", tiny_sd_path, "--out", str(out), "--no-filter", "--quiet", "--no-figures"]
    assert main(files + flags) == 0
    features = CoSegmentationFeatures.load(str(out / "resume" / "features"), mmap=True)
    return out, photos, features


def _open(driver, url: str, count: int) -> None:
    """Loads `url` and waits until `count` image cards are rendered (`data-loaded`)."""
    driver.get_log("browser"), driver.get_log("performance")  # start both logs afresh
    driver.get(url)
    _wait(driver, lambda: len(driver.find_elements("css selector", ".card[data-loaded]")) >= count)


def _wait(driver, condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out; browser log: {driver.get_log('browser')}")
        time.sleep(0.05)


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def _click(driver, image_index: int, fx: float, fy: float) -> None:
    """Clicks image `image_index` at the fraction `(fx, fy)` of its displayed width and height."""
    from selenium.webdriver.common.action_chains import ActionChains

    stage = driver.find_element("css selector", f'.card[data-image-index="{image_index}"] .stage')
    width, height = stage.size["width"], stage.size["height"]
    ActionChains(driver).move_to_element_with_offset(
        stage, fx * width - width / 2, fy * height - height / 2
    ).click().perform()


def _marks(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.mark')].map(m => Object.assign({}, m.dataset));"
    )


def _check_marks(driver, features, source: int, point: int, fx: float, fy: float) -> None:
    """The marks of `point`, clicked at `(fx, fy)` of image `source`: its token centre there, and in every other image
    what `transfer_points` returns for that centre."""
    marks = [m for m in _marks(driver) if m["point"] == str(point)]
    (mark,) = [m for m in marks if m["role"] == "source"]
    height, width = features.image_sizes[source]
    h, w = features.grid_size
    centres = token_centres(features.grid_size, features.image_sizes[source])
    x, y = float(mark["x"]), float(mark["y"])
    (token,) = np.nonzero((centres[:, 0] == x) & (centres[:, 1] == y))[0]  # exactly a token centre
    assert int(mark["imageIndex"]) == source and mark["score"] == "1"
    assert abs(x / width - fx) <= 0.5 / w + 0.01 and abs(y / height - fy) <= 0.5 / h + 0.01  # the nearest one
    centre = centres[token]
    others = sorted((m for m in marks if m["role"] == "transfer"), key=lambda m: int(m["imageIndex"]))
    assert [int(m["imageIndex"]) for m in others] == [j for j in range(features.num_images) if j != source]
    for m in others:
        landed, scores = transfer_points(features, source, int(m["imageIndex"]), [centre], refine=True)
        np.testing.assert_allclose([float(m["x"]), float(m["y"])], landed[0], atol=1e-3, rtol=0)
        np.testing.assert_allclose(float(m["score"]), scores[0], atol=1e-5, rtol=0)


def test_page_loads_offline_without_errors(browser, run):
    out, photos, _ = run
    _open(browser, (out / "index.html").as_uri(), len(photos))
    assert _errors(browser) == []
    urls = _requests(browser)
    assert any(u.endswith("/viewer/image_000.js") for u in urls)  # the data came as script files
    assert [u for u in urls if not u.startswith(ALLOWED)] == []
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(ALLOWED) for name in resources)  # (Chromium lists no file:// scripts here)
    indices = [e.get_attribute("data-image-index") for e in browser.find_elements("css selector", "img.photo")]
    assert indices == ["0", "1", "2", "3"]
    text = browser.find_element("id", "hint").text
    assert "transfer_points(features, i, j, [centre], refine=True)" in text
    assert browser.find_element("id", "summary").text.startswith("4 images · token grid 16 × 16 (256 tokens")


def test_clicks_give_the_marks_of_transfer_points(browser, run):
    out, photos, features = run
    _open(browser, (out / "index.html").as_uri(), len(photos))
    _click(browser, 1, 0.31, 0.62)
    _check_marks(browser, features, 1, 1, 0.31, 0.62)
    _click(browser, 3, 0.8, 0.15)
    _check_marks(browser, features, 3, 2, 0.8, 0.15)
    marks = _marks(browser)
    assert len(marks) == 2 * 4 and {m["imageIndex"] for m in marks} == {"0", "1", "2", "3"}
    # each mark is drawn where it says: its circle's centre on screen is at data-x, data-y of that image
    position = browser.execute_script(
        """const m = document.querySelector('.mark[data-role="transfer"][data-image-index="2"]');
        const c = m.querySelector('circle').getBoundingClientRect();
        const s = m.closest('.stage').getBoundingClientRect();
        return [(c.left + c.width / 2 - s.left) / s.width, (c.top + c.height / 2 - s.top) / s.height, +m.dataset.x,
                +m.dataset.y, getComputedStyle(m).opacity, +m.dataset.score];"""
    )
    height, width = features.image_sizes[2]
    assert position[0] == pytest.approx(position[2] / width, abs=0.01)
    assert position[1] == pytest.approx(position[3] / height, abs=0.01)
    assert float(position[4]) == pytest.approx(0.3 + 0.7 * position[5], abs=1e-3)  # opacity shows the score
    browser.find_element("id", "clear-points").click()
    assert _marks(browser) == []
    assert _errors(browser) == []


def test_overlays_toggle(browser, run):
    out, photos, features = run
    _open(browser, (out / "index.html").as_uri(), len(photos))

    def shown() -> set[str]:
        return set(
            browser.execute_script(
                """return [...document.querySelectorAll('.card[data-image-index="0"] .ov')]
                .filter(e => getComputedStyle(e).display !== 'none').map(e => e.classList[1]);"""
            )
        )

    def pick(key: str) -> None:
        browser.find_element("css selector", f'label[for="overlay-{key}"]').click()

    assert shown() == set()
    pick("mask")
    assert shown() == {"ov-mask"} and "common foreground" in browser.find_element("id", "legend").text
    pick("parts")
    assert shown() == {"ov-parts", "ov-keypoints"} and "part 1" in browser.find_element("id", "legend").text
    pick("density")
    assert shown() == {"ov-map"} and "kept matches per token" in browser.find_element("id", "legend").text
    # the canvas holds one cell per token, coloured by the JET colour map over the collection's range
    from safetensors.numpy import load_file

    density = load_file(str(out / "results.safetensors"))["density_maps"]
    cells = browser.execute_script(
        """const c = document.querySelector('.card[data-image-index="0"] canvas.ov-map');
        return [c.dataset.map, c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];"""
    )
    assert cells[:3] == ["density", 16, 16]
    rgba = np.asarray(cells[3]).reshape(16, 16, 4)
    import cv2

    low, high = float(density.min()), float(density.max())
    levels = np.floor((density[0] - low) / (high - low) * 255 + 0.5).astype(np.uint8)
    expected = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    assert np.abs(rgba[..., :3].astype(int) - expected.astype(int)).max() <= 4 and (rgba[..., 3] == 255).all()
    pick("entropy")
    assert browser.execute_script("return document.querySelector('canvas.ov-map').dataset.map") == "entropy"
    assert "nats" in browser.find_element("id", "legend").text
    pick("none")
    assert shown() == set()
    assert _errors(browser) == []


def test_pair_view_shows_matches_with_scores(browser, run):
    out, photos, _ = run
    _open(browser, (out / "index.html").as_uri(), len(photos))
    with open(out / "results.json") as handle:
        pairs = json.load(handle)["correspondences"]
    rows = browser.find_elements("css selector", "#pair-table tbody tr")
    assert len(rows) == 6
    counts = {(int(r.get_attribute("data-source-index")), int(r.get_attribute("data-target-index"))): r for r in rows}
    pair = next(p for p in pairs if (p["source_index"], p["target_index"]) == (1, 2))
    assert counts[(1, 2)].get_attribute("data-matches") == str(pair["num_matches"]) > "0"
    counts[(1, 2)].click()
    _wait(browser, lambda: browser.find_elements("css selector", "#pair-canvas .match"))
    matches = browser.find_elements("css selector", "#pair-canvas .match")
    scores = sorted((int(g.get_attribute("data-rank")), float(g.get_attribute("data-score"))) for g in matches)
    scores = [score for _, score in scores]
    best = sorted(np.asarray(pair["scores"], dtype=np.float32).tolist(), reverse=True)[:100]
    assert scores == best
    images = browser.find_elements("css selector", "#pair-canvas image")
    assert [i.get_attribute("data-image-index") for i in images] == ["1", "2"]
    from selenium.webdriver.common.action_chains import ActionChains

    line = browser.find_element("css selector", '#pair-canvas .match[data-rank="1"] .hit')
    ActionChains(browser).move_to_element(line).perform()
    assert f"score {best[0]:.3f}" in browser.find_element("id", "pair-status").text
    browser.find_element("id", "pair-close").click()
    assert not browser.find_element("id", "pair-view").is_displayed()
    assert _errors(browser) == []


def test_notebook_html_loads_the_same_way(browser, run, tmp_path):
    """`show_viewer(...)._repr_html_()` (an iframe with the page in `srcdoc`) in a page as Jupyter embeds it."""
    out, photos, features = run
    output = analyze_features(features, output_type="np", **NO_FILTER)
    frame = show_viewer(photos, output, features, names=["astronaut", "chelsea", "coffee", "rocket"])._repr_html_()
    page = tmp_path / "notebook.html"
    page.write_text(f"<!DOCTYPE html><html><body><div class='output'>{frame}</div></body></html>", encoding="utf-8")
    browser.get_log("browser"), browser.get_log("performance")
    browser.get(page.as_uri())
    browser.switch_to.frame(browser.find_element("css selector", "iframe.cosegment-viewer"))
    try:
        _wait(browser, lambda: len(browser.find_elements("css selector", ".card[data-loaded]")) >= 4)
        _click(browser, 0, 0.5, 0.4)
        _check_marks(browser, features, 0, 1, 0.5, 0.4)
        assert "chelsea" in browser.find_element("css selector", '.card[data-image-index="1"] .name').text
    finally:
        browser.switch_to.default_content()
    assert _errors(browser) == []
    assert [u for u in _requests(browser) if not u.startswith(ALLOWED)] == []


def test_many_images_load_as_they_scroll_into_view(browser, tmp_path):
    """24 images with `partners=2`: the first screen loads a few image scripts, the last card loads once scrolled to;
    a click marks only the images analysed with the clicked one."""
    from cosegment.benchmarks.planted import make_planted_features
    from cosegment.viewer import analysed_pairs, partner_lists, write_viewer

    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(160, 320)), int(rng.integers(160, 320))) for _ in range(24)]
    features = make_planted_features(24, grid_size=(8, 8), seed=5, image_sizes=sizes).features
    output = analyze_features(features, partners=2, segment=False)
    images = [rng.integers(0, 256, size + (3,), dtype=np.uint8) for size in sizes]
    write_viewer(tmp_path, images, output, features)
    _open(browser, (tmp_path / "index.html").as_uri(), 1)
    time.sleep(0.3)
    first = len(browser.find_elements("css selector", ".card[data-loaded]"))
    assert 1 <= first < 24
    loaded = [u for u in _requests(browser) if "/viewer/image_" in u]
    assert len(loaded) < 24 and not any("/viewer/pair_" in u for u in loaded)
    _click(browser, 0, 0.5, 0.5)
    partners = partner_lists(24, analysed_pairs(output))[0]
    marks = [m for m in _marks(browser) if m["role"] == "transfer"]
    shown = [
        int(c.get_attribute("data-image-index")) for c in browser.find_elements("css selector", ".card[data-loaded]")
    ]
    assert sorted(int(m["imageIndex"]) for m in marks) == [j for j in partners if j in shown]
    other = next(j for j in shown if j not in partners and j != 0)  # a loaded image not analysed with image 0
    assert "not analysed with 0" in browser.find_element("css selector", f'.card[data-image-index="{other}"]').text
    browser.execute_script("document.querySelector('.card[data-image-index=\"23\"]').scrollIntoView()")
    _wait(browser, lambda: browser.find_elements("css selector", '.card[data-image-index="23"][data-loaded]'))
    marks = [m for m in _marks(browser) if m["role"] == "transfer"]
    assert 23 not in partners or any(m["imageIndex"] == "23" for m in marks)
    assert browser.find_element("css selector", '.card[data-image-index="5"]').text  # every card has its header
    assert _errors(browser) == []
