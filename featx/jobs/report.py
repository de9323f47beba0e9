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
import re
from pathlib import Path
from typing import Any

import numpy as np

from featx._runtime.io import atomic_write
from featx.finetune.config import edge_words
from featx.jobs.markdown import md_cell, md_code, md_link, md_text
from featx.jobs.plots import plot_datasets
from featx.jobs.verdict import DatasetVerdict, verdict
from featx.results import ClassifierResults, FinetuneResults, NotResultsError, Results, ResultsError, read_results

__all__ = ["COLUMNS", "Row", "collect", "format_table", "write_report"]

log = logging.getLogger(__name__)


COLUMNS = (
    "method",
    "test accuracy [95% CI]",
    "mean ± std over seeds",
    "balanced acc.",
    "macro F1",
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
        compute_s, device = results.get("seconds"), results["finetune"].get("device")
        init = results["finetune"].get("init_head")
        init_results = _relative(Path(init).parent / "results.json", root) if init else None
    else:
        chosen, train_s, extract_s, ips, how = _classifier_numbers(results)
        init_results = None
        dataset = cell.get("dataset") or (results.get("store") or {}).get("path")
        compute_s = (train_s or 0.0) + (extract_s or 0.0)
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
        ci=test.get("accuracy_ci95"),
        balanced=test.get("balanced_accuracy"),
        macro_f1=test.get("macro_f1"),
        chosen=chosen,
        train_s=train_s,
        extract_s=extract_s,
        compute_s=compute_s,
        device=device,
        images_per_s=ips,
        how=how + "; " + ", ".join(f"{k} {versions[k]}" for k in shown if k in versions),
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
        # The same row under another training seed shares this (a `seeds = [...]` row has one cell per seed).
        row_key=re.sub(r"/seed\d+$", "", cell["id"]) if cell.get("id") else _relative(path, root),
        seed_accuracies=None,
    )


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


def _split_words(split: dict[str, Any]) -> str:
    """``train 196, val 49, test 153 (…policy…)`` for a row's provenance."""
    if not split:
        return "not recorded (an older featx)"
    sizes = ", ".join(f"{k} {v}" for k, v in (split.get("sizes") or {}).items())
    return f"{sizes} ({split.get('policy')})"


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
        f"{results.get('best_epoch')}{_best_epoch_words(results)}; splits {_split_words(results.get('split') or {})}; "
        f"{_sweep_words(results)}training seed {ft['seed']}; {ft.get('device')}, amp {ft.get('amp')}"
    )
    # fit_seconds counts the learning-rate candidates that lost too; older results have the curves alone.
    train_s = results["train"].get("fit_seconds") or sum(c["seconds"] for c in curves)
    return f"best epoch {results.get('best_epoch')}", train_s, None, float(np.mean(speeds)) if speeds else None, how


