"""`rafmodel fit-regressor`: train the built-in AED/APD coefficient regressor on a store."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cli.common import split_list
from rafmodel.config import CROP_MODES, DEVICES, REGRESSOR_FIT_DEVICE, RegressorConfig, default

console = Console(soft_wrap=True)


def _default(name: str):
    return default(RegressorConfig, name)


def _table(title: str, numbers: dict) -> Table:
    """The regressor's errors against the mean baseline (predicting the training mean)."""
    table = Table(title=title)
    table.add_column("error")
    table.add_column("regressor", justify="right")
    table.add_column("mean baseline", justify="right")
    table.add_column("ratio", justify="right")
    rows = [("expression L2", "exp_l2"), ("rotation L2 (rad)", "rot_l2"),
            ("translation L2", "trans_l2")]
    for label, key in rows:
        ours, base = numbers[key], numbers[f"{key}_mean_baseline"]
        ratio = ours / base if base > 0 else float("nan")
        table.add_row(label, f"{ours:.4f}", f"{base:.4f}", f"{ratio:.2f}")
    per_dim, per_dim_base = numbers["exp_rmse"], numbers["exp_rmse_mean_baseline"]
    for d in range(min(3, len(per_dim))):
        base = per_dim_base[d]
        ratio = per_dim[d] / base if base > 0 else float("nan")
        table.add_row(f"exp[{d}] RMSE", f"{per_dim[d]:.4f}", f"{base:.4f}", f"{ratio:.2f}")
    return table


@click.command("fit-regressor")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to write [default: regressor.pt next to the store].")
@click.option("--exclude", default=None,
              help="Identities evaluated later (never trained on), e.g. 388,422. Required.")
@click.option("--no-exclude", is_flag=True,
              help="Train on every identity (the regressor then cannot fairly evaluate any).")
@click.option("--iters", type=int, default=_default("iters"), show_default=True)
@click.option("--size", type=int, default=_default("size"), show_default=True,
              help="Input side in pixels (face crop).")
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True)
@click.option("--lr", type=float, default=_default("lr"), show_default=True)
@click.option("--crop", type=click.Choice(CROP_MODES), default=_default("crop"),
              show_default=True,
              help="Crop to the matte's bounding box where the store has mattes, or never.")
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default=REGRESSOR_FIT_DEVICE,
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True)
def fit_regressor(store, out, exclude, no_exclude, iters, size, batch_size, lr, crop, seed,
                  device, as_json, quiet) -> None:
    """Train the built-in expression/pose regressor (for AED/APD) on STORE's images.

    It learns to predict the stored expression and pose from the images of every identity
    except the excluded ones, in sequences that are not held out, and reports its validation
    error against predicting the training mean.
    """
    from rafdata.progress import RichProgress
    from rafmodel.device import select_device
    from rafmodel.regressor import fit_regressor as fit

    excluded = split_list(exclude)
    if excluded and no_exclude:
        raise click.UsageError("give --exclude or --no-exclude, not both")
    dev = select_device(device)
    out = out or Path(store).with_name("regressor.pt")
    cfg = RegressorConfig(size=size, iters=iters, batch_size=batch_size, lr=lr, crop=crop,
                          seed=seed)
    with RichProgress(quiet) as progress:
        report = fit(store, out, cfg, exclude=excluded, progress=progress,
                     allow_no_exclude=no_exclude, device=dev)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if quiet:
        return
    console.print(f"[bold]{report['checkpoint']}[/]: trained on identities "
                  f"{', '.join(report['identities'])} ({report['train_images']} images, "
                  f"{report['train_timesteps']} timesteps); excluded "
                  f"{', '.join(report['excluded']) or 'none'}; {report['seconds']:.0f} s")
    val = report["val"]
    console.print(_table(f"validation ({val['timesteps']} held-back timesteps of training "
                         "sequences)", val))
    if report.get("test"):
        test = report["test"]
        console.print(_table(f"test (held-out sequences of the training identities, "
                             f"{test['timesteps']} timesteps)", test))
