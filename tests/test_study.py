"""Blind user studies: blinding, stored letter orders, idempotent and concurrent votes,
statistics against published values, gold items, and the CLI, on a real tiny workspace."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from neuroviz import study as st
from neuroviz.store import LabelRow, Store
from neuroviz.study import storage

METHODS = ("alpha_method", "beta_method", "gamma_method")
VOCABULARY = ("striped texture", "red circle", "dog face", "blue sky", "wheel", "grass", "text", "water",
              "yellow square", "fur", "metal", "window", "tree bark", "coins", "rocket", "horse legs")
LABELLED_NEURONS = range(10)
SHARED_NEURON = 3  # alpha and beta give this neuron the same label text


def _label_text(method_index: int, neuron: int) -> str:
    if neuron == SHARED_NEURON and method_index == 1:
        method_index = 0
    return VOCABULARY[(neuron * 3 + method_index * 5) % len(VOCABULARY)]


@pytest.fixture(scope="module")
def workspace(tiny_workspace, tmp_path_factory):
    """A private copy of the tiny workspace (so our labels do not leak into other tests), with
    fake methods' labels on layer2 and layer4: gamma_method skips neurons 8 and 9."""
    root = tmp_path_factory.mktemp("study_cache")
    shutil.copytree(tiny_workspace["store"].root, root, dirs_exist_ok=True)
    store = Store(root)
    runs = {name: tiny_workspace["runs"][name] for name in ("layer2", "layer4")}
    # other tests share the session workspace and may have added labels or runs (another
    # pooling, DnD labels) before this copy was taken: keep exactly the two runs used here
    keep = [r.run_key for r in runs.values()]
    shutil.rmtree(store.labels_dir(), ignore_errors=True)
    for other in store.find_runs():
        if other.run_key not in keep:
            shutil.rmtree(store.run_dir(other.run_key))
    for run in runs.values():
        for i, method in enumerate(METHODS):
            neurons = [n for n in LABELLED_NEURONS if not (method == "gamma_method" and n >= 8)]
            rows = [LabelRow(n, 0, _label_text(i, n), 1.0) for n in neurons]
            rows += [LabelRow(n, 1, "runner-up " + _label_text(i, n + 1), 0.5) for n in neurons]
            store.save_labels(f"{method}-{run.run_key}", run.run_key, method, {}, {}, None, rows, "test")
    return {"store": store, "runs": runs, "run_keys": [r.run_key for r in runs.values()]}


def _new_study(workspace, name="blind test", raters_per_item=3, gold_items=2, per_layer=10, seed=0):
    items = st.choose_items(workspace["store"], workspace["run_keys"], METHODS, per_layer=per_layer, seed=seed)
    return st.create_study(workspace["store"], name, items, METHODS, raters_per_item=raters_per_item,
                           gold_items=gold_items, seed=seed)


def _owner_items(store, study_id):
    return {row.item_id: row for row in st.study_items(store, study_id).itertuples()}


def _shown_ids(store, study_id, item_id):
    """The probe image ids frozen into an item's mosaic (what the rater sees)."""
    with storage.reading(store) as tables:
        return tables.pictures(study_id, item_id)["mosaic"][1]


def _letter_for(task, label):
    return next(o.letter for o in task.options if o.label == label)


def _answer_all(store, study_id, rater_id, pick):
    """Drive one rater through the whole study; pick(task, owner_item) -> (choice, ratings)."""
    owner = _owner_items(store, study_id)
    while (task := st.next_item(store, study_id, rater_id)) is not None:
        choice, ratings = pick(task, owner[task.item_id])
        st.submit_vote(store, study_id, rater_id, task.item_id, choice, ratings)


