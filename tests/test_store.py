"""The store: results as immutable files read in place, nothing half-visible after kill -9,
concurrent label writers lose nothing, the one-time migration of the DuckDB cache reads back
identically, and the shared cache computes nothing twice."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import legacy_store
import numpy as np
import pandas as pd
import pytest

from neuroviz.datasets import ProbeImage, ProbeSet
from neuroviz.store import MAX_PARTS, LabelRow, RunInfo, SharedCache, Store

REPO = Path(__file__).resolve().parent.parent


def fake_probe_set(n: int = 30, name: str = "fake") -> ProbeSet:
    return ProbeSet(name, f"list:{name}", [ProbeImage(f"{i:020x}", f"/images/{name}/{i}.png", f"class {i % 3}")
                                           for i in range(n)])


def fake_run(ps: ProbeSet, layer: str, n_neurons: int = 6, k: int = 4, maps: bool = True, seed: int = 0):
    """A run's RunInfo and arrays as an extraction would hand them to finish_run."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(len(ps), n_neurons)).astype(np.float32)
    top_idx = np.argsort(-acts, axis=0)[:k].T.copy()
    top_val = np.take_along_axis(acts.T, top_idx, axis=1)
    map_arr = rng.random((n_neurons, k, 3, 3)).astype(np.float32) if maps else None
    info = RunInfo(f"run-{layer}-{seed}", "toy:model", "w0", layer, "mean", ps.id, "pre0", k, "1", len(ps), n_neurons,
                   (3, 3) if maps else None, "conv" if maps else "linear")
    return info, (acts, top_val, top_idx, [im.image_id for im in ps.images], map_arr)


def fill(store, ps: ProbeSet) -> list[RunInfo]:
    """Probe set, two runs, full and per-neuron label saves, records: through the public API."""
    store.register_probe_set(ps)
    runs = []
    for layer, maps, seed in (("conv", True, 1), ("fc", False, 2)):
        info, arrays = fake_run(ps, layer, maps=maps, seed=seed)
        own = sys.modules[type(store).__module__].RunInfo  # a store from before units takes its own RunInfo
        info = own(**{f.name: getattr(info, f.name) for f in dataclasses.fields(own)})
        store.finish_run(info, *arrays)
        runs.append(info)
    conv, fc = runs
    store.save_labels("clip-key", conv.run_key, "clip_dissect", {"multimodal": "conse"}, {"k": 5}, "concepts-1",
                      [LabelRow(n, r, f"label {n}-{r}", 1.0 - r / 10, 0.5 if r == 0 else None, {"n": n} if r == 0 else None)
                       for n in range(conv.n_neurons) for r in range(2)], "conse backend")
    store.save_labels("odd/key with spaces", conv.run_key, "dnd", {}, {}, None,
                      [LabelRow(1, 0, "first answer", 0.3)], "llm", replace_neurons=True)
    store.save_labels("odd/key with spaces", conv.run_key, "dnd", {}, {}, None,
                      [LabelRow(1, 0, "second answer", 0.4), LabelRow(4, 0, "another neuron", 0.2)], "llm", replace_neurons=True)
    store.save_labels("fc-key", fc.run_key, "milan", {}, {"lambda": 0.5}, None, [LabelRow(0, 0, "fc label", 2.0)], "none")
    store.put_record("edit", "my edit / v2", {"neurons": [1, 2]})
    store.put_record("preprocessing", "pre0", {"image_size": 64, "resize_size": 73})
    return runs


def public_reads(store) -> dict:
    """Every public read of a store, in comparable form."""
    out: dict = {"probe_sets": store.probe_sets(), "runs": store.find_runs()}
    for ps in out["probe_sets"]:
        out[f"images {ps['probe_set_id']}"] = store.probe_images(ps["probe_set_id"])
    for run in out["runs"]:
        key = run.run_key
        assert store.get_run(key) == run
        out[f"top {key}"] = [store.top_images(key, n, k=run.k) for n in range(run.n_neurons)]
        out[f"top3 {key}"] = store.top_images(key, 0, k=3)
        out[f"indices {key}"] = store.top_indices(key)
        out[f"stats {key}"] = store.neuron_stats(key)
        out[f"hist {key}"] = [store.histogram(key, n) for n in range(run.n_neurons)]
        out[f"acts {key}"] = np.asarray(store.activations(key))
        out[f"maps {key}"] = [store.top_maps(key, n) for n in range(run.n_neurons)]
        out[f"labels {key}"] = store.labels(key)
        out[f"top labels {key}"] = store.labels(key, top_only=True)
        out[f"labels n1 {key}"] = store.labels(key, neuron=1)
        out[f"labels dnd {key}"] = store.labels(key, method="dnd")
        out[f"label runs {key}"] = store.label_runs(key).drop(columns="created_at")
    out["label runs"] = store.label_runs().drop(columns="created_at")
    for key in out["label runs"]["label_key"]:
        out[f"labelled {key}"] = sorted(store.labelled_neurons(key))  # the old store did not order them
    for namespace in ("edit", "preprocessing"):
        out[f"records {namespace}"] = [(k, v) for k, v, _ in store.list_records(namespace)]
    out["record"] = store.get_record("edit", "my edit / v2")
    out["missing record"] = store.get_record("edit", "nope")
    return out


