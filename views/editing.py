"""Editing: ablate chosen neurons (from an audit or a list), compare the model's
predictions before and after, and keep the edit under a name (the weights are never touched).

The prediction passes run as a background job (`python -m neuroviz edit ...`), which stores
each comparison in the cache with the edit it measured; the page draws the stored comparison
of the current settings, opens on the latest one after a reload, and offers it as CSV/JSON.

With an SAE's latents (or directions) picked under Units, the same controls ablate latents:
the job subtracts each latent's decoded contribution at its layer (``edit --units``), cached
by provenance like a neuron edit, with the same before/after results, controls and downloads.
"""

from __future__ import annotations

import time

import streamlit as st

from neuroviz import audit, catalog, editing, images
from neuroviz.requests import EditRequest
from neuroviz.units import NEURONS, unit_word, units_match, units_place
from ui import cards, context, guard, jobs_ui, shell, units

SOURCES = {"earlier": "An earlier result", "audit": "Neurons of a saved audit", "list": "A list of neurons",
           "saved": "A saved edit"}
MODES = {"zero": "Set to zero", "mean": "Set to the probe-set mean"}
GRID = 24
THUMB = 128


def choose_neurons(sel: context.Selection) -> tuple[dict[str, list[int]], dict | None, editing.Edit | None]:
    """The neurons to ablate, where they came from, and the saved edit when one was picked."""
    default = st.session_state.pop("editing_source", None)
    if default:
        st.session_state["editing_source_radio"] = default
    earlier = editing.recent_evaluations(sel.store, sel.model_spec)
    if "editing_source_radio" not in st.session_state:  # a fresh visit or a reload: the latest result again
        st.session_state["editing_source_radio"] = "earlier" if earlier else "list"
    word = unit_word(sel.units).lower()
    source = st.radio(f"{word.capitalize()}s", list(SOURCES), horizontal=True, key="editing_source_radio",
                      format_func=lambda s: SOURCES[s].replace("Neurons", f"{word.capitalize()}s").replace("neurons", f"{word}s"))
    if source == "earlier":
        return earlier_result(earlier)
    if source == "audit":
        saved = audit.list_audits(sel.store, sel.model_spec)
        if not saved:
            st.info("No saved audits of this model: search on the Audit page and save one, or type a list.")
            return {}, None, None
        ids = [a["id"] for a in saved]
        wanted = st.session_state.pop("editing_audit_id", None)
        if wanted in ids:
            st.session_state["editing_audit_choice"] = wanted
        names = {a["id"]: f"'{a['query']}' · {a['n_hits']} hit{'s' if a['n_hits'] != 1 else ''}" for a in saved}
        chosen = st.selectbox("Audit", ids, format_func=names.get, key="editing_audit_choice")
        result = audit.load_audit(sel.store, chosen)
        scores = sorted({h.match_score for h in result.hits})
        floor = 0.0
        if len(scores) > 1:
            floor = st.slider("Keep hits with match score at least", float(scores[0]), float(scores[-1]), float(scores[0]),
                              key=f"editing_floor_{chosen}")
        kept = [h for h in result.hits if h.match_score >= floor]
        other = [h for h in kept if not units_match(h.units, sel.units)]
        kept = [h for h in kept if h not in other]
        if other:
            st.caption(f"{len(other)} hit{'s' if len(other) != 1 else ''} of other units left out: this edit ablates "
                       f"{units.unit_heading(sel)} (pick others under Units).")
        neurons: dict[str, list[int]] = {}
        for h in kept:
            neurons.setdefault(h.layer, [])
            if h.neuron not in neurons[h.layer]:
                neurons[h.layer].append(h.neuron)
        n_neurons = sum(len(v) for v in neurons.values())
        with st.expander(f"{n_neurons} {word}{'s' if n_neurons != 1 else ''} from {len(kept)} hit{'s' if len(kept) != 1 else ''}"):
            st.dataframe([{"layer": h.place, word: h.neuron, "method": h.method, "label": h.label,
                           "match": round(h.match_score, 3)} for h in kept], hide_index=True)
        return neurons, {"audit": chosen, "query": result.query}, None
    if source == "list":
        start = f"{sel.layer}:{sel.neuron if sel.neuron is not None else 0}" if sel.layer else ""
        text = st.text_area("LAYER:N,N,... (one layer per line or separated by ';')", value=start, key="editing_list")
        return editing.parse_neuron_list(text), None, None
    edits = editing.list_edits(sel.store, sel.model_spec)
    if not edits:
        st.info("No saved edits of this model yet.")
        return {}, None, None
    by_name = {e.name: e for e in edits}
    name = st.selectbox("Edit", list(by_name), key="editing_saved_choice",
                        format_func=lambda n: f"{n} · {by_name[n].mode} · {by_name[n].n_neurons} {by_name[n].unit_word}s")
    edit = by_name[name]
    return edit.neurons, edit.source, edit


