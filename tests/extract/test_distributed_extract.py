"""Sharded extraction: rows by rank, shard stores, the join and its refusals, and a real 2-process torchrun run."""

from __future__ import annotations

import datetime
import itertools
import os
import socket
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch.distributed as dist
from click.testing import CliRunner
from conftest import TINY, torchrun

import featx.store
from featx._runtime.dist import TorchrunEnv, World, close, gather_objects, init, process_group
from featx._runtime.env import default_workers
from featx.cli import main
from featx.data import Manifest
from featx.exceptions import IncompleteStoreError, SpecMismatchError
from featx.extract import extract
from featx.extract.sharded import Shard, check_agreement, join_shards, shard_manifest, shard_path
from featx.store import shards_path

TESTS = Path(__file__).resolve().parents[1]

#: Attributes a joined store must share with the single-process store (created_at and stats differ by nature).
_SAME_ATTRS = (
    "featx_format",
    "featx_format_version",
    "complete",
    "key",
    "spec",
    "manifest_fingerprint",
    "manifest_source",
    "split_policy",
    "versions",
)


@pytest.fixture
def images(image_folder) -> Path:
    """The 18-image folder plus one file that is no image, so every store records a failure."""
    (image_folder / "dog" / "03b.png").write_bytes(b"not a png at all")
    return image_folder


def _extract(source, out, **kwargs):
    options = {"workers": 0, "progress": False, "batch_size": 4, "max_failures": "inf"}
    return extract(source, TINY, out=out, **{**options, **kwargs})


