"""One neuron: top images (plain, as heatmaps, or with any method's overlay such as DnD's
crops or MILAN's masks), the activation distribution with samples from every part of it,
low-activation contrast images, every method's label with its candidates, and on-demand
Describe-and-Dissect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from neuroviz import images, neuron_activations
from neuroviz.methods import list_methods
from neuroviz.methods.base import HeatmapOverlay, Overlay
from neuroviz.requests import LabelRequest
from ui import cards, context, data, guard, jobs_ui, shell, trust_view, units

NO_OVERLAY = "none"
THUMB = images.GRID_SIZE


def overlays() -> dict[str, tuple[str | None, Overlay]]:
    """key -> (method that offers it, overlay): the heatmap, then every method's overlays."""
    found: dict[str, tuple[str | None, Overlay]] = {HeatmapOverlay.key: (None, HeatmapOverlay())}
    for method in list_methods():
        for overlay in method.overlays():
            found[overlay.key] = (method.name, overlay)
    return found


def _nav(sel: context.Selection, neuron: int) -> None:
    run = sel.run
    c1, c2, c3, c4 = st.columns([1, 2, 1, 3], vertical_alignment="bottom")
    c1.button("Previous", icon=":material/chevron_left:", disabled=neuron <= 0, key="neuron_prev",
              on_click=context.select, kwargs={"neuron": neuron - 1}, shortcut="Left",
              help="Previous neuron (keyboard: left arrow)")
    with c2:
        context.neuron_input(sel)
    c3.button("Next", icon=":material/chevron_right:", disabled=neuron >= run.n_neurons - 1, key="neuron_next",
              on_click=context.select, kwargs={"neuron": neuron + 1}, shortcut="Right",
              help="Next neuron (keyboard: right arrow)")
    with c4:
        st.page_link("views/browser.py", label="Back to the layer browser", icon=":material/grid_view:")


def _labels(sel: context.Selection, neuron: int) -> None:
    labels = data.run_labels(sel.store, sel.run.run_key)
    mine = labels[labels["neuron"] == neuron] if not labels.empty else labels
    st.subheader("Labels")
    if neuron in units.dead(sel):
        st.info(f"{units.unit_heading(sel, neuron)} is {units.DEAD_CAPTION}: it has no label.")
        return
    if not sel.available_methods:
        st.info("No method has labelled this layer yet: start one on the Workspace page.")
        return
    shown = [m for m in sel.methods] or sel.available_methods
    cols = st.columns(min(len(shown), 4))
    for i, method in enumerate(shown):
        rows = mine[mine["method"] == method].sort_values("rank") if not mine.empty else mine
        with cols[i % len(cols)].container(border=True):
            st.caption(data.method_title(method))
            if rows.empty:
                st.markdown("*not labelled*")
                if method == "dnd":
                    st.caption("Run it for this neuron below.")
                continue
            top = rows.iloc[0]
            st.markdown(f"### {top['label']}")
            cal = None if pd.isna(top["calibrated"]) else float(top["calibrated"])
            st.caption(cards.score_text(method, float(top["score"]), cal),
                       help=(cards.CALIBRATED_HELP + "\n\n" if cal is not None else "") + cards.score_scale(method))
            if len(rows) > 1:
                with st.expander(f"{len(rows)} candidates"):
                    table = rows[["rank", "label", "score", "calibrated"]].reset_index(drop=True)
                    table["calibrated"] = table["calibrated"].map(cards.calibrated_text)
                    st.dataframe(table.rename(columns={"score": "raw score", "calibrated": "comparable"}),
                                 hide_index=True, width="stretch",
                                 column_config={"raw score": st.column_config.NumberColumn(help=cards.score_scale(method)),
                                                "comparable": st.column_config.TextColumn(help=cards.CALIBRATED_HELP)})
            with st.expander("Details"):
                st.caption(f"Backends: {top['backend']}")
                extra = data.label_extra(top)
                if extra:
                    st.json(extra, expanded=False)


def _answer_extra(sel: context.Selection, method: str | None, neuron: int) -> dict:
    """The details of ``method``'s answer for this neuron ({} without a method or a label)."""
    labels = data.run_labels(sel.store, sel.run.run_key)
    if method is None or labels.empty:
        return {}
    mine = labels[(labels["method"] == method) & (labels["neuron"] == neuron) & (labels["rank"] == 0)]
    return data.label_extra(mine.iloc[0]) if not mine.empty else {}


