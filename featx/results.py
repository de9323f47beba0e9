"""TODO docstring"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from featx._runtime.io import atomic_write

__all__ = ["RESULTS_SCHEMA", "write_results"]


RESULTS_SCHEMA = "featx.results/1"


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write a results JSON atomically."""
    text = json.dumps(results, indent=2, allow_nan=False, default=_json_default)
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
