"""MILAN-style PMI: an offline stand-in for MILAN (Hernandez et al., ICLR 2022) that keeps its objective.

MILAN describes a neuron by the string ``d`` maximising the pointwise mutual information
between the description and the neuron's exemplar regions::

    d* = argmax_d  log p(d | E)  -  lambda * log p(d),      lambda = 0.2

The trained MILAN captioner and language model are not reachable offline, so (METHODS.md):

- Exemplars E: the neuron's top ``k`` = 15 images. The run stores its top-k by the run's pooling
  (spatial mean by default); MILAN ranks by the spatial *max*, so the stored top-k is
  re-ranked by the max of each stored map and the best 15 are kept (exact when the stored
  top-k contains the dataset's top 15 by max, which is likely but not guaranteed).
- Masks: the upsampled activation map above the neuron's 0.99 quantile of map values over the
  whole probe set (the mask level), read from the KLL sketch of every map cell that extraction
  keeps (:meth:`Store.mask_levels`; rank error in :mod:`neuroviz.sketches`). Runs stored
  before the sketches have only their top-k maps: the level is then estimated from them
  (:func:`spatial_quantile_threshold`, a lower bound that collapses at scale) and the label
  says ``mask_level_source: "top-k estimate (approximate)"``.
- Exemplar regions: the part of the model's view inside the mask's bounding box
  (``exemplar_region="crop"``). Filling the outside with grey (``"grey"``) is closer to how
  MILAN shows exemplars to people, but a mostly grey picture is far from what an image
  classifier was trained on: on MobileNetV2's early layers the offline ConSE backend then
  called almost every region "nematode" or "balloon". ``"full"`` ignores the mask and reads
  the probe set's cached embeddings (fast; also what vector layers without maps get).
- Candidates d: the concept set's top ``n_concept_candidates`` by p(d | E), plus the
  captioner's captions of the exemplar regions ("a photo of" framing removed).
- p(d | E): softmax over the candidates of the mean image-text cosine between the exemplar
  regions and d under the multimodal backend, at ``similarity_temperature`` (0.02: the cosine
  gaps between good candidates are a few hundredths, which this turns into a few nats).
- p(d): the language model's log-likelihood of d after the context ``"Tags:"``, divided by
  d's number of words. MILAN's p(d) is a model of neuron descriptions; a general model scoring
  a bare string from the first token mostly measures how well it opens a document, so the
  context asks how likely d is as a short image description. Per word, because MILAN's
  captioner likelihood falls with length as fast as its prior does while our p(d | E) does
  not: a total log-likelihood would reward long strings through ``-lambda * log p(d)``.
  Scores are cached per string and language-model id in the store (the slow part).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..column_scan import take_rows
from ..crops import ProbeViews, exemplar_mask, mask_overlay, masked_region
from ..progress import Progress, chain
from ..store import LabelRow, RunInfo, Store
from .base import DescriptionMethod, MethodContext, MethodError, Overlay, register_method

NEURONS_PER_BATCH = 8
MASK_LEVEL_SKETCH = "sketch"  # a label's mask_level_source when its level came from the run's sketch
MASK_LEVEL_APPROXIMATE = "top-k estimate (approximate: the run was stored without a map sketch)"  # exemplar images of this many neurons are encoded in one backend call


@dataclass
class MilanConfig:
    """Hyperparameters of MILAN-style PMI. Paper defaults (Hernandez et al. 2022): k=15,
    mask quantile 0.99, lambda=0.2. The rest are choices of this offline stand-in."""

    k: int = 15  # exemplars per neuron
    mask_quantile: float = 0.99  # spatial threshold: this quantile of the neuron's map values
    pmi_lambda: float = 0.2  # weight of the prior log p(d)
    rank_exemplars_by: str = "spatial_max"  # "spatial_max" (MILAN) or "pooled" (the run's pooling)
    exemplar_region: str = "crop"  # "crop": the mask's box; "grey": grey out the rest; "full": no mask
    view_size: int = 224  # pixels of the model view shown to the multimodal backend and captioner
    n_concept_candidates: int = 20  # candidates taken from the concept set (top by p(d|E))
    caption_candidates: bool = True  # add the captions of the masked exemplars as candidates
    similarity_temperature: float = 0.02  # p(d|E) = softmax(mean cosine / temperature)
    prior_normalisation: str = "per_word"  # "per_word" or "total" log-likelihood for log p(d)
    prior_context: str = "Tags:"  # p(d) = p(d | this text): how likely d is as a short image description
    n_labels: int = 5  # the answer and the next 4 candidates


# -- the PMI objective as pure functions -------------------------------------------------------

def select_exemplars(top_maps: np.ndarray | None, k: int, rank_by: str = "spatial_max") -> np.ndarray:
    """Positions (into the run's stored top-k, best first) of a neuron's k exemplars.

    ``"spatial_max"`` re-ranks the stored top-k by each map's maximum (MILAN ranks images by
    spatial max); ``"pooled"`` or a layer without maps keeps the stored order.
    """
    if rank_by not in ("spatial_max", "pooled"):
        raise MethodError(f"Unknown exemplar ranking '{rank_by}'; choose spatial_max or pooled.")
    if top_maps is None or rank_by == "pooled":
        return np.arange(k if top_maps is None else min(k, len(top_maps)))
    peaks = top_maps.reshape(len(top_maps), -1).max(axis=1)
    return np.argsort(-peaks, kind="stable")[:k]


def spatial_quantile_threshold(top_maps: np.ndarray, n_images: int, quantile: float = 0.99) -> float:
    """Estimate the ``quantile`` of a neuron's map values over all ``n_images`` probe images.

    Over the whole set that quantile is the m-th largest of ``n_images * h * w`` cells, with
    m = ceil((1 - quantile) * n_images * h * w). Only the top-k images' maps are stored, so we
    take the m-th largest of *their* cells: exact when the dataset's top cells all lie in those
    images, otherwise lower than the truth. When m exceeds the stored cells we return their
    minimum (the stored maps cannot say more).
    """
    maps = np.asarray(top_maps, dtype=np.float32)
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"Expected top-k maps of shape (k, h, w); got {maps.shape}.")
    cells = np.sort(maps.reshape(-1))[::-1]
    # Rounded first: (1 - 0.99) * 3200 is 32.00000000000003 in floating point, not 32.
    m = math.ceil(round((1.0 - quantile) * n_images * maps.shape[1] * maps.shape[2], 6))
    m = min(max(m, 1), len(cells))
    return float(cells[m - 1])


class ExemplarMaskOverlay(Overlay):
    """MILAN's exemplar regions on the neuron page: each top image dimmed outside the part of
    its map above the neuron's mask threshold (the one its label used, else MILAN's rule)."""

    key = "masks"
    title = "MILAN masks"
    map_quantile = MilanConfig.mask_quantile

    def settings(self, maps: np.ndarray, run: RunInfo, extra: dict) -> dict:
        """The level the label used, else the run's sketch (``map_level``), else the top-k
        estimate. A level not from a sketch (labels made before sketches say no source) is
        marked approximate."""
        if extra.get("mask_threshold") is not None:
            threshold, approximate = extra["mask_threshold"], extra.get("mask_level_source") != MASK_LEVEL_SKETCH
        elif extra.get("map_level") is not None:
            threshold, approximate = extra["map_level"], False
        else:
            threshold, approximate = spatial_quantile_threshold(maps, run.n_images, MilanConfig.mask_quantile), True
        return {"threshold": float(threshold), **({"approximate": True} if approximate else {})}

    def draw(self, view: Image.Image, activation_map: np.ndarray, settings: dict) -> Image.Image:
        return mask_overlay(view, exemplar_mask(activation_map, settings["threshold"], view.size))

    def caption(self, settings: dict) -> str:
        top = 100 * (1 - MilanConfig.mask_quantile)
        text = f"MILAN exemplar masks: the map above {settings['threshold']:.3g} (the neuron's top {top:g}% of map values"
        if settings.get("approximate"):
            return text + ", approximate: estimated from the top images' maps, as this run was stored without a sketch of " \
                          "every map cell; extract the layer again for the exact level)."
        return text + ")."


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def log_p_description_given_exemplars(exemplar_emb: np.ndarray, candidate_emb: np.ndarray, temperature: float) -> np.ndarray:
    """log p(d | E) for every candidate: softmax over candidates of the mean exemplar-text cosine."""
    if temperature <= 0:
        raise MethodError("similarity_temperature must be positive.")
    mean_sim = (np.asarray(exemplar_emb, np.float64) @ np.asarray(candidate_emb, np.float64).T).mean(axis=0)
    return log_softmax(mean_sim / temperature)


def conditional_log_likelihood(store: Store, language_model, texts: Sequence[str], context: str,
                               progress: Progress | None = None) -> np.ndarray:
    """log p(text | context) = log p(context + " " + text) - log p(context), cached per string.

    MILAN's p(d) is a language model of neuron *descriptions*. A general model scoring a bare
    string from its first token mostly measures how well it opens a document; conditioning on
    a short description context asks how likely d is as a description.
    """
    from ..backends.language import cached_log_likelihood

    if not context:
        return cached_log_likelihood(language_model, store, texts, progress)
    values = cached_log_likelihood(language_model, store, [f"{context} {t}" for t in texts] + [context], progress)
    return values[:-1] - values[-1]


def description_prior(total_log_likelihood: np.ndarray, texts: Sequence[str], normalisation: str = "per_word") -> np.ndarray:
    """log p(d) from the language model's total log-likelihood, per word or total (see module doc)."""
    total = np.asarray(total_log_likelihood, dtype=np.float64)
    if normalisation == "total":
        return total
    if normalisation != "per_word":
        raise MethodError(f"Unknown prior normalisation '{normalisation}'; choose per_word or total.")
    words = np.array([max(1, len(t.split())) for t in texts], dtype=np.float64)
    return total / words


