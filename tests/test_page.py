"""The page of ``deltalm serve`` (``GET /``) and its API docs (``/docs``) in a real browser:
headless Chromium (Debian's ``chromium``) driven by Playwright. Skipped where no chromium is
installed, except in CI (``CI`` set), where .ci/run installs it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")

from cli_support import run_cli  # noqa: E402
from test_serve import SENTENCES, WAIT_S, Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("tests/test_page.py needs Debian's chromium (.ci/run installs it)")
    pytest.skip("no chromium installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page_server(tiny):
    s = Server(tiny.artifact)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_the_page_translates_like_deltalm_translate(tiny, page_server, browser):
    text = SENTENCES[0]
    res = run_cli(
        ["translate", tiny.artifact, "--format", "jsonl", "--threads", "1", "--beam", "3", "--nbest", "2"],
        stdin=(text + "\n").encode(),
    )
    assert res.rc == 0, res.err
    want = json.loads(res.lines[0])
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_server.url + "/", timeout=WAIT_S * 1000)
    page.fill("#text", text)
    page.fill("#beam", "3")
    page.fill("#nbest", "2")
    page.click("#translate")
    page.wait_for_selector('#status[data-state="done"]', timeout=WAIT_S * 1000)
    assert page.inner_text("#sentence-0 .translation") == want["nbest"][0]["text"]
    items = page.locator("#sentence-0 .nbest li")
    assert items.count() == 2
    for k, hypothesis in enumerate(want["nbest"]):
        assert items.nth(k).inner_text().startswith(hypothesis["text"])
        assert items.nth(k).locator(".score").inner_text() == f"{hypothesis['score']:.4f}"
    assert requests and all(url.startswith(page_server.url) for url in requests), requests  # nothing from outside
    page.close()


def test_the_docs_render_offline(page_server, browser):
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_server.url + "/docs", timeout=WAIT_S * 1000)
    page.wait_for_selector(".swagger-ui .info .title", timeout=WAIT_S * 1000)
    assert "deltalm serve" in page.inner_text(".swagger-ui .info .title")
    assert page.locator(".opblock-summary-path", has_text="/v1/translate").count() == 1
    assert all(url.startswith(page_server.url) for url in requests), requests
    page.close()
