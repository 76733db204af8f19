"""The rater's side of the dashboard: where the studies are, who this rater is, safe errors.

- :func:`place` is the workspace's layout only (no Store): a rater reads and writes the
  studies file and nothing else, so a job busy in the workspace never delays them.
- Identity is a per-rater secret, never the typed name (see :mod:`neuroviz.study.rating`):
  given at registration and kept in a cookie of this browser (set by a line of JavaScript,
  as Streamlit only reads cookies), so reopening the bare study link continues as the same
  rater. A personal link (``?study=<token>&key=<secret>``) carries it to another device or
  is handed out by the owner; the page moves it into the cookie and out of the address bar.
- :func:`rater_errors` shows a rater only messages meant for them: never a server path, a
  process id or an owner's page name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import streamlit as st

from neuroviz import study as studies
from neuroviz.errors import NeurovizError
from neuroviz.store import CacheLayout
from ui import data
from ui.study_forms import full_link

log = logging.getLogger("neuroviz.ui")

SECRET_PARAM = studies.SECRET_PARAM
#: Query parameters of older versions that named a rater in the URL: ignored and removed.
OLD_PARAMS = ("rater",)
COOKIE_DAYS = 365


def place() -> CacheLayout:
    """Where the studies are: the workspace's layout, without opening the workspace."""
    return CacheLayout(data.cache_root())


def cookie_name(study_id: str) -> str:
    return f"nv_rater_{study_id}"


def _session_key(study_id: str) -> str:
    return f"nv_rater_secret::{study_id}"


def _cookie(study_id: str) -> str | None:
    try:
        return st.context.cookies.get(cookie_name(study_id))
    except Exception:  # no browser behind this run (AppTest, bare mode)
        return None


def current_rater(where: CacheLayout, study_id: str) -> studies.Rater | None:
    """This browser's rater: from a personal link, else this session, else the cookie."""
    link = st.query_params.get(SECRET_PARAM)
    session = st.session_state.get(_session_key(study_id))
    for secret in (link, session, _cookie(study_id)):
        rater = studies.rater_by_secret(where, study_id, secret)
        if rater is not None:
            if secret != session:  # recognised from a link or a cookie: say so once, on arrival
                st.session_state[_returned_key(study_id)] = "link" if secret == link else "cookie"
            return rater
        if secret and secret == link:
            st.warning("This personal link is not valid (mistyped, or for another study). "
                       "Start below, or ask the person who sent it for a new one.")
    return None


def _returned_key(study_id: str) -> str:
    return f"nv_rater_returned::{study_id}"


def welcome_back(rater: studies.Rater) -> None:
    """Tell a rater recognised by this browser or by their personal link who they are, once."""
    how = st.session_state.pop(_returned_key(rater.study_id), None)
    if how == "cookie":
        st.info(f"Welcome back, {rater.name}: this browser remembered you, so you continue where you left off "
                "(your earlier answers are kept).", icon=":material/how_to_reg:")
    elif how == "link":
        st.info(f"You are rating as {rater.name} (your personal link); your answers so far are kept, and this "
                "browser will remember you.", icon=":material/how_to_reg:")


def register(where: CacheLayout, study_id: str, name: str | None) -> studies.Rater:
    """A new rater for this browser (the typed name is only a label)."""
    rater = studies.register_rater(where, study_id, name)
    st.session_state[_session_key(study_id)] = rater.secret
    return rater


def remember(rater: studies.Rater) -> None:
    """Keep the rater for this session and, through a cookie, for this browser; take any
    personal link or old rater id out of the address bar (it would let others in)."""
    st.session_state[_session_key(rater.study_id)] = rater.secret
    for param in (SECRET_PARAM, *OLD_PARAMS):
        if param in st.query_params:
            del st.query_params[param]
    if _cookie(rater.study_id) != rater.secret:
        cookie = f"{cookie_name(rater.study_id)}={rater.secret}; path=/; max-age={COOKIE_DAYS * 86400}; SameSite=Lax"
        st.html(f"<script>document.cookie = {json.dumps(cookie)};</script>", unsafe_allow_javascript=True)


def forget(study_id: str) -> None:
    """Drop this session's rater (e.g. the study was recreated and the secret no longer fits)."""
    st.session_state.pop(_session_key(study_id), None)


def personal_link(token: str, rater: studies.Rater) -> str:
    """The link that opens this study as this rater, on any device."""
    return full_link(token, rater.secret)


SORRY = ("Sorry, this page could not be shown just now. Please reload it in a moment; your earlier answers are "
         "saved. If it keeps happening, tell the person who sent you the link.")


@contextlib.contextmanager
def rater_errors() -> Iterator[None]:
    """Show a rater a short message they can act on; the details (paths, processes, what the
    owner should do) stay in the server log."""
    try:
        yield
    except studies.StudiesBusyError as exc:  # written for raters: try again, nothing lost
        st.warning(str(exc))
    except (NeurovizError, OSError, sqlite3.Error):  # the server's trouble, not the rater's to read
        log.exception("error on the rating page")
        st.error(SORRY)
    except Exception:  # a bug
        if os.environ.get("NEUROVIZ_UI_RAISE"):
            raise
        log.exception("unexpected error on the rating page")
        st.error(SORRY)


def _sorry_page() -> None:
    st.title("Please try again in a moment")
    st.error(SORRY)


def navigation(token: str, rate_page: Path):
    """The navigation of a rater link: only the rating page of its study, a message for an
    unknown token, or an apology when the studies cannot be read just now."""
    from ui import auth

    public, failed = None, True
    with rater_errors():
        public = studies.study_by_token(place(), token)
        failed = False
    if public is None:
        page = _sorry_page if failed else auth.invalid_link_page
        return st.navigation([st.Page(page, title="Study link", default=True)], position="hidden")
    return st.navigation([st.Page(rate_page, title=public.title, icon=":material/how_to_vote:", default=True)],
                         position="hidden")