def pmi_scores(log_p_d_given_e: np.ndarray, log_p_d: np.ndarray, pmi_lambda: float) -> np.ndarray:
    """MILAN's objective: log p(d|E) - lambda * log p(d)."""
    return np.asarray(log_p_d_given_e, np.float64) - pmi_lambda * np.asarray(log_p_d, np.float64)


# -- the method ---------------------------------------------------------------------------------

@dataclass
class _NeuronExemplars:
    neuron: int
    image_idx: list[int]
    image_ids: list[str]
    threshold: float | None
    embeddings: np.ndarray  # (k, D) masked exemplar embeddings
    concept_candidates: list[str]
    captions: list[str]


_CAPTION_PREFIXES = ("a photo of ", "a picture of ", "an image of ", "a close up of ", "a close-up of ", "there is ")


def caption_phrase(caption: str) -> str:
    """A caption as a candidate description: one line, no "a photo of" framing, no final period.

    The framing is the same for every caption, so it carries nothing about the neuron, and the
    language-model prior would otherwise score the template instead of the content.
    """
    text = " ".join(str(caption).split()).strip().rstrip(".")
    lowered = text.lower()
    for prefix in _CAPTION_PREFIXES:
        if lowered.startswith(prefix) and len(text) > len(prefix):
            text = text[len(prefix):]
            lowered = text.lower()
            if lowered.startswith(("a ", "an ")) and len(text.split()) > 1:
                text = text.split(" ", 1)[1]
            break
    return text


