"""Blind user studies: which description of a neuron do people find best?

The design follows the user studies of CLIP-Dissect, MILAN and Describe-and-Dissect (DnD):
a rater sees one neuron's top images and the labels several methods gave it, shown as
A/B/C... in a random order, never with the method's name; they pick the best label (or
"none fits" / "uninterpretable") and may rate each label 1-5. Each item is seen by a few
raters. Gold items (one obviously right option among decoys) catch inattentive raters.

Studies live in their own DuckDB file, ``store.root / "studies.duckdb"``, so a vote never
waits for a long extraction job that holds ``neuroviz.duckdb``. Every operation opens a
short-lived connection through :func:`neuroviz.db.connect`, which serialises the threads of
one process (Streamlit sessions) and waits for other processes.

Typical use (owner side, then rater side)::

    items = choose_items(store, [run.run_key], methods=["clip_dissect", "dnd"], per_layer=20)
    study = create_study(store, "layer4 labels", items, methods=["clip_dissect", "dnd"])
    study.rater_link                        # "?study=<secret token>": give this to raters

    public = study_by_token(store, token)   # RaterStudy: no method names in it
    rater = register_rater(store, public.study_id, "Ada")
    task = next_item(store, public.study_id, rater.rater_id)   # RatingTask or None when done
    # show the pictures at task_images(store, task), then task.options and the two special choices
    submit_vote(store, public.study_id, rater.rater_id, task.item_id, "B", {"A": 2, "B": 5})

    results = study_results(store, study.study_id)   # win rates, ratings, Fleiss' kappa
    print(results_csv(results)); print(votes_csv(store, study.study_id))

Labels are captured when the study is created, so relabelling a run later does not change
what raters saw or what the results attribute to each method.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import random
import secrets
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import db
from .store import Store
from .errors import NeurovizError

# -- constants the pages use ------------------------------------------------------------
NONE_FITS = "none"
UNINTERPRETABLE = "uninterpretable"
SPECIAL_CHOICES = (NONE_FITS, UNINTERPRETABLE)
CHOICE_TITLES = {NONE_FITS: "None of the labels fits", UNINTERPRETABLE: "The images have nothing in common"}
RATING_SCALE = {
    1: "does not match the images at all",
    2: "matches a few images",
    3: "matches some images or part of the theme",
    4: "matches most images",
    5: "matches the images perfectly",
}
INSTRUCTIONS = (
    "Each page shows the images that most strongly activate one unit of a neural network, and a few "
    "candidate descriptions of what those images have in common. Pick the description that fits best. "
    "If none fits, choose 'none fits'; if the images share nothing you can name, choose 'uninterpretable'. "
    "Optionally rate every description from 1 (does not match) to 5 (matches perfectly)."
)
DEFAULT_PUBLIC_TITLE = "Which description fits these images best?"

#: A shown-but-unanswered item counts towards its raters_per_item for this long, so raters
#: working at the same time spread over items instead of all taking the same one.
CLAIM_SECONDS = 30 * 60
#: Gold items are placed at random positions within each rater's first GOLD_WINDOW items,
#: so an inattentive rater is caught even if they stop early.
GOLD_WINDOW = 10
#: Default share of gold items a rater must get right to count in the results.
MIN_GOLD_ACCURACY = 0.75

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_id VARCHAR PRIMARY KEY, name VARCHAR, public_title VARCHAR, token VARCHAR UNIQUE,
    methods_json VARCHAR, raters_per_item INTEGER, n_images INTEGER, seed INTEGER,
    is_open BOOLEAN, config_json VARCHAR, created_at DOUBLE);
CREATE TABLE IF NOT EXISTS study_items (
    study_id VARCHAR, item_id INTEGER, run_key VARCHAR, model_spec VARCHAR, layer VARCHAR,
    neuron INTEGER, is_gold BOOLEAN, labels_json VARCHAR, label_keys_json VARCHAR,
    options_json VARCHAR, PRIMARY KEY (study_id, item_id));
CREATE TABLE IF NOT EXISTS raters (
    study_id VARCHAR, rater_id VARCHAR, name VARCHAR, created_at DOUBLE,
    PRIMARY KEY (study_id, rater_id));
CREATE TABLE IF NOT EXISTS assignments (
    study_id VARCHAR, rater_id VARCHAR, item_id INTEGER, order_json VARCHAR, assigned_at DOUBLE,
    PRIMARY KEY (study_id, rater_id, item_id));
CREATE TABLE IF NOT EXISTS votes (
    study_id VARCHAR, rater_id VARCHAR, item_id INTEGER, choice_letter VARCHAR, choice_key VARCHAR,
    submitted_at DOUBLE, PRIMARY KEY (study_id, rater_id, item_id));
CREATE TABLE IF NOT EXISTS ratings (
    study_id VARCHAR, rater_id VARCHAR, item_id INTEGER, letter VARCHAR, option_key VARCHAR,
    rating INTEGER, PRIMARY KEY (study_id, rater_id, item_id, letter));
"""


class StudyError(NeurovizError, ValueError):
    """A study request that cannot be honoured (unknown study, bad choice, closed study...)."""


# -- records ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyItem:
    """One neuron to rate, with each method's label text as captured for the study."""

    run_key: str
    neuron: int
    item_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GoldItem:
    """An attention check: the neuron's images, one obviously right label and decoys.

    Built automatically by :func:`choose_gold_items` (the probe-set label that dominates the
    neuron's top images, against labels of images absent from them), or by hand, e.g. the
    class name of a trained classifier's output neuron against other class names.
    """

    run_key: str
    neuron: int
    correct_label: str
    decoys: tuple[str, ...]


