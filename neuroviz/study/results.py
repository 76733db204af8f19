"""What a study found (the owner's view, names the methods): win rates, ratings, agreement,
gold scores and progress, computed from one consistent read of the study.

Typical use::

    results = study_results(store, study.study_id)   # win rates, ratings, Fleiss' kappa
    results.score("clip_dissect").win_rate, results.kappa, results.excluded_raters
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..store import Store
from ..units import NEURONS, units_place
from . import storage
from .design import SPECIAL_CHOICES, Study, StudyError, require_study
from .statistics import fleiss_kappa, mean_interval, wilson_interval

#: Default share of gold items a rater must get right to count in the results.
MIN_GOLD_ACCURACY = 0.75


@dataclass(frozen=True)
class RaterProgress:
    """One rater's answers so far, and how many gold items they got right."""

    rater_id: str
    name: str
    done: int
    gold_answered: int
    gold_correct: int


@dataclass(frozen=True)
class StudyProgress:
    """How far a study is: items with enough raters, votes, and each rater's count."""

    study_id: str
    n_items: int  # regular items only; items_complete counts among these
    n_gold: int
    raters_per_item: int
    items_complete: int
    n_votes: int
    raters: tuple[RaterProgress, ...]


@dataclass(frozen=True)
class MethodScore:
    """How often one option (a method, or 'none fits'/'uninterpretable') won, and its ratings.

    ``wins`` is fractional when methods gave the same label text (one shared option): a vote
    for it is split between them, so win rates over methods + none + uninterpretable add to 1.
    """

    method: str
    votes: int
    wins: float
    win_rate: float
    win_low: float
    win_high: float
    mean_rating: float | None = None
    rating_low: float | None = None
    rating_high: float | None = None
    n_ratings: int = 0


@dataclass(frozen=True)
class LayerScores:
    """The scores of one activation run (a layer of a model over a probe set)."""

    run_key: str
    model_spec: str
    layer: str
    n_votes: int
    scores: tuple[MethodScore, ...]
    units: str = NEURONS  # the run's units: an SAE's latents are scored apart from the layer's neurons

    @property
    def place(self) -> str:
        """The layer, or the layer and its units ("features.18 · SAE latents 3f2a1b2c"), for the owner."""
        return units_place(self.layer, self.units)


@dataclass(frozen=True)
class RaterSummary:
    """One rater in the results: votes, gold score, and whether their votes were left out."""

    rater_id: str
    name: str
    n_votes: int
    gold_answered: int
    gold_correct: int
    excluded: bool

    @property
    def gold_accuracy(self) -> float | None:
        """Share of gold items answered right; None before the rater met one."""
        return self.gold_correct / self.gold_answered if self.gold_answered else None


@dataclass(frozen=True)
class StudyResults:
    """The owner's statistics of a study (names the methods)."""

    study: Study
    scores: tuple[MethodScore, ...]  # study methods in order, then NONE_FITS, UNINTERPRETABLE
    by_layer: tuple[LayerScores, ...]
    kappa: float | None  # Fleiss' kappa over items with >= 2 raters; None if undefined
    kappa_items: int
    n_votes: int
    n_items_rated: int
    raters: tuple[RaterSummary, ...]
    exclude_failed_gold: bool
    min_gold_accuracy: float

    def score(self, method: str) -> MethodScore:
        """The score of one method (or NONE_FITS / UNINTERPRETABLE)."""
        for s in self.scores:
            if s.method == method:
                return s
        raise StudyError(f"No method '{method}' in study {self.study.study_id}; it compares {', '.join(self.study.methods)}.")

    @property
    def excluded_raters(self) -> tuple[str, ...]:
        """Ids of raters whose votes were left out for failing gold items."""
        return tuple(r.rater_id for r in self.raters if r.excluded)


@dataclass(frozen=True)
class StudySnapshot:
    """Everything results and exports need, read in one transaction."""

    study: Study
    items: dict[int, storage.ItemRow]
    raters: dict[str, str]
    assignments: dict[tuple[str, int], storage.Assignment]
    votes: list[storage.VoteRow]
    ratings: dict[tuple[str, int], dict[str, tuple[str, int]]]

    def options(self, item_id: int) -> dict[str, dict]:
        """option key -> option ({key, label, methods}) of one item."""
        return {o["key"]: o for o in self.items[item_id].options}

    def category(self, vote: storage.VoteRow) -> str:
        """What a vote counts for: a special choice, a method, or methods sharing one label."""
        if vote.choice_key in SPECIAL_CHOICES:
            return vote.choice_key
        return "+".join(self.options(vote.item_id)[vote.choice_key]["methods"])


def read_snapshot(store: Store, study_id: str) -> StudySnapshot:
    """The whole study as of now (one consistent read; writers are not blocked)."""
    with storage.reading(store) as tables:
        study = require_study(tables, study_id)
        return StudySnapshot(study, {i.item_id: i for i in tables.items(study_id)}, tables.raters(study_id),
                             {(a.rater_id, a.item_id): a for a in tables.assignments(study_id)}, tables.votes(study_id),
                             tables.ratings(study_id))


