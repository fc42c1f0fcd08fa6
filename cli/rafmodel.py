"""`rafmodel`: the avatar trainer's front end."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cli.common import FriendlyGroup, split_list
from rafmodel.config import (  # torch-free: options come from the dataclasses
    BACKENDS,
    CPU_DEFAULTS,
    DEVICES,
    GPU_DEFAULTS,
    MODES,
    STRATEGIES,
    LossConfig,
    TrainConfig,
    default,
)

console = Console(soft_wrap=True)  # long paths must stay on one line


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="raf-toolkit")
def main() -> None:
    """RAF avatar trainer: train and evaluate Gaussian head avatars from a rafdata store."""


@main.command()
@click.option("--device", type=click.Choice(DEVICES), default=default(TrainConfig, "device"),
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def env(device: str, as_json: bool) -> None:
    """Show the torch build, CUDA devices and which renderer a run would use."""
    from rafmodel.device import describe

    try:
        info = describe(device)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if as_json:
        click.echo(json.dumps(info.as_dict(), indent=2))
        return
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in info.as_dict().items():
        table.add_row(k.replace("_", " "), ", ".join(v) if isinstance(v, tuple) else str(v))
    console.print(table)


def _default(name: str):
    return default(TrainConfig, name)


def _by_device(name: str, what: str) -> str:
    """Help for a setting whose default depends on the device (TrainConfig.resolved)."""
    return f"{what} [default: {GPU_DEFAULTS[name]} on CUDA, {CPU_DEFAULTS[name]} on CPU]."


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--subject", required=True, help="Participant id to train, e.g. 388.")
@click.option("--aug", type=click.Choice(MODES), default=_default("aug"), show_default=True,
              help="RAF, or a baseline: no augmentation / random noise.")
@click.option("--p", "p", type=float, default=_default("p"), show_default=True,
              help="RAF: probability of swapping the expression vector.")
@click.option("--topk", type=int, default=_default("topk"), show_default=True,
              help="RAF: draw uniformly among the k nearest neighbours.")
@click.option("--noise-std", type=float, default=_default("noise_std"), show_default=True)
@click.option("--bank", default=_default("bank"), show_default=True,
              help="Bank with the neighbour table.")
@click.option("--iters", type=int, default=None, help=_by_device("iters", "Training steps"))
@click.option("--epochs", type=int, default=_default("epochs"),
              help="Train this many epochs (every training image once each) instead of "
              "--iters; the steps are derived and printed.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder [default: runs/SUBJECT-AUG].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly.")
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default=_default("device"),
              show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default=_default("backend"),
              show_default=True, help="Renderer (auto: gsplat on CUDA, ours on CPU).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=_default("strategy"),
              show_default=True, help="Densification: gsplat's DefaultStrategy (auto on CUDA "
              "with gsplat) or our equivalent (auto elsewhere).")
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True)
@click.option("--workers", type=int, default=_default("workers"),
              help="Data loader processes [default: cores - 1, at most 8].")
@click.option("--skip-corrupt", is_flag=True, default=_default("skip_corrupt"),
              help="Skip and count samples whose stored image is damaged (CRC-32 mismatch, "
              "undecodable chunk) instead of stopping; the count is in summary.json.")
@click.option("--cameras", default=None, help="Only these camera serials.")
@click.option("--resolution", type=int, default=None,
              help=_by_device("resolution", "Longest rendered side"))
@click.option("--num-gaussians", type=int, default=None,
              help=_by_device("num_gaussians", "Initial Gaussians"))
@click.option("--mlp-width", type=int, default=None,
              help=_by_device("mlp_width", "Width of the deformation MLPs"))
@click.option("--vgg-weights", type=click.Path(path_type=Path), default=None,
              help="torchvision VGG16 checkpoint for the LPIPS loss (default: torch hub cache).")
@click.option("--lpips-weights", type=click.Path(path_type=Path), default=None,
              help="LPIPS linear heads (default: from an installed lpips/torchmetrics).")
@click.option("--log-every", type=int, default=_default("log_every"), show_default=True)
@click.option("--preview-every", type=int, default=_default("preview_every"), show_default=True)
@click.option("--checkpoint-every", type=int, default=_default("checkpoint_every"),
              show_default=True)
@click.option("--tensorboard/--no-tensorboard", default=_default("tensorboard"),
              show_default=True, help="TensorBoard event files in RUN/tensorboard.")
@click.option("--viewer", is_flag=True, default=_default("viewer"),
              help="Serve the web viewer while training.")
@click.option("--port", "viewer_port", type=int, default=_default("viewer_port"),
              show_default=True, help="Viewer port on localhost (with --viewer).")
@click.option("--quiet", is_flag=True)
def train(store, subject, aug, p, topk, noise_std, bank, iters, epochs, out, resume, seed,
          device, backend, strategy, batch_size, workers, skip_corrupt, cameras, resolution,
          num_gaussians, mlp_width, vgg_weights, lpips_weights, log_every, preview_every,
          checkpoint_every, quiet, tensorboard, viewer, viewer_port) -> None:
    """Train SUBJECT's avatar from STORE with RAF (or a baseline)."""
    from rafdata.progress import RichProgress
    from rafmodel.train import Runner

    cfg = TrainConfig(
        store=str(store), subject=subject, out=str(out) if out else None, aug=aug, p=p,
        topk=topk, noise_std=noise_std, bank=bank, iters=iters, epochs=epochs, seed=seed,
        device=device,
        backend=backend, strategy=strategy, batch_size=batch_size, workers=workers,
        skip_corrupt=skip_corrupt, cameras=split_list(cameras), resolution=resolution,
        num_gaussians=num_gaussians, mlp_width=mlp_width,
        log_every=log_every, preview_every=preview_every, checkpoint_every=checkpoint_every,
        tensorboard=tensorboard, viewer=viewer, viewer_port=viewer_port,
        loss=LossConfig(vgg_weights=str(vgg_weights) if vgg_weights else None,
                        lpips_weights=str(lpips_weights) if lpips_weights else None),
    )
    with RichProgress(quiet) as progress:
        runner = Runner(cfg, warn=progress.warn, resume=resume)
        if not quiet:
            for line in runner.describe():
                console.print(line, highlight=False)
        progress.start("training", runner.cfg.iters)
        progress.advance(runner.step)

        def report(step: int, numbers: dict) -> None:
            progress.advance(1)
            progress.describe(f"training loss {numbers['total']:.4f} psnr {numbers['psnr']:.2f}"
                              f" swap {numbers['swap_rate']:.2f} N {int(numbers['gaussians'])}")

        summary = runner.train(report)
    if not quiet:
        console.print(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s, realised "
                      f"swap rate {summary['swap_rate']:.3f}; outputs in {runner.out}",
                      highlight=False)
    if summary["skipped_corrupt"] or (summary["skip_corrupt"] and not quiet):
        rows = summary["corrupt_rows"]
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        console.print(f"skipped {summary['skipped_corrupt']} samples with damaged images"
                      + (f" ({len(rows)} images, rows {shown}; `rafdata inspect --verify` "
                         "lists them)" if rows else ""), highlight=False)


# Commands that live in their own modules (one module per area of the trainer).
from cli.rafmodel_eval import compare_command, eval_command  # noqa: E402
from cli.rafmodel_regressor import fit_regressor  # noqa: E402
from cli.rafmodel_view import export_command, view_command  # noqa: E402

main.add_command(eval_command)
main.add_command(compare_command)
main.add_command(fit_regressor)
main.add_command(__import__("cli.rafmodel_sweep", fromlist=["x"]).sweep_command)
main.add_command(view_command)
main.add_command(export_command)
main.add_command(__import__("cli.rafmodel_emotion", fromlist=["x"]).emotion_command)


if __name__ == "__main__":
    main()
