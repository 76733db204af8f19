"""Import the slow optional modules in the background once the first page has been sent.

scikit-image (crops and masks) and Plotly (charts) take seconds to import on a small
machine. Without this, the first rater or the first neuron page after a server start pays
for them; with it, they load while the first visitor is reading.
"""

from __future__ import annotations

import importlib
import threading

import streamlit as st

MODULES = ("plotly.graph_objects", "skimage.filters", "skimage.measure", "neuroviz.crops")


@st.cache_resource(show_spinner=False)
def start() -> threading.Thread:
    """Start the import thread (once per server process)."""

    def work() -> None:
        for name in MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # an optional module missing: the page that needs it will say so
                pass

    thread = threading.Thread(target=work, name="neuroviz-warmup", daemon=True)
    thread.start()
    return thread
