"""Linear Explanations (Oikarinen & Weng, "Linear Explanations for Individual Neurons", ICML 2024).

A unit is explained as a sparse non-negative combination of concepts, shown "0.6 dog + 0.3
grass": its activation on an image is predicted as the same combination of the concepts'
activations on it. Two sources of concept activations, as in the paper:

- ``source="multimodal"`` (their LE(SigLIP)): the multimodal backend's image-concept
  similarity for every concept of the concept set;
- ``source="label"`` (their LE(label)): the probe set's image labels, one-hot (a concept is
  present on an image labelled with it); needs a labelled probe set.

Fitting, per unit, on the images of ``ctx.run`` only (label a fit run to hold images out):
concept columns and the activations are standardised; the ``width`` concepts most positively
correlated with the unit are the candidates (the reference ranks them with an elastic net);
then forward selection adds, one at a time, the candidate most correlated with the residual
and refits non-negative least squares on the chosen ones (``scipy.optimize.nnls``), while the
fit's correlation rises by at least ``tolerance`` (reference: 0.02) and at most ``max_terms``
(reference: 10). The reference picks among ``width`` candidates by a correlation on a
validation split with an unconstrained fit per candidate (Adam); here the non-negativity is
the paper's, and every step works on the candidates' Gram matrix (no image-sized work after
the first product), which is what lets thousands of units be explained in seconds. The
images are read in row blocks (:func:`explain_unit_blocks`): per-column sums, then the
correlations and Gram matrices, so no (images x units) or (images x concepts) matrix is held.

Weights are returned in the units of the raw concept activations, scaled to sum to 1, so the
label "0.6 dog + 0.3 grass" is read by :func:`neuroviz.trust.scoring.label_terms` and scored
like any other label (the same weighted sum of image-text similarities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .. import column_scan
from ..store import LabelRow
from .base import DescriptionMethod, MethodContext, MethodError, register_method

SOURCES = ("multimodal", "label")
_FULL_GRAM_CONCEPTS = 4096  # up to this many concepts, one Gram matrix serves every unit


@dataclass
class LinearExplanationConfig:
    """Hyperparameters of Linear Explanations (reference defaults where it has them)."""

    source: str = "multimodal"  # "multimodal" (LE(SigLIP)-style) or "label" (LE(label))
    max_terms: int = 10  # reference max_length
    tolerance: float = 0.02  # minimum rise of the fit's correlation to add a concept
    width: int = 64  # candidate concepts per unit (those most correlated with it)
    decimals: int = 2  # weights shown with this many decimals
    min_weight: float = 0.005  # terms whose weight rounds below this are dropped from the label

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise MethodError(f"Unknown source '{self.source}'. Choose one of {', '.join(SOURCES)}.")
        if self.max_terms < 1 or self.width < 1:
            raise MethodError("max_terms and width must be at least 1.")


@dataclass
class LinearExplanation:
    """One unit's explanation: concepts (rows of the concept matrix), raw weights, fit correlation."""

    concepts: list[int]
    weights: list[float]
    fit_r: float


def _select(gram: np.ndarray, corr: np.ndarray, max_terms: int, tolerance: float) -> tuple[list[int], np.ndarray, float]:
    """Non-negative forward selection in Gram space: ``gram`` (w x w) correlations among candidates,
    ``corr`` (w,) their correlations with the unit. Returns chosen rows, their weights, fit r."""
    from scipy.optimize import nnls

    chosen: list[int] = []
    weights = np.zeros(0)
    fit_r = 0.0
    while len(chosen) < max_terms:
        gradient = corr - (gram[:, chosen] @ weights if chosen else 0.0)
        gradient[chosen] = -np.inf
        j = int(np.argmax(gradient))
        if gradient[j] <= 1e-9:
            break
        trial = chosen + [j]
        g = gram[np.ix_(trial, trial)] + 1e-6 * np.eye(len(trial))
        chol = np.linalg.cholesky(g)
        w, _ = nnls(chol.T, np.linalg.solve(chol, corr[trial]))
        variance = float(w @ g @ w)  # of the fit, in units of the (standardised) unit's variance
        r = float(w @ corr[trial]) / np.sqrt(variance) if variance > 1e-12 else 0.0  # corr(fit, unit)
        if chosen and r - fit_r < tolerance:
            break
        chosen, weights, fit_r = trial, w, r
    keep = weights > 0
    return [c for c, k in zip(chosen, keep) if k], weights[keep], fit_r


RowBlocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def explain_units(acts: np.ndarray, concept_acts: np.ndarray, config: LinearExplanationConfig | None = None) -> list[LinearExplanation]:
    """A Linear Explanation of every column of ``acts`` (images x units) from ``concept_acts`` (images x concepts)."""
    return explain_unit_blocks(lambda: iter([(np.asarray(acts, np.float32), np.asarray(concept_acts, np.float32))]), config)


def explain_unit_blocks(blocks: RowBlocks, config: LinearExplanationConfig | None = None) -> list[LinearExplanation]:
    """:func:`explain_units` from row blocks of the same images: ``blocks()`` yields (activations
    (b x units), concept activations (b x concepts)) pairs, and is read up to three times.

    Only per-unit and per-concept sums cross the blocks (means and deviations, then the
    unit-concept correlations and the candidates' Gram matrices), so neither matrix is ever
    whole in memory, whatever the number of images.
    """
    config = config or LinearExplanationConfig()
    n = 0
    shifts: list[np.ndarray] = []
    sums: list[np.ndarray] = []
    for a, c in blocks():  # pass 1: each column's mean and deviation (sums around the first row: no cancellation)
        if not shifts:
            shifts = [a[0].astype(np.float64), c[0].astype(np.float64)] if len(a) else []
        da, dc = a - shifts[0], c - shifts[1]
        block_sums = [da.sum(0), (da * da).sum(0), dc.sum(0), (dc * dc).sum(0)]
        sums = block_sums if not sums else [x + y for x, y in zip(sums, block_sums)]
        n += len(a)
    a_mean, a_std = _moments(shifts[0], sums[0], sums[1], n)
    c_mean, c_std = _moments(shifts[1], sums[2], sums[3], n)
    n_units, n_concepts = len(a_mean), len(c_mean)
    corr = np.zeros((n_units, n_concepts), dtype=np.float32)
    full_gram = np.zeros((n_concepts, n_concepts), dtype=np.float32) if n_concepts <= _FULL_GRAM_CONCEPTS else None
    for a, c in blocks():  # pass 2: correlations (and the Gram matrix of every concept, when it is small)
        z = (c - c_mean) / c_std
        corr += ((a - a_mean) / a_std).T @ z
        if full_gram is not None:
            full_gram += z.T @ z
    corr /= n
    width = min(config.width, n_concepts)
    tops = []
    for u in range(n_units):
        top = np.argpartition(-corr[u], width - 1)[:width] if width < n_concepts else np.arange(n_concepts)
        tops.append(top[np.argsort(-corr[u, top])])
    if full_gram is not None:
        grams = [full_gram[np.ix_(top, top)] / n for top in tops]
    else:
        grams = _candidate_grams(blocks, tops, c_mean, c_std, n)
    out = []
    for u, (top, gram) in enumerate(zip(tops, grams)):
        rows, w, fit_r = _select(np.asarray(gram, np.float64), np.asarray(corr[u, top], np.float64), config.max_terms, config.tolerance)
        raw = w / c_std[top[rows]] if len(rows) else w
        out.append(LinearExplanation([int(top[r]) for r in rows], raw.tolist(), fit_r))
    return out


