"""Page bodies never show a traceback: known errors become messages that say what to do.

``with friendly_errors():`` wraps a page body. Errors a user can cause (a locked cache, a
model that will not load, a bad probe folder, an unknown layer, a bad value) become
``st.error``/``st.warning`` with the library's own explanation. Anything else is a bug: it
is logged with its traceback on the server and the page shows a short apology. Tests set
NEUROVIZ_UI_RAISE=1 so that bugs surface as AppTest exceptions instead of being hidden.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import streamlit as st

log = logging.getLogger("neuroviz.ui")

EMPTY_CACHE_MESSAGE = (
    "No runs yet: start an extraction on the **Workspace** page, or run `python -m neuroviz demo` "
    "in a terminal to build the demo set, extract the demo model and label it."
)


def _known() -> tuple[type[BaseException], ...]:
    """The library's user-facing error types (imported lazily: some pull in torch)."""
    from neuroviz.db import DatabaseLockedError
    from neuroviz.datasets import ProbeSetError
    from neuroviz.hooks import UnknownLayerError

    known: list[type[BaseException]] = [DatabaseLockedError, ProbeSetError, UnknownLayerError, ValueError,
                                        FileNotFoundError, PermissionError]
    for module, name in (("neuroviz.models", "ModelLoadError"), ("neuroviz.extract", "ExtractionError"),
                         ("neuroviz.backends.base", "BackendUnavailable"), ("neuroviz.offline_weights", "OfflineAssetMissing")):
        import sys

        mod = sys.modules.get(module)  # only types whose module is loaded can have been raised
        if mod is not None and hasattr(mod, name):
            known.append(getattr(mod, name))
    return tuple(known)


def _advice(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "DatabaseLockedError":
        return "A background job is writing to the cache. Wait for it on the Workspace page, then reload."
    if name in ("ModelLoadError", "OfflineAssetMissing", "BackendUnavailable"):
        return "Check the model or backend spec; offline runs need the packaged weights (see OFFLINE.md in the README)."
    if name == "ProbeSetError":
        return "Pick a probe set that exists: 'demo' (build it with `python -m neuroviz demo-set`) or an image folder."
    if name == "UnknownLayerError":
        return "Pick a layer from the sidebar list."
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
    except _known() as exc:
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
