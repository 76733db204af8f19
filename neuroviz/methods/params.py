"""Method hyperparameters from text: the ``KEY=VALUE`` overrides of ``label --param``.

Each method keeps its hyperparameters in one config dataclass with the paper's defaults;
this turns a list of overrides into one config per chosen method, and refuses a key that
no chosen method has (with the keys they do have), so a typo never runs with defaults.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from .base import MethodError, get_method


def parse_value(text: str) -> object:
    """A JSON value when the text is one (numbers, true/false, lists, quoted strings), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(params: Sequence[str]) -> dict[str, object]:
    """['top_k=5', 'similarity=cos'] -> {'top_k': 5, 'similarity': 'cos'}."""
    pairs = {}
    for item in params:
        if "=" not in item:
            raise MethodError(f"--param takes KEY=VALUE, got '{item}'.")
        key, value = item.split("=", 1)
        pairs[key.strip()] = parse_value(value.strip())
    return pairs


def configs_for(method_names: Sequence[str], params: Sequence[str]) -> dict[str, object]:
    """Each method's config with the KEY=VALUE overrides that apply to it (unknown keys are errors)."""
    pairs = parse_overrides(params)
    used: set[str] = set()
    options: set[str] = set()
    configs = {}
    for name in method_names:
        method = get_method(name)
        cls = method.config_class
        if not dataclasses.is_dataclass(cls):
            configs[name] = method.default_config()
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        options |= fields
        mine = {k: v for k, v in pairs.items() if k in fields}
        used.update(mine)
        try:
            configs[name] = cls(**mine)
        except TypeError as exc:  # a value of the wrong kind, e.g. top_k=abc
            given = ", ".join(f"{k}={v!r}" for k, v in mine.items())
            raise MethodError(f"{method.title} cannot take {given}: {exc}.") from None
    unknown = set(pairs) - used
    if unknown:
        raise MethodError(f"No chosen method has the parameter(s) {', '.join(sorted(unknown))}. "
                          f"Parameters: {', '.join(sorted(options))}.")
    return configs