def _datasets(f: h5py.File) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def assert_same_store(joined: Path, single: Path) -> None:
    """Every dataset, the split codes and the provenance attributes equal; no shard attribute.

    Everything but the features must be identical. The features are compared to float32 round-off:
    CPU convolution kernels depend on how images are grouped into batches, and shard boundaries regroup
    them (one process's own store changes the same way with --batch-size).
    """
    with h5py.File(joined, "r") as a, h5py.File(single, "r") as b:
        got, want = _datasets(a), _datasets(b)
        assert sorted(got) == sorted(want)
        for name in want:
            if name.startswith("features/"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
            else:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            assert got[name].dtype == want[name].dtype, name
        for layer in a["features"]:
            assert a["features"][layer].chunks == b["features"][layer].chunks
        assert a["split"].attrs["codes"] == b["split"].attrs["codes"]
        for attr in _SAME_ATTRS:
            assert a.attrs[attr] == b.attrs[attr], attr
        assert "shard" not in a.attrs


# -------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("n", [2, 5, 18, 1001])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_shards_are_contiguous_blocks_that_tile_the_rows(n, count):
    if n < count:  # some shard would hold no image: refused before any work
        with pytest.raises(ValueError, match=f"{n} images cannot be split into {count} shards"):
            ids = [f"{i}.png" for i in range(n)]
            manifest = Manifest(ids, ids, np.zeros(n, dtype=np.int64), ["train"] * n, ["c"], "test", "from source")
            shard_manifest(manifest, Shard(0, count))
        return
    blocks = [Shard(i, count).rows(n) for i in range(count)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(blocks))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_parsing_and_keys():
    assert Shard.parse("3/8") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    for bad in ("8/8", "x", "-1/2", "1/0", "1-2"):
        with pytest.raises(ValueError, match="INDEX/COUNT"):
            Shard.parse(bad)
    keys = {Shard(i, n).key("k") for n in (2, 3) for i in range(n)}
    assert len(keys) == 5 and Shard(0, 2).key("k") != Shard(0, 2).key("other")


def test_torchrun_environment_detection(monkeypatch):
    assert TorchrunEnv.detect({}) is None
    assert TorchrunEnv.detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == TorchrunEnv(1, 4, 1)
    with pytest.raises(ValueError, match="LOCAL_RANK not set"):
        TorchrunEnv.detect({"RANK": "1", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="not in"):
        TorchrunEnv.detect({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert TorchrunEnv(0, 2, 0).device("cpu") == "cpu"
    # Ranks on one node share its cores between their DataLoader workers.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_workers({"LOCAL_WORLD_SIZE": "4"}) == 4 and default_workers({}) == 8


@pytest.fixture
def one_rank(monkeypatch) -> TorchrunEnv:
    """A torchrun environment of one rank on a free local port (rank 0 hosts the rendezvous store)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    return TorchrunEnv.detect()


def test_a_process_group_lives_as_long_as_its_block_and_can_be_started_again(one_rank):
    assert not dist.is_initialized()
    for _ in range(2):  # a script may extract twice under one torchrun: the second group starts afresh
        with process_group(one_rank, "cpu", timeout=datetime.timedelta(seconds=30)) as world:
            assert dist.is_initialized() and world.owns_group and (world.rank, world.size) == (0, 1)
            assert gather_objects(world, "mine") == ["mine"]
        assert not dist.is_initialized()  # exit really destroys the group it started


def test_a_process_group_the_caller_made_is_joined_and_left_alone(one_rank):
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=30))
    try:
        with process_group(one_rank, "cpu") as world:
            assert not world.owns_group
        assert dist.is_initialized()
        with pytest.raises(RuntimeError, match="WORLD_SIZE is 2"), process_group(TorchrunEnv(0, 2, 0)):
            pass
    finally:
        dist.destroy_process_group()


def test_fine_tuning_and_extraction_read_the_environment_alike(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"RANK, LOCAL_RANK not set.*-m featx finetune"):
        init("cpu")
    with pytest.raises(ValueError, match=r"RANK, LOCAL_RANK not set.*-m featx extract.*--no-distributed"):
        TorchrunEnv.detect()
    monkeypatch.delenv("WORLD_SIZE")
    world, dev = init("cpu")  # plain python: a world of one and no process group
    assert world == World() and dev.type == "cpu" and not dist.is_initialized()
    close(world)


def test_ranks_that_built_another_job_are_refused_by_name():
    same = {"key": "a" * 64, "rows": 18, "path": "/x/s.h5", "host": "n1"}
    check_agreement([same, {**same, "host": "n2"}])
    with pytest.raises(SpecMismatchError, match=r"key differ .*rank 1 \(n2\): bbbb.*--fingerprint content"):
        check_agreement([same, {**same, "key": "b" * 64, "host": "n2"}])
    with pytest.raises(SpecMismatchError, match="rows differ"):
        check_agreement([same, {**same, "rows": 17}])


# ------------------------------------------------------------------------------- shards and the join
def test_shards_run_alone_then_joined_equal_one_process(images, tmp_path):
    single = _extract(images, tmp_path / "single.h5")
    assert single.n_failed == 1
    out = tmp_path / "sharded.h5"
    parts = [_extract(images, out, shard=f"{i}/3") for i in range(3)]
    assert [p.shard for p in parts] == ["0/3", "1/3", "2/3"]
    assert sum(p.n_images for p in parts) == 19 and sum(p.n_failed for p in parts) == 1
    assert not any(p.too_many_failures for p in parts)  # shards are judged when joined
    assert all(p.path == shard_path(out, Shard(i, 3)) for i, p in enumerate(parts))
    with featx.store.open(parts[1].path) as shard:  # each shard is an ordinary store of its rows
        assert len(shard) == 6 and shard.ids()[0] == single_ids(single.path)[6]
    with pytest.raises(IncompleteStoreError, match="featx join"):
        featx.store.open(out)

    joined = join_shards(out)
    assert (joined.n_images, joined.n_done, joined.n_failed, joined.n_shards) == (19, 18, 1, 3)
    assert_same_store(out, single.path)
    assert not shards_path(out).exists()
    with featx.store.open(out) as a, featx.store.open(single.path) as b:
        assert a.failures == b.failures and a.failures[0].id == "dog/03b.png"

    again = _extract(images, out, shard="1/3")  # the joined store is a cache hit for every shard
    assert again.cached and again.shard is None and not shards_path(out).exists()


def single_ids(path: Path) -> list[str]:
    with featx.store.open(path) as store:
        return store.ids()


def test_a_rerun_shard_resumes_its_partial_store(images, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    import featx.extract.engine as fx

    call = fx._Embedder.__call__
    calls = []

    def dies_on_second_batch(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("rank died")
        return call(self, batch)

    monkeypatch.setattr(fx._Embedder, "__call__", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="rank died"):
        _extract(images, out, shard="1/2", batch_size=2)
    monkeypatch.setattr(fx._Embedder, "__call__", call)
    _extract(images, out, shard="0/2")
    with pytest.raises(IncompleteStoreError, match=r"shard 1 of 2 is incomplete \(2/10 rows\).*--shard 1/2"):
        join_shards(out)
    assert shard_path(out, Shard(0, 2)).exists()  # a refused join deletes nothing

    resumed = _extract(images, out, shard="1/2", batch_size=2)
    assert resumed.resumed_rows == 2 and resumed.images_this_run == 8
    join_shards(out)
    assert_same_store(out, _extract(images, tmp_path / "single.h5").path)


def test_join_refuses_missing_mismatched_and_mixed_shards(images, tmp_path):
    out = tmp_path / "s.h5"
    _extract(images, out, shard="0/3")
    with pytest.raises(IncompleteStoreError) as err:
        join_shards(out)
    message = str(err.value)
    assert "shard 1 of 3 is missing" in message and "shard 2 of 3 is missing" in message
    assert "--shard 1/3" in message and f"featx join {out}" in message

    _extract(images, out, shard="1/3")
    _extract(images, out, shard="2/3", dtype="float16")  # another spec: another job
    with pytest.raises(SpecMismatchError, match=r"shard 2 of 3 was made for another job.*--shard 2/3 --overwrite"):
        join_shards(out)

    _extract(images, out, shard="1/2")  # a leftover of a run with another number of processes
    layouts = r"several layouts: 2 shards \(1 present\), 3 shards \(3 present\).*--shards"
    with pytest.raises(SpecMismatchError, match=layouts):
        join_shards(out)
    with pytest.raises(IncompleteStoreError, match="shard 0 of 2 is missing"):
        join_shards(out, count=2)
    assert len(list(shards_path(out).glob("shard-*.h5"))) == 4 and not out.exists()  # nothing deleted

    _extract(images, out, shard="2/3", overwrite=True)  # the fix the message names
    joined = join_shards(out, count=3)
    assert joined.n_images == 19 and shard_path(out, Shard(1, 2)).exists()  # only the joined layout is removed


def test_a_renamed_shard_is_refused(images, tmp_path):
    out = tmp_path / "s.h5"
    for i in range(2):
        _extract(images, out, shard=f"{i}/2")
    a, b = shard_path(out, Shard(0, 2)), shard_path(out, Shard(1, 2))
    tmp = a.with_name("tmp.h5")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(SpecMismatchError, match="holds shard 1 of 2, not 0/2"):
        join_shards(out)


def test_a_shard_run_refuses_a_finished_store_of_another_spec_before_working(images, tmp_path):
    out = tmp_path / "s.h5"
    _extract(images, out)
    with pytest.raises(SpecMismatchError, match="--overwrite"):
        _extract(images, out, shard="0/2", dtype="float16")
    assert not shards_path(out).exists()


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_cli_shards_then_join(images, tmp_path, no_torchrun):
    runner = CliRunner()
    out = tmp_path / "s.h5"
    base = ["extract", str(images), "--backbone", TINY, "--workers", "0", "--no-progress", "--out", str(out)]
    first = runner.invoke(main, [*base, "--shard", "0/2"])
    assert first.exit_code == 0, first.output
    assert "shard 0/2: extracted 9 of 9 images" in first.output and f"featx join {out}" in first.output
    assert runner.invoke(main, ["join", str(out)]).exit_code == 1  # shard 1 is missing
    assert runner.invoke(main, [*base, "--shard", "1/2"]).exit_code == 0

    joined = runner.invoke(main, ["join", str(out)])
    assert joined.exit_code == 3, joined.output  # one failed image, --max-failures 0
    assert "joined 2 shards" in joined.output and "18 of 19 images, 1 failed" in joined.output
    assert "dog/03b.png" in joined.output
    again = runner.invoke(main, ["join", str(out), "--max-failures", "1"])
    assert again.exit_code == 0 and "already joined" in again.output
    hit = runner.invoke(main, [*base, "--max-failures", "1"])
    assert hit.exit_code == 0 and "cache hit" in hit.output


def test_cli_refuses_bad_shards_and_distributed_without_torchrun(images, tmp_path, no_torchrun):
    runner = CliRunner()
    base = ["extract", str(images), "--backbone", TINY, "--workers", "0", "--out", str(tmp_path / "s.h5")]
    bad = runner.invoke(main, [*base, "--shard", "2/2"])
    assert bad.exit_code == 2 and "0 <= INDEX < COUNT" in bad.output
    alone = runner.invoke(main, [*base, "--distributed"])
    assert alone.exit_code == 1 and "torchrun --nproc-per-node N -m featx extract" in alone.output
    both = runner.invoke(main, [*base, "--distributed", "--shard", "0/2"])
    assert both.exit_code == 1 and "exclude each other" in both.output
    nothing = runner.invoke(main, ["join", str(tmp_path / "none.h5")])
    assert nothing.exit_code == 1 and "no shards to join" in nothing.output


# ------------------------------------------------------------------------------------- real torchrun
# Each rank runs the command twice in one launch (starting torchrun twice would double the test's time):
# the first run extracts and joins, the second must be a plain cache hit.
_LAUNCH = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import conftest  # registers featx:tiny_test in every rank
    from featx.cli import main
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:  # this rank's extraction dies with an error
        import featx.extract.sharded
        def broken(job, shard):
            raise RuntimeError("disk full on this node")
        featx.extract.sharded.extract_shard = broken
    out = sys.argv[sys.argv.index("--out") + 1]
    for run in ("first", "second"):
        if run == "second" and os.environ["RANK"] == "0":
            st = os.stat(out)
            print("store before second run:", st.st_ino, st.st_mtime_ns, flush=True)
        print(f"--- {{run}} run ---", flush=True)
        try:
            main(sys.argv[1:], standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
    if os.environ["RANK"] == "0":
        st = os.stat(out)
        print("store after second run:", st.st_ino, st.st_mtime_ns, flush=True)
    """
)


def _torchrun(tmp_path: Path, images: Path, out: Path, **env: str) -> tuple[int, str, str]:
    args = ["extract", str(images), "--backbone", TINY, "--workers", "0", "--batch-size", "4", "--out", str(out)]
    args += ["--no-progress", "--max-failures", "1"]
    with torchrun(tmp_path, _LAUNCH.format(tests=str(TESTS)), args, **env) as proc:
        stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(images, tmp_path):
    out = tmp_path / "ddp.h5"
    code, stdout, stderr = _torchrun(tmp_path, images, out)
    assert code == 0, stdout + stderr
    first, second = stdout.split("store before second run:")
    assert "extracted 18 of 19 images, 1 failed" in first and "on 2 × cpu" in first
    assert "cache hit" in second and "extracted" not in second  # every rank sees it; rank 0 reports
    before, after = second.split("store after second run:")
    assert before.split()[:2] == after.split()[:2]  # same file, untouched: nothing joined or extracted again
    assert not shards_path(out).exists()

    single = _extract(images, tmp_path / "single.h5")
    assert_same_store(out, single.path)
    with featx.store.open(out) as store:
        assert store.info()["stats"]["shards"] == 2


@pytest.mark.slow
def test_a_failed_rank_is_named_and_can_be_rerun_alone(images, tmp_path):
    out = tmp_path / "ddp.h5"
    code, stdout, stderr = _torchrun(tmp_path, images, out, FAIL_RANK="1")
    assert code != 0, stdout
    # Rank 0 is not left waiting: it learns which rank failed, and how to redo just that shard.
    assert "extraction failed on rank 1: RuntimeError: disk full on this node" in stderr
    assert "--shard 1/2" in stderr and f"featx join {out}" in stderr
    assert shard_path(out, Shard(0, 2)).is_file() and not out.exists()  # rank 0's shard is kept, nothing joined

    redo = _extract(images, out, shard="1/2")
    assert redo.n_images == 10 and not redo.cached
    join_shards(out)
    assert_same_store(out, _extract(images, tmp_path / "single.h5").path)
