"""Shares, 95% Wilson intervals and exact binomial tests of the study's answers; Figure 3."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

from rafdata.study.keyfile import COMPARISONS, QUESTIONS, KeyRow, read_answers, read_key

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n; (0, 1) when n is 0 (nothing is known)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial test of p = 1/2: P(|X - n/2| >= |k - n/2|).

    With p = 1/2 the distribution is symmetric, so this is twice the smaller tail (capped at
    1), the same as scipy.stats.binomtest. Exact integer arithmetic: no underflow at large n.
    """
    if n == 0:
        return 1.0
    lo = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(lo + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def catch_failures(answers: list[dict[str, str]], key: dict[str, KeyRow]) -> set[str]:
    """Workers who got any catch trial wrong: a tie or the random frame, in either question,
    when one candidate is the query itself."""
    bad = set()
    for a in answers:
        row = key[a["item"]]
        if row.comparison == "catch":
            right = row.side_of("self")
            if any(a[q] != right for q in QUESTIONS):
                bad.add(a["worker"])
    return bad


def analyze(folder: str | Path, answers_path: str | Path,
            key_path: str | Path | None = None) -> dict[str, Any]:
    """Join ``answers_path`` with the key of study ``folder``; the Figure 3 numbers.

    Every worker who fails a catch trial is dropped entirely. Per comparison and question:
    counts and shares preferring each side and ties (share of all kept answers, with Wilson
    intervals) and the exact two-sided binomial test of no preference, ties excluded.
    """
    key = read_key(Path(folder), None if key_path is None else Path(key_path))
    answers = read_answers(Path(answers_path), key)
    dropped = catch_failures(answers, key)
    kept = [a for a in answers if a["worker"] not in dropped]
    workers = {a["worker"] for a in answers}
    out: dict[str, Any] = {
        "answers": len(answers), "workers": len(workers),
        "dropped_workers": sorted(dropped), "kept_answers": len(kept),
        "ties": "excluded from the binomial test; included in the shares",
        "comparisons": {},
    }
    for comp, (a_method, b_method) in COMPARISONS.items():
        if comp == "catch" or not any(r.comparison == comp for r in key.values()):
            continue  # a batch made without --small-bank has no nn_vs_small to report
        rows = [a for a in kept if key[a["item"]].comparison == comp]
        res: dict[str, Any] = {"methods": [a_method, b_method], "answers": len(rows)}
        for q in QUESTIONS:
            na = sum(a[q] == key[a["item"]].side_of(a_method) for a in rows)
            nt = sum(a[q] == "tie" for a in rows)
            nb = len(rows) - na - nt
            n = len(rows)
            entry: dict[str, Any] = {}
            for label, k in ((a_method, na), (b_method, nb), ("tie", nt)):
                lo, hi = wilson(k, n)
                # None, not NaN, without answers: --json must stay valid JSON
                entry[label] = {"count": k, "share": k / n if n else None,
                                "ci95": [lo, hi]}
            entry["binomial_p"] = binom_two_sided(na, na + nb)
            entry["binomial_n"] = na + nb
            res[q] = entry
        out["comparisons"][comp] = res
    return out


def plot_figure3(result: dict[str, Any], path: str | Path) -> Path:
    """Figure 3: per comparison and question, the shares of each side and ties with their
    Wilson intervals, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    comps = list(result["comparisons"].items())
    fig, axes = plt.subplots(1, len(comps), figsize=(4.5 * len(comps), 3.6), squeeze=False)
    for ax, (_, res) in zip(axes[0], comps, strict=True):
        labels = [*res["methods"], "tie"]
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            shares = [res[q][label]["share"] or 0.0 for q in QUESTIONS]
            err = [[s - res[q][label]["ci95"][0] for s, q in zip(shares, QUESTIONS, strict=True)],
                   [res[q][label]["ci95"][1] - s for s, q in zip(shares, QUESTIONS, strict=True)]]
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(QUESTIONS))]
            ax.bar(xs, shares, width, yerr=err, capsize=3, label=label.replace("_", " "))
        ax.set_xticks(range(len(QUESTIONS)), [q.capitalize() for q in QUESTIONS])
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of answers")
        ax.set_title(f"{res['methods'][0]} vs {res['methods'][1]}".replace("_", " "))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
