"""Shared by the benchmark scripts: the machine line, sample images, child runs and Markdown tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera"


def cores() -> int:
    """The cores this process may run on (the default thread count of every benchmark)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def child_env(work: Path, threads: int) -> dict[str, str]:
    """The environment of a timed child run: its own featx cache under ``work``, ``threads`` OpenMP threads."""
    return {"FEATX_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": str(threads)}


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, memory, GPU and library versions."""
    import h5py
    import sklearn
    import timm
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu,
        "cores": cores(),
        "memory_gib": round(mem_gib, 1),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "h5py": h5py.__version__,
    }


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    return (
        f"{m['date']} · {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, GPU: {m['gpu']}, {m['os']} · "
        f"Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, timm {m['timm']}, "
        f"scikit-learn {m['scikit-learn']}, h5py {m['h5py']}"
    )


def sample_jpegs(out: Path, n: int, source: Path = HYMENOPTERA) -> Path:
    """``out/<class>/<i>.jpg``: ``n`` real photos, cycling through the JPEGs of ``source``'s class folders.

    Copies, not links, so every file is read from disk like a real dataset's. Made once per ``n``.
    """
    if (out / ".complete").exists() and int((out / ".complete").read_text()) == n:
        return out
    if not source.is_dir():
        sys.exit(f"no sample images: {source} is missing (pass --images DIR, a folder of <class>/*.jpg)")
    photos = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not photos:
        sys.exit(f"no JPEG files under {source}")
    shutil.rmtree(out, ignore_errors=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        target = out / photo.parent.name / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, target)
    (out / ".complete").write_text(str(n))
    return out


def cifar_folder(work: Path) -> Path:
    """CIFAR-10's JPEGs (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), unpacked once into ``work``."""
    import tarfile

    root = work / "cifar10-jpeg"
    if not (root / "train").is_dir():
        with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(work, filter="data")
    return root


def cifar_manifest(work: Path, train_per_class: int, test_per_class: int) -> Path:
    """A CSV manifest of the first ``train_per_class`` / ``test_per_class`` images of each class of CIFAR-10's
    train / test folders, with those splits (val is carved from train by the split plan)."""
    root = cifar_folder(work)
    rows = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            rows += [f"{p},{cls.name},{split}" for p in sorted(cls.glob("*.jpg"))[:per_class]]
    out = work / f"cifar-{train_per_class}-{test_per_class}.csv"
    out.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return out


def random_torchvision_weights(arch: str, path: Path) -> Path:
    """A torchvision ``arch`` with seeded random weights (timing only), saved once as a checkpoint featx loads
    as ``file:ARCH=PATH``."""
    if not path.exists():
        import torch
        import torchvision
        from safetensors.torch import save_file

        torch.manual_seed(0)
        save_file(torchvision.models.get_model(arch).state_dict(), str(path))
    return path


def fresh_store(path: str | Path) -> Path:
    """Remove a store and any interrupted job at ``path``: a finished store of the same job would be a cache
    hit (``overwrite`` only replaces stores of *another* spec), and a timing run must extract."""
    from featx.store import partial_path

    path = Path(path)
    path.unlink(missing_ok=True)
    shutil.rmtree(partial_path(path), ignore_errors=True)
    return path


def run_child(args: list[str], env: dict | None = None, python: str | None = None, timeout: float = 3600) -> dict:
    """Run ``python <args>`` in a fresh process (so allocator and thread settings cannot leak between
    runs) and parse the JSON object it prints last."""
    cmd = [python or sys.executable, *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
