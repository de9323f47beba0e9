"""The top-level package: lazy entry points, every public error in featx.exceptions, no torch at import."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import featx
import featx.exceptions


@pytest.mark.parametrize("module", ["featx", "featx.cli"])
def test_import_loads_neither_torch_nor_sklearn(module):
    # `featx --help` and a mistyped option answer in a fraction of a second, not after torch's 2-3 s import.
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'sklearn', 'h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("ConvNetFeatures", "featx.sklearn"),
        ("train", "featx.classify.training"),
        ("run", "featx.jobs.runner"),
        ("open_store", "featx.store.reader"),
        ("load_model", "featx.classify.model"),
        ("predict_images", "featx.predict"),
    ],
)
def test_lazy_entry_points_are_the_library_objects(name, module):
    import importlib

    assert getattr(featx, name) is getattr(importlib.import_module(module), name)
    assert name in featx.__all__ and name in dir(featx)


def test_sub_packages_import_and_no_alias_modules_remain():
    from featx.extract.api import extract
    from featx.finetune.trainer import finetune
    from featx.sklearn import ConvNetFeatures

    assert featx.extract.extract is extract and featx.finetune.finetune is finetune
    assert ConvNetFeatures is featx.ConvNetFeatures
    # Import paths are not a promise (formats are): no module stays only to alias another.
    package = Path(featx.__file__).parent
    for old in ("pipeline", "transformer", "cluster", "distributed", "_errors"):
        assert not (package / f"{old}.py").exists(), old
    assert featx.store.open_store is featx.open_store
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        featx.nonsense  # noqa: B018


def test_every_public_error_is_in_featx_exceptions_and_subclasses_a_builtin():
    errors = {n: getattr(featx.exceptions, n) for n in featx.exceptions.__all__ if n.endswith("Error")}
    assert {"UnknownNameError", "SpecMismatchError", "JobError", "ResultsError", "ArchiveError"} <= set(errors)
    for name, cls in errors.items():
        assert getattr(featx, name) is cls and name in featx.__all__
        assert cls.__doc__, name
        assert any(base.__module__ == "builtins" for base in inspect.getmro(cls)[1:]), name
    assert issubclass(errors["UnknownNameError"], ValueError) and issubclass(errors["StoreLockedError"], RuntimeError)
