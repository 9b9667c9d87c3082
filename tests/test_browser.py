"""The quickstart in real JupyterLab, driven in Debian's Chromium by Playwright.

Checks what a person sees: the connection table with the worker version, the
paused-query widget with its prompt, an answer typed and sent with the Send
button updating the widget, a failed Lua run led by its error in red at the
cell's line, the history table, the history plot drawn once, and the progress bar
of a ``%%pool_map`` over three inputs. Screenshots
go to ``tests/artifacts/``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool_notebook import PROTOCOL_VERSION

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("pool_home")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """JupyterLab from this venv on localhost, serving a copy of the quickstart."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    token = secrets.token_hex(16)
    port = _free_port()
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get Jupyter news?" toast over the screenshot
    (settings / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    env = {**os.environ, "POOL_NOTEBOOK_WIDGETS": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")}
    log = open(tmp_path / "lab.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.open_browser=False", "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise RuntimeError("JupyterLab did not start:\n" +
                                   (tmp_path / "lab.log").read_text()[-3000:]) from None
            time.sleep(0.2)
    try:
        yield f"{base}/lab/tree/{NOTEBOOK.name}?token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run_menu(page: object, item: str) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()  # type: ignore[attr-defined]
    page.get_by_role("menuitem", name=item, exact=True).click()  # type: ignore[attr-defined]


def test_quickstart_in_chromium(lab: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=90_000)  # a bound on waiting (2 shared cores), not a measure
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.set_default_timeout(90_000)
            page.goto(lab)
            expect(page.locator(".jp-Notebook")).to_be_visible()
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(
                1)
            cells = page.locator(".jp-Notebook .jp-Cell")
            answer_cell = cells.filter(has_text="unless you already pressed Send")
            answer_cell.locator(".jp-InputArea-editor").click()
            _run_menu(page, "Run All Above Selected Cell")

            version = page.locator(".pool-connection td.pool-worker-version")
            expect(version).to_have_text(PROTOCOL_VERSION)
            session = page.locator(".pool-session").first
            expect(session.locator(".pool-prompt")).to_have_text("What is 2 + 2?")
            page.screenshot(path=str(ARTIFACTS / "quickstart-paused.png"), full_page=True)

            session.locator("textarea").fill("4")
            session.get_by_role("button", name="Send").click()
            expect(session.locator(".pool-feed")).to_have_text("completed")
            expect(session).to_contain_text('"4"')

            answer_cell.locator(".jp-InputArea-editor").click()
            _run_menu(page, "Run Selected Cell and All Below")
            history = page.locator("table.dataframe", has_text="latency_ms").first
            expect(history).to_be_visible()
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(
                1)
            expect(page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                has_text="Error")).to_have_count(0)

            failed = page.locator(".pool-session", has_text="boom from Lua").first
            state = failed.locator(".pool-state-failed")
            expect(state).to_have_text("failed")
            expect(state).to_have_css("color", "rgb(207, 34, 46)")  # red, first thing read
            message = failed.locator(".pool-error-message")
            expect(message).to_have_text("boom from Lua")
            expect(message).to_have_css("color", "rgb(207, 34, 46)")
            expect(failed.locator(".pool-error-line")).to_have_text(
                "line 3: error('boom from Lua')")
            expect(failed.locator("details", has_text="raw error")).not_to_have_attribute(
                "open", "")
            failed.scroll_into_view_if_needed()
            failed.screenshot(path=str(ARTIFACTS / "failed-lua.png"))

            plot_cell = cells.filter(has_text="%pool_history --plot")
            images = plot_cell.locator(".jp-OutputArea-output img")
            expect(images).to_have_count(1)  # drawn once
            width = images.first.evaluate("img => img.naturalWidth")
            assert width > 600, width
            images.first.scroll_into_view_if_needed()
            images.first.screenshot(path=str(ARTIFACTS / "history-plot.png"))

            map_cell = cells.filter(has_text="%%pool_map --in questions")
            map_cell.scroll_into_view_if_needed()  # JupyterLab renders cells in view only
            expect(map_cell.locator(".widget-hprogress")).to_have_count(1)  # tqdm's widget bar
            expect(map_cell.locator(".jp-OutputArea-output").first).to_contain_text("3/3")
            expect(map_cell.locator(".jp-OutputArea-output").last).to_contain_text("completed")
            map_cell.screenshot(path=str(ARTIFACTS / "map-progress.png"))

            session.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "quickstart.png"), full_page=True)
        finally:
            browser.close()
