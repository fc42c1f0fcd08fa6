"""Ingest killed at random moments, then rerun: the store always equals a clean run's.

Claim (docs/benchmarks.md, issue #15): a SIGKILL at any instant of an image ingest costs at
most the unit in progress; rerunning the command gives a store with the same digest as an
uninterrupted run. The tests kill at every named crash point; this kills at random times
(uniform over the clean run's duration, fixed seed), which also lands inside HDF5 calls, the
decoders and the merge. Reported: how many reruns matched, and what the reruns cost
relative to the clean run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

from common import ROOT, SCRATCH, table, video_dataset


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.rafdata", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digest(store) -> str:
    out = subprocess.run([sys.executable, "-m", "cli.rafdata", "inspect", str(store), "--json",
                          "--digest", "--verify", "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["verify"]["ok"], info["verify"]["problems"]
    return info["digest"]


def run(quick: bool = False) -> str:
    from rafdata.store import remove_store

    src, size, _ = video_dataset(quick)
    work = SCRATCH / "kills"
    work.mkdir(parents=True, exist_ok=True)
    clean = work / "clean.h5"
    remove_store(clean)
    t0 = time.perf_counter()
    assert _cli("ingest", str(src), "-o", str(clean), "--quiet").wait() == 0
    t_clean = time.perf_counter() - t0
    ref = _digest(clean)
    rng = random.Random(0)
    kills = 6 if quick else 20
    matched, killed, rerun_s = 0, 0, []
    for i in range(kills):
        out = work / f"k{i}.h5"
        remove_store(out)
        proc = _cli("ingest", str(src), "-o", str(out), "--quiet")
        time.sleep(rng.uniform(0.05, 1.0) * t_clean)
        proc.kill()
        killed += proc.wait() == -9
        t0 = time.perf_counter()
        rerun = _cli("ingest", str(src), "-o", str(out), "--quiet")
        assert rerun.wait() == 0, rerun.stderr.read()
        rerun_s.append(time.perf_counter() - t0)
        matched += _digest(out) == ref
        remove_store(out)
    rows = [["clean ingest", f"{t_clean:.2f}", "1.00", "-"],
            [f"rerun after a kill (mean of {kills})", f"{sum(rerun_s) / kills:.2f}",
             f"{sum(rerun_s) / kills / t_clean:.2f}", f"{matched} of {kills}"]]
    return "\n\n".join([
        "## Kills at random times",
        f"Image ingest of the ingest benchmark's videos ({size} px) killed with SIGKILL at a "
        f"random moment ({killed} of {kills} were still running when killed; the others had "
        "finished), then rerun; each result compared with the clean run by `rafdata inspect "
        "--digest --verify`.",
        table(["run", "seconds", "relative", "digest equal to the clean run"], rows),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