@dataclass(frozen=True)
class SkippedItem:
    """A requested item left out of a study because some chosen methods never labelled it."""

    run_key: str
    neuron: int
    missing_methods: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    """The owner's view of a study (it names the methods; never hand it to a rater page)."""

    study_id: str
    name: str
    public_title: str
    token: str
    methods: tuple[str, ...]
    raters_per_item: int
    n_images: int
    seed: int
    is_open: bool
    created_at: float
    n_items: int
    n_gold: int
    skipped: tuple[SkippedItem, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def rater_link(self) -> str:
        """The query string that opens the rater-only view of this study."""
        return f"?study={self.token}"


@dataclass(frozen=True)
class RaterStudy:
    """What a rater page may know about a study: no methods, no owner name, no results."""

    study_id: str
    title: str
    instructions: str
    n_items: int
    n_images: int
    is_open: bool


@dataclass(frozen=True)
class Rater:
    """One person rating one study (a rater id is only valid within its study)."""

    study_id: str
    rater_id: str
    name: str


@dataclass(frozen=True)
class RatingOption:
    """One answer shown to a rater: a letter and the label text, nothing else."""

    letter: str
    label: str


@dataclass(frozen=True)
class RatingTask:
    """One item as a rater sees it. Blind by construction: no method names, no gold flag.

    Show ``store.top_images(run_key, neuron, k=n_images)``, then ``options`` and the special
    choices NONE_FITS / UNINTERPRETABLE. ``done``/``total`` is this rater's progress.
    """

    study_id: str
    rater_id: str
    item_id: int
    run_key: str
    neuron: int
    n_images: int
    options: tuple[RatingOption, ...]
    done: int
    total: int
    previous_choice: str | None = None
    previous_ratings: dict[str, int] | None = None

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(o.letter for o in self.options)


@dataclass(frozen=True)
class VoteReceipt:
    """What submit_vote did: the choice stored, whether it replaced an earlier one, progress."""

    item_id: int
    choice: str
    replaced: bool
    done: int
    total: int


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

    def to_frame(self):
        """All scores as one DataFrame (scope 'all' and one scope per layer)."""
        import pandas as pd

        return pd.DataFrame(_score_rows(self))


# -- statistics ---------------------------------------------------------------------------
def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike p +- z*se it stays inside [0, 1] and
    behaves for small n and proportions near 0 or 1 (Wilson 1927; Newcombe 1998)."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Mean with a Student-t confidence interval; (None, None, None) without data."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = float(np.mean(values))
    if n == 1:
        return mean, None, None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def fleiss_kappa(counts: np.ndarray | Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa of a subjects x categories matrix of rater counts.

    Rows may have different numbers of raters (each row's agreement uses its own n_i; rows
    with fewer than 2 raters are ignored); with equal n it is Fleiss (1971) exactly.
    Returns NaN when chance agreement is 1 (everyone always used one category).
    """
    table = np.asarray(counts, dtype=float)
    if table.ndim != 2:
        raise ValueError("fleiss_kappa needs a 2-D subjects x categories table of counts.")
    n_i = table.sum(axis=1)
    table, n_i = table[n_i >= 2], n_i[n_i >= 2]
    if len(table) == 0:
        return float("nan")
    agreement = ((table * table).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_bar = float(agreement.mean())
    p_j = table.sum(axis=0) / n_i.sum()
    p_e = float((p_j * p_j).sum())
    if p_e >= 1.0 - 1e-12:
        return float("nan")
    return (p_bar - p_e) / (1 - p_e)


# -- storage ------------------------------------------------------------------------------
def studies_path(store: Store) -> Path:
    """The DuckDB file of a workspace's studies (separate from neuroviz.duckdb)."""
    return store.root / "studies.duckdb"


_schema_ready: set[tuple[str, int]] = set()


@contextlib.contextmanager
def _connect(store: Store) -> Iterator[Any]:
    path = studies_path(store)
    with db.connect(path, timeout=store.lock_timeout) as con:
        # Keyed by inode too, so a deleted and recreated file gets its tables again.
        key = (str(path.resolve()), path.stat().st_ino)
        if key not in _schema_ready:
            con.execute(_SCHEMA)
            _schema_ready.add(key)
        yield con


@contextlib.contextmanager
def _transaction(con) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _study_from_row(con, row: tuple) -> Study:
    (study_id, name, public_title, token, methods_json, rpi, n_images, seed, is_open, config_json, created_at) = row
    config = json.loads(config_json or "{}")
    n_items, n_gold = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE is_gold) FROM study_items WHERE study_id = ?", [study_id]
    ).fetchone()
    skipped = tuple(SkippedItem(s["run_key"], s["neuron"], tuple(s["missing_methods"])) for s in config.get("skipped", []))
    return Study(study_id, name, public_title, token, tuple(json.loads(methods_json)), rpi, n_images, seed,
                 bool(is_open), created_at, n_items, n_gold or 0, skipped, tuple(config.get("notes", [])))


_STUDY_COLUMNS = "study_id, name, public_title, token, methods_json, raters_per_item, n_images, seed, is_open, config_json, created_at"


def _load_study(con, study_id: str) -> Study:
    row = con.execute(f"SELECT {_STUDY_COLUMNS} FROM studies WHERE study_id = ?", [study_id]).fetchone()
    if row is None:
        known = [r[0] for r in con.execute("SELECT study_id FROM studies ORDER BY created_at DESC LIMIT 10").fetchall()]
        hint = f"Known studies: {', '.join(known)}." if known else "No study exists yet; create one with `python -m neuroviz study create`."
        raise StudyError(f"No study '{study_id}'. {hint}")
    return _study_from_row(con, row)


