"""Provenance keys: every cached artefact is named by a hash of everything that made it.

Change any input (model weights, layer, pooling, probe set, preprocessing, code version,
hyperparameters) and the key changes, so a stale artefact is never served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any


def _canonical(value: Any) -> Any:
    """Turn dataclasses, paths, tuples and sets into plain JSON values with a stable order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _canonical(v) for k, v in sorted(dataclasses.asdict(value).items())}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # repr keeps every digit, so 0.1 and 0.10000001 differ
    return value


def canonical_json(value: Any) -> str:
    """The canonical JSON text that a provenance key hashes."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))


def provenance_key(value: Any, length: int = 20) -> str:
    """A short hex digest naming an artefact by everything that produced it."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def hash_bytes(data: bytes, length: int = 20) -> str:
    """Content hash used for image ids and weight files."""
    return hashlib.sha256(data).hexdigest()[:length]


def hash_file(path: Path, length: int = 20) -> str:
    """Content hash of a file, read in blocks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def hash_state_dict(state: dict) -> str:
    """Hash of a model's parameters and buffers (names, shapes and values)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu().contiguous()
            digest.update(str(tuple(t.shape)).encode())
            digest.update(str(t.dtype).encode())
            if t.dtype == torch.bfloat16:
                t = t.float()
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:20]