# -- creation -------------------------------------------------------------------------------
def test_create_captures_labels_skips_incomplete_and_builds_gold(workspace):
    store = workspace["store"]
    layer2 = workspace["runs"]["layer2"].run_key
    explicit = [(layer2, n) for n in (0, 1, 8, 9)]
    study = st.create_study(store, "explicit items", explicit, METHODS, gold_items=2)
    assert study.n_items - study.n_gold == 2
    assert {(s.neuron, s.missing_methods) for s in study.skipped} == {(8, ("gamma_method",)), (9, ("gamma_method",))}
    assert study.n_gold == 2, study.notes  # photos dominate some top-10s of the random ResNet
    assert len(study.token) >= 20 and study.rater_link == f"?study={study.token}"

    owner = st.study_items(store, study.study_id)
    regular = owner[~owner["is_gold"]]
    assert sorted(regular["neuron"]) == [0, 1]
    row = regular[regular["neuron"] == 0].iloc[0]
    assert row["labels"] == {m: _label_text(i, 0) for i, m in enumerate(METHODS)}
    gold = owner[owner["is_gold"]].iloc[0]
    assert len(gold["options"]) == len(METHODS)  # gold pages look like the others

    # Relabelling later does not change what the study shows.
    store.save_labels(f"alpha_method-{layer2}-v2", layer2, "alpha_method", {}, {"v": 2}, None,
                      [LabelRow(0, 0, "a completely new label", 1.0)], "test")
    rater = st.register_rater(store, study.study_id, "Ada")
    owner_items = _owner_items(store, study.study_id)
    seen = set()
    probe = {im["image_id"]: im["path"] for im in store.probe_images(workspace["runs"]["layer2"].probe_set_id)}
    while (task := st.next_item(store, study.study_id, rater.rater_id)) is not None:
        seen |= {o.label for o in task.options}
        pictures = st.task_pictures(store, task)
        assert pictures.mosaic[:2] == b"\xff\xd8" and pictures.n_images == study.n_images  # a JPEG of 10 images
        paths = [probe[i] for i in _shown_ids(store, study.study_id, task.item_id)]
        assert len(set(paths)) == len(paths) == study.n_images
        item = owner_items[task.item_id]
        if item.is_gold:  # the right answer is what most of the shown images are
            right = next(o["label"] for o in item.options if o["key"] == "gold")
            assert sum(Path(p).parent.name == right for p in paths) >= 0.7 * len(paths)
            decoys = {o["label"] for o in item.options if o["key"] != "gold"}
            assert not decoys & {Path(p).parent.name for p in paths}
        st.submit_vote(store, study.study_id, rater.rater_id, task.item_id, st.NONE_FITS)
    assert "a completely new label" not in seen and _label_text(0, 0) in seen
    # ...but a new study picks the newest label run up.
    fresh = st.create_study(store, "after relabel", [(layer2, 0)], METHODS, gold_items=0)
    assert st.study_items(store, fresh.study_id).iloc[0]["labels"]["alpha_method"] == "a completely new label"
    shutil.rmtree(store.label_dir(f"alpha_method-{layer2}-v2"))


def test_create_rejects_bad_requests_clearly(workspace):
    store, run_keys = workspace["store"], workspace["run_keys"]
    with pytest.raises(st.StudyError, match="at least two methods"):
        st.create_study(store, "x", [(run_keys[0], 0)], ["alpha_method"])
    with pytest.raises(st.StudyError, match="Unknown run"):
        st.create_study(store, "x", [("no-such-run", 0)], METHODS)
    with pytest.raises(st.StudyError, match="label from every method"):
        st.create_study(store, "x", [(run_keys[0], 9)], METHODS, gold_items=0)
    with pytest.raises(st.StudyError, match="No study 'nope'"):
        st.get_study(store, "nope")
    assert st.study_by_token(store, "not-a-token") is None


def test_choose_items_is_seeded_per_layer(workspace):
    store, run_keys = workspace["store"], workspace["run_keys"]
    a = st.choose_items(store, run_keys, METHODS, per_layer=3, seed=1)
    b = st.choose_items(store, run_keys, METHODS, per_layer=3, seed=1)
    assert a == b and len(a) == 6
    assert all(item.neuron < 8 for item in a)  # only neurons every method labelled
    only_first = st.choose_items(store, run_keys[:1], METHODS, per_layer=3, seed=1)
    assert only_first == a[:3]
    assert st.labelled_methods(store, run_keys) == {m: 2 * (8 if m == "gamma_method" else 10) for m in METHODS}


