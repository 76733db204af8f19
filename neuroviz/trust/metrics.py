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
matrix products. AUPRC depends on the order of images: a weighted cumulative sum in each
column's fixed order, (resamples x images) per column, so on wide layers its layer-mean
interval comes from a seeded sample of the columns (conservative: wider than the full
layer's). Thresholds stay those of the full sample. The percentile
interval of a unit's metric and of the layer's mean come from the same resamples. Scikit-learn
and SciPy compute these one column at a time; a layer of thousands of units over thousands of
images and hundreds of resamples needs the vectorised form, which is why it is written here
(tests check it against hand-computed values and scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("simulation_r", "auprc", "f1", "iou")
METRIC_TITLES = {"simulation_r": "simulation r", "auprc": "AUPRC", "f1": "F1", "iou": "IoU"}
DEFAULT_TOP_FRACTION = 0.05  # binarise at each unit's top 5 % of images
DEFAULT_BOOTSTRAP = 200
AUPRC_RESAMPLED_COLUMNS = 128  # see score_columns
_AUPRC_BLOCK_BYTES = 64 * 2**20  # one weighted-cumsum block: resamples x images x columns float32


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


def _weighted_auprc(w: np.ndarray, order: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(resamples, columns) average precision of each column's image ranking ``order`` (images x
    columns, best first) against presence ``y``, rows weighted by ``w`` (resamples x images)."""
    n_boot, n_cols = w.shape[0], order.shape[1]
    out = np.zeros((n_boot, n_cols))
    chunk = max(1, _AUPRC_BLOCK_BYTES // max(1, 4 * n_boot * order.shape[0]))
    for start in range(0, n_cols, chunk):
        cols = slice(start, min(n_cols, start + chunk))
        ys = np.take_along_axis(y[:, cols], order[:, cols], axis=0).astype(np.float32)
        ws = w[:, order[:, cols]]  # (resamples, images, chunk)
        hits = ws * ys[None]
        precision = np.cumsum(hits, axis=1) / np.maximum(np.cumsum(ws, axis=1), 1e-12)
        positives = hits.sum(axis=1)
        out[:, cols] = np.where(positives > 0, (hits * precision).sum(axis=1) / np.maximum(positives, 1e-12), 0.0)
    return out


@dataclass
class MetricScores:
    """Per column: each metric's value on the images given, and its bootstrap resamples.

    ``resampled[metric]`` lists the columns that have resamples (every column, except AUPRC on
    wide layers: see :func:`score_columns`).
    """

    values: dict[str, np.ndarray]  # metric -> (columns,)
    resamples: dict[str, np.ndarray]  # metric -> (resamples, len(resampled[metric]))
    resampled: dict[str, np.ndarray]  # metric -> column indices

    def interval(self, metric: str, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Per-column percentile interval (NaN for a column without resamples)."""
        lo = np.full(self.values[metric].shape, np.nan)
        hi = lo.copy()
        boot, cols = self.resamples[metric], self.resampled[metric]
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
        boot, have = self.resamples[metric], self.resampled[metric]
        pos = np.flatnonzero(np.isin(have, chosen))
        if not len(boot) or not len(pos):
            return mean, float("nan"), float("nan")
        means = boot[:, pos].mean(axis=1) - float(np.mean(vals[have[pos]])) + mean
        tail = (1 - level) / 2 * 100
        return mean, float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def bootstrap_weights(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n_images) multinomial counts: each row one resample of the images with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot).astype(np.float32)


def score_columns(acts: np.ndarray, predicted: np.ndarray, presence: np.ndarray | None = None,
                  top_fraction: float = DEFAULT_TOP_FRACTION, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  metrics: tuple[str, ...] = METRICS, max_auprc_resampled: int | None = AUPRC_RESAMPLED_COLUMNS) -> MetricScores:
    """Every metric for each column pair of ``acts`` and ``predicted`` (images x columns).

    ``presence`` (images x columns, bool) is the concept's presence; without it, the top
    ``top_fraction`` of each column of ``predicted``. ``n_boot`` = 0 skips the intervals.
    AUPRC's resamples cost (resamples x images) per column, so on wider layers only a seeded
    sample of ``max_auprc_resampled`` columns gets them (None: every column).
    """
    a = np.asarray(acts, dtype=np.float32)
    p = np.asarray(predicted, dtype=np.float32)
    if a.shape != p.shape:
        raise ValueError(f"Activations {a.shape} and predictions {p.shape} differ in shape.")
    n_images, n_cols = a.shape
    # Centred and scaled columns keep the float32 weighted sums well conditioned; r is unchanged.
    a = (a - a.mean(axis=0)) / np.maximum(a.std(axis=0), 1e-12)
    p = (p - p.mean(axis=0)) / np.maximum(p.std(axis=0), 1e-12)
    y = binarise_top(p, top_fraction) if presence is None else np.asarray(presence, dtype=bool)
    b = binarise_top(a, top_fraction)
    one = np.ones((1, n_images), dtype=np.float32)
    w = bootstrap_weights(n_images, n_boot, seed) if n_boot else np.zeros((0, n_images), np.float32)
    every = np.arange(n_cols)
    values: dict[str, np.ndarray] = {}
    resamples: dict[str, np.ndarray] = {}
    resampled: dict[str, np.ndarray] = {}
    if "simulation_r" in metrics:
        values["simulation_r"] = _weighted_pearson(one, a, p)[0]
        resamples["simulation_r"], resampled["simulation_r"] = _weighted_pearson(w, a, p), every
    if "f1" in metrics or "iou" in metrics:
        (f1,), (iou,) = _weighted_overlap(one, b, y)
        boot_f1, boot_iou = _weighted_overlap(w, b, y)
        values.update(f1=f1, iou=iou)
        resamples.update(f1=boot_f1, iou=boot_iou)
        resampled.update(f1=every, iou=every)
    if "auprc" in metrics:
        order = np.argsort(-a, axis=0)
        values["auprc"] = _weighted_auprc(one, order, y)[0]
        cols = every
        if max_auprc_resampled is not None and n_cols > max_auprc_resampled:
            cols = np.sort(np.random.default_rng(seed).choice(n_cols, max_auprc_resampled, replace=False))
        resamples["auprc"], resampled["auprc"] = _weighted_auprc(w, order[:, cols], y[:, cols]), cols
    keep = [m for m in metrics if m in values]
    return MetricScores({m: values[m] for m in keep}, {m: resamples[m] for m in keep}, {m: resampled[m] for m in keep})
