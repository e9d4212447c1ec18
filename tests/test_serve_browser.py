"""The search page in a real browser: headless Chromium (Debian's package), driven by Playwright,
against a real `tvrerank serve` process on a free loopback port.

Skipped where Chromium or Playwright is missing, except in CI (``CI=true``) or with
``TVRERANK_REQUIRE_BROWSER=1``, where that is a failure (.ci/run installs Chromium).

The detail world's test also takes the screenshot of the explain view that docs/design.md shows
(docs/explain-detail.png). By default it serves the suite's small detail demo and writes the
screenshot into pytest's temporary folder; with ``TVRERANK_SCREENSHOT_DEMO=DIR`` (a finished
``tvrerank demo --world detail --out DIR``) it serves that demo (DIR/run) instead and writes
docs/explain-detail.png, e.g.

    TVRERANK_SCREENSHOT_DEMO=demo-detail python -m pytest -q tests/test_serve_browser.py -k detail
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlencode

import h5py
import numpy as np
import pytest
from conftest import serve_process, stop

from tvrerank.cache.schema import OK

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
QUERY = "a red circle moves left"


def browser_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("TVRERANK_REQUIRE_BROWSER") == "1"


def find_chromium() -> str:
    path = os.environ.get("TVRERANK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
        reason = "Playwright is not installed (pip install -e '.[dev]')"
    else:
        reason = "Chromium is not installed (apt-get install chromium, or set TVRERANK_CHROMIUM)"
    if path is None:
        if browser_required():
            pytest.fail(f"browser required in CI: {reason}")
        pytest.skip(reason)
    return path


SCREENSHOT_DEMO = "TVRERANK_SCREENSHOT_DEMO"  # a finished detail demo: serve it, write DOCS_SCREENSHOT
DOCS_SCREENSHOT = Path(__file__).parents[1] / "docs" / "explain-detail.png"


@pytest.fixture(scope="module")
def server(served_demo):
    """A real `tvrerank serve` on a free loopback port; yields its URL and stops it afterwards."""
    with serving(served_demo, served_demo / "run-top-m") as url:
        yield url


@pytest.fixture(scope="module")
def detail_server(request):
    """`tvrerank serve` on a detail world's demo (the suite's small one, or $TVRERANK_SCREENSHOT_DEMO's);
    yields (its URL, the demo folder)."""
    chosen = os.environ.get(SCREENSHOT_DEMO)
    demo = Path(chosen) if chosen else request.getfixturevalue("detail_demo")
    if not (demo / "cache" / "test.h5").is_file() or not (demo / "run").is_dir():
        pytest.fail(f"{SCREENSHOT_DEMO}={demo}: not a finished demo folder (tvrerank demo --world detail --out DIR)")
    with serving(demo, demo / "run") as url:
        yield url, demo


@contextlib.contextmanager
def serving(demo: Path, run: Path):
    """A real `tvrerank serve` of ``demo`` with ``run`` on a free loopback port: its URL; stopped afterwards."""
    process, url = serve_process(demo, "--reranker", run, "--device", "cpu", "--threads", "1", timeout=120)
    try:
        yield url
    finally:
        stop(process)


def test_page_shows_both_columns_with_thumbnails_and_draws_the_explain_view(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server)
            page.wait_for_function("document.getElementById('gallery-info').textContent.includes('videos')")
            page.fill("#query", QUERY)
            page.press("#query", "Enter")  # Enter searches
            page.wait_for_selector("#reranked .hit")
            assert page.locator("#stage1 .hit").count() == 10 and page.locator("#reranked .hit").count() == 10
            assert page.locator("#reranked .change").count() == 10  # ↑ / ↓ / = / new on every re-ranked hit
            # every thumbnail strip decoded (an image that failed to load has natural width 0)
            page.wait_for_function("[...document.querySelectorAll('img.strip')].every(i => i.complete)")
            widths = page.eval_on_selector_all("img.strip", "images => images.map(i => i.naturalWidth)")
            assert len(widths) == 20 and min(widths) == 12 * 64
            assert f"q={QUERY.replace(' ', '+')}" in page.url  # the URL carries the query

            page.click("#reranked .hit.clickable")
            page.wait_for_selector("#explain[data-drawn]")
            assert page.get_attribute("#explain", "data-drawn") == "12"
            assert int(page.get_attribute("#explain", "data-marks")) >= 12 * 3  # kept patches at least
            # no known answer in this world's cache: no detail outlines, no legend entry for them
            assert page.get_attribute("#explain", "data-detail") is None
            assert not page.locator("#legend-detail").is_visible()
            # the overlay is on the canvas: it differs from the bare frame drawn the same way
            changed = page.evaluate("""async () => {
                const canvas = document.querySelector('#explain-frames canvas');
                const id = document.querySelector('#reranked .hit.selected').dataset.videoId;
                const strip = new Image();
                strip.src = `/api/videos/${encodeURIComponent(id)}/frames`;
                await strip.decode();
                const bare = document.createElement('canvas');
                bare.width = bare.height = canvas.width;
                const ctx = bare.getContext('2d');
                ctx.imageSmoothingEnabled = false;
                ctx.drawImage(strip, 0, 0, strip.height, strip.height, 0, 0, bare.width, bare.height);
                const a = bare.getContext('2d').getImageData(0, 0, bare.width, bare.height).data;
                const b = canvas.getContext('2d').getImageData(0, 0, bare.width, bare.height).data;
                let changed = 0;
                for (let i = 0; i < a.length; i += 4) {
                    if (Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]) > 60) changed++;
                }
                return changed / (a.length / 4);
            }""")
            assert 0.02 < changed < 0.9, changed  # 3 of 64 patches outlined and tinted, picks dotted
            assert "explain=" in page.url

            shared = browser.new_page()  # a shared link reloads the same results and explain view
            shared.goto(page.url)
            shared.wait_for_selector("#explain[data-drawn]")
            assert shared.input_value("#query") == QUERY and shared.locator("#reranked .hit").count() == 10

            page.fill("#query", "   ")
            page.press("#query", "Enter")
            assert "type a query" in page.text_content("#message")
        finally:
            browser.close()


def test_explain_view_outlines_a_detail_worlds_known_answer(detail_server, tmp_path):
    """On a detail world's gallery the explain view outlines the patches that show the detail (dashed
    magenta, beside the kept patches' yellow), as many as the cache's truth records, only inside those
    patches; the legend names them; each detail frame says whether the frame selector kept one. Then
    the screenshot (module docstring)."""
    from playwright.sync_api import sync_playwright

    url, demo = detail_server
    with h5py.File(demo / "cache" / "test.h5", "r") as f:
        truth = f["truth/detail"][()]  # (N, T, P) bool
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["videos/id"][()]]
        status = f["videos/status"][()]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            # each extracted video with its first caption; shown: one where the frame selector kept the
            # detail in some frame if any, preferring one where it also missed it in another (both notes
            # drawn), then the most detail frames
            best = None
            for row in np.flatnonzero(status == OK):
                caption = page.request.get(f"{url}api/videos/{ids[row]}").json()["captions"][0]
                data = page.request.get(f"{url}api/explain", params={"q": caption, "video_id": ids[row]}).json()
                kept = [bool(set(k) & set(np.flatnonzero(d))) for k, d in zip(data["kept_patches"], truth[row])]
                frames = truth[row].any(-1)
                rank = (any(kept), sum(kept) < frames.sum(), int(frames.sum()))
                if best is None or rank > best[0]:
                    best = rank, int(row), caption, data, kept
            _, row, caption, data, kept = best
            video_id, expected = ids[row], truth[row]
            assert expected.any()
            page.goto(f"{url}?" + urlencode({"q": caption, "explain": video_id}))  # a shared link to the view
            page.wait_for_selector("#explain[data-drawn]")
            assert page.get_attribute("#explain", "data-detail") == str(int(expected.sum()))
            assert page.get_attribute("#explain", "data-detail-kept") == str(sum(kept))
            assert page.locator("#legend-detail").is_visible()
            assert "the detail (known answer)" in page.text_content("#legend-detail")
            notes = page.eval_on_selector_all("#explain-frames figure", "fs => fs.map(f => f.textContent)")
            for t, note in enumerate(notes):  # per detail frame: kept or missed by the frame selector
                said = "detail kept" if "detail kept" in note else "detail missed" if "detail missed" in note else None
                assert said == (None if not expected[t].any() else "detail kept" if kept[t] else "detail missed"), note
            # the outlines are on the canvases: magenta pixels inside the detail patches, none elsewhere
            inside, outside = page.evaluate("""(detail) => {
                const [rows, cols] = [%d, %d];
                const counts = [[], []];
                document.querySelectorAll('#explain-frames canvas').forEach((canvas, t) => {
                    const side = canvas.width, cw = side / cols, ch = side / rows;
                    const px = canvas.getContext('2d').getImageData(0, 0, side, side).data;
                    let inside = 0, outside = 0;
                    for (let y = 0; y < side; y++) for (let x = 0; x < side; x++) {
                        const i = 4 * (y * side + x);
                        if (!(px[i] > 220 && px[i + 1] < 110 && px[i + 2] > 170)) continue;
                        const patch = Math.floor(y / ch) * cols + Math.floor(x / cw);
                        if (detail[t].includes(patch)) inside++; else outside++;
                    }
                    counts[0].push(inside); counts[1].push(outside);
                });
                return counts;
            }""" % tuple(data["grid"]), [np.flatnonzero(d).tolist() for d in expected])
            assert sum(outside) == 0, outside
            assert [n > 0 for n in inside] == [bool(d.any()) for d in expected], inside

            shot = DOCS_SCREENSHOT if os.environ.get(SCREENSHOT_DEMO) else tmp_path / "explain-detail.png"
            page.locator("#explain").screenshot(path=str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        finally:
            browser.close()
