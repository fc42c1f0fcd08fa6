"""Training speed on this machine and the share of time spent waiting for data.

Claim (docs/benchmarks.md): the trainer is never data-bound: with loader workers, the time a
step waits for its batch is a small fraction of the step.
"""

from __future__ import annotations

import json
import shutil
import sys

from common import SCRATCH, synth_dataset, table


def _store():
    from rafdata.bank import BankConfig, build_bank
    from rafdata.ingest import IngestConfig, ingest

    src = synth_dataset("train-96", participants=("388", "422", "443"),
                        sequences=("EXP-1-head", "EMO-1-shout+laugh", "FREE"), frames=12)
    out = SCRATCH / "train-96.h5"
    if not out.exists():
        ingest(src, out, IngestConfig())
        build_bank(out, BankConfig())
    return out


def _run(store, workers: int, iters: int, resolution: int) -> dict:
    from rafmodel.train import Runner, TrainConfig

    out = SCRATCH / f"train-run-{workers}-{resolution}"
    shutil.rmtree(out, ignore_errors=True)
    runner = Runner(TrainConfig(store=str(store), subject="388", aug="raf", iters=iters,
                                out=str(out), workers=workers, resolution=resolution,
                                device="cpu", log_every=1, preview_every=10**9,
                                checkpoint_every=10**9), warn=lambda m: None)
    runner.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[3:]  # the first steps pay one-off set-up (allocations, loader start)
    data = sum(r["data_s"] for r in rows)
    step = sum(r["step_s"] for r in rows)
    return {"it_s": len(rows) / (data + step), "data_frac": data / (data + step),
            "gaussians": rows[-1]["gaussians"]}


def run(quick: bool = False) -> str:
    store = _store()
    iters = 15 if quick else 40
    results = []
    for workers in (0, 2):
        for res in (64, 128):
            r = _run(store, workers, iters, res)
            results.append([str(workers), f"{res}", f"{r['it_s']:.2f}",
                            f"{100 * r['data_frac']:.1f}%", f"{r['gaussians']:.0f}"])
    return "\n\n".join([
        "## Training (CPU)",
        f"`rafmodel train` on a synthetic subject (96x136 stored images, 3000 initial "
        f"Gaussians, CPU defaults), {iters} steps each after 3 warm-up steps; data wait = time "
        "blocked in `next(loader)` over total step time, measured in the same runs.",
        table(["loader workers", "render side", "steps/s", "data wait", "Gaussians at end"],
              results),
        "No GPU was lent to the session that wrote this: CUDA training speed is not measured.",
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