def _overlay_extra(sel: context.Selection, overlay: Overlay, method: str | None, neuron: int) -> dict:
    """What an overlay's settings read: the details of its method's answer for this neuron, and
    the level of the neuron's map cells over the whole probe set at the overlay's quantile
    (from the run's sketch: runs stored without one have none, the overlay then estimates it)."""
    extra = _answer_extra(sel, method, neuron)
    level = _map_level(str(sel.store.root), sel.run.run_key, neuron, overlay.map_quantile) if overlay.map_quantile else None
    return extra if level is None else {**extra, "map_level": level}


@st.cache_resource(show_spinner=False, max_entries=256)
def _map_level(root: str, run_key: str, neuron: int, quantile: float) -> float | None:
    """The neuron's level of its map cells over the probe set, from the run's sketch (None for
    runs stored without one); once per neuron: a run's files never change under its key."""
    return data.get_store(root).mask_level(run_key, neuron, quantile)


def _top_images(sel: context.Selection, neuron: int) -> None:
    run = sel.run
    st.subheader("Top images")
    choices = overlays()
    titles = {NO_OVERLAY: "Images", **{key: overlay.title for key, (_, overlay) in choices.items()}}
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    picked = c1.segmented_control("Show", list(titles), format_func=titles.get, default=NO_OVERLAY, key="neuron_overlay")
    k_options = sorted({min(8, run.k), min(16, run.k), run.k})
    k = c2.selectbox("Images", k_options, index=k_options.index(min(16, run.k)), key="neuron_k")
    rows = data.top_rows(sel.store, run.run_key, neuron, k)
    geometry = cards.run_geometry(sel.store, run)
    method, overlay = choices.get(picked or NO_OVERLAY, (None, None))
    maps = sel.store.top_maps(run.run_key, neuron) if overlay is not None else None
    if overlay is not None and maps is None:
        st.info(f"Layer {run.layer} has no spatial maps (a vector layer), so there is nothing to overlay.")
        overlay = None
    if overlay is not None and not cards.geometry_known(sel.store, run):
        st.caption(cards.UNKNOWN_GEOMETRY_NOTE)
    settings = overlay.settings(maps, run, _overlay_extra(sel, overlay, method, neuron)) if overlay is not None else {}
    builders: list = []
    captions = []
    for row in rows:
        captions.append(f"#{row['rank'] + 1} · {row['activation']:.3g}" + (f" · {Path(row['label']).name}" if row["label"] else ""))
        src, i = row["path"], row["rank"]
        if src is None:
            builders.append(lambda: None)
        elif overlay is None or i >= len(maps):
            builders.append(lambda src=src: images.thumbnail(sel.store.root, src, THUMB, geometry))
        else:
            amap = np.asarray(maps[i], dtype=np.float32)
            key = {"run": run.run_key, "neuron": neuron, "rank": i, **settings}
            builders.append(lambda src=src, key=key, a=amap: images.annotated_view(
                sel.store.root, src, THUMB, geometry, overlay.key, key, lambda view: overlay.draw(view, a, settings)))
    cards.image_grid(cards.in_threads(builders), captions, cols=8)
    if overlay is not None and overlay.caption(settings):
        st.caption(overlay.caption(settings))


@st.cache_resource(show_spinner=False, max_entries=64)
def _activations(root: str, run_key: str, neuron: int) -> neuron_activations.Distribution:
    """The neuron's quantiles and sample images, once per neuron (a run's arrays never change
    under its key): the page reruns on every click, the column is read and partitioned once."""
    return neuron_activations.distribution(cards.activation_column(data.get_store(root), run_key, neuron), seed=neuron)


def activations(sel: context.Selection, neuron: int) -> neuron_activations.Distribution:
    """The selected layer's neuron's distribution summary (cached per neuron)."""
    return _activations(str(sel.store.root), sel.run.run_key, neuron)


