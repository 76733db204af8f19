"""Workspace and jobs: what the cache holds, and background extraction/labelling jobs."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from neuroviz import jobs
from neuroviz.requests import DemoRequest, ExtractRequest, LabelRequest, LayersRequest
from ui import context, data, guard, jobs_ui, shell, units

POOLINGS = ["default", "mean", "max", "cls", "tokens_mean"]


def _method_choices() -> list[tuple[str, str, bool]]:
    """(name, title, per_neuron) of every registered method."""
    from neuroviz.methods import list_methods

    return [(m.name, m.title or m.name, bool(m.per_neuron)) for m in list_methods()]


@st.cache_data(show_spinner=False)
def _concept_sets() -> list[str]:
    from neuroviz.concepts import list_concept_sets

    return list_concept_sets()


def _model_layers(sel: context.Selection, model: str) -> None:
    """The model's layers as `python -m neuroviz layers` lists them, from a background job:
    loading a model takes seconds (and torch, which pages never import)."""
    job = jobs_ui.job_button(sel.store, "List the model's layers", LayersRequest(model), key=f"layers_{model}",
                             done_message="The model's layers (* = suggested, the default when none is typed):")
    if job is not None and job.status == "done":
        st.code(jobs.job_log(sel.store, job.job_id, tail=2000), language=None)


def _cache_overview(sel: context.Selection) -> None:
    cat = sel.catalog
    st.subheader("What is cached")
    if not cat.runs:
        guard.empty_cache_notice()
    else:
        ps_names = {p["probe_set_id"]: f"{p['name']} ({p['n_images']})" for p in cat.probe_sets}
        runs = pd.DataFrame([{
            "model": r.model_spec, "layer": r.layer, "units": r.units, "probe set": ps_names.get(r.probe_set_id, r.probe_set_id),
            "neurons": r.n_neurons, "images": r.n_images, "pooling": r.pooling, "top k": r.k,
            "methods": ", ".join(data.method_title(m) for m in cat.methods_by_run.get(r.run_key, [])),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)), "run": r.run_key,
        } for r in reversed(cat.runs)])
        st.dataframe(runs, hide_index=True, width="stretch")
    if cat.label_runs:
        run_names = {r.run_key: f"{r.model_spec} {r.layer}" for r in cat.runs}
        labels = pd.DataFrame([{
            "method": data.method_title(lr["method"]), "run": run_names.get(lr["run_key"], lr["run_key"]),
            "neurons labelled": lr["n_neurons"], "backends": lr["backends_json"], "concepts": lr["concept_set_id"],
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(lr["created_at"])), "label key": lr["label_key"],
        } for lr in reversed(cat.label_runs)])
        with st.expander(f"{len(labels)} label runs"):
            st.dataframe(labels, hide_index=True, width="stretch")


def _extract_form(sel: context.Selection) -> None:
    st.subheader("Extract activations")
    model = st.text_input("Model", value=sel.model_spec, key="ws_extract_model", placeholder="e.g. offline:mobilenet_v2",
                          help="offline:mobilenet_v2 (real ImageNet weights, offline), offline:efficientnet_lite0, "
                               "torchvision:resnet18@random, timm:..., open_clip:ViT-B-32@random, custom:pkg.mod:factory")
    probe = st.text_input("Probe set", value=jobs_ui.probe_cli_arg(sel), key="ws_extract_probe",
                          help="'demo', an image folder (searched recursively), or a .txt/.csv list of image paths")
    typed = st.text_input("Layers (comma-separated; empty = the model's suggested layers)", key="ws_layers_typed",
                          placeholder="e.g. features.14,features.18")
    layers = tuple(l.strip() for l in typed.split(",") if l.strip())
    if model.strip():
        with st.expander("The model's layers"):
            _model_layers(sel, model.strip())
    c1, c2, c3 = st.columns(3)
    pooling = c1.selectbox("Pooling", POOLINGS, key="ws_pooling")
    k = c2.number_input("Top images kept per neuron", 10, 500, 50, step=10, key="ws_k")
    batch = c3.number_input("Batch size", 1, 512, 32, key="ws_batch")
    e1, e2, e3 = st.columns(3)
    engine = e1.selectbox("Engine", ["inprocess", "ray"], key="ws_engine",
                          help="inprocess: this machine, one pass. ray: the shards on a Ray cluster (pip install -r requirements-ray.txt)")
    shard_size = e2.number_input("Images per shard (0 = automatic)", 0, 10_000_000, 0, step=1024, key="ws_shard_size")
    address = e3.text_input("Ray address", key="ws_ray_address", placeholder="auto or HOST:PORT; empty = local",
                            disabled=engine != "ray")
    if not model.strip() or not probe.strip():
        st.warning("Give a model spec and a probe set.")
        return
    request = ExtractRequest(model.strip(), probe.strip(), layers, pooling, int(k), int(batch), engine,
                             int(shard_size) or None, (address.strip() or None) if engine == "ray" else None)
    jobs_ui.job_button(sel.store, "Start extraction", request, key="extract",
                       done_message="Extraction finished: pick the layer in the sidebar.")


def _label_form(sel: context.Selection) -> None:
    st.subheader("Label neurons")
    if not sel.runs:
        st.caption("Extract a layer first.")
        return
    methods = _method_choices()
    titles = {n: t for n, t, _ in methods}
    slow = {n for n, _, per in methods if per}
    layers = st.multiselect("Layers", [r.layer for r in sel.runs], default=[sel.layer] if sel.layer else [], key="ws_label_layers")
    chosen = st.multiselect("Methods", [n for n, _, _ in methods], default=[n for n, _, _ in methods if n not in slow][:2],
                            format_func=lambda n: titles[n] + (" (slow: per neuron)" if n in slow else ""), key="ws_label_methods")
    neurons = st.text_input("Neurons (empty = all; slow methods are best run on a few, e.g. 0-15)", key="ws_label_neurons")
    concept_sets = _concept_sets()
    concepts = st.selectbox("Concept set (for methods that pick from one)", concept_sets,
                            index=concept_sets.index("words20k") if "words20k" in concept_sets else 0, key="ws_label_concepts",
                            accept_new_options=True, help="A built-in set, or the path of a text file with one concept per line.")
    if not layers or not chosen:
        st.caption("Pick at least one layer and one method.")
        return
    if slow & set(chosen) and not neurons.strip():
        st.warning(f"{', '.join(titles[m] for m in slow & set(chosen))} takes seconds per neuron; "
                   "labelling a whole layer may take hours.")
    request = LabelRequest(sel.model_spec, jobs_ui.probe_cli_arg(sel), tuple(layers), tuple(chosen), neurons, concepts or None)
    jobs_ui.job_button(sel.store, "Start labelling", request, key="label",
                       done_message="Labelling finished: the labels are on the browser and neuron pages.")


def _demo_button(sel: context.Selection) -> None:
    with st.container(border=True):
        st.markdown("**Demo workspace**: build the demo probe set, extract the demo model and label it.")
        jobs_ui.job_button(sel.store, "Build the demo", DemoRequest(), key="demo",
                           done_message="The demo is ready: open the Layer browser.")


def body() -> None:
    sel = context.selection_from_state()
    st.title("Workspace & jobs")
    st.caption(f"Cache folder: `{sel.store.root}`")
    left, right = st.columns([3, 2], gap="large")
    with left:
        _cache_overview(sel)
        if not sel.catalog.runs:
            _demo_button(sel)
        tab_extract, tab_label, tab_sae = st.tabs(["Extract", "Label", "SAE"])
        with tab_extract:
            _extract_form(sel)
        with tab_label:
            _label_form(sel)
        with tab_sae:
            units.sae_form(sel)
    with right:
        st.subheader("Jobs")
        st.caption("Jobs run in their own processes; closing the browser does not stop them. "
                   "A cancelled or interrupted job resumes when started again.")
        jobs_ui.jobs_panel(sel.store)


shell.owner_page()
with guard.friendly_errors("the workspace"):
    body()