def _classifier_numbers(results: ClassifierResults) -> tuple[str, float, float | None, float | None, str]:
    """A classifier's chosen value, search + fit seconds, the extraction's seconds and images/s, and how."""
    clf = results["classifier"]
    search = results.get("search") or {}
    chosen = f"{clf['param']}={clf['chosen']:g}" if clf.get("param") and clf.get("chosen") is not None else "—"
    train_s = (search.get("seconds") or 0.0) + results["train"]["fit_seconds"]
    stats = (results.get("store") or {}).get("stats") or {}
    spec = results["store"]["spec"]
    steps = ", ".join(clf["preprocess"]) or "none"
    how = (
        f"{clf['preset']} on frozen {spec['backbone']} ({spec['weights']}) layer {clf['layer']}, "
        f"pool {spec['pool']}, {spec['dtype']}, tta {spec['tta']}"
        f"{', decode ' + spec['decode'] if spec.get('decode') not in (None, 'exact') else ''}; "
        f"preprocessing {steps}; {_search_words(clf, search, results)}; class weight "
        f"{clf['class_weight'] or 'none'}; splits {_split_words(results.get('split') or {})}; seed {clf['seed']}"
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


def collect(out_dir: str | Path) -> list[Row]:
    """Every results JSON under ``out_dir`` (a run folder, or any folder of ``results.json`` files).

    Files that are not featx results (another tool's ``results.json``) are passed over; featx results that
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
        rows.append(_row(results, path, out))
    if not rows:
        raise FileNotFoundError(
            f"no featx results.json under {out}; run `featx run`, `featx train` or `featx finetune` first"
        )
    return rows


def _cells(row: Row) -> list[str]:
    acc = _fmt(row["accuracy"])
    if row["ci"] and row["accuracy"] is not None:
        acc = f"{row['accuracy']:.4f} [{row['ci'][0]:.4f}, {row['ci'][1]:.4f}]"
    seeds = row.get("seed_accuracies")
    spread = "—"
    if seeds and all(v is not None for v in seeds.values()):
        values = list(seeds.values())
        spread = f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} ({len(values)} seeds)"
    return [
        row["method"],
        acc,
        spread,
        _fmt(row["balanced"]),
        _fmt(row["macro_f1"]),
        row["chosen"],
        _fmt(row["train_s"], 1),
        _fmt(row["extract_s"], 1),
        _fmt(row["images_per_s"], 1),
    ]


def _by_dataset(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows per dataset, best first; a row run under several training seeds is one row (:func:`_merge_seeds`)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(str(row["dataset"]), []).append(row)
    for name, group in groups.items():
        group = _merge_seeds(group)
        _unique_methods(group)
        group.sort(key=lambda r: -(r["accuracy"] or 0))
        groups[name] = group
    return groups


def _merge_seeds(group: list[Row]) -> list[Row]:
    """One row per cell across its training seeds: the lowest seed's run stands for it (its predictions go into
    the verdict), and ``seed_accuracies`` holds every seed's test accuracy for the mean ± std column."""
    by_key: dict[str, list[Row]] = {}
    for row in group:
        by_key.setdefault(row["row_key"], []).append(row)
    merged = []
    for runs in by_key.values():
        runs.sort(key=lambda r: (r["seed"] is None, r["seed"]))
        first = Row(runs[0])
        if len(runs) > 1:
            first["seed_accuracies"] = {r["seed"]: r["accuracy"] for r in runs}
            first["how"] += (
                f"; seeds {', '.join(str(r['seed']) for r in runs)} (the table's row is seed {runs[0]['seed']})"
            )
        merged.append(first)
    return merged


def _unique_methods(group: list[Row]) -> None:
    """Rows that read alike (two tables of one preset, say) get their result's path, so each is named once."""
    counts: dict[str, int] = {}
    for row in group:
        counts[row["method"]] = counts.get(row["method"], 0) + 1
    for row in group:
        if counts[row["method"]] > 1:
            row["method"] = f"{row['method']} [{row['row_key']}]"


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


def format_table(rows: list[Row]) -> str:
    """A plain-text table per dataset, best method first, then its paired verdict."""
    parts = []
    for dataset, group, found in _sections(rows):
        lines = [f"dataset: {dataset}", *_split_lines(group), *_text_table(COLUMNS, [_cells(r) for r in group])]
        if found is not None:
            lines += ["", f"verdict (each row against the best, paired on the same {found.n_test} test images):"]
            lines += _text_table(VERDICT_COLUMNS, _verdict_cells(found)) if found.rows else []
            lines += [f"- {why}: {method}" for method, why in found.refused]
            lines += [f"=> {sentence}" for sentence in found.sentences]
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
    "accuracy",
    "Δ vs best, pt [paired 95% CI]",
    "only best / only row right",
    "McNemar p (Holm)",
    "compute s (device)",
    "× best's compute",
)


def _verdict_cells(found: DatasetVerdict) -> list[list[str]]:
    out = []
    for c in found.rows:
        is_reference = c.method == found.reference
        out.append(
            [
                c.method + (" (best)" if is_reference else ""),
                f"{c.accuracy:.4f}",
                "—" if is_reference else f"{100 * c.difference:+.1f} [{100 * c.ci95[0]:.1f}, {100 * c.ci95[1]:.1f}]",
                "—" if is_reference else f"{c.only_reference_right} / {c.only_row_right}",
                "—" if is_reference else f"{c.p_value:.3g} ({c.p_holm:.3g})",
                _fmt(c.compute_seconds, 1) + (f" ({c.device})" if c.device else ""),
                _fmt(c.cost_ratio, 2),
            ]
        )
    return out


# ------------------------------------------------------------------------------------------- documents
def _md_table(header: tuple[str, ...] | list[str], body: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(md_cell(c) for c in header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(md_cell(c) for c in r) + " |" for r in body),
    ]


