"""A study's design: which neurons, which methods' labels, which gold items, made once.

The design follows the user studies of CLIP-Dissect, MILAN and Describe-and-Dissect (DnD):
a rater sees one neuron's top images and the labels several methods gave it, shown as
A/B/C... in a random order, never with the method's name; they pick the best label (or
"none fits" / "uninterpretable") and may rate each label 1-5. Each item is seen by a few
raters. Gold items (one obviously right option among decoys) catch inattentive raters.

Labels and pictures are captured when the study is created, so relabelling a run later
does not change what raters saw or what the results attribute to each method, and raters
never read the workspace.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import NeurovizError
from ..methods.base import dead_units
from ..store import RunInfo, Store
from . import pictures, storage

NONE_FITS = "none"
UNINTERPRETABLE = "uninterpretable"
SPECIAL_CHOICES = (NONE_FITS, UNINTERPRETABLE)
DEFAULT_PUBLIC_TITLE = "Which description fits these images best?"
#: The letters options are shown as; also the most methods one study can compare.
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Query parameters of a rater link: the study's token, and a rater's secret in a personal link.
TOKEN_PARAM, SECRET_PARAM = "study", "key"


def link_query(token: str, secret: str | None = None) -> str:
    """The query string of a rater link (no '?'): the study's, or one rater's personal link."""
    return f"{TOKEN_PARAM}={token}" + (f"&{SECRET_PARAM}={secret}" if secret else "")


class StudyError(NeurovizError, ValueError):
    """A study request that cannot be honoured (unknown study, bad choice, closed study...)."""


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
        return f"?{link_query(self.token)}"

    @classmethod
    def from_row(cls, row: storage.StudyRow) -> Study:
        """The study as stored, with the items it skipped and the notes made at creation."""
        skipped = tuple(SkippedItem(s["run_key"], s["neuron"], tuple(s["missing_methods"]))
                        for s in row.config.get("skipped", []))
        return cls(row.study_id, row.name, row.public_title, row.token, row.methods, row.raters_per_item, row.n_images,
                   row.seed, row.is_open, row.created_at, row.n_items, row.n_gold, skipped,
                   tuple(row.config.get("notes", [])))


def seeded_rng(*parts: Any) -> random.Random:
    """A random generator seeded by ``parts``: the same draws in every process and session."""
    return random.Random("|".join(str(p) for p in parts))


def require_study(tables: storage.StudyTables, study_id: str) -> Study:
    """The study, or StudyError naming the known studies (or how to create one)."""
    row = tables.study(study_id)
    if row is None:
        known = tables.recent_study_ids()
        hint = (f"Known studies: {', '.join(known)}." if known
                else "No study exists yet; create one on the Study setup page or with `python -m neuroviz study create`.")
        raise StudyError(f"No study '{study_id}'. {hint}")
    return Study.from_row(row)


# -- choosing items -------------------------------------------------------------------------
def _normalise(text: str) -> str:
    return " ".join(str(text).split()).casefold()


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


def default_methods(store: Store, run_keys: Sequence[str], enough: int = 10) -> list[str]:
    """The methods a new study should compare by default: the pair that labelled the most
    neurons together, then each further method that keeps at least ``enough`` neurons (or
    all of them, when fewer) labelled by every chosen method. Fewer than two when fewer exist."""
    methods = list(labelled_methods(store, run_keys))
    if len(methods) < 2:
        return methods
    sets = [frozenset(by_method) for run_key in run_keys
            for by_method in _captured_labels(store, run_key, methods).values()]

    def together(chosen: Sequence[str]) -> int:
        return sum(1 for s in sets if s.issuperset(chosen))

    pairs = [[a, b] for i, a in enumerate(methods) for b in methods[i + 1:]]
    # most neurons in common; among ties, the methods that labelled most (listed first)
    chosen = max(pairs, key=lambda pair: (together(pair), -methods.index(pair[0]) - methods.index(pair[1])))
    for method in methods:
        kept = together([*chosen, method])
        if method not in chosen and kept > 0 and kept >= min(enough, together(chosen)):
            chosen.append(method)
    return [m for m in methods if m in chosen]


def _require_run(store: Store, run_key: str) -> RunInfo:
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
    with fewer eligible neurons contributes all of them. A run may be a unit run (an SAE's
    latents): items are then latents, and its dead latents are never drawn (labels stored
    before they were skipped describe nothing).
    """
    if not methods:
        raise StudyError("Choose at least two methods to compare.")
    items: list[StudyItem] = []
    for run_key in run_keys:
        run = _require_run(store, run_key)
        captured = _captured_labels(store, run_key, methods)
        dead = set(dead_units(store, run))
        eligible = sorted(n for n, by_method in captured.items() if all(m in by_method for m in methods) and n not in dead)
        picked = sorted(seeded_rng(seed, run_key).sample(eligible, min(per_layer, len(eligible))))
        items.extend(StudyItem(run_key, n, {m: captured[n][m][0] for m in methods}) for n in picked)
    return items


