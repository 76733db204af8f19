"""A study as CSV for the owner: the scores table and every vote, de-blinded."""

from __future__ import annotations

import csv
import io
from typing import Any

from ..store import Store
from .design import LETTERS, SPECIAL_CHOICES
from .results import StudyResults, read_snapshot

_SCORE_COLUMNS = ("scope", "run_key", "method", "votes", "wins", "win_rate", "win_low", "win_high",
                  "mean_rating", "rating_low", "rating_high", "n_ratings")


def _score_rows(results: StudyResults) -> list[dict]:
    rows = []
    scopes = [("all", "", results.scores),
              *[(f"{layer.model_spec} {layer.place}", layer.run_key, layer.scores) for layer in results.by_layer]]
    for scope, run_key, scores in scopes:
        for s in scores:
            rows.append({"scope": scope, "run_key": run_key, "method": s.method, "votes": s.votes, "wins": round(s.wins, 4),
                         "win_rate": s.win_rate, "win_low": s.win_low, "win_high": s.win_high, "mean_rating": s.mean_rating,
                         "rating_low": s.rating_low, "rating_high": s.rating_high, "n_ratings": s.n_ratings})
    return rows


def results_csv(results: StudyResults) -> str:
    """The scores as CSV: one row per (scope, method); scope 'all' or one layer."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_SCORE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in _score_rows(results):
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    return buffer.getvalue()


def votes_csv(store: Store, study_id: str) -> str:
    """Every vote, de-blinded (owner's export): who, which item, the letter order shown, the
    method or special choice picked, the label texts and each method's rating."""
    snap = read_snapshot(store, study_id)
    methods = snap.study.methods
    columns = ["study_id", "rater_id", "rater_name", "item_id", "is_gold", "model_spec", "layer", "run_key", "neuron",
               "choice_letter", "choice", "chosen_label", "gold_correct", "shown_order",
               *[f"label_{m}" for m in methods], *[f"rating_{m}" for m in methods],
               "assigned_at", "submitted_at", "seconds_on_item"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for vote in snap.votes:
        item = snap.items[vote.item_id]
        options = snap.options(vote.item_id)
        shown = snap.assignments.get((vote.rater_id, vote.item_id))
        order, assigned_at = (shown.order, shown.assigned_at) if shown else ([], float("nan"))
        key = vote.choice_key
        if key in SPECIAL_CHOICES:
            choice, chosen = key, ""
        elif item.is_gold:
            choice, chosen = ("gold" if key == "gold" else "decoy"), options[key]["label"]
        else:
            choice, chosen = snap.category(vote), options[key]["label"]
        shown_order = ";".join(f"{LETTERS[i]}={'+'.join(options[k]['methods']) or k}" for i, k in enumerate(order))
        row: dict[str, Any] = {
            "study_id": study_id, "rater_id": vote.rater_id, "rater_name": snap.raters.get(vote.rater_id, ""),
            "item_id": vote.item_id, "is_gold": item.is_gold, "model_spec": item.model_spec, "layer": item.layer,
            "run_key": item.run_key, "neuron": item.neuron, "choice_letter": vote.letter, "choice": choice,
            "chosen_label": chosen, "gold_correct": (key == "gold") if item.is_gold else "", "shown_order": shown_order,
            "assigned_at": f"{assigned_at:.3f}", "submitted_at": f"{vote.submitted_at:.3f}",
            "seconds_on_item": f"{vote.submitted_at - assigned_at:.1f}",
        }
        for m in methods:
            row[f"label_{m}"] = item.labels.get(m, "")
            row[f"rating_{m}"] = ""
        for option_key, value in snap.ratings.get((vote.rater_id, vote.item_id), {}).values():
            for m in options[option_key]["methods"]:
                row[f"rating_{m}"] = value
        writer.writerow(row)
    return buffer.getvalue()
