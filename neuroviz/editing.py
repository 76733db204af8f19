"""Editing: switch chosen neurons off and measure what the model's predictions do.

MILAN (Hernandez et al., ICLR 2022, section "Editing") finds neurons whose descriptions
mention text and deletes them, which makes a classifier less fooled by text that is
spuriously correlated with classes. Here an :class:`Edit` names a set of neurons per layer
and an ablation mode:

- ``zero``: the neuron's output is set to 0;
- ``mean``: the neuron's output is set to its mean over the probe set, taken from the
  store's ``neuron_stats`` of the run's *pooled* activation. A conv channel's whole map is
  set to that constant, because a constant map whose spatial mean is m is the map that
  gives the pooled value m under mean pooling (under max pooling the constant has max m).
  Token layers get the constant on every token.

Edits never touch the weights: they are forward hooks installed by the context manager
:func:`applied`, which removes them on exit, even after an exception. An edit is stored
as a small record (``store.put_record("edit", name, ...)``); deleting the record deletes
the edit. Prediction passes are cached by provenance (model weights, preprocessing, probe
set, the edit's neurons/mode/values), so re-evaluating an edit is instant.

An edit may also name the units of a dictionary (``Edit.units = "sae:<key>"``, see
:mod:`neuroviz.units`): its "neurons" are then latents (or directions) of that dictionary's
layer, and ablating one subtracts its decoded contribution at every position
(:func:`units_ablated`); ``mean`` sets its code to its mean over the probe set instead of 0.
Everything else (caching, random controls, stored comparisons, downloads) is the same, so
the Editing page and the ``edit`` command treat latents as they treat neurons.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclasses_fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .datasets import ProbeSet
from .errors import NeurovizError
from .progress import Progress
from .provenance import provenance_key
from .store import Store
from .units import NEURONS, Dictionary, load_dictionary, units_match

if TYPE_CHECKING:  # torch is imported where a model runs: pages read edits without loading it
    import torch

    from .hooks import LayerLayout
    from .models import ProbedModel

CODE_VERSION = "editing-1"
ABLATION_MODES = ("zero", "mean")
EDIT_NAMESPACE = "edit"
EVALUATION_NAMESPACE = "edit_evaluation"  # store records: evaluation key -> Comparison.to_record()
EVALUATED_KEY = "evaluated"  # in an evaluation record: the edit and the settings it was evaluated with
TOP_CLASSES_KEPT = 5


class EditError(NeurovizError, ValueError):
    """An edit that cannot be built or applied; the message says what to change."""


# ----------------------------------------------------------------------------------------
# the edit record


@dataclass
class Edit:
    """Neurons to ablate, per layer, and how. ``values`` holds the replacement per neuron
    (same order as ``neurons[layer]``) for ``mean`` mode; ``zero`` mode needs none."""

    name: str
    model_spec: str
    neurons: dict[str, list[int]]
    mode: str = "zero"
    values: dict[str, list[float]] | None = None
    probe_set_id: str | None = None  # where the mean values were measured
    description: str = ""
    source: dict | None = None  # e.g. {"audit": "<audit id>", "query": "text"}
    created: float = field(default_factory=time.time)
    units: str = NEURONS  # or a dictionary's units id ("sae:<key>"): then ``neurons`` are its units

    @property
    def n_neurons(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    @property
    def effect_key(self) -> str:
        """Hash of what the edit does (not its name), for caching prediction passes.
        (Neuron edits hash as they did before units existed, so their cached passes stay valid.)"""
        what = {"model": self.model_spec, "mode": self.mode, "neurons": {k: sorted(v) for k, v in self.neurons.items() if v},
                "values": self._value_map()}
        return provenance_key(what if self.units == NEURONS else {**what, "units": self.units})

    @property
    def unit_word(self) -> str:
        """'neuron' or 'latent' / 'direction', for captions."""
        from .units import unit_word

        return unit_word(self.units).lower()

    def _value_map(self) -> dict[str, dict[int, float]] | None:
        if self.mode != "mean" or not self.values:
            return None
        return {layer: {int(n): float(v) for n, v in zip(self.neurons[layer], self.values.get(layer, []))}
                for layer in self.neurons}

    def to_record(self) -> dict:
        """The JSON record stored under ``edit/<name>``."""
        return {"model": self.model_spec, **asdict(self)}

    @classmethod
    def from_record(cls, record: dict) -> Edit:
        """Rebuild an edit from its stored record (JSON turns neuron numbers into ints again)."""
        fields = {k: record[k] for k in ("name", "model_spec", "neurons", "mode", "values", "probe_set_id",
                                         "description", "source", "created", "units") if k in record}
        fields.setdefault("model_spec", record.get("model", ""))
        fields["neurons"] = {str(k): [int(n) for n in v] for k, v in fields.get("neurons", {}).items()}
        return cls(**fields)


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise EditError("Give the edit a name (e.g. 'no-text-neurons').")
    if len(name) > 80 or re.search(r"[\x00-\x1f/\\]", name):
        raise EditError(f"Edit name '{name[:40]}' is not usable: use at most 80 characters, without slashes or control characters.")
    return name


def mean_values(store: Store, model_spec: str, probe_set_id: str, layer: str, neurons: Sequence[int],
                pooling: str | None = None, units: str = NEURONS) -> list[float]:
    """Each neuron's (or unit's) mean pooled activation over the probe set, from the stored run.

    Prefers a mean-pooled run of the layer (its mean is what the constant map reproduces).
    """
    runs = [r for r in store.find_runs(model_spec, probe_set_id, layer) if units_match(r.units, units)]
    if pooling:
        runs = [r for r in runs if r.pooling == pooling]
    if not runs:
        raise EditError(f"No extraction of {model_spec} layer '{layer}' over probe set {probe_set_id} in the store; "
                        f"extract it first (`python -m neuroviz extract {model_spec} --layers {layer}`) or use mode 'zero'.")
    runs.sort(key=lambda r: (r.pooling not in ("mean", "cls"), -r.created_at))
    stats = store.neuron_stats(runs[0].run_key)
    means = stats.set_index("neuron")["mean"]
    out = []
    for n in neurons:
        if int(n) not in means.index:
            raise EditError(f"Neuron {n} does not exist in layer '{layer}' (0..{len(means) - 1}).")
        out.append(float(means.loc[int(n)]))
    return out


def make_edit(name: str, model_spec: str, neurons: Mapping[str, Sequence[int]], mode: str = "zero",
              store: Store | None = None, probe_set_id: str | None = None, description: str = "",
              source: dict | None = None, units: str = NEURONS) -> Edit:
    """Build a validated edit; ``mean`` mode reads the means from the store now, so the
    stored edit is self-contained and applies the same way later. ``units``: a dictionary's
    units id when ``neurons`` are its latents (one layer: the dictionary's)."""
    if mode not in ABLATION_MODES:
        raise EditError(f"Unknown ablation mode '{mode}'; choose one of {', '.join(ABLATION_MODES)}.")
    clean = {str(layer): sorted({int(n) for n in ns}) for layer, ns in neurons.items() if len(ns)}
    if not clean:
        raise EditError(f"Choose at least one {'neuron' if units == NEURONS else 'unit'} to ablate.")
    if units != NEURONS and len(clean) > 1:
        raise EditError(f"An edit of units names one layer (its dictionary's), not {', '.join(clean)}.")
    values = None
    if mode == "mean":
        if store is None or probe_set_id is None:
            raise EditError("Mean ablation needs the store and the probe set whose means to use.")
        values = {layer: mean_values(store, model_spec, probe_set_id, layer, ns, units=units) for layer, ns in clean.items()}
    return Edit(_check_name(name), model_spec, clean, mode, values, probe_set_id, description, source, units=units)


def random_counterpart(edit: Edit, layer_sizes: dict[str, int], seed: int = 0, store: Store | None = None,
                       exclude: Mapping[str, Sequence[int]] | None = None) -> Edit:
    """An edit of as many neurons per layer as ``edit``, drawn at random from the rest of each layer
    (never from ``exclude[layer]``: see :func:`control_exclusions`).

    The control an ablation needs: removing k "text" neurons means something only if it
    changes more than removing k neurons picked by chance from the same layers.
    """
    rng = np.random.default_rng(seed)
    neurons = {}
    for layer, chosen in edit.neurons.items():
        left_out = np.union1d(np.asarray(chosen, dtype=int), np.asarray((exclude or {}).get(layer, []), dtype=int))
        others = np.setdiff1d(np.arange(int(layer_sizes[layer])), left_out)
        if len(others) < len(chosen):
            raise EditError(f"Layer {layer} has too few other neurons for a random group of {len(chosen)}.")
        neurons[layer] = sorted(rng.choice(others, size=len(chosen), replace=False).tolist())
    return make_edit(f"{edit.name}-random-{seed}", edit.model_spec, neurons, edit.mode, store, edit.probe_set_id,
                     description=f"random control for '{edit.name}' (seed {seed})", units=edit.units)


def control_exclusions(store: Store | None, edit: Edit, probe_set_id: str) -> dict[str, list[int]]:
    """Per layer of ``edit``, the units random controls never draw: the dead ones (never active
    on the probe set, from the layer's newest run of the edit's units). Ablating a dead latent
    changes nothing, so an SAE with many of them would make any edit look better than chance."""
    from .methods.base import dead_units

    out: dict[str, list[int]] = {}
    if store is None:
        return out
    for layer in edit.neurons:
        runs = [r for r in store.find_runs(edit.model_spec, probe_set_id, layer) if units_match(r.units, edit.units)]
        dead = dead_units(store, max(runs, key=lambda r: r.created_at)) if runs else []
        if dead:
            out[layer] = dead
    return out


def evaluate_controls(model: ProbedModel, edit: Edit, probe_set: ProbeSet, store: Store | None = None,
                      n_groups: int = 3, max_images: int | None = None, progress: Progress | None = None) -> list[Comparison]:
    """Evaluate ``n_groups`` random counterparts of ``edit`` (seeds 0..n-1, each pass cached)."""
    dictionary = dictionary_of_edit(edit, store)
    sizes = {layer: dictionary.n_units if dictionary else model.layer(layer).n_neurons for layer in edit.neurons}
    exclude = control_exclusions(store, edit, probe_set.id)
    out = []
    for seed in range(n_groups):
        control = random_counterpart(edit, sizes, seed, store if edit.mode == "mean" else None, exclude)
        stage = None if progress is None else (
            lambda d, t, m, seed=seed: progress(seed * t + d, n_groups * t, f"random group {seed + 1}/{n_groups}: {m}"))
        out.append(evaluate_edit(model, control, probe_set, store, max_images, progress=stage))
    return out


def control_table(cmp: Comparison, controls: Sequence[Comparison]):
    """This edit's headline numbers beside the min / mean / max of its random controls."""
    import pandas as pd

    def values(c: Comparison) -> dict[str, float | None]:
        return {"images changed": float(len(c.changed)), "agreement": c.agreement,
                "accuracy drop": c.accuracy_drop, "confidence drop": c.confidence_drop}

    rows = []
    for key, value in values(cmp).items():
        ctrl_values = [values(c)[key] for c in controls]
        ctrl = [v for v in ctrl_values if v is not None]
        if value is None or not ctrl or len(ctrl) < len(ctrl_values):
            continue
        rows.append({"measure": key, "this edit": value, "random min": min(ctrl), "random mean": float(np.mean(ctrl)),
                     "random max": max(ctrl), "share of random groups with less effect":
                     float(np.mean([(v > value) if key == "agreement" else (v < value) for v in ctrl]))})
    return pd.DataFrame(rows)


def parse_neuron_list(text: str) -> dict[str, list[int]]:
    """``"layer4:1,2,3; features.14:7"`` -> ``{"layer4": [1, 2, 3], "features.14": [7]}``."""
    out: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in re.split(r"[;\n]", text or ""))):
        layer, _, ids = part.rpartition(":")
        layer = layer.strip()
        if not layer:
            raise EditError(f"Write neurons as LAYER:N,N;LAYER:N (e.g. layer4:12,40), got '{part}'.")
        try:
            out.setdefault(layer, []).extend(int(x) for x in re.split(r"[,\s]+", ids.strip()) if x)
        except ValueError:
            raise EditError(f"Neuron numbers must be whole numbers, got '{ids.strip()}' for layer {layer}.") from None
    return out


