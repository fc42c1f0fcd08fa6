"""What both command groups share: one-line errors, exit codes, list options."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from rafdata.errors import RafDataError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class FriendlyGroup(click.Group):
    """A click group that turns user mistakes into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (RafDataError, OSError) as err:
            # OSError: a path the user gave that cannot be read or written (a folder where a
            # file is expected, no permission, disk full); its message names the file.
            Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            Console(stderr=True).print("[red]interrupted[/]; committed work is kept")
            sys.exit(EXIT_INTERRUPTED)


def split_list(value: str | None) -> tuple[str, ...] | None:
    """'388,422 443' -> ('388', '422', '443'); None stays None."""
    if value is None:
        return None
    items = tuple(v for v in value.replace(",", " ").split() if v)
    return items or None
