"""Kept for the import path ``featx.pipeline.run``: batch jobs live in :mod:`featx.jobs`."""

from featx.jobs import Job, JobError, RunSummary, load_job, plan, run

__all__ = ["Job", "JobError", "RunSummary", "load_job", "plan", "run"]