def assert_same_reads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        other = b[name]
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(value.reset_index(drop=True), other.reset_index(drop=True), obj=name)
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, other, err_msg=name)
        elif name.startswith(("hist", "maps")):
            assert len(value) == len(other), name
            for x, y in zip(value, other):
                assert (x is None) == (y is None), name
                if x is not None:
                    for xa, ya in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
                        np.testing.assert_array_equal(xa, ya, err_msg=name)
        elif name == "runs":  # a store from before units has no units field: its runs are neuron runs
            rows = [[dataclasses.asdict(r) for r in runs] for runs in (value, other)]
            assert all(row.pop("units", "neurons") == "neurons" for side in rows for row in side)
            assert rows[0] == rows[1]
        else:
            assert value == other, name


# -----------------------------------------------------------------------------------------
# Files, reads and versions
# -----------------------------------------------------------------------------------------
def test_results_are_files_with_a_commit_point_and_read_back(tmp_path, monkeypatch):
    from neuroviz import store as store_module

    store = Store(tmp_path / "c")
    ps = fake_probe_set()
    before = store.version()
    conv, _ = fill(store, ps)
    assert store.version() != before
    run_dir = store.run_dir(conv.run_key)
    assert {p.name for p in run_dir.iterdir()} == {"run.json", "topk.parquet", "stats.parquet", "acts.npy", "maps.npy", "hist.npz",
                                                   "sketches.npz"}
    assert not (tmp_path / "c" / "neuroviz.duckdb").exists()  # no database file for results
    version = store.version()
    reads = public_reads(store)
    assert store.version() == version  # reads change nothing
    assert [r.layer for r in reads["runs"]] == ["conv", "fc"]
    assert reads[f"top3 {conv.run_key}"][0]["rank"] == 0 and len(reads[f"top3 {conv.run_key}"]) == 3
    labels = reads[f"labels {conv.run_key}"]
    assert list(labels.columns) == ["neuron", "method", "rank", "label", "score", "calibrated", "backend", "label_key", "extra_json"]
    dnd = labels[labels["method"] == "dnd"]
    assert list(dnd["label"]) == ["second answer", "another neuron"]  # per neuron the newest part wins
    assert reads["label runs"].set_index("label_key").loc["odd/key with spaces", "n_neurons"] == 2
    assert reads["labelled odd/key with spaces"] == [1, 4]
    assert reads["record"] == {"neurons": [1, 2]}
    snap = store.snapshot()
    assert snap.runs == tuple(reads["runs"]) and len(snap.probe_sets) == 1 and len(snap.label_runs) == 3
    tables = store.run_tables(conv.run_key)
    np.testing.assert_array_equal(tables.top.image_idx, reads[f"indices {conv.run_key}"])
    assert tables.files.image_ids == tuple(im.image_id for im in ps.images)
    assert store.summary() == {"probe_sets": 1, "probe_images": len(ps), "runs": 2, "topk": 6 * 4 * 2, "neuron_stats": 12,
                               "label_runs": 3, "labels": 12 + 2 + 1, "records": 2}
    # a full save replaces every neuron of its key
    store.save_labels("odd/key with spaces", conv.run_key, "dnd", {}, {}, None, [LabelRow(2, 0, "fresh", 1.0)], "llm")
    assert store.labelled_neurons("odd/key with spaces") == [2]
    # many saves of one key are merged into one part, resolved as before
    monkeypatch.setattr(store_module, "PART_GRACE", 0.0)
    monkeypatch.setattr(store_module, "MAX_PARTS", 3)
    for n in (3, 4, 3, 5):
        store.save_labels("odd/key with spaces", conv.run_key, "dnd", {}, {}, None, [LabelRow(n, 0, f"n{n} again", 1.0)], "llm",
                          replace_neurons=True)
    assert len(list(store.label_dir("odd/key with spaces").glob("*.parquet"))) <= 3
    labels = store.labels(conv.run_key, method="dnd")
    assert dict(zip(labels["neuron"], labels["label"])) == {2: "fresh", 3: "n3 again", 4: "n4 again", 5: "n5 again"}
    store.save_labels("odd/key with spaces", conv.run_key, "dnd", {}, {}, None, [LabelRow(1, 0, "alone", 1.0)], "llm")
    store.save_labels("odd/key with spaces", conv.run_key, "dnd", {}, {}, None, [LabelRow(6, 0, "and me", 1.0)], "llm",
                      replace_neurons=True)
    assert store.labelled_neurons("odd/key with spaces") == [1, 6]  # a full save after a merge still cuts everything before it
    store.delete_record("edit", "my edit / v2")
    assert store.get_record("edit", "my edit / v2") is None and store.list_records("edit") == []


