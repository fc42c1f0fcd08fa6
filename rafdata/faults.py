"""Named crash points for the kill-injection tests (failpoints, as etcd's gofail has them).

Writers call :func:`point` at every step where a crash would leave a different state on disk
(a segment's image written, a segment about to be renamed, the main file about to be
replaced, ...). With ``RAFDATA_FAULT=NAME:N`` in the environment the N-th (1-based) passage
through point NAME kills the process with SIGKILL, exactly as an OOM killer or a power cut
would stop it; ``NAME:N:stop`` stops it with SIGSTOP instead (a test can then race a second
process against it and resume it with SIGCONT). ``RAFDATA_FAULT=list`` prints every point
passed to stderr, which is how the tests enumerate them. Without the variable a point costs
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("RAFDATA_FAULT", "")
_NAME, _, _REST = _SPEC.partition(":")
_N, _, _ACTION = _REST.partition(":")
_TARGET = int(_N) if _N.isdigit() else 0
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Pass the crash point ``name`` (see the module docstring)."""
    if not _SPEC:
        return
    if _SPEC == "list":
        # one write per line: points pass on several threads (the segment publisher)
        os.write(2, f"rafdata-fault-point {name}\n".encode())
        return
    if name != _NAME:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _TARGET:
        os.kill(os.getpid(), signal.SIGSTOP if _ACTION == "stop" else signal.SIGKILL)
