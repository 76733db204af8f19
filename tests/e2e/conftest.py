"""Fixtures for the browser tests: a tiny workspace, `streamlit run app.py`, headless Chromium.

The server is started once per session on a free port with its own cache folder and an
owner password, and polled on /_stcore/health before any test runs. Screenshots go to
artifacts/screenshots/ (git-ignored) so a person can look at what the browser saw.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
OWNER_PASSWORD = "e2e-owner-pw"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
STARTUP_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_workspace(root: Path, image_folder: Path) -> dict:
    """A labelled tiny workspace and one study over it (built in-process, like test_pages)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_pages import METHODS, build_dashboard_cache

    from neuroviz import study as studies

    info = build_dashboard_cache(root, image_folder)
    store = info["store"]
    runs = [info["runs"]["layer2"].run_key, info["runs"]["layer4"].run_key]
    items = studies.choose_items(store, runs, list(METHODS), per_layer=2, seed=3)
    info["study"] = studies.create_study(store, "e2e study", items, list(METHODS), raters_per_item=2, gold_items=1,
                                         n_images=6)
    return info


@contextmanager
def streamlit_server(port: int, env: dict, log_path: Path, address: str, extra_args: Sequence[str] = (),
                     while_booting: Callable[[], Any] = lambda: None) -> Iterator[Any]:
    """`streamlit run app.py` on ``port``: ``while_booting()`` runs while the server starts (the
    server reads the cache only when the first page is requested, after the health check), then
    its result is yielded once /_stcore/health answers; the server is stopped on exit."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
             "--server.headless", "true", "--server.address", address, "--browser.gatherUsageStats", "false",
             *extra_args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            result = while_booting()
            deadline = time.monotonic() + STARTUP_SECONDS
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start; log:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield result
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def e2e_server(tmp_path_factory, image_folder):
    """(base URL, workspace) of `streamlit run app.py` on a free port over a tiny workspace,
    built while the server boots."""
    root = tmp_path_factory.mktemp("e2e_cache")
    port = _free_port()
    env = dict(os.environ, NEUROVIZ_CACHE=str(root), NEUROVIZ_OWNER_PASSWORD=OWNER_PASSWORD,
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("NEUROVIZ_UI_RAISE", None)  # the server behaves as in production
    log_path = root.parent / f"{root.name}-streamlit.log"
    with streamlit_server(port, env, log_path, "127.0.0.1", ("--server.fileWatcherType", "none"),
                          lambda: _build_workspace(root, image_folder)) as info:
        yield f"http://127.0.0.1:{port}", info
    text = log_path.read_text(errors="replace")
    # a traceback in the server log is a bug even when the page showed a polite message
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="session")
def server(e2e_server) -> str:
    return e2e_server[0]


@pytest.fixture(scope="session")
def e2e_workspace(e2e_server) -> dict:
    return e2e_server[1]


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
