"""One registry pattern for everything a user names by a spec string.

Probed models, multimodal backends, captioners, language models, concept sets and
description methods are each a :class:`Registry`: a name (or a name prefix followed by ``:``
and an argument) maps to a factory. One grammar for every spec::

    name                 an entry, e.g. ``conse``, ``retrieval``, ``words20k``, ``clip_dissect``
    prefix:argument      a prefix entry gets the argument, e.g. ``open_clip:ViT-B-32/openai``,
                         ``file:/path/concepts.txt``, ``hf:org/model``

Entries register themselves on import (``@REGISTRY.register("name")``), listing reads the
dict (as open_clip's and timm's registries do), and an unknown name gets close-name
suggestions. ``tests/test_registries.py`` runs a contract test over every entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import NeurovizError, unknown_name_message

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(NeurovizError, KeyError):
    """A spec that names no registry entry; the message lists close names."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: how to create it and how to describe it in a listing."""

    name: str
    factory: Callable[..., T]
    description: str = ""
    prefix: bool = False  # the spec is ``name:argument`` and the factory takes the argument first
    example: str | None = None  # for prefix entries: a spec the contract test can create offline
    tags: frozenset[str] = field(default_factory=frozenset)


class Registry(Generic[T]):
    """Names (and ``prefix:`` names) mapped to factories, listable, with suggestions."""

    def __init__(self, kind: str):
        self.kind = kind  # "probed model", "multimodal backend", ... (used in messages)
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, description: str = "", prefix: bool = False, example: str | None = None,
                 tags: tuple[str, ...] = ()) -> Callable[[F], F]:
        """Decorator: register a factory (function or class) under ``name``."""

        def decorate(factory: F) -> F:
            self.add(name, factory, description=description, prefix=prefix, example=example, tags=tags)
            return factory

        return decorate

    def add(self, name: str, factory: Callable[..., T], *, description: str = "", prefix: bool = False,
            example: str | None = None, tags: tuple[str, ...] = ()) -> None:
        """Register ``factory`` under ``name`` (a later registration of the same name replaces it)."""
        doc = description or ((factory.__doc__ or "").strip().splitlines() or [""])[0]
        self._entries[name] = Entry(name, factory, doc, prefix, example, frozenset(tags))

    def names(self) -> list[str]:
        """Registered names in registration order (prefix entries as ``prefix:``)."""
        return [e.name + (":" if e.prefix else "") for e in self._entries.values()]

    def entries(self) -> list[Entry[T]]:
        return list(self._entries.values())

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.entries())

    def __contains__(self, spec: object) -> bool:
        return isinstance(spec, str) and self.find(spec) is not None

    def find(self, spec: str) -> tuple[Entry[T], str | None] | None:
        """The entry a spec names and its argument (None for plain names), or None."""
        if spec in self._entries and not self._entries[spec].prefix:
            return self._entries[spec], None
        head, sep, rest = spec.partition(":")
        entry = self._entries.get(head)
        if sep and entry is not None and entry.prefix:
            return entry, rest
        return None

    def resolve(self, spec: str) -> tuple[Entry[T], str | None]:
        """Like :meth:`find`, but an unknown spec raises UnknownNameError with suggestions."""
        found = self.find(spec)
        if found is None:
            raise UnknownNameError(unknown_name_message(self.kind, spec, self.names()))
        entry, argument = found
        if entry.prefix and not argument:
            raise UnknownNameError(f"The {self.kind} spec '{spec}' needs an argument after the colon"
                                   + (f", e.g. {entry.example}." if entry.example else "."))
        return found

    def create(self, spec: str, *args: Any, **kwargs: Any) -> T:
        """Create what ``spec`` names; extra arguments go to the factory."""
        entry, argument = self.resolve(spec)
        return entry.factory(argument, *args, **kwargs) if entry.prefix else entry.factory(*args, **kwargs)
