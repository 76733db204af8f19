"""The study store: many processes voting at once lose nothing, every acknowledged write is
visible at once to any other process, a wiped file is noticed, and the studies of an older
version (studies.duckdb) are copied over once."""

from __future__ import annotations

import csv
import io
import json
import queue
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest

from neuroviz import study as st
from neuroviz.store import Store
from neuroviz.study import storage

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("alpha_method", "beta_method")


@pytest.fixture()
def workspace(tiny_workspace, tmp_path):
    """A private copy of the tiny workspace's runs (studies need runs to exist)."""
    root = tmp_path / "cache"
    shutil.copytree(tiny_workspace["store"].root, root, ignore=shutil.ignore_patterns("studies.*"))
    return {"store": Store(root), "runs": tiny_workspace["runs"]}


def _study(workspace, per_layer: int = 8, raters_per_item: int = 3):
    items = [st.StudyItem(workspace["runs"][layer].run_key, n, {"alpha_method": f"alpha {layer} {n}",
                                                                "beta_method": f"beta {layer} {n}"})
             for layer in ("layer2", "layer4") for n in range(per_layer)]
    return st.create_study(workspace["store"], "storage", items, METHODS, raters_per_item=raters_per_item, gold_items=0)


def _in_new_thread(fn):
    """Run ``fn`` in a new thread, which gets a connection of its own (a fresh reader)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


# -- many processes ------------------------------------------------------------------------------
N_PROCESSES = 20
N_ROUNDS = 3
RATER_PROCESS = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
from neuroviz import study as st
from neuroviz.store import Store

store, study_id = Store(sys.argv[1]), sys.argv[2]


def patiently(call):
    # A refusal must be StudiesBusyError (a clear 'try again'); report it and try again.
    while True:
        try:
            return call()
        except st.StudiesBusyError as exc:
            print(json.dumps({"refused": str(exc)}), flush=True)


try:
    rater = st.register_rater(store, study_id, sys.argv[3]).rater_id
    print(json.dumps({"ready": rater}), flush=True)
    sys.stdin.readline()  # all start together
    answered = set()
    while (task := patiently(lambda: st.next_item(store, study_id, rater))) is not None:
        if task.item_id in answered:
            raise AssertionError(f"item {task.item_id} was offered again after its vote was acknowledged")
        print(json.dumps({"rater": rater, "shown": task.item_id}), flush=True)
        started = time.perf_counter()
        receipt = patiently(lambda: st.submit_vote(store, study_id, rater, task.item_id, "B" if task.item_id % 2 else "A"))
        seconds = time.perf_counter() - started
        answered.add(task.item_id)
        print(json.dumps({"rater": rater, "voted": task.item_id, "letter": receipt.choice, "done": receipt.done,
                          "seconds": seconds}), flush=True)
except BaseException as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    raise SystemExit(1)
"""


def _fresh_row(path: Path, sql: str, params: tuple) -> tuple | None:
    """One row read through a brand-new connection (this process, not the writer's)."""
    con = sqlite3.connect(str(path))
    try:
        return con.execute(sql, params).fetchone()
    finally:
        con.close()


