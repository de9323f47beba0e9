"""Pipeline files checked up front (types, names, backbones, layers, folders) and cells that never share a folder."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.exceptions import JobError as PublicJobError
from featx.jobs.planning import cell_dir, plan
from featx.jobs.runner import run
from featx.jobs.schema import BackboneSpec, ClassifierSpec, JobError, load_job

REPO = Path(__file__).resolve().parents[2]

HEAD = '[job]\nname = "t"\n[[datasets]]\nname = "d"\nsource = "digits"\n'  # lines 1-5
BACKBONE = '[[backbones]]\nname = "b"\n'  # lines 6-7


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Jobs without an ``out`` write to ``runs/NAME`` under the working directory: keep that out of the repository."""
    monkeypatch.chdir(tmp_path)


def _write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _refused(path: Path, line: int | None, *messages: str, overrides: dict[str, str] | None = None) -> str:
    with pytest.raises(JobError) as err:
        load_job(path, overrides)
    text = str(err.value)
    for message in messages:
        assert message in text, text
    if line is not None:
        assert re.match(rf"{re.escape(str(path))}:{line}: ", text), text
    return text


# ------------------------------------------------------------------------------------- item 3: folders
@pytest.mark.parametrize(
    ("text", "line", "name"),
    [
        ('[job]\nname = "t"\n[[datasets]]\nname = "d__x"\nsource = "digits"\n', 4, "d__x"),
        (HEAD + '[[backbones]]\nname = "b__penultimate__x"\n', 7, "b__penultimate__x"),
        (HEAD + BACKBONE + '[[classifiers]]\nname = "x__penultimate__y"\n', 9, "x__penultimate__y"),
        (HEAD + '[[finetune]]\nname = "f__g"\n', 7, "f__g"),
        (HEAD + '[[backbones]]\nname = "b_"\n', 7, "b_"),  # 'b_' + '__' would read as 'b' + '___'
    ],
)
def test_names_may_not_hold_the_folder_separator(tmp_path, text, line, name):
    message = _refused(_write(tmp_path, text), line, f"name {name!r}", "'__'", "rename it")
    assert "dataset__backbone__layer__classifier" in message


@pytest.mark.parametrize(
    "text",
    [
        HEAD + BACKBONE + 'layers = ["penultimate", "blocks__2"]\n',
        HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nlayers = ["blocks__2"]\n',
    ],
)
def test_layers_may_not_hold_the_folder_separator(tmp_path, text):
    line = text.count("\n")  # the last line: the layers key
    _refused(_write(tmp_path, text), line, "layer 'blocks__2'", "'__'")


COLLIDING = """
[job]
name = "collide"
out = "{out}"

[[datasets]]
name = "d"
source = "digits"

[[backbones]]
name = "b"

[[backbones]]
name = "b__penultimate__x"

[[classifiers]]
name = "y"

[[classifiers]]
name = "x__penultimate__y"
"""


def test_the_issue_pipeline_that_lost_a_cell_is_refused(tmp_path):
    # Before: both 'd/b/penultimate/x__penultimate__y' and 'd/b__penultimate__x/penultimate/y' wrote
    # cells/d__b__penultimate__x__penultimate__y; one result was lost and both recomputed every run.
    path = _write(tmp_path, COLLIDING.format(out=tmp_path / "out"))
    _refused(path, 14, "name 'b__penultimate__x'", "'__'")
    assert not (tmp_path / "out").exists()


def _job_without_checks(tmp_path: Path, backbones, classifiers):
    """A Job made without load_job (as Python code may), so that only planning stands between it and a collision."""
    path = _write(tmp_path, HEAD, "ok.toml")
    job = load_job(path)
    return dataclasses.replace(
        job, out=tmp_path / "out", backbones=tuple(backbones), classifiers=tuple(classifiers), source_file=path
    )


