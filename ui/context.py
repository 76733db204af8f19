"""The selection every page shares (model, probe set, layer, neuron, methods) and the URL.

One source of truth lives in ``st.session_state["nv_selection"]``. The sidebar widgets
(drawn once in app.py) and the pages' own pickers write to it; the URL's query parameters
(``?model=...&probe=...&layer=...&neuron=...``) are read whenever they change from outside
(a deep link, a card link) and rewritten after every run, so the address bar always names
what is on screen and a copied URL opens exactly that neuron.

Pages call :func:`selection_from_state` and never touch these keys themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from neuroviz import catalog
from neuroviz.demo import DEMO_MODEL, DEMO_PROBE
from neuroviz.errors import close_names
from neuroviz.store import RunInfo, Store
from neuroviz.units import short_units
from ui import data

QUERY_KEYS = ("model", "probe", "layer", "neuron", "units")
_STATE = "nv_selection"
_LAST_URL = "nv_last_url"
_FROM_URL = "nv_from_url"  # selection keys set by the link and not yet checked against the cache
_NOTICES = "nv_notices"  # what a bad link asked for and what is shown instead (shown once)


@dataclass
class Selection:
    """What the user is looking at (model, probe set, layer, neuron, methods), resolved
    against the cache, ready to draw."""

    store: Store
    model_spec: str  # "" while the cache holds no run
    probe_spec: str  # what the user typed/chose: "demo", a probe set id or name, or a folder
    probe_set_id: str | None  # the probe set of the cached runs (None when nothing is extracted)
    layer: str | None
    run: RunInfo | None
    neuron: int | None
    methods: list[str] = field(default_factory=list)  # methods to show (those with labels on the run)
    catalog: data.Catalog = field(default_factory=data.Catalog)
    units: str = "neurons"  # or the run's dictionary, "sae:<key>" (neuroviz.units); ``run`` is that unit run

    @property
    def runs(self) -> list[RunInfo]:
        """Cached runs of this model over this probe set, one per layer (newest wins)."""
        latest: dict[str, RunInfo] = {}
        for r in self.catalog.runs_for(self.model_spec, self.probe_set_id):
            if r.units == "neurons":  # an SAE's run is not the layer
                latest[r.layer] = r
        return list(latest.values())

    @property
    def available_methods(self) -> list[str]:
        return list(self.catalog.methods_by_run.get(self.run.run_key, [])) if self.run else []

    def query_params(self, neuron: int | None = None) -> dict[str, str]:
        """The URL's query parameters naming this selection (and ``neuron``)."""
        params = {"model": self.model_spec, "probe": self.probe_spec} if self.model_spec else {"probe": self.probe_spec}
        if self.layer:
            params["layer"] = self.layer
        if self.units != "neurons":
            params["units"] = short_units(self.units)
        n = self.neuron if neuron is None else neuron
        if n is not None:
            params["neuron"] = str(int(n))
        return params


# -- selection state ------------------------------------------------------------------------
def _selection() -> dict:
    if _STATE not in st.session_state:
        st.session_state[_STATE] = {"model": None, "probe": None, "layer": None, "neuron": None, "methods": None,
                                    "units": None}
    return st.session_state[_STATE]


def _read_url_if_changed() -> None:
    """Apply query parameters that changed since we last wrote them (deep links, card links).

    Absent keys carry no information (page switches drop the query string), so they never
    reset a choice the user made.
    """
    try:
        current = {k: st.query_params.get(k) for k in QUERY_KEYS}
    except Exception:  # no script context (direct calls from benchmarks)
        return
    last = st.session_state.get(_LAST_URL)
    if last is not None and all(current[k] in (None, last.get(k)) for k in QUERY_KEYS):
        return
    sel = _selection()
    from_url = st.session_state.setdefault(_FROM_URL, set())
    for key in QUERY_KEYS:
        value = current[key]
        if value is None or value == "":
            continue
        from_url.add(key)
        if key == "neuron":
            try:
                sel["neuron"] = int(value)
            except ValueError:
                _notice(f"The link's neuron '{value}' is not a number; showing neuron 0.")
                sel["neuron"] = None
        else:
            if sel.get(key) != value and key in ("model", "probe"):
                # a new model or probe set: the old layer/neuron mean nothing there
                if current.get("layer") is None:
                    sel["layer"] = None
                if current.get("neuron") is None:
                    sel["neuron"] = None
            sel[key] = value
        # keep the sidebar widgets in step with the link
        st.session_state.pop(f"_w_{key}", None)
    st.session_state[_LAST_URL] = {k: v for k, v in current.items() if v is not None}


