"""Audit: search every layer of the model for neurons whose labels mention a concept
(by words and by meaning), see their top images, open them, save and export the audit.
Labels of an SAE's latents (or directions) are searched too, each hit naming its units
("features.18 · SAE latents 3f2a1b2c · latent 12"); 'Units searched' narrows the search."""

from __future__ import annotations

import time

import streamlit as st

from neuroviz import audit, images
from neuroviz.units import NEURONS, short_units, units_noun
from ui import context, data, guard, shell
from ui import units as unit_titles

PER_PAGE = 20
THUMBS = 6
THUMB = 96
MODES = {"both": "Words and meaning", "text": "Words only", "meaning": "Meaning only"}
RESULT_KEY = "audit_result"



def search_form(sel) -> audit.AuditOptions | None:
    """Query box and options; returns the query and options when the user searches."""
    with st.form("audit_form", border=True):
        c1, c2 = st.columns([3, 2])
        query = c1.text_input("Concepts to look for", key="audit_query", placeholder="e.g. face, skin, text",
                              help="One or more words or phrases, separated by commas.")
        mode = c2.radio("Match", list(MODES), format_func=MODES.get, key="audit_mode", horizontal=True)
        with st.expander("Options"):
            o1, o2, o3 = st.columns(3)
            min_sim = o1.slider("Minimum meaning similarity", 0.2, 0.9, audit.AuditOptions.min_similarity, 0.05,
                                key="audit_min_sim", help="Cosine between MiniLM embeddings of the query and the label.")
            substring = o2.checkbox("Also match inside words ('text' in 'textile')", key="audit_substring")
            all_ranks = o2.checkbox("Also search runner-up labels", key="audit_all_ranks")
            max_results = o3.number_input("Most results", 10, 2000, 200, 10, key="audit_max")
            methods = o3.multiselect("Methods (none = all)", _methods(sel), key="audit_methods")
            kinds = _unit_kinds(sel)
            units = o1.multiselect("Units searched (none = all)", kinds, key="audit_units",
                                   format_func=lambda u: "neurons" if u == NEURONS else f"{unit_titles.title(sel, u)} "
                                                                                        f"({short_units(u)})",
                                   help="The layers' neurons, and the latents of each SAE trained on them.") \
                if len(kinds) > 1 else []
        submitted = st.form_submit_button("Search", type="primary", icon=":material/search:")
    if not submitted:
        return None
    st.session_state["audit_query_text"] = query
    return audit.AuditOptions(match_text=mode != "meaning", match_meaning=mode != "text", substring=substring,
                              min_similarity=float(min_sim), all_ranks=all_ranks, max_results=int(max_results),
                              methods=methods or None, units=units or None)


def _methods(sel: context.Selection) -> list[str]:
    runs = sel.catalog.runs_for(sel.model_spec, sel.probe_set_id)
    return sorted({m for r in runs for m in sel.catalog.methods_by_run.get(r.run_key, [])})


def _unit_kinds(sel: context.Selection) -> list[str]:
    """'neurons' and every dictionary with a run of this model over this probe set."""
    runs = sel.catalog.runs_for(sel.model_spec, sel.probe_set_id)
    return [NEURONS, *dict.fromkeys(r.units for r in runs if r.units != NEURONS)]


def run_search(sel, options: audit.AuditOptions) -> None:
    query = st.session_state.get("audit_query_text", "")
    spinner = "Embedding labels with MiniLM (first search loads it)..." if options.match_meaning else "Searching..."
    with st.spinner(spinner):
        result = audit.search(sel.store, sel.model_spec, sel.probe_set_id, query, options)
    st.session_state[RESULT_KEY] = result.to_dict()
    st.session_state["audit_page"] = 1


def thumbnails(store, hit: audit.AuditHit) -> list[tuple[str, str]]:
    """Small square pictures (cached on disk) of a hit's top images, with their activations."""
    return [(str(images.thumbnail(store.root, im["path"], THUMB)), f"{im['activation']:.2f}")
            for im in hit.top_images[:THUMBS] if im.get("path")]


def draw_hit(sel, result: audit.Audit, hit: audit.AuditHit, index: int) -> None:
    with st.container(border=True):
        left, right = st.columns([2, 5])
        with left:
            st.markdown(f"**{hit.label}**")
            st.caption(f"{hit.place} · {hit.unit_word} {hit.neuron} · {data.method_title(hit.method)}"
                       + (f" · rank {hit.rank + 1}" if hit.rank else ""))
            st.caption(f"match {hit.match_score:.2f} ({hit.match_kind}) for '{hit.matched_term}'")
            params = audit.page_params(hit, result.model_spec, result.probe_set_id)
            st.page_link("views/neuron.py", label=f"Open {hit.unit_word}", icon=":material/open_in_new:", query_params=params)
        with right:
            pics = thumbnails(sel.store, hit)
            if pics:
                cols = st.columns(THUMBS, gap="small")
                for col, (pic, caption) in zip(cols, pics):
                    col.image(pic, caption=caption, width="stretch")