def save_edit(store: Store, edit: Edit) -> None:
    """Store (or replace) a named edit."""
    _check_name(edit.name)
    store.put_record(EDIT_NAMESPACE, edit.name, edit.to_record())


def load_edit(store: Store, name: str) -> Edit:
    """A saved edit by name, or an error that lists the saved ones."""
    record = store.get_record(EDIT_NAMESPACE, name)
    if record is None:
        known = [k for k, _, _ in store.list_records(EDIT_NAMESPACE)]
        raise EditError(f"No edit named '{name}'." + (f" Saved edits: {', '.join(known[:10])}." if known else " No edits are saved yet."))
    return Edit.from_record(record)


def list_edits(store: Store, model_spec: str | None = None) -> list[Edit]:
    """Saved edits, newest first, optionally only those of one model."""
    edits = [Edit.from_record(v) for _, v, _ in store.list_records(EDIT_NAMESPACE)]
    return [e for e in edits if model_spec is None or e.model_spec == model_spec]


def delete_edit(store: Store, name: str) -> None:
    """Delete a saved edit. The model was never modified, so nothing else needs undoing."""
    store.delete_record(EDIT_NAMESPACE, name)


# ----------------------------------------------------------------------------------------
# applying an edit: forward hooks only


def _replacer(layout: LayerLayout, neurons: torch.Tensor, values: torch.Tensor, owner: int):
    import torch

    from .hooks import first_tensor

    def hook(_module, _inputs, output):
        if threading.get_ident() != owner:
            return None  # another session's thread sharing the cached model: leave it unedited
        tensor = first_tensor(output)
        new = tensor.clone()
        vals = values.to(device=new.device, dtype=new.dtype)
        if layout.kind == "conv":
            new[:, neurons] = vals[None, :, None, None]  # the constant map whose mean is the value
        elif layout.kind == "tokens":
            new[..., neurons] = vals  # the feature axis is last whether or not batch comes first
        else:
            flat = new.reshape(new.shape[0], -1)
            flat[:, neurons] = vals
            new = flat.reshape(new.shape)
        if isinstance(output, torch.Tensor):
            return new
        if isinstance(output, (tuple, list)):
            items = list(output)
            items[next(i for i, it in enumerate(items) if isinstance(it, torch.Tensor))] = new
            return type(output)(items) if isinstance(output, tuple) else items
        if isinstance(output, dict):
            out = dict(output)
            out[next(k for k, v in out.items() if isinstance(v, torch.Tensor))] = new
            return out
        return new

    return hook


