"""Start-up time of the command-line tools.

Claim (docs/benchmarks.md, issue #12): `rafdata --help` and `rafmodel --help` answer in well
under 0.3 s: heavy modules (numpy, h5py, torch, hnswlib, ray) load only inside the commands
that use them. Baseline: the Python interpreter starting and exiting, in the same run.
"""

from __future__ import annotations

import subprocess
import sys

from common import ROOT, best_of, table


def _call(*args: str):
    return lambda: subprocess.run([sys.executable, *args], cwd=ROOT, check=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(quick: bool = False) -> str:
    n = 5 if quick else 10
    base = best_of(n, _call("-c", "pass"))
    rows = [["python -c pass (interpreter alone)", f"{base:.3f}", "1.00"]]
    for tool in ("rafdata", "rafmodel"):
        t = best_of(n, _call("-m", f"cli.{tool}", "--help"))
        rows.append([f"{tool} --help", f"{t:.3f}", f"{t / base:.2f}"])
    return "\n\n".join([
        "## Command-line start-up",
        f"Wall time, best of {n}, aim under 0.3 s:",
        table(["command", "seconds", "vs interpreter"], rows),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
