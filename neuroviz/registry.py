"""One registry pattern for everything a user names by a spec string.

Probed models, multimodal backends, captioners, language models, concept sets and
description methods are each a :class:`Registry`: a name, or a name followed by ``:`` and an
argument, maps to a factory. One grammar for every spec::

    name               an entry, e.g. ``conse``, ``retrieval``, ``imagenet``, ``clip_dissect``,
                       ``offline:mobilenet_v2`` (a plain name may itself contain a colon)
    name:argument      an entry that takes an argument gets it whole, options included, e.g.
                       ``open_clip:ViT-B-32@openai``, ``conse:mobilenet_v2@20``, ``file:/path/words.txt``

Entries register themselves on import (``@REGISTRY.register("name")``), a listing reads the
dict (as open_clip's and timm's registries do), and an unknown name raises
:class:`UnknownNameError` with close names. ``tests/test_registries.py`` creates a tiny
instance of every entry of every registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import NeurovizError, close_names

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(NeurovizError, KeyError):
    """A spec that names no registry entry; the message lists close names."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: how to create it and how to describe it in a listing.

    ``argument`` is the placeholder of the argument the entry takes after the colon (e.g.
    ``<model>@<pretrained tag>``); None for an entry that takes none. An entry whose
    argument is optional is also valid alone (``conse``), and its factory then gets None.
    """

    name: str
    factory: Callable[..., T]
    description: str = ""
    argument: str | None = None
    argument_optional: bool = False
    example: str | None = None  # a spec that creates this entry offline (the contract test uses it)
    listing: Callable[[], list[str]] | None = None  # the concrete specs it offers, e.g. every hub model

    @property
    def usage(self) -> str:
        """How to write a spec for it: ``imagenet``, ``open_clip:<model>@<tag>``, ``conse[:<classifier>]``."""
        if self.argument is None:
            return self.name
        return f"{self.name}[:{self.argument}]" if self.argument_optional else f"{self.name}:{self.argument}"

    def specs(self) -> list[str]:
        """Concrete specs to offer a user: the listing, else the bare name when that is valid."""
        if self.listing is not None:
            return list(self.listing())
        return [self.name] if self.argument is None or self.argument_optional else []


class Registry(Generic[T]):
    """Names (and ``name:argument`` names) mapped to factories, listable, with suggestions.

    Args:
        kind: what the entries are, for messages ("multimodal backend").
        error: the UnknownNameError subclass to raise; a kind's subclass can also derive from
            the error its callers caught before (BackendUnavailable, ValueError, ...).
        usage: a sentence appended to unknown-name messages.
        fallback: spellings outside the grammar that a kind keeps, said once: maps a spec
            that names no entry to one that does, or returns None.
    """

    def __init__(self, kind: str, *, error: type[UnknownNameError] = UnknownNameError, usage: str = "",
                 fallback: Callable[[str], str | None] | None = None):
        self.kind = kind
        self.error = error
        self.usage = usage
        self.fallback = fallback
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, description: str = "", argument: str | None = None, argument_optional: bool = False,
                 example: str | None = None, listing: Callable[[], list[str]] | None = None) -> Callable[[F], F]:
        """Decorator: register a factory (function or class) under ``name``."""

        def decorate(factory: F) -> F:
            self.add(name, factory, description=description, argument=argument, argument_optional=argument_optional,
                     example=example, listing=listing)
            return factory

        return decorate

    def add(self, name: str, factory: Callable[..., T], *, description: str = "", argument: str | None = None,
            argument_optional: bool = False, example: str | None = None,
            listing: Callable[[], list[str]] | None = None) -> None:
        """Register ``factory`` under ``name`` (a later registration of the same name replaces it).

        The factory is called as ``factory(*args, **kwargs)``, or ``factory(argument, *args, **kwargs)``
        when the entry takes an argument. The description defaults to its docstring's first line.
        """
        doc = description or ((factory.__doc__ or "").strip().splitlines() or [""])[0]
        self._entries[name] = Entry(name, factory, doc, argument, argument_optional, example, listing)

    def entries(self) -> list[Entry[T]]:
        """Every entry, in registration order."""
        return list(self._entries.values())

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.entries())

    def __contains__(self, spec: object) -> bool:
        """True when ``spec`` names an entry (its argument is only checked by create)."""
        return isinstance(spec, str) and self.find(spec) is not None

    def names(self) -> list[str]:
        """How to write each entry's spec, in registration order (for messages and help)."""
        return [entry.usage for entry in self._entries.values()]

    def specs(self) -> list[str]:
        """Concrete specs a user can pick, entry by entry (see :meth:`Entry.specs`)."""
        return [spec for entry in self._entries.values() for spec in entry.specs()]

    def find(self, spec: str) -> tuple[Entry[T], str | None] | None:
        """The entry a spec names and its argument (None when the spec is the bare name), or None."""
        found = self._match(spec)
        if found is None and self.fallback is not None:
            rewritten = self.fallback(spec)
            found = self._match(rewritten) if rewritten is not None else None
        return found

    def _match(self, spec: str) -> tuple[Entry[T], str | None] | None:
        entry = self._entries.get(spec)
        if entry is not None:
            return entry, None
        head, colon, argument = spec.partition(":")
        entry = self._entries.get(head)
        if colon and entry is not None and entry.argument is not None:
            return entry, argument
        return None

    def resolve(self, spec: str) -> tuple[Entry[T], str | None]:
        """Like :meth:`find`, but an unknown spec raises ``self.error`` with close names."""
        found = self.find(spec)
        if found is None:
            raise self.error(self._unknown_message(spec))
        entry, argument = found
        if entry.argument is not None and not entry.argument_optional and not argument:
            raise self.error(f"The {self.kind} '{spec}' needs an argument: write {entry.usage}"
                             + (f", e.g. {entry.example}." if entry.example else "."))
        return entry, argument

    def _unknown_message(self, spec: str) -> str:
        """'Unknown X 'spec'. Did you mean ...? Known: ...' with each entry written as its usage."""
        usage = {name: entry.usage for name, entry in self._entries.items()}
        takes_argument = [name for name, entry in self._entries.items() if entry.argument is not None]
        close = close_names(spec, usage) or close_names(spec.partition(":")[0], takes_argument)
        text = f"Unknown {self.kind} '{spec}'."
        if close:
            text += f" Did you mean {', '.join(usage[name] for name in close)}?"
        text += f" Known: {', '.join(usage.values())}."
        return text + (f" {self.usage}" if self.usage else "")

    def create(self, spec: str, *args: Any, **kwargs: Any) -> T:
        """Create what ``spec`` names; extra arguments go to the factory."""
        entry, argument = self.resolve(spec)
        if entry.argument is None:
            return entry.factory(*args, **kwargs)
        return entry.factory(argument or None, *args, **kwargs)