def dictionary_of_edit(edit: Edit, store: Store | None) -> Dictionary | None:
    """The dictionary whose units ``edit`` ablates (None for a neuron edit)."""
    if edit.units == NEURONS:
        return None
    if store is None:
        raise EditError(f"Edit '{edit.name}' ablates units of {edit.units}; give the store that holds that dictionary.")
    dictionary = load_dictionary(store, edit.units)
    wrong = [layer for layer in edit.neurons if layer != dictionary.meta.get("layer")]
    if wrong:
        raise EditError(f"Edit '{edit.name}' names layer {wrong[0]}, but {edit.units} is a dictionary of "
                        f"layer {dictionary.meta.get('layer')}.")
    return dictionary


def check_edit(model: ProbedModel, edit: Edit, store: Store | None = None) -> Dictionary | None:
    """Fail before any work when the edit names a layer or neuron (or unit) the model lacks;
    returns the dictionary whose units the edit ablates (None for a neuron edit)."""
    dictionary = dictionary_of_edit(edit, store)
    for layer, neurons in edit.neurons.items():
        info = model.layer(layer)  # unknown layers raise with suggestions
        if dictionary is not None:
            dictionary.check_layer(info.n_neurons, layer)
        size, word = (dictionary.n_units, "units") if dictionary is not None else (info.n_neurons, "neurons")
        bad = [n for n in neurons if not 0 <= n < size]
        if bad:
            raise EditError(f"Layer '{layer}' has {word} 0..{size - 1}; {bad[:5]} do not exist.")
        if edit.mode == "mean" and (not edit.values or len(edit.values.get(layer, [])) != len(neurons)):
            raise EditError(f"Edit '{edit.name}' has no mean values for layer '{layer}'; rebuild it with make_edit.")
    return dictionary


