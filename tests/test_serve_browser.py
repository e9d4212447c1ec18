"""The search page in a real browser: headless Chromium (Debian's package), driven by Playwright,
against a real `tvrerank serve` process on a free loopback port.

Skipped where Chromium or Playwright is missing, except in CI (``CI=true``) or with
``TVRERANK_REQUIRE_BROWSER=1``, where that is a failure (.ci/run installs Chromium).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading

import pytest

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


@pytest.fixture(scope="module")
def server(served_demo):
    """A real `tvrerank serve` on a free loopback port; yields its URL and stops it afterwards."""
    process = subprocess.Popen([sys.executable, "-m", "tvrerank.cli", "serve", str(served_demo), "--reranker",
                                str(served_demo / "run-top-m"), "--port", "0", "--device", "cpu", "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=120)
            seen.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if match:
                break
        yield match.group(1)
    except queue.Empty:
        pytest.fail("tvrerank serve printed no URL:\n" + "".join(seen))
    finally:
        process.terminate()
        process.wait(timeout=30)


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
