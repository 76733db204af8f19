"""The cache: every SQL statement and the file layout of ``cache/`` live here.

Layout under the cache root::

    neuroviz.duckdb          runs, probe sets, top-k, neuron stats, label runs, labels
    runs/<run_key>/          acts.npy (images x neurons, float32), maps.npy (neurons x k x h x w,
                             float16, only for each neuron's top-k images), hist.npz,
                             partial/ (resumable chunks of an unfinished extraction)
    arrays/<kind>/<key>.npy  other dense artefacts (embeddings, ...), keyed by provenance
    jobs/<job_id>.json       progress records of background jobs
    demo/                    the embedded demo probe set

Every artefact is keyed by its provenance; nothing is updated in place, so a stale
artefact cannot be served. Connections are short-lived (see :mod:`neuroviz.db`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import db
from .files import atomic_save_npy, atomic_savez

DEFAULT_CACHE = Path(os.environ.get("NEUROVIZ_CACHE", Path(__file__).resolve().parent.parent / "cache"))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS probe_sets (
    probe_set_id VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR, n_images INTEGER,
    n_skipped INTEGER, skipped_json VARCHAR, created_at DOUBLE);
CREATE TABLE IF NOT EXISTS probe_images (
    probe_set_id VARCHAR, idx INTEGER, image_id VARCHAR, path VARCHAR, label VARCHAR,
    PRIMARY KEY (probe_set_id, idx));
CREATE TABLE IF NOT EXISTS runs (
    run_key VARCHAR PRIMARY KEY, model_spec VARCHAR, weights_id VARCHAR, layer VARCHAR,
    pooling VARCHAR, probe_set_id VARCHAR, preprocess_id VARCHAR, k INTEGER,
    code_version VARCHAR, n_images INTEGER, n_neurons INTEGER, map_shape VARCHAR,
    layer_kind VARCHAR, created_at DOUBLE);
CREATE TABLE IF NOT EXISTS topk (
    run_key VARCHAR, neuron INTEGER, rank INTEGER, image_idx INTEGER, image_id VARCHAR,
    activation FLOAT);
CREATE TABLE IF NOT EXISTS neuron_stats (
    run_key VARCHAR, neuron INTEGER, mean FLOAT, std FLOAT, min FLOAT, max FLOAT,
    q99 FLOAT, q995 FLOAT);
CREATE TABLE IF NOT EXISTS label_runs (
    label_key VARCHAR PRIMARY KEY, run_key VARCHAR, method VARCHAR, backends_json VARCHAR,
    hyperparams_json VARCHAR, concept_set_id VARCHAR, n_neurons INTEGER, created_at DOUBLE);
CREATE TABLE IF NOT EXISTS labels (
    label_key VARCHAR, run_key VARCHAR, neuron INTEGER, method VARCHAR, rank INTEGER,
    label VARCHAR, score DOUBLE, calibrated DOUBLE, backend VARCHAR, extra_json VARCHAR);
CREATE TABLE IF NOT EXISTS kv (
    namespace VARCHAR, key VARCHAR, value_json VARCHAR, created_at DOUBLE,
    PRIMARY KEY (namespace, key));
"""


@dataclass(frozen=True)
class RunInfo:
    """One finished extraction of one layer: everything that names it, and its sizes."""

    run_key: str
    model_spec: str
    weights_id: str
    layer: str
    pooling: str
    probe_set_id: str
    preprocess_id: str
    k: int
    code_version: str
    n_images: int
    n_neurons: int
    map_shape: tuple[int, int] | None
    layer_kind: str
    created_at: float = 0.0


@dataclass(frozen=True)
class LabelRow:
    """One label of one neuron by one method (rank 0 is the method's answer)."""

    neuron: int
    rank: int
    label: str
    score: float
    calibrated: float | None = None
    extra: dict | None = None