@contextmanager
def applied(model: ProbedModel, edit: Edit | None, store: Store | None = None) -> Iterator[ProbedModel]:
    """Run the model with the edit's neurons ablated; the hooks go away on exit.

    The hooks act only in the thread that entered the context: Streamlit sessions share one
    cached model across threads, and another session's forward pass must stay unedited.
    ``edit=None`` applies nothing (the unedited model), which keeps callers simple. An edit of
    a dictionary's units needs the ``store`` that holds the dictionary.
    """
    import torch

    from .hooks import resolve_layer

    if edit is not None and edit.units != NEURONS:
        dictionary = check_edit(model, edit, store)
        assert dictionary is not None, "a units edit always has its dictionary"
        (layer, units), = edit.neurons.items()
        with units_ablated(model, dictionary, units, edit.values[layer] if edit.mode == "mean" and edit.values else None):
            yield model
        return
    handles = []
    try:
        if edit is not None:
            check_edit(model, edit)
            for layer, neurons in edit.neurons.items():
                if not neurons:
                    continue
                info = model.layer(layer)
                if edit.mode == "mean":
                    assert edit.values is not None, "check_edit requires the mean values of a mean edit"
                    vals = torch.tensor(edit.values[layer], dtype=torch.float32)
                else:
                    vals = torch.zeros(len(neurons))
                idx = torch.tensor(neurons, dtype=torch.long)
                module = resolve_layer(model.module, layer)
                handles.append(module.register_forward_hook(_replacer(info.layout, idx, vals, threading.get_ident())))
        yield model
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------
# prediction passes (cached) and their comparison


@dataclass
class Predictions:
    """One pass over a probe set: top classes and their softmax probabilities per image,
    plus the probability of every class (float16) for per-class comparisons."""

    top_classes: np.ndarray  # (n, TOP_CLASSES_KEPT) int
    top_probs: np.ndarray  # (n, TOP_CLASSES_KEPT) float32
    probs: np.ndarray  # (n, n_outputs) float16
    image_indices: np.ndarray  # rows of the probe set that were evaluated

    @property
    def top1(self) -> np.ndarray:
        return self.top_classes[:, 0]

    @property
    def confidence(self) -> np.ndarray:
        return self.top_probs[:, 0]


