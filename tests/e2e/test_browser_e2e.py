"""End-to-end: the real app in headless Chromium (images render, clicks, URLs, auth, votes).

Tests run in file order against one server: the first one must be the very first request
the server sees (Streamlit runs page files directly until some run called st.navigation,
so that is when an unprotected page would leak).
"""

from __future__ import annotations

import re
import time

import pytest

pytestmark = pytest.mark.e2e

MY_PAGES = [("Layer browser", "Layer browser"), ("Neuron", "Neuron"), ("Compare", "Compare"),
            ("Workspace & jobs", "Workspace & jobs"), ("Study setup", "Study setup"), ("Study results", "Study results")]
OTHER_PAGES = ["Synthesise", "Analysis", "Audit", "Editing"]
METHOD_WORDS = ("clip_dissect", "CLIP-Dissect", "milan", "MILAN", "dnd", "Describe-and-Dissect")


def wait_ready(page, timeout: float = 30.0) -> None:
    """Wait until Streamlit has finished running the script (no 'Running...' indicator)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0 or \
            page.locator('[data-testid="stApp"][data-test-script-state="running"]').count() > 0
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.35:
            return
        time.sleep(0.1)


def assert_no_exception(page, also_errors: bool = True) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:2000]
    if also_errors:
        errors = page.locator('[data-testid="stAlertContentError"]')
        assert errors.count() == 0, [errors.nth(i).inner_text() for i in range(errors.count())]


OWNER_PASSWORD = "e2e-owner-pw"  # the server fixture sets NEUROVIZ_OWNER_PASSWORD to this


def log_in(page) -> None:
    page.get_by_label("Owner password").fill(OWNER_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    wait_ready(page)


def go(page, title: str) -> None:
    """Open a page through the sidebar navigation (keeps the session, so the login holds)."""
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).first.click()
    wait_ready(page)


def images_loaded(page) -> int:
    """How many <img> in the main area have really decoded (naturalWidth > 0)."""
    return page.evaluate(
        "() => Array.from(document.querySelectorAll('[data-testid=\"stMain\"] img')).filter(i => i.complete && i.naturalWidth > 0).length")


def test_first_request_to_an_owner_page_asks_for_the_password(server, page, screenshots):
    page.goto(server + "/study_setup")
    try:
        page.get_by_label("Owner password").wait_for()
    except Exception:
        page.screenshot(path=str(screenshots / "failed_first_request.png"))
        raise
    wait_ready(page)
    body = page.inner_text("body")
    assert "New study" not in body and "Studies" not in body
    page.screenshot(path=str(screenshots / "00_login.png"))


def test_owner_opens_every_page(server, page, screenshots):
    page.goto(server + "/")
    wait_ready(page)
    log_in(page)
    assert page.get_by_role("heading", name="Layer browser").count() == 1
    for i, (nav_title, heading) in enumerate(MY_PAGES):
        go(page, nav_title)
        page.get_by_role("heading", name=re.compile("^" + re.escape(heading))).first.wait_for()
        assert_no_exception(page)
        if nav_title in ("Layer browser", "Neuron"):
            page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stMain\"] img').length > 8")
            assert images_loaded(page) >= 8
        slug = nav_title.lower().replace(" & ", "_").replace(" ", "_")
        page.screenshot(path=str(screenshots / f"{i + 1:02d}_{slug}.png"), full_page=True)
    nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
    for j, title in enumerate(OTHER_PAGES):
        if title in nav:
            go(page, title)
            assert_no_exception(page, also_errors=False)  # their own messages are theirs to judge
            page.screenshot(path=str(screenshots / f"{20 + j:02d}_{title.lower()}.png"), full_page=True)


def test_browser_card_click_and_deep_link(server, page, e2e_workspace, screenshots):
    # a link that names a neuron opens it, after logging in, with the same URL
    model, probe = e2e_workspace["model_spec"], e2e_workspace["probe"]
    page.goto(f"{server}/?model={model}&probe={probe}&layer=layer4&neuron=7")
    wait_ready(page)
    log_in(page)
    page.get_by_role("heading", name="Neuron 7").wait_for()
    assert "layer4" in page.inner_text('[data-testid="stMain"]')
    assert "neuron=7" in page.url and "layer=layer4" in page.url
    page.screenshot(path=str(screenshots / "30_deep_link_neuron.png"), full_page=True)
    # the next button changes the neuron and the URL
    page.get_by_role("button", name="Next").click()
    page.get_by_role("heading", name="Neuron 8").wait_for()
    page.wait_for_function("() => location.search.includes('neuron=8')")
    # heatmap overlays render as images
    page.locator('[data-testid="stButtonGroup"]').get_by_text("Heatmaps", exact=True).click()
    wait_ready(page)
    assert_no_exception(page)
    assert images_loaded(page) >= 8
    page.screenshot(path=str(screenshots / "31_neuron_heatmaps.png"), full_page=True)
    # a card in the layer browser opens its neuron
    go(page, "Layer browser")
    page.get_by_role("link", name=re.compile(r"Neuron 5$")).first.click()
    wait_ready(page)
    page.get_by_role("heading", name=re.compile(r"^Neuron \d+$")).wait_for()
    assert "neuron=" in page.url


def test_rater_link_cannot_open_other_pages(server, page, e2e_workspace):
    token = e2e_workspace["study"].token
    for path in ("/workspace", "/study_results", "/browser", "/neuron"):
        page.goto(f"{server}{path}?study={token}")
        page.get_by_role("button", name="Start").wait_for()  # the rating view's welcome, whatever the path
        wait_ready(page)
        body = page.inner_text("body")
        assert "Workspace & jobs" not in body and "Study results" not in body and "Layer browser" not in body
        assert page.locator('[data-testid="stSidebarNav"]').count() == 0
        for word in METHOD_WORDS:
            assert word not in body
    page.goto(f"{server}/?study=wrong-token")
    page.get_by_text("not valid", exact=False).first.wait_for()
    assert page.locator('[data-testid="stSidebarNav"]').count() == 0


def test_rating_flow_then_owner_sees_the_votes(server, browser, page, e2e_workspace, screenshots):
    study = e2e_workspace["study"]
    rater_ctx = browser.new_context(viewport={"width": 1200, "height": 1000})
    rater = rater_ctx.new_page()
    rater.set_default_timeout(30_000)
    rater.goto(f"{server}/?study={study.token}")
    wait_ready(rater)
    rater.get_by_role("button", name="Start").click()
    wait_ready(rater)
    answered = 0
    while "All done" not in rater.inner_text("body"):
        body = rater.inner_text("body")
        for word in METHOD_WORDS + (study.name, "layer2", "layer4"):
            assert word not in body, f"rater sees '{word}'"
        assert f"{answered} of {study.n_items} answered" in body
        rater.wait_for_function("() => document.querySelectorAll('[data-testid=\"stMain\"] img').length >= 1")
        if answered == 0:
            rater.screenshot(path=str(screenshots / "40_rater_item.png"), full_page=True)
        rater.locator('[data-testid="stRadio"] [role="radiogroup"] label').first.click()
        rater.get_by_role("button", name="Submit and continue").click()
        answered += 1
        try:
            rater.wait_for_function(
                f"() => document.body.innerText.includes('{answered} of {study.n_items} answered') || "
                "document.body.innerText.includes('All done')")
        except Exception:
            rater.screenshot(path=str(screenshots / "failed_rating_step.png"), full_page=True)
            raise
        wait_ready(rater)
    rater.screenshot(path=str(screenshots / "41_rater_done.png"))
    assert answered == study.n_items
    rater_ctx.close()
    # the owner sees the votes in the results
    page.goto(server + "/")
    wait_ready(page)
    log_in(page)
    go(page, "Study results")
    page.locator('[data-testid="stMetric"]').filter(has_text="Votes counted").wait_for()
    # this rater always picked "A", so they likely failed the gold item: count them anyway
    page.get_by_text("Leave out raters who failed gold items").click()
    wait_ready(page)
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Votes counted")
    counted = int(re.search(r"(\d+)\s*$", metric.inner_text()).group(1))
    assert counted == study.n_items - study.n_gold  # the gold item is not a method vote
    assert_no_exception(page)
    page.screenshot(path=str(screenshots / "42_results.png"), full_page=True)


def test_many_raters_at_once_lose_no_vote(server, browser, e2e_workspace):
    """Raters in parallel browser contexts each answer their first item; every vote lands."""
    from neuroviz import study as studies

    study = e2e_workspace["study"]
    store = e2e_workspace["store"]
    n = 5
    contexts = [browser.new_context() for _ in range(n)]
    pages = [c.new_page() for c in contexts]
    for p in pages:
        p.set_default_timeout(60_000)
        p.goto(f"{server}/?study={study.token}")
    for i, p in enumerate(pages):
        wait_ready(p, 60)
        p.get_by_label(re.compile("Your name")).fill(f"parallel-{i}")
        p.get_by_role("button", name="Start").click()
    for p in pages:
        wait_ready(p, 60)
        p.locator('[data-testid="stRadio"] [role="radiogroup"] label').first.click()
    for p in pages:  # submit as close together as the browser allows
        p.get_by_role("button", name="Submit and continue").click()
    for p in pages:
        wait_ready(p, 60)
        assert p.locator('[data-testid="stException"]').count() == 0
        assert "locked" not in p.inner_text("body").lower()
    for c in contexts:
        c.close()
    progress = {r.name: r.done for r in studies.study_progress(store, study.study_id).raters}
    assert all(progress.get(f"parallel-{i}") == 1 for i in range(n)), progress
