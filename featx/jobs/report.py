"""The comparison report: every results JSON of a run folder side by side, as a table, Markdown, HTML and plots.

Rows are methods (``svm · efficientnet_lite0 · penultimate``, ``finetune[head→top2→all] · …``), one table per
dataset, with the same metrics for every row; each row also says exactly how it was made, so a reader can
reproduce it. The HTML page embeds its plots, so it opens offline as a single file.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from featx._runtime.io import atomic_write
from featx.finetune.config import edge_words
from featx.jobs.decision import DEFAULT_MARGIN
from featx.jobs.markdown import md_cell, md_code, md_link, md_text
from featx.jobs.planning import ClassifyTask, FinetuneTask, row_key
from featx.jobs.plots import plot_datasets
from featx.jobs.verdict import DatasetVerdict, across_datasets, split_seed_of, two_figures, verdict
from featx.results import ClassifierResults, FinetuneResults, NotResultsError, Results, ResultsError, read_results

__all__ = ["COLUMNS", "Row", "collect", "format_table", "recorded_margin", "row_key_of", "val_accuracy", "write_report"]

log = logging.getLogger(__name__)


COLUMNS = (
    "method",
    "test accuracy, % [95% CI]",
    "mean ± std over seeds, %",
    "balanced acc., %",
    "macro F1, %",
    "chosen",
    "train s",
    "extract s",
    "images/s",
)


class Row(dict):
    """One method's numbers and provenance (a dict, so it serialises as is)."""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _row(results: Results, path: Path, root: Path) -> Row:
    test = results.get("test") or {}
    cell = results.get("cell") or {}
    if results["kind"] == "finetune":
        chosen, train_s, extract_s, ips, how = _finetune_numbers(results, root)
        dataset = cell.get("dataset") or results.get("source")
        # Compute is fitting (every epoch, its val passes, the rate candidates that lost), not set-up or the test.
        compute_s, device = train_s, results["finetune"].get("device")
        fingerprint = results.get("manifest_fingerprint")
        init = results["finetune"].get("init_head")
        init_results = _relative(Path(init).parent / "results.json", root) if init else None
    else:
        chosen, train_s, extract_s, ips, how = _classifier_numbers(results)
        init_results = None
        dataset = cell.get("dataset") or Path((results.get("store") or {}).get("path") or "store").name
        compute_s = (train_s or 0.0) + (extract_s or 0.0)
        fingerprint = (results.get("store") or {}).get("manifest_fingerprint")
        device = ((results.get("store") or {}).get("stats") or {}).get("device")
    versions = results.get("versions") or {}
    settings = results.get("finetune") if results["kind"] == "finetune" else results.get("classifier")
    seed = cell.get("seed", (settings or {}).get("seed"))
    shown = ("featx", "torch", "torchvision", "timm", "scikit-learn", "numpy", "pillow")
    method = results.get("method", path.parent.name)
    if results["kind"] == "classifier" and results["classifier"].get("preset") == "chance":
        method = "chance (majority class of train)"  # it reads no features: the store's name would mislead
    return Row(
        method=method,
        dataset=dataset,
        kind=results.get("kind"),
        baseline=_is_baseline(results),
        accuracy=test.get("accuracy"),
        val_accuracy=val_accuracy(results),
        ci=test.get("accuracy_ci95"),
        balanced=test.get("balanced_accuracy"),
        macro_f1=test.get("macro_f1"),
        chosen=chosen,
        train_s=train_s,
        extract_s=extract_s,
        compute_s=compute_s,
        device=device,
        images_per_s=ips,
        how=how + ("; final model refit on train+val" if (results.get("split") or {}).get("refit") else ""),
        versions=", ".join(f"{k} {versions[k]}" for k in shown if k in versions),
        store_path=(results.get("store") or {}).get("path"),
        split=results.get("split") or {},
        confusion=test.get("confusion_matrix"),
        class_names=list((test.get("per_class") or {}).keys()),
        per_class=test.get("per_class"),
        predictions=test.get("predictions"),
        few_shot=results.get("few_shot"),
        curves=results.get("curves"),
        path=_relative(path, root),
        seed=seed,
        init_results=init_results,
        row_key=row_key_of(results, path, root),
        seed_accuracies=None,
        fingerprint=fingerprint,
    )


