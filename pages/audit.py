"""Audit: search every layer of the model for neurons whose labels mention a concept
(by words and by meaning), see their top images, open them, save and export the audit."""

from __future__ import annotations

from types import SimpleNamespace

import streamlit as st

from ui import context, guard, shell

from neuroviz import audit

PER_PAGE = 20
THUMBS = 6
THUMB = 96
MODES = {"both": "Words and meaning", "text": "Words only", "meaning": "Meaning only"}
RESULT_KEY = "audit_result"


# the shared selection, error guard and model cache of the app (ui/)
current_workspace = context.workspace_from_state
friendly = guard.friendly_errors


def search_form(ws) -> audit.AuditOptions | None:
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
            methods = o3.multiselect("Methods (none = all)", _methods(ws), key="audit_methods")
        submitted = st.form_submit_button("Search", type="primary", icon=":material/search:")
    if not submitted:
        return None
    st.session_state["audit_query_text"] = query
    return audit.AuditOptions(match_text=mode != "meaning", match_meaning=mode != "text", substring=substring,
                              min_similarity=float(min_sim), all_ranks=all_ranks, max_results=int(max_results),
                              methods=methods or None)


def _methods(ws) -> list[str]:
    catalog = getattr(ws, "catalog", None)
    if catalog is None:
        return []
    runs = catalog.runs_for(ws.model_spec, ws.probe_set_id)
    return sorted({m for r in runs for m in catalog.methods_by_run.get(r.run_key, [])})


def run_search(ws, options: audit.AuditOptions) -> None:
    query = st.session_state.get("audit_query_text", "")
    spinner = "Embedding labels with MiniLM (first search loads it)..." if options.match_meaning else "Searching..."
    with st.spinner(spinner):
        result = audit.search(ws.store, ws.model_spec, ws.probe_set_id, query, options)
    st.session_state[RESULT_KEY] = result.to_dict()
    st.session_state["audit_page"] = 1


def thumbnails(store, hit: audit.AuditHit) -> list:
    """Small square pictures of a hit's top images (cached on disk when ui helpers exist)."""
    out = []
    for im in hit.top_images[:THUMBS]:
        path = im.get("path")
        if not path:
            continue
        try:
            from neuroviz.images import thumbnail

            out.append((str(thumbnail(store.root, path, THUMB)), f"{im['activation']:.2f}"))
        except ImportError:
            from neuroviz.datasets import load_rgb

            img = load_rgb(path)
            img.thumbnail((THUMB, THUMB))
            out.append((img, f"{im['activation']:.2f}"))
    return out


def draw_hit(ws, result: audit.Audit, hit: audit.AuditHit, index: int) -> None:
    with st.container(border=True):
        left, right = st.columns([2, 5])
        with left:
            st.markdown(f"**{hit.label}**")
            st.caption(f"{hit.layer} · neuron {hit.neuron} · {_title(hit.method)}"
                       + (f" · rank {hit.rank + 1}" if hit.rank else ""))
            st.caption(f"match {hit.match_score:.2f} ({hit.match_kind}) for '{hit.matched_term}'")
            params = {"model": result.model_spec, "probe": result.probe_set_id, "layer": hit.layer, "neuron": str(hit.neuron)}
            try:
                st.page_link("pages/neuron.py", label="Open neuron", icon=":material/open_in_new:", query_params=params)
            except Exception:  # the neuron page is not part of this app's navigation
                st.markdown(f"[Open neuron]({audit.neuron_page_link(hit, result.model_spec, result.probe_set_id)})")
        with right:
            pics = thumbnails(ws.store, hit)
            if pics:
                cols = st.columns(THUMBS, gap="small")
                for col, (pic, caption) in zip(cols, pics):
                    col.image(pic, caption=caption, width="stretch")


def _title(method: str) -> str:
    try:
        from ui.data import method_title

        return method_title(method)
    except ImportError:
        return method


