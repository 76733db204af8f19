"""Small pieces of the study pages that are plain logic: neuron lists, gold lines, rater links."""

from __future__ import annotations

import streamlit as st

from neuroviz.study import StudyError, link_query


def parse_neuron_list(text: str, layers: dict[str, object], default_layer: str | None) -> list[tuple[str, int]]:
    """'layer4:3,5,10-12; layer2:7' or '3,5,7' (the current layer) -> [(layer, neuron)].

    Raises StudyError (a ValueError) naming the bad part, so the page says exactly what to fix.
    """
    out: list[tuple[str, int]] = []
    for part in [p.strip() for p in text.replace("\n", ";").split(";") if p.strip()]:
        if ":" in part:
            layer, numbers = (s.strip() for s in part.split(":", 1))
        else:
            layer, numbers = default_layer, part
        if layer not in layers:
            raise StudyError(f"Unknown layer '{layer}' in '{part}'; extracted layers: {', '.join(layers)}.")
        for chunk in [c.strip() for c in numbers.split(",") if c.strip()]:
            try:
                if "-" in chunk:
                    lo, hi = (int(x) for x in chunk.split("-", 1))
                    out += [(layer, n) for n in range(lo, hi + 1)]
                else:
                    out.append((layer, int(chunk)))
            except ValueError:
                raise StudyError(f"'{chunk}' is not a neuron number or a range like 3-7.") from None
    return out


def parse_gold_lines(text: str, layers: dict[str, object], default_layer: str | None) -> list[tuple[str, int, str, list[str]]]:
    """Gold items typed by the owner, one per line: 'layer4:12 = dog' or '12 = dog | cat, car'
    (wrong labels after '|'; without them, the study draws some) -> [(layer, neuron, right, wrong)].

    Raises StudyError naming the bad line, so the page says exactly what to fix.
    """
    out: list[tuple[str, int, str, list[str]]] = []
    for line in [raw.strip() for raw in text.splitlines() if raw.strip()]:
        where, sep, answer = line.partition("=")
        right, _, wrong = answer.partition("|")
        if not sep or not right.strip():
            raise StudyError(f"'{line}': write a neuron, '=' and what its images plainly show, e.g. 12 = dog.")
        pairs = parse_neuron_list(where, layers, default_layer)
        if len(pairs) != 1:
            raise StudyError(f"'{line}': name one neuron before '=', e.g. {default_layer or 'layer'}:12 = dog.")
        out.append((*pairs[0], right.strip(), [w.strip() for w in wrong.split(",") if w.strip()]))
    return out


def full_link(token: str, secret: str | None = None) -> str:
    """The absolute rater URL when the browser's address is known, else the query string;
    with ``secret``, one rater's personal link."""
    base = None
    try:
        base = st.context.url
    except Exception:
        base = None
    if base:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(base)
        return urlunsplit((parts.scheme, parts.netloc, "/", link_query(token, secret), ""))
    return f"?{link_query(token, secret)}"