def _probe_label_text(label: str) -> str:
    # Folder probe sets label an image by its folder path ("shapes/red square"): show the leaf.
    return str(label).replace("\\", "/").rstrip("/").split("/")[-1].replace("_", " ").strip()


def _absent_labels(texts: Sequence[str], vocabulary: Sequence[str], top: Iterable[int]) -> list[str]:
    """Probe-set label texts of no image among ``top``: decoys a rater who looks cannot pick."""
    shown = {texts[i] for i in top}
    return [t for t in vocabulary if t not in shown]


def _probe_texts(store: Store, run: RunInfo) -> tuple[list[str], list[str]]:
    """(each probe image's label as text, the sorted distinct texts) of a run's probe set."""
    texts = [_probe_label_text(im["label"] or "") for im in store.probe_images(run.probe_set_id)]
    return texts, sorted({t for t in texts if t})


def choose_gold_items(store: Store, run_keys: Sequence[str], n: int, n_options: int, seed: int = 0,
                      n_images: int = 10, min_purity: float = 0.7,
                      exclude: Sequence[tuple[str, int]] = ()) -> list[GoldItem]:
    """Gold items from the probe set's own image labels.

    A neuron qualifies when at least ``min_purity`` of its top ``n_images`` images share one
    probe-set label: that label is the right answer, and the decoys are labels of probe images
    that are absent from its top images, so a rater who looks at the images cannot miss it.
    Needs a probe set whose labels repeat (class folders); returns fewer (or none) otherwise:
    then the owner makes gold items by hand (:func:`make_gold_item`).
    """
    if n <= 0:
        return []
    excluded = set(exclude)
    rng = seeded_rng(seed, "gold")
    candidates: list[GoldItem] = []
    for run_key in run_keys:
        run = _require_run(store, run_key)
        texts, vocabulary = _probe_texts(store, run)
        if len(vocabulary) < n_options:
            continue
        top = store.top_indices(run_key)[:, :n_images]
        for neuron in range(len(top)):
            if (run_key, neuron) in excluded:
                continue
            label, count = Counter(texts[i] for i in top[neuron]).most_common(1)[0]
            if not label or count < min_purity * len(top[neuron]):
                continue
            absent = _absent_labels(texts, vocabulary, top[neuron])
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


def make_gold_item(store: Store, run_key: str, neuron: int, correct_label: str, decoys: Sequence[str] = (),
                   n_options: int = 3, seed: int = 0, n_images: int = 10) -> GoldItem:
    """A gold item the owner made: a neuron whose images plainly show ``correct_label``.

    Without ``decoys``, ``n_options - 1`` are drawn from the probe set's labels of images that
    are not among the neuron's top ``n_images`` (so none of them fits what the rater sees).
    """
    run = _require_run(store, run_key)
    _check_neuron(run, neuron, "Gold neuron")
    correct = " ".join(str(correct_label).split())
    if not correct:
        raise StudyError(f"Gold item {run.layer}:{neuron} needs the right label (what its images plainly show).")
    given = [d for d in dict.fromkeys(" ".join(str(d).split()) for d in decoys) if d and _normalise(d) != _normalise(correct)]
    if not given:
        texts, vocabulary = _probe_texts(store, run)
        absent = [t for t in _absent_labels(texts, vocabulary, store.top_indices(run_key)[neuron, :n_images])
                  if _normalise(t) != _normalise(correct)]
        if not absent:
            raise StudyError(f"Gold item {run.layer}:{neuron}: no decoy labels could be drawn from the probe set; "
                             "type a few wrong labels after the right one.")
        given = seeded_rng(seed, "gold decoys", run_key, neuron).sample(absent, min(len(absent), max(1, n_options - 1)))
    return GoldItem(run_key, int(neuron), correct, tuple(given))


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


def _check_request(name: str, methods: Sequence[str], raters_per_item: int, n_images: int) -> None:
    if len(methods) < 2:
        raise StudyError("A study compares at least two methods: choose two or more.")
    if len(methods) > len(LETTERS):
        raise StudyError(f"At most {len(LETTERS)} methods fit on one page.")
    if raters_per_item < 1:
        raise StudyError("raters_per_item must be at least 1 (the DnD study used 3).")
    if n_images < 1:
        raise StudyError("n_images must be at least 1 (the DnD study showed 10).")
    if not name.strip():
        raise StudyError("Give the study a name (shown only to its owner).")


def _check_neuron(run: RunInfo, neuron: int, what: str = "Neuron") -> None:
    if not 0 <= neuron < run.n_neurons:
        raise StudyError(f"{what} {neuron} is out of range for run {run.run_key} ({run.n_neurons} neurons).")


