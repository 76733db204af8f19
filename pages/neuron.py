"""One neuron: top images (with heatmaps, DnD crops or MILAN masks), the activation
distribution with samples from every part of it, low-activation contrast images, every
method's label with its candidates, and on-demand Describe-and-Dissect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from neuroviz import images
from ui import cards, context, data, guard, jobs_ui, shell

OVERLAYS = {"none": "Images", "heatmap": "Heatmaps", "crops": "DnD crops", "masks": "MILAN masks"}
QUANTILE_EDGES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
SAMPLES_PER_BIN = 6
THUMB = images.GRID_SIZE
PAGES_DIR = Path(__file__).resolve().parent


def _nav(ws: context.Workspace, neuron: int) -> None:
    run = ws.run
    c1, c2, c3, c4 = st.columns([1, 2, 1, 3], vertical_alignment="bottom")
    c1.button("Previous", icon=":material/chevron_left:", disabled=neuron <= 0, key="neuron_prev",
              on_click=context.select, kwargs={"neuron": neuron - 1})
    with c2:
        context.neuron_input(ws)
    c3.button("Next", icon=":material/chevron_right:", disabled=neuron >= run.n_neurons - 1, key="neuron_next",
              on_click=context.select, kwargs={"neuron": neuron + 1})
    with c4:
        st.page_link("pages/browser.py", label="Back to the layer browser", icon=":material/grid_view:")


def _labels(ws: context.Workspace, neuron: int) -> None:
    labels = data.run_labels(ws.store, ws.run.run_key)
    mine = labels[labels["neuron"] == neuron] if not labels.empty else labels
    st.subheader("Labels")
    if not ws.available_methods:
        st.info("No method has labelled this layer yet: start one on the Workspace page.")
        return
    shown = [m for m in ws.methods] or ws.available_methods
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
            cal = top["calibrated"]
            cal_txt = f" · calibrated {cal:.2f}" if cal is not None and not (isinstance(cal, float) and np.isnan(cal)) else ""
            st.caption(f"score {cards.format_score(float(top['score']))}{cal_txt} · {top['backend']}")
            if len(rows) > 1:
                with st.expander(f"{len(rows)} candidates"):
                    table = rows[["rank", "label", "score", "calibrated"]].reset_index(drop=True)
                    st.dataframe(table, hide_index=True, width="stretch")
            extra = data.label_extra(top)
            if extra:
                with st.expander("Details"):
                    st.json(extra, expanded=False)


def _maps_and_threshold(ws: context.Workspace, neuron: int):
    maps = ws.store.top_maps(ws.run.run_key, neuron)
    threshold = None
    if maps is not None:
        labels = data.run_labels(ws.store, ws.run.run_key)
        milan = labels[(labels["method"] == "milan") & (labels["neuron"] == neuron) & (labels["rank"] == 0)] if not labels.empty else labels
        if not milan.empty:
            threshold = data.label_extra(milan.iloc[0]).get("mask_threshold")
        if threshold is None:
            # MILAN's rule: the top 1% of the neuron's map values; estimated from its top maps
            threshold = float(np.quantile(maps, 0.99 if maps.size >= 100 else 0.9))
    return maps, threshold


def _top_images(ws: context.Workspace, neuron: int) -> None:
    from neuroviz import crops

    run = ws.run
    st.subheader("Top images")
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    overlay = c1.segmented_control("Show", list(OVERLAYS), format_func=OVERLAYS.get, default="none", key="neuron_overlay")
    overlay = overlay or "none"
    k_options = sorted({min(8, run.k), min(16, run.k), run.k})
    k = c2.selectbox("Images", k_options, index=k_options.index(min(16, run.k)), key="neuron_k")
    rows = data.top_rows(ws.store, run.run_key, neuron, k)
    geometry = cards.run_geometry(ws.store, run)
    if overlay != "none" and not cards.geometry_known(ws.store, run):
        cards.learn_geometry_in_background(ws.store, run)
        st.caption("Maps are aligned assuming the usual ImageNet crop (224 of 256) until the model's own crop "
                   "is known (being read in the background).")
    maps, threshold = _maps_and_threshold(ws, neuron) if overlay != "none" else (None, None)
    if overlay != "none" and maps is None:
        st.info(f"Layer {run.layer} has no spatial maps (a vector layer), so there is nothing to overlay.")
        overlay = "none"
    paths, captions = [], []
    vmax = float(maps.max()) if maps is not None else 1.0
    vmin = min(0.0, float(maps.min())) if maps is not None else 0.0
    for row in rows:
        captions.append(f"#{row['rank'] + 1} · {row['activation']:.3g}" + (f" · {Path(row['label']).name}" if row["label"] else ""))
        src = row["path"]
        if src is None:
            paths.append(None)
            continue
        i = row["rank"]
        if overlay == "none" or i >= len(maps):
            paths.append(images.thumbnail(ws.store.root, src, THUMB, geometry))
            continue
        amap = np.asarray(maps[i], dtype=np.float32)
        key = {"run": run.run_key, "neuron": neuron, "rank": i, "range": [vmin, vmax], "thr": threshold}
        if overlay == "heatmap":
            draw = lambda v, a=amap: crops.heatmap_overlay(v, a, 0.5, (vmin, vmax))  # noqa: E731
        elif overlay == "crops":
            draw = lambda v, a=amap: crops.draw_boxes(v, crops.otsu_crops(a, v.size))  # noqa: E731
        else:
            draw = lambda v, a=amap: crops.mask_overlay(v, crops.exemplar_mask(a, threshold, v.size))  # noqa: E731
        paths.append(images.annotated_view(ws.store.root, src, THUMB, geometry, overlay, key, draw))
    cards.image_grid(paths, captions, cols=8)
    if overlay == "masks":
        st.caption(f"MILAN exemplar masks: the map above {threshold:.3g} (the neuron's top 1% of map values).")
    elif overlay == "crops":
        st.caption("DnD step 1: Otsu threshold of the upsampled map, boxes of its regions (at most 4, IoU rules of the paper).")


@st.cache_resource(show_spinner=False, max_entries=64)
def _histogram_figure(root: str, run_key: str, k: int, neuron: int):
    """The neuron's activation histogram with quantile lines and the top-k band.

    Built once per neuron (a run's arrays never change under its key): Plotly's validation
    of a figure costs more than the rest of the page.
    """
    import plotly.graph_objects as go

    store = context.get_store(root)
    counts, edges = store.histogram(run_key, neuron)
    acts = cards.activation_column(store, run_key, neuron)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centres, y=counts, width=np.diff(edges), marker_color="#6366f1", name="images"))
    qs = np.quantile(acts, QUANTILE_EDGES[1:-1]) if len(acts) else []
    for q, value in zip(QUANTILE_EDGES[1:-1], qs):
        fig.add_vline(x=float(value), line_dash="dot", line_color="#9ca3af", annotation_text=f"q{int(q * 100)}",
                      annotation_position="top")
    top_cut = np.sort(acts)[-min(k, len(acts))] if len(acts) else 0
    fig.add_vrect(x0=float(top_cut), x1=float(edges[-1]), fillcolor="#f59e0b", opacity=0.15, line_width=0,
                  annotation_text=f"top {k}", annotation_position="top left")
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="activation", yaxis_title="images",
                      yaxis_type="log" if counts.max() > 50 * max(1, np.median(counts[counts > 0])) else "linear",
                      showlegend=False, bargap=0.02)
    return fig


def _distribution(ws: context.Workspace, neuron: int) -> None:
    run = ws.run
    st.subheader("Activation distribution")
    acts = cards.activation_column(ws.store, run.run_key, neuron)
    fig = _histogram_figure(str(ws.store.root), run.run_key, run.k, neuron)
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False}, key=f"hist_{run.run_key}_{neuron}")

    files = data.run_files(ws.store, run.run_key)
    geometry = cards.run_geometry(ws.store, run)
    order = np.argsort(acts, kind="stable")
    n = len(order)
    st.markdown("**Samples across the distribution** (random images from each quantile bin, lowest first)")
    rng = np.random.default_rng(neuron)
    for lo, hi in zip(QUANTILE_EDGES[:-1], QUANTILE_EDGES[1:]):
        members = order[int(lo * n): max(int(lo * n) + 1, int(hi * n))]
        if len(members) == 0:
            continue
        pick = np.sort(rng.choice(members, size=min(SAMPLES_PER_BIN, len(members)), replace=False))
        pick = sorted(pick, key=lambda i: acts[i])
        paths = [files.paths[int(i)] for i in pick]
        c1, c2 = st.columns([1, 5], vertical_alignment="center")
        c1.caption(f"q{int(lo * 100)}–q{int(hi * 100)}\n\n{acts[pick[0]]:.3g} … {acts[pick[-1]]:.3g}")
        cards.show_image(images.mosaic(ws.store.root, paths, tile=96, cols=SAMPLES_PER_BIN, geometry=geometry,
                                       content_ids=[files.image_ids[int(i)] for i in pick]), c2)
    st.markdown("**Lowest activations** (contrast: what this neuron does *not* respond to)")
    low = [int(i) for i in order[: min(8, n)]]
    cards.image_grid(cards.thumb_paths(ws.store, run, low, THUMB, geometry),
                     [f"{acts[i]:.3g}" + (f" · {Path(files.labels[i]).name}" if files.labels[i] else "") for i in low], cols=8)


def _on_demand(ws: context.Workspace, neuron: int) -> None:
    st.subheader("More descriptions")
    c1, c2 = st.columns(2)
    with c1.container(border=True):
        st.markdown("**Describe-and-Dissect** for this neuron")
        st.caption("Slow (captioner + language model per neuron), so it runs on demand as a background job.")
        have = "dnd" in ws.available_methods and not data.run_labels(ws.store, ws.run.run_key).query(
            "method == 'dnd' and neuron == @neuron").empty
        argv = ["label", ws.model_spec, "--probe", jobs_ui.probe_cli_arg(ws), "--layers", ws.layer,
                "--methods", "dnd", "--neurons", str(neuron)]
        jobs_ui.job_button(ws.store, "Run DnD again" if have else "Run DnD now", "label", argv,
                           key=f"dnd_{ws.run.run_key}_{neuron}", done_message="DnD finished; its label is shown above.")
    with c2.container(border=True):
        st.markdown("**Synthesis**")
        if (PAGES_DIR / "synthesize.py").exists():
            st.caption("Generate images that drive this neuron (inverse sets / feature visualisation).")
            st.page_link("pages/synthesize.py", label="Open in Synthesise", icon=":material/auto_awesome:",
                         query_params=ws.query_params(neuron))
        else:
            st.caption("The synthesis page is not installed in this checkout.")


def body() -> None:
    ws = context.workspace_from_state()
    if ws.run is None:
        st.title("Neuron")
        guard.empty_cache_notice()
        return
    if ws.neuron is None:  # the page always names one neuron, in the URL too
        context.select(neuron=0)
        ws = context.workspace_from_state()
        context.write_url(ws)
    neuron = ws.neuron
    cards.inject_css()
    st.title(f"Neuron {neuron}")
    st.caption(f"{ws.model_spec} · **{ws.layer}** · {ws.run.n_neurons} neurons · probe set {ws.probe_spec} "
               f"({ws.run.n_images} images) · the address bar names this neuron: copy it to share")
    _nav(ws, neuron)
    _labels(ws, neuron)
    _top_images(ws, neuron)
    _distribution(ws, neuron)
    _on_demand(ws, neuron)


shell.owner_page(with_neuron=True)
with guard.friendly_errors("the neuron"):
    body()