def earlier_result(earlier: list[editing.StoredEvaluation]) -> tuple[dict[str, list[int]], dict | None, editing.Edit | None]:
    """An evaluation stored by an earlier `edit` job: its edit, with the image count it used."""
    if not earlier:
        st.info("No results yet: choose neurons from an audit or a list and evaluate them.")
        return {}, None, None
    by_key = {e.key: e for e in earlier}

    def name(key: str) -> str:
        e = by_key[key]
        images = f"{e.max_images} images" if e.max_images else "all images"
        return (f"{e.edit.name} · {e.edit.mode} · {e.edit.n_neurons} {e.edit.unit_word}{'s' if e.edit.n_neurons != 1 else ''} · "
                f"{images} · {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.created))}")

    key = st.selectbox("Result", list(by_key), format_func=name, key="editing_earlier_choice")
    chosen = by_key[key]
    if st.session_state.get("editing_earlier_applied") != key:  # once per choice, so the count stays editable
        st.session_state["editing_earlier_applied"] = key
        st.session_state["editing_max_images"] = chosen.max_images or 0
    return chosen.edit.neurons, chosen.edit.source, chosen.edit


def edit_settings(sel: context.Selection, neurons, source, saved: editing.Edit | None) -> editing.Edit | None:
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    # keyed by the edit shown, so a new list starts at "zero" after an earlier result in "mean" mode
    mode = c1.radio("Ablation", list(MODES), format_func=MODES.get, key=f"editing_mode_{saved.name if saved else ''}",
                    horizontal=True,
                    index=list(MODES).index(saved.mode) if saved else 0,
                    help="Mean: the whole map of a conv channel is set to the constant whose average is the "
                         "channel's mean pooled activation over the probe set.")
    default_name = saved.name if saved else (f"no {source['query']}"[:60] if source else "my edit")
    name = c2.text_input("Edit name", value=default_name, key=f"editing_name_{default_name}")
    c3.number_input("Images (0 = all)", 0, 100_000, 0, 50, key="editing_max_images",
                    help="An evenly spaced subset is faster on large probe sets.")
    c4.number_input("Random controls", 0, 20, 0, 1, key="editing_controls",
                    help="Also ablate this many random groups with as many neurons per layer: an edit means "
                         "something only if it changes more than chance does. Each costs one more pass.")
    if not neurons:
        return None
    if saved is not None and mode == saved.mode and name == saved.name:
        return saved
    kind = saved.units if saved is not None else sel.units
    if kind != NEURONS and kind == sel.units and set(neurons) != {sel.layer}:
        raise editing.EditError(f"These are {units.unit_heading(sel)} of layer {sel.layer}; write {sel.layer}:N,N.")
    return editing.make_edit(name, sel.model_spec, neurons, mode, sel.store, sel.probe_set_id, source=source, units=kind)


