"""Units beyond neurons: the latents of a sparse autoencoder, or directions a user gives.

A :class:`Dictionary` turns a layer's activation vector at one position (a conv map's pixel,
a token, or the whole vector) into one number per unit and back:

    z = sparsify(((x - center) / scale) @ encoder.T + encoder_bias)      (encode)
    x_hat = (z @ decoder) * scale + center                                (decode)

SAE latents (``kind="sae"``, trained by :mod:`neuroviz.sae`) use a ReLU and keep the k
largest codes per position (TopK) or the codes above a threshold learnt in training
(BatchTopK at inference). Directions (``kind="directions"``) are unit vectors v: the unit's
activation is the projection x . v (no centering, no sparsity) and its decoded
contribution is (x . v) v, so ablating it projects the direction out of the layer.

A unit run is an ordinary run whose "neurons" are units: :func:`unit_transform` is applied
to each batch-first layer output inside :func:`neuroviz.extract.extract` before pooling
and maps, so top-k, heatmaps, crops, masks, histograms, methods and studies work on units
unchanged. ``RunInfo.units`` names the dictionary (``"sae:<key>"``, ``"directions:<key>"``;
``"neurons"`` for ordinary runs) and the dictionary's weights hash is folded into the run key.

Dictionaries live under ``CacheLayout.dictionary_dir(key)``: ``dictionary.npz`` (arrays)
and ``meta.json`` (written last: the commit point), keyed by provenance (model and weights,
layer, probe set, hyperparameters and seed for an SAE; the vectors' content for directions).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import NeurovizError, close_names
from .files import atomic_savez, atomic_write_json
from .provenance import hash_bytes, provenance_key

if TYPE_CHECKING:
    import torch

    from .hooks import LayerLayout
    from .store import RunInfo, Store

NEURONS = "neurons"  # RunInfo.units of an ordinary run (and of run.json files that predate units)
UNIT_KINDS = ("sae", "directions")
SPARSITIES = ("topk", "threshold", "linear")
CODE_VERSION = "units-1"


class UnitsError(NeurovizError, ValueError):
    """A dictionary or unit spec that cannot be used (unknown, wrong size, bad file); says why."""


@dataclass(frozen=True)
class Dictionary:
    """One vector per unit for one layer of one model, with how to encode and decode."""

    kind: str  # "sae" | "directions"
    key: str  # provenance key: the folder under dictionaries/
    encoder: np.ndarray  # (units, dim) float32
    encoder_bias: np.ndarray  # (units,)
    decoder: np.ndarray  # (units, dim): the unit's direction in the layer's space
    center: np.ndarray  # (dim,)
    scale: float
    sparsity: str  # "topk" | "threshold" | "linear"
    k: int = 0  # topk: codes kept per position
    threshold: float = 0.0  # threshold: codes below it are zero (BatchTopK at inference)
    names: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)  # model, layer, probe set, hyperparams, metrics, history

    @property
    def n_units(self) -> int:
        return int(self.encoder.shape[0])

    @property
    def dim(self) -> int:
        return int(self.encoder.shape[1])

    @property
    def units_id(self) -> str:
        """What ``RunInfo.units`` records for runs of this dictionary."""
        return f"{self.kind}:{self.key}"

    @property
    def weights_hash(self) -> str:
        """Content hash of every array and setting that changes what a unit computes."""
        parts = [a.astype(np.float32).tobytes() for a in (self.encoder, self.encoder_bias, self.decoder, self.center)]
        settings = json.dumps([self.scale, self.sparsity, self.k, self.threshold]).encode()
        return hash_bytes(b"".join(parts) + settings)

    @property
    def title(self) -> str:
        return title_of(self.kind, {**self.meta, "key": self.key, "n_units": self.n_units})

    def unit_name(self, unit: int) -> str:
        return self.names[unit] if unit < len(self.names) and self.names[unit] else f"{self.kind} unit {unit}"

    # -- the maths (torch, per position) -------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) activations -> (N, units) codes."""
        import torch

        w = torch.from_numpy(self.encoder).to(x.device)
        b = torch.from_numpy(self.encoder_bias).to(x.device)
        c = torch.from_numpy(self.center).to(x.device)
        pre = ((x.float() - c) / self.scale) @ w.T + b
        if self.sparsity == "linear":
            return pre
        codes = torch.relu(pre)
        if self.sparsity == "threshold":
            return codes * (codes >= self.threshold)
        top = torch.topk(codes, min(self.k, codes.shape[1]), dim=1)
        return torch.zeros_like(codes).scatter(1, top.indices, top.values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, units) codes -> (N, dim) reconstruction in the layer's space."""
        import torch

        d = torch.from_numpy(self.decoder).to(z.device)
        return (z @ d) * self.scale + torch.from_numpy(self.center).to(z.device)

    def contribution(self, z: torch.Tensor, units: Sequence[int]) -> torch.Tensor:
        """(N, dim): what ``units`` add to the decoded activation (their codes times directions)."""
        import torch

        idx = torch.as_tensor(list(units), dtype=torch.long, device=z.device)
        d = torch.from_numpy(self.decoder).to(z.device)[idx]
        return (z[:, idx] @ d) * self.scale

    # -- applying it to a layer's output ------------------------------------------------
    def check_layer(self, dim: int, layer: str) -> None:
        if dim != self.dim:
            raise UnitsError(f"The dictionary {self.units_id} has vectors of size {self.dim}, but layer '{layer}' has "
                             f"{dim} neurons; make one for this layer.")


