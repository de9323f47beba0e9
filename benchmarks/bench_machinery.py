"""Machinery overhead: ``featx.extract`` against a minimal DataLoader loop, a near-null network on tiny JPEGs.

Usage::

    python benchmarks/bench_machinery.py                 # 10,000 32-px JPEGs, exact and device decoding
    python benchmarks/bench_machinery.py --quick         # 2,000
    python benchmarks/bench_machinery.py --device cuda   # the same on a GPU

The network is timm's ``test_efficientnet`` (0.36 M parameters) at 32 px, so nearly all the time goes to the
machinery around it: decoding, batching, the device copy, the store. Both sides decode with the same functions
(featx's exact path, or ``--decode device``'s batched ``decode_jpeg`` + resize), run in a fresh process and use
as many DataLoader workers as featx would. Both are timed from the DataLoader to the last batch (featx's own
in-loop rate, in its store's stats); what featx adds per image (failure handling, the writer thread, the
crash-safe parts) shows as microseconds per image, and its fixed cost (network built, manifest scanned and
fingerprinted, the final HDF5 file) apart. A change that would starve a GPU shows here on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, child_env, fresh_store, machine, machine_line, run_child, table

NULL = "featx:bench_null"
RUNS = {  # label -> (child, decode mode)
    "minimal loop, exact decode (PIL)": ("loop", "exact"),
    "featx extract, exact decode": ("featx", "exact"),
    "minimal loop, device decode (decode_jpeg in batches)": ("loop", "device"),
    "featx extract --decode device": ("featx", "device"),
}


def _register_null() -> None:
    from featx.backbones import register_backbone
    from featx.spec import Preprocessing

    def factory():
        import timm
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
        pre = Preprocessing((32, 32), 32, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        return model, pre, "random-seed0"

    register_backbone("bench_null", factory, "benchmarks only: timm's test_efficientnet at 32 px")


def tiny_jpegs(out: Path, n: int) -> Path:
    """``out/<class>/<i>.jpg``: ``n`` CIFAR-sized (32 px) photo-like JPEGs, made once per ``n``."""
    import numpy as np
    from PIL import Image

    if (out / ".complete").exists() and int((out / ".complete").read_text()) == n:
        return out
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    for i in range(n):
        base = rng.uniform(0, 255, size=3)
        arr = base + 3 * np.stack([xx, yy, xx - yy], axis=-1) + rng.normal(scale=12, size=(32, 32, 3))
        target = out / f"c{i % 10}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(target, quality=90)
    (out / ".complete").write_text(str(n))
    return out


# ------------------------------------------------------------------------------------------ children
def child_featx(args) -> dict:
    import torch

    import featx.store
    from featx.extract import extract
    from featx.spec import ExtractionOptions

    torch.set_num_threads(args.threads)
    _register_null()
    out = fresh_store(args.out)
    t0 = time.perf_counter()
    result = extract(
        args.images,
        NULL,
        options=ExtractionOptions(batch_size=args.batch_size, decode=args.decode, workers=args.workers),
        out=out,
        device=args.device,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    with featx.store.open(out) as store:
        stats = store.info()["stats"]
    return {
        "images": result.n_done,
        "seconds": seconds,
        "end_to_end_ips": result.n_done / seconds,
        "ips": stats["images_per_second"],  # the batch loop alone, as the minimal loop is timed
        "fixed_s": seconds - stats["seconds"],  # network built, manifest scanned, key, the final HDF5 file
    }


def child_loop(args) -> dict:
    """The least a script can do: a DataLoader, the network, the features kept in a list and saved once."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from featx._runtime.env import default_workers
    from featx.backbones import load_backbone
    from featx.data.imageio import load_rgb, preprocess_uint8
    from featx.extract.device_decode import resize_crop

    torch.set_num_threads(args.threads)
    _register_null()
    device = torch.device(args.device)
    net = load_backbone(NULL)
    pre = net.preprocessing
    model = net.feature_model(["penultimate"], "avg").eval().to(device)
    paths = sorted(str(p) for p in Path(args.images).rglob("*.jpg"))
    t0 = time.perf_counter()  # from the DataLoader on, as featx's in-loop rate
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    if args.decode == "device":
        from torchvision.io import ImageReadMode, decode_jpeg

        def read(p):
            return torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8)

        collate = list
    else:

        def read(p):
            return preprocess_uint8(load_rgb(p), pre)

        collate = torch.stack
    workers = default_workers() if args.workers is None else args.workers
    loader = DataLoader(
        [p for p in paths],
        batch_size=args.batch_size,
        num_workers=workers,
        collate_fn=lambda b: collate([read(p) for p in b]),
    )
    features = []
    with torch.inference_mode():
        for batch in loader:
            if args.decode == "device":
                batch = resize_crop(torch.stack(decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)), pre)
            x = batch.to(device, non_blocking=True).float().sub_(mean).div_(std)
            features.append(model(x)["penultimate"].float().cpu().numpy())
    np.save(args.out, np.concatenate(features))
    seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds, "ips": len(paths) / seconds}


# -------------------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="images [10,000; 2,000 with --quick]")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    # One thread: the main process then leaves the cores to the decoding workers, and OpenMP's spinning threads
    # cannot slow the network twentyfold on a CPU shared with other jobs (measured on 2 busy cores).
    parser.add_argument("--threads", type=int, default=1, help="the network's threads [1]")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes, both sides [featx's default]")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "featx-bench"))
    parser.add_argument("--child", choices=["featx", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--decode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"featx": child_featx, "loop": child_loop}[args.child](args)))
        return
    n = args.n or (2000 if args.quick else 10_000)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = tiny_jpegs(work / f"tiny-jpegs-{n}", n)
    env = child_env(work, args.threads)
    common = ["--images", str(images), "--device", args.device, "--batch-size", str(args.batch_size)]
    common += ["--threads", str(args.threads)] + (["--workers", str(args.workers)] if args.workers is not None else [])
    me = str(Path(__file__).resolve())
    results = {}
    for label, (child, decode) in RUNS.items():
        out = str(work / f"machinery-{child}-{decode}.{'h5' if child == 'featx' else 'npy'}")
        results[label] = run_child([me, "--child", child, "--decode", decode, "--out", out, *common], env)
        print(f"  {label}: {results[label]['ips']:.0f} img/s", file=sys.stderr, flush=True)
    rows = []
    for label, r in results.items():
        child, decode = RUNS[label]
        loop = next(v for k, v in results.items() if RUNS[k] == ("loop", decode))
        overhead = 1e6 * (1 / r["ips"] - 1 / loop["ips"]) if child == "featx" else None
        note = f"end to end {r['end_to_end_ips']:.0f} img/s, {r['fixed_s']:.1f} s fixed" if child == "featx" else ""
        over = f"{overhead:+.0f}" if overhead is not None else ""
        rows.append([label, f"{r['ips']:.0f}", f"{1e6 / r['ips']:.0f}", over, note])
        r.update(label=label, decode=decode, overhead_us=overhead)
    this_machine = machine()
    print(f"machine: {machine_line(this_machine)}\n")
    where = this_machine["gpu"] if args.device == "cuda" else f"{args.threads} threads"
    print(f"### machinery: {n} 32-px JPEGs, test_efficientnet, batch {args.batch_size}, {args.device} ({where})\n")
    header = ["run", "images/s", "µs per image", "featx overhead, µs per image", "notes"]
    print(table(header, rows) + "\n", flush=True)
    (work / f"bench_machinery-{args.device}.json").write_text(json.dumps(list(results.values())))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