# -- blinding -------------------------------------------------------------------------------
def test_rating_tasks_never_name_methods(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="alpha_method vs beta_method", per_layer=4)  # the owner's name must not leak either
    public = st.study_by_token(store, study.token)
    text = repr(public) + json.dumps(dataclasses.asdict(public))
    rater = st.register_rater(store, public.study_id, None)
    n_tasks = 0
    while (task := st.next_item(store, public.study_id, rater.rater_id)) is not None:
        text += repr(task) + json.dumps(dataclasses.asdict(task))
        st.submit_vote(store, public.study_id, rater.rater_id, task.item_id, "A")
        n_tasks += 1
    assert n_tasks == study.n_items
    for secret in (*METHODS, "alpha", "beta", "gamma", "gold", "decoy", study.name):
        assert secret not in text, secret


def test_shared_label_text_is_one_option(workspace):
    store = workspace["store"]
    layer2 = workspace["runs"]["layer2"].run_key
    study = st.create_study(store, "shared", [(layer2, SHARED_NEURON), (layer2, 0)], METHODS, gold_items=0)
    rater = st.register_rater(store, study.study_id, "Sam")
    task = st.task_for(store, study.study_id, rater.rater_id, next(
        r.item_id for r in _owner_items(store, study.study_id).values() if r.neuron == SHARED_NEURON))
    assert len(task.options) == 2
    st.submit_vote(store, study.study_id, rater.rater_id, task.item_id, _letter_for(task, _label_text(0, SHARED_NEURON)),
                   {_letter_for(task, _label_text(0, SHARED_NEURON)): 4})
    results = st.study_results(store, study.study_id)
    assert results.score("alpha_method").wins == pytest.approx(0.5)
    assert results.score("beta_method").wins == pytest.approx(0.5)
    assert results.score("alpha_method").mean_rating == results.score("beta_method").mean_rating == 4


def test_letter_order_is_stored_and_differs_between_raters(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="orders", per_layer=3)
    raters = [st.register_rater(store, study.study_id, f"rater {i}").rater_id for i in range(3)]
    first = st.next_item(store, study.study_id, raters[0])
    again = st.next_item(store, study.study_id, raters[0])  # a reload before answering
    assert again.item_id == first.item_id and again.options == first.options
    orders: dict[int, set] = {}
    for rater_id in raters:
        for item_id in range(study.n_items):
            task = st.task_for(store, study.study_id, rater_id, item_id)
            orders.setdefault(item_id, set()).add(tuple(o.label for o in task.options))
    assert any(len(v) > 1 for v in orders.values())
    for rater_id in raters[:2]:  # stored: asking again, later, gives the same letters
        for item_id in range(study.n_items):
            again = st.task_for(store, study.study_id, rater_id, item_id)
            assert tuple(o.label for o in again.options) in orders[item_id]
    assert st.task_for(store, study.study_id, raters[0], first.item_id).options == first.options
    # A name is not an identity: the same name again is a new rater; the secret finds the old one.
    second = st.register_rater(store, study.study_id, "rater 0")
    assert second.rater_id not in raters and second.secret
    assert st.rater_by_secret(store, study.study_id, second.secret).rater_id == second.rater_id


