"""The feature store: cache key, reuse and refusal, reading API, locking, crash safety and resume."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY, make_image

import featx.store
from featx._runtime.io import atomic_path
from featx.data import from_folder
from featx.data.splits import SplitPlan
from featx.exceptions import IncompleteStoreError, SpecMismatchError, StoreLockedError
from featx.extract import extract
from featx.spec import ExtractionSpec, Preprocessing, cache_key
from featx.store import FORMAT_NAME, StoreWriter, partial_path

TESTS = Path(__file__).resolve().parents[1]


def _spec(**changes) -> ExtractionSpec:
    base = ExtractionSpec(
        backbone="featx:tiny_test",
        weights="w",
        weights_sha256="0" * 64,
        layers=("penultimate",),
        preprocessing=Preprocessing((64, 64), 72, "bilinear", (0.5,) * 3, (0.5,) * 3),
    )
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------------------------------ cache key
_ALTERNATIVES = {
    "backbone": "featx:other",
    "weights": "v2",
    "weights_sha256": "1" * 64,
    "layers": ("penultimate", "blocks.2"),
    "pool": "gem",
    "dtype": "float16",
    "amp": "bf16",
    "tta": "flip",
    "max_pixels": 1000,
    "decode": "fast",
    "extractor_version": 999,
}
_PRE_ALTERNATIVES = {
    "input_size": (60, 60),
    "resize_size": 80,
    "interpolation": "bicubic",
    "mean": (0.4, 0.5, 0.5),
    "std": (0.5, 0.5, 0.4),
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ExtractionSpec)])
def test_every_spec_field_changes_the_key(field):
    if field == "preprocessing":
        for pre_field, value in _PRE_ALTERNATIVES.items():
            changed = _spec(preprocessing=dataclasses.replace(_spec().preprocessing, **{pre_field: value}))
            assert cache_key(changed, "stat:x") != cache_key(_spec(), "stat:x"), pre_field
        assert set(_PRE_ALTERNATIVES) == {f.name for f in dataclasses.fields(Preprocessing)}
        return
    assert field in _ALTERNATIVES, f"new spec field {field!r}: add it to the key tests"
    assert cache_key(_spec(**{field: _ALTERNATIVES[field]}), "stat:x") != cache_key(_spec(), "stat:x")


def test_key_is_stable_and_needs_a_fingerprint():
    assert cache_key(_spec(), "stat:x") == cache_key(_spec(), "stat:x")
    assert cache_key(_spec(), "stat:x") != cache_key(_spec(), "stat:y")
    with pytest.raises(ValueError, match="fingerprint"):
        cache_key(_spec(), "")


def test_spec_round_trips_and_refuses_unknown_fields():
    spec = _spec(layers=("a", "b"))
    assert ExtractionSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="newer featx"):
        ExtractionSpec.from_dict({**spec.to_dict(), "future_field": 1})


def test_images_fingerprint_tracks_the_images_and_the_labels_fingerprint_the_rest(image_folder):
    m = from_folder(image_folder)
    base = m.images_fingerprint("stat")
    assert m.images_fingerprint("stat") == base
    content = m.images_fingerprint("content")
    # Same bytes, new mtime: the stat fingerprint changes, the content one does not.
    st = os.stat(m.paths[0])
    os.utime(m.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert m.images_fingerprint("stat") != base
    assert m.images_fingerprint("content") == content
    make_image(Path(m.paths[0]), seed=999)
    assert m.images_fingerprint("content") != content
    content = m.images_fingerprint("content")
    # Labels and splits are not what the features depend on: they change the labels layer only.
    relabeled = dataclasses.replace(m, labels=m.labels[::-1].copy())
    resplit = m.with_plan(SplitPlan(split_seed=5))
    for other in (relabeled, resplit):
        assert other.images_fingerprint("content") == content
        assert other.labels_fingerprint() != m.labels_fingerprint()
        assert other.fingerprint("content") != m.fingerprint("content")


# ----------------------------------------------------------------------------- reuse and refusal
def test_second_run_is_a_cache_hit_without_model_work(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    first = extract(image_folder, TINY, out=out, workers=0, progress=False)
    assert not first.cached and first.n_done == 18

    def no_model_work(*args, **kwargs):
        raise AssertionError("a cache hit must not run the network")

    monkeypatch.setattr("featx.extract.engine._Embedder.__call__", no_model_work)
    monkeypatch.setattr("featx.extract.engine.feature_dims", no_model_work)
    monkeypatch.setattr("featx.backbones.features._channels_last_outputs", no_model_work)
    second = extract(image_folder, TINY, out=out, workers=0, progress=False)
    assert second.cached and second.n_done == 18 and second.key == first.key


@pytest.mark.parametrize(
    "change",
    [
        {"pool": "max"},
        {"layers": ["penultimate"]},
        {"dtype": "float16"},
        {"tta": "flip"},
        {"backbone": "featx:tiny_other"},
    ],
)
def test_a_changed_spec_never_reuses_the_store(image_folder, tmp_path, change, monkeypatch):
    from conftest import tiny_factory

    from featx.backbones import register_backbone
    from featx.backbones.names import _unregister_backbone

    def other():  # same architecture, one weight changed: a different checksum
        model, pre, tag = tiny_factory()
        next(model.parameters()).data.add_(1.0)
        return model, pre, tag

    register_backbone("tiny_other", other)
    try:
        out = tmp_path / "s.h5"
        # blocks.1 is a feature map: the pool changes it (penultimate alone is a pooled vector, the same store)
        layers = ["penultimate", "blocks.1"]
        kwargs = {"layers": layers, "pool": "avg", "dtype": "float32", "tta": "none", "backbone": TINY}
        extract(image_folder, out=out, workers=0, progress=False, **kwargs)
        kwargs.update(change)
        with pytest.raises(SpecMismatchError, match="--overwrite") as err:
            extract(image_folder, out=out, workers=0, progress=False, **kwargs)
        changed_field = "weights_sha256" if "backbone" in change else next(iter(change))
        assert changed_field in str(err.value)
        redone = extract(image_folder, out=out, workers=0, progress=False, overwrite=True, **kwargs)
        assert not redone.cached
    finally:
        _unregister_backbone("tiny_other")


def test_a_pool_that_changes_nothing_makes_the_default_pools_store(image_folder, tmp_path, caplog):
    out = tmp_path / "s.h5"
    first = extract(image_folder, TINY, out=out, workers=0, progress=False)
    with caplog.at_level("WARNING", logger="featx"):
        maxed = extract(image_folder, TINY, pool="max", out=out, workers=0, progress=False)
    assert maxed.cached and maxed.key == first.key and maxed.spec.pool == "avg"
    assert "changes nothing" in caplog.text and "penultimate" in caplog.text


def test_a_store_with_the_same_key_elsewhere_is_linked_not_extracted(image_folder, tmp_path, monkeypatch):
    from featx.data.sources import load_source
    from featx.store.writer import update_labels

    first = extract(image_folder, TINY, out=tmp_path / "a" / "s.h5", workers=0, progress=False)

    def no_model_work(*args, **kwargs):
        raise AssertionError("a store found by its key must not be extracted again")

    monkeypatch.setattr("featx.extract.engine._Embedder.__call__", no_model_work)
    planned = extract(image_folder, TINY, out=tmp_path / "b" / "s.h5", workers=0, progress=False, dry_run=True)
    assert planned.cached and not (tmp_path / "b").exists()  # a dry run finds it and writes nothing
    second = extract(image_folder, TINY, out=tmp_path / "b" / "s.h5", workers=0, progress=False)
    assert second.cached and second.key == first.key and second.path == tmp_path / "b" / "s.h5"
    with featx.store.open(first.path) as a, featx.store.open(second.path) as b:
        np.testing.assert_array_equal(a.features(), b.features())
    # a relabelled copy never relabels the store it came from
    m = load_source(image_folder)
    update_labels(second.path, dataclasses.replace(m, labels=m.labels[::-1].copy()))
    with featx.store.open(first.path) as a, featx.store.open(second.path) as b:
        assert list(a.labels()) == list(m.labels) and list(b.labels()) == list(m.labels[::-1])
    third = extract(image_folder, TINY, workers=0, progress=False)  # the cache's own path, found by key too
    assert third.cached and third.path != first.path


def test_changed_images_never_reuse_the_store(image_folder, tmp_path):
    out = tmp_path / "s.h5"
    extract(image_folder, TINY, out=out, workers=0, progress=False)
    make_image(image_folder / "cat" / "00.png", seed=4242)
    with pytest.raises(SpecMismatchError, match="the images"):
        extract(image_folder, TINY, out=out, workers=0, progress=False)
    make_image(image_folder / "cat" / "new.png", seed=4243)
    with pytest.raises(SpecMismatchError):
        extract(image_folder, TINY, out=out, workers=0, progress=False)


def test_default_path_is_in_the_cache_named_by_key(image_folder, isolated_caches):
    result = extract(image_folder, TINY, workers=0, progress=False)
    assert result.path.parent == isolated_caches / "featx" / "stores"
    assert result.path.name.startswith(result.key[:20])


# ----------------------------------------------------------------------------------------- reading
def test_reader_gives_aligned_splits_chunks_and_provenance(split_folder, tmp_path):
    out = tmp_path / "s.h5"
    extract(split_folder, TINY, out=out, layers=["penultimate", "blocks.1"], workers=0, progress=False)
    with featx.store.open(out) as store:
        assert store.class_names == ["ants", "bees"]
        assert store.splits == {"train": 8, "val": 2, "test": 4}
        assert store.source_splits == {"train": 10, "val": 4}
        assert store.split_policy.startswith("the source's val split is the test split; val carved from train")
        X = store.features(split="train")
        assert X.shape == (8, store.feature_dims()["penultimate"]) and X.dtype == np.float32
        assert store.features("blocks.1", split="test").shape[0] == 4
        ids = store.ids("test")
        assert all(i.startswith("val/") for i in ids)
        assert list(store.labels("test")) == [0, 0, 1, 1]
        chunks = list(store.iter_chunks(split="train", chunk_size=3))
        assert [len(c[0]) for c in chunks] == [3, 3, 2]
        np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), X)
        np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), store.labels("train"))
        info = store.info()
        assert info["spec"]["backbone"] == TINY and info["versions"]["torch"]
        with pytest.raises(ValueError, match="Did you mean"):
            store.features("blocks.11")
    with h5py.File(out, "r") as f:  # the documented layout, readable without featx
        assert f.attrs["featx_format"] == FORMAT_NAME and f.attrs["complete"]
        assert set(f) >= {"features", "ids", "paths", "labels", "split", "class_names", "done", "failures"}


def test_scattered_rows_read_like_fancy_indexing(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        data = np.arange(20000 * 3, dtype=np.float32).reshape(20000, 3)
        ds = f.create_dataset("x", data=data, chunks=(512, 3))
        rows = np.sort(np.random.default_rng(0).choice(20000, size=3000, replace=False))
        np.testing.assert_array_equal(featx.store.reader._read_rows(ds, rows), data[rows])


def test_float16_storage_matches_float32(image_folder, tmp_path):
    a = extract(image_folder, TINY, out=tmp_path / "a.h5", workers=0, progress=False)
    b = extract(image_folder, TINY, out=tmp_path / "b.h5", dtype="float16", workers=0, progress=False)
    with featx.store.open(a.path) as sa, featx.store.open(b.path) as sb:
        assert sb.features().dtype == np.float16
        np.testing.assert_allclose(sb.features().astype(np.float32), sa.features(), rtol=2e-3, atol=2e-3)
        assert os.path.getsize(b.path) < os.path.getsize(a.path)


def test_open_refuses_non_stores_and_newer_formats(tmp_path):
    with pytest.raises(FileNotFoundError):
        featx.store.open(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        featx.store.open(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(ValueError, match="not a featx feature store"):
        featx.store.open(tmp_path / "other.h5")
    with h5py.File(tmp_path / "future.h5", "w") as f:
        f.attrs["featx_format"] = FORMAT_NAME
        f.attrs["featx_format_version"] = 99
    with pytest.raises(ValueError, match="Upgrade featx"):
        featx.store.open(tmp_path / "future.h5")


def test_open_store_is_the_documented_name_and_open_stays_for_users(image_folder, tmp_path):
    made = extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False)
    assert featx.store.open is featx.store.open_store  # users call featx.store.open
    with featx.store.open_store(made.path) as a, featx.store.open(made.path) as b:
        assert a.key == b.key == made.key
    names: dict = {}
    exec("from featx.store import *", names)
    assert "open_store" in names and "open" not in names  # a star import leaves the builtin open alone


def test_atomic_path_replaces_the_target_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="died"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("died while writing")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with atomic_path(target, tmp_path / "assembling.h5") as tmp:
        assert tmp == tmp_path / "assembling.h5"
        with h5py.File(tmp, "w") as f:
            f["x"] = [1, 2, 3]
        assert target.read_bytes() == b"old"  # nothing replaced before the block ends
    with h5py.File(target, "r") as f:
        assert list(f["x"][:]) == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


# ------------------------------------------------------------------------------------------ locking
def test_second_writer_gets_a_clear_error(image_folder, tmp_path):
    out = tmp_path / "s.h5"
    m = from_folder(image_folder)
    spec = _spec()
    fp = m.fingerprint()
    with StoreWriter(out, spec, cache_key(spec, fp), m, fp, {"penultimate": 4}):
        with pytest.raises(StoreLockedError, match=f"another featx process \\(pid {os.getpid()}"):
            extract(image_folder, TINY, out=out, workers=0, progress=False)
        # The refusal closed no descriptor of the lock file (that would drop a record lock): still held.
        probe = "from featx._runtime.lock import FileLock; import sys; FileLock(sys.argv[1]).acquire()"
        lock_file = str(partial_path(out) / "lock")
        child = subprocess.run([sys.executable, "-c", probe, lock_file], capture_output=True, text=True)
        assert child.returncode != 0 and f"pid {os.getpid()} on" in child.stderr
    # Once the first writer is gone the lock is free again.
    assert not extract(image_folder, TINY, out=tmp_path / "s.h5", workers=0, progress=False, overwrite=True).cached


def test_partial_job_of_another_spec_is_not_mixed_in(image_folder, tmp_path):
    out = tmp_path / "s.h5"
    m = from_folder(image_folder)
    spec = _spec()
    fp = m.fingerprint()
    with StoreWriter(out, spec, cache_key(spec, fp), m, fp, {"penultimate": 4}) as w:
        w.write_batch(np.array([0, 1]), {"penultimate": np.ones((2, 4))})
    with pytest.raises(SpecMismatchError, match="interrupted extraction with another spec"):
        extract(image_folder, TINY, out=out, workers=0, progress=False)
    assert not extract(image_folder, TINY, out=out, workers=0, progress=False, overwrite=True).cached


def test_the_work_folder_of_an_unfinished_store_says_resume_never_delete(image_folder, tmp_path):
    from click.testing import CliRunner

    from featx.cli import main

    out = tmp_path / "s.h5"
    m = from_folder(image_folder)
    spec = _spec()
    fp = m.fingerprint()
    with StoreWriter(out, spec, cache_key(spec, fp), m, fp, {"penultimate": 4}) as w:
        w.write_batch(np.array([0, 1, 2]), {"penultimate": np.ones((3, 4))})
    work = partial_path(out)
    kept = sorted(p.name for p in work.iterdir())
    for asked in (work, out):  # `featx info s.h5.partial` as `featx info s.h5`
        with pytest.raises(IncompleteStoreError) as err:
            featx.store.open(asked)
        message = str(err.value)
        assert "3 of 18 images processed" in message and "re-run the same `featx extract` command to resume" in message
        assert f"deleting {work} would discard the rows already extracted" in message
        result = CliRunner().invoke(main, ["info", str(asked)])
        assert result.exit_code == 1 and "re-run the same `featx extract` command to resume" in result.output
        assert "delete it" not in result.output and "HDF5" not in result.output
    assert sorted(p.name for p in work.iterdir()) == kept  # nothing touched
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a feature store"):
        featx.store.open(tmp_path / "folder")
    made = extract(image_folder, TINY, out=tmp_path / "done.h5", workers=0, progress=False)
    partial_path(made.path).mkdir()  # as left by a later run with --overwrite, say
    with pytest.raises(IsADirectoryError, match=f"work folder of {made.path}, not a feature store: open"):
        featx.store.open(partial_path(made.path))


# ------------------------------------------------------------------------------------ crash safety
_SLOW_RUN = textwrap.dedent(
    """
    import signal, sys, time
    # A shell's background job (`nohup pytest &`) starts with SIGINT ignored, and children inherit that:
    # restore Python's handler so the test's SIGINT interrupts the run like Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    import conftest  # registers featx:tiny_test
    import featx.extract.engine as fx

    call = fx._Embedder.__call__
    def slow(self, images):
        time.sleep(0.15)
        return call(self, images)
    fx._Embedder.__call__ = slow
    from featx.cli import main
    main(sys.argv[1:])
    """
)


def _start_slow(tmp_path: Path, source: Path, out: Path, *extra: str) -> subprocess.Popen:
    script = tmp_path / "slow_run.py"
    script.write_text(_SLOW_RUN.format(tests=str(TESTS)))
    args = [
        sys.executable,
        str(script),
        "extract",
        str(source),
        "--backbone",
        TINY,
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())


def _wait_for_parts(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(partial_path(out).glob("part-*.npz"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no progress")


@pytest.fixture
def many_images(tmp_path) -> Path:
    root = tmp_path / "many"
    for i in range(48):
        make_image(root / ("a" if i % 2 else "b") / f"{i:03d}.png", seed=i)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_job_leaves_no_complete_store_and_resumes_to_the_same_result(tmp_path, many_images, sig):
    out = tmp_path / "killed.h5"
    proc = _start_slow(tmp_path, many_images, out)
    _wait_for_parts(out, proc, n=3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert b"resume" in stderr
    assert not out.exists()
    with pytest.raises(IncompleteStoreError, match="re-run the same"):
        featx.store.open(out)

    resumed = extract(many_images, TINY, out=out, batch_size=4, workers=0, progress=False)
    assert 0 < resumed.resumed_rows < 48 and resumed.images_this_run == 48 - resumed.resumed_rows
    _assert_same_as_an_uninterrupted_run(out, many_images, tmp_path)


def _assert_same_as_an_uninterrupted_run(out: Path, source: Path, tmp_path: Path) -> None:
    reference = extract(source, TINY, out=tmp_path / "ref.h5", batch_size=4, workers=0, progress=False)
    with featx.store.open(out) as a, featx.store.open(reference.path) as b:
        assert a.key == b.key
        assert a.ids() == b.ids()
        np.testing.assert_array_equal(a.features(), b.features())
    assert not partial_path(out).exists()


@pytest.mark.slow
def test_a_running_writer_locks_out_a_second_process(tmp_path, many_images):
    out = tmp_path / "busy.h5"
    proc = _start_slow(tmp_path, many_images, out)
    try:
        _wait_for_parts(out, proc, n=1)
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            extract(many_images, TINY, out=out, batch_size=4, workers=0, progress=False)
    finally:
        proc.kill()
        proc.communicate()


# A writer that stalls for good once it has written PARTS batches, its DataLoader workers alive: killed there it
# is mid-run for certain, with no timing involved. It says "stalled" when it gets there.
_STALLING_RUN = textwrap.dedent(
    """
    import sys, threading
    sys.path.insert(0, {tests!r})
    import conftest  # registers featx:tiny_test
    from featx.store.writer import StoreWriter

    written = []
    write = StoreWriter.write_batch
    def write_then_stall(self, *args, **kwargs):
        write(self, *args, **kwargs)
        written.append(1)
        if len(written) == {parts}:
            print("stalled", flush=True)
            threading.Event().wait()
    StoreWriter.write_batch = write_then_stall
    from featx.cli import main
    main(sys.argv[1:])
    """
)
# The CLI, its slow imports done ahead ("ready"), run when a line arrives on stdin: a re-run that starts at once.
_READY_RUN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import conftest  # registers featx:tiny_test
    import featx.extract.api, featx.extract.engine
    from featx.cli import main
    print("ready", flush=True)
    sys.stdin.readline()
    main(sys.argv[1:])
    """
)


