"""`rafdata build-bank`: the expression bank and neighbour tables of a store (rafdata.bank)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from cli.common import split_list
from rafdata.config import BankConfig, default_threads
from rafdata.errors import StoreError
from rafdata.progress import RichProgress

_D = BankConfig(threads=1)


@click.command("build-bank")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--name", default=_D.name, show_default=True,
              help="Bank name: /banks/NAME. The trainer picks one with --bank NAME.")
@click.option("--frames-per-id", type=int, default=_D.frames_per_id, show_default=True,
              help="Timesteps drawn at random per identity (all where fewer); never from "
                   "held-out sequences.")
@click.option("--seed", type=int, default=_D.seed, show_default=True,
              help="Seeds member sampling, the HNSW build and the recall sample.")
@click.option("--k", "k", type=int, default=_D.k, show_default=True,
              help="Neighbours per timestep, all of other identities.")
@click.option("--M", "m", type=int, default=_D.M, show_default=True, help="HNSW graph degree.")
@click.option("--ef-construction", type=int, default=_D.ef_construction, show_default=True,
              help="HNSW build beam.")
@click.option("--ef", type=int, default=_D.ef, show_default=True,
              help="HNSW search beam (hnswlib uses at least the queried k).")
@click.option("--threads", type=int, default=None,
              help="Query threads [default: cores available]. The build always uses one "
                   "thread so the index is reproducible.")
@click.option("--identities", default=None,
              help="Only these identities, e.g. '388,422' ('17' matches '017').")
@click.option("--identity-fraction", type=float, default=None,
              help="Only a seeded share of the identities: they are permuted with "
                   "--subset-seed and cut into blocks of round(F x identities); --subset-part "
                   "picks the block. Example: two disjoint half banks are "
                   "'--identity-fraction 0.5 --subset-part 0 --name half0' and "
                   "'... --subset-part 1 --name half1' with the same --subset-seed.")
@click.option("--subset-seed", type=int, default=_D.subset_seed, show_default=True,
              help="Permutation seed for --identity-fraction.")
@click.option("--subset-part", type=int, default=_D.subset_part, show_default=True,
              help="Which block of the permutation (0, 1, ...) --identity-fraction takes.")
@click.option("--exact", is_flag=True,
              help="Exact tables by blocked brute force (torch) instead of HNSW; no index is "
                   "stored and Bank.query searches exactly.")
@click.option("--recall-sample", type=int, default=_D.recall_sample, show_default=True,
              help="Queries checked against exact search for the recall attrs (all if fewer).")
@click.option("--force", is_flag=True, help="Replace an existing bank of this name.")
@click.option("--quiet", is_flag=True, help="No progress bars or summary.")
def build_bank(store: Path, name: str, frames_per_id: int, seed: int, k: int, m: int,
               ef_construction: int, ef: int, threads: int | None, identities: str | None,
               identity_fraction: float | None, subset_seed: int, subset_part: int,
               exact: bool, recall_sample: int, force: bool, quiet: bool) -> None:
    """Build expression bank NAME in STORE and the cross-identity neighbour table of every
    timestep (held-out ones included), written atomically beside any other banks."""
    cfg = BankConfig(
        name=name, frames_per_id=frames_per_id, seed=seed, k=k, M=m,
        ef_construction=ef_construction, ef=ef,
        threads=default_threads() if threads is None else threads,
        identities=split_list(identities) if identities is not None else None,
        identity_fraction=identity_fraction, subset_seed=subset_seed, subset_part=subset_part,
        exact=exact, recall_sample=recall_sample, force=force,
    )
    if identities is not None and not cfg.identities:
        raise StoreError(store, "--identities names no identity")
    from rafdata.bank import build_bank as _build_bank  # numpy, h5py: only when run

    with RichProgress(quiet) as progress:
        report = _build_bank(store, cfg, progress)
    if quiet:
        return
    s = report.seconds
    method = "exact brute force" if report.exact else (
        f"HNSW M={cfg.M} ef_construction={cfg.ef_construction} ef={cfg.ef}")
    Console().print(
        f"{'replaced' if report.replaced else 'wrote'} bank [bold]{report.name}[/] in "
        f"{report.path}: {report.members} members of {len(report.identities)} identities, "
        f"k={report.k} neighbours for {report.timesteps} timesteps ({method})\n"
        f"recall@1 {report.recall_at_1:.4f}, recall@{report.k} {report.recall_at_k:.4f} "
        f"on {report.recall_queries} queries; re-queried {report.fallback_rate:.1%} of rows; "
        f"index {report.index_bytes / 2**20:.1f} MiB; "
        + ", ".join(f"{key} {v:.1f}s" for key, v in s.items()),
        highlight=False,
    )
