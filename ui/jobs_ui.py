"""Background jobs on the pages: start buttons, live progress, cancel, errors.

Long work never runs in the script thread. A job is a separate process (neuroviz.jobs) that
writes its progress to a small JSON file; a fragment re-runs every second to draw it and
triggers one full rerun when the job ends, so new runs and labels appear without a reload.
"""

from __future__ import annotations

import time

import streamlit as st

from neuroviz import jobs
from neuroviz.requests import JobRequest
from neuroviz.store import Store
from ui import context

STATUS_ICON = {"queued": ":material/schedule:", "running": ":material/progress_activity:", "done": ":material/check_circle:",
               "failed": ":material/error:", "cancelled": ":material/cancel:", "interrupted": ":material/warning:"}


def probe_cli_arg(sel: context.Selection) -> str:
    """What the CLI's --probe needs to reopen this probe set: 'demo', a folder or a list file."""
    ps = sel.catalog.probe_set(sel.probe_set_id) if sel.probe_set_id else None
    if ps is None:
        return sel.probe_spec
    source = str(ps.get("source") or "")
    if source.startswith("demo:") or ps.get("name") == "demo":
        return "demo"
    for prefix in ("folder:", "list:"):
        if source.startswith(prefix):
            return source[len(prefix):]
    return sel.probe_spec


def command_line(argv: list[str]) -> str:
    import shlex

    return "python -m neuroviz " + " ".join(shlex.quote(a) for a in argv)


def draw_job(store: Store, job: jobs.JobRecord, key: str, with_command: bool = True) -> None:
    """One job: status, (command line), progress bar, message, cancel button, error and log."""
    icon = STATUS_ICON.get(job.status, "")
    title = f"{icon} **{job.kind}** `{job.job_id}` · {job.status}"
    st.markdown(title)
    if with_command:
        st.caption(command_line(job.argv))
    if not job.finished:
        st.progress(job.fraction, text=(f"{job.done}/{job.total} · " if job.total else "") + (job.message or "starting..."))
        if st.button("Cancel", key=f"cancel_{key}_{job.job_id}", icon=":material/stop:"):
            jobs.cancel_job(store, job.job_id)
            st.rerun()
    elif job.status == "failed":
        st.error(f"The job failed: {job.error or 'see the log'}")
    elif job.status in ("cancelled", "interrupted"):
        st.warning(job.message or job.status)
    if job.status == "failed" or not job.finished:
        log = jobs.job_log(store, job.job_id, tail=15)
        if log:
            with st.expander("Log (last lines)"):
                st.code(log, language=None)


@st.fragment(run_every=1.0)
def _poll(store: Store, job_id: str, key: str) -> None:
    job = jobs.read_job(store, job_id)
    if job is None:
        st.warning("The job record disappeared (was the cache cleared?).")
        return
    draw_job(store, job, key, with_command=False)  # the button above already shows its command line
    if job.finished:
        st.rerun(scope="app")  # one full rerun: new labels/runs show, polling stops


def job_button(store: Store, label: str, request: JobRequest, key: str, done_message: str = "Done.") -> jobs.JobRecord | None:
    """A button that starts ``python -m neuroviz <request.argv()>`` and then shows its live
    progress; returns this button's latest job (None before the first click)."""
    state = f"nv_job::{key}"
    job_id = st.session_state.get(state)
    job = jobs.read_job(store, job_id) if job_id else None
    running = job is not None and not job.finished
    if st.button(label, key=f"start_{key}", disabled=running, type="primary"):
        with st.spinner("Starting..."):
            job = jobs.start_job(store, request.kind, request.argv())
        st.session_state[state] = job.job_id
        running = True
    st.caption(f"`{command_line(request.argv())}`")
    if job is None:
        return None
    if running:
        _poll(store, job.job_id, key)
    elif job.status == "done":
        st.success(done_message)
    else:
        draw_job(store, job, key, with_command=False)
    return job


@st.fragment(run_every=1.0)
def jobs_panel(store: Store, limit: int = 10) -> None:
    """Every job of the workspace, newest first, polled live while any is running."""
    all_jobs = jobs.list_jobs(store, limit=limit)
    if not all_jobs:
        st.caption("No jobs yet.")
        return
    active = [j for j in all_jobs if not j.finished]
    seen_active = set(st.session_state.get("nv_active_jobs", []))
    now_active = {j.job_id for j in active}
    st.session_state["nv_active_jobs"] = sorted(now_active)
    for job in all_jobs:
        with st.container(border=True):
            draw_job(store, job, "panel")
            if job.finished:
                st.caption(f"finished {time.strftime('%H:%M:%S', time.localtime(job.updated_at))}")
    if seen_active - now_active:
        st.rerun(scope="app")  # a job just ended: refresh the cache tables above
