"""How far to trust a unit's labels, on the pages: its badge, and every method's label scored the
same way on held-out images (from the last ``evaluate`` of the layer, which a button starts).

The neuron page calls :func:`unit_panel`; the layer browser calls :func:`badge_line_html` on
each card and :func:`badge_controls` to filter and sort by the badge. Everything here reads
records that ``evaluate`` wrote: scoring needs the multimodal backend, which pages never load.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import streamlit as st

from neuroviz.requests import EvaluateRequest
from neuroviz.trust import badges as badge_lib
from neuroviz.trust.compare import comparison_about, comparison_table, unit_comparison
from ui import context, data, jobs_ui

BADGE_SORTS = {"off": "Layer order", "trusted": "Trusted first"}


@st.cache_resource(show_spinner=False, max_entries=16)
def _badges(root: str, version: tuple, run_key: str) -> dict[int, badge_lib.UnitBadge]:
    return badge_lib.load_badges(data.get_store(root), run_key)


def run_badges(sel: context.Selection) -> dict[int, badge_lib.UnitBadge]:
    """The layer's saved badges by neuron ({} before the first evaluation)."""
    return _badges(str(sel.store.root), data.db_version(sel.store), sel.run.run_key) if sel.run else {}


def badge_line_html(badge: badge_lib.UnitBadge | None) -> str:
    """One card line: ✓/✗ beats the shuffled baseline, or nothing when the layer was never evaluated."""
    if badge is None:
        return ""
    css = "nv-agree" if badge.passed else "nv-disagree"
    return f"<div class='{css}' title='best label: {html.escape(badge.best_label)}'>{html.escape(badge_lib.badge_text(badge))}</div>"


def badge_controls(sel: context.Selection, neurons: Sequence[int], column) -> list[int]:
    """A 'Trust' selectbox (filter by badge, or trusted first) in ``column``; returns the neurons to show."""
    badges = run_badges(sel)
    choices = ["any", "beats shuffled", "does not beat shuffled", "trusted first"]
    choice = column.selectbox("Trust", choices, key="browser_trust", disabled=not badges,
                              help="Whether each unit's best label beats its neighbours' labels on held-out images "
                                   "(one-sided, FDR-corrected over the layer). Run evaluate on the neuron page first.")
    if not badges or choice == "any":
        return list(neurons)
    if choice == "trusted first":
        return sorted(neurons, key=lambda n: badge_lib.badge_sort_key(badges.get(n)))
    return badge_lib.filter_by_badge(neurons, badges, choice)


def unit_panel(sel: context.Selection, neuron: int) -> None:
    """The neuron page's section: badge, then every label of this unit scored on held-out images."""
    st.subheader("How far to trust these labels")
    rows = unit_comparison(sel.store, sel.run.run_key, neuron)
    badge = run_badges(sel).get(neuron)
    about = comparison_about(sel.store, sel.run.run_key)
    if badge is not None:
        (st.success if badge.passed else st.warning)(
            f"{badge_lib.badge_text(badge)}: its best label, '{badge.best_label}' ({badge.best_method}), against the "
            "labels of the layer's other units on the same held-out images.")
    if rows:
        st.dataframe(comparison_table(rows), hide_index=True, width="stretch")
        held = "" if about.get("held_out", True) else " Some labels were made from these images too (in-sample rows)."
        st.caption(f"Scored on {about.get('images', '?')} with {about.get('backend', '?')}: simulation r, AUPRC, F1, IoU "
                   f"with bootstrap 95 % intervals over images. Baselines: a constant label and shuffled labels.{held}")
    else:
        st.caption("Not scored yet: score every label of this layer on images the methods did not see "
                   "(CLIP-Dissect and Linear Explanations label the fit part first).")
    request = EvaluateRequest(sel.model_spec, jobs_ui.probe_cli_arg(sel), sel.layer, ("clip_dissect", "linear_explanations"))
    jobs_ui.job_button(sel.store, "Score again" if rows else "Score on held-out images", request,
                       key=f"evaluate_{sel.run.run_key}", done_message="Scored; the table above is up to date.")