def draw_results(ws, result: audit.Audit) -> None:
    options = result.options
    how = " and ".join(k for k, on in (("words", options.match_text), ("meaning", options.match_meaning)) if on)
    n = len(result.hits)
    st.subheader(f"{n} neuron{'s match' if n != 1 else ' matches'} '{result.query}'")
    st.caption(f"searched {result.n_labels_searched} labels by {how} in {len(result.layers_searched)} layers "
               f"({', '.join(result.layers_searched)})" + (f" · text encoder {result.text_backend_id}" if result.text_backend_id else ""))
    if not result.hits:
        hint = "a lower meaning similarity" if options.match_meaning else "meaning search"
        st.info(f"No label matches. Try {hint}, other words, or runner-up labels (Options).")
        return
    actions(ws, result)
    by_layer = {}
    for hit in result.hits:
        by_layer[hit.layer] = by_layer.get(hit.layer, 0) + 1
    st.caption("per layer: " + ", ".join(f"{layer} {n}" for layer, n in by_layer.items()))
    n_pages = max(1, -(-len(result.hits) // PER_PAGE))
    page = min(int(st.session_state.get("audit_page", 1)), n_pages)
    if n_pages > 1:
        page = int(st.number_input(f"Page (of {n_pages})", 1, n_pages, page, key="audit_page_input"))
        st.session_state["audit_page"] = page
    for i, hit in enumerate(result.hits[(page - 1) * PER_PAGE: page * PER_PAGE]):
        draw_hit(ws, result, hit, i)


def actions(ws, result: audit.Audit) -> None:
    """Save, export, and hand the neurons to the Editing page."""
    c1, c2, c3, c4 = st.columns(4)
    if c1.button("Save audit", icon=":material/save:", key="audit_save"):
        audit.save_audit(ws.store, result)
        st.session_state[RESULT_KEY] = result.to_dict()
        st.toast(f"Saved as {result.id}")
    c2.download_button("CSV", audit.audit_to_csv(result), file_name=f"{result.id}.csv", mime="text/csv",
                       icon=":material/download:", key="audit_csv")
    c3.download_button("JSON", audit.audit_to_json(result), file_name=f"{result.id}.json", mime="application/json",
                       icon=":material/download:", key="audit_json")
    if c4.button("Ablate these neurons", icon=":material/edit:", key="audit_to_edit",
                 help="Open the Editing page with these neurons selected."):
        audit.save_audit(ws.store, result)
        st.session_state["editing_audit_id"] = result.id
        st.session_state["editing_source"] = "audit"
        try:
            st.switch_page("pages/editing.py")
        except Exception:
            st.info("Saved; pick it on the Editing page.")


def saved_audits(ws) -> None:
    saved = audit.list_audits(ws.store, ws.model_spec)
    with st.expander(f"Saved audits of this model ({len(saved)})"):
        if not saved:
            st.caption("None yet: search, then Save audit.")
            return
        import time as _time

        labels = {a["id"]: f"'{a['query']}' · {a['n_hits']} hits · {_time.strftime('%Y-%m-%d %H:%M', _time.localtime(a['created'] or 0))}"
                  for a in saved}
        chosen = st.selectbox("Audit", list(labels), format_func=labels.get, key="audit_saved_choice")
        c1, c2 = st.columns(2)
        if c1.button("Open", key="audit_open", icon=":material/folder_open:"):
            st.session_state[RESULT_KEY] = audit.load_audit(ws.store, chosen).to_dict()
            st.rerun()
        if c2.button("Delete", key="audit_delete", icon=":material/delete:"):
            audit.delete_audit(ws.store, chosen)
            current = st.session_state.get(RESULT_KEY)
            if current and current.get("id") == chosen:
                st.session_state.pop(RESULT_KEY)
            st.rerun()


def body() -> None:
    st.title("Audit")
    ws = current_workspace()
    st.caption("Find the neurons of every layer whose descriptions mention a concept, as MILAN did for "
               "faces and text: by the words of the labels and by their meaning (MiniLM text embeddings).")
    if not ws.probe_set_id or not ws.model_spec:
        try:
            from ui import guard

            guard.empty_cache_notice()
        except ImportError:
            st.info("No runs yet: extract some layers on the Workspace page first.")
        return
    st.caption(f"Model **{ws.model_spec}** · probe set {ws.probe_spec}")
    options = search_form(ws)
    if options is not None:
        run_search(ws, options)
    saved_audits(ws)
    data = st.session_state.get(RESULT_KEY)
    if data:
        result = audit.Audit.from_dict(data)
        if result.model_spec != ws.model_spec:
            st.caption(f"(showing an audit of {result.model_spec})")
        draw_results(ws, result)


shell.owner_page()  # the backstop that makes app.py decide who may see this page
with friendly("the audit page"):
    body()
