"""Benchmark of CLIP-Dissect labelling: run with `.venv/bin/python benchmarks/bench_clip_dissect.py`.

Prints, from one run:
1. the time to label every neuron of 5 ResNet-50 layers (layer1 256 + layer2 512 + layer3 1024
   + layer4 2048 + fc 1000 = 4,840 neurons) over 10,000 probe images and 20,000 concepts with
   soft-WPMI (the paper's formulation, calibrated), from cached activations and embeddings.
   Activations and embeddings are random arrays of the real shapes (the labelling cost does
   not depend on their values); 512-d embeddings as CLIP ViT-B/16's;
2. the time to extract those activations: ResNet-50 (random weights) over N real-size images
   (224 px, through neuroviz.extract, the same 5 layers), EXTRAPOLATED linearly to 10,000;
3. their ratio (target: labelling < 10% of extraction), and the peak memory of the labelling
   step (max RSS of a fresh process, minus what the process held before labelling began).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_extract import make_images  # noqa: E402  (the same synthetic probe images for both benchmarks)

LAYERS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "fc": 1000}


def time_extraction(n_images: int, batch_size: int) -> float:
    from neuroviz import datasets, extract, models
    from neuroviz.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp) / "images", n_images)
        store = Store(Path(tmp) / "cache")
        model = models.create("torchvision:resnet50@random")
        ps = datasets.from_folder(Path(tmp) / "images", cache_dir=store.root)
        start = time.perf_counter()
        extract.extract(model, ps, list(LAYERS), store, k=50, batch_size=batch_size, chunk_size=batch_size * 4)
        return time.perf_counter() - start


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def labelling_child(n_images: int, n_concepts: int, dim: int, share_probabilities: bool) -> None:
    """In a fresh process: label all layers, print timings and memory as JSON."""
    import torch  # noqa: F401  (imported before the baseline reading, as any real run has it)

    from neuroviz.methods.clip_dissect import ClipDissectConfig, ConceptProbabilities, ImageConceptSimilarity, label_neurons

    rng = np.random.default_rng(0)
    image_emb = rng.standard_normal((n_images, dim), dtype=np.float32)
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb = rng.standard_normal((n_concepts, dim), dtype=np.float32)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    acts = {name: np.maximum(rng.standard_normal((n_images, n), dtype=np.float32), 0) for name, n in LAYERS.items()}
    sim = ImageConceptSimilarity(image_emb, text_emb)
    config = ClipDissectConfig()
    baseline_mb = _rss_mb("VmRSS")
    timings = {}
    start = time.perf_counter()
    probs = ConceptProbabilities(sim, float(config.alpha)) if share_probabilities else None
    timings["p(c|x) matrix"] = time.perf_counter() - start
    for name, layer_acts in acts.items():
        t = time.perf_counter()
        result = label_neurons(layer_acts, sim, config, probabilities=probs)
        timings[name] = time.perf_counter() - t
        assert result.concept_index.shape == (layer_acts.shape[1], 5)
    total = time.perf_counter() - start
    print(json.dumps({"total_s": total, "timings": timings, "baseline_mb": baseline_mb, "peak_mb": _rss_mb("VmHWM")}))


def run_child(args, share: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--images", str(args.images), "--concepts", str(args.concepts), "--dim", str(args.dim)]
    if share:
        cmd.append("--share")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="probe images in the labelling step")
    parser.add_argument("--concepts", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512, help="embedding width (CLIP ViT-B/16: 512)")
    parser.add_argument("--extract-images", type=int, default=128, help="real images actually extracted (then extrapolated)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-layer", action="store_true",
                        help="also time labelling with p(c|x) recomputed for each layer (a second, equally long run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--share", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        labelling_child(args.images, args.concepts, args.dim, args.share)
        return

    n_neurons = sum(LAYERS.values())
    print(f"# CLIP-Dissect benchmark: {n_neurons:,} neurons ({', '.join(f'{k} {v}' for k, v in LAYERS.items())}), "
          f"{args.images:,} images, {args.concepts:,} concepts, {args.dim}-d embeddings", flush=True)
    extraction = time_extraction(args.extract_images, args.batch_size)
    per_image = extraction / args.extract_images
    extrapolated = per_image * args.images
    print(f"extraction measured: {args.extract_images} images in {extraction:.1f} s ({1 / per_image:.1f} img/s)", flush=True)

    shared = run_child(args, share=True)
    per_layer = run_child(args, share=False) if args.per_layer else None
    results = [("shared p(c|x)", shared)] + ([("per layer", per_layer)] if per_layer else [])

    print("\n| step | seconds | share of extraction |")
    print("|---|---:|---:|")
    print(f"| extraction of {args.images:,} images, 5 layers (EXTRAPOLATED from {args.extract_images}) | {extrapolated:.0f} | 100% |")
    print(f"| labelling, p(c|x) shared by the 5 layers (CLI `label` across layers) | {shared['total_s']:.1f} | "
          f"{100 * shared['total_s'] / extrapolated:.1f}% |")
    if per_layer:
        print(f"| labelling, p(c|x) recomputed per layer (`run_method` outside reuse_probabilities) | "
              f"{per_layer['total_s']:.1f} | {100 * per_layer['total_s'] / extrapolated:.1f}% |")
    print("\nper step (shared): " + ", ".join(f"{k} {v:.1f} s" for k, v in shared["timings"].items()))
    print("\n| labelling memory | MB |")
    print("|---|---:|")
    for name, res in results:
        print(f"| {name}: peak RSS of the process | {res['peak_mb']:.0f} |")
        print(f"| {name}: peak minus RSS before labelling (inputs loaded) | {res['peak_mb'] - res['baseline_mb']:.0f} |")
    ratio = shared["total_s"] / extrapolated
    print(f"\nratio labelling / extraction = {ratio:.3f} (target < 0.10; extraction time extrapolated linearly "
          f"from {args.extract_images} measured images)")


if __name__ == "__main__":
    main()