def _moments(shift: np.ndarray, total: np.ndarray, squares: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, deviation) as float32 from sums of differences to ``shift``; a constant column's
    deviation is 1 (it standardises to 0)."""
    offset = total / n
    std = np.sqrt(np.maximum(squares / n - offset * offset, 0.0))
    return (shift + offset).astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)


def _candidate_grams(blocks: RowBlocks, tops: list[np.ndarray], mean: np.ndarray, std: np.ndarray, n: int) -> list[np.ndarray]:
    """Pass 3, for concept sets too large for one Gram matrix: each unit's candidates' Gram matrix."""
    union = np.unique(np.concatenate(tops))
    position = np.full(len(mean), -1, dtype=np.int64)
    position[union] = np.arange(len(union))
    grams = [np.zeros((len(top), len(top)), dtype=np.float64) for top in tops]
    for _, c in blocks():
        z = (c[:, union] - mean[union]) / std[union]
        for top, gram in zip(tops, grams):
            zt = z[:, position[top]]
            gram += zt.T @ zt
    return [gram / n for gram in grams]


def format_explanation(names: Sequence[str], explanation: LinearExplanation, decimals: int = 2,
                       min_weight: float = 0.005) -> tuple[str, list[tuple[str, float]]]:
    """'0.67 dog + 0.33 grass' (weights scaled to sum 1, largest first; one term: just its name) and the terms."""
    total = float(sum(explanation.weights))
    if total <= 0:
        return "", []
    terms = sorted(((names[c], w / total) for c, w in zip(explanation.concepts, explanation.weights)), key=lambda t: -t[1])
    terms = [(name, round(w, decimals)) for name, w in terms if round(w, decimals) >= min_weight]
    if len(terms) == 1:  # "1.00 car" says nothing more than "car" (and "3 dogs" must stay a plain label)
        return terms[0][0], terms
    return " + ".join(f"{w:.{decimals}f} {name}" for name, w in terms), terms


@register_method
class LinearExplanations(DescriptionMethod):
    """A sparse non-negative combination of concepts fitted to each unit's activations."""

    name = "linear_explanations"
    title = "Linear Explanations"
    reference = "Oikarinen & Weng, Linear Explanations for Individual Neurons, ICML 2024"
    needs = ("multimodal", "concepts")
    config_class = LinearExplanationConfig
    per_neuron = False
    code_version = "1"

    def describe(self, ctx: MethodContext, config: LinearExplanationConfig, neurons: Sequence[int]) -> list[LabelRow]:
        """Rank 0: the combination; ranks 1..: its terms alone, by weight."""
        names, blocks = self.row_blocks(ctx, config, neurons)
        rows: list[LabelRow] = []
        for neuron, explanation in zip(neurons, explain_unit_blocks(blocks, config)):
            label, terms = format_explanation(names, explanation, config.decimals, config.min_weight)
            if not label:
                rows.append(LabelRow(int(neuron), 0, "(no concept fits)", 0.0, None, {"terms": [], "source": config.source}))
                continue
            extra = {"terms": [[t, w] for t, w in terms], "fit_r": round(explanation.fit_r, 5), "source": config.source}
            rows.append(LabelRow(int(neuron), 0, label, float(explanation.fit_r), None, extra))
            rows += [LabelRow(int(neuron), rank, t, float(w), None, {"weight": w}) for rank, (t, w) in enumerate(terms, start=1)]
        return rows

    @staticmethod
    def row_blocks(ctx: MethodContext, config: LinearExplanationConfig, neurons: Sequence[int]) -> tuple[list[str], RowBlocks]:
        """(concept names, row blocks of (activations of ``neurons``, concept activations)) for the run's images.

        Concept activations come from the backend (image-text similarities of a block of the
        memory-mapped image embeddings) or the image labels (one-hot rows), a block at a time.
        """
        acts = ctx.store.activations(ctx.run.run_key)
        columns = np.asarray(neurons, dtype=np.int64)
        if config.source == "label":
            labels = [im["label"] or "" for im in ctx.store.probe_images(ctx.run.probe_set_id)]
            names = sorted({label for label in labels if label})
            if len(names) < 2:
                raise MethodError("Linear Explanations with source=label needs a probe set whose images carry labels "
                                  "(an image-folder with one folder per class); this one has none. Use source=multimodal.")
            column = {name: j for j, name in enumerate(names)}
            codes = np.array([column.get(label, -1) for label in labels], dtype=np.int64)

            def concept_rows(start: int, stop: int) -> np.ndarray:
                onehot = np.zeros((stop - start, len(names)), dtype=np.float32)
                labelled = np.flatnonzero(codes[start:stop] >= 0)
                onehot[labelled, codes[start:stop][labelled]] = 1.0
                return onehot
            width = len(names)
        else:
            from .. import embeddings

            image_emb = embeddings.image_embeddings(ctx.multimodal, ctx.store, ctx.run.probe_set_id, ctx.progress)
            text_emb = np.asarray(embeddings.text_embeddings(ctx.multimodal, ctx.store, ctx.concepts), np.float32)
            names = list(ctx.concepts.concepts)

            def concept_rows(start: int, stop: int) -> np.ndarray:
                emb = column_scan.take_rows(image_emb, np.arange(start, stop))
                return np.asarray(ctx.multimodal.similarity(emb, text_emb), dtype=np.float32)
            width = len(names) + text_emb.shape[1]
        step = max(1, column_scan.ROW_BLOCK_BYTES // (4 * (acts.shape[1] + width)))

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start in range(0, acts.shape[0], step):
                stop = min(acts.shape[0], start + step)
                yield column_scan.take_rows(acts, np.arange(start, stop))[:, columns], concept_rows(start, stop)
        return names, blocks
