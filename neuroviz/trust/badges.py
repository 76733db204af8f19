"""A badge per unit: does its best label beat the shuffled baseline on held-out images?

For unit n with method labels L_1..L_m, the observed statistic is the best held-out
simulation r over its labels. The null is the shuffled baseline: the labels of the layer's
*other* units (each as often as it occurs, as a random permutation of labels would give
them; texts equal to one of the unit's own labels left out), scored on unit n over the same
images. One-sided p: the best r's Fisher z as a new draw from the null labels' Fisher z values
(their weighted mean and standard deviation; Student t with one degree of freedom less
than the number of distinct null texts). An empirical rank p, (1 + #null >= best) /
(1 + #null), cannot go below 1 / (1 + #labels), which on a small or repetitive layer is
too coarse to survive a correction over its units; it is kept in ``p_rank``. p is
Sidak-adjusted for taking the best of m labels (1 - (1 - p)^m), then corrected over the
layer with Benjamini-Hochberg (statsmodels ``multipletests``, ``fdr_bh``). A unit *passes* when its
corrected q < alpha. Badges are saved as a record per run so the pages show them without
recomputing; :func:`badge_sort_key` and :func:`filter_by_badge` are the browser's sort and
filter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..store import Store
from .scoring import LabelSet, ScoringImages, embed_texts, label_texts

BADGES = "trust_badges"  # records namespace: run key -> {"units": {...}, "about": {...}}
DEFAULT_ALPHA = 0.05
BADGE_FILTERS = ("any", "beats shuffled", "does not beat shuffled", "not scored")


@dataclass
class UnitBadge:
    """One unit's verdict."""

    neuron: int
    passed: bool
    best_label: str
    best_method: str
    r: float  # best held-out simulation r
    null_mean: float  # mean r of the shuffled labels on this unit
    p: float  # one-sided, adjusted for the best of m labels
    q: float  # Benjamini-Hochberg over the layer
    p_rank: float = 1.0  # empirical rank among the null labels (see the module docstring)

    @property
    def title(self) -> str:
        return "beats shuffled" if self.passed else "does not beat shuffled"


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    return x / np.maximum(np.sqrt((x * x).sum(axis=0)), 1e-12)


