"""Which neurons of a layer the browser shows, in which order: label search, whether the
methods agree, and the sort.

The layer browser pages through hundreds or thousands of neuron cards. Deciding which
cards match a search, whether the shown methods gave the same answer (as text, or by
meaning: MiniLM embeddings of the labels above a cosine threshold) and in which order
they come is plain table work on the run's labels and statistics, so it lives here, is
tested here, and the page only draws the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SORTS = ("neuron", "score", "max", "agreement")
AGREEMENT_FILTERS = ("all", "agree", "disagree")
MAX_EMBEDDED_LABELS = 20_000  # more distinct labels than this: agreement by exact text only (embedding would take minutes)


def normalised(text: str) -> str:
    """A label as compared for agreement: lower case, underscores as spaces, single spaces."""
    return " ".join(str(text).lower().replace("_", " ").split())


def top_labels(labels: pd.DataFrame, methods: Sequence[str]) -> dict[int, dict[str, dict]]:
    """neuron -> method -> {label, score, calibrated, backend} of each method's answer (rank 0)."""
    if labels.empty:
        return {}
    top = labels[(labels["rank"] == 0) & labels["method"].isin(list(methods))]
    out: dict[int, dict[str, dict]] = {}
    for row in top.itertuples(index=False):
        calibrated = row.calibrated
        missing = calibrated is None or (isinstance(calibrated, float) and math.isnan(calibrated))
        out.setdefault(int(row.neuron), {})[row.method] = {
            "label": str(row.label), "score": float(row.score), "calibrated": None if missing else float(calibrated),
            "backend": str(row.backend or ""),
        }
    return out


class LabelSimilarity:
    """Cosine similarity of normalised label texts from their unit-length embeddings, looked
    up by pair; only the pairs asked for are computed."""

    def __init__(self, texts: Sequence[str], vectors: np.ndarray):
        self.index = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors

    def get(self, pair: tuple[str, str], default: float = 0.0) -> float:
        """The cosine of two normalised texts (``default`` when either was not embedded)."""
        a, b = (self.index.get(t) for t in pair)
        if a is None or b is None:
            return default
        return float(self.vectors[a] @ self.vectors[b])


def label_similarity(labels: pd.DataFrame, encode: Callable[[list[str]], np.ndarray] | None = None) -> LabelSimilarity | None:
    """Embeddings of every distinct answer (rank-0 label) of a run, for agreement by meaning.

    ``encode`` maps texts to unit vectors; by default the library's one MiniLM
    (:func:`neuroviz.backends.multimodal.encode_with_minilm`). None when there are no labels
    or too many distinct ones to embed while a page waits.
    """
    if labels.empty:
        return None
    texts = sorted({normalised(t) for t in labels.loc[labels["rank"] == 0, "label"]})
    if len(texts) > MAX_EMBEDDED_LABELS:
        return None
    if encode is None:
        from .backends.multimodal import encode_with_minilm

        encode = encode_with_minilm
    return LabelSimilarity(texts, encode(texts))


def agreement(entries: Mapping[str, dict], methods: Sequence[str], similar: LabelSimilarity | None = None,
              threshold: float = 0.8) -> bool | None:
    """Whether the methods gave the same answer: equal normalised text, or (with ``similar``)
    every pair of answers at least ``threshold`` apart in cosine. None with fewer than 2 answers."""
    answers = [normalised(entries[m]["label"]) for m in methods if m in entries]
    if len(answers) < 2:
        return None
    for i in range(len(answers)):
        for j in range(i + 1, len(answers)):
            a, b = answers[i], answers[j]
            if a == b:
                continue
            if similar is None or similar.get((a, b), similar.get((b, a), 0.0)) < threshold:
                return False
    return True


@dataclass(frozen=True)
class BrowseQuery:
    """What the user asked the browser for; the methods are those shown, the first leads "score"."""

    methods: tuple[str, ...] = ()
    search: str = ""  # a substring of a shown label, or a neuron number
    sort: str = "neuron"  # one of SORTS
    agreement: str = "all"  # one of AGREEMENT_FILTERS
    by_meaning: bool = False  # agreement by MiniLM cosine instead of equal text
    threshold: float = 0.8
    candidates: bool = False  # search the runner-up candidates too, not only each method's answer


