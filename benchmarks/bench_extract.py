"""Extraction throughput: featx end to end against the model alone, the textbook loop and thingsvision.

Usage::

    python benchmarks/bench_extract.py                 # 1,360 photos, Lite0 and ResNet-50, every mode
    python benchmarks/bench_extract.py --quick         # fewer images, no compile for ResNet-50 (minutes)
    python benchmarks/bench_extract.py --thingsvision-python /tmp/tv-venv/bin/python
    python benchmarks/bench_extract.py --device cuda   # the default where there is a GPU: 5,000 photos, batch 256

Every run is a fresh process with the same thread count, batch size and device:

* **model alone**: the feature network on pre-decoded, normalised tensors already on the device (the
  ceiling), in each mode. On the CPU: eager NCHW and ``channels_last`` with glibc's default allocator,
  then with freed memory kept in the heap, then featx's modes (that plus batch norms folded into the
  convolutions, and that plus ``torch.compile``). On a GPU: float32 NCHW, featx's float32 mode
  (``channels_last``, folded batch norms, no TF32), its default AMP mode, and that plus ``torch.compile``;
* **featx**: ``featx.extract`` from JPEG files to a finished HDF5 store, model loading included;
* **textbook**: ``ImageFolder`` + ``DataLoader`` + an eager float32 loop + ``np.save`` at the end;
* **thingsvision** (CPU only): its ``get_extractor`` / ``ImageDataset`` / ``extract_features`` /
  ``save_features``, in its own virtual environment, since it pins an older torch (benchmarks/README.md).

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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    child_env,
    cores,
    fresh_store,
    machine,
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


@dataclass(frozen=True)
class Mode:
    """How the model-alone run executes the network."""

    channels_last: bool = True
    heap_reuse: bool = False  # keep freed memory in glibc's heap (featx on the CPU)
    fold: bool = False  # batch norms folded into the convolutions (featx)
    compile: bool = False
    amp: str = "none"  # "auto": featx's rule (bf16 where the GPU has it, else fp16)


MODEL_MODES = {
    "cpu": {
        "eager NCHW, glibc default": Mode(channels_last=False),
        "channels_last, glibc default": Mode(),
        "channels_last + heap reuse": Mode(heap_reuse=True),
        "channels_last + heap reuse + folded BN (featx default)": Mode(heap_reuse=True, fold=True),
        "torch.compile + the above (featx --compile on)": Mode(heap_reuse=True, fold=True, compile=True),
    },
    "cuda": {
        "fp32 NCHW": Mode(channels_last=False),
        "fp32 channels_last + folded BN (featx --amp none)": Mode(fold=True),
        "AMP + channels_last + folded BN (featx default)": Mode(fold=True, amp="auto"),
        "torch.compile + the above (featx --compile on)": Mode(fold=True, amp="auto", compile=True),
    },
}
# featx's end-to-end runs: label -> (ExtractionOptions fields, the model-alone mode that is its ceiling)
FEATX_RUNS = {
    "cpu": {
        "featx extract (default)": ({}, "channels_last + heap reuse + folded BN (featx default)"),
        "featx extract --compile on": ({"compile_mode": "on"}, "torch.compile + the above (featx --compile on)"),
        # Not exact (other pixels, another store): how much of the decoding cost it takes off.
        "featx extract --decode fast": ({"decode": "fast"}, "channels_last + heap reuse + folded BN (featx default)"),
        # JPEGs decoded in the main process, in batches (the GPU's way, here on the CPU: its cost, not a win).
        "featx extract --decode device": (
            {"decode": "device"},
            "channels_last + heap reuse + folded BN (featx default)",
        ),
    },
    "cuda": {
        "featx extract (default: AMP)": ({}, "AMP + channels_last + folded BN (featx default)"),
        "featx extract --amp none": ({"amp": "none"}, "fp32 channels_last + folded BN (featx --amp none)"),
        "featx extract --compile on": ({"compile_mode": "on"}, "torch.compile + the above (featx --compile on)"),
        # JPEGs decoded by nvJPEG, resized and cropped on the GPU: the workers only read files.
        "featx extract --decode device (AMP)": (
            {"decode": "device"},
            "AMP + channels_last + folded BN (featx default)",
        ),
        "featx extract --decode device --compile on": (
            {"decode": "device", "compile_mode": "on"},
            "torch.compile + the above (featx --compile on)",
        ),
    },
}


# ------------------------------------------------------------------------------------------ children
def child_model(args) -> dict:
    """Forward passes only, over tensors decoded, normalised and put on the device before the clock starts."""
    import torch

    from featx._runtime.device import autocast_dtype, resolve_amp
    from featx._runtime.malloc import reuse_freed_memory
    from featx.backbones import load_backbone
    from featx.data.imageio import load_rgb, preprocess_uint8

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode = MODEL_MODES[device.type][args.mode]
    amp = resolve_amp(mode.amp, device)
    dtype = autocast_dtype(amp)
    if device.type == "cuda" and dtype is None:  # as featx --amp none: float32 without TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net = load_backbone(args.backbone)
    model = net.feature_model(["penultimate"], "avg").eval()
    if mode.fold:
        model = model.with_batchnorm_folded()
    model = model.to(device)
    pre = net.preprocessing
    paths = sorted(str(p) for p in Path(args.images).rglob("*.jpg"))[: 2 * args.batch_size]
    if len(paths) < args.batch_size:
        sys.exit(f"{args.images} has {len(paths)} JPEGs, fewer than one batch of {args.batch_size}: pass --batch-size")
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0
    batches = []
    for i in range(0, len(paths), args.batch_size):
        x = torch.stack([preprocess_uint8(load_rgb(p), pre) for p in paths[i : i + args.batch_size]])
        x = x.float().sub_(mean).div_(std).to(device)
        batches.append(x.contiguous(memory_format=torch.channels_last) if mode.channels_last else x)
    batches = [b for b in batches if len(b) == args.batch_size]
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A GPU gets through a batch in milliseconds: time at least 20 of them.
    n_batches = max(1, args.n // args.batch_size, 20 if device.type == "cuda" else 1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with (
        reuse_freed_memory(mode.heap_reuse),
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        compile_s = 0.0
        if mode.compile:  # every compiled mode folds, and folding has already probed the output layout
            t0 = time.perf_counter()
            model = torch.compile(model, dynamic=False)
            model(batches[0])
            sync()
            compile_s = time.perf_counter() - t0
        for _ in range(3 if device.type == "cuda" else 1):  # warm-up (cuDNN picks its kernels)
            model(batches[0])
        sync()
        t0 = time.perf_counter()
        for i in range(n_batches):
            model(batches[i % len(batches)])
        sync()
        seconds = time.perf_counter() - t0
    n = n_batches * args.batch_size
    return {
        "images": n,
        "seconds": seconds,
        "ips": n / seconds,
        "compile_s": compile_s,
        "rss_gib": peak_rss_gib(),
        "amp": amp,
    }


def child_featx(args) -> dict:
    import torch

    import featx.store
    from featx.extract import extract
    from featx.spec import ExtractionOptions

    torch.set_num_threads(args.threads)
    out = fresh_store(args.out)
    t0 = time.perf_counter()
    run = FEATX_RUNS[torch.device(args.device).type][args.run][0]
    result = extract(
        args.images,
        args.backbone,
        options=ExtractionOptions(batch_size=args.batch_size, workers=args.workers, **run),
        out=out,
        device=args.device,
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
        "amp": result.spec.amp,
        "rss_gib": peak_rss_gib(),
        "store": str(out),
    }


def child_textbook(args) -> dict:
    """How most people write it: torchvision transforms on PIL images, float32, save once at the end."""
    import numpy as np
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    from featx._runtime.env import default_workers
    from featx.backbones import load_backbone

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    net = load_backbone(args.backbone)
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
    workers = default_workers() if args.workers is None else args.workers  # as many as featx's
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=workers)
    device = torch.device(args.device)
    # float32 means float32 here too: PyTorch lets cuDNN use TF32 by default, which would put TF32's error
    # into the tolerance check (featx --amp none turns it off the same way).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = model.to(device).eval()
    features = []
    with torch.no_grad():
        for x, _ in loader:
            features.append(model(x.to(device)).cpu().numpy())
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
    parser.add_argument("--n", type=int, help="images per run [1,360 (Oxford Flowers-17's size); 5,000 on a GPU]")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--device", choices=["cpu", "cuda"], help="[cuda when there is a GPU, else cpu]")
    parser.add_argument("--batch-size", type=int, help="[64 on the CPU, 256 on a GPU]")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--workers", type=int, default=None, help="featx's and the textbook's decoding processes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--thingsvision-python", default=os.environ.get("FEATX_THINGSVISION_PYTHON"))
    parser.add_argument("--quick", action="store_true", help="CPU: 512 images (ResNet-50: 192, no compile)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "featx-bench"))
    parser.add_argument("--child", choices=["model", "featx", "textbook"], help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 64)
    if args.child:
        print(json.dumps({"model": child_model, "featx": child_featx, "textbook": child_textbook}[args.child](args)))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work, args.threads)
    this_machine = machine()
    print(f"machine: {machine_line(this_machine)}\n")
    summary = []
    for name in args.backbones:
        if args.n:
            n = args.n
        elif gpu:
            n = 5000
        else:
            n = 1360 if not args.quick else (512 if name == "lite0" else 192)
        compile_too = not args.no_compile and not (args.quick and name == "resnet50" and not gpu)
        images = Path(args.images) if args.images else sample_jpegs(work / f"jpegs-{n}", n)
        featx_name = BACKBONES[name][0]
        if name == "resnet50":
            weights = random_torchvision_weights(name, work / f"{name}-random.safetensors")
            featx_name = featx_name.format(weights=weights)
        common = ["--backbone", featx_name, "--images", str(images), "--n", str(n), "--device", args.device]
        common += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        if args.workers is not None:
            common += ["--workers", str(args.workers)]
        me = str(Path(__file__).resolve())
        rows, result = [], {}
        for label, mode in MODEL_MODES[args.device].items():
            if mode.compile and not compile_too:
                continue
            r = run_child([me, "--child", "model", "--mode", label, *common], env)
            result[label] = r
            note = [f"compile {r['compile_s']:.0f} s (not counted)"] if mode.compile else []
            note += [f"autocast {r['amp']}"] if r["amp"] != "none" else []
            rows.append([f"model alone: {label}", f"{r['ips']:.1f}", "", f"{r['rss_gib']:.2f}", "; ".join(note)])
            print(f"  {name} {label}: {r['ips']:.1f} img/s", file=sys.stderr, flush=True)
        textbook = run_child([me, "--child", "textbook", "--out", str(work / f"{name}-textbook.npy"), *common], env)
        tv = None
        if args.thingsvision_python and not gpu:
            model, source, module = BACKBONES[name][1]
            tv_args = [str(images), model, source, module, str(args.batch_size), str(args.threads)]
            tv = run_child(
                [str(Path(__file__).resolve().parent / "_thingsvision_child.py"), *tv_args, str(work / f"{name}-tv")],
                env,
                python=args.thingsvision_python,
            )
        for i, (label, (options, ceiling_mode)) in enumerate(FEATX_RUNS[args.device].items()):
            if options.get("compile_mode") == "on" and not compile_too:
                continue
            out = str(work / f"{name}-featx{i}.h5")
            r = run_child([me, "--child", "featx", "--run", label, "--out", out, *common], env)
            ceiling = result[ceiling_mode]
            diff = max_abs_diff(r["store"], str(work / f"{name}-textbook.npy"))
            versus = f"{r['ips'] / textbook['ips']:.1f}× textbook"
            versus += f", {r['ips'] / tv['ips']:.1f}× thingsvision" if tv else ""
            rows.append(
                [
                    f"**{label}**, JPEG → store",
                    f"**{r['ips']:.1f}**",
                    f"{r['ips'] / ceiling['ips']:.2f}",
                    f"{r['rss_gib']:.2f}",
                    f"{versus}; in-loop {r['loop_ips']:.1f} img/s; {r['amp'] if r['amp'] != 'none' else 'fp32'}, "
                    f"max abs diff vs the textbook's fp32 {diff:.1e}",
                ]
            )
            summary.append(
                {
                    "backbone": name,
                    "device": args.device,
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
        where = this_machine["gpu"] if gpu else f"{args.threads} threads"
        print(f"### {name}: {n} JPEGs, batch {args.batch_size}, {args.device} ({where})\n")
        print(table(["run", "images/s", "÷ model alone", "peak RSS GiB", "notes"], rows) + "\n", flush=True)
    (work / f"bench_extract-{args.device}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
