"""The run catalogue: which cached extraction answers "model M, layer L, over probe set P?".

Every caller that needs a run (the command line, the pages, studies, synthesis, analysis,
editing) asks here, so there is one answer, one weights check and one error with
close-name suggestions and the command that would make the missing run.

Probe specs: ``demo``, an image folder, a .txt/.csv image list, a probe-set id, or the name
of a registered probe set. Model specs match with or without the ``@DEFAULT`` weights tag.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NeurovizError, close_names
from .store import RunInfo, Store
from .units import units_match

if TYPE_CHECKING:
    from .datasets import ProbeSet
    from .models import ProbedModel


class RunNotFoundError(NeurovizError, ValueError):
    """No cached extraction for a (model, probe set, layer); the message gives the command that makes one."""


class WeightsChangedError(NeurovizError, ValueError):
    """The model now loads different weights than the ones a run was extracted with."""


def resolve_probe_set_id(store: Store, probe_spec: str) -> str:
    """A probe-set id from 'demo', a folder, an image list, a probe-set id or a registered name."""
    known = store.probe_sets()
    if any(p["probe_set_id"] == probe_spec for p in known):
        return probe_spec
    from .datasets import ProbeSetError, open_probe_set

    path = Path(probe_spec).expanduser()
    if probe_spec == "demo" or path.exists():
        return open_probe_set(probe_spec, store.root).id
    named = [p for p in known if p["name"] == probe_spec]
    if named:
        return named[-1]["probe_set_id"]  # the newest set of that name
    names = sorted({p["name"] for p in known})
    close = close_names(probe_spec, names)
    raise ProbeSetError(f"Unknown probe set '{probe_spec}'. Give 'demo', a folder, an image list or a probe-set id"
                        + (f"; did you mean {', '.join(close)}?" if close else "")
                        + (f" Probe sets in this cache: {', '.join(names)}." if names else "."))


def probe_set_from_store(store: Store, probe_set_id: str) -> ProbeSet:
    """The probe set as the store recorded it (ordered like the activation rows), without rescanning its files."""
    from .datasets import ProbeImage, ProbeSet, ProbeSetError

    rows = store.probe_images(probe_set_id)
    if not rows:
        raise ProbeSetError(f"Probe set {probe_set_id} is not in the store; open it (or extract a layer over it) first.")
    meta = next((p for p in store.probe_sets() if p["probe_set_id"] == probe_set_id), {})
    return ProbeSet(meta.get("name", probe_set_id), meta.get("source", ""),
                    [ProbeImage(r["image_id"], r["path"], r["label"] or "") for r in rows])


def probe_set_for(store: Store, probe_spec: str) -> ProbeSet:
    """The probe set a spec names, registered in the store.

    A stored probe-set id or name is read back from the store (so it opens where its folder
    moved); 'demo', a folder or an image list is scanned and registered.
    """
    from .datasets import open_probe_set

    stored = any(p["probe_set_id"] == probe_spec for p in store.probe_sets())
    if not stored and (probe_spec == "demo" or Path(probe_spec).expanduser().exists()):
        probe_set = open_probe_set(probe_spec, store.root)
        store.register_probe_set(probe_set)
        return probe_set
    return probe_set_from_store(store, resolve_probe_set_id(store, probe_spec))


def probe_set_name(store: Store, probe_set_id: str) -> str:
    """The shortest unambiguous name of a probe set: its name when unique, else its id."""
    return short_probe_name(probe_set_id, store.probe_sets())


def short_probe_name(probe_set_id: str, probe_sets: Sequence[dict]) -> str:
    """:func:`probe_set_name` over an already-read list of probe sets (the pages' cached one)."""
    mine = next((p for p in probe_sets if p["probe_set_id"] == probe_set_id), None)
    if mine and sum(p["name"] == mine["name"] for p in probe_sets) == 1:
        return mine["name"]
    return probe_set_id


def newest_per_layer(runs: Iterable[RunInfo], units: str | None = None) -> dict[str, RunInfo]:
    """The newest of ``runs`` for each layer, layers in the order they were first extracted.

    Only runs of ``units`` (default: neurons), so an SAE's run never hides the layer's neurons."""
    newest: dict[str, RunInfo] = {}
    for r in runs:
        if not units_match(r.units, units):
            continue
        if r.layer not in newest or r.created_at >= newest[r.layer].created_at:
            newest[r.layer] = r
    return newest


def same_model(spec: str, other: str) -> bool:
    """True when two model specs name the same model ('x' and 'x@DEFAULT' do)."""
    return spec == other or (spec.split("@", 1)[0] == other.split("@", 1)[0] and "@" not in spec)


def model_specs(store: Store, model_spec: str, probe_set_id: str | None = None) -> list[str]:
    """The stored model specs that ``model_spec`` names (exactly, or without its weights tag)."""
    specs = sorted({r.model_spec for r in store.find_runs(probe_set_id=probe_set_id)})
    if model_spec in specs:
        return [model_spec]
    return [s for s in specs if s.split("@", 1)[0] == model_spec]


def latest_runs(store: Store, model_spec: str, probe_set_id: str, pooling: str | None = None,
                weights_id: str | None = None, units: str | None = None) -> dict[str, RunInfo]:
    """The newest run of every extracted layer (in extraction order), optionally with a pooling or weights."""
    runs = [r for spec in model_specs(store, model_spec, probe_set_id) for r in store.find_runs(spec, probe_set_id)
            if (not pooling or pooling == "default" or r.pooling == pooling) and weights_id in (None, r.weights_id)]
    return newest_per_layer(runs, units)


def find_run(store: Store, model_spec: str, probe_spec: str, layer: str, pooling: str | None = None,
             weights_id: str | None = None, units: str | None = None) -> RunInfo:
    """The newest cached run of ``layer`` of ``model_spec`` over ``probe_spec``.

    Optionally only runs with ``pooling`` or extracted with ``weights_id``. Raises
    RunNotFoundError with close layer names and the extract command to run when there is none.
    """
    probe_set_id = resolve_probe_set_id(store, probe_spec)
    runs = latest_runs(store, model_spec, probe_set_id, pooling, weights_id, units)
    if layer in runs:
        return runs[layer]
    if units not in (None, "neurons"):
        raise RunNotFoundError(f"No run of units '{units}' for layer '{layer}' of {model_spec} over '{probe_spec}'; "
                               "see `python -m neuroviz units list`, or make one with `python -m neuroviz sae train`.")
    raise RunNotFoundError(_missing_message(store, model_spec, probe_spec, probe_set_id, layer, pooling, list(runs)))


def _missing_message(store: Store, model_spec: str, probe_spec: str, probe_set_id: str, layer: str | None,
                     pooling: str | None, layers: list[str]) -> str:
    what = f"layer '{layer}' of {model_spec}" if layer else f"{model_spec}"
    text = f"No activations of {what} over probe set '{probe_spec}' in the cache."
    close = close_names(layer, layers) if layer else []
    if close:
        text += f" Did you mean {', '.join(close)}?"
    if layers:
        text += f" Extracted layers of this model on this probe set: {', '.join(layers)}."
    elif store.find_runs(probe_set_id=probe_set_id):
        others = sorted({r.model_spec for r in store.find_runs(probe_set_id=probe_set_id)})
        close_models = close_names(model_spec, others)
        text += (f" Did you mean {', '.join(close_models)}?" if close_models else "") + \
            f" Models extracted on this probe set: {', '.join(others)}."
    pool = f" --pooling {pooling}" if pooling and pooling != "default" else ""
    layer_arg = f" --layers {layer}" if layer else ""
    return text + f" Extract them first: python -m neuroviz extract {model_spec} --probe {probe_spec}{layer_arg}{pool}"


def runs_for(store: Store, model_spec: str, probe_spec: str, layers: Sequence[str] | None = None,
             pooling: str | None = None, units: str | None = None) -> list[RunInfo]:
    """Runs of the given layers, or of every extracted layer of the model on the probe set
    (of ``units``: neurons by default, or a dictionary's ``sae:<key>``)."""
    if layers:
        return [find_run(store, model_spec, probe_spec, layer, pooling, units=units) for layer in layers]
    probe_set_id = resolve_probe_set_id(store, probe_spec)
    runs = latest_runs(store, model_spec, probe_set_id, pooling, units=units)
    if not runs:
        raise RunNotFoundError(_missing_message(store, model_spec, probe_spec, probe_set_id, None, pooling, []))
    return list(runs.values())


def get_run(store: Store, run_key: str) -> RunInfo:
    """The run with this key, or RunNotFoundError naming the command that lists runs."""
    run = store.get_run(run_key)
    if run is None:
        raise RunNotFoundError(f"No run '{run_key}' in the cache {store.root}; see `python -m neuroviz cache`.")
    return run


def sibling_run(store: Store, base: RunInfo, layer: str) -> RunInfo:
    """The newest run of another layer of ``base``'s model, weights and probe set."""
    if layer == base.layer:
        return base
    for run in reversed(store.find_runs(base.model_spec, base.probe_set_id, layer)):
        if run.weights_id == base.weights_id and units_match(run.units, None):
            return run
    raise RunNotFoundError(
        f"Layer '{layer}' of {base.model_spec} has not been extracted over this probe set with the same weights. "
        f"Extract it first: python -m neuroviz extract {base.model_spec} --layers {layer}")


def check_weights(model: ProbedModel, run: RunInfo) -> None:
    """Raise WeightsChangedError when ``model`` does not load the weights ``run`` was extracted with."""
    if model.weights_id != run.weights_id:
        raise WeightsChangedError(
            f"The model {run.model_spec} now loads different weights ({model.weights_id}) than when run "
            f"{run.run_key} was extracted ({run.weights_id}). Extract again: "
            f"python -m neuroviz extract {run.model_spec} --layers {run.layer}")


def probed_model_for(store: Store, run: RunInfo) -> ProbedModel:
    """The probed network of ``run`` at the input size it was extracted at, weights checked."""
    from .images import recorded_view
    from .models import create

    view = recorded_view(store, run.preprocess_id)  # so maps and crops line up with the run's
    model = create(run.model_spec, image_size=view.image_size if view else None)
    check_weights(model, run)
    return model


def newest_runs_by_layer(store: Store, model_spec: str, layers: Sequence[str] | None = None,
                         probe_spec: str | None = None) -> list[RunInfo]:
    """The newest run of each layer of a model (every extracted layer, or ``layers``).

    Over ``probe_spec`` when given; otherwise over the probe set each layer was extracted
    on, and an error naming them when a layer was extracted over several.
    """
    if probe_spec:
        return runs_for(store, model_spec, probe_spec, layers)
    by_layer: dict[str, dict[str, RunInfo]] = {}  # layer -> probe set id -> newest run, layers in extraction order
    for run in sorted((r for spec in model_specs(store, model_spec) for r in store.find_runs(spec)
                       if units_match(r.units, None)), key=lambda r: r.created_at):
        by_layer.setdefault(run.layer, {})[run.probe_set_id] = run
    if not by_layer and not layers:
        raise RunNotFoundError(f"No extracted runs of {model_spec} in the cache; "
                               f"extract them first: python -m neuroviz extract {model_spec}")
    wanted = [layer for layer in by_layer if layer in layers] if layers else list(by_layer)
    missing = [layer for layer in (layers or []) if layer not in by_layer]
    if missing:
        raise RunNotFoundError(f"No extracted run of {model_spec} for layer(s) {', '.join(missing)}; extracted layers: "
                               f"{', '.join(sorted(by_layer)) or 'none'}. Extract them first: "
                               f"python -m neuroviz extract {model_spec} --layers {','.join(missing)}")
    for layer in wanted:
        if len(by_layer[layer]) > 1:
            names = ", ".join(probe_set_name(store, p) for p in sorted(by_layer[layer]))
            raise RunNotFoundError(f"Layer {layer} of {model_spec} was extracted over several probe sets ({names}); "
                                   "name the probe set (--probe).")
    return [next(iter(by_layer[layer].values())) for layer in wanted]
