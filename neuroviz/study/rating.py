"""The rater's side of a study: open it by link, register, get the next item, vote.

Everything a rater receives is blind by construction: options are letters and label texts,
never method names, the owner's study name or a gold flag. Everything here reads and writes
the studies file alone (pictures included, frozen at creation), never the workspace's runs,
so it takes a :class:`~neuroviz.store.CacheLayout` and a job busy in the workspace never
delays a rater.

A rater is known by a secret handed out when they register (the rating page keeps it in a
cookie; an owner can hand it out as a personal link): never by the name they type, which
is only a label for the owner. Two people typing the same name are two raters. Letter orders are drawn once per
(rater, item) and stored, so a reload, a return visit or the results all see the same
letters. Every call that records something (an assignment, a vote) returns only once it is
durable and visible to every later read, from any process (see :mod:`.storage`).

Typical use::

    public = study_by_token(store, token)   # RaterStudy: no method names in it
    rater = register_rater(store, public.study_id, "Ada")   # keep rater.secret (cookie, link)
    rater = rater_by_secret(store, public.study_id, secret)  # later: the same rater, or None
    task = next_item(store, public.study_id, rater.rater_id)   # RatingTask or None when done
    # show task_pictures(store, task), then task.options and SPECIAL_CHOICES
    submit_vote(store, public.study_id, rater.rater_id, task.item_id, "B", {"A": 2, "B": 5})
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from ..store import CacheLayout
from . import storage
from .design import LETTERS, NONE_FITS, UNINTERPRETABLE, Study, StudyError, require_study, seeded_rng
from .pictures import CLOSE_UPS, MOSAIC

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
#: A shown-but-unanswered item counts towards its raters_per_item for this long, so raters
#: working at the same time spread over items instead of all taking the same one.
CLAIM_SECONDS = 30 * 60
#: Gold items are placed at random positions within each rater's first GOLD_WINDOW items,
#: so an inattentive rater is caught even if they stop early.
GOLD_WINDOW = 10


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
    """One person rating one study (a rater id is only valid within its study).

    ``secret`` is what proves it is them: keep it from everyone else (the rater id is shown
    to the owner and in exports, the secret never is; only its hash is stored).
    """

    study_id: str
    rater_id: str
    name: str
    secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class TaskPictures:
    """What a rater looks at for one item: the top images as one JPEG, and close-ups (or None)."""

    mosaic: bytes | None
    close_ups: bytes | None
    n_images: int


@dataclass(frozen=True)
class RatingOption:
    """One answer shown to a rater: a letter and the label text, nothing else."""

    letter: str
    label: str


@dataclass(frozen=True)
class RatingTask:
    """One item as a rater sees it. Blind by construction: no method names, no gold flag.

    Show ``task_pictures(store, task)``, then ``options`` and the special choices NONE_FITS /
    UNINTERPRETABLE. ``done``/``total`` is this rater's progress.
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


@dataclass(frozen=True)
class VoteReceipt:
    """What submit_vote did: the choice stored, whether it replaced an earlier one, progress."""

    item_id: int
    choice: str
    replaced: bool
    done: int
    total: int


def study_by_token(store: CacheLayout, token: str) -> RaterStudy | None:
    """The rater's view of the study behind a link token, or None for an unknown token."""
    if not token:
        return None
    with storage.reading(store) as tables:
        row = tables.study_by_token(str(token))
    if row is None:
        return None
    return RaterStudy(row.study_id, row.public_title, INSTRUCTIONS, row.n_items, row.n_images, row.is_open)


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def register_rater(store: CacheLayout, study_id: str, name: str | None = None) -> Rater:
    """Register a new rater and return them with their secret (keep it: it is shown only now).

    The name is a display label for the owner and nothing else: registering twice, with the
    same name or none, gives two raters. No name: the rater id is the label.
    """
    label = " ".join((name or "").split())[:80]
    secret = secrets.token_hex(16)  # 128 bits, in letters a-f and digits: no word can appear in it

    def register(tables: storage.StudyTables) -> Rater:
        require_study(tables, study_id)
        rater_id = f"r-{secrets.token_hex(5)}"
        tables.insert_rater(study_id, rater_id, label or rater_id, _secret_hash(secret), time.time())
        return Rater(study_id, rater_id, label or rater_id, secret)

    return storage.write(store, register)


