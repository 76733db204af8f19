"""Compare description methods on one layer without people (METHODS.md, "Automatic quality metrics").

Every label set is scored the same way on the same *held-out* images (:mod:`neuroviz.trust`):
labels made from the run's fit run never saw them; labels made from the whole probe set did,
and their rows say "in-sample". Metrics: simulation r, AUPRC, F1 and IoU (those that pass
Neuron_Eval's sanity tests), each a mean over units with a bootstrap 95 % interval over
images. Beside the methods: a constant label ("depiction"), each method's labels shuffled
across the layer's units, and for output layers the oracle (class names) with final-layer
accuracy and the text cosine to the class name.

Warnings a researcher needs before trusting a layer's labels: *label diversity* (distinct
labels / units and the most repeated labels) and *hub images* (images in the top-k of many
units). ``common`` is defined once: the units every chosen label run labelled; the result
lists them, so a table made later with more labelled units says it used others.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import NeurovizError
from .store import RunInfo, Store
from .study.statistics import mean_sem
from .trust.badges import UnitBadge, save_badges, unit_badges
from .trust.baselines import DEFAULT_CONSTANT, constant_label_set, oracle_label_set, shuffled_label_set
from .trust.compare import save_unit_scores
from .trust.metrics import DEFAULT_BOOTSTRAP, METRIC_TITLES, METRICS, pearson_columns
from .trust.scoring import LabelSet, ScoredLabelSet, ScoringImages, normalise_label, score_label_sets, scoring_images
from .trust.split import HeldOutSplit, fit_run_key

DEFAULT_BASELINES = (DEFAULT_CONSTANT,)
HUB_TOP = 10  # an image is a hub when it is in the top HUB_TOP of many units
__all__ = ["DEFAULT_BASELINES", "Evaluation", "EvaluationError", "EvaluationRow", "evaluate_layer", "evaluate_run",
           "format_markdown", "normalise_label", "pearson_columns"]


class EvaluationError(NeurovizError, ValueError):
    """An evaluation that cannot be made on this layer's labels or probe set; the message says why."""


@dataclass
class EvaluationRow:
    """One method's (or baseline's) scores on one layer."""

    name: str  # method name, "baseline: <label>", "shuffled: <method>" or "oracle: class names"
    label_key: str | None
    n_neurons: int
    final_layer_accuracy: float | None = None
    final_layer_cosine: float | None = None
    simulation_correlation: float | None = None
    simulation_sem: float | None = None  # standard error over neurons
    n_eval_images: int = 0
    kind: str = "method"
    note: str = ""  # the label run: method, concept set, backends, date
    held_out: bool = True
    metrics: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # metric -> (mean, low, high)
    wins: int | None = None  # units (of those every method labelled) where this method's label scores best


@dataclass
class Evaluation:
    """A layer's evaluation: the rows, and what a reader must know to trust them."""

    rows: list[EvaluationRow]
    images: str  # which images scored the labels
    neurons: list[int] | None  # the units every row was restricted to (None: each row's own)
    diversity: dict[str, dict] = field(default_factory=dict)  # method row -> {distinct, units, top}
    hubs: list[tuple[str, int]] = field(default_factory=list)  # (image id, units whose top-k it is in)
    n_units_top: int = 0
    badges: list[UnitBadge] = field(default_factory=list)
    scored: list[ScoredLabelSet] = field(default_factory=list)


def evaluation_split(image_ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """Boolean mask of the held-out (scoring) images: the content-hash split of :mod:`.trust.split`."""
    return HeldOutSplit(seed).score_mask(image_ids)


def _run_note(meta) -> str:
    backends = ", ".join(f"{k}: {v}" for k, v in json.loads(meta.backends_json or "{}").items())
    concept_set = meta.concept_set_id if isinstance(meta.concept_set_id, str) else None  # NaN when the method has none
    concepts = f"concepts {concept_set[:10]}" if concept_set else "no concept set"
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(meta.created_at))) if meta.created_at == meta.created_at else "?"
    return f"{meta.method} [{str(meta.label_key)[:8]}] {concepts}; {backends or 'no backend'}; {when} UTC"


