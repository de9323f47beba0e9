"""Kept for the import path ``featx.cluster.scheduler``: it lives in :mod:`featx.classify.cluster`."""

from featx.classify.cluster import scheduler

__all__ = ["scheduler"]
