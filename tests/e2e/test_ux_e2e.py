"""End-to-end checks of issue 12's dashboard problems (and 15.13's loopback and page-name
leak), each as a researcher met it: the real app in headless Chromium.

This file starts its own server with *no* owner password, listening on every address (IPv4
arrives as ``::ffff:127.0.0.1`` there, the spelling that locked 127.0.0.1 out), over a tiny
labelled workspace whose layer4 labels carry a calibrated score. Tests run in file order: the
first one must be the server's very first session (a rater's), because that is when
Streamlit sent every page name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, _build_workspace, streamlit_server
from tests.e2e.test_browser_e2e import assert_no_exception, wait_ready

pytestmark = pytest.mark.e2e

CALIBRATED = 0.73  # every layer4 CLIP-Dissect label's calibrated score in this workspace
# names of owner pages as Streamlit's navigation message would carry them ("browser" alone is
# not among them: the rating page itself says "this browser remembers you")
OWNER_PAGE_NAMES = (b"study_setup", b"study setup", b"study_results", b"workspace", b"Workspace", b"browser.py",
                    b"Layer browser", b"synthesize", b"editing", b"audit")


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


def _calibrate_layer4(info: dict) -> None:
    """Give layer4's CLIP-Dissect answers a calibrated score (the tiny workspace has none)."""
    from neuroviz.store import LabelRow

    store, run = info["store"], info["runs"]["layer4"]
    labels = store.labels(run.run_key, top_only=False)
    mine = labels[labels["method"] == "clip_dissect"]
    rows = [LabelRow(int(r.neuron), int(r.rank), str(r.label), float(r.score), CALIBRATED if r.rank == 0 else None)
            for r in mine.itertuples(index=False)]
    store.save_labels(f"clip_dissect-{run.run_key}", run.run_key, "clip_dissect", {"multimodal": "probe-labels"},
                      {"window": 4, "calibrated": True}, None, rows, "probe labels (test, calibrated)")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, image_folder):
    """(base port, workspace) of `streamlit run app.py` without an owner password on '::'."""
    root = tmp_path_factory.mktemp("ux_cache")
    port = _free_port()
    env = dict(os.environ, NEUROVIZ_CACHE=str(root), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("NEUROVIZ_OWNER_PASSWORD", None)
    env.pop("NEUROVIZ_UI_RAISE", None)
    log_path = root.parent / f"{root.name}-streamlit.log"

    def workspace() -> dict:
        info = _build_workspace(root, image_folder)
        _calibrate_layer4(info)
        return info

    # no --server.fileWatcherType here: the repository's .streamlit/config.toml must turn it off
    with streamlit_server(port, env, log_path, "::", while_booting=workspace) as info:
        yield port, info
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]
    assert "Inotify" not in text and "inotify" not in text, text[-2000:]


@pytest.fixture(scope="module")
def base(open_server) -> str:
    return f"http://127.0.0.1:{open_server[0]}"


@pytest.fixture(scope="module")
def ws(open_server) -> dict:
    return open_server[1]


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


def visible_text(page) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def url_params(page) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlparse(page.url).query).items()}


def open_url(page, url: str) -> None:
    page.goto(url)
    wait_ready(page)
    page.locator('[data-testid="stMain"] h1').first.wait_for()
    wait_ready(page)


def warnings(page) -> str:
    alerts = page.locator('[data-testid="stAlertContentWarning"]')
    return "\n".join(alerts.nth(i).inner_text() for i in range(alerts.count()))


# -- 15.13: the first session after a server start is a rater's: no owner page name reaches it -------
def test_first_session_is_a_rater_and_receives_no_owner_page_names(base, ws, page):
    frames: list[bytes] = []
    page.on("websocket", lambda sock: sock.on(
        "framereceived", lambda payload: frames.append(payload if isinstance(payload, bytes) else payload.encode())))
    page.goto(f"{base}/?study={ws['study'].token}")
    wait_ready(page)
    page.get_by_role("button", name="Start").wait_for()
    received = b"".join(frames)
    assert received, "no websocket frame was seen"
    leaked = [name.decode() for name in OWNER_PAGE_NAMES if name in received]
    assert not leaked, f"a rater's first session received owner page names: {leaked}"