def _reuses_embeddings(ctx: MethodContext) -> bool:
    captioner = ctx.captioner
    return hasattr(captioner, "compose") and getattr(getattr(captioner, "multimodal", None), "id", None) == ctx.multimodal.id


def captions_of(ctx: MethodContext, images: Sequence, embeddings: np.ndarray) -> list[str]:
    """The captioner's captions of ``images``; a retrieval captioner over the same multimodal
    backend captions from the embeddings already computed instead of encoding the images again."""
    if _reuses_embeddings(ctx):
        return list(ctx.captioner.compose(np.asarray(embeddings)))
    return list(ctx.captioner.caption(list(images)))


@register_method
class MilanPMI(DescriptionMethod):
    """MILAN's PMI objective with offline backends (see the module docstring)."""

    name = "milan"
    title = "MILAN-style PMI"
    reference = "Hernandez et al., Natural Language Descriptions of Deep Visual Features, ICLR 2022 (offline PMI stand-in)"
    needs = ("multimodal", "captioner", "language_model", "concepts")
    config_class = MilanConfig
    code_version = "1"

    def overlays(self) -> list[Overlay]:
        return [ExemplarMaskOverlay()]

    def describe(self, ctx: MethodContext, config: MilanConfig, neurons: Sequence[int]) -> list[LabelRow]:
        """Exemplars and masks -> candidates -> p(d|E) and p(d) -> PMI ranking, for ``neurons``."""
        if config.exemplar_region not in ("grey", "crop", "full"):
            raise MethodError(f"Unknown exemplar region '{config.exemplar_region}'; choose grey, crop or full.")
        if ctx.concepts is None or not len(ctx.concepts):
            raise MethodError("MILAN-style PMI needs a concept set for its candidates (e.g. imagenet or words20k).")
        store, run = ctx.store, ctx.run
        neurons = [int(n) for n in neurons]
        progress = chain(ctx.progress)  # a no-op when the context has no progress callback
        view_cache: list[ProbeViews] = []

        def views(image_idx: int):
            # The probed model (for its crop geometry) and the probe paths are loaded only when pixels are needed.
            if not view_cache:
                paths = list(store.probe_files(run.probe_set_id).paths)
                view_cache.append(ProbeViews(paths, ctx.probed_model().preprocessing, config.view_size))
            return view_cache[0](image_idx)

        from ..embeddings import image_embeddings, text_embeddings

        concepts = list(ctx.concepts.concepts)
        concept_emb = np.asarray(text_embeddings(ctx.multimodal, store, ctx.concepts), dtype=np.float32)
        # Unmasked exemplars (fc layers, or exemplar_region="full") are whole probe images, whose
        # embeddings are cached for the probe set: no image needs encoding for them.
        masked = run.map_shape is not None and config.exemplar_region != "full"
        whole_emb = None if masked else image_embeddings(ctx.multimodal, store, run.probe_set_id)  # memory-mapped: rows read as needed
        levels = store.mask_levels(run.run_key, config.mask_quantile) if masked else None
        total_steps = len(neurons) + 2
        progress(0, total_steps, f"exemplars of the first {min(len(neurons), NEURONS_PER_BATCH)} neurons")
        gathered: list[_NeuronExemplars] = []
        for start in range(0, len(neurons), NEURONS_PER_BATCH):
            batch = neurons[start:start + NEURONS_PER_BATCH]
            regions, owners, chosen = [], [], []
            for n in batch:
                tops = store.top_images(run.run_key, n, k=run.k)
                maps = store.top_maps(run.run_key, n) if masked else None
                order = select_exemplars(maps, config.k, config.rank_exemplars_by)[: len(tops)]
                picked = [tops[int(i)] for i in order]
                threshold = None
                if maps is not None:
                    threshold = float(levels[n]) if levels is not None else \
                        spatial_quantile_threshold(maps, run.n_images, config.mask_quantile)
                    for pos, top in zip(order, picked):
                        view = views(top["image_idx"])
                        regions.append(masked_region(view, exemplar_mask(maps[int(pos)], threshold, view.size), config.exemplar_region))
                        owners.append(n)
                chosen.append((n, picked, threshold))
            if masked:
                emb = np.asarray(ctx.multimodal.encode_images(regions), dtype=np.float32)
                owners_arr = np.array(owners)
            else:
                assert whole_emb is not None, "unmasked exemplars use the cached whole-image embeddings"
                whole_idx = [int(t["image_idx"]) for _, picked, _ in chosen for t in picked]
                emb = take_rows(whole_emb, whole_idx)
                owners_arr = np.array([n for n, picked, _ in chosen for _ in picked])
                regions = [views(i) for i in whole_idx] if config.caption_candidates and not _reuses_embeddings(ctx) else []
            captions = [caption_phrase(c) for c in captions_of(ctx, regions, emb)] if config.caption_candidates else [""] * len(emb)
            for n, picked, threshold in chosen:
                rows = np.nonzero(owners_arr == n)[0]
                e = emb[rows]
                concept_scores = (e @ concept_emb.T).mean(axis=0)
                top_c = np.argsort(-concept_scores, kind="stable")[: config.n_concept_candidates]
                gathered.append(_NeuronExemplars(
                    n, [int(t["image_idx"]) for t in picked], [t["image_id"] for t in picked], threshold, e,
                    [concepts[i] for i in top_c], [captions[i] for i in rows if captions[i]],
                ))
            progress(len(gathered), total_steps, f"exemplars of neuron {batch[-1]}")

        # Every unique candidate string is embedded and scored by the language model once.
        concept_index = {c: i for i, c in enumerate(concepts)}
        all_candidates = list(dict.fromkeys(c for g in gathered for c in (*g.concept_candidates, *g.captions)))
        new_texts = [c for c in all_candidates if c not in concept_index]
        new_emb = np.asarray(ctx.multimodal.encode_texts(new_texts), dtype=np.float32) if new_texts else np.zeros((0, concept_emb.shape[1]), np.float32)
        text_row = {c: concept_emb[concept_index[c]] for c in all_candidates if c in concept_index}
        text_row.update(dict(zip(new_texts, new_emb)))
        progress(len(neurons), total_steps, f"language-model prior of {len(all_candidates)} candidates")
        # the slow part on a new workspace (hundreds of strings): its own progress, per scored batch
        loglik = conditional_log_likelihood(store, ctx.language_model, all_candidates, config.prior_context, ctx.progress)
        prior = dict(zip(all_candidates, description_prior(loglik, all_candidates, config.prior_normalisation)))

        level_source = None if not masked else MASK_LEVEL_SKETCH if levels is not None else MASK_LEVEL_APPROXIMATE
        out: list[LabelRow] = []
        for g in gathered:
            source: dict[str, str] = {}
            for c in g.concept_candidates:
                source.setdefault(c, "concept set")
            for c in g.captions:
                source[c] = "concept set + caption" if source.get(c) == "concept set" else "caption"
            cands = list(source)
            lp_e = log_p_description_given_exemplars(g.embeddings, np.stack([text_row[c] for c in cands]), config.similarity_temperature)
            lp = np.array([prior[c] for c in cands])
            scores = pmi_scores(lp_e, lp, config.pmi_lambda)
            order = np.argsort(-scores, kind="stable")[: config.n_labels]
            for rank, i in enumerate(order):
                extra = {"log_p_d_given_e": float(lp_e[i]), "log_p_d": float(lp[i]), "source": source[cands[i]]}
                if rank == 0:
                    extra.update({
                        "exemplar_image_idx": g.image_idx, "exemplar_image_ids": g.image_ids,
                        "mask_threshold": g.threshold, "mask_level_source": level_source, "exemplar_region": config.exemplar_region if masked else "full",
                        "captions": g.captions, "n_candidates": len(cands),
                        "backends": ctx.backend_ids(("multimodal", "captioner", "language_model")),
                        "concept_set": ctx.concepts.name,
                    })
                out.append(LabelRow(g.neuron, rank, cands[i], float(scores[i]), None, extra))
        progress(total_steps, total_steps, "done")
        return out
