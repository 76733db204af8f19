"""End to end in Chromium: an SAE's latent opens from a URL that names it, renders its top
images, and the unit picker switches the pages between the layer's latents and its neurons."""

from __future__ import annotations

import re

import pytest

from tests.e2e.test_browser_e2e import assert_no_exception, go, images_loaded, log_in, wait_ready

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def latents(e2e_workspace) -> str:
    """An SAE on layer2 of the e2e workspace, trained and extracted in-process; its URL id."""
    from neuroviz import models
    from neuroviz.catalog import probe_set_from_store
    from neuroviz.sae import SaeConfig, train_and_extract
    from neuroviz.units import short_units

    store = e2e_workspace["store"]
    model = models.create(e2e_workspace["model_spec"], image_size=64)
    dictionary, _ = train_and_extract(store, model, probe_set_from_store(store, e2e_workspace["probe_set_id"]), "layer2",
                                      SaeConfig(expansion=1, k=8, epochs=1, batch_size=256), k=10)
    return short_units(dictionary.units_id)


def test_a_latent_opens_from_its_url_and_the_picker_switches_units(server, page, e2e_workspace, latents, screenshots):
    model, probe = e2e_workspace["model_spec"], e2e_workspace["probe"]
    page.goto(f"{server}/neuron?model={model}&probe={probe}&layer=layer2&units={latents}&neuron=3")
    wait_ready(page)
    if page.get_by_label("Owner password").count():
        log_in(page)
    page.get_by_role("heading", name="Latent 3").wait_for()
    assert_no_exception(page)
    main = page.inner_text('[data-testid="stMain"]')
    assert "latents of SAE 1x k=8" in main and "layer2" in main
    assert f"units={latents}" in page.url.replace("%3A", ":") and "neuron=3" in page.url
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stMain\"] img').length > 4")
    assert images_loaded(page) >= 4
    page.screenshot(path=str(screenshots / "50_latent_neuron_page.png"), full_page=True)
    go(page, "Layer browser")
    page.get_by_role("link", name=re.compile(r"Latent 0$")).first.wait_for()
    assert_no_exception(page)
    page.screenshot(path=str(screenshots / "51_latent_browser.png"), full_page=True)
    # the sidebar's Units picker goes back to the layer's neurons, and the URL follows
    picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text="Units")
    picker.get_by_role("combobox").click()
    page.get_by_role("option", name="neurons", exact=True).click()
    wait_ready(page)
    page.get_by_role("link", name=re.compile(r"Neuron 0$")).first.wait_for()
    page.wait_for_function("() => !location.search.includes('units=')")
    assert_no_exception(page)


def test_the_editing_page_ablates_a_latent_as_a_job(server, page, e2e_workspace, latents, screenshots):
    """With latents picked, the Editing page's list names latents, and its job (`edit --units`)
    removes latent 0's decoded contribution and shows the before/after comparison."""
    from tests.e2e.test_editing_e2e import _wait_for_metric

    model, probe = e2e_workspace["model_spec"], e2e_workspace["probe"]
    page.goto(f"{server}/editing?model={model}&probe={probe}&layer=layer2&units={latents}")
    wait_ready(page)
    if page.get_by_label("Owner password").count():
        log_in(page)
    page.get_by_text("A list of latents", exact=True).click()
    wait_ready(page)
    area = page.get_by_label("LAYER:N,N,... (one layer per line or separated by ';')")
    area.fill("layer2:0,1")
    area.press("Control+Enter")
    wait_ready(page)
    images = page.get_by_role("spinbutton", name="Images (0 = all)")
    images.fill("8")
    images.press("Enter")
    wait_ready(page)
    page.get_by_text("--units sae:").first.wait_for(timeout=30_000)  # the job's command names the dictionary
    page.get_by_role("button", name="Evaluate before / after").click()
    _wait_for_metric(page, "Same top-1 as before", timeout=240)
    wait_ready(page)
    assert_no_exception(page)
    assert "(2 latents, zero)" in page.inner_text('[data-testid="stMain"]')
    page.screenshot(path=str(screenshots / "52_latent_editing.png"), full_page=True)
