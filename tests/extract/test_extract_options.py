"""extract() takes its options as one ExtractionOptions; the option names are written in its table only."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from conftest import TINY

from featx._runtime.params import Interval, options_of
from featx._runtime.params import option as table_option
from featx.exceptions import InvalidOptionError, UnknownOptionError
from featx.extract import extract
from featx.sklearn import ConvNetFeatures
from featx.spec import SPEC_OPTIONS, ExtractionOptions, ExtractionSpec

PACKAGE = Path(__file__).resolve().parents[2] / "featx"
OPTIONS = set(options_of(ExtractionOptions))


def test_extract_names_no_option_itself():
    params = inspect.signature(extract).parameters
    assert not set(params) & OPTIONS  # each comes in options (or as a keyword the table names)
    assert params["options"].kind is inspect.Parameter.KEYWORD_ONLY and params["options"].default is None
    assert len([p for p in params.values() if p.kind is not p.VAR_KEYWORD]) == 14  # 23 before issue 26


def test_no_caller_in_featx_passes_an_option_as_a_keyword():
    # The CLI, the pipeline runner, ConvNetFeatures and predict each build one ExtractionOptions and pass it.
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            called = getattr(node, "func", None)
            if not isinstance(node, ast.Call) or not getattr(called, "id", getattr(called, "attr", "")).endswith(
                "extract"
            ):
                continue
            typed = sorted({k.arg or "**" for k in node.keywords} & (OPTIONS | {"**"}))  # ** may carry options too
            if typed:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {', '.join(typed)}")
    assert not bad, "extract() called with options as keywords, not one ExtractionOptions:\n" + "\n".join(bad)


def test_spec_options_are_the_table_rows_the_spec_records():
    spec_fields = {f.name for f in dataclasses.fields(ExtractionSpec)}
    assert set(SPEC_OPTIONS) == OPTIONS & spec_fields == {"pool", "dtype", "amp", "tta", "decode", "max_pixels"}


def test_an_options_object_and_keywords_make_the_same_store(image_folder):
    run = {"layers": ["blocks.1"], "dry_run": True, "progress": False, "device": "cpu"}
    given = extract(image_folder, TINY, options=ExtractionOptions(pool="gem", dtype="float16", workers=0), **run)
    typed = extract(image_folder, TINY, pool="gem", dtype="float16", workers=0, **run)
    # A keyword replaces that option of the object (timm's overlay); the others stay the object's.
    replaced = extract(image_folder, TINY, options=ExtractionOptions(pool="max", dtype="float16"), pool="gem", **run)
    assert given.key == typed.key == replaced.key
    assert (given.spec.pool, given.spec.dtype) == ("gem", "float16")


def test_a_mistyped_keyword_is_a_type_error_with_the_close_matches():
    with pytest.raises(TypeError, match=r"extract\(\) got an unexpected keyword argument 'pol'\. Did you mean: pool"):
        extract("digits", pol="max")
    with pytest.raises(TypeError, match=r"'ovewrite'\. Did you mean: overwrite"):  # extract's own parameter
        extract("digits", ovewrite=True)
    with pytest.raises(TypeError, match=r"takes its options as one ExtractionOptions .*not a dict"):
        extract("digits", options={"pool": "max"})


def test_a_bad_value_is_refused_by_the_table_before_anything_loads(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a bad option must be refused before the network loads")

    monkeypatch.setattr("featx.extract.api.load_backbone", no_loading)
    with pytest.raises(UnknownOptionError, match=r"unknown pool 'mean'\. Choose one of avg, max, avgmax, gem, none\."):
        extract("digits", pool="mean")
    with pytest.raises(InvalidOptionError, match=r"batch_size must be an integer in \[1, 2147483647\] \(or unset\)"):
        extract("digits", options=ExtractionOptions(), batch_size=0)


def test_a_new_table_row_is_an_extract_keyword_with_no_other_edit(image_folder, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Wider(ExtractionOptions):
        prefetch: int = table_option(2, Interval(True, 1), help="A row added to the table.", pipeline=False)

    monkeypatch.setattr("featx.extract.api.ExtractionOptions", Wider)
    result = extract(image_folder, TINY, prefetch=4, workers=0, dry_run=True, progress=False, device="cpu")
    assert result.key == extract(image_folder, TINY, workers=0, dry_run=True, progress=False, device="cpu").key
    with pytest.raises(InvalidOptionError, match="prefetch must be an integer of at least 1; got 0"):
        extract(image_folder, TINY, prefetch=0)


def test_convnetfeatures_parameters_that_are_options_have_the_tables_defaults_and_reach_the_spec(image_folder):
    table = options_of(ExtractionOptions)
    params = ConvNetFeatures().get_params()
    assert set(params) & OPTIONS == {"pool", "dtype", "tta", "decode", "batch_size"}
    for name in {"pool", "dtype", "tta", "decode"}:  # batch_size: a fixed 64, whatever the device (documented)
        assert params[name] == table[name][1], name
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    fitted = ConvNetFeatures(TINY, layer="blocks.1", pool="gem", tta="flip", device="cpu").fit(paths)
    assert (fitted.spec_["pool"], fitted.spec_["tta"]) == ("gem", "flip")
