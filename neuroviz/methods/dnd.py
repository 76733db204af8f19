"""Describe-and-Dissect (DnD; Bai et al. 2024): training-free neuron descriptions in three steps.

1. **Probing-set augmentation.** For the neuron's top 10 images, Otsu-threshold the upsampled
   activation map, box the regions (at most 4 crops per image, mutual IoU <= 0.5, IoU with the
   whole image < 0.8; :func:`neuroviz.crops.otsu_crops`), re-run the probed network f on the
   originals and crops (same layer and pooling as the run) and keep the 10 most activating.
   Layers without spatial maps (fc, vectors) get no crops.
2. **Candidate concepts.** Caption each of those images; the language model simplifies each
   caption, then summarises the set into one 1-5 word concept, 5 times with the captions
   shuffled (temperature 0.3): 5 candidates. Prompts are few-shot completions, which small
   base models (the offline Gemma-3-270M) follow far better than instructions.
3. **Best-concept selection.** Each candidate gets images of itself: the paper generates 10 with
   Stable Diffusion; offline, the multimodal backend retrieves the 10 probe images closest to
   the candidate's text (the neuron's own top images excluded, so candidates are judged on
   images other than those that produced them, as with fresh generated images). As in the
   authors' code: all retrieved images are ranked by the neuron's activation; a candidate's
   activation score is the mean squared rank of its ``beta`` = 5 best images (lower is
   better), turned into a rank ``C - position`` among the C candidates; its similarity weight
   is the mean multimodal cosine between the real top images and those of its images in the
   overall top ``K`` = 10 (-1 when it has none there). Score = rank x weight; labels 1..3.

Every language-model call goes through ``ctx.language_model`` (the recording wrapper of
:mod:`neuroviz.backends.language`, so a run replays exactly) and is also kept, with its
prompt, in the label's ``extra`` for the dashboard.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..column_scan import scan_columns, take_rows
from ..crops import Box, ProbeViews, draw_boxes, otsu_crops
from ..progress import chain
from ..store import LabelRow
from .base import DescriptionMethod, MethodContext, Overlay, register_method
from .milan import captions_of

if TYPE_CHECKING:
    import torch

    from ..backends.base import LanguageModel
    from ..models import ProbedModel


@dataclass
class DnDConfig:
    """Describe-and-Dissect hyperparameters; defaults from Bai et al. 2024 and their public code."""

    n_top_images: int = 10  # top images cropped in step 1, and images kept after re-ranking
    max_crops_per_image: int = 4
    max_mutual_iou: float = 0.5  # a crop may overlap a kept crop at most this much
    max_full_iou: float = 0.8  # crops must have IoU with the whole image below this
    view_size: int = 224  # pixels of the views and crops given to the captioner and encoder
    n_candidates: int = 5  # summaries asked of the language model (shuffled captions each time)
    summary_temperature: float = 0.3
    simplify_temperature: float = 0.3
    # A 1-5 word answer fits in 8 tokens; every extra token is another forward pass of the LM.
    max_new_tokens: int = 8
    seed: int = 0
    n_concept_images: int = 10  # images per candidate (paper: 10 Stable Diffusion images)
    top_k_images: int = 10  # K: only a candidate's images among the K most activating weigh its similarity
    beta: int = 5  # activation score: mean squared rank of a candidate's beta best images
    exclude_top_images: bool = True  # keep the neuron's own top images out of retrieval
    n_labels: int = 3


# -- prompts: few-shot completions for small base language models ----------------------------
# A 270M base model copies its examples' words readily (an example answer "red objects" turned
# unrelated lists into "red animals", "red carpet"), so the examples avoid colours and answer
# with the theme most of their labels share.

SIMPLIFY_PROMPT = """Short labels for image descriptions.

Description: a brown dog lying on the green grass next to a tennis ball
Label: dog on grass

Description: a close up of the orange and black striped fur of a tiger
Label: striped fur

Description: a row of old red brick houses along a narrow street
Label: brick houses

Description: {caption}
Label:"""

SUMMARY_PROMPT = """Each list of image labels is summarised by the one concept, 1 to 5 words long, that most of the labels share.

Labels: golden retriever; puppy on a sofa; dog with a frisbee; sleeping dog; wolf
Concept: dogs

Labels: wooden table; tree bark; wooden spoon; log cabin; parquet floor
Concept: wood

