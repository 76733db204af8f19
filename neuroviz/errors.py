"""One base for every error a user can cause, and close-name suggestions for unknown names.

The command line and the pages catch :class:`NeurovizError` once and show its message; any
other exception is a bug and keeps its traceback in the log. Subclasses also derive from
the builtin they used to be (ValueError, KeyError, ...) so existing ``except`` clauses hold.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NeurovizError(Exception):
    """An error whose message tells the user what was wrong and what to do."""

    def __str__(self) -> str:  # KeyError subclasses would otherwise print their message quoted
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def close_names(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names from ``choices`` that look like ``name`` (best first)."""
    choices = [str(c) for c in choices]
    found = difflib.get_close_matches(str(name), choices, n=n, cutoff=0.5)
    lowered = str(name).lower()
    found += [c for c in choices if lowered and lowered in c.lower() and c not in found]
    return found[:n]


def unknown_name_message(kind: str, name: str, choices: Iterable[str], listed: int = 12) -> str:
    """'Unknown layer 'x'. Did you mean: ...? Layers: ...' in one sentence or two."""
    choices = sorted({str(c) for c in choices})
    close = close_names(name, choices)
    text = f"Unknown {kind} '{name}'."
    if close:
        text += f" Did you mean {', '.join(close)}?"
    if choices:
        more = f" (and {len(choices) - listed} more)" if len(choices) > listed else ""
        text += f" Known: {', '.join(choices[:listed])}{more}."
    return text
