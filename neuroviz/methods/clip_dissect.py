"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023): label every neuron of a layer with the concept
whose image-text similarity profile over the probe images best matches its activations.

Inputs are an activation matrix ``A`` (images x neurons) and the image-concept similarity
matrix ``P = image_embeddings @ text_embeddings.T`` (images x concepts) of a multimodal
backend. Neither is ever held whole, so a probe set of any size labels in bounded memory:
``A`` (usually the run's memory-mapped acts.npy) is read in row blocks that keep only each
neuron's top images (:mod:`neuroviz.column_scan`), or a few neurons' columns at a time for
the value-based functions; :class:`ImageConceptSimilarity` serves ``P`` in row blocks or
chosen rows, and :class:`ConceptProbabilities` holds p(c|x) only for the images the paper's
PMI uses (exemplars and null draws), within a byte budget. Neurons are scored in chunks,
vectorised, and no neurons x images x concepts tensor is ever built.

Similarity functions (``ClipDissectConfig.similarity``), following the paper (Section 3,
Appendix) and its public code (similarity.py of Trustworthy-ML-Lab/CLIP-dissect):

- ``soft_wpmi`` (default; top_k=100, alpha=10, lambda=1, memberships 0.998 -> 0.97) and
  ``wpmi`` (top_k=28, alpha=2, lambda=0.6, hard membership). With
  ``p(c|x) = softmax_c(alpha * P[x, :])`` and the neuron's top-k images x_i, each a member
  of the neuron's exemplar set with probability w_i::

      log p(c | E_n) = sum_i log(1 - w_i + w_i p(c|x_i) + 1e-7)   (every member shows c)
      log p(c)       = log mean_n p(c | E_n)   over all neurons n of the layer
      score_n(c)     = log p(c | E_n) - lambda * log p(c)

  The prior is the layer's: a concept that every neuron's exemplars show (a "hub" of the
  embedding space) is penalised. So one neuron's label depends on the whole layer; the
  method always computes the prior over every neuron of the run (and caches it), so a
  subset of neurons gets exactly the labels a full-layer run gives it.
  ``formulation="mean_lift"`` is the simplification in this project's METHODS.md instead:
  ``log(sum_i w_i p(c|x_i) / sum_i w_i) - lambda log(mean_x p(c|x) over all images)``.
  On the demo set (MobileNetV2's 1,000 output neurons, ImageNet class names, offline ConSE)
  it names the right class for 2% of the neurons against 22% for the paper's formulation,
  because its image-averaged prior does not penalise hub concepts; it is kept for comparison.
- ``rank_reorder``: over the top 5% images (at least 10), reassign the neuron's own top
  activations in the order of the concept's similarities; score = -(mean |a - a_reordered|^3
  / baseline) / mean(P)^0.5, baseline = the same error for a random order (we use its exact
  expectation, the reference estimates it from 5 random permutations).
- ``cos``: cosine between the activation vector and P[:, c] over all images (no centring).
- ``cos3``: centre both over images, cube element-wise, then cosine (norms clipped at 1e-3).

Calibration. Raw scores are not comparable across layers, concept sets or backends
(soft-WPMI can exceed 1). ``calibrated`` is a permutation-test percentile: the fraction of
scores obtained with the images shuffled (which image gets which activation) that fall
below the neuron's score. The null statistic is the *best* score over all concepts under
the shuffle, not the score of the chosen concept alone: the chosen concept won a maximum
over thousands, so against its own shuffled scores even a random neuron would look
significant. For soft-WPMI and WPMI the score depends on the activations only through which
images are the top-k, so under a shuffle every neuron's exemplars are a uniformly random
ordered k-subset and the null distribution is the same for every neuron of the run (the
layer prior held fixed): it is drawn once (``shared_null_draws`` random exemplar sets). For
the value-based functions (rank_reorder, cos, cos3) each neuron gets ``null_shuffles``
permutations of its own activations (the same permutations for every neuron, so results do
not depend on which neurons are labelled together). The z-score against the same null is
kept in ``extra["z"]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..column_scan import column_block, scan_columns, take_rows
from ..progress import Progress
from ..store import LabelRow
from .base import DescriptionMethod, MethodContext, MethodError, register_method

SIMILARITY_FUNCTIONS = ("soft_wpmi", "wpmi", "rank_reorder", "cos", "cos3")
RANK_BASED = ("soft_wpmi", "wpmi")  # depend on activations only through the top-k set
FORMULATIONS = ("paper", "mean_lift")

# (top_k, alpha, lambda) of each PMI variant: the paper's Section 3 / describe_neurons defaults.
PAPER_PMI_DEFAULTS = {"soft_wpmi": (100, 10.0, 1.0), "wpmi": (28, 2.0, 0.6)}

_LOG_FLOOR = 1e-12  # keeps log() finite for concepts with vanishing probability
_BLOCK_BYTES = 64 * 2**20  # one block of P rows
_ACCUMULATOR_BYTES = 256 * 2**20  # per-chunk (rows x concepts) accumulators
_GATHER_ROWS = 256  # exemplar sets per gather chunk: large enough to amortise, small enough for the cache
_PROBABILITY_BYTES = 512 * 2**20  # p(c|x) held at once: 6,700 images x 20,000 concepts whole, more in concept blocks
_COLUMN_BYTES = 256 * 2**20  # value-based functions: activation columns (images x neurons) held at once


@dataclass
class ClipDissectConfig:
    """Hyperparameters of CLIP-Dissect (Oikarinen & Weng, ICLR 2023) with the paper's defaults.

    ``top_k``, ``alpha`` and ``lam`` left as None take the defaults of the chosen PMI
    function (soft-WPMI: 100, 10, 1; WPMI: 28, 2, 0.6). ``max_top_fraction`` caps the
    exemplar count on small probe sets (k <= 10% of the images; never binding on ImageNet
    val or Broden, where top_k=100 is 0.2%): with k close to the number of images the
    exemplars are the probe set itself and mean nothing.
    """

    similarity: str = "soft_wpmi"
    formulation: str = "paper"  # soft_wpmi/wpmi: "paper" (reference code) or "mean_lift" (METHODS.md)
    top_k: int | None = None
    alpha: float | None = None
    lam: float | None = None
    p_start: float = 0.998  # soft-WPMI membership of the top image ...
    p_end: float = 0.97  # ... decaying linearly to the k-th
    min_prob: float = 1e-7  # added inside the logs, as in the reference
    max_top_fraction: float = 0.1
    rank_top_fraction: float = 0.05  # rank_reorder: share of images used (reference: 5%) ...
    rank_min_images: int = 10  # ... but at least this many (5% of a small probe set is 1 or 2 images)
    rank_power: float = 3.0  # rank_reorder: exponent of the reordering error
    rank_scale_power: float = 0.5  # rank_reorder: divide by mean similarity ** this
    min_norm: float = 1e-3  # cos/cos3: norms clipped below, as in the reference
    n_candidates: int = 5  # the best concept and the next 4
    calibrate: bool = True
    null_shuffles: int = 20  # value-based functions: permutations per neuron
    shared_null_draws: int = 200  # rank-based functions: random exemplar sets shared by all neurons
    seed: int = 0

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITY_FUNCTIONS:
            raise MethodError(f"Unknown similarity '{self.similarity}'. Choose one of {', '.join(SIMILARITY_FUNCTIONS)}.")
        if self.formulation not in FORMULATIONS:
            raise MethodError(f"Unknown formulation '{self.formulation}'. Choose one of {', '.join(FORMULATIONS)}.")
        k, alpha, lam = PAPER_PMI_DEFAULTS.get(self.similarity, PAPER_PMI_DEFAULTS["soft_wpmi"])
        if self.top_k is None:
            self.top_k = k
        if self.alpha is None:
            self.alpha = alpha
        if self.lam is None:
            self.lam = lam
        if self.top_k < 1 or self.n_candidates < 1:
            raise MethodError("top_k and n_candidates must be at least 1.")

    @property
    def resolved_top_k(self) -> int:
        """top_k, never None (__post_init__ fills the PMI function's default)."""
        assert self.top_k is not None, "__post_init__ fills top_k"
        return self.top_k

    @property
    def resolved_alpha(self) -> float:
        """alpha, never None (__post_init__ fills the PMI function's default)."""
        assert self.alpha is not None, "__post_init__ fills alpha"
        return self.alpha

    @property
    def resolved_lam(self) -> float:
        """lam, never None (__post_init__ fills the PMI function's default)."""
        assert self.lam is not None, "__post_init__ fills lam"
        return self.lam

    @property
    def uses_layer_prior(self) -> bool:
        """True when a neuron's scores depend on the whole layer (the paper's PMI prior)."""
        return self.similarity in RANK_BASED and self.formulation == "paper"


# -- the similarity matrix P, served in pieces -------------------------------------------
class ImageConceptSimilarity:
    """P = image-concept similarity (images x concepts), computed block by block on demand.

    Built from embeddings (the normal case: the full matrix need not fit in memory) or from a
    ready matrix (tests, small problems).
    """

    def __init__(self, image_emb: np.ndarray | None = None, text_emb: np.ndarray | None = None,
                 similarity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 matrix: np.ndarray | None = None):
        if matrix is None and (image_emb is None or text_emb is None):
            raise ValueError("Give image and text embeddings, or a similarity matrix.")
        # asanyarray keeps a float32 memmap mapped (rows are then read on demand, see take_rows)
        self.matrix = None if matrix is None else np.asanyarray(matrix, dtype=np.float32)
        self.image_emb = None if image_emb is None else np.asanyarray(image_emb, dtype=np.float32)
        self.text_emb = None if text_emb is None else np.asarray(text_emb, dtype=np.float32)
        self._similarity = similarity or (lambda a, b: a @ b.T)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> ImageConceptSimilarity:
        return cls(matrix=matrix)

    def _embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The image and text embeddings (always given when there is no matrix)."""
        assert self.image_emb is not None and self.text_emb is not None, "__init__ requires embeddings without a matrix"
        return self.image_emb, self.text_emb

    @property
    def n_images(self) -> int:
        return int(self.matrix.shape[0] if self.matrix is not None else self._embeddings()[0].shape[0])

    @property
    def n_concepts(self) -> int:
        return int(self.matrix.shape[1] if self.matrix is not None else self._embeddings()[1].shape[0])

    def rows(self, index: np.ndarray, concepts: slice | None = None) -> np.ndarray:
        """P[index] (or P[index, concepts]) as float32: rows of chosen images."""
        if self.matrix is not None:
            rows = take_rows(self.matrix, index)
            return rows if concepts is None else np.ascontiguousarray(rows[:, concepts])
        image_emb, text_emb = self._embeddings()
        texts = text_emb if concepts is None else text_emb[concepts]
        return np.asarray(self._similarity(take_rows(image_emb, index), texts), dtype=np.float32)

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, P[start:stop]) over all images, each block about 64 MB."""
        block_rows = block_rows or max(16, _BLOCK_BYTES // (4 * max(1, self.n_concepts)))
        for start in range(0, self.n_images, block_rows):
            stop = min(self.n_images, start + block_rows)
            yield start, stop, self.rows(np.arange(start, stop))


# -- results -------------------------------------------------------------------------------
@dataclass
class NeuronConcepts:
    """The best concepts of each neuron: indices into the concept list, scores, calibration."""

    concept_index: np.ndarray  # (neurons, n_candidates) int, best first
    scores: np.ndarray  # (neurons, n_candidates)
    calibrated: np.ndarray | None = None  # (neurons, n_candidates) permutation percentile in [0, 1]
    z: np.ndarray | None = None  # (neurons, n_candidates) z-score against the same null
    constant: np.ndarray | None = None  # (neurons,) bool: activation never varies, label meaningless
    info: dict = field(default_factory=dict)  # exemplar count, null kind and size
    layer_prior: np.ndarray | None = None  # (concepts,) log p(c) of the layer (paper PMI), for caching


# -- building blocks -----------------------------------------------------------------------
def effective_top_k(config: ClipDissectConfig, n_images: int) -> int:
    """top_k capped by max_top_fraction of the probe set (see ClipDissectConfig)."""
    cap = max(1, int(math.ceil(config.max_top_fraction * n_images)))
    return int(max(1, min(config.resolved_top_k, cap, n_images)))


def membership_weights(config: ClipDissectConfig, k: int) -> np.ndarray:
    """Soft-WPMI: membership decaying linearly from p_start to p_end over the k exemplars; WPMI: ones."""
    if config.similarity == "wpmi":
        return np.ones(k, dtype=np.float64)
    return config.p_start - np.arange(k) / max(k, 1) * (config.p_start - config.p_end)


def concept_probabilities(p_block: np.ndarray, alpha: float) -> np.ndarray:
    """p(c|x) = softmax over concepts of alpha * P[x, :] (rows of one block)."""
    logits = alpha * p_block
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _pmi_scores(exemplars: np.ndarray, weights: np.ndarray, sim: ImageConceptSimilarity,
                config: ClipDissectConfig) -> np.ndarray:
    """(sets, concepts) PMI scores of weighted exemplar sets (rows of image indices), one pass over P."""
    from scipy import sparse

    n_sets, k = exemplars.shape
    w = np.tile(weights / weights.sum(), n_sets).astype(np.float32)
    membership = sparse.csr_matrix((w, exemplars.reshape(-1), np.arange(0, n_sets * k + 1, k)),
                                   shape=(n_sets, sim.n_images)).tocsc()
    numerator = np.zeros((n_sets, sim.n_concepts), dtype=np.float32)
    prior = np.zeros(sim.n_concepts, dtype=np.float64)
    for start, stop, p_block in sim.blocks():
        probs = concept_probabilities(p_block, float(config.resolved_alpha))
        prior += probs.sum(axis=0, dtype=np.float64)
        cols = membership[:, start:stop]
        if cols.nnz:
            numerator += cols @ probs
    log_prior = np.log(np.maximum(prior / sim.n_images, _LOG_FLOOR)).astype(np.float32)
    np.maximum(numerator, _LOG_FLOOR, out=numerator)
    np.log(numerator, out=numerator)
    numerator -= float(config.resolved_lam) * log_prior
    return numerator


def _cos_scores(columns: np.ndarray, sim: ImageConceptSimilarity, config: ClipDissectConfig,
                column_mean: np.ndarray | None, shuffles: Sequence[np.ndarray] = ()) -> np.ndarray:
    """(1 + shuffles, columns, concepts) cosine (cos) or centred-cubed cosine (cos3) of each
    activation column (images x columns) and of each shuffle ``column[perm]``, one pass over P.

    A shuffle only reorders a column, so its mean and norm are the column's: the shuffled
    copies are gathered a P block at a time, never stored.
    """
    cubed = config.similarity == "cos3"
    a = np.array(columns, dtype=np.float32)
    if cubed:
        a -= a.mean(axis=0, keepdims=True)
        a **= 3
    a /= np.maximum(np.linalg.norm(a, axis=0, keepdims=True), config.min_norm)
    orders: list[np.ndarray | None] = [None, *shuffles]
    dots = np.zeros((len(orders), a.shape[1], sim.n_concepts), dtype=np.float32)
    sq_norm = np.zeros(sim.n_concepts, dtype=np.float64)
    for start, stop, p_block in sim.blocks():
        if cubed:
            p_block = (p_block - column_mean) ** 3
        for s, perm in enumerate(orders):
            rows = a[start:stop] if perm is None else a[perm[start:stop]]
            dots[s] += rows.T @ p_block
        sq_norm += np.einsum("ij,ij->j", p_block, p_block, dtype=np.float64)
    if not cubed:
        return dots / np.maximum(np.sqrt(sq_norm), 1e-12).astype(np.float32)
    return dots / np.maximum(np.sqrt(sq_norm), config.min_norm).astype(np.float32)


def _column_mean(sim: ImageConceptSimilarity) -> np.ndarray:
    total = np.zeros(sim.n_concepts, dtype=np.float64)
    for _, _, p_block in sim.blocks():
        total += p_block.sum(axis=0, dtype=np.float64)
    return (total / sim.n_images).astype(np.float32)


def _rank_reorder_scores(values: np.ndarray, image_sets: np.ndarray, sim: ImageConceptSimilarity,
                         config: ClipDissectConfig) -> np.ndarray:
    """(sets, concepts) rank-reorder scores of one neuron.

    ``values``: the neuron's top activations, highest first; ``image_sets``: rows of image
    indices that carry those values (the real top images, then shuffled ones).
    """
    import torch

    p = float(config.rank_power)
    target = torch.from_numpy(values.astype(np.float32))  # descending
    ascending = torch.flip(target, dims=[0])
    # Expected reordering error of a uniformly random order: mean over all pairs.
    baseline = torch.mean(torch.abs(ascending[:, None] - ascending[None, :]) ** p).clamp_min(1e-12)
    out = np.empty((len(image_sets), sim.n_concepts), dtype=np.float32)
    for s, images in enumerate(image_sets):
        rows = torch.from_numpy(sim.rows(images))  # (n_top, concepts)
        mean_sim = rows.mean(dim=0).clamp_min(1e-6)  # the power below needs a positive base
        ranks = torch.argsort(torch.argsort(rows, dim=0), dim=0)  # ascending rank of each image per concept
        reordered = ascending[ranks]  # the most similar image gets the highest activation
        error = torch.mean(torch.abs(target[:, None] - reordered) ** p, dim=0) / baseline
        out[s] = (-error / mean_sim ** config.rank_scale_power).numpy()
    return out


def _rank_top_count(config: ClipDissectConfig, n_images: int) -> int:
    return int(min(n_images, max(2, config.rank_min_images, int(n_images * config.rank_top_fraction))))


def _top_candidates(scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m best concepts of each row, best first."""
    import torch

    best = torch.topk(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)), min(m, scores.shape[1]), dim=1, sorted=True)
    return best.indices.numpy().astype(np.int64), best.values.numpy()


def permutation_percentile(scores: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percentile (ties count half) and z-score of ``scores`` (n, m) against ``null`` ((n, S) or (S,))."""
    null = np.atleast_2d(null)
    if null.shape[0] == 1 and scores.shape[0] != 1:
        null = np.broadcast_to(null, (scores.shape[0], null.shape[1]))
    below = (null[:, None, :] < scores[:, :, None]).sum(axis=2)
    ties = (null[:, None, :] == scores[:, :, None]).sum(axis=2)
    percentile = (below + 0.5 * ties) / null.shape[1]
    mean = null.mean(axis=1, keepdims=True)
    std = null.std(axis=1, ddof=1, keepdims=True) if null.shape[1] > 1 else np.zeros_like(mean)
    z = (scores - mean) / np.where(std > 0, std, np.nan)
    return percentile, z


# -- the paper's PMI: products over exemplars, prior over the layer ----------------------------
class ConceptProbabilities:
    """p(c|x) of the probe images the paper's PMI uses, within a byte budget.

    The PMI gathers p(c|x) for every exemplar of every neuron and of every random exemplar set
    of the calibration null: rows of at most (neurons + draws) x k images, whatever the size
    of the probe set. When the rows one call needs fit ``budget_bytes`` they are computed and
    kept (rows already held, e.g. by an earlier layer inside :func:`reuse_probabilities`, are
    not computed again). When they do not fit, the concepts are split into blocks whose rows
    fit, after one pass that computes each image's softmax normaliser over all concepts (kept
    for later calls, 8 bytes an image): every entry of P is computed at most twice per call, and
    memory stays within the budget at any scale.
    """

    def __init__(self, sim: ImageConceptSimilarity, alpha: float, budget_bytes: int | None = None):
        self.sim, self.alpha = sim, float(alpha)
        self.budget = _PROBABILITY_BYTES if budget_bytes is None else int(budget_bytes)
        self.capacity = int(max(1, min(sim.n_images, self.budget // (4 * max(1, sim.n_concepts)))))  # rows held whole
        self._position = np.full(sim.n_images, -1, dtype=np.int64)  # image -> row held, or -1
        self._rows: Any = None  # torch (capacity, concepts): pages are only resident once written
        self._count = 0
        self._top = np.full(sim.n_images, np.nan, dtype=np.float32)  # softmax normalisers, computed once per image
        self._sum = np.full(sim.n_images, np.nan, dtype=np.float32)

    def _release(self) -> None:
        self._position[:] = -1
        self._rows, self._count = None, 0

    def _hold(self, images: np.ndarray) -> bool:
        """Hold the whole rows of ``images`` (unique); False when they cannot fit the budget together."""
        import torch

        if len(images) > self.capacity:
            return False
        missing = images[self._position[images] < 0]
        if self._count + len(missing) > self.capacity:
            self._release()
            missing = images
        if self._rows is None:
            self._rows = torch.empty((self.capacity, self.sim.n_concepts), dtype=torch.float32)
        block = max(16, _BLOCK_BYTES // (4 * max(1, self.sim.n_concepts)))
        for b in range(0, len(missing), block):
            chosen = missing[b: b + block]
            self._rows[self._count: self._count + len(chosen)] = torch.from_numpy(concept_probabilities(self.sim.rows(chosen), self.alpha))
            self._position[chosen] = np.arange(self._count, self._count + len(chosen))
            self._count += len(chosen)
        return True

    def _normalisers(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image's largest logit and softmax sum over every concept, as concept_probabilities computes them."""
        missing = images[np.isnan(self._sum[images])]
        block = max(16, _BLOCK_BYTES // (4 * max(1, self.sim.n_concepts)))
        for b in range(0, len(missing), block):
            chosen = missing[b: b + block]
            logits = self.alpha * self.sim.rows(chosen)
            top = logits.max(axis=1)
            logits -= top[:, None]
            np.exp(logits, out=logits)
            self._top[chosen], self._sum[chosen] = top, logits.sum(axis=1)
        return self._top[images], self._sum[images]

    def log_likelihood(self, exemplars: np.ndarray, weights: np.ndarray, min_prob: float = 1e-7,
                       progress: Progress | None = None, total: int | None = None, done: int = 0) -> np.ndarray:
        """:func:`exemplar_log_likelihood` of each row of ``exemplars`` (image indices) within the budget."""
        import torch

        images = np.unique(exemplars)
        if self._hold(images):
            return exemplar_log_likelihood(self._position[exemplars], weights, self._rows, min_prob, progress, total, done)
        self._release()  # the concept blocks below use the whole budget
        n_sets, n_concepts = len(exemplars), self.sim.n_concepts
        top, norm = self._normalisers(images)
        local = np.searchsorted(images, exemplars)
        width = max(1, self.budget // (4 * len(images)))
        row_block = max(16, _BLOCK_BYTES // (4 * width))
        out = np.empty((n_sets, n_concepts), dtype=np.float32)
        for c0 in range(0, n_concepts, width):
            concepts = slice(c0, min(n_concepts, c0 + width))
            probs = np.empty((len(images), concepts.stop - c0), dtype=np.float32)
            for b in range(0, len(images), row_block):
                logits = self.alpha * self.sim.rows(images[b: b + row_block], concepts)
                logits -= top[b: b + row_block, None]
                np.exp(logits, out=logits)
                logits /= norm[b: b + row_block, None]
                probs[b: b + row_block] = logits
            out[:, concepts] = exemplar_log_likelihood(local, weights, torch.from_numpy(probs), min_prob)
            del probs
            if progress:
                progress(done + n_sets * concepts.stop // n_concepts, total or n_sets,
                         f"exemplar likelihoods: concepts {concepts.stop}/{n_concepts}")
        return out


def exemplar_log_likelihood(exemplars: np.ndarray, weights: np.ndarray, probabilities, min_prob: float = 1e-7,
                            progress: Progress | None = None, total: int | None = None, done: int = 0) -> np.ndarray:
    """log p(c|E) = sum_i log(1 - w_i + w_i p(c|x_i) + min_prob) for each row of exemplar indices.

    Written as sum_i log b_i + log prod_i (1 + a_i p(c|x_i)) with b_i = 1 - w_i + min_prob and
    a_i = w_i / b_i: each factor is in [1, 1 + a_i], so groups of factors multiply without
    overflow and one log serves a whole group (the logs dominated the cost otherwise).
    """
    import torch

    weights = np.asarray(weights, dtype=np.float64)
    base = 1.0 - weights + min_prob
    gain = weights / base
    group = max(1, int(math.log(float(np.finfo(np.float32).max) / 4) // math.log1p(float(gain.max()))))
    n_sets, k = exemplars.shape
    n_concepts = probabilities.shape[1]
    out = np.empty((n_sets, n_concepts), dtype=np.float32)
    rows = max(1, min(_GATHER_ROWS, _ACCUMULATOR_BYTES // (12 * max(1, n_concepts))))
    for s0 in range(0, n_sets, rows):
        index = torch.from_numpy(np.ascontiguousarray(exemplars[s0: s0 + rows], dtype=np.int64))
        s = index.shape[0]
        acc = torch.zeros((s, n_concepts))
        prod = torch.empty((s, n_concepts))
        gathered = torch.empty((s, n_concepts), dtype=probabilities.dtype)
        for g0 in range(0, k, group):
            prod.fill_(1.0)
            for i in range(g0, min(k, g0 + group)):
                torch.index_select(probabilities, 0, index[:, i], out=gathered)
                prod.addcmul_(prod, gathered, value=float(gain[i]))
            acc.add_(prod.log_())
        out[s0: s0 + s] = (acc + float(np.log(base).sum())).numpy()
        if progress:
            progress(done + s0 + s, total or n_sets, f"exemplar likelihoods {done + s0 + s}/{total or n_sets}")
    return out


def layer_log_prior(log_likelihood: np.ndarray) -> np.ndarray:
    """log p(c) = log mean over the layer's neurons of p(c|E_n), by log-sum-exp in row chunks
    (no underflow, and no neurons x concepts temporaries)."""
    top = log_likelihood.max(axis=0)
    total = np.zeros(log_likelihood.shape[1], dtype=np.float64)
    for start in range(0, log_likelihood.shape[0], _GATHER_ROWS):
        total += np.exp(log_likelihood[start: start + _GATHER_ROWS] - top).sum(axis=0, dtype=np.float64)
    return (top + np.log(total) - math.log(log_likelihood.shape[0])).astype(np.float32)


# -- the whole computation -------------------------------------------------------------------
def concept_scores(acts: np.ndarray, sim: ImageConceptSimilarity, config: ClipDissectConfig | None = None) -> np.ndarray:
    """The full (neurons x concepts) score matrix of all columns of ``acts``: for small problems and tests."""
    config = config or ClipDissectConfig()
    if config.similarity in RANK_BASED:
        k = effective_top_k(config, acts.shape[0])
        weights = membership_weights(config, k)
        top = scan_columns(acts, k).indices
        if config.formulation == "mean_lift":
            return _pmi_scores(top, weights, sim, config)
        log_lik = ConceptProbabilities(sim, float(config.resolved_alpha)).log_likelihood(top, weights, config.min_prob)
        return log_lik - float(config.resolved_lam) * layer_log_prior(log_lik)
    if config.similarity in ("cos", "cos3"):
        mean = _column_mean(sim) if config.similarity == "cos3" else None
        return _cos_scores(np.asarray(acts, dtype=np.float32), sim, config, mean)[0]
    scan = scan_columns(acts, _rank_top_count(config, acts.shape[0]))
    return np.concatenate([
        _rank_reorder_scores(scan.values[j], scan.indices[j:j + 1], sim, config) for j in range(acts.shape[1])
    ])


def label_neurons(acts: np.ndarray, sim: ImageConceptSimilarity, config: ClipDissectConfig | None = None,
                  progress: Progress | None = None, neurons: Sequence[int] | None = None,
                  layer_prior: np.ndarray | None = None, probabilities: ConceptProbabilities | None = None,
                  layer_size: int | None = None) -> NeuronConcepts:
    """Best ``n_candidates`` concepts of the ``neurons`` columns of ``acts`` (images x all neurons of a layer).

    ``acts`` may be memory-mapped (a run's acts.npy): it is read in row blocks and never
    loaded whole (see the module docstring). It must hold the whole layer when the paper's
    PMI needs the layer prior and ``layer_prior`` is not given (it is returned in the
    result, for caching); with a cached ``layer_prior``, ``acts`` may hold only some columns
    and ``layer_size`` says how many neurons the prior averaged over (the calibration null
    needs it). ``probabilities`` may pass a :class:`ConceptProbabilities` shared by layers.
    """
    config = config or ClipDissectConfig()
    n_images, n_layer = acts.shape
    if n_images != sim.n_images:
        raise ValueError(f"Activations cover {n_images} images but the similarity matrix {sim.n_images}: "
                         "they must come from the same probe set, in the same order.")
    if n_images < 2:
        raise ValueError("CLIP-Dissect needs at least 2 probe images.")
    if layer_prior is not None and layer_size is None:
        raise ValueError("Give layer_size (the number of neurons the cached layer_prior was computed over).")
    n_prior = n_layer if layer_prior is None or layer_size is None else int(layer_size)
    wanted = np.arange(n_layer) if neurons is None else np.asarray(list(neurons), dtype=np.int64)
    all_columns = len(wanted) == n_layer and bool((wanted == np.arange(n_layer)).all())
    columns = None if all_columns else wanted  # scan_columns reads every column without a copy
    n_neurons = len(wanted)
    m = min(config.n_candidates, sim.n_concepts)
    rng = np.random.default_rng(config.seed)
    constant = np.zeros(n_neurons, dtype=bool)
    index = np.zeros((n_neurons, m), dtype=np.int64)
    scores = np.zeros((n_neurons, m), dtype=np.float32)
    null_per_neuron = np.zeros((n_neurons, config.null_shuffles), dtype=np.float32)
    shared_null = None
    info: dict = {"similarity": config.similarity}
    rank_based = config.similarity in RANK_BASED
    calibrate = config.calibrate and ((config.shared_null_draws > 1) if rank_based else (config.null_shuffles > 1))

    if rank_based:
        k = effective_top_k(config, n_images)
        weights = membership_weights(config, k)
        info.update(exemplars=k, formulation=config.formulation)
        draws = np.stack([rng.permutation(n_images)[:k] for _ in range(config.shared_null_draws)]) if calibrate else None
        if config.formulation == "paper":
            probs = probabilities if probabilities is not None else ConceptProbabilities(sim, float(config.resolved_alpha))
            if layer_prior is None:
                scan = scan_columns(acts, k)  # the prior needs every neuron of the layer
                constant = scan.constant[wanted]
                total = n_layer + (len(draws) if draws is not None else 0)
                layer_lik = probs.log_likelihood(scan.indices, weights, config.min_prob, progress, total)
                del scan
                layer_prior = layer_log_prior(layer_lik)
                log_lik = layer_lik if all_columns else layer_lik[wanted]
                del layer_lik
            else:
                scan = scan_columns(acts, k, columns)
                constant = scan.constant
                total = n_neurons + (len(draws) if draws is not None else 0)
                log_lik = probs.log_likelihood(scan.indices, weights, config.min_prob, progress, total)
                del scan
            lam_prior = float(config.resolved_lam) * layer_prior
            log_lik -= lam_prior  # in place: at 2,048 neurons x 20,000 concepts each copy is 160 MB
            index, scores = _top_candidates(log_lik, m)
            del log_lik
            if draws is not None:
                null_lik = probs.log_likelihood(draws, weights, config.min_prob, progress, total, total - len(draws))
                # A random exemplar set stands for a neuron of this layer: it joins the prior it is
                # scored against (a layer of n_layer + 1 neurons), as every real neuron is in its own.
                joined = np.logaddexp(layer_prior + math.log(n_prior), null_lik) - math.log(n_prior + 1)
                shared_null = (null_lik - float(config.resolved_lam) * joined).max(axis=1)
        else:
            chunk = max(1, _ACCUMULATOR_BYTES // (4 * sim.n_concepts))
            scan = scan_columns(acts, k, columns)
            constant, top = scan.constant, scan.indices
            for start in range(0, n_neurons, chunk):
                stop = min(n_neurons, start + chunk)
                sets = top[start:stop]
                if draws is not None and shared_null is None:
                    sets = np.concatenate([sets, draws])  # the shared null rides along the first pass
                s = _pmi_scores(sets, weights, sim, config)
                if draws is not None and shared_null is None:
                    shared_null = s[stop - start:].max(axis=1)
                    s = s[: stop - start]
                index[start:stop], scores[start:stop] = _top_candidates(s, m)
                if progress:
                    progress(stop, n_neurons, f"{config.similarity}: {stop}/{n_neurons} neurons")
    elif config.similarity in ("cos", "cos3"):
        shuffles = [rng.permutation(n_images) for _ in range(config.null_shuffles)] if calibrate else []
        mean = _column_mean(sim) if config.similarity == "cos3" else None
        chunk = max(1, min(_ACCUMULATOR_BYTES // (4 * sim.n_concepts * (1 + len(shuffles))), _COLUMN_BYTES // (4 * n_images)))
        for start in range(0, n_neurons, chunk):
            stop = min(n_neurons, start + chunk)
            block = column_block(acts, wanted[start:stop])
            constant[start:stop] = block.max(axis=0) <= block.min(axis=0)
            s = _cos_scores(block, sim, config, mean, shuffles)
            del block
            index[start:stop], scores[start:stop] = _top_candidates(s[0], m)
            if shuffles:
                null_per_neuron[start:stop] = s[1:].max(axis=2).T
            if progress:
                progress(stop, n_neurons, f"{config.similarity}: {stop}/{n_neurons} neurons")
    else:  # rank_reorder
        n_top = _rank_top_count(config, n_images)
        info.update(exemplars=n_top)
        inverse = [np.argsort(rng.permutation(n_images)) for _ in range(config.null_shuffles)] if calibrate else []
        scan = scan_columns(acts, n_top, columns)
        constant, top = scan.constant, scan.indices
        for j in range(n_neurons):
            # Under a shuffle the same top values sit on the images that the permutation maps there.
            sets = np.stack([top[j]] + [inv[top[j]] for inv in inverse])
            s = _rank_reorder_scores(scan.values[j], sets, sim, config)
            index[j: j + 1], scores[j: j + 1] = _top_candidates(s[:1], m)
            if inverse:
                null_per_neuron[j] = s[1:].max(axis=1)
            if progress and (j % 8 == 7 or j == n_neurons - 1):
                progress(j + 1, n_neurons, f"rank_reorder: {j + 1}/{n_neurons} neurons")

    result = NeuronConcepts(index, scores, constant=constant, info=info,
                            layer_prior=layer_prior if config.uses_layer_prior else None)
    if calibrate:
        null = shared_null if shared_null is not None else null_per_neuron
        result.calibrated, result.z = permutation_percentile(scores, null)
        result.calibrated[constant] = 0.0  # a neuron that never varies explains nothing
        info.update(null="shared exemplar sets" if shared_null is not None else "per-neuron shuffles",
                    null_size=int(np.atleast_2d(null).shape[1]))
    return result


# Within this context, describe() keeps p(c|x) of a (backend, probe set, concept set, alpha)
# for the next layer; outside it nothing large outlives a call (the app is a long-lived process).
_probability_cache: dict | None = None


@contextlib.contextmanager
def reuse_probabilities():
    """Share the probe set's p(c|x) between layers labelled inside this block (CLI, benchmarks)."""
    global _probability_cache
    previous, _probability_cache = _probability_cache, {}
    try:
        yield
    finally:
        _probability_cache = previous


# -- the registered method -------------------------------------------------------------------
@register_method
class ClipDissect(DescriptionMethod):
    """CLIP-Dissect over cached activations and cached image/text embeddings."""

    name = "clip_dissect"
    title = "CLIP-Dissect"
    reference = "Oikarinen & Weng, CLIP-Dissect: Automatic Description of Neuron Representations in Deep Vision Networks, ICLR 2023"
    needs = ("multimodal", "concepts")
    config_class = ClipDissectConfig
    per_neuron = False
    code_version = "2"

    def describe(self, ctx: MethodContext, config: ClipDissectConfig, neurons: Sequence[int]) -> list[LabelRow]:
        """Label ``neurons`` of ctx.run with the best concepts of ctx.concepts."""
        from .. import embeddings
        from ..provenance import provenance_key

        if ctx.multimodal is None or ctx.concepts is None:
            raise ValueError("CLIP-Dissect needs a multimodal backend (e.g. 'conse') and a concept set (e.g. 'words20k').")
        neurons = [int(n) for n in neurons]
        if not neurons:
            return []
        concepts = list(ctx.concepts.concepts)
        if not concepts:
            raise MethodError(f"Concept set '{ctx.concepts.name}' is empty.")
        report = ctx.progress
        # Both are cached in the store: only the first labelling of a probe set / concept set pays.
        image_emb = embeddings.image_embeddings(ctx.multimodal, ctx.store, ctx.run.probe_set_id, report)
        text_emb = embeddings.text_embeddings(ctx.multimodal, ctx.store, ctx.concepts, report)
        if image_emb.shape[0] != ctx.run.n_images:
            raise ValueError(f"The probe set has {image_emb.shape[0]} image embeddings but run {ctx.run.run_key} "
                             f"has activations for {ctx.run.n_images} images.")
        sim = ImageConceptSimilarity(image_emb, text_emb, similarity=ctx.multimodal.similarity)
        acts = ctx.store.activations(ctx.run.run_key)  # memory-mapped: label_neurons reads it in row blocks
        prior_key = provenance_key({"run": ctx.run.run_key, "backend": ctx.multimodal.id, "concepts": ctx.concepts.id,
                                    "config": config, "code": self.code_version})
        prior = ctx.store.load_array("clip_dissect_prior", prior_key) if config.uses_layer_prior else None
        probabilities = None
        if config.uses_layer_prior:
            prob_key = (ctx.multimodal.id, ctx.run.probe_set_id, ctx.concepts.id, float(config.resolved_alpha))
            if _probability_cache is not None:
                probabilities = _probability_cache.get(prob_key)
            if probabilities is None:
                probabilities = ConceptProbabilities(sim, float(config.resolved_alpha))
                if _probability_cache is not None:
                    _probability_cache.clear()  # one probe set at a time: bounded memory
                    _probability_cache[prob_key] = probabilities
        # Without a cached prior every neuron of the layer is scanned (the prior needs them all).
        result = label_neurons(acts, sim, config, report, neurons, prior, probabilities, ctx.run.n_neurons)
        if config.uses_layer_prior and prior is None and result.layer_prior is not None:
            ctx.store.save_array("clip_dissect_prior", prior_key, result.layer_prior)
        rows: list[LabelRow] = []
        for j, neuron in enumerate(neurons):
            for rank in range(result.concept_index.shape[1]):
                calibrated = None if result.calibrated is None else float(result.calibrated[j, rank])
                extra: dict = {}
                if result.z is not None and np.isfinite(result.z[j, rank]):
                    extra["z"] = round(float(result.z[j, rank]), 4)
                if rank == 0:
                    extra.update(result.info)
                    if result.constant is not None and result.constant[j]:
                        extra["constant_activation"] = True
                rows.append(LabelRow(neuron, rank, concepts[int(result.concept_index[j, rank])],
                                     float(result.scores[j, rank]), calibrated, extra or None))
        return rows