def _variant(method: str, hyperparams_json: str | None) -> str:
    """A method's row name: its name, plus its ``source`` where its config has one (Linear
    Explanations from labels or from the backend are two methods to compare)."""
    source = json.loads(hyperparams_json or "{}").get("source")
    return f"{method} ({source})" if source else str(method)


def method_label_sets(store: Store, run: RunInfo, split: HeldOutSplit, methods: Sequence[str] | None = None,
                      label_runs: Sequence[str] | None = None, latest_only: bool = True) -> list[LabelSet]:
    """The label runs of ``run`` (in-sample) and of its fit run under ``split`` (held out), as label sets.

    ``label_runs`` picks runs by label-key prefix; ``latest_only`` keeps the newest run per
    method and fitting (held out or in-sample).
    """
    fit_key = fit_run_key(run, split)
    found = []
    for run_key, held_out in ((run.run_key, False), (fit_key, True)):
        metas = store.label_runs(run_key)
        if not len(metas):
            continue
        if methods:
            metas = metas[metas["method"].isin(list(methods))]
        if label_runs:
            metas = metas[[any(str(k).startswith(p) for p in label_runs) for k in metas["label_key"]]]
        elif latest_only:
            metas = metas.assign(variant=[_variant(m, h) for m, h in zip(metas["method"], metas["hyperparams_json"])])
            metas = metas.drop_duplicates("variant", keep="last")
        top = store.labels(run_key, top_only=True)
        for meta in metas.itertuples():
            rows = top[top["label_key"] == meta.label_key]
            if len(rows):
                found.append((meta, held_out, dict(zip(rows["neuron"].astype(int), rows["label"].astype(str)))))
    if label_runs:
        missing = [p for p in label_runs if not any(str(m.label_key).startswith(p) for m, _, _ in found)]
        if missing:
            raise EvaluationError(f"No label run of layer {run.layer} starts with {', '.join(missing)}; "
                                  f"see `python -m neuroviz labels` for the label keys.")
    names = Counter((_variant(m.method, m.hyperparams_json), h) for m, h, _ in found)
    sets = []
    for meta, held_out, labels in found:
        variant = _variant(meta.method, meta.hyperparams_json)
        name = variant + ("" if held_out else " (in-sample)")
        if names[(variant, held_out)] > 1:
            name += f" [{str(meta.label_key)[:8]}]"
        sets.append(LabelSet(name, "method", labels, str(meta.label_key), _run_note(meta), held_out))
    return sets


def label_diversity(label_set: LabelSet, top: int = 3) -> dict:
    """Distinct labels, units, and the most repeated labels of one label set."""
    counts = Counter(label_set.labels.values())
    return {"distinct": len(counts), "units": len(label_set.labels), "top": counts.most_common(top)}


def hub_images(store: Store, run: RunInfo, neurons: Sequence[int] | None = None, top: int = HUB_TOP,
               n: int = 5) -> list[tuple[str, int]]:
    """The images in the top-``top`` of the most units: (image id, number of units)."""
    topk = store.top_k(run.run_key).image_idx[:, :top]
    if neurons is not None:
        topk = topk[list(neurons)]
    ids = store.probe_files(run.probe_set_id).image_ids
    counts = Counter(int(i) for row in topk for i in set(row.tolist()))
    return [(ids[i], c) for i, c in counts.most_common(n)]


