"""Study results: win rate per method with 95% intervals, mean ratings, Fleiss' kappa,
per-layer breakdown, raters and gold checks, CSV export."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from neuroviz import study as studies
from ui import context, data, guard, shell

SPECIAL_TITLES = {studies.NONE_FITS: "None fits", studies.UNINTERPRETABLE: "Uninterpretable"}
COLOURS = {studies.NONE_FITS: "#9ca3af", studies.UNINTERPRETABLE: "#d1d5db"}


def option_title(name: str) -> str:
    """A method's title, a shared option ('a+b') as both titles, or the special choices."""
    if name in SPECIAL_TITLES:
        return SPECIAL_TITLES[name]
    return " + ".join(data.method_title(m) for m in name.split("+"))


def _win_chart(scores, title: str):
    import plotly.graph_objects as go

    names = [option_title(s.method) for s in scores]
    rates = [s.win_rate for s in scores]
    fig = go.Figure(go.Bar(
        x=names, y=rates, marker_color=[COLOURS.get(s.method, "#6366f1") for s in scores],
        error_y=dict(type="data", symmetric=False, array=[s.win_high - s.win_rate for s in scores],
                     arrayminus=[s.win_rate - s.win_low for s in scores]),
        text=[f"{r:.0%}" for r in rates], textposition="outside", hovertemplate="%{x}: %{y:.1%}<extra></extra>"))
    fig.update_layout(title=title, height=320, margin=dict(l=10, r=10, t=40, b=10), yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.05], yaxis_title="chosen as best")
    return fig


def _rating_chart(scores):
    import plotly.graph_objects as go

    rated = [s for s in scores if s.mean_rating is not None]
    if not rated:
        return None
    fig = go.Figure(go.Bar(
        x=[option_title(s.method) for s in rated], y=[s.mean_rating for s in rated], marker_color="#10b981",
        error_y=dict(type="data", symmetric=False,
                     array=[(s.rating_high or s.mean_rating) - s.mean_rating for s in rated],
                     arrayminus=[s.mean_rating - (s.rating_low or s.mean_rating) for s in rated]),
        text=[f"{s.mean_rating:.2f} (n={s.n_ratings})" for s in rated], textposition="outside"))
    fig.update_layout(title="Mean 1–5 rating (95% CI)", height=320, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis_range=[0, 5.5], yaxis_title="rating")
    return fig


def _layer_chart(results: studies.StudyResults):
    import plotly.graph_objects as go

    if len(results.by_layer) < 2:
        return None
    fig = go.Figure()
    for method in results.study.methods:
        fig.add_bar(name=option_title(method), x=[f"{l.place} (n={l.n_votes})" for l in results.by_layer],
                    y=[next(s.win_rate for s in l.scores if s.method == method) for l in results.by_layer])
    fig.update_layout(barmode="group", title="Win rate per layer", height=320, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis_tickformat=".0%")
    return fig


MISSING = "–"  # a value that does not exist yet (no ratings, no gold item met): never "None"


def _number(value: float | None, fmt: str) -> str:
    return MISSING if value is None or value != value else format(value, fmt)  # None or NaN: no value yet


def _score_table(scores) -> pd.DataFrame:
    return pd.DataFrame([{
        "option": option_title(s.method), "wins": round(s.wins, 2), "votes": s.votes, "win rate": s.win_rate,
        "95% CI": f"{s.win_low:.0%}–{s.win_high:.0%}",
        "mean rating": _number(s.mean_rating, ".2f"),
        "rating 95% CI": (f"{s.rating_low:.2f}–{s.rating_high:.2f}"
                          if s.rating_low is not None and s.rating_high is not None else MISSING),
        "ratings": s.n_ratings,
    } for s in scores])


def _humans_vs_metrics(sel, study_id: str) -> None:
    """Each method's human win rate beside its held-out automatic score (saved by ``evaluate --study``)."""
    from neuroviz.trust.humans import stored_humans_vs_metrics

    st.subheader("Humans against the held-out metric")
    saved = stored_humans_vs_metrics(sel.store, study_id)
    command = (f"python -m neuroviz evaluate MODEL --probe PROBE --layer LAYER --study {study_id}")
    if saved is None:
        st.caption("Not computed yet: the automatic scores need the multimodal backend, so they are computed "
                   "by a command (any run of the study; the study's own units are scored on held-out images):")
        st.code(command, language="bash")
        return
    st.dataframe(pd.DataFrame([{
        "method": data.method_title(r.method), "human win rate": _number(r.win_rate, ".0%"),
        "95% CI (humans)": f"{_number(r.win_low, '.0%')} to {_number(r.win_high, '.0%')}", "votes": r.votes,
        f"held-out {saved.metric}": _number(r.automatic, ".3f"),
        "95% CI (metric)": f"{_number(r.automatic_low, '.3f')} to {_number(r.automatic_high, '.3f')}", "units": r.units}
        for r in saved.rows]), hide_index=True, width="stretch")
    if saved.spearman is None:
        st.caption("Spearman rank correlation: undefined (fewer than 3 methods with votes and scores, or no variation).")
    else:
        st.caption(f"Spearman rank correlation between the human win rate and {saved.metric}: {saved.spearman:.2f} "
                   f"(p = {saved.spearman_p:.2g}, {len(saved.rows)} methods). Scored on {saved.images}. "
                   "A study also tests the metric: a high correlation means it orders methods as people do.")
    st.caption(f"Recompute after more votes: `{command}`")


