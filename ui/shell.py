"""The first lines of every page: who may see it, and the shared sidebar.

app.py decides the navigation, but a page file must not rely on app.py having run: when a
``pages/`` folder exists, Streamlit runs a requested page file *directly* until some run has
called ``st.navigation`` (the first request after a server start, and every AppTest rerun).
A page that skipped these checks would then be open to anyone, so each page begins with
:func:`owner_page` (or :func:`rater_page`), which re-applies the same rules as app.py.
"""

from __future__ import annotations

import streamlit as st

from ui import auth, context, guard


def app_shell_ran() -> bool:
    """Whether app.py (st.navigation) ran in this script run, i.e. the sidebar is drawn."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a future Streamlit without this flag: trust app.py
        return True
    return PagesManager.uses_pages_directory is False


def owner_page(with_neuron: bool = False) -> None:
    """Stop unless the owner may see this page; draw the sidebar if app.py did not."""
    if auth.study_token():
        st.error("A study link opens only its rating page.")
        st.stop()
    if auth.owner_access() in ("login", "locked"):
        auth.login_page()
        st.stop()
    if not app_shell_ran():
        with guard.friendly_errors("the sidebar"):
            context.draw_sidebar(with_neuron=with_neuron)


def rater_page() -> None:
    """The rating page checks its own token (the page itself does), nothing else to draw."""
    return None
