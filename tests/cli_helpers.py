"""Helpers for tests of the commands: run one (or Python code) in a subprocess, as a user
would; hold one command module in a group of its own; record the progress a call reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from rafdata.progress import NullProgress

ROOT = Path(__file__).resolve().parents[1]


def cli_env(fault: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a command under test: the repository importable from anywhere,
    RAFDATA_FAULT set to ``fault`` (or cleared), plus ``extra`` variables."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                        if p)
    env.pop("RAFDATA_FAULT", None)
    if fault:
        env["RAFDATA_FAULT"] = fault
    return env


def run_cli(tool: str, *args: str, fault: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m cli.TOOL ARGS`` in a subprocess; returns it with text stdout/stderr.

    ``fault`` sets RAFDATA_FAULT (see :func:`cli_env`); ``timeout`` fails a hung command
    instead of stalling the suite.
    """
    return subprocess.run([sys.executable, "-m", f"cli.{tool}", *args], capture_output=True,
                          text=True, env=cli_env(fault), timeout=timeout)


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c CODE`` in a fresh interpreter (to see what an import loads, or to die
    mid-write), the repository importable; returns it with text stdout/stderr."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


def cli_process(tool: str, *args: str, fault: str | None = None,
                env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """Like :func:`run_cli`, started in the background (stdout and stderr piped, text);
    ``env`` adds variables, ``popen`` overrides Popen's arguments (``stderr=STDOUT``...)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", f"cli.{tool}", *args],
                            env=cli_env(fault, **(env or {})), **popen)


def command_group(*commands: click.Command, name: str = "rafdata") -> click.Group:
    """A FriendlyGroup holding just ``commands``: one command module tested with the CLI's
    error handling (one line, exit 2) but without the rest of the CLI."""
    from cli.common import FriendlyGroup

    return FriendlyGroup(name=name, commands=list(commands))


class ProgressRecorder(NullProgress):
    """A progress reporter that remembers its stages (label, total) and counts the steps.

    ``strict``: a warning fails the test (the run under test must not warn)."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.stages: list[tuple[str, int | None]] = []
        self.steps = 0

    def start(self, label: str, total: int | None) -> None:
        self.stages.append((label, total))

    def advance(self, n: int = 1) -> None:
        self.steps += n

    def warn(self, message: str) -> None:
        if self.strict:
            raise AssertionError(message)
        super().warn(message)
