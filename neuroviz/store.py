"""The cache of one workspace: every table, every file and every path under ``cache/``.

Results that jobs produce are immutable files, written under a temporary name and renamed
(:mod:`neuroviz.files`), and read in place by DuckDB through one in-memory connection per
process (a cursor per call). No reader ever takes a lock and no process opens a database
file read-write for results, so a page reads while an extraction and a labelling job write.
Each result has a commit file written last: until it appears the result does not exist, so
a job killed at any moment leaves the old state or the new one, never half of one.

Layout under the workspace root (``CacheLayout`` names every path)::

    runs/<run_key>/run.json          the commit point of a run: RunInfo (written last)
                   topk.parquet      neuron, rank, image_idx, image_id, activation (sorted by neuron, rank)
                   stats.parquet     neuron, mean, std, min, max, q99, q995
                   acts.npy          images x neurons, float32
                   maps.npy          neurons x k x h x w, float16 (each neuron's top-k images only)
                   hist.npz          per-neuron histograms (counts, edges)
                   sketches.npz      merged NeuronStats: moments and KLL sketches of the pooled
                                     activations and of the map cells (MILAN's mask level); runs
                                     stored before sketches lack it (mask level then approximate)
                   partial/          the shards of an unfinished extraction (neuroviz.shards)
                   .writer.lock      held (flock) by the process extracting the run; deleted when it ends
    dictionaries/<key>/dictionary.npz, meta.json   SAE latents or user directions (neuroviz.units)
    probesets/<probe_set_id>/meta.json    name, source, sizes, skipped files (written last)
                             images.parquet  idx, image_id, path, label
    probesets/scan-<key>.json        memo of image checks per (path, size, mtime) of a source
    labels/<label_key>/meta.json     run_key, method, backends_json, hyperparams_json,
                                     concept_set_id, created_at (written after each save)
                       part-<id>.parquet  one save_labels call: label_key, run_key, neuron,
                                     method, rank, label, score, calibrated, backend,
                                     extra_json, part. Per neuron the newest part wins.
                       full-<id>.parquet  a save that replaced every neuron: older parts are dead
                       merged-<id>-<random>.parquet  the resolved rows of every part up to <id>
                                     (written once a key has many parts; its inputs deleted)
    records/<namespace>/<key>.json   small key-value records (audits, edits, synthesis, views)
    llm/calls/<recording_id>/<writer>.jsonl  every call of a recorded language model, one
                                     JSON line each, appended (a torn last line is ignored)
    llm/loglik/<model>/part-<id>.parquet  text, loglik: the one log-likelihood cache
    arrays/<kind>/<key>.npy          other dense artefacts keyed by provenance (image
                                     embeddings of a probe set, priors, predictions, ...)
    thumbs/                          rendered thumbnails and mosaics (neuroviz.images)
    jobs/<job_id>.json, .log         background job records (neuroviz.jobs)
    demo/, downloads/                the demo probe set and the packages it was cut from
    synthesis/                       PNG grids written by ``python -m neuroviz synthesize``
    tmp/                             scratch space of long methods (NetDissect)
    generation                       rewritten after every commit: ``Store.version()``
    studies.*                        the rater studies' own database (neuroviz.study): the
                                     small mutable state, one writer
    neuroviz.duckdb                  the cache before this layout; migrated once on first
                                     open (``migrated.json`` marks it done, ``.migration.lock``
                                     lets one process do it), then unused
    models/, concepts/               Gemma and word lists saved before the shared cache:
                                     adopted from there (hard links) on first use

Part ids are ``<time_ns>-<random>``, so they sort by age and two writers never collide.
Column types of every Parquet table are in ``TABLES`` below.
Everything that does not depend on the workspace (the dequantised Gemma, concept word lists,
text embeddings, image embeddings by content hash) lives in the shared cache
(:class:`SharedCache`, ``store.shared``), so a second workspace computes none of it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import NeurovizError
from .files import (
    array_row_blocks,
    atomic_link,
    atomic_open,
    atomic_save_npy,
    atomic_save_npy_blocks,
    atomic_savez,
    atomic_write_json,
    atomic_write_text,
)

DEFAULT_CACHE = Path(os.environ.get("NEUROVIZ_CACHE", Path(__file__).resolve().parent.parent / "cache"))
SHARED_CACHE_ENV = "NEUROVIZ_SHARED_CACHE"

#: Column types of every table, as DuckDB reads them from the Parquet files.
TABLES: dict[str, dict[str, str]] = {
    "probe_images": {"idx": "INTEGER", "image_id": "VARCHAR", "path": "VARCHAR", "label": "VARCHAR"},
    "shard_topk": {"neuron": "INTEGER", "rank": "INTEGER", "image_idx": "INTEGER", "activation": "FLOAT"},
    "topk": {"neuron": "INTEGER", "rank": "INTEGER", "image_idx": "INTEGER", "image_id": "VARCHAR", "activation": "FLOAT"},
    "neuron_stats": {"neuron": "INTEGER", "mean": "FLOAT", "std": "FLOAT", "min": "FLOAT", "max": "FLOAT",
                     "q99": "FLOAT", "q995": "FLOAT"},
    "labels": {"label_key": "VARCHAR", "run_key": "VARCHAR", "neuron": "INTEGER", "method": "VARCHAR", "rank": "INTEGER",
               "label": "VARCHAR", "score": "DOUBLE", "calibrated": "DOUBLE", "backend": "VARCHAR",
               "extra_json": "VARCHAR", "part": "VARCHAR"},
    "log_likelihoods": {"text": "VARCHAR", "loglik": "DOUBLE"},
}
LABEL_RUN_COLUMNS = ("label_key", "run_key", "method", "backends_json", "hyperparams_json", "concept_set_id",
                     "n_neurons", "created_at")
PROBE_SET_COLUMNS = ("probe_set_id", "name", "source", "n_images", "n_skipped", "created_at")
LABEL_COLUMNS = "neuron, method, rank, label, score, calibrated, backend, label_key, extra_json"
TOPK_ROW_GROUP = 8192  # rows per Parquet row group: one neuron's top-k reads one group


class LegacyCacheLockedError(NeurovizError, RuntimeError):
    """The cache from before the file layout is held by another process, so it cannot be migrated."""


class CacheUnusableError(NeurovizError, OSError):
    """The cache folder cannot be created or written (under a file, read-only, no permission)."""


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
    units: str = "neurons"  # or "sae:<key>" / "directions:<key>" (neuroviz.units); absent in older run.json


@dataclass(frozen=True)
class LabelRow:
    """One label of one neuron by one method (rank 0 is the method's answer)."""

    neuron: int
    rank: int
    label: str
    score: float | None  # None when read back from labels stored without a score (NaN)
    calibrated: float | None = None
    extra: dict | None = None


@dataclass(frozen=True)
class TopK:
    """A run's top-k table as arrays: image index and activation per (neuron, rank)."""

    image_idx: np.ndarray  # (n_neurons, k) int
    activation: np.ndarray  # (n_neurons, k) float32


class ProbeRow(NamedTuple):
    """One probe image: its file, its probe label ("" without one) and its content id."""

    path: str
    label: str
    image_id: str


class ProbeFiles:
    """A probe set's images in activation-row order (index = row in activations), read in place.

    A page shows a few hundred images of a probe set that may hold millions, so rows are read
    from the probe set's Parquet file only when asked for (:meth:`rows`: one DuckDB query per
    batch) and kept once read; nothing reads the whole set unless a caller iterates over it.
    ``paths``, ``labels`` and ``image_ids`` are sequences over the same rows (an item each is
    one read: batch with :meth:`rows` first when reading many). Safe to share between threads.
    """

    KEEP = 1 << 16  # rows kept once read; past this the kept rows are dropped (memory stays bounded)
    BLOCK = 1 << 16  # rows per query when iterating over a whole column

    def __init__(self, source: Path | None, n_images: int):
        self._source = source
        self._n = int(n_images) if source is not None else 0
        self._kept: dict[int, ProbeRow] = {}
        self._lock = threading.Lock()
        self.rows_read = 0  # rows read from the file so far (what a page costs; tests check it)

    @classmethod
    def empty(cls) -> ProbeFiles:
        return cls(None, 0)

    def __len__(self) -> int:
        return self._n

    @property
    def paths(self) -> ProbeColumn:
        return ProbeColumn(self, 0)

    @property
    def labels(self) -> ProbeColumn:
        return ProbeColumn(self, 1)

    @property
    def image_ids(self) -> ProbeColumn:
        return ProbeColumn(self, 2)

    def _index(self, idx: int) -> int:
        i = int(idx)
        if not -self._n <= i < self._n:
            raise IndexError(f"probe image {idx} is outside 0..{self._n - 1}")
        return i % self._n

    def rows(self, idxs: Iterable[int]) -> list[ProbeRow]:
        """The rows of ``idxs`` (in that order), reading those not yet read in one query."""
        wanted = [self._index(i) for i in idxs]
        with self._lock:
            known = {i: self._kept[i] for i in wanted if i in self._kept}
        missing = sorted(set(wanted) - known.keys())
        if missing:
            found = self._read("WHERE idx BETWEEN ? AND ? AND idx IN (SELECT unnest(?))", [missing[0], missing[-1], missing])
            known.update(found)
            with self._lock:
                if len(self._kept) + len(found) > self.KEEP:
                    self._kept.clear()
                self._kept.update(found)
        return [known[i] for i in wanted]

    def row(self, idx: int) -> ProbeRow:
        return self.rows([idx])[0]

    def __iter__(self) -> Iterator[ProbeRow]:
        """Every row in order, a block per query (rows read this way are not kept)."""
        for start in range(0, self._n, self.BLOCK):
            block = self._read("WHERE idx >= ? AND idx < ?", [start, start + self.BLOCK])
            yield from (block[i] for i in range(start, min(self._n, start + self.BLOCK)))

    def _read(self, where: str, params: list) -> dict[int, ProbeRow]:
        assert self._source is not None  # an empty set has no index to ask for
        found = _query("probe_images", [self._source], f"SELECT idx, path, label, image_id FROM {{src}} {where}", params,
                       frame=False)
        with self._lock:
            self.rows_read += len(found)
        return {int(r[0]): ProbeRow(_stored_path(r[1]), r[2] or "", r[3]) for r in found}


class ProbeColumn(Sequence[str]):
    """One field of every row of a :class:`ProbeFiles` (its paths, labels or image ids), read on demand."""

    def __init__(self, files: ProbeFiles, field: int):
        self._files, self._field = files, field

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return tuple(row[self._field] for row in self._files.rows(range(*item.indices(len(self)))))
        return self._files.row(item)[self._field]

    def __iter__(self) -> Iterator[str]:
        return (row[self._field] for row in self._files)

    def __eq__(self, other: object) -> bool:
        """Equal to a tuple, list or column of the same strings (reads the whole column)."""
        if not isinstance(other, (ProbeColumn, tuple, list)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class RunTables:
    """Everything the pages read about one run: labels, top-k, statistics, probe files."""

    labels: Any  # DataFrame as Store.labels returns it
    top: TopK
    stats: Any  # DataFrame as Store.neuron_stats returns it
    files: ProbeFiles


@dataclass(frozen=True)
class StoreSnapshot:
    """What the cache holds, in one read: runs, probe sets and label runs (oldest first)."""

    runs: tuple[RunInfo, ...] = ()
    probe_sets: tuple[dict, ...] = ()
    label_runs: tuple[dict, ...] = ()


def histograms(acts: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron histograms over each neuron's own [min, max], all neurons in one pass."""
    n_neurons = acts.shape[1]
    width = np.where(hi > lo, hi - lo, 1e-6).astype(np.float64)
    edges = lo[:, None] + width[:, None] * np.linspace(0.0, 1.0, bins + 1)[None, :]
    bin_idx = np.clip(((acts - lo) / width * bins).astype(np.int64), 0, bins - 1)  # the max falls in the last bin
    flat = bin_idx + np.arange(n_neurons)[None, :] * bins
    counts = np.bincount(flat.ravel(), minlength=n_neurons * bins).reshape(n_neurons, bins).astype(np.int32)
    return counts, edges.astype(np.float32)


# --------------------------------------------------------------------------------------
# Reading: one in-memory DuckDB per process, a cursor per call
# --------------------------------------------------------------------------------------
_duck: Any = None
_duck_pid = 0
_duck_lock = threading.Lock()


def _cursor():
    """A fresh cursor on this process's in-memory DuckDB (created on first use, again after a fork)."""
    global _duck, _duck_pid
    with _duck_lock:
        if _duck is None or _duck_pid != os.getpid():
            import duckdb

            _duck, _duck_pid = duckdb.connect(":memory:"), os.getpid()
        return _duck.cursor()


def _source(table: str, files: Sequence[Path]) -> tuple[str, list]:
    """SQL for the rows of ``files`` (an empty, typed relation when there are none) and its parameter."""
    if files:
        return "read_parquet(?)", [[str(f) for f in files]]
    columns = ", ".join(f"CAST(NULL AS {kind}) AS \"{name}\"" for name, kind in TABLES[table].items())
    return f"(SELECT {columns} LIMIT 0)", []


def _vanished(exc: Exception) -> bool:
    text = str(exc)
    return isinstance(exc, FileNotFoundError) or "No files found" in text or "No such file" in text


def _retrying(read: Callable[[], Any], attempts: int = 4) -> Any:
    """Run a read that lists files first, again if a file vanished in between (a compaction)."""
    for attempt in range(attempts):
        try:
            return read()
        except Exception as exc:
            if attempt == attempts - 1 or not _vanished(exc):
                raise
    raise AssertionError("unreachable")


def _query(table: str, files: Sequence[Path], sql: str, params: Sequence[Any] = (), frame: bool = True):
    """Run ``sql`` with ``{src}`` standing for the rows of ``files``; a DataFrame or a row list."""
    src, src_params = _source(table, files)
    cur = _cursor()
    try:
        result = cur.execute(sql.format(src=src), [*src_params, *params])
        return result.df() if frame else result.fetchall()
    finally:
        cur.close()


def _write_parquet(path: Path, table: str, columns: dict[str, Any], row_group_size: int | None = None) -> None:
    """Write ``columns`` as ``table``'s Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds = {"INTEGER": pa.int32(), "VARCHAR": pa.string(), "FLOAT": pa.float32(), "DOUBLE": pa.float64(), "BIGINT": pa.int64()}
    schema = pa.schema([(name, kinds[kind]) for name, kind in TABLES[table].items()])
    arrays = [pa.array(_plain(columns[name]), type=schema.field(name).type, from_pandas=True) for name in schema.names]
    with atomic_open(path, "wb", suffix=".tmp.parquet") as fh:
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), fh, row_group_size=row_group_size)


def _plain(values: Any) -> Any:
    return values.tolist() if isinstance(values, np.ndarray) and values.dtype == object else values


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def safe_name(key: str) -> str:
    """A file name for any key: itself when plain, else percent-encoded (long keys hashed)."""
    if _SAFE_NAME.fullmatch(key):
        return key
    quoted = urllib.parse.quote(key, safe="-_~").replace(".", "%2E")
    if len(quoted) <= 150:
        return quoted
    from .provenance import provenance_key

    return quoted[:100] + "~" + provenance_key(key, 24)


def new_part_id() -> str:
    """``<time_ns>-<random>``: sorts by age, unique across processes."""
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}"


def _part_key(path: Path) -> tuple[str, str]:
    """(kind, id) of a part file: ``part-<id>``, ``full-<id>``, ``merged-<newest input id>-<random>``."""
    kind, rest = path.stem.split("-", 1)
    return kind, "-".join(rest.split("-")[:2])


def _part_files(folder: Path) -> list[tuple[str, str, Path]]:
    """(kind, id, path) of every committed part file in ``folder`` (temporary files excluded)."""
    try:
        paths = [p for p in folder.iterdir() if p.suffix == ".parquet" and p.name.startswith(("part-", "full-", "merged-"))]
    except OSError:
        return []
    return [(*_part_key(p), p) for p in paths]


def _storable_path(path: str) -> str:
    """``path`` as Parquet can hold it: itself, or its ``file:`` URI when its name is not UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))


def _stored_path(text: str) -> str:
    """The path :func:`_storable_path` stored (stored paths are absolute, so only a URI starts with ``file:``)."""
    if text.startswith("file://"):
        return os.fsdecode(urllib.parse.unquote_to_bytes(text[len("file://"):]))
    return text


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------
class CacheLayout:
    """Every path under a workspace cache, by name (no I/O: cheap to build from a root)."""

    LEGACY_DB = "neuroviz.duckdb"

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run_key: str) -> Path:
        return self.runs_dir() / run_key

    def partial_dir(self, run_key: str) -> Path:
        """Resumable chunks of an unfinished extraction (deleted when the run is finished)."""
        return self.run_dir(run_key) / "partial"

    def dictionaries_dir(self) -> Path:
        return self.root / "dictionaries"

    def dictionary_dir(self, key: str) -> Path:
        """An SAE's or a set of directions' arrays and meta (neuroviz.units), by provenance key."""
        return self.dictionaries_dir() / safe_name(key)

    def probe_sets_dir(self) -> Path:
        return self.root / "probesets"

    def probe_set_dir(self, probe_set_id: str) -> Path:
        return self.probe_sets_dir() / probe_set_id

    def scan_memo_path(self, source_key: str) -> Path:
        """Where :mod:`neuroviz.datasets` remembers image checks of one source."""
        return self.probe_sets_dir() / f"scan-{source_key}.json"

    def labels_dir(self) -> Path:
        return self.root / "labels"

    def label_dir(self, label_key: str) -> Path:
        return self.labels_dir() / safe_name(label_key)

    def records_dir(self, namespace: str) -> Path:
        return self.root / "records" / safe_name(namespace)

    def llm_calls_dir(self, recording_id: str) -> Path:
        return self.root / "llm" / "calls" / safe_name(recording_id)

    def log_likelihood_dir(self, model_id: str) -> Path:
        from .provenance import provenance_key

        return self.root / "llm" / "loglik" / provenance_key(model_id)

    def array_path(self, kind: str, key: str) -> Path:
        return self.root / "arrays" / kind / f"{key}.npy"

    def thumbs_dir(self) -> Path:
        return self.root / "thumbs"

    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def demo_dir(self) -> Path:
        """The demo probe set (its downloads sit beside it, in ``downloads/``)."""
        return self.root / "demo"

    def synthesis_dir(self) -> Path:
        return self.root / "synthesis"

    def studies_file(self) -> Path:
        """The SQLite file of the workspace's studies, votes and raters (neuroviz.study.storage)."""
        return self.root / "studies.sqlite"

    def scratch_dir(self) -> Path:
        """Scratch space for long methods; created on demand."""
        path = self.root / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def legacy_models_dir(self) -> Path:
        """Where models were saved before the shared cache (adopted from there once)."""
        return self.root / "models"

    def legacy_concepts_dir(self) -> Path:
        """Where word lists were saved before the shared cache (adopted from there once)."""
        return self.root / "concepts"

    def generation_path(self) -> Path:
        return self.root / "generation"

    def legacy_db_path(self) -> Path:
        return self.root / self.LEGACY_DB

    def migration_marker(self) -> Path:
        return self.root / "migrated.json"

    def migration_lock_path(self) -> Path:
        return self.root / ".migration.lock"