def row_key_of(results: Results, path: Path, root: Path) -> str:
    """The key a row's runs share across training seeds and splits (one cell per seed and repeat): for a cell of
    ``featx run``, made of the fields its results record (:func:`~featx.jobs.planning.row_key`); else the file.

    Parameters
    ----------
    results : Results
    path : Path
        The results file (its key when it is no cell's).
    root : Path
        Where the report goes: the file is named relative to it.

    Returns
    -------
    str
        ``classify/dataset/backbone/layer/name``, ``finetune/dataset/name``, or the file's path.
    """
    cell = results.get("cell") or {}
    kind = ClassifyTask.kind if results["kind"] == "classifier" else FinetuneTask.kind
    needed = ("dataset", "name", "backbone", "layer") if kind == ClassifyTask.kind else ("dataset", "name")
    if not all(cell.get(field) for field in needed):  # no cell of a run (`featx train`, `featx finetune`)
        return _relative(path, root)
    return row_key(kind, cell["dataset"], cell["name"], cell.get("backbone"), cell.get("layer"))


def val_accuracy(results: Results) -> float | None:
    """The val score a row was chosen by: its final model's val accuracy (``results["val"]``); for results written
    before featx recorded it, the search's score at the chosen value (a val split, accuracy) or the chosen epoch's."""
    val = results.get("val") or {}
    if val.get("accuracy") is not None:
        return float(val["accuracy"])
    if results["kind"] == "finetune":
        best = results.get("best_epoch")
        record = next((c for c in results.get("curves") or [] if c.get("epoch") == best), None)
        return record.get("val_accuracy") if record else None
    search = results.get("search") or {}
    if search.get("scheme") != "validation split" or results["classifier"].get("scoring", "accuracy") != "accuracy":
        return None
    points = search.get("curve", []) + search.get("refined", [])
    return next((p["mean"] for p in points if p["value"] == search.get("best")), None)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the report's folder (a report moves with its folder), else as given."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _is_baseline(results: Results) -> bool:
    """A row that uses no transfer: chance, or a classifier on raw pixels (``featx:pixels…``)."""
    if results["kind"] != "classifier":
        return False
    backbone = str(((results.get("store") or {}).get("spec") or {}).get("backbone", ""))
    return results["classifier"].get("preset") == "chance" or backbone.startswith("featx:pixels")


def _layer_decay_words(ft: dict) -> str:
    decay = ft.get("layer_decay", 1.0)
    return f" (×{decay:g} per block below the top)" if decay != 1.0 else ""


def _sweep_words(results: FinetuneResults) -> str:
    """The learning-rate choice on val (``--lr auto``): each candidate's val score, the choice, what was cut."""
    sweep = results.get("lr_sweep")
    if not sweep:
        return ""
    key = sweep["selected_by"]
    tried = ", ".join(f"{r['lr']:g} → {_fmt(r.get(key))}" for r in sweep["runs"])
    cut = f"; not tried (--max-minutes): {', '.join(f'{v:g}' for v in sweep['cut'])}" if sweep.get("cut") else ""
    return (
        f"base learning rate chosen on val by {key} after phase {sweep['phase']}'s first epoch ({tried}): "
        f"{sweep['chosen']:g}{edge_words(sweep.get('at_edge'))}{cut}; "
    )


def _best_epoch_words(results: FinetuneResults) -> str:
    """`` (phase 2, top2)`` for the best epoch, from its curve record."""
    best = results.get("best_epoch")
    if best == 0:
        return " (the weights before any update: no epoch beat them on val)"
    record = next((c for c in results.get("curves") or [] if c.get("epoch") == best), None)
    return f" (phase {record['phase']}, {record['freeze']})" if record else ""


