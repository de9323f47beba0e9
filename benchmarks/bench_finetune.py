"""Fine-tuning throughput: ``featx finetune`` against a plain PyTorch training loop, same model and batch.

Usage::

    python benchmarks/bench_finetune.py [--n 512] [--batch-size 32] [--phase all] [--quick]

Both train the built-in EfficientNet-Lite0 with a new linear head for one epoch on the same JPEGs
(hymenoptera's photos, cycled to ``--n``), float32, SGD with momentum, random-resized-crop and flip
augmentation, in fresh processes with the same thread count. The images/s are those of the training
loop alone (augmentation, forward, backward and step; not validation or model loading). The plain loop
is the PyTorch tutorial's: ``ImageFolder`` + ``DataLoader(shuffle=True)`` + ``model.train()``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, child_env, cores, machine_line, peak_rss_gib, run_child, sample_jpegs, table

BACKBONE = "featx:efficientnet_lite0"


def child_featx(args) -> dict:
    import torch

    from featx.finetune import FinetuneConfig, finetune, parse_phases

    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)  # a finished run in the same folder would just be read back
    config = FinetuneConfig(phases=tuple(parse_phases(f"{args.phase}:1:1e-3")), batch_size=args.batch_size)
    results = finetune(args.images, BACKBONE, config, args.out, overwrite=True, progress=False, device="cpu")
    epoch = results["curves"][-1]
    return {
        "ips": epoch["images_per_second"],
        "seconds": epoch["seconds"],
        "rss_gib": peak_rss_gib(),
        "train_images": results["train"]["n"],
    }


def child_plain(args) -> dict:
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    from featx._runtime.env import default_workers
    from featx.backbones import load_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = load_backbone(BACKBONE)
    model, pre = net.model, net.preprocessing
    dataset = datasets.ImageFolder(
        args.images,
        transforms.Compose(
            [
                transforms.RandomResizedCrop(pre.input_size, scale=(0.25, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(pre.mean, pre.std),
            ]
        ),
    )
    model.reset_classifier(len(dataset.classes))
    if args.phase == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier")
    # featx trains on its train split (70 % of the images after val and test are carved off): match the count.
    subset = torch.utils.data.Subset(dataset, torch.randperm(len(dataset))[: args.train_images].tolist())
    workers = default_workers()  # as many decoding workers as featx's fine-tuning uses
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    seen = 0
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    seconds = time.perf_counter() - t0
    return {"ips": seen / seconds, "seconds": seconds, "rss_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="images in the source (featx trains on its train split)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--phase", default="all", choices=["head", "all"], help="what trains (both loops)")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--quick", action="store_true", help="256 images")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "featx-bench"))
    parser.add_argument("--child", choices=["featx", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--train-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"featx": child_featx, "plain": child_plain}[args.child](args)))
        return

    n = 256 if args.quick else args.n
    work = Path(args.workdir)
    images = sample_jpegs(work / f"jpegs-{n}", n)
    env = child_env(work, args.threads)
    common = [
        "--images",
        str(images),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--phase",
        args.phase,
    ]
    me = str(Path(__file__).resolve())
    ours = run_child([me, "--child", "featx", "--out", str(work / "finetune-bench"), *common], env)
    train_images = ours["train_images"]
    plain = run_child([me, "--child", "plain", "--train-images", str(train_images), *common], env)
    print(f"machine: {machine_line()}\n")
    print(
        f"### fine-tuning {BACKBONE}, phase {args.phase}, {train_images} training images, batch {args.batch_size}, "
        f"{args.threads} threads, float32\n"
    )
    print(
        table(
            ["run", "train images/s", "epoch s", "peak RSS GiB"],
            [
                ["**featx finetune**", f"**{ours['ips']:.1f}**", f"{ours['seconds']:.1f}", f"{ours['rss_gib']:.2f}"],
                [
                    "plain PyTorch loop (ImageFolder, model.train())",
                    f"{plain['ips']:.1f}",
                    f"{plain['seconds']:.1f}",
                    f"{plain['rss_gib']:.2f}",
                ],
            ],
        )
    )
    print(f"\nfeatx ÷ plain: {ours['ips'] / plain['ips']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
