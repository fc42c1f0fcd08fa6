"""gsplat's DefaultStrategy driven on our model (rafmodel.strategy.GsplatStrategy), on the CPU.

gsplat's strategy code is plain PyTorch, so these tests run it with our rasterizer's output:
the CPU twin of the CUDA training path. They check it against our SimpleStrategy, which
re-implements the same rules, and check the opacity reset that gsplat 1.5.3 skips.
"""

from __future__ import annotations

import math

import pytest
import torch

from rafmodel.strategy import DensifyConfig, GsplatStrategy, SimpleStrategy, make_strategy
from rafmodel.train import make_optimizers
from tests.test_avatar import EXP_DIM, _render_view, make_model

pytest.importorskip("gsplat.strategy")


def _pair(n: int = 150):
    """Two identical models (some Gaussians large, so both clone and split happen), each with
    gsplat-style optimizers."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        m = make_model(n=n, zero_init_last=False)
        with torch.no_grad():
            m.gaussians["log_scales"][:20] += math.log(4.0)
            m.gaussians["opacity_logit"][[5, 17, 29]] = -8.0  # below prune_opacity
        opts = make_optimizers(m, 1e-4, "3dgs")
        out.append((m, opts))
    return out


def _step(m, opts, strategy, step, exp, target):
    r = [_render_view(m, exp), _render_view(m, exp * 0.5)]
    strategy.step_pre_backward(r)
    loss = sum((v.image - target).abs().mean() for v in r) / 2
    loss.backward()
    info = strategy.step_post_backward(step, m, opts, r)
    for o in opts.values():
        o.step()
        o.zero_grad()
    return info


def _check_optimizers(m, opts):
    for k, p in m.gaussians.items():
        assert opts[k].param_groups[0]["params"] == [p], k
        st = opts[k].state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape, k


def test_gsplat_strategy_makes_the_same_decisions_as_ours():
    cfg = DensifyConfig(refine_start=0, refine_stop=100, refine_every=2, grow_grad2d=1e-7,
                        grow_scale3d=0.15, reset_every=0)
    (ma, oa), (mb, ob) = _pair()
    ours, theirs = SimpleStrategy(cfg), GsplatStrategy(cfg, head_radius=1.0)
    target = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    exp = torch.randn(EXP_DIM, generator=torch.Generator().manual_seed(1))
    for step in (1, 2):
        a = _step(ma, oa, ours, step, exp, target)
        b = _step(mb, ob, theirs, step, exp, target)
        assert a == b, step
    assert a["cloned"] > 0 and a["split"] > 0 and a["pruned"] == 3
    assert ma.num_gaussians == mb.num_gaussians == a["n"]
    _check_optimizers(mb, ob)
    # rows that were not split keep their values and order, clones included
    for k in ("xyz", "features", "log_scales", "opacity_logit"):
        na = ma.gaussians[k].shape[0] - 2 * a["split"]
        assert torch.allclose(ma.gaussians[k][:na], mb.gaussians[k][:na], atol=1e-6), k
    # and training goes on with the grown model
    for step in range(3, 6):
        _step(mb, ob, theirs, step, exp, target)
        _check_optimizers(mb, ob)


def test_gsplat_strategy_resets_opacity():
    """gsplat 1.5.3's own reset condition is never true; ours runs at reset_every."""
    cfg = DensifyConfig(refine_start=100, refine_stop=1000, refine_every=100, reset_every=2)
    (m, opts), _ = _pair(60)
    s = GsplatStrategy(cfg, head_radius=1.0)
    target = torch.rand(32, 32, 3)
    exp = torch.randn(EXP_DIM)
    assert _step(m, opts, s, 1, exp, target)["reset"] == 0
    assert torch.sigmoid(m.gaussians["opacity_logit"]).max() > 0.05
    assert _step(m, opts, s, 2, exp, target)["reset"] == 1
    assert torch.sigmoid(m.gaussians["opacity_logit"]).max() <= 0.01 + 1e-6
    assert s.state_dict()["resets"] == 1


def test_gsplat_strategy_state_round_trips():
    cfg = DensifyConfig(refine_start=0, refine_stop=100, refine_every=10, reset_every=0)
    (m, opts), _ = _pair(60)
    s = GsplatStrategy(cfg, head_radius=1.0)
    _step(m, opts, s, 1, torch.randn(EXP_DIM), torch.rand(32, 32, 3))
    saved = s.state_dict()
    assert saved["grad2d"].shape == (60,) and saved["count"].max() == 2
    t = GsplatStrategy(cfg, head_radius=1.0)
    t.load_state_dict(saved)
    assert torch.equal(t.state["grad2d"], s.state["grad2d"]) and t.state["scene_scale"] == 1.0


def test_gsplat_strategy_refuses_what_it_cannot_do():
    (m, _), _ = _pair(30)
    s = GsplatStrategy(DensifyConfig(), head_radius=1.0)
    one = torch.optim.Adam(m.param_groups())
    r = _render_view(m, torch.randn(EXP_DIM))
    r.image.sum().backward()
    with pytest.raises(TypeError, match="dict of optimizers"):
        s.step_post_backward(1, m, one, r)
    with pytest.raises(ValueError, match="alone"):
        s.step_post_backward(1, m, {"xyz": one}, r)
    with pytest.raises(ValueError, match="no cap"):
        GsplatStrategy(DensifyConfig(max_gaussians=10))


def test_make_strategy_picks_by_device():
    cfg = DensifyConfig()
    assert isinstance(make_strategy("auto", cfg, 1.0, torch.device("cpu")), SimpleStrategy)
    assert isinstance(make_strategy("gsplat", cfg, 1.0, torch.device("cpu")), GsplatStrategy)
    assert isinstance(make_strategy("auto", cfg, 1.0, torch.device("cuda")), GsplatStrategy)
    capped = DensifyConfig(max_gaussians=100)
    assert isinstance(make_strategy("auto", capped, 1.0, torch.device("cuda")), SimpleStrategy)
    with pytest.raises(ValueError, match="unknown"):
        make_strategy("mcmc", cfg, 1.0, torch.device("cpu"))
