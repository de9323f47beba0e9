"""Reliability of what featx keeps between commands: the report's Markdown, stores, run folders, cells, and the
errors of the environment (issue 27, part B). Each test is a hostile or careless input that once broke."""

from __future__ import annotations

import json
import re

import pytest
from conftest import synthetic_store

from featx.classify import ClassifierConfig
from featx.classify.training import train
from featx.jobs.markdown import md_cell, md_code, md_text
from featx.jobs.report import write_report

HOSTILE = "x<img src=x onerror=alert(6)>"


# -------------------------------------------------------------------------------------- report.md escaping
def _render(md: str) -> str | None:
    """report.md as HTML through markdown-it (GitHub's flavour: tables), or None when it is not installed."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    return MarkdownIt("commonmark").enable("table").render(md)


@pytest.mark.parametrize(
    "value", [HOSTILE, "a`b``c", "`edge`", "a|b", "**bold** _it_ [l](javascript:x) ![i](y)", "two\nlines", "&amp; #"]
)
def test_markdown_helpers_render_the_string_itself(value):
    """Each helper's output renders as the text itself: no tag, no link, no emphasis, no broken span."""
    flat = value.replace("\n", " ")
    assert "\n" not in md_text(value) and "\n" not in md_code(value)
    html = _render(f"- {md_text(value)}\n- {md_code(value)}\n\n| a |\n| --- |\n| {md_cell(value)} |\n")
    if html is None:
        pytest.skip("markdown-it-py not installed")
    import html as htmllib

    assert "<img" not in html and "<a " not in html and "<em>" not in html and "<strong>" not in html
    items = re.findall(r"<li>(.*?)</li>", html)
    assert htmllib.unescape(items[0]) == flat
    assert htmllib.unescape(items[1]) == f"<code>{htmllib.escape(flat.strip(), quote=False)}</code>" or (
        htmllib.unescape(re.sub(r"</?code>", "", items[1])).strip() == flat.strip()
    )
    assert htmllib.unescape(re.search(r"<td>(.*?)</td>", html).group(1)) == flat


def test_report_md_escapes_hostile_store_folder_and_method_names(tmp_path):
    """A store named like an HTML tag, an output folder with a backtick and a method with ``|`` stay text."""
    root = tmp_path / "run`s"
    store = synthetic_store(tmp_path / f"{HOSTILE}.h5", per_class=10)
    out = root / "a`b<img src=x onerror=alert(1)>"
    train(store, ClassifierConfig(classifier="logreg"), n_jobs=1, n_bootstrap=20, out_dir=out)
    results = json.loads((out / "results.json").read_text())
    results["method"] = "svm | *evil* <script>alert(2)</script>"
    (out / "results.json").write_text(json.dumps(results))
    md = write_report(root)["markdown"].read_text()

    assert f"## {tmp_path.as_posix()}/x\\<img src=x onerror=alert(6)\\>.h5".replace("_", "\\_") in md  # the heading
    assert "``a`b<img src=x onerror=alert(1)>/results.json``" in md  # a fence the backtick inside cannot close
    assert not re.search(r"(?<![\\`])<(img|script)", md.replace("``a`b<img", ""))  # any other < is escaped
    table = [line for line in md.splitlines() if line.startswith("| svm")]
    # the verdict's row (7 cells) and the results' (9): the | inside the name is escaped, not a cell border
    assert sorted(len(re.findall(r"(?<!\\)\|", line)) for line in table) == [8, 10]
    html = _render(md)
    if html is None:
        return
    assert "<script" not in html and "<em>evil" not in html
    images = re.findall(r"<img [^>]*>", html)  # the plots' only: src, alt and nothing else
    assert images and all(re.fullmatch(r'<img src="plots/[^"]+" alt="[^"]*" />', tag) for tag in images)
    assert html.count("<tr>") == 4  # two tables, a header and the one row each
    assert re.search(r"<td>svm \| \*evil\* &lt;script&gt;", html)
    assert "a`b&lt;img src=x onerror=alert(1)&gt;/results.json</code>" in html  # the whole path in one span


# ------------------------------------------------------------------------------------ tampered stores
def _spec_layer_renamed(f):
    spec = json.loads(f.attrs["spec"])
    spec["layers"] = ["renamed"]
    f.attrs["spec"] = json.dumps(spec)


def _labels_shortened(f):
    labels = f["labels"][:-3]
    del f["labels"]
    f["labels"] = labels


def _split_code_7(f):
    split = f["split"][:]
    split[4] = 7
    f["split"][...] = split


def _label_beyond_classes(f):
    labels = f["labels"][:]
    labels[2] = 9
    f["labels"][...] = labels


TAMPERINGS = {
    "spec layer renamed": (_spec_layer_renamed, "no features for layer 'renamed'"),
    "key deleted": (lambda f: f.attrs.__delitem__("key"), "'key' attribute is missing"),
    "split code 7": (_split_code_7, "split column holds code 7"),
    "labels shorter": (_labels_shortened, "it has 30 ids but labels 27 rows"),
    "features removed": (lambda f: f["features"].__delitem__("penultimate"), "no features for layer 'penultimate'"),
    "label beyond classes": (_label_beyond_classes, "row 2 has label 9, but there are 3 class names"),
    "spec not JSON": (lambda f: f.attrs.__setitem__("spec", "{not json"), "'spec' attribute is not valid JSON"),
    "spec lacks a field": (
        lambda f: f.attrs.__setitem__("spec", json.dumps({"backbone": "x"})),
        "'spec' attribute does not describe an extraction",
    ),
    "class names removed": (lambda f: f.__delitem__("class_names"), "lacks the dataset class_names"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_tampered_store_is_one_clear_error_in_info_and_train(tmp_path, case):
    import h5py
    from click.testing import CliRunner

    from featx.cli import main
    from featx.exceptions import StoreError
    from featx.store import open_store

    tamper, message = TAMPERINGS[case]
    store = synthetic_store(tmp_path / "blobs.h5", per_class=10)
    with h5py.File(store, "r+") as f:
        tamper(f)
    with pytest.raises(StoreError, match=re.escape(message)) as caught:
        open_store(store)
    assert str(store) in str(caught.value) and "run the extraction" in str(caught.value)
    for command in (["info", str(store)], ["train", str(store), "-c", "logreg", "--out", str(tmp_path / "m")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output


def test_an_untouched_store_passes_the_check(tmp_path):
    from featx.store import open_store

    with open_store(synthetic_store(tmp_path / "blobs.h5", per_class=10)) as store:
        assert len(store) == 30 and store.class_names == ["class0", "class1", "class2"]
