"""The paper's Table 2 from ``rafmodel eval`` outputs: methods as rows, metrics as columns.

``compare(paths)`` reads ``metrics.json`` files (given directly, or found anywhere under the
given folders: a run folder holds ``eval/metrics.json``, a multi-run eval folder holds one per
run), groups them by method (the run's aug, plus top-k / bank / p when not the defaults),
averages each metric over the runs of a method (e.g. over subjects, as the paper does) and
marks the best value per column: higher is better for PSNR, SSIM and emotion similarity,
lower for LPIPS, AED, APD and coefficient errors. Columns (:data:`COLUMNS`) are the paper's
Table 2 / Table 3 layout: a self-driving group and a cross-driving group, each with PSNR,
SSIM, LPIPS, AED, APD and emotion similarity, then extras.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rafdata.errors import RafDataError
from rafmodel import stats

GROUPINGS = ("method", "run")  # compare(by=...); the first is the default


@dataclass(frozen=True)
class Column:
    """One table column: ``key`` in the rows, its header, where it is read, its direction."""

    key: str
    header: str
    section: str  # "self" or "cross"
    metric: str  # key in the section's "mean"
    higher_is_better: bool

    def value(self, means: dict[str, dict[str, Any] | None]) -> float | None:
        """This column's number in :func:`section_means`-shaped ``means``; None when it is
        absent, not a number or not finite (a failed metric)."""
        x = (means.get(self.section) or {}).get(self.metric)
        try:
            x = float(x)
        except (TypeError, ValueError):
            return None
        return x if math.isfinite(x) else None


COLUMNS: tuple[Column, ...] = (
    # Table 2 / Table 3 of the paper: a self-driving and a cross-driving group, each PSNR, SSIM,
    # LPIPS, AED, APD, emotion similarity. APD is the rotation part (apd_rot); cross-driving
    # PSNR / SSIM / LPIPS are against the synthetic ground truth (null on real data). Then
    # extras: translation APD and the synthetic coefficient read-back error.
    Column("self_psnr", "self PSNR", "self", "psnr", True),
    Column("self_ssim", "self SSIM", "self", "ssim", True),
    Column("self_lpips", "self LPIPS", "self", "lpips", False),
    Column("self_aed", "self AED", "self", "aed", False),
    Column("self_apd", "self APD", "self", "apd_rot", False),
    Column("self_emotion", "self emo sim", "self", "emotion_sim", True),
    Column("cross_gt_psnr", "cross PSNR (GT)", "cross", "gt_psnr", True),
    Column("cross_gt_ssim", "cross SSIM (GT)", "cross", "gt_ssim", True),
    Column("cross_gt_lpips", "cross LPIPS (GT)", "cross", "gt_lpips", False),
    Column("cross_aed", "cross AED", "cross", "aed", False),
    Column("cross_apd", "cross APD", "cross", "apd_rot", False),
    Column("cross_emotion", "cross emo sim", "cross", "emotion_sim", True),
    Column("self_apd_trans", "self APD trans", "self", "apd_trans", False),
    Column("cross_apd_trans", "cross APD trans", "cross", "apd_trans", False),
    Column("cross_readback_exp", "cross exp err", "cross", "readback_exp_l1", False),
)


def find_metrics(paths: Sequence[str | Path]) -> list[Path]:
    """metrics.json files: the given files, and every one found under the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted(p.rglob("metrics.json"))
            if not hits:
                raise RafDataError(p, "no metrics.json under this folder (run rafmodel eval)")
            found += hits
        else:
            raise RafDataError(p, "no such file or folder")
    seen: dict[Path, None] = {}
    for f in found:
        seen.setdefault(f.resolve(), None)
    return list(seen)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a metrics.json, a sweep's cell.json); RafDataError naming
    the file when it cannot be read or holds no object."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RafDataError(path, f"unreadable ({err})") from None
    if not isinstance(doc, dict):
        raise RafDataError(path, "not a JSON object (a metrics.json or cell.json)")
    return doc


def load_metrics(path: Path) -> dict[str, Any]:
    """One ``metrics.json`` of ``rafmodel eval`` (it names the run's ``method`` and
    ``subject``); RafDataError naming the file for anything else."""
    doc = read_json(path)
    if "method" not in doc or "subject" not in doc:
        raise RafDataError(path, "not a metrics.json written by rafmodel eval")
    return doc