@pytest.mark.parametrize(
    ("backbones", "classifiers"),
    [
        (  # the issue's names, past the name check
            [BackboneSpec("b"), BackboneSpec("b__penultimate__x")],
            [ClassifierSpec("y"), ClassifierSpec("x__penultimate__y")],
        ),
        ([BackboneSpec("b", layers=("a:b", "a-b"))], [ClassifierSpec("c")]),  # layers that slug alike
        ([BackboneSpec("b")], [ClassifierSpec("svm"), ClassifierSpec("svm-")]),  # a trailing '-' is dropped
        ([BackboneSpec("b")], [ClassifierSpec("svm"), ClassifierSpec("SVM")]),  # one folder on macOS, Windows
    ],
)
def test_planning_refuses_any_folder_collision(tmp_path, backbones, classifiers):
    job = _job_without_checks(tmp_path, backbones, classifiers)
    with pytest.raises(JobError, match=r"would share the folder .*cells.*rename") as err:
        plan(job)
    assert str(err.value).count("classify/d/") == 2  # both cells named
    with pytest.raises(JobError, match="would share the folder"):
        run(job, progress=False)
    assert not job.out.exists()  # refused before anything was written


def test_planned_folders_are_distinct_and_unchanged(tmp_path):
    job = _job_without_checks(
        tmp_path,
        [BackboneSpec("b", layers=("penultimate", "blocks.2")), BackboneSpec("b2")],
        [ClassifierSpec("y"), ClassifierSpec("x-penultimate-y")],
    )
    names = [cell_dir(job, t).name for t in plan(job) if t.kind != "extract"]
    assert names == [
        "d__b__penultimate__y",
        "d__b__blocks.2__y",
        "d__b__penultimate__x-penultimate-y",
        "d__b__blocks.2__x-penultimate-y",
        "d__b2__penultimate__y",
        "d__b2__penultimate__x-penultimate-y",
    ]


def test_tasks_carry_their_folder_row_and_dependencies_and_the_report_finds_the_row_again(tmp_path):
    from featx.jobs.planning import ClassifyTask, ExtractTask, FinetuneTask
    from featx.jobs.report import row_key_of
    from featx.jobs.runner import _cell_info, _select
    from featx.jobs.schema import FinetuneSpec

    job = _job_without_checks(tmp_path, [BackboneSpec("b")], [ClassifierSpec("logreg", seeds=(0, 1))])
    job = dataclasses.replace(
        job,
        datasets=(dataclasses.replace(job.datasets[0], repeats=2),),
        finetune=(FinetuneSpec("ft", backbone="b", init_head="logreg"),),
    )
    extract, *cells, first_ft, second_ft = plan(job)
    assert isinstance(extract, ExtractTask) and all(isinstance(c, ClassifyTask) for c in cells)
    assert [(c.folder, c.row, c.seed, c.split_seed) for c in cells] == [
        ("d__b__penultimate__logreg__seed0", "classify/d/b/penultimate/logreg", 0, 0),
        ("d__b__penultimate__logreg__seed1", "classify/d/b/penultimate/logreg", 1, 0),
        ("d__b__penultimate__logreg__split1__seed0", "classify/d/b/penultimate/logreg", 0, 1),
        ("d__b__penultimate__logreg__split1__seed1", "classify/d/b/penultimate/logreg", 1, 1),
    ]
    assert all(c.extraction is extract and c.depends == (extract.id,) for c in cells)
    assert isinstance(second_ft, FinetuneTask) and second_ft.folder == "d__ft__split1"
    assert second_ft.probe is cells[2] and second_ft.depends == (cells[2].id,)  # its own split's probe, seed 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        second_ft.seed = 3  # what a task is does not change while it runs (runner.TaskRun holds that)
    for task in (*cells, first_ft, second_ft):  # the report's key, from the fields the cell's results record
        kind = "classifier" if task.kind == "classify" else "finetune"
        assert row_key_of({"kind": kind, "cell": _cell_info(task)}, tmp_path, tmp_path) == task.row
    selected = _select([extract, *cells, first_ft, second_ft], ["d__b__penultimate__logreg__split1__seed1"])
    assert selected == {extract.id, cells[3].id}  # --only takes a cell's folder too, and adds what it needs