def test_empty_and_unknown_reads_are_typed_and_empty(tmp_path):
    store = Store(tmp_path)
    assert store.find_runs() == [] and store.probe_sets() == [] and store.get_run("nope") is None
    assert store.get_run("../../etc") is None and store.probe_images("../x") == []
    labels = store.labels("nope")
    assert labels.empty and str(labels["neuron"].dtype) == "int32"
    assert store.label_runs().empty and next(iter(store.label_runs().columns)) == "label_key"
    assert store.top_images("nope", 0) == [] and store.neuron_stats("nope").empty
    assert store.labelled_neurons("nope") == [] and store.log_likelihoods("model") == {}


def test_record_keys_of_any_shape_round_trip(tmp_path):
    store = Store(tmp_path)
    keys = ["plain", "a/b c", ".hidden", "..", "ünïcode ✓", "x" * 300, "y" * 300]
    for i, key in enumerate(keys):
        store.put_record("ns/odd", key, {"i": i})
    assert {k: v["i"] for k, v, _ in store.list_records("ns/odd")} == {k: i for i, k in enumerate(keys)}
    assert all(store.get_record("ns/odd", k) == {"i": i} for i, k in enumerate(keys))
    assert not list(tmp_path.glob("**/..json"))


def test_llm_call_log_skips_a_torn_last_line(tmp_path):
    store = Store(tmp_path)
    store.append_llm_calls("rec-1", "w1", [{"recording_id": "rec-1", "seq": i, "kind": "generate"} for i in range(3)])
    with open(store.llm_calls_dir("rec-1") / "w1.jsonl", "a") as fh:
        fh.write('{"recording_id": "rec-1", "seq": 3, "ki')  # killed mid-write
    assert [c["seq"] for c in store.llm_calls("rec-1")] == [0, 1, 2]
    assert store.llm_call_counts() == {"rec-1": 3}


def test_log_likelihood_parts_merge_and_lose_nothing(tmp_path):
    store = Store(tmp_path)
    for i in range(MAX_PARTS + 5):
        store.add_log_likelihoods("model:a", {f"text {i}": -float(i), "shared": -1.0})
    store.add_log_likelihoods("model:b", {"text 0": 5.0})
    scores = store.log_likelihoods("model:a")
    assert scores == {**{f"text {i}": -float(i) for i in range(MAX_PARTS + 5)}, "shared": -1.0}
    assert len(list(store.log_likelihood_dir("model:a").glob("part-*.parquet"))) <= MAX_PARTS
    assert store.log_likelihoods("model:b") == {"text 0": 5.0}


def test_a_moved_probe_set_rewrites_its_paths_only(tmp_path):
    store = Store(tmp_path)
    ps = fake_probe_set(5)
    store.register_probe_set(ps)
    version = store.version()
    store.register_probe_set(ps)
    assert store.version() == version  # nothing changed, nothing written
    moved = ProbeSet(ps.name, ps.source, [ProbeImage(im.image_id, im.path.replace("/images", "/moved"), im.label) for im in ps.images])
    store.register_probe_set(moved)
    assert [r["path"] for r in store.probe_images(ps.id)] == [im.path for im in moved.images]


