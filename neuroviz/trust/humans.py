"""Humans against metrics: a study's human win rate per method beside its held-out automatic score.

Over the study's own (non-gold) items: each method's label *as shown to the raters* is scored
on the held-out images of the item's run, with the same metric for every method; the
automatic score of a method is the mean over its items. Spearman's rank correlation between
the methods' win rates and their automatic scores says whether the metric orders methods as
people do, so a study also tests the metric. With few methods the correlation rests on few
points: the result carries the count and SciPy's p-value.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from ..store import Store
from .metrics import DEFAULT_BOOTSTRAP
from .scoring import LabelSet, score_label_sets, scoring_images
from .split import HeldOutSplit

HUMANS_RECORD = "humans_vs_metrics"  # records/<this>/<study_id>.json: the last comparison, for the results page


@dataclass(frozen=True)
class MethodAgreement:
    """One method: people's verdict and the metric's, over the same units."""

    method: str
    win_rate: float
    win_low: float
    win_high: float
    votes: int
    automatic: float  # mean held-out metric over the method's study units
    automatic_low: float
    automatic_high: float
    units: int


@dataclass(frozen=True)
class HumansVsMetrics:
    """Every method's row and the rank correlation between the two columns."""

    metric: str
    rows: tuple[MethodAgreement, ...]
    spearman: float | None  # None with fewer than 3 methods or no variation
    spearman_p: float | None
    images: str


def humans_vs_metrics(store: Store, study_id: str, multimodal, split_seed: int = 0, metric: str = "simulation_r",
                      n_boot: int = DEFAULT_BOOTSTRAP) -> HumansVsMetrics:
    """Human win rate and held-out automatic score of each method of a study, and their Spearman correlation."""
    from scipy.stats import spearmanr

    from ..study.results import read_snapshot, study_results

    results = study_results(store, study_id)
    snapshot = read_snapshot(store, study_id)
    split = HeldOutSplit(split_seed)
    per_run: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    for item in snapshot.items.values():
        if not item.is_gold:
            for method, label in item.labels.items():
                per_run[item.run_key][method][int(item.neuron)] = label
    unit_scores: dict[str, list[float]] = defaultdict(list)
    pooled: dict[str, list[np.ndarray]] = defaultdict(list)
    described = []
    for run_key, by_method in per_run.items():
        run = store.get_run(run_key)
        if run is None:
            continue
        images = scoring_images(store, run, multimodal, split)
        described.append(images.description)
        sets = [LabelSet(m, "method", labels) for m, labels in by_method.items()]
        for scored in score_label_sets(store, images, multimodal, sets, n_boot=n_boot, seed=split_seed, metrics=(metric,)):
            unit_scores[scored.label_set.name] += scored.scores.values[metric].tolist()
            pooled[scored.label_set.name].append(scored.scores.resamples[metric])
    rows = []
    for method in results.study.methods:
        s = results.score(method)
        values = unit_scores.get(method, [])
        mean = float(np.mean(values)) if values else float("nan")
        low = high = float("nan")
        boots = pooled.get(method, [])
        if values and all(len(b) for b in boots):
            means = np.concatenate(boots, axis=1).mean(axis=1)  # each run's own images, same resample index
            low, high = float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
        rows.append(MethodAgreement(method, s.win_rate, s.win_low, s.win_high, s.votes, mean, low, high, len(values)))
    usable = [r for r in rows if r.units and r.votes]
    rho = p = None
    if len(usable) >= 3 and len({r.win_rate for r in usable}) > 1 and len({r.automatic for r in usable}) > 1:
        result = spearmanr([r.win_rate for r in usable], [r.automatic for r in usable])
        rho, p = float(result.statistic), float(result.pvalue)
    return HumansVsMetrics(metric, tuple(rows), rho, p, "; ".join(sorted(set(described))))


def format_humans_vs_metrics(result: HumansVsMetrics) -> str:
    """A markdown table: method, human win rate [CI], automatic score [CI], units; then Spearman."""
    lines = ["| method | human win rate [95% CI] | votes | held-out " + result.metric + " [95% CI] | units |",
             "|---|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r.method} | {r.win_rate:.2f} [{r.win_low:.2f}, {r.win_high:.2f}] | {r.votes} | "
                     f"{r.automatic:.3f} [{r.automatic_low:.3f}, {r.automatic_high:.3f}] | {r.units} |")
    if result.spearman is None:
        lines.append("\nSpearman rank correlation: undefined (fewer than 3 methods with votes and scores, or no variation).")
    else:
        lines.append(f"\nSpearman rank correlation between human win rate and {result.metric}: "
                     f"{result.spearman:.2f} (p = {result.spearman_p:.2g}, {len(result.rows)} methods).")
    return "\n".join(lines)


def save_humans_vs_metrics(store: Store, study_id: str, result: HumansVsMetrics) -> None:
    """Keep the comparison so the Study results page can show it without loading any backend."""
    store.put_record(HUMANS_RECORD, study_id, asdict(result))


def stored_humans_vs_metrics(store: Store, study_id: str) -> HumansVsMetrics | None:
    """The last comparison saved for a study (None if ``evaluate --study`` never ran for it)."""
    value = store.get_record(HUMANS_RECORD, study_id)
    if not value:
        return None
    rows = tuple(MethodAgreement(**row) for row in value["rows"])
    return HumansVsMetrics(value["metric"], rows, value["spearman"], value["spearman_p"], value["images"])