def rater_by_secret(store: CacheLayout, study_id: str, secret: str | None) -> Rater | None:
    """The rater of this study holding ``secret`` (from their cookie or personal link), or None."""
    if not secret:
        return None
    with storage.reading(store) as tables:
        found = tables.rater_by_secret(study_id, _secret_hash(str(secret)))
    return Rater(study_id, found[0], found[1], str(secret)) if found else None


def _require_rater(tables: storage.StudyTables, study_id: str, rater_id: str) -> None:
    if tables.rater_name(study_id, rater_id) is None:
        raise StudyError(f"Rater '{rater_id}' is not registered in study {study_id}.")


def _rank_key(seed: int, rater_id: str, item_id: int) -> int:
    # A per-rater shuffle of the items, stable across calls and processes.
    return int.from_bytes(hashlib.sha256(f"{seed}|{rater_id}|{item_id}".encode()).digest()[:8], "big")


def _gold_positions(seed: int, rater_id: str, n_gold: int, total: int) -> list[int]:
    window = min(total, max(GOLD_WINDOW, 2 * n_gold))
    return sorted(seeded_rng(seed, rater_id, "gold positions").sample(range(window), min(n_gold, window)))


def _task(tables: storage.StudyTables, study: Study, rater_id: str, item_id: int) -> RatingTask:
    """The task for one item, recording its letter order the first time it is shown."""
    item = tables.item(study.study_id, item_id)
    if item is None:
        raise StudyError(f"Study {study.study_id} has no item {item_id} (items are 0..{study.n_items - 1}).")
    labels = {o["key"]: o["label"] for o in item.options}
    assignment = tables.assignment(study.study_id, rater_id, item_id)
    if assignment is None:
        order = list(labels)
        seeded_rng(study.seed, rater_id, item_id, "order").shuffle(order)
        tables.insert_assignment(study.study_id, storage.Assignment(rater_id, item_id, order, time.time()))
    else:
        order = assignment.order
    vote = tables.vote(study.study_id, rater_id, item_id)
    ratings = tables.item_ratings(study.study_id, rater_id, item_id)
    done = tables.count_votes(study.study_id, rater_id)
    options = tuple(RatingOption(LETTERS[i], labels[key]) for i, key in enumerate(order))
    return RatingTask(study.study_id, rater_id, item_id, item.run_key, item.neuron, study.n_images, options, done,
                      study.n_items, vote.letter if vote else None, ratings or None)


def _choose_item(tables: storage.StudyTables, study: Study, rater_id: str) -> int | None:
    """Which item this rater sees next (see next_item), or None when they answered all."""
    pending = tables.first_unanswered(study.study_id, rater_id)
    if pending is not None:
        return pending
    items = tables.item_kinds(study.study_id)
    mine = tables.answered_items(study.study_id, rater_id)
    gold = sorted(i for i, g in items if g and i not in mine)
    regular = [i for i, g in items if not g and i not in mine]
    if not gold and not regular:
        return None
    gold_done = sum(1 for i, g in items if g and i in mine)
    positions = _gold_positions(study.seed, rater_id, study.n_gold, len(items))
    if gold and (not regular or (gold_done < len(positions) and len(mine) >= positions[gold_done])):
        return min(gold, key=lambda i: _rank_key(study.seed, rater_id, i))
    fill = tables.others_on_items(study.study_id, rater_id, time.time() - CLAIM_SECONDS)
    return min(regular, key=lambda i: (fill.get(i, 0) >= study.raters_per_item, _rank_key(study.seed, rater_id, i)))


def next_item(store: CacheLayout, study_id: str, rater_id: str) -> RatingTask | None:
    """The next item for this rater, or None when they rated everything (or the study closed).

    An item shown but not yet answered comes back first (a reload shows the same page). Then
    a due gold item; then unrated items, those that still need raters before those that have
    ``raters_per_item`` (counting others' unanswered claims younger than CLAIM_SECONDS), each
    rater in their own random order. Option letters are drawn once per (rater, item) and stored.
    """
    def choose(tables: storage.StudyTables) -> RatingTask | None:
        study = require_study(tables, study_id)
        _require_rater(tables, study_id, rater_id)
        if not study.is_open:
            return None
        item_id = _choose_item(tables, study, rater_id)
        return None if item_id is None else _task(tables, study, rater_id, item_id)

    # One write transaction: two raters asking at once never both take the last free slot.
    return storage.write(store, choose)


