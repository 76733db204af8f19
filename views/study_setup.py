"""Study setup: create blind rating studies and hand out rater links.

The study's items are units of the kind picked under Units in the sidebar: the layers'
neurons, or an SAE's latents (their labels and top images). Raters never learn which: an
item carries only its labels and pictures."""

from __future__ import annotations

import time

import streamlit as st

from neuroviz import catalog
from neuroviz import study as studies
from neuroviz.store import RunInfo
from neuroviz.units import NEURONS, short_units, unit_word
from ui import context, data, guard, shell, units
from ui.study_forms import full_link, parse_gold_lines, parse_neuron_list

SELECTIONS = {"random": "Random neurons per layer", "list": "A list of neurons"}


def _existing(store) -> None:
    st.subheader("Studies")
    all_studies = studies.list_studies(store)
    if not all_studies:
        st.caption("No studies yet.")
        return
    for s in all_studies:
        studies.freeze_missing_pictures(store, s.study_id)  # a study of an older version: raters need only it
        with st.container(border=True):
            st.markdown(f"**{s.name}** · {s.n_items - s.n_gold} items + {s.n_gold} gold · {s.raters_per_item} raters per item · "
                        f"{'open' if s.is_open else 'closed'}")
            st.caption(f"Methods: {', '.join(data.method_title(m) for m in s.methods)} · created "
                       f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(s.created_at))} · id {s.study_id}")
            progress = studies.study_progress(store, s.study_id)
            total = max(1, progress.n_items)
            st.progress(min(1.0, progress.items_complete / total),
                        text=f"{progress.items_complete}/{progress.n_items} items fully rated · {progress.n_votes} votes · "
                             f"{len(progress.raters)} raters")
            st.caption("Rater link (send this; it opens only the rating view, and each browser that opens it "
                       "becomes one rater):")
            st.code(full_link(s.token), language=None, wrap_lines=True)
            _personal_link(store, s)
            b1, b2, b3 = st.columns(3, vertical_alignment="center")
            if b1.button("Close" if s.is_open else "Reopen", key=f"toggle_{s.study_id}", icon=":material/lock:",
                         width="stretch"):
                studies.set_study_open(store, s.study_id, not s.is_open)
                st.rerun()
            b2.page_link("views/study_results.py", label="Results", icon=":material/leaderboard:", query_params={"sid": s.study_id})
            if b3.button("Delete", key=f"delete_{s.study_id}", icon=":material/delete:", width="stretch"):
                st.session_state["study_confirm_delete"] = s.study_id
            if st.session_state.get("study_confirm_delete") == s.study_id:
                st.warning(f"Delete '{s.name}' and all {progress.n_votes} votes? This cannot be undone.")
                y, n = st.columns(2)
                if y.button("Yes, delete", key=f"really_{s.study_id}", type="primary"):
                    studies.delete_study(store, s.study_id)
                    st.session_state.pop("study_confirm_delete", None)
                    st.rerun()
                if n.button("Keep it", key=f"keep_{s.study_id}"):
                    st.session_state.pop("study_confirm_delete", None)
                    st.rerun()
            for note in s.notes:
                st.caption(f"Note: {note}")
            if s.skipped:
                st.caption(f"{len(s.skipped)} requested items were skipped (a method had no label for them).")


@st.cache_data(show_spinner=False, max_entries=16)
def _choices(root: str, version: tuple, run_keys: tuple[str, ...]) -> tuple[dict[str, int], list[str], int]:
    """(method -> neurons labelled, the methods to preselect, gold items buildable from probe labels)."""
    store = data.get_store(root)
    counts = studies.labelled_methods(store, run_keys)
    defaults = studies.default_methods(store, run_keys)
    auto_gold = len(studies.choose_gold_items(store, run_keys, 10, n_options=max(2, len(defaults)))) if run_keys else 0
    return counts, defaults, auto_gold


def _own_gold(sel: context.Selection, text: str, runs: dict, layers: list[str], n_options: int, seed: int,
              n_images: int) -> list[studies.GoldItem]:
    """The gold items the owner typed, each with wrong labels (typed, or drawn from the probe set)."""
    lines = parse_gold_lines(text, {l: runs[l] for l in layers}, layers[0] if layers else None)
    return [studies.make_gold_item(sel.store, runs[layer].run_key, neuron, right, wrong, n_options=n_options, seed=seed,
                                   n_images=n_images) for layer, neuron, right, wrong in lines]


def _personal_link(store, s: studies.Study) -> None:
    """Register a rater for someone and show their personal link (shown once: only its hash is kept)."""
    with st.popover("Personal link for one rater", icon=":material/person_add:"):
        st.caption("For someone who will rate on several devices, or to know who is who: the link is that "
                   "person's identity, so give it to them only.")
        with st.form(f"personal_{s.study_id}", border=False):
            name = st.text_input("Their name (only you see it)", key=f"personal_name_{s.study_id}")
            made = st.form_submit_button("Make link")
        if made:
            rater = studies.register_rater(store, s.study_id, name or None)
            st.code(full_link(s.token, rater.secret), language=None, wrap_lines=True)
            st.caption(f"Rater {rater.rater_id} ({rater.name}). Copy it now: it is not shown again.")