def subset_indices(n_images: int, max_images: int | None) -> np.ndarray:
    """An evenly spaced, deterministic subset of image rows (all when max_images is None)."""
    if not max_images or max_images >= n_images:
        return np.arange(n_images)
    return np.unique(np.linspace(0, n_images - 1, max_images).round().astype(int))


def labelled_first_indices(probe_set: ProbeSet, class_names: Sequence[str] | None, max_images: int | None) -> np.ndarray:
    """Up to ``max_images`` rows, taken from the images whose label maps to a class name
    when there are any (so an accuracy is measured on as many labelled images as the
    budget allows), else evenly spaced over the whole set."""
    mapped = map_labels_to_classes([im.label for im in probe_set.images], class_names)
    labelled = np.array([i for i, m in enumerate(mapped) if m is not None], dtype=int)
    if len(labelled) == 0:
        return subset_indices(len(probe_set), max_images)
    return labelled[subset_indices(len(labelled), max_images)]


def predict(model: ProbedModel, probe_set: ProbeSet, store: Store | None = None, edit: Edit | None = None,
            max_images: int | None = None, batch_size: int = 32, progress: Progress | None = None,
            indices: Sequence[int] | np.ndarray | None = None) -> Predictions:
    """Softmax predictions of the (edited) model on the probe set, cached by provenance.

    ``indices`` picks the probe rows explicitly (else an evenly spaced ``max_images``
    subset). Models whose output is not a class-logit vector are still compared output
    index by output index (their "classes" are then output units).
    """
    import torch

    from .extract import image_loader
    from .hooks import first_tensor

    rows = np.asarray(indices, dtype=int) if indices is not None else subset_indices(len(probe_set), max_images)
    key = provenance_key({
        "code": CODE_VERSION, "model": model.spec, "weights": model.weights_id, "preprocess": model.preprocessing.id,
        "probe_set": probe_set.id, "edit": edit.effect_key if edit else None, "indices": rows.tolist(),
    })
    if store is not None:
        cached_classes, cached_probs, cached_full = (store.load_array("predictions", f"{key}-{part}")
                                                     for part in ("classes", "probs", "full"))
        if cached_classes is not None and cached_probs is not None and cached_full is not None:
            return Predictions(cached_classes, cached_probs, cached_full, rows)
    subset = ProbeSet(probe_set.name, probe_set.source, [probe_set.images[i] for i in rows])
    module = model.module.eval()
    device = next(module.parameters(), torch.empty(0)).device
    tops, top_p, full = [], [], []
    done = 0
    with torch.inference_mode(), applied(model, edit, store):
        for batch in image_loader(subset, model.transform, batch_size=batch_size):
            out = first_tensor(module(batch.to(device))).float()
            probs = torch.softmax(out.reshape(out.shape[0], -1), dim=1)
            p, c = probs.topk(min(TOP_CLASSES_KEPT, probs.shape[1]), dim=1)
            tops.append(c.cpu().numpy().astype(np.int32))
            top_p.append(p.cpu().numpy().astype(np.float32))
            full.append(probs.cpu().numpy().astype(np.float16))
            done += batch.shape[0]
            if progress:
                progress(done, len(subset), f"{'edited' if edit else 'original'} model: {done}/{len(subset)} images")
    preds = Predictions(np.concatenate(tops), np.concatenate(top_p), np.concatenate(full), rows)
    if store is not None:
        store.save_array("predictions", f"{key}-classes", preds.top_classes)
        store.save_array("predictions", f"{key}-probs", preds.top_probs)
        store.save_array("predictions", f"{key}-full", preds.probs)
    return preds


def normalise_class_name(name: str) -> str:
    """Lower-case words only, so "Great_White shark" and "great white shark" compare equal."""
    return " ".join(re.findall(r"[a-z0-9]+", name.lower().replace("_", " ")))


def map_labels_to_classes(labels: Sequence[str], class_names: Sequence[str] | None) -> list[str | None]:
    """The class name each probe label stands for, or None.

    A label matches a class when, after lower-casing, taking the last folder component and
    dropping punctuation, it equals a class name, or ends with one ("yellow lemon" -> "lemon",
    the head noun); the longest such ending wins.
    """
    if not class_names:
        return [None] * len(labels)
    known = {normalise_class_name(c) for c in class_names}
    out: list[str | None] = []
    for label in labels:
        words = normalise_class_name((label or "").split("/")[-1]).split()
        hit = None
        for start in range(len(words)):
            candidate = " ".join(words[start:])
            if candidate in known:
                hit = candidate
                break
        out.append(hit)
    return out


@dataclass
class ChangedImage:
    """An image whose top-1 class changed under the edit (for the before/after grid)."""

    image_idx: int
    image_id: str
    path: str
    label: str
    before_class: str
    before_confidence: float
    after_class: str
    after_confidence: float