# -- choosing items -------------------------------------------------------------------------
def _normalise(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _seeded_rng(*parts: Any) -> random.Random:
    return random.Random("|".join(str(p) for p in parts))


def _captured_labels(store: Store, run_key: str, methods: Sequence[str]) -> dict[int, dict[str, tuple[str, str]]]:
    """neuron -> method -> (label, label_key): each method's top label, from its newest label
    run that covers the neuron (a method may have been run with several configurations)."""
    labels = store.labels(run_key, top_only=True)
    if labels.empty:
        return {}
    labels = labels[labels["method"].isin(list(methods))]
    runs = store.label_runs(run_key)
    created = dict(zip(runs["label_key"], runs["created_at"])) if not runs.empty else {}
    labels = labels.assign(created_at=labels["label_key"].map(created).fillna(0.0))
    labels = labels.sort_values("created_at", ascending=False).drop_duplicates(["neuron", "method"])
    out: dict[int, dict[str, tuple[str, str]]] = defaultdict(dict)
    for neuron, method, label, key in zip(labels["neuron"], labels["method"], labels["label"], labels["label_key"]):
        if isinstance(label, str) and label.strip():
            out[int(neuron)][method] = (label.strip(), key)
    return out


def labelled_methods(store: Store, run_keys: Sequence[str]) -> dict[str, int]:
    """Methods with labels on the given runs -> number of (run, neuron) they labelled; the
    candidates a study can compare."""
    counts: Counter[str] = Counter()
    for run_key in run_keys:
        df = store.labels(run_key, top_only=True)
        if not df.empty:
            counts.update(df.drop_duplicates(["neuron", "method"])["method"].tolist())
    return dict(counts.most_common())


def _require_run(store: Store, run_key: str):
    run = store.get_run(run_key)
    if run is None:
        known = [r.run_key for r in store.find_runs()][:8]
        raise StudyError(f"Unknown run '{run_key}'. Extract it first (`python -m neuroviz extract`); "
                         f"known runs: {', '.join(known) or 'none'}.")
    return run


def choose_items(store: Store, run_keys: Sequence[str], methods: Sequence[str], per_layer: int = 10,
                 seed: int = 0) -> list[StudyItem]:
    """Random neurons per run (layer) that every chosen method labelled, labels captured.

    Sampling is seeded per run, so adding a layer does not change the others' picks. A run
    with fewer eligible neurons contributes all of them.
    """
    if not methods:
        raise StudyError("Choose at least two methods to compare (see labelled_methods()).")
    items: list[StudyItem] = []
    for run_key in run_keys:
        _require_run(store, run_key)
        captured = _captured_labels(store, run_key, methods)
        eligible = sorted(n for n, by_method in captured.items() if all(m in by_method for m in methods))
        picked = sorted(_seeded_rng(seed, run_key).sample(eligible, min(per_layer, len(eligible))))
        items.extend(StudyItem(run_key, n, {m: captured[n][m][0] for m in methods}) for n in picked)
    return items


def _probe_label_text(label: str) -> str:
    # Folder probe sets label an image by its folder path ("shapes/red square"): show the leaf.
    return str(label).replace("\\", "/").rstrip("/").split("/")[-1].replace("_", " ").strip()


def choose_gold_items(store: Store, run_keys: Sequence[str], n: int, n_options: int, seed: int = 0,
                      n_images: int = 10, min_purity: float = 0.7,
                      exclude: Sequence[tuple[str, int]] = ()) -> list[GoldItem]:
    """Gold items from the probe set's own image labels.

    A neuron qualifies when at least ``min_purity`` of its top ``n_images`` images share one
    probe-set label: that label is the right answer, and the decoys are labels of probe images
    that are absent from its top images, so a rater who looks at the images cannot miss it.
    Needs a probe set whose labels repeat (class folders); returns fewer (or none) otherwise.
    """
    if n <= 0:
        return []
    excluded = set(exclude)
    rng = _seeded_rng(seed, "gold")
    candidates: list[GoldItem] = []
    for run_key in run_keys:
        run = _require_run(store, run_key)
        images = store.probe_images(run.probe_set_id)
        texts = [_probe_label_text(im["label"] or "") for im in images]
        vocabulary = sorted({t for t in texts if t})
        if len(vocabulary) < n_options:
            continue
        top = store.top_indices(run_key)[:, :n_images]
        for neuron in range(len(top)):
            if (run_key, neuron) in excluded:
                continue
            shown = [texts[i] for i in top[neuron]]
            label, count = Counter(shown).most_common(1)[0]
            if not label or count < min_purity * len(shown):
                continue
            absent = [t for t in vocabulary if t not in set(shown)]
            if len(absent) < n_options - 1:
                continue
            candidates.append(GoldItem(run_key, neuron, label, tuple(rng.sample(absent, n_options - 1))))
    rng.shuffle(candidates)
    # Prefer different right answers, so gold items do not all look alike.
    picked, seen = [], set()
    for gold in candidates:
        if gold.correct_label not in seen:
            picked.append(gold)
            seen.add(gold.correct_label)
    picked += [g for g in candidates if g not in picked]
    return picked[:n]


# -- creating and managing studies ----------------------------------------------------------
def _regular_options(labels: dict[str, str], methods: Sequence[str]) -> list[dict]:
    """One option per distinct label text; methods that said the same thing share it, so a
    rater is never asked to choose between two identical strings."""
    options: list[dict] = []
    by_text: dict[str, dict] = {}
    for method in methods:
        text = labels[method]
        key = _normalise(text)
        if key in by_text:
            by_text[key]["methods"].append(method)
        else:
            option = {"key": f"o{len(options)}", "label": text, "methods": [method]}
            by_text[key] = option
            options.append(option)
    return options


def create_study(store: Store, name: str, items: Sequence[StudyItem | tuple[str, int]], methods: Sequence[str],
                 raters_per_item: int = 3, gold_items: int | Sequence[GoldItem] = 2, seed: int = 0,
                 n_images: int = 10, public_title: str = DEFAULT_PUBLIC_TITLE) -> Study:
    """Create a blind study comparing ``methods`` on ``items`` and return it (with its token).

    Items given as (run_key, neuron) or with empty ``item_labels`` get each method's current
    top label, captured now. Items lacking a label from any method are skipped and listed in
    ``study.skipped``. ``gold_items`` is a count to build automatically (see
    choose_gold_items) or explicit GoldItems; gold items are excluded from method scores.
    """
    methods = list(dict.fromkeys(methods))
    if len(methods) < 2:
        raise StudyError("A study compares at least two methods; pass e.g. methods=['clip_dissect', 'dnd'].")
    if len(methods) > len(_LETTERS):
        raise StudyError(f"At most {len(_LETTERS)} methods fit on one page.")
    if raters_per_item < 1:
        raise StudyError("raters_per_item must be at least 1 (the DnD study used 3).")
    if n_images < 1:
        raise StudyError("n_images must be at least 1 (the DnD study showed 10).")
    if not name.strip():
        raise StudyError("Give the study a name (shown only to its owner).")

    runs: dict[str, Any] = {}
    captured: dict[str, dict[int, dict[str, tuple[str, str]]]] = {}
    kept: list[tuple[str, int, dict[str, str], dict[str, str]]] = []
    skipped: list[SkippedItem] = []
    seen: set[tuple[str, int]] = set()
    for item in items:
        run_key, neuron, given = (item.run_key, item.neuron, dict(item.item_labels)) if isinstance(item, StudyItem) else (item[0], int(item[1]), {})
        if (run_key, neuron) in seen:
            continue
        seen.add((run_key, neuron))
        if run_key not in runs:
            runs[run_key] = _require_run(store, run_key)
        if not 0 <= neuron < runs[run_key].n_neurons:
            raise StudyError(f"Neuron {neuron} is out of range for run {run_key} ({runs[run_key].n_neurons} neurons).")
        if not given:
            if run_key not in captured:
                captured[run_key] = _captured_labels(store, run_key, methods)
            found = captured[run_key].get(neuron, {})
            given = {m: found[m][0] for m in methods if m in found}
            keys = {m: found[m][1] for m in methods if m in found}
        else:
            given = {m: str(t).strip() for m, t in given.items() if m in methods and t and str(t).strip()}
            keys = {}
        missing = tuple(m for m in methods if m not in given)
        if missing:
            skipped.append(SkippedItem(run_key, neuron, missing))
            continue
        kept.append((run_key, neuron, {m: given[m] for m in methods}, keys))
    if not kept:
        raise StudyError(
            f"None of the {len(seen)} items has a label from every method ({', '.join(methods)}). "
            "Run the missing methods on these neurons first, or choose items with choose_items().")

    notes: list[str] = []
    if isinstance(gold_items, int):
        golds = choose_gold_items(store, list(runs), gold_items, n_options=len(methods), seed=seed,
                                  n_images=n_images, exclude=[(r, n) for r, n, _, _ in kept])
        if len(golds) < gold_items:
            notes.append(f"Only {len(golds)} of {gold_items} gold items could be built: the probe set's labels "
                         "do not dominate enough neurons' top images. Pass GoldItem(...)s to add your own.")
    else:
        golds = list(gold_items)
    for gold in golds:
        if gold.run_key not in runs:
            runs[gold.run_key] = _require_run(store, gold.run_key)
        if not 0 <= gold.neuron < runs[gold.run_key].n_neurons:
            raise StudyError(f"Gold neuron {gold.neuron} is out of range for run {gold.run_key} ({runs[gold.run_key].n_neurons} neurons).")
        if len(gold.decoys) < 1:
            raise StudyError(f"Gold item {gold.run_key}/{gold.neuron} needs at least one decoy label.")

    rows: list[list[Any]] = []
    for run_key, neuron, labels, keys in kept:
        run = runs[run_key]
        rows.append([run_key, run.model_spec, run.layer, neuron, False, json.dumps(labels), json.dumps(keys),
                     json.dumps(_regular_options(labels, methods))])
    for gold in golds:
        run = runs[gold.run_key]
        options = [{"key": "gold", "label": gold.correct_label, "methods": []}]
        options += [{"key": f"decoy{i}", "label": d, "methods": []} for i, d in enumerate(gold.decoys)]
        rows.append([gold.run_key, run.model_spec, run.layer, gold.neuron, True, "{}", "{}", json.dumps(options)])
    # Shuffled ids, so a gold item cannot be told apart by its id.
    ids = list(range(len(rows)))
    _seeded_rng(seed, "item ids").shuffle(ids)

    # Random, not derived from the name: the id reaches rater pages, the owner's name must not.
    study_id = f"s-{secrets.token_hex(4)}"
    token = secrets.token_urlsafe(18)
    config = {"skipped": [{"run_key": s.run_key, "neuron": s.neuron, "missing_methods": list(s.missing_methods)} for s in skipped],
              "notes": notes}
    with _connect(store) as con, _transaction(con):
        con.execute(f"INSERT INTO studies ({_STUDY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [study_id, name.strip(), public_title, token, json.dumps(methods), raters_per_item, n_images,
                     seed, True, json.dumps(config), time.time()])
        con.executemany("INSERT INTO study_items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [[study_id, item_id, *row] for item_id, row in zip(ids, rows)])
    return get_study(store, study_id)


def get_study(store: Store, study_id: str) -> Study:
    """The owner's view of one study; StudyError naming known studies if it does not exist."""
    with _connect(store) as con:
        return _load_study(con, study_id)


def list_studies(store: Store) -> list[Study]:
    """Every study of the workspace, newest first."""
    with _connect(store) as con:
        rows = con.execute(f"SELECT {_STUDY_COLUMNS} FROM studies ORDER BY created_at DESC").fetchall()
        return [_study_from_row(con, r) for r in rows]


def delete_study(store: Store, study_id: str) -> None:
    """Remove a study with its items, raters, orders, votes and ratings."""
    with _connect(store) as con:
        _load_study(con, study_id)
        with _transaction(con):
            for table in ("ratings", "votes", "assignments", "raters", "study_items", "studies"):
                con.execute(f"DELETE FROM {table} WHERE study_id = ?", [study_id])


def set_study_open(store: Store, study_id: str, is_open: bool) -> Study:
    """Close a study to stop new votes (e.g. when its link leaked), or reopen it."""
    with _connect(store) as con:
        _load_study(con, study_id)
        con.execute("UPDATE studies SET is_open = ? WHERE study_id = ?", [bool(is_open), study_id])
        return _load_study(con, study_id)


def study_items(store: Store, study_id: str):
    """The owner's table of items: item_id, run_key, layer, neuron, is_gold and each option."""
    import pandas as pd

    with _connect(store) as con:
        _load_study(con, study_id)
        rows = con.execute("SELECT item_id, run_key, model_spec, layer, neuron, is_gold, labels_json, options_json "
                           "FROM study_items WHERE study_id = ? ORDER BY item_id", [study_id]).fetchall()
    return pd.DataFrame([{"item_id": i, "run_key": r, "model_spec": m, "layer": l, "neuron": n, "is_gold": bool(g),
                          "labels": json.loads(lj), "options": json.loads(oj)} for i, r, m, l, n, g, lj, oj in rows])


# -- the rater side -------------------------------------------------------------------------
def study_by_token(store: Store, token: str) -> RaterStudy | None:
    """The rater's view of the study behind a link token, or None for an unknown token."""
    if not token:
        return None
    with _connect(store) as con:
        row = con.execute(f"SELECT {_STUDY_COLUMNS} FROM studies WHERE token = ?", [str(token)]).fetchone()
        if row is None:
            return None
        study = _study_from_row(con, row)
    return RaterStudy(study.study_id, study.public_title, INSTRUCTIONS, study.n_items, study.n_images, study.is_open)


def register_rater(store: Store, study_id: str, name: str | None = None) -> Rater:
    """Register a rater (or return the one already registered under that name in this study,
    so a returning rater continues where they left off). No name: a random id is the name."""
    name = " ".join((name or "").split())[:80]
    with _connect(store) as con:
        _load_study(con, study_id)
        if name:
            row = con.execute("SELECT rater_id, name FROM raters WHERE study_id = ? AND name = ?", [study_id, name]).fetchone()
            if row:
                return Rater(study_id, row[0], row[1])
        rater_id = f"r-{secrets.token_hex(5)}"
        con.execute("INSERT INTO raters VALUES (?, ?, ?, ?)", [study_id, rater_id, name or rater_id, time.time()])
        return Rater(study_id, rater_id, name or rater_id)


def _require_rater(con, study_id: str, rater_id: str) -> str:
    row = con.execute("SELECT name FROM raters WHERE study_id = ? AND rater_id = ?", [study_id, rater_id]).fetchone()
    if row is None:
        raise StudyError(f"Rater '{rater_id}' is not registered in study {study_id}; register with register_rater() first.")
    return row[0]


def _rank_key(seed: int, rater_id: str, item_id: int) -> int:
    # A per-rater shuffle of the items, stable across calls and processes.
    return int.from_bytes(hashlib.sha256(f"{seed}|{rater_id}|{item_id}".encode()).digest()[:8], "big")


def _gold_positions(seed: int, rater_id: str, n_gold: int, total: int) -> list[int]:
    window = min(total, max(GOLD_WINDOW, 2 * n_gold))
    return sorted(_seeded_rng(seed, rater_id, "gold positions").sample(range(window), min(n_gold, window)))


def _task(con, study: Study, rater_id: str, item_id: int) -> RatingTask:
    run_key, neuron, options_json = con.execute(
        "SELECT run_key, neuron, options_json FROM study_items WHERE study_id = ? AND item_id = ?", [study.study_id, item_id]
    ).fetchone()
    labels = {o["key"]: o["label"] for o in json.loads(options_json)}
    row = con.execute("SELECT order_json FROM assignments WHERE study_id = ? AND rater_id = ? AND item_id = ?",
                      [study.study_id, rater_id, item_id]).fetchone()
    if row is None:
        order = list(labels)
        _seeded_rng(study.seed, rater_id, item_id, "order").shuffle(order)
        con.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
                    [study.study_id, rater_id, item_id, json.dumps(order), time.time()])
    else:
        order = json.loads(row[0])
    vote = con.execute("SELECT choice_letter FROM votes WHERE study_id = ? AND rater_id = ? AND item_id = ?",
                       [study.study_id, rater_id, item_id]).fetchone()
    ratings = dict(con.execute("SELECT letter, rating FROM ratings WHERE study_id = ? AND rater_id = ? AND item_id = ? ORDER BY letter",
                               [study.study_id, rater_id, item_id]).fetchall())
    done = con.execute("SELECT count(*) FROM votes WHERE study_id = ? AND rater_id = ?", [study.study_id, rater_id]).fetchone()[0]
    options = tuple(RatingOption(_LETTERS[i], labels[key]) for i, key in enumerate(order))
    return RatingTask(study.study_id, rater_id, item_id, run_key, int(neuron), study.n_images, options, done, study.n_items,
                      vote[0] if vote else None, ratings or None)


