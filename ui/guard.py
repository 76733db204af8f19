"""Page bodies never show a traceback: errors a user can cause become messages that say what to do.

``with friendly_errors():`` wraps a page body. Every user-facing error of the library derives
from :class:`neuroviz.errors.NeurovizError` (a locked cache, a model that will not load, a bad
probe folder, an unknown layer, a bad value), and problems of the cache folder on disk are
OSErrors (a missing file, no permission, a full disk): both become ``st.error`` with the
library's own explanation plus advice for the common kinds. Anything else is a bug: it is
logged with its traceback on the server and the page shows a short apology. Tests set
NEUROVIZ_UI_RAISE=1 so that bugs surface as AppTest exceptions instead of being hidden.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import streamlit as st

from neuroviz.errors import NeurovizError

log = logging.getLogger("neuroviz.ui")

USER_ERRORS = (NeurovizError, OSError)

EMPTY_CACHE_MESSAGE = (
    "No runs yet: start an extraction on the **Workspace** page, or run `python -m neuroviz demo` "
    "in a terminal to build the demo set, extract the demo model and label it."
)

# Advice by error type, matched by class name along the error's class hierarchy, so that the
# modules defining them (some import torch) need not be imported here.
ADVICE = {
    "LegacyCacheLockedError": "An older neuroviz process still holds the cache. Stop it, then reload.",
    "StudiesBusyError": "Many votes arrived at once and yours was not saved. Submit it again.",
    "ModelLoadError": "Check the model spec; offline runs need the packaged weights (see \"Offline assets\" in the README).",
    "OfflineAssetMissing": "Offline runs need the packaged weights (see \"Offline assets\" in the README).",
    "BackendUnavailable": "Check the backend spec; offline runs need the packaged weights "
                          "(see \"Offline assets\" in the README).",
    "ProbeSetError": "Pick a probe set that exists: 'demo' (build it with `python -m neuroviz demo-set`) or an image folder.",
    "UnknownLayerError": "Pick a layer from the sidebar list.",
}


def _advice(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in ADVICE:
            return ADVICE[cls.__name__]
    return ""


@contextlib.contextmanager
def friendly_errors(what: str = "this page") -> Iterator[None]:
    """Turn errors raised inside the block into readable messages (never a traceback).

    Also records how long the block took in ``st.session_state["nv_timings"][what]``
    (benchmarks/bench_pages.py reads it; it costs one dict write).
    """
    started = time.perf_counter()
    try:
        yield
    except USER_ERRORS as exc:
        text = str(exc).strip("'\"") or type(exc).__name__
        advice = _advice(exc)
        st.error(f"Could not show {what}: {text}" + (f"\n\n{advice}" if advice else ""))
    except Exception as exc:  # a bug: the log keeps the traceback, the page a short note
        if os.environ.get("NEUROVIZ_UI_RAISE"):
            raise
        log.exception("unexpected error while drawing %s", what)
        st.error(f"Something went wrong while drawing {what} ({type(exc).__name__}: {exc}). "
                 "The details are in the server log; reloading the page usually helps.")
    finally:
        try:
            st.session_state.setdefault("nv_timings", {})[what] = time.perf_counter() - started
        except Exception:  # no session (direct calls outside Streamlit)
            pass


def empty_cache_notice() -> None:
    st.info(EMPTY_CACHE_MESSAGE, icon=":material/inventory_2:")
