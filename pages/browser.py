"""Layer browser: a paged grid of neuron cards (top images + every method's label)."""

from __future__ import annotations

import streamlit as st

from ui import cards, context, data, guard, shell

PER_PAGE = 24
COLUMNS = 4
SORTS = {
    "neuron": "Neuron number",
    "score": "Label score (first shown method)",
    "max": "Peak activation",
    "agreement": "Methods agree first",
}
AGREEMENT = {"all": "All neurons", "agree": "Methods agree", "disagree": "Methods disagree"}


def _page_state_key(ws: context.Workspace, *filters: str) -> str:
    # a new search or filter starts again on page 1
    return "browser_page::" + "::".join([ws.run.run_key if ws.run else "", *filters])


def _filtered_neurons(ws: context.Workspace, query: str, sort: str, agree: str, similar, threshold: float) -> tuple[list[int], dict]:
    """Neurons matching the search and agreement filter, in the chosen order."""
    run = ws.run
    labels = data.run_labels(ws.store, run.run_key)
    tops = cards.top_labels(labels, ws.methods)
    neurons = list(range(run.n_neurons))
    if query:
        q = query.lower().strip()
        hit = set()
        if not labels.empty:
            shown = labels[labels["method"].isin(ws.methods)]
            hit = set(shown.loc[shown["label"].str.lower().str.contains(q, regex=False, na=False), "neuron"].astype(int))
        if q.isdigit():
            hit.add(int(q))
        neurons = [n for n in neurons if n in hit]
    agreement = {n: cards.agreement(tops.get(n, {}), ws.methods, similar, threshold) for n in neurons}
    if agree == "agree":
        neurons = [n for n in neurons if agreement[n] is True]
    elif agree == "disagree":
        neurons = [n for n in neurons if agreement[n] is False]
    if sort == "score" and ws.methods:
        first = ws.methods[0]
        neurons.sort(key=lambda n: -(tops.get(n, {}).get(first, {}).get("score", float("-inf"))))
    elif sort == "max":
        stats = data.neuron_stats(ws.store, run.run_key)
        peak = dict(zip(stats["neuron"].astype(int), stats["max"]))
        neurons.sort(key=lambda n: -peak.get(n, 0.0))
    elif sort == "agreement":
        neurons.sort(key=lambda n: {True: 0, None: 1, False: 2}[agreement[n]])
    return neurons, {"tops": tops, "agreement": agreement}


@st.cache_resource(show_spinner="Loading the text encoder for label similarity...")
def _text_encoder():
    from neuroviz.offline_weights import minilm_dir
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


@st.cache_data(show_spinner=False, max_entries=8)
def _label_similarity(labels: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """Cosine similarity between every pair of distinct labels that co-occur on a neuron."""
    encoder = _text_encoder()
    vectors = encoder.encode(list(labels), normalize_embeddings=True, convert_to_numpy=True)
    index = {t: i for i, t in enumerate(labels)}
    return {(a, b): float(vectors[index[a]] @ vectors[index[b]]) for a in labels for b in labels if a < b}


def _similar_pairs(ws: context.Workspace) -> dict | None:
    labels = data.run_labels(ws.store, ws.run.run_key)
    if labels.empty:
        return None
    texts = tuple(sorted({cards.normalised(t) for t in labels.loc[labels["rank"] == 0, "label"]}))
    if len(texts) > 4000:
        st.warning("Too many distinct labels to compare by meaning here; using exact text.")
        return None
    return _label_similarity(texts)


def draw_card(ws: context.Workspace, neuron: int, tops: dict, agreement: bool | None, pictures: dict) -> None:
    run = ws.run
    with st.container(border=True):
        st.page_link("pages/neuron.py", label=f"**Neuron {neuron}**", icon=":material/open_in_new:",
                     query_params=ws.query_params(neuron), help="Open this neuron")
        cards.show_image(cards.mosaic_for(ws.store, run, neuron, **pictures), width="stretch")
        lines = [cards.label_line_html(m, tops.get(m), compact=True) for m in ws.methods]
        if agreement is True:
            lines.append("<div class='nv-agree'>methods agree</div>")
        elif agreement is False:
            lines.append("<div class='nv-disagree'>methods disagree</div>")
        if lines:
            st.html("".join(lines))
        else:
            st.caption("no labels yet")


def body() -> None:
    ws = context.workspace_from_state()
    st.title("Layer browser")
    if ws.run is None:
        guard.empty_cache_notice()
        return
    run = ws.run
    cards.inject_css()
    st.caption(f"{ws.model_spec} · **{ws.layer}** · {run.n_neurons} neurons over {run.n_images} images "
               f"({run.pooling} pooling, top {run.k} kept)")
    if not ws.methods:
        st.info("No labels for this layer yet: start a labelling job on the Workspace page "
                "(or pick methods in the sidebar). Cards show the top images only.")
    c1, c2, c3 = st.columns([3, 2, 2])
    query = c1.text_input("Search labels", key="browser_query", placeholder="e.g. dog, stripes, or a neuron number")
    sort = c2.selectbox("Sort by", list(SORTS), format_func=SORTS.get, key="browser_sort")
    agree = c3.selectbox("Agreement", list(AGREEMENT), format_func=AGREEMENT.get, key="browser_agree",
                         disabled=len(ws.methods) < 2, help="Pick two or more methods in the sidebar to compare them.")
    similar, threshold = None, 0.8
    if len(ws.methods) >= 2 and agree != "all" or sort == "agreement":
        m1, m2 = st.columns([2, 3])
        by_meaning = m1.toggle("Compare labels by meaning", key="browser_meaning",
                               help="Agree when the MiniLM text embeddings of the labels have cosine above the threshold; "
                                    "off: agree only on the same text.")
        if by_meaning:
            threshold = m2.slider("Cosine threshold", 0.5, 1.0, 0.8, 0.05, key="browser_threshold")
            with guard.friendly_errors("label similarity"):
                similar = _similar_pairs(ws)
    neurons, info = _filtered_neurons(ws, query, sort, agree, similar, threshold)
    n_pages = max(1, -(-len(neurons) // PER_PAGE))
    key = _page_state_key(ws, query, sort, agree, str(bool(similar)), str(threshold), ",".join(ws.methods))
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
    pictures = {"geometry": cards.run_geometry(ws.store, run), "top": data.top_k(ws.store, run.run_key),
                "files": data.probe_files(ws.store, run.probe_set_id)}
    for start in range(0, len(shown), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, neuron in zip(cols, shown[start:start + COLUMNS]):
            with col:
                draw_card(ws, neuron, info["tops"].get(neuron, {}), info["agreement"].get(neuron), pictures)


shell.owner_page(with_neuron=False)
with guard.friendly_errors("the layer browser"):
    body()
