"""Captioners: image -> short text, behind one registry (``create_captioner(spec)``, :data:`CAPTIONERS`).

- ``transformers:<model id or local dir>``: any transformers image-to-text model (BLIP,
  e.g. ``transformers:Salesforce/blip-image-captioning-base``), for users who have the weights;
- ``retrieval`` / ``retrieval:<details concept set>``: the offline stand-in. It retrieves
  the nearest phrases under the multimodal backend (as FALCON retrieves captions) and fills
  the template ``"a photo of a {object}, {detail 1}, {detail 2}"``: the object is the ImageNet
  class name nearest the image, the details are the nearest words of a second vocabulary
  (default ``words20k``) that do not repeat the object. Example: "a photo of a tabby, cat, fur".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..registry import Registry
from .base import BackendUnavailable, Captioner, MultimodalBackend, UnknownBackendError

KNOWN_HUB_CAPTIONERS = (
    "transformers:Salesforce/blip-image-captioning-base",
    "transformers:Salesforce/blip-image-captioning-large",
)


# --------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionGenerationConfig:
    """Decoding for generative captioners. BLIP (Li et al. 2022) captions COCO with beam
    search of 3 and at most 20 tokens; beam search keeps captions deterministic."""

    max_new_tokens: int = 20
    num_beams: int = 3
    prompt: str | None = None  # BLIP's conditional captioning prefix, e.g. "a picture of"


def _local_fingerprint(path: Path) -> str:
    """Cheap identity of a local model folder: file names, sizes and modification times."""
    from ..provenance import provenance_key

    files = sorted(p for p in path.rglob("*") if p.is_file())
    return provenance_key([(str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime)) for p in files], 12)


class TransformersCaptioner(Captioner):
    """A transformers image-to-text model (AutoProcessor + AutoModelForImageTextToText)."""

    def __init__(self, model_id: str, config: CaptionGenerationConfig = CaptionGenerationConfig(), device: str = "cpu"):
        from ..provenance import provenance_key

        self.model_id = model_id
        self.config = config
        self.device = device
        local = Path(model_id).expanduser()
        source = f"{model_id}#{_local_fingerprint(local)}" if local.is_dir() else model_id
        self.id = f"transformers:{source}:{provenance_key(config, 8)}"
        self.description = f"transformers captioner {model_id} (beam {config.num_beams}, <= {config.max_new_tokens} tokens)"
        self._lock = threading.Lock()
        # the transformers model and processor, loaded on first use
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            from transformers import AutoModelForImageTextToText, AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(self.model_id)
                model = AutoModelForImageTextToText.from_pretrained(self.model_id)
            except Exception as exc:  # missing weights, no network, unknown architecture
                raise BackendUnavailable(
                    f"Could not load the captioner '{self.model_id}' ({type(exc).__name__}: {str(exc)[:300]}). "
                    "Without the weights use the offline 'retrieval' captioner."
                ) from None
            self._processor = processor
            self._model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types .to through a wrapper mypy misreads

    def caption(self, images: Sequence[Image.Image], batch_size: int = 8) -> list[str]:
        """One caption per image, decoded deterministically (beam search, no sampling)."""
        self._load()
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[start : start + batch_size]]
            if self.config.prompt:
                inputs = self._processor(images=batch, text=[self.config.prompt] * len(batch), return_tensors="pt")
            else:
                inputs = self._processor(images=batch, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                tokens = self._model.generate(
                    **inputs, max_new_tokens=self.config.max_new_tokens, num_beams=self.config.num_beams, do_sample=False
                )
            out += [" ".join(text.split()) for text in self._processor.batch_decode(tokens, skip_special_tokens=True)]
        return out


# --------------------------------------------------------------------------------------
# Retrieval (offline)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalCaptionConfig:
    """How retrieval captions are composed (see the module docstring for the template)."""

    objects: str = "imagenet"  # concept-set spec of the head noun
    details: str = "words20k"  # concept-set spec of the extra words
    n_details: int = 2
    template: str = "a photo of {article} {object}, {details}"


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _overlaps(word: str, chosen: list[str]) -> bool:
    """True when ``word`` repeats a chosen phrase ("cat" vs "tabby cat", "cats" vs "cat")."""
    w = word.lower()
    for phrase in chosen:
        for token in phrase.lower().replace("-", " ").split():
            if w == token or w.rstrip("s") == token.rstrip("s"):
                return True
    return False


class RetrievalCaptioner(Captioner):
    """Offline captions: nearest object name plus nearest detail words under a multimodal backend."""

    def __init__(self, multimodal: MultimodalBackend, config: RetrievalCaptionConfig = RetrievalCaptionConfig(), store_root: Path | str | None = None):
        from ..concepts import load_concept_set
        from ..provenance import provenance_key

        self.multimodal = multimodal
        self.config = config
        self.store_root = store_root
        self.objects = load_concept_set(config.objects, store_root)
        self.details = load_concept_set(config.details, store_root)
        self.id = (
            f"retrieval[{multimodal.id}|objects={self.objects.id[:10]}|details={self.details.id[:10]}"
            f"|{provenance_key([config.n_details, config.template], 8)}]"
        )
        self.description = (
            f"retrieval captions (offline): nearest {self.objects.name} name + {config.n_details} nearest "
            f"{self.details.name} words under {multimodal.description}"
        )
        self._lock = threading.Lock()
        self._object_emb: np.ndarray | None = None
        self._detail_emb: np.ndarray | None = None

    def _text_matrix(self, concept_set) -> np.ndarray:
        if self.store_root is not None:
            from ..embeddings import text_embeddings
            from ..store import Store

            return text_embeddings(self.multimodal, Store(self.store_root), concept_set)
        return self.multimodal.encode_texts(concept_set.concepts)

    def _load(self) -> None:
        with self._lock:
            if self._object_emb is None:
                self._object_emb = self._text_matrix(self.objects)
                self._detail_emb = self._text_matrix(self.details)

    def compose(self, image_emb: np.ndarray) -> list[str]:
        """Captions for already-embedded images (N, D): lets methods reuse cached embeddings."""
        self._load()
        assert self._object_emb is not None and self._detail_emb is not None, "_load sets both matrices"
        obj_sim = image_emb @ self._object_emb.T
        det_sim = image_emb @ self._detail_emb.T
        captions = []
        for i in range(len(image_emb)):
            obj = self.objects.concepts[int(obj_sim[i].argmax())]
            chosen = [obj]
            details: list[str] = []
            for j in np.argsort(-det_sim[i])[: 50 + self.config.n_details]:
                word = self.details.concepts[int(j)]
                if not _overlaps(word, chosen):
                    details.append(word)
                    chosen.append(word)
                if len(details) == self.config.n_details:
                    break
            text = self.config.template.format(article=_article(obj), object=obj, details=", ".join(details))
            captions.append(text.rstrip(", "))
        return captions

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One retrieval caption per image (deterministic: no sampling anywhere)."""
        if len(images) == 0:
            return []
        return self.compose(self.multimodal.encode_images(list(images)))