Labels: bicycle wheel; car tyre; clock face; round plate; coin
Concept: circular objects

Labels: {labels}
Concept:"""

_LABEL_PREFIX = re.compile(r"^\s*(?:label|concept|answer|description|labels)\s*:\s*", re.IGNORECASE)
_LEADING_MARKS = re.compile(r"^[\s\"'`*\u2022\u201c\u201d\u2018\u2019-]*(?:\d+[.)]\s*)?")  # quotes, bullets, "1."
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


def concept_phrase(response: str, max_words: int = 5) -> str:
    """A model's completion cut to the short phrase the prompt asked for.

    Keeps the first non-empty line, drops a repeated "Label:"/"Concept:" prefix, list
    separators and punctuation, and at most ``max_words`` words, lower-cased. Empty when
    the completion holds no words.
    """
    for line in str(response).splitlines():
        line = _LEADING_MARKS.sub("", _LABEL_PREFIX.sub("", line)).strip()
        if line:
            first = re.split(r"[;,.!?()\[\]\"]", line)[0]
            words = _WORD.findall(first)
            if words:
                return " ".join(words[:max_words]).lower().strip("'-")
    return ""


def simplify_prompt(caption: str) -> str:
    """The few-shot prompt that turns one caption into a short label."""
    return SIMPLIFY_PROMPT.format(caption=" ".join(caption.split()))


def summary_prompt(labels: Sequence[str]) -> str:
    """The few-shot prompt that summarises a list of labels into one concept."""
    return SUMMARY_PROMPT.format(labels="; ".join(labels))


# -- step 3 scoring as pure functions --------------------------------------------------------

def topk_squared_rank(ranks: Sequence[int], beta: int) -> float:
    """DnD's activation score of a candidate: mean of the squared ``beta`` best (lowest) ranks
    of its images among all candidates' images sorted by activation (0 = most activating)."""
    best = sorted(ranks)[:beta]
    return float(np.mean(np.square(best))) if best else float("inf")


@dataclass
class CandidateScore:
    """Step-3 evidence of one candidate concept."""

    concept: str
    image_idx: list[int]  # its retrieved probe images
    ranks: list[int]  # their positions in the activation ranking of all retrieved images
    activation_score: float  # topk_squared_rank (lower is better)
    concept_rank: int  # C - position by activation score (higher is better)
    similarity: float  # mean cosine real top images x its top-K images, -1 if none
    score: float  # concept_rank * similarity


def score_candidates(candidates: Sequence[str], retrieved: Sequence[Sequence[int]], activations: np.ndarray | Mapping[int, float],
                     similarity_of, beta: int = 5, top_k: int = 10) -> list[CandidateScore]:
    """Rank candidates as DnD does (see the module docstring); best first.

    ``retrieved[c]`` are probe-image indices for candidate c, ``activations`` the neuron's
    activation per probe image (at least for the retrieved ones), ``similarity_of(image_idx_list) -> float`` the mean multimodal
    similarity between the neuron's real top images and those images.
    """
    pooled = sorted({int(i) for imgs in retrieved for i in imgs}, key=lambda i: (-float(activations[i]), i))
    position = {img: p for p, img in enumerate(pooled)}
    ranks = [sorted(position[int(i)] for i in set(imgs)) for imgs in retrieved]
    act_scores = [topk_squared_rank(r, beta) for r in ranks]
    by_activation = sorted(range(len(candidates)), key=lambda c: (act_scores[c], c))
    concept_rank = {c: len(candidates) - pos for pos, c in enumerate(by_activation)}
    out = []
    for c, concept in enumerate(candidates):
        top_imgs = [pooled[p] for p in ranks[c] if p < top_k]
        sim = float(similarity_of(top_imgs)) if top_imgs else -1.0
        out.append(CandidateScore(concept, [int(i) for i in retrieved[c]], ranks[c], act_scores[c], concept_rank[c],
                                  sim, concept_rank[c] * sim))
    return sorted(out, key=lambda s: (-s.score, candidates.index(s.concept)))