def evaluate_layer(store: Store, run: RunInfo, multimodal, class_names: Sequence[str] | None = None,
                   methods: Sequence[str] | None = None, baselines: Sequence[str] = DEFAULT_BASELINES,
                   split_seed: int = 0, include_oracle: bool = True, latest_only: bool = True,
                   common_neurons: bool = False, neurons: Sequence[int] | None = None,
                   label_runs: Sequence[str] | None = None, score_run: RunInfo | None = None,
                   n_boot: int = DEFAULT_BOOTSTRAP, shuffled: bool = True, save: bool = True,
                   per_unit: bool = True) -> Evaluation:
    """Score the label runs of ``run`` and the baselines on held-out images (see the module docstring).

    ``per_unit=False`` skips each unit's own intervals (the neuron page's comparison then shows
    values only) and bootstraps the linearised layer means: much faster on wide layers.
    """
    split = HeldOutSplit(split_seed)
    sets = method_label_sets(store, run, split, methods, label_runs, latest_only)
    chosen: list[int] | None = None
    if neurons is not None:
        chosen = sorted({int(n) for n in neurons})
        bad = [n for n in chosen if not 0 <= n < run.n_neurons]
        if bad:
            raise EvaluationError(f"Neuron {bad[0]} does not exist: layer {run.layer} has neurons 0..{run.n_neurons - 1}.")
    if common_neurons and sets:
        shared = set.intersection(*(set(ls.labels) for ls in sets))
        chosen = sorted(shared if chosen is None else shared & set(chosen))
        if not chosen:
            raise EvaluationError("The methods labelled no neuron in common; run them on the same neurons or drop --common.")
    if chosen is not None:
        sets = [LabelSet(ls.name, ls.kind, {n: ls.labels[n] for n in chosen if n in ls.labels}, ls.label_key, ls.note, ls.held_out)
                for ls in sets]
        sets = [ls for ls in sets if ls.labels]
    all_neurons = chosen if chosen is not None else list(range(run.n_neurons))
    final_layer = class_names is not None and len(class_names) == run.n_neurons
    names: Sequence[str] = class_names or ()
    label_sets = list(sets)
    if shuffled:
        label_sets += [shuffled_label_set(ls, split_seed) for ls in sets if len(ls.labels) > 1]
    label_sets += [constant_label_set(text, all_neurons) for text in baselines]
    if final_layer and include_oracle:
        label_sets.append(oracle_label_set(names, all_neurons))

    try:
        images = scoring_images(store, run, multimodal, split, score_run)
    except NeurovizError as exc:
        raise EvaluationError(str(exc)) from None
    scored = score_label_sets(store, images, multimodal, label_sets, n_boot=n_boot, seed=split_seed, per_unit=per_unit)
    rows = [_row(s, images, final_layer, names, multimodal, store) for s in scored]
    _count_wins(rows, scored)
    # Badges judge labels on images their method never saw: held-out label runs when there are any.
    badge_sets = [ls for ls in sets if ls.held_out] or sets
    badges = unit_badges(store, images, multimodal, badge_sets) if badge_sets else []
    if save:
        about = {"images": images.description, "backend": multimodal.id, "split_seed": split_seed,
                 "held_out": all(ls.held_out for ls in badge_sets), "methods": [ls.name for ls in badge_sets],
                 "created_at": time.time()}
        save_unit_scores(store, run.run_key, scored, about)
        if badges:
            save_badges(store, run.run_key, badges, about)
    return Evaluation(rows, images.description, chosen, {ls.name: label_diversity(ls) for ls in sets},
                      hub_images(store, run, all_neurons), len(all_neurons), badges, scored)


