"""Paper-scale benchmark (issue 11), not a test: `.venv/bin/python benchmarks/bench_scale.py`.

`--sizes 2000,10000` runs small sizes quickly; the default is 10,000, 50,000 and 100,000 images.
Probe sets are drawn on the fly by :mod:`neuroviz.synthetic_probe` (deterministic: image i is
the same at every size and on every machine; one folder serves every size through a list file
per size). The probed model is ResNet-18 with random weights at 32 px (layers conv1, layer1..4:
1,024 neurons, top-50 images with maps), so 100,000 images finish well under an hour on 2 cores.

Every step runs in a fresh child process that reports its own peak RSS (VmHWM) and the RSS it
held before the step began (imports, model, store). Per size:
1. extraction: seconds per 1,000 images, peak RSS; a bare forward pass of the same model and
   loader over the first ``--bare-images`` images gives extraction / bare forward;
2. CLIP-Dissect (soft-WPMI, the paper's formulation, calibrated) of all 1,024 neurons against
   ``--concepts`` concepts through run_method and the store, as `python -m neuroviz label`
   runs it, with a stand-in multimodal backend (a fixed random projection of an 8x8 thumbnail;
   seeded text vectors): the labelling cost depends on the sizes, not on the embeddings' values.
   Image-embedding seconds, labelling seconds, peak RSS;
3. the pages that read the probe set or the activations (layer browser, neuron page, Compare,
   Analysis, Audit) on layer4 through benchmarks/bench_pages_scale.py (Streamlit AppTest): a
   fresh process that builds the pictures (cold), a restart with pictures on disk, and the
   median of warm reruns;
4. at the smallest size of at most 10,000 images: extraction on the Ray engine (2 local
   workers) against in process, side by side: on a cluster the extraction starts itself, and
   on one started before (as with ``--address``), when ray is installed.
Targets (issue 11): peak RSS of extraction and of labelling flat from 10k to 100k within 15 %;
time per image flat; Ray within 1.3x of in-process; pages warm < 150 ms and cold < 1 s at 100k;
extraction / bare forward <= 1.15.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from neuroviz.backends.base import MultimodalBackend  # noqa: E402

MODEL = "torchvision:resnet18@random"
LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4"]
K = 50


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PixelProjection(MultimodalBackend):
    """Stand-in multimodal backend: an 8x8 thumbnail through a fixed random projection; texts
    get seeded random vectors. Cheap and deterministic, so the benchmark times CLIP-Dissect."""

    id = "bench-pixel-projection-64"
    description = "benchmark stand-in (random projection of an 8x8 thumbnail)"
    offline = True
    dim = 64

    def __init__(self):
        self._projection = np.random.default_rng(0).standard_normal((8 * 8 * 3, self.dim)).astype(np.float32)

    @staticmethod
    def _normalise(x: np.ndarray) -> np.ndarray:
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def encode_images(self, images, batch_size: int = 32) -> np.ndarray:
        pixels = np.stack([np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).reshape(-1) / 255.0 - 0.5
                           for im in images]) if len(images) else np.zeros((0, 192), np.float32)
        return self._normalise(pixels @ self._projection)

    def encode_texts(self, texts, batch_size: int = 256) -> np.ndarray:
        rows = [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts]
        return self._normalise(np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim))


# -- children: one step each, in a fresh process -------------------------------------------------
def extraction_child(args: dict) -> dict:
    import torch

    from neuroviz import datasets, extract, models
    from neuroviz.store import Store

    _threads(args)
    model = models.create(MODEL, image_size=args["image_size"])
    store = Store(args["cache"])
    start = time.perf_counter()
    ps = datasets.from_list(args["list"], cache_dir=store.root)
    scan_s = time.perf_counter() - start
    engine = args.get("engine") or {}
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    extract.extract(model, ps, LAYERS, store, k=K, batch_size=args["batch_size"], chunk_size=args["batch_size"] * 8, **engine)
    seconds = time.perf_counter() - start
    out = {"n": len(ps), "scan_s": scan_s, "seconds": seconds, "baseline_mb": baseline, "peak_mb": _status_mb("VmHWM")}
    if args.get("bare_images"):
        from bench_extract import bare_forward

        subset = datasets.ProbeSet("bare", "bare", ps.images[: args["bare_images"]])
        with torch.inference_mode():
            bare_forward(model, datasets.ProbeSet("warm", "warm", ps.images[:64]), args["batch_size"])  # warm-up
        out["bare_images"] = len(subset)
        out["bare_seconds"] = bare_forward(model, subset, args["batch_size"])
    return out


def _threads(args: dict) -> None:
    import torch

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))


def labelling_child(args: dict) -> dict:
    _threads(args)  # imports torch, as any labelling has it, before the baseline is read

    from neuroviz import embeddings
    from neuroviz.concepts import from_texts
    from neuroviz.methods import MethodContext, clip_dissect, run_method
    from neuroviz.methods.clip_dissect import ClipDissectConfig, reuse_probabilities
    from neuroviz.store import Store

    if args.get("probability_mb"):
        clip_dissect._PROBABILITY_BYTES = int(args["probability_mb"]) * 2**20

    store = Store(args["cache"])
    runs = [r for r in store.find_runs(MODEL) if r.layer in LAYERS]
    backend = PixelProjection()
    from neuroviz.synthetic_probe import COLOURS, SHAPES

    words = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    concepts = from_texts("bench", words + [f"concept {i:05d}" for i in range(args["concepts"] - len(words))])
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    embeddings.image_embeddings(backend, store, runs[0].probe_set_id)
    embeddings.text_embeddings(backend, store, concepts)
    embed_s = time.perf_counter() - start
    embed_peak = _status_mb("VmHWM")
    start = time.perf_counter()
    with reuse_probabilities():
        for run in runs:
            run_method("clip_dissect", MethodContext(store=store, run=run, multimodal=backend, concepts=concepts),
                       ClipDissectConfig())
    return {"embed_s": embed_s, "embed_peak_mb": embed_peak, "label_s": time.perf_counter() - start, "baseline_mb": baseline,
            "peak_mb": _status_mb("VmHWM"), "neurons": sum(r.n_neurons for r in runs), "concepts": len(concepts)}


CHILDREN = {"extract": extraction_child, "label": labelling_child}


def run_child(step: str, args: dict, timeout: float | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, json.dumps(args)], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the parent ---------------------------------------------------------------------------------
def probe_list(images: Path, n: int, seed: int) -> Path:
    """A list file of images 0..n-1 (a probe set of its own, with its own id)."""
    from neuroviz.synthetic_probe import image_path

    path = images.parent / f"probe-{n}.txt"
    if not path.exists():
        path.write_text("".join(f"{image_path(images, i, seed)}\n" for i in range(n)))
    return path


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("neuroviz.engines") is not None


@contextlib.contextmanager
def started_ray_cluster(cpus: int, port: int) -> Iterator[tuple[str, float]]:
    """A local Ray head of ``cpus`` CPUs started before the extraction (as `--address` users
    have one): yields (its address, seconds it took to accept a driver). Started with
    ``--block`` so that ending this one process stops it (``ray stop`` would stop every
    cluster on the machine). Token authentication is off for this private head and its
    drivers (Ray 2.60 turns it on for local clusters, and a driver of another session's token
    is refused)."""
    address = f"127.0.0.1:{port}"
    ray_bin = Path(sys.executable).parent / "ray"
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # inherited by the head, the probe and the extraction child
    start = time.perf_counter()
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--num-cpus={cpus}", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.perf_counter() + 180
        while True:  # until a driver can connect
            try:
                probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}'); ray.shutdown()"],
                                       capture_output=True, text=True, timeout=60)
                if probe.returncode == 0:
                    break
                failure = probe.stderr.strip().splitlines()[-1:] or ["?"]
            except subprocess.TimeoutExpired:
                failure = ["a driver did not connect within 60 s"]
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the Ray head at {address} did not accept a driver: {failure[0]}")
            time.sleep(1)
        yield address, time.perf_counter() - start
    finally:
        head.terminate()
        head.wait(timeout=60)
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # else Ray's ray.init() tries to join the dead head
        with contextlib.suppress(OSError):
            if record.read_text().strip().endswith(f":{port}"):
                record.unlink()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def pages(cache: Path, repeats: int) -> dict:
    """Cold (a fresh process that builds its pictures), restart (pictures on disk), warm median
    of the pages that read the probe set or the activations (benchmarks/bench_pages_scale.py)."""
    import bench_pages_scale

    return bench_pages_scale.time_pages(cache, repeats)[str(REPO)]


def ray_versus_inprocess(images: Path, n: int, work: Path, args: argparse.Namespace) -> dict:
    """Extraction of ``n`` images on 2 local Ray workers against in process, side by side (in
    process again right before, under the same machine load): once on a cluster the extraction
    starts itself (``address=None``), once on one started before (``--address``, the realistic
    use; its start-up is timed apart)."""
    base = {"list": str(probe_list(images, n, args.seed)), "image_size": args.image_size, "batch_size": args.batch_size,
            "threads": args.threads}
    ray_engine = {"engine": "ray", "shard_size": args.ray_shard_size} if args.ray_shard_size else {"engine": "ray"}
    caches = {name: work / f"cache-ray-{name}-{n}" for name in ("inprocess", "new_cluster", "started_cluster")}
    out: dict = {"images": n, "shard_size": args.ray_shard_size or "default"}
    out["inprocess"] = run_child("extract", {**base, "cache": str(caches["inprocess"])})["seconds"]
    out["new_cluster"] = run_child("extract", {**base, "cache": str(caches["new_cluster"]), "engine": ray_engine})["seconds"]
    with started_ray_cluster(2, args.ray_port) as (address, start_s):
        out["started_cluster"] = run_child("extract", {**base, "cache": str(caches["started_cluster"]),
                                                       "engine": {**ray_engine, "address": address}})["seconds"]
    out["cluster_start_s"] = start_s
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    inproc = out["inprocess"]
    print(f"\nRay engine, 2 local workers, {n:,} images (shard size {out['shard_size']}): in process {inproc:.1f} s; "
          f"Ray on a cluster it starts itself {out['new_cluster']:.1f} s -> ratio {out['new_cluster'] / inproc:.2f}; "
          f"Ray on a cluster started before ({start_s:.0f} s to start, not counted) {out['started_cluster']:.1f} s "
          f"-> ratio {out['started_cluster'] / inproc:.2f} (target <= 1.3)", flush=True)
    return out


def flat(values: Sequence[float]) -> str:
    return f"{max(values) / min(values):.2f}x" if len(values) > 1 and min(values) > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,100000", help="probe set sizes, comma-separated")
    parser.add_argument("--image-size", type=int, default=32, help="model input side in pixels")
    parser.add_argument("--image-pixels", type=int, default=40, help="side of the generated images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bare-images", type=int, default=2000, help="images in the bare forward pass")
    parser.add_argument("--concepts", type=int, default=20_000, help="concept set size (the paper's words: 20,000)")
    parser.add_argument("--repeats", type=int, default=5, help="warm page reruns")
    parser.add_argument("--probability-mb", type=int, help="CLIP-Dissect's p(c|x) budget (default: the library's)")
    parser.add_argument("--skip", default="", help="steps to skip: extract (reuse the runs in --workdir), label, pages, ray (it runs its own extractions)")
    parser.add_argument("--workdir", type=Path, help="keep images and caches here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-shard-size", type=int, help="images per shard on Ray (default: the engine's)")
    parser.add_argument("--ray-port", type=int, default=6391, help="port of the Ray head the benchmark starts")
    parser.add_argument("--threads", type=int, help="torch threads in each step (default: torch's own choice); "
                        "on a machine shared with other jobs 1 thread avoids idle spinning")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    images = work / "images"
    from neuroviz.store import SHARED_CACHE_ENV

    os.environ[SHARED_CACHE_ENV] = str(work / "shared")  # the children's image embeddings stay in the work folder

    from neuroviz.synthetic_probe import write_probe_set

    start = time.perf_counter()
    write_probe_set(images, max(sizes), size=args.image_pixels, seed=args.seed, workers=2)
    print(f"probe images: {max(sizes):,} in {images} ({time.perf_counter() - start:.0f} s to draw the missing ones)", flush=True)
    results: dict = {"settings": {**vars(args), "workdir": str(work), "json": str(args.json), "sizes": sizes,
                                  "model": MODEL, "layers": LAYERS, "k": K}, "sizes": {}}
    for n in sizes:
        cache = work / f"cache-{n}"
        child = {"list": str(probe_list(images, n, args.seed)), "cache": str(cache), "image_size": args.image_size,
                 "batch_size": args.batch_size, "concepts": args.concepts, "threads": args.threads,
                 "probability_mb": args.probability_mb}
        row: dict = {}
        print(f"\n## {n:,} images", flush=True)
        if "extract" not in skip:
            row["extract"] = e = run_child("extract", {**child, "bare_images": min(n, args.bare_images)})
            ratio = (e["seconds"] / e["n"]) / (e["bare_seconds"] / e["bare_images"])
            print(f"extraction: {e['seconds']:.0f} s = {1000 * e['seconds'] / n:.2f} s / 1,000 images; peak RSS {e['peak_mb']:.0f} MB "
                  f"(held before: {e['baseline_mb']:.0f} MB); bare forward {1000 * e['bare_seconds'] / e['bare_images']:.2f} s "
                  f"/ 1,000 -> extraction / bare {ratio:.3f} (probe scan {e['scan_s']:.0f} s)", flush=True)
        if "label" not in skip:
            shutil.rmtree(cache / "labels", ignore_errors=True)  # label afresh: run_method computes only what is missing
            shutil.rmtree(cache / "arrays" / "clip_dissect_prior", ignore_errors=True)
            row["label"] = lab = run_child("label", child)
            print(f"CLIP-Dissect: {lab['neurons']} neurons x {lab['concepts']:,} concepts in {lab['label_s']:.1f} s; "
                  f"peak RSS {lab['peak_mb']:.0f} MB (held before: {lab['baseline_mb']:.0f} MB); "
                  f"image embeddings {lab['embed_s']:.0f} s, peak {lab['embed_peak_mb']:.0f} MB", flush=True)
        if "pages" not in skip:
            row["pages"] = pg = pages(cache, args.repeats)
            for page, t in pg.items():
                print(f"page {page:8s}: cold {t['cold_script'] * 1000:6.0f} ms (body {t['cold_body'] * 1000:5.0f}), "
                      f"restart {t['restart_script'] * 1000:6.0f} ms (body {t['restart_body'] * 1000:5.0f}), "
                      f"warm {t['warm_script'] * 1000:5.0f} ms (body {t['warm_body'] * 1000:4.0f})", flush=True)
        results["sizes"][n] = row
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    ray_size = next((n for n in sizes if n <= 10_000), None)
    if "ray" not in skip and ray_size is not None:
        if not ray_available():
            print("\nRay engine: skipped (ray is not installed: `pip install -r requirements-ray.txt`)")
        else:
            results["ray"] = ray_versus_inprocess(images, ray_size, work, args)
    rows = results["sizes"]
    print("\n## Summary (targets: flat within 15 %, i.e. <= 1.15x; pages warm < 150 ms, cold < 1 s)")
    if "extract" not in skip:
        per_k = [1000 * rows[n]["extract"]["seconds"] / n for n in sizes]
        print(f"extraction s / 1,000 images: {' / '.join(f'{v:.2f}' for v in per_k)}  (max/min {flat(per_k)})")
        peaks = [rows[n]["extract"]["peak_mb"] for n in sizes]
        print(f"extraction peak RSS MB:      {' / '.join(f'{v:.0f}' for v in peaks)}  (max/min {flat(peaks)})")
    if "label" not in skip:
        label_peaks = [rows[n]["label"]["peak_mb"] for n in sizes]
        label_s = [rows[n]["label"]["label_s"] for n in sizes]
        print(f"CLIP-Dissect peak RSS MB:    {' / '.join(f'{v:.0f}' for v in label_peaks)}  (max/min {flat(label_peaks)})")
        print(f"CLIP-Dissect seconds:        {' / '.join(f'{v:.1f}' for v in label_s)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        main()
