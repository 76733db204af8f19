"""Metrics of how well a label explains a unit, with bootstrap intervals over images.

Only the metrics that pass the sanity tests of Neuron_Eval (Oikarinen et al., "Evaluating
Neuron Explanations: A Unified Framework with Sanity Checks", ICML 2025): a metric must fall
when the label is replaced by a random or a constant one, and must not favour labels that are
merely frequent. Accuracy, recall, AUC and WPMI fail them and are not offered.

For each column pair (a unit's activations ``a`` over images, the label's predicted activation
``p``, e.g. the multimodal backend's image-text similarity):

- ``simulation_r``: Pearson r(a, p) (0 where either does not vary);
- ``auprc``: average precision of ranking images by ``a`` against the concept's presence ``y``;
- ``f1`` and ``iou``: binarised activations (the unit's top ``top_fraction`` of images) against
  ``y``: 2TP / (2TP + FP + FN) and TP / (TP + FP + FN).

Presence ``y`` is ground truth where the caller has it (e.g. the probe set's class labels), or
else the label's own predictions binarised at the same top fraction (the backend's guess).

Intervals: an image bootstrap. Each resample is a row of multinomial counts over the images,
so every metric of every column is a weighted sum and a resample of a whole layer is a few
matrix products (``per_unit=True``: an interval for every unit and, from the same resamples,
for the layer's mean). That costs (resamples x images x units) multiply-adds per metric; for a
layer table only the mean's interval is needed, and ``per_unit=False`` bootstraps the
*linearised* mean instead: each image's influence on the mean of r, F1 and IoU (their
first-order change when the image's weight changes, averaged over units) is computed once,
and a resample is one weighted sum of those (images) values. For thousands of images the
first-order term dominates; the test suite checks it against the exact bootstrap. AUPRC depends
on the order of images: a weighted cumulative sum in each column's fixed order, so on wide
layers its intervals come from a seeded sample of the columns (its layer-mean interval is then
conservative: wider than the full layer's). Thresholds stay those of the full sample. The percentile
interval of a unit's metric and of the layer's mean come from the same resamples. Scikit-learn
and SciPy compute these one column at a time; a layer of thousands of units over thousands of
images and hundreds of resamples needs the vectorised form, which is why it is written here
(tests check it against hand-computed values and scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("simulation_r", "auprc", "f1", "iou")
METRIC_TITLES = {"simulation_r": "simulation r", "auprc": "AUPRC", "f1": "F1", "iou": "IoU"}
DEFAULT_TOP_FRACTION = 0.05  # binarise at each unit's top 5 % of images
DEFAULT_BOOTSTRAP = 200
AUPRC_RESAMPLED_COLUMNS = 32  # see score_columns
AUPRC_RESAMPLE_CHUNK = 16  # resamples whose weighted cumulative sums are held at once


def pearson_columns(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair (images x columns); 0 where either column is constant."""
    a = actual - actual.mean(axis=0, keepdims=True)
    p = predicted - predicted.mean(axis=0, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=0) * (p * p).sum(axis=0))
    num = (a * p).sum(axis=0)
    return np.where(denom > 1e-12, num / np.where(denom > 1e-12, denom, 1.0), 0.0)


def binarise_top(values: np.ndarray, top_fraction: float = DEFAULT_TOP_FRACTION) -> np.ndarray:
    """True for each column's top ``top_fraction`` of rows (at least one row)."""
    n = values.shape[0]
    m = max(1, int(round(top_fraction * n)))
    order = np.argpartition(-values, m - 1, axis=0)[:m] if m < n else np.arange(n)[:, None].repeat(values.shape[1], 1)
    out = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=0)
    return out