def best_concepts(candidates: Sequence[str], candidate_emb: np.ndarray, probe_emb: np.ndarray, acts: np.ndarray, neuron: int,
                  real_emb: np.ndarray, exclude: Sequence[int], config: DnDConfig) -> list[CandidateScore]:
    """Step 3 for one neuron: retrieve each candidate's probe images and score the candidates.

    ``probe_emb`` (images x D) and ``acts`` (images x neurons) may be memory-mapped files of any
    size: the retrieval is a top-k scan over row blocks of image-text similarities
    (:func:`column_scan.scan_columns`, ties to the lower image as in a stable sort), and only the
    retrieved images' activations and embeddings are read.
    """
    n_images = probe_emb.shape[0]
    excluded = np.asarray(sorted({int(i) for i in exclude}) if len(exclude) < n_images else [], dtype=np.int64)

    def similarities(start: int, stop: int, block: np.ndarray) -> np.ndarray:
        sims = block @ candidate_emb.T
        sims[excluded[(excluded >= start) & (excluded < stop)] - start] = -np.inf
        return sims

    scan = scan_columns(probe_emb, min(config.n_concept_images, n_images), transform=similarities, width=len(candidates))
    retrieved = [[int(i) for i, v in zip(idx, vals) if np.isfinite(v)] for idx, vals in zip(scan.indices, scan.values)]
    pooled = sorted({i for imgs in retrieved for i in imgs})
    activation = dict(zip(pooled, take_rows(acts, pooled)[:, neuron].tolist())) if pooled else {}

    def similarity_of(idx: list[int]) -> float:
        return float((real_emb @ take_rows(probe_emb, idx).T).mean())

    return score_candidates(candidates, retrieved, activation, similarity_of, config.beta, config.top_k_images)


# -- the method --------------------------------------------------------------------------------

class _Transcript:
    """Every language-model call of one neuron, for the label's extra and for replay checks."""

    def __init__(self, language_model: LanguageModel) -> None:
        self.lm = language_model
        self.calls: list[dict] = []

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
        # every DnD prompt asks for one short line: a backend may stop at its end
        response = self.lm.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                    stop_at_line_end=True)
        self.calls.append({"prompt": prompt, "response": response, "temperature": temperature, "seed": seed})
        return response


@dataclass
class Exemplar:
    """An original top image or one of its crops, with the neuron's activation on it."""

    image: Image.Image  # at view_size, for the captioner and the multimodal backend
    image_idx: int  # row of the probe image in the run
    box: Box | None  # crop box in view_size pixels of the model view; None for the whole image
    activation: float  # the neuron's activation under f (same layer and pooling as the run)


@dataclass
class TopImageViews:
    """Model views of a run's probe images: ``display`` at view_size for captioners and crops,
    ``exact`` at the model's input size (exactly the pixels the run was extracted from)."""

    model: ProbedModel
    display: ProbeViews
    exact: ProbeViews

    @classmethod
    def for_run(cls, ctx: MethodContext, view_size: int) -> TopImageViews:
        model = ctx.probed_model()
        if model.preprocessing.id != ctx.run.preprocess_id:
            raise ValueError(
                f"The probed model's preprocessing ({model.preprocessing}) differs from the one run {ctx.run.run_key} was "
                "extracted with; put the model created with the same image_size into the method context."
            )
        paths = [p["path"] for p in ctx.store.probe_images(ctx.run.probe_set_id)]
        return cls(model, ProbeViews(paths, model.preprocessing, view_size), ProbeViews(paths, model.preprocessing, None))


def augmented_top_images(ctx: MethodContext, neuron: int, config: DnDConfig,
                         views: TopImageViews | None = None) -> list[Exemplar]:
    """DnD step 1: the neuron's top images plus their Otsu crops, re-ranked by f; best first.

    Layers without maps (fc) get no crops and keep the run's stored activations.
    """
    store, run = ctx.store, ctx.run
    views = views or TopImageViews.for_run(ctx, config.view_size)
    tops = store.top_images(run.run_key, neuron, k=config.n_top_images)
    maps = store.top_maps(run.run_key, neuron)
    if maps is None or run.layer_kind == "vector":
        return [Exemplar(views.display(t["image_idx"]), int(t["image_idx"]), None, float(t["activation"])) for t in tops]
    size = (config.view_size, config.view_size)
    side = views.model.preprocessing.image_size
    items: list[tuple[Image.Image, int, Box | None]] = []
    inputs: list[Image.Image] = []
    for rank, top in enumerate(tops):
        view = views.display(top["image_idx"])
        items.append((view, int(top["image_idx"]), None))
        inputs.append(views.exact(top["image_idx"]))
        for box in otsu_crops(maps[rank], size, config.max_crops_per_image, config.max_mutual_iou, config.max_full_iou):
            crop = view.crop(box.as_tuple())
            items.append((crop.resize(size, Image.Resampling.BILINEAR), int(top["image_idx"]), box))
            # f sees the whole crop, stretched to its input square as in the authors' code.
            inputs.append(crop.resize((side, side), Image.Resampling.BILINEAR))
    activation = neuron_activations(views.model, run.layer, run.pooling, neuron, inputs)
    order = np.argsort(-activation, kind="stable")[: config.n_top_images]
    return [Exemplar(items[j][0], items[j][1], items[j][2], float(activation[j])) for j in order]


