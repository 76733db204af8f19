"""Page times at paper scale (issue 11): `.venv/bin/python benchmarks/bench_pages_scale.py --workdir DIR`.

Times the pages that read a layer's probe set or activations on the workspaces that
``benchmarks/bench_scale.py --workdir DIR`` built (``DIR/cache-<n images>``; layer4 of a random
ResNet-18, 512 neurons): the layer browser, the neuron page, Compare (two neurons, two methods),
Analysis and Audit. Each page through ``benchmarks/bench_pages.py`` (Streamlit AppTest):
- ``cold``: a fresh process with no picture on disk (a first visitor after a server start);
- ``restart``: a fresh process with the pictures on disk;
- ``warm``: the median of ``--repeats`` reruns in one process.
Script time (AppTest's script thread) and body time (our code only) per case.
``--repo OTHER_CHECKOUT`` (repeatable) times another checkout's pages on the same workspaces,
page by page in turn with this one, so that a loaded machine weighs on both alike.
Workspaces without labels get labels derived from the probe labels (as bench_pages does).
Targets (issue 11): warm < 150 ms and cold < 1 s at 100,000 images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

MODEL = "torchvision:resnet18@random"  # bench_scale.py's model
LAYER = "layer4"
PAGES = ("browser", "neuron", "compare", "compare-methods", "analysis", "audit")


def workspace_of(cache: Path) -> dict:
    """bench_pages' description of a bench_scale workspace (labelled first when it has no labels)."""
    from test_pages import add_probe_labels

    from neuroviz.store import Store

    store = Store(cache)
    run = next(r for r in store.find_runs(MODEL) if r.layer == LAYER)
    if store.labels(run.run_key, top_only=True).empty:
        add_probe_labels(store, run)
    return {"cache": str(cache), "model": MODEL, "layer": run.layer, "n_neurons": run.n_neurons, "n_images": run.n_images}


def time_pages(cache: Path, repeats: int = 5, pages: tuple[str, ...] = PAGES, repos: tuple[Path, ...] = (REPO,)) -> dict:
    """{repo: {page: cold/restart/warm script and body seconds}} on one workspace."""
    import bench_pages

    workspace = workspace_of(cache)
    out: dict = {str(repo): {} for repo in repos}
    for page in pages:
        for repo in repos:
            shutil.rmtree(cache / "thumbs", ignore_errors=True)
            cold = bench_pages.fresh_process(page, workspace, repeats, repo)
            restart = bench_pages.fresh_process(page, workspace, 0, repo)
            out[str(repo)][page] = {"cold_script": cold["first_script"], "cold_body": cold["first_body"],
                                    "restart_script": restart["first_script"], "restart_body": restart["first_body"],
                                    "warm_script": cold["warm_script"], "warm_body": cold["warm_body"]}
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="bench_scale.py's --workdir (holds cache-<n>/)")
    parser.add_argument("--sizes", default="10000,50000,100000", help="probe set sizes, comma-separated")
    parser.add_argument("--pages", default=",".join(PAGES), help=f"comma-separated, of {', '.join(PAGES)}")
    parser.add_argument("--repeats", type=int, default=5, help="warm reruns")
    parser.add_argument("--repo", type=Path, action="append", default=[], help="another checkout to time as well")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    repos = (REPO, *(r.resolve() for r in args.repo))
    pages = tuple(p for p in args.pages.split(",") if p)
    results: dict = {}
    print(f"{'images':>8s} {'page':16s} {'checkout':28s} {'cold ms (body)':>16s} {'restart ms (body)':>18s} "
          f"{'warm ms (body)':>15s}", flush=True)
    for n in (int(s) for s in args.sizes.split(",") if s.strip()):
        cache = args.workdir / f"cache-{n}"
        if not (cache / "runs").is_dir():
            print(f"{n:8d} no workspace at {cache}: run bench_scale.py --workdir {args.workdir} first", flush=True)
            continue
        results[n] = timed = time_pages(cache, args.repeats, pages, repos)
        for page in pages:
            for repo in repos:
                t = timed[str(repo)][page]
                print(f"{n:8d} {page:16s} {str(repo)[-28:]:28s} "
                      f"{_ms(t['cold_script']):>7s} ({_ms(t['cold_body']):>5s}) "
                      f"{_ms(t['restart_script']):>9s} ({_ms(t['restart_body']):>5s}) "
                      f"{_ms(t['warm_script']):>6s} ({_ms(t['warm_body']):>5s})", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
