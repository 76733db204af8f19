"""Who may see what: raters see one study's rating view; everything else is the owner's.

- A rater link (``?study=<token>``) opens only the rating page of that study. app.py then
  builds ``st.navigation`` with that single page: no sidebar pickers, no other page to
  navigate to, no method names, no results. An unknown token gets a clear message.
- Every other page needs the owner's password, read from ``.streamlit/secrets.toml``
  (``owner_password = "..."``) or the environment (``NEUROVIZ_OWNER_PASSWORD``).
- Without a configured password the dashboard stays open only to a browser on the same
  machine: a loopback connection (127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6 as
  ``::ffff:127.x.x.x``), addressed by a loopback name (``localhost``, a 127.x address,
  ``[::1]``), with no proxy forwarding header. A reverse proxy on the same machine connects
  over loopback too, so it is told apart by what it adds: an X-Forwarded-For / Forwarded /
  X-Real-IP header, or the public Host name it keeps. Anyone else is told to ask the owner to
  set a password. So a laptop demo needs no setup and a shared server is not open.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping

import streamlit as st

_OWNER_FLAG = "nv_owner_ok"
_PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host")


def owner_password() -> str | None:
    """The configured owner password (secrets first, then the environment), or None."""
    try:
        value = st.secrets.get("owner_password")
    except Exception:  # no secrets.toml at all: not an error here
        value = None
    value = value or os.environ.get("NEUROVIZ_OWNER_PASSWORD")
    return str(value) if value else None


def is_loopback_address(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4 loopback mapped into IPv6 (``::ffff:127.0.0.1``)."""
    text = address.strip().strip("[]").split("%", 1)[0]  # "[::1]", "fe80::1%eth0"
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def is_loopback_host(host: str) -> bool:
    """True when a Host header names this machine over loopback: localhost (any port), a
    127.x address, [::1] or a mapped IPv4 loopback address."""
    host = host.strip().lower()
    if host.startswith("["):  # "[::1]:8501"
        name = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # "localhost:8501", "127.0.0.2:8501"
        name = host.split(":", 1)[0]
    else:  # no port, or a bare IPv6 address
        name = host
    name = name.rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback_address(name)


def is_local(ip: str | None, headers: Mapping[str, str]) -> bool:
    """Whether a request comes from a browser on this machine (see the module doc).

    ``ip`` is Streamlit's ``st.context.ip_address``: None stands for 127.0.0.1 and ::1.
    """
    if ip is not None and not is_loopback_address(ip):
        return False
    lowered = {k.lower(): v for k, v in headers.items()}
    if any(h.lower() in lowered for h in _PROXY_HEADERS):
        return False  # a proxy on this machine relays someone else
    return is_loopback_host(lowered.get("host", ""))


def is_local_request() -> bool:
    """True when the browser talks to the server over loopback (or there is no browser:
    AppTest and direct script runs)."""
    try:
        headers = st.context.headers
        ip = st.context.ip_address
    except Exception:
        return True
    if not isinstance(ip, str):  # AppTest has no real connection (a mock stands in); None = loopback
        ip = None
    headers = dict(headers) if headers else {}
    if not headers.get("Host") and not headers.get("host") and ip is None:
        return True  # no HTTP request behind this run (tests, bare mode)
    return is_local(ip, headers)


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