def next_item(store: Store, study_id: str, rater_id: str) -> RatingTask | None:
    """The next item for this rater, or None when they rated everything (or the study closed).

    An item shown but not yet answered comes back first (a reload shows the same page). Then
    a due gold item; then unrated items, those that still need raters before those that have
    ``raters_per_item`` (counting others' unanswered claims younger than CLAIM_SECONDS), each
    rater in their own random order. Option letters are drawn once per (rater, item) and stored.
    """
    with _connect(store) as con:
        study = _load_study(con, study_id)
        _require_rater(con, study_id, rater_id)
        if not study.is_open:
            return None
        items = con.execute("SELECT item_id, is_gold FROM study_items WHERE study_id = ?", [study_id]).fetchall()
        votes = con.execute("SELECT rater_id, item_id FROM votes WHERE study_id = ?", [study_id]).fetchall()
        claims = con.execute("SELECT rater_id, item_id, assigned_at FROM assignments WHERE study_id = ?", [study_id]).fetchall()
        mine = {i for r, i in votes if r == rater_id}
        voted_pairs = set(votes)
        pending = sorted((t, i) for r, i, t in claims if r == rater_id and i not in mine)
        if pending:
            return _task(con, study, rater_id, pending[0][1])
        gold = sorted(i for i, g in items if g and i not in mine)
        regular = [i for i, g in items if not g and i not in mine]
        if not gold and not regular:
            return None
        gold_done = sum(1 for i, g in items if g and i in mine)
        positions = _gold_positions(study.seed, rater_id, study.n_gold, len(items))
        gold_due = gold and (not regular or (gold_done < len(positions) and len(mine) >= positions[gold_done]))
        if gold_due:
            choice = min(gold, key=lambda i: _rank_key(study.seed, rater_id, i))
        else:
            now = time.time()
            fill: Counter[int] = Counter()
            for r, i in voted_pairs:
                if r != rater_id:
                    fill[i] += 1
            for r, i, t in claims:
                if r != rater_id and (r, i) not in voted_pairs and now - t < CLAIM_SECONDS:
                    fill[i] += 1
            choice = min(regular, key=lambda i: (fill[i] >= study.raters_per_item, _rank_key(study.seed, rater_id, i)))
        return _task(con, study, rater_id, choice)


