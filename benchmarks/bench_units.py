"""Benchmark of units beyond neurons: `.venv/bin/python benchmarks/bench_units.py --cache /tmp/units-cache`.

On the demo probe set (697 images) and offline:mobilenet_v2's features.18 (7 x 7 x 1,280),
in a fresh temporary workspace (image and text embeddings come from the shared cache):
1. the layer's extraction (its neurons: the reference time);
2. collecting its 34,153 positions and training the SAE (``--expansion``, ``--k``, ``--epochs``, and the
   recipe: ``--init data --aux-penalty 0 --batch-size 256 --lr 1e-3`` is the one that leaves few dead latents);
3. extracting the latents' run (top-k with maps, histograms, statistics);
4. CLIP-Dissect labels of every latent (soft-WPMI, the offline ConSE backend, words20k);
each as seconds and as a ratio to (1), and the peak RSS of the process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="cache", help="a workspace holding the demo probe set (read only)")
    parser.add_argument("--model", default="offline:mobilenet_v2")
    parser.add_argument("--layer", default="features.18")
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--init", default="random", help="random or data (latents start on training positions)")
    parser.add_argument("--schedule", default="constant", help="constant or cosine")
    parser.add_argument("--aux-penalty", type=float, default=1 / 32)
    parser.add_argument("--concepts", default="words20k")
    args = parser.parse_args()

    from neuroviz import extract, models
    from neuroviz.backends.multimodal import create_multimodal, default_multimodal_for
    from neuroviz.catalog import probe_set_for
    from neuroviz.concepts import load_concept_set
    from neuroviz.methods import MethodContext, run_method
    from neuroviz.sae import SaeConfig, extract_units, train_dictionary
    from neuroviz.store import Store

    demo = Store(args.cache)
    probe_set = probe_set_for(demo, "demo")
    model = models.create(args.model)
    config = SaeConfig(expansion=args.expansion, k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       init=args.init, schedule=args.schedule, aux_penalty=args.aux_penalty)
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "cache")
        start = time.perf_counter()
        extract.extract(model, probe_set, [args.layer], store, k=50)
        times["extract neurons (reference)"] = time.perf_counter() - start
        start = time.perf_counter()
        dictionary = train_dictionary(store, model, probe_set, args.layer, config)
        times[f"collect positions + train SAE ({args.epochs} epochs)"] = time.perf_counter() - start
        start = time.perf_counter()
        run = extract_units(store, model, probe_set, dictionary, k=50)
        times["latents: top-k, maps, histograms"] = time.perf_counter() - start
        mm = create_multimodal(default_multimodal_for(model.spec))
        concepts = load_concept_set(args.concepts, demo.root)
        start = time.perf_counter()
        run_method("clip_dissect", MethodContext(store=store, run=run, multimodal=mm, concepts=concepts))
        times["CLIP-Dissect labels of every latent"] = time.perf_counter() - start
    m = dictionary.meta["metrics"]
    reference = times["extract neurons (reference)"]
    print(f"{model.spec} {args.layer}, {len(probe_set)} images; SAE {args.expansion}x k={args.k}: {m['n_latents']} latents, "
          f"held-out R^2 {m['r2']:.3f}, L0 {m['l0']:.1f}, dead {m['dead']} ({m['dead'] / m['n_latents']:.1%}); "
          f"{config}\n")
    print("| step | seconds | ratio to the layer's extraction |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.1f} | {seconds / reference:.2f} |")
    after = sum(v for k, v in times.items() if k != "extract neurons (reference)")
    print(f"| SAE + latents + labels, together | {after:.1f} | {after / reference:.2f} |")
    print(f"\npeak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