def test_votes_are_idempotent_and_validated(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="idempotent", gold_items=0)
    rater = st.register_rater(store, study.study_id, "Kim").rater_id
    # An item with three distinct labels (A, B, C): rater ids are random, so next_item could
    # start on the shared-label neuron, which has only A and B.
    three = next(i for i, row in _owner_items(store, study.study_id).items() if row.neuron != SHARED_NEURON)
    task = st.task_for(store, study.study_id, rater, three)
    assert len(task.options) == 3
    receipt = st.submit_vote(store, study.study_id, rater, task.item_id, "A", {"A": 2, "B": 3})
    assert not receipt.replaced and (receipt.done, receipt.total) == (1, study.n_items)
    receipt = st.submit_vote(store, study.study_id, rater, task.item_id, "b", {"C": 5})
    assert receipt.replaced and receipt.done == 1 and receipt.choice == "B"
    rows = list(csv.DictReader(io.StringIO(st.votes_csv(store, study.study_id))))
    assert len(rows) == 1 and rows[0]["choice_letter"] == "B"
    chosen = next(o.label for o in task.options if o.letter == "B")
    assert rows[0]["chosen_label"] == chosen
    method = rows[0]["choice"]
    assert rows[0][f"label_{method}"] == chosen
    rated = [m for m in METHODS if rows[0][f"rating_{m}"]]
    assert len(rated) == 1 and rows[0][f"rating_{rated[0]}"] == "5"  # old ratings replaced, not merged
    again = st.task_for(store, study.study_id, rater, task.item_id)
    assert again.previous_choice == "B" and again.previous_ratings == {"C": 5}
    assert st.next_item(store, study.study_id, rater).item_id != task.item_id

    with pytest.raises(st.StudyError, match="not one of"):
        st.submit_vote(store, study.study_id, rater, task.item_id, "Z")
    with pytest.raises(st.StudyError, match="1 to 5"):
        st.submit_vote(store, study.study_id, rater, task.item_id, "A", {"A": 6})
    with pytest.raises(st.StudyError, match="never shown"):
        unseen = next(i for i in range(study.n_items) if i not in (task.item_id, st.next_item(store, study.study_id, rater).item_id))
        st.submit_vote(store, study.study_id, rater, unseen, "A")
    with pytest.raises(st.StudyError, match="not registered"):
        st.next_item(store, study.study_id, "r-intruder")
    st.set_study_open(store, study.study_id, False)
    assert st.next_item(store, study.study_id, rater) is None
    assert not st.study_by_token(store, study.token).is_open
    with pytest.raises(st.StudyError, match="closed"):
        st.submit_vote(store, study.study_id, rater, task.item_id, "A")


def test_items_with_enough_raters_go_last(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="fill", raters_per_item=1, gold_items=0, per_layer=2)
    raters = [st.register_rater(store, study.study_id, f"p{i}").rater_id for i in range(study.n_items)]
    first_items = [st.next_item(store, study.study_id, r).item_id for r in raters]
    # Concurrent raters are spread: each open claim counts, so everyone starts on a different item.
    assert sorted(first_items) == list(range(study.n_items))


# -- concurrency ------------------------------------------------------------------------------
def test_twenty_concurrent_raters_lose_no_vote(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="concurrent", gold_items=0)
    raters = [st.register_rater(store, study.study_id, f"thread {i}").rater_id for i in range(20)]
    tasks = {r: st.next_item(store, study.study_id, r) for r in raters}
    barrier = threading.Barrier(len(raters))
    errors: list[BaseException] = []

    def vote(rater_id: str) -> None:
        try:
            barrier.wait()
            task = tasks[rater_id]
            st.submit_vote(store, study.study_id, rater_id, task.item_id, "A", {"A": 3})
            st.submit_vote(store, study.study_id, rater_id, task.item_id, "B", {"B": 4})  # a double click
        except BaseException as exc:  # collected: an exception in a thread would vanish
            errors.append(exc)

    threads = [threading.Thread(target=vote, args=(r,)) for r in raters]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    print(f"\n20 raters x 2 submits of the same item, concurrently: {elapsed:.2f} s")
    assert not errors, errors
    rows = list(csv.DictReader(io.StringIO(st.votes_csv(store, study.study_id))))
    assert len(rows) == 20
    assert Counter(r["choice_letter"] for r in rows) == {"B": 20}
    assert sorted(r["rater_id"] for r in rows) == sorted(raters)
    for r in rows:  # only B's rating survives, on the method(s) behind B
        assert {m for m in METHODS if r[f"rating_{m}"]} == set(r["choice"].split("+"))
    assert st.study_progress(store, study.study_id).n_votes == 20


