"""Per-neuron work on the demo workspace: seconds, progress gaps and peak memory.

    .venv/bin/python benchmarks/bench_neuron_work.py --cache /tmp/my-demo-copy [--tasks dnd,synthesis_quick]
        [--threads auto,2]

Point --cache at a *copy* of a demo workspace (``cp -r cache /tmp/my-demo-copy``): the tasks
write labels, runs and records into it. Each task runs in a fresh process (so model loads
and peak memory are its own), once per thread setting, and prints:

- seconds (wall) and CPU seconds of the whole task, including imports and model loads;
- the longest gap between two progress updates (and the first one: imports and loads), so
  a stalled progress bar shows as a number;
- peak resident memory (``ru_maxrss``) and the progress message shown when it was reached;
- per task extras: DnD's seconds for its second neuron (the steady per-neuron cost after the
  loads), synthesis steps and samples within tolerance.

Tasks: ``dnd`` (two fresh neurons of features.18, new seed so nothing is cached),
``milan`` (32 neurons of features.4, a fresh label key and uncached p(d) scores), ``synthesis`` (the library's
default request: 4 levels x 4 samples at 128 px, up to 192 steps), ``synthesis_quick`` (the
page's first pass, :data:`neuroviz.synthesis.FIRST_PASS`), ``extract`` (one more layer,
features.7, into an empty store over the demo images), ``edit`` (ablate 8 neurons of
features.18 on all demo images). ``--threads auto`` is what commands now choose
(:mod:`neuroviz.threads`); ``2`` is torch's own default on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("dnd", "milan", "synthesis_quick", "synthesis", "extract", "edit")
MODEL = "offline:mobilenet_v2"


class Recorder:
    """Progress callback that keeps every update's time, and a thread that samples memory."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.updates: list[tuple[float, int, int, str]] = []
        self.message = "start"
        self.peak_rss = 0
        self.peak_message = "start"
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def __call__(self, done: int, total: int, message: str = "") -> None:
        self.updates.append((time.perf_counter() - self.t0, done, total, message))
        self.message = message

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            rss = _rss_bytes()
            if rss > self.peak_rss:
                self.peak_rss, self.peak_message = rss, self.message

    def report(self) -> dict:
        self._stop.set()
        end = time.perf_counter() - self.t0
        times = [0.0] + [u[0] for u in self.updates] + [end]
        gaps = [b - a for a, b in zip(times, times[1:])]
        longest = max(range(len(gaps)), key=gaps.__getitem__)
        after = self.updates[longest - 1][3] if longest > 0 else "start"
        return {"seconds": end, "cpu_s": time.process_time(), "n_updates": len(self.updates),
                "first_update_s": times[1] if self.updates else end, "longest_gap_s": gaps[longest],
                "longest_gap_after": after[:70],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_during": self.peak_message[:70]}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- the tasks, each in its own process ----------------------------------------------------------

def _context(store, layer: str, method: str, rec: Recorder):
    from neuroviz.backends.pool import BackendChoice, BackendPool, build_context
    from neuroviz.catalog import runs_for
    from neuroviz.methods import get_method

    run = runs_for(store, MODEL, "demo", [layer], None)[0]
    pool = BackendPool(store, BackendChoice(None, "words20k", "retrieval", "gemma3-270m"))
    return build_context(store, run, get_method(method).needs, pool, rec)


def task_dnd(store, rec: Recorder) -> dict:
    from neuroviz.methods import run_method
    from neuroviz.methods.dnd import DnDConfig

    ctx = _context(store, "features.18", "dnd", rec)
    neurons = [1270, 1271]
    run_method("dnd", ctx, DnDConfig(seed=int(time.time()) % 100_000), neurons)
    second = next(u[0] for u in rec.updates if u[3].startswith(f"neuron {neurons[1]}:"))
    return {"neurons": len(neurons), "second_neuron_s": time.perf_counter() - rec.t0 - second}


def task_milan(store, rec: Recorder) -> dict:
    from neuroviz.methods import run_method
    from neuroviz.methods.milan import MilanConfig

    ctx = _context(store, "features.4", "milan", rec)
    # A prior context never used before: a fresh label key, and every p(d) is scored by the
    # language model (the demo build cached the scores under the default "Tags:")
    run_method("milan", ctx, MilanConfig(prior_context=f"Tags {int(time.time())}:"), list(range(32)))
    return {"neurons": 32}


def _synthesis(store, rec: Recorder, quick: bool) -> dict:
    from neuroviz import synthesis
    from neuroviz.catalog import probed_model_for, runs_for

    run = runs_for(store, MODEL, "demo", ["features.18"], None)[0]
    model = probed_model_for(store, run)
    request = synthesis.first_pass_request("features.18", 12) if quick else synthesis.SynthesisRequest("features.18", 12)
    result = synthesis.synthesize(model, request, store, run, progress=rec, use_cache=False)
    return {"samples": int(result.within_tolerance.size), "within": result.n_within, "steps": result.steps_run,
            "image_size": request.config.image_size}


def task_synthesis(store, rec: Recorder) -> dict:
    return _synthesis(store, rec, quick=False)


def task_synthesis_quick(store, rec: Recorder) -> dict:
    return _synthesis(store, rec, quick=True)


def task_extract(store, rec: Recorder) -> dict:
    from neuroviz import extract, models
    from neuroviz.catalog import probe_set_for
    from neuroviz.store import Store

    probe_set = probe_set_for(store, "demo")
    model = models.create(MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        extract.extract(model, probe_set, ["features.7"], Store(tmp), progress=rec)
    return {"images": len(probe_set)}


def task_edit(store, rec: Recorder) -> dict:
    from neuroviz import editing, models
    from neuroviz.catalog import probe_set_for

    probe_set = probe_set_for(store, "demo")
    model = models.create(MODEL)
    edit = editing.make_edit("bench", MODEL, {"features.18": list(range(8))}, "zero")
    with tempfile.TemporaryDirectory(prefix="bench-edit-") as tmp:  # an empty store: nothing cached
        from neuroviz.store import Store

        cmp = editing.evaluate_edit(model, edit, probe_set, Store(tmp), progress=rec)
    return {"images": cmp.n_images, "changed": len(cmp.changed)}


def child(task: str, cache: str) -> None:
    from neuroviz.threads import limit_compute_threads

    threads = limit_compute_threads()
    rec = Recorder()
    from neuroviz.store import Store

    extra = globals()[f"task_{task}"](Store(cache), rec)
    print(json.dumps({**rec.report(), **extra, "threads": threads}))


# -- the parent: one process per task and thread setting ------------------------------------------

def run_child(task: str, cache: str, threads: str, timeout: float) -> dict:
    env = dict(os.environ)
    for name in ("NEUROVIZ_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    if threads != "auto":
        env["NEUROVIZ_THREADS"] = threads
    load = os.getloadavg()[0]
    try:
        out = subprocess.run([sys.executable, __file__, "--child", task, "--cache", cache], env=env, capture_output=True,
                             text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s", "load": load}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:120], "load": load}
    return {**json.loads(lines[-1]), "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=os.environ.get("NEUROVIZ_CACHE"), help="a COPY of a demo workspace")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--threads", default="auto", help="comma-separated thread settings to compare, e.g. auto,2")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per task")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.cache or not Path(args.cache).exists():
        parser.error("give --cache: a copy of a demo workspace (cp -r cache /tmp/demo-copy)")
    if args.child:
        child(args.child, args.cache)
        return
    print(f"{'task':16s} {'threads':>7s} {'load':>5s} {'seconds':>8s} {'CPU s':>7s} {'first upd':>9s} "
          f"{'max gap':>8s} {'peak MB':>8s}  details")
    for task in args.tasks.split(","):
        for threads in args.threads.split(","):
            r = run_child(task, args.cache, threads, args.timeout)
            if "error" in r:
                print(f"{task:16s} {threads:>7s} {r['load']:5.1f}  failed: {r['error']}")
                continue
            skip = {"seconds", "cpu_s", "first_update_s", "longest_gap_s", "peak_rss_mb", "load", "threads"}
            details = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in skip)
            print(f"{task:16s} {threads + '=' + str(r['threads']):>7s} {r['load']:5.1f} {r['seconds']:8.1f} {r['cpu_s']:7.1f} "
                  f"{r['first_update_s']:9.1f} {r['longest_gap_s']:8.1f} {r['peak_rss_mb']:8.0f}  {details}", flush=True)


if __name__ == "__main__":
    main()
