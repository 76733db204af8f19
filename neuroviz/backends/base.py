"""Interfaces of the three backend kinds (each kind's registry lives in its own module).

Every backend has a stable ``id`` (part of the provenance key of whatever it produces) and a
human ``description`` that the UI and the exports show next to every label it helped make.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import NeurovizError
from ..registry import UnknownNameError


class BackendUnavailable(NeurovizError, RuntimeError):
    """A backend that cannot be loaded here (no weights, no network); says what to use instead."""


class UnknownBackendError(UnknownNameError, BackendUnavailable):
    """A backend spec that names no registered backend (callers that catch BackendUnavailable still do)."""


class MultimodalBackend(ABC):
    """Images and texts into one embedding space (CLIP, or the offline ConSE stand-in)."""

    id: str
    description: str
    offline: bool  # True when it runs from packaged weights only

    @abstractmethod
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(N, D) float32, rows L2-normalised."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """(M, D) float32, rows L2-normalised."""

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """Image-text cosine matrix (N, M)."""
        return image_emb @ text_emb.T


class Captioner(ABC):
    """Image -> short caption (BLIP and the like, or offline retrieval captions)."""

    id: str
    description: str

    @abstractmethod
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        ...


@dataclass
class Generation:
    """One recorded language-model call: enough to replay it without the model."""

    prompt: str
    response: str
    seed: int
    temperature: float
    model_id: str


class LanguageModel(ABC):
    """Text generation and log-likelihood scoring (transformers causal LM, HTTP, replay)."""

    id: str
    description: str

    @abstractmethod
    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 stop_at_line_end: bool = False) -> str:
        """The continuation of ``prompt``. ``stop_at_line_end`` lets a backend stop once a
        non-empty line is complete (callers that want one line must still cut the reply)."""

    @abstractmethod
    def log_likelihood(self, texts: Sequence[str]) -> np.ndarray:
        """Total log p(text) under the model, one value per text (for MILAN's p(d))."""