SHIPPED_CELLS = {  # cached results live in these folders: they must keep their names
    "cifar10": [
        "cifar10__lite0__penultimate__logreg",
        "cifar10__lite0__penultimate__sgd",
        "cifar10__lite0__penultimate__knn",
        "cifar10__pixels__penultimate__sgd",
        "cifar10__pixels__penultimate__knn",
        "cifar10__pixels__penultimate__chance",
    ],
    "hymenoptera": [
        "hymenoptera__lite0__penultimate__svm",
        "hymenoptera__lite0__penultimate__logreg",
        "hymenoptera__lite0__penultimate__knn",
        "hymenoptera__pixels__penultimate__svm",
        "hymenoptera__pixels__penultimate__logreg",
        "hymenoptera__pixels__penultimate__knn",
        "hymenoptera__pixels__penultimate__chance",
        # issue 24: three training seeds per fine-tune row (their spread is the size of the gaps judged)
        *(f"hymenoptera__{row}__seed{s}" for row in ("finetune", "lp-ft") for s in (0, 1, 2)),
    ],
    "quickstart": [
        "digits__lite0__penultimate__svm",
        "digits__lite0__penultimate__logreg",
        "digits__lite0__penultimate__knn",
        "digits__pixels__penultimate__svm",
        "digits__pixels__penultimate__logreg-pixels",
        "digits__pixels__penultimate__knn",
        "digits__pixels__penultimate__chance",
        "digits__lp-ft",
    ],
    "sweep-layers": [
        f"images__{bb}__{layer}__{clf}"
        for bb, layers in (
            ("lite0", ("blocks.4", "blocks.5", "penultimate")),
            ("lite0-gem", ("blocks.5", "blocks.6")),
            ("resnet50", ("layer3", "penultimate")),
            ("convnext", ("penultimate",)),
        )
        for clf in ("logreg", "svm")
        for layer in layers
    ]
    + [
        "images__pixels__penultimate__logreg",
        "images__pixels__penultimate__svm",
        "images__pixels__penultimate__chance",
    ],
}


def test_shipped_pipelines_validate_and_keep_their_cell_folders(tmp_path):
    data = tmp_path / "data"  # only the sources' existence is checked: stand-ins will do
    (data / "hymenoptera").mkdir(parents=True)
    (data / "cifar10-jpeg.tar.gz").write_bytes(b"")
    for path in sorted((REPO / "pipelines").glob("*.toml")):
        job = load_job(path, {"data": str(data)} if "${data}" in path.read_text() else None)
        tasks = plan(job)
        names = [cell_dir(job, t).name for t in tasks if t.kind != "extract"]
        assert sorted(names) == sorted(SHIPPED_CELLS[path.stem]), path.stem


