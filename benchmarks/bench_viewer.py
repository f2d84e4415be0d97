"""The viewer's size, its precompute time and its load time in headless Chromium, for M = 4, 16 and 64 images.

    python benchmarks/bench_viewer.py [--collections 4 16 64] [--partners64 4] [--screenshot docs/viewer.png]

M = 4: the tiny random pipeline (`cosegment.testing`) through the command line on scikit-image's astronaut,
chelsea, coffee and rocket (`--no-filter`, default figure size 384): the viewer a user gets from `cosegment`.
M = 16 and 64: planted features at SD 2.1-base's read-layer shape (3 layers of 10 heads of 64, 32 x 32 tokens: N =
1024, i.e. 512 px) with crops of the same photos as images; M = 16 with every pair, M = 64 with `partners=K`
(`--partners64`), as one would run 64 images; for M = 64 with every pair the precompute time is extrapolated from
the measured time per ordered pair and the size computed from the data layout (both printed as such).

Analysis: `analyze_features` (for scale); precompute: :func:`cosegment.viewer.precompute_transfers` (one `transfer_points` call per ordered pair with all N
token centres); write: everything else of :func:`write_viewer` (JPEGs, overlays, scripts). Load: from navigation to
every image card of the first screen rendered (1400 x 1000 window), a click's marks (synthetic click, time to
the marks in every image), and scrolling to the last image until its data shows. One torch thread (see bench_refine.py). `--screenshot`: the M = 4 page with two points
and the parts overlay, as the README shows it.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

INF = float("inf")
NO_FILTER = {"max_entropy": INF, "max_spread": INF, "max_collapse": INF, "max_inverse_error": INF}


def _photos() -> list[np.ndarray]:
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]


def _crops(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` crops (70-100 % of each side) of the four photos, at their own sizes."""
    rng = np.random.default_rng(seed)
    photos, crops = _photos(), []
    for k in range(count):
        photo = photos[k % 4]
        height, width = (int(s * rng.uniform(0.7, 1.0)) for s in photo.shape[:2])
        top, left = rng.integers(0, photo.shape[0] - height + 1), rng.integers(0, photo.shape[1] - width + 1)
        crops.append(np.ascontiguousarray(photo[top : top + height, left : left + width]))
    return crops


def _folder_size(folder: str) -> tuple[int, int, int]:
    """Total bytes of index.html and viewer/, the largest file, the number of files."""
    paths = [os.path.join(folder, "index.html")]
    paths += [os.path.join(folder, "viewer", name) for name in os.listdir(os.path.join(folder, "viewer"))]
    sizes = [os.path.getsize(p) for p in paths]
    return sum(sizes), max(sizes), len(sizes)


def _timed_viewer(out: str, images, output, features, names=None) -> tuple[float, float]:
    """Seconds of the precompute, then of the rest of `write_viewer` (given the precomputed transfers)."""
    from cosegment.viewer import analysed_pairs, precompute_transfers, write_viewer

    start = time.perf_counter()
    transfers = precompute_transfers(features, analysed_pairs(output))
    precompute = time.perf_counter() - start
    start = time.perf_counter()
    write_viewer(out, images, output, features, names=names, transfers=transfers)
    return precompute, time.perf_counter() - start


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


FIRST_SCREEN = """
const done = arguments[arguments.length - 1];
(function poll() {
  const cards = [...document.querySelectorAll('.card')];
  const visible = cards.filter(c => c.getBoundingClientRect().top < innerHeight);
  if (visible.length && visible.every(c => c.dataset.loaded)) done([performance.now(), visible.length,
      cards.filter(c => c.dataset.loaded).length]);
  else setTimeout(poll, 5);
})();"""

CLICK = """
const stage = document.querySelector('.card[data-loaded] .stage'), r = stage.getBoundingClientRect();
const start = performance.now();
stage.dispatchEvent(new MouseEvent('click', {clientX: r.left + r.width / 2, clientY: r.top + r.height / 2, bubbles: true}));
return [performance.now() - start, document.querySelectorAll('.mark').length];"""


LAST_CARD = """
const done = arguments[arguments.length - 1], cards = document.querySelectorAll('.card'), last = cards[cards.length - 1];
const start = performance.now();
last.scrollIntoView();
(function poll() { if (last.dataset.loaded) done(performance.now() - start); else setTimeout(poll, 5); })();"""


def _load_times(driver, page: str) -> tuple[float, int, int, float, int, float]:
    """First screen load time (ms), cards on it, cards loaded; click-to-marks (ms) and the marks drawn; time from
    scrolling to the last card to its data shown (ms)."""
    driver.get("about:blank")
    driver.get("file://" + page)
    loaded, visible, total = driver.execute_async_script(FIRST_SCREEN)
    click, marks = driver.execute_script(CLICK)
    return loaded, visible, total, click, marks, driver.execute_async_script(LAST_CARD)


def _tiny_run(folder: str) -> tuple[str, float]:
    """`cosegment` on the four photos with the tiny pipeline; returns the output folder and the run's seconds."""
    import PIL.Image

    from cosegment.cli import main
    from cosegment.testing import make_tiny_stable_diffusion

    make_tiny_stable_diffusion(os.path.join(folder, "tiny-sd"))
    files = []
    for name, photo in zip(("astronaut", "chelsea", "coffee", "rocket"), _photos()):
        files.append(os.path.join(folder, f"{name}.png"))
        PIL.Image.fromarray(photo).save(files[-1])
    out = os.path.join(folder, "out4")
    start = time.perf_counter()
    flags = ["--model", os.path.join(folder, "tiny-sd"), "--out", out, "--no-filter", "--quiet"]
    assert main(files + flags) == 0
    return out, time.perf_counter() - start


