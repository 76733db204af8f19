"""Synthesise: sample the inverse set of a neuron (images that drive it to 25, 50, 75, 100 %
of its observed max), beside the real probe images that fall at the same levels; optionally
the intersection with other neurons' levels (neuron A high while neuron B stays low).

The optimisation runs as a background job (`python -m neuroviz synthesize ...`), never in
the script thread. The page starts with a quick first pass (:data:`neuroviz.synthesis.FIRST_PASS`:
2 samples per level at 96 px, at most 96 steps; under a minute on 2 busy cores) and offers to
refine it at the full default (4 samples at 128 px, up to 192 steps; several minutes there).
A polling fragment shows the job's progress at every step with the time left; results are
cached by provenance, so asking again shows them at once.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import streamlit as st

from neuroviz import synthesis
from neuroviz.errors import NeurovizError
from neuroviz.requests import SynthesizeRequest
from ui import cards, context, guard, jobs_ui, shell

DEFAULT_LEVELS_TEXT = "25, 50, 75, 100"
STARTS = {"noise": "Noise", "probe": "Probe images nearest each level"}
IMAGE_SIZES = (64, 96, 128, 160, 224)
TILE = 160


def parse_percent_levels(text: str) -> tuple[float, ...]:
    """'25, 50, 100' (percent of the observed max) -> (0.25, 0.5, 1.0)."""
    return tuple(v / 100.0 for v in synthesis.parse_levels(text.replace("%", "")))


def _percent_text(levels: tuple[float, ...]) -> str:
    return ", ".join(f"{100 * v:g}" for v in levels)


def intersection_targets(sel: context.Selection, neuron: int) -> tuple[synthesis.NeuronTarget, ...]:
    """Other neurons that must hit their own levels at the same time (a table the user edits)."""
    layers = [r.layer for r in sel.runs]
    run = sel.run
    default = pd.DataFrame([{"layer": sel.layer, "neuron": (neuron + 1) % run.n_neurons, "levels (%)": "0"}])
    table = st.data_editor(
        default, num_rows="dynamic", key="syn_also", hide_index=True, width="stretch",
        column_config={
            "layer": st.column_config.SelectboxColumn("layer", options=layers, required=True),
            "neuron": st.column_config.NumberColumn("neuron", min_value=0, step=1, required=True),
            "levels (%)": st.column_config.TextColumn(
                "levels (%)", required=True,
                help="One level per level of the main neuron, or one level for all (e.g. 0 keeps it silent)."),
        },
    )
    st.caption("Each row is another neuron; its levels pair up with the main neuron's levels in order.")
    out = []
    for row in table.to_dict("records"):
        if not row.get("layer") or row.get("neuron") is None or pd.isna(row.get("neuron")):
            continue
        out.append(synthesis.NeuronTarget(str(row["layer"]), int(row["neuron"]), parse_percent_levels(str(row["levels (%)"] or ""))))
    return tuple(out)


def advanced_settings() -> tuple[synthesis.SynthesisConfig, int]:
    """The hyperparameters the command line can reproduce (so a job computes the same key), and the seed."""
    d = synthesis.FIRST_PASS
    with st.expander("Optimisation settings"):
        c1, c2, c3 = st.columns(3)
        steps = c1.number_input("Max steps", 8, 2000, d.steps, 8, key="syn_steps",
                                help="The run stops earlier once every sample is within tolerance.")
        size = c1.select_slider("Image size (px)", IMAGE_SIZES, d.image_size, key="syn_size")
        tolerance = c2.number_input("Tolerance (% of the max)", 0.5, 50.0, 100 * d.tolerance, 0.5, key="syn_tol")
        lr = c2.number_input("Learning rate", 0.001, 0.5, d.lr, 0.005, format="%.3f", key="syn_lr")
        diversity = c3.number_input("Diversity weight", 0.0, 10.0, d.diversity_weight, 0.1, key="syn_div",
                                    help="Pushes the samples of one level apart (Gram-matrix cosine at the target layer).")
        tv = c3.number_input("Total-variation weight", 0.0, 20.0, d.tv_weight, 0.1, key="syn_tv",
                             help="Smoothness: higher gives blurrier, calmer images.")
        seed = c1.number_input("Seed", 0, 2**31 - 1, 0, key="syn_seed", help="The same seed gives the same samples.")
    config = dataclasses.replace(d, steps=int(steps), image_size=int(size), tolerance=float(tolerance) / 100.0, lr=float(lr),
                                 diversity_weight=float(diversity), tv_weight=float(tv))
    return config, int(seed)


def request_controls(sel: context.Selection) -> synthesis.SynthesisRequest:
    """Neuron, levels, samples, start, intersection and settings -> a SynthesisRequest."""
    c1, c2, c3, c4 = st.columns([1, 2, 1, 2])
    with c1:
        neuron = context.neuron_input(sel)
    levels_text = c2.text_input("Levels (% of the observed max)", DEFAULT_LEVELS_TEXT, key="syn_levels",
                                help="Comma-separated, e.g. 25, 50, 75, 100. Up to 400 % is allowed.")
    n_samples = c3.number_input("Samples per level", 1, 16, synthesis.FIRST_PASS_SAMPLES, key="syn_samples",
                                help="The first pass draws few; 'Refine' draws the full default set.")
    start = c4.radio("Start from", list(STARTS), format_func=STARTS.get, key="syn_start", horizontal=True)
    intersect = st.toggle("Intersection: other neurons must hit their levels too", key="syn_intersect")
    also = intersection_targets(sel, neuron) if intersect else ()
    config, seed = advanced_settings()
    return synthesis.SynthesisRequest(layer=sel.layer, neuron=int(neuron), levels=parse_percent_levels(levels_text), also=also,
                                      n_samples=int(n_samples), start=start, seed=seed, config=config)


def plan_table(plan: synthesis.SynthesisPlan) -> pd.DataFrame:
    """One row per constrained neuron: its observed range and target activation per level."""
    rows = []
    for t in plan.targets:
        row = {"layer": t.layer, "neuron": t.neuron, "observed max": round(t.observed_max, 4), "observed min": round(t.observed_min, 4)}
        for i, (frac, level) in enumerate(zip(t.fractions, t.levels)):
            row[f"level {i + 1}"] = f"{frac:.0%} = {level:.4g}"
        rows.append(row)
    return pd.DataFrame(rows)


def _caption(result: synthesis.SynthesisResult, li: int, si: int) -> str:
    achieved = " / ".join(f"{v:.3g}" for v in result.achieved[li, si])
    error = float(result.errors[li, si].max())
    mark = "✓" if result.within_tolerance[li, si] else "✗ not reached"
    return f"a = {achieved} · error {error:.1%} {mark}"


def show_result(sel: context.Selection, result: synthesis.SynthesisResult, n_real: int) -> None:
    """Samples per level, each with its achieved activation, beside the real probe images at that level."""
    (st.success if result.within_tolerance.all() else st.warning)(result.summary())
    real = synthesis.probe_images_at_levels(sel.store, result.plan, n_real) if n_real else []
    n = result.images.shape[1]
    for li, name in enumerate(result.plan.level_names()):
        targets = " / ".join(f"{t.levels[li]:.4g}" for t in result.plan.targets)
        diversity = result.diversity[li]
        div_text = f" · diversity {diversity:.3f}" if np.isfinite(diversity) else ""
        real_text = f" · right: the {len(real[li])} real probe images nearest this level" if real else ""
        st.markdown(f"**Level {name}** · target a = {targets}{div_text}{real_text}")
        cols = st.columns(n + (len(real[li]) if real else 0))
        for si in range(n):
            cols[si].image(result.images[li, si], caption=_caption(result, li, si), width="stretch")
        if real:
            paths = cards.thumb_paths(sel.store, sel.run, [row["idx"] for row in real[li]], size=TILE)
            for col, row, path in zip(cols[n:], real[li], paths):
                achieved = " / ".join(f"{v:.3g}" for v in row["achieved"])
                cards.show_image(path, where=col, caption=f"real · a = {achieved}", width="stretch")
    st.caption(f"Left: synthesised samples; right (if shown): the real probe images whose activation is nearest each "
               f"level. Diversity = {result.diversity_space}. Errors are |a - target| / observed max.")
    with st.expander("Per-sample report"):
        st.dataframe(pd.DataFrame(result.sample_rows()), hide_index=True, width="stretch")
        timing = result.timings
        st.caption(f"{result.steps_run} steps · {float(timing.get('total_s', 0)):.1f} s on {timing.get('device', '?')}"
                   + (" · loaded from the cache" if result.from_cache else "") + f" · key `{result.key}`")
    buffer = io.BytesIO()
    synthesis.render_grid(result, real or None, tile=min(result.images.shape[2], TILE)).save(buffer, format="PNG")
    st.download_button("Download the grid (PNG)", buffer.getvalue(), file_name=f"inverse-set-{result.key}.png",
                       mime="image/png", key="syn_download", icon=":material/download:")


def body() -> None:
    sel = context.selection_from_state()
    st.title("Synthesise: inverse sets")
    st.caption("Images that drive a neuron to a chosen level, not only to its maximum (Hada & Carreira-Perpiñán): "
               "many diverse samples per level, found by optimisation with a naturalness prior and a diversity term.")
    if sel.run is None:
        guard.empty_cache_notice()
        return
    request = request_controls(sel)
    try:
        plan = synthesis.plan_synthesis(None, request, sel.store, sel.run)
    except NeurovizError as exc:
        st.error(str(exc).strip("'\""))
        return
    st.dataframe(plan_table(plan), hide_index=True, width="stretch")
    n_real = st.slider("Real probe images shown per level", 0, 8, 3, key="syn_real")
    refined = synthesis.refined_request(request)
    refined_plan = synthesis.plan_synthesis(None, refined, sel.store, sel.run) if refined != request else None
    result = synthesis.load_result(sel.store, refined_plan.key, refined_plan) if refined_plan else None
    if result is None:
        result = synthesis.load_result(sel.store, plan.key, plan)
    else:
        st.caption("Showing the refined samples (the full default settings).")
    if result is None:
        jobs_ui.job_button(sel.store, "Synthesise", SynthesizeRequest(request, sel.model_spec, sel.run.run_key),
                           key=f"syn_{plan.key}", done_message="Synthesis finished; loading the samples...")
        return
    show_result(sel, result, n_real)
    if refined_plan is not None and result.key != refined_plan.key:
        cfg = refined.config
        jobs_ui.job_button(sel.store, f"Refine: {refined.n_samples} samples per level at {cfg.image_size} px, up to {cfg.steps} steps",
                           SynthesizeRequest(refined, sel.model_spec, sel.run.run_key), key=f"syn_{refined_plan.key}",
                           done_message="Refined; loading the samples...")


shell.owner_page(with_neuron=True)
with guard.friendly_errors("the synthesis page"):
    body()
