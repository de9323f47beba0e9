"""Each config's option table: every option checked once, in its table; the CLI and pipelines made from it."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from featx._runtime.params import options_of
from featx.classify.config import ClassifierConfig, TrainRun
from featx.cli import main
from featx.data.splits import SplitPlan
from featx.exceptions import InvalidOptionError, JobError
from featx.finetune.config import FinetuneConfig
from featx.jobs import load_job
from featx.spec import ExtractionOptions

PACKAGE = Path(__file__).resolve().parents[1] / "featx"
#: Every config with an option table, and the module that owns it.
CONFIGS = {
    SplitPlan: "featx/data/splits.py",
    ExtractionOptions: "featx/spec.py",
    ClassifierConfig: "featx/classify/config.py",
    TrainRun: "featx/classify/config.py",
    FinetuneConfig: "featx/finetune/config.py",
}


#: Option names that are also everyday local names: there only ``config.NAME`` (an attribute) is the option.
GENERIC = {"value", "layer", "classifier"}
#: Checks that mention an option but are not a check of its value, each with why.
NOT_OPTION_CHECKS = {
    ("featx/cli/classify.py", "value"): "--C, --alpha, --neighbors: which flag names the preset's parameter",
    ("featx/finetune/heads.py", "layer"): "LP-FT needs a saved probe trained on the penultimate layer",
    ("featx/jobs/values.py", "classifier"): "a fine-tune's init_head must name a logreg row (a reference)",
}


def _hand_checks(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """``if <comparison or isinstance of NAME>: raise ...`` and click range or choice types for ``--NAME``: the
    ways an option was checked by hand before the tables."""

    def named(node: ast.AST) -> str | None:
        if isinstance(node, ast.Attribute):
            return node.attr
        return node.id if isinstance(node, ast.Name) and node.id not in GENERIC else None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and any(isinstance(n, ast.Raise) for n in node.body):
            for sub in ast.walk(node.test):
                # NAME compared with a literal (a range or a choice), or isinstance(NAME, ...) (a type)
                if isinstance(sub, ast.Compare):
                    operands = [sub.left, *sub.comparators]
                    literal = any(isinstance(o, ast.Constant | ast.Tuple | ast.List | ast.Set) for o in operands)
                    hits = [named(o) for o in operands if named(o) in names] if literal else []
                elif isinstance(sub, ast.Call) and named(sub.func) == "isinstance" and sub.args:
                    hits = [named(sub.args[0])] if named(sub.args[0]) in names else []
                else:
                    hits = []
                found += [(node.lineno, hit) for hit in hits]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "option":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            typed = [k for k in node.keywords if k.arg == "type" and isinstance(k.value, ast.Call)]
            ranged = typed and getattr(typed[0].value.func, "attr", "") in ("IntRange", "FloatRange", "Choice")
            for flag in flags:
                if ranged and flag.lstrip("-").replace("-", "_") in names:
                    found.append((node.lineno, flag))
    return found


def test_every_option_is_checked_in_its_own_table_only():
    options = {name: config for config in CONFIGS for name in options_of(config)}
    assert len(options) >= 40  # the walk sees every table
    owners = set(CONFIGS.values())
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        if rel in owners or rel == "featx/_runtime/params.py":
            continue
        for line, name in _hand_checks(ast.parse(path.read_text()), set(options)):
            if (rel, name) in NOT_OPTION_CHECKS:
                continue
            bad.append(f"{rel}:{line}: {name} (an option of {options[name.lstrip('-').replace('-', '_')].__name__})")
    assert not bad, "options checked outside their config's table:\n" + "\n".join(bad)


def test_the_scan_finds_a_hand_written_check():
    planted = ast.parse(
        "def f(batch_size):\n    if batch_size < 1:\n        raise ValueError('no')\n"
        "opt = click.option('--cv', type=click.IntRange(min=2))\n"
    )
    assert _hand_checks(planted, {"batch_size", "cv"}) == [(2, "batch_size"), (4, "--cv")]


@pytest.mark.parametrize("config", list(CONFIGS), ids=lambda c: c.__name__)
def test_every_option_has_help_and_a_default_its_table_allows(config):
    for name, (spec, default) in options_of(config).items():
        assert spec.help and spec.help.strip()[-1] in ".)]", (config.__name__, name)
        config(**{name: default})  # the default passes its own check


@pytest.mark.parametrize(
    ("config", "name", "value"),
    [
        (ClassifierConfig, "value", math.nan),
        (ClassifierConfig, "value", math.inf),
        (ClassifierConfig, "seed", -1),
        (ClassifierConfig, "cv", True),
        (TrainRun, "n_jobs", 0),
        (FinetuneConfig, "batch_size", 99999999999999999999),
        (FinetuneConfig, "max_minutes", math.inf),
        (ExtractionOptions, "batch_size", 0),
        (ExtractionOptions, "pool", "mean"),
        (SplitPlan, "val_fraction", math.nan),
    ],
)
def test_a_bad_value_names_its_option(config, name, value):
    with pytest.raises(InvalidOptionError) as err:
        config(**{name: value})
    assert err.value.key == name and name in str(err.value)


# ----------------------------------------------------- issue 27 item 11: malformed options, exit 2, no traceback
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "nope=1"], "unknown svm parameter 'nope'"),
        (["--C", "nan"], "value must be auto or a number greater than 0; got 'nan'"),
        (["--C", "inf"], "value must be auto or a number greater than 0; got 'inf'"),
        (["--jobs", "0"], "n_jobs must be an integer of at most -1 or an integer of at least 1; got '0'"),
        (["--seed", "-1"], "seed must be an integer in [0, 4294967295]; got '-1'"),
        (["-c", "sklearn.linear_model.LinearRegression"], "is not a classifier (scikit-learn tags it as a regressor)"),
    ],
)
def test_train_refuses_malformed_options_before_reading_the_store(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", str(tmp_path / "none.h5"), *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["extract", "finetune"])
def test_a_huge_batch_size_is_a_usage_error(tmp_path, command):
    result = CliRunner().invoke(main, [command, str(tmp_path), "--batch-size", "99999999999999999999", "-o", "x"])
    assert result.exit_code == 2 and "batch_size must be an integer in [1, 2147483647]" in result.output


def test_run_refuses_a_set_variable_the_file_does_not_declare(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[vars]\ndata = "digits"\n[[datasets]]\nname = "d"\nsource = "${data}"\n')
    with pytest.raises(JobError, match=r"--set nope=…: the file's \[vars\] has no 'nope' \(its variables: data\)"):
        load_job(job, {"nope": "1"})
    result = CliRunner().invoke(main, ["run", str(job), "--set", "nope=1", "--dry-run"])
    assert result.exit_code != 0 and "has no 'nope'" in result.output
    assert load_job(job, {"data": "digits"}).datasets[0].source == "digits"


def test_a_finetune_row_on_the_pixels_baseline_is_refused_at_its_line(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        '[[datasets]]\nname = "d"\nsource = "digits"\n'
        '[[backbones]]\nname = "px"\nbackbone = "featx:pixels"\n'
        '[[finetune]]\nname = "f"\nbackbone = "px"\n'
    )
    with pytest.raises(JobError, match=r"job\.toml:9: featx:pixels cannot be fine-tuned: it is a no-transfer"):
        load_job(job)
    job.write_text(
        '[[datasets]]\nname = "d"\nsource = "digits"\n[[finetune]]\nname = "f"\nbackbone = "featx:pixels32"\n'
    )
    with pytest.raises(JobError, match="featx:pixels32 cannot be fine-tuned"):
        load_job(job)