@register_method
class DescribeAndDissect(DescriptionMethod):
    """Describe-and-Dissect with offline stand-ins (see the module docstring)."""

    name = "dnd"
    title = "Describe-and-Dissect"
    reference = "Bai et al., Describe-and-Dissect: Interpreting Neurons in Vision Networks with Language Models, 2024"
    needs = ("multimodal", "captioner", "language_model")
    config_class = DnDConfig
    per_neuron = True
    code_version = "2"  # 2: LM calls stop at the end of the answer line and reuse the prompt head

    def overlays(self) -> list[Overlay]:
        return [CropOverlay()]

    def describe(self, ctx: MethodContext, config: DnDConfig, neurons: Sequence[int]) -> list[LabelRow]:
        """Run the three steps for each neuron (slow: ~15 language-model calls per neuron).

        Progress moves at every language-model call (a fraction of a second to a few
        seconds each on 2 cores), not only between the three steps.
        """
        store, run = ctx.store, ctx.run
        progress = chain(ctx.progress)  # a no-op when the context has no progress callback
        views = TopImageViews.for_run(ctx, config.view_size)
        from ..embeddings import image_embeddings

        probe_emb = image_embeddings(ctx.multimodal, store, run.probe_set_id, progress=ctx.progress)  # memory-mapped
        acts = store.activations(run.run_key)
        backends = ctx.backend_ids(self.needs)
        rows: list[LabelRow] = []
        neurons = [int(n) for n in neurons]
        per_neuron = progress_steps(config)
        steps = per_neuron * len(neurons)
        for i, neuron in enumerate(neurons):
            def step(offset: int, message: str, i=i, neuron=neuron) -> None:
                progress(min(i * per_neuron + offset, steps), steps, f"neuron {neuron}: {message}")

            step(0, "crops of the top images")
            exemplars = augmented_top_images(ctx, neuron, config, views)
            step(1, "captions" + (" (loads the captioner first)" if i == 0 else ""))
            transcript = _Transcript(ctx.language_model)
            real_emb = np.asarray(ctx.multimodal.encode_images([e.image for e in exemplars]), dtype=np.float32)
            captions, simplified, candidates = self._candidates(ctx, transcript, exemplars, real_emb, neuron, config,
                                                                step if i else _first_neuron(step))
            step(per_neuron - 1, "best concept")
            own = [t["image_idx"] for t in store.top_images(run.run_key, neuron, k=config.n_top_images)] \
                if config.exclude_top_images else []
            scored = best_concepts(candidates, np.asarray(ctx.multimodal.encode_texts(candidates), dtype=np.float32),
                                   probe_emb, acts, neuron, real_emb, own, config)
            shared = {
                "captions": captions, "simplified_captions": simplified, "candidates": candidates,
                "top_images": [{"image_idx": e.image_idx, "box": list(e.box.as_tuple()) if e.box else None,
                                "activation": e.activation} for e in exemplars],
                "view_size": config.view_size,  # boxes are in pixels of the model view at this size
                "llm_calls": transcript.calls, "backends": backends,
                "llm_recording_id": getattr(ctx.language_model, "recording_id", None),
                "candidate_scores": [_score_dict(s) for s in scored],
            }
            for rank, s in enumerate(scored[: config.n_labels]):
                extra = _score_dict(s)
                if rank == 0:
                    extra.update(shared)
                rows.append(LabelRow(neuron, rank, s.concept, float(s.score), None, extra))
        progress(steps, steps, "done")
        return rows

    # step 2
    def _candidates(self, ctx: MethodContext, transcript: _Transcript, exemplars: list[Exemplar], embeddings: np.ndarray,
                    neuron: int, config: DnDConfig, step) -> tuple[list[str], list[str], list[str]]:
        """Captions, their simplified forms, and the unique candidate concepts (in order);
        ``step(offset, message)`` is called before every language-model call."""
        captions = [" ".join(str(c).split()) for c in captions_of(ctx, [e.image for e in exemplars], embeddings)]
        simplified = []
        for j, caption in enumerate(captions):
            step(2 + j, f"simplifying caption {j + 1}/{len(captions)}")
            response = transcript.generate(simplify_prompt(caption), config.max_new_tokens, config.simplify_temperature,
                                           config.seed + j)
            # A caption the model could not shorten is kept as it is (cut to 5 words).
            simplified.append(concept_phrase(response) or concept_phrase(caption) or caption)
        rng = random.Random(f"dnd:{config.seed}:{neuron}")
        order = list(simplified)
        candidates: list[str] = []
        for j in range(config.n_candidates):
            step(2 + config.n_top_images + j, f"candidate concept {j + 1}/{config.n_candidates}")
            response = transcript.generate(summary_prompt(order), config.max_new_tokens, config.summary_temperature,
                                           config.seed + j)
            phrase = concept_phrase(response)
            if not phrase:
                # No usable words: fall back to the most frequent simplified caption.
                phrase = max(simplified, key=lambda s: (simplified.count(s), -simplified.index(s)))
            candidates.append(phrase)
            rng.shuffle(order)
        unique = list(dict.fromkeys(c for c in candidates if c))
        return captions, simplified, unique


