"""Analysis: what the neurons of a model are selective for, layer by layer, and how much
each group matters.

MILAN (Hernandez et al., ICLR 2022, section "Analysis") sorts neuron descriptions into
kinds (attributes such as colour and texture, object categories, scenes, relations) and
shows how their share changes with depth, then ablates each group to see how much the
model depends on it. This module does both from the labels in the store:

1. :func:`categorize_labels` gives each neuron's label a category with the word lists of
   :mod:`neuroviz.lexicon` (optionally falling back to the nearest category description
   under a text encoder when no word matches). A neuron is ``uninterpretable`` when it has
   no label (see ``AnalysisConfig.unlabelled``), a label that declares itself so, a
   calibrated score below ``min_calibrated``, or a label that matched nothing.
2. :func:`category_shares` counts, per layer and method, the share of neurons in each
   category. ``counting="head"`` puts each neuron in one category (the label's head, see
   the lexicon); ``counting="fractional"`` splits a neuron evenly over every category its
   label names. Either way the shares of a layer add up to 1.
3. :func:`group_importance` ablates each (layer, category) group with
   :mod:`neuroviz.editing` and measures the drop in accuracy (when probe labels map to the
   model's class names) or the share of top-1 predictions that change and the drop in the
   probability of the unedited answer, next to an equally large random group of the same
   layer (so a big group does not look important just for being big).

The command line is ``python -m neuroviz analyze`` (neuroviz/cli/analyze.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .errors import NeurovizError
from .lexicon import CATEGORY_ORDER, CONTENT_CATEGORIES, UNINTERPRETABLE_LABELS, Lexicon, default_lexicon
from .methods.base import dead_units
from .progress import Progress
from .provenance import provenance_key
from .store import RunInfo, Store
from .units import NEURONS, units_match

COUNTING_MODES = ("head", "fractional")


@dataclass(frozen=True)
class AnalysisConfig:
    """How labels become categories.

    ``min_calibrated`` applies only to labels that carry a calibrated score (assumed in
    [0, 1]); ``unlabelled`` says whether neurons a method did not label are left out
    ("exclude", the default: a neuron a method never ran on is unknown, not uninterpretable,
    which matters for DnD and MILAN run on chosen neurons) or count as uninterpretable
    ("uninterpretable", the MILAN reading when every neuron was described).
    ``fallback_min_similarity`` is a MiniLM cosine to a category description.
    """

    counting: str = "head"
    min_calibrated: float | None = 0.2
    unlabelled: str = "exclude"
    embedding_fallback: bool = False
    fallback_min_similarity: float = 0.3
    include_imagenet: bool = True
    text_backend: str = "conse"


class AnalysisError(NeurovizError, ValueError):
    """An analysis that cannot run (no runs, no labels); the message says what to do first."""


def _check(config: AnalysisConfig) -> None:
    if config.counting not in COUNTING_MODES:
        raise AnalysisError(f"Unknown counting '{config.counting}'; use one of {', '.join(COUNTING_MODES)}.")
    if config.unlabelled not in ("uninterpretable", "exclude"):
        raise AnalysisError("AnalysisConfig.unlabelled must be 'uninterpretable' or 'exclude'.")


def _lexicon_for(config: AnalysisConfig, lexicon: Lexicon | None) -> Lexicon:
    return lexicon or default_lexicon(config.include_imagenet)


def runs_for_analysis(store: Store, model_spec: str, probe_set_id: str, layers: Sequence[str] | None = None,
                      layer_order: Sequence[str] | None = None, units: str | None = None) -> list[RunInfo]:
    """One run per layer (a mean/CLS-pooled one when there is a choice, else the newest), in
    network order when ``layer_order`` (e.g. the model's module names) is given.

    ``units`` picks whose runs: the layers' neurons (None or "neurons"), or one dictionary's
    units ("sae:<key>", a key prefix is enough), so an SAE's latents are analysed apart from
    the neurons of the same layer and never mixed with them."""
    runs = [r for r in store.find_runs(model_spec, probe_set_id) if units_match(r.units, units)]
    if layers:
        runs = [r for r in runs if r.layer in set(layers)]
    chosen: dict[str, RunInfo] = {}
    for run in sorted(runs, key=lambda r: (r.pooling in ("mean", "cls"), r.created_at)):
        chosen[run.layer] = run  # later (preferred) runs overwrite earlier ones
    ordered = list(chosen.values())
    if layer_order:
        pos = {name: i for i, name in enumerate(layer_order)}
        ordered.sort(key=lambda r: (pos.get(r.layer, len(pos)), r.created_at))
    else:
        ordered.sort(key=lambda r: r.created_at)
    return ordered


def latest_labels(store: Store, run: RunInfo, methods: Sequence[str] | None = None):
    """The rank-0 label of every neuron from each method's newest label run on ``run``
    (none for dead units: labels stored before labelling skipped them describe nothing)."""
    labels = store.labels(run.run_key, top_only=True)
    labels = labels[~labels["neuron"].isin(dead_units(store, run))]
    if methods:
        labels = labels[labels["method"].isin(list(methods))]
    if not len(labels):
        return labels
    label_runs = store.label_runs(run.run_key)
    newest = label_runs.sort_values("created_at").groupby("method")["label_key"].last()
    return labels[labels["label_key"].isin(set(newest.values))].reset_index(drop=True)


def _fallback_categories(labels: Sequence[str], config: AnalysisConfig, lexicon: Lexicon, encoder, store: Store | None) -> dict[str, str | None]:
    """Nearest category description by text embedding, for labels no word list matched."""
    if not labels:
        return {}
    from .audit import cached_text_embeddings, text_backend

    encoder = encoder or text_backend(config.text_backend)
    cats = list(CONTENT_CATEGORIES)
    desc = cached_text_embeddings(encoder, store, [lexicon.descriptions[c] for c in cats])
    emb = cached_text_embeddings(encoder, store, list(labels))
    sims = emb @ desc.T
    out: dict[str, str | None] = {}
    for label, row in zip(labels, sims):
        j = int(np.argmax(row))
        out[label] = cats[j] if row[j] >= config.fallback_min_similarity else None
    return out


def categorize_labels(labels, config: AnalysisConfig = AnalysisConfig(), lexicon: Lexicon | None = None,
                      encoder=None, store: Store | None = None):
    """One row per (neuron, method, category) with a weight (1 for head counting; 1/m when
    a label names m categories under fractional counting), the match kind and the terms.

    ``labels`` is a DataFrame from ``store.labels(..., top_only=True)``.
    """
    import pandas as pd

    _check(config)
    lexicon = _lexicon_for(config, lexicon)
    matches = {}
    for text in {str(x) for x in labels["label"].dropna()} if len(labels) else set():
        matches[text] = lexicon.match(text)
    unmatched = sorted(t for t, m in matches.items() if not m.matched and t.strip().lower() not in UNINTERPRETABLE_LABELS)
    fallback = _fallback_categories(unmatched, config, lexicon, encoder, store) if config.embedding_fallback else {}
    rows = []
    for rec in labels.itertuples(index=False) if len(labels) else []:
        text = "" if rec.label is None or (isinstance(rec.label, float) and np.isnan(rec.label)) else str(rec.label)
        m = matches.get(text)
        calibrated = None if rec.calibrated is None or (isinstance(rec.calibrated, float) and np.isnan(rec.calibrated)) else float(rec.calibrated)
        base = {"neuron": int(rec.neuron), "method": rec.method, "label": text, "calibrated": calibrated}
        if text.strip().lower() in UNINTERPRETABLE_LABELS:
            rows.append({**base, "category": "uninterpretable", "weight": 1.0, "match_kind": "declared", "terms": ""})
        elif config.min_calibrated is not None and calibrated is not None and calibrated < config.min_calibrated:
            rows.append({**base, "category": "uninterpretable", "weight": 1.0, "match_kind": "low calibrated score", "terms": ""})
        elif m is not None and m.matched:
            terms = ", ".join(t.term for t in m.terms)
            cats = [m.head] if config.counting == "head" else list(m.categories)
            for c in cats:
                rows.append({**base, "category": c, "weight": 1.0 / len(cats), "match_kind": "lexicon", "terms": terms})
        elif fallback.get(text):
            rows.append({**base, "category": fallback[text], "weight": 1.0, "match_kind": "embedding", "terms": ""})
        else:
            rows.append({**base, "category": "uninterpretable", "weight": 1.0, "match_kind": "no match", "terms": ""})
    return pd.DataFrame(rows, columns=["neuron", "method", "label", "calibrated", "category", "weight", "match_kind", "terms"])


def category_shares(store: Store, model_spec: str, probe_set_id: str, config: AnalysisConfig = AnalysisConfig(),
                    layers: Sequence[str] | None = None, layer_order: Sequence[str] | None = None,
                    methods: Sequence[str] | None = None, lexicon: Lexicon | None = None, encoder=None,
                    units: str | None = None):
    """Share of neurons (or of ``units``: an SAE's latents) per category, per layer and method, as a long DataFrame:
    layer, layer_index, method, category, count, n_neurons, n_labelled, share.

    Every category appears for every (layer, method) pair (share 0 when empty), so charts
    have stable colours; within a (layer, method) the shares add up to 1. A method that
    labelled nothing in a layer gives no rows for that layer.
    """
    import pandas as pd

    _check(config)
    runs = runs_for_analysis(store, model_spec, probe_set_id, layers, layer_order, units)
    if not runs:
        if units not in (None, NEURONS):
            raise AnalysisError(f"No runs of units '{units}' of {model_spec} over probe set {probe_set_id}; "
                                "see `python -m neuroviz units list`.")
        raise AnalysisError(f"No layers of {model_spec} are extracted over probe set {probe_set_id}; extract some layers first.")
    rows = []
    for li, run in enumerate(runs):
        labels = latest_labels(store, run, methods)
        if not len(labels):
            continue
        cats = categorize_labels(labels, config, lexicon, encoder, store)
        n_live = run.n_neurons - len(dead_units(store, run))  # dead units are neither labelled nor uninterpretable
        for method, group in cats.groupby("method"):
            labelled = group["neuron"].nunique()
            counts = group.groupby("category")["weight"].sum().to_dict()
            total = n_live if config.unlabelled == "uninterpretable" else labelled
            if config.unlabelled == "uninterpretable":
                counts["uninterpretable"] = counts.get("uninterpretable", 0.0) + (n_live - labelled)
            for category in CATEGORY_ORDER:
                count = float(counts.get(category, 0.0))
                rows.append({"layer": run.layer, "layer_index": li, "method": method, "category": category, "count": count,
                             "n_neurons": run.n_neurons, "n_labelled": int(labelled), "share": count / total if total else 0.0,
                             "n_dead": run.n_neurons - n_live, "run_key": run.run_key})
    if not rows:
        raise AnalysisError("No labels in these layers yet. Run a description method first (e.g. CLIP-Dissect on the Browse page "
                            "or `python -m neuroviz label ...`).")
    return pd.DataFrame(rows)


def neuron_categories(store: Store, run: RunInfo, method: str, config: AnalysisConfig = AnalysisConfig(),
                      lexicon: Lexicon | None = None, encoder=None) -> dict[str, list[int]]:
    """``{category: [neurons]}`` of one layer under one method, each neuron in its head
    category (unlabelled live neurons in "uninterpretable" unless config says exclude; dead ones in none)."""
    head_config = AnalysisConfig(**{**asdict(config), "counting": "head"})
    labels = latest_labels(store, run, [method])
    cats = categorize_labels(labels, head_config, lexicon, encoder, store)
    groups: dict[str, list[int]] = {}
    for category, group in cats.groupby("category"):
        groups[category] = sorted(group["neuron"].astype(int).unique().tolist())
    if config.unlabelled == "uninterpretable":
        labelled = set(cats["neuron"].astype(int))
        groups.setdefault("uninterpretable", [])
        unlabelled = set(range(run.n_neurons)) - labelled - set(dead_units(store, run))
        groups["uninterpretable"] = sorted(set(groups["uninterpretable"]) | unlabelled)
    return {c: groups[c] for c in CATEGORY_ORDER if groups.get(c)}


# ----------------------------------------------------------------------------------------
# importance by ablation


@dataclass(frozen=True)
class ImportanceConfig:
    """How groups are ablated and measured. ``max_images`` caps the probe images used per
    pass (an evenly spaced subset; with ``labelled_first`` taken from the images whose
    label is a class name when there are any) so a full table stays within minutes on a CPU."""

    mode: str = "zero"
    max_images: int | None = 128
    labelled_first: bool = True  # spend the image budget on images whose label is a class name
    random_baseline: bool = True
    seed: int = 0
    batch_size: int = 32


IMPORTANCE_NAMESPACE = "importance"
IMPORTANCE_VERSION = "importance-1"


def importance_key(store: Store, model_spec: str, probe_set_id: str, method: str, config: AnalysisConfig,
                   importance: ImportanceConfig, layers: Sequence[str] | None = None,
                   categories: Sequence[str] | None = None, units: str | None = None) -> str:
    """Provenance of an importance table: the runs (which hash the weights), the label runs
    it read, and every setting. Computable from the store alone, so a page can find a table
    a background job wrote without loading the model. (The run keys name the units: a table of
    an SAE's latents never stands for the neurons' table.)"""
    runs = runs_for_analysis(store, model_spec, probe_set_id, layers, units=units)
    label_keys = []
    for run in runs:
        labels = latest_labels(store, run, [method])
        label_keys += sorted(set(labels["label_key"])) if len(labels) else []
    return provenance_key({"code": IMPORTANCE_VERSION, "runs": sorted(r.run_key for r in runs), "labels": label_keys,
                           "method": method, "config": asdict(config), "importance": asdict(importance),
                           "categories": sorted(categories) if categories else None})


def load_importance(store: Store, key: str):
    """A stored importance table (DataFrame) or None."""
    import pandas as pd

    record = store.get_record(IMPORTANCE_NAMESPACE, key)
    return None if record is None else pd.DataFrame(record["rows"])


def group_importance(model, store: Store, probe_set, method: str, config: AnalysisConfig = AnalysisConfig(),
                     importance: ImportanceConfig = ImportanceConfig(), layers: Sequence[str] | None = None,
                     categories: Sequence[str] | None = None, progress: Progress | None = None,
                     lexicon: Lexicon | None = None, encoder=None, save: bool = True, units: str | None = None):
    """Ablate each (layer, category) group of ``method``'s labels and measure the damage.

    Returns a DataFrame: layer, category, n_neurons, metric ("accuracy_drop" when probe
    labels map to class names, else "flip_rate"), importance (that metric), flip_rate,
    confidence_drop, accuracy_drop, random_importance (an equal-size random group of the
    same layer) and importance_per_neuron. Every prediction pass is cached, and with
    ``save`` the table is stored under :func:`importance_key` for the Analysis page.
    With ``units`` (an SAE's, "sae:<key>") the groups are latents, ablated by removing their
    decoded contribution (:func:`neuroviz.editing.units_ablated`); "n_neurons" then counts latents.
    """
    import pandas as pd

    from . import editing

    order = [name for name, _ in model.module.named_modules()]
    runs = runs_for_analysis(store, model.spec, probe_set.id, layers, order, units)
    plan: list[tuple[RunInfo, str, list[int]]] = []
    for run in runs:
        for category, neurons in neuron_categories(store, run, method, config, lexicon, encoder).items():
            if categories and category not in categories:
                continue
            plan.append((run, category, neurons))
    if not plan:
        raise AnalysisError(f"No neurons labelled by '{method}' in the stored layers of {model.spec}; run the method first.")
    if importance.labelled_first:
        rows_used = editing.labelled_first_indices(probe_set, model.class_names, importance.max_images)
    else:
        rows_used = editing.subset_indices(len(probe_set), importance.max_images)
    n = len(rows_used)
    passes = 1 + len(plan) * (2 if importance.random_baseline else 1)
    state = {"pass": 0}

    def step(message: str) -> Progress | None:
        if progress is None:
            return None
        base = state["pass"] * n
        return lambda done, _t, _m: progress(base + done, passes * n, message)

    before = editing.predict(model, probe_set, store, None, None, importance.batch_size, step("original model"), rows_used)
    state["pass"] += 1
    rng = np.random.default_rng(importance.seed)
    rows = []
    for run, category, neurons in plan:
        def measure(ids: list[int], tag: str, run=run, category=category) -> editing.Comparison:
            edit = editing.make_edit(f"{tag} {run.layer} {category}"[:80].replace("/", " ").replace("\\", " "), model.spec, {run.layer: ids},
                                     importance.mode, store, probe_set.id, units=run.units)
            after = editing.predict(model, probe_set, store, edit, None, importance.batch_size,
                                    step(f"ablating {category} in {run.layer} ({len(ids)} neurons)"), rows_used)
            state["pass"] += 1
            return editing.compare(before, after, probe_set, model.class_names)

        cmp = measure(neurons, "importance")
        metric = "accuracy_drop" if cmp.accuracy_drop is not None else "flip_rate"
        flip = 1.0 - cmp.agreement
        value = cmp.accuracy_drop if cmp.accuracy_drop is not None else flip
        row = {"layer": run.layer, "category": category, "n_neurons": len(neurons), "layer_neurons": run.n_neurons,
               "metric": metric, "importance": value, "flip_rate": flip, "confidence_drop": cmp.confidence_drop,
               "accuracy_drop": cmp.accuracy_drop, "n_images": cmp.n_images, "n_labelled": cmp.n_labelled,
               "importance_per_neuron": value / len(neurons) if neurons else 0.0}
        if importance.random_baseline:
            dead = dead_units(store, run)  # a random group of the layer's live units (a dead one changes nothing)
            pool = np.setdiff1d(np.arange(run.n_neurons), dead) if dead else run.n_neurons
            random_ids = sorted(rng.choice(pool, size=len(neurons), replace=False).tolist())
            rnd = measure(random_ids, "random")
            row["random_importance"] = rnd.accuracy_drop if metric == "accuracy_drop" else 1.0 - rnd.agreement
            row["random_confidence_drop"] = rnd.confidence_drop
        rows.append(row)
    if progress:
        progress(passes * n, passes * n, "done")
    table = pd.DataFrame(rows)
    if save:
        key = importance_key(store, model.spec, probe_set.id, method, config, importance, layers, categories, units)
        store.put_record(IMPORTANCE_NAMESPACE, key, {
            "model_spec": model.spec, "probe_set_id": probe_set.id, "units": units or NEURONS, "method": method, "config": asdict(config),
            "importance": asdict(importance), "layers": list(layers) if layers else None, "created": time.time(),
            "rows": json.loads(table.to_json(orient="records")),
        })
    return table