def _collection(m: int, folder: str, partners: int | None) -> dict:
    from cosegment import CoSegmentationFeatures, analyze_features
    from cosegment.benchmarks.planted import make_planted_features

    if m == 4:
        out, seconds = _tiny_run(folder)
        features = CoSegmentationFeatures.load(os.path.join(out, "resume", "features"), mmap=True)
        start = time.perf_counter()
        output = analyze_features(features, output_type="np", **NO_FILTER)
        analysis = time.perf_counter() - start
        images, names = _photos(), ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
        source = f"tiny pipeline, 4 photos, N = {features.grid_size[0] * features.grid_size[1]}"
    else:
        images = _crops(m)
        names = [f"crop_{k:02d}.jpg" for k in range(m)]
        sizes = [image.shape[:2] for image in images]
        case = make_planted_features(m, seed=7, num_heads=10, head_dim=64, num_layers=3, image_sizes=sizes)
        features = case.features
        start = time.perf_counter()
        output = analyze_features(features, output_type="np", partners=partners)
        analysis = time.perf_counter() - start
        out = os.path.join(folder, f"out{m}")
        source = f"planted, N = 1024, {'every pair' if partners is None else f'partners={partners}'}"
    precompute, write = _timed_viewer(out, images, output, features, names)
    total, largest, files = _folder_size(out)
    return {
        "m": m,
        "source": source,
        "out": out,
        "pairs": len(output.correspondences),
        "analysis": analysis,
        "precompute": precompute,
        "write": write,
        "bytes": total,
        "largest": largest,
        "files": files,
        "features": features,
    }


def _every_pair_estimate(row: dict) -> str:
    """M with every pair, from a partner-graph run: the precompute time from the measured time per ordered pair; the
    size from the data layout (transfers: base64 of `(N, 3)` float32 per ordered pair) and the measured mean size of a
    pair file and of an image's own data."""
    m, n, pairs = row["m"], 1024, row["pairs"]
    per_pair = row["precompute"] / (2 * pairs)
    every = m * (m - 1) // 2
    transfer = 4 * -(-n * 3 * 4 // 3)
    folder = os.path.join(row["out"], "viewer")
    pair_files = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith("pair_")]
    own = (row["bytes"] - sum(pair_files) - 2 * pairs * transfer) / m
    size = m * own + 2 * every * transfer + every * float(np.mean(pair_files))
    return (
        f"M = {m}, every pair (estimated): {2 * every} ordered pairs x {per_pair:.3f} s = {2 * every * per_pair:.0f} s "
        f"precompute; about {size / 2**20:.0f} MiB, {(own + (m - 1) * transfer) / 2**20:.2f} MiB per image file"
    )


def _screenshot(driver, page: str, path: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    driver.set_window_size(1400, 900)
    driver.get("file://" + page)
    driver.execute_async_script(FIRST_SCREEN)
    driver.find_element("css selector", 'label[for="overlay-parts"]').click()
    for index, fx, fy in ((2, 0.45, 0.35), (0, 0.5, 0.3)):
        stage = driver.find_element("css selector", f'.card[data-image-index="{index}"] .stage')
        width, height = stage.size["width"], stage.size["height"]
        ActionChains(driver).move_to_element_with_offset(
            stage, (fx - 0.5) * width, (fy - 0.5) * height
        ).click().perform()
    mark = driver.find_element("css selector", '.mark[data-role="transfer"][data-image-index="1"]')
    ActionChains(driver).move_to_element(mark).perform()
    driver.save_screenshot(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collections", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--partners64", type=int, default=4, help="partners for M > 16 (default 4)")
    parser.add_argument("--screenshot", default=None, help="where to save the M = 4 screenshot (PNG)")
    parser.add_argument("--keep", default=None, help="write the outputs here (kept) instead of a temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        "1 thread; Chromium headless"
    )
    driver = _browser()
    print(f"browser: {driver.capabilities.get('browserName')} {driver.capabilities.get('browserVersion')}")
    header = (
        "| M | collection | pairs | analysis s | precompute s | write s | viewer MiB | largest file KiB | files | first "
        "screen ms (cards) | click ms (marks) | last card ms |"
    )
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or temporary
        for m in args.collections:
            row = _collection(m, folder, None if m <= 16 else args.partners64)
            page = os.path.join(row["out"], "index.html")
            loaded, visible, total, click, marks, last = _load_times(driver, page)
            print(
                f"| {m} | {row['source']} | {row['pairs']} | {row['analysis']:.1f} | {row['precompute']:.1f} | {row['write']:.1f} | "
                f"{row['bytes'] / 2**20:.2f} | {row['largest'] / 1024:.0f} | {row['files']} | {loaded:.0f} ({visible} "
                f"of {m}, {total} loaded) | {click:.1f} ({marks}) | {last:.0f} |",
                flush=True,
            )
            if m > 16:
                print(_every_pair_estimate(row))
            if m == 4 and args.screenshot:
                _screenshot(driver, page, args.screenshot)
                print(f"screenshot: {args.screenshot}")
    driver.quit()


if __name__ == "__main__":
    main()
