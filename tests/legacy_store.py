"""neuroviz/store.py as it was before the file layout (everything in neuroviz.duckdb), loaded
from git history: the migration test fills an old cache with it, and benchmarks/bench_store.py
measures it side by side with the current store."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLD_STORE_COMMIT = "0f23bae"  # the last store.py that kept everything in neuroviz.duckdb


def old_store_module() -> types.ModuleType | None:
    """The old store module (None when this checkout lacks the commit), with a stand-in for the
    connection module it used: a plain read-write connection per operation, waiting for a lock."""
    try:
        source = subprocess.run(["git", "show", f"{OLD_STORE_COMMIT}:neuroviz/store.py"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    import duckdb

    @contextlib.contextmanager
    def connect(path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:  # as the old db.connect did: wait while another process holds the file
            try:
                con = duckdb.connect(str(path))
                break
            except duckdb.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        try:
            yield con
        finally:
            con.close()

    module = types.ModuleType("neuroviz._store_before_files")
    module.__dict__.update(__package__="neuroviz", __file__=str(REPO / "neuroviz" / "store.py"),
                           db=types.SimpleNamespace(connect=connect))
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source.replace("from . import db\n", ""), "store_before_files.py", "exec"), module.__dict__)
    return module