# -- 12.2 / 15.13: local means loopback, whatever its spelling --------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"])
def test_loopback_in_any_spelling_opens_the_owner_pages(open_server, page, host):
    port = open_server[0]
    open_url(page, f"http://{host}:{port}/")
    body = page.inner_text("body")
    assert "locked" not in body and "Layer browser" in body, body[:600]
    assert page.locator('[data-testid="stSidebarNav"]').count() == 1


class ForwardingProxy:
    """A reverse proxy in a few lines, as nginx would sit in front of the dashboard: it accepts
    on a loopback port, adds ``X-Forwarded-For`` to the first request of each connection (the
    WebSocket upgrade has a connection of its own) and pipes the bytes both ways."""

    def __init__(self, target_port: int, client: str = "203.0.113.9"):
        import threading

        self.target_port, self.client = target_port, client
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        import threading

        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            head += chunk
        first, rest = head.split(b"\r\n", 1)
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        upstream.sendall(first + f"\r\nX-Forwarded-For: {self.client}\r\n".encode() + rest)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        pipe(conn, upstream)

    def close(self) -> None:
        self.listener.close()


def test_a_proxy_on_this_machine_stays_locked(open_server, page):
    """A reverse proxy connects over loopback too: one that adds X-Forwarded-For is locked."""
    proxy = ForwardingProxy(open_server[0])
    try:
        page.goto(f"http://127.0.0.1:{proxy.port}/")
        page.get_by_text("locked", exact=False).first.wait_for(timeout=30_000)
        assert page.locator('[data-testid="stSidebarNav"]').count() == 0
    finally:
        proxy.close()


def test_a_proxy_that_keeps_the_public_host_stays_locked(open_server, browser):
    """The browser asks for dashboard.example.org (resolved to this machine, as a proxy in front
    of the server would receive it): a loopback connection with a public Host header is locked."""
    port = open_server[0]
    chromium = browser.browser_type.launch(
        executable_path=CHROMIUM, headless=True,
        args=CHROMIUM_ARGS + ["--host-resolver-rules=MAP dashboard.example.org 127.0.0.1"])
    try:
        pg = chromium.new_page()
        pg.goto(f"http://dashboard.example.org:{port}/")
        pg.get_by_text("locked", exact=False).first.wait_for(timeout=30_000)
        assert pg.locator('[data-testid="stSidebarNav"]').count() == 0
    finally:
        chromium.close()


# -- default layer, layer picker -----------------------------------------------------------------------
def test_browser_opens_on_the_deepest_labelled_conv_layer_and_the_picker_is_readable(base, page):
    open_url(page, base + "/")
    assert "layer4" in page.locator('[data-testid="stMain"] [data-testid="stCaptionContainer"]').first.inner_text()
    field = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text="Layer").locator("input")
    assert field.input_value() == "layer4 · 512 neurons"
    cut = field.evaluate("el => el.scrollWidth > el.clientWidth + 1")
    assert not cut, "the layer picker's text is cut off"


# -- 12.1: Open in Synthesise carries the neuron shown ---------------------------------------------------
def test_open_in_synthesise_keeps_the_neuron_shown(base, page):
    open_url(page, base + "/neuron?layer=layer4&neuron=8")
    page.get_by_role("button", name="Next").click()
    page.get_by_role("heading", name="Neuron 9").wait_for()
    wait_ready(page)
    page.get_by_text("Open in Synthesise").click()
    page.get_by_role("heading", name=re.compile("Synthesise")).wait_for()
    wait_ready(page)
    assert url_params(page).get("neuron") == "9"
    field = page.locator('[data-testid="stMain"] [data-testid="stNumberInput"]').filter(has_text="Neuron").first
    assert field.locator("input").input_value() == "9"
    assert "--neuron 9" in visible_text(page) or "neuron 9" in visible_text(page).lower()
    assert_no_exception(page)


# -- 12.5: the methods chips agree with the cards; removing one removes only it ----------------------------
def _chips(page) -> list[str]:
    tags = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelectTagsContainer"] [data-tag] > span[title]')
    return [tags.nth(i).get_attribute("title") for i in range(tags.count())]


def _card_methods(page) -> set[str]:
    spans = page.locator('[data-testid="stMain"] .nv-method')
    spans.first.wait_for()
    return {spans.nth(i).text_content().strip() for i in range(spans.count())}


