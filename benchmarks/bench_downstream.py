"""Downstream at scale (issue 11.4), not a test: `.venv/bin/python benchmarks/bench_downstream.py`.

Peak resident memory of the steps after extraction, at 10,000 and 50,000 images (``--sizes``),
each step in a fresh child process that reports its peak (VmHWM) and what it held before the
step began (imports, store, backend). Target (issue 11): labelling RSS flat within 15 %.

The workspaces are bench_scale.py's (ResNet-18 at 32 px on :mod:`neuroviz.synthetic_probe`
images, layer4: 512 neurons, top-50 with maps; CLIP-Dissect labels; the stand-in multimodal
backend ``PixelProjection``): pass ``--from`` a bench_scale ``--workdir`` to copy its caches, or
let this script build them through bench_scale's own children (extraction and labelling).
Steps, on layer4:
1. ``evaluate``: the fit run of the held-out split, then :func:`neuroviz.evaluate.evaluate_layer`
   of the CLIP-Dissect labels with the shuffled and constant baselines and badges (200 image
   resamples, layer means linearised);
2. ``dnd``: DnD's best-concept step (retrieval of each candidate's probe images, activation and
   similarity scores) for ``--neurons`` neurons, 5 candidates each; the captioner and the
   language model are not run (their cost does not depend on the probe set's size);
3. ``milan``: MILAN-style PMI on whole exemplars (``exemplar_region="full"``: the probe set's
   cached embeddings) for ``--neurons`` neurons, with a stand-in prior (seeded log-likelihoods);
4. ``linear``: Linear Explanations (multimodal source) of every neuron against ``--concepts`` concepts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_scale  # noqa: E402  (its workspace builder, backend and RSS reader)

LAYER = "layer4"
STEPS = ("evaluate", "dnd", "milan", "linear")


def _context(cache: str):
    from neuroviz.store import Store

    store = Store(cache)
    run = next(r for r in store.find_runs(bench_scale.MODEL) if r.layer == LAYER and not r.probe_set_id.startswith("split"))
    return store, run


def _concepts(n: int):
    from neuroviz.concepts import from_texts
    from neuroviz.synthetic_probe import COLOURS, SHAPES

    words = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    return from_texts("bench", words + [f"concept {i:05d}" for i in range(n - len(words))])


class SeededPrior:
    """Stand-in language model for MILAN's prior: a seeded log-likelihood per text (no model to load)."""

    id = "bench-seeded-prior"
    description = "benchmark stand-in (seeded log-likelihoods)"

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, **_) -> str:
        return "thing"

    def log_likelihood(self, texts):
        return np.array([-5.0 - (zlib.crc32(t.encode()) % 1000) / 100.0 for t in texts])


class NoCaptions:
    """Stand-in captioner: MILAN runs here without caption candidates, but its context names one."""

    id = "bench-no-captions"
    description = "benchmark stand-in (never called)"

    def caption(self, images) -> list[str]:
        return ["" for _ in images]


def step_child(args: dict) -> dict:
    """One step in this (fresh) process: its seconds, the RSS before it and its peak."""
    import torch  # every labelling process has torch loaded: it belongs to the baseline

    torch.set_num_threads(1)
    from neuroviz import embeddings
    from neuroviz.methods import MethodContext

    store, run = _context(args["cache"])
    backend = bench_scale.PixelProjection()
    step = args["step"]
    if step == "milan":
        import neuroviz.methods.milan  # noqa: F401  (imports before the baseline)
    baseline = bench_scale._status_mb("VmRSS")
    start = time.perf_counter()
    info: dict = {}
    if step == "evaluate":
        from neuroviz.evaluate import evaluate_layer
        from neuroviz.trust.split import HeldOutSplit, fit_run

        fit_run(store, run, HeldOutSplit(0))
        evaluation = evaluate_layer(store, run, backend, n_boot=200, per_unit=False, save=False)
        info = {"rows": len(evaluation.rows), "scoring_images": evaluation.rows[0].n_eval_images if evaluation.rows else 0}
    elif step == "dnd":
        from neuroviz.column_scan import take_rows
        from neuroviz.methods.dnd import DnDConfig, best_concepts

        config = DnDConfig()
        probe_emb = embeddings.image_embeddings(backend, store, run.probe_set_id)
        acts = store.activations(run.run_key)
        words = list(_concepts(args["concepts"]).concepts)
        for neuron in range(args["neurons"]):
            own = [t["image_idx"] for t in store.top_images(run.run_key, neuron, k=config.n_top_images)]
            candidates = [words[(7 * neuron + j) % len(words)] for j in range(config.n_candidates)]
            best_concepts(candidates, backend.encode_texts(candidates), probe_emb, acts, neuron, take_rows(probe_emb, own), own, config)
        info = {"neurons": args["neurons"]}
    elif step == "milan":
        from neuroviz.methods.milan import MilanConfig, MilanPMI

        ctx = MethodContext(store=store, run=run, multimodal=backend, language_model=SeededPrior(), captioner=NoCaptions(),
                            concepts=_concepts(args["concepts"]))
        rows = MilanPMI().describe(ctx, MilanConfig(exemplar_region="full", caption_candidates=False), list(range(args["neurons"])))
        info = {"labels": len(rows)}
    elif step == "linear":
        from neuroviz.methods.linear_explanations import LinearExplanationConfig, LinearExplanations

        ctx = MethodContext(store=store, run=run, multimodal=backend, concepts=_concepts(args["concepts"]))
        rows = LinearExplanations().describe(ctx, LinearExplanationConfig(), list(range(run.n_neurons)))
        info = {"labels": len(rows)}
    return {"seconds": time.perf_counter() - start, "baseline_mb": baseline, "peak_mb": bench_scale._status_mb("VmHWM"),
            "n_images": run.n_images, "n_neurons": run.n_neurons, **info}


