"""Progress reporting that library code can call without knowing about the terminal.

Library functions take a :class:`Progress`; the CLI passes :class:`RichProgress` (bars with
rate and ETA, warnings printed above them) or, with ``--quiet``, one that prints warnings only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichBar


class Progress(Protocol):
    def start(self, label: str, total: int | None) -> None:
        """Begin a new stage of ``total`` steps (None: unknown)."""

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` steps done."""

    def warn(self, message: str) -> None:
        """Report something the user should know that does not stop the work."""


class NullProgress:
    """Collects warnings, shows nothing (library default and tests)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def start(self, label: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class RichProgress:
    """Rich progress bars on stderr; ``quiet`` hides the bars but still prints warnings."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.warnings: list[str] = []
        self._bar: _RichBar | None = None
        self._task = None

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def start(self, label: str, total: int | None) -> None:
        if self.quiet:
            return
        if self._bar is None:
            # Opened with the first stage: a command that fails before any work leaves its
            # one-line error alone, without the blank line an empty live display prints.
            self._bar = _RichBar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("[cyan]{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.__enter__()
        self._task = self._bar.add_task(label, total=total, rate="")

    def advance(self, n: int = 1) -> None:
        if self._bar is None or self._task is None:
            return
        self._bar.advance(self._task, n)
        speed = self._bar.tasks[-1].speed
        self._bar.update(self._task, rate=f"{speed:.1f}/s" if speed else "")

    def describe(self, text: str) -> None:
        """Replace the current bar's label (e.g. with the latest loss)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=text)

    def callback(self, label: str) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback for code that reports absolute counts."""
        last = [0]

        def report(done: int, total: int) -> None:
            if last[0] == 0 and done <= 1:
                self.start(label, total)
            self.advance(done - last[0])
            last[0] = done

        return report

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        # escape: file names may hold [brackets] that rich would take for markup
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False,
                           soft_wrap=True)
