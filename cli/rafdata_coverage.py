"""`rafdata coverage` and `rafdata plot-bank`: the coverage analysis (rafdata.coverage) and the
bank figure (rafdata.plots). Thin front ends; register both on the `rafdata` group."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from cli.common import split_list
from rafdata.config import CoverageConfig, PlotBankConfig
from rafdata.errors import StoreError
from rafdata.progress import RichProgress

_D = CoverageConfig()
_P = PlotBankConfig()


def _fmt(v: float, pct: bool = False) -> str:
    if not math.isfinite(v):
        return "-"
    if pct:
        colour = "green" if v < 0 else "red" if v > 0 else ""
        text = f"{v:+.0f}%"
        return f"[{colour}]{text}[/]" if colour else text
    return f"{v:.3g}"


def coverage_table(rows: list[dict], average: dict | None) -> Table:
    """Rich table: one row per subject, Vanilla / +RAF / change for MMD, KL and B2T."""
    table = Table(title="Coverage of the driver expressions (lower is better)",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("subject", style="bold", no_wrap=True)
    table.add_column("N", justify="right", no_wrap=True)
    for metric in ("MMD²", "KL", "B2T"):
        table.add_column(f"{metric}\nVanilla", justify="right", no_wrap=True)
        table.add_column(f"{metric}\n+RAF", justify="right", no_wrap=True)
        table.add_column(f"{metric}\nΔ", justify="right", no_wrap=True)
    for i, r in enumerate([*rows, *([average] if average else [])]):
        cells = [str(r["subject"]), str(r.get("n", ""))]
        for m in ("mmd", "kl", "b2t"):
            cells += [_fmt(r["vanilla"][m]), _fmt(r["raf"][m]), _fmt(r["change_pct"][m], True)]
        table.add_row(*cells, end_section=(average is not None and i == len(rows) - 1))
    return table


@click.command("coverage")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--subject", default=None, help="Identity to analyse, e.g. 388.")
@click.option("--all", "all_", is_flag=True,
              help="Every identity with driver timesteps, plus the average row.")
@click.option("--bank", default=_D.bank, show_default=True,
              help="Bank whose neighbour table gives the +RAF neighbours.")
@click.option("--drivers", default=None,
              help="Driver sequence names and/or identities (comma separated) forming the "
                   "target: sequences restrict which sequences, identities (or `images`: those "
                   "with held-out images, `rafmodel eval`'s default drivers) whose timesteps "
                   "[default: every held-out sequence of every identity].")
@click.option("--exclude-own-drivers", is_flag=True,
              help="Leave the subject's own driver timesteps out of its target.")
@click.option("--n", "n", type=int, default=None,
              help="Training vectors per condition [default: min(2000, available)].")
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Sampling seed.")
@click.option("--max-target", type=int, default=_D.max_target, show_default=True,
              help="At most this many target vectors (a seeded subset beyond).")
@click.option("--pca-components", type=int, default=_D.pca_components, show_default=True,
              help="PCA components (fitted on the target) for the KL estimate.")
@click.option("--kde-bandwidth", type=float, default=None,
              help="KDE width in target-whitened PCA units [default: Scott's rule].")
@click.option("--mmd-bandwidth", type=float, default=None,
              help="RBF kernel width in expression units [default: median heuristic on the "
                   "target].")
@click.option("--unbiased", is_flag=True, help="Unbiased (U-statistic) MMD² estimator.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table.")
def coverage(store: Path, subject: str | None, all_: bool, bank: str, drivers: str | None,
             exclude_own_drivers: bool, n: int | None, seed: int, max_target: int,
             pca_components: int, kde_bandwidth: float | None, mmd_bandwidth: float | None,
             unbiased: bool, json_path: Path | None, quiet: bool) -> None:
    """Coverage of the driver expressions by SUBJECT's training expressions, Vanilla vs +RAF:
    MMD² (RBF), KL by KDE in PCA space, and B2T (mean nearest-training distance)."""
    if (subject is None) == (not all_):
        raise StoreError(store, "pass exactly one of --subject ID or --all")
    tokens = None if drivers is None else split_list(drivers)
    if drivers is not None and not tokens:
        raise StoreError(store, "--drivers names no sequence or identity")
    cfg = CoverageConfig(
        n=n, seed=seed, bank=bank, include_own_drivers=not exclude_own_drivers,
        max_target=max_target, pca_components=pca_components, kde_bandwidth=kde_bandwidth,
        mmd_bandwidth=mmd_bandwidth, mmd_unbiased=unbiased,
    )
    from rafdata.coverage import coverage_report  # numpy, h5py: only when run

    # a bar for --all only: one subject is a single step
    with RichProgress(quiet=quiet or not all_) as progress:
        result = coverage_report(store, cfg, subject=subject, drivers=tokens,
                                 progress=progress)
    rows, average = result["subjects"], result.get("average")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        console = Console()
        if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
            console = Console(width=120)
        console.print(coverage_table(rows, average))
        r0 = rows[0]
        console.print(
            f"target: {r0['n_target']} driver vectors; MMD² biased={not unbiased}, kernel "
            f"width {r0['mmd_bandwidth']:.4g}; KL in {r0['pca_components']} PCA dims, KDE "
            f"width {r0['kde_bandwidth']:.3g} (whitened); B2T in expression units",
            highlight=False,
        )


@click.command("plot-bank")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="PNG file to write.")
@click.option("--bank", default=_P.bank, show_default=True, help="Bank to draw.")
@click.option("--queries", default=None,
              help="Query timestep rows, comma separated [default: random held-out ones].")
@click.option("--n-queries", type=int, default=_P.n_queries, show_default=True,
              help="Random queries drawn when --queries is not given.")
@click.option("--seed", type=int, default=_P.seed, show_default=True,
              help="Query sampling seed.")
def plot_bank(store: Path, out: Path, bank: str, queries: str | None, n_queries: int,
              seed: int) -> None:
    """PCA picture of bank BANK of STORE: members (grey), queries (stars) and their 10 nearest
    bank neighbours of other identities."""
    from rafdata.plots import plot_bank as _plot_bank

    rows = None
    if queries is not None:
        try:
            rows = tuple(int(q) for q in split_list(queries) or ())
        except ValueError:
            raise StoreError(None, f"--queries must be timestep rows (integers), got "
                                   f"{queries!r}") from None
        if not rows:
            raise StoreError(None, "--queries names no timestep row")
    cfg = PlotBankConfig(bank=bank, queries=rows, n_queries=n_queries, seed=seed)
    info = _plot_bank(store, out, cfg)
    Console().print(f"wrote {out} ({len(info['queries'])} queries: "
                    f"{', '.join(map(str, info['queries']))})", highlight=False)
