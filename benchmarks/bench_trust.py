"""Benchmark of held-out scoring and Linear Explanations: `.venv/bin/python benchmarks/bench_trust.py`.

Prints, from one run:
1. the time to score every neuron of 5 ResNet-50-shaped layers (layer1 256 + layer2 512 +
   layer3 1024 + layer4 2048 + fc 1000 = 4,840 neurons) over 10,000 held-out images with every
   metric (simulation r, AUPRC, F1, IoU), a method's labels, both baselines (the labels shuffled
   across the layer, a constant label), bootstrap 95 % intervals of the layer means (200
   resamples) and the per-unit badges, as ``evaluate --layer-intervals-only`` does; and the same
   with exact per-unit intervals for every unit (``evaluate``'s default);
2. the time to fit Linear Explanations (LE(multimodal): the backend's similarity to every concept
   of a 1,000-concept set) for the same 4,840 neurons over the same 10,000 images;
3. the time to extract those activations: ResNet-50 (random weights) over N real-size images
   (224 px, through neuroviz.extract, the same 5 layers), EXTRAPOLATED linearly to 10,000;
4. both ratios (targets: scoring < 10 %, Linear Explanations < 25 % of extraction).
Activations and embeddings are random arrays of the real shapes (512-d, as CLIP ViT-B/16):
the cost does not depend on their values. Labels are drawn from the concept set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_clip_dissect import LAYERS, time_extraction  # noqa: E402  (the same extraction measurement)


class ArrayBackend:
    """A multimodal backend over precomputed text embeddings (what a warm cache hands scoring)."""

    id = "bench"
    description = "random 512-d embeddings"

    def __init__(self, texts: list[str], emb: np.ndarray):
        self.row = {t: i for i, t in enumerate(texts)}
        self.emb = emb

    def encode_texts(self, texts, batch_size: int = 256) -> np.ndarray:
        return self.emb[[self.row[t] for t in texts]]

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        return image_emb @ text_emb.T


def synthetic(n_images: int, n_concepts: int, dim: int):
    rng = np.random.default_rng(0)
    image_emb = rng.standard_normal((n_images, dim), dtype=np.float32)
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb = rng.standard_normal((n_concepts + 1, dim), dtype=np.float32)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    concepts = [f"concept {i}" for i in range(n_concepts)]
    acts = {name: np.maximum(rng.standard_normal((n_images, n), dtype=np.float32), 0) for name, n in LAYERS.items()}
    labels = {name: rng.integers(0, n_concepts, n) for name, n in LAYERS.items()}
    return image_emb, concepts, ArrayBackend(concepts + ["depiction"], text_emb), acts, labels


def time_scoring(image_emb, concepts, backend, acts, labels, n_boot: int, per_unit: bool) -> tuple[float, dict]:
    from neuroviz.trust.badges import unit_badges
    from neuroviz.trust.baselines import constant_label_set, shuffled_label_set
    from neuroviz.trust.scoring import LabelSet, ScoringImages, score_label_sets

    timings = {}
    start = time.perf_counter()
    for name, layer_acts in acts.items():
        t = time.perf_counter()
        images = ScoringImages(layer_acts, image_emb, [str(i) for i in range(len(image_emb))], "bench")
        method = LabelSet("method", "method", {n: concepts[c] for n, c in enumerate(labels[name])})
        sets = [method, shuffled_label_set(method), constant_label_set("depiction", range(layer_acts.shape[1]))]
        scored = score_label_sets(None, images, backend, sets, n_boot=n_boot, per_unit=per_unit)
        for s in scored:
            for metric in s.scores.values:
                s.scores.mean_interval(metric)
        unit_badges(None, images, backend, [method])
        timings[name] = time.perf_counter() - t
    return time.perf_counter() - start, timings


def time_linear_explanations(image_emb, backend, acts) -> tuple[float, dict]:
    from neuroviz.methods.linear_explanations import LinearExplanationConfig, explain_units

    timings = {}
    start = time.perf_counter()
    concept_acts = backend.similarity(image_emb, backend.emb[:-1])  # (images, concepts), shared by the layers
    timings["concept activations"] = time.perf_counter() - start
    for name, layer_acts in acts.items():
        t = time.perf_counter()
        explained = explain_units(layer_acts, concept_acts, LinearExplanationConfig())
        assert len(explained) == layer_acts.shape[1]
        timings[name] = time.perf_counter() - t
    return time.perf_counter() - start, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="held-out images scored")
    parser.add_argument("--concepts", type=int, default=1_000, help="concept set of the labels and of Linear Explanations")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--extract-images", type=int, default=128, help="real images actually extracted (then extrapolated)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-per-unit", action="store_true", help="skip the (slower) exact per-unit intervals")
    args = parser.parse_args()

    n_neurons = sum(LAYERS.values())
    print(f"# trust benchmark: {n_neurons:,} neurons ({', '.join(f'{k} {v}' for k, v in LAYERS.items())}), "
          f"{args.images:,} held-out images, {args.concepts:,} concepts, {args.dim}-d embeddings, "
          f"{args.bootstrap} resamples", flush=True)
    extraction = time_extraction(args.extract_images, args.batch_size)
    per_image = extraction / args.extract_images
    extrapolated = per_image * args.images
    print(f"extraction measured: {args.extract_images} images in {extraction:.1f} s ({1 / per_image:.1f} img/s)", flush=True)
    data = synthetic(args.images, args.concepts, args.dim)
    image_emb, concepts, backend, acts, labels = data
    fast, fast_steps = time_scoring(image_emb, concepts, backend, acts, labels, args.bootstrap, per_unit=False)
    print(f"scoring (layer-mean intervals): {fast:.1f} s", flush=True)
    exact = exact_steps = None
    if not args.skip_per_unit:
        exact, exact_steps = time_scoring(image_emb, concepts, backend, acts, labels, args.bootstrap, per_unit=True)
        print(f"scoring (per-unit intervals): {exact:.1f} s", flush=True)
    le, le_steps = time_linear_explanations(image_emb, backend, acts)
    print(f"Linear Explanations: {le:.1f} s", flush=True)

    print("\n| step | seconds | share of extraction | target |")
    print("|---|---:|---:|---:|")
    print(f"| extraction of {args.images:,} images, 5 layers (EXTRAPOLATED from {args.extract_images}) | {extrapolated:.0f} | 100% | |")
    print(f"| scoring: 4 metrics x (method, shuffled, constant), layer-mean intervals, badges | {fast:.1f} | "
          f"{100 * fast / extrapolated:.1f}% | < 10% |")
    if exact is not None:
        print(f"| the same with exact per-unit bootstrap intervals | {exact:.1f} | {100 * exact / extrapolated:.1f}% | |")
    print(f"| Linear Explanations, {args.concepts:,} concepts | {le:.1f} | {100 * le / extrapolated:.1f}% | < 25% |")
    print("\nper layer (scoring, layer-mean intervals): " + ", ".join(f"{k} {v:.1f} s" for k, v in fast_steps.items()))
    if exact_steps:
        print("per layer (scoring, per-unit intervals): " + ", ".join(f"{k} {v:.1f} s" for k, v in exact_steps.items()))
    print("per step (Linear Explanations): " + ", ".join(f"{k} {v:.1f} s" for k, v in le_steps.items()))
    print(f"\nratio scoring / extraction = {fast / extrapolated:.3f} (target < 0.10)")
    print(f"ratio Linear Explanations / extraction = {le / extrapolated:.3f} (target < 0.25)")
    print(f"(extraction time extrapolated linearly from {args.extract_images} measured images)")


if __name__ == "__main__":
    main()
