"""End-to-end: editing runs as a background job, its result survives a reload, and it downloads.

Issue 12.4: editing ran inside the page for minutes, vanished on reload and could not be
downloaded. Here a real Chromium starts the `edit` job from the Editing page, waits for the
comparison, reloads the page (a fresh session) and finds it again, then downloads the CSV
and JSON files and checks what they hold.
"""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
from playwright.sync_api import expect

from tests.e2e.test_browser_e2e import assert_no_exception, log_in, wait_ready

pytestmark = pytest.mark.e2e

NEURONS = "layer4:" + ",".join(str(n) for n in range(0, 512, 2))


def _wait_for_metric(page, label: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    metric = page.locator('[data-testid="stMetric"]').filter(has_text=label)
    while metric.count() == 0:
        assert time.monotonic() < deadline, page.inner_text("body")[:3000]
        assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:3000]
        time.sleep(1.0)


def test_edit_job_result_survives_a_reload_and_downloads(server, page, screenshots):
    page.goto(server + "/editing")
    wait_ready(page)
    if page.get_by_label("Owner password").count():
        log_in(page)
    page.get_by_text("A list of neurons", exact=True).click()
    wait_ready(page)
    area = page.get_by_label("LAYER:N,N,... (one layer per line or separated by ';')")
    area.fill(NEURONS)
    area.press("Control+Enter")
    wait_ready(page)
    images = page.get_by_role("spinbutton", name="Images (0 = all)")
    images.fill("12")
    images.press("Enter")
    wait_ready(page)
    assert page.locator('[data-testid="stMetric"]').count() == 0  # nothing is evaluated in the page
    # the job's command shows what the page understood: wait for both inputs to be applied
    expect(page.get_by_text("--max-images 12")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("--neurons layer4:0,2,4,")).to_be_visible(timeout=30_000)
    page.get_by_role("button", name="Evaluate before / after").click()
    _wait_for_metric(page, "Same top-1 as before", timeout=240)
    wait_ready(page)
    assert_no_exception(page)

    page.reload()  # a new session: nothing typed survives, the stored result must
    wait_ready(page)
    result_or_login = page.locator('[data-testid="stMetric"]').or_(page.get_by_label("Owner password"))
    expect(result_or_login.first).to_be_visible(timeout=60_000)
    if page.get_by_label("Owner password").count():
        log_in(page)
    _wait_for_metric(page, "Same top-1 as before", timeout=60)
    assert_no_exception(page)
    page.screenshot(path=str(screenshots / "editing-reopened.png"), full_page=True)

    with page.expect_download() as info:
        page.get_by_role("button", name="Per-class table (CSV)").click()
    rows = list(csv.DictReader(io.StringIO(open(info.value.path()).read())))
    assert rows and {"class_name", "predicted_before", "predicted_after", "lost", "gained"} <= set(rows[0])
    with page.expect_download() as info:
        page.get_by_role("button", name="Everything (JSON)").click()
    record = json.loads(open(info.value.path()).read())
    assert record["edit"]["neurons"] == {"layer4": list(range(0, 512, 2))} and record["max_images"] == 12
    assert record["summary"]["n_images"] == 12 and len(record["changed"]) == record["summary"]["n_changed"]