def write_url(sel: Selection, with_neuron: bool = True) -> None:
    """Make the address bar name the current selection (other query keys are kept).

    Pages that do not show one neuron leave it out, so reloading them does not jump to it.
    """
    wanted = sel.query_params()
    if not with_neuron:
        wanted.pop("neuron", None)
    try:
        for key in QUERY_KEYS:
            if key in wanted:
                if st.query_params.get(key) != wanted[key]:
                    st.query_params[key] = wanted[key]
            elif key in st.query_params:
                del st.query_params[key]
    except Exception:  # no script context (direct calls from benchmarks)
        return
    st.session_state[_LAST_URL] = dict(wanted)


def _notice(text: str) -> None:
    """Remember that a link asked for something that does not exist (:func:`show_notices` draws it)."""
    notices = st.session_state.setdefault(_NOTICES, [])
    if text not in notices:
        notices.append(text)


def show_notices() -> None:
    """Say, once, what a bad link asked for and what the page shows instead."""
    for text in st.session_state.pop(_NOTICES, []):
        st.warning(text, icon=":material/link_off:")


def _resolve_probe(cat: data.Catalog, model_spec: str, probe: str | None) -> tuple[str, str | None]:
    """(probe_spec, probe_set_id): match an id, then a name, else fall back to what has runs."""
    with_runs = list(dict.fromkeys(r.probe_set_id for r in cat.runs_for(model_spec)))
    spec = probe or DEMO_PROBE
    if spec in with_runs:
        return spec, spec
    named = [p["probe_set_id"] for p in cat.probe_sets if p["name"] == spec and p["probe_set_id"] in with_runs]
    if named:
        return spec, named[-1]
    if probe is None and with_runs:
        return probe_label(cat, with_runs[-1]), with_runs[-1]
    if with_runs and probe is not None:
        # the asked-for set has no runs for this model: show what exists, keep the choice visible
        return probe_label(cat, with_runs[-1]), with_runs[-1]
    return spec, None


def probe_label(cat: data.Catalog, probe_set_id: str) -> str:
    """The shortest unambiguous name of a probe set: its name when unique, else its id."""
    return catalog.short_probe_name(probe_set_id, cat.probe_sets)