# ----------------------------------------------------------------------------------- item 5: validation
@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # a string where a list is expected is refused, never split into letters
        (HEAD + BACKBONE + 'layers = "penultimate"\n', 8, 'layers must be a list of layer names, e.g. layers = ["'),
        (HEAD + BACKBONE + "layers = 5\n", 8, "layers must be a list of layer names"),
        (HEAD + BACKBONE + "layers = []\n", 8, "layers must name at least one layer"),
        (HEAD + BACKBONE + 'layers = ["penultimate", "penultimate"]\n', 8, "'penultimate' is listed twice"),
        (HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nlayers = "penultimate"\n', 10, "layers must be a list"),
        (HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nbackbones = "b"\n', 10, "backbones must be a list"),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nshots = 5\n',
            10,
            "shots must be a list of 1 or more items",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nshots = [1, true]\n',
            10,
            "each a positive integer (images per class) or all",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\ndraws = "two"\n',
            10,
            "draws must be an integer of at least 1; got 'two'",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\ndraws = 0\n',
            10,
            "draws must be an integer of at least 1; got 0",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\ncv = "x"\n',
            10,
            "cv must be an integer of at least 2; got 'x'",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\ngrid = "x"\n',
            10,
            "grid must be a list of 1 or more items, each a number greater than 0",
        ),
        (HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nparams = 3\n', 10, "params must be a table"),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nclassifier = 5\n',
            10,
            "classifier must be a preset name or an import path",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nout_of_core = "yes"\n',
            10,
            "out_of_core must be true or false",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nlayers = ["blocks.9"]\n',
            10,
            "layer 'blocks.9' is not in the layers of",
        ),
        (
            HEAD + BACKBONE + "batch_size = true\n",
            8,
            "batch_size must be an integer in [1, 2147483647] (or unset); got True",
        ),
        (HEAD + BACKBONE + 'backbone = "featx:nope"\n', 8, "unknown backbone 'featx:nope'"),
        (HEAD + BACKBONE + 'backbone = "torchvision:resnet5"\n', 8, "Did you mean: resnet50"),
        (HEAD + BACKBONE + "backbone = 5\n", 8, "backbone must be a string SOURCE:NAME"),
        (HEAD + '[[finetune]]\nname = "f"\nbackbone = "lite0"\n', 8, "'lite0' is neither a [[backbones]] name"),
        ('[[datasets]]\nname = "d"\nsource = 5\n', 3, "source must be a string"),
        ('[[datasets]]\nname = "d"\nsource = "digits"\ntest_fraction = "x"\n', 4, "test_fraction must be a number"),
        ('[job]\nout = 42\n[[datasets]]\nname = "d"\nsource = "digits"\n', 2, "out must be a folder path"),
        (
            '[job]\nworkers = "many"\n[[datasets]]\nname = "d"\nsource = "digits"\n',
            2,
            "workers must be an integer of at least 0",
        ),
        (
            '[job]\nworkers = -1\n[[datasets]]\nname = "d"\nsource = "digits"\n',
            2,
            "workers must be an integer of at least 0",
        ),
        ('[job]\nseed = true\n[[datasets]]\nname = "d"\nsource = "digits"\n', 2, "seed must be an integer"),
        ('[job]\ndevice = "gpu"\n[[datasets]]\nname = "d"\nsource = "digits"\n', 2, "is not a torch device"),
        ('[job]\nname = 3\n[[datasets]]\nname = "d"\nsource = "digits"\n', 2, "name must be a non-empty string"),
        ('job = 3\n[[datasets]]\nname = "d"\nsource = "digits"\n', 1, "[job] must be a table"),
        ('vars = 3\n[[datasets]]\nname = "d"\nsource = "digits"\n', 1, "[vars] must be a table"),
        ('[vars]\nx = [1]\n[[datasets]]\nname = "d"\nsource = "digits"\n', 2, "[vars] values are strings or numbers"),
        ("datasets = 3\n", 1, "[[datasets]] must be tables"),
        ('datasets = ["digits"]\n', 1, "[[datasets]] must be tables"),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nbackbones = []\n',
            10,
            "applies the classifier to no backbone",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\nvalue = "x"\n',
            10,
            "value must be auto or a number greater than 0; got 'x'",
        ),
        (
            HEAD + BACKBONE + '[[classifiers]]\nname = "c"\npreprocess = ["l2", "bogus"]\n',
            10,
            "preprocessing step 'bogus'",
        ),
        ('[[datasets]]\nname = "d"\n', 2, "[[datasets]] 'd' needs source"),
        (
            HEAD + '[[finetune]]\nname = "f"\nbatch_size = "x"\n',
            8,
            "batch_size must be an integer in [1, 2147483647]; got 'x'",
        ),
        (
            HEAD + '[[finetune]]\nname = "f"\ncrop_scale = "x"\n',
            8,
            "crop_scale must be a list of exactly 2 items, each a number in (0, 1]",
        ),
        (
            HEAD
            + '[[backbones]]\nname = "b"\nlayers = ["blocks.2"]\n[[classifiers]]\nname = "c"\nclassifier = "logreg"\n'
            '[[finetune]]\nname = "f"\nbackbone = "b"\ninit_head = "c"\n',
            15,
            "its logreg must be trained on the penultimate layer of 'b'",  # before: fine-tuned without the probe
        ),
        # a variable that uses itself is refused at its line, not shown unexpanded later
        ('[vars]\ndata = "${data}/x"\n[[datasets]]\nname = "d"\nsource = "${data}"\n', 2, "refers to itself"),
        ('[vars]\na = "${b}"\nb = "${a}"\n[[datasets]]\nname = "d"\nsource = "${a}"\n', 2, "${a} → ${b} → ${a}"),
        ('[vars]\na = "${zz}"\n[[datasets]]\nname = "d"\nsource = "${a}"\n', 2, "unknown variable ${zz}"),
    ],
)
def test_every_value_is_checked_with_its_line(tmp_path, text, line, message):
    _refused(_write(tmp_path, text), line, message)


