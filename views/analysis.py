"""Analysis: what kinds of concept the neurons of each layer are selective for (colour,
texture, material, object, scene, relation, uninterpretable), and how much the model needs
each group (accuracy or confidence lost when the group is ablated).

Layers are drawn in the order they were extracted (network order when extracted together,
as the demo and the suggested layers are): knowing the network's own order would mean
loading the model, which pages never do. `python -m neuroviz analyze` uses the model's order.
The ablations run as a background job (`python -m neuroviz analyze --importance ...`).
With an SAE's latents (or directions) picked under Units, the page analyses those units'
labels, layer by layer where the dictionary has runs, and ablates latent groups; the URL
names the units (``&units=sae:<key>``)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from neuroviz import analysis
from neuroviz.lexicon import CATEGORY_ORDER, CATEGORY_TITLES
from neuroviz.requests import AnalyzeRequest
from neuroviz.units import NEURONS, unit_word
from ui import context, data, guard, jobs_ui, shell, units

CATEGORY_COLOURS = {
    "colour": "#ef4444", "texture": "#f59e0b", "material": "#a16207", "object": "#3b82f6",
    "scene": "#10b981", "relation": "#8b5cf6", "uninterpretable": "#cbd5e1",
}
UNLABELLED = {"exclude": "leave out (not run on them)", "uninterpretable": "count as uninterpretable"}
COUNTING = {"head": "one category per neuron (the label's head)", "fractional": "split over every category named"}


def settings() -> analysis.AnalysisConfig:
    with st.expander("How labels are sorted into categories"):
        c1, c2 = st.columns(2)
        counting = c1.radio("Counting", list(COUNTING), format_func=COUNTING.get, key="analysis_counting")
        unlabelled = c1.radio("Neurons a method did not label", list(UNLABELLED), format_func=UNLABELLED.get,
                              key="analysis_unlabelled")
        min_cal = c2.slider("Uninterpretable below calibrated score", 0.0, 1.0, analysis.AnalysisConfig.min_calibrated, 0.05,
                            key="analysis_min_cal", help="Only for labels that carry a calibrated score.")
        fallback = c2.toggle("Sort unmatched labels by meaning (MiniLM)", key="analysis_fallback",
                             help="Labels no word list knows go to the category whose description is closest, "
                                  "if the cosine is at least 0.3; else they stay uninterpretable.")
        lexicon_table()
    return analysis.AnalysisConfig(counting=counting, unlabelled=unlabelled, min_calibrated=float(min_cal),
                                   embedding_fallback=fallback)


def lexicon_table() -> None:
    from neuroviz.lexicon import default_lexicon

    lex = default_lexicon()
    rows = []
    for category in CATEGORY_ORDER[:5]:
        words = lex.words(category)
        rows.append({"category": CATEGORY_TITLES[category], "terms": len(words), "examples": ", ".join(words[:14]) + " ..."})
    rows.append({"category": CATEGORY_TITLES["relation"], "terms": len(lex.relations),
                 "examples": "two matched terms joined by " + ", ".join(sorted(" ".join(r) for r in lex.relations)[:12]) + " ..."})
    st.caption("Word lists (neuroviz/lexicon.py); object terms include the 1,000 ImageNet class names.")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def shares_chart(shares: pd.DataFrame, methods: list[str], side_by_side: bool, word: str = "neurons"):
    """Stacked bars of category shares per layer (one panel per method when side by side)."""
    df = shares[shares["method"].isin(methods)].copy()
    df["category_title"] = df["category"].map(CATEGORY_TITLES)
    df["method_title"] = df["method"].map(data.method_title)
    order = list(dict.fromkeys(df.sort_values("layer_index")["layer"]))
    fig = px.bar(
        df, x="layer", y="share", color="category", barmode="stack",
        facet_col="method_title" if side_by_side and len(methods) > 1 else None,
        category_orders={"layer": order, "category": list(CATEGORY_ORDER)},
        color_discrete_map=CATEGORY_COLOURS, hover_data={"count": ":.1f", "n_neurons": True, "n_labelled": True, "share": ":.1%"},
        labels={"share": f"share of {word}", "layer": "layer (shallow → deep)", "category": "category", "method_title": ""},
    )
    fig.for_each_trace(lambda t: t.update(name=CATEGORY_TITLES.get(t.name, t.name)))
    fig.update_layout(height=420, yaxis_tickformat=".0%", legend_title_text="", margin=dict(l=10, r=10, t=40, b=10))
    return fig


def examples(sel, shares: pd.DataFrame, method: str, config: analysis.AnalysisConfig) -> None:
    """Which labels went into which category, for one layer (to check the sorting by eye)."""
    layers = list(dict.fromkeys(shares.sort_values("layer_index")["layer"]))
    with st.expander("Labels behind the bars"):
        c1, c2 = st.columns(2)
        layer = c1.selectbox("Layer", layers, key="analysis_example_layer")
        category = c2.selectbox("Category", list(CATEGORY_ORDER), format_func=CATEGORY_TITLES.get, key="analysis_example_cat")
        run_key = shares.loc[shares["layer"] == layer, "run_key"].iloc[0]
        run = sel.store.get_run(run_key)
        cats = analysis.categorize_labels(analysis.latest_labels(sel.store, run, [method]), config, store=sel.store)
        sub = cats[cats["category"] == category]
        word = unit_word(run.units).lower()
        st.dataframe(sub[["neuron", "label", "match_kind", "terms", "weight"]].rename(columns={"neuron": word}).head(500),
                     hide_index=True, width="stretch")


def importance_settings(sel, methods: list[str], layers: list[str]) -> tuple[str, analysis.ImportanceConfig, list[str] | None]:
    c1, c2, c3, c4 = st.columns(4)
    method = c1.selectbox("Labels of", methods, format_func=data.method_title, key="analysis_imp_method")
    mode = c2.radio("Ablation", ["zero", "mean"], key="analysis_imp_mode", horizontal=True)
    max_images = c3.number_input("Images per pass (0 = all)", 0, 100_000, analysis.ImportanceConfig.max_images, 32,
                                 key="analysis_imp_images")
    random_baseline = c4.toggle("Random-group baseline", value=True, key="analysis_imp_random",
                                help="Also ablate an equally large random group of the same layer.")
    chosen = st.multiselect("Layers (none = all labelled)", layers, key="analysis_imp_layers")
    config = analysis.ImportanceConfig(mode=mode, max_images=int(max_images) or None, random_baseline=random_baseline)
    return method, config, chosen or None


def importance_chart(table: pd.DataFrame):
    """Grouped bars: importance per layer and category, random baseline hatched beside it."""
    rows = []
    for rec in table.to_dict("records"):
        rows.append({**rec, "kind": "group", "value": rec["importance"]})
        if rec.get("random_importance") is not None and pd.notna(rec.get("random_importance")):
            rows.append({**rec, "kind": "random group of equal size", "value": rec["random_importance"]})
    df = pd.DataFrame(rows)
    metric = table["metric"].iloc[0]
    fig = px.bar(df, x="layer", y="value", color="category", pattern_shape="kind", barmode="group",
                 category_orders={"category": list(CATEGORY_ORDER), "layer": list(dict.fromkeys(table["layer"]))},
                 color_discrete_map=CATEGORY_COLOURS, hover_data={"n_neurons": True, "confidence_drop": ":.3f"},
                 labels={"value": "accuracy drop" if metric == "accuracy_drop" else "share of top-1 predictions changed"})
    fig.update_layout(height=420, legend_title_text="", margin=dict(l=10, r=10, t=30, b=10))
    return fig


def importance_section(sel, config: analysis.AnalysisConfig, methods: list[str], layers: list[str]) -> None:
    st.subheader("Importance: what ablating each group costs")
    st.caption(f"Each group (the {unit_word(sel.units).lower()}s of one layer whose label falls in one category) is ablated on its own; "
               "the drop in accuracy (when probe labels are class names) or the share of changed top-1 "
               "predictions is compared with an equally large random group of the same layer.")
    method, imp, chosen = importance_settings(sel, methods, layers)
    key = analysis.importance_key(sel.store, sel.model_spec, sel.probe_set_id, method, config, imp, chosen, units=sel.units)
    table = analysis.load_importance(sel.store, key)
    if table is None:
        start_importance(sel, method, config, imp, chosen)
    elif len(table):
        st.plotly_chart(importance_chart(table), width="stretch")
        st.dataframe(table, hide_index=True, width="stretch")


def start_importance(sel: context.Selection, method: str, config: analysis.AnalysisConfig, imp: analysis.ImportanceConfig,
                     layers: list[str] | None) -> None:
    """The button that runs the ablations as a background job (they run the model)."""
    request = AnalyzeRequest(sel.model_spec, jobs_ui.probe_cli_arg(sel), method, config, imp, tuple(layers or ()), sel.units)
    jobs_ui.job_button(sel.store, "Compute importance", request, key="analysis_importance", done_message="Importance computed.")


def body() -> None:
    st.title("Analysis")
    sel = context.selection_from_state()
    st.caption("What the neurons of each layer are selective for, from their labels (MILAN's analysis): "
               "shares of colour, texture, material, object, scene, relation and uninterpretable neurons.")
    if not sel.probe_set_id or not sel.model_spec:
        st.info("No runs yet: extract some layers on the Workspace page first.")
        return
    if sel.units != NEURONS:
        st.caption(f"Showing the {units.unit_heading(sel)}: the layers where this dictionary has runs. "
                   "Pick 'neurons' under Units for the layers' neurons.")
    config = settings()
    try:
        shares = analysis.category_shares(sel.store, sel.model_spec, sel.probe_set_id, config, units=sel.units)
    except analysis.AnalysisError as exc:
        st.info(str(exc))
        return
    methods = sorted(shares["method"].unique())
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    shown = c1.multiselect("Methods", methods, default=methods[:1], format_func=data.method_title, key="analysis_methods")
    side = c2.toggle("Side by side", value=True, key="analysis_side")
    if shown:
        st.plotly_chart(shares_chart(shares, shown, side, f"{unit_word(sel.units).lower()}s"), width="stretch")
        examples(sel, shares, shown[0], config)
    else:
        st.caption("Pick at least one method.")
    layers = list(dict.fromkeys(shares.sort_values("layer_index")["layer"]))
    importance_section(sel, config, methods, layers)


shell.owner_page()  # the backstop that makes app.py decide who may see this page
with guard.friendly_errors("the analysis page"):
    body()
