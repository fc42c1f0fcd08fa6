"""Helpers for the crash tests: list the crash points a CLI command passes, compare two stores
by everything the store contract defines (tables, image bytes, banks), and run a script where
it may mount a small tmpfs (the full-disk tests). Running a command: tests/cli_helpers.py."""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from rafdata.store import Store
from tests.cli_helpers import cli_env, run_cli


def crash_points(tool: str, *args: str) -> Counter:
    """How often each crash point is passed by one uninterrupted run of the command."""
    proc = run_cli(tool, *args, fault="list")
    assert proc.returncode == 0, proc.stderr
    return Counter(line.split()[1] for line in proc.stderr.splitlines()
                   if line.startswith("rafdata-fault-point "))


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


def contents(path: Path) -> dict:
    """Everything a reader of the contract sees, as comparable numpy arrays."""
    out: dict = {}
    with Store(path) as s:
        out["identities"] = np.array(s.identities)
        for table in ("sequences", "cameras", "timesteps"):
            for k, v in vars(getattr(s, table)).items():
                out[f"{table}/{k}"] = np.asarray(v)
        out["images/timestep"] = s.image_timestep
        out["images/camera"] = s.image_camera
        out["images/crc"] = s.image_crc
        for i in range(s.n_images):
            out[f"rgb/{i}"] = s.read_rgb(i)
            out[f"mask/{i}"] = s.read_mask(i)
        out["attrs"] = np.array(sorted((k, str(v)) for k, v in s.attrs.items()
                                       if k != "ingest_history"))
        f = s.h5()
        if "banks" in f:
            def take(name, obj):
                if isinstance(obj, h5py.Dataset):
                    out[f"banks/{name}"] = obj[()]
            f["banks"].visititems(take)
            for name in f["banks"]:
                out[f"banks/{name}/attrs"] = np.array(sorted(
                    (k, str(v)) for k, v in f["banks"][name].attrs.items()
                    if k not in ("build_seconds",)))
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = contents(a), contents(b)
    assert ca.keys() == cb.keys(), set(ca) ^ set(cb)
    for k in ca:
        va, vb = ca[k], cb[k]
        if va is None or vb is None:
            assert va is None and vb is None, k
        else:
            np.testing.assert_array_equal(va, vb, err_msg=k)


@functools.cache
def _tmpfs_unavailable() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"
    return None


def require_tmpfs() -> None:
    """Skip the calling test unless a tmpfs can be mounted in a private user and mount
    namespace (probed once per session), as :func:`run_unshared` scripts do."""
    why = _tmpfs_unavailable()
    if why:
        pytest.skip(why)


def run_unshared(script: str) -> subprocess.CompletedProcess:
    """Run the bash ``script`` as root of a private user and mount namespace
    (``unshare -rm``), where it may mount a small tmpfs; the CLI importable as in
    :func:`tests.cli_helpers.run_cli`. Returns it with text stdout/stderr."""
    return subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True,
                          text=True, env=cli_env())