def test_variables_may_use_other_variables_and_be_set(tmp_path):
    (tmp_path / "root" / "imgs").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "root"
    text = f'[vars]\nroot = "{root}"\ndata = "${{root}}/imgs"\n[[datasets]]\nname = "d"\nsource = "${{data}}"\n'
    path = _write(tmp_path, text, "ok.toml")
    assert load_job(path).datasets[0].source == str(tmp_path / "root" / "imgs")
    assert load_job(path, {"data": str(tmp_path / "elsewhere")}).datasets[0].source == str(tmp_path / "elsewhere")
    self_ref = _write(tmp_path, text.replace('"${root}/imgs"', '"${data}/imgs"'), "self.toml")
    _refused(self_ref, 3, "variable 'data' refers to itself")
    assert load_job(self_ref, {"data": str(tmp_path / "elsewhere")}).datasets[0].source == str(tmp_path / "elsewhere")


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "taken").write_text("")
    for out, what in ((tmp_path / "taken", "is a file"), (tmp_path / "taken" / "sub", "which is a file")):
        path = _write(tmp_path, f'[job]\nout = "{out}"\n[[datasets]]\nname = "d"\nsource = "digits"\n')
        _refused(path, 2, f"out {str(out)!r}", what, "out must be a folder")


def test_a_job_made_in_python_with_a_file_as_out_is_refused_clearly(tmp_path):
    (tmp_path / "taken").write_text("")
    job = dataclasses.replace(load_job(_write(tmp_path, HEAD, "ok.toml")), out=tmp_path / "taken")
    with pytest.raises(JobError, match=r"ok\.toml:1: out '.*taken' is a file, or inside one"):  # was [Errno 17]
        run(job, dry_run=True, progress=False)


def test_job_errors_are_the_public_class():
    assert JobError is PublicJobError  # `except featx.JobError` catches what load_job raises


# ------------------------------------------------------------------------ layers: checked before extraction
LAYERS = """
[job]
name = "layers"
out = "{out}"

[[datasets]]
name = "colours"
source = "{data}"

[[backbones]]
name = "good"
backbone = "featx:tiny_test"
layers = ["penultimate", "blocks.2"]

[[backbones]]
name = "bad"
backbone = "featx:tiny_test"
pool = "max"
layers = ["penultimate", "blocks.99"]

[[classifiers]]
name = "knn"
classifier = "knn"
"""


def test_unknown_layers_are_refused_before_any_extraction(tmp_path, colour_folder, monkeypatch):
    import featx.extract.api

    path = _write(tmp_path, LAYERS.format(out=tmp_path / "out", data=colour_folder), "layers.toml")
    job = load_job(path)  # layer names need the network: not loaded while the file is read

    def no_extraction(*args, **kwargs):
        raise AssertionError("no extraction may start before every backbone's layers are checked")

    monkeypatch.setattr(featx.extract.api, "extract", no_extraction)
    for dry_run in (True, False):
        with pytest.raises(JobError) as err:
            run(job, dry_run=dry_run, progress=False)
        assert re.match(rf"{re.escape(str(path))}:19: unknown layer of featx:tiny_test 'blocks.99'", str(err.value))
        assert "featx backbones --layers featx:tiny_test" in str(err.value)
    result = CliRunner().invoke(main, ["run", str(path), "--no-progress"])
    assert result.exit_code == 1 and f"{path}:19: unknown layer" in result.output
    assert not list((tmp_path / "out").rglob("*.h5"))


def test_the_cli_reports_the_line_before_loading_anything(tmp_path, monkeypatch):
    import featx.backbones.loading

    def no_weights(*args, **kwargs):
        raise AssertionError("the file is checked before any weights are loaded")

    monkeypatch.setattr(featx.backbones.loading, "load_backbone", no_weights)
    path = _write(tmp_path, HEAD + BACKBONE + 'layers = "penultimate"\n')
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 1
    assert f"{path}:8: layers must be a list of layer names" in result.output
    assert "Traceback" not in result.output


def test_a_missing_source_made_of_a_variable_says_how_to_set_it(tmp_path):
    path = _write(
        tmp_path, '[job]\nname = "t"\n[vars]\ndata = "/no/such"\n[[datasets]]\nname = "d"\nsource = "${data}/ants"\n'
    )
    message = _refused(path, 7, "'/no/such/ants' does not exist")
    assert "${data} = '/no/such'" in message and "--set data=" in message
