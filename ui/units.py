"""The unit picker: which units of the selected layer the pages show (its neurons, an SAE's
latents, or user directions). The choice lives in the shared selection and the URL
(``&units=sae:<short key>``), so a link names one latent exactly."""

from __future__ import annotations

import streamlit as st

from neuroviz.units import NEURONS, short_units, unit_word, units_title

from ui import context, data


@st.cache_data(show_spinner=False, max_entries=64)
def _title(root: str, version: tuple, units: str) -> str:
    return units_title(data.get_store(root), units)


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
