"""The layer browser's choice of neurons: search, agreement between methods, sorting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuroviz import browse
from neuroviz.browse import BrowseQuery

LABEL_COLUMNS = ("neuron", "method", "rank", "label", "score", "calibrated", "backend")


def labels_table(rows) -> pd.DataFrame:
    """A labels table as the store returns it, from (neuron, method, rank, label, score) tuples."""
    return pd.DataFrame([(*r, np.nan, "test") for r in rows], columns=LABEL_COLUMNS)


# neuron 0: both say dog; 1: cat vs Dog_house; 2: only a; 3: car vs automobile; 4: unlabelled
LABELS = labels_table([
    (0, "a", 0, "Dog", 0.9), (0, "b", 0, "dog", 0.2), (0, "a", 1, "wolf", 0.5),
    (1, "a", 0, "cat", 0.3), (1, "b", 0, "Dog_house", 0.8), (1, "c", 0, "striped fur", 0.7),
    (2, "a", 0, "grass", 0.6),
    (3, "a", 0, "car", 0.1), (3, "b", 0, "automobile", 0.4),
])
STATS = pd.DataFrame({"neuron": [0, 1, 2, 3, 4], "max": [1.0, 5.0, 3.0, 3.0, 0.5]})
AB = ("a", "b")


def test_top_labels_keep_each_methods_answer():
    tops = browse.top_labels(LABELS, AB)
    assert sorted(tops) == [0, 1, 2, 3]
    assert tops[0]["a"] == {"label": "Dog", "score": 0.9, "calibrated": None, "backend": "test"}
    assert "c" not in tops[1]  # a method not shown is left out
    assert browse.top_labels(LABELS.iloc[0:0], AB) == {}


def test_agreement_by_text_and_by_meaning():
    tops = browse.top_labels(LABELS, ("a", "b", "c"))
    assert browse.agreement(tops[0], AB) is True  # case and spacing do not matter
    assert browse.agreement(tops[1], AB) is False
    assert browse.agreement(tops[2], AB) is None  # one answer cannot agree or disagree
    assert browse.normalised("  Dog_House ") == "dog house"
    similar = browse.LabelSimilarity(["automobile", "car"], np.array([[1.0, 0.0], [0.9, np.sqrt(1 - 0.81)]]))
    assert browse.agreement(tops[3], AB, similar, threshold=0.85) is True
    assert browse.agreement(tops[3], AB, similar, threshold=0.95) is False
    assert browse.agreement(tops[1], ("a", "b", "c"), similar) is False  # texts never embedded count as 0


def test_search_matches_shown_labels_of_any_rank_and_neuron_numbers():
    assert browse.matching_neurons(LABELS, AB, "  WOLF ", 5) == [0]  # a runner-up label, any case
    assert browse.matching_neurons(LABELS, AB, "fur", 5) == []  # only method c says fur, and it is not shown
    assert browse.matching_neurons(LABELS, ("c",), "fur", 5) == [1]
    assert browse.matching_neurons(LABELS, AB, "4", 5) == [4]  # a neuron number, even unlabelled
    assert browse.matching_neurons(LABELS, AB, "", 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("query, expected", [
    (BrowseQuery(AB), [0, 1, 2, 3, 4]),
    (BrowseQuery(AB, agreement="agree"), [0]),
    (BrowseQuery(AB, agreement="disagree"), [1, 3]),
    (BrowseQuery(AB, sort="score"), [0, 2, 1, 3, 4]),  # by method a's score; unlabelled last
    (BrowseQuery(("b", "a"), sort="score"), [1, 3, 0, 2, 4]),  # the first shown method leads
    (BrowseQuery(AB, sort="max"), [1, 2, 3, 0, 4]),  # ties keep neuron order
    (BrowseQuery(AB, sort="agreement"), [0, 2, 4, 1, 3]),  # agree, then undecided, then disagree
    (BrowseQuery(AB, search="dog", agreement="disagree"), [1]),
])
def test_browse_filters_and_orders(query, expected):
    result = browse.browse(LABELS, STATS, 5, query)
    assert result.neurons == expected
    assert set(result.agreement) >= set(expected)


def test_agreement_by_meaning_needs_the_similarity():
    similar = browse.LabelSimilarity(["automobile", "car"], np.array([[1.0, 0.0], [1.0, 0.0]]))
    by_meaning = BrowseQuery(AB, agreement="agree", by_meaning=True)
    assert browse.browse(LABELS, STATS, 5, by_meaning, similar).neurons == [0, 3]
    # the same similarity is ignored when the user compares text only
    assert browse.browse(LABELS, STATS, 5, BrowseQuery(AB, agreement="agree"), similar).neurons == [0]


def test_label_similarity_embeds_each_distinct_answer_once():
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return np.eye(len(texts), dtype=np.float32)

    similar = browse.label_similarity(LABELS, encode)
    assert seen == [sorted({"dog", "cat", "dog house", "striped fur", "grass", "car", "automobile"})]
    assert similar.get(("dog", "dog")) == 1.0 and similar.get(("dog", "cat")) == 0.0
    assert browse.label_similarity(LABELS.iloc[0:0], encode) is None


def test_label_similarity_uses_the_librarys_minilm():
    """By default the texts go through neuroviz's one MiniLM: related answers come out closer."""
    table = labels_table([(0, "a", 0, "dog", 1.0), (0, "b", 0, "puppy", 1.0), (1, "a", 0, "car", 1.0)])
    similar = browse.label_similarity(table)
    assert similar.get(("dog", "puppy")) > similar.get(("dog", "car"))
    assert similar.get(("dog", "dog")) == pytest.approx(1.0, abs=1e-5)


def test_search_looks_at_shown_answers_unless_candidates_are_asked_for():
    # "wolf" is only method a's runner-up for neuron 0: hidden by default (issue 12.7)
    assert browse.browse(LABELS, STATS, 5, BrowseQuery(AB, search="wolf")).neurons == []
    found = browse.browse(LABELS, STATS, 5, BrowseQuery(AB, search="wolf", candidates=True))
    assert found.neurons == [0] and found.matches == {0: [("a", 1, "wolf")]}
    shown = browse.browse(LABELS, STATS, 5, BrowseQuery(AB, search="dog"))
    assert shown.neurons == [0, 1]
    assert shown.matches[1] == [("b", 0, "Dog_house")] and {m for m, _, _ in shown.matches[0]} == {"a", "b"}
    assert browse.search_hits(LABELS, AB, "3", candidates=False)[3] == [("number", -1, "3")]
    assert browse.browse(LABELS, STATS, 5, BrowseQuery(AB)).matches == {}


def test_score_sort_puts_the_comparable_calibrated_score_first():
    rows = labels_table([(0, "a", 0, "x", 5.0), (1, "a", 0, "y", 1.0), (2, "a", 0, "z", 3.0)])
    rows.loc[rows["neuron"] == 1, "calibrated"] = 0.9
    rows.loc[rows["neuron"] == 2, "calibrated"] = 0.5
    # calibrated neurons first (best first), then by raw score; unlabelled last
    assert browse.browse(rows, STATS, 4, BrowseQuery(("a",), sort="score")).neurons == [1, 2, 0, 3]