@st.cache_resource(show_spinner=False, max_entries=64)
def _histogram_figure(root: str, run_key: str, k: int, neuron: int, top_cut: float | None):
    """The neuron's activation histogram with quantile lines and the top-k band (from
    ``top_cut``, the k-th best activation in the run's top-k table).

    Built once per neuron (a run's arrays never change under its key). The lines and the band
    are given as layout shapes in one go: Plotly's ``add_vline``/``add_vrect`` take 30-50 ms
    each, more than the rest of the page.
    """
    import plotly.graph_objects as go

    store = data.get_store(root)
    counts, edges = store.histogram(run_key, neuron)
    summary = _activations(root, run_key, neuron)
    centres = (edges[:-1] + edges[1:]) / 2
    shapes: list[dict] = []
    notes: list[dict] = []
    for q in neuron_activations.QUANTILE_EDGES[1:-1]:
        if q in summary.quantiles:
            x = summary.quantiles[q]
            shapes.append(dict(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1, line=dict(dash="dot", color="#9ca3af")))
            notes.append(dict(x=x, y=1, xref="x", yref="paper", text=f"q{int(q * 100)}", showarrow=False, yanchor="bottom"))
    if top_cut is not None:
        shapes.append(dict(type="rect", xref="x", yref="paper", x0=top_cut, x1=float(edges[-1]), y0=0, y1=1,
                           fillcolor="#f59e0b", opacity=0.15, line_width=0, layer="below"))
        notes.append(dict(x=top_cut, y=1, xref="x", yref="paper", text=f"top {k}", showarrow=False, xanchor="left", yanchor="top"))
    log_scale = counts.max() > 50 * max(1, np.median(counts[counts > 0])) if counts.any() else False
    return go.Figure(go.Bar(x=centres, y=counts, width=np.diff(edges), marker_color="#6366f1", name="images"),
                     layout=dict(height=260, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="activation", yaxis_title="images",
                                 yaxis_type="log" if log_scale else "linear", showlegend=False, bargap=0.02,
                                 shapes=shapes, annotations=notes))


def _top_cut(sel: context.Selection, neuron: int) -> float | None:
    """The lowest activation in the neuron's stored top-k list (where the top-k band starts)."""
    top = data.top_k(sel.store, sel.run.run_key)
    if not 0 <= neuron < len(top.activation) or not top.activation.shape[1]:
        return None
    return float(top.activation[neuron][min(sel.run.k, top.activation.shape[1]) - 1])


def _distribution(sel: context.Selection, neuron: int) -> None:
    run = sel.run
    st.subheader("Activation distribution")
    fig = _histogram_figure(str(sel.store.root), run.run_key, run.k, neuron, _top_cut(sel, neuron))
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False}, key=f"hist_{run.run_key}_{neuron}")

    summary = activations(sel, neuron)
    files = data.run_files(sel.store, run.run_key)
    shown = summary.lowest + tuple(i for b in summary.bins for i in b.samples)
    rows = dict(zip(shown, files.rows(shown)))  # one read of just these rows
    geometry = cards.run_geometry(sel.store, run)
    st.markdown("**Samples across the distribution** (random images from each quantile bin, lowest first)")
    mosaics = cards.in_threads([lambda b=b: images.mosaic(sel.store.root, [rows[i].path for i in b.samples], tile=96,
                                                          cols=neuron_activations.SAMPLES_PER_BIN, geometry=geometry,
                                                          content_ids=[rows[i].image_id for i in b.samples])
                                for b in summary.bins])
    for b, mosaic in zip(summary.bins, mosaics):
        c1, c2 = st.columns([1, 5], vertical_alignment="center")
        c1.caption(f"q{int(b.low * 100)}–q{int(b.high * 100)}\n\n{b.values[0]:.3g} … {b.values[-1]:.3g}")
        cards.show_image(mosaic, c2)
    st.markdown("**Lowest activations** (contrast: what this neuron does *not* respond to)")
    cards.image_grid(cards.thumb_paths(sel.store, run, list(summary.lowest), THUMB, geometry),
                     [f"{v:.3g}" + (f" · {Path(rows[i].label).name}" if rows[i].label else "")
                      for i, v in zip(summary.lowest, summary.lowest_values)], cols=8)