def _natural_key(name: str) -> list:
    """'features.18' after 'features.4': numbers in a layer name compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def default_layer(latest: dict[str, RunInfo], methods_by_run: dict) -> str | None:
    """The layer a page opens on: the deepest spatial (conv) layer among those most methods
    labelled (features.18 on the demo), else the deepest layer."""
    if not latest:
        return None
    spatial = [r for r in latest.values() if r.map_shape is not None] or list(latest.values())
    return max(spatial, key=lambda r: (len(methods_by_run.get(r.run_key, [])), _natural_key(r.layer))).layer


def _checked_model(cat: data.Catalog, requested: str | None, from_url: set) -> str:
    """The model to show: a link's model that has no run in this workspace falls back, and says so.

    A spec typed into the sidebar stays selected (it may be extracted on the Workspace page next).
    """
    fallback = default_model(cat)
    if requested is None:
        return fallback
    if "model" not in from_url or requested in cat.model_specs() or not cat.runs:
        return requested
    close = close_names(requested, cat.model_specs())
    hint = f" Did you mean {', '.join(close)}?" if close else f" Models with runs: {', '.join(cat.model_specs())}."
    _notice(f"The link's model '{requested}' is unknown in this workspace (no run of it).{hint} Showing {fallback} instead.")
    _selection()["model"] = fallback
    return fallback


def default_model(cat: data.Catalog) -> str:
    """The demo model when it has runs or nothing is extracted yet, else the model of the newest run."""
    specs = cat.model_specs()
    if DEMO_MODEL in specs or not specs:
        return DEMO_MODEL
    return cat.runs[-1].model_spec


def selection_from_state() -> Selection:
    """The current selection, resolved against the cache. Safe to call many times per run."""
    store = data.get_store()
    _read_url_if_changed()
    sel = _selection()
    cat = data.catalog(store)
    from_url: set = st.session_state.get(_FROM_URL, set()) if _has_session() else set()
    model_spec = _checked_model(cat, sel["model"], from_url)
    probe_spec, probe_set_id = _resolve_probe(cat, model_spec, sel["probe"])
    if "probe" in from_url and sel["probe"] and probe_set_id and sel["probe"] != probe_spec:
        names = [probe_label(cat, p) for p in dict.fromkeys(r.probe_set_id for r in cat.runs_for(model_spec))]
        _notice(f"The link's probe set '{sel['probe']}' has no run of {model_spec}"
                f" (probe sets with runs: {', '.join(names)}); showing {probe_spec} instead.")
        sel["probe"] = probe_spec
    latest = catalog.newest_per_layer(cat.runs_for(model_spec, probe_set_id) if probe_set_id else [])
    layer = sel["layer"] if sel["layer"] in latest else (default_layer(latest, cat.methods_by_run) or sel["layer"])
    if sel["layer"] and layer != sel["layer"] and latest:
        close = close_names(sel["layer"], latest)
        hint = f"Did you mean {', '.join(close)}? " if close else ""
        _notice(f"Layer '{sel['layer']}' is not extracted for {model_spec} over {probe_spec}. {hint}"
                f"Layers: {', '.join(latest)}. Showing {layer} instead.")
        sel["layer"] = layer
    run = latest.get(layer) if layer else None
    units = "neurons"
    if run is not None and sel.get("units") not in (None, "neurons"):
        unit_run = catalog.newest_per_layer(cat.runs_for(model_spec, probe_set_id), sel["units"]).get(layer)
        if unit_run is not None:
            run, units = unit_run, unit_run.units
        elif "units" in from_url:
            _notice(f"The link's units '{sel['units']}' have no run of layer {layer}; showing its neurons.")
    neuron = sel["neuron"]
    if run is not None and neuron is not None and not 0 <= neuron < run.n_neurons:
        neuron = min(max(0, neuron), run.n_neurons - 1)
        _notice(f"Neuron {sel['neuron']} does not exist in layer {layer} (neurons 0 to {run.n_neurons - 1}); "
                f"showing neuron {neuron} instead.")
        sel["neuron"] = neuron
    if run is None:
        neuron = None
    if from_url and _has_session():
        st.session_state[_FROM_URL] = set()
    have = cat.methods_by_run.get(run.run_key, []) if run else []
    methods = [m for m in (sel["methods"] if sel["methods"] is not None else have) if m in have]
    return Selection(store, model_spec, probe_spec, probe_set_id, layer, run, neuron, methods, cat, units)


def _has_session() -> bool:
    try:
        st.session_state.get(_FROM_URL)
        return True
    except Exception:  # no script context (direct calls from benchmarks)
        return False


def select(**changes: Any) -> None:
    """Change the selection (model=, probe=, layer=, neuron=, methods=); safe in callbacks."""
    sel = _selection()
    for key, value in changes.items():
        if key not in sel:
            raise ValueError(f"Unknown selection key {key!r}; use one of {sorted(sel)}.")
        sel[key] = value
        st.session_state.pop(f"_w_{key}", None)
    if "model" in changes:
        sel.setdefault("layer", None)
        if "layer" not in changes:
            sel["layer"] = None
        if "neuron" not in changes:
            sel["neuron"] = None
    elif "layer" in changes and "neuron" not in changes:
        sel["neuron"] = None


# -- the shared sidebar ----------------------------------------------------------------------
def _bound(key: str, value: Any) -> str:
    """Prepare the widget key that mirrors selection[key]: set from the selection on every run.

    The selection is the one source of truth (widgets write to it in their callbacks). Setting
    the widget's value each run matters when a widget with the same key is drawn by another
    page: Streamlit drops the old page's widget value then, and the widget would fall back to
    its default (neuron 0 instead of the neuron shown, issue 12.1), or keep a stale list
    (methods chips that disagree with the cards, issue 12.5).
    """
    wkey = f"_w_{key}"
    if value is not None:
        st.session_state[wkey] = value
    return wkey


def _on_widget(key: str) -> None:
    sel = _selection()
    sel[key] = st.session_state.get(f"_w_{key}")
    if key in ("model", "probe"):
        sel["layer"] = None
        sel["neuron"] = None
    elif key in ("layer", "units"):
        sel["neuron"] = None


def on_units_widget() -> None:
    """The unit picker (ui.units) changed: show unit 0 of the new units."""
    _on_widget("units")


def draw_sidebar(with_neuron: bool = True) -> Selection:
    """Model, probe set, layer and methods pickers in the sidebar; returns the selection."""
    sel = selection_from_state()
    cat = sel.catalog
    with st.sidebar:
        st.markdown("### Selection")
        models = [m for m in dict.fromkeys([sel.model_spec, *cat.model_specs()]) if m]
        _bound("model", sel.model_spec or None)
        st.selectbox("Model", models, key="_w_model", accept_new_options=True, on_change=_on_widget, args=("model",),
                     help="A model spec such as offline:mobilenet_v2 or torchvision:resnet18@random. "
                          "Type a new one to extract it on the Workspace page.")
        probe_ids = list(dict.fromkeys(r.probe_set_id for r in cat.runs_for(sel.model_spec)))
        probe_opts = list(dict.fromkeys([probe_label(cat, p) for p in probe_ids] + [sel.probe_spec]))
        _bound("probe", sel.probe_spec)
        st.selectbox("Probe set", probe_opts, key="_w_probe", on_change=_on_widget, args=("probe",),
                     format_func=lambda p: _probe_caption(cat, p),
                     help="Probe sets this model was extracted over. Extract over a new image folder on the Workspace page.")
        layers = [r.layer for r in sel.runs]
        if layers:
            _bound("layer", sel.layer)
            st.selectbox("Layer", layers, key="_w_layer", on_change=_on_widget, args=("layer",),
                         format_func=lambda name: _layer_caption(sel, name),
                         help="Layers of this model extracted over this probe set: neurons and labelling methods.")
            from ui.units import unit_picker  # the picker reads the selection this module defines

            unit_picker(sel)
        else:
            st.caption("No layer of this model is extracted over this probe set yet.")
        have = sel.available_methods
        if have:
            _bound("methods", list(sel.methods))
            st.multiselect("Methods shown", have, key="_w_methods", format_func=data.method_title,
                           on_change=_on_widget, args=("methods",),
                           help="The methods whose labels the cards and pages show (all that labelled this layer by default).")
    sel = selection_from_state()
    write_url(sel, with_neuron=with_neuron)
    return sel


def _probe_caption(cat: data.Catalog, label: str) -> str:
    ids = [p for p in cat.probe_sets if p["probe_set_id"] == label or p["name"] == label]
    if ids:
        return f"{ids[-1]['name']} ({ids[-1]['n_images']} images)"
    return label


def _layer_caption(sel: Selection, name: str) -> str:
    run = next((r for r in sel.runs if r.layer == name), None)
    if run is None:
        return name
    return f"{name} · {run.n_neurons} neurons"  # short: the sidebar cuts longer text off


def neuron_input(sel: Selection, label: str = "Neuron", container: Any = None) -> int | None:
    """A number input bound to the selected neuron (the URL follows it)."""
    if sel.run is None:
        return None
    where = container or st
    wkey = _bound("neuron", sel.neuron if sel.neuron is not None else 0)
    value = where.number_input(label, min_value=0, max_value=sel.run.n_neurons - 1, step=1, key=wkey,
                               on_change=_on_neuron_widget, help=f"0..{sel.run.n_neurons - 1} in layer {sel.layer}")
    return int(value)


def _on_neuron_widget() -> None:
    _selection()["neuron"] = int(st.session_state["_w_neuron"])