def evaluation(sel: context.Selection, edit: editing.Edit) -> None:
    """The stored before/after comparison of ``edit`` under the current settings, or the
    button that starts the `edit` job computing it (a model runs there, never here)."""
    max_images = int(st.session_state.get("editing_max_images") or 0) or None
    n_controls = int(st.session_state.get("editing_controls") or 0)
    weights = sel.run.weights_id
    comparison = editing.stored_comparison(sel.store, edit, weights, sel.probe_set_id, max_images)
    controls: list[editing.Comparison] | None = []
    if n_controls:  # the layers' sizes in the edit's units (an SAE's run counts latents)
        sizes = {r.layer: r.n_neurons for r in catalog.newest_per_layer(sel.catalog.runs_for(sel.model_spec), edit.units).values()}
        controls = editing.stored_controls(sel.store, edit, weights, sel.probe_set_id, max_images, n_controls, sizes) \
            if all(layer in sizes for layer in edit.neurons) else None
    if comparison is not None and controls is not None:
        draw_comparison(sel, edit, comparison, controls, max_images)
        return
    request = EditRequest.of(sel.model_spec, sel.probe_set_id, edit.name, edit.neurons, edit.mode, max_images, n_controls,
                             edit.units)
    key = f"editing_{editing.evaluation_key(edit, weights, sel.probe_set_id, max_images)}_{n_controls}"
    jobs_ui.job_button(sel.store, "Evaluate before / after", request, key=key,
                       done_message="Evaluated; the comparison is shown above.")


def downloads(sel: context.Selection, edit: editing.Edit, cmp: editing.Comparison, controls, max_images: int | None) -> None:
    """The comparison as files: the per-class table and the changed images (CSV), everything (JSON)."""
    stem = "edit-" + editing.evaluation_key(edit, sel.run.weights_id, sel.probe_set_id, max_images)
    c1, c2, c3 = st.columns(3)
    c1.download_button("Per-class table (CSV)", editing.comparison_csv(cmp, "per_class"), file_name=f"{stem}-per-class.csv",
                       mime="text/csv", key="editing_csv_classes", icon=":material/download:")
    c2.download_button("Changed images (CSV)", editing.comparison_csv(cmp, "changed"), file_name=f"{stem}-changed.csv",
                       mime="text/csv", key="editing_csv_changed", icon=":material/download:")
    c3.download_button("Everything (JSON)", editing.comparison_json(edit, cmp, controls, sel.run.weights_id, sel.probe_set_id,
                                                                    max_images),
                       file_name=f"{stem}.json", mime="application/json", key="editing_json", icon=":material/download:")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def draw_comparison(sel: context.Selection, edit: editing.Edit, cmp: editing.Comparison, controls=(),
                    max_images: int | None = None) -> None:
    st.subheader(f"Effect of '{edit.name}' ({edit.n_neurons} {edit.unit_word}{'s' if edit.n_neurons != 1 else ''}, {edit.mode})")
    if edit.units != NEURONS:
        st.caption(f"Ablated {edit.unit_word}s of {units.title(sel, edit.units)}: their decoded contribution is "
                   "subtracted at the layer (mean: their code set to its probe-set mean); the rest of the layer is unchanged.")
    c1, c2, c3, c4 = st.columns(4)
    if cmp.accuracy_before is not None:
        c1.metric("Accuracy", _pct(cmp.accuracy_after), delta=f"{100 * (cmp.accuracy_after - cmp.accuracy_before):+.1f} pts",
                  help=f"before: {_pct(cmp.accuracy_before)}, on the {cmp.n_labelled} images whose label is a class name")
    else:
        c1.metric("Accuracy", "n/a", help="No probe label maps to one of the model's class names.")
    c2.metric("Same top-1 as before", _pct(cmp.agreement), delta=f"{len(cmp.changed)} changed", delta_color="off")
    c3.metric("Mean confidence", f"{cmp.mean_confidence_after:.3f}",
              delta=f"{cmp.mean_confidence_after - cmp.mean_confidence_before:+.3f}")
    c4.metric("Prob. of the original answer", f"{cmp.reference_prob_after:.3f}", delta=f"{-cmp.confidence_drop:+.3f}")
    st.caption(f"{cmp.n_images} images · accuracy counted on {cmp.n_labelled} images with a class-name label")
    downloads(sel, edit, cmp, controls or (), max_images)
    if controls:
        st.markdown(f"**Against chance**: {len(controls)} random groups with as many {edit.unit_word}s per layer")
        st.dataframe(editing.control_table(cmp, controls), hide_index=True, width="stretch",
                     column_config={"share of random groups with less effect": st.column_config.NumberColumn(format="percent")})
    with st.expander("Per class", expanded=False):
        st.dataframe(cmp.per_class, hide_index=True, width="stretch")
    changed_grid(sel, cmp)