@dataclass(frozen=True)
class BrowseResult:
    """The matching neurons in display order, with each one's answers and agreement, and,
    for a search, why each neuron matched (``{neuron: ["MILAN candidate 2: dog sled", ...]}``
    with method keys, see :func:`search_hits`)."""

    neurons: list[int]
    tops: dict[int, dict[str, dict]] = field(default_factory=dict)
    agreement: dict[int, bool | None] = field(default_factory=dict)
    matches: dict[int, list[tuple[str, int, str]]] = field(default_factory=dict)


def search_hits(labels: pd.DataFrame, methods: Sequence[str], search: str, candidates: bool = True
                ) -> dict[int, list[tuple[str, int, str]]]:
    """neuron -> [(method, rank, label), ...] of the labels of ``methods`` containing ``search``
    (case ignored): each method's answer (rank 0) only, or every candidate with ``candidates``.
    A neuron whose number is the search matches as (``"number"``, -1, the number)."""
    text = search.lower().strip()
    hits: dict[int, list[tuple[str, int, str]]] = {}
    if not text:
        return hits
    if not labels.empty:
        shown = labels[labels["method"].isin(list(methods))]
        if not candidates:
            shown = shown[shown["rank"] == 0]
        found = shown[shown["label"].str.lower().str.contains(text, regex=False, na=False)]
        for row in found.sort_values(["neuron", "rank"], kind="stable").itertuples(index=False):
            hits.setdefault(int(row.neuron), []).append((str(row.method), int(row.rank), str(row.label)))
    if text.isdigit():
        hits.setdefault(int(text), []).insert(0, ("number", -1, text))
    return hits


def matching_neurons(labels: pd.DataFrame, methods: Sequence[str], search: str, n_neurons: int,
                     candidates: bool = True) -> list[int]:
    """Neurons with a label of one of ``methods`` containing ``search`` (case ignored; any rank,
    or only each method's answer without ``candidates``), plus the neuron of that number;
    every neuron when ``search`` is blank."""
    if not search.strip():
        return list(range(n_neurons))
    hit = search_hits(labels, methods, search, candidates)
    return [n for n in range(n_neurons) if n in hit]


def _score_key(entry: dict | None) -> tuple[float, float]:
    """Best first: the calibrated (comparable) score, then the method's raw score."""
    if entry is None:
        return (math.inf, math.inf)
    calibrated = entry.get("calibrated")
    return (-calibrated if calibrated is not None else math.inf, -entry["score"])


def browse(labels: pd.DataFrame, stats: pd.DataFrame, n_neurons: int, query: BrowseQuery,
           similar: LabelSimilarity | None = None) -> BrowseResult:
    """Filter and order a layer's neurons for the browser.

    ``labels`` are the run's labels (every method and rank), ``stats`` its per-neuron
    statistics (neuron, max, ...), ``similar`` the label embeddings when agreement is by
    meaning. Sorting is stable, so ties keep neuron order.
    """
    tops = top_labels(labels, query.methods)
    similar = similar if query.by_meaning else None
    matches = search_hits(labels, query.methods, query.search, query.candidates)
    neurons = [n for n in range(n_neurons) if n in matches] if query.search.strip() else list(range(n_neurons))
    agree = {n: agreement(tops.get(n, {}), query.methods, similar, query.threshold) for n in neurons}
    if query.agreement == "agree":
        neurons = [n for n in neurons if agree[n] is True]
    elif query.agreement == "disagree":
        neurons = [n for n in neurons if agree[n] is False]
    if query.sort == "score" and query.methods:
        first = query.methods[0]
        neurons.sort(key=lambda n: _score_key(tops.get(n, {}).get(first)))
    elif query.sort == "max":
        peak = dict(zip(stats["neuron"].astype(int), stats["max"])) if not stats.empty else {}
        neurons.sort(key=lambda n: -peak.get(n, 0.0))
    elif query.sort == "agreement":
        neurons.sort(key=lambda n: {True: 0, None: 1, False: 2}[agree[n]])
    return BrowseResult(neurons, tops, agree, {n: matches[n] for n in neurons if n in matches})
