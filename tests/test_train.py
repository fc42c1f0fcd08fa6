"""Training loop: the loss falls, resume is exact, checkpoints load safely, refusals are clean."""

from __future__ import annotations

import json

import h5py
import pytest
import torch

from rafdata.store import copy_store
from rafmodel.strategy import DensifyConfig
from rafmodel.train import Runner, TrainConfig, load_avatar, load_checkpoint
from tests.cli_helpers import run_cli
from tests.train_helpers import TINY_TRAIN, metrics_rows


def test_loss_falls_on_a_synth_subject(bfm_store, tmp_path):
    cfg = TrainConfig(store=str(bfm_store), subject="422", aug="vanilla", iters=40,
                      out=str(tmp_path / "run"), **TINY_TRAIN)
    runner = Runner(cfg, warn=lambda m: None)
    summary = runner.train()
    rows = metrics_rows(tmp_path / "run")
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
                      out=str(tmp_path / "raf"), **TINY_TRAIN)
    summary = Runner(cfg, warn=lambda m: None).train()
    assert 0.2 < summary["swap_rate"] < 0.8  # 30 Bernoulli(0.5) draws
    last = metrics_rows(tmp_path / "raf")[-1]
    assert abs(last["swap_rate_total"] - summary["swap_rate"]) < 1e-9


@pytest.mark.parametrize("strategy", ["simple", "gsplat"])
def test_resume_equals_uninterrupted(banked_store, tmp_path, strategy):
    if strategy == "gsplat":
        pytest.importorskip("gsplat.strategy")
    # gsplat's strategy has no cap: a small threshold keeps its growth modest instead
    densify = DensifyConfig(refine_start=1, refine_stop=100, refine_every=3, reset_every=7,
                            grow_grad2d=0.0 if strategy == "simple" else 2e-4,
                            max_gaussians=600 if strategy == "simple" else None)
    common = dict(store=str(banked_store), subject="443", aug="raf", seed=3, densify=densify,
                  strategy=strategy, **TINY_TRAIN)
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
    assert straight.model.num_gaussians != TINY_TRAIN["num_gaussians"]  # densification ran
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics_rows(tmp_path / "a")[-1]["total"] == metrics_rows(tmp_path / "b")[-1]["total"]


def test_checkpoint_loads_weights_only(banked_store, tmp_path):
    runner = Runner(TrainConfig(store=str(banked_store), subject="388", aug="noise", iters=3,
                                out=str(tmp_path / "c"), **TINY_TRAIN), warn=lambda m: None)
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
    return run_cli("rafmodel", "train", *args)


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
              "--resolution", "24", "--num-gaussians", "200", "--workers", "0", "--iters", "1",
              "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    # a short summary on stdout, the full settings in the run folder
    out_lines = ok.stdout.strip().splitlines()
    assert len(out_lines) <= 8 and "{" not in ok.stdout, ok.stdout
    assert "388" in out_lines[1] and "raf" in out_lines[2] and "cpu" in out_lines[3]
    assert str(tmp_path / "w") in out_lines[0]
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert saved["train"]["iters"] == 1 and saved["train"]["num_gaussians"] == 200
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
                                iters=2, out=str(tmp_path / "run"), **TINY_TRAIN),
                    warn=warnings.append)
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
                      **{**TINY_TRAIN, **overrides})
    with pytest.raises(RafDataError, match=pattern):
        Runner(cfg, warn=lambda m: None)
    assert not out.exists()


def _steps(out):
    return [r["step"] for r in metrics_rows(out)]


def test_resume_truncates_metrics_and_ignores_leftover_temp_files(bfm_store, tmp_path):
    out = tmp_path / "run"
    common = dict(store=str(bfm_store), subject="422", aug="vanilla", out=str(out),
                  **{**TINY_TRAIN, "checkpoint_every": 3})

    def crash_after_five(step, numbers):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Runner(TrainConfig(iters=8, **common), warn=lambda m: None).train(crash_after_five)
    assert _steps(out) == [1, 2, 3, 4, 5]  # logged past the checkpoint of step 3
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000003.pt"]
    # what a crash in the middle of a save leaves: torn temporaries beside the checkpoints
    (ckpts / "last.pt.tmp-999").write_bytes(b"torn")
    (ckpts / "step_0000006.pt.tmp-999").write_bytes(b"torn")
    resumed = Runner(TrainConfig(iters=8, **common), warn=lambda m: None, resume=True)
    assert resumed.step == 3 and _steps(out) == [1, 2, 3]  # cut back to the checkpoint
    resumed.train()
    assert _steps(out) == list(range(1, 9))  # each step once
    assert load_checkpoint(ckpts / "step_0000006.pt")["step"] == 6
    assert load_checkpoint(ckpts / "last.pt")["step"] == 8
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000003.pt",
                                                       "step_0000006.pt"]


