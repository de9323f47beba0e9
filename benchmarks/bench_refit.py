"""Refit on train+val against fit on train: the frozen rows of a dataset, the same choice on val, the same test.

Usage::

    python benchmarks/bench_refit.py [--set digits|hymenoptera|cifar] [--classifiers logreg,svm,knn] [--work DIR]

Each classifier is trained twice on the store of the built-in Lite0 (and on ``featx:pixels``) under the default split
plan (``cifar``: bench_recipe.py's CIFAR-10 subset, 80 train and 30 test images per class): ``refit="train"``
(search on val, fit on train) and ``refit="train+val"`` with the value that search chose (its own search would be the
same fits on the same images); prints the value, the test accuracy of each (paired: exact McNemar, featx's paired
score interval) and the seconds of each (search + final fit; the refit's final fit only). Test
accuracy here measures the protocol option; it chooses no setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HYMENOPTERA, cifar_manifest, machine_line, table

BACKBONES = {"lite0": "featx:efficientnet_lite0", "pixels": "featx:pixels"}


def _correct(results: dict) -> list[bool]:
    p = results["test"]["predictions"]
    return [t == q for t, q in zip(p["true"], p["predicted"], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/featx-bench/refit")
    parser.add_argument("--set", default="digits", choices=("digits", "hymenoptera", "cifar"))
    parser.add_argument("--classifiers", default="logreg,svm,knn")
    parser.add_argument("--backbones", default="lite0,pixels")
    args = parser.parse_args()

    from featx.classify import ClassifierConfig, train
    from featx.extract import extract
    from featx.jobs.decision import paired_score_interval
    from featx.jobs.verdict import mcnemar_exact

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sources = {"hymenoptera": str(HYMENOPTERA), "digits": "digits"}
    source = sources[args.set] if args.set in sources else str(cifar_manifest(work, 80, 30))
    rows = []
    for bb in args.backbones.split(","):
        store = work / f"{args.set}.{bb}.h5"
        extract(source, out=store, backbone=BACKBONES[bb], progress=False)
        for name in args.classifiers.split(","):
            results = {}
            for refit in ("train", "train+val"):
                path = work / f"{args.set}__{bb}__{name}__{refit}.json"
                if not path.exists():
                    # The refit's search on val is the plain run's (the same fits on train, the same val): it chooses
                    # the same value, so the refit takes that value and pays only its final fit on train+val.
                    chosen = results["train"]["classifier"].get("chosen") if refit != "train" else None
                    config = ClassifierConfig(classifier=name, value="auto" if chosen is None else chosen)
                    t0 = time.perf_counter()
                    _, r = train(store, config, n_jobs=1, refit=refit)
                    r["bench_seconds"] = time.perf_counter() - t0
                    path.write_text(json.dumps(r))
                results[refit] = json.loads(path.read_text())
            a, b = results["train"], results["train+val"]
            right = [_correct(r) for r in (b, a)]
            only_refit, only_train, p = mcnemar_exact(*right)
            low, high = paired_score_interval(only_refit, only_train, len(right[0]))
            delta = b["test"]["accuracy"] - a["test"]["accuracy"]
            chosen = a["classifier"].get("chosen")
            rows.append([
                f"{name} · {bb}", "—" if chosen is None else f"{chosen:g}",
                f"{a['test']['accuracy']:.4f}", f"{b['test']['accuracy']:.4f}",
                f"{100 * delta:+.1f} [{100 * low:.1f}, {100 * high:.1f}], p = {p:.2g}",
                f"{a['bench_seconds']:.0f}", f"{b['bench_seconds']:.0f}",
            ])  # fmt: skip
    print(machine_line())
    print(table(["row", "chosen on val", "test, fit on train", "test, refit train+val", "refit − train, pt [CI]",
                 "s (train)", "s (train+val)"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
