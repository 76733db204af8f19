"""Benchmark of the study store (issue 10): run with `.venv/bin/python benchmarks/bench_votes.py`.

20 raters vote at once through the library, 30 votes each (next_item, then submit_vote, no
pause between votes by default: the worst case; ``--think S`` pauses like a person), first as threads of one process (as Streamlit
sessions are), then as separate processes. Prints per-vote (submit_vote) p50/p95/max, the
next_item times, lost votes (acknowledged vs stored) and lock errors (retried, as a caller
would), against the targets: vote p95 <= 100 ms, 0 lost, 0 lock errors.

With ``--old`` the DuckDB storage of commit 0f23bae (``git show 0f23bae:neuroviz/study.py``,
loaded as a temporary module) runs in the same invocation, on its own workspace, and the
ratio old/new is printed. The old storage is slow (seconds per vote), so it runs
``--old-votes`` votes per rater (default 5) with the same number of raters at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OLD_COMMIT = "0f23bae"
METHODS = ("method_a", "method_b", "method_c")
TARGET_P95_MS = 100.0
MAX_RETRIES = 200


@dataclass
class RaterRun:
    """What one rater measured: seconds per call, lock errors retried, votes acknowledged."""

    vote_s: list[float] = field(default_factory=list)
    next_s: list[float] = field(default_factory=list)
    lock_errors: int = 0
    acknowledged: int = 0
    errors: list[str] = field(default_factory=list)


def _is_lock_error(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("lock", "busy"))


def _retrying(run: RaterRun, fn, times: list[float]):
    """Call ``fn`` until it does not fail with a lock error, timing the successful call and the
    retries together (what a rater waits), counting each lock error."""
    start = time.perf_counter()
    for _ in range(MAX_RETRIES):
        try:
            result = fn()
            times.append(time.perf_counter() - start)
            return result
        except Exception as exc:  # the old storage surfaces lock errors to the caller
            if not _is_lock_error(exc):
                raise
            run.lock_errors += 1
    raise RuntimeError(f"still locked after {MAX_RETRIES} tries")


def rate(mod: ModuleType, store, study_id: str, rater_id: str, n_votes: int, start: threading.Barrier | None,
         think: float = 0.0) -> RaterRun:
    """One rater: n_votes times next_item then submit_vote, pausing a random 0..2*think s
    between votes (0: as fast as the library allows)."""
    run = RaterRun()
    pauses = random.Random(rater_id)
    if start is not None:
        start.wait()
    try:
        for i in range(n_votes):
            time.sleep(pauses.uniform(0, 2 * think))
            task = _retrying(run, lambda: mod.next_item(store, study_id, rater_id), run.next_s)
            if task is None:
                break
            choice = "ABC"[i % len(task.options)]
            _retrying(run, lambda task=task, choice=choice: mod.submit_vote(store, study_id, rater_id, task.item_id, choice, {choice: 4}),
                      run.vote_s)
            run.acknowledged += 1
    except Exception as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
    return run


# -- workspaces and the two storages ---------------------------------------------------------------
def make_workspace(root: Path, n_neurons: int):
    """A cache with one tiny run (studies only need the run to exist)."""
    from neuroviz.store import RunInfo, Store

    store = Store(root)
    rng = np.random.default_rng(0)
    acts = rng.random((8, n_neurons), dtype=np.float32)
    top = np.argsort(-acts, axis=0)[:4].T
    info = RunInfo("bench-run", "bench:model", "w0", "layer", "mean", "probe", "pre", 4, "1", 8, n_neurons, None, "vector")
    store.finish_run(info, acts, np.take_along_axis(acts.T, top, axis=1), top, [f"img{i}" for i in range(8)], None)
    return store


def make_study(mod: ModuleType, store, n_items: int) -> str:
    items = [mod.StudyItem("bench-run", n, {m: f"{m} label {n}" for m in METHODS}) for n in range(n_items)]
    return mod.create_study(store, "bench", items, METHODS, raters_per_item=3, gold_items=0, n_images=4).study_id


def load_old_storage(workdir: Path) -> ModuleType | None:
    """neuroviz/study.py of OLD_COMMIT as a temporary module, with the neuroviz/db.py it used
    (also from OLD_COMMIT, so it loads after db.py is gone); None if unavailable."""
    try:
        for name in ("study", "db"):
            source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:neuroviz/{name}.py"], check=True,
                                    capture_output=True, text=True).stdout
            (workdir / f"{name}_old.py").write_text(source.replace("from . import db", "from . import _db_old as db"))
        return _import_old(workdir / "study_old.py")
    except Exception as exc:  # no git history, or the modules it imports changed too much
        print(f"(old storage not available: {type(exc).__name__}: {exc})")
        return None


def _import_old(path: Path) -> ModuleType:
    """Import study_old.py (and db_old.py beside it) as modules of the neuroviz package."""
    module = None
    for name in ("db", "study"):
        spec = importlib.util.spec_from_file_location(f"neuroviz._{name}_old", path.with_name(f"{name}_old.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _module(kind: str, old_source: str | None) -> ModuleType:
    if kind == "old":
        return _import_old(Path(old_source))
    from neuroviz import study

    return study


# -- the two modes ---------------------------------------------------------------------------------
def run_threads(mod: ModuleType, store, study_id: str, raters: int, votes: int, think: float) -> list[RaterRun]:
    ids = [mod.register_rater(store, study_id, f"thread {i}").rater_id for i in range(raters)]
    start = threading.Barrier(raters)
    results: list[RaterRun] = [RaterRun()] * raters

    def work(i: int) -> None:
        results[i] = rate(mod, store, study_id, ids[i], votes, start, think)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(raters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_processes(kind: str, old_source: str | None, store, study_id: str, raters: int, votes: int,
                  think: float) -> list[RaterRun]:
    cmd = [sys.executable, __file__, "--worker", kind, str(store.root), study_id, str(votes), "--think", str(think)]
    if old_source:
        cmd += ["--old-source", old_source]
    workers = [subprocess.Popen(cmd + ["--name", f"process {i}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for i in range(raters)]
    for w in workers:  # each has imported the library and registered its rater
        assert w.stdout.readline().strip() == "ready"
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    out = []
    for w in workers:
        text, _ = w.communicate()
        out.append(RaterRun(**json.loads(text.strip().splitlines()[-1])))
    return out


def worker(args: argparse.Namespace) -> None:
    from neuroviz.store import Store

    mod = _module(args.worker, args.old_source)
    store = Store(args.root)
    rater = mod.register_rater(store, args.study_id, args.name).rater_id
    print("ready", flush=True)
    sys.stdin.readline()
    run = rate(mod, store, args.study_id, rater, args.votes, None, args.think)
    print(json.dumps(run.__dict__), flush=True)


# -- report ------------------------------------------------------------------------------------------
@dataclass
class Summary:
    label: str
    mode: str
    raters: int
    expected: int
    stored: int
    vote_ms: tuple[float, float, float]
    next_ms: tuple[float, float, float]
    lock_errors: int
    errors: list[str]
    wall_s: float

    @property
    def lost(self) -> int:
        return self.expected - self.stored


def _percentiles(seconds: list[float]) -> tuple[float, float, float]:
    if not seconds:
        return float("nan"), float("nan"), float("nan")
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(ms.max())


def summarise(label: str, mode: str, mod: ModuleType, store, study_id: str, runs: list[RaterRun], wall_s: float) -> Summary:
    stored = mod.study_progress(store, study_id).n_votes
    return Summary(label, mode, len(runs), sum(r.acknowledged for r in runs), stored,
                   _percentiles([s for r in runs for s in r.vote_s]), _percentiles([s for r in runs for s in r.next_s]),
                   sum(r.lock_errors for r in runs), [e for r in runs for e in r.errors], wall_s)


def measure(label: str, kind: str, mod: ModuleType, old_source: str | None, workdir: Path, mode: str,
            raters: int, votes: int, think: float) -> Summary:
    store = make_workspace(workdir / f"{kind}-{mode}", votes)
    study_id = make_study(mod, store, votes)
    start = time.perf_counter()
    if mode == "threads":
        runs = run_threads(mod, store, study_id, raters, votes, think)
    else:
        runs = run_processes(kind, old_source, store, study_id, raters, votes, think)
    return summarise(label, mode, mod, store, study_id, runs, time.perf_counter() - start)


def print_table(rows: list[Summary]) -> None:
    print(f"\n{'storage':22s} {'mode':9s} {'votes':>6s} {'vote p50':>9s} {'p95':>8s} {'max':>8s} "
          f"{'next p50':>9s} {'p95':>8s} {'lost':>5s} {'lock err':>8s} {'wall s':>7s}")
    for r in rows:
        print(f"{r.label:22s} {r.mode:9s} {r.expected:6d} {r.vote_ms[0]:9.1f} {r.vote_ms[1]:8.1f} {r.vote_ms[2]:8.1f} "
              f"{r.next_ms[0]:9.1f} {r.next_ms[1]:8.1f} {r.lost:5d} {r.lock_errors:8d} {r.wall_s:7.1f}")
        for error in r.errors[:3]:
            print(f"    error: {error}")
    print("(times in ms per call; a vote's time includes the retries after lock errors)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--votes", type=int, default=30, help="votes per rater")
    parser.add_argument("--old", action="store_true", help=f"also run the DuckDB storage of {OLD_COMMIT}")
    parser.add_argument("--old-votes", type=int, default=5, help="votes per rater for the old storage")
    parser.add_argument("--modes", default="threads,processes")
    parser.add_argument("--think", type=float, default=0.0,
                        help="mean pause in seconds between a rater's votes (default 0: back to back, the worst case)")
    parser.add_argument("--worker", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("root", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("study_id", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("worker_votes", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--old-source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.votes = args.worker_votes
        worker(args)
        return

    from neuroviz import study

    modes = [m for m in args.modes.split(",") if m]
    rows: list[Summary] = []
    with tempfile.TemporaryDirectory(prefix="bench_votes_") as tmp:
        workdir = Path(tmp)
        old = load_old_storage(workdir) if args.old else None
        old_source = str(workdir / "study_old.py") if old else None
        for mode in modes:
            print(f"{args.raters} raters as {mode}, {args.votes} votes each: SQLite store ...", flush=True)
            rows.append(measure("sqlite (this version)", "new", study, None, workdir, mode, args.raters, args.votes,
                                args.think))
            if old is not None:
                print(f"{args.raters} raters as {mode}, {args.old_votes} votes each: DuckDB store of {OLD_COMMIT} ...",
                      flush=True)
                rows.append(measure(f"duckdb ({OLD_COMMIT})", "old", old, old_source, workdir, mode, args.raters,
                                    args.old_votes, args.think))
    print_table(rows)
    new_rows = [r for r in rows if r.label.startswith("sqlite")]
    for r in rows:
        if r.label.startswith("duckdb"):
            mine = next(n for n in new_rows if n.mode == r.mode)
            print(f"{r.mode}: old/new vote p50 x{r.vote_ms[0] / mine.vote_ms[0]:.0f}, p95 x{r.vote_ms[1] / mine.vote_ms[1]:.0f}, "
                  f"max x{r.vote_ms[2] / mine.vote_ms[2]:.0f}")
    for r in new_rows:
        ok = r.vote_ms[1] <= TARGET_P95_MS and r.lost == 0 and r.lock_errors == 0 and not r.errors
        print(f"target ({r.mode}): vote p95 {r.vote_ms[1]:.1f} ms <= {TARGET_P95_MS:.0f} ms, {r.lost} lost, "
              f"{r.lock_errors} lock errors: {'met' if ok else 'NOT met'}")
    print(f"(load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
