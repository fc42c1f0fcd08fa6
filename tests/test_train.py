"""Training loop: the loss falls, resume is exact, checkpoints load safely, refusals are clean."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import pytest
import torch

from rafdata.bank import BankConfig, build_bank
from rafdata.store import copy_store
from rafmodel.strategy import DensifyConfig
from rafmodel.train import Runner, TrainConfig, load_avatar, load_checkpoint

TINY = dict(resolution=32, num_gaussians=400, mlp_width=32, workers=0, log_every=1,
            preview_every=1000, checkpoint_every=1000, device="cpu")


@pytest.fixture(scope="module")
def banked_store(bfm_store, tmp_path_factory):
    """The session's tiny synth store with a bank (all training frames are members)."""
    path = tmp_path_factory.mktemp("train") / "store.h5"
    copy_store(bfm_store, path)
    build_bank(path, BankConfig(frames_per_id=200, k=4, threads=1))
    return path


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_synth_subject(bfm_store, tmp_path):
    cfg = TrainConfig(store=str(bfm_store), subject="422", aug="vanilla", iters=40,
                      out=str(tmp_path / "run"), **TINY)
    runner = Runner(cfg, warn=lambda m: None)
    summary = runner.train()
    rows = _metrics(tmp_path / "run")
    assert summary["steps"] == 40 and len(rows) == 40
    first = sum(r["total"] for r in rows[:8]) / 8
    last = sum(r["total"] for r in rows[-8:]) / 8
    assert last < 0.8 * first
    assert sum(r["psnr"] for r in rows[-8:]) > sum(r["psnr"] for r in rows[:8])
    assert all(r["swap_rate"] == 0.0 for r in rows)  # vanilla never swaps
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["aug"] == "vanilla" and "L1" in config["loss"]
    assert (tmp_path / "run" / "previews" / "step_0000040.png").is_file()


def test_raf_swap_rate_is_logged(banked_store, tmp_path):
    cfg = TrainConfig(store=str(banked_store), subject="388", aug="raf", p=0.5, iters=30,
                      out=str(tmp_path / "raf"), **TINY)
    summary = Runner(cfg, warn=lambda m: None).train()
    assert 0.2 < summary["swap_rate"] < 0.8  # 30 Bernoulli(0.5) draws
    assert abs(_metrics(tmp_path / "raf")[-1]["swap_rate_total"] - summary["swap_rate"]) < 1e-9


@pytest.mark.parametrize("strategy", ["simple", "gsplat"])
def test_resume_equals_uninterrupted(banked_store, tmp_path, strategy):
    if strategy == "gsplat":
        pytest.importorskip("gsplat.strategy")
    # gsplat's strategy has no cap: a small threshold keeps its growth modest instead
    densify = DensifyConfig(refine_start=1, refine_stop=100, refine_every=3, reset_every=7,
                            grow_grad2d=0.0 if strategy == "simple" else 2e-4,
                            max_gaussians=600 if strategy == "simple" else None)
    common = dict(store=str(banked_store), subject="443", aug="raf", seed=3, densify=densify,
                  strategy=strategy, **TINY)
    straight = Runner(TrainConfig(iters=10, out=str(tmp_path / "a"), **common),
                      warn=lambda m: None)
    straight.train()

    def crash_after_five(step, numbers):
        if step == 5:
            raise KeyboardInterrupt

    first = Runner(TrainConfig(iters=10, out=str(tmp_path / "b"), **{**common,
                                                                    "checkpoint_every": 5}),
                   warn=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        first.train(crash_after_five)
    # a resumed run keeps its own settings: a different --aug here must not leak in
    resumed = Runner(TrainConfig(iters=10, out=str(tmp_path / "b"), **{**common, "aug": "noise"}),
                     warn=lambda m: None, resume=True)
    assert resumed.step == 5 and resumed.cfg.aug == "raf" and resumed.cfg.iters == 10
    resumed.train()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert straight.model.num_gaussians != 400  # densification really ran
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(tmp_path / "a")[-1]["total"] == _metrics(tmp_path / "b")[-1]["total"]


def test_checkpoint_loads_weights_only(banked_store, tmp_path):
    runner = Runner(TrainConfig(store=str(banked_store), subject="388", aug="noise", iters=3,
                                out=str(tmp_path / "c"), **TINY), warn=lambda m: None)
    runner.train()
    path = tmp_path / "c" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)  # no pickled code inside
    assert state["step"] == 3 and load_checkpoint(path)["step"] == 3
    model = load_avatar(path)
    exp, pose = torch.zeros(64), torch.zeros(6)
    out_a = model(exp, pose, torch.tensor(0.1))["means"]
    out_b = runner.model.eval()(exp, pose, torch.tensor(0.1))["means"]
    assert torch.allclose(out_a, out_b)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.rafmodel", "train", *args],
                          capture_output=True, text=True)


def test_refusals_are_one_line(bfm_store, banked_store, tmp_path):
    base = ["--iters", "1", "--device", "cpu", "--quiet"]
    proc = _cli(str(banked_store), "--subject", "999", "--out", str(tmp_path / "x"), *base)
    assert proc.returncode == 2 and "identity '999' is not in the store" in proc.stderr
    proc = _cli(str(bfm_store), "--subject", "388", "--out", str(tmp_path / "y"), *base)
    assert proc.returncode == 2 and "build-bank" in proc.stderr  # raf needs a bank
    newer = tmp_path / "newer.h5"
    copy_store(banked_store, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    proc = _cli(str(newer), "--subject", "388", "--out", str(tmp_path / "z"), *base)
    assert proc.returncode == 2 and "newer rafdata" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr
    ok = _cli(str(banked_store), "--subject", "388", "--out", str(tmp_path / "w"),
              "--resolution", "24", "--num-gaussians", "200", "--workers", "0", *base)
    assert ok.returncode == 0, ok.stderr
    again = _cli(str(banked_store), "--subject", "388", "--out", str(tmp_path / "w"), *base)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_store_without_masks_starts_from_an_ellipsoid(tmp_path):
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.synth import SynthConfig, write_dataset

    src = write_dataset(tmp_path / "src", SynthConfig(
        participants=("388",), sequences=("EXP-1-head",), cameras=("222200037", "222200038"),
        frames=3, width=64, height=80, alpha_maps=False))
    ingest(src, tmp_path / "s.h5", IngestConfig(workers=1))
    warnings: list[str] = []
    runner = Runner(TrainConfig(store=str(tmp_path / "s.h5"), subject="388", aug="vanilla",
                                iters=2, out=str(tmp_path / "run"), **TINY), warn=warnings.append)
    assert any("no masks" in w and "ellipsoid" in w for w in warnings)
    assert runner.train()["steps"] == 2


@pytest.mark.parametrize("overrides, pattern", [
    ({"p": 2.0}, r"--p must be in \[0, 1\]"),
    ({"topk": 0}, "--topk must be >= 1"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"log_every": 0}, "--log-every must be >= 1"),
    ({"backend": "gsplat"}, "needs CUDA"),
])
def test_bad_settings_refused_before_anything_is_written(banked_store, tmp_path, overrides,
                                                         pattern):
    from rafdata.errors import RafDataError

    out = tmp_path / "run"
    cfg = TrainConfig(store=str(banked_store), subject="388", out=str(out),
                      **{**TINY, **overrides})
    with pytest.raises(RafDataError, match=pattern):
        Runner(cfg, warn=lambda m: None)
    assert not out.exists()
