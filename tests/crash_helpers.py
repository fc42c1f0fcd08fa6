"""Helpers for the crash tests: run a CLI command killed at a named crash point, and compare
two stores by everything the store contract defines (tables, image bytes, banks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from rafdata.store import Store

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tool: str, *args: str, fault: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m cli.TOOL ARGS`` in a subprocess; ``fault`` sets RAFDATA_FAULT."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAFDATA_FAULT", None)
    if fault:
        env["RAFDATA_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", f"cli.{tool}", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


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


def cli_process(tool: str, *args: str, fault: str | None = None) -> subprocess.Popen:
    """Like :func:`run_cli`, started in the background."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAFDATA_FAULT", None)
    if fault:
        env["RAFDATA_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", f"cli.{tool}", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
