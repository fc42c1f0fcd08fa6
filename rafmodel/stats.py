"""Honest statistics over a sweep: mean +/- std over seeds and subjects, and paired
differences against a baseline method with bootstrap confidence intervals.

Input: one record per cell (subject, method, seed) with its evaluation means, read from a
sweep's ``cell.json`` files (``rafmodel sweep``) or from ``metrics.json`` files of ``rafmodel
eval`` (method = the run's Table 2 label, seed = the run's training seed).

For each method and metric column (the columns of :data:`rafmodel.compare.COLUMNS`):

- ``mean``, ``std`` (sample standard deviation, ddof 1; None for one cell) and ``n`` over every
  (subject, seed) cell of that method;
- against the baseline (``vanilla``): the differences ``method - baseline`` of the cells
  present in both, paired by (subject, seed) so that a subject's difficulty and a seed's
  luck cancel; their mean and a percentile bootstrap confidence interval (95%, 10 000
  resamples of the pairs with replacement, a fixed generator seed: the same inputs give the
  same interval). ``significant`` when the interval excludes zero (and there are at least
  two pairs: one pair has no spread to resample); ``better`` says whether the mean difference
  goes the metric's good way. The pairs are resampled as independent units: seeds of one
  subject share that subject, so with few subjects the interval is optimistic about
  generalising to new subjects (it answers "on these subjects", as the paper's table does).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rafdata.errors import RafDataError

CONFIDENCE = 0.95
N_BOOT = 10_000
BASELINE = "vanilla"  # the method the others are paired against (the paper's Vanilla)


# -- records --------------------------------------------------------------------------------
def _record(path: Path) -> dict[str, Any] | None:
    """(subject, method, seed, metrics) of one file; None for a cell not done."""
    from rafmodel.compare import load_metrics, read_json, section_means  # compare imports us

    if path.name == "cell.json":
        doc = read_json(path)
        if doc.get("state") != "done":
            return None
        return {"subject": str(doc["subject"]), "method": str(doc["method"]),
                "seed": int(doc["seed"]), "metrics": doc.get("metrics") or {}, "path": str(path)}
    doc = load_metrics(path)
    from rafmodel.evaluate import method_label

    return {"subject": str(doc["subject"]), "method": method_label(doc["method"]),
            "seed": int(doc["method"].get("seed", 0)), "path": str(path),
            "metrics": section_means(doc)}


def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One record per cell: from ``cell.json`` files when a folder holds a sweep (only done
    cells), else from the ``metrics.json`` files found (see :func:`rafmodel.compare.find_metrics`).
    Two records of one (subject, method, seed) are refused (ambiguous pairing)."""
    from rafmodel.compare import find_metrics

    files: list[Path] = []
    for p in map(Path, paths):
        cells = sorted(p.rglob("cell.json")) if p.is_dir() else []
        if cells:
            files += cells
        elif p.is_file() and p.name == "cell.json":
            files.append(p)
        else:
            files += find_metrics([p])
    records, seen = [], {}
    for f in dict.fromkeys(x.resolve() for x in files):
        rec = _record(f)
        if rec is None:
            continue
        key = (rec["subject"], rec["method"], rec["seed"])
        if key in seen:
            raise RafDataError(f, f"a second result for subject {key[0]}, method {key[1]}, "
                               f"seed {key[2]} (the first: {seen[key]}); give one of them")
        seen[key] = f
        records.append(rec)
    if not records:
        raise RafDataError(Path(paths[0]) if paths else None, "no finished cells or metrics")
    return records


