"""What every command module shares: the store named by ``--cache`` and progress bars that
also feed the job record when the command runs as a background job."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..progress import Progress, TqdmProgress, chain
from ..store import DEFAULT_CACHE, Store


def store_from(args: argparse.Namespace) -> Store:
    """The workspace store the command works on (``--cache``, else $NEUROVIZ_CACHE, else ./cache)."""
    return Store(Path(args.cache) if getattr(args, "cache", None) else DEFAULT_CACHE)


def progress_for(args: argparse.Namespace, desc: str, unit: str = "img") -> Progress:
    """A tqdm bar, plus the job record when running as a background job."""
    return chain(TqdmProgress(desc, unit), getattr(args, "_job_reporter", None))
