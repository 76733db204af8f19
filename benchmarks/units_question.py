"""Are the SAE latents of a layer more interpretable than its neurons? (issue 14, item 4)

On the same images, for a layer's neuron run and a unit run (an SAE's latents):
CLIP-Dissect labels each unit from a seeded half of the probe set (the "fit" half of
``neuroviz.evaluate.evaluation_split``), and each label is scored on the other half by
simulation r (Pearson r between the unit's activations and the label's image-text
similarity). The shuffled baseline is computed here, not by the trust issue's code (not
merged yet): each unit's r against ``--null`` draws of labels shuffled across the same
layer's units, a one-sided p-value per unit from the normal tail of its own null draws (mean,
s.d.), Benjamini-Hochberg over the layer (statsmodels); a unit "beats shuffled" at q < 0.05. A constant label ("depiction") is
scored too.

    python benchmarks/units_question.py --cache /tmp/units-cache --units sae:<key>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def held_out_scores(acts: np.ndarray, image_emb: np.ndarray, text_emb: np.ndarray, concepts: list[str], fit: np.ndarray,
                    similarity, n_null: int, seed: int) -> dict:
    from scipy.stats import norm
    from statsmodels.stats.multitest import multipletests

    from neuroviz.evaluate import pearson_columns
    from neuroviz.methods.clip_dissect import ClipDissectConfig, ImageConceptSimilarity, label_neurons

    score = ~fit
    labels = label_neurons(acts[fit], ImageConceptSimilarity(image_emb[fit], text_emb, similarity=similarity),
                           ClipDissectConfig()).concept_index[:, 0]
    sim_score = np.asarray(similarity(image_emb[score], text_emb), dtype=np.float32)  # score images x concepts
    a = acts[score]
    r = pearson_columns(a, sim_score[:, labels])
    rng = np.random.default_rng(seed)
    null = np.stack([pearson_columns(a, sim_score[:, labels[rng.permutation(len(labels))]]) for _ in range(n_null)])
    # a normal tail from each unit's own null (mean, sd): 200 draws cannot resolve the p < 0.05 / n that
    # a correction over thousands of units needs, an empirical p-value would never pass it
    z = (r - null.mean(axis=0)) / np.maximum(null.std(axis=0, ddof=1), 1e-9)
    p = norm.sf(z)
    alive = a.std(axis=0) > 0  # a unit silent on every scored image has no r: it cannot beat anything
    p = np.where(alive, p, 1.0)
    beats = multipletests(p, alpha=0.05, method="fdr_bh")[0] & alive
    return {"labels": [concepts[i] for i in labels], "r": r, "null_mean": float(null[:, alive].mean()), "beats": beats,
            "alive": alive, "raw": (p < 0.05) & alive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/units-cache")
    parser.add_argument("--model", default="offline:mobilenet_v2")
    parser.add_argument("--probe", default="demo")
    parser.add_argument("--layer", default="features.18")
    parser.add_argument("--units", required=True, help="the unit run's units, e.g. sae:<key>")
    parser.add_argument("--concepts", default="words20k")
    parser.add_argument("--null", type=int, default=200, help="shuffles per unit for the baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from neuroviz import catalog, embeddings
    from neuroviz.backends.multimodal import create_multimodal, default_multimodal_for
    from neuroviz.concepts import load_concept_set
    from neuroviz.evaluate import evaluation_split, pearson_columns
    from neuroviz.store import Store
    from neuroviz.units import units_title

    store = Store(args.cache)
    neurons = catalog.find_run(store, args.model, args.probe, args.layer)
    latents = catalog.find_run(store, args.model, args.probe, args.layer, units=args.units)
    mm = create_multimodal(default_multimodal_for(args.model))
    concepts = load_concept_set(args.concepts, store.root)
    image_emb = np.asarray(embeddings.image_embeddings(mm, store, neurons.probe_set_id), dtype=np.float32)
    text_emb = np.asarray(embeddings.text_embeddings(mm, store, concepts), dtype=np.float32)
    texts = list(concepts.concepts)
    ids = [im["image_id"] for im in store.probe_images(neurons.probe_set_id)]
    fit = ~evaluation_split(ids, args.seed)
    const = np.asarray(embeddings.text_embeddings(mm, store, ["depiction"]), dtype=np.float32)
    rows = []
    for name, run in (("neurons", neurons), (units_title(store, latents.units), latents)):
        started = time.perf_counter()
        acts = np.asarray(store.activations(run.run_key), dtype=np.float32)
        out = held_out_scores(acts, image_emb, text_emb, texts, fit, mm.similarity, args.null, args.seed)
        const_r = pearson_columns(acts[~fit], np.repeat(np.asarray(mm.similarity(image_emb[~fit], const)), acts.shape[1], 1))
        alive, r = out["alive"], out["r"]
        rows.append({"units": name, "n": run.n_neurons, "alive": int(alive.sum()),
                     "distinct": len(set(np.asarray(out["labels"])[alive])),
                     "r": float(r[alive].mean()), "sem": float(r[alive].std(ddof=1) / np.sqrt(alive.sum())),
                     "shuffled": out["null_mean"], "constant": float(const_r[alive].mean()),
                     "beats": int(out["beats"].sum()), "raw": int(out["raw"].sum()), "seconds": time.perf_counter() - started})
        top = np.argsort(-np.where(alive, r, -9))[:5]
        print(f"{name}: best units " + ", ".join(f"{int(u)} '{out['labels'][u]}' r={r[u]:.2f}" for u in top))
    print(f"\n{args.model} {args.layer}, {len(ids)} images: labels fitted on {int(fit.sum())}, scored on {int((~fit).sum())} "
          f"held-out images (CLIP-Dissect soft-WPMI, {mm.id}, {args.concepts}); shuffled baseline: {args.null} "
          "permutations of the layer's labels, normal tail per unit, BH q < 0.05\n")
    print("| units | units (alive) | distinct labels | mean held-out simulation r (+- s.e.) | shuffled labels r | "
          "constant 'depiction' r | beat shuffled, BH q < 0.05 (share of alive) | p < 0.05 uncorrected |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['units']} | {row['n']} ({row['alive']}) | {row['distinct']} | {row['r']:.3f} +- {row['sem']:.3f} | "
              f"{row['shuffled']:.3f} | {row['constant']:.3f} | {row['beats']} ({row['beats'] / max(1, row['alive']):.1%}) | "
              f"{row['raw']} ({row['raw'] / max(1, row['alive']):.1%}) |")


if __name__ == "__main__":
    main()
