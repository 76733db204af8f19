"""What a rater sees: one neuron's images, the labels as A/B/C..., never a method name.

This page is the only one a study link (?study=<token>) can reach (see app.py/ui/auth.py).
It shows nothing that names a method, a model, a layer or another study: the RatingTask of
neuroviz.study carries only letters and label texts, and image captions are left out so the
probe set's own labels (the source of gold items) do not give answers away. It reads only
the studies file (the pictures were frozen into the study at creation), so a job busy in
the workspace never delays a rater, and a rater is known by a secret kept in a cookie
(ui/rating.py), never by the name they type.
"""

from __future__ import annotations

import streamlit as st

from neuroviz import study as studies
from ui import auth, rating, shell

NO_RATING = "–"


def _welcome(where, public: studies.RaterStudy) -> None:
    st.title(public.title)
    st.write(public.instructions)
    st.caption(f"{public.n_items} items · about {max(1, public.n_items // 4)} minutes")
    with st.form("rater_start"):
        name = st.text_input("Your name or initials (optional; only the study's owner sees it)")
        start = st.form_submit_button("Start", type="primary")
    st.caption("This browser will remember you: reopening the study link continues where you left off.")
    if start:
        rating.register(where, public.study_id, name or None)
        st.rerun()


def _images(where, task: studies.RatingTask) -> None:
    pictures = studies.task_pictures(where, task)
    if pictures.mosaic is None:
        st.warning("The images of this item are missing. Please tell the study's owner; you can answer the next one.")
        return
    st.image(pictures.mosaic)
    if pictures.close_ups is not None:
        st.caption("Close-ups: the part of the first images that the unit responds to most")
        st.image(pictures.close_ups)


def _question(where, public: studies.RaterStudy, rater: studies.Rater, task: studies.RatingTask) -> None:
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
        try:
            studies.submit_vote(where, public.study_id, rater.rater_id, task.item_id, choice, ratings or None)
        except studies.StudyError:
            st.info("This study has just closed and no longer takes answers. Thank you for your help!")
            return
        st.rerun()


def _identity_note(public: studies.RaterStudy, token: str, rater: studies.Rater) -> None:
    with st.expander("Continue later"):
        st.write(f"You are rating as **{rater.name}**. This browser remembers you: reopening the study link "
                 "brings you back to your answers. To continue on another device, open your personal link there "
                 "(keep it to yourself: it lets its holder answer as you):")
        st.code(rating.personal_link(token, rater), language=None, wrap_lines=True)


def body() -> None:
    where = rating.place()
    token = auth.study_token()
    public = studies.study_by_token(where, token) if token else None
    if public is None:
        auth.invalid_link_page()
        return
    rater = rating.current_rater(where, public.study_id)
    if rater is None:
        _welcome(where, public)
        return
    rating.remember(rater)
    rating.welcome_back(rater)
    if not public.is_open:
        st.title(public.title)
        st.info("This study is closed and no longer takes answers. Thank you for your help!")
        return
    try:
        task = studies.next_item(where, public.study_id, rater.rater_id)
    except studies.StudyError:  # the rater is no longer in this study: start over as a new rater
        rating.forget(public.study_id)
        _welcome(where, public)
        return
    if task is None:
        done, total = studies.rater_progress(where, public.study_id, rater.rater_id)
        st.title("All done, thank you!")
        st.success(f"You answered {done} of {total} items. You can close this page.")
        return
    st.markdown(f"#### {public.title}")
    st.progress(task.done / max(1, task.total), text=f"{task.done} of {task.total} answered")
    with st.expander("Instructions"):
        st.write(public.instructions)
    _images(where, task)
    _question(where, public, rater, task)
    _identity_note(public, token or "", rater)


shell.rater_page()
with rating.rater_errors():
    body()
