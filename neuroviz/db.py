"""Short-lived DuckDB connections that respect DuckDB's one-writer rule.

DuckDB lets one process hold a database file read-write, and nobody else may open it
meanwhile. neuroviz therefore never keeps a connection open between operations: each
operation opens the file, does its work and closes it. A process that finds the file locked
by another process waits (with backoff) and, if the lock is not released in time, raises a
:class:`DatabaseLockedError` whose message says who holds it and what to do. Threads of one
process (Streamlit sessions) are serialised by a per-file lock, so they never race.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
from .errors import NeurovizError


class DatabaseLockedError(NeurovizError, RuntimeError):
    """The database file is held by another process for longer than we were willing to wait."""


_thread_locks: dict[str, threading.RLock] = {}
_thread_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.RLock:
    key = str(path.resolve())
    with _thread_locks_guard:
        return _thread_locks.setdefault(key, threading.RLock())


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "Could not set lock" in text or "Conflicting lock" in text


def _holder(exc: Exception) -> str:
    match = re.search(r"PID (\d+)", str(exc))
    return f"process {match.group(1)}" if match else "another process"


@contextlib.contextmanager
def connect(path: Path | str, timeout: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path`` read-write for one operation, waiting up to ``timeout`` s for a lock.

    Raises DatabaseLockedError (never a raw DuckDB traceback) when the wait runs out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_for(path)
    with lock:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(path))
                break
            except duckdb.Error as exc:  # IOException for a held lock
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseLockedError(
                        f"The cache database {path} is in use by {_holder(exc)} and stayed locked "
                        f"for {timeout:.0f} s. Wait for that job to finish (see the Jobs page or "
                        f"`python -m neuroviz jobs`), or stop it, then try again."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        try:
            yield con
        finally:
            con.close()
