"""Cached reads of the store for the pages.

The store answers every question (:class:`neuroviz.store.Store`); these functions only keep
its answers for the pages with Streamlit's caches, keyed by ``Store.version()`` (one stat of
a file rewritten after every commit), so a finished job shows up on the next rerun and
nothing stale stays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from neuroviz.store import DEFAULT_CACHE, ProbeFiles, RunInfo, RunTables, Store, TopK

IMPORTED_PREFIX = "imported:"  # labels stored by `python -m neuroviz import` (see neuroviz.labels_io)


def method_title(name: str) -> str:
    """A readable name for a method key: the registry's title, "Imported (file)" for
    imported labels, else the key itself (a method this checkout does not have)."""
    from neuroviz.methods import get_method

    if name.startswith(IMPORTED_PREFIX):
        return f"Imported ({name[len(IMPORTED_PREFIX):]})"
    try:
        return get_method(name).title or name
    except KeyError:
        return name


# -- the store ---------------------------------------------------------------------------------
def cache_root() -> Path:
    """The cache folder: $NEUROVIZ_CACHE when set (read now, not at import), else ./cache."""
    env = os.environ.get("NEUROVIZ_CACHE")
    return Path(env) if env else DEFAULT_CACHE


@st.cache_resource(show_spinner=False)
def _store(root: str) -> Store:
    return Store(root)


def get_store(root: str | Path | None = None) -> Store:
    """The Store of the cache folder, shared by every session (it holds no open connection)."""
    return _store(str(root or cache_root()))


def db_version(store: Store) -> tuple:
    """The store's version: changes whenever a result is committed (cache key of every read here)."""
    return store.version()


@dataclass(frozen=True)
class Catalog:
    """What the cache holds, in one read: runs, probe sets and label runs."""

    runs: tuple[RunInfo, ...] = ()
    probe_sets: tuple[dict, ...] = ()
    label_runs: tuple[dict, ...] = ()
    # run_key -> sorted method names that have labels for it
    methods_by_run: dict = field(default_factory=dict)

    def runs_for(self, model_spec: str | None = None, probe_set_id: str | None = None, layer: str | None = None) -> list[RunInfo]:
        return [r for r in self.runs if (model_spec is None or r.model_spec == model_spec)
                and (probe_set_id is None or r.probe_set_id == probe_set_id) and (layer is None or r.layer == layer)]

    def model_specs(self) -> list[str]:
        return list(dict.fromkeys(r.model_spec for r in self.runs))

    def probe_set(self, probe_set_id: str) -> dict | None:
        return next((p for p in self.probe_sets if p["probe_set_id"] == probe_set_id), None)

    def run(self, run_key: str) -> RunInfo | None:
        return next((r for r in self.runs if r.run_key == run_key), None)


# The read-only tables below are shared between sessions without copying
# (st.cache_resource): pages never modify them in place. Keyed by the store's version,
# so a write makes the next read fresh; max_entries bounds the memory.
@st.cache_resource(show_spinner=False, max_entries=8)
def _catalog(root: str, version: tuple) -> Catalog:
    snap = get_store(root).snapshot()
    methods: dict[str, list[str]] = {}
    for lr in snap.label_runs:
        methods.setdefault(lr["run_key"], [])
        if lr["method"] not in methods[lr["run_key"]]:
            methods[lr["run_key"]].append(lr["method"])
    return Catalog(snap.runs, snap.probe_sets, snap.label_runs, {k: sorted(v) for k, v in methods.items()})


def catalog(store: Store) -> Catalog:
    """Runs, probe sets and label runs of the store (cached until the store changes)."""
    return _catalog(str(store.root), db_version(store))


@st.cache_resource(show_spinner=False, max_entries=8)
def _run_tables(root: str, version: tuple, run_key: str) -> RunTables:
    return get_store(root).run_tables(run_key)


def run_tables(store: Store, run_key: str) -> RunTables:
    """Labels, top-k, stats and probe files of a run (shared, read-only: copy before modifying)."""
    return _run_tables(str(store.root), db_version(store), run_key)


def run_labels(store: Store, run_key: str) -> pd.DataFrame:
    """All labels (every method, every rank) of one run: neuron, method, rank, label, score, ..."""
    return run_tables(store, run_key).labels


def top_k(store: Store, run_key: str) -> TopK:
    """Every neuron's top images of a run (small: neurons x k), for grids and paging."""
    return run_tables(store, run_key).top


def neuron_stats(store: Store, run_key: str) -> pd.DataFrame:
    return run_tables(store, run_key).stats


def run_files(store: Store, run_key: str) -> ProbeFiles:
    """Paths, labels and ids of the run's probe images (index = row in activations), read as
    they are asked for and kept while the store is unchanged: batch with ``rows(idxs)``."""
    return run_tables(store, run_key).files


def top_rows(store: Store, run_key: str, neuron: int, k: int | None = None) -> list[dict]:
    """One neuron's top images (rank order) with their file paths and probe labels."""
    tables = run_tables(store, run_key)
    table, files = tables.top, tables.files
    if not 0 <= neuron < len(table.image_idx):
        return []
    idxs, acts = table.image_idx[neuron], table.activation[neuron]
    n = len(idxs) if k is None else min(k, len(idxs))
    inside = [int(i) for i in idxs[:n] if 0 <= i < len(files)]
    found = dict(zip(inside, files.rows(inside)))  # one read of just these rows
    out = []
    for rank in range(n):
        idx = int(idxs[rank])
        row = found.get(idx)
        out.append({"rank": rank, "image_idx": idx, "activation": float(acts[rank]),
                    "path": row.path if row else None, "label": row.label if row else "",
                    "image_id": row.image_id if row else None})
    return out


def label_extra(row) -> dict:
    """The decoded extra_json of a label row ({} when absent or unreadable)."""
    raw = row.get("extra_json") if hasattr(row, "get") else None
    if not raw or (isinstance(raw, float) and np.isnan(raw)):
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