def _finetune_numbers(results: FinetuneResults, root: Path) -> tuple[str, float, None, float | None, str]:
    """A fine-tune's chosen epoch, training seconds, images/s and how it was made."""
    ft = results["finetune"]
    init = _relative(Path(ft["init_head"]), root) if ft.get("init_head") else None
    curves = results.get("curves") or []
    speeds = [c["images_per_second"] for c in curves if c.get("images_per_second")]
    phases = ", ".join(f"{p['freeze']} {p['epochs']} ep @ {p['lr']:g}" for p in ft["phases"])
    how = (
        f"fine-tuned {results['backbone']}: phases {phases}; optimizer {ft['optimizer']}, weight decay "
        f"{ft['weight_decay']:g}, backbone lr ×{ft['backbone_lr_mult']:g}{_layer_decay_words(ft)}, warm-up "
        f"{ft['warmup']:g} then cosine per {ft.get('schedule', 'phase')}, "
        f"label smoothing {ft['label_smoothing']:g}, batch {ft['batch_size']}, BatchNorm statistics "
        f"{'updated' if ft.get('update_bn_stats') else 'fixed'}, head "
        f"{'MLP ' + str(ft['hidden']) if ft['hidden'] else 'linear'}"
        f"{', initialised from ' + init if init else ''}; crop scale "
        f"{list(ft.get('crop_scale') or [])}, flip {'no' if ft.get('flip') is False else 'yes'}, patience "
        f"{ft.get('patience') or 'none'}; epoch chosen by {ft.get('metric', 'val_accuracy')} on val: best epoch "
        f"{results.get('best_epoch')}{_best_epoch_words(results)}; "
        f"{_sweep_words(results)}training seed {ft['seed']}; {ft.get('device')}, amp {ft.get('amp')}"
    )
    # fit_seconds counts the learning-rate candidates that lost too; older results have the curves alone.
    train_s = results["train"].get("fit_seconds") or sum(c["seconds"] for c in curves)
    return f"best epoch {results.get('best_epoch')}", train_s, None, float(np.mean(speeds)) if speeds else None, how


def _classifier_numbers(results: ClassifierResults) -> tuple[str, float, float | None, float | None, str]:
    """A classifier's chosen value, search + fit seconds, the extraction's seconds and images/s, and how."""
    clf = results["classifier"]
    search = results.get("search") or {}
    chosen = f"{clf['param']}={clf['chosen']:.3g}" if clf.get("param") and clf.get("chosen") is not None else "—"
    train_s = (search.get("seconds") or 0.0) + results["train"]["fit_seconds"]
    stats = (results.get("store") or {}).get("stats") or {}
    spec = results["store"]["spec"]
    steps = ", ".join(clf["preprocess"]) or "none"
    how = (
        f"{clf['preset']} on frozen {spec['backbone']} ({spec['weights']}) layer {clf['layer']}, "
        f"pool {spec['pool']}, {spec['dtype']}, tta {spec['tta']}"
        f"{', decode ' + spec['decode'] if spec.get('decode') not in (None, 'exact') else ''}; "
        f"preprocessing {steps}; {_search_words(clf, search, results)}; class weight "
        f"{clf['class_weight'] or 'none'}; seed {clf['seed']}"
    )
    return chosen, train_s, stats.get("seconds"), stats.get("images_per_second"), how


