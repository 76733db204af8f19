"""Compare: two neurons side by side, or two methods over the same neurons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from neuroviz import browse
from ui import cards, context, data, guard, shell

MODES = {"neurons": "Two neurons", "methods": "Two methods"}
PER_PAGE = 12


def _neuron_panel(sel: context.Selection, run, neuron: int, column) -> None:
    with column.container(border=True):
        st.markdown(f"**{run.layer} · neuron {neuron}**")
        mosaic = cards.mosaic_for(sel.store, run, neuron, n=16, tile=96)
        if mosaic is not None:
            cards.show_image(mosaic, width="stretch")
        labels = data.run_labels(sel.store, run.run_key)
        tops = browse.top_labels(labels, sel.catalog.methods_by_run.get(run.run_key, []))
        entries = tops.get(neuron, {})
        if entries:
            st.html("".join(cards.label_line_html(m, entries[m]) for m in entries))
        else:
            st.caption("No labels.")
        st.page_link("pages/neuron.py", label="Open this neuron", icon=":material/open_in_new:",
                     query_params={**sel.query_params(neuron), "layer": run.layer})


def _two_neurons(sel: context.Selection) -> None:
    runs = {r.layer: r for r in sel.runs}
    layers = list(runs)
    cols = st.columns(2)
    picks = []
    for side, col in zip(("a", "b"), cols):
        default_layer = sel.layer if sel.layer in layers else layers[0]
        layer = col.selectbox("Layer", layers, index=layers.index(default_layer), key=f"cmp_layer_{side}")
        run = runs[layer]
        default_neuron = (sel.neuron or 0) if side == "a" else min((sel.neuron or 0) + 1, run.n_neurons - 1)
        neuron = col.number_input("Neuron", 0, run.n_neurons - 1, min(default_neuron, run.n_neurons - 1),
                                  key=f"cmp_neuron_{side}_{layer}")
        picks.append((run, int(neuron)))
    for (run, neuron), col in zip(picks, cols):
        _neuron_panel(sel, run, neuron, col)
    (run_a, n_a), (run_b, n_b) = picks
    if run_a.n_images == run_b.n_images and run_a.n_images > 2:
        a = cards.activation_column(sel.store, run_a.run_key, n_a)
        b = cards.activation_column(sel.store, run_b.run_key, n_b)
        if a.std() > 0 and b.std() > 0:
            r = float(np.corrcoef(a, b)[0, 1])
            top_a = set(np.argsort(a)[-run_a.k:])
            top_b = set(np.argsort(b)[-run_b.k:])
            st.metric("Correlation of activations over the probe set", f"{r:.3f}",
                      help="Pearson r over every probe image; 1 = the two neurons respond alike.")
            st.caption(f"{len(top_a & top_b)} images are in both top-{min(run_a.k, run_b.k)} lists.")
            _scatter(a, b, f"{run_a.layer} #{n_a}", f"{run_b.layer} #{n_b}")


def _scatter(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure(go.Scattergl(x=a, y=b, mode="markers", marker=dict(size=5, opacity=0.6, color="#6366f1")))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=10, b=10), xaxis_title=name_a, yaxis_title=name_b)
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})


def _two_methods(sel: context.Selection) -> None:
    have = sel.available_methods
    if len(have) < 2:
        st.info(f"Layer {sel.layer} has labels from {len(have)} method(s); label it with another method on the "
                "Workspace page to compare.")
        return
    # the methods that labelled the most neurons first: the default pair compares the most
    coverage = {m: sum(lr["n_neurons"] for lr in sel.catalog.label_runs if lr["run_key"] == sel.run.run_key and lr["method"] == m)
                for m in have}
    have = sorted(have, key=lambda m: -coverage[m])
    c1, c2, c3 = st.columns([2, 2, 2])
    m_a = c1.selectbox("Method A", have, index=0, format_func=data.method_title, key="cmp_method_a")
    m_b = c2.selectbox("Method B", have, index=1, format_func=data.method_title, key="cmp_method_b")
    only = c3.selectbox("Show", ["all", "disagree", "agree"], key="cmp_only",
                        format_func={"all": "Every neuron", "disagree": "Only disagreements", "agree": "Only agreements"}.get)
    if m_a == m_b:
        st.warning("Pick two different methods.")
        return
    labels = data.run_labels(sel.store, sel.run.run_key)
    tops = browse.top_labels(labels, [m_a, m_b])
    both = [n for n in sorted(tops) if m_a in tops[n] and m_b in tops[n]]
    rows = []
    for n in both:
        a, b = tops[n][m_a], tops[n][m_b]
        rows.append({"neuron": n, data.method_title(m_a): a["label"], "score A": a["score"],
                     data.method_title(m_b): b["label"], "score B": b["score"],
                     "same": browse.agreement(tops[n], (m_a, m_b)) is True})
    table = pd.DataFrame(rows)
    if table.empty:
        st.info("No neuron has labels from both methods.")
        return
    agree_rate = float(table["same"].mean())
    k1, k2, k3 = st.columns(3)
    k1.metric("Neurons labelled by both", len(table))
    k2.metric("Same label", f"{agree_rate:.0%}")
    if len(table) > 2:
        rho = table["score A"].rank().corr(table["score B"].rank())
        k3.metric("Score rank correlation", f"{rho:.2f}" if pd.notna(rho) else "–",
                  help="Spearman correlation of the two methods' scores: do they find the same neurons easy?")
    if only == "disagree":
        table = table[~table["same"]]
    elif only == "agree":
        table = table[table["same"]]
    st.dataframe(table, hide_index=True, width="stretch", height=260)
    if table.empty:
        return
    n_pages = max(1, -(-len(table) // PER_PAGE))
    page = st.number_input("Page", 1, n_pages, 1, key=f"cmp_page_{m_a}_{m_b}_{only}") if n_pages > 1 else 1
    shown = table["neuron"].tolist()[(page - 1) * PER_PAGE: page * PER_PAGE]
    cards.inject_css()
    for start in range(0, len(shown), 4):
        cols = st.columns(4)
        for col, n in zip(cols, shown[start:start + 4]):
            with col.container(border=True):
                st.page_link("pages/neuron.py", label=f"Neuron {n}", query_params=sel.query_params(n))
                mosaic = cards.mosaic_for(sel.store, sel.run, n)
                if mosaic is not None:
                    cards.show_image(mosaic, width="stretch")
                st.html(cards.label_line_html(m_a, tops[n][m_a], compact=True) + cards.label_line_html(m_b, tops[n][m_b], compact=True))


def body() -> None:
    sel = context.selection_from_state()
    st.title("Compare")
    if sel.run is None:
        guard.empty_cache_notice()
        return
    cards.inject_css()
    mode = st.segmented_control("Compare", list(MODES), format_func=MODES.get, default="neurons", key="cmp_mode") or "neurons"
    if mode == "neurons":
        _two_neurons(sel)
    else:
        _two_methods(sel)


shell.owner_page()
with guard.friendly_errors("the comparison"):
    body()