def task_for(store: Store, study_id: str, rater_id: str, item_id: int) -> RatingTask:
    """One given item for this rater (e.g. to go back and change an answer), with their
    previous choice and ratings filled in; same stored letter order as before."""
    with _connect(store) as con:
        study = _load_study(con, study_id)
        _require_rater(con, study_id, rater_id)
        if not con.execute("SELECT 1 FROM study_items WHERE study_id = ? AND item_id = ?", [study_id, item_id]).fetchone():
            raise StudyError(f"Study {study_id} has no item {item_id} (items are 0..{study.n_items - 1}).")
        return _task(con, study, rater_id, item_id)


def task_images(store: Store, task: RatingTask) -> list[str]:
    """Paths of the images to show for a task, best first. Show the pictures only: file names
    and folders (often the class) would give gold answers away and bias the choice."""
    run = store.get_run(task.run_key)
    if run is None:
        raise StudyError(f"The run {task.run_key} behind this item is no longer in the cache; the study owner must restore it.")
    paths = {im["idx"]: im["path"] for im in store.probe_images(run.probe_set_id)}
    return [paths[t["image_idx"]] for t in store.top_images(task.run_key, task.neuron, k=task.n_images)]


def rater_progress(store: Store, study_id: str, rater_id: str) -> tuple[int, int]:
    """(items this rater answered, items in the study)."""
    with _connect(store) as con:
        study = _load_study(con, study_id)
        done = con.execute("SELECT count(*) FROM votes WHERE study_id = ? AND rater_id = ?", [study_id, rater_id]).fetchone()[0]
        return done, study.n_items


