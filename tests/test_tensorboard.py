"""TensorBoard event files: written beside metrics.jsonl, readable by TensorBoard's own
EventAccumulator with the same numbers, no repeated steps after a resume, nothing when off."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rafmodel.tensorboard import TensorBoardLog, read_scalars, scalar_tag
from rafmodel.train import Runner, TrainConfig
from tests.train_helpers import TINY_TRAIN, metrics_rows

pytest.importorskip("tensorboard")

RUN = {**TINY_TRAIN, "subject": "388", "aug": "vanilla", "tensorboard": True}


def test_scalars_and_previews_match_metrics_jsonl(bfm_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Runner(TrainConfig(store=str(bfm_store), out=str(out), iters=3,
                       **{**RUN, "preview_every": 2}), warn=lambda m: None).train()
    scalars = read_scalars(out / "tensorboard")
    rows = metrics_rows(out)
    for tag in ("loss/total", "loss/l1", "metrics/psnr", "aug/swap_rate", "model/gaussians",
                "time/step_s", "time/data_s"):
        assert tag in scalars, sorted(scalars)
    for key, tag in (("total", "loss/total"), ("psnr", "metrics/psnr"),
                     ("gaussians", "model/gaussians"), ("swap_rate", "aug/swap_rate")):
        assert [s for s, _ in scalars[tag]] == [r["step"] for r in rows] == [1, 2, 3]
        np.testing.assert_allclose([v for _, v in scalars[tag]], [r[key] for r in rows],
                                   rtol=1e-6)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("previews")] == [2, 3]
    assert acc.Images("previews")[0].width == 2 * 24 or acc.Images("previews")[0].height == 24


def test_resume_shows_each_step_once(bfm_store, tmp_path):
    out = tmp_path / "run"
    common = dict(store=str(bfm_store), out=str(out), **{**RUN, "preview_every": 1000})

    def crash_after_three(step, numbers):
        if step == 3:
            raise KeyboardInterrupt

    first = Runner(TrainConfig(iters=4, **{**common, "checkpoint_every": 2}),
                   warn=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        first.train(crash_after_three)
    Runner(TrainConfig(iters=4, **common), warn=lambda m: None, resume=True).train()
    steps = [s for s, _ in read_scalars(out / "tensorboard")["loss/total"]]
    assert steps == [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4]


def test_off_writes_nothing(bfm_store, tmp_path):
    out = tmp_path / "run"
    Runner(TrainConfig(store=str(bfm_store), out=str(out), iters=1,
                       **{**RUN, "tensorboard": False, "preview_every": 1}),
           warn=lambda m: None).train()
    assert not (out / "tensorboard").exists()
    assert (out / "metrics.jsonl").is_file()


def test_logging_a_row_is_cheap(tmp_path):
    """The training thread only queues protobufs: a logged row costs far less than a step."""
    log = TensorBoardLog(tmp_path / "tb")
    row = {"l1": 0.1, "dssim": 0.2, "total": 0.3, "psnr": 20.0, "gaussians": 3000.0,
           "data_s": 0.001, "step_s": 0.1, "step": 1, "swap_rate": 0.5,
           "swap_rate_total": 0.5, "time": 1.0, "skipped_corrupt": 0}
    t0 = time.perf_counter()
    for step in range(200):
        log.scalars(row, step)
    per_row = (time.perf_counter() - t0) / 200
    log.close()
    # ~0.3 ms measured on an idle machine; the bound only catches a gross regression (a
    # synchronous write per value), with room for a loaded CI machine
    assert per_row < 20e-3, f"{per_row * 1e3:.2f} ms per row"
    assert len(read_scalars(tmp_path / "tb")["loss/total"]) == 200
    assert scalar_tag("step") is None and scalar_tag("lpips") == "loss/lpips"
