"""Dashboard pages through Streamlit's AppTest, on a real tiny workspace.

The workspace is built like production: a random ResNet-18 at 64 px extracted over the
shared test images, then labels stored with ``store.save_labels`` (derived from the probe
labels of each neuron's top images). Every page must render without an exception or an
error box, its widgets must work, the owner password must gate the owner pages, and a rater
link must reach only its own rating view, without method names.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import APP_PATH

APP = str(APP_PATH)
OWNER_PAGES = ["views/workspace.py", "views/browser.py", "views/neuron.py", "views/compare.py",
               "views/study_setup.py", "views/study_results.py"]
METHODS = ("clip_dissect", "milan")
METHOD_WORDS = ("clip_dissect", "CLIP-Dissect", "milan", "MILAN", "dnd", "Describe-and-Dissect")


def add_probe_labels(store, run, methods=METHODS, dnd_neurons=(0, 1, 2)) -> None:
    """Labels of every neuron from the probe-set labels of its top images (a real, simple
    description), plus DnD labels for a few neurons as an on-demand method would leave them."""
    from neuroviz.store import LabelRow

    probe = store.probe_images(run.probe_set_id)
    names = [Path(p["label"]).name if p["label"] else "photo" for p in probe]
    top = store.top_indices(run.run_key)
    for offset, method in enumerate(methods):
        rows = []
        for n in range(run.n_neurons):
            window = 4 + 2 * offset  # the methods look at different numbers of images, so they sometimes disagree
            for rank, (label, count) in enumerate(Counter(names[i] for i in top[n][:window]).most_common(3)):
                rows.append(LabelRow(n, rank, label, count / window, None, {"support": count}))
        store.save_labels(f"{method}-{run.run_key}", run.run_key, method, {"multimodal": "probe-labels"}, {"window": 4 + 2 * offset},
                          None, rows, "probe labels (test)")
    rows = [LabelRow(n, 0, Counter(names[i] for i in top[n][:3]).most_common(1)[0][0] + " thing", 0.5) for n in dnd_neurons]
    store.save_labels(f"dnd-{run.run_key}", run.run_key, "dnd", {"language_model": "none"}, {}, None, rows,
                      "probe labels (test)", replace_neurons=True)


def build_dashboard_cache(root: Path, image_folder: Path) -> dict:
    """A cache with layer2/layer4 (spatial) and fc (vector) of a random ResNet-18, labelled."""
    from neuroviz import datasets, extract, models
    from neuroviz.store import Store

    store = Store(root)
    model = models.create("torchvision:resnet18@random", image_size=64)
    ps = datasets.from_folder(image_folder, cache_dir=store.root)
    runs = extract.extract(model, ps, ["layer2", "layer4", "fc"], store, k=10, batch_size=20, chunk_size=40)
    for run in runs:
        if run.layer != "fc":
            add_probe_labels(store, run)
    return {"store": store, "runs": {r.layer: r for r in runs}, "model_spec": "torchvision:resnet18@random",
            "probe": ps.name, "probe_set_id": ps.id}


@pytest.fixture(scope="session")
def dash(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("dash_cache")
    info = build_dashboard_cache(root, image_folder)
    from tests.conftest import dashboard_env

    env = pytest.MonkeyPatch()  # session-wide: the function-scoped monkeypatch fixture cannot serve
    dashboard_env(env, root)
    yield info
    env.undo()


def app(**query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = str(v)
    return at


def texts(at) -> str:
    """Everything readable on the page, for checks of what is (not) shown."""
    parts = []
    for kind in ("markdown", "caption", "title", "header", "subheader", "info", "success", "warning", "error", "code"):
        parts += [str(e.value) for e in getattr(at, kind)]
    for radio in at.radio:
        parts += [str(radio.label)] + [str(o) for o in radio.options]
    parts += [str(e.proto.body) for e in at.get("html")] if at.get("html") else []
    return "\n".join(parts)


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def card_neurons(at) -> list[int]:
    """Neurons of the browser's cards, in order (each card's title links to its neuron)."""
    out = []
    for link in at.get("page_link"):
        label = link.proto.label
        if label.startswith("**Neuron "):
            out.append(int(label.strip("*").split()[1]))
    return out


# -- owner pages --------------------------------------------------------------------------------
def test_every_owner_page_renders(dash):
    at = app()
    at.run()
    assert_clean(at)
    for page in OWNER_PAGES:
        at.switch_page(page).run()
        assert_clean(at)
        assert at.title, f"{page} drew no title"


def test_browser_shows_24_cards_pages_and_searches(dash):
    at = app(layer="layer2")
    at.run()
    assert_clean(at)
    assert card_neurons(at) == list(range(24))
    at.button(key="browser_next").click().run()
    assert card_neurons(at) == list(range(24, 48))
    labels = dash["store"].labels(dash["runs"]["layer2"].run_key, top_only=False)
    word = "red square"
    expected = sorted(set(labels.loc[labels["label"] == word, "neuron"].astype(int)))
    answers = sorted(set(labels.loc[(labels["label"] == word) & (labels["rank"] == 0), "neuron"].astype(int)))
    at.text_input(key="browser_query").input("red squ").run()
    # by default the search looks at what the cards show (each method's answer), not hidden candidates
    assert card_neurons(at) == answers[:24], "the default search must match only the labels shown"
    at.toggle(key="browser_candidates").set_value(True).run()
    shown = card_neurons(at)
    assert shown == expected[:24] and shown, "search should keep exactly the neurons with a matching label, page 1 again"
    if set(shown) - set(answers):  # a card matched by a runner-up says so
        assert "candidate" in texts(at) and "red square" in texts(at)
    at.text_input(key="browser_query").input("no such concept").run()
    assert card_neurons(at) == [] and any("No neuron matches" in i.value for i in at.info)


def test_browser_agreement_filter_and_sort(dash):
    at = app(layer="layer2")
    at.run()
    at.selectbox(key="browser_agree").set_value("disagree").run()
    assert_clean(at)
    shown = card_neurons(at)
    tops = dash["store"].labels(dash["runs"]["layer2"].run_key, top_only=True)
    assert shown
    for n in shown:  # every method shown in the sidebar counts (dnd labelled only a few neurons)
        rows = tops[tops["neuron"] == n]
        assert rows["label"].str.lower().nunique() > 1, f"neuron {n} shown as disagreeing but its labels agree"
    at.selectbox(key="browser_agree").set_value("agree").run()
    assert card_neurons(at)
    for n in card_neurons(at):
        rows = tops[tops["neuron"] == n]
        assert rows["label"].str.lower().nunique() == 1
    at.selectbox(key="browser_agree").set_value("all").run()
    at.selectbox(key="browser_sort").set_value("max").run()
    stats = dash["store"].neuron_stats(dash["runs"]["layer2"].run_key)
    best = stats.sort_values("max", ascending=False, kind="stable")["neuron"].astype(int).tolist()[:24]
    assert card_neurons(at)[:3] == best[:3]


def test_browser_agreement_by_meaning(dash):
    """Agreement by meaning embeds the labels with the library's MiniLM: it can only find more
    agreeing neurons than equal text does (equal texts have cosine 1)."""
    def matching() -> int:
        (caption,) = [c.value for c in at.caption if "neurons match" in c.value]
        return int(caption.split()[0])

    at = app(layer="layer2")
    at.run()
    at.selectbox(key="browser_agree").set_value("agree").run()
    by_text = matching()
    at.toggle(key="browser_meaning").set_value(True).run()
    assert_clean(at)
    at.slider(key="browser_threshold").set_value(0.5).run()
    assert_clean(at)
    assert 0 < by_text <= matching()


def test_sidebar_layer_choice_changes_the_grid_and_url(dash):
    at = app()
    at.run()
    layer_box = at.sidebar.selectbox(key="_w_layer")
    assert [o.split(" · ")[0] for o in layer_box.options] == ["layer2", "layer4", "fc"]
    # short options (the sidebar cuts longer text off); the methods are in their own picker
    assert "layer4 · 512 neurons" in layer_box.options and "fc · 1000 neurons" in layer_box.options
    assert all(len(o) <= 24 for o in layer_box.options)
    # it opens on the deepest spatial layer the most methods labelled (features.18 on the demo)
    assert layer_box.value == "layer4" and any("layer4" in c.value for c in at.caption)
    layer_box.set_value("layer2").run()
    assert_clean(at)
    assert any("layer2" in c.value and "128 neurons" in c.value for c in at.caption)
    assert at.query_params["layer"] == "layer2"


def test_deep_link_opens_exactly_that_neuron_and_steps(dash):
    at = app(model=dash["model_spec"], probe=dash["probe"], layer="layer4", neuron=7)
    at.run()  # no page in the link: a neuron link still opens the neuron page
    assert_clean(at)
    assert at.title[0].value == "Neuron 7"
    assert any("layer4" in c.value for c in at.caption)
    at.button(key="neuron_next").click().run()
    assert at.title[0].value == "Neuron 8"
    assert at.query_params["neuron"] == "8"
    at.number_input(key="_w_neuron").set_value(100).run()
    assert at.title[0].value == "Neuron 100" and at.query_params["neuron"] == "100"
    labels = dash["store"].labels(dash["runs"]["layer4"].run_key, neuron=100, top_only=True)
    page = texts(at)
    for label in labels["label"]:
        assert label in page


def test_neuron_overlays_and_vector_layer(dash):
    at = app(layer="layer2", neuron=3)
    at.switch_page("views/neuron.py").run()
    for overlay in ("heatmap", "crops", "masks", "none"):
        at.get("button_group")[0].set_value(overlay).run()
        assert_clean(at)
        assert len(at.get("image")) >= 1
    # fc has no spatial maps: overlays explain that instead of failing
    at2 = app(layer="fc", neuron=5)
    at2.switch_page("views/neuron.py").run()
    at2.get("button_group")[0].set_value("heatmap").run()
    assert_clean(at2)
    assert any("no spatial maps" in i.value for i in at2.info)
    assert any(w.value == "Neuron 5" for w in at2.title)


def test_compare_two_methods(dash):
    at = app(layer="layer2")
    at.switch_page("views/compare.py").run()
    assert_clean(at)
    at.get("button_group")[0].set_value("methods").run()
    assert_clean(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Neurons labelled by both"] == "128"
    at.selectbox(key="cmp_only").set_value("disagree").run()
    assert_clean(at)


def test_empty_cache_is_friendly(tmp_path, dash):
    os.environ["NEUROVIZ_CACHE"] = str(tmp_path / "empty")
    try:
        at = app()
        at.run()
        assert_clean(at)
        assert any("No runs yet" in i.value for i in at.info)
        at.switch_page("views/neuron.py").run()
        assert_clean(at)
        assert any("No runs yet" in i.value for i in at.info)
    finally:
        os.environ["NEUROVIZ_CACHE"] = str(dash["store"].root)


# -- jobs ----------------------------------------------------------------------------------------
def test_workspace_starts_and_cancels_a_job(dash):
    from neuroviz import jobs

    at = app(layer="layer2")
    at.switch_page("views/workspace.py").run()
    assert_clean(at)
    before = {j.job_id for j in jobs.list_jobs(dash["store"])}
    at.text_input(key="ws_layers_typed").input("layer1").run()
    at.button(key="start_extract").click().run()
    assert_clean(at)
    new = [j for j in jobs.list_jobs(dash["store"]) if j.job_id not in before]
    assert len(new) == 1 and new[0].argv[:2] == ["extract", dash["model_spec"]] and "layer1" in new[0].argv
    cancel = [b for b in at.button if b.key and b.key.startswith("cancel_") and new[0].job_id in b.key]
    assert cancel, "a running job offers a Cancel button"
    cancel[0].click().run()
    assert jobs.read_job(dash["store"], new[0].job_id).status in ("cancelled", "failed", "interrupted")


# -- auth ----------------------------------------------------------------------------------------
def test_owner_password_gates_every_owner_page(dash):
    at = app()
    at.secrets["owner_password"] = "s3cret"
    at.run()
    assert not card_neurons(at)
    with pytest.raises(ValueError):
        at.switch_page("views/browser.py")  # not even registered before logging in
    at.text_input[0].input("wrong")
    at.button[0].click().run()
    assert any("Wrong password" in e.value for e in at.error)
    at.text_input[0].input("s3cret")
    at.button[0].click().run()
    assert not at.exception
    assert card_neurons(at) == list(range(24))
    at.switch_page("views/study_results.py").run()
    assert_clean(at)


def test_owner_password_from_environment(dash):
    os.environ["NEUROVIZ_OWNER_PASSWORD"] = "envpw"
    try:
        at = app()
        at.run()
        assert at.text_input and at.text_input[0].label == "Owner password"
        assert not card_neurons(at)
    finally:
        os.environ.pop("NEUROVIZ_OWNER_PASSWORD", None)


@pytest.fixture(scope="module")
def study(dash):
    from neuroviz import study as studies

    store = dash["store"]
    runs = [dash["runs"]["layer2"].run_key, dash["runs"]["layer4"].run_key]
    items = studies.choose_items(store, runs, list(METHODS), per_layer=3, seed=1)
    return studies.create_study(store, "page test study", items, list(METHODS), raters_per_item=2, gold_items=1, n_images=6)


def test_rater_link_reaches_only_its_rating_view(dash, study):
    from neuroviz import study as studies

    at = app(study=study.token)
    at.secrets["owner_password"] = "s3cret"  # a password does not stop raters, and raters need none
    at.run()
    assert_clean(at)
    for page in OWNER_PAGES:
        with pytest.raises(ValueError):
            at.switch_page(page)
    assert not at.sidebar.selectbox, "no model/layer pickers for raters"
    at.text_input[0].input("Ada")
    at.button[0].click().run()
    assert_clean(at)
    answered = 0
    while True:
        radios = [r for r in at.radio if r.key and r.key.startswith("choice_")]
        if not radios:
            break
        page = texts(at)
        for word in METHOD_WORDS + (study.name, "layer2", "layer4", dash["model_spec"]):
            assert word not in page, f"the rater view shows '{word}'"
        shown = radios[0].options  # "**A** · label", ..., then the two special answers
        letters = [o.split(" · ")[0].strip("*") for o in shown[:-2]]
        assert letters == list("ABCDEFGH"[:len(letters)]) and letters  # same text from two methods = one option
        assert "None of the labels fits" in shown[-2]
        radios[0].set_value("A" if answered % 2 == 0 else studies.NONE_FITS)
        rating = [r for r in at.radio if r.key and r.key.startswith("rating_")]
        rating[0].set_value(4)
        at.button[0].click().run()
        assert_clean(at)
        answered += 1
        assert answered <= study.n_items
    assert answered == study.n_items
    assert any("All done" in t.value for t in at.title)
    assert "rater" not in at.query_params and "key" not in at.query_params  # no identity in the address bar
    assert [r.done for r in studies.study_progress(dash["store"], study.study_id).raters if r.name == "Ada"] == [study.n_items]


def test_invalid_rater_link_says_so(dash):
    at = app(study="not-a-real-token")
    at.run()
    assert any("not valid" in e.value for e in at.error)
    for page in OWNER_PAGES:
        with pytest.raises(ValueError):
            at.switch_page(page)


def test_results_page_counts_votes_and_exports(dash, study):
    from neuroviz import study as studies

    rater = studies.register_rater(dash["store"], study.study_id, "Bob")
    task = studies.next_item(dash["store"], study.study_id, rater.rater_id)
    studies.submit_vote(dash["store"], study.study_id, rater.rater_id, task.item_id, "A", {"A": 5})
    # Bob's first item may be the gold one and "A" a decoy: count every rater, so the vote shows either way.
    expected = studies.study_results(dash["store"], study.study_id, exclude_failed_gold=False)
    at = app(sid=study.study_id)
    at.switch_page("views/study_results.py").run()
    assert_clean(at)
    at.selectbox(key="results_study").set_value(study.study_id).run()
    at.toggle(key="results_exclude").set_value(False).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Votes counted"] == str(expected.n_votes) and expected.n_votes >= 1
    assert len(at.get("download_button")) == 2


def test_study_setup_creates_a_study_with_a_rater_link(dash):
    from neuroviz import study as studies

    at = app(layer="layer2")
    at.switch_page("views/study_setup.py").run()
    assert_clean(at)
    n_before = len(studies.list_studies(dash["store"]))
    at.radio(key="study_how").set_value("list").run()
    at.text_area[0].input("0,1,2-4")
    at.button[0].click().run()  # the form's submit button is the first button on this page
    assert_clean(at)
    created = studies.list_studies(dash["store"])
    assert len(created) == n_before + 1
    assert created[0].n_items - created[0].n_gold == 5
    assert any(f"study={created[0].token}" in c.value for c in at.code)


def test_neuron_list_parsing_reports_bad_input():
    from ui.study_forms import parse_neuron_list as parse

    layers = {"layer2": None, "layer4": None}
    assert parse("layer4:1,3-4; layer2:0", layers, "layer2") == [("layer4", 1), ("layer4", 3), ("layer4", 4), ("layer2", 0)]
    assert parse("5", layers, "layer2") == [("layer2", 5)]
    with pytest.raises(ValueError, match="Unknown layer"):
        parse("layer9:1", layers, "layer2")
    with pytest.raises(ValueError, match="not a neuron number"):
        parse("a-b", layers, "layer2")


def test_neuron_page_runs_dnd_for_this_neuron_as_a_job(dash):
    from neuroviz import jobs

    run = dash["runs"]["layer4"]
    at = app(layer="layer4", neuron=11)
    at.switch_page("views/neuron.py").run()
    before = {j.job_id for j in jobs.list_jobs(dash["store"])}
    at.button(key=f"start_dnd_{run.run_key}_11").click().run()
    assert_clean(at)
    new = [j for j in jobs.list_jobs(dash["store"]) if j.job_id not in before]
    assert len(new) == 1
    argv = new[0].argv
    assert argv[:2] == ["label", dash["model_spec"]] and argv[argv.index("--methods") + 1] == "dnd"
    assert argv[argv.index("--neurons") + 1] == "11" and argv[argv.index("--layers") + 1] == "layer4"
    jobs.cancel_job(dash["store"], new[0].job_id)


def test_only_a_local_browser_gets_in_without_a_password(monkeypatch):
    """Who counts as local: loopback connection *and* a localhost Host header (Streamlit's
    request context is replaced by a plain stand-in; AppTest cannot set headers)."""
    from types import SimpleNamespace

    from ui import auth

    fake = SimpleNamespace(secrets={}, session_state={},
                           context=SimpleNamespace(headers={"Host": "10.1.2.3:8501"}, ip_address="10.1.2.9"))
    monkeypatch.setattr(auth, "st", fake)
    monkeypatch.delenv("NEUROVIZ_OWNER_PASSWORD", raising=False)
    assert auth.owner_access() == "locked"
    fake.context = SimpleNamespace(headers={"Host": "localhost:8501"}, ip_address="10.1.2.9")  # Host header lies
    assert auth.owner_access() == "locked"
    fake.context = SimpleNamespace(headers={"Host": "localhost:8501"}, ip_address=None)  # Streamlit: None = loopback
    assert auth.owner_access() == "open"
    fake.secrets = {"owner_password": "pw"}
    assert auth.owner_access() == "login"
    assert not auth.check_password("nope") and auth.owner_access() == "login"
    assert auth.check_password("pw") and auth.owner_access() == "granted"


@pytest.mark.parametrize(("query", "said"), [
    ({"layer": "layer5"}, ["Layer 'layer5'", "Showing layer4"]),
    ({"layer": "layer4", "neuron": 999999}, ["Neuron 999999 does not exist", "showing neuron 511"]),
    ({"layer": "layer4", "neuron": -5}, ["showing neuron 0"]),
    ({"probe": "nosuchset"}, ["probe set 'nosuchset'", "instead"]),
    ({"model": "torchvision:resnet17@random"}, ["unknown", "Did you mean torchvision:resnet18@random"]),
])
def test_a_bad_link_says_what_it_shows_instead(dash, query, said):
    at = app(**query)
    at.switch_page("views/neuron.py").run()
    assert not at.exception
    shown = "\n".join(w.value for w in at.warning)
    for part in said:
        assert part in shown, (part, shown)
    at.button(key="neuron_prev" if at.button(key="neuron_next").disabled else "neuron_next").click().run()
    assert not at.exception  # said once, not on every rerun:
    assert not any("does not exist" in w.value or "instead" in w.value for w in at.warning)


def test_cold_neuron_page_says_what_it_is_loading(dash, monkeypatch):
    import streamlit

    said = []
    real = streamlit.spinner

    def spinner(text="", *args, **kwargs):
        said.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(streamlit, "spinner", spinner)
    at = app(layer="layer4", neuron=4)
    at.switch_page("views/neuron.py").run()
    assert_clean(at)
    assert any("labels" in s for s in said) and any("top images" in s for s in said), said


def test_loopback_in_any_spelling_is_local_but_a_proxy_is_not():
    from ui.auth import is_local

    for ip, host in [(None, "localhost:8501"), (None, "127.0.0.1:8501"), ("::ffff:127.0.0.1", "127.0.0.1:8501"),
                     ("127.0.0.2", "127.0.0.2:8501"), ("127.1.2.3", "localhost"), (None, "[::1]:8501")]:
        assert is_local(ip, {"Host": host}), (ip, host)
    for ip, headers in [(None, {"Host": "dashboard.example.org"}),  # a proxy that keeps the public Host
                        (None, {"Host": "localhost:8501", "X-Forwarded-For": "203.0.113.9"}),
                        ("::ffff:127.0.0.1", {"host": "127.0.0.1", "forwarded": "for=203.0.113.9"}),
                        ("10.1.2.9", {"Host": "localhost:8501"}), ("::ffff:10.0.0.1", {"Host": "localhost"}),
                        (None, {"Host": "127.0.0.1.example.org"}), (None, {})]:
        assert not is_local(ip, headers), (ip, headers)


@pytest.fixture(scope="module")
def large_probe_workspace(tmp_path_factory):
    """A layer over 3,000 generated images (a run stored from arrays, no model): large enough
    that reading the whole probe set shows in a count of the rows read."""
    import numpy as np

    from neuroviz import datasets
    from neuroviz.store import RunInfo, Store
    from neuroviz.synthetic_probe import write_probe_set

    root = tmp_path_factory.mktemp("large_probe")
    store = Store(root / "cache")
    ps = datasets.from_folder(write_probe_set(root / "images", 3000, size=16), cache_dir=store.root)
    store.register_probe_set(ps)
    rng = np.random.default_rng(0)
    n_neurons, k = 12, 10
    acts = np.maximum(rng.normal(size=(len(ps), n_neurons)), 0).astype(np.float32)  # ReLU: half the values are ties at 0
    top_idx = np.argsort(-acts, axis=0, kind="stable")[:k].T.copy()
    maps = rng.random((n_neurons, k, 4, 4)).astype(np.float32)
    info = RunInfo("large-probe-run", "torchvision:resnet18@random", "random", "layer3", "mean", ps.id, "none", k, "test",
                   len(ps), n_neurons, (4, 4), "conv")
    store.finish_run(info, acts, np.take_along_axis(acts.T, top_idx, axis=1), top_idx, [im.image_id for im in ps.images], maps)
    add_probe_labels(store, info, dnd_neurons=())
    return {"store": store, "run": info}


def test_pages_read_only_the_probe_rows_they_show(large_probe_workspace, monkeypatch):
    """The layer browser, the neuron page (every overlay) and Compare read the probe rows of the
    images they draw, never the whole probe set (which cost seconds at 100,000 images)."""
    from neuroviz import store as store_module
    from tests.conftest import dashboard_env

    store, run = large_probe_workspace["store"], large_probe_workspace["run"]
    dashboard_env(monkeypatch, store.root)
    read = []
    real_read = store_module.ProbeFiles._read

    def counted(files, where, params):
        rows = real_read(files, where, params)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(store_module.ProbeFiles, "_read", counted)
    monkeypatch.setattr(store_module.Store, "probe_images", lambda *a, **k: pytest.fail("a page read every probe row"))
    for page in ("views/browser.py", "views/neuron.py", "views/compare.py"):
        at = app(layer=run.layer, neuron=3)
        at.switch_page(page).run()
        assert_clean(at)
        assert at.get("image"), page
        if page == "views/neuron.py":
            for overlay in ("heatmap", "masks", "crops"):
                at.get("button_group")[0].set_value(overlay).run()
                assert_clean(at)
    # every card's mosaic (12 neurons x 9), the neuron's top 10, 6 bins x 6 samples and 8 lowest,
    # and Compare's two panels of 16: a few hundred rows at most, of 3,000
    assert 0 < sum(read) <= 12 * 9 + 10 + 36 + 8 + 2 * 16, read


def test_milan_masks_come_from_the_runs_sketch_else_say_approximate(dash, large_probe_workspace, monkeypatch):
    """The neuron page's mask overlay uses the level of the run's sketch of every map cell
    (Store.mask_levels); a run stored without one gets the top-k estimate, said approximate."""
    from tests.conftest import dashboard_env

    run = dash["runs"]["layer2"]
    level = dash["store"].mask_levels(run.run_key, 0.99)
    assert level is not None, "an extraction stores the map sketch"
    assert [dash["store"].mask_level(run.run_key, n, 0.99) for n in range(run.n_neurons)] == [float(v) for v in level]
    at = app(layer="layer2", neuron=3)
    at.switch_page("views/neuron.py").run()
    at.get("button_group")[0].set_value("masks").run()
    assert_clean(at)
    caption = next(c.value for c in at.caption if c.value.startswith("MILAN exemplar masks"))
    assert f"above {level[3]:.3g} " in caption and "approximate" not in caption

    old = large_probe_workspace
    assert old["store"].mask_levels(old["run"].run_key, 0.99) is None  # stored from arrays: no map sketch
    dashboard_env(monkeypatch, old["store"].root)
    at = app(layer=old["run"].layer, neuron=3)
    at.switch_page("views/neuron.py").run()
    at.get("button_group")[0].set_value("masks").run()
    assert_clean(at)
    assert any(c.value.startswith("MILAN exemplar masks") and "approximate" in c.value for c in at.caption)