def changed_grid(sel: context.Selection, cmp: editing.Comparison) -> None:
    """Before/after pictures of the images whose top class changed, most confident first."""
    if not cmp.changed:
        st.info("No image changed its top class.")
        return
    n_pages = max(1, -(-len(cmp.changed) // GRID))
    page = int(st.number_input(f"Changed images, page (of {n_pages})", 1, n_pages, 1, key="editing_grid_page")) if n_pages > 1 else 1
    shown = cmp.changed[(page - 1) * GRID: page * GRID]
    cols_per_row = 6
    for start in range(0, len(shown), cols_per_row):
        cols = st.columns(cols_per_row, gap="small")
        for col, ch in zip(cols, shown[start:start + cols_per_row]):
            cards.show_image(images.thumbnail(sel.store.root, ch.path, THUMB), col, width="stretch")
            col.caption(f"{ch.before_class} ({ch.before_confidence:.2f}) → **{ch.after_class}** ({ch.after_confidence:.2f})"
                        + (f" · label: {ch.label}" if ch.label else ""))


def saved_edits(sel: context.Selection) -> None:
    edits = editing.list_edits(sel.store, sel.model_spec)
    with st.expander(f"Saved edits of this model ({len(edits)})"):
        if not edits:
            st.caption("None yet.")
        for e in edits:
            c1, c2 = st.columns([5, 1])
            layers = ", ".join(f"{units_place(layer, e.units)}: {len(ns)}" for layer, ns in e.neurons.items())
            c1.markdown(f"**{e.name}** · {e.mode} · {layers} · {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.created))}")
            if c2.button("Delete", key=f"editing_del_{e.name}", icon=":material/delete:"):
                editing.delete_edit(sel.store, e.name)
                st.rerun()


def body() -> None:
    st.title("Editing")
    sel = context.selection_from_state()
    st.caption("Switch neurons off and see which predictions change, as MILAN did by removing the neurons "
               "whose descriptions mention text. Edits are forward hooks: the weights never change.")
    if sel.units != NEURONS:
        st.caption(f"Units: {units.unit_heading(sel)}. Ablating a latent subtracts its decoded contribution at "
                   f"{sel.layer}; pick 'neurons' under Units to ablate neurons.")
    if sel.run is None:
        st.info("No runs yet: extract some layers on the Workspace page first.")
        return
    edit, problem = None, None
    try:
        neurons, source, saved = choose_neurons(sel)
        edit = edit_settings(sel, neurons, source, saved)
    except editing.EditError as exc:  # a bad name or list: say so, keep the rest of the page
        problem = str(exc)
    if problem:
        st.error(problem)
    elif edit is None:
        st.caption("Choose at least one neuron.")
    else:
        if st.button("Save edit", icon=":material/save:", key="editing_save"):
            editing.save_edit(sel.store, edit)
            st.toast(f"Saved edit '{edit.name}'")
        evaluation(sel, edit)
    saved_edits(sel)


shell.owner_page()  # the backstop that makes app.py decide who may see this page
with guard.friendly_errors("the editing page"):
    body()
