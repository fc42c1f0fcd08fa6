"""What both command groups share: one-line errors, exit codes, list options."""

from __future__ import annotations

import os
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
            # file is expected, no permission, disk full); its message names the file. HDF5
            # adds multi-line diagnostics: keep one line.
            line = " ".join(str(err).split())
            Console(stderr=True).print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
            _silence_stderr()
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            Console(stderr=True).print("[red]interrupted[/]; committed work is kept")
            sys.exit(EXIT_INTERRUPTED)


def _silence_stderr() -> None:
    """After the one-line error: objects of an HDF5 file whose write failed (full disk,
    file-size limit) are freed at exit, and h5py prints a traceback for each of them from C.
    The failure was reported, the file was discarded: keep the promised single line."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def split_list(value: str | None) -> tuple[str, ...] | None:
    """'388,422 443' -> ('388', '422', '443'); None stays None."""
    if value is None:
        return None
    items = tuple(v for v in value.replace(",", " ").split() if v)
    return items or None