def test_probe_files_read_only_the_rows_asked_for(tmp_path):
    """A page shows a few hundred images of a large probe set: ProbeFiles reads those rows,
    not the set, and still reads like the tuples it replaced (labels "" when missing)."""
    store = Store(tmp_path)
    ps = ProbeSet("big", "list:big", [ProbeImage(f"{i:020x}", f"/images/big/{i}.png", f"class {i % 3}" if i % 7 else None)
                                      for i in range(3000)])
    store.register_probe_set(ps)
    files = store.probe_files(ps.id)
    assert len(files) == 3000 and files.rows_read == 0  # the size comes from the footer
    wanted = [2999, 5, 1234, 5, 0]
    rows = files.rows(wanted)
    assert [r.path for r in rows] == [ps.images[i].path for i in wanted]
    assert [r.image_id for r in rows] == [ps.images[i].image_id for i in wanted]
    assert [r.label for r in rows] == [ps.images[i].label or "" for i in wanted]
    assert files.rows_read == 4  # each distinct row once
    assert files.paths[1234] == ps.images[1234].path and files.labels[7] == "" and files.image_ids[-1] == ps.images[-1].image_id
    assert files.rows_read == 5  # 1234 and 2999 (= -1) were kept: only row 7 is new
    with pytest.raises(IndexError):
        files.paths[3000]
    assert files.paths[10:13] == tuple(im.path for im in ps.images[10:13])
    assert files.rows_read < 20
    # the whole column still compares and iterates as the tuple did (reading every row, in blocks)
    assert files.image_ids == tuple(im.image_id for im in ps.images)
    assert list(files.labels) == [im.label or "" for im in ps.images]
    assert store.probe_files("unknown").paths == () and len(store.probe_files("../x")) == 0


# -----------------------------------------------------------------------------------------
# Concurrency: kill -9 at any point, readers during writes, two label writers at once
# -----------------------------------------------------------------------------------------
WRITER = r"""
import os, sys
import numpy as np
from neuroviz.store import LabelRow, RunInfo, Store

store, mode = Store(sys.argv[1]), sys.argv[2]
first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
neurons = range(first, first + 50)
rng = np.random.default_rng(os.getpid())
print("ready", flush=True)
g = 0
while True:
    g += 1
    if mode == "runs":
        n, k, images = 64, 8, 400
        acts = np.full((images, n), float(g), np.float32) + rng.random((images, n), dtype=np.float32) / 2
        idx = np.argsort(-acts, axis=0)[:k].T.copy()
        info = RunInfo(f"r{os.getpid()}-{g}", "m", "w", "l", "mean", "ps", "p", k, "1", images, n, (5, 5), "conv", 0.0)
        store.finish_run(info, acts, np.take_along_axis(acts.T, idx, 1), idx, [f"{i:020x}" for i in range(images)],
                         np.full((n, k, 5, 5), g, np.float32))
    elif mode == "labels":
        rows = [LabelRow(n, r, f"g{g}", float(g)) for n in range(200) for r in range(3)]
        store.save_labels("key", "run", "m", {}, {}, None, rows, "b", replace_neurons=bool(g % 2))
    else:  # per-neuron saves of a range of neurons, then stop
        for n in neurons:
            store.save_labels("shared-key", "run", "m", {}, {}, None, [LabelRow(n, 0, f"n{n}", 1.0)], "b", replace_neurons=True)
        break
"""


