"""Tiny training runs for tests: one set of TrainConfig settings small enough for a CPU, a
run trained with them, and a reader for what a run logs."""

from __future__ import annotations

import json
from pathlib import Path

# TrainConfig settings of a tiny CPU run (a few seconds for tens of steps on the session's
# synth store): a small render and model, data read in the test's own process, a metrics row
# every step, previews and checkpoints only at the end, no TensorBoard files. Tests add the
# store, subject, out and iters, and override what they exercise:
# ``TrainConfig(..., **{**TINY_TRAIN, "checkpoint_every": 2})``.
TINY_TRAIN = dict(resolution=24, num_gaussians=200, mlp_width=32, workers=0, device="cpu",
                  log_every=1, preview_every=1000, checkpoint_every=1000, tensorboard=False)


def metrics_rows(run: str | Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def train_tiny(store: str | Path, out: str | Path, subject: str = "388", aug: str = "vanilla",
               iters: int = 2, **overrides) -> Path:
    """Train a :data:`TINY_TRAIN` run of ``subject`` on ``store`` into ``out`` (warnings
    dropped); returns ``out``. For tests that need a trained run, not a good avatar."""
    from rafmodel.train import Runner, TrainConfig

    cfg = TrainConfig(store=str(store), subject=subject, aug=aug, iters=iters, out=str(out),
                      **{**TINY_TRAIN, **overrides})
    Runner(cfg, warn=lambda m: None).train()
    return Path(out)