def _check_as_they_come(lines: queue.Queue, path: Path, study_id: str) -> dict:
    """Check every acknowledgement the raters print, as it arrives, with a fresh connection
    of this (another) process: exits, errors, refusals, items shown, votes and vote seconds."""
    seen: dict = {"exits": [], "errors": [], "refused": [], "shown": 0, "voted": {}, "seconds": []}
    while len(seen["exits"]) < N_PROCESSES:
        event = lines.get(timeout=300)
        if "exit" in event:
            seen["exits"].append(event["exit"])
        elif "error" in event:
            seen["errors"].append(event["error"])
        elif "refused" in event:
            seen["refused"].append(event["refused"])
        elif "shown" in event:  # next_item returned: its assignment must be there for everyone
            seen["shown"] += 1
            assert _fresh_row(path, "SELECT order_json FROM assignments WHERE study_id = ? AND rater_id = ? AND item_id = ?",
                              (study_id, event["rater"], event["shown"])) is not None, event
        else:  # submit_vote returned: the vote must be there for everyone
            key = (event["rater"], event["voted"])
            seen["voted"][key] = event["letter"]
            seen["seconds"].append(event["seconds"])
            row = _fresh_row(path, "SELECT choice_letter FROM votes WHERE study_id = ? AND rater_id = ? AND item_id = ?",
                             (study_id, *key))
            assert row == (event["letter"],), event
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(N_ROUNDS))
def test_many_processes_voting_at_once_lose_nothing_and_every_ack_is_visible_at_once(workspace, round_):
    """Issue 15.1/15.9: 20 separate processes vote on one study (three rounds, each a new
    study): every acknowledged assignment and vote is visible to the next read of another
    process, no item comes back after its vote, a vote is refused only with StudiesBusyError
    (a clear message) and nothing acknowledged is lost. Prints the vote times."""
    store = workspace["store"]
    study = _study(workspace, per_layer=5)
    workers = [subprocess.Popen([sys.executable, "-c", RATER_PROCESS, str(store.root), study.study_id, f"proc {i}", str(ROOT)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(N_PROCESSES)]
    lines: queue.Queue = queue.Queue()

    def pump(worker: subprocess.Popen) -> None:
        for line in worker.stdout:
            lines.put(json.loads(line))
        lines.put({"exit": worker.wait()})

    try:
        raters = [json.loads(w.stdout.readline())["ready"] for w in workers]
        for w in workers:
            threading.Thread(target=pump, args=(w,), daemon=True).start()
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        seen = _check_as_they_come(lines, st.studies_path(store), study.study_id)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert not seen["errors"], seen["errors"]
    assert seen["exits"] == [0] * N_PROCESSES
    assert all("try again" in r.lower() and str(store.root) not in r for r in seen["refused"]), seen["refused"]
    expected = N_PROCESSES * study.n_items
    assert seen["shown"] == len(seen["voted"]) == expected
    rows = list(csv.DictReader(io.StringIO(st.votes_csv(store, study.study_id))))
    assert len(rows) == expected
    assert {(r["rater_id"], int(r["item_id"])): r["choice_letter"] for r in rows} == seen["voted"]
    progress = st.study_progress(store, study.study_id)
    assert sorted(r.rater_id for r in progress.raters) == sorted(raters)
    assert all(r.done == study.n_items for r in progress.raters)
    assert progress.items_complete == study.n_items
    ms = np.asarray(seen["seconds"]) * 1000
    print(f"\nround {round_}: {N_PROCESSES} processes, {expected} votes, vote p50 {np.percentile(ms, 50):.1f} ms, "
          f"p95 {np.percentile(ms, 95):.1f} ms, max {ms.max():.1f} ms, {len(seen['refused'])} refused and retried")


# -- connections ----------------------------------------------------------------------------------
def test_a_wiped_study_file_is_noticed_by_open_connections(workspace):
    store = workspace["store"]
    study = _study(workspace, per_layer=1)
    assert [s.study_id for s in st.list_studies(store)] == [study.study_id]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{st.studies_path(store)}{suffix}").unlink(missing_ok=True)
    assert st.list_studies(store) == []  # the same thread's connection does not serve the deleted file
    again = _study(workspace, per_layer=1)
    assert [s.study_id for s in _in_new_thread(lambda: st.list_studies(store))] == [again.study_id]


def test_the_store_is_in_wal_mode_and_syncs_every_commit(workspace):
    store = workspace["store"]
    study = _study(workspace, per_layer=1)
    con = sqlite3.connect(str(st.studies_path(store)))
    try:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # stored in the file
        assert con.execute("SELECT count(*) FROM study_items WHERE study_id = ?", (study.study_id,)).fetchone() == (2,)
    finally:
        con.close()
    # synchronous is a setting of each connection: the library's own must sync the WAL on every commit.
    library_con = storage._connection(st.studies_path(store), store.lock_timeout)
    assert library_con.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


# -- migration from studies.duckdb ------------------------------------------------------------------
# The schema studies had in DuckDB (neuroviz/study.py at 0f23bae), as a workspace made then has it.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_id VARCHAR PRIMARY KEY, name VARCHAR, public_title VARCHAR, token VARCHAR UNIQUE,
    methods_json VARCHAR, raters_per_item INTEGER, n_images INTEGER, seed INTEGER,
    is_open BOOLEAN, config_json VARCHAR, created_at DOUBLE);
CREATE TABLE IF NOT EXISTS study_items (
    study_id VARCHAR, item_id INTEGER, run_key VARCHAR, model_spec VARCHAR, layer VARCHAR,
    neuron INTEGER, is_gold BOOLEAN, labels_json VARCHAR, label_keys_json VARCHAR,
    options_json VARCHAR, PRIMARY KEY (study_id, item_id));
CREATE TABLE IF NOT EXISTS raters (
    study_id VARCHAR, rater_id VARCHAR, name VARCHAR, created_at DOUBLE,
    PRIMARY KEY (study_id, rater_id));
CREATE TABLE IF NOT EXISTS assignments (
    study_id VARCHAR, rater_id VARCHAR, item_id INTEGER, order_json VARCHAR, assigned_at DOUBLE,
    PRIMARY KEY (study_id, rater_id, item_id));
CREATE TABLE IF NOT EXISTS votes (
    study_id VARCHAR, rater_id VARCHAR, item_id INTEGER, choice_letter VARCHAR, choice_key VARCHAR,
    submitted_at DOUBLE, PRIMARY KEY (study_id, rater_id, item_id));
CREATE TABLE IF NOT EXISTS ratings (
    study_id VARCHAR, rater_id VARCHAR, item_id INTEGER, letter VARCHAR, option_key VARCHAR,
    rating INTEGER, PRIMARY KEY (study_id, rater_id, item_id, letter));
"""


def _write_old_studies(root: Path, run_key: str) -> None:
    """A studies.duckdb as the old version left it: one open study with a regular item, a
    gold item and a third item, two raters, one vote with ratings, one answer still pending."""
    options = [{"key": "o0", "label": "red circle", "methods": ["alpha_method"]},
               {"key": "o1", "label": "blue sky", "methods": ["beta_method"]}]
    gold = [{"key": "gold", "label": "dog face", "methods": []}, {"key": "decoy0", "label": "wheel", "methods": []}]
    third = [{"key": "o0", "label": "grass", "methods": ["alpha_method"]},
             {"key": "o1", "label": "water", "methods": ["beta_method"]}]
    con = duckdb.connect(str(root / "studies.duckdb"))
    con.execute(OLD_SCHEMA)
    con.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ["s-old", "old study", "Which fits?", "old-token-0123456789abcdef", json.dumps(list(METHODS)), 2, 6, 0,
                 True, json.dumps({"skipped": [{"run_key": run_key, "neuron": 9, "missing_methods": ["beta_method"]}],
                                   "notes": ["an old note"]}), 1000.0])
    for item_id, neuron, is_gold, labels, opts in (
            (0, 1, False, {"alpha_method": "red circle", "beta_method": "blue sky"}, options),
            (1, 2, True, {}, gold),
            (2, 3, False, {"alpha_method": "grass", "beta_method": "water"}, third)):
        con.execute("INSERT INTO study_items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    ["s-old", item_id, run_key, "torchvision:resnet18@random", "layer2", neuron, is_gold, json.dumps(labels),
                     "{}", json.dumps(opts)])
    con.execute("INSERT INTO raters VALUES ('s-old', 'r-ada', 'Ada', 1001.0), ('s-old', 'r-bob', 'Bob', 1002.0)")
    con.execute("INSERT INTO assignments VALUES ('s-old', 'r-ada', 0, ?, 1010.0), ('s-old', 'r-bob', 1, ?, 1011.0)",
                [json.dumps(["o1", "o0"]), json.dumps(["gold", "decoy0"])])
    con.execute("INSERT INTO votes VALUES ('s-old', 'r-ada', 0, 'B', 'o0', 1020.0)")
    con.execute("INSERT INTO ratings VALUES ('s-old', 'r-ada', 0, 'A', 'o1', 2), ('s-old', 'r-ada', 0, 'B', 'o0', 5)")
    con.close()


def test_studies_of_an_older_version_are_copied_over_once(workspace):
    store = workspace["store"]
    run_key = workspace["runs"]["layer2"].run_key
    _write_old_studies(store.root, run_key)
    old_bytes = (store.root / "studies.duckdb").read_bytes()

    study = st.get_study(store, "s-old")
    assert (study.name, study.methods, study.raters_per_item, study.n_images, study.is_open) == \
        ("old study", METHODS, 2, 6, True)
    assert (study.n_items, study.n_gold, study.created_at) == (3, 1, 1000.0)
    assert study.skipped == (st.SkippedItem(run_key, 9, ("beta_method",)),) and study.notes == ("an old note",)
    assert st.study_by_token(store, "old-token-0123456789abcdef").study_id == "s-old"

    votes = list(csv.DictReader(io.StringIO(st.votes_csv(store, "s-old"))))
    assert len(votes) == 1
    vote = votes[0]
    assert (vote["rater_name"], vote["choice_letter"], vote["choice"], vote["chosen_label"]) == \
        ("Ada", "B", "alpha_method", "red circle")
    assert (vote["rating_alpha_method"], vote["rating_beta_method"], vote["shown_order"]) == \
        ("5", "2", "A=beta_method;B=alpha_method")
    assert vote["seconds_on_item"] == "10.0"
    results = st.study_results(store, "s-old")
    assert results.score("alpha_method").wins == 1 and results.score("alpha_method").mean_rating == 5

    # Its items get the pictures raters see, rendered once from the workspace (a second call has nothing to do).
    assert st.freeze_missing_pictures(store, "s-old") == 3 and st.freeze_missing_pictures(store, "s-old") == 0
    # The old letter orders still hold: Bob's pending gold item comes back with the same letters.
    task = st.next_item(store, "s-old", "r-bob")
    assert task.item_id == 1 and [o.label for o in task.options] == ["dog face", "wheel"]
    assert st.task_pictures(store, task).n_images == 6
    assert st.register_rater(store, "s-old", "Ada").rater_id != "r-ada"  # a name is not an identity
    receipt = st.submit_vote(store, "s-old", "r-bob", 1, "A")
    assert receipt.done == 1 and not receipt.replaced
    assert st.next_item(store, "s-old", "r-ada").item_id in (1, 2)

    # Copied once: the old file is left as it was, and what changed since is not overwritten.
    assert (store.root / "studies.duckdb").read_bytes() == old_bytes
    st.delete_study(store, "s-old")
    assert _in_new_thread(lambda: st.list_studies(store)) == []
    count = ("import sys; sys.path.insert(0, sys.argv[2]); from neuroviz import study as st; "
             "from neuroviz.store import Store; print(len(st.list_studies(Store(sys.argv[1]))))")
    fresh = subprocess.run([sys.executable, "-c", count, str(store.root), str(ROOT)], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "0"


def test_an_unreadable_old_file_is_a_clear_error_and_an_empty_one_is_skipped(workspace):
    store = workspace["store"]
    (store.root / "studies.duckdb").write_bytes(b"")
    assert st.list_studies(store) == []  # nothing to copy
    for suffix in ("", "-wal", "-shm"):
        Path(f"{st.studies_path(store)}{suffix}").unlink(missing_ok=True)
    (store.root / "studies.duckdb").write_bytes(b"not a database" * 100)
    with pytest.raises(storage.StudiesMigrationError, match="move studies.duckdb out of the workspace") as caught:
        st.list_studies(store)
    assert str(store.root) not in str(caught.value)
    (store.root / "studies.duckdb").unlink()
    assert st.list_studies(store) == []  # nothing was half-copied: the next open starts clean
