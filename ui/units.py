"""The unit picker: which units of the selected layer the pages show (its neurons, an SAE's
latents, or user directions). The choice lives in the shared selection and the URL
(``&units=sae:<short key>``), so a link names one latent exactly."""

from __future__ import annotations

import streamlit as st

from neuroviz.methods.base import DEAD_CAPTION, dead_units
from neuroviz.units import NEURONS, short_units, unit_word, units_title
from ui import context, data


@st.cache_data(show_spinner=False, max_entries=64)
def _title(root: str, version: tuple, units: str) -> str:
    return units_title(data.get_store(root), units)


@st.cache_data(show_spinner=False, max_entries=64)
def _dead(root: str, version: tuple, run_key: str) -> frozenset[int]:
    store = data.get_store(root)
    run = store.get_run(run_key)
    return frozenset(dead_units(store, run)) if run is not None else frozenset()


def dead(sel: context.Selection) -> frozenset[int]:
    """The selected run's dead units (never active on the probe set): shown as dead, not labelled."""
    return _dead(str(sel.store.root), data.db_version(sel.store), sel.run.run_key) if sel.run else frozenset()


def dead_html() -> str:
    """The line a card shows instead of labels for a dead unit."""
    return f"<div class='nv-label nv-missing'><i>{DEAD_CAPTION}</i></div>"


def unit_kinds(sel: context.Selection) -> list[str]:
    """'neurons' and every dictionary with a run of the selected layer (model, probe set)."""
    found = [r.units for r in sel.catalog.runs_for(sel.model_spec, sel.probe_set_id)
             if r.layer == sel.layer and r.units != NEURONS] if sel.probe_set_id else []
    return [NEURONS, *dict.fromkeys(found)]


def title(sel: context.Selection, units: str) -> str:
    return _title(str(sel.store.root), data.db_version(sel.store), units)


def unit_picker(sel: context.Selection) -> None:
    """A 'Units' select box under the layer when the layer has SAE latents or directions."""
    kinds = unit_kinds(sel)
    if len(kinds) < 2:
        return
    if st.session_state.get("_w_units") not in kinds:
        st.session_state["_w_units"] = sel.units if sel.units in kinds else NEURONS
    st.selectbox("Units", kinds, key="_w_units", on_change=context.on_units_widget,
                 format_func=lambda u: title(sel, u),
                 help="The layer's neurons, the latents of a sparse autoencoder trained on it "
                      "(python -m neuroviz sae train), or directions you added (python -m neuroviz units add).")


def unit_heading(sel: context.Selection, unit: int | None = None) -> str:
    """'Neuron 12' or 'Latent 12'; 'neurons' or 'latents of SAE 4x k=32 (R^2 0.83)' without a number."""
    word = unit_word(sel.units)
    if unit is not None:
        return f"{word} {unit}"
    return "neurons" if sel.units == NEURONS else f"{word.lower()}s of {title(sel, sel.units)} ({short_units(sel.units)})"


def sae_form(sel: context.Selection) -> None:
    """The Workspace's SAE tab: train a sparse autoencoder on a layer as a background job
    (its live loss is the job's progress line), and the SAEs and directions already made."""
    from neuroviz.requests import SaeTrainRequest
    from neuroviz.units import list_dictionaries, title_of
    from ui import jobs_ui

    made = list_dictionaries(sel.store, sel.model_spec or None)
    if made:
        st.dataframe([{"units": title_of(m["kind"], m), "layer": m.get("layer"), "latents": m.get("n_units"),
                       "held-out R^2": m.get("metrics", {}).get("r2"), "L0": m.get("metrics", {}).get("l0"),
                       "dead": m.get("metrics", {}).get("dead"), "id": short_units(f"{m['kind']}:{m['key']}")}
                      for m in reversed(made)], hide_index=True, width="stretch")
    layers = [r.layer for r in sel.runs if r.layer_kind != "vector"]
    if not sel.model_spec or not layers:
        st.info("Extract a conv or token layer first: an SAE is trained on its activations at every position.")
        return
    c1, c2, c3, c4, c5 = st.columns([3, 1, 1, 2, 1])
    layer = c1.selectbox("Layer", layers, index=layers.index(sel.layer) if sel.layer in layers else 0, key="sae_layer")
    expansion = int(c2.number_input("Expansion", 1, 64, 4, key="sae_expansion", help="latents = expansion x neurons"))
    k = int(c3.number_input("k", 1, 4096, 32, key="sae_k", help="codes kept per position"))
    variant = c4.selectbox("Variant", ["topk", "batchtopk"], key="sae_variant",
                           format_func={"topk": "TopK", "batchtopk": "BatchTopK"}.get)
    epochs = int(c5.number_input("Epochs", 1, 200, 10, key="sae_epochs"))
    request = SaeTrainRequest(sel.model_spec, jobs_ui.probe_cli_arg(sel), layer, expansion, k, variant, epochs)
    jobs_ui.job_button(sel.store, "Train the SAE", request, key="sae",
                       done_message="The SAE is trained and its latents extracted: pick them with 'Units' in the sidebar.")
