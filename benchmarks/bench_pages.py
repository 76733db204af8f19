"""How fast the dashboard's pages render: `.venv/bin/python benchmarks/bench_pages.py`.

Budgets (the brief): the layer browser (24 cards) and the neuron page render from a warm
cache in < 150 ms of script time and from a cold start in < 1 s. Every owner page is timed
(``--pages`` picks some; ``compare-methods`` is Compare in its "two methods" mode), and
``--repo OTHER_CHECKOUT`` times another checkout's pages on the same workspace copy, for a
before/after comparison.

Workspace: a *copy* of ./cache (or --cache DIR) when it holds extracted runs (the demo:
MobileNetV2 over ~700 images), labelled with labels derived from the probe set's own labels
when it has none, so the pages have something to show; otherwise the tiny test workspace
(random ResNet-18 at 64 px over 40 images). The copy keeps the original untouched.

For each page, through Streamlit's AppTest (the same script path as `streamlit run`):
- ``process cold``: a fresh Python process, empty Streamlit caches, no cached pictures:
  everything a first visitor after a server start pays, imports of our modules included;
- ``thumbnails built``: a fresh process after `extract` (or the demo build) has built the
  per-image thumbnails, but no page has drawn a mosaic yet: a first visit after extraction;
- ``pictures on disk``: a fresh process whose mosaics/thumbnails already exist (a restart);
- ``warm``: the median of repeated reruns in one process.
Two figures per case: ``script`` (the script thread's wall time, including AppTest's own
recompilation of the page, ~30-60 ms that a real server caches) and ``body`` (the page
body inside ui.guard.friendly_errors, i.e. our code only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# name -> (page file, the page body's ui.guard name, widget changes after the first run)
PAGES = {
    "browser": ("views/browser.py", "the layer browser", ()),
    "neuron": ("views/neuron.py", "the neuron", ()),
    "compare": ("views/compare.py", "the comparison", ()),
    "compare-methods": ("views/compare.py", "the comparison", (("button_group", 0, "methods"),)),
    "synthesize": ("views/synthesize.py", "the synthesis page", ()),
    "analysis": ("views/analysis.py", "the analysis page", ()),
    "audit": ("views/audit.py", "the audit page", ()),
    "editing": ("views/editing.py", "the editing page", ()),
    "workspace": ("views/workspace.py", "the workspace", ()),
    "study_setup": ("views/study_setup.py", "the study setup", ()),
    "study_results": ("views/study_results.py", "the study results", ()),
}
PICTURE_PAGES = ("browser", "neuron")  # the pages whose first visit builds pictures: also timed after extraction


def prepare_workspace(source: Path | None, out: Path) -> dict:
    """Copy an existing cache's results or build the tiny one; make sure it has labels."""
    from neuroviz.store import Store

    if source is not None and (source / "runs").exists():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("runs", "probesets", "labels", "records", "neuroviz.duckdb", "migrated.json"):  # results, not pictures
            if (source / name).is_dir():
                shutil.copytree(source / name, out / name, ignore=shutil.ignore_patterns("partial"))
            elif (source / name).exists():
                shutil.copy2(source / name, out / name)
        store = Store(out)
        runs = store.find_runs()
        if runs:
            from test_pages import add_probe_labels

            for run in runs:
                if store.labels(run.run_key, top_only=True).empty:
                    add_probe_labels(store, run)
            widest = max(runs, key=lambda r: r.n_neurons if r.map_shape else -1)
            return {"cache": str(out), "model": widest.model_spec, "layer": widest.layer, "n_neurons": widest.n_neurons,
                    "n_images": widest.n_images, "source": str(source)}
    from conftest import make_shape_images, save_skimage_samples
    from test_pages import build_dashboard_cache

    images = out.parent / "probe"
    make_shape_images(images / "shapes")
    save_skimage_samples(images / "photos")
    info = build_dashboard_cache(out, images)
    run = info["runs"]["layer4"]
    return {"cache": str(out), "model": run.model_spec, "layer": run.layer, "n_neurons": run.n_neurons,
            "n_images": run.n_images, "source": "tiny test workspace"}


class ScriptTimer:
    """Wall time of AppTest's script thread (the run of app.py and the page)."""

    def __init__(self):
        self.seconds = 0.0
        self._orig = threading.Thread.run

    def __enter__(self):
        timer = self

        def run(thread):
            if "script" not in thread.name.lower():  # a page's picture or prerender threads are not the script
                return timer._orig(thread)
            start = time.perf_counter()
            try:
                timer._orig(thread)
            finally:
                timer.seconds = time.perf_counter() - start

        threading.Thread.run = run
        return self

    def __exit__(self, *exc):
        threading.Thread.run = self._orig


