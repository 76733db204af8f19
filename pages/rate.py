"""What a rater sees: one neuron's images, the labels as A/B/C..., never a method name.

This page is the only one a study link (?study=<token>) can reach (see app.py/ui/auth.py).
It shows nothing that names a method, a model, a layer or another study: the RatingTask of
neuroviz.study carries only letters and label texts, and image captions are left out so the
probe set's own labels (the source of gold items) do not give answers away.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from neuroviz import images
from neuroviz import study as studies
from ui import auth, cards, data, guard, shell

CLOSE_UPS = 5
RATER_PARAM = "rater"
NO_RATING = "–"


def _rater_key(study_id: str) -> str:
    return f"nv_rater::{study_id}"


def _current_rater(store, public: studies.RaterStudy) -> str | None:
    """The rater of this browser: this session's, else the one named in the URL (resume)."""
    rater_id = st.session_state.get(_rater_key(public.study_id)) or st.query_params.get(RATER_PARAM)
    return rater_id or None


def _welcome(store, public: studies.RaterStudy) -> None:
    st.title(public.title)
    st.write(public.instructions)
    st.caption(f"{public.n_items} items · about {max(1, public.n_items // 4)} minutes")
    with st.form("rater_start"):
        name = st.text_input("Your name or initials (optional; use the same one to continue later)")
        start = st.form_submit_button("Start", type="primary")
    if start:
        rater = studies.register_rater(store, public.study_id, name or None)
        st.session_state[_rater_key(public.study_id)] = rater.rater_id
        st.query_params[RATER_PARAM] = rater.rater_id
        st.rerun()


def _images(store, task: studies.RatingTask) -> None:
    from neuroviz import crops

    run = data.catalog(store).run(task.run_key)
    if run is None:
        st.error("The images of this item are no longer in the cache. Please tell the study's owner.")
        return
    rows = data.top_rows(store, run.run_key, task.neuron, task.n_images)
    geometry = cards.run_geometry(store, run)
    paths = [r["path"] for r in rows if r["path"]]
    cols, _ = images.mosaic_layout(len(paths))
    cards.show_image(images.mosaic(store.root, paths, tile=160, cols=cols, geometry=geometry), width=min(900, 170 * cols))
    maps = store.top_maps(run.run_key, task.neuron)
    if maps is None:
        return
    close_ups = []
    for row in rows[:CLOSE_UPS]:
        if not row["path"] or row["rank"] >= len(maps):
            continue
        amap = np.asarray(maps[row["rank"]], dtype=np.float32)

        def cut(view, a=amap):
            boxes = crops.otsu_crops(a, view.size, max_crops=1)
            return view.crop(boxes[0].as_tuple()).resize((128, 128)) if boxes else view.resize((128, 128))

        close_ups.append(images.annotated_view(store.root, row["path"], 224, geometry, "closeup",
                                               {"run": run.run_key, "neuron": task.neuron, "rank": row["rank"]}, cut))
    if close_ups:
        st.caption("Close-ups: the part of the first images that the unit responds to most")
        cards.show_image(images.mosaic(store.root, close_ups, tile=110, cols=len(close_ups), geometry=None),
                         width=min(900, 115 * len(close_ups)))


def _question(store, public: studies.RaterStudy, rater_id: str, task: studies.RatingTask) -> None:
    choices = [o.letter for o in task.options] + list(studies.SPECIAL_CHOICES)
    text = {o.letter: f"**{o.letter}** · {o.label}" for o in task.options}
    text.update({k: f"*{v}*" for k, v in studies.CHOICE_TITLES.items()})
    previous = task.previous_choice if task.previous_choice in choices else None
    with st.form(f"vote_{task.item_id}"):
        choice = st.radio("Which description fits these images best?", choices, format_func=text.get,
                          index=choices.index(previous) if previous else None, key=f"choice_{task.item_id}")
        ratings = {}
        with st.expander("Optional: rate every description from 1 (no match) to 5 (perfect)"):
            scale = " · ".join(f"{k} = {v}" for k, v in studies.RATING_SCALE.items())
            st.caption(scale)
            for option in task.options:
                before = (task.previous_ratings or {}).get(option.letter)
                value = st.radio(f"{option.letter} · {option.label}", [NO_RATING, 1, 2, 3, 4, 5], horizontal=True,
                                 index=[NO_RATING, 1, 2, 3, 4, 5].index(before) if before else 0,
                                 key=f"rating_{task.item_id}_{option.letter}")
                if value != NO_RATING:
                    ratings[option.letter] = int(value)
        submitted = st.form_submit_button("Submit and continue", type="primary")
    if submitted:
        if choice is None:
            st.warning("Pick one answer (or 'none fits' / 'nothing in common') before continuing.")
            return
        studies.submit_vote(store, public.study_id, rater_id, task.item_id, choice, ratings or None)
        st.rerun()


def body() -> None:
    store = data.get_store()
    token = auth.study_token()
    public = studies.study_by_token(store, token) if token else None
    if public is None:
        auth.invalid_link_page()
        return
    rater_id = _current_rater(store, public)
    if rater_id is None:
        _welcome(store, public)
        return
    if not public.is_open:
        st.title(public.title)
        st.info("This study is closed and no longer takes answers. Thank you for your help!")
        return
    try:
        task = studies.next_item(store, public.study_id, rater_id)
    except studies.StudyError:
        # a rater id from another study or a deleted one: start over as a new rater
        st.session_state.pop(_rater_key(public.study_id), None)
        st.query_params.pop(RATER_PARAM, None)
        _welcome(store, public)
        return
    st.session_state[_rater_key(public.study_id)] = rater_id
    if st.query_params.get(RATER_PARAM) != rater_id:
        st.query_params[RATER_PARAM] = rater_id
    if task is None:
        done, total = studies.rater_progress(store, public.study_id, rater_id)
        st.title("All done, thank you!")
        st.success(f"You answered {done} of {total} items. You can close this page.")
        return
    st.markdown(f"#### {public.title}")
    st.progress(task.done / max(1, task.total), text=f"{task.done} of {task.total} answered")
    with st.expander("Instructions"):
        st.write(public.instructions)
    _images(store, task)
    _question(store, public, rater_id, task)


shell.rater_page()
with guard.friendly_errors("the rating page"):
    body()
