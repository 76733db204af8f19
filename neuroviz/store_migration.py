"""One-time migration of a cache built before the file layout (everything in ``neuroviz.duckdb``).

The old database is opened read-only and every table is exported to the layout described
in :mod:`neuroviz.store`, under the same keys (run_key, label_key, probe_set_id, record keys,
recording ids), so nothing is recomputed. The database file is left where it was; the
marker ``migrated.json`` is written last, so an interrupted migration simply runs again.
Processes that open the store meanwhile wait on a lock file, so only one migrates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .files import atomic_write_json

if TYPE_CHECKING:
    from .store import Store


def migrate_legacy_cache(store: Store) -> None:
    """Export ``neuroviz.duckdb`` into the file layout once (no-op when already done)."""
    with _migration_lock(store):
        if store.migration_marker().exists():
            return
        with _open_read_only(store) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            counts = {}
            for name, export in _EXPORTS:
                if name in tables:
                    counts[name] = export(store, con)
        atomic_write_json(store.migration_marker(), {"from": store.LEGACY_DB, "at": time.time(), "rows": counts})
        store._committed()


@contextlib.contextmanager
def _migration_lock(store: Store) -> Iterator[None]:
    with open(store.migration_lock_path(), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _open_read_only(store: Store) -> Iterator[Any]:
    """The old database, read-only; waits up to ``store.lock_timeout`` for a writer to let go."""
    import duckdb

    from .store import LegacyCacheLockedError

    deadline = time.monotonic() + store.lock_timeout
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(store.legacy_db_path()), read_only=True)
            break
        except duckdb.Error as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() >= deadline:
                raise LegacyCacheLockedError(
                    f"The cache {store.root} still has its data in {store.LEGACY_DB}, which must be moved once to the "
                    f"new layout, but another process holds that file ({str(exc).splitlines()[0][:200]}). "
                    "Stop that process (an older neuroviz job or app), then try again."
                ) from None
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
    try:
        yield con
    finally:
        con.close()


def _created_part_id(created_at: float | None, salt: str) -> str:
    from .provenance import provenance_key

    return f"{int((created_at or 0.0) * 1e9):020d}-{provenance_key(salt, 8)}"


def _export_probe_sets(store: Store, con) -> int:
    from .store import _write_parquet

    sets = con.execute("SELECT probe_set_id, name, source, n_images, n_skipped, skipped_json, created_at FROM probe_sets").fetchall()
    for probe_set_id, name, source, n_images, n_skipped, skipped_json, created_at in sets:
        images = con.execute("SELECT idx, image_id, path, label FROM probe_images WHERE probe_set_id = ? ORDER BY idx",
                             [probe_set_id]).df()
        folder = store.probe_set_dir(probe_set_id)
        _write_parquet(folder / "images.parquet", "probe_images", {c: images[c].tolist() for c in images.columns})
        atomic_write_json(folder / "meta.json", {
            "probe_set_id": probe_set_id, "name": name, "source": source, "n_images": n_images, "n_skipped": n_skipped,
            "skipped": json.loads(skipped_json) if skipped_json else {}, "created_at": created_at})
    return len(sets)


def _export_runs(store: Store, con) -> int:
    from .store import TOPK_ROW_GROUP, _run_info, _write_parquet

    columns = [r[0] for r in con.execute("DESCRIBE runs").fetchall()]
    rows = [dict(zip(columns, r)) for r in con.execute("SELECT * FROM runs").fetchall()]
    for row in rows:
        key = row["run_key"]
        top = con.execute("SELECT neuron, rank, image_idx, image_id, activation FROM topk WHERE run_key = ? ORDER BY neuron, rank",
                          [key]).df()
        _write_parquet(store.run_dir(key) / "topk.parquet", "topk", {c: top[c].to_numpy() if c != "image_id" else top[c].tolist()
                                                                     for c in top.columns}, row_group_size=TOPK_ROW_GROUP)
        stats = con.execute("SELECT neuron, mean, std, min, max, q99, q995 FROM neuron_stats WHERE run_key = ? ORDER BY neuron",
                            [key]).df()
        _write_parquet(store.run_dir(key) / "stats.parquet", "neuron_stats", {c: stats[c].to_numpy() for c in stats.columns})
        row["map_shape"] = json.loads(row["map_shape"]) if row["map_shape"] else None
        info = _run_info(row)
        assert info is not None
        store._commit_run(info, row["created_at"])
    return len(rows)


def _export_labels(store: Store, con) -> int:
    from .store import _write_parquet

    runs = con.execute("SELECT label_key, run_key, method, backends_json, hyperparams_json, concept_set_id, created_at "
                       "FROM label_runs").fetchall()
    for label_key, run_key, method, backends_json, hyperparams_json, concept_set_id, created_at in runs:
        rows = con.execute("SELECT label_key, run_key, neuron, method, rank, label, score, calibrated, backend, extra_json "
                           "FROM labels WHERE label_key = ? ORDER BY neuron, rank", [label_key]).df()
        part = _created_part_id(created_at, label_key)
        columns: dict[str, Any] = {c: rows[c].tolist() for c in rows.columns}
        columns["part"] = [part] * len(rows)
        _write_parquet(store.label_dir(label_key) / f"full-{part}.parquet", "labels", columns)
        store._write_label_meta(label_key, run_key, method, backends_json, hyperparams_json, concept_set_id, created_at)
    return len(runs)


def _export_records(store: Store, con) -> int:
    rows = con.execute("SELECT namespace, key, value_json, created_at FROM kv").fetchall()
    for namespace, key, value_json, created_at in rows:
        atomic_write_json(store._record_path(namespace, key), {"key": key, "value": json.loads(value_json), "created_at": created_at})
    return len(rows)


def _export_llm_calls(store: Store, con) -> int:
    columns = [r[0] for r in con.execute("DESCRIBE llm_calls").fetchall()]
    rows = [dict(zip(columns, r)) for r in con.execute("SELECT * FROM llm_calls ORDER BY recording_id, seq").fetchall()]
    by_recording: dict[str, list[dict]] = {}
    for row in rows:
        by_recording.setdefault(row["recording_id"], []).append(row)
    for recording_id, calls in by_recording.items():
        path = store.llm_calls_dir(recording_id) / "migrated.jsonl"
        path.unlink(missing_ok=True)  # an interrupted earlier migration may have left half of it
        store.append_llm_calls(recording_id, "migrated", calls)
    return len(rows)


def _log_likelihood_exporter(table: str, model_column: str, value_column: str):
    def export(store: Store, con) -> int:
        rows = con.execute(f"SELECT {model_column}, text, {value_column} FROM {table}").fetchall()
        by_model: dict[str, dict[str, float]] = {}
        for model_id, text, value in rows:
            by_model.setdefault(model_id, {})[text] = float(value)
        for model_id, scores in by_model.items():
            store.add_log_likelihoods(model_id, scores)
        return len(rows)

    return export


_EXPORTS = (
    ("probe_sets", _export_probe_sets),
    ("runs", _export_runs),
    ("label_runs", _export_labels),
    ("kv", _export_records),
    ("llm_calls", _export_llm_calls),
    ("lm_log_likelihood", _log_likelihood_exporter("lm_log_likelihood", "lm_id", "log_likelihood")),
    ("llm_loglik_cache", _log_likelihood_exporter("llm_loglik_cache", "model_id", "loglik")),
)