def body() -> None:
    sel = context.selection_from_state()
    st.title("Study results")
    all_studies = studies.list_studies(sel.store)
    if not all_studies:
        st.info("No studies yet: create one on the Study setup page.")
        return
    ids = [s.study_id for s in all_studies]
    wanted = st.query_params.get("sid")
    if "results_study" not in st.session_state or (wanted in ids and st.session_state.get("results_sid_seen") != wanted):
        st.session_state["results_study"] = wanted if wanted in ids else ids[0]
        st.session_state["results_sid_seen"] = wanted
    names = {s.study_id: f"{s.name} ({s.study_id})" for s in all_studies}
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    study_id = c1.selectbox("Study", ids, format_func=names.get, key="results_study")
    exclude = c2.toggle("Leave out raters who failed gold items", value=True, key="results_exclude",
                        help=f"A rater counts only with at least {studies.MIN_GOLD_ACCURACY:.0%} of gold items right.")
    results = studies.study_results(sel.store, study_id, exclude_failed_gold=exclude)
    s = results.study
    st.caption(f"Methods: {', '.join(data.method_title(m) for m in s.methods)} · {s.n_items - s.n_gold} items + "
               f"{s.n_gold} gold · {s.raters_per_item} raters per item · {'open' if s.is_open else 'closed'}")
    k1, k2, k3, k4 = st.columns(4)
    k1.metric("Votes counted", results.n_votes)
    k2.metric("Items rated", results.n_items_rated)
    k3.metric("Fleiss' kappa", f"{results.kappa:.2f}" if results.kappa is not None else "–",
              help=f"Agreement between raters over {results.kappa_items} items with two or more votes "
                   "(0 = chance, 1 = perfect).")
    k4.metric("Raters left out (gold)", len(results.excluded_raters))
    if results.n_votes == 0:
        st.info("No votes counted yet. Send the rater link from the Study setup page.")
    else:
        left, right = st.columns(2)
        left.plotly_chart(_win_chart(results.scores, "Win rate (95% Wilson interval)"), width="stretch",
                          config={"displayModeBar": False})
        rating_fig = _rating_chart(results.scores)
        if rating_fig is not None:
            right.plotly_chart(rating_fig, width="stretch", config={"displayModeBar": False})
        else:
            right.caption("No 1–5 ratings given yet.")
        st.dataframe(_score_table(results.scores), hide_index=True, width="stretch",
                     column_config={"win rate": st.column_config.NumberColumn(format="percent")})
        if results.by_layer:
            st.subheader("Per layer")
            fig = _layer_chart(results)
            if fig is not None:
                st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
            for layer in results.by_layer:
                with st.expander(f"{layer.model_spec} · {layer.place} · {layer.n_votes} votes"):
                    st.dataframe(_score_table(layer.scores), hide_index=True, width="stretch",
                                 column_config={"win rate": st.column_config.NumberColumn(format="percent")})
    _humans_vs_metrics(sel, study_id)
    st.subheader("Raters")
    if results.raters:
        st.dataframe(pd.DataFrame([{
            "rater": r.name, "rater id": r.rater_id, "votes": r.n_votes, "gold answered": r.gold_answered,
            "gold right": r.gold_correct, "gold accuracy": _number(r.gold_accuracy, ".0%"), "left out": r.excluded}
            for r in results.raters]), hide_index=True, width="stretch")
    else:
        st.caption("Nobody has opened the rater link yet.")
    st.subheader("Export")
    d1, d2 = st.columns(2)
    d1.download_button("Scores (CSV)", studies.results_csv(results), file_name=f"{study_id}-scores.csv", mime="text/csv",
                       icon=":material/download:")
    d2.download_button("Every vote, de-blinded (CSV)", studies.votes_csv(sel.store, study_id), file_name=f"{study_id}-votes.csv",
                       mime="text/csv", icon=":material/download:")


shell.owner_page()
with guard.friendly_errors("the study results"):
    body()
