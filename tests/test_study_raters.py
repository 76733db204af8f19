"""Raters (issue 15.2, 15.3, 12.9): a rater is their secret, never their name; the rating
page needs nothing from the workspace (pictures frozen into the study, distinct images);
study setup defaults submit, and the owner can make gold items."""

from __future__ import annotations

import csv
import fcntl
import io
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from neuroviz import study as st
from neuroviz.store import CacheLayout, LabelRow, Store
from neuroviz.study import pictures, storage

METHODS = ("alpha_method", "beta_method", "gamma_method")


def _label(method: str, neuron: int) -> str:
    return f"{method.split('_')[0]} idea {neuron}"


@pytest.fixture()
def workspace(tiny_workspace, tmp_path):
    """A private copy of the tiny workspace with its probe images (so they can be taken
    away), and three fake methods' labels on layer2: alpha_method on every neuron, beta_method
    on 0-11, gamma_method only on 0-3 (like CLIP-Dissect, MILAN and DnD on the demo)."""
    root = tmp_path / "cache"
    shutil.copytree(tiny_workspace["store"].root, root, ignore=shutil.ignore_patterns("studies.*"))
    store = Store(root)
    run = tiny_workspace["runs"]["layer2"]
    shutil.rmtree(store.labels_dir(), ignore_errors=True)
    for method in METHODS:
        neurons = {"alpha_method": range(run.n_neurons), "beta_method": range(12), "gamma_method": range(4)}[method]
        store.save_labels(f"{method}-{run.run_key}", run.run_key, method, {}, {}, None,
                          [LabelRow(n, 0, _label(method, n), 1.0) for n in neurons], "test")
    images = tmp_path / "images"
    originals = store.probe_images(run.probe_set_id)
    for im in originals:  # the study copy points at its own image files, which a test may delete
        target = images / Path(im["path"]).parent.name / Path(im["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(im["path"], target)
    store._write_probe_images(store.probe_set_dir(run.probe_set_id), [im["image_id"] for im in originals],
                              [str(images / Path(im["path"]).parent.name / Path(im["path"]).name) for im in originals],
                              [im["label"] for im in originals])
    return {"store": store, "run": run, "images": images}


def _study(workspace, methods=METHODS[:2], neurons=range(4), **kwargs):
    run_key = workspace["run"].run_key
    kwargs.setdefault("gold_items", 0)
    return st.create_study(workspace["store"], "raters", [(run_key, n) for n in neurons], list(methods), **kwargs)


# -- identity ----------------------------------------------------------------------------------------
def test_a_name_is_a_label_and_the_secret_is_the_rater(workspace):
    store = workspace["store"]
    study = _study(workspace)
    first = st.register_rater(store, study.study_id, "Ada")
    task = st.next_item(store, study.study_id, first.rater_id)
    st.submit_vote(store, study.study_id, first.rater_id, task.item_id, "A")
    # Someone else types the same name (or a variant of it): a new rater, who never sees or
    # replaces the first one's answers.
    for name in ("Ada", " Ada ", "Ada  "):
        other = st.register_rater(store, study.study_id, name)
        assert other.rater_id != first.rater_id and other.secret != first.secret
        theirs = st.task_for(store, study.study_id, other.rater_id, task.item_id)
        assert theirs.previous_choice is None and theirs.done == 0
        receipt = st.submit_vote(store, study.study_id, other.rater_id, task.item_id, "B")
        assert not receipt.replaced
    assert st.task_for(store, study.study_id, first.rater_id, task.item_id).previous_choice == "A"
    # The secret finds its rater; an altered one or another study's finds nobody.
    assert st.rater_by_secret(store, study.study_id, first.secret) == first
    assert st.rater_by_secret(store, study.study_id, first.secret[:-1] + ("x" if first.secret[-1] != "x" else "y")) is None
    assert st.rater_by_secret(store, study.study_id, "") is None
    other_study = _study(workspace)
    assert st.rater_by_secret(store, other_study.study_id, first.secret) is None
    # The owner sees every rater and vote; the secrets are nowhere (only their hashes are stored).
    rows = list(csv.DictReader(io.StringIO(st.votes_csv(store, study.study_id))))
    assert len(rows) == 4 and sorted(r["rater_name"] for r in rows) == ["Ada"] * 4
    assert len({r["rater_id"] for r in rows}) == 4
    dump = "\n".join(sqlite3.connect(str(st.studies_path(store))).iterdump())
    assert first.secret not in dump and first.secret not in st.votes_csv(store, study.study_id)
    assert first.secret not in repr(first)
    assert [r.name for r in st.study_results(store, study.study_id, exclude_failed_gold=False).raters] == ["Ada"] * 4


# -- frozen pictures ---------------------------------------------------------------------------------
def _lock_the_workspace(store: Store) -> io.TextIOWrapper:
    """A workspace as a job holding it leaves it to others: an old cache file mid-migration,
    whose lock this process holds (a Store opened now would wait for it)."""
    store.legacy_db_path().write_bytes(b"held by a job")
    store.migration_marker().unlink(missing_ok=True)
    handle = open(store.migration_lock_path(), "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _take_the_workspace_away(workspace) -> None:
    store = workspace["store"]
    for folder in (store.runs_dir(), store.probe_sets_dir(), store.labels_dir(), store.thumbs_dir(), workspace["images"]):
        shutil.rmtree(folder)


def test_rating_needs_nothing_from_the_workspace(workspace):
    store = workspace["store"]
    study = _study(workspace, n_images=6)
    expected = {}
    with storage.reading(store) as tables:
        for item in tables.items(study.study_id):
            expected[item.item_id] = tables.pictures(study.study_id, item.item_id)
    _take_the_workspace_away(workspace)
    lock = _lock_the_workspace(store)
    try:
        where = CacheLayout(store.root)  # what the rating page opens: no Store
        public = st.study_by_token(where, study.token)
        rater = st.register_rater(where, public.study_id, "Ada")
        answered = 0
        while (task := st.next_item(where, public.study_id, rater.rater_id)) is not None:
            shown = st.task_pictures(where, task)
            assert shown.mosaic == expected[task.item_id]["mosaic"][0] and shown.n_images == 6
            assert Image.open(io.BytesIO(shown.mosaic)).size[0] > 100
            assert shown.close_ups is not None  # layer2 is spatial: close-ups of the first images
            st.submit_vote(where, public.study_id, rater.rater_id, task.item_id, "A")
            answered += 1
        assert answered == study.n_items == st.rater_progress(where, public.study_id, rater.rater_id)[0]
    finally:
        lock.close()


def test_the_top_images_a_rater_sees_are_distinct_pictures(workspace):
    store, run = workspace["store"], workspace["run"]
    top = store.top_images(run.run_key, 0, k=3)
    probe = store.probe_images(run.probe_set_id)
    # Plant a re-encoded, resized copy of the neuron's best image as its second-best image.
    best, second = probe[top[0]["image_idx"]], probe[top[1]["image_idx"]]
    with Image.open(best["path"]) as im:
        copy = im.convert("RGB").resize((im.width * 2, im.height * 2))
    copy.save(second["path"], "JPEG", quality=70)
    rows = pictures.distinct_top_images(store, run, 0, run.k)
    assert [r["image_idx"] for r in rows][:1] == [top[0]["image_idx"]]
    assert top[1]["image_idx"] not in [r["image_idx"] for r in rows]
    assert len({r["image_id"] for r in rows}) == len(rows) == len({r["path"] for r in rows})
    # Distinct images stay: the 32 shapes differ by position only, yet none is dropped as a copy.
    others = [r for r in store.top_images(run.run_key, 0, k=run.k) if r["image_idx"] != top[1]["image_idx"]]
    assert len(rows) == len(others)
    study = _study(workspace, neurons=[0], n_images=run.k)
    with storage.reading(store) as tables:
        (item,) = tables.items(study.study_id)
        ids = tables.pictures(study.study_id, item.item_id)["mosaic"][1]
    assert len(ids) == len(set(ids)) == len(rows)


def test_an_older_study_file_is_upgraded_in_place(workspace):
    store = workspace["store"]
    path = st.studies_path(store)
    con = sqlite3.connect(str(path))
    con.executescript("""
        CREATE TABLE studies (study_id TEXT PRIMARY KEY, name TEXT, public_title TEXT, token TEXT UNIQUE,
            methods_json TEXT, raters_per_item INTEGER, n_images INTEGER, seed INTEGER, is_open INTEGER,
            config_json TEXT, created_at REAL);
        CREATE TABLE study_items (study_id TEXT, item_id INTEGER, run_key TEXT, model_spec TEXT, layer TEXT,
            neuron INTEGER, is_gold INTEGER, labels_json TEXT, label_keys_json TEXT, options_json TEXT,
            PRIMARY KEY (study_id, item_id));
        CREATE TABLE raters (study_id TEXT, rater_id TEXT, name TEXT, created_at REAL, PRIMARY KEY (study_id, rater_id));
        CREATE TABLE assignments (study_id TEXT, rater_id TEXT, item_id INTEGER, order_json TEXT, assigned_at REAL,
            PRIMARY KEY (study_id, rater_id, item_id));
        CREATE TABLE votes (study_id TEXT, rater_id TEXT, item_id INTEGER, choice_letter TEXT, choice_key TEXT,
            submitted_at REAL, PRIMARY KEY (study_id, rater_id, item_id));
        CREATE TABLE ratings (study_id TEXT, rater_id TEXT, item_id INTEGER, letter TEXT, option_key TEXT,
            rating INTEGER, PRIMARY KEY (study_id, rater_id, item_id, letter));
        CREATE INDEX raters_by_name ON raters (study_id, name);
        INSERT INTO studies VALUES ('s-v1', 'version 1', 'Which?', 'tok-v1', '["alpha_method", "beta_method"]', 2, 6,
            0, 1, '{}', 1.0);
        INSERT INTO study_items VALUES ('s-v1', 0, 'run', 'model', 'layer2', 0, 0, '{}', '{}',
            '[{"key": "o0", "label": "x", "methods": ["alpha_method"]}, {"key": "o1", "label": "y", "methods": ["beta_method"]}]');
        INSERT INTO raters VALUES ('s-v1', 'r-old', 'Ada', 2.0);
        INSERT INTO assignments VALUES ('s-v1', 'r-old', 0, '["o1", "o0"]', 3.0);
        INSERT INTO votes VALUES ('s-v1', 'r-old', 0, 'B', 'o0', 4.0);
        PRAGMA user_version = 1;
    """)
    con.close()
    assert st.study_progress(store, "s-v1").n_votes == 1  # the old vote is kept
    again = st.register_rater(store, "s-v1", "Ada")  # the old rater had no secret: a name finds nobody
    assert again.rater_id != "r-old" and st.rater_by_secret(store, "s-v1", again.secret) == again
    assert st.task_pictures(store, st.next_item(store, "s-v1", again.rater_id)).mosaic is None  # made before pictures
    con = sqlite3.connect(str(path))
    assert con.execute("PRAGMA user_version").fetchone() == (storage.SCHEMA_VERSION,)
    assert "raters_by_name" not in {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    con.close()


def test_a_rater_waits_a_short_bounded_time(workspace):
    assert storage.wait_seconds(CacheLayout("/nowhere")) == storage.WRITE_WAIT_SECONDS <= 10
    assert storage.wait_seconds(Store(workspace["store"].root, lock_timeout=2.5)) == 2.5


# -- setup: default methods and gold items made by the owner ----------------------------------------
def test_default_methods_are_the_ones_that_labelled_neurons_together(workspace):
    store, run = workspace["store"], workspace["run"]
    # not alpha alone (it labelled ten times more), and not gamma (only 4 neurons in common)
    assert st.default_methods(store, [run.run_key]) == ["alpha_method", "beta_method"]
    assert st.default_methods(store, [run.run_key], enough=4) == list(METHODS)
    items = st.choose_items(store, [run.run_key], st.default_methods(store, [run.run_key]), per_layer=10)
    assert len(items) == 10


def test_the_owner_makes_gold_items_with_drawn_decoys(workspace):
    store, run = workspace["store"], workspace["run"]
    gold = st.make_gold_item(store, run.run_key, 5, "  bright   shapes ", n_options=3, n_images=6)
    assert gold.correct_label == "bright shapes" and len(gold.decoys) == 2
    probe = store.probe_images(run.probe_set_id)
    shown = {Path(probe[i]["path"]).parent.name for i in store.top_indices(run.run_key)[5, :6]}
    assert not set(gold.decoys) & shown  # no decoy describes an image the rater sees
    typed = st.make_gold_item(store, run.run_key, 6, "grey", decoys=["cat", "Grey", "cat", "dog"])
    assert typed.decoys == ("cat", "dog")
    with pytest.raises(st.StudyError, match="needs the right label"):
        st.make_gold_item(store, run.run_key, 6, "  ")
    with pytest.raises(st.StudyError, match="out of range"):
        st.make_gold_item(store, run.run_key, 10_000, "x")
    study = _study(workspace, gold_items=[gold, typed])
    assert study.n_gold == 2 and not study.notes


def test_a_study_without_buildable_gold_says_what_to_do_in_words(workspace):
    study = _study(workspace, gold_items=50)
    assert study.n_gold < 50
    (note,) = study.notes
    assert "Make your own gold items" in note and "GoldItem" not in note and "(" not in note.split(")")[-1]


def test_rating_page_works_without_the_workspace_and_a_personal_link_continues(workspace, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import APP_PATH, dashboard_env

    store = workspace["store"]
    study = _study(workspace, n_images=6)
    _take_the_workspace_away(workspace)
    lock = _lock_the_workspace(store)
    dashboard_env(monkeypatch, store.root)
    try:
        at = AppTest.from_file(str(APP_PATH), default_timeout=60)
        at.query_params["study"] = study.token
        at.query_params["rater"] = "r-someone-else"  # an old-style rater id in the URL is no identity
        at.run()
        assert not at.exception and not at.error
        assert "only the study's owner sees it" in at.text_input[0].label
        at.text_input[0].input("Ada")
        at.button[0].click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert len(at.get("image")) == 2  # the mosaic and the close-ups, from the study alone
        assert "rater" not in at.query_params
        link = next(c.value for c in at.code if "&key=" in c.value)
        secret = link.split("&key=")[1]
        while (radios := [r for r in at.radio if r.key and r.key.startswith("choice_")]):
            radios[0].set_value("A")
            at.button[0].click().run()
            assert not at.exception and not at.error, [e.value for e in at.error]
        assert any("All done" in t.value for t in at.title)
        # The personal link, opened elsewhere, is the same rater: done, not a new start form.
        again = AppTest.from_file(str(APP_PATH), default_timeout=60)
        again.query_params["study"] = study.token
        again.query_params["key"] = secret
        again.run()
        assert any("All done" in t.value for t in again.title) and not again.text_input
        assert any("You are rating as Ada (your personal link)" in i.value for i in again.info)
        assert "key" not in again.query_params  # taken out of the address bar
        # An altered link is refused in words and starts a new rater instead.
        wrong = AppTest.from_file(str(APP_PATH), default_timeout=60)
        wrong.query_params["study"] = study.token
        wrong.query_params["key"] = secret[::-1]
        wrong.run()
        assert any("not valid" in w.value for w in wrong.warning) and wrong.text_input
    finally:
        lock.close()
    raters = st.study_progress(store, study.study_id).raters
    assert [(r.name, r.done) for r in raters] == [("Ada", study.n_items)]


# -- the owner's pages --------------------------------------------------------------------------------
def test_study_setup_defaults_submit_and_results_show_no_none(workspace, monkeypatch):
    from tests.conftest import dashboard_env, open_page

    store = workspace["store"]
    dashboard_env(monkeypatch, store.root)
    at = open_page("views/study_setup.py", layer="layer2")
    assert not at.exception and not at.error, [e.value for e in at.error]
    methods = next(m for m in at.multiselect if m.label == "Methods to compare")
    assert methods.value == ["alpha_method", "beta_method"]  # the two that labelled neurons together
    at.text_area(key="study_own_gold").input("layer2:11 = bright shapes\n10 = grey | cat, dog")
    next(b for b in at.button if b.label == "Create study").click().run()  # every other field as it came
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not [w.value for w in at.warning if "gold" in w.value.lower()]
    (created,) = st.list_studies(store)
    assert created.methods == ("alpha_method", "beta_method") and created.n_items - created.n_gold == 10
    owner = st.study_items(store, created.study_id)
    gold = owner[owner["is_gold"]]
    assert {10, 11} <= set(gold["neuron"])  # the owner's, beside those built from the probe labels
    assert {o["label"] for o in gold[gold["neuron"] == 10].iloc[0]["options"]} == {"grey", "cat", "dog"}
    # The owner makes a personal link for someone: the link's secret is that rater.
    at.text_input(key=f"personal_name_{created.study_id}").input("Bea")
    next(b for b in at.button if b.label == "Make link").click().run()
    assert not at.exception and not at.error
    link = next(c.value for c in at.code if "&key=" in c.value)
    assert st.rater_by_secret(store, created.study_id, link.split("&key=")[1]).name == "Bea"
    # A vote without ratings, and a rater who met no gold item yet: no "None" anywhere.
    rater = st.register_rater(store, created.study_id, "Ada")
    regular = int(owner[~owner["is_gold"]].iloc[0]["item_id"])
    st.task_for(store, created.study_id, rater.rater_id, regular)
    st.submit_vote(store, created.study_id, rater.rater_id, regular, "A")
    at.switch_page("views/study_results.py").run()
    at.toggle(key="results_exclude").set_value(False).run()
    assert not at.exception and not at.error
    cells = [str(v) for frame in at.dataframe for v in frame.value.to_numpy().ravel()]
    assert cells and not [c for c in cells if c in ("None", "nan", "NaN", "<NA>")], cells


def test_a_rater_never_reads_server_internals(workspace, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import APP_PATH, dashboard_env

    store = workspace["store"]
    study = _study(workspace)
    dashboard_env(monkeypatch, store.root)
    at = AppTest.from_file(str(APP_PATH), default_timeout=60)
    at.query_params["study"] = study.token
    at.run()
    at.text_input[0].input("Ada")
    at.button[0].click().run()
    assert not at.error
    for suffix in ("-wal", "-shm", ""):  # the studies file is damaged under the running server
        Path(f"{st.studies_path(store)}{suffix}").unlink(missing_ok=True)
    st.studies_path(store).write_bytes(b"this is not a database" * 100)
    at.run()
    shown = " ".join(str(e.value) for e in [*at.error, *at.warning, *at.info, *at.markdown])
    assert at.error and "reload" in shown and "not valid" not in shown
    for internal in (str(store.root), "studies", "sqlite", "Jobs page", str(os.getpid()), "Traceback"):
        assert internal not in shown, internal