def test_methods_chips_agree_with_the_cards(base, page):
    open_url(page, base + "/?layer=layer4")
    chips = _chips(page)
    assert sorted(chips) == sorted(_card_methods(page)) == ["CLIP-Dissect", "Describe-and-Dissect", "MILAN-style PMI"]
    page.locator('[data-testid="stSidebar"] button[aria-label="Remove MILAN-style PMI"]').first.click()
    wait_ready(page)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stMain\"]').innerText.includes('MILAN')")
    assert sorted(_chips(page)) == sorted(_card_methods(page)) == ["CLIP-Dissect", "Describe-and-Dissect"]


# -- 12.6: a bad link says what was wrong and what is shown instead --------------------------------------
@pytest.mark.parametrize(("query", "said"), [
    ("layer=layer5", ["Layer 'layer5'", "Did you mean", "Showing layer4"]),
    ("layer=layer4&neuron=999999", ["Neuron 999999 does not exist", "showing neuron 511"]),
    ("layer=layer4&neuron=-5", ["Neuron -5 does not exist", "showing neuron 0"]),
    ("probe=nosuchset", ["probe set 'nosuchset'", "instead"]),
    ("model=torchvision:resnet17@random", ["'torchvision:resnet17@random' is unknown", "Did you mean torchvision:resnet18@random",
                                           "instead"]),
])
def test_a_bad_link_says_what_is_shown_instead(base, page, query, said):
    open_url(page, f"{base}/neuron?{query}")
    text = warnings(page)
    for part in said:
        assert part in text, (part, text)
    assert "No runs yet" not in visible_text(page)
    assert_no_exception(page)


# -- 12.7: search what is shown, candidates on request, and why a card matched -----------------------------
def test_search_matches_shown_labels_unless_candidates_are_asked_for(base, ws, page):
    from neuroviz import browse

    run = ws["runs"]["layer4"]
    labels = ws["store"].labels(run.run_key, top_only=False)
    methods = ("clip_dissect", "dnd", "milan")
    runner_up_only = None
    for word in sorted(set(labels.loc[labels["rank"] > 0, "label"])):
        shown = browse.search_hits(labels, methods, word, candidates=False)
        every = browse.search_hits(labels, methods, word, candidates=True)
        if len(every) > len(shown):
            runner_up_only = (word, len(shown), len(every))
            break
    assert runner_up_only, "the workspace has no label that is only a runner-up somewhere"
    word, n_shown, n_every = runner_up_only
    open_url(page, base + "/?layer=layer4")
    search = page.get_by_role("textbox", name="Search labels")
    search.fill(word)
    search.press("Enter")
    wait_ready(page)
    page.get_by_text(f"{n_shown} of {run.n_neurons} neurons match").wait_for()
    assert not re.search(r"matched .*candidate", visible_text(page))
    page.get_by_text("Also search runner-up candidates").click()
    wait_ready(page)
    page.get_by_text(f"{n_every} of {run.n_neurons} neurons match").wait_for()
    assert re.search(r"matched .*candidate \d: " + re.escape(word), visible_text(page))


# -- 12.8: the comparable score first, in words; each raw score explained on hover ----------------------
def test_scores_are_named_plainly_with_the_comparable_one_first(base, page):
    open_url(page, base + "/?layer=layer4")
    text = visible_text(page)
    assert "p=" not in text
    assert f"beats {CALIBRATED * 100:.0f} % of chance" in text
    line = page.locator('[data-testid="stMain"] .nv-label').filter(has_text="beats").first
    content = line.text_content()
    assert content.index("beats") < content.index("raw")
    assert "shuffled" in line.locator(".nv-calibrated").get_attribute("title")
    for method, words in (("MILAN", "mutual information"), ("Describe-and-Dissect", "rank")):
        other = page.locator('[data-testid="stMain"] .nv-label').filter(has_text=method).first
        assert words in other.locator(".nv-score").get_attribute("title")


# -- 12.10: backend strings behind a details toggle on Neuron and Compare ---------------------------------
def test_backend_strings_are_behind_a_details_toggle(base, page):
    backend = "probe labels (test"  # the workspace's backend string (test_pages.add_probe_labels)
    open_url(page, base + "/neuron?layer=layer4&neuron=1")
    assert backend not in visible_text(page)
    page.locator('[data-testid="stExpander"]').filter(has_text="Details").first.locator("summary").click()
    page.get_by_text(backend, exact=False).first.wait_for()
    open_url(page, base + "/compare?layer=layer4&neuron=1")
    assert backend not in visible_text(page)
    page.locator('[data-testid="stExpander"]').filter(has_text="Details: backends").first.locator("summary").click()
    page.get_by_text(backend, exact=False).first.wait_for()
    assert_no_exception(page)


