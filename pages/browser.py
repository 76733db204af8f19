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


def _filtered_neurons(ws: context.Workspace, query: str, sort: str, agree: str, by_meaning: bool,
                      threshold: float) -> tuple[list[int], dict]:
    """Neurons matching the search and agreement filter, in the chosen order (cached per
    database version: paging through a 2,000-neuron layer recomputes nothing)."""
    return _filtered(str(ws.store.root), data.db_version(ws.store), ws.run.run_key, ws.run.n_neurons, tuple(ws.methods),
                     query.lower().strip(), sort, agree, by_meaning, threshold)


@st.cache_resource(show_spinner=False, max_entries=32)
def _filtered(root: str, version: tuple, run_key: str, n_neurons: int, methods: tuple[str, ...], query: str, sort: str,
              agree: str, by_meaning: bool, threshold: float) -> tuple[list[int], dict]:
    store = context.get_store(root)
    labels = data.run_labels(store, run_key)
    tops = cards.top_labels(labels, methods)
    similar = _similar_pairs(labels) if by_meaning else None
    neurons = list(range(n_neurons))
    if query:
        hit = set()
        if not labels.empty:
            shown = labels[labels["method"].isin(methods)]
            hit = set(shown.loc[shown["label"].str.lower().str.contains(query, regex=False, na=False), "neuron"].astype(int))
        if query.isdigit():
            hit.add(int(query))
        neurons = [n for n in neurons if n in hit]
    agreement = {n: cards.agreement(tops.get(n, {}), methods, similar, threshold) for n in neurons}
    if agree == "agree":
        neurons = [n for n in neurons if agreement[n] is True]
    elif agree == "disagree":
        neurons = [n for n in neurons if agreement[n] is False]
    if sort == "score" and methods:
        first = methods[0]
        neurons.sort(key=lambda n: -(tops.get(n, {}).get(first, {}).get("score", float("-inf"))))
    elif sort == "max":
        stats = data.neuron_stats(store, run_key)
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


class LabelSimilarity:
    """Cosine similarity of label texts from their MiniLM embeddings, looked up by pair
    (duck-types the dict cards.agreement expects; only the pairs asked for are computed)."""

    def __init__(self, texts: tuple[str, ...], vectors):
        self.index = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors

    def get(self, pair: tuple[str, str], default: float = 0.0) -> float:
        a, b = (self.index.get(t) for t in pair)
        if a is None or b is None:
            return default
        return float(self.vectors[a] @ self.vectors[b])


@st.cache_resource(show_spinner=False, max_entries=8)
def _label_similarity(texts: tuple[str, ...]) -> LabelSimilarity:
    vectors = _text_encoder().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, batch_size=128)
    return LabelSimilarity(texts, vectors)


def _similar_pairs(labels) -> LabelSimilarity | None:
    if labels.empty:
        return None
    texts = tuple(sorted({cards.normalised(t) for t in labels.loc[labels["rank"] == 0, "label"]}))
    if len(texts) > 20000:
        return None  # too many texts to embed interactively: exact text only
    return _label_similarity(texts)


def draw_card(ws: context.Workspace, neuron: int, tops: dict, agreement: bool | None, mosaic) -> None:
    with st.container(border=True):
        st.page_link("pages/neuron.py", label=f"**Neuron {neuron}**", icon=":material/open_in_new:",
                     query_params=ws.query_params(neuron), help="Open this neuron")
        cards.show_image(mosaic, width="stretch")
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
    by_meaning, threshold = False, 0.8
    if len(ws.methods) >= 2 and agree != "all" or sort == "agreement":
        m1, m2 = st.columns([2, 3])
        by_meaning = m1.toggle("Compare labels by meaning", key="browser_meaning",
                               help="Agree when the MiniLM text embeddings of the labels have cosine above the threshold; "
                                    "off: agree only on the same text.")
        if by_meaning:
            threshold = m2.slider("Cosine threshold", 0.5, 1.0, 0.8, 0.05, key="browser_threshold")
    neurons, info = [], {"tops": {}, "agreement": {}}
    with guard.friendly_errors("label similarity" if by_meaning else "the neuron list"):
        neurons, info = _filtered_neurons(ws, query, sort, agree, by_meaning, threshold)
    n_pages = max(1, -(-len(neurons) // PER_PAGE))
    key = _page_state_key(ws, query, sort, agree, str(by_meaning), str(threshold), ",".join(ws.methods))
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
                "files": data.run_files(ws.store, run.run_key)}
    mosaics = cards.mosaics_for(ws.store, run, shown, **pictures)
    for start in range(0, len(shown), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, neuron in zip(cols, shown[start:start + COLUMNS]):
            with col:
                draw_card(ws, neuron, info["tops"].get(neuron, {}), info["agreement"].get(neuron), mosaics.get(neuron))
    # the rest of the layer's pictures, in this order, while the user looks at this page
    cards.prerender_mosaics(ws.store, run, neurons[page * PER_PAGE:] + neurons[:(page - 1) * PER_PAGE], **pictures)


shell.owner_page()
with guard.friendly_errors("the layer browser"):
    body()