def _row(s: ScoredLabelSet, images: ScoringImages, final_layer: bool, names: Sequence[str], multimodal, store: Store) -> EvaluationRow:
    from . import embeddings

    ls = s.label_set
    r = s.scores.values["simulation_r"]
    mean_r, sem_r = mean_sem(r)
    row = EvaluationRow(ls.name, ls.label_key, len(s.neurons), simulation_correlation=mean_r, simulation_sem=sem_r,
                        n_eval_images=len(images.image_ids), kind=ls.kind, note=ls.note, held_out=ls.held_out,
                        metrics={m: s.scores.mean_interval(m) for m in METRICS})
    if final_layer:
        truth = [str(names[n]) for n in s.neurons]
        labels = [ls.labels[int(n)] for n in s.neurons]
        row.final_layer_accuracy = float(np.mean([normalise_label(a) == normalise_label(t) for a, t in zip(labels, truth)]))
        texts = sorted(set(labels) | set(truth))
        emb = np.asarray(embeddings.text_embeddings(multimodal, store, texts), dtype=np.float32)
        at = {t: i for i, t in enumerate(texts)}
        a, b = emb[[at[x] for x in labels]], emb[[at[x] for x in truth]]
        row.final_layer_cosine = float(np.mean(np.sum(a * b, axis=1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))
    return row


def _count_wins(rows: list[EvaluationRow], scored: list[ScoredLabelSet]) -> None:
    """Per method row: on how many of the units every method labelled its label has the best simulation r."""
    methods = [(row, s) for row, s in zip(rows, scored) if s.label_set.kind == "method"]
    if len(methods) < 2:
        return
    shared = sorted(set.intersection(*(set(s.neurons.tolist()) for _, s in methods)))
    if not shared:
        return
    table = np.stack([[s.per_unit("simulation_r")[n] for n in shared] for _, s in methods])
    best = table.argmax(axis=0)
    for i, (row, _) in enumerate(methods):
        row.wins = int((best == i).sum())


def evaluate_run(store: Store, run: RunInfo, multimodal, class_names: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None, baselines: Sequence[str] = DEFAULT_BASELINES,
                 split_seed: int = 0, include_oracle: bool = True, latest_only: bool = True,
                 common_neurons: bool = False, **options) -> list[EvaluationRow]:
    """The rows of :func:`evaluate_layer` (kept for callers that need only the table)."""
    return evaluate_layer(store, run, multimodal, class_names, methods, baselines, split_seed, include_oracle,
                          latest_only, common_neurons, **options).rows


def _cell(value: float | None, digits: int = 3) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def format_markdown(rows: Sequence[EvaluationRow]) -> str:
    """A markdown table of evaluation rows: every metric's mean over units with its 95 % interval."""
    final = any(r.final_layer_accuracy is not None for r in rows)
    head = ["method", "fitted", "neurons"] + (["final-layer accuracy", "cosine to class name"] if final else [])
    head += ["simulation r", "± sem"] + [f"{METRIC_TITLES[m]} [95% CI]" for m in METRICS] + ["wins"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        fitted = "-" if r.kind in ("constant", "oracle") else "held out" if r.held_out else "in-sample"
        cells = [r.name, fitted, str(r.n_neurons)]
        if final:
            cells += [_cell(r.final_layer_accuracy), _cell(r.final_layer_cosine)]
        cells += [_cell(r.simulation_correlation), _cell(r.simulation_sem)]
        for m in METRICS:
            mean, lo, hi = r.metrics.get(m, (None, None, None))
            interval = f" [{_cell(lo)}, {_cell(hi)}]" if lo is not None and lo == lo and hi == hi else ""
            cells.append("" if mean is None else f"{_cell(mean)}{interval}")
        cells.append("" if r.wins is None else str(r.wins))
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines.append(f"\nScored on {rows[0].n_eval_images} images; simulation r mean over units ± sem over units; "
                     "[95% CI]: image bootstrap of the mean.")
    return "\n".join(lines)


def format_report(evaluation: Evaluation) -> str:
    """The table, the label runs it used, and the warnings (diversity, hub images, neurons used)."""
    out = [format_markdown(evaluation.rows), f"Images: {evaluation.images}.", "", "Label runs:"]
    out += [f"- {r.name}: {r.note}" for r in evaluation.rows if r.kind == "method"] or ["- none"]
    if evaluation.neurons is not None:
        out.append(f"\nNeurons used ({len(evaluation.neurons)}): {compact_ranges(evaluation.neurons)}")
    if evaluation.diversity:
        out.append("\nLabel diversity (distinct labels / units; most repeated):")
        for name, d in evaluation.diversity.items():
            top = ", ".join(f"'{label}' x{c}" for label, c in d["top"])
            out.append(f"- {name}: {d['distinct']} / {d['units']}; {top}")
    if evaluation.hubs:
        hubs = ", ".join(f"{image_id[:10]} ({c} units)" for image_id, c in evaluation.hubs)
        out.append(f"\nHub images (in the top {HUB_TOP} of many of the {evaluation.n_units_top} units): {hubs}")
    if evaluation.badges:
        passed = sum(b.passed for b in evaluation.badges)
        out.append(f"\nBadges: {passed} of {len(evaluation.badges)} units' best label beats the shuffled baseline "
                   "(one-sided, Benjamini-Hochberg q < 0.05 over the layer).")
    return "\n".join(out)


def compact_ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    items = sorted(values)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)