# -- 12.10: the Compare URL records the pair; side B's layer change keeps its neuron ----------------------
def test_compare_url_records_the_pair_and_side_b_keeps_its_neuron(base, browser, page):
    open_url(page, base + "/compare?layer=layer4&neuron=3")
    main = page.locator('[data-testid="stMain"]')
    b_neuron = main.locator('[data-testid="stNumberInput"]').filter(has_text="Neuron").nth(1).locator("input")
    b_neuron.fill("50")
    b_neuron.press("Enter")
    wait_ready(page)
    page.wait_for_function("() => new URLSearchParams(location.search).get('b') === 'layer4:50'")
    main.locator('[data-testid="stSelectbox"]').filter(has_text="Layer").nth(1).locator("input").click()
    page.get_by_role("option", name="layer2", exact=True).click()
    wait_ready(page)
    page.wait_for_function("() => new URLSearchParams(location.search).get('b') === 'layer2:50'")
    assert b_neuron.input_value() == "50"
    assert url_params(page).get("a") == "layer4:3"
    # the methods mode records its pair too, and a copied link reopens it
    main.get_by_text("Two methods", exact=True).click()
    wait_ready(page)
    main.locator('[data-testid="stSelectbox"]').filter(has_text="Method B").locator("input").click()
    page.get_by_role("option", name="Describe-and-Dissect").click()
    wait_ready(page)
    page.wait_for_function("() => new URLSearchParams(location.search).get('b') === 'dnd'")
    assert url_params(page).get("mode") == "methods"
    other = browser.new_page()
    open_url(other, page.url)
    chosen = other.locator('[data-testid="stMain"] [data-testid="stSelectbox"]').filter(has_text="Method B").locator("input")
    assert chosen.input_value() == "Describe-and-Dissect"
    other.close()


# -- also seen: keyboard next/previous, export ------------------------------------------------------------
def test_arrow_keys_step_through_neurons(base, page):
    open_url(page, base + "/neuron?layer=layer4&neuron=5")
    page.locator('[data-testid="stMain"] h1').first.click()  # focus the page, not an input
    page.keyboard.press("ArrowRight")
    page.get_by_role("heading", name="Neuron 6").wait_for()
    wait_ready(page)
    assert url_params(page)["neuron"] == "6"
    page.locator('[data-testid="stMain"] h1').first.click()
    page.keyboard.press("ArrowLeft")
    page.get_by_role("heading", name="Neuron 5").wait_for()


def test_neuron_page_exports_json_and_csv(base, ws, page):
    open_url(page, base + "/neuron?layer=layer4&neuron=2")
    with page.expect_download() as done:
        page.get_by_role("button", name="Download this neuron (JSON)").click()
    record = json.loads(Path(done.value.path()).read_text())
    assert record["neuron"] == 2 and record["layer"] == "layer4"
    assert {"clip_dissect", "milan", "dnd"} <= {r["method"] for r in record["labels"]}
    assert len(record["top_images"]) == ws["runs"]["layer4"].k
    with page.expect_download() as done:
        page.get_by_role("button", name="Download labels and top images (CSV)").click()
    rows = list(csv.DictReader(io.StringIO(Path(done.value.path()).read_text())))
    assert {r["kind"] for r in rows} == {"label", "top_image"}


# -- also seen: Audit with an empty query, Workspace's command line once ---------------------------------
def test_audit_with_an_empty_query_gives_a_hint(base, page):
    open_url(page, base + "/audit")
    page.get_by_role("button", name="Search").click()
    wait_ready(page)
    page.get_by_text("Type one or more concepts").wait_for()
    assert_no_exception(page)


def test_workspace_shows_a_jobs_command_line_once(base, page):
    open_url(page, base + "/workspace")
    page.get_by_text("The model's layers", exact=True).click()
    page.get_by_role("button", name="List the model's layers").click()
    page.get_by_text("layers", exact=False).first.wait_for()
    time.sleep(2)  # the job is running or done: its progress block is drawn under the button
    wait_ready(page)
    left = page.locator('[data-testid="stMain"] [data-testid="stColumn"]').first.inner_text()
    assert left.count("python -m neuroviz layers") == 1, left