def progress_steps(config: DnDConfig) -> int:
    """Progress steps of one neuron: crops, captions, one per language-model call, best concept."""
    return 3 + config.n_top_images + config.n_candidates


def _first_neuron(step):
    """The first language-model call of a run also loads the model (seconds; about a minute
    the very first time, when Gemma is dequantised): say so rather than seem stuck."""
    def first(offset: int, message: str) -> None:
        step(offset, message + (" (loads the language model first)" if offset == 2 else ""))
    return first


def neuron_activations(model, layer: str, pooling: str, neuron: int, images: Sequence[Image.Image],
                       batch_size: int = 32) -> np.ndarray:
    """Activation of one neuron (pooled as in the run) on model-view-sized PIL images.

    Images are normalised with the model's mean/std after resizing to its input square, so
    an exact model view gives the activation the run stored for that image.
    """
    import torch  # here, not at the top: the pages import this module (overlays) and never run a model

    from ..hooks import LayerRecorder, pool, to_batch_first

    prep = model.preprocessing
    layout = model.layer(layer).layout
    out = []
    module = model.module.eval()
    device = next(module.parameters(), torch.zeros(0)).device
    with torch.inference_mode(), LayerRecorder(module, [layer]) as rec:
        for start in range(0, len(images), batch_size):
            batch = torch.stack([_model_input(im, prep) for im in images[start:start + batch_size]]).to(device)
            module(batch)
            pooled = pool(to_batch_first(rec.outputs[layer], layout), layout, pooling)
            out.append(pooled[:, neuron].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _model_input(image: Image.Image, prep) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    image = image.convert("RGB")
    side = prep.image_size
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    return TF.normalize(TF.to_tensor(image), prep.mean, prep.std)


def _score_dict(s: CandidateScore) -> dict:
    return {"concept": s.concept, "score": s.score, "concept_rank": s.concept_rank, "similarity": s.similarity,
            "activation_score": s.activation_score, "retrieved_image_idx": s.image_idx, "ranks": s.ranks}


class CropOverlay(Overlay):
    """DnD's step 1 on the neuron page: the crop boxes it would cut from each top image."""

    key = "crops"
    title = "DnD crops"

    def draw(self, view: Image.Image, activation_map: np.ndarray, settings: dict) -> Image.Image:
        cfg = DnDConfig()
        return draw_boxes(view, otsu_crops(activation_map, view.size, cfg.max_crops_per_image, cfg.max_mutual_iou,
                                           cfg.max_full_iou))

    def caption(self, settings: dict) -> str:
        return "DnD step 1: Otsu threshold of the upsampled map, boxes of its regions (at most 4, IoU rules of the paper)."
