"""`rafmodel`: the avatar trainer's front end."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from cli.common import FriendlyGroup

console = Console(soft_wrap=True)  # long paths must stay on one line


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="raf-toolkit")
def main() -> None:
    """RAF avatar trainer: train and evaluate Gaussian head avatars from a rafdata store."""


@main.command()
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
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


if __name__ == "__main__":
    main()