def _scores(snap: StudySnapshot, votes: list[storage.VoteRow], confidence: float) -> tuple[MethodScore, ...]:
    methods = snap.study.methods
    wins: dict[str, float] = defaultdict(float)
    ratings: dict[str, list[int]] = defaultdict(list)
    for vote in votes:
        options = snap.options(vote.item_id)
        if vote.choice_key in SPECIAL_CHOICES:
            wins[vote.choice_key] += 1
        else:
            shared = options[vote.choice_key]["methods"]
            for m in shared:
                wins[m] += 1 / len(shared)
        for option_key, value in snap.ratings.get((vote.rater_id, vote.item_id), {}).values():
            for m in options[option_key]["methods"]:
                ratings[m].append(value)
    n = len(votes)
    out = []
    for name in (*methods, *SPECIAL_CHOICES):
        low, high = wilson_interval(wins[name], n, confidence)
        mean, r_low, r_high = mean_interval(ratings[name], confidence) if name in methods else (None, None, None)
        out.append(MethodScore(name, n, wins[name], wins[name] / n if n else 0.0, low, high, mean, r_low, r_high,
                               len(ratings[name])))
    return tuple(out)


def _gold_scores(snap: StudySnapshot) -> tuple[Counter[str], Counter[str]]:
    """rater -> gold items answered, and rater -> gold items answered right."""
    gold_votes = [v for v in snap.votes if snap.items[v.item_id].is_gold]
    return Counter(v.rater_id for v in gold_votes), Counter(v.rater_id for v in gold_votes if v.choice_key == "gold")


def _rater_summaries(snap: StudySnapshot, exclude_failed_gold: bool, min_gold_accuracy: float) -> list[RaterSummary]:
    gold_answered, gold_correct = _gold_scores(snap)
    n_votes: Counter[str] = Counter(v.rater_id for v in snap.votes)
    raters = []
    for rater_id, name in snap.raters.items():
        answered, correct = gold_answered[rater_id], gold_correct[rater_id]
        failed = answered > 0 and correct / answered < min_gold_accuracy
        raters.append(RaterSummary(rater_id, name, n_votes[rater_id], answered, correct, exclude_failed_gold and failed))
    return raters


def study_results(store: Store, study_id: str, exclude_failed_gold: bool = True,
                  min_gold_accuracy: float = MIN_GOLD_ACCURACY, confidence: float = 0.95) -> StudyResults:
    """Win rate per method (Wilson interval), mean 1-5 rating (t interval), Fleiss' kappa and a
    per-layer breakdown, over non-gold items. With ``exclude_failed_gold``, raters whose gold
    accuracy is below ``min_gold_accuracy`` are left out (raters without gold answers stay)."""
    snap = read_snapshot(store, study_id)
    raters = _rater_summaries(snap, exclude_failed_gold, min_gold_accuracy)
    excluded = {r.rater_id for r in raters if r.excluded}
    counted = [v for v in snap.votes if not snap.items[v.item_id].is_gold and v.rater_id not in excluded]

    categories = [*snap.study.methods, *SPECIAL_CHOICES]
    per_item: dict[int, Counter[str]] = defaultdict(Counter)
    for vote in counted:
        category = snap.category(vote)
        if category not in categories:
            categories.append(category)  # a shared option ("m1+m2") is its own category
        per_item[vote.item_id][category] += 1
    multi = [c for c in per_item.values() if sum(c.values()) >= 2]
    kappa = fleiss_kappa([[c[k] for k in categories] for c in multi]) if multi else float("nan")

    by_run: dict[str, list[storage.VoteRow]] = defaultdict(list)
    for vote in counted:
        by_run[snap.items[vote.item_id].run_key].append(vote)
    layer_info = {it.run_key: (it.model_spec, it.layer) for it in snap.items.values()}
    units = {key: run.units if (run := store.get_run(key)) is not None else NEURONS for key in by_run}
    by_layer = tuple(LayerScores(run_key, *layer_info[run_key], len(votes), _scores(snap, votes, confidence), units[run_key])
                     for run_key, votes in sorted(by_run.items(), key=lambda kv: (*layer_info[kv[0]], units[kv[0]])))
    return StudyResults(snap.study, _scores(snap, counted, confidence), by_layer,
                        None if math.isnan(kappa) else kappa, len(multi), len(counted), len(per_item), tuple(raters),
                        exclude_failed_gold, min_gold_accuracy)


def study_progress(store: Store, study_id: str) -> StudyProgress:
    """Items with enough raters, total votes, and each rater's count and gold score."""
    snap = read_snapshot(store, study_id)
    per_item: Counter[int] = Counter(v.item_id for v in snap.votes if not snap.items[v.item_id].is_gold)
    done: Counter[str] = Counter(v.rater_id for v in snap.votes)
    gold, correct = _gold_scores(snap)
    n_regular = snap.study.n_items - snap.study.n_gold
    complete = sum(1 for c in per_item.values() if c >= snap.study.raters_per_item)
    raters = tuple(RaterProgress(r, name, done[r], gold[r], correct[r]) for r, name in snap.raters.items())
    return StudyProgress(study_id, n_regular, snap.study.n_gold, snap.study.raters_per_item, complete, len(snap.votes), raters)