def submit_vote(store: Store, study_id: str, rater_id: str, item_id: int, choice: str,
                ratings: dict[str, int] | None = None) -> VoteReceipt:
    """Store a rater's answer for an item they were shown: a letter, NONE_FITS or UNINTERPRETABLE,
    plus optional 1-5 ratings per letter. Idempotent per (study, rater, item): resubmitting
    replaces the earlier answer and ratings. Letters map to methods here, from the stored order."""
    choice = str(choice).strip()
    special = {NONE_FITS: NONE_FITS, "none fits": NONE_FITS, UNINTERPRETABLE: UNINTERPRETABLE}.get(choice.casefold())
    with _connect(store) as con:
        study = _load_study(con, study_id)
        _require_rater(con, study_id, rater_id)
        if not study.is_open:
            raise StudyError(f"Study {study_id} is closed; votes are no longer accepted.")
        row = con.execute("SELECT order_json FROM assignments WHERE study_id = ? AND rater_id = ? AND item_id = ?",
                          [study_id, rater_id, item_id]).fetchone()
        if row is None:
            raise StudyError(f"Item {item_id} was never shown to rater {rater_id}; get it from next_item() or task_for() first.")
        order = json.loads(row[0])
        letters = {_LETTERS[i]: key for i, key in enumerate(order)}
        if special:
            letter, key = special, special
        elif choice.upper() in letters:
            letter, key = choice.upper(), letters[choice.upper()]
        else:
            raise StudyError(f"Choice '{choice}' is not one of {', '.join(letters)}, '{NONE_FITS}' or '{UNINTERPRETABLE}'.")
        rating_rows = []
        for raw_letter, value in (ratings or {}).items():
            if value is None:
                continue
            rl = str(raw_letter).strip().upper()
            if rl not in letters:
                raise StudyError(f"Rating for '{raw_letter}': this item's options are {', '.join(letters)}.")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 5:
                raise StudyError(f"Rating for {rl} must be a whole number from 1 to 5, not {value!r}.")
            rating_rows.append([study_id, rater_id, item_id, rl, letters[rl], int(value)])
        with _transaction(con):
            replaced = con.execute("SELECT 1 FROM votes WHERE study_id = ? AND rater_id = ? AND item_id = ?",
                                   [study_id, rater_id, item_id]).fetchone() is not None
            con.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?, ?, ?)",
                        [study_id, rater_id, item_id, letter, key, time.time()])
            con.execute("DELETE FROM ratings WHERE study_id = ? AND rater_id = ? AND item_id = ?", [study_id, rater_id, item_id])
            if rating_rows:
                con.executemany("INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?)", rating_rows)
        done = con.execute("SELECT count(*) FROM votes WHERE study_id = ? AND rater_id = ?", [study_id, rater_id]).fetchone()[0]
        return VoteReceipt(item_id, letter, replaced, done, study.n_items)


# -- results --------------------------------------------------------------------------------
@dataclass
class _Snapshot:
    """Everything results and exports need, read in one connection."""

    study: Study
    items: dict[int, dict]
    raters: dict[str, str]
    orders: dict[tuple[str, int], tuple[list[str], float]]
    votes: list[tuple[str, int, str, str, float]]
    ratings: dict[tuple[str, int], dict[str, tuple[str, int]]]


def _snapshot(store: Store, study_id: str) -> _Snapshot:
    with _connect(store) as con:
        study = _load_study(con, study_id)
        items = {}
        for item_id, run_key, model_spec, layer, neuron, is_gold, labels_json, options_json in con.execute(
                "SELECT item_id, run_key, model_spec, layer, neuron, is_gold, labels_json, options_json FROM study_items "
                "WHERE study_id = ?", [study_id]).fetchall():
            options = json.loads(options_json)
            items[item_id] = {"run_key": run_key, "model_spec": model_spec, "layer": layer, "neuron": neuron,
                              "is_gold": bool(is_gold), "labels": json.loads(labels_json),
                              "options": {o["key"]: o for o in options}}
        raters = dict(con.execute("SELECT rater_id, name FROM raters WHERE study_id = ? ORDER BY created_at", [study_id]).fetchall())
        orders = {(r, i): (json.loads(o), t) for r, i, o, t in con.execute(
            "SELECT rater_id, item_id, order_json, assigned_at FROM assignments WHERE study_id = ?", [study_id]).fetchall()}
        votes = con.execute("SELECT rater_id, item_id, choice_letter, choice_key, submitted_at FROM votes WHERE study_id = ? "
                            "ORDER BY submitted_at", [study_id]).fetchall()
        ratings: dict[tuple[str, int], dict[str, tuple[str, int]]] = defaultdict(dict)
        for r, i, letter, key, value in con.execute(
                "SELECT rater_id, item_id, letter, option_key, rating FROM ratings WHERE study_id = ?", [study_id]).fetchall():
            ratings[(r, i)][letter] = (key, value)
    return _Snapshot(study, items, raters, orders, votes, dict(ratings))


def _category(snapshot: _Snapshot, item_id: int, choice_key: str) -> str:
    if choice_key in SPECIAL_CHOICES:
        return choice_key
    return "+".join(snapshot.items[item_id]["options"][choice_key]["methods"])


def _scores(snapshot: _Snapshot, votes: list[tuple[str, int, str, str, float]], confidence: float) -> tuple[MethodScore, ...]:
    methods = snapshot.study.methods
    wins: dict[str, float] = defaultdict(float)
    ratings: dict[str, list[int]] = defaultdict(list)
    for rater_id, item_id, _, key, _ in votes:
        if key in SPECIAL_CHOICES:
            wins[key] += 1
        else:
            shared = snapshot.items[item_id]["options"][key]["methods"]
            for m in shared:
                wins[m] += 1 / len(shared)
        for option_key, value in snapshot.ratings.get((rater_id, item_id), {}).values():
            for m in snapshot.items[item_id]["options"][option_key]["methods"]:
                ratings[m].append(value)
    n = len(votes)
    out = []
    for name in (*methods, *SPECIAL_CHOICES):
        low, high = wilson_interval(wins[name], n, confidence)
        mean, r_low, r_high = mean_interval(ratings[name], confidence) if name in methods else (None, None, None)
        out.append(MethodScore(name, n, wins[name], wins[name] / n if n else 0.0, low, high, mean, r_low, r_high, len(ratings[name])))
    return tuple(out)