def histograms(acts: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron histograms over each neuron's own [min, max], all neurons in one pass."""
    n_images, n_neurons = acts.shape
    width = np.where(hi > lo, hi - lo, 1e-6).astype(np.float64)
    edges = lo[:, None] + width[:, None] * np.linspace(0.0, 1.0, bins + 1)[None, :]
    bin_idx = np.clip(((acts - lo) / width * bins).astype(np.int64), 0, bins - 1)  # the max falls in the last bin
    flat = bin_idx + np.arange(n_neurons)[None, :] * bins
    counts = np.bincount(flat.ravel(), minlength=n_neurons * bins).reshape(n_neurons, bins).astype(np.int32)
    return counts, edges.astype(np.float32)


class Store:
    """The cache of one workspace. Cheap to construct; holds no open connection."""

    def __init__(self, root: Path | str = DEFAULT_CACHE, lock_timeout: float = 30.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "neuroviz.duckdb"
        self.lock_timeout = lock_timeout
        self._schema_ready = False

    # -- connections ------------------------------------------------------------------
    def connect(self):
        """A short-lived connection (context manager) with the schema in place."""
        return _SchemaConnection(self)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.connect() as con:
            return con.execute(sql, list(params)).fetchall()

    def query_df(self, sql: str, params: Sequence[Any] = ()):
        with self.connect() as con:
            return con.execute(sql, list(params)).df()

    # -- paths ------------------------------------------------------------------------
    def run_dir(self, run_key: str) -> Path:
        return self.root / "runs" / run_key

    def array_path(self, kind: str, key: str) -> Path:
        return self.root / "arrays" / kind / f"{key}.npy"

    def save_array(self, kind: str, key: str, array: np.ndarray) -> Path:
        path = self.array_path(kind, key)
        atomic_save_npy(path, array)
        return path

    def load_array(self, kind: str, key: str, mmap: bool = False) -> np.ndarray | None:
        path = self.array_path(kind, key)
        if not path.exists():
            return None
        return np.load(path, mmap_mode="r" if mmap else None)

    # -- probe sets -------------------------------------------------------------------
    def register_probe_set(self, ps) -> None:
        """Record a probe set and its ordered images (idempotent).

        Known probe sets keep their id (it hashes the images' contents), but files that moved
        (a renamed folder, a copied cache) get their new paths, so pages keep finding them.
        """
        with self.connect() as con:
            if con.execute("SELECT 1 FROM probe_sets WHERE probe_set_id = ?", [ps.id]).fetchone():
                stored = con.execute("SELECT idx, image_id, path FROM probe_images WHERE probe_set_id = ? ORDER BY idx",
                                     [ps.id]).fetchall()
                moved = [(im.path, ps.id, i) for (i, image_id, path), im in zip(stored, ps.images)
                         if image_id == im.image_id and path != im.path]
                if moved:
                    con.executemany("UPDATE probe_images SET path = ? WHERE probe_set_id = ? AND idx = ?", moved)
                return
            con.execute("BEGIN")
            con.execute(
                "INSERT INTO probe_sets VALUES (?, ?, ?, ?, ?, ?, ?)",
                [ps.id, ps.name, ps.source, len(ps), ps.n_skipped, json.dumps(ps.skipped), time.time()],
            )
            con.executemany(
                "INSERT INTO probe_images VALUES (?, ?, ?, ?, ?)",
                [(ps.id, i, im.image_id, im.path, im.label) for i, im in enumerate(ps.images)],
            )
            con.execute("COMMIT")

    def probe_sets(self) -> list[dict]:
        rows = self.query("SELECT probe_set_id, name, source, n_images, n_skipped, created_at FROM probe_sets ORDER BY created_at")
        return [dict(zip(("probe_set_id", "name", "source", "n_images", "n_skipped", "created_at"), r)) for r in rows]

    def probe_images(self, probe_set_id: str) -> list[dict]:
        rows = self.query(
            "SELECT idx, image_id, path, label FROM probe_images WHERE probe_set_id = ? ORDER BY idx", [probe_set_id]
        )
        return [dict(zip(("idx", "image_id", "path", "label"), r)) for r in rows]

    # -- activation runs ----------------------------------------------------------------
    def get_run(self, run_key: str) -> RunInfo | None:
        rows = self.query("SELECT * FROM runs WHERE run_key = ?", [run_key])
        return _run_info(rows[0]) if rows else None

    def find_runs(self, model_spec: str | None = None, probe_set_id: str | None = None, layer: str | None = None) -> list[RunInfo]:
        sql, params = "SELECT * FROM runs WHERE 1=1", []
        for col, val in (("model_spec", model_spec), ("probe_set_id", probe_set_id), ("layer", layer)):
            if val is not None:
                sql += f" AND {col} = ?"
                params.append(val)
        return [_run_info(r) for r in self.query(sql + " ORDER BY created_at", params)]

    def finish_run(self, info: RunInfo, acts: np.ndarray, top_values: np.ndarray, top_indices: np.ndarray,
                   image_ids: Sequence[str], maps: np.ndarray | None, hist_bins: int = 50) -> None:
        """Store a finished extraction: arrays first, then the rows that make it visible.

        The ``runs`` row is written last, in the same transaction as top-k and stats, so a
        crash in between leaves nothing half-visible.
        """
        run_dir = self.run_dir(info.run_key)
        atomic_save_npy(run_dir / "acts.npy", acts.astype(np.float32, copy=False))
        if maps is not None:
            atomic_save_npy(run_dir / "maps.npy", maps.astype(np.float16))
        qs = np.quantile(acts, [0.99, 0.995], axis=0) if len(acts) else np.zeros((2, acts.shape[1]))
        lo, hi = acts.min(axis=0), acts.max(axis=0)
        counts, edges = histograms(acts, lo, hi, hist_bins)
        atomic_savez(run_dir / "hist.npz", counts=counts, edges=edges)
        n_neurons, k = top_indices.shape
        neuron_col = np.repeat(np.arange(n_neurons), k)
        rank_col = np.tile(np.arange(k), n_neurons)
        idx_col = top_indices.reshape(-1)
        ids = np.asarray(image_ids, dtype=object)
        import pandas as pd

        topk_df = pd.DataFrame({
            "run_key": info.run_key, "neuron": neuron_col.astype(np.int32), "rank": rank_col.astype(np.int32),
            "image_idx": idx_col.astype(np.int32), "image_id": ids[idx_col], "activation": top_values.reshape(-1).astype(np.float32),
        })
        stats_df = pd.DataFrame({
            "run_key": info.run_key, "neuron": np.arange(n_neurons, dtype=np.int32), "mean": acts.mean(0), "std": acts.std(0),
            "min": lo, "max": hi, "q99": qs[0], "q995": qs[1],
        })
        row = asdict(info)
        row["map_shape"] = json.dumps(list(info.map_shape)) if info.map_shape else None
        row["created_at"] = time.time()
        with self.connect() as con:
            con.execute("BEGIN")
            con.execute("DELETE FROM topk WHERE run_key = ?", [info.run_key])
            con.execute("DELETE FROM neuron_stats WHERE run_key = ?", [info.run_key])
            con.execute("DELETE FROM runs WHERE run_key = ?", [info.run_key])
            con.register("topk_df", topk_df)
            con.execute("INSERT INTO topk SELECT * FROM topk_df ORDER BY neuron, rank")
            con.register("stats_df", stats_df)
            con.execute("INSERT INTO neuron_stats SELECT * FROM stats_df")
            cols = list(row)
            con.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols])
            con.execute("COMMIT")

    def activations(self, run_key: str, mmap: bool = True) -> np.ndarray:
        """Pooled activations, images x neurons (memory-mapped by default)."""
        return np.load(self.run_dir(run_key) / "acts.npy", mmap_mode="r" if mmap else None)

    def top_maps(self, run_key: str, neuron: int) -> np.ndarray | None:
        """The spatial maps (k x h x w) of one neuron's top-k images, in rank order."""
        path = self.run_dir(run_key) / "maps.npy"
        if not path.exists():
            return None
        return np.asarray(np.load(path, mmap_mode="r")[neuron], dtype=np.float32)

    def top_images(self, run_key: str, neuron: int, k: int = 16) -> list[dict]:
        """One neuron's top-k images: rank, image index in the probe set, id, activation."""
        rows = self.query(
            "SELECT rank, image_idx, image_id, activation FROM topk WHERE run_key = ? AND neuron = ? AND rank < ? ORDER BY rank",
            [run_key, neuron, k],
        )
        return [dict(zip(("rank", "image_idx", "image_id", "activation"), r)) for r in rows]

    def top_indices(self, run_key: str) -> np.ndarray:
        """neurons x k matrix of top image indices (for vectorised methods)."""
        df = self.query_df("SELECT neuron, rank, image_idx FROM topk WHERE run_key = ? ORDER BY neuron, rank", [run_key])
        info = self.get_run(run_key)
        assert info is not None
        return df["image_idx"].to_numpy().reshape(info.n_neurons, -1)

    def neuron_stats(self, run_key: str):
        """DataFrame: neuron, mean, std, min, max, q99, q995."""
        return self.query_df(
            "SELECT neuron, mean, std, min, max, q99, q995 FROM neuron_stats WHERE run_key = ? ORDER BY neuron", [run_key]
        )

    def histogram(self, run_key: str, neuron: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.run_dir(run_key) / "hist.npz") as h:
            return h["counts"][neuron], h["edges"][neuron]

    # -- labels -------------------------------------------------------------------------
    def has_labels(self, label_key: str) -> bool:
        return bool(self.query("SELECT 1 FROM label_runs WHERE label_key = ?", [label_key]))

    def labelled_neurons(self, label_key: str) -> list[int]:
        """Neurons that already have labels under ``label_key``."""
        return [r[0] for r in self.query("SELECT DISTINCT neuron FROM labels WHERE label_key = ?", [label_key])]

    def save_labels(self, label_key: str, run_key: str, method: str, backends: dict, hyperparams: dict,
                    concept_set_id: str | None, rows: Iterable[LabelRow], backend_name: str, replace_neurons: bool = False) -> None:
        """Store a method's labels for a run; with replace_neurons, only the given neurons'
        labels are replaced and the others under the same key are kept (on-demand methods)."""
        rows = list(rows)
        neurons = sorted({r.neuron for r in rows})
        with self.connect() as con:
            con.execute("BEGIN")
            if not replace_neurons:
                con.execute("DELETE FROM labels WHERE label_key = ?", [label_key])
            elif neurons:
                con.execute(f"DELETE FROM labels WHERE label_key = ? AND neuron IN ({', '.join('?' * len(neurons))})", [label_key, *neurons])
            con.executemany(
                "INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(label_key, run_key, r.neuron, method, r.rank, r.label, float(r.score),
                  None if r.calibrated is None else float(r.calibrated), backend_name,
                  json.dumps(r.extra, default=str) if r.extra else None) for r in rows],
            )
            count = con.execute("SELECT count(DISTINCT neuron) FROM labels WHERE label_key = ?", [label_key]).fetchone()[0]
            con.execute("DELETE FROM label_runs WHERE label_key = ?", [label_key])
            con.execute(
                "INSERT INTO label_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [label_key, run_key, method, json.dumps(backends, sort_keys=True), json.dumps(hyperparams, sort_keys=True, default=str),
                 concept_set_id, count, time.time()],
            )
            con.execute("COMMIT")

    def labels(self, run_key: str, neuron: int | None = None, method: str | None = None, top_only: bool = False):
        """DataFrame of labels for a run: neuron, method, rank, label, score, calibrated, backend, label_key."""
        sql = "SELECT neuron, method, rank, label, score, calibrated, backend, label_key, extra_json FROM labels WHERE run_key = ?"
        params: list[Any] = [run_key]
        if neuron is not None:
            sql += " AND neuron = ?"
            params.append(neuron)
        if method is not None:
            sql += " AND method = ?"
            params.append(method)
        if top_only:
            sql += " AND rank = 0"
        return self.query_df(sql + " ORDER BY neuron, method, rank", params)

    def label_runs(self, run_key: str | None = None):
        sql = "SELECT * FROM label_runs" + (" WHERE run_key = ?" if run_key else "") + " ORDER BY created_at"
        return self.query_df(sql, [run_key] if run_key else [])

    # -- small key-value records (audits, edits, synthesis manifests) --------------------
    def put_record(self, namespace: str, key: str, value: Any) -> None:
        with self.connect() as con:
            con.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", [namespace, key, json.dumps(value, default=str), time.time()])

    def get_record(self, namespace: str, key: str) -> Any | None:
        rows = self.query("SELECT value_json FROM kv WHERE namespace = ? AND key = ?", [namespace, key])
        return json.loads(rows[0][0]) if rows else None

    def list_records(self, namespace: str) -> list[tuple[str, Any, float]]:
        rows = self.query("SELECT key, value_json, created_at FROM kv WHERE namespace = ? ORDER BY created_at DESC", [namespace])
        return [(k, json.loads(v), t) for k, v, t in rows]

    def delete_record(self, namespace: str, key: str) -> None:
        with self.connect() as con:
            con.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", [namespace, key])

    # -- overview -------------------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        """Row counts of every table, for `python -m neuroviz cache`."""
        out = {}
        with self.connect() as con:
            for table in ("probe_sets", "probe_images", "runs", "topk", "neuron_stats", "label_runs", "labels", "kv"):
                out[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return out


class _SchemaConnection:
    """Context manager: a short-lived connection, creating the schema on first use."""

    def __init__(self, store: Store):
        self.store = store
        self._cm = db.connect(store.db_path, timeout=store.lock_timeout)

    def __enter__(self):
        con = self._cm.__enter__()
        if not self.store._schema_ready:
            con.execute(_SCHEMA)
            self.store._schema_ready = True
        return con

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _run_info(row: tuple) -> RunInfo:
    (run_key, model_spec, weights_id, layer, pooling, probe_set_id, preprocess_id, k, code_version,
     n_images, n_neurons, map_shape, layer_kind, created_at) = row
    shape = tuple(json.loads(map_shape)) if map_shape else None
    return RunInfo(run_key, model_spec, weights_id, layer, pooling, probe_set_id, preprocess_id, k, code_version,
                   n_images, n_neurons, shape, layer_kind, created_at)