def task_for(store: CacheLayout, study_id: str, rater_id: str, item_id: int) -> RatingTask:
    """One given item for this rater (e.g. to go back and change an answer), with their
    previous choice and ratings filled in; same stored letter order as before."""
    def show(tables: storage.StudyTables) -> RatingTask:
        study = require_study(tables, study_id)
        _require_rater(tables, study_id, rater_id)
        return _task(tables, study, rater_id, item_id)

    return storage.write(store, show)


def task_pictures(store: CacheLayout, task: RatingTask) -> TaskPictures:
    """The pictures of a task, as frozen in the study when it was created (no workspace read).
    Pictures only: file names and folders (often the class) would give gold answers away."""
    with storage.reading(store) as tables:
        found = tables.pictures(task.study_id, task.item_id)
    mosaic, close_ups = found.get(MOSAIC), found.get(CLOSE_UPS)
    return TaskPictures(mosaic[0] if mosaic else None, close_ups[0] if close_ups else None,
                        len(mosaic[1]) if mosaic else 0)


def rater_progress(store: CacheLayout, study_id: str, rater_id: str) -> tuple[int, int]:
    """(items this rater answered, items in the study)."""
    with storage.reading(store) as tables:
        study = require_study(tables, study_id)
        return tables.count_votes(study_id, rater_id), study.n_items


def _parse_choice(choice: str, letters: dict[str, str]) -> tuple[str, str]:
    """(letter or special choice, option key) of what the rater picked."""
    special = {NONE_FITS: NONE_FITS, "none fits": NONE_FITS, UNINTERPRETABLE: UNINTERPRETABLE}.get(choice.casefold())
    if special:
        return special, special
    if choice.upper() in letters:
        return choice.upper(), letters[choice.upper()]
    raise StudyError(f"Choice '{choice}' is not one of {', '.join(letters)}, '{NONE_FITS}' or '{UNINTERPRETABLE}'.")


def _parse_ratings(ratings: dict[str, int] | None, letters: dict[str, str]) -> list[tuple[str, str, int]]:
    """(letter, option key, 1-5) of each rating given."""
    out = []
    for raw_letter, value in (ratings or {}).items():
        if value is None:
            continue
        letter = str(raw_letter).strip().upper()
        if letter not in letters:
            raise StudyError(f"Rating for '{raw_letter}': this item's options are {', '.join(letters)}.")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 5:
            raise StudyError(f"Rating for {letter} must be a whole number from 1 to 5, not {value!r}.")
        out.append((letter, letters[letter], int(value)))
    return out


def submit_vote(store: CacheLayout, study_id: str, rater_id: str, item_id: int, choice: str,
                ratings: dict[str, int] | None = None) -> VoteReceipt:
    """Store a rater's answer for an item they were shown: a letter, NONE_FITS or UNINTERPRETABLE,
    plus optional 1-5 ratings per letter. Idempotent per (study, rater, item): resubmitting
    replaces the earlier answer and ratings. Letters map to methods here, from the stored order.
    The answer is durable and visible to every reader when this returns."""
    def vote(tables: storage.StudyTables) -> VoteReceipt:
        study = require_study(tables, study_id)
        _require_rater(tables, study_id, rater_id)
        if not study.is_open:
            raise StudyError(f"Study {study_id} is closed; votes are no longer accepted.")
        assignment = tables.assignment(study_id, rater_id, item_id)
        if assignment is None:
            raise StudyError(f"Item {item_id} was never shown to rater {rater_id}; ask for it (next item) before answering.")
        letters = {LETTERS[i]: key for i, key in enumerate(assignment.order)}
        letter, key = _parse_choice(str(choice).strip(), letters)
        rating_rows = _parse_ratings(ratings, letters)
        replaced = tables.save_vote(study_id, storage.VoteRow(rater_id, item_id, letter, key, time.time()), rating_rows)
        return VoteReceipt(item_id, letter, replaced, tables.count_votes(study_id, rater_id), study.n_items)

    return storage.write(store, vote)