def _run(store: Store, runs: dict[str, RunInfo], run_key: str) -> RunInfo:
    """The run of ``run_key``, looked up once per study."""
    if run_key not in runs:
        runs[run_key] = _require_run(store, run_key)
    return runs[run_key]


_Kept = tuple[str, int, dict[str, str], dict[str, str]]  # run key, neuron, method -> label, method -> label key


def _item_labels(store: Store, captured: dict[str, dict[int, dict[str, tuple[str, str]]]], run_key: str, neuron: int,
                 given: dict[str, str], methods: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(method -> label, method -> label key) of an item: the labels given, else each method's top label now."""
    if given:
        return {m: str(t).strip() for m, t in given.items() if m in methods and t and str(t).strip()}, {}
    if run_key not in captured:
        captured[run_key] = _captured_labels(store, run_key, methods)
    found = captured[run_key].get(neuron, {})
    return {m: found[m][0] for m in methods if m in found}, {m: found[m][1] for m in methods if m in found}


def _regular_items(store: Store, items: Sequence[StudyItem | tuple[str, int]], methods: Sequence[str],
                   runs: dict[str, RunInfo]) -> tuple[list[_Kept], list[SkippedItem]]:
    """The requested items with a label from every method, and those skipped for lacking one."""
    captured: dict[str, dict[int, dict[str, tuple[str, str]]]] = {}
    kept: list[_Kept] = []
    skipped: list[SkippedItem] = []
    seen: set[tuple[str, int]] = set()
    for item in items:
        if isinstance(item, StudyItem):
            run_key, neuron, given = item.run_key, item.neuron, dict(item.item_labels)
        else:
            run_key, neuron, given = item[0], int(item[1]), {}
        if (run_key, neuron) in seen:
            continue
        seen.add((run_key, neuron))
        _check_neuron(_run(store, runs, run_key), neuron)
        labels, keys = _item_labels(store, captured, run_key, neuron, given, methods)
        missing = tuple(m for m in methods if m not in labels)
        if missing:
            skipped.append(SkippedItem(run_key, neuron, missing))
        else:
            kept.append((run_key, neuron, {m: labels[m] for m in methods}, keys))
    if not kept:
        raise StudyError(
            f"None of the {len(seen)} items has a label from every method ({', '.join(methods)}). "
            "Run the missing methods on these neurons first, or choose neurons every method labelled.")
    return kept, skipped


def _gold_items(store: Store, gold_items: int | Sequence[GoldItem], n_options: int, seed: int, n_images: int,
                runs: dict[str, RunInfo], kept: list[_Kept]) -> tuple[list[GoldItem], list[str]]:
    """The gold items (built from probe labels for a count), checked, and notes for the owner."""
    notes: list[str] = []
    if isinstance(gold_items, int):
        golds = choose_gold_items(store, list(runs), gold_items, n_options=n_options, seed=seed,
                                  n_images=n_images, exclude=[(r, n) for r, n, _, _ in kept])
        if len(golds) < gold_items:
            notes.append(f"Only {len(golds)} of {gold_items} gold items could be built from the probe set's labels "
                         "(no label dominates enough neurons' top images). Make your own gold items: a neuron whose "
                         "images plainly show something, and that thing as the right label.")
    else:
        golds = list(gold_items)
    return golds, notes


def _check_gold(run: RunInfo, gold: GoldItem) -> None:
    _check_neuron(run, gold.neuron, "Gold neuron")
    if len(gold.decoys) < 1:
        raise StudyError(f"Gold item {run.layer}:{gold.neuron} needs at least one wrong label beside the right one.")


def _item_rows(kept: list[_Kept], golds: list[GoldItem], methods: Sequence[str], runs: dict[str, RunInfo],
               seed: int) -> list[storage.ItemRow]:
    """The stored items, under shuffled ids so that a gold item cannot be told apart by its id."""
    ids = list(range(len(kept) + len(golds)))
    seeded_rng(seed, "item ids").shuffle(ids)
    rows: list[storage.ItemRow] = []
    for item_id, (run_key, neuron, labels, keys) in zip(ids, kept):
        run = runs[run_key]
        rows.append(storage.ItemRow(item_id, run_key, run.model_spec, run.layer, neuron, False, labels, keys,
                                    _regular_options(labels, methods)))
    for item_id, gold in zip(ids[len(kept):], golds):
        run = runs[gold.run_key]
        options = [{"key": "gold", "label": gold.correct_label, "methods": []}]
        options += [{"key": f"decoy{i}", "label": d, "methods": []} for i, d in enumerate(gold.decoys)]
        rows.append(storage.ItemRow(item_id, gold.run_key, run.model_spec, run.layer, gold.neuron, True, {}, {}, options))
    return rows


def create_study(store: Store, name: str, items: Sequence[StudyItem | tuple[str, int]], methods: Sequence[str],
                 raters_per_item: int = 3, gold_items: int | Sequence[GoldItem] = 2, seed: int = 0,
                 n_images: int = 10, public_title: str = DEFAULT_PUBLIC_TITLE, own_gold: Sequence[GoldItem] = ()) -> Study:
    """Create a blind study comparing ``methods`` on ``items`` and return it (with its token).

    Items given as (run_key, neuron) or with empty ``item_labels`` get each method's current
    top label, captured now. Items lacking a label from any method are skipped and listed in
    ``study.skipped``. ``gold_items`` is a count to build automatically (see
    choose_gold_items) or explicit GoldItems; ``own_gold`` (made with :func:`make_gold_item`)
    are added to them. Gold items are excluded from method scores.
    The pictures raters see are rendered now and kept in the study (see :mod:`.pictures`).
    """
    methods = list(dict.fromkeys(methods))
    _check_request(name, methods, raters_per_item, n_images)
    runs: dict[str, RunInfo] = {}
    kept, skipped = _regular_items(store, items, methods, runs)
    golds, notes = _gold_items(store, gold_items, len(methods), seed, n_images, runs, kept)
    golds += [g for g in own_gold if g not in golds]
    for gold in golds:
        _check_gold(_run(store, runs, gold.run_key), gold)
    rows = _item_rows(kept, golds, methods, runs, seed)
    frozen = pictures.pictures_of_items(store, [(r.item_id, runs[r.run_key], r.neuron) for r in rows], n_images)

    # Random, not derived from the name: the id reaches rater pages, the owner's name must not.
    study_id = f"s-{secrets.token_hex(4)}"
    config = {"skipped": [{"run_key": s.run_key, "neuron": s.neuron, "missing_methods": list(s.missing_methods)}
                          for s in skipped], "notes": notes}
    study = storage.StudyRow(study_id, name.strip(), public_title, secrets.token_urlsafe(18), tuple(methods),
                             raters_per_item, n_images, seed, True, config, time.time(), len(rows), len(golds))

    def insert(tables: storage.StudyTables) -> None:
        tables.insert_study(study, rows)
        tables.insert_pictures(study_id, frozen)

    storage.write(store, insert)
    return get_study(store, study_id)


def freeze_missing_pictures(store: Store, study_id: str) -> int:
    """Render and keep the pictures of items that have none (a study made by an older version,
    whose rating pages read the workspace): from now on raters need only the study. Returns
    how many items got pictures; items whose run is gone are left (their raters see a note)."""
    with storage.reading(store) as tables:
        study = require_study(tables, study_id)
        missing = tables.items_without_pictures(study_id)
    runs = {key: run for key in {item.run_key for item in missing} if (run := store.get_run(key)) is not None}
    todo = [(item.item_id, runs[item.run_key], item.neuron) for item in missing if item.run_key in runs]
    if not todo:
        return 0
    frozen = pictures.pictures_of_items(store, todo, study.n_images)
    storage.write(store, lambda tables: tables.insert_pictures(study_id, frozen))
    return len({row[0] for row in frozen})


def get_study(store: Store, study_id: str) -> Study:
    """The owner's view of one study; StudyError naming known studies if it does not exist."""
    with storage.reading(store) as tables:
        return require_study(tables, study_id)


def list_studies(store: Store) -> list[Study]:
    """Every study of the workspace, newest first."""
    with storage.reading(store) as tables:
        return [Study.from_row(row) for row in tables.studies()]


def delete_study(store: Store, study_id: str) -> None:
    """Remove a study with its items, raters, orders, votes and ratings."""
    def delete(tables: storage.StudyTables) -> None:
        require_study(tables, study_id)
        tables.delete_study(study_id)

    storage.write(store, delete)


def set_study_open(store: Store, study_id: str, is_open: bool) -> Study:
    """Close a study to stop new votes (e.g. when its link leaked), or reopen it."""
    def update(tables: storage.StudyTables) -> Study:
        require_study(tables, study_id)
        tables.set_open(study_id, bool(is_open))
        return require_study(tables, study_id)

    return storage.write(store, update)


def study_items(store: Store, study_id: str):
    """The owner's table of items: item_id, run_key, layer, neuron, is_gold and each option."""
    import pandas as pd

    with storage.reading(store) as tables:
        require_study(tables, study_id)
        items = tables.items(study_id)
    return pd.DataFrame([{"item_id": i.item_id, "run_key": i.run_key, "model_spec": i.model_spec, "layer": i.layer,
                          "neuron": i.neuron, "is_gold": i.is_gold, "labels": i.labels, "options": i.options}
                         for i in items])