def measure(page: str, workspace: dict, repeats: int, repo: Path = REPO) -> dict:
    """Run one page in this process: the first run (cold for this process), then warm reruns."""
    from streamlit.testing.v1 import AppTest

    os.environ["NEUROVIZ_CACHE"] = workspace["cache"]
    os.environ["NEUROVIZ_UI_RAISE"] = "1"
    path, what, changes = PAGES[page]
    at = AppTest.from_file(str(repo / "app.py"), default_timeout=300)
    at.query_params.update({"model": workspace["model"], "layer": workspace["layer"]})
    if path != "views/browser.py":  # a link to the browser (the default page) naming a neuron opens that neuron
        at.query_params["neuron"] = "3"
    at.switch_page(path)
    if changes:  # reach the measured state (e.g. Compare's "two methods"), then time from a cold process on
        at.run()
        for kind, index, value in changes:
            at.get(kind)[index].set_value(value)
    results: dict = {"script": [], "body": []}
    for _i in range(repeats + 1):
        with ScriptTimer() as timer:
            at.run()
        if at.exception:
            raise RuntimeError(f"{page} raised: {at.exception[0].value}")
        body = at.session_state["nv_timings"].get(what) if "nv_timings" in at.session_state else None
        results["script"].append(timer.seconds)
        results["body"].append(body)
    return {"first_script": results["script"][0], "first_body": results["body"][0],
            "warm_script": statistics.median(results["script"][1:]) if repeats else None,
            "warm_body": statistics.median(b for b in results["body"][1:] if b is not None) if repeats else None}


def warm_thumbnails_only(workspace: dict) -> None:
    """Keep only the per-image thumbnails (as `python -m neuroviz extract` and the demo build leave
    them): pages then compose their mosaics without decoding any full-size image."""
    from neuroviz import images
    from neuroviz.store import Store

    root = Path(workspace["cache"])
    shutil.rmtree(root / "thumbs", ignore_errors=True)
    store = Store(root)
    run = next(r for r in store.find_runs(model_spec=workspace["model"]) if r.layer == workspace["layer"])
    geometry = images.recorded_view(store, run.preprocess_id) or images.IMAGENET_VIEW  # as the pages find it
    images.warm_thumbnails(root, [p["path"] for p in store.probe_images(run.probe_set_id)], geometry=geometry)


def fresh_process(page: str, workspace: dict, repeats: int, repo: Path = REPO) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", page, "--workspace", json.dumps(workspace),
                          "--repeats", str(repeats), "--repo", str(repo)], capture_output=True, text=True, cwd=repo)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache", help="workspace to copy (default ./cache)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test workspace even if ./cache has runs")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pages", default=",".join(PAGES), help=f"comma-separated, of {', '.join(PAGES)}")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="the checkout whose pages are timed (another worktree: a before/after comparison)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(args.repo.resolve()))  # that checkout's ui/ and neuroviz/
        print(json.dumps(measure(args.child, json.loads(args.workspace), args.repeats, args.repo.resolve())))
        return
    pages = [p for p in args.pages.split(",") if p]
    unknown = [p for p in pages if p not in PAGES]
    if unknown:
        parser.error(f"unknown page(s) {', '.join(unknown)}; pages: {', '.join(PAGES)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_pages_"))
    try:
        workspace = prepare_workspace(None if args.tiny else args.cache, tmp / "cache")
        print(f"workspace: {workspace['source']} -> layer {workspace['layer']} of {workspace['model']}: "
              f"{workspace['n_neurons']} neurons x {workspace['n_images']} images")
        print(f"{'page':15s} {'case':18s} {'script ms':>10s} {'body ms':>9s}", flush=True)
        for page in pages:
            shutil.rmtree(Path(workspace["cache"]) / "thumbs", ignore_errors=True)
            cold = fresh_process(page, workspace, args.repeats, args.repo)  # builds the pictures
            rows = [("process cold", cold["first_script"], cold["first_body"])]
            if page in PICTURE_PAGES:
                warm_thumbnails_only(workspace)  # what `extract` and the demo build leave behind
                after_extract = fresh_process(page, workspace, 0, args.repo)
                rows.append(("thumbnails built", after_extract["first_script"], after_extract["first_body"]))
            restart = fresh_process(page, workspace, 0, args.repo)
            rows += [("pictures on disk", restart["first_script"], restart["first_body"]),
                     (f"warm (median {args.repeats})", cold["warm_script"], cold["warm_body"])]
            for case, script, body in rows:
                print(f"{page:15s} {case:18s} {script * 1000:10.0f} {(body or 0) * 1000:9.0f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
