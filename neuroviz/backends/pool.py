"""Backend wiring in one place: which backends a labelling session uses, each created once.

The command line, the demo workspace builder and the pages' jobs all create backends here,
so a method that needs no language model never loads one and two methods share one
multimodal backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..store import RunInfo, Store

@dataclasses.dataclass
class BackendChoice:
    """Which backends to create when a method needs them (created once, shared by all runs)."""

    multimodal: str | None = None  # None: the offline default for the probed model
    concepts: str = "words20k"
    captioner: str = "retrieval"
    language_model: str = "gemma3-270m"


class BackendPool:
    """Creates each backend on first need, so a method that needs no LLM never loads one."""

    def __init__(self, store: Store, choice: BackendChoice):
        self.store, self.choice = store, choice
        self._made: dict[str, object] = {}

    def get(self, kind: str, model_spec: str):
        if kind in self._made:
            return self._made[kind]
        if kind == "multimodal":
            from .multimodal import create_multimodal, default_multimodal_for

            value = create_multimodal(self.choice.multimodal or default_multimodal_for(model_spec))
        elif kind == "concepts":
            from ..concepts import load_concept_set

            value = load_concept_set(self.choice.concepts, self.store.root)
        elif kind == "captioner":
            from .captioner import create_captioner

            value = create_captioner(self.choice.captioner, multimodal=self.get("multimodal", model_spec), store_root=self.store.root)
        elif kind == "language_model":
            from .language import create_language_model

            value = create_language_model(self.choice.language_model, store_root=self.store.root)
        else:
            raise ValueError(f"Unknown backend kind '{kind}'.")
        self._made[kind] = value
        return value


def build_context(store: Store, run: RunInfo, needs: Sequence[str], backends: BackendPool, progress=None,
                  extra: dict | None = None):
    """A MethodContext for ``run`` with exactly the backends in ``needs``."""
    from ..methods.base import MethodContext

    ctx = MethodContext(store=store, run=run, progress=progress, extra=dict(extra or {}))
    for kind in needs:
        setattr(ctx, kind, backends.get(kind, run.model_spec))
    return ctx