def test_checkpoints_are_replaced_atomically(bfm_store, tmp_path, monkeypatch):
    import rafmodel.train as train_mod

    out = tmp_path / "run"
    runner = Runner(TrainConfig(store=str(bfm_store), subject="422", aug="vanilla", iters=4,
                                out=str(out), **{**TINY_TRAIN, "checkpoint_every": 2}),
                    warn=lambda m: None)
    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        if runner.step == 4:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train_mod.torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        runner.train()
    ckpts = out / "checkpoints"
    assert load_checkpoint(ckpts / "last.pt")["step"] == 2  # the old one, whole
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000002.pt"]


def test_truncate_metrics_keeps_one_row_per_step_up_to_the_checkpoint(tmp_path):
    from rafmodel.train import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [1, 2, 3, 4, 3, 4, 5, 6]  # an older resume's repeats, then rows past the checkpoint
    path.write_text("".join(json.dumps({"step": s, "n": i}) + "\n" for i, s in enumerate(rows))
                    + '{"step": 7, "to')  # torn last line
    assert truncate_metrics(path, 4) == 5
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["n"]) for r in kept] == [(1, 0), (2, 1), (3, 4), (4, 5)]
    assert truncate_metrics(path, 4) == 0 and not (tmp_path / "metrics.jsonl.tmp").exists()
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0


def test_strategies_share_the_protocol_and_leave_gsplat_unpatched():
    from rafmodel.strategy import SimpleStrategy, Strategy, make_strategy

    cpu = torch.device("cpu")
    assert isinstance(make_strategy("simple", DensifyConfig(), 1.0, cpu), Strategy)
    assert isinstance(SimpleStrategy(), Strategy)
    pytest.importorskip("gsplat.strategy")
    s = make_strategy("gsplat", DensifyConfig(), 1.0, cpu)
    assert isinstance(s, Strategy)
    assert not {"_grow_gs", "_prune_gs"} & set(vars(s.inner))  # gsplat's own methods


def test_gsplat_strategy_matches_gsplats_own_step():
    """GsplatStrategy drives DefaultStrategy's rules with gsplat's public ops: the Gaussians
    it leaves are exactly those of gsplat's own ``step_post_backward`` (reset off: gsplat
    1.5.3 never runs it), screen-size rules included."""
    pytest.importorskip("gsplat.strategy")
    import math

    from rafmodel.strategy import GsplatStrategy
    from rafmodel.train import make_optimizers
    from tests.test_avatar import EXP_DIM, _render_view, make_model

    def model():
        torch.manual_seed(0)
        m = make_model(n=150, zero_init_last=False)
        with torch.no_grad():
            m.gaussians["log_scales"][:20] += math.log(4.0)
            m.gaussians["opacity_logit"][[5, 17, 29]] = -8.0
        return m, make_optimizers(m, 1e-4, "3dgs")

    cfg = DensifyConfig(refine_start=0, refine_stop=100, refine_every=2, grow_grad2d=1e-7,
                        grow_scale3d=0.15, reset_every=0, prune_scale2d=0.05)
    (ma, oa), (mb, ob) = model(), model()
    ours, ref = GsplatStrategy(cfg, 1.0), GsplatStrategy(cfg, 1.0)
    target = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    exp = torch.randn(EXP_DIM, generator=torch.Generator().manual_seed(1))
    grown = 0
    for step in range(1, 5):
        for m, opts, s in ((ma, oa, ours), (mb, ob, ref)):
            torch.manual_seed(step)  # split sampling draws from the global generator
            views = [_render_view(m, exp), _render_view(m, exp * 0.5)]
            s.step_pre_backward(views)
            (sum((v.image - target).abs().mean() for v in views) / 2).backward()
            if s is ours:
                info = s.step_post_backward(step, m, opts, views)
                grown += info["cloned"] + info["split"]
            else:
                with torch.no_grad():
                    params, gopts = s._params(m), s._optimizers(m, opts)
                    s.inner.step_post_backward(params, gopts, s.state, step, s._info(views))
                    s._write_back(m, params)
            for o in opts.values():
                o.step()
                o.zero_grad()
        assert ma.num_gaussians == mb.num_gaussians == info["n"], step
        for k in ma.gaussians:
            assert torch.equal(ma.gaussians[k], mb.gaussians[k]), (step, k)
    assert grown > 0