@dataclass
class Comparison:
    """Before/after statistics of one edit on one probe set."""

    n_images: int
    agreement: float  # share of images whose top-1 class is unchanged
    mean_confidence_before: float  # mean max-softmax probability
    mean_confidence_after: float
    reference_prob_after: float  # mean probability the edited model gives the unedited top-1 class
    n_labelled: int  # images whose label maps to a class name
    accuracy_before: float | None
    accuracy_after: float | None
    per_class: Any  # pandas DataFrame, see compare()
    changed: list[ChangedImage]

    @property
    def confidence_drop(self) -> float:
        """Drop of the probability given to the unedited model's answer."""
        return self.mean_confidence_before - self.reference_prob_after

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy lost to the edit, or None when no probe label maps to a class."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return self.accuracy_before - self.accuracy_after

    def to_record(self) -> dict:
        """Everything in JSON values, for the store (see :func:`stored_comparison`)."""
        import pandas as pd

        per_class = self.per_class if isinstance(self.per_class, pd.DataFrame) else pd.DataFrame(self.per_class)
        fields = {f: getattr(self, f) for f in ("n_images", "agreement", "mean_confidence_before", "mean_confidence_after",
                                                 "reference_prob_after", "n_labelled", "accuracy_before", "accuracy_after")}
        return {**fields, "per_class": json.loads(per_class.to_json(orient="records")),
                "changed": [asdict(c) for c in self.changed]}

    @classmethod
    def from_record(cls, record: dict) -> Comparison:
        """The comparison :meth:`to_record` stored."""
        import pandas as pd

        fields = {k: v for k, v in record.items() if k not in ("per_class", "changed", EVALUATED_KEY)}
        return cls(**fields, per_class=pd.DataFrame(record["per_class"]),
                   changed=[ChangedImage(**c) for c in record["changed"]])

    def summary(self) -> dict:
        """The headline numbers (JSON-friendly)."""
        return {"n_images": self.n_images, "agreement": self.agreement, "n_changed": len(self.changed),
                "mean_confidence_before": self.mean_confidence_before, "mean_confidence_after": self.mean_confidence_after,
                "reference_prob_after": self.reference_prob_after, "confidence_drop": self.confidence_drop,
                "n_labelled": self.n_labelled, "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "accuracy_drop": self.accuracy_drop}


def _class_name(class_names: Sequence[str] | None, index: int) -> str:
    if class_names and 0 <= index < len(class_names):
        return class_names[index]
    return f"output {index}"


def compare(before: Predictions, after: Predictions, probe_set: ProbeSet, class_names: Sequence[str] | None) -> Comparison:
    """Agreement, confidence, accuracy (when labels map to classes), per-class counts and the
    list of images whose top class changed, most confident original answers first."""
    import pandas as pd

    if not np.array_equal(before.image_indices, after.image_indices):
        raise EditError("The two prediction passes cover different images; evaluate both on the same subset.")
    idx = before.image_indices
    b1, a1 = before.top1, after.top1
    images = [probe_set.images[i] for i in idx]
    mapped = map_labels_to_classes([im.label for im in images], class_names)
    names = [normalise_class_name(c) for c in class_names] if class_names else None
    labelled = np.array([m is not None for m in mapped])
    acc_b = acc_a = None
    correct_b = correct_a = np.zeros(len(idx), bool)
    if labelled.any() and names:
        correct_b = np.array([m is not None and names[c] == m for m, c in zip(mapped, b1)])
        correct_a = np.array([m is not None and names[c] == m for m, c in zip(mapped, a1)])
        acc_b, acc_a = float(correct_b[labelled].mean()), float(correct_a[labelled].mean())
    ref_prob = after.probs[np.arange(len(idx)), b1].astype(np.float32)
    classes = sorted(set(b1.tolist()) | set(a1.tolist()))
    rows = []
    for c in classes:
        row = {"class_index": int(c), "class_name": _class_name(class_names, c),
               "predicted_before": int((b1 == c).sum()), "predicted_after": int((a1 == c).sum()),
               "lost": int(((b1 == c) & (a1 != c)).sum()), "gained": int(((a1 == c) & (b1 != c)).sum())}
        if acc_b is not None and names:
            true = np.array([m == names[c] for m in mapped])
            row.update({"n_true": int(true.sum()),
                        "accuracy_before": float(correct_b[true].mean()) if true.any() else None,
                        "accuracy_after": float(correct_a[true].mean()) if true.any() else None})
        rows.append(row)
    per_class = pd.DataFrame(rows)
    if len(per_class):
        per_class = per_class.sort_values(["lost", "gained", "predicted_before"], ascending=False).reset_index(drop=True)
    changed_rows = np.flatnonzero(b1 != a1)
    changed_rows = changed_rows[np.argsort(-before.confidence[changed_rows], kind="stable")]
    changed = [ChangedImage(int(idx[r]), images[r].image_id, images[r].path, images[r].label,
                            _class_name(class_names, int(b1[r])), float(before.confidence[r]),
                            _class_name(class_names, int(a1[r])), float(after.confidence[r])) for r in changed_rows]
    return Comparison(len(idx), float((b1 == a1).mean()) if len(idx) else 1.0, float(before.confidence.mean()),
                      float(after.confidence.mean()), float(ref_prob.mean()), int(labelled.sum()), acc_b, acc_a,
                      per_class, changed)


def evaluate_edit(model: ProbedModel, edit: Edit, probe_set: ProbeSet, store: Store | None = None,
                  max_images: int | None = None, batch_size: int = 32, progress: Progress | None = None) -> Comparison:
    """Predictions before and after the edit on a probe set (or a labelled folder), compared.

    Both passes are cached, so the second call for the same edit is instant.
    """
    if edit.model_spec and edit.model_spec != model.spec:
        raise EditError(f"Edit '{edit.name}' was made for {edit.model_spec}, not {model.spec}.")
    check_edit(model, edit, store)
    n = len(subset_indices(len(probe_set), max_images))

    def stage(offset: int, label: str) -> Progress | None:
        if progress is None:
            return None
        return lambda done, _total, _msg: progress(offset + done, 2 * n, f"{label}: {done}/{n} images")

    before = predict(model, probe_set, store, None, max_images, batch_size, stage(0, "original model"))
    after = predict(model, probe_set, store, edit, max_images, batch_size, stage(n, f"with edit '{edit.name}'"))
    result = compare(before, after, probe_set, model.class_names)
    if store is not None:
        evaluated = {"edit": edit.to_record(), "weights_id": model.weights_id, "probe_set_id": probe_set.id,
                     "max_images": max_images or None}
        store.put_record(EVALUATION_NAMESPACE, evaluation_key(edit, model.weights_id, probe_set.id, max_images),
                         {**result.to_record(), EVALUATED_KEY: evaluated})
    return result


def evaluation_key(edit: Edit, weights_id: str, probe_set_id: str, max_images: int | None) -> str:
    """Names one evaluation by what the edit does (not its name), the weights and the images,
    so the Editing page finds the result of the ``edit`` job it started without a model."""
    return provenance_key({"code": CODE_VERSION, "edit": edit.effect_key, "weights": weights_id,
                           "probe_set": probe_set_id, "max_images": max_images or None})


def stored_comparison(store: Store, edit: Edit, weights_id: str, probe_set_id: str,
                      max_images: int | None) -> Comparison | None:
    """The comparison :func:`evaluate_edit` stored for this edit, or None when it has not run."""
    record = store.get_record(EVALUATION_NAMESPACE, evaluation_key(edit, weights_id, probe_set_id, max_images))
    return Comparison.from_record(record) if record else None


def stored_controls(store: Store, edit: Edit, weights_id: str, probe_set_id: str, max_images: int | None,
                    n_groups: int, layer_sizes: dict[str, int]) -> list[Comparison] | None:
    """The comparisons of :func:`evaluate_controls` (the same random groups, rebuilt from the
    layer sizes), or None when any of them has not run."""
    out = []
    exclude = control_exclusions(store, edit, probe_set_id)
    for seed in range(n_groups):
        control = random_counterpart(edit, layer_sizes, seed, store if edit.mode == "mean" else None, exclude)
        found = stored_comparison(store, control, weights_id, probe_set_id, max_images)
        if found is None:
            return None
        out.append(found)
    return out


# ----------------------------------------------------------------------------------------
# earlier results and downloads


@dataclass
class StoredEvaluation:
    """An evaluation found in the store with the edit and settings it was computed for, so a
    page can show it again after a reload without anyone retyping the neurons."""

    key: str
    edit: Edit
    weights_id: str
    probe_set_id: str
    max_images: int | None
    created: float

    @property
    def is_control(self) -> bool:
        """A random group evaluated as the control of another edit."""
        return self.edit.description.startswith("random control for ")


def recent_evaluations(store: Store, model_spec: str | None = None, include_controls: bool = False) -> list[StoredEvaluation]:
    """Stored evaluations, newest first (those stored before the edit was kept with them are skipped)."""
    out = []
    for key, value, created in store.list_records(EVALUATION_NAMESPACE):
        evaluated = (value or {}).get(EVALUATED_KEY)
        if not evaluated:
            continue
        found = StoredEvaluation(key, Edit.from_record(evaluated["edit"]), evaluated["weights_id"], evaluated["probe_set_id"],
                                 evaluated.get("max_images"), created)
        if (model_spec is None or found.edit.model_spec == model_spec) and (include_controls or not found.is_control):
            out.append(found)
    return out


def comparison_tables(cmp: Comparison) -> dict[str, Any]:
    """The comparison as tables (pandas DataFrames): ``per_class`` and ``changed`` images."""
    import pandas as pd

    changed = pd.DataFrame([asdict(c) for c in cmp.changed],
                           columns=[f.name for f in dataclasses_fields(ChangedImage)])
    per_class = cmp.per_class if isinstance(cmp.per_class, pd.DataFrame) else pd.DataFrame(cmp.per_class)
    return {"per_class": per_class, "changed": changed}


def comparison_csv(cmp: Comparison, table: str = "per_class") -> str:
    """One table of the comparison as CSV: ``per_class`` (predicted, lost, gained, accuracy
    per class) or ``changed`` (every image whose top class changed, before and after)."""
    tables = comparison_tables(cmp)
    if table not in tables:
        raise EditError(f"No table '{table}'; choose {' or '.join(tables)}.")
    return tables[table].to_csv(index=False)


def comparison_json(edit: Edit, cmp: Comparison, controls: Sequence[Comparison] = (), weights_id: str | None = None,
                    probe_set_id: str | None = None, max_images: int | None = None) -> str:
    """Everything about one evaluation as JSON: the edit, the settings, the headline numbers,
    the per-class table, the changed images and the random controls' headline numbers."""
    record = {"edit": edit.to_record(), "weights_id": weights_id, "probe_set_id": probe_set_id,
              "max_images": max_images or None, "code": CODE_VERSION, "summary": cmp.summary(),
              **{k: v for k, v in cmp.to_record().items() if k in ("per_class", "changed")},
              "random_controls": [c.summary() for c in controls]}
    return json.dumps(_plain(record), indent=1, allow_nan=False)


def _plain(value: Any) -> Any:
    """JSON values only: numpy scalars as Python numbers, NaN (an empty mean) as null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------------------
# units beyond neurons (neuroviz.units): ablate SAE latents or directions


@contextmanager
def units_ablated(model: ProbedModel, dictionary: Dictionary, units: Sequence[int],
                  values: Sequence[float] | None = None) -> Iterator[ProbedModel]:
    """Run the model with ``units`` of ``dictionary`` (a :class:`neuroviz.units.Dictionary`)
    removed at its layer: at every position the units' decoded contribution (their codes times
    their decoder rows) is subtracted, so every other unit's contribution and the SAE's
    reconstruction error stay as they were. With ``values`` (one per unit, e.g. its mean over
    the probe set) each unit's code is set to that value instead of 0.
    A forward hook, gone on exit; this thread only."""
    import torch

    from .hooks import first_tensor, resolve_layer, to_batch_first
    from .units import per_position

    layer = dictionary.meta["layer"]
    info = model.layer(layer)
    dictionary.check_layer(info.n_neurons, layer)
    bad = [u for u in units if not 0 <= int(u) < dictionary.n_units]
    if bad or not units:
        raise EditError(f"Choose units among 0..{dictionary.n_units - 1}" + (f"; {bad[:5]} do not exist." if bad else "."))
    if values is not None and len(values) != len(units):
        raise EditError(f"{len(values)} replacement values for {len(units)} units; give one per unit.")
    owner = threading.get_ident()
    idx = torch.as_tensor([int(u) for u in units], dtype=torch.long)
    replacement = torch.as_tensor(list(values) if values is not None else [0.0] * len(units), dtype=torch.float32)

    def hook(_module, _inputs, output):
        if threading.get_ident() != owner or not isinstance(output, torch.Tensor):
            return None
        out = to_batch_first(first_tensor(output), info.layout)
        rows, fold = per_position(out, info.layout)
        removed = dictionary.encode(rows)
        removed[:, idx.to(removed.device)] -= replacement.to(removed.device)  # code minus what it becomes
        edited = rows.float() - dictionary.contribution(removed, units)
        new = fold(edited).to(out.dtype)
        return to_batch_first(new, info.layout)  # (T, B, D) layers: the same transpose undoes itself

    handle = resolve_layer(model.module, layer).register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def evaluate_unit_ablation(model: ProbedModel, dictionary: Any, units: Sequence[int], probe_set: ProbeSet,
                           store: Store | None = None, max_images: int | None = None, batch_size: int = 32,
                           progress: Progress | None = None) -> Comparison:
    """Predictions before and after ablating ``units`` of a dictionary, compared as for neurons.

    The original pass is cached like any; the ablated pass is not (its key would need the
    dictionary), which keeps :func:`predict` unchanged.
    """
    before = predict(model, probe_set, store, None, max_images, batch_size, progress)
    with units_ablated(model, dictionary, units):
        after = predict(model, probe_set, None, None, max_images, batch_size, progress)
    return compare(before, after, probe_set, model.class_names)