def title_of(kind: str, meta: dict) -> str:
    """A short human name from a dictionary's meta: 'SAE 4x k=32 (R^2 0.83)' or 'directions: cav.npy (3)'."""
    if kind == "sae":
        hp = meta.get("hyperparams", {})
        r2 = meta.get("metrics", {}).get("r2")
        variant = "BatchTopK " if hp.get("variant") == "batchtopk" else ""
        return f"{variant}SAE {hp.get('expansion', '?')}x k={hp.get('k', '?')}" + (f" (R^2 {r2:.2f})" if r2 is not None else "")
    return f"directions: {meta.get('source') or meta.get('key', '?')} ({meta.get('n_units', '?')})"


def unit_word(units: str) -> str:
    """What one unit of a run is called on a page: Neuron, Latent or Direction."""
    return {"sae": "Latent", "directions": "Direction"}.get(units.split(":", 1)[0], "Neuron")


UNIT_PLURALS = {"sae": "SAE latents", "directions": "directions"}


def units_noun(units: str) -> str:
    """A run's units as a plural noun: "neurons", "SAE latents 3f2a1b2c" (the dictionary's short id, as in URLs)."""
    if units == NEURONS or ":" not in units:
        return NEURONS
    kind, _ = units.split(":", 1)
    return f"{UNIT_PLURALS.get(kind, kind)} {short_units(units).split(':', 1)[1]}"


def units_place(layer: str, units: str) -> str:
    """A layer's name, followed by its units when they are not its neurons: "layer4",
    "features.18 · SAE latents 3f2a1b2c"."""
    noun = units_noun(units)
    return layer if noun == NEURONS else f"{layer} · {noun}"


def per_position(out: torch.Tensor, layout: LayerLayout) -> tuple[torch.Tensor, Any]:
    """A batch-first layer output as (positions, channels) rows, and how to fold rows back."""
    if layout.kind == "conv":
        b, c, h, w = out.shape
        rows = out.permute(0, 2, 3, 1).reshape(-1, c)
        return rows, lambda r: r.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    if layout.kind == "tokens":
        b, t, c = out.shape
        return out.reshape(-1, c), lambda r: r.reshape(b, t, -1)
    flat = out.reshape(out.shape[0], -1)
    return flat, lambda r: r


@dataclass(frozen=True)
class UnitTransform:
    """The hook :func:`neuroviz.extract.extract` applies to a batch-first layer output:
    neurons in, units out, in the same layout (so pooling and maps work as for neurons)."""

    dictionary: Dictionary
    layout: LayerLayout

    @property
    def key(self) -> str:
        """Folded into the run key: which dictionary, by content."""
        return provenance_key({"units": self.dictionary.units_id, "weights": self.dictionary.weights_hash,
                               "code": CODE_VERSION})

    @property
    def units_id(self) -> str:
        return self.dictionary.units_id

    @property
    def n_units(self) -> int:
        return self.dictionary.n_units

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        rows, fold = per_position(out, self.layout)
        return fold(self.dictionary.encode(rows))


def unit_transform(dictionary: Dictionary, layout: LayerLayout) -> UnitTransform:
    return UnitTransform(dictionary, layout)


# -- storage ----------------------------------------------------------------------------
def save_dictionary(store: Store, dictionary: Dictionary) -> Path:
    """Write the arrays, then ``meta.json`` (the commit point)."""
    folder = store.dictionary_dir(dictionary.key)
    atomic_savez(folder / "dictionary.npz", encoder=dictionary.encoder.astype(np.float32),
                 encoder_bias=dictionary.encoder_bias.astype(np.float32), decoder=dictionary.decoder.astype(np.float32),
                 center=dictionary.center.astype(np.float32))
    meta = {**dictionary.meta, "kind": dictionary.kind, "key": dictionary.key, "scale": float(dictionary.scale),
            "sparsity": dictionary.sparsity, "k": int(dictionary.k), "threshold": float(dictionary.threshold),
            "names": list(dictionary.names), "n_units": dictionary.n_units, "dim": dictionary.dim,
            "weights_hash": dictionary.weights_hash}
    atomic_write_json(folder / "meta.json", meta)
    store._committed()
    return folder


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_dictionary(store: Store, key: str) -> Dictionary:
    """The stored dictionary ``key`` (a full key, a unique prefix, or ``kind:key``)."""
    key = key.split(":", 1)[1] if ":" in key else key
    folder = store.dictionary_dir(key)
    if not (folder / "meta.json").exists():
        known = [m["key"] for m in list_dictionaries(store)]
        matches = [k for k in known if len(key) >= 4 and k.startswith(key)]
        if len(matches) != 1:
            close = close_names(key, known)
            raise UnitsError(f"No dictionary '{key}' in the cache" + (f"; did you mean {', '.join(close)}?" if close else ".")
                             + " Train one with `python -m neuroviz sae train` or add directions with "
                               "`python -m neuroviz units add`.")
        folder = store.dictionary_dir(matches[0])
    meta = _read_meta(folder)
    if meta is None:
        raise UnitsError(f"The dictionary in {folder} has no readable meta.json; train it again.")
    with np.load(folder / "dictionary.npz") as arrays:
        enc, bias, dec, center = (np.array(arrays[n]) for n in ("encoder", "encoder_bias", "decoder", "center"))
    return Dictionary(meta["kind"], meta["key"], enc, bias, dec, center, float(meta["scale"]), meta["sparsity"],
                      int(meta.get("k", 0)), float(meta.get("threshold", 0.0)), tuple(meta.get("names", [])), meta)


