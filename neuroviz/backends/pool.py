"""Backend wiring in one place: which backends a labelling session uses, each created once.

The command line, the demo workspace builder and the pages' jobs all create backends here,
so a method that needs no language model never loads one and two methods share one
multimodal backend. :data:`CREATORS` names the backend kinds (the words a method's ``needs``
may use) and creates each through its registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import unknown_name_message
from ..registry import UnknownNameError
from ..store import RunInfo, Store


@dataclasses.dataclass
class BackendChoice:
    """Which backends to create when a method needs them (created once, shared by all runs)."""

    multimodal: str | None = None  # None: the offline default for the probed model
    concepts: str = "words20k"
    captioner: str = "retrieval"
    language_model: str = "gemma3-270m"


def _multimodal(pool: BackendPool, model_spec: str) -> object:
    from .multimodal import create_multimodal, default_multimodal_for

    return create_multimodal(pool.choice.multimodal or default_multimodal_for(model_spec))


def _concepts(pool: BackendPool, model_spec: str) -> object:
    from ..concepts import load_concept_set

    return load_concept_set(pool.choice.concepts, pool.store.root)


def _captioner(pool: BackendPool, model_spec: str) -> object:
    from .captioner import create_captioner

    return create_captioner(pool.choice.captioner, multimodal=pool.get("multimodal", model_spec), store_root=pool.store.root)


def _language_model(pool: BackendPool, model_spec: str) -> object:
    from .language import create_language_model

    return create_language_model(pool.choice.language_model, store_root=pool.store.root)


#: How each backend kind a method may need is created (through its registry, from the choice).
#: The keys are the kinds a method's ``needs`` may name; MethodContext has one attribute each.
CREATORS: dict[str, Callable[[BackendPool, str], object]] = {
    "multimodal": _multimodal,
    "concepts": _concepts,
    "captioner": _captioner,
    "language_model": _language_model,
}


class BackendPool:
    """Creates each backend on first need, so a method that needs no LLM never loads one."""

    def __init__(self, store: Store, choice: BackendChoice):
        self.store, self.choice = store, choice
        self._made: dict[str, object] = {}

    def get(self, kind: str, model_spec: str) -> Any:
        """The backend of ``kind`` for labelling ``model_spec``'s neurons, created once."""
        if kind not in self._made:
            if kind not in CREATORS:
                raise UnknownNameError(unknown_name_message("backend kind", kind, CREATORS))
            self._made[kind] = CREATORS[kind](self, model_spec)
        return self._made[kind]


def build_context(store: Store, run: RunInfo, needs: Sequence[str], backends: BackendPool, progress=None,
                  extra: dict | None = None):
    """A MethodContext for ``run`` with exactly the backends in ``needs``."""
    from ..methods.base import MethodContext

    ctx = MethodContext(store=store, run=run, progress=progress, extra=dict(extra or {}))
    for kind in needs:
        setattr(ctx, kind, backends.get(kind, run.model_spec))
    return ctx