def study_results(store: Store, study_id: str, exclude_failed_gold: bool = True,
                  min_gold_accuracy: float = MIN_GOLD_ACCURACY, confidence: float = 0.95) -> StudyResults:
    """Win rate per method (Wilson interval), mean 1-5 rating (t interval), Fleiss' kappa and a
    per-layer breakdown, over non-gold items. With ``exclude_failed_gold``, raters whose gold
    accuracy is below ``min_gold_accuracy`` are left out (raters without gold answers stay)."""
    snap = _snapshot(store, study_id)
    gold_answered: Counter[str] = Counter()
    gold_correct: Counter[str] = Counter()
    n_votes: Counter[str] = Counter()
    for rater_id, item_id, _, key, _ in snap.votes:
        n_votes[rater_id] += 1
        if snap.items[item_id]["is_gold"]:
            gold_answered[rater_id] += 1
            gold_correct[rater_id] += key == "gold"
    raters = []
    for rater_id, name in snap.raters.items():
        answered, correct = gold_answered[rater_id], gold_correct[rater_id]
        failed = answered > 0 and correct / answered < min_gold_accuracy
        raters.append(RaterSummary(rater_id, name, n_votes[rater_id], answered, correct, exclude_failed_gold and failed))
    excluded = {r.rater_id for r in raters if r.excluded}
    counted = [v for v in snap.votes if not snap.items[v[1]]["is_gold"] and v[0] not in excluded]

    categories = [*snap.study.methods, *SPECIAL_CHOICES]
    per_item: dict[int, Counter[str]] = defaultdict(Counter)
    for _, item_id, _, key, _ in counted:
        category = _category(snap, item_id, key)
        if category not in categories:
            categories.append(category)  # a shared option ("m1+m2") is its own category
        per_item[item_id][category] += 1
    multi = [c for c in per_item.values() if sum(c.values()) >= 2]
    kappa = fleiss_kappa([[c[k] for k in categories] for c in multi]) if multi else float("nan")

    by_run: dict[str, list] = defaultdict(list)
    for vote in counted:
        by_run[snap.items[vote[1]]["run_key"]].append(vote)
    layer_info = {it["run_key"]: (it["model_spec"], it["layer"]) for it in snap.items.values()}
    by_layer = tuple(LayerScores(run_key, *layer_info[run_key], len(votes), _scores(snap, votes, confidence))
                     for run_key, votes in sorted(by_run.items(), key=lambda kv: layer_info[kv[0]]))
    return StudyResults(snap.study, _scores(snap, counted, confidence), by_layer,
                        None if math.isnan(kappa) else kappa, len(multi), len(counted), len(per_item), tuple(raters),
                        exclude_failed_gold, min_gold_accuracy)


def study_progress(store: Store, study_id: str) -> StudyProgress:
    """Items with enough raters, total votes, and each rater's count and gold score."""
    snap = _snapshot(store, study_id)
    per_item: Counter[int] = Counter(i for _, i, _, _, _ in snap.votes if not snap.items[i]["is_gold"])
    done: Counter[str] = Counter(r for r, _, _, _, _ in snap.votes)
    gold = Counter(r for r, i, _, _, _ in snap.votes if snap.items[i]["is_gold"])
    correct = Counter(r for r, i, _, k, _ in snap.votes if snap.items[i]["is_gold"] and k == "gold")
    n_regular = snap.study.n_items - snap.study.n_gold
    complete = sum(1 for c in per_item.values() if c >= snap.study.raters_per_item)
    raters = tuple(RaterProgress(r, name, done[r], gold[r], correct[r]) for r, name in snap.raters.items())
    return StudyProgress(study_id, n_regular, snap.study.n_gold, snap.study.raters_per_item, complete, len(snap.votes), raters)


_SCORE_COLUMNS = ("scope", "run_key", "method", "votes", "wins", "win_rate", "win_low", "win_high",
                  "mean_rating", "rating_low", "rating_high", "n_ratings")