def list_dictionaries(store: Store, model_spec: str | None = None, layer: str | None = None) -> list[dict]:
    """Meta of every stored dictionary (oldest first), optionally of one model and layer."""
    metas = [m for m in (_read_meta(p.parent) for p in store.dictionaries_dir().glob("*/meta.json")) if m]
    metas = [m for m in metas if (model_spec is None or m.get("model_spec") == model_spec)
             and (layer is None or m.get("layer") == layer)]
    return sorted(metas, key=lambda m: m.get("created_at", 0.0))


def dictionary_of_run(store: Store, run: RunInfo) -> Dictionary | None:
    """The dictionary a unit run was extracted with (None for a neuron run)."""
    if run.units == NEURONS:
        return None
    return load_dictionary(store, run.units)


def units_title(store: Store, units: str) -> str:
    """How a page names a run's units: 'neurons', or the dictionary's title (meta only: no arrays read)."""
    if units == NEURONS or ":" not in units:
        return NEURONS
    kind, key = units.split(":", 1)
    meta = _read_meta(store.dictionary_dir(key))
    return title_of(kind, meta) if meta else units


def short_units(units: str) -> str:
    """The URL form of a units id: ``sae:<first 8 of key>`` (unique in practice, resolved by prefix)."""
    if units == NEURONS or ":" not in units:
        return units
    kind, key = units.split(":", 1)
    return f"{kind}:{key[:8]}"


def units_match(run_units: str, wanted: str | None) -> bool:
    """True when a run's units are the wanted ones (None or 'neurons': neuron runs; a
    ``kind:key`` spec matches by key prefix, so a short id from a URL works)."""
    if wanted is None or wanted == NEURONS:
        return run_units == NEURONS
    if run_units == NEURONS:
        return False
    kind, key = run_units.split(":", 1)
    w_kind, _, w_key = wanted.partition(":") if ":" in wanted else ("", "", wanted)
    return (not w_kind or w_kind == kind) and len(w_key) >= 4 and key.startswith(w_key)


# -- directions -------------------------------------------------------------------------
def read_vectors(path: Path | str) -> np.ndarray:
    """One vector per unit from a .npy, .npz (first array) or .pt file (a tensor or a dict of one)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UnitsError(f"No directions file {path}.")
    try:
        if path.suffix == ".pt":
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = next(iter(obj.values()))
            array = np.asarray(obj.detach().numpy() if hasattr(obj, "detach") else obj, dtype=np.float32)
        elif path.suffix == ".npz":
            with np.load(path) as z:
                array = np.asarray(z[z.files[0]], dtype=np.float32)
        else:
            array = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
    except Exception as exc:  # numpy, zip and torch raise many kinds for a bad file
        raise UnitsError(f"Could not read directions from {path}: {exc}") from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or not np.isfinite(array).all():
        raise UnitsError(f"{path} must hold finite vectors, one per row (units x neurons); it has shape {array.shape}.")
    if (np.linalg.norm(array, axis=1) == 0).any():
        raise UnitsError(f"{path} has an all-zero direction; remove it.")
    return array


def directions_dictionary(vectors: np.ndarray, model_spec: str, weights_id: str, layer: str,
                          names: Sequence[str] = (), source: str = "") -> Dictionary:
    """A dictionary of user directions: each unit is the projection on its unit-length vector."""
    vectors = np.asarray(vectors, dtype=np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    if names and len(names) != len(unit):
        raise UnitsError(f"{len(names)} names for {len(unit)} directions; give one name per line, or none.")
    key = provenance_key({"kind": "directions", "model": model_spec, "weights": weights_id, "layer": layer,
                          "vectors": hash_bytes(unit.tobytes()), "code": CODE_VERSION})
    import time

    meta = {"model_spec": model_spec, "weights_id": weights_id, "layer": layer, "source": source,
            "created_at": time.time()}
    return Dictionary("directions", key, unit, np.zeros(len(unit), np.float32), unit.copy(),
                      np.zeros(unit.shape[1], np.float32), 1.0, "linear", names=tuple(names), meta=meta)


def read_names(path: Path | str | None) -> list[str]:
    """One name per line (blank lines kept as unnamed units)."""
    if not path:
        return []
    p = Path(path).expanduser()
    if not p.exists():
        raise UnitsError(f"No names file {p}.")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
