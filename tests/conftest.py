"""Shared fixtures: every cache in tmp_path, a tiny deterministic backbone, generated image folders."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featx.backbones import register_backbone
from featx.backbones.names import BUILTINS
from featx.data import Manifest
from featx.spec import ExtractionSpec, Preprocessing, cache_key
from featx.store import StoreWriter

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = "featx:tiny_test"


def tiny_factory():
    """timm's 0.36M-parameter test EfficientNet with fixed random weights, at 64 px for speed."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    pre = Preprocessing(
        input_size=(64, 64),
        resize_size=72,
        interpolation="bilinear",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    return model, pre, "random-seed0"


def register_tiny() -> None:
    if "tiny_test" not in BUILTINS:
        register_backbone("tiny_test", tiny_factory, "tests only: tiny random EfficientNet")


register_tiny()


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    """Point featx, torch hub and Hugging Face caches into a temporary folder; no test touches ~/.cache."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("FEATX_CACHE_DIR", str(root / "featx"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import; patch its constants too so each test has its own cache.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return root


@pytest.fixture
def no_store_reuse(monkeypatch):
    """Extract even when a store with the same key exists elsewhere (featx links it by default): for tests that
    compare two extractions of the same features made two ways (compiled and eager, resumed and whole)."""
    monkeypatch.setattr("featx.extract.api.find_store", lambda key, besides=None: None)


def make_image(path: Path, seed: int, size=(48, 40), mode="RGB", fmt=None) -> Path:
    """Write a random image (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """``root/<class>/*.png``: 3 classes × 6 images, no splits (featx carves the test split)."""
    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog", "emu")):
        for i in range(6):
            make_image(root / name / f"{i:02d}.png", seed=100 * c + i)
    return root


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """``root/{train,val}/<class>/*.jpg``: 2 classes, 5 train and 2 val images each."""
    root = tmp_path / "splits"
    for c, name in enumerate(("ants", "bees")):
        for i in range(5):
            make_image(root / "train" / name / f"{i}.jpg", seed=10 * c + i)
        for i in range(2):
            make_image(root / "val" / name / f"v{i}.jpg", seed=1000 + 10 * c + i)
    return root


def tiny_spec(**changes) -> ExtractionSpec:
    """The extraction spec of the tests' hand-written stores: ``featx:tiny_test``, its penultimate layer, 64 px."""
    base = ExtractionSpec(
        backbone=TINY,
        weights="random-seed0",
        weights_sha256="0" * 64,
        layers=("penultimate",),
        preprocessing=Preprocessing((64, 64), 72, "bilinear", (0.5,) * 3, (0.5,) * 3),
    )
    return dataclasses.replace(base, **changes)


def store_writer(path: Path, manifest, dims: int = 4, **spec_changes) -> StoreWriter:
    """An open :class:`StoreWriter` for ``manifest`` under :func:`tiny_spec` (``spec_changes`` applied), keyed as
    ``extract`` would key it; the caller writes the rows it wants (``with store_writer(...) as w:``)."""
    spec = tiny_spec(**spec_changes)
    fingerprint = manifest.fingerprint()
    return StoreWriter(path, spec, cache_key(spec, fingerprint), manifest, fingerprint, {"penultimate": dims})


def synthetic_store(
    path: Path,
    n_classes: int = 3,
    per_class: int = 40,
    dims: int = 16,
    seed: int = 0,
    splits: tuple[float, float] = (0.6, 0.0),
    pool: str = "avg",
    spread: float = 1.0,
) -> Path:
    """A complete store of Gaussian blobs (no images needed): ``splits`` = (train share, val share), rest test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(n_classes, dims))
    n = n_classes * per_class
    labels = np.repeat(np.arange(n_classes), per_class)
    X = (centres[labels] + rng.normal(scale=spread, size=(n, dims))).astype(np.float32)
    share = np.tile(np.arange(per_class) / per_class, n_classes)
    split_names = np.where(share < splits[0], "train", np.where(share < splits[0] + splits[1], "val", "test"))
    ids = [f"img{i:05d}.png" for i in range(n)]
    manifest = Manifest(
        ids,
        [f"/nonexistent/{i}" for i in ids],
        labels,
        list(split_names),
        [f"class{c}" for c in range(n_classes)],
        "synthetic",
        "from source",
    )
    with store_writer(path, manifest, dims, pool=pool) as w:
        for start in range(0, n, 50):
            rows = np.arange(start, min(n, start + 50))
            w.write_batch(rows, {"penultimate": X[rows]})
        w.finalize({})
    return path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a str or a Path; JSON's string escapes are valid TOML basic-string escapes


def pipeline_toml(
    path: Path,
    *,
    datasets: Sequence[dict],
    backbones: Sequence[dict] = (),
    classifiers: Sequence[dict] = (),
    finetune: Sequence[dict] = (),
    **job,
) -> Path:
    """Write a pipeline file at ``path`` and return it: ``[job]`` with ``job``'s keys (``name``, ``out``, …), then
    one table per row, its keys in the order given. ``[job]`` comes first, so its n-th key is on line n + 1."""
    tables = {
        "job": [job] if job else [],
        "datasets": datasets,
        "backbones": backbones,
        "classifiers": classifiers,
        "finetune": finetune,
    }
    lines = []
    for table, rows in tables.items():
        header = "[job]" if table == "job" else f"[[{table}]]"
        for row in rows:
            lines += [header, *(f"{key} = {_toml_value(value)}" for key, value in row.items()), ""]
    path.write_text("\n".join(lines))
    return path


TINY_ROW = {"name": "tiny", "backbone": TINY}  # the [[backbones]] row of most test pipelines


@pytest.fixture(scope="session")
def hymenoptera_store(tmp_path_factory) -> Path:
    """The PyTorch tutorial's ants-vs-bees with the built-in EfficientNet-Lite0 (extracted once per session)."""
    if not (SHARED_DATA / "hymenoptera").is_dir():
        pytest.skip("../shared/data/hymenoptera not present")
    from featx.extract import extract

    out = tmp_path_factory.mktemp("hymenoptera") / "lite0.h5"
    result = extract(SHARED_DATA / "hymenoptera", out=out, progress=False, max_failures="inf")
    return result.path


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    """3 classes × 10 images whose dominant colour is the class, so even a tiny network can learn them."""
    root = tmp_path / "colours"
    for c, name in enumerate(("red", "green", "blue")):
        for i in range(10):
            rng = np.random.default_rng(100 * c + i)
            arr = rng.integers(0, 80, size=(40, 48, 3), dtype=np.uint8)
            arr[..., c] += 170
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return root


_SLOW_FINETUNE = """
import sys, time
sys.path.insert(0, {tests!r})
import conftest  # registers featx:tiny_test
import torch
original = torch.optim.SGD.step
def slow_step(self, *a, **k):
    time.sleep({step_seconds!r})
    return original(self, *a, **k)
torch.optim.SGD.step = slow_step
from featx.cli import main
main(sys.argv[1:])
"""


def start_slow_finetune(tmp_path: Path, args: list[str], out: Path, step_seconds: float) -> subprocess.Popen:
    """``featx`` ``args --out out`` in a child process whose every SGD step sleeps ``step_seconds``, so a test can
    kill it at a chosen moment."""
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_FINETUNE.format(tests=str(Path(__file__).parent), step_seconds=step_seconds))
    return subprocess.Popen(
        [sys.executable, str(script), *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, epochs: int, timeout: float) -> None:
    """Block until ``out/checkpoint.pt`` holds ``epochs`` finished epochs (then the run is mid-training)."""
    ckpt = out / "checkpoint.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ckpt.exists():
            try:
                if len(torch.load(ckpt, weights_only=True)["curves"]) >= epochs:
                    return
            except Exception:  # caught mid-rename or mid-write: look again
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail(f"no checkpoint with {epochs} epochs in {out} after {timeout:.0f} s")


# A torchrun child script starts with this: torchrun puts each rank in a session of its own, so killing
# torchrun's process group would leave the ranks running; each rank writes its pid for the cleanup.
_RANK_PID_PREAMBLE = """\
import os as _os
if _os.environ.get("FEATX_TEST_PID_DIR"):
    with open(_os.path.join(_os.environ["FEATX_TEST_PID_DIR"], f"rank{_os.environ['RANK']}.pid"), "w") as _fh:
        _fh.write(str(_os.getpid()))
"""


def rank_pids(tmp_path: Path) -> list[int]:
    """The pids of the ranks of the last :func:`torchrun` started in ``tmp_path``."""
    return [int(f.read_text()) for f in sorted((tmp_path / "rank-pids").glob("rank*.pid"))]


@contextlib.contextmanager
def torchrun(tmp_path: Path, script: str, args: list[str], **env: str) -> Iterator[subprocess.Popen]:
    """``script`` (Python source) with ``args`` on 2 ranks under torchrun (gloo, one thread each), text pipes.

    Whatever happens in the block, torchrun and its ranks are not left running after it.
    """
    path = tmp_path / "torchrun_child.py"
    path.write_text(_RANK_PID_PREAMBLE + script)
    pid_dir = tmp_path / "rank-pids"
    pid_dir.mkdir(exist_ok=True)
    for old in pid_dir.glob("*.pid"):
        old.unlink()
    child_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    child_env.update(OMP_NUM_THREADS="1", FEATX_TEST_PID_DIR=str(pid_dir), **env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        [*command, *args], stdout=pipe, stderr=pipe, text=True, env=child_env, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:  # a failed or timed-out test: stop torchrun and every rank it started
            for pid in rank_pids(tmp_path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
