"""Kept so code that imported ``featx._errors`` still works: the errors are public in :mod:`featx.exceptions`."""

from featx.exceptions import *  # noqa: F403
from featx.exceptions import __all__, unknown  # noqa: F401