def _search_words(clf: dict[str, Any], search: dict[str, Any], results: ClassifierResults) -> str:
    """How the hyper-parameter was chosen: grid, scheme (folds and their seed), score at the choice, convergence."""
    if not clf.get("param"):
        return "no hyper-parameter"
    if not search:
        return f"{clf['param']} fixed at {clf.get('chosen')}"
    points = sorted(search.get("curve", []) + search.get("refined", []), key=lambda p: p["value"])
    at = next((p for p in points if p["value"] == search.get("best")), None)
    grid = ", ".join(f"{p['value']:.3g}" for p in points)
    folds = "" if search.get("scheme") == "validation split" else f" (fold seed {clf['seed']})"
    score = f"; {clf.get('scoring', 'accuracy')} {at['mean']:.4f} ± {at['std']:.4f} at the choice" if at else ""
    refit = results["train"].get("converged")
    return (
        f"{clf['param']} chosen by {search.get('scheme')}{folds} over {len(points)} values ({grid}){score}"
        f"{'; search fits converged' if search.get('converged') else ''}"
        f"{'; the final fit did NOT converge' if refit is False else ''}"
        f"{'; the best is at the edge of the grid' if search.get('at_edge') else ''}"
    )


def collect(out_dir: str | Path, root: str | Path | None = None) -> list[Row]:
    """Every results JSON under ``out_dir`` (a run folder, or any folder of ``results.json`` files).

    Paths in the rows are relative to ``root`` (default ``out_dir``: where the report goes). Files that are not
    featx results (another tool's ``results.json``) are passed over; featx results that
    cannot be read (cut short, a newer schema) are passed over with a warning that says why.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a folder of results")
    rows = []
    for path in sorted(out.rglob("results.json")):
        try:
            results = read_results(path)
        except NotResultsError:
            continue
        except ResultsError as exc:
            log.warning("skipping %s", exc)
            continue
        rows.append(_row(results, path, Path(root) if root is not None else out))
    if not rows:
        raise FileNotFoundError(
            f"no featx results.json under {out}; run `featx run`, `featx train` or `featx finetune` first"
        )
    return rows


def _pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal (every table and sentence speaks in % and pt)."""
    return "—" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _cells(row: Row) -> list[str]:
    acc = _pct(row["accuracy"])
    if row["ci"] and row["accuracy"] is not None:
        acc = f"{acc} [{_pct(row['ci'][0])}, {_pct(row['ci'][1])}]"
    seeds = row.get("seed_accuracies")
    spread = "—"
    if seeds and all(v is not None for v in seeds.values()):
        values = list(seeds.values())
        spread = f"{_pct(float(np.mean(values)))} ± {_pct(float(np.std(values, ddof=1)))} ({len(values)} seeds)"
    return [
        row["method"],
        acc,
        spread,
        _pct(row["balanced"]),
        _pct(row["macro_f1"]),
        row["chosen"],
        _fmt(row["train_s"], 1),
        _fmt(row["extract_s"], 1),
        _fmt(row["images_per_s"], 1),
    ]


