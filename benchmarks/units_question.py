"""Are the SAE latents of a layer more interpretable than its neurons? (issue 14, item 4)

On the same images, for a layer's neuron run and a unit run (an SAE's latents), with the
trust scores of :mod:`neuroviz.trust`: CLIP-Dissect labels every unit from the fit part of the
content-hash split (:class:`~neuroviz.trust.split.HeldOutSplit`, seed ``--seed``, half the
images held out), and the labels are scored on the held-out part only
(:func:`~neuroviz.trust.scoring.score_label_sets`: simulation r, F1 at each unit's top 5 %, with
a bootstrap interval over images for the layer mean), beside the shuffled baseline (the same
labels permuted across the units) and a constant label ("depiction"). A unit "beats shuffled"
when its trust badge passes (:func:`~neuroviz.trust.badges.unit_badges`: its label against the
other units' labels on it, Benjamini-Hochberg q < 0.05 over the units of the row).

Rows: the neurons; all latents (dead ones score r = 0 and never pass: the SAE as a whole);
the live latents only (active on some held-out image; the correction is then over them).

    python benchmarks/units_question.py --cache /tmp/sae-cache --units sae:<key>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def clip_dissect_labels(acts_fit: np.ndarray, image_emb_fit: np.ndarray, text_emb: np.ndarray, concepts: list[str],
                        similarity) -> dict[int, str]:
    """Each unit's CLIP-Dissect (soft-WPMI) label from the fit images only."""
    from neuroviz.methods.clip_dissect import ClipDissectConfig, ImageConceptSimilarity, label_neurons

    best = label_neurons(acts_fit, ImageConceptSimilarity(image_emb_fit, text_emb, similarity=similarity),
                         ClipDissectConfig()).concept_index[:, 0]
    return {n: concepts[int(i)] for n, i in enumerate(best)}


def score_row(name: str, units: np.ndarray, labels: dict[int, str], images, mm, store, seed: int) -> dict:
    """Held-out scores of ``units``' labels, their shuffled and constant baselines, and badges."""
    from neuroviz.trust.badges import unit_badges
    from neuroviz.trust.baselines import DEFAULT_CONSTANT, constant_label_set, shuffled_label_set
    from neuroviz.trust.scoring import LabelSet, score_label_sets

    method = LabelSet("clip_dissect", "method", {int(n): labels[int(n)] for n in units})
    sets = [method, shuffled_label_set(method, seed), constant_label_set(DEFAULT_CONSTANT, units)]
    scored = score_label_sets(store, images, mm, sets, seed=seed, metrics=("simulation_r", "f1"), per_unit=False)
    badges = unit_badges(store, images, mm, [method])
    r, lo, hi = scored[0].scores.mean_interval("simulation_r")
    live = images.acts[:, units].std(axis=0) > 0
    return {"units": name, "n": len(units), "live": int(live.sum()), "distinct": len(set(method.labels.values())),
            "r": r, "lo": lo, "hi": hi, "f1": float(scored[0].scores.values["f1"].mean()),
            "shuffled": float(scored[1].scores.values["simulation_r"].mean()),
            "constant": float(scored[2].scores.values["simulation_r"].mean()),
            "beats": sum(b.passed for b in badges), "badges": badges}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/sae-cache")
    parser.add_argument("--model", default="offline:mobilenet_v2")
    parser.add_argument("--probe", default="demo")
    parser.add_argument("--layer", default="features.18")
    parser.add_argument("--units", required=True, help="the unit run's units, e.g. sae:<key>")
    parser.add_argument("--concepts", default="words20k")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from neuroviz import catalog, embeddings
    from neuroviz.backends.multimodal import create_multimodal, default_multimodal_for
    from neuroviz.concepts import load_concept_set
    from neuroviz.store import Store
    from neuroviz.trust.scoring import scoring_images
    from neuroviz.trust.split import HeldOutSplit
    from neuroviz.units import load_dictionary, units_title

    store = Store(args.cache)
    neurons = catalog.find_run(store, args.model, args.probe, args.layer)
    latents = catalog.find_run(store, args.model, args.probe, args.layer, units=args.units)
    mm = create_multimodal(default_multimodal_for(args.model))
    concepts = load_concept_set(args.concepts, store.root)
    texts = list(concepts.concepts)
    image_emb = np.asarray(embeddings.image_embeddings(mm, store, neurons.probe_set_id), dtype=np.float32)
    text_emb = np.asarray(embeddings.text_embeddings(mm, store, concepts), dtype=np.float32)
    split = HeldOutSplit(args.seed)
    ids = [im["image_id"] for im in store.probe_images(neurons.probe_set_id)]
    fit = ~split.score_mask(ids)
    rows = []
    for title, run in (("neurons", neurons), (units_title(store, latents.units), latents)):
        started = time.perf_counter()
        acts = np.asarray(store.activations(run.run_key), dtype=np.float32)
        labels = clip_dissect_labels(acts[fit], image_emb[fit], text_emb, texts, mm.similarity)
        images = scoring_images(store, run, mm, split)
        every = np.arange(run.n_neurons)
        rows.append(score_row(title if run is neurons else f"{title}: all latents", every, labels, images, mm, store,
                              args.seed))
        if run is latents:
            live = every[images.acts.std(axis=0) > 0]
            rows.append(score_row(f"{title}: live latents", live, labels, images, mm, store, args.seed))
        for row in rows[-2 if run is latents else -1:]:
            row["seconds"] = time.perf_counter() - started
            best = sorted(row["badges"], key=lambda b: -b.r)[:5]
            print(f"{row['units']}: best units " + ", ".join(f"{b.neuron} '{b.best_label}' r={b.r:.2f}" for b in best))
    metrics = load_dictionary(store, latents.units).meta.get("metrics", {})
    print(f"\n{args.model} {args.layer}, {len(ids)} images: labels fitted on {int(fit.sum())}, scored on "
          f"{int((~fit).sum())} held-out images ({split.describe()}; CLIP-Dissect soft-WPMI, {mm.id}, {args.concepts}). "
          f"SAE: held-out R^2 {metrics.get('r2', float('nan')):.3f}, L0 {metrics.get('l0', float('nan')):.1f}, "
          f"dead {metrics.get('dead')} of {metrics.get('n_latents')}\n")
    print("| units | units (live) | distinct labels | mean held-out simulation r [95 % CI] | F1 | shuffled labels r | "
          "constant 'depiction' r | beat shuffled, BH q < 0.05 (share of the row) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['units']} | {row['n']} ({row['live']}) | {row['distinct']} | {row['r']:.3f} [{row['lo']:.3f}, "
              f"{row['hi']:.3f}] | {row['f1']:.3f} | {row['shuffled']:.3f} | {row['constant']:.3f} | "
              f"{row['beats']} ({row['beats'] / max(1, row['n']):.1%}) |")


if __name__ == "__main__":
    main()
