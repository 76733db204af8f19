"""How fast the store answers the pages, alone and while another process writes:
`.venv/bin/python benchmarks/bench_store.py`.

Workspace: demo scale by default (one probe set of 697 images, 5 runs of 1,280 neurons,
k = 50, three label keys per run), built in a temporary folder; ``--cache DIR`` copies a real
cache's results instead (a cache from before the file layout is migrated on the copy).

For each read (one neuron's top-16 images, one neuron's labels, a run's labels, a run's
neuron statistics, the snapshot of runs / probe sets / label runs, a run's tables) the script
measures the latency in this process, in blocks that alternate between "alone" and "while a
writer process runs finish_run and save_labels in a loop", and prints both side by side
with their ratio. ``--old`` adds the same measurements for the store before the file layout
(``git show 0f23bae:neuroviz/store.py``: one DuckDB file, a read-write connection per
operation), whose readers wait for the writer's lock. Last, the cold read of a run's tables
in a fresh process (imports excluded, as a page process has them; the first DuckDB
connection and cursor included).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def old_store_class():
    """The store before the file layout, from git history (None when the history is absent)."""
    sys.path.insert(0, str(REPO / "tests"))
    from legacy_store import old_store_module

    module = old_store_module()
    return None if module is None else module.Store


def store_class(kind: str):
    if kind == "old":
        return old_store_class()
    from neuroviz.store import Store

    return Store


def run_arrays(n_images: int, n_neurons: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    acts = rng.gamma(2.0, size=(n_images, n_neurons)).astype(np.float32)
    idx = np.argpartition(-acts, k, axis=0)[:k].T
    order = np.argsort(-np.take_along_axis(acts.T, idx, 1), axis=1)
    idx = np.take_along_axis(idx, order, 1)
    return acts, np.take_along_axis(acts.T, idx, 1), idx, rng.random((n_neurons, k, 7, 7)).astype(np.float32)


def build(root: Path, kind: str, n_images: int, n_neurons: int, k: int, n_runs: int) -> list[str]:
    """A demo-scale workspace: probe set, runs, three label keys per run."""
    from neuroviz.datasets import ProbeImage, ProbeSet
    from neuroviz.store import LabelRow, RunInfo

    Store = store_class(kind)
    store = Store(root)
    ps = ProbeSet("bench", "bench", [ProbeImage(f"{i:020x}", f"/images/{i}.png", f"class {i % 50}") for i in range(n_images)])
    store.register_probe_set(ps)
    ids = [im.image_id for im in ps.images]
    keys = []
    for r in range(n_runs):
        acts, values, idx, maps = run_arrays(n_images, n_neurons, k, r)
        info = RunInfo(f"run{r:02d}", "bench:model", "w", f"layer{r}", "mean", ps.id, "pre", k, "1", n_images, n_neurons,
                       (7, 7), "conv", 0.0)
        store.finish_run(info, acts, values, idx, ids, maps)
        for m, method in enumerate(("clip_dissect", "milan", "dnd")):
            rows = [LabelRow(n, rank, f"{method} label {n}.{rank}", 1.0 - rank / 10, None, {"n": n} if rank == 0 else None)
                    for n in range(n_neurons) for rank in range(5 if method != "dnd" else 1)]
            store.save_labels(f"{method}-{r}", info.run_key, method, {"b": method}, {"m": m}, None, rows, "bench",
                              replace_neurons=method == "dnd")
        keys.append(info.run_key)
    return keys


def writer(root: Path, kind: str, seconds: float, n_images: int, n_neurons: int, k: int, run_key: str) -> None:
    """Loop finish_run (a new run each time) and save_labels (a full key and one neuron's part)."""
    from neuroviz.store import LabelRow, RunInfo

    store = store_class(kind)(root)
    ps_id = store.probe_sets()[0]["probe_set_id"]
    ids = [r["image_id"] for r in store.probe_images(ps_id)]
    arrays = run_arrays(n_images, n_neurons, k, 99)
    deadline, g = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        g += 1
        info = RunInfo(f"writer{g:04d}", "bench:writer", "w", f"w{g}", "mean", ps_id, "pre", k, "1", n_images, n_neurons,
                       (7, 7), "conv", 0.0)
        store.finish_run(info, *arrays[:3], ids, arrays[3])
        store.save_labels("writer-full", run_key, "writer", {}, {}, None,
                          [LabelRow(n, 0, f"w{g}", 1.0) for n in range(n_neurons)], "bench")
        store.save_labels("dnd-0", run_key, "dnd", {"b": "dnd"}, {"m": 2}, None, [LabelRow(g % n_neurons, 0, f"w{g}", 1.0)],
                          "bench", replace_neurons=True)
    print(g, flush=True)


def reads(store, run_keys: list[str], n_neurons: int) -> dict:
    rng = np.random.default_rng(0)
    run = run_keys[0]
    out = {
        "top_images (1 neuron, 16)": lambda: store.top_images(run, int(rng.integers(n_neurons)), 16),
        "labels (1 neuron)": lambda: store.labels(run, neuron=int(rng.integers(n_neurons))),
        "labels (whole run)": lambda: store.labels(run),
        "neuron_stats (whole run)": lambda: store.neuron_stats(run),
    }
    if hasattr(store, "snapshot"):
        out["snapshot"] = store.snapshot
        out["run_tables"] = lambda: store.run_tables(run)
    else:  # what the pages asked the old store for the same two
        out["snapshot"] = lambda: (store.find_runs(), store.probe_sets(), store.label_runs())
        out["run_tables"] = lambda: (store.labels(run), store.top_indices(run), store.neuron_stats(run),
                                     store.probe_images(store.get_run(run).probe_set_id))
    return out


def measure(kind: str, root: Path, run_keys: list[str], args) -> dict:
    """Latencies (ms) per read, alone and during writes, in alternating blocks."""
    store = store_class(kind)(root)
    ops = reads(store, run_keys, args.neurons)
    for op in ops.values():
        op()  # warm: first cursor, imports
    times: dict = {name: {"alone": [], "writing": []} for name in ops}
    writes = 0
    for _ in range(args.blocks):
        for phase in ("alone", "writing"):
            proc = None
            if phase == "writing":
                proc = subprocess.Popen([sys.executable, __file__, "--writer", str(root), "--kind", kind,
                                         "--seconds", str(args.block_seconds), "--images", str(args.images),
                                         "--neurons", str(args.neurons), "--k", str(args.k), "--run", run_keys[0]],
                                        stdout=subprocess.PIPE, text=True, cwd=REPO)
                time.sleep(1.0)  # past its imports: writing now
            deadline = time.monotonic() + (args.block_seconds - 1.5 if proc else args.block_seconds / 2)
            while time.monotonic() < deadline:
                for name, op in ops.items():
                    t0 = time.perf_counter()
                    op()
                    times[name][phase].append((time.perf_counter() - t0) * 1000)
            if proc is not None:
                out, _ = proc.communicate(timeout=600)
                writes += int(out.strip() or 0)
    times["_writes"] = writes
    times["_parts"] = len(list(root.glob("labels/dnd-0/*.parquet")))  # the per-neuron key the writer grows
    return times


def cold_run_tables(root: Path, run_key: str, repeats: int = 3) -> list[float]:
    """A fresh process reads a run's tables: first read (cursor included) and the next one."""
    code = ("import sys, time\nimport duckdb, pandas\nfrom neuroviz.store import Store\ns = Store(sys.argv[1])\n"
            "t = time.perf_counter(); s.run_tables(sys.argv[2]); a = time.perf_counter() - t\n"
            "t = time.perf_counter(); s.run_tables(sys.argv[2]); b = time.perf_counter() - t\n"
            "print(a * 1000, b * 1000)")
    out = []
    for _ in range(repeats):
        line = subprocess.run([sys.executable, "-c", code, str(root), run_key], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.split()
        out.append((float(line[0]), float(line[1])))
    return out


def summarise(label: str, times: dict) -> None:
    parts = f"; the per-neuron key ended with {times['_parts']} part files" if times["_parts"] else ""
    print(f"\n{label} (writer iterations while measuring: {times['_writes']}{parts})")
    print(f"{'read':28s} {'alone p50':>10s} {'p95':>8s} {'writing p50':>12s} {'p95':>8s} {'max':>8s} {'p50 ratio':>10s}")
    for name, t in times.items():
        if name.startswith("_"):
            continue
        a, w = np.asarray(t["alone"]), np.asarray(t["writing"])
        print(f"{name:28s} {np.median(a):9.2f}ms {np.percentile(a, 95):7.2f}ms {np.median(w):11.2f}ms "
              f"{np.percentile(w, 95):7.2f}ms {w.max():7.1f}ms {np.median(w) / np.median(a):9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="copy this cache's results instead of building a demo-scale one")
    parser.add_argument("--images", type=int, default=697)
    parser.add_argument("--neurons", type=int, default=1280)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=3, help="alternating alone/writing blocks")
    parser.add_argument("--block-seconds", type=float, default=6.0)
    parser.add_argument("--old", action="store_true", help="also measure the store before the file layout")
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--run", default="run00", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer(args.writer, args.kind, args.seconds, args.images, args.neurons, args.k, args.run)
        return
    kinds = ["new"] + (["old"] if args.old and old_store_class() is not None else [])
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        results = {}
        for kind in kinds:
            root = Path(tmp) / kind
            if args.cache and kind == "new":
                root.mkdir()
                for name in ("runs", "probesets", "labels", "records", "neuroviz.duckdb"):
                    src = args.cache / name
                    if src.is_dir():
                        shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("partial"))
                    elif src.exists():
                        shutil.copy2(src, root / name)
                from neuroviz.store import Store

                store = Store(root)
                first = max(store.find_runs(), key=lambda r: r.n_neurons)
                run_keys, args.neurons, args.images, args.k = [first.run_key], first.n_neurons, first.n_images, first.k
            else:
                t0 = time.perf_counter()
                run_keys = build(root, kind, args.images, args.neurons, args.k, args.runs)
                print(f"[{kind}] built {args.runs} runs of {args.neurons} neurons x {args.images} images in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            results[kind] = measure(kind, root, run_keys, args)
            if kind == "new":
                cold = cold_run_tables(root, run_keys[0])
        for kind in kinds:
            summarise("file layout (this store)" if kind == "new" else "before: one DuckDB file, connection per operation",
                      results[kind])
        print(f"\ncold run_tables in a fresh process: first read {statistics.median(c[0] for c in cold):.1f} ms, "
              f"second {statistics.median(c[1] for c in cold):.1f} ms (median of {len(cold)})")
        if len(kinds) == 2:
            print("\nnew / old, p50 alone:")
            for name in results["new"]:
                if not name.startswith("_"):
                    print(f"  {name:28s} {np.median(results['new'][name]['alone']) / np.median(results['old'][name]['alone']):.2f}x")


if __name__ == "__main__":
    main()