def draw_results(sel, result: audit.Audit) -> None:
    options = result.options
    how = " and ".join(k for k, on in (("words", options.match_text), ("meaning", options.match_meaning)) if on)
    n = len(result.hits)
    words = sorted({h.unit_word for h in result.hits}) or ["neuron"]
    noun = words[0] if len(words) == 1 else "unit"
    st.subheader(f"{n} {noun}{'s match' if n != 1 else ' matches'} '{result.query}'")
    st.caption(f"searched {result.n_labels_searched} labels by {how} in {len(result.layers_searched)} layers "
               f"({', '.join(result.layers_searched)})" + (f" · text encoder {result.text_backend_id}" if result.text_backend_id else ""))
    if not result.hits:
        hint = "a lower meaning similarity" if options.match_meaning else "meaning search"
        st.info(f"No label matches. Try {hint}, other words, or runner-up labels (Options).")
        return
    actions(sel, result)
    by_place: dict[str, int] = {}
    for hit in result.hits:
        by_place[hit.place] = by_place.get(hit.place, 0) + 1
    st.caption("per layer: " + ", ".join(f"{place} {n}" for place, n in by_place.items()))
    n_pages = max(1, -(-len(result.hits) // PER_PAGE))
    page = min(int(st.session_state.get("audit_page", 1)), n_pages)
    if n_pages > 1:
        page = int(st.number_input(f"Page (of {n_pages})", 1, n_pages, page, key="audit_page_input"))
        st.session_state["audit_page"] = page
    for i, hit in enumerate(result.hits[(page - 1) * PER_PAGE: page * PER_PAGE]):
        draw_hit(sel, result, hit, i)


def actions(sel, result: audit.Audit) -> None:
    """Save, export, and hand the neurons to the Editing page."""
    c1, c2, c3, c4 = st.columns(4)
    if c1.button("Save audit", icon=":material/save:", key="audit_save"):
        audit.save_audit(sel.store, result)
        st.session_state[RESULT_KEY] = result.to_dict()
        st.toast(f"Saved as {result.id}")
    c2.download_button("CSV", audit.audit_to_csv(result), file_name=f"{result.id}.csv", mime="text/csv",
                       icon=":material/download:", key="audit_csv")
    c3.download_button("JSON", audit.audit_to_json(result), file_name=f"{result.id}.json", mime="application/json",
                       icon=":material/download:", key="audit_json")
    if c4.button(f"Ablate these {units_noun(sel.units)}", icon=":material/edit:",
                 key="audit_to_edit",
                 help="Open the Editing page with the hits of the units picked in the sidebar selected "
                      "(the neurons, or one SAE's latents)."):
        audit.save_audit(sel.store, result)
        st.session_state["editing_audit_id"] = result.id
        st.session_state["editing_source"] = "audit"
        st.switch_page("views/editing.py")


def saved_audits(sel) -> None:
    saved = audit.list_audits(sel.store, sel.model_spec)
    with st.expander(f"Saved audits of this model ({len(saved)})"):
        if not saved:
            st.caption("None yet: search, then Save audit.")
            return
        labels = {a["id"]: f"'{a['query']}' · {a['n_hits']} hits · {time.strftime('%Y-%m-%d %H:%M', time.localtime(a['created'] or 0))}"
                  for a in saved}
        chosen = st.selectbox("Audit", list(labels), format_func=labels.get, key="audit_saved_choice")
        c1, c2 = st.columns(2)
        if c1.button("Open", key="audit_open", icon=":material/folder_open:"):
            st.session_state[RESULT_KEY] = audit.load_audit(sel.store, chosen).to_dict()
            st.rerun()
        if c2.button("Delete", key="audit_delete", icon=":material/delete:"):
            audit.delete_audit(sel.store, chosen)
            current = st.session_state.get(RESULT_KEY)
            if current and current.get("id") == chosen:
                st.session_state.pop(RESULT_KEY)
            st.rerun()


def body() -> None:
    st.title("Audit")
    sel = context.selection_from_state()
    st.caption("Find the neurons of every layer whose descriptions mention a concept, as MILAN did for "
               "faces and text: by the words of the labels and by their meaning (MiniLM text embeddings).")
    if not sel.probe_set_id or not sel.model_spec:
        guard.empty_cache_notice()
        return
    st.caption(f"Model **{sel.model_spec}** · probe set {sel.probe_spec}")
    options = search_form(sel)
    if options is not None and not st.session_state.get("audit_query_text", "").strip(" ,"):
        st.info("Type one or more concepts to look for (e.g. face, skin, text), then press Search.",
                icon=":material/search:")
    elif options is not None:
        run_search(sel, options)
    saved_audits(sel)
    shown = st.session_state.get(RESULT_KEY)
    if shown:
        result = audit.Audit.from_dict(shown)
        if result.model_spec != sel.model_spec:
            st.caption(f"(showing an audit of {result.model_spec})")
        draw_results(sel, result)


shell.owner_page()  # the backstop that makes app.py decide who may see this page
with guard.friendly_errors("the audit page"):
    body()