def study_runs(sel: context.Selection) -> dict[str, RunInfo]:
    """One run per layer of the picked units: the layers' neuron runs, or a dictionary's unit runs."""
    if sel.units == NEURONS:
        return {r.layer: r for r in sel.runs}
    return catalog.newest_per_layer(sel.catalog.runs_for(sel.model_spec, sel.probe_set_id), sel.units)


def _create(sel: context.Selection) -> None:
    st.subheader("New study")
    runs = study_runs(sel)
    if not runs:
        guard.empty_cache_notice()
        return
    word = unit_word(sel.units).lower()
    if sel.units != NEURONS:
        st.caption(f"Items are {units.unit_heading(sel)}. Raters see only labels and pictures, never the unit kind.")
    layers = st.multiselect("Layers", list(runs), default=[sel.layer] if sel.layer in runs else list(runs)[:1], key="study_layers")
    run_keys = tuple(runs[l].run_key for l in layers)
    counts, defaults, auto_gold = _choices(str(sel.store.root), data.db_version(sel.store), run_keys)
    if len(counts) < 2:
        st.info("A study compares at least two methods: these layers have labels from "
                f"{len(counts)} ({', '.join(data.method_title(m) for m in counts) or 'none'}). Label them on the Workspace page.")
        return
    # default: the methods that labelled the most neurons together (see studies.default_methods)
    methods = st.multiselect("Methods to compare", list(counts), default=defaults, key=f"study_methods_{'_'.join(run_keys)}",
                             format_func=lambda m: f"{data.method_title(m)} ({counts[m]} {word}s labelled)")
    how = st.radio(f"{word.capitalize()}s", list(SELECTIONS), horizontal=True, key="study_how",
                   format_func=lambda h: SELECTIONS[h].replace("neurons", f"{word}s"))
    with st.form("new_study"):
        kind = "" if sel.units == NEURONS else f" {short_units(sel.units)}"
        name = st.text_input("Study name (only you see it)", value=f"{sel.model_spec.split(':')[-1]} {', '.join(layers)}{kind}")
        title = st.text_input("Title raters see", value=studies.DEFAULT_PUBLIC_TITLE)
        if how == "random":
            per_layer = st.number_input(f"{word.capitalize()}s per layer (random, among those every method labelled)", 1, 1000, 10)
            listed = ""
        else:
            per_layer = 0
            listed = st.text_area(f"{word.capitalize()}s", placeholder=f"{layers[0] if layers else 'layer'}:0,3,10-12\n(or just 0,3,5 for the first layer)")
        c1, c2, c3, c4 = st.columns(4)
        raters = c1.number_input("Raters per item", 1, 50, 3)
        gold = c2.number_input("Gold items (automatic)", 0, 50, min(2, auto_gold),
                               help=f"Attention checks built from the probe set's own labels: {auto_gold} can be built "
                                    "for these layers (a label must dominate a neuron's top images).")
        n_images = c3.number_input("Images shown", 1, 50, 10)
        seed = c4.number_input("Seed", 0, 10**6, 0)
        own = st.text_area(
            "Gold items you make (optional, one per line)", key="study_own_gold",
            placeholder=f"{layers[0] if layers else 'layer'}:12 = dog\n7 = red circle | blue square, text",
            help="A neuron whose top images plainly show one thing, '=', and that thing: raters who look pick it. "
                 "Wrong labels may follow after '|'; without them, labels of images not among its top images are drawn. "
                 "Look neurons up on the Layer browser or Neuron page.")
        submitted = st.form_submit_button("Create study", type="primary")
    if not submitted:
        return
    if len(methods) < 2:
        st.error("Choose at least two methods.")
        return
    own_gold = _own_gold(sel, own, runs, layers, len(methods), int(seed), int(n_images))
    if how == "random":
        items = studies.choose_items(sel.store, run_keys, methods, per_layer=int(per_layer), seed=int(seed))
    else:
        pairs = parse_neuron_list(listed, {l: runs[l] for l in layers}, layers[0] if layers else None)
        if not pairs:
            st.error(f"List at least one {word}, e.g. 0,3,5.")
            return
        items = [(runs[layer].run_key, n) for layer, n in pairs]
    with st.spinner("Creating the study and preparing the pictures raters will see…"):
        created = studies.create_study(sel.store, name, items, methods, raters_per_item=int(raters), gold_items=int(gold),
                                       seed=int(seed), n_images=int(n_images), public_title=title, own_gold=own_gold)
    st.success(f"Created '{created.name}' with {created.n_items - created.n_gold} items and {created.n_gold} gold items. "
               "Send raters this link:")
    st.code(full_link(created.token), language=None)
    for note in created.notes:
        st.warning(note)
    if created.skipped:
        st.warning(f"{len(created.skipped)} {word}s were left out because a method had not labelled them: "
                   + ", ".join(f"{s.neuron} (no {', '.join(data.method_title(m) for m in s.missing_methods)})"
                               for s in created.skipped[:10]))


def body() -> None:
    sel = context.selection_from_state()
    st.title("Study setup")
    st.caption("Raters see a neuron's top images and the labels as A, B, C… in a random order stored per rater "
               "and item, never the method names; they pick the best, 'none fits' or 'uninterpretable', and may rate "
               "each label 1–5.")
    left, right = st.columns([1, 1], gap="large")
    with left, guard.friendly_errors("the study form"):
        _create(sel)
    with right, guard.friendly_errors("the study list"):
        _existing(sel.store)


shell.owner_page()
with guard.friendly_errors("the study setup"):
    body()