def _weighted_pearson(w: np.ndarray, a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(resamples, columns) Pearson r under row weights ``w`` (resamples x images)."""
    s = w.sum(axis=1, keepdims=True).astype(np.float64)
    sa, sp = (w @ a).astype(np.float64), (w @ p).astype(np.float64)
    saa, spp, sap = (w @ (a * a)).astype(np.float64), (w @ (p * p)).astype(np.float64), (w @ (a * p)).astype(np.float64)
    cov = s * sap - sa * sp
    var = (s * saa - sa * sa) * (s * spp - sp * sp)
    return np.where(var > 1e-12, cov / np.sqrt(np.maximum(var, 1e-300)), 0.0)


def _weighted_overlap(w: np.ndarray, b: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F1, IoU), each (resamples, columns), of binary columns ``b`` against ``y`` under row weights."""
    tp = (w @ (b & y).astype(np.float32)).astype(np.float64)
    both = (w @ b.astype(np.float32)).astype(np.float64) + (w @ y.astype(np.float32)).astype(np.float64)
    f1 = np.where(both > 0, 2 * tp / np.maximum(both, 1e-12), 0.0)
    iou = np.where(both - tp > 0, tp / np.maximum(both - tp, 1e-12), 0.0)
    return f1, iou


def _auprc(order: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(columns,) average precision of each column's image ranking ``order`` (images x columns, best
    first) against presence ``y`` (images x columns)."""
    ys = np.take_along_axis(y, order, axis=0).astype(np.float32)
    precision = np.cumsum(ys, axis=0) / np.arange(1, len(ys) + 1, dtype=np.float32)[:, None]
    positives = ys.sum(axis=0)
    return np.where(positives > 0, (ys * precision).sum(axis=0) / np.maximum(positives, 1), 0.0)


def _weighted_auprc(w: np.ndarray, order: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(resamples, columns) average precision under row weights ``w`` (resamples x images).

    Precision at a positive image = weighted positives up to it / weighted images up to it:
    one cumulative sum over every image in the column's order, one over its positives only.
    """
    out = np.zeros((w.shape[0], order.shape[1]))
    for j in range(order.shape[1]):
        ranked = order[:, j]
        pos = np.flatnonzero(y[ranked, j])
        if not len(pos):
            continue
        for r in range(0, len(w), AUPRC_RESAMPLE_CHUNK):  # a few resamples at a time: (resamples x images) copies stay small
            ws = w[r:r + AUPRC_RESAMPLE_CHUNK, ranked]  # (resamples, images), contiguous
            seen = np.cumsum(ws, axis=1)[:, pos]  # weighted images up to each positive
            hits = ws[:, pos]
            found = np.cumsum(hits, axis=1)  # weighted positives up to each positive
            total = hits.sum(axis=1)
            out[r:r + AUPRC_RESAMPLE_CHUNK, j] = np.where(
                total > 0, (hits * found / np.maximum(seen, 1e-12)).sum(axis=1) / np.maximum(total, 1e-12), 0.0)
    return out


@dataclass
class MetricScores:
    """Per column: each metric's value on the images given, and its bootstrap resamples.

    ``resampled[metric]`` lists the columns that have resamples (every column with
    ``per_unit``, except AUPRC on wide layers: see :func:`score_columns`); ``mean_resamples``
    holds the linearised resamples of the mean over every column where ``per_unit`` was off.
    """

    values: dict[str, np.ndarray]  # metric -> (columns,)
    resamples: dict[str, np.ndarray]  # metric -> (resamples, len(resampled[metric]))
    resampled: dict[str, np.ndarray]  # metric -> column indices
    mean_resamples: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> (resamples,)

    def interval(self, metric: str, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Per-column percentile interval (NaN for a column without resamples)."""
        lo = np.full(self.values[metric].shape, np.nan)
        hi = lo.copy()
        boot, cols = self.resamples.get(metric, np.zeros((0, 0))), self.resampled.get(metric, np.zeros(0, np.int64))
        if len(boot) and len(cols):
            tail = (1 - level) / 2 * 100
            lo[cols], hi[cols] = np.percentile(boot, tail, axis=0), np.percentile(boot, 100 - tail, axis=0)
        return lo, hi

    def mean_interval(self, metric: str, columns: np.ndarray | None = None, level: float = 0.95) -> tuple[float, float, float]:
        """(mean over ``columns``, interval low, high) of that mean under the image resamples.

        Where only a sample of the columns has resamples, the interval is that sample's
        (its spread around its own mean, moved to the full mean): wider than the full layer's,
        since a mean over fewer units averages out less of the image noise.
        """
        vals = self.values[metric]
        chosen = np.arange(len(vals)) if columns is None else np.asarray(columns, dtype=np.int64)
        if not len(chosen):
            return float("nan"), float("nan"), float("nan")
        mean = float(np.mean(vals[chosen]))
        tail = (1 - level) / 2 * 100
        if columns is None and metric in self.mean_resamples and len(self.mean_resamples[metric]):
            means = self.mean_resamples[metric]
            return mean, float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
        boot, have = self.resamples.get(metric, np.zeros((0, 0))), self.resampled.get(metric, np.zeros(0, np.int64))
        pos = np.flatnonzero(np.isin(have, chosen))
        if not len(boot) or not len(pos):
            return mean, float("nan"), float("nan")
        means = boot[:, pos].mean(axis=1) - float(np.mean(vals[have[pos]])) + mean
        return mean, float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _pearson_influence(a: np.ndarray, p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(images,) each image's first-order influence on the mean r over columns (a, p standardised)."""
    return (a * p - r * (a * a + p * p) / 2).mean(axis=1)


def _overlap_influence(b: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images,) each image's first-order influence on the mean F1 and the mean IoU over columns."""
    n = b.shape[0]
    tp = (b & y).astype(np.float32)
    both = b.astype(np.float32) + y.astype(np.float32)
    sum_tp, sum_both = tp.sum(axis=0), both.sum(axis=0)
    f1 = np.where(sum_both > 0, 2 * sum_tp / np.maximum(sum_both, 1e-12), 0.0)
    union = sum_both - sum_tp
    iou = np.where(union > 0, sum_tp / np.maximum(union, 1e-12), 0.0)
    f1_influence = np.where(sum_both > 0, (2 * tp - f1 * both) / np.maximum(sum_both / n, 1e-12), 0.0)
    iou_influence = np.where(union > 0, (tp - iou * (both - tp)) / np.maximum(union / n, 1e-12), 0.0)
    return f1_influence.mean(axis=1), iou_influence.mean(axis=1)


def bootstrap_weights(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n_images) multinomial counts: each row one resample of the images with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot).astype(np.float32)


@dataclass
class Prepared:
    """One side of the comparison (images x columns), standardised, binarised and (for
    activations) ranked once, so every label set of a layer reuses it (:meth:`columns`)."""

    z: np.ndarray  # standardised columns (population sd), float32
    top: np.ndarray  # bool: each column's top ``top_fraction`` of images
    order: np.ndarray | None = None  # images ranked best first, per column (activations only)

    def columns(self, index: np.ndarray) -> Prepared:
        return Prepared(self.z[:, index], self.top[:, index], None if self.order is None else self.order[:, index])


def prepare(values: np.ndarray, top_fraction: float = DEFAULT_TOP_FRACTION, rank: bool = False) -> Prepared:
    """Standardise, binarise and optionally rank each column of ``values`` (images x columns)."""
    x = np.asarray(values, dtype=np.float32)
    # Centred and scaled columns keep the float32 weighted sums well conditioned; r is unchanged.
    z = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
    return Prepared(z, binarise_top(z, top_fraction), np.argsort(-z, axis=0) if rank else None)


def score_columns(acts: np.ndarray, predicted: np.ndarray, presence: np.ndarray | None = None,
                  top_fraction: float = DEFAULT_TOP_FRACTION, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  metrics: tuple[str, ...] = METRICS, max_auprc_resampled: int | None = AUPRC_RESAMPLED_COLUMNS,
                  per_unit: bool = True) -> MetricScores:
    """Every metric for each column pair of ``acts`` and ``predicted`` (images x columns).

    ``presence`` (images x columns, bool) is the concept's presence; without it, the top
    ``top_fraction`` of each column of ``predicted``. ``n_boot`` = 0 skips the intervals.
    AUPRC's resamples cost (resamples x images) per column, so on wider layers only a seeded
    sample of ``max_auprc_resampled`` columns gets them (None: every column). ``per_unit=False``
    gives simulation r, F1 and IoU only the linearised interval of their mean (see the module docstring).
    """
    if np.shape(acts) != np.shape(predicted):
        raise ValueError(f"Activations {np.shape(acts)} and predictions {np.shape(predicted)} differ in shape.")
    a = prepare(acts, top_fraction, rank="auprc" in metrics)
    p = prepare(predicted, top_fraction)
    if presence is not None:
        p = Prepared(p.z, np.asarray(presence, dtype=bool))
    w = bootstrap_weights(a.z.shape[0], n_boot, seed) if n_boot else np.zeros((0, a.z.shape[0]), np.float32)
    return score_prepared(a, p, w, seed, metrics, max_auprc_resampled, per_unit)


def auprc_resampled_columns(n_cols: int, seed: int = 0, max_columns: int | None = AUPRC_RESAMPLED_COLUMNS) -> np.ndarray:
    """The columns whose AUPRC gets resamples: every one, or a seeded sample of ``max_columns`` on wider layers."""
    if max_columns is None or n_cols <= max_columns:
        return np.arange(n_cols)
    return np.sort(np.random.default_rng(seed).choice(n_cols, max_columns, replace=False))


def score_prepared(a: Prepared, p: Prepared, w: np.ndarray, seed: int = 0, metrics: tuple[str, ...] = METRICS,
                   max_auprc_resampled: int | None = AUPRC_RESAMPLED_COLUMNS, per_unit: bool = True) -> MetricScores:
    """:func:`score_columns` on prepared sides, with bootstrap weights ``w`` (resamples x images; none: no intervals)."""
    n_images, n_cols = a.z.shape
    b, y = a.top, p.top
    one = np.ones((1, n_images), dtype=np.float32)
    n_boot = len(w)
    every = np.arange(n_cols)
    values: dict[str, np.ndarray] = {}
    resamples: dict[str, np.ndarray] = {}
    resampled: dict[str, np.ndarray] = {}
    mean_resamples: dict[str, np.ndarray] = {}
    none = np.zeros(0, dtype=np.int64)

    def linearised(influence: np.ndarray) -> np.ndarray:
        return (w @ influence - w.sum(axis=1) * influence.mean()) / n_images

    if "simulation_r" in metrics:
        values["simulation_r"] = _weighted_pearson(one, a.z, p.z)[0]
        if per_unit:
            resamples["simulation_r"], resampled["simulation_r"] = _weighted_pearson(w, a.z, p.z), every
        else:
            resamples["simulation_r"], resampled["simulation_r"] = np.zeros((0, 0)), none
            mean_resamples["simulation_r"] = values["simulation_r"].mean() + linearised(
                _pearson_influence(a.z, p.z, values["simulation_r"].astype(np.float32)))
    if "f1" in metrics or "iou" in metrics:
        (f1,), (iou,) = _weighted_overlap(one, b, y)
        values.update(f1=f1, iou=iou)
        if per_unit:
            boot_f1, boot_iou = _weighted_overlap(w, b, y)
            resamples.update(f1=boot_f1, iou=boot_iou)
            resampled.update(f1=every, iou=every)
        else:
            resamples.update(f1=np.zeros((0, 0)), iou=np.zeros((0, 0)))
            resampled.update(f1=none, iou=none)
            f1_influence, iou_influence = _overlap_influence(b, y)
            mean_resamples.update(f1=f1.mean() + linearised(f1_influence), iou=iou.mean() + linearised(iou_influence))
    if "auprc" in metrics:
        order = a.order if a.order is not None else np.argsort(-a.z, axis=0)
        values["auprc"] = _auprc(order, y)
        cols = auprc_resampled_columns(n_cols, seed, max_auprc_resampled)
        resamples["auprc"], resampled["auprc"] = _weighted_auprc(w, order[:, cols], y[:, cols]), cols
    keep = [m for m in metrics if m in values]
    return MetricScores({m: values[m] for m in keep}, {m: resamples[m] for m in keep}, {m: resampled[m] for m in keep},
                        {m: mean_resamples[m] for m in keep if m in mean_resamples and n_boot})
