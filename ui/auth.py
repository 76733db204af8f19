"""Who may see what: raters see one study's rating view; everything else is the owner's.

- A rater link (``?study=<token>``) opens only the rating page of that study. app.py then
  builds ``st.navigation`` with that single page: no sidebar pickers, no other page to
  navigate to, no method names, no results. An unknown token gets a clear message.
- Every other page needs the owner's password, read from ``.streamlit/secrets.toml``
  (``owner_password = "..."``) or the environment (``NEUROVIZ_OWNER_PASSWORD``).
- Without a configured password the dashboard stays open only to a browser on the same
  machine (loopback connection and a localhost Host header); anyone else is told to ask the
  owner to set a password. So a laptop demo needs no setup and a shared server is not open.
"""

from __future__ import annotations

import hmac
import os

import streamlit as st

_OWNER_FLAG = "nv_owner_ok"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def owner_password() -> str | None:
    """The configured owner password (secrets first, then the environment), or None."""
    try:
        value = st.secrets.get("owner_password")
    except Exception:  # no secrets.toml at all: not an error here
        value = None
    value = value or os.environ.get("NEUROVIZ_OWNER_PASSWORD")
    return str(value) if value else None


def is_local_request() -> bool:
    """True when the browser talks to the server over loopback (or there is no browser:
    AppTest and direct script runs)."""
    try:
        headers = st.context.headers
        ip = st.context.ip_address
    except Exception:
        return True
    if not isinstance(ip, str):  # AppTest has no real connection (a mock stands in)
        ip = None
    host = (headers.get("Host") or "") if headers else ""
    if not host and ip is None:
        return True  # no HTTP request behind this run (tests, bare mode)
    hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return ip is None and hostname.lower() in _LOCAL_HOSTS


def owner_access() -> str:
    """'open' (local, no password), 'granted' (logged in), 'login' or 'locked' (remote, no password)."""
    password = owner_password()
    if password is None:
        return "open" if is_local_request() else "locked"
    return "granted" if st.session_state.get(_OWNER_FLAG) else "login"


def check_password(candidate: str) -> bool:
    """Compare in constant time; on success remember the owner for this browser session."""
    password = owner_password()
    ok = bool(password) and hmac.compare_digest(candidate.encode(), password.encode())
    if ok:
        st.session_state[_OWNER_FLAG] = True
    return ok


def log_out() -> None:
    st.session_state.pop(_OWNER_FLAG, None)


def login_page() -> None:
    """The page an owner sees before logging in (and a remote visitor when no password is set)."""
    st.title("neuroviz")
    if owner_access() == "locked":
        st.warning(
            "This dashboard is reachable from other machines but has no owner password, so it is locked. "
            "On the server, set `owner_password = \"...\"` in `.streamlit/secrets.toml` or the environment "
            "variable `NEUROVIZ_OWNER_PASSWORD`, then restart. Raters: use the study link you were given."
        )
        return
    st.write("This dashboard is for its owner. Raters: open the study link you were given.")
    with st.form("owner_login"):
        candidate = st.text_input("Owner password", type="password")
        submitted = st.form_submit_button("Log in", type="primary")
    if submitted:
        if check_password(candidate):
            st.rerun()
        else:
            st.error("Wrong password. It is `owner_password` in .streamlit/secrets.toml or $NEUROVIZ_OWNER_PASSWORD.")


def study_token() -> str | None:
    """The rater token in the URL, if any (empty strings count as absent)."""
    try:
        token = st.query_params.get("study")
    except Exception:
        return None
    return token.strip() if token and token.strip() else None


def invalid_link_page() -> None:
    st.title("Study link not valid")
    st.error("This study link is not valid: it may be mistyped, or the study was deleted. "
             "Please ask the person who sent it for a new link.")