def _by_dataset(rows: list[Row]) -> dict[str, list[Row]]:
    """Runs per dataset, by what they were tested on, never by how a path was spelled: runs sharing the images'
    fingerprint (any split seed: ``repeats``) or a test split are one dataset. Named by the pipeline's dataset
    name where a run has one, else by the store or source."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[str, int] = {}
    for i, row in enumerate(rows):
        test_hash = ((row["split"] or {}).get("hashes") or {}).get("test")
        for key in (f"images:{row.get('fingerprint')}" if row.get("fingerprint") else None, f"test:{test_hash}"):
            if key and not key.endswith(":None"):
                parent[find(i)] = find(first_of.setdefault(key, i))
    families: dict[int, list[Row]] = {}
    for i, row in enumerate(rows):
        families.setdefault(find(i), []).append(row)
    groups: dict[str, list[Row]] = {}
    for members in families.values():
        named = sorted({str(r["dataset"]) for r in members if r["dataset"] is not None})
        name = named[0] if named else "dataset"
        while name in groups:
            name += "′"
        groups[name] = members
    return groups


def _merge_seeds(group: list[Row]) -> list[Row]:
    """One row per cell across its training seeds and splits, for the tables: the first split's lowest seed stands
    for it, and ``seed_accuracies`` holds that split's seeds' test accuracies for the mean ± std column. The
    verdict reads every run."""
    by_key: dict[str, list[Row]] = {}
    for row in group:
        by_key.setdefault(row["row_key"], []).append(row)
    merged = []
    for runs in by_key.values():
        runs.sort(key=lambda r: ((split_seed_of(r) or 0), r["seed"] is None, r["seed"] or 0))
        first = Row(runs[0])
        same_split = [r for r in runs if (split_seed_of(r) or 0) == (split_seed_of(runs[0]) or 0)]
        if len(same_split) > 1:
            first["seed_accuracies"] = {r["seed"]: r["accuracy"] for r in same_split}
            first["how"] += f"; seeds {', '.join(str(r['seed']) for r in same_split)} (the table shows seed "
            first["how"] += f"{runs[0]['seed']}; the decision averages them)"
        splits = sorted({(split_seed_of(r) or 0) for r in runs})
        if len(splits) > 1:
            first["how"] += f"; split seeds {', '.join(map(str, splits))} (the table shows split {splits[0]})"
        merged.append(first)
    return merged


def _unique_methods(runs: list[Row]) -> None:
    """Rows that read alike (two tables of one preset, say) get their row key, so each is named once."""
    keys: dict[str, set[str]] = {}
    for run in runs:
        keys.setdefault(run["method"], set()).add(run["row_key"])
    for run in runs:
        if len(keys[run["method"]]) > 1:
            run["method"] = f"{run['method']} [{run['row_key']}]"


def _text_table(header: tuple[str, ...] | list[str], body: list[list[str]]) -> list[str]:
    cells = [list(header), *body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = []
    for j, c in enumerate(cells):
        lines.append(
            "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True)))
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_table(rows: list[Row], margin: float = DEFAULT_MARGIN) -> str:
    """Plain text: the decisions first, then per dataset its sentences, the verdict table and the results table."""
    sections = _sections(rows, margin)
    heads = _headlines(sections)
    parts = ["\n".join(["decision:", *(f"  {h}" for h in heads)])] if heads else []
    for dataset, group, found in sections:
        lines = [f"dataset: {dataset}", *_split_lines(group)]
        if found is not None:
            lines += [f"=> {sentence}" for sentence in _details(found)]
            lines += ["", f"{_against_words(found)}:"]
            lines += _text_table(VERDICT_COLUMNS, _verdict_cells(found)) if found.rows else []
            lines += [f"- {why}: {method}" for method, why in found.refused]
            lines.append("")
        lines += _text_table(COLUMNS, [_cells(r) for r in group])
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _split_lines(group: list[Row]) -> list[str]:
    """The splits and the selection rule the rows share (or a warning that they do not)."""
    splits = {json.dumps(r["split"].get("hashes"), sort_keys=True) for r in group if r["split"]}
    recorded = [r["split"] for r in group if r["split"]]
    if not recorded:
        return ["splits: not recorded (results of an older featx)"]
    first = recorded[0]
    sizes = ", ".join(f"{k} {v}" for k, v in (first.get("sizes") or {}).items())
    lines = [f"splits: {sizes} ({first.get('policy')}); rule: {first.get('rule')}"]
    if len(splits) > 1:
        lines.append("WARNING: the rows were not all made under one split plan (their split hashes differ)")
    return lines


#: The columns of a dataset's verdict table.
VERDICT_COLUMNS = (
    "method",
    "val acc., %",
    "test acc., %",
    "Δ vs reference, pt [unadjusted 95% CI]",
    "only ref. / only row right",
    "McNemar p (Holm)",
    "resolvable, pt",
    "compute s (device)",
    "× reference's compute",
)


def _p_words(p: float | None) -> str:
    return "—" if p is None else ("< 0.001" if p < 0.001 else f"{p:.2g}")


def _verdict_cells(found: DatasetVerdict) -> list[list[str]]:
    out = []
    for c in found.rows:
        is_reference = c.method == found.reference
        out.append(
            [
                c.method + (" (reference)" if is_reference else ""),
                _pct(c.val_accuracy),
                _pct(c.accuracy),
                "—" if is_reference else f"{100 * c.difference:+.1f} [{100 * c.ci95[0]:+.1f}, {100 * c.ci95[1]:+.1f}]",
                "—" if is_reference else f"{c.only_reference_right} / {c.only_row_right}",
                "—" if is_reference else f"{_p_words(c.p_value)} ({_p_words(c.p_holm)})",
                "—" if is_reference or c.resolvable is None else f"≥ {100 * c.resolvable:.1f}",
                _fmt(c.compute_seconds, 1) + (f" ({c.device})" if c.device else ""),
                "—" if is_reference else cost_ratio_words(c.cost_ratio),
            ]
        )
    return out


def cost_ratio_words(ratio: float | None) -> str:
    """A cost ratio to two significant figures (``12×``, ``0.25×``)."""
    return "—" if ratio is None else f"{two_figures(ratio)}×"


def _against_words(found: DatasetVerdict) -> str:
    """The verdict table's heading: what it compares, on which images, and which run of a row with seeds."""
    seeds = (
        " (each row's lowest training seed; the decision averages them)" if any(c.seeds > 1 for c in found.rows) else ""
    )
    return f"each row against the reference (best on val), paired on the same {found.n_test} test images{seeds}"


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def _details(found: DatasetVerdict) -> list[str]:
    """A dataset's sentences after its headline (the decision, said once at the top of the report)."""
    return [s for s in found.sentences if s != found.headline]