HOLD_WRITE_LOCK = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")  # the study store's one write lock, as a long writer holds it
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
released = time.time()
con.execute("COMMIT")
print(released, flush=True)
"""


def test_vote_waits_for_another_process_holding_the_database(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="cross process", gold_items=0, per_layer=1)
    rater = st.register_rater(store, study.study_id, "Lee").rater_id
    task = st.next_item(store, study.study_id, rater)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(st.studies_path(store)), "1.0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        st.submit_vote(store, study.study_id, rater, task.item_id, "A")
        voted_at = time.time()
        released_at = float(holder.stdout.readline())
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0
    assert voted_at >= released_at  # it waited for the other process instead of failing
    assert st.study_progress(store, study.study_id).n_votes == 1


def test_a_wait_past_the_timeout_is_a_clear_error_and_loses_nothing(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="busy", gold_items=0, per_layer=1)
    rater = st.register_rater(store, study.study_id, "Max").rater_id
    task = st.next_item(store, study.study_id, rater)
    impatient = Store(store.root, lock_timeout=0.2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(st.studies_path(store)), "3.0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(st.StudiesBusyError) as caught:
            st.submit_vote(impatient, study.study_id, rater, task.item_id, "A")
        assert st.study_progress(impatient, study.study_id).n_votes == 0  # readers are never blocked
    finally:
        holder.wait(timeout=30)
    message = str(caught.value)
    assert "try again" in message and str(store.root) not in message and str(holder.pid) not in message
    assert "studies.sqlite" not in message and "locked" not in message.lower()
    st.submit_vote(impatient, study.study_id, rater, task.item_id, "A")  # once the writer is gone
    assert st.study_progress(store, study.study_id).n_votes == 1


# -- statistics -------------------------------------------------------------------------------
def test_fleiss_kappa_matches_the_published_example():
    # Fleiss' kappa article on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert st.fleiss_kappa(table) == pytest.approx(0.20993, abs=5e-5)
    assert st.fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert st.fleiss_kappa([[3, 0], [3, 0]]) != st.fleiss_kappa([[3, 0], [3, 0]])  # NaN: undefined
    # Rows with one rater carry no agreement information and are ignored.
    assert st.fleiss_kappa(table + [[1, 0, 0, 0, 0]]) == pytest.approx(st.fleiss_kappa(table))


def test_wilson_interval_matches_newcombe_1998():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    for (x, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        got = st.wilson_interval(x, n)
        assert got == pytest.approx((low, high), abs=1e-4)
    assert st.wilson_interval(0, 0) == (0.0, 1.0)
    mean, low, high = st.mean_interval([1, 2, 3, 4, 5])
    assert mean == 3 and low == pytest.approx(3 - 2.7764 * 1.5811 / 5 ** 0.5, abs=1e-3) and high == pytest.approx(6 - low)


def test_results_win_rates_kappa_layers_and_gold_exclusion(workspace):
    store = workspace["store"]
    study = _new_study(workspace, name="results", raters_per_item=3, gold_items=2, per_layer=3)
    assert study.n_gold == 2
    good, careless = ("alpha_method", "beta_method"), "gamma_method"

    def attentive(preferred):
        def pick(task, owner):
            if owner.is_gold:
                gold = next(o["label"] for o in owner.options if o["key"] == "gold")
                return _letter_for(task, gold), None
            if owner.neuron == 5:
                return st.UNINTERPRETABLE, None
            if owner.layer == "layer4" and owner.neuron == 6:
                return st.NONE_FITS, None
            label = owner.labels[preferred]
            return _letter_for(task, label), {_letter_for(task, label): 5, _letter_for(task, owner.labels[careless]): 1}
        return pick

    def inattentive(task, owner):
        if owner.is_gold:
            decoy = next(o["label"] for o in owner.options if o["key"] != "gold")
            return _letter_for(task, decoy), None
        return _letter_for(task, owner.labels[careless]), {_letter_for(task, owner.labels[careless]): 5}

    raters = {}
    for name, pick in (("ann", attentive(good[0])), ("bob", attentive(good[0])), ("cat", attentive(good[1])),
                       ("dan", inattentive)):
        raters[name] = st.register_rater(store, study.study_id, name).rater_id
        _answer_all(store, study.study_id, raters[name], pick)

    results = st.study_results(store, study.study_id)
    assert results.excluded_raters == (raters["dan"],)
    summary = {r.name: r for r in results.raters}
    assert summary["ann"].gold_accuracy == 1.0 and summary["dan"].gold_accuracy == 0.0
    n_regular = study.n_items - study.n_gold
    assert results.n_votes == 3 * n_regular and results.n_items_rated == n_regular
    assert sum(s.win_rate for s in results.scores) == pytest.approx(1.0)
    assert sum(s.wins for s in results.scores) == pytest.approx(results.n_votes)
    for s in results.scores:
        assert s.win_low <= s.win_rate <= s.win_high
        assert (s.win_low, s.win_high) == pytest.approx(st.wilson_interval(s.wins, s.votes))
    assert results.score(careless).mean_rating == 1 and results.score(good[0]).mean_rating == 5
    owner = _owner_items(store, study.study_id)
    regular_items = [item for item in owner.values() if not item.is_gold]
    assert results.score(st.UNINTERPRETABLE).wins == 3 * sum(1 for item in regular_items if item.neuron == 5)
    assert results.score(good[0]).win_rate > results.score(good[1]).win_rate > 0
    assert results.score(careless).wins == 0  # only the excluded rater chose it

    # Kappa by hand from what the three kept raters were scripted to answer; methods that gave
    # the same text share one option, which is its own category.
    table = []
    categories = [*METHODS, *st.SPECIAL_CHOICES]
    for item in regular_items:
        row = Counter()
        for preferred in (good[0], good[0], good[1]):
            if item.neuron == 5:
                row[st.UNINTERPRETABLE] += 1
            elif item.layer == "layer4" and item.neuron == 6:
                row[st.NONE_FITS] += 1
            else:
                category = "+".join(m for m in METHODS if item.labels[m] == item.labels[preferred])
                categories += [category] if category not in categories else []
                row[category] += 1
        table.append(row)
    table = [[row[c] for c in categories] for row in table]
    assert results.kappa == pytest.approx(st.fleiss_kappa(table))
    assert results.kappa_items == n_regular

    assert {l.layer for l in results.by_layer} == {"layer2", "layer4"}
    assert sum(l.n_votes for l in results.by_layer) == results.n_votes
    for layer in results.by_layer:
        assert sum(s.win_rate for s in layer.scores) == pytest.approx(1.0)

    kept = st.study_results(store, study.study_id, exclude_failed_gold=False)
    assert kept.excluded_raters == () and kept.score(careless).wins == n_regular

    table_csv = list(csv.DictReader(io.StringIO(st.results_csv(results))))
    assert [r["method"] for r in table_csv if r["scope"] == "all"] == [*METHODS, *st.SPECIAL_CHOICES]
    assert len(table_csv) == 5 * (1 + len(results.by_layer))
    votes = list(csv.DictReader(io.StringIO(st.votes_csv(store, study.study_id))))
    assert len(votes) == 4 * study.n_items
    assert {r["gold_correct"] for r in votes if r["rater_name"] == "dan" and r["is_gold"] == "True"} == {"False"}
    progress = st.study_progress(store, study.study_id)
    assert progress.items_complete == n_regular and {r.name: r.done for r in progress.raters}["ann"] == study.n_items


def test_explicit_gold_items_and_delete(workspace):
    store = workspace["store"]
    layer4 = workspace["runs"]["layer4"].run_key
    gold = st.GoldItem(layer4, 100, "clearly right", ("decoy one", "decoy two"))
    study = st.create_study(store, "explicit gold", [(layer4, 0), (layer4, 1)], METHODS, gold_items=[gold])
    assert study.n_gold == 1
    rater = st.register_rater(store, study.study_id, "Joe").rater_id
    labels = []
    while (task := st.next_item(store, study.study_id, rater)) is not None:
        labels.append([o.label for o in task.options])
        st.submit_vote(store, study.study_id, rater, task.item_id, "A")
    assert sorted(["clearly right", "decoy one", "decoy two"]) in [sorted(l) for l in labels]
    assert st.study_progress(store, study.study_id).raters[0].gold_answered == 1
    st.delete_study(store, study.study_id)
    assert study.study_id not in {s.study_id for s in st.list_studies(store)}
    assert st.study_by_token(store, study.token) is None


# -- command line -------------------------------------------------------------------------------
def test_cli_create_list_results_export(workspace, capsys, tmp_path):
    from neuroviz import cli

    root = str(workspace["store"].root)
    code = cli.main(["--cache", root, "study", "create", "cli study", "--model", "torchvision:resnet18@random",
                     "--layers", "layer2,layer4", "--methods", ",".join(METHODS), "--per-layer", "3", "--gold", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "?study=" in out and "6 items + 1 gold" in out
    study_id = out.split()[1].rstrip(":")
    study = st.get_study(workspace["store"], study_id)
    assert f"?study={study.token}" in out
    # The owner hands out a personal link: its secret is the rater.
    assert cli.main(["--cache", root, "study", "add-rater", study_id, "cli rater"]) == 0
    out = capsys.readouterr().out
    secret = out.split(f"?study={study.token}&key=")[1].split()[0]
    rater = st.rater_by_secret(workspace["store"], study_id, secret)
    assert rater.name == "cli rater" and rater.rater_id in out
    rater = rater.rater_id
    _answer_all(workspace["store"], study_id, rater, lambda task, owner: ("A", {"A": 4}))

    assert cli.main(["--cache", root, "study", "list"]) == 0
    assert study_id in capsys.readouterr().out
    assert cli.main(["--cache", root, "study", "results", study_id]) == 0
    out = capsys.readouterr().out
    assert "alpha_method" in out and "Fleiss" in out
    votes_file, results_file = tmp_path / "votes.csv", tmp_path / "results.csv"
    assert cli.main(["--cache", root, "study", "export", study_id, "--votes", str(votes_file), "--results", str(results_file)]) == 0
    assert len(list(csv.DictReader(votes_file.open()))) == study.n_items
    assert "win_rate" in results_file.read_text()
    assert cli.main(["--cache", root, "study", "results", "no-such-study"]) == 2
    assert "No study 'no-such-study'" in capsys.readouterr().err


def test_cli_finds_runs_through_the_catalogue(workspace, tmp_path, capsys):
    from neuroviz import cli

    root = tmp_path / "cache"
    shutil.copytree(workspace["store"].root, root)
    store = Store(root)
    layer2 = workspace["runs"]["layer2"]
    model = "torchvision:resnet18@random"
    base = ["--cache", str(root), "study", "create", "catalogue", "--model", model, "--methods", ",".join(METHODS),
            "--per-layer", "2", "--gold", "0"]
    assert cli.main(base + ["--layers", "layer2,layer9"]) == 2
    err = capsys.readouterr().err
    assert "layer9" in err and "layer2" in err and "python -m neuroviz extract" in err

    # The same layer extracted over a second probe set: the command asks which one.
    other = dataclasses.replace(layer2, run_key="other-run", probe_set_id="other-probes", created_at=layer2.created_at + 1)
    shutil.copytree(store.run_dir(layer2.run_key), store.run_dir(other.run_key))
    run_json = store.run_dir(other.run_key) / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "run_key": other.run_key,
                                    "probe_set_id": other.probe_set_id, "created_at": other.created_at}))
    assert {r.probe_set_id for r in store.find_runs(layer="layer2")} == {layer2.probe_set_id, "other-probes"}
    assert cli.main(base + ["--layers", "layer2"]) == 2
    assert "several probe sets" in capsys.readouterr().err
    assert cli.main(base + ["--layers", "layer2", "--probe", layer2.probe_set_id]) == 0
    study_id = capsys.readouterr().out.split()[1].rstrip(":")
    assert set(st.study_items(store, study_id)["run_key"]) == {layer2.run_key}