def _children_of(pid: int) -> list[int]:
    """The pids of the live children of ``pid``, from Linux's /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # /proc/PID/stat: "PID (COMMAND) STATE PPID ...", COMMAND possibly holding spaces or ")"
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def _python_child(tmp_path: Path, name: str, code: str, *args: str, **popen) -> subprocess.Popen:
    script = tmp_path / name
    script.write_text(code.format(tests=str(TESTS), parts=2))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the DataLoader workers through /proc")
@pytest.mark.parametrize("rerun", ["in-process", "cli"])
def test_a_killed_writer_with_workers_resumes_at_once(tmp_path, many_images, rerun):
    """kill -9 of a writer leaves its forked DataLoader workers alive a while (they check on their parent every
    ~5 s): they hold the lock file open, but the lock died with the writer. No sleep anywhere."""
    out = tmp_path / "killed.h5"
    options = ["--backbone", TINY, "--batch-size", "4", "--no-progress", "--out", str(out)]
    args = ["extract", str(many_images), *options]
    writer = _python_child(tmp_path, "stalling_run.py", _STALLING_RUN, *args, "--workers", "2")
    cli = None
    if rerun == "cli":  # started now, so that it re-runs the moment the writer is dead
        cli = _python_child(tmp_path, "ready_run.py", _READY_RUN, *args, "--workers", "0", stdin=subprocess.PIPE)
    workers: list[int] = []
    try:
        assert writer.stdout.readline() == "stalled\n", "the writer ended before writing 2 batches"
        workers = _children_of(writer.pid)
        assert len(workers) >= 2, workers  # the DataLoader workers, sharing the writer's open lock file
        assert cli is None or cli.stdout.readline() == "ready\n"
        writer.kill()
        writer.wait()
        if cli is None:
            resumed = extract(many_images, TINY, out=out, batch_size=4, workers=0, progress=False)
            assert resumed.resumed_rows == 8 and resumed.images_this_run == 40
        else:
            stdout, _ = cli.communicate("go\n", timeout=120)
            assert cli.returncode == 0
            assert "extracted 48 of 48 images" in stdout and "resumed after 8 already done" in stdout
        _assert_same_as_an_uninterrupted_run(out, many_images, tmp_path)
    finally:
        for pid in [*workers, writer.pid, *([cli.pid] if cli else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        writer.wait()
        if cli is not None:
            cli.wait()