def section_means(doc: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """``{"self": means, "cross": means}`` of a metrics.json document (None: no such
    section), the shape a sweep's cell.json stores as ``metrics``."""
    return {s: (doc.get(s) or {}).get("mean") for s in ("self", "cross")}


def compare(paths: Sequence[str | Path], by: str = GROUPINGS[0]) -> list[dict[str, Any]]:
    """Table rows, one per method (``by="method"``) or per run (``by="run"``).

    Each row: ``method``, ``runs`` (count), ``subjects`` (list), and every column key of
    :data:`COLUMNS` (mean over the method's runs; None where no run has the metric).
    """
    from rafmodel.evaluate import method_label

    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, not {by!r}")
    docs = [(p, load_metrics(p)) for p in find_metrics(paths)]
    if not docs:
        raise RafDataError(None, "no metrics files given")
    groups: dict[str, list[dict[str, Any]]] = {}
    for p, doc in docs:
        key = method_label(doc["method"]) if by == "method" else \
            f"{doc.get('label', '?')} [{doc['subject']}] ({p.parent.name})"
        groups.setdefault(key, []).append(doc)
    rows = []
    for key, group in groups.items():
        row: dict[str, Any] = {"method": key, "runs": len(group),
                               "subjects": sorted({str(d["subject"]) for d in group})}
        means = [section_means(d) for d in group]
        for col in COLUMNS:
            vals = [v for v in (col.value(m) for m in means) if v is not None]
            row[col.key] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return rows


def present_columns(rows: Sequence[dict[str, Any]]) -> list[Column]:
    """The columns at least one row has a value for."""
    return [c for c in COLUMNS if any(r.get(c.key) is not None for r in rows)]


def best(rows: Sequence[dict[str, Any]], col: Column) -> float | None:
    """The best value of a column (max or min by its direction); None when it is empty."""
    vals = [r[col.key] for r in rows if r.get(col.key) is not None]
    if not vals:
        return None
    return max(vals) if col.higher_is_better else min(vals)


def format_table(rows: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """A Markdown table (methods as rows), the best value per column in **bold**.

    Ties are all bold. Arrows in the header say which direction is better.
    """
    cols = present_columns(rows)
    head = ["method", "runs"] + [f"{c.header} {'↑' if c.higher_is_better else '↓'}"
                                 for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tops = {c.key: best(rows, c) for c in cols}
    for r in rows:
        cells = [str(r["method"]), str(r["runs"])]
        for c in cols:
            v = r.get(c.key)
            if v is None:
                cells.append("-")
                continue
            text = f"{v:.{digits}f}"
            top = tops[c.key]
            cells.append(f"**{text}**" if top is not None and
                         f"{top:.{digits}f}" == text else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Rows, the columns shown, their directions and the best method per column."""
    cols = present_columns(rows)
    doc = {
        "columns": [{"key": c.key, "header": c.header, "higher_is_better": c.higher_is_better}
                    for c in cols],
        "rows": list(rows),
        "best": {c.key: [r["method"] for r in rows if r.get(c.key) is not None
                         and r[c.key] == best(rows, c)] for c in cols},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One line per method: method, runs, subjects (``;``-joined) and the columns shown."""
    cols = present_columns(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "runs", "subjects"] + [c.key for c in cols])
        for r in rows:
            w.writerow([r["method"], r["runs"], ";".join(r["subjects"])] +
                       ["" if r.get(c.key) is None else f"{r[c.key]:.6g}" for c in cols])
    return path


def compare_stats(paths: Sequence[str | Path], baseline: str = stats.BASELINE,
                  n_boot: int = stats.N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The statistics mode (``rafmodel compare --stats``): over a sweep folder (its
    ``cell.json`` files) or metrics.json files, mean ± std per method and metric over seeds and
    subjects, and paired differences against ``baseline`` with bootstrap CIs; the same columns
    as :func:`compare`. See :mod:`rafmodel.stats` (its ``format_markdown``, ``write_json``,
    ``write_csv`` and ``plot`` render the result)."""
    return stats.summarize(stats.load_records(paths), baseline=baseline, n_boot=n_boot,
                           seed=seed)


__all__ = ["COLUMNS", "GROUPINGS", "Column", "best", "compare", "compare_stats",
           "find_metrics", "format_table", "load_metrics", "present_columns", "read_json",
           "section_means", "write_csv", "write_json"]
