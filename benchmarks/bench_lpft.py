"""Why an LP-FT row stays at its probe: short fine-tunes from a linear probe's head, judged on val only.

Usage::

    python benchmarks/bench_lpft.py probe --set digits [--work DIR]      # extract + the logreg probe (C on val)
    python benchmarks/bench_lpft.py probe-cv --set digits [--work DIR]   # C on val against C by CV inside train
    python benchmarks/bench_lpft.py run --set digits --variants a,b,... [--work DIR]
    python benchmarks/bench_lpft.py report [--work DIR]
    python benchmarks/bench_lpft.py gradnorm --set digits [--work DIR]  # the gradient an LP-FT run starts with
    python benchmarks/bench_lpft.py dead --set digits [--work DIR]      # where the folded probe puts its weight
    python benchmarks/bench_lpft.py probe-floor --set digits --floor 0.3 [--work DIR]  # the floored probe's val

Every run is ``featx.finetune.finetune`` on the built-in EfficientNet-Lite0 from the probe's head (``init_head``),
the default split plan (split seed 0), training seed 0, the rate fixed (no choice on val) unless the variant says
``auto``; only what the variant names differs (``VARIANTS``). The report prints each run's val accuracy and val loss
per epoch (epoch 0 = the probe's head), and the probe's val accuracy with C chosen on val (the value epoch 0 is
judged against) and with C chosen by 5-fold CV inside train (val untouched: no selection bias). Test accuracy is
printed for information only: no choice is made on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HYMENOPTERA, machine_line, table

BACKBONE = "featx:efficientnet_lite0"
NO_FLIP = {"digits"}

#: Each variant: FinetuneConfig settings beside the shared ones (batch 64, SGD, seed 0, no flip on digits).
VARIANTS: dict[str, dict] = {
    # The quickstart's LP-FT phase at fixed rates (its candidates were 1e-4, 3e-4, 1e-3).
    "top1-1e-4": {"phases": "top1:1:1e-4", "crop_scale": (0.8, 1.0)},
    "top1-1e-3": {"phases": "top1:1:1e-3", "crop_scale": (0.8, 1.0)},
    # A rate too small to move anything: whether the drop needs training at all.
    "top1-1e-8": {"phases": "top1:1:1e-8", "crop_scale": (0.8, 1.0)},
    # The head alone (the backbone frozen): whether the drop is the head's or the features'.
    "head-1e-4": {"phases": "head:1:1e-4", "crop_scale": (0.8, 1.0)},
    # Augmentation: the whole image (scale 1 leaves only RandomResizedCrop's aspect jitter, which cannot fit) and the
    # default 0.25 crop.
    "top1-1e-4-nocrop": {"phases": "top1:1:1e-4", "crop_scale": (1.0, 1.0)},
    "top1-1e-4-crop25": {"phases": "top1:1:1e-4", "crop_scale": (0.25, 1.0)},
    "head-1e-4-nocrop": {"phases": "head:1:1e-4", "crop_scale": (1.0, 1.0)},
    "head-1e-8-nocrop": {"phases": "head:1:1e-8", "crop_scale": (1.0, 1.0)},
    # The probe fit on the raw features (logreg, preprocess none): its head is not the standardised regression folded
    # into the raw features (weights up to 1/std of near-constant features), so backpropagation is not amplified.
    "raw-top1-1e-4": {"phases": "top1:1:1e-4", "crop_scale": (0.8, 1.0), "probe": "probe-raw"},
    "raw-top1-1e-3": {"phases": "top1:1:1e-3", "crop_scale": (0.8, 1.0), "probe": "probe-raw"},
    "raw-all-1e-3": {"phases": "all:1:1e-3", "crop_scale": (0.8, 1.0), "probe": "probe-raw"},
    "raw-all-1e-2": {"phases": "all:1:1e-2", "crop_scale": (0.8, 1.0), "probe": "probe-raw"},
    # One epoch against two: whether the first epoch's loss is a transient that a second epoch recovers.
    "top1-2ep-1e-3": {"phases": "top1:2:1e-3", "crop_scale": (0.8, 1.0)},
    # The same with the gradient norm clipped at 1: whether bounding the probe head's large gradients keeps it stable.
    "top1-2ep-1e-3-clip1": {"phases": "top1:2:1e-3", "crop_scale": (0.8, 1.0), "clip_grad": 1.0},
    # Everything trains (the default recipe's all phase, layer decay 0.5), three epochs, clipped: can LP-FT leave it?
    "all-3ep-3e-3-clip1": {"phases": "all:3:3e-3", "crop_scale": (0.8, 1.0), "clip_grad": 1.0},
    # The head alone at the default recipe's rates (its first phase): whether head training from the probe helps val.
    "head-1e-2": {"phases": "head:1:1e-2", "crop_scale": (0.8, 1.0)},
    # The probe's standardisation floored at q x its median scale before folding (``probe-floor``): whether the
    # head's huge weights on near-dead channels (98.5 % of its squared weight on digits) are what the backbone's
    # first updates trip over.
    "floor0.3-top1-1e-4": {"phases": "top1:1:1e-4", "crop_scale": (0.8, 1.0), "probe_scale_floor": 0.3},
    "floor0.3-top1-2ep-1e-3": {"phases": "top1:2:1e-3", "crop_scale": (0.8, 1.0), "probe_scale_floor": 0.3},
    # The default recipe (head:2:auto,all:6:auto/2, layer decay 0.5, 1e-3-1e-2 chosen on val) from the floored probe,
    # at the quickstart's crop.
    "floor0.3-default": {"phases": "head:2:auto,all:6:auto/2", "crop_scale": (0.8, 1.0), "probe_scale_floor": 0.3},
    # Kumar et al.'s LP-FT (the probe, then everything) at fixed rates, the default crop: the plain fine-tune's
    # all-layer rate (5e-3, half its chosen 1e-2) and a third of it.
    "floor0.3-all6-5e-3": {"phases": "all:6:5e-3", "probe_scale_floor": 0.3},
    "floor0.3-all6-1.5e-3": {"phases": "all:6:1.5e-3", "probe_scale_floor": 0.3},
    # The same at the plain fine-tune's chosen rate, fixed: whether the one-epoch choice (1e-3) holds LP-FT back.
    "floor0.3-default-1e-2": {"phases": "head:2:1e-2,all:6:5e-3", "crop_scale": (0.8, 1.0), "probe_scale_floor": 0.3},
    "floor1-top1-2ep-1e-3": {"phases": "top1:2:1e-3", "crop_scale": (0.8, 1.0), "probe_scale_floor": 1.0},
}


def _source(name: str, work: Path | None = None) -> str:
    if name == "cifar":
        from _common import cifar_manifest

        return str(cifar_manifest(work or Path("/tmp/featx-bench/lpft"), 80, 30))
    return str(HYMENOPTERA) if name == "hymenoptera" else name


def probe(args) -> None:
    from featx.classify import ClassifierConfig, train
    from featx.extract import extract

    work = Path(args.work)
    store = work / f"{args.set}.lite0.h5"
    extract(_source(args.set, work), out=store, backbone=BACKBONE, progress=False)
    train(store, ClassifierConfig(classifier="logreg"), out_dir=work / f"{args.set}__probe", n_jobs=1)
    raw = ClassifierConfig(classifier="logreg", preprocess=())  # the raw features (featx train --preprocess none)
    train(store, raw, out_dir=work / f"{args.set}__probe-raw", n_jobs=1)
    print(f"probes: {work / f'{args.set}__probe'}, {work / f'{args.set}__probe-raw'}")


def probe_floor(args) -> None:
    """The probe's val accuracy as the head LP-FT starts from, folded exactly and with ``probe_scale_floor=Q``
    (featx's own fold, :func:`~featx.finetune.head_from_logreg`), and how many val predictions the floor keeps."""
    import numpy as np

    from featx.backbones import load_backbone
    from featx.classify.model import load_model
    from featx.finetune import head_from_logreg
    from featx.store.reader import FeatureStore

    work = Path(args.work)
    probe = work / f"{args.set}__probe" / "model.skops"
    names = load_model(probe).class_names
    fs = FeatureStore(work / f"{args.set}.lite0.h5")
    X = fs.features("penultimate", split="val", dtype=np.float32)
    truth = np.array([list(names).index(str(label)) for label in fs.labels("val")])
    net = load_backbone(BACKBONE)
    predicted = {}
    for floor in (0.0, args.floor):
        W, b = head_from_logreg(probe, net, names, scale_floor=floor)
        predicted[floor] = (X @ W.numpy().T + b.numpy()).argmax(1)
    exact, floored = predicted[0.0], predicted[args.floor]
    print(
        f"{args.set}: val {np.mean(floored == truth):.4f} floored at {args.floor:g} (exact fold "
        f"{np.mean(exact == truth):.4f}), {np.mean(floored == exact):.3f} of val predictions unchanged"
    )


def dead(args) -> None:
    """Where the exactly folded probe puts its weight: the features' train std against their median, and the share
    of the head's squared weight on features below 1 % of it (near-dead channels the standardisation blows up)."""
    import numpy as np

    from featx.classify.model import load_model
    from featx.store.reader import FeatureStore

    work = Path(args.work)
    model = load_model(work / f"{args.set}__probe" / "model.skops")
    scaler, clf = model.pipeline.steps[0][1], model.pipeline.steps[-1][1]
    std = FeatureStore(work / f"{args.set}.lite0.h5").features("penultimate", split="train", dtype=np.float64).std(0)
    folded = clf.coef_ / scaler.scale_
    low = std < 0.01 * np.median(std)
    share = (folded[:, low] ** 2).sum() / (folded**2).sum()
    top = np.argmax(np.abs(folded).max(0))
    print(
        f"{args.set}: median std {np.median(std):.3g}; {low.sum()} of {len(std)} features below 1 % of it hold "
        f"{share:.1%} of the folded head's squared weight; the largest weight, {np.abs(folded).max():.4g}, sits on a "
        f"feature of std {std[top]:.3g}; standardised coefficients there at most "
        f"{np.abs(clf.coef_[:, low]).max() if low.any() else 0:.3g} (overall {np.abs(clf.coef_).max():.3g})"
    )


def run(args) -> None:
    from featx.finetune import FinetuneConfig, finetune, parse_phases

    work = Path(args.work)
    for name in args.variants.split(","):
        out = work / f"{args.set}__{name}"
        if (out / "results.json").exists():
            print(f"{name}: done already")
            continue
        settings = dict(VARIANTS[name])
        probe_name = settings.pop("probe", "probe")
        config = FinetuneConfig(
            phases=tuple(parse_phases(settings.pop("phases"))),
            batch_size=64,
            flip=args.set not in NO_FLIP,
            **({"probe_scale_floor": 0.0} | settings),  # the exact fold unless the variant floors it
        )
        t0 = time.perf_counter()
        finetune(
            _source(args.set, Path(args.work)),
            BACKBONE,
            config,
            out,
            init_head=work / f"{args.set}__{probe_name}" / "model.skops",
            progress=False,
            device="cpu",
            workers=0,
        )
        print(f"{name}: {time.perf_counter() - t0:.0f} s")


def probe_cv(args) -> None:
    """The probe's C chosen by featx's own search on val (what epoch 0 is judged with) and by 5-fold CV inside train
    (val untouched: no selection bias); the val accuracy of each (test for information)."""
    import numpy as np

    from featx.classify import ClassifierConfig
    from featx.classify.training import fit_in_memory
    from featx.store.reader import FeatureStore

    fs = FeatureStore(Path(args.work) / f"{args.set}.lite0.h5")
    X = {s: fs.features("penultimate", split=s, dtype=np.float32) for s in ("train", "val", "test")}
    y = {s: fs.labels(s) for s in ("train", "val", "test")}
    config = ClassifierConfig(classifier="logreg")
    on_val = np.array(["train"] * len(y["train"]) + ["val"] * len(y["val"]))
    for name, Xs, ys, splits in [
        ("C on val", np.vstack([X["train"], X["val"]]), np.concatenate([y["train"], y["val"]]), on_val),
        ("C by 5-fold CV in train", X["train"], y["train"], np.array(["train"] * len(y["train"]))),
    ]:
        t0 = time.perf_counter()
        f = fit_in_memory(Xs, ys, splits, config.validate(), config, n_jobs=1)
        print(
            f"{name}: C={f.value:g} ({f.search.scheme}); val {f.pipeline.score(X['val'], y['val']):.4f}, "
            f"test (info) {f.pipeline.score(X['test'], y['test']):.4f}, {time.perf_counter() - t0:.0f} s"
        )


def report(args) -> None:
    work = Path(args.work)
    rows = []
    for path in sorted(work.glob("*__*/results.json")):
        r = json.loads(path.read_text())
        name = path.parent.name
        if r["kind"] != "finetune":
            rows.append([name, "probe", f"C={r['classifier']['chosen']:g}", "", "", f"{r['test']['accuracy']:.4f}", ""])
            continue
        curve = " → ".join(f"{c['val_accuracy']:.4f}" for c in r["curves"])
        loss = " → ".join(f"{c['val_loss']:.3f}" for c in r["curves"])
        rows.append(
            [name, r["finetune"]["phases"][0]["freeze"], curve, loss, r["best_epoch"], f"{r['test']['accuracy']:.4f}",
             f"{r['seconds']:.0f}"]
        )  # fmt: skip
    print(machine_line())
    print(table(["run", "phase", "val accuracy by epoch", "val loss by epoch", "best", "test (info)", "s"], rows))


def gradnorm(args) -> None:
    """The gradient norm over all of the network's parameters (what ``clip_grad`` caps) on 32 train images of the
    probe's split plan with their true labels, in the evaluation view and in the training view (``--crop-min``), for
    the head from the standardised probe,
    from the raw-feature probe and a fresh head (``nn.Linear``'s init, seed 0): how large an LP-FT run's first
    steps are against a fine-tune's."""
    import numpy as np
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from featx.backbones import load_backbone
    from featx.data.sources import load_source
    from featx.data.splits import SplitPlan
    from featx.finetune.heads import head_from_logreg, set_module

    torch.set_num_threads(2)
    work = Path(args.work)
    manifest = load_source(_source(args.set, work)).with_plan(SplitPlan())
    train_rows = np.flatnonzero(np.asarray(manifest.splits) == "train")
    rows = np.random.default_rng(0).choice(train_rows, size=32, replace=False)
    net = load_backbone(BACKBONE)
    pre = net.preprocessing
    interpolation = T.InterpolationMode(pre.interpolation)
    normalise = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    views = {  # the evaluation view, and the training view fine-tuning sees (featx's default crop; flips but digits)
        "eval": T.Compose([T.Resize(pre.resize_size, interpolation=interpolation), T.CenterCrop(pre.input_size)]),
        "train": T.Compose([
            T.RandomResizedCrop(pre.input_size, scale=(args.crop_min, 1.0), interpolation=interpolation),
            T.RandomHorizontalFlip(0.0 if args.set in NO_FLIP else 0.5),
        ]),
    }  # fmt: skip
    torch.manual_seed(0)
    pictures = [Image.open(manifest.paths[i]).convert("RGB") for i in rows]
    batches = {v: torch.stack([T.Compose([t, *normalise])(im) for im in pictures]) for v, t in views.items()}
    labels = torch.as_tensor(np.asarray(manifest.labels)[rows])
    head_name, names = net.classifier_name(), list(manifest.class_names)
    found = {}
    for label, folder in (("standardised probe", "probe"), ("raw-feature probe", "probe-raw"), ("fresh head", None)):
        torch.manual_seed(0)
        head = torch.nn.Linear(net.model.get_submodule(head_name).in_features, len(names))
        if folder is not None:
            weight, bias = head_from_logreg(work / f"{args.set}__{folder}" / "model.skops", net, names)
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(bias)
        set_module(net.model, head_name, head)
        net.model.eval()
        for param in net.model.parameters():
            param.requires_grad_(True)
            param.grad = None
        found[label] = {"head_row_norm_max": float(head.weight.norm(dim=1).max())}
        for view, images in batches.items():
            net.model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net.model(images), labels)
            loss.backward()
            norm = torch.sqrt(sum((q.grad**2).sum() for q in net.model.parameters() if q.grad is not None))
            found[label] |= {f"loss_{view}": float(loss), f"grad_norm_{view}": float(norm)}
    rows_md = [
        [k, f"{v['loss_eval']:.3f} · {v['loss_train']:.3f}", f"{v['grad_norm_eval']:.1f} · {v['grad_norm_train']:.1f}",
         f"{v['head_row_norm_max']:.2f}"]
        for k, v in found.items()
    ]  # fmt: skip
    header = ["head", "loss, eval · training view", "gradient norm (all parameters), eval · training view",
              "largest head row norm"]  # fmt: skip
    print(table(header, rows_md))
    (work / f"{args.set}__gradnorm-crop{args.crop_min:g}.json").write_text(json.dumps(found, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("probe", "probe-cv", "probe-floor", "dead", "run", "report", "gradnorm"))
    parser.add_argument("--work", default="/tmp/featx-bench/lpft")
    parser.add_argument("--set", default="digits", choices=("digits", "hymenoptera", "cifar"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--floor", type=float, default=0.3, help="probe-floor: the scale floor, times the median")
    parser.add_argument("--crop-min", type=float, default=0.25, help="gradnorm: the training view's smallest crop area")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    commands = {
        "probe": probe,
        "probe-cv": probe_cv,
        "probe-floor": probe_floor,
        "dead": dead,
        "run": run,
        "report": report,
        "gradnorm": gradnorm,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