def run_child(args: dict, timeout: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, cwd=REPO,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{args['step']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def workspace(n: int, work: Path, source: Path | None, args) -> Path:
    """A cache with layer4's run, its image embeddings and CLIP-Dissect labels for ``n`` images."""
    cache = work / f"cache-{n}"
    if cache.exists():
        return cache
    if source is not None and (source / f"cache-{n}").exists():
        shutil.copytree(source / f"cache-{n}", cache)
        return cache
    from neuroviz.synthetic_probe import write_probe_set

    images = work / "images"
    write_probe_set(images, n, size=40, workers=2)
    child = {"list": str(bench_scale.probe_list(images, n, 0)), "cache": str(cache), "image_size": 32, "batch_size": 64,
             "concepts": args.concepts, "threads": 1, "probability_mb": None}
    bench_scale.run_child("extract", child)
    bench_scale.run_child("label", child)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000", help="probe set sizes, comma-separated")
    parser.add_argument("--from", dest="source", type=Path, help="a bench_scale --workdir whose cache-N folders to copy")
    parser.add_argument("--workdir", type=Path, help="keep caches here (default: a temporary folder)")
    parser.add_argument("--steps", default=",".join(STEPS), help="steps to run, comma-separated")
    parser.add_argument("--neurons", type=int, default=32, help="neurons DnD and MILAN describe")
    parser.add_argument("--concepts", type=int, default=2000, help="concept set size")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_downstream_"))
    work.mkdir(parents=True, exist_ok=True)
    from neuroviz.store import SHARED_CACHE_ENV

    os.environ[SHARED_CACHE_ENV] = str(work / "shared")
    results: dict = {"settings": {"sizes": sizes, "steps": steps, "neurons": args.neurons, "concepts": args.concepts,
                                  "workdir": str(work)}, "sizes": {}}
    for n in sizes:
        cache = workspace(n, work, args.source, args)
        results["sizes"][n] = {}
        for step in steps:
            out = run_child({"step": step, "cache": str(cache), "neurons": args.neurons, "concepts": args.concepts}, args.timeout)
            results["sizes"][n][step] = out
            print(f"{n:>7,} images  {step:<9} {out['seconds']:8.1f} s  peak {out['peak_mb']:7.0f} MB  "
                  f"above start {out['peak_mb'] - out['baseline_mb']:6.0f} MB", flush=True)
    print("\n| step | " + " | ".join(f"peak RSS {n:,}" for n in sizes) + " | ratio | above start, ratio |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    for step in steps:
        peaks = [results["sizes"][n][step]["peak_mb"] for n in sizes]
        above = [results["sizes"][n][step]["peak_mb"] - results["sizes"][n][step]["baseline_mb"] for n in sizes]
        print(f"| {step} | " + " | ".join(f"{p:,.0f} MB" for p in peaks) +
              f" | {bench_scale.flat(peaks)} | {' / '.join(f'{a:,.0f}' for a in above)} MB, {bench_scale.flat(above)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(step_child(json.loads(sys.argv[2]))))
    else:
        main()
