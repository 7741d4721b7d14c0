"""The operator page against a server that requires a key (BDI_AUTH=required): it asks for the key once,
sends it with every call and keeps it for the tab's session only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bdi.security.keys import KeyStore
from tests.helpers.browser import chromium_or_skip
from tests.helpers.servers import UvicornServer, server_env

pytestmark = pytest.mark.slow
TIMEOUT_MS = 60_000


@pytest.fixture()
def browser() -> Iterator[Any]:
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


def test_page_asks_for_the_key_once_and_keeps_it_for_the_session_only(browser: Any, tmp_path: Path) -> None:
    env = server_env(tmp_path, BDI_AUTH="required")
    token = KeyStore(tmp_path / "models" / ".security").create(label="page", scopes=("inspect",)).token
    with UvicornServer(cwd=tmp_path, env=env, ready_path="/ui/") as server:
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        prompts: list[str] = []

        def answer(dialog: Any) -> None:
            prompts.append(dialog.message)
            dialog.accept(token)

        page.on("dialog", answer)
        page.goto(f"{server.base_url}/ui/")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function("document.getElementById('target-error').textContent === '' && "
                               "sessionStorage.getItem('bdi.apiKey') !== null")
        page.wait_for_timeout(500)  # any other call of the start-up would prompt again by now
        assert len(prompts) == 1 and "API key" in prompts[0]
        assert page.evaluate("localStorage.length") == 0  # never beyond the session
        assert page.evaluate("sessionStorage.getItem('bdi.apiKey')") == token
        authorised = [e for e in server.events("http") if e.get("path") == "/health" and e["status_code"] == 200]
        assert authorised, "the page never sent the key"
        fresh = browser.new_context().new_page()  # another session: asked again
        fresh_prompts: list[str] = []
        fresh.on("dialog", lambda d: (fresh_prompts.append(d.message), d.dismiss()))
        fresh.goto(f"{server.base_url}/ui/")
        fresh.wait_for_selector("body[data-ready='1']")
        fresh.wait_for_function("document.getElementById('target-error').textContent.includes('401')")
        assert fresh_prompts
        context.close()
