"""Layer browser: a paged grid of neuron cards (top images + every method's label)."""

from __future__ import annotations

import html

import streamlit as st

from neuroviz import browse
from ui import cards, context, data, guard, shell, trust_view, units

PER_PAGE = 24
COLUMNS = 4
SORTS = {
    "neuron": "Neuron number",
    "score": "Label score (first shown method: beats-chance share, else raw)",
    "max": "Peak activation",
    "agreement": "Methods agree first",
}
AGREEMENT = {"all": "All neurons", "agree": "Methods agree", "disagree": "Methods disagree"}


def _page_state_key(sel: context.Selection, *filters: str) -> str:
    # a new search or filter starts again on page 1
    return "browser_page::" + "::".join([sel.run.run_key if sel.run else "", *filters])


def _browse(sel: context.Selection, query: browse.BrowseQuery) -> browse.BrowseResult:
    """The neurons to show, cached per database version: paging through a 2,000-neuron
    layer recomputes nothing."""
    return _browse_cached(str(sel.store.root), data.db_version(sel.store), sel.run.run_key, sel.run.n_neurons, query)


@st.cache_resource(show_spinner=False, max_entries=32)
def _browse_cached(root: str, version: tuple, run_key: str, n_neurons: int, query: browse.BrowseQuery) -> browse.BrowseResult:
    store = data.get_store(root)
    labels = data.run_labels(store, run_key)
    similar = _label_similarity(root, version, run_key) if query.by_meaning else None
    return browse.browse(labels, data.neuron_stats(store, run_key), n_neurons, query, similar)


@st.cache_resource(show_spinner="Embedding the labels with MiniLM (first time only)...", max_entries=8)
def _label_similarity(root: str, version: tuple, run_key: str) -> browse.LabelSimilarity | None:
    return browse.label_similarity(data.run_labels(data.get_store(root), run_key))


def match_html(hits: list[tuple[str, int, str]]) -> str:
    """Why a card matched the search: which method's answer or candidate, or its number."""
    reasons = []
    for method, rank, label in hits:
        if method == "number":
            reasons.append("its neuron number")
        elif rank == 0:
            reasons.append(f"{data.method_title(method)}'s label")
        else:
            reasons.append(f"{data.method_title(method)} candidate {rank + 1}: {label}")
    return f"<div class='nv-match'>matched {html.escape('; '.join(dict.fromkeys(reasons)))}</div>"


def draw_card(sel: context.Selection, neuron: int, tops: dict, agreement: bool | None, mosaic,
              hits: list[tuple[str, int, str]] | None = None) -> None:
    with st.container(border=True):
        st.page_link("views/neuron.py", label=f"**{units.unit_heading(sel, neuron)}**", icon=":material/open_in_new:",
                     query_params=sel.query_params(neuron), help="Open this neuron")
        cards.show_image(mosaic, width="stretch")
        lines = [units.dead_html()] if neuron in units.dead(sel) else [cards.label_line_html(m, tops.get(m)) for m in sel.methods]
        if hits:
            lines.append(match_html(hits))
        if agreement is True:
            lines.append("<div class='nv-agree'>methods agree</div>")
        elif agreement is False:
            lines.append("<div class='nv-disagree'>methods disagree</div>")
        lines.append(trust_view.badge_line_html(trust_view.run_badges(sel).get(neuron)))
        if any(lines):
            st.html("".join(lines))
        else:
            st.caption("no labels yet")


def body() -> None:
    sel = context.selection_from_state()
    st.title("Layer browser")
    if sel.run is None:
        guard.empty_cache_notice()
        return
    run = sel.run
    cards.inject_css()
    st.caption(f"{sel.model_spec} · **{sel.layer}** · {run.n_neurons} {units.unit_heading(sel)} over {run.n_images} images "
               f"({run.pooling} pooling, top {run.k} kept)")
    if not sel.methods:
        st.info("No labels for this layer yet: start a labelling job on the Workspace page "
                "(or pick methods in the sidebar). Cards show the top images only.")
    c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
    query = c1.text_input("Search labels", key="browser_query", placeholder="e.g. dog, stripes, or a neuron number",
                          help="Searches the labels shown on the cards (each shown method's answer).")
    candidates = c1.toggle("Also search runner-up candidates", key="browser_candidates",
                           help="Each method also keeps a few runner-up labels per neuron (on the Neuron page); "
                                "a card matched by one says which.")
    sort = c2.selectbox("Sort by", list(SORTS), format_func=SORTS.get, key="browser_sort")
    agree = c3.selectbox("Agreement", list(AGREEMENT), format_func=AGREEMENT.get, key="browser_agree",
                         disabled=len(sel.methods) < 2, help="Pick two or more methods in the sidebar to compare them.")
    by_meaning, threshold = False, 0.8
    if (len(sel.methods) >= 2 and agree != "all") or sort == "agreement":
        m1, m2 = st.columns([2, 3])
        by_meaning = m1.toggle("Compare labels by meaning", key="browser_meaning",
                               help="Agree when the MiniLM text embeddings of the labels have cosine above the threshold; "
                                    "off: agree only on the same text.")
        if by_meaning:
            threshold = m2.slider("Cosine threshold", 0.5, 1.0, 0.8, 0.05, key="browser_threshold")
    found = browse.BrowseResult([])
    with guard.friendly_errors("label similarity" if by_meaning else "the neuron list"):
        found = _browse(sel, browse.BrowseQuery(tuple(sel.methods), query, sort, agree, by_meaning, threshold,
                                                        candidates))
    neurons = trust_view.badge_controls(sel, found.neurons, c4)
    n_pages = max(1, -(-len(neurons) // PER_PAGE))
    key = _page_state_key(sel, query, sort, agree, str(by_meaning), str(threshold), ",".join(sel.methods), str(candidates))
    page = min(int(st.session_state.get(key, 1)), n_pages)
    nav1, nav2, nav3, nav4 = st.columns([1, 1, 2, 4], vertical_alignment="bottom")
    if nav1.button("Previous", icon=":material/chevron_left:", disabled=page <= 1, key="browser_prev"):
        page -= 1
    if nav2.button("Next", icon=":material/chevron_right:", disabled=page >= n_pages, key="browser_next"):
        page += 1
    st.session_state[key] = page
    nav3.markdown(f"Page **{page}** of {n_pages}")
    nav4.caption(f"{len(neurons)} of {run.n_neurons} neurons match" if (query or agree != "all") else f"{run.n_neurons} neurons")
    if not neurons:
        st.info("No neuron matches. Clear the search or the agreement filter.")
        return
    shown = neurons[(page - 1) * PER_PAGE: page * PER_PAGE]
    pictures = {"geometry": cards.run_geometry(sel.store, run), "top": data.top_k(sel.store, run.run_key),
                "files": data.run_files(sel.store, run.run_key)}
    rest = neurons[page * PER_PAGE:] + neurons[:(page - 1) * PER_PAGE]
    mosaics = cards.mosaics_for(sel.store, run, shown, ahead=rest, **pictures)
    for start in range(0, len(shown), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, neuron in zip(cols, shown[start:start + COLUMNS]):
            with col:
                draw_card(sel, neuron, found.tops.get(neuron, {}), found.agreement.get(neuron), mosaics.get(neuron),
                          found.matches.get(neuron))
    # the rest of the layer's pictures, in this order, while the user looks at this page
    cards.prerender_mosaics(sel.store, run, rest, **pictures)


shell.owner_page()
with guard.friendly_errors("the layer browser"):
    body()