class Store(CacheLayout):
    """The cache of one workspace. Cheap to construct; holds no open file.

    ``shared`` is the cache of what does not depend on the workspace (default: the user's
    cache directory, or ``$NEUROVIZ_SHARED_CACHE``). ``lock_timeout`` bounds how long the
    one-time migration of an old cache waits for another process to release it.
    """

    def __init__(self, root: Path | str = DEFAULT_CACHE, lock_timeout: float = 30.0, shared: SharedCache | None = None):
        super().__init__(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheUnusableError(f"Cannot use the cache folder {self.root}: {exc.strerror or exc}.") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CacheUnusableError(f"Cannot use the cache folder {self.root}: it is not writable (read-only or no permission).")
        self.lock_timeout = lock_timeout
        self._shared = shared
        if self.legacy_db_path().exists() and not self.migration_marker().exists():
            from .store_migration import migrate_legacy_cache

            migrate_legacy_cache(self)

    @property
    def shared(self) -> SharedCache:
        if self._shared is None:
            self._shared = SharedCache.default()
        return self._shared

    # -- versions ---------------------------------------------------------------------
    def version(self) -> tuple:
        """A fingerprint that changes on every commit (one stat call): cache keys for the pages."""
        try:
            s = os.stat(self.generation_path())
        except OSError:
            return (0, 0)
        return (s.st_mtime_ns, s.st_ino)

    def _committed(self) -> None:
        atomic_write_text(self.generation_path(), new_part_id())

    # -- dense arrays ------------------------------------------------------------------
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
        A path whose name is not UTF-8 (which Parquet cannot hold) is stored as its ``file:``
        URI (percent-encoded bytes: lossless) and read back as the path.
        """
        folder = self.probe_set_dir(ps.id)
        meta_path = folder / "meta.json"
        if meta_path.exists():
            stored = self.probe_images(ps.id)
            if [r["image_id"] for r in stored] == [im.image_id for im in ps.images] and \
                    all(r["path"] == im.path for r, im in zip(stored, ps.images)):
                return
            paths = [im.path if r["image_id"] == im.image_id else r["path"] for r, im in zip(stored, ps.images)]
            self._write_probe_images(folder, [r["image_id"] for r in stored], paths, [r["label"] for r in stored])
            self._committed()
            return
        self._write_probe_images(folder, [im.image_id for im in ps.images], [im.path for im in ps.images],
                                 [im.label for im in ps.images])
        atomic_write_json(meta_path, {"probe_set_id": ps.id, "name": ps.name, "source": ps.source, "n_images": len(ps),
                                      "n_skipped": ps.n_skipped, "skipped": ps.skipped, "created_at": time.time()})
        self._committed()

    def _write_probe_images(self, folder: Path, image_ids: Sequence[str], paths: Sequence[str], labels: Sequence[str | None]) -> None:
        _write_parquet(folder / "images.parquet", "probe_images", {
            "idx": np.arange(len(image_ids), dtype=np.int32), "image_id": list(image_ids),
            "path": [_storable_path(p) for p in paths], "label": list(labels)})

    def probe_sets(self) -> list[dict]:
        """Every registered probe set (oldest first): id, name, source, sizes, created_at."""
        metas = [_read_json(p) for p in self.probe_sets_dir().glob("*/meta.json")]
        rows = [{c: m.get(c) for c in PROBE_SET_COLUMNS} for m in metas if m]
        return sorted(rows, key=lambda r: r["created_at"] or 0.0)

    def probe_images(self, probe_set_id: str, idxs: Sequence[int] | None = None) -> list[dict]:
        """A probe set's images in idx order (idx = row of the activations): idx, image_id, path, label.

        ``idxs`` reads only those rows (a page or an audit showing a few images of a large set).
        """
        path = self.probe_set_dir(probe_set_id) / "images.parquet"
        if not _SAFE_NAME.fullmatch(probe_set_id) or not path.exists():
            return []
        where, params = ("WHERE list_contains(?, idx)", [[int(i) for i in idxs]]) if idxs is not None else ("", [])
        rows = _query("probe_images", [path], f"SELECT idx, image_id, path, label FROM {{src}} {where} ORDER BY idx", params,
                      frame=False)
        return [{"idx": r[0], "image_id": r[1], "path": _stored_path(r[2]), "label": r[3]} for r in rows]

    def probe_files(self, probe_set_id: str) -> ProbeFiles:
        """A probe set's paths, labels and ids (index = row in activations), read row by row
        as they are asked for (:class:`ProbeFiles`); empty for an unknown probe set."""
        path = self.probe_set_dir(probe_set_id) / "images.parquet"
        if not _SAFE_NAME.fullmatch(probe_set_id) or not path.exists():
            return ProbeFiles.empty()
        n_images = _query("probe_images", [path], "SELECT count(*) FROM {src}", frame=False)[0][0]  # from the footer
        return ProbeFiles(path, n_images)

    # -- activation runs ----------------------------------------------------------------
    def get_run(self, run_key: str) -> RunInfo | None:
        if not _SAFE_NAME.fullmatch(run_key):
            return None
        return _run_info(_read_json(self.run_dir(run_key) / "run.json"))

    def find_runs(self, model_spec: str | None = None, probe_set_id: str | None = None, layer: str | None = None) -> list[RunInfo]:
        """Finished runs (oldest first), optionally of one model, probe set or layer."""
        runs = [r for r in (_run_info(_read_json(p)) for p in self.runs_dir().glob("*/run.json")) if r is not None]
        runs = [r for r in runs if (model_spec is None or r.model_spec == model_spec)
                and (probe_set_id is None or r.probe_set_id == probe_set_id) and (layer is None or r.layer == layer)]
        return sorted(runs, key=lambda r: r.created_at)

    def finish_run(self, info: RunInfo, acts: np.ndarray, top_values: np.ndarray, top_indices: np.ndarray,
                   image_ids: Sequence[str], maps: np.ndarray | None, hist_bins: int = 50) -> None:
        """Store a finished extraction given as dense arrays (no map sketch: the mask level of
        such a run is estimated from its top-k maps). See :meth:`write_run`."""
        from .sketches import NeuronStats

        acts = np.asarray(acts, dtype=np.float32)
        stats = NeuronStats(acts.shape[1], spatial=False)
        stats.update(acts)
        self.write_run(info, lambda: array_row_blocks([acts]), top_values, top_indices, image_ids, maps, stats, hist_bins)

    def write_run(self, info: RunInfo, acts_blocks: Callable[[], Iterable[np.ndarray]], top_values: np.ndarray,
                  top_indices: np.ndarray, image_ids: Sequence[str], maps: np.ndarray | None, stats,
                  hist_bins: int = 50, ready_files: Mapping[str, Path] | None = None) -> None:
        """Store a finished extraction: arrays and tables first, ``run.json`` last.

        ``acts_blocks()`` gives the activations' row blocks in order (called twice, each a
        stream: the matrix is never whole in memory, see :func:`~neuroviz.files.npy_row_blocks`); ``stats`` is their merged
        :class:`~neuroviz.sketches.NeuronStats`. ``ready_files`` names files that already hold
        ``acts.npy`` or ``maps.npy`` exactly (one shard's): they are linked in, not rewritten.
        Until ``run.json`` appears the run does not exist, so a crash in between leaves nothing
        half-visible and the extraction reduces again.
        """
        run_dir = self.run_dir(info.run_key)
        n_neurons = int(stats.n_neurons)
        shape = (int(stats.count), n_neurons)
        ready = dict(ready_files or {})
        if "acts.npy" in ready:
            atomic_link(ready["acts.npy"], run_dir / "acts.npy")
        else:
            atomic_save_npy_blocks(run_dir / "acts.npy", shape, acts_blocks())
        if "maps.npy" in ready:
            atomic_link(ready["maps.npy"], run_dir / "maps.npy")
        elif maps is not None:
            atomic_save_npy(run_dir / "maps.npy", np.asarray(maps, dtype=np.float16))
        lo = np.where(stats.count, stats.lo, 0).astype(np.float32)
        hi = np.where(stats.count, stats.hi, 0).astype(np.float32)
        counts = np.zeros((n_neurons, hist_bins), dtype=np.int64)
        edges = np.zeros((n_neurons, hist_bins + 1), dtype=np.float32)
        for block in acts_blocks():  # the edges are fixed by the merged min and max: counts add up
            part_counts, edges = histograms(np.asarray(block), lo, hi, hist_bins)
            counts += part_counts
        atomic_savez(run_dir / "hist.npz", counts=counts.astype(np.int32), edges=edges)
        atomic_savez(run_dir / "sketches.npz", **stats.to_arrays())
        n_neurons, k = top_indices.shape
        idx_col = top_indices.reshape(-1).astype(np.int32)
        _write_parquet(run_dir / "topk.parquet", "topk", {
            "neuron": np.repeat(np.arange(n_neurons, dtype=np.int32), k), "rank": np.tile(np.arange(k, dtype=np.int32), n_neurons),
            "image_idx": idx_col, "image_id": np.asarray(image_ids, dtype=object)[idx_col].tolist(),
            "activation": top_values.reshape(-1).astype(np.float32)}, row_group_size=TOPK_ROW_GROUP)
        qs = stats.quantiles([0.99, 0.995])
        _write_parquet(run_dir / "stats.parquet", "neuron_stats", {
            "neuron": np.arange(n_neurons, dtype=np.int32), "mean": stats.mean.astype(np.float32),
            "std": stats.std.astype(np.float32), "min": lo, "max": hi, "q99": qs[0], "q995": qs[1]})
        self._commit_run(info, time.time())

    def _commit_run(self, info: RunInfo, created_at: float) -> None:
        row = asdict(info)
        row["map_shape"] = list(info.map_shape) if info.map_shape else None
        row["created_at"] = created_at
        atomic_write_json(self.run_dir(info.run_key) / "run.json", row)
        self._committed()

    def activations(self, run_key: str, mmap: bool = True) -> np.ndarray:
        """Pooled activations, images x neurons (memory-mapped by default)."""
        return np.load(self.run_dir(run_key) / "acts.npy", mmap_mode="r" if mmap else None)

    def top_maps(self, run_key: str, neuron: int) -> np.ndarray | None:
        """The spatial maps (k x h x w) of one neuron's top-k images, in rank order."""
        path = self.run_dir(run_key) / "maps.npy"
        if not path.exists():
            return None
        return np.asarray(np.load(path, mmap_mode="r")[neuron], dtype=np.float32)

    def _run_table(self, run_key: str, name: str) -> list[Path]:
        path = self.run_dir(run_key) / f"{name}.parquet"
        return [path] if _SAFE_NAME.fullmatch(run_key) and path.exists() else []

    def top_images(self, run_key: str, neuron: int, k: int = 16) -> list[dict]:
        """One neuron's top-k images: rank, image index in the probe set, id, activation."""
        rows = _query("topk", self._run_table(run_key, "topk"),
                      "SELECT rank, image_idx, image_id, activation FROM {src} WHERE neuron = ? AND rank < ? ORDER BY rank",
                      [int(neuron), int(k)], frame=False)
        return [dict(zip(("rank", "image_idx", "image_id", "activation"), r)) for r in rows]

    def top_indices(self, run_key: str) -> np.ndarray:
        """neurons x k matrix of top image indices (for vectorised methods)."""
        return self.top_k(run_key).image_idx

    def top_k(self, run_key: str) -> TopK:
        """Every neuron's top images of a run as (neurons x k) arrays."""
        top = _query("topk", self._run_table(run_key, "topk"), "SELECT neuron, image_idx, activation FROM {src} ORDER BY neuron, rank")
        n_neurons = int(top["neuron"].max()) + 1 if len(top) else 0
        k = len(top) // n_neurons if n_neurons else 0
        return TopK(top["image_idx"].to_numpy(dtype=np.int64).reshape(n_neurons, k),
                    top["activation"].to_numpy(dtype=np.float32).reshape(n_neurons, k))

    def neuron_stats(self, run_key: str):
        """DataFrame: neuron, mean, std, min, max, q99, q995."""
        return _query("neuron_stats", self._run_table(run_key, "stats"),
                      "SELECT neuron, mean, std, min, max, q99, q995 FROM {src} ORDER BY neuron")

    def histogram(self, run_key: str, neuron: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.run_dir(run_key) / "hist.npz") as h:
            return h["counts"][neuron], h["edges"][neuron]

    def mask_levels(self, run_key: str, quantile: float) -> np.ndarray | None:
        """Per neuron, the ``quantile`` level of its map cells over the whole probe set (MILAN's
        mask level), from the run's sketch; None for runs stored without one."""
        path = self.run_dir(run_key) / "sketches.npz"
        try:
            stamp = (str(path), os.stat(path).st_mtime_ns, float(quantile))
        except OSError:
            return None
        if stamp not in _mask_level_memo:
            from .sketches import NeuronStats

            with np.load(path) as arrays:
                if "spatial_bytes" not in arrays.files:
                    return None
                level = NeuronStats.from_arrays(arrays).spatial_level(quantile)
            if len(_mask_level_memo) > 64:
                _mask_level_memo.clear()
            _mask_level_memo[stamp] = level
        return _mask_level_memo[stamp]

    def mask_level(self, run_key: str, neuron: int, quantile: float) -> float | None:
        """One neuron's value of :meth:`mask_levels`, read from its own sketch only (a page
        showing one neuron: all of a 512-neuron layer's sketches take ~0.4 s, one takes ~20 ms)."""
        from datasketches import vector_of_kll_floats_sketches

        from .sketches import top_fraction_level

        path = self.run_dir(run_key) / "sketches.npz"
        if not _SAFE_NAME.fullmatch(run_key) or not path.exists():
            return None
        with np.load(path) as arrays:
            if "spatial_bytes" not in arrays.files:
                return None
            offsets = arrays["spatial_offsets"]
            if not 0 <= neuron < len(offsets) - 1:
                return None
            one = vector_of_kll_floats_sketches(int(arrays["spatial_k"]), 1)
            one.deserialize(arrays["spatial_bytes"][offsets[neuron]:offsets[neuron + 1]].tobytes(), 0)
            return float(top_fraction_level(one, int(arrays["cells"]), quantile)[0])

    def clean_run_leftovers(self, run_key: str) -> None:
        """Remove what a killed writer left in a run's folder: temporary files, and ``partial/``
        once the run is committed. Call it only while holding :meth:`run_writer_lock`."""
        from .files import remove_temporaries

        run_dir = self.run_dir(run_key)
        remove_temporaries(run_dir)
        partial = self.partial_dir(run_key)
        if self.get_run(run_key) is not None:
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.is_dir():
            remove_temporaries(partial, recursive=True)

    @contextlib.contextmanager
    def run_writer_lock(self, run_key: str) -> Iterator[bool]:
        """Try to become the one process writing a run (no wait): yields whether this process
        holds the lock. The lock dies with its process, so a killed writer never keeps it.

        The holder deletes the lock file before it lets go, so no empty file stays behind. A
        process that opened the file before the deletion may lock the deleted file afterwards:
        it then sees that the path no longer names the file it locked and tries again on a
        fresh one, so two processes never both hold a lock on what the path names."""
        path = self.run_dir(run_key) / ".writer.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with open(path, "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    yield False
                    return
                try:
                    current = os.stat(path).st_ino
                except FileNotFoundError:
                    current = None
                if current != os.fstat(fh.fileno()).st_ino:
                    continue  # locked a file its holder had already deleted
                try:
                    yield True
                finally:
                    path.unlink(missing_ok=True)  # while still holding it: see above
                    fcntl.flock(fh, fcntl.LOCK_UN)
                return

    def run_tables(self, run_key: str) -> RunTables:
        """Labels, top-k, statistics and probe files of a run: what a page reads about it."""
        info = self.get_run(run_key)
        files = self.probe_files(info.probe_set_id) if info is not None else ProbeFiles.empty()
        return RunTables(self.labels(run_key), self.top_k(run_key), self.neuron_stats(run_key), files)

    # -- labels -------------------------------------------------------------------------
    def _label_parts(self, folder: Path) -> list[Path]:
        """The live parts of one label key: the newest merged part unless a full part came
        after it, then the newest full part and every part after it."""
        files = _part_files(folder)
        merged = max((f for f in files if f[0] == "merged"), key=lambda f: f[1], default=None)
        floor = merged[1] if merged else ""
        rest = [f for f in files if f[0] != "merged" and f[1] > floor]
        cutoff = max((f[1] for f in rest if f[0] == "full"), default="")
        live = [f[2] for f in rest if f[1] >= cutoff]
        return sorted(live + ([merged[2]] if merged and not cutoff else []))

    def _label_metas(self) -> list[dict]:
        metas = [_read_json(p) for p in self.labels_dir().glob("*/meta.json")]
        return [m for m in metas if m]

    def _resolved_labels(self, folders: Iterable[Path], sql: str, params: Sequence[Any] = (), neuron: int | None = None) -> Any:
        """Run ``sql`` over ``resolved``: the live parts of ``folders`` where, per (label key,
        neuron), the newest part wins (only ``neuron``'s rows when given: read less)."""
        folders = list(folders)
        where, first = ("WHERE neuron = ? ", [int(neuron)]) if neuron is not None else ("", [])

        def read():
            files = [p for folder in folders for p in self._label_parts(folder)]
            resolved = f"WITH resolved AS (SELECT * FROM {{src}} {where}QUALIFY part = max(part) OVER (PARTITION BY label_key, neuron)) "
            return _query("labels", files, resolved + sql, [*first, *params])

        return _retrying(read)

    def labelled_neurons(self, label_key: str) -> list[int]:
        """Neurons that already have labels under ``label_key``."""
        df = self._resolved_labels([self.label_dir(label_key)], "SELECT DISTINCT neuron FROM resolved ORDER BY neuron")
        return [int(n) for n in df["neuron"]]

    def save_labels(self, label_key: str, run_key: str, method: str, backends: dict, hyperparams: dict,
                    concept_set_id: str | None, rows: Iterable[LabelRow], backend_name: str, replace_neurons: bool = False) -> None:
        """Store a method's labels for a run; with replace_neurons, only the given neurons'
        labels are replaced and the others under the same key are kept (on-demand methods).

        Each call writes one immutable part, so processes labelling different neurons of one
        key at once lose nothing; ``meta.json`` is rewritten after the part.
        """
        rows = list(rows)
        folder = self.label_dir(label_key)
        part = new_part_id()
        path = folder / f"{'part' if replace_neurons else 'full'}-{part}.parquet"
        _write_parquet(path, "labels", {
            "label_key": [label_key] * len(rows), "run_key": [run_key] * len(rows), "neuron": [int(r.neuron) for r in rows],
            "method": [method] * len(rows), "rank": [int(r.rank) for r in rows], "label": [r.label for r in rows],
            "score": [None if r.score is None else float(r.score) for r in rows],
            "calibrated": [None if r.calibrated is None else float(r.calibrated) for r in rows],
            "backend": [backend_name] * len(rows),
            "extra_json": [json.dumps(r.extra, default=str) if r.extra else None for r in rows],
            "part": [part] * len(rows)})
        self._write_label_meta(label_key, run_key, method, json.dumps(backends, sort_keys=True),
                               json.dumps(hyperparams, sort_keys=True, default=str), concept_set_id, time.time())
        self._merge_label_parts(folder)
        self._committed()

    def _merge_label_parts(self, folder: Path) -> None:
        """Once a key has more than MAX_PARTS files, merge those older than PART_GRACE into one.

        The merged part holds the resolved rows (each keeps its part id, so per-neuron
        resolution is unchanged) and stands for every file up to its newest input: a file that
        old was committed long before this listing, so none is left out. The inputs are
        deleted; a reader that listed one just before reads again.
        """
        files = _part_files(folder)
        old_enough = f"{time.time_ns() - int(PART_GRACE * 1e9):020d}"
        inputs = [f for f in files if f[1] < old_enough]
        if len(files) <= MAX_PARTS or len(inputs) < 2:
            return
        newest = max(f[1] for f in inputs)
        live = [p for p in self._label_parts(folder) if _part_key(p)[1] <= newest]
        try:
            rows = _query("labels", live, "SELECT * FROM {src} QUALIFY part = max(part) OVER (PARTITION BY label_key, neuron)")
        except Exception as exc:
            if _vanished(exc):
                return  # another process merged them first
            raise
        _write_parquet(folder / f"merged-{newest}-{secrets.token_hex(4)}.parquet", "labels",
                       {c: rows[c].tolist() for c in TABLES["labels"]})
        for _, _, path in inputs:
            path.unlink(missing_ok=True)

    def _write_label_meta(self, label_key: str, run_key: str, method: str, backends_json: str, hyperparams_json: str,
                          concept_set_id: str | None, created_at: float) -> None:
        atomic_write_json(self.label_dir(label_key) / "meta.json", {
            "label_key": label_key, "run_key": run_key, "method": method, "backends_json": backends_json,
            "hyperparams_json": hyperparams_json, "concept_set_id": concept_set_id, "created_at": created_at})

    def labels(self, run_key: str, neuron: int | None = None, method: str | None = None, top_only: bool = False,
               label_key: str | None = None):
        """DataFrame of labels for a run: neuron, method, rank, label, score, calibrated, backend, label_key, extra_json."""
        folders = [self.label_dir(m["label_key"]) for m in self._label_metas() if m.get("run_key") == run_key
                   and (method is None or m.get("method") == method) and (label_key is None or m["label_key"] == label_key)]
        where = "run_key = ?" + (" AND rank = 0" if top_only else "")
        return self._resolved_labels(folders, f"SELECT {LABEL_COLUMNS} FROM resolved WHERE {where} ORDER BY neuron, method, rank, label_key",
                                     [run_key], neuron=neuron)

    def label_runs(self, run_key: str | None = None):
        """DataFrame of label runs (oldest first): label_key, run_key, method, backends_json,
        hyperparams_json, concept_set_id, n_neurons, created_at."""
        import pandas as pd

        rows = self._label_run_rows(run_key)
        frame = pd.DataFrame(rows, columns=list(LABEL_RUN_COLUMNS))
        return frame.astype({"n_neurons": "int32", "created_at": "float64"})

    def _label_run_rows(self, run_key: str | None = None) -> list[dict]:
        """label_runs rows as dicts, with n_neurons counted from the live parts."""
        metas = [m for m in self._label_metas() if run_key is None or m.get("run_key") == run_key]
        if not metas:
            return []
        rows = [{**{c: m.get(c) for c in LABEL_RUN_COLUMNS}, "n_neurons": n}
                for m, n in zip(metas, self._neuron_counts([m["label_key"] for m in metas]))]
        return sorted(rows, key=lambda r: r["created_at"] or 0.0)

    def _neuron_counts(self, label_keys: list[str]) -> list[int]:
        """Labelled neurons per key. Part files never change and their names are never reused,
        so a count is remembered by the names of the parts it was made from."""
        def read() -> list[int]:
            names = {key: tuple(str(p) for p in self._label_parts(self.label_dir(key))) for key in label_keys}
            todo = [key for key in label_keys if names[key] not in _neuron_count_memo]
            if todo:
                counts = _query("labels", [Path(p) for key in todo for p in names[key]],
                                "SELECT label_key, count(DISTINCT neuron) FROM {src} GROUP BY label_key")
                found = dict(zip(counts.iloc[:, 0], counts.iloc[:, 1]))
                if len(_neuron_count_memo) > 4096:
                    _neuron_count_memo.clear()
                _neuron_count_memo.update({names[key]: int(found.get(key, 0)) for key in todo})
            return [_neuron_count_memo[names[key]] for key in label_keys]

        return _retrying(read)

    # -- small key-value records (audits, edits, synthesis manifests) --------------------
    def _record_path(self, namespace: str, key: str) -> Path:
        return self.records_dir(namespace) / f"{safe_name(key)}.json"

    def put_record(self, namespace: str, key: str, value: Any) -> None:
        atomic_write_json(self._record_path(namespace, key), {"key": key, "value": value, "created_at": time.time()})
        self._committed()

    def get_record(self, namespace: str, key: str) -> Any | None:
        record = _read_json(self._record_path(namespace, key))
        return record["value"] if record else None

    def list_records(self, namespace: str) -> list[tuple[str, Any, float]]:
        """(key, value, created_at) of a namespace, newest first."""
        found = [_read_json(p) for p in self.records_dir(namespace).glob("*.json")]
        records: list[dict] = sorted((r for r in found if r), key=lambda r: r["created_at"], reverse=True)
        return [(r["key"], r["value"], r["created_at"]) for r in records]

    def delete_record(self, namespace: str, key: str) -> None:
        self._record_path(namespace, key).unlink(missing_ok=True)
        self._committed()

    # -- language-model calls and the log-likelihood cache -------------------------------
    def append_llm_calls(self, recording_id: str, writer_id: str, calls: Sequence[dict]) -> None:
        """Append calls of one recording writer (one process's wrapper) to its own log file."""
        path = self.llm_calls_dir(recording_id) / f"{writer_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(c, default=str) + "\n" for c in calls)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)

    def llm_calls(self, recording_id: str) -> list[dict]:
        """The recorded calls of one recording, in call order (seq, then writer)."""
        calls = []
        for path in sorted(self.llm_calls_dir(recording_id).glob("*.jsonl")):
            calls.extend(_json_lines(path))
        return sorted(calls, key=lambda c: c.get("seq", 0))

    def llm_call_counts(self) -> dict[str, int]:
        """Number of recorded calls per recording id."""
        out: dict[str, int] = {}
        for folder in (self.root / "llm" / "calls").glob("*"):
            calls = [c for path in folder.glob("*.jsonl") for c in _json_lines(path)]
            if calls:
                out[str(calls[0].get("recording_id", urllib.parse.unquote(folder.name)))] = len(calls)
        return out

    def log_likelihoods(self, model_id: str) -> dict[str, float]:
        """Every text scored so far under ``model_id`` -> its total log-likelihood."""
        folder = self.log_likelihood_dir(model_id)

        def read():
            files = sorted(folder.glob("part-*.parquet"))
            return _query("log_likelihoods", files, "SELECT text, loglik FROM {src}", frame=False)

        return {t: float(v) for t, v in _retrying(read)}

    def add_log_likelihoods(self, model_id: str, scores: dict[str, float]) -> None:
        """Append newly scored texts as one part (parts are merged once there are many)."""
        if not scores:
            return
        folder = self.log_likelihood_dir(model_id)
        _write_parquet(folder / f"part-{new_part_id()}.parquet", "log_likelihoods",
                       {"text": list(scores), "loglik": [float(v) for v in scores.values()]})
        parts = sorted(folder.glob("part-*.parquet"))
        if len(parts) > MAX_PARTS:
            merged = _query("log_likelihoods", parts, "SELECT text, any_value(loglik) AS loglik FROM {src} GROUP BY text")
            _write_parquet(folder / f"part-{new_part_id()}.parquet", "log_likelihoods",
                           {"text": merged["text"].tolist(), "loglik": merged["loglik"].tolist()})
            for p in parts:
                p.unlink(missing_ok=True)

    # -- overview -------------------------------------------------------------------------
    def snapshot(self) -> StoreSnapshot:
        """Runs, probe sets and label runs in one read (what the sidebar and catalogue need)."""
        return StoreSnapshot(tuple(self.find_runs()), tuple(self.probe_sets()), tuple(self._label_run_rows()))

    def summary(self) -> dict[str, int]:
        """Row counts of every table, for `python -m neuroviz cache`."""
        runs = self.find_runs()
        probe_sets = self.probe_sets()
        label_runs = self._label_run_rows()
        n_labels = int(self._resolved_labels([self.label_dir(r["label_key"]) for r in label_runs],
                                             "SELECT count(*) FROM resolved").iloc[0, 0])
        return {"probe_sets": len(probe_sets), "probe_images": sum(int(p["n_images"] or 0) for p in probe_sets),
                "runs": len(runs), "topk": sum(r.n_neurons * min(r.k, r.n_images) for r in runs),
                "neuron_stats": sum(r.n_neurons for r in runs), "label_runs": len(label_runs), "labels": n_labels,
                "records": sum(1 for _ in (self.root / "records").glob("*/*.json"))}


_neuron_count_memo: dict[tuple[str, ...], int] = {}
_mask_level_memo: dict[tuple[str, int, float], np.ndarray | None] = {}
MAX_PARTS = 16  # append-only caches merge their parts beyond this many
EMBEDDING_BLOCK_ROWS = 4096  # rows of a shared image-embedding part read at once
PART_GRACE = 60.0  # seconds after which a label part is surely committed and may be merged


def _json_lines(path: Path) -> list[dict]:
    """The complete lines of an append-only JSON-lines log (a torn last line is skipped)."""
    out: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _run_info(row: dict | None) -> RunInfo | None:
    if not row:
        return None
    values = dict(row)
    values["map_shape"] = tuple(values["map_shape"]) if values.get("map_shape") else None
    return RunInfo(**values)


# --------------------------------------------------------------------------------------
# The shared cache: what does not depend on the workspace
# --------------------------------------------------------------------------------------
class SharedCache:
    """Models and embeddings shared by every workspace of a user.

    Layout under the root (``$NEUROVIZ_SHARED_CACHE``, else ``$XDG_CACHE_HOME/neuroviz``,
    else ``~/.cache/neuroviz``)::

        models/<name>/                   e.g. the dequantised Gemma (gemma3-270m-hf, READY last)
        concepts/<name>-<key>.txt        word lists (words20k, ...)
        text_emb/<key>.npy               text embeddings by (backend, text list)
        image_emb/<backend key>/part-<id>.npz  image_ids + embeddings by image content hash

    Every file is written atomically; image-embedding parts are append-only and merged
    once there are many, so a reader never waits for a writer.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @classmethod
    def default(cls) -> SharedCache:
        env = os.environ.get(SHARED_CACHE_ENV)
        if env:
            return cls(Path(env).expanduser())
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return cls(Path(base) / "neuroviz")

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def concepts_dir(self) -> Path:
        return self.root / "concepts"

    def text_embeddings_path(self, key: str) -> Path:
        return self.root / "text_emb" / f"{key}.npy"

    def image_embeddings_dir(self, backend_key: str) -> Path:
        return self.root / "image_emb" / backend_key

    def adopt(self, target: Path, legacy: Path) -> Path:
        """``target`` if it exists; else ``legacy`` (a workspace's copy from before the shared
        cache) linked or copied into ``target``; ``legacy`` itself if that fails."""
        if target.exists() or not legacy.exists():
            return target
        try:
            if legacy.is_dir():
                from .files import atomic_directory

                with atomic_directory(target) as tmp:
                    shutil.copytree(legacy, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(legacy, target)  # the same immutable bytes, no copy
                except OSError:
                    with atomic_open(target, "wb") as fh, open(legacy, "rb") as src:
                        shutil.copyfileobj(src, fh)
        except OSError:
            return legacy
        return target

    def image_embeddings(self, backend_key: str, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The embeddings of ``image_ids`` already in the cache (image id -> vector); for a few
        images (a probe set's matrix is read with :meth:`image_embedding_blocks`)."""
        found: dict[str, np.ndarray] = {}
        for positions, emb in self.image_embedding_blocks(backend_key, image_ids):
            found.update((image_ids[int(p)], row) for p, row in zip(positions, emb))
        return found

    def image_embedding_blocks(self, backend_key: str, image_ids: Sequence[str],
                               block_rows: int = EMBEDDING_BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``image_ids``, their embeddings) of the cached ones, a block of a part's
        rows at a time, oldest part first: where an image is in two parts the newer one comes
        later. A part merged away meanwhile restarts the pass (blocks repeat; later still wins)."""
        position = {image_id: i for i, image_id in enumerate(image_ids)}
        while True:
            try:
                for path in sorted(self.image_embeddings_dir(backend_key).glob("part-*.npz")):
                    ids = _npz_member(path, "image_ids").tolist()
                    wanted = np.array([position.get(i, -1) for i in ids], dtype=np.int64)
                    if not (wanted >= 0).any():
                        continue
                    for start, block in _npz_row_blocks(path, "embeddings", block_rows):
                        mine = wanted[start:start + len(block)]
                        keep = mine >= 0
                        if keep.any():
                            yield mine[keep], np.asarray(block[keep], dtype=np.float32)
                return
            except FileNotFoundError:
                continue

    def add_image_embeddings(self, backend_key: str, image_ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Append embeddings as one part; merge the parts once there are many."""
        if not len(image_ids):
            return
        folder = self.image_embeddings_dir(backend_key)
        atomic_savez(folder / f"part-{new_part_id()}.npz", image_ids=np.asarray(image_ids, dtype=str),
                     embeddings=np.asarray(embeddings, dtype=np.float32))
        parts = sorted(folder.glob("part-*.npz"))
        if len(parts) > MAX_PARTS:
            _merge_embedding_parts(folder / f"part-{new_part_id()}.npz", parts)
            for path in parts:
                path.unlink(missing_ok=True)


def _npz_member(path: Path, name: str) -> np.ndarray:
    with np.load(path) as npz:
        return npz[name]


def _npz_row_blocks(path: Path, name: str, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of a 2-D array in an .npz, read as a stream: np.load reads a member whole."""
    import zipfile

    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(fh)
        if fortran_order or len(shape) != 2:
            raise ValueError(f"{path}: {name} is not a C-ordered matrix")
        row_bytes = shape[1] * dtype.itemsize
        for start in range(0, shape[0], block_rows):
            rows = min(block_rows, shape[0] - start)
            yield start, np.frombuffer(fh.read(rows * row_bytes), dtype=dtype).reshape(rows, shape[1])


def _merge_embedding_parts(target: Path, parts: Sequence[Path]) -> None:
    """One part holding every image of ``parts`` once (the newest part's row wins), written as a
    stream: the merged embeddings are never whole in memory (np.savez needs whole arrays)."""
    import zipfile

    seen: set[str] = set()
    keep: list[np.ndarray] = []
    for path in reversed(parts):
        ids = _npz_member(path, "image_ids")
        keep.append(np.array([i not in seen for i in ids.tolist()], dtype=bool))
        seen.update(ids.tolist())
    keep.reverse()
    ids = np.concatenate([_npz_member(path, "image_ids")[mask] for path, mask in zip(parts, keep)])
    dim = next(block.shape[1] for _, block in _npz_row_blocks(parts[0], "embeddings", 1))
    with atomic_open(target, "wb", suffix=".tmp.npz") as fh, zipfile.ZipFile(fh, "w", allowZip64=True) as archive:
        with archive.open("image_ids.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, ids)
        with archive.open("embeddings.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                          "fortran_order": False, "shape": (len(ids), dim)})
            for path, mask in zip(parts, keep):
                for start, block in _npz_row_blocks(path, "embeddings", EMBEDDING_BLOCK_ROWS):
                    member.write(np.ascontiguousarray(block[mask[start:start + len(block)]], dtype=np.float32).tobytes())


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
