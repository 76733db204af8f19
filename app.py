"""neuroviz dashboard: `streamlit run app.py`.

Who gets which navigation is decided here, before any page runs (see ui/auth.py):
a rater link (?study=<token>) gets only the rating page; the owner (password, or a local
browser when none is configured) gets every page and the shared sidebar.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `streamlit run` from another folder still finds ui/ and neuroviz/
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ui import auth, context, guard, shell, warmup  # noqa: E402

st.set_page_config(page_title="neuroviz", page_icon=":material/neurology:", layout="wide")

# (file under views/, title, icon, section), in the order of the navigation.
OWNER_PAGES = [
    ("browser.py", "Layer browser", ":material/grid_view:", "Explore"),
    ("neuron.py", "Neuron", ":material/neurology:", "Explore"),
    ("compare.py", "Compare", ":material/compare:", "Explore"),
    ("synthesize.py", "Synthesise", ":material/auto_awesome:", "Explore"),
    ("analysis.py", "Analysis", ":material/insights:", "Explore"),
    ("audit.py", "Audit", ":material/fact_check:", "Explore"),
    ("editing.py", "Editing", ":material/edit:", "Explore"),
    ("workspace.py", "Workspace & jobs", ":material/work:", "Workspace"),
    ("study_setup.py", "Study setup", ":material/how_to_vote:", "Studies"),
    ("study_results.py", "Study results", ":material/leaderboard:", "Studies"),
]
DEFAULT_PAGE = "browser.py"
NEURON_PAGES = {"neuron", "synthesize"}  # pages that show one neuron: the URL names it


def rater_navigation(token: str):
    """Only the rating page of this study, or a message for an unknown token (see ui/rating.py)."""
    from ui import rating

    return rating.navigation(token, ROOT / "views" / "rate.py")


def login_navigation():
    """The login form under every owner page's address, so a deep link survives logging in."""
    pages = [st.Page(auth.login_page, title="Log in", default=True)]
    pages += [st.Page(auth.login_page, title="Log in", url_path=Path(file).stem)
              for file, *_ in OWNER_PAGES if file != DEFAULT_PAGE]
    return st.navigation(pages, position="hidden")


def owner_navigation():
    """Every page (grouped by section) with the shared sidebar drawn for all of them."""
    sections: dict[str, list] = {}
    pages = {}
    for file, title, icon, section in OWNER_PAGES:
        page = st.Page(ROOT / "views" / file, title=title, icon=icon, default=file == DEFAULT_PAGE)
        pages[file] = page
        sections.setdefault(section, []).append(page)
    nav = st.navigation(sections)
    # A shared link that names a neuron but no page opens that neuron, not the grid.
    deep_link = "nv_last_url" not in st.session_state and nav.url_path == "" and "neuron" in st.query_params
    sel = None
    with guard.friendly_errors("the sidebar"):
        sel = context.draw_sidebar(with_neuron=nav.url_path in NEURON_PAGES or deep_link)
    if auth.owner_access() == "granted":
        st.sidebar.button("Log out", on_click=auth.log_out, icon=":material/logout:")
    if deep_link and sel is not None:
        st.switch_page(pages["neuron.py"], query_params=sel.query_params())
    context.show_notices()  # what a bad link asked for and what is shown instead, above the page
    return nav


token = auth.study_token()
if token:
    navigation = rater_navigation(token)
elif auth.owner_access() in ("login", "locked"):
    navigation = login_navigation()
else:
    navigation = owner_navigation()
with shell.app_running():
    navigation.run()
warmup.start()  # after the page: slow imports load while the visitor reads it
