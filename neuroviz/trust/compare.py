"""One unit, every method's label, scored the same way on the same held-out images, best first.

``evaluate`` (a CLI command, so a page can start it as a background job: scoring needs the
multimodal backend, which pages never load) keeps every label set's per-unit metrics as a
record of the run; :func:`unit_comparison` reads one unit's rows from it, baselines included,
and :class:`neuroviz.requests.EvaluateRequest` is the job a page starts when there is none yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..store import Store
from .metrics import METRIC_TITLES, METRICS

if TYPE_CHECKING:
    from .scoring import ScoredLabelSet

UNIT_SCORES = "trust_units"  # records namespace: run key -> {"sets": [...], "about": {...}}
_DIGITS = 4


@dataclass(frozen=True)
class ComparisonRow:
    """One label set's label for a unit and its held-out metrics: metric -> (value, low, high)."""

    name: str
    kind: str  # "method", "shuffled", "constant" or "oracle"
    label: str
    held_out: bool
    metrics: dict[str, tuple[float, float, float]]
    note: str = ""


def _rounded(values: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else round(float(v), _DIGITS) for v in values]


def save_unit_scores(store: Store, run_key: str, scored: list[ScoredLabelSet], about: dict) -> None:
    """Keep every label set's per-unit values and intervals (the newest evaluation wins)."""
    sets = []
    for s in scored:
        ls = s.label_set
        entry = {"name": ls.name, "kind": ls.kind, "held_out": ls.held_out, "note": ls.note,
                 "neurons": s.neurons.tolist(), "labels": [ls.labels[int(n)] for n in s.neurons], "metrics": {}}
        for metric in s.scores.values:
            lo, hi = s.scores.interval(metric)
            entry["metrics"][metric] = [_rounded(s.scores.values[metric]), _rounded(lo), _rounded(hi)]
        sets.append(entry)
    store.put_record(UNIT_SCORES, run_key, {"sets": sets, "about": about})


def unit_comparison(store: Store, run_key: str, neuron: int) -> list[ComparisonRow]:
    """Every saved label set's row for ``neuron``: methods by held-out simulation r (best first), then baselines."""
    record = store.get_record(UNIT_SCORES, run_key)
    if not record:
        return []
    rows = []
    for entry in record["sets"]:
        try:
            i = entry["neurons"].index(int(neuron))
        except ValueError:
            continue
        metrics: dict[str, tuple[float, float, float]] = {}
        for metric, (values, lows, highs) in entry["metrics"].items():
            value, low, high = (float("nan") if v[i] is None else float(v[i]) for v in (values, lows, highs))
            metrics[metric] = (value, low, high)
        rows.append(ComparisonRow(entry["name"], entry["kind"], entry["labels"][i], bool(entry["held_out"]), metrics, entry["note"]))

    def order(row: ComparisonRow) -> tuple[int, float]:
        r = row.metrics.get("simulation_r", (float("nan"),))[0]
        return (0 if row.kind == "method" else 1, -(r if math.isfinite(r) else -2.0))

    return sorted(rows, key=order)


def comparison_about(store: Store, run_key: str) -> dict:
    """What the saved per-unit scores were computed from ({} before the first evaluation)."""
    record = store.get_record(UNIT_SCORES, run_key)
    return record["about"] if record else {}


def comparison_table(rows: list[ComparisonRow]) -> list[dict]:
    """Rows as plain dicts for a table: label, who, fitted, each metric as 'value [low, high]'."""
    def cell(value: tuple[float, float, float]) -> str:
        v, lo, hi = value
        if not math.isfinite(v):
            return ""
        return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "")

    out = []
    for row in rows:
        fitted = "-" if row.kind in ("constant", "oracle") else "held out" if row.held_out else "in-sample"
        item = {"label": row.label, "by": row.name, "fitted": fitted}
        item.update({METRIC_TITLES[m]: cell(row.metrics[m]) for m in METRICS if m in row.metrics})
        out.append(item)
    return out
