"""Extraction throughput: featx end to end against the model alone, the textbook loop and thingsvision.

Usage::

    python benchmarks/bench_extract.py                 # 1,360 photos, Lite0 and ResNet-50, every mode
    python benchmarks/bench_extract.py --quick         # fewer images, no compile for ResNet-50 (minutes)
    python benchmarks/bench_extract.py --thingsvision-python /tmp/tv-venv/bin/python

Every run is a fresh process with the same thread count, batch size and precision (float32):

* **model alone**: the feature network on pre-decoded, normalised tensors already in memory (the
  ceiling), in each mode: eager NCHW and ``channels_last`` with glibc's default allocator, then featx's
  modes (``channels_last`` with freed memory kept in the heap, and that plus ``torch.compile``);
* **featx**: ``featx.extract`` from JPEG files to a finished HDF5 store, model loading included;
* **textbook**: ``ImageFolder`` + ``DataLoader`` + an eager float32 loop + ``np.save`` at the end;
* **thingsvision**: its ``get_extractor`` / ``ImageDataset`` / ``extract_features`` / ``save_features``
  (in its own virtual environment, since it pins an older torch: see benchmarks/README.md).

The same weights go into featx, the model-alone runs and the textbook loop, and featx's features are
compared with the textbook's eager float32 ones. Prints Markdown tables for ``benchmarks/RESULTS.md``.
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
from _common import (
    REPO,
    fresh_store,
    machine_line,
    peak_rss_gib,
    random_torchvision_weights,
    run_child,
    sample_jpegs,
    table,
)

BACKBONES = {
    # name: (featx backbone, thingsvision (model, source, module))
    "lite0": ("featx:efficientnet_lite0", ("tf_efficientnet_lite0", "timm", "global_pool")),
    "resnet50": ("file:resnet50={weights}", ("resnet50", "torchvision", "avgpool")),
}
MODEL_MODES = {
    # mode: (channels_last, keep freed memory in the heap, torch.compile)
    "eager NCHW, glibc default": (False, False, False),
    "channels_last, glibc default": (True, False, False),
    "channels_last + heap reuse (featx default)": (True, True, False),
    "torch.compile + channels_last + heap reuse (featx --compile on)": (True, True, True),
}


# ------------------------------------------------------------------------------------------ children
def _load(backbone: str):
    from featx.backbones import load_backbone

    return load_backbone(backbone)


def child_model(args) -> dict:
    """Forward passes only, over tensors decoded and normalised before the clock starts."""
    import torch

    from featx._imageio import load_rgb, preprocess_uint8
    from featx._malloc import reuse_freed_memory

    torch.set_num_threads(args.threads)
    channels_last, heap_reuse, compiled = MODEL_MODES[args.mode]
    net = _load(args.backbone)
    model = net.feature_model(["penultimate"], "avg").eval()
    pre = net.preprocessing
    paths = sorted(str(p) for p in Path(args.images).rglob("*.jpg"))[: 2 * args.batch_size]
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0
    batches = []
    for i in range(0, len(paths), args.batch_size):
        x = torch.stack([preprocess_uint8(load_rgb(p), pre) for p in paths[i : i + args.batch_size]])
        x = x.float().sub_(mean).div_(std)
        batches.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    batches = [b for b in batches if len(b) == args.batch_size]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_batches = max(1, args.n // args.batch_size)
    with reuse_freed_memory(heap_reuse), torch.inference_mode():
        compile_s = 0.0
        if compiled:
            _ = model.channels_last
            t0 = time.perf_counter()
            model = torch.compile(model, dynamic=False)
            model(batches[0])
            compile_s = time.perf_counter() - t0
        model(batches[0])  # warm-up
        t0 = time.perf_counter()
        for i in range(n_batches):
            model(batches[i % len(batches)])
        seconds = time.perf_counter() - t0
    n = n_batches * args.batch_size
    return {"images": n, "seconds": seconds, "ips": n / seconds, "compile_s": compile_s, "rss_gib": peak_rss_gib()}


def child_featx(args) -> dict:
    import torch

    import featx.store
    from featx.extract import extract

    torch.set_num_threads(args.threads)
    out = fresh_store(args.out)
    t0 = time.perf_counter()
    result = extract(
        args.images,
        args.backbone,
        out=out,
        batch_size=args.batch_size,
        workers=args.workers,
        compile_mode=args.compile,
        overwrite=True,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    with featx.store.open(out) as store:
        stats = store.info()["stats"]
    return {
        "images": result.n_done,
        "seconds": seconds,
        "ips": result.n_done / seconds,
        "loop_ips": stats["images_per_second"],
        "compiled": stats["compiled"],
        "rss_gib": peak_rss_gib(),
        "store": str(out),
    }


def child_textbook(args) -> dict:
    """How most people write it: torchvision transforms on PIL images, float32, save once at the end."""
    import numpy as np
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    net = _load(args.backbone)
    model = net.model
    parent, _, leaf = net.classifier_name().rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    pre = net.preprocessing
    transform = transforms.Compose(
        [
            transforms.Resize(pre.resize_size, interpolation=transforms.InterpolationMode(pre.interpolation)),
            transforms.CenterCrop(pre.input_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    dataset = datasets.ImageFolder(args.images, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.threads if args.workers is None else args.workers
    )
    features = []
    with torch.no_grad():
        for x, _ in loader:
            features.append(model(x).numpy())
    np.save(args.out, np.concatenate(features))
    seconds = time.perf_counter() - t0
    Path(args.out + ".paths.json").write_text(json.dumps([p for p, _ in dataset.samples]))
    return {"images": len(dataset), "seconds": seconds, "ips": len(dataset) / seconds, "rss_gib": peak_rss_gib()}


# -------------------------------------------------------------------------------------------- driver
def max_abs_diff(store: str, textbook_npy: str) -> float:
    import numpy as np

    import featx.store

    reference = np.load(textbook_npy)
    paths = json.loads(Path(textbook_npy + ".paths.json").read_text())
    row_of = {str(Path(p).resolve()): i for i, p in enumerate(paths)}
    with featx.store.open(store) as s:
        ours = s.features()
        order = [row_of[str(Path(p).resolve())] for p in s.paths()]
    if len(order) != len(reference):
        raise RuntimeError(f"featx stored {len(order)} images, the textbook loop {len(reference)}")
    return float(np.abs(ours - reference[order]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="a folder of <class>/*.jpg [default: hymenoptera's photos, cycled to --n]")
    parser.add_argument("--n", type=int, default=1360, help="images per run (Oxford Flowers-17 has 1,360)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workers", type=int, default=None, help="featx's and the textbook's decoding processes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--thingsvision-python", default=os.environ.get("FEATX_THINGSVISION_PYTHON"))
    parser.add_argument("--quick", action="store_true", help="512 images (ResNet-50: 192, no compile)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "featx-bench"))
    parser.add_argument("--child", choices=["model", "featx", "textbook"], help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--compile", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"model": child_model, "featx": child_featx, "textbook": child_textbook}[args.child](args)))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {"FEATX_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": str(args.threads)}
    print(f"machine: {machine_line()}\n")
    summary = []
    for name in args.backbones:
        n = args.n if not args.quick else (512 if name == "lite0" else 192)
        compile_too = not args.no_compile and not (args.quick and name == "resnet50")
        images = Path(args.images) if args.images else sample_jpegs(work / f"jpegs-{n}", n)
        featx_name = BACKBONES[name][0].format(
            weights=random_torchvision_weights("resnet50", work / "resnet50-random.safetensors")
        )
        common = [
            "--backbone",
            featx_name,
            "--images",
            str(images),
            "--n",
            str(n),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        if args.workers is not None:
            common += ["--workers", str(args.workers)]
        me = str(Path(__file__).resolve())
        rows, result = [], {}
        for mode, (_, _, compiled) in MODEL_MODES.items():
            if compiled and not compile_too:
                continue
            r = run_child([me, "--child", "model", "--mode", mode, *common], env)
            result[mode] = r
            note = f"compile {r['compile_s']:.0f} s (not counted)" if compiled else ""
            rows.append([f"model alone: {mode}", f"{r['ips']:.1f}", "", f"{r['rss_gib']:.2f}", note])
            print(f"  {name} {mode}: {r['ips']:.1f} img/s", file=sys.stderr, flush=True)
        textbook = run_child([me, "--child", "textbook", "--out", str(work / f"{name}-textbook.npy"), *common], env)
        tv = None
        if args.thingsvision_python:
            model, source, module = BACKBONES[name][1]
            tv = run_child(
                [
                    str(Path(__file__).resolve().parent / "_thingsvision_child.py"),
                    str(images),
                    model,
                    source,
                    module,
                    str(args.batch_size),
                    str(args.threads),
                    str(work / f"{name}-tv"),
                ],
                env,
                python=args.thingsvision_python,
            )
        runs = {"off": "featx extract (default)"}
        if compile_too:
            runs["on"] = "featx extract --compile on"
        for flag, label in runs.items():
            r = run_child(
                [me, "--child", "featx", "--compile", flag, "--out", str(work / f"{name}-{flag}.h5"), *common], env
            )
            ceiling = result[
                "torch.compile + channels_last + heap reuse (featx --compile on)"
                if flag == "on"
                else "channels_last + heap reuse (featx default)"
            ]
            diff = max_abs_diff(r["store"], str(work / f"{name}-textbook.npy"))
            rows.append(
                [
                    f"**{label}**, JPEG → store",
                    f"**{r['ips']:.1f}**",
                    f"{r['ips'] / ceiling['ips']:.2f}",
                    f"{r['rss_gib']:.2f}",
                    f"{r['ips'] / textbook['ips']:.1f}× textbook"
                    + (f", {r['ips'] / tv['ips']:.1f}× thingsvision" if tv else "")
                    + f"; in-loop {r['loop_ips']:.1f} img/s; max abs diff vs eager fp32 {diff:.1e}",
                ]
            )
            summary.append(
                {
                    "backbone": name,
                    "run": label,
                    "ips": r["ips"],
                    "vs_model": r["ips"] / ceiling["ips"],
                    "vs_textbook": r["ips"] / textbook["ips"],
                    "vs_thingsvision": r["ips"] / tv["ips"] if tv else None,
                    "max_abs_diff": diff,
                }
            )
        rows.append(
            [
                "textbook: ImageFolder + DataLoader + eager fp32 + np.save",
                f"{textbook['ips']:.1f}",
                "",
                f"{textbook['rss_gib']:.2f}",
                "",
            ]
        )
        if tv:
            rows.append(
                [
                    f"thingsvision {tv['version']} (torch {tv['torch']}, own venv)",
                    f"{tv['ips']:.1f}",
                    "",
                    f"{tv['rss_gib']:.2f}",
                    "",
                ]
            )
        print(f"### {name}: {n} JPEGs, batch {args.batch_size}, {args.threads} threads, float32\n")
        print(table(["run", "images/s", "÷ model alone", "peak RSS GiB", "notes"], rows) + "\n", flush=True)
    (work / "bench_extract.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