def _score_rows(results: StudyResults) -> list[dict]:
    rows = []
    for scope, run_key, scores in [("all", "", results.scores), *[(f"{l.model_spec} {l.layer}", l.run_key, l.scores) for l in results.by_layer]]:
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
    snap = _snapshot(store, study_id)
    methods = snap.study.methods
    columns = ["study_id", "rater_id", "rater_name", "item_id", "is_gold", "model_spec", "layer", "run_key", "neuron",
               "choice_letter", "choice", "chosen_label", "gold_correct", "shown_order",
               *[f"label_{m}" for m in methods], *[f"rating_{m}" for m in methods],
               "assigned_at", "submitted_at", "seconds_on_item"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for rater_id, item_id, letter, key, submitted_at in snap.votes:
        item = snap.items[item_id]
        order, assigned_at = snap.orders.get((rater_id, item_id), ([], float("nan")))
        option = item["options"].get(key)
        if key in SPECIAL_CHOICES:
            choice, chosen = key, ""
        elif item["is_gold"]:
            choice, chosen = ("gold" if key == "gold" else "decoy"), option["label"]
        else:
            choice, chosen = "+".join(option["methods"]), option["label"]
        shown = ";".join(f"{_LETTERS[i]}={'+'.join(item['options'][k]['methods']) or k}" for i, k in enumerate(order))
        row: dict[str, Any] = {
            "study_id": study_id, "rater_id": rater_id, "rater_name": snap.raters.get(rater_id, ""), "item_id": item_id,
            "is_gold": item["is_gold"], "model_spec": item["model_spec"], "layer": item["layer"], "run_key": item["run_key"],
            "neuron": item["neuron"], "choice_letter": letter, "choice": choice, "chosen_label": chosen,
            "gold_correct": (key == "gold") if item["is_gold"] else "", "shown_order": shown,
            "assigned_at": f"{assigned_at:.3f}", "submitted_at": f"{submitted_at:.3f}",
            "seconds_on_item": f"{submitted_at - assigned_at:.1f}",
        }
        for m in methods:
            row[f"label_{m}"] = item["labels"].get(m, "")
            row[f"rating_{m}"] = ""
        for option_key, value in snap.ratings.get((rater_id, item_id), {}).values():
            for m in item["options"][option_key]["methods"]:
                row[f"rating_{m}"] = value
        writer.writerow(row)
    return buffer.getvalue()


# -- command line -----------------------------------------------------------------------------
def _resolve_runs(store: Store, args) -> list[str]:
    if args.runs:
        return [k for k in args.runs.split(",") if k]
    if not args.model:
        raise StudyError("Name the runs: --runs KEY,KEY or --model SPEC [--layers a,b] [--probe NAME].")
    runs = store.find_runs(model_spec=args.model)
    if args.layers:
        wanted = [l for l in args.layers.split(",") if l]
        missing = [l for l in wanted if l not in {r.layer for r in runs}]
        if missing:
            raise StudyError(f"No extracted run of {args.model} for layer(s) {', '.join(missing)}; "
                             f"extracted layers: {', '.join(sorted({r.layer for r in runs})) or 'none'}.")
        runs = [r for r in runs if r.layer in wanted]
    if args.probe:
        sets = {p["probe_set_id"]: p for p in store.probe_sets()}
        probe_path = str(Path(args.probe).expanduser().resolve())

        def matches(probe_set_id: str) -> bool:
            p = sets.get(probe_set_id, {})
            return args.probe in (probe_set_id, p.get("name")) or p.get("source") == f"folder:{probe_path}"

        runs = [r for r in runs if matches(r.probe_set_id)]
    if not runs:
        raise StudyError(f"No extracted runs match model {args.model}; run `python -m neuroviz extract {args.model}` first.")
    per_layer: dict[str, list] = defaultdict(list)
    for r in runs:
        per_layer[r.layer].append(r)
    ambiguous = {l: rs for l, rs in per_layer.items() if len({r.probe_set_id for r in rs}) > 1}
    if ambiguous:
        layer, rs = next(iter(ambiguous.items()))
        raise StudyError(f"Layer {layer} was extracted over several probe sets ({', '.join(sorted({r.probe_set_id for r in rs}))}); "
                         "pick one with --probe.")
    return [rs[-1].run_key for rs in per_layer.values()]  # newest run per layer


def _cmd_create(args) -> int:
    from .cli import _store

    store = _store(args)
    run_keys = _resolve_runs(store, args)
    methods = [m for m in args.methods.split(",") if m] if args.methods else list(labelled_methods(store, run_keys))
    if len(methods) < 2:
        raise StudyError(f"Need labels from at least two methods on these runs; found {', '.join(methods) or 'none'}. "
                         "Run methods first (`python -m neuroviz label ...`) or pass --methods.")
    items = choose_items(store, run_keys, methods, per_layer=args.per_layer, seed=args.seed)
    if not items:
        raise StudyError(f"No neuron has labels from all of {', '.join(methods)} on these runs.")
    study = create_study(store, args.name, items, methods, raters_per_item=args.raters_per_item, gold_items=args.gold,
                         seed=args.seed, n_images=args.images)
    print(f"study {study.study_id}: '{study.name}', {study.n_items - study.n_gold} items + {study.n_gold} gold, "
          f"methods {', '.join(study.methods)}, {study.raters_per_item} raters per item")
    for note in study.notes:
        print("note:", note)
    if study.skipped:
        print(f"skipped {len(study.skipped)} items without labels from every method")
    print(f"rater token: {study.token}")
    print(f"rater link:  {study.rater_link}   (append to the dashboard's URL)")
    args._result = {"study_id": study.study_id, "token": study.token}
    return 0


def _cmd_list(args) -> int:
    from .cli import _store

    store = _store(args)
    studies = list_studies(store)
    if not studies:
        print("no studies yet; create one with `python -m neuroviz study create`")
    for s in studies:
        progress = study_progress(store, s.study_id)
        state = "open" if s.is_open else "closed"
        print(f"{s.study_id}  '{s.name}'  {state}  items={s.n_items - s.n_gold}+{s.n_gold} gold  "
              f"complete={progress.items_complete}  votes={progress.n_votes}  raters={len(progress.raters)}  "
              f"methods={','.join(s.methods)}  link={s.rater_link}")
    return 0


def _print_results(results: StudyResults) -> None:
    print(f"study {results.study.study_id} '{results.study.name}': {results.n_votes} votes on {results.n_items_rated} items")
    kappa = "n/a" if results.kappa is None else f"{results.kappa:.3f}"
    print(f"Fleiss' kappa {kappa} over {results.kappa_items} items with >= 2 raters")
    if results.excluded_raters:
        print(f"excluded for failing gold items: {', '.join(results.excluded_raters)}")
    print(f"{'method':24s} {'wins':>7s} {'win rate':>9s} {'95% CI':>15s} {'rating':>7s} {'95% CI':>13s}")
    for s in results.scores:
        rating = "" if s.mean_rating is None else f"{s.mean_rating:.2f}"
        rci = "" if s.rating_low is None else f"{s.rating_low:.2f}-{s.rating_high:.2f}"
        print(f"{s.method:24s} {s.wins:7.1f} {s.win_rate:9.3f} {s.win_low:7.3f}-{s.win_high:.3f} {rating:>7s} {rci:>13s}")


def _cmd_results(args) -> int:
    from .cli import _store

    results = study_results(_store(args), args.study_id, exclude_failed_gold=not args.keep_failed_gold)
    _print_results(results)
    return 0


def _cmd_export(args) -> int:
    from .cli import _store

    store = _store(args)
    if not args.votes and not args.results:
        print(votes_csv(store, args.study_id), end="")
        return 0
    if args.votes:
        Path(args.votes).write_text(votes_csv(store, args.study_id))
        print(f"wrote {args.votes}")
    if args.results:
        results = study_results(store, args.study_id, exclude_failed_gold=not args.keep_failed_gold)
        Path(args.results).write_text(results_csv(results))
        print(f"wrote {args.results}")
    return 0


def _cmd_delete(args) -> int:
    from .cli import _store

    delete_study(_store(args), args.study_id)
    print(f"deleted study {args.study_id}")
    return 0


def _cmd_close(args) -> int:
    from .cli import _store

    study = set_study_open(_store(args), args.study_id, args.reopen)
    print(f"study {study.study_id} is {'open' if study.is_open else 'closed'}")
    return 0


def register_cli(subparsers) -> None:
    """`python -m neuroviz study create|list|results|export|close|delete`."""
    study = subparsers.add_parser("study", help="blind user studies of neuron labels")
    sub = study.add_subparsers(dest="study_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("create", help="create a study from labelled runs and print its rater link")
    p.add_argument("name", help="the study's name (shown only to you)")
    p.add_argument("--runs", help="comma-separated run keys (instead of --model/--layers)")
    p.add_argument("--model", help="model spec whose extracted runs to use")
    p.add_argument("--layers", help="comma-separated layers (default: every extracted layer)")
    p.add_argument("--probe", help="probe set id, name or folder (when a layer was extracted over several)")
    p.add_argument("--methods", help="comma-separated methods (default: every method with labels on these runs)")
    p.add_argument("--per-layer", type=int, default=10, help="random neurons per layer")
    p.add_argument("--raters-per-item", type=int, default=3)
    p.add_argument("--gold", type=int, default=2, help="gold (attention-check) items to build from probe labels")
    p.add_argument("--images", type=int, default=10, help="top images shown per neuron")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser("list", help="list studies with progress and rater links")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("results", help="win rates, ratings and agreement of a study")
    p.add_argument("study_id")
    p.add_argument("--keep-failed-gold", action="store_true", help="count raters who failed gold items too")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("export", help="write votes and results as CSV (votes to stdout by default)")
    p.add_argument("study_id")
    p.add_argument("--votes", help="file for the de-blinded votes CSV")
    p.add_argument("--results", help="file for the scores CSV")
    p.add_argument("--keep-failed-gold", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("close", help="stop accepting votes (or --reopen)")
    p.add_argument("study_id")
    p.add_argument("--reopen", action="store_true")
    p.set_defaults(func=_cmd_close)

    p = sub.add_parser("delete", help="delete a study and all its votes")
    p.add_argument("study_id")
    p.set_defaults(func=_cmd_delete)