def _headlines(sections: list[_Section]) -> list[str]:
    """The decisions first: one per dataset, then the summary across datasets."""
    found = [f for _, _, f in sections if f is not None]
    lines = [f"{f.dataset}: {f.headline}" for f in found if f.headline]
    return lines + across_datasets(found)


# ------------------------------------------------------------------------------------------- documents
def _md_table(header: tuple[str, ...] | list[str], body: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(md_cell(c) for c in header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(md_cell(c) for c in r) + " |" for r in body),
    ]


_Plots = dict[str, list[tuple[str, Path]]]


def _first_plot(plots: list[tuple[str, Path]], kind: str) -> list[tuple[str, Path]]:
    return [p for p in plots if p[1].name.startswith(kind)]


def _provenance(group: list[Row]) -> tuple[list[tuple[str, str, str]], str | None]:
    """(method, path, how) per row, and the library versions when every row shares them (said once)."""
    versions = {r.get("versions") for r in group}
    shared = versions.pop() if len(versions) == 1 else None
    rows = [(r["method"], r["path"], r["how"] + ("" if shared else f"; {r.get('versions')}")) for r in group]
    return rows, shared


def _markdown(sections: list[_Section], plots: _Plots, out: Path, title: str) -> str:
    def figures(items: list[tuple[str, Path]]) -> list[str]:
        return [f"![{md_text(caption)}]({md_link(png.relative_to(out).as_posix())})" for caption, png in items] + (
            [""] if items else []
        )

    lines = [f"# {md_text(title)}", ""]
    heads = _headlines(sections)
    if heads:
        lines += ["**Decision**", "", *(f"- {md_text(h)}" for h in heads), ""]
    for dataset, group, found in sections:
        mine = plots.get(dataset, [])
        lines += [f"## {md_text(dataset)}", ""]
        if found is not None:
            lines += [f"- {md_text(sentence)}" for sentence in _details(found)] + [""]
        lines += figures(_first_plot(mine, "cost-accuracy"))
        lines += [*(f"{md_text(line)}  " for line in _split_lines(group)), ""]
        if found is not None:
            lines += [f"{md_text(_sentence_case(_against_words(found)))}:"]
            lines += ["", *_md_table(VERDICT_COLUMNS, _verdict_cells(found)), ""] if found.rows else [""]
            lines += [f"- not compared: **{md_text(method)}**, {md_text(why)}" for method, why in found.refused]
        lines += figures(_first_plot(mine, "discordant"))
        lines += _md_table(COLUMNS, [_cells(r) for r in group])
        provenance, versions = _provenance(group)
        lines += ["", "How each row was made" + (f" (every row: {md_text(versions)})" if versions else "") + ":", ""]
        lines += [f"- **{md_text(method)}** ({md_code(path)}): {md_text(how)}" for method, path, how in provenance]
        lines.append("")
        lines += figures([p for p in mine if not p[1].name.startswith(("cost-accuracy", "discordant"))])
    return "\n".join(lines) + "\n"


