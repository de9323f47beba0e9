"""Which preprocessing each frozen classifier should default to, chosen on val (never on test).

Usage::

    python benchmarks/bench_preprocess.py [--sets digits,hymenoptera] [--work DIR]

For svm and logreg on the built-in Lite0's penultimate features, each preprocessing (``standard``, ``l2``) is
searched as ``featx train`` searches it under the default split plan (C chosen on val, fit on train). The val
accuracy at the chosen C decides; the test accuracy of each is printed beside it, for information only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HYMENOPTERA, machine_line, table

CLASSIFIERS = {"svm": ("l2", "standard"), "logreg": ("standard", "l2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/featx-bench/preprocess")
    parser.add_argument("--sets", default="digits,hymenoptera")
    args = parser.parse_args()

    from featx.classify import ClassifierConfig, train
    from featx.extract import extract

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.sets.split(","):
        store = work / f"{name}.lite0.h5"
        extract(str(HYMENOPTERA) if name == "hymenoptera" else name, out=store, progress=False)
        for classifier, steps in CLASSIFIERS.items():
            scores = {}
            for step in steps:
                path = work / f"{name}__{classifier}__{step}.json"
                if not path.exists():
                    t0 = time.perf_counter()
                    _, r = train(store, ClassifierConfig(classifier=classifier, preprocess=(step,)), n_jobs=1)
                    curve = r["search"]["curve"] + r["search"].get("refined", [])
                    best = next(p for p in curve if p["value"] == r["search"]["best"])
                    seconds = time.perf_counter() - t0
                    record = {"val": best["mean"], "C": best["value"], "test": r["test"]["accuracy"], "s": seconds}
                    path.write_text(json.dumps(record))
                scores[step] = json.loads(path.read_text())
            chosen = max(steps, key=lambda s: scores[s]["val"])  # ties: the first listed, the current default
            for step in steps:
                s = scores[step]
                mark = " **(chosen on val)**" if step == chosen else ""
                rows.append([name, classifier, step + mark, f"{s['C']:.3g}", f"{s['val']:.4f}", f"{s['test']:.4f}",
                             f"{s['s']:.0f}"])  # fmt: skip
    print(machine_line())
    print(table(["set", "classifier", "preprocess", "C (on val)", "val acc", "test acc (info)", "s"], rows))


if __name__ == "__main__":
    main()