# -- statistics -----------------------------------------------------------------------------
def bootstrap_ci(diffs: Sequence[float], n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (resampled with replacement)."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(records: Sequence[dict[str, Any]], baseline: str = BASELINE,
              n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
              seed: int = 0) -> dict[str, Any]:
    """The statistics (see the module docstring) as a JSON-ready dict:
    ``{"baseline", "confidence", "n_boot", "columns": [...], "methods": [{"method", "cells",
    "subjects", "seeds", "stats": {col: {n, mean, std}}, "vs_baseline": {col: {n, diff, lo,
    hi, significant, better}} (absent for the baseline itself)}]}``."""
    import numpy as np

    from rafmodel.compare import COLUMNS

    methods = list(dict.fromkeys(r["method"] for r in records))
    if baseline in methods:  # the baseline first, as in the paper's tables
        methods.remove(baseline)
        methods.insert(0, baseline)
    cols = [c for c in COLUMNS if any(c.value(r["metrics"]) is not None for r in records)]
    by_key = {(r["subject"], r["method"], r["seed"]): r for r in records}
    out = []
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        entry: dict[str, Any] = {"method": m, "cells": len(mine),
                                 "subjects": sorted({r["subject"] for r in mine}),
                                 "seeds": sorted({r["seed"] for r in mine}), "stats": {}}
        for c in cols:
            vals = [v for v in (c.value(r["metrics"]) for r in mine) if v is not None]
            entry["stats"][c.key] = {
                "n": len(vals), "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
        if m != baseline and baseline in methods:
            entry["vs_baseline"] = {}
            for c in cols:
                diffs = []
                for r in mine:
                    base = by_key.get((r["subject"], baseline, r["seed"]))
                    a = c.value(r["metrics"])
                    b = None if base is None else c.value(base["metrics"])
                    if a is not None and b is not None:
                        diffs.append(a - b)
                if not diffs:
                    entry["vs_baseline"][c.key] = {"n": 0, "diff": None, "lo": None,
                                                   "hi": None, "significant": False,
                                                   "better": None}
                    continue
                lo, hi = bootstrap_ci(diffs, n_boot, confidence, seed)
                mean = float(np.mean(diffs))
                entry["vs_baseline"][c.key] = {
                    "n": len(diffs), "diff": mean, "lo": lo, "hi": hi,
                    "significant": len(diffs) >= 2 and (lo > 0 or hi < 0),
                    "better": mean > 0 if c.higher_is_better else mean < 0}
        out.append(entry)
    return {"baseline": baseline, "confidence": confidence, "n_boot": n_boot,
            "columns": [{"key": c.key, "header": c.header,
                         "higher_is_better": c.higher_is_better} for c in cols],
            "methods": out}


# -- output ---------------------------------------------------------------------------------
def _f(x: float | None, digits: int, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_markdown(summary: dict[str, Any], digits: int = 3) -> str:
    """Two Markdown tables: mean ± std per method, then paired differences against the
    baseline with their confidence intervals; a difference whose interval excludes zero is
    **bold** with ✓ when it goes the metric's good way and ✗ when it goes the other."""
    cols = summary["columns"]
    arrows = [f"{c['header']} {'↑' if c['higher_is_better'] else '↓'}" for c in cols]
    lines = ["| method | cells | " + " | ".join(arrows) + " |",
             "|---|---|" + "---|" * len(cols)]
    for m in summary["methods"]:
        cells = []
        for c in cols:
            s = m["stats"][c["key"]]
            cells.append("-" if s["mean"] is None else _f(s["mean"], digits) + (
                f" ± {_f(s['std'], digits)}" if s["std"] is not None else ""))
        lines.append(f"| {m['method']} | {m['cells']} | " + " | ".join(cells) + " |")
    pct = round(100 * summary["confidence"])
    others = [m for m in summary["methods"] if "vs_baseline" in m]
    if others:
        lines += ["", f"Paired difference vs {summary['baseline']} (same subject and seed), "
                  f"mean [{pct}% bootstrap CI]; **bold**: the interval excludes 0 "
                  "(✓ better, ✗ worse).", "",
                  "| method | pairs | " + " | ".join(arrows) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for m in others:
            cells, pairs = [], 0
            for c in cols:
                d = m["vs_baseline"][c["key"]]
                pairs = max(pairs, d["n"])
                if d["diff"] is None:
                    cells.append("-")
                    continue
                text = (f"{_f(d['diff'], digits, True)} [{_f(d['lo'], digits, True)}, "
                        f"{_f(d['hi'], digits, True)}]")
                cells.append(f"**{text}** {'✓' if d['better'] else '✗'}"
                             if d["significant"] else text)
            lines.append(f"| {m['method']} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(summary: dict[str, Any], method: str, keys: Sequence[str] | None = None) \
        -> list[str]:
    """Plain sentences: is ``method`` significantly better than the baseline, per metric."""
    entry = next((m for m in summary["methods"] if m["method"] == method), None)
    if entry is None or "vs_baseline" not in entry:
        return [f"{method}: no paired cells with {summary['baseline']}"]
    pct = round(100 * summary["confidence"])
    out = []
    for c in summary["columns"]:
        if keys is not None and c["key"] not in keys:
            continue
        d = entry["vs_baseline"][c["key"]]
        if d["diff"] is None:
            continue
        if d["significant"]:
            word = "significantly better" if d["better"] else "significantly WORSE"
        else:
            word = "not significantly different"
        out.append(f"{method} vs {summary['baseline']}, {c['header']}: {word} "
                   f"(difference {d['diff']:+.4g}, {pct}% CI [{d['lo']:+.4g}, {d['hi']:+.4g}],"
                   f" {d['n']} pairs)")
    return out


def write_json(summary: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    return path


def write_csv(summary: dict[str, Any], path: str | Path) -> Path:
    """Long format: one line per (method, metric) with the statistics and the comparison."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "n", "mean", "std", "pairs", "diff", "ci_lo", "ci_hi",
                    "significant", "better"])
        for m in summary["methods"]:
            for c in summary["columns"]:
                s = m["stats"][c["key"]]
                d = (m.get("vs_baseline") or {}).get(c["key"]) or {}
                w.writerow([m["method"], c["key"], s["n"]] + [
                    "" if v is None else f"{v:.6g}" for v in (s["mean"], s["std"])] + [
                    d.get("n", "")] + ["" if d.get(k) is None else f"{d[k]:.6g}"
                                       for k in ("diff", "lo", "hi")] + [
                    d.get("significant", ""), "" if d.get("better") is None else d["better"]])
    return path


def plot(summary: dict[str, Any], path: str | Path) -> Path:
    """Bars per metric (one panel each): each method's mean with ± std error bars; a star
    over a bar whose paired difference against the baseline is significant. PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = summary["columns"]
    methods = summary["methods"]
    n = max(1, len(cols))
    ncol = min(n, 4)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.8 * nrow), squeeze=False)
    for ax, c in zip(axes.flat, cols, strict=False):
        means = [m["stats"][c["key"]]["mean"] for m in methods]
        stds = [m["stats"][c["key"]]["std"] or 0.0 for m in methods]
        xs = range(len(methods))
        ax.bar(xs, [0.0 if v is None else v for v in means], yerr=stds, capsize=3,
               color=[f"C{i}" for i in xs])
        for i, m in enumerate(methods):
            d = (m.get("vs_baseline") or {}).get(c["key"]) or {}
            if d.get("significant") and means[i] is not None:
                ax.annotate("*", (i, means[i] + stds[i]), ha="center", va="bottom")
        ax.set_xticks(list(xs), [m["method"] for m in methods], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(f"{c['header']} {'↑' if c['higher_is_better'] else '↓'}", fontsize=9)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["BASELINE", "CONFIDENCE", "N_BOOT", "bootstrap_ci", "format_markdown", "load_records", "plot",
           "summarize", "verdicts", "write_csv", "write_json"]
