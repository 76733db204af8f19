"""Background jobs: long work runs in its own process (`python -m neuroviz --job ID ...`).

The job writes its progress to ``cache/jobs/<id>.json`` (temp file + rename), never to the
database while it runs, so the app can poll it at any time without lock conflicts. A job
whose process died without finishing is reported as interrupted; rerunning the same
command resumes from its last finished chunk.

The process that starts a job (the dashboard's server) is its parent, so it must also wait
for it: a thread per job does, the moment the job ends, so finished and cancelled jobs never
linger as defunct (zombie) processes under a long-running server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import NeurovizError
from .files import atomic_write_text
from .store import Store

CANCEL_GRACE_SECONDS = 5.0  # a cancelled job gets this long to stop on SIGTERM before SIGKILL


class JobNotFoundError(NeurovizError, KeyError):
    """No job of this workspace has the given id."""


@dataclass
class JobRecord:
    job_id: str
    kind: str
    argv: list[str]
    status: str = "queued"  # queued, running, done, failed, cancelled, interrupted
    done: int = 0
    total: int = 0
    message: str = ""
    error: str = ""
    pid: int | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    result: dict | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled", "interrupted")


def jobs_dir(store: Store) -> Path:
    return store.jobs_dir()


def _path(store: Store, job_id: str) -> Path:
    return jobs_dir(store) / f"{job_id}.json"


def write_job(store: Store, job: JobRecord) -> None:
    job.updated_at = time.time()
    atomic_write_text(_path(store, job.job_id), json.dumps(asdict(job)))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def read_job(store: Store, job_id: str) -> JobRecord | None:
    path = _path(store, job_id)
    try:
        job = JobRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if job.status in ("running", "queued") and job.pid and not _alive(job.pid):
        job.status = "interrupted"
        job.message = "the process ended before finishing; start the same job again to resume"
    return job


def list_jobs(store: Store, limit: int = 50) -> list[JobRecord]:
    folder = jobs_dir(store)
    if not folder.exists():
        return []
    jobs = [read_job(store, p.stem) for p in folder.glob("*.json")]
    return sorted((j for j in jobs if j), key=lambda j: j.started_at, reverse=True)[:limit]


def start_job(store: Store, kind: str, argv: list[str]) -> JobRecord:
    """Launch ``python -m neuroviz <argv>`` in its own process group, tracked as a job."""
    job = JobRecord(job_id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], kind=kind, argv=list(argv))
    write_job(store, job)
    log = open(jobs_dir(store) / f"{job.job_id}.log", "w")
    env = dict(os.environ, NEUROVIZ_CACHE=str(store.root))
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroviz", "--job", job.job_id, *argv],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    log.close()  # the child holds its own copy
    threading.Thread(target=proc.wait, name=f"reap-job-{job.job_id}", daemon=True).start()
    job.pid = proc.pid
    job.status = "running"
    write_job(store, job)
    return job


def cancel_job(store: Store, job_id: str) -> JobRecord:
    """Stop a running job's process group (SIGTERM, then SIGKILL after a grace period); its
    finished chunks stay for a later resume. A job that already ended is returned as it is."""
    job = read_job(store, job_id)
    if job is None:
        known = [j.job_id for j in list_jobs(store)]
        raise JobNotFoundError(f"No job '{job_id}' in {store.root}" + (f"; the newest: {', '.join(known[:3])}." if known else
                                                                      "; it has no jobs."))
    if job.finished:
        return job
    if job.pid:
        _stop_group(job.pid)
    job.status = "cancelled"
    job.message = "cancelled; start the same job again to resume"
    write_job(store, job)
    return job


def _stop_group(pid: int) -> None:
    """SIGTERM the job's process group, and SIGKILL it if its leader is still there after the grace period."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + CANCEL_GRACE_SECONDS
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def job_log(store: Store, job_id: str, tail: int = 40) -> str:
    path = jobs_dir(store) / f"{job_id}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])
    except OSError:
        return ""


class JobReporter:
    """Progress callback for the job's own process: throttled writes of its record."""

    def __init__(self, store: Store, job_id: str, min_interval: float = 0.5):
        self.store, self.job_id, self.min_interval = store, job_id, min_interval
        self._last = 0.0
        self.job = read_job(store, job_id) or JobRecord(job_id, "cli", [])
        self.job.pid = os.getpid()
        self.job.status = "running"
        write_job(store, self.job)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        self.job.done, self.job.total, self.job.message = done, total, message
        now = time.time()
        if now - self._last >= self.min_interval or (total and done >= total):
            self._last = now
            write_job(self.store, self.job)

    def finish(self, status: str, error: str = "", result: dict | None = None) -> None:
        self.job.status, self.job.error, self.job.result = status, error, result
        if status == "done" and self.job.total:
            self.job.done = self.job.total
        write_job(self.store, self.job)
