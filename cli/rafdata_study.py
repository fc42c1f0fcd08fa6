"""`rafdata study`: the perceptual user study (rafdata.study). Thin front ends; the library
modules are imported inside the commands so that `rafdata --help` stays free of numpy/h5py."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rafdata.config import StudyConfig
from rafdata.progress import RichProgress

_S = StudyConfig()


@click.group("study")
def study() -> None:
    """The paper's 2AFC perceptual study: make the pages, serve them, analyse the answers."""


@study.command("analyze")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("answers", type=click.Path(path_type=Path))
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=None,
              help="Key file [default: FOLDER/key.csv].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-o", "--out", "fig", type=click.Path(path_type=Path), default=None,
              help="Write the Figure 3 bar chart (PNG) here.")
def analyze_cmd(folder: Path, answers: Path, key_path: Path | None, as_json: bool,
                fig: Path | None) -> None:
    """Join ANSWERS with the key of study FOLDER, drop workers who fail a catch trial, and
    report the preference shares (95% Wilson intervals) and exact binomial tests."""
    from rafdata.study.analyze import analyze, plot_figure3

    result = analyze(folder, answers, key_path)  # raises before anything is written
    if fig is not None:
        fig.parent.mkdir(parents=True, exist_ok=True)
        plot_figure3(result, fig)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['answers']} answers from {result['workers']} workers; "
               f"{len(result['dropped_workers'])} workers dropped by catch trials; "
               f"{result['kept_answers']} answers kept (ties excluded from the binomial test)")
    for comp, res in result["comparisons"].items():
        a, b = res["methods"]
        click.echo(f"{comp} ({res['answers']} answers)")
        for q in ("pose", "expression"):
            e = res[q]
            cells = "  ".join(
                f"{m} {e[m]['share'] or 0:.3f} [{e[m]['ci95'][0]:.3f}, {e[m]['ci95'][1]:.3f}]"
                for m in (a, b, "tie"))
            click.echo(f"  {q:<10} {cells}  p={e['binomial_p']:.3g} (n={e['binomial_n']})")


@study.command("make")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--queries", type=int, default=_S.queries, show_default=True,
              help="Query frames (fewer if the store has fewer to sample from).")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="New study folder.")
@click.option("--bank", default=_S.bank, show_default=True, help="The full bank.")
@click.option("--small-bank", default=_S.small_bank,
              help="Smaller bank for the NN-full vs NN-small comparison [default: none].")
@click.option("--catch", type=int, default=_S.catch, show_default=True,
              help="Catch trials (a query against itself vs a random frame).")
@click.option("--seed", type=int, default=_S.seed, show_default=True, help="Sampling seed.")
@click.option("--source", type=click.Path(path_type=Path), default=_S.source,
              help="The ingest's source tree, for frames the store has no image of.")
@click.option("--size", type=int, default=_S.size, show_default=True,
              help="Face crop size (px).")
@click.option("--url-prefix", default=_S.url_prefix,
              help="Prefix of image URLs in crowd_input.csv.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def make_cmd(store: Path, queries: int, out: Path, bank: str, small_bank: str | None,
             catch: int, seed: int, source: Path | None, size: int, url_prefix: str,
             quiet: bool) -> None:
    """Sample queries and candidates from STORE and write the study folder: face images,
    task pages, crowd template and input CSV, key.csv (never show it to workers)."""
    from rafdata.study.make import make_study

    cfg = StudyConfig(queries=queries, bank=bank, small_bank=small_bank, catch=catch,
                      seed=seed, source=source, size=size, url_prefix=url_prefix)
    with RichProgress(quiet) as progress:
        m = make_study(store, out, cfg, progress)
    if not quiet:
        click.echo(f"{out}: batch {m['batch']}, {len(m['items'])} items from {m['queries']} "
                   f"queries ({m['catch']} catch trials)")


@study.command("serve")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--port", type=int, default=8765, show_default=True,
              help="Port on 127.0.0.1 (the server never listens on other interfaces).")
def serve_cmd(folder: Path, port: int) -> None:
    """Serve study FOLDER's pages on localhost and record answers to FOLDER/answers.csv."""
    from rafdata.study.serve import make_server

    server = make_server(folder, port)
    click.echo(f"serving {folder} on http://127.0.0.1:{server.server_address[1]}/ "
               "(Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