def unit_badges(store: Store | None, images: ScoringImages, multimodal, method_sets: Sequence[LabelSet],
                alpha: float = DEFAULT_ALPHA) -> list[UnitBadge]:
    """Badges for every unit labelled by at least one of ``method_sets`` (methods, not baselines)."""
    from scipy.stats import t as student_t
    from statsmodels.stats.multitest import multipletests

    units = sorted({n for ls in method_sets for n in ls.labels})
    if not units:
        return []
    texts = sorted({label for ls in method_sets for label in ls.labels.values()})
    concept_texts = label_texts(method_sets)
    text_emb = embed_texts(store, multimodal, concept_texts)
    row_of = {t: i for i, t in enumerate(concept_texts)}
    r_all = np.empty((len(units), len(texts)))  # r of every layer label on every unit
    # a block of units and one of labels at a time, each read and standardised (a copy): 4 float32 matrices
    step = images.columns_per_block(16)
    for u in range(0, len(units), step):
        acts = _standardise(images.unit_columns(units[u:u + step]))
        for t in range(0, len(texts), step):
            r_all[u:u + step, t:t + step] = acts.T @ _standardise(images.predictions(multimodal, text_emb, row_of, texts[t:t + step]))
    column = {t: j for j, t in enumerate(texts)}
    counts = np.zeros(len(texts))
    own = np.zeros((len(units), len(texts)))
    best = np.full(len(units), -np.inf)
    best_label = [""] * len(units)
    best_method = [""] * len(units)
    n_labels = np.zeros(len(units), dtype=np.int64)
    pos = {n: i for i, n in enumerate(units)}
    for ls in method_sets:
        for n, label in ls.labels.items():
            i, j = pos[n], column[label]
            counts[j] += 1
            own[i, j] += 1
            n_labels[i] += 1
            if r_all[i, j] > best[i]:
                best[i], best_label[i], best_method[i] = r_all[i, j], label, ls.name
    null_counts = np.where(own > 0, 0.0, counts[None, :])  # other units' labels, as often as they occur
    total = null_counts.sum(axis=1)
    p_rank = (1 + ((r_all >= best[:, None]) * null_counts).sum(axis=1)) / (1 + total)
    z = np.arctanh(np.clip(r_all, -0.999999, 0.999999))
    z_mean = (z * null_counts).sum(axis=1) / np.maximum(total, 1)
    z_sd = np.sqrt(np.maximum(((z - z_mean[:, None]) ** 2 * null_counts).sum(axis=1) / np.maximum(total - 1, 1), 0.0))
    z_best = np.arctanh(np.clip(best, -0.999999, 0.999999))
    distinct = (null_counts > 0).sum(axis=1)  # repeated texts are one value: they add no degrees of freedom
    usable = (distinct >= 2) & (z_sd > 1e-9)
    # A new draw against a sample of null values: Student t with (distinct values - 1) degrees of freedom.
    spread = np.where(usable, z_sd * np.sqrt(1 + 1 / np.maximum(distinct, 1)), 1.0)
    p = np.where(usable, student_t.sf((z_best - z_mean) / spread, np.maximum(distinct - 1, 1)), 1.0)
    p = 1 - (1 - p) ** np.maximum(n_labels, 1)
    null_mean = (r_all * null_counts).sum(axis=1) / np.maximum(total, 1)
    q = multipletests(p, alpha=alpha, method="fdr_bh")[1]
    return [UnitBadge(int(n), bool(q[i] < alpha), best_label[i], best_method[i], float(best[i]), float(null_mean[i]),
                      float(p[i]), float(q[i]), float(p_rank[i])) for i, n in enumerate(units)]


def save_badges(store: Store, run_key: str, badges: Sequence[UnitBadge], about: dict) -> None:
    """Keep a run's badges (the newest evaluation wins) with what they were computed from."""
    store.put_record(BADGES, run_key, {"units": [asdict(b) for b in badges], "about": about})


def load_badges(store: Store, run_key: str) -> dict[int, UnitBadge]:
    """A run's saved badges by neuron ({} when the run was never evaluated)."""
    record = store.get_record(BADGES, run_key)
    if not record:
        return {}
    return {int(u["neuron"]): UnitBadge(**u) for u in record["units"]}


def badge_about(store: Store, run_key: str) -> dict:
    """What the saved badges were computed from (images, backend, split, alpha)."""
    record = store.get_record(BADGES, run_key)
    return record["about"] if record else {}


def badge_sort_key(badge: UnitBadge | None) -> tuple[int, float]:
    """Sort key, best first: passing units by q then r, then failing ones, then unscored."""
    if badge is None:
        return (2, 0.0)
    return (0 if badge.passed else 1, badge.q - 1e-6 * badge.r)


def filter_by_badge(neurons: Iterable[int], badges: dict[int, UnitBadge], choice: str) -> list[int]:
    """The neurons whose badge matches ``choice`` (one of :data:`BADGE_FILTERS`)."""
    wanted = list(neurons)
    if choice == "beats shuffled":
        return [n for n in wanted if n in badges and badges[n].passed]
    if choice == "does not beat shuffled":
        return [n for n in wanted if n in badges and not badges[n].passed]
    if choice == "not scored":
        return [n for n in wanted if n not in badges]
    return wanted


def badge_text(badge: UnitBadge | None) -> str:
    """One short line for a card: '✓ beats shuffled (q 0.01)' / '✗ ...' / 'not scored'."""
    if badge is None:
        return "not scored (run evaluate)"
    mark = "✓" if badge.passed else "✗"
    return f"{mark} {badge.title} (r {badge.r:.2f} vs {badge.null_mean:.2f}, q {badge.q:.3g})"