def start_writer(root: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def check_runs(store: Store) -> int:
    """Every visible run is complete and consistent with itself."""
    runs = store.find_runs()
    for run in runs:
        g = float(run.run_key.rsplit("-", 1)[1])
        stats = store.neuron_stats(run.run_key)
        assert len(stats) == run.n_neurons and (stats["min"] >= g).all() and (stats["max"] <= g + 0.5).all()
        assert store.top_indices(run.run_key).shape == (run.n_neurons, run.k)
        assert [t["rank"] for t in store.top_images(run.run_key, run.n_neurons - 1, k=run.k)] == list(range(run.k))
        assert float(store.top_maps(run.run_key, 0)[0, 0, 0]) == g
        assert np.asarray(store.activations(run.run_key)).shape == (run.n_images, run.n_neurons)
        assert store.histogram(run.run_key, 0)[0].sum() == run.n_images
    return len(runs)


def check_labels(store: Store) -> str | None:
    """All 200 neurons x 3 ranks of one generation, or nothing yet."""
    labels = store.labels("run")
    if labels.empty:
        return None
    assert len(labels) == 600 and labels["label"].nunique() == 1
    assert store.label_runs("run")["n_neurons"].tolist() == [200]
    return str(labels["label"].iloc[0])


@pytest.mark.parametrize("mode", ["runs", "labels"])
def test_kill_9_mid_write_leaves_the_old_or_the_new_state(tmp_path, mode):
    store, check = Store(tmp_path), (check_runs if mode == "runs" else check_labels)
    seen = []
    for delay in (0.3, 0.9, 1.7):
        writer = start_writer(tmp_path, mode)
        deadline = time.time() + delay
        while time.time() < deadline:  # readers while it writes: never half of a result
            seen.append(check(store))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        seen.append(check(store))
    assert any(seen[-1:]) and len(set(map(str, seen))) > 1  # it wrote between kills, and we saw it


def test_two_processes_labelling_different_neurons_of_one_key_lose_nothing(tmp_path):
    store = Store(tmp_path)
    writers = [start_writer(tmp_path, "neurons", str(first)) for first in (0, 50)]
    for writer in writers:
        assert writer.wait(timeout=300) == 0
    assert store.labelled_neurons("shared-key") == list(range(100))
    labels = store.labels("run")
    assert list(labels["label"]) == [f"n{n}" for n in range(100)]
    assert store.label_runs("run")["n_neurons"].tolist() == [100]


# -----------------------------------------------------------------------------------------
# Migration of a cache built before the file layout
# -----------------------------------------------------------------------------------------
LEGACY_LLM_TABLES = """
CREATE TABLE IF NOT EXISTS llm_calls (
    recording_id VARCHAR, seq BIGINT, kind VARCHAR, request_key VARCHAR, model_id VARCHAR,
    prompt VARCHAR, response VARCHAR, loglik DOUBLE, seed BIGINT, temperature DOUBLE,
    max_new_tokens INTEGER, created_at DOUBLE);
CREATE TABLE IF NOT EXISTS lm_log_likelihood (
    lm_id VARCHAR, text VARCHAR, log_likelihood DOUBLE, PRIMARY KEY (lm_id, text));
CREATE TABLE IF NOT EXISTS llm_loglik_cache (model_id VARCHAR, text VARCHAR, loglik DOUBLE, PRIMARY KEY (model_id, text));
"""


def old_store_module(monkeypatch) -> types.ModuleType:
    """The old store from git history (skips the test without that history)."""
    module = legacy_store.old_store_module()
    if module is None:
        pytest.skip(f"commit {legacy_store.OLD_STORE_COMMIT} (the store before the file layout) is not in this checkout's history")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_a_cache_from_before_migrates_once_and_reads_back_identically(tmp_path, monkeypatch):
    import duckdb

    from neuroviz.backends.language import ReplayLM, list_recordings

    old = old_store_module(monkeypatch)
    root = tmp_path / "cache"
    old_store = old.Store(root)
    fill(old_store, fake_probe_set())
    with duckdb.connect(str(old_store.db_path)) as con:
        con.execute(LEGACY_LLM_TABLES)
        con.executemany("INSERT INTO llm_calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            ("rec-1", 0, "generate", "k-gen", "lm:x", "the cat", " sat", None, 0, 0.0, 5, 1.0),
            ("rec-1", 1, "loglik", "k-ll", "lm:x", "a dog", None, -3.5, None, None, None, 2.0)])
        con.execute("INSERT INTO lm_log_likelihood VALUES ('lm:x', 'a dog', -3.5), ('lm:x', 'a cat', -2.0)")
        con.execute("INSERT INTO llm_loglik_cache VALUES ('lm:x', 'a bird', -4.0)")
    old_store.put_record("llm_recordings", "rec-1", {"model_id": "lm:x", "description": "x", "created_at": 1.0})
    before = public_reads(old_store)
    before_summary = old_store.summary()

    store = Store(root)
    assert store.migration_marker().exists()
    after = public_reads(store)
    assert_same_reads(before, after)
    summary = store.summary()
    assert all(summary[t] == before_summary[t] for t in ("probe_sets", "probe_images", "runs", "topk", "neuron_stats",
                                                          "label_runs", "labels"))
    assert [r.created_at for r in store.find_runs()] == [r.created_at for r in before["runs"]]  # same order
    replay = ReplayLM(store, "rec-1")
    assert replay.id == "lm:x"
    assert [(r["recording_id"], r["n_calls"]) for r in list_recordings(store)] == [("rec-1", 2)]
    assert store.log_likelihoods("lm:x") == {"a dog": -3.5, "a cat": -2.0, "a bird": -4.0}  # both old caches, as one

    # a later open does not migrate again: new results stay
    store.save_labels("after", before["runs"][1].run_key, "new", {}, {}, None, [LabelRow(0, 0, "kept", 1.0)], "b")
    marker = store.migration_marker().stat().st_mtime_ns
    again = Store(root)
    assert again.migration_marker().stat().st_mtime_ns == marker
    assert "kept" in set(again.labels(before["runs"][1].run_key)["label"])