def _html_table(header: tuple[str, ...] | list[str], body: list[list[str]], css: str) -> list[str]:
    esc = html.escape
    parts = [f"<table class='{css}'><thead><tr>", *(f"<th>{esc(c)}</th>" for c in header), "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body]
    return [*parts, "</tbody></table>"]


def _html(sections: list[_Section], plots: _Plots, title: str) -> str:
    esc = html.escape

    def figures(items: list[tuple[str, Path]]) -> list[str]:
        out = []
        for caption, png in items:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
        return out

    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        ".decision{background:#eef6ee;padding:.5em 1em;border-left:4px solid #4a4;font-size:1.1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}"
        "li{margin:.3em 0}figure{margin:1.5em 0}img{max-width:100%}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    heads = _headlines(sections)
    if heads:
        parts += ["<div class='decision'><b>Decision</b><ul>", *(f"<li>{esc(h)}</li>" for h in heads), "</ul></div>"]
    for dataset, group, found in sections:
        mine = plots.get(dataset, [])
        parts.append(f"<h2>{esc(dataset)}</h2>")
        if found is not None:
            parts.append("<ul class='verdict'>")
            parts += [f"<li>{esc(sentence)}</li>" for sentence in _details(found)]
            parts.append("</ul>")
        parts += figures(_first_plot(mine, "cost-accuracy"))
        parts += [f"<p class='splits'>{esc(line)}</p>" for line in _split_lines(group)]
        if found is not None:
            parts.append(f"<h3>{esc(_sentence_case(_against_words(found)))}</h3>")
            parts += _html_table(VERDICT_COLUMNS, _verdict_cells(found), "verdict") if found.rows else []
            parts += [f"<p>not compared: <b>{esc(m)}</b>, {esc(why)}</p>" for m, why in found.refused]
        parts += figures(_first_plot(mine, "discordant"))
        parts += _html_table(COLUMNS, [_cells(r) for r in group], "results")
        provenance, versions = _provenance(group)
        every = f" (every row: {esc(versions)})" if versions else ""
        parts.append(f"<h3>How each row was made</h3><p>{every}</p><ul class='provenance'>")
        parts += [f"<li><b>{esc(m)}</b> (<code>{esc(path)}</code>): {esc(how)}</li>" for m, path, how in provenance]
        parts.append("</ul>")
        parts += figures([p for p in mine if not p[1].name.startswith(("cost-accuracy", "discordant"))])
    parts.append("</body></html>")
    return "\n".join(parts)


_Section = tuple[str, list[Row], DatasetVerdict | None]


def _sections(rows: list[Row], margin: float = DEFAULT_MARGIN) -> list[_Section]:
    """Per dataset: its rows (one per cell, best on val first) and the verdict over all its runs (computed once
    for every document)."""
    sections = []
    for dataset, runs in _by_dataset(rows).items():
        runs = [Row(r) for r in runs]  # charged and renamed below: the caller's rows stay as they were
        _charge_probes(runs)
        _unique_methods(runs)
        found = verdict(runs, margin=margin)
        group = _merge_seeds(runs)
        order = {c.method: i for i, c in enumerate(found.rows)} if found else {}
        group.sort(key=lambda r: (order.get(r["method"], len(order)), -(r["val_accuracy"] or -1.0)))
        sections.append((dataset, group, found))
    return sections


def _charge_probes(group: list[Row]) -> None:
    """An LP-FT row's compute includes its probe's (the extraction and the logistic regression its head came
    from): without them it could not have started."""
    by_path = {r["path"]: r for r in group}
    for row in group:
        probe = by_path.get(row.get("init_results") or "")
        if probe is not None and row["compute_s"] is not None and probe["compute_s"] is not None:
            row["compute_s"] += probe["compute_s"]
            row["how"] += f"; its compute includes its probe's ({probe['compute_s']:.1f} s, extraction included)"


def _remove_stale_plots(folder: Path, made: list[Path]) -> None:
    """Figures an earlier report wrote and this one did not (a row or dataset gone): no longer true, so removed."""
    keep = {p.stem for p in made}
    for path in [*folder.glob("*.png"), *folder.glob("*.svg")]:
        if path.stem not in keep:
            path.unlink(missing_ok=True)


def _write_csvs(out: Path, sections: list[_Section]) -> None:
    """``report-verdict.csv`` and ``report-results.csv``: every table of the report, one row per method."""
    import csv
    import io

    for name, header, body in (
        ("report-verdict.csv", VERDICT_COLUMNS, [[d, *c] for d, _, f in sections if f for c in _verdict_cells(f)]),
        ("report-results.csv", COLUMNS, [[d, *_cells(r)] for d, group, _ in sections for r in group]),
    ):
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["dataset", *header])
        writer.writerows(body)
        data = buffer.getvalue().encode("utf-8")
        atomic_write(out / name, lambda fh, data=data: fh.write(data))


