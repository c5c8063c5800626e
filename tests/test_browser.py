"""The web page in headless Chromium: a Korean query shows results; an image gets zero-shot bars.

Uses the system Chromium (Debian ``chromium``) through Playwright's Python package; no browser is
downloaded. Skips cleanly when either is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from test_search_fixtures import (  # noqa: E402
    ColourModel,
    image_bytes,
    make_colour_folder,
    serve_in_thread,
)

from imagefm.apps.search import Index  # noqa: E402
from imagefm.serve import ServeSettings, create_app  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no system Chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS,
                                                  timeout=60_000)
        except sync_api.Error as err:
            pytest.skip(f"Chromium at {executable} does not start: {err}")
        yield launched
        launched.close()


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "photos"
    paths = make_colour_folder(root)
    index = Index.build(root, tmp_path / "idx", ColourModel(), workers=0)
    app = create_app(index.model, index=index, settings=ServeSettings(model_name="colours"))
    with serve_in_thread(app) as base:
        yield base, paths


def test_korean_query_then_zero_shot_on_a_dropped_image(browser, server, tmp_path) -> None:
    base, paths = server
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(base + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    assert "colours" in page.inner_text("#info")

    page.fill("#query", "빨간색 자동차")
    page.press("#query", "Enter")
    page.wait_for_selector(".result", timeout=15_000)
    first = page.locator(".result").first
    assert first.locator(".path").inner_text() == paths["red"]
    assert float(first.locator(".score").inner_text()) > 0.99
    # Thumbnails arrive as blob: URLs (fetched with headers) and really decode.
    page.wait_for_function(
        "() => { const img = document.querySelector('.result img');"
        " return img && img.src.startsWith('blob:') && img.naturalWidth > 0; }", timeout=15_000)

    query_image = tmp_path / "query.png"
    query_image.write_bytes(image_bytes("blue", seed=9))
    page.set_input_files("#file", str(query_image))
    page.wait_for_function(
        "() => /image query/.test(document.querySelector('#status').textContent)",
        timeout=15_000)
    assert page.locator(".result .path").first.inner_text() == paths["blue"]

    page.fill("#labels", "빨간색, 파란색, 초록색")
    page.select_option("#lang", "ko")
    page.click("#classify")
    page.wait_for_selector(".bar", timeout=15_000)
    assert page.locator(".bar .label").first.inner_text() == "파란색"
    assert page.locator(".bar").count() == 3
    assert problems == []
    page.close()


def test_errors_are_shown_not_thrown(browser, server) -> None:
    base, _ = server
    page = browser.new_page()
    page.goto(base + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    page.fill("#query", "x" * 5000)  # over the server's text limit: a 413 with a message
    page.press("#query", "Enter")
    page.wait_for_selector("#status.error", timeout=15_000)
    assert "limit" in page.inner_text("#status")
    assert page.locator(".result").count() == 0
    page.close()
