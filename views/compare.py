"""Compare: two neurons side by side, or two methods over the same neurons."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from neuroviz import browse, neuron_activations
from ui import cards, context, data, guard, shell

MODES = {"neurons": "Two neurons", "methods": "Two methods"}
PER_PAGE = 12


def _backend_details(entries: dict) -> None:
    """Which backends produced each label, behind a toggle (long strings clutter the panels)."""
    with st.expander("Details: backends"):
        for method, entry in entries.items():
            st.caption(f"{data.method_title(method)}: {entry.get('backend') or 'none'}")


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
            _backend_details(entries)
        else:
            st.caption("No labels.")
        st.page_link("views/neuron.py", label="Open this neuron", icon=":material/open_in_new:",
                     query_params={**sel.query_params(neuron), "layer": run.layer})


def parse_side(text: str | None, layers: list[str]) -> tuple[str, int] | None:
    """'layer4:12' (a Compare URL's side) -> ('layer4', 12); None when it names no layer here."""
    if not text or ":" not in text:
        return None
    layer, _, number = text.rpartition(":")
    if layer not in layers or not number.lstrip("-").isdigit():
        return None
    return layer, int(number)


def _apply_link(apply) -> None:
    """Seed the widgets from the Compare part of the URL once per new link (a deep link, reload)."""
    current = {k: st.query_params.get(k) for k in ("mode", "a", "b")}
    if all(v is None for v in current.values()) or st.session_state.get("cmp_last_url") == current:
        return
    apply(current)
    st.session_state["cmp_last_url"] = current


def _write_link(values: dict[str, str]) -> None:
    """Make the address bar record the pair on screen (mode, side a, side b)."""
    for key, value in values.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value
    st.session_state["cmp_last_url"] = {k: values.get(k) for k in ("mode", "a", "b")}


def _two_neurons(sel: context.Selection) -> None:
    runs = {r.layer: r for r in sel.runs}
    layers = list(runs)

    def from_link(link: dict) -> None:
        if link.get("mode") not in (None, "neurons"):
            return
        for side in ("a", "b"):
            parsed = parse_side(link.get(side), layers)
            if parsed is not None:
                st.session_state[f"cmp_layer_{side}"], st.session_state[f"cmp_neuron_{side}"] = parsed
            elif link.get(side):
                st.warning(f"The link's side {side.upper()} '{link[side]}' names no extracted layer:neuron; "
                           f"showing the default instead (layers: {', '.join(layers)}).")

    _apply_link(from_link)
    cols = st.columns(2)
    picks = []
    for side, col in zip(("a", "b"), cols):
        lkey, nkey = f"cmp_layer_{side}", f"cmp_neuron_{side}"
        if st.session_state.get(lkey) not in layers:
            st.session_state[lkey] = sel.layer if sel.layer in layers else layers[0]
        layer = col.selectbox("Layer", layers, key=lkey)
        run = runs[layer]
        if not isinstance(st.session_state.get(nkey), int):
            st.session_state[nkey] = (sel.neuron or 0) if side == "a" else (sel.neuron or 0) + 1
        wanted = st.session_state[nkey]
        if not 0 <= wanted < run.n_neurons:  # a layer change keeps the neuron when it exists there
            st.session_state[nkey] = min(max(0, wanted), run.n_neurons - 1)
            col.caption(f"Neuron {wanted} does not exist in {layer} (0 to {run.n_neurons - 1}); "
                        f"showing {st.session_state[nkey]}.")
        neuron = col.number_input("Neuron", 0, run.n_neurons - 1, key=nkey)
        picks.append((run, int(neuron)))
    _write_link({"mode": "neurons", "a": f"{picks[0][0].layer}:{picks[0][1]}", "b": f"{picks[1][0].layer}:{picks[1][1]}"})
    for (run, neuron), col in zip(picks, cols):
        _neuron_panel(sel, run, neuron, col)
    (run_a, n_a), (run_b, n_b) = picks
    if run_a.n_images == run_b.n_images and run_a.n_images > 2:
        pair, fig = _pair(str(sel.store.root), run_a.run_key, n_a, run_b.run_key, n_b)
        if pair.correlation is not None:
            st.metric("Correlation of activations over the probe set", f"{pair.correlation:.3f}",
                      help="Pearson r over every probe image; 1 = the two neurons respond alike.")
            st.caption(f"{pair.shared_top} images are in both top-{min(run_a.k, run_b.k)} lists."
                       + (f" The plot shows {len(pair.points):,} of the {run_a.n_images:,} images: a random sample and "
                          "both top lists." if len(pair.points) < run_a.n_images else ""))
            st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})