def recorded_margin(folder: str | Path) -> float:
    """The margin the folder's last report used (a pipeline's ``margin``), else :data:`DEFAULT_MARGIN`."""
    path = Path(folder) / "report.json"
    try:
        margin = json.loads(path.read_text(encoding="utf-8")).get("margin")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_MARGIN
    return float(margin) if isinstance(margin, int | float) and 0 < margin < 1 else DEFAULT_MARGIN


def write_report(
    out_dir: str | Path,
    title: str | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    rows: list[Row] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (self-contained), ``report.json`` and ``plots/`` into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Where the report goes; its results are read from there unless ``rows`` are given.
    title : str, optional
    margin : float, default=DEFAULT_MARGIN
        The margin of practical equivalence of the decisions (0.01 = 1 pt).
    rows : list of Row, optional
        Rows collected elsewhere (``featx compare`` over several folders).

    Returns
    -------
    dict
        Paths of ``markdown``, ``html`` and ``plots``.
    """
    out = Path(out_dir)
    rows = collect(out) if rows is None else rows
    title = title or f"featx comparison: {out.name}"
    sections = _sections(rows, margin)
    pairs = {dataset: (found.question_rows or found.transfer_rows) if found else None for dataset, _, found in sections}
    plots = plot_datasets({dataset: group for dataset, group, _ in sections}, out / "plots", pairs)
    _remove_stale_plots(out / "plots", [png for made in plots.values() for _, png in made])
    md, page = _markdown(sections, plots, out, title), _html(sections, plots, title)
    atomic_write(out / "report.md", lambda fh: fh.write(md.encode("utf-8")))
    atomic_write(out / "report.html", lambda fh: fh.write(page.encode("utf-8")))
    _write_csvs(out, sections)
    document = {
        "rows": [{k: v for k, v in r.items() if k != "predictions"} for r in rows],  # results.json keep those
        "margin": margin,
        "decisions": _headlines(sections),
        "verdicts": [found.to_dict() for _, _, found in sections if found is not None],
    }
    listing = json.dumps(document, indent=2, default=str)
    atomic_write(out / "report.json", lambda fh: fh.write(listing.encode("utf-8")))
    return {"markdown": out / "report.md", "html": out / "report.html", "plots": out / "plots"}