# -----------------------------------------------------------------------------------------
# The shared cache
# -----------------------------------------------------------------------------------------
class CountingBackend:
    """The offline ConSE backend, counting the images and texts it is asked to encode."""

    def __init__(self):
        from neuroviz.backends.multimodal import create_multimodal

        self.inner = create_multimodal("conse")
        self.id = self.inner.id
        self.images = 0
        self.texts = 0

    def encode_images(self, images, batch_size=32):
        self.images += len(images)
        return self.inner.encode_images(images, batch_size)

    def encode_texts(self, texts, batch_size=256):
        self.texts += len(texts)
        return self.inner.encode_texts(texts, batch_size)


def test_a_second_workspace_computes_nothing_the_shared_cache_has(tmp_path, image_folder):
    from neuroviz import datasets, embeddings

    shared = SharedCache(tmp_path / "shared")
    first, second = Store(tmp_path / "a", shared=shared), Store(tmp_path / "b", shared=shared)
    ps = datasets.from_folder(image_folder)
    backend = CountingBackend()
    words = ["cat", "dog", "red square"]
    first.register_probe_set(ps)
    emb = embeddings.image_embeddings(backend, first, ps.id)
    text = embeddings.text_embeddings(backend, first, words)
    assert (backend.images, backend.texts) == (len(ps), 3)

    second.register_probe_set(ps)
    np.testing.assert_array_equal(embeddings.image_embeddings(backend, second, ps.id), emb)
    np.testing.assert_array_equal(embeddings.text_embeddings(backend, second, words), text)
    assert (backend.images, backend.texts) == (len(ps), 3)  # nothing embedded again

    # a subset in another order, plus two images never seen: only those two are embedded
    extra = tmp_path / "extra"
    extra.mkdir()
    for colour in ("purple", "orange"):
        from PIL import Image

        Image.new("RGB", (40, 40), colour).save(extra / f"{colour}.png")
    new = datasets.from_folder(extra)
    subset = ProbeSet("subset", "subset", list(reversed(ps.images[::3])) + new.images)
    second.register_probe_set(subset)
    sub_emb = embeddings.image_embeddings(backend, second, subset.id)
    assert backend.images == len(ps) + 2
    index = {im.image_id: i for i, im in enumerate(ps.images)}
    np.testing.assert_allclose(sub_emb[: len(subset) - 2], emb[[index[im.image_id] for im in subset.images[:-2]]], atol=1e-6)


def test_shared_cache_adopts_what_a_workspace_built_before_it(tmp_path, monkeypatch):
    from neuroviz import concepts
    from neuroviz.backends.language import GEMMA_HF_DIRNAME, gemma_dir

    workspace = tmp_path / "old-workspace"
    legacy = workspace / "models" / GEMMA_HF_DIRNAME
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text("{}")
    (legacy / "READY").write_text("dequantised\n")
    monkeypatch.setenv("NEUROVIZ_SHARED_CACHE", str(tmp_path / "shared"))
    found = gemma_dir(workspace)
    assert found == tmp_path / "shared" / "models" / GEMMA_HF_DIRNAME and (found / "READY").read_text() == "dequantised\n"
    assert gemma_dir(tmp_path / "another-workspace") == found  # any workspace finds it now

    # a word list cached in the workspace is read from there, not recomputed
    words = concepts.common_words(1000, store_root=workspace)
    (shared_file,) = (tmp_path / "shared" / "concepts").glob("words1k-*.txt")
    (workspace / "concepts").mkdir()
    shared_file.rename(workspace / "concepts" / shared_file.name)
    (workspace / "concepts" / shared_file.name).write_text("planted\n" + "\n".join(words.concepts[1:]) + "\n")
    assert concepts.common_words(1000, store_root=workspace).concepts[0] == "planted"
    assert shared_file.exists()