def _markdown(sections: list[_Section], plots: list[tuple[str, Path]], out: Path, title: str) -> str:
    lines = [f"# {md_text(title)}", ""]
    for dataset, group, found in sections:
        lines += [f"## {md_text(dataset)}", "", *(f"{md_text(line)}  " for line in _split_lines(group)), ""]
        if found is not None:
            lines += [f"**Verdict** (paired on the same {found.n_test} test images):", ""]
            lines += [f"- {md_text(sentence)}" for sentence in found.sentences] + [""]
            lines += [*_md_table(VERDICT_COLUMNS, _verdict_cells(found)), ""] if found.rows else []
            lines += [f"- not compared: **{md_text(method)}**, {md_text(why)}" for method, why in found.refused]
        lines += _md_table(COLUMNS, [_cells(r) for r in group])
        lines += ["", "How each row was made:", ""]
        lines += [f"- **{md_text(r['method'])}** ({md_code(r['path'])}): {md_text(r['how'])}" for r in group]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{md_text(title_)}]({md_link(p.relative_to(out).as_posix())})" for title_, p in plots]
    return "\n".join(lines) + "\n"


def _html_table(header: tuple[str, ...] | list[str], body: list[list[str]], css: str) -> list[str]:
    esc = html.escape
    parts = [f"<table class='{css}'><thead><tr>", *(f"<th>{esc(c)}</th>" for c in header), "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body]
    return [*parts, "</tbody></table>"]


def _html(sections: list[_Section], plots: list[tuple[str, Path]], title: str) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}"
        "li{margin:.3em 0}figure{margin:1.5em 0}img{max-width:100%}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for dataset, group, found in sections:
        parts.append(f"<h2>{esc(dataset)}</h2>")
        parts += [f"<p class='splits'>{esc(line)}</p>" for line in _split_lines(group)]
        if found is not None:
            parts.append(f"<h3>Verdict (paired on the same {found.n_test} test images)</h3><ul class='verdict'>")
            parts += [f"<li>{esc(sentence)}</li>" for sentence in found.sentences]
            parts.append("</ul>")
            parts += _html_table(VERDICT_COLUMNS, _verdict_cells(found), "verdict") if found.rows else []
            parts += [f"<p>not compared: <b>{esc(m)}</b>, {esc(why)}</p>" for m, why in found.refused]
        parts += _html_table(COLUMNS, [_cells(r) for r in group], "results")
        parts.append("<h3>How each row was made</h3><ul class='provenance'>")
        parts += [f"<li><b>{esc(r['method'])}</b> (<code>{esc(r['path'])}</code>): {esc(r['how'])}</li>" for r in group]
        parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for caption, png in plots:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


_Section = tuple[str, list[Row], DatasetVerdict | None]


def _sections(rows: list[Row]) -> list[_Section]:
    """Per dataset: its rows, best first, and their paired verdict (computed once for every document)."""
    groups = _by_dataset(rows)
    for group in groups.values():
        _charge_probes(group)
    return [(dataset, group, verdict(group)) for dataset, group in groups.items()]


def _charge_probes(group: list[Row]) -> None:
    """An LP-FT row's compute includes its probe's (the extraction and the logistic regression its head came
    from): without them it could not have started."""
    by_path = {r["path"]: r for r in group}
    for row in group:
        probe = by_path.get(row.get("init_results") or "")
        if probe is not None and row["compute_s"] is not None and probe["compute_s"] is not None:
            row["compute_s"] += probe["compute_s"]
            row["how"] += f"; its compute includes its probe's ({probe['compute_s']:.1f} s, extraction included)"


def write_report(out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (self-contained) and ``plots/`` into ``out_dir``.

    Returns
    -------
    dict
        Paths of ``markdown``, ``html`` and ``plots``.
    """
    out = Path(out_dir)
    rows = collect(out)
    title = title or f"featx comparison: {out.name}"
    sections = _sections(rows)
    plots = plot_datasets({dataset: group for dataset, group, _ in sections}, out / "plots")
    md, page = _markdown(sections, plots, out, title), _html(sections, plots, title)
    atomic_write(out / "report.md", lambda fh: fh.write(md.encode("utf-8")))
    atomic_write(out / "report.html", lambda fh: fh.write(page.encode("utf-8")))
    document = {
        "rows": [{k: v for k, v in r.items() if k != "predictions"} for r in rows],  # results.json keep those
        "verdicts": [found.to_dict() for _, _, found in sections if found is not None],
    }
    listing = json.dumps(document, indent=2, default=str)
    atomic_write(out / "report.json", lambda fh: fh.write(listing.encode("utf-8")))
    return {"markdown": out / "report.md", "html": out / "report.html", "plots": out / "plots"}