# --------------------------------------------------------------------------------------
# Registry: factories take (argument, multimodal, store_root); one instance per key per process
# --------------------------------------------------------------------------------------
CAPTIONERS: Registry[Captioner] = Registry("captioner", error=UnknownBackendError)
_instances: dict[tuple, Captioner] = {}
_instances_lock = threading.Lock()


def _shared(key: tuple, make: Callable[[], Captioner]) -> Captioner:
    with _instances_lock:
        if key not in _instances:
            _instances[key] = make()
        return _instances[key]


@CAPTIONERS.register("retrieval", argument="<details concept set>", argument_optional=True)
def _retrieval(details: str | None, multimodal: MultimodalBackend | None, store_root: Path | str | None) -> Captioner:
    """Offline retrieval captions: nearest ImageNet object + nearest detail words (default words20k)."""
    if multimodal is None:
        from .multimodal import create_multimodal

        multimodal = create_multimodal("conse")
    config = RetrievalCaptionConfig(details=details or RetrievalCaptionConfig.details)
    key = ("retrieval", config, multimodal.id, str(store_root))
    return _shared(key, lambda: RetrievalCaptioner(multimodal, config, store_root))


@CAPTIONERS.register("transformers", argument="<hub id or folder>", listing=lambda: list(KNOWN_HUB_CAPTIONERS))
def _transformers(model_id: str, multimodal: MultimodalBackend | None, store_root: Path | str | None) -> Captioner:
    """Any transformers image-to-text model (BLIP, ...), for users who have the weights."""
    return _shared(("transformers", model_id), lambda: TransformersCaptioner(model_id))


def create_captioner(spec: str = "retrieval", multimodal: MultimodalBackend | None = None,
                     store_root: Path | str | None = None) -> Captioner:
    """``retrieval[:<details concept set>]`` (offline) or ``transformers:<model id or dir>``.

    ``multimodal`` is the space retrieval captions are found in (default ``conse``);
    ``store_root`` lets the retrieval captioner cache its vocabulary embeddings on disk.
    """
    return CAPTIONERS.create(spec.strip(), multimodal, store_root)