def _on_demand(sel: context.Selection, neuron: int) -> None:
    st.subheader("More descriptions")
    c1, c2 = st.columns(2)
    with c1.container(border=True):
        st.markdown("**Describe-and-Dissect** for this neuron")
        st.caption("Slow (captioner + language model per neuron), so it runs on demand as a background job.")
        have = "dnd" in sel.available_methods and not data.run_labels(sel.store, sel.run.run_key).query(
            "method == 'dnd' and neuron == @neuron").empty
        request = LabelRequest(sel.model_spec, jobs_ui.probe_cli_arg(sel), (sel.layer,), ("dnd",), str(neuron), units=sel.units)
        jobs_ui.job_button(sel.store, "Run DnD again" if have else "Run DnD now", request,
                           key=f"dnd_{sel.run.run_key}_{neuron}", done_message="DnD finished; its label is shown above.")
    with c2.container(border=True):
        st.markdown("**Synthesis**")
        st.caption("Generate images that drive this neuron (inverse sets / feature visualisation).")
        st.page_link("views/synthesize.py", label="Open in Synthesise", icon=":material/auto_awesome:",
                     query_params=sel.query_params(neuron))


def neuron_export(sel: context.Selection, neuron: int) -> tuple[dict, pd.DataFrame]:
    """Everything this page shows about a neuron, as a JSON-ready dict and one CSV table
    (one row per label of every method and rank, then one per top image)."""
    run = sel.run
    labels = data.run_labels(sel.store, run.run_key)
    mine = labels[labels["neuron"] == neuron] if not labels.empty else labels
    label_rows = [{"method": str(r["method"]), "rank": int(r["rank"]), "label": str(r["label"]),
                   "score": float(r["score"]), "calibrated": None if pd.isna(r["calibrated"]) else float(r["calibrated"]),
                   "backend": str(r["backend"] or "")} for _, r in mine.sort_values(["method", "rank"]).iterrows()]
    top = [{"rank": r["rank"], "activation": r["activation"], "image_id": r["image_id"], "path": r["path"],
            "probe_label": r["label"]} for r in data.top_rows(sel.store, run.run_key, neuron)]
    quantiles = {f"q{int(q * 100)}": v for q, v in activations(sel, neuron).quantiles.items()}
    record = {"model": sel.model_spec, "probe_set": sel.probe_spec, "probe_set_id": run.probe_set_id, "layer": run.layer,
              "run_key": run.run_key, "neuron": neuron, "n_images": run.n_images, "labels": label_rows,
              "top_images": top, "activation_quantiles": quantiles}
    table = pd.concat([pd.DataFrame([{"kind": "label", **r} for r in label_rows]),
                       pd.DataFrame([{"kind": "top_image", **r} for r in top])], ignore_index=True)
    return record, table


def _export(sel: context.Selection, neuron: int) -> None:
    import json

    record, table = neuron_export(sel, neuron)
    name = f"{sel.layer}-neuron{neuron}".replace("/", "_")
    c1, c2 = st.columns(2)
    c1.download_button("Download this neuron (JSON)", json.dumps(record, indent=1), file_name=f"{name}.json",
                       mime="application/json", icon=":material/download:", key="neuron_json", on_click="ignore")
    c2.download_button("Download labels and top images (CSV)", table.to_csv(index=False), file_name=f"{name}.csv",
                       mime="text/csv", icon=":material/download:", key="neuron_csv", on_click="ignore")


def body() -> None:
    sel = context.selection_from_state()
    if sel.run is None:
        st.title("Neuron")
        guard.empty_cache_notice()
        return
    if sel.neuron is None:  # the page always names one neuron, in the URL too
        context.select(neuron=0)
        sel = context.selection_from_state()
        context.write_url(sel)
    neuron = sel.neuron
    cards.inject_css()
    st.title(units.unit_heading(sel, neuron))
    st.caption(f"{sel.model_spec} · **{sel.layer}** · {sel.run.n_neurons} {units.unit_heading(sel)} · probe set {sel.probe_spec} "
               f"({sel.run.n_images} images) · the address bar names this neuron: copy it to share")
    _nav(sel, neuron)
    # a cold page reads the layer's tables and builds thumbnails: say what is loading meanwhile
    with st.spinner(f"Loading the labels of layer {sel.layer} (first visit of this layer: a few seconds)..."):
        _labels(sel, neuron)
    trust_view.unit_panel(sel, neuron)
    with st.spinner("Loading the top images (thumbnails are made once, then cached)..."):
        _top_images(sel, neuron)
    with st.spinner("Loading the activation distribution and samples across it..."):
        _distribution(sel, neuron)
    _on_demand(sel, neuron)
    st.subheader("Export")
    _export(sel, neuron)


shell.owner_page(with_neuron=True)
with guard.friendly_errors("the neuron"):
    body()
