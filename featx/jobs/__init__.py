"""Batch jobs: ``pipelines/*.toml`` checked, planned into cached cells, run, and reported.

- :mod:`~featx.jobs.schema`: the TOML file read and checked, every problem with its line;
- :mod:`~featx.jobs.values`: the checks of each table's values, and the configs they become;
- :mod:`~featx.jobs.planning`: the tasks, one type per kind (extraction, classifier cell, fine-tune), and their folders;
- :mod:`~featx.jobs.runner`: running them, resumably;
- :mod:`~featx.jobs.report`: the side-by-side report.
"""

from featx.jobs.planning import plan
from featx.jobs.runner import RunSummary, run
from featx.jobs.schema import Job, JobError, load_job

__all__ = ["Job", "JobError", "RunSummary", "load_job", "plan", "run"]
