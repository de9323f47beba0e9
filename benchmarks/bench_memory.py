"""Peak memory of an extraction against the number of images: it should not grow with N.

Usage::

    python benchmarks/bench_memory.py [--sizes 1000 50000] [--backbone featx:efficientnet_lite0] [--quick]

Reads CIFAR-10's JPEGs (``../shared/data/cifar10-jpeg.tar.gz``, unpacked once into the work folder, or
``--images DIR``), writes a CSV manifest of the first N training images (classes interleaved) and runs
``featx extract`` on it in a fresh process per size. Reports the peak resident memory of the main process
and of its largest DataLoader worker. ``--quick`` uses 1,000 and 10,000 images and a small random-weight
MobileNetV3 (the engine around the model is what is measured; the model's own memory does not depend on N).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    SHARED_DATA,
    child_env,
    cores,
    fresh_store,
    machine_line,
    peak_rss_gib,
    random_torchvision_weights,
    run_child,
    table,
)


def cifar_train(work: Path, images: str | None) -> Path:
    if images:
        return Path(images)
    # The archive holds one top folder, cifar10-jpeg/: unpacked into `work`, it lands at work/cifar10-jpeg.
    for candidate in (work / "cifar10-jpeg", Path(tempfile.gettempdir()) / "cifar10-jpeg"):
        if (candidate / "train").is_dir():
            return candidate
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        sys.exit(f"no CIFAR-10 JPEGs: {archive} is missing (pass --images DIR with train/<class>/*.jpg)")
    print(f"unpacking {archive} …", file=sys.stderr, flush=True)
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    if not (work / "cifar10-jpeg" / "train").is_dir():
        sys.exit(f"{archive} did not unpack to {work / 'cifar10-jpeg'}/train (pass --images DIR instead)")
    return work / "cifar10-jpeg"


def image_list(root: Path, n: int, work: Path) -> Path:
    classes = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    per_class = [sorted(c.glob("*.jpg")) for c in classes]
    interleaved = [files[i] for i in range(max(map(len, per_class))) for files in per_class if i < len(files)]
    if n > len(interleaved):
        sys.exit(f"only {len(interleaved)} training images under {root}, asked for {n}")
    # A labelled CSV manifest (featx carves a seeded test split), so bench_classical.py can use the store too.
    out = work / f"cifar-first-{n}.csv"
    out.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in interleaved[:n]))
    return out


def child(args) -> dict:
    import torch

    from featx.extract import extract
    from featx.spec import ExtractionOptions

    torch.set_num_threads(args.threads)
    fresh_store(args.out)
    t0 = time.perf_counter()
    options = ExtractionOptions(compile_mode="off")
    result = extract(args.list, args.backbone, options=options, out=args.out, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    return {
        "images": result.n_done,
        "seconds": seconds,
        "main_gib": peak_rss_gib(),
        "worker_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 50_000])
    parser.add_argument("--backbone", default="featx:efficientnet_lite0")
    parser.add_argument("--images", help="a folder with train/<class>/*.jpg [default: CIFAR-10]")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 images, small random MobileNetV3")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "featx-bench"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes, backbone = args.sizes, args.backbone
    if args.quick:
        sizes = [1000, 10_000]
        weights = random_torchvision_weights("mobilenet_v3_small", work / "mobilenet_v3_small-random.safetensors")
        backbone = f"file:mobilenet_v3_small={weights}"
    root = cifar_train(work, args.images)
    env = child_env(work, args.threads)
    rows = []
    for n in sizes:
        listing = image_list(root, n, work)
        r = run_child(
            [
                str(Path(__file__).resolve()),
                "--child",
                "--list",
                str(listing),
                "--backbone",
                backbone,
                "--threads",
                str(args.threads),
                "--out",
                str(work / f"memory-{n}.h5"),
            ],
            env,
        )
        rows.append(
            [
                f"{r['images']:,}",
                f"{r['seconds']:.0f}",
                f"{r['images'] / r['seconds']:.1f}",
                f"{r['main_gib']:.2f}",
                f"{r['worker_gib']:.2f}",
            ]
        )
        print(f"  {n}: {r}", file=sys.stderr, flush=True)
    print(f"machine: {machine_line()}\n")
    print(f"### peak memory of `featx extract` on CIFAR-10 JPEGs, {backbone.split('=')[0]}, batch 64\n")
    print(table(["images", "seconds", "images/s", "main process peak RSS GiB", "largest worker peak RSS GiB"], rows))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
