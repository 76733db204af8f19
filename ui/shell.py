"""The first lines of every page: make sure app.py decided who sees it.

app.py builds the navigation (which pages exist for this visitor) and draws the shared
sidebar. The page scripts live in ``views/``, not in a ``pages/`` folder: with a ``pages/``
folder next to app.py, Streamlit starts in its old pages-folder mode, which sends every page
file's name to the first session after a server start (even a rater's, issue 15.13) and, with
no page file there, answers the first deep link with a "Page not found" notice over the page.
Each page still begins with :func:`owner_page` (or :func:`rater_page`) as a backstop: where a
page runs without app.py (AppTest, a future Streamlit), it switches Streamlit to
``st.navigation`` mode and reruns, so app.py runs and shows this same page (or the login).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st

from ui import auth

_local = threading.local()


@contextmanager
def app_running() -> Iterator[None]:
    """Wraps app.py's ``navigation.run()``: pages run inside it know app.py ran first."""
    _local.inside_app = True
    try:
        yield
    finally:
        _local.inside_app = False


def _under_apptest() -> bool:
    """True inside Streamlit's AppTest (a server process never imports it)."""
    return "streamlit.testing.v1.app_test" in sys.modules


def require_app(with_neuron: bool = False) -> None:
    """Make sure app.py's rules apply to this run (see the module doc).

    On a server: switch Streamlit to st.navigation mode for good and rerun, so app.py runs
    and shows this page (or the login). Under AppTest, which resets that mode before every
    run (a rerun would drop the clicked button), apply app.py's rules inline instead.
    """
    if getattr(_local, "inside_app", False):
        return
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a future Streamlit without the pages-folder mode: nothing to undo
        return
    if not _under_apptest():
        PagesManager.uses_pages_directory = False  # from now on every run starts with app.py
        st.rerun()
    if auth.study_token() is None and auth.owner_access() in ("open", "granted"):
        from ui import context, guard

        with guard.friendly_errors("the sidebar"):
            context.draw_sidebar(with_neuron=with_neuron)
        context.show_notices()


def owner_page(with_neuron: bool = False) -> None:
    """Stop unless the owner may see this page (app.py checks first; this is the backstop).

    ``with_neuron``: the page shows one neuron, so the URL names it (used when app.py did
    not run; app.py knows it from NEURON_PAGES).
    """
    require_app(with_neuron)
    if auth.study_token():
        st.error("A study link opens only its rating page.")
        st.stop()
    if auth.owner_access() in ("login", "locked"):
        auth.login_page()
        st.stop()


def rater_page() -> None:
    """The rating page checks its own token; it only needs app.py's rater-only navigation."""
    if auth.study_token() is None and not getattr(_local, "inside_app", False) and _under_apptest():
        return
    require_app()