@st.cache_resource(show_spinner=False, max_entries=16)
def _pair(root: str, run_a: str, n_a: int, run_b: str, n_b: int):
    """The two neurons' correlation, shared top images and scatter plot, once per pair (a run's
    arrays never change under its key)."""
    import plotly.graph_objects as go

    store = data.get_store(root)
    a, b = cards.activation_column(store, run_a, n_a), cards.activation_column(store, run_b, n_b)
    info_a, info_b = store.get_run(run_a), store.get_run(run_b)
    k = min(info_a.k, info_b.k) if info_a and info_b else 0
    pair = neuron_activations.compare(a, b, data.top_k(store, run_a).image_idx[n_a][:k],
                                      data.top_k(store, run_b).image_idx[n_b][:k])
    fig = go.Figure(go.Scattergl(x=a[pair.points], y=b[pair.points], mode="markers",
                                 marker=dict(size=5, opacity=0.6, color="#6366f1")))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=10, b=10), xaxis_title=f"{info_a.layer if info_a else ''} #{n_a}",
                      yaxis_title=f"{info_b.layer if info_b else ''} #{n_b}")
    return pair, fig


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

    def from_link(link: dict) -> None:
        if link.get("mode") != "methods":
            return
        for side in ("a", "b"):
            if link.get(side) in have:
                st.session_state[f"cmp_method_{side}"] = link[side]
            elif link.get(side):
                st.warning(f"The link's method {side.upper()} '{link[side]}' has no labels on {sel.layer}; "
                           f"showing the default instead (methods: {', '.join(have)}).")

    _apply_link(from_link)
    for side, default in (("a", have[0]), ("b", have[1])):
        if st.session_state.get(f"cmp_method_{side}") not in have:
            st.session_state[f"cmp_method_{side}"] = default
    c1, c2, c3 = st.columns([2, 2, 2])
    m_a = c1.selectbox("Method A", have, format_func=data.method_title, key="cmp_method_a")
    m_b = c2.selectbox("Method B", have, format_func=data.method_title, key="cmp_method_b")
    _write_link({"mode": "methods", "a": m_a, "b": m_b})
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
    raw_a, raw_b = f"{data.method_title(m_a)} raw score", f"{data.method_title(m_b)} raw score"
    st.dataframe(table.rename(columns={"score A": raw_a, "score B": raw_b}), hide_index=True, width="stretch", height=260,
                 column_config={raw_a: st.column_config.NumberColumn(help=cards.score_scale(m_a)),
                                raw_b: st.column_config.NumberColumn(help=cards.score_scale(m_b))})
    if table.empty:
        return
    n_pages = max(1, -(-len(table) // PER_PAGE))
    page = st.number_input("Page", 1, n_pages, 1, key=f"cmp_page_{m_a}_{m_b}_{only}") if n_pages > 1 else 1
    order = table["neuron"].tolist()
    shown = order[(page - 1) * PER_PAGE: page * PER_PAGE]
    cards.inject_css()
    pictures = {"geometry": cards.run_geometry(sel.store, sel.run), "top": data.top_k(sel.store, sel.run.run_key),
                "files": data.run_files(sel.store, sel.run.run_key)}
    mosaics = cards.mosaics_for(sel.store, sel.run, shown, ahead=order[page * PER_PAGE:], **pictures)
    for start in range(0, len(shown), 4):
        cols = st.columns(4)
        for col, n in zip(cols, shown[start:start + 4]):
            with col.container(border=True):
                st.page_link("views/neuron.py", label=f"Neuron {n}", query_params=sel.query_params(n))
                if mosaics.get(n) is not None:
                    cards.show_image(mosaics[n], width="stretch")
                st.html(cards.label_line_html(m_a, tops[n][m_a]) + cards.label_line_html(m_b, tops[n][m_b]))
    cards.prerender_mosaics(sel.store, sel.run, order[page * PER_PAGE:], **pictures)


def body() -> None:
    sel = context.selection_from_state()
    st.title("Compare")
    if sel.run is None:
        guard.empty_cache_notice()
        return
    cards.inject_css()
    link_mode = st.query_params.get("mode")
    if link_mode in MODES and st.session_state.get("cmp_last_url", {}).get("mode") != link_mode:
        st.session_state["cmp_mode"] = link_mode  # a link names the mode: open it
    st.session_state.setdefault("cmp_mode", "neurons")
    mode = st.segmented_control("Compare", list(MODES), format_func=MODES.get, key="cmp_mode") or "neurons"
    if mode == "neurons":
        _two_neurons(sel)
    else:
        _two_methods(sel)


shell.owner_page()
with guard.friendly_errors("the comparison"):
    body()
