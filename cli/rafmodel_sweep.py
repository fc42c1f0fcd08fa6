"""`rafmodel sweep`: thin front end of rafmodel.sweep (the grid on Ray, resumable).

The per-grid training options are made from TrainConfig's fields, so their names, types,
choices and defaults have one source (rafmodel/config.py); an option left out means the
dataclass default (or the device default where TrainConfig says None).
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from rafmodel.config import TRAIN_CHOICES, EvalConfig, TrainConfig
from rafmodel.sweep import CELL_KEYS, METHODS, SweepConfig

# TrainConfig fields the sweep sets per cell or that have no plain command-line form
_NOT_OPTIONS = {*CELL_KEYS, "background", "loss", "densify", "viewer", "viewer_port"}
_NONE_MEANS = {"epochs": "none, --iters decides", "workers": "cpus per run - 1",
               "cameras": "all"}


def _train_options() -> list[click.Option]:
    """One option per plain TrainConfig field, default None (= the dataclass's default)."""
    opts = []
    for f in fields(TrainConfig):
        if f.name in _NOT_OPTIONS:
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = f.default if f.default is not MISSING else None
        where = _NONE_MEANS.get(f.name, "by device") if shown is None else shown
        help_ = f"train: {f.name} for every cell [default: {where}]."
        kind = str(f.type)
        if kind.startswith("bool"):
            opts.append(click.Option([f"{flag}/--no-{flag[2:]}", f.name], default=None,
                                     help=help_))
        elif kind.startswith("tuple[str"):
            opts.append(click.Option([flag, f.name], default=None, help=help_ +
                                     " Comma separated."))
        else:
            typ: Any = TRAIN_CHOICES.get(f.name)
            typ = click.Choice(typ) if typ else (int if kind.startswith("int") else
                                                 float if kind.startswith("float") else str)
            opts.append(click.Option([flag, f.name], type=typ, default=None, help=help_))
    return opts


def _table(rows: list[tuple[str, ...]]) -> Table:
    table = Table(title="sweep")
    for head in ("subject", "method", "seed", "state", "steps", "note"):
        table.add_column(head)
    colour = {"done": "green", "failed": "red", "training": "cyan", "evaluating": "magenta"}
    for r in rows:
        st = f"[{colour[r[3]]}]{r[3]}[/]" if r[3] in colour else r[3]
        table.add_row(r[0], r[1], r[2], st, r[4], r[5])
    return table


def _sweep(store, grid, subjects, methods, seeds, out, address, gpus_per_run, cpus_per_run,
           retries, eval_frames, eval_drivers, eval_cameras, regressor, emotion, videos,
           vgg_weights, lpips_weights, quiet, **train) -> None:
    """Train and evaluate every (subject, method, seed) of a grid as Ray tasks.

    Resumable: rerunning the same command skips finished cells and resumes interrupted ones
    exactly. Without --address a local Ray starts and stops with the command.
    """
    from rafmodel.sweep import cell_rows, grid_config, load_grid, run_sweep

    cfg = grid_config(
        store, out, load_grid(grid) if grid else None, subjects=subjects, methods=methods,
        seeds=seeds,
        train={**train, "loss": {"vgg_weights": vgg_weights, "lpips_weights": lpips_weights}},
        evaluation={"frames": eval_frames, "drivers": eval_drivers, "cameras": eval_cameras,
                    "regressor": regressor, "emotion": emotion, "videos": videos},
        gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, retries=retries,
        address=address)
    console = Console(stderr=True)
    if quiet:
        status = run_sweep(cfg)
    else:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            status = run_sweep(cfg, lambda states: live.update(_table(cell_rows(states))))
    counts = status["counts"]
    ran = sum(1 for c in status["cells"] if c["ran"])
    click.echo(f"{counts['done']} of {len(status['cells'])} cells done ({ran} run now), "
               f"{counts['failed']} failed; status in {Path(out) / 'sweep' / 'status.json'}; "
               f"table: rafmodel compare --stats {out}")
    failed = [c for c in status["cells"] if c["state"] == "failed"]
    for c in failed:
        click.echo(f"failed {c['subject']}/{c['method']}/seed{c['seed']} after "
                   f"{c['attempts']} attempts: {c['error']}", err=True)
    if failed:
        sys.exit(1)


def _build() -> click.Command:
    d = {f.name: f.default for f in fields(SweepConfig) if f.default is not MISSING}
    params = [
        click.Argument(["store"], type=click.Path(path_type=Path)),
        click.Option(["--grid"], type=click.Path(path_type=Path), default=None,
                     help="TOML (or YAML) grid file: subjects, methods, seeds, [train], "
                     "[eval], [methods_def.NAME]; options given here override it."),
        click.Option(["--subjects"], default=None, help="Comma separated, e.g. 388,422."),
        click.Option(["--methods"], default=None, help="Comma separated from: "
                     + ", ".join(METHODS) + " (or the grid file's) [default: "
                     + ",".join(d["methods"]) + "]."),
        click.Option(["--seeds"], default=None,
                     help="Comma separated [default: " + ",".join(map(str, d["seeds"])) + "]."),
        click.Option(["--out"], type=click.Path(path_type=Path), default=Path(d["out"]),
                     show_default=True, help="Sweep folder: OUT/SUBJECT/METHOD/seedN, "
                     "OUT/sweep/status.json."),
        click.Option(["--address"], default=None,
                     help="Join a Ray cluster (auto, ray://host:port) [default: a local Ray "
                     "for the duration of the command]."),
        click.Option(["--gpus-per-run"], type=float, default=None,
                     help=f"GPUs per cell with --device cuda [default: {d['gpus_per_run']}]."),
        click.Option(["--cpus-per-run"], type=int, default=None,
                     help=f"CPUs per cell [default: {d['cpus_per_run']}]."),
        click.Option(["--retries"], type=int, default=None,
                     help=f"Extra attempts of a failed cell [default: {d['retries']}]."),
        click.Option(["--eval-frames"], type=click.IntRange(min=1), default=None,
                     help="eval --frames for every cell."),
        click.Option(["--eval-drivers"], default=None, help="eval --drivers for every cell."),
        click.Option(["--eval-cameras"], default=None, help="eval --cameras for every cell."),
        click.Option(["--regressor"], default=None, help="eval --regressor for every cell."),
        click.Option(["--emotion"], default=None, help="eval --emotion for every cell "
                     f"[default: {EvalConfig.emotion}]."),
        click.Option(["--videos/--no-videos"], default=None, help="eval videos and grids "
                     f"[default: {'on' if EvalConfig.videos else 'off'}]."),
        click.Option(["--vgg-weights"], type=click.Path(path_type=Path), default=None),
        click.Option(["--lpips-weights"], type=click.Path(path_type=Path), default=None),
        click.Option(["--quiet"], is_flag=True, help="No live table."),
        *_train_options(),
    ]
    return click.Command("sweep", callback=_sweep, params=params, help=_sweep.__doc__)


sweep_command = _build()
