"""``python -m neuroviz jobs``: the background jobs of this workspace, or cancel one."""

from __future__ import annotations

import argparse

from ._common import store_from


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs with their progress, or cancel the one given with --cancel."""
    from .. import jobs

    store = store_from(args)
    if args.cancel:
        job = jobs.cancel_job(store, args.cancel)  # an unknown id is an error (exit 2)
        print(f"{args.cancel}: {job.status}")
        return 0
    for job in jobs.list_jobs(store):
        print(f"{job.job_id}  {job.kind:10s} {job.status:11s} {job.done}/{job.total}  {job.message or job.error}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``jobs`` command."""
    p = subparsers.add_parser("jobs", help="list background jobs, or cancel one")
    p.add_argument("--cancel", metavar="JOB_ID")
    p.set_defaults(func=cmd_jobs)
