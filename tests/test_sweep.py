"""rafmodel sweep on the session's local Ray (2 CPUs): a grid finishes, a rerun trains nothing,
a killed sweep resumes to the same numbers, a failing cell is retried once and reported;
train/eval never import Ray; --epochs derives iters."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from rafmodel.sweep import SweepConfig, read_cell, run_sweep
from tests.cli_helpers import cli_process, run_cli, run_python
from tests.train_helpers import TINY_TRAIN

# 3 steps (a checkpoint after each, so a kill lands between two), 1 frame per evaluation
TRAIN = {**TINY_TRAIN, "iters": 3, "checkpoint_every": 1, "hull_views": 4}
EVAL = dict(frames=1, videos=False, device="cpu")


@pytest.fixture(scope="module")
def store(banked_store) -> Path:
    return banked_store  # sweeps only read it


def _cfg(store, out, **kw) -> SweepConfig:
    base = dict(store=str(store), out=str(out), subjects=("388", "422"),
                methods=("vanilla", "raf"), seeds=(0, 1), train=dict(TRAIN),
                evaluation=dict(EVAL))
    return SweepConfig(**{**base, **kw})


def _metrics(out, subject, method, seed):
    return json.loads((out / subject / method / f"seed{seed}" / "eval" / "metrics.json")
                      .read_text())


@pytest.fixture(scope="module")
def full_grid(store, ray_cluster, tmp_path_factory):
    """The 2 subjects x 2 methods x 2 seeds grid, run once, uninterrupted."""
    out = tmp_path_factory.mktemp("grid") / "sweep"
    status = run_sweep(_cfg(store, out))
    return out, status


def test_grid_finishes(full_grid):
    out, status = full_grid
    assert status["counts"]["done"] == 8 and status["counts"]["failed"] == 0
    assert all(c["ran"] and c["attempts"] == 1 for c in status["cells"])
    on_disk = json.loads((out / "sweep" / "status.json").read_text())
    assert on_disk["counts"]["done"] == 8
    for c in status["cells"]:
        rec = read_cell(c["folder"])
        assert rec is not None and rec["steps"] == 3
        assert rec["metrics"]["self"]["psnr"] > 0
    # seeds differ, so do their avatars
    a, b = (_metrics(out, "388", "raf", s)["self"]["mean"]["psnr"] for s in (0, 1))
    assert a != b


def test_rerun_trains_nothing(full_grid, store):
    out, _ = full_grid
    ckpt = out / "422" / "raf" / "seed1" / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    status = run_sweep(_cfg(store, out))
    assert status["counts"]["done"] == 8
    assert not any(c["ran"] for c in status["cells"])
    assert ckpt.stat().st_mtime_ns == before


def test_other_settings_refused(full_grid, store):
    out, _ = full_grid
    from rafdata.errors import RafDataError

    with pytest.raises(RafDataError, match="iters"):
        run_sweep(_cfg(store, out, train={**TRAIN, "iters": 4}))


def test_killed_sweep_resumes_to_the_same_numbers(full_grid, store, ray_cluster, tmp_path):
    out_ref, _ = full_grid
    out = tmp_path / "killed"
    cmd = ["sweep", str(store), "--subjects", "388",
           "--methods", "vanilla,raf", "--seeds", "0,1", "--out", str(out), "--address",
           ray_cluster, "--quiet", "--eval-frames", "1", "--no-videos"]
    for k, v in TRAIN.items():
        if isinstance(v, bool):
            cmd.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        else:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = cli_process("rafmodel", *cmd, start_new_session=True)
    # kill the driver once a cell has a checkpoint but before everything is done
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob("388/*/seed*/checkpoints/step_0000001.pt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sum(read_cell(p) is not None for p in out.glob("388/*/seed*")) < 4

    proc = run_cli("rafmodel", *cmd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = json.loads((out / "sweep" / "status.json").read_text())
    assert status["counts"]["done"] == 4
    # the killed cell continued from its checkpoint, it did not start again
    assert any(read_cell(c["folder"])["resumed_at"] for c in status["cells"])
    for method in ("vanilla", "raf"):
        for seed in (0, 1):
            got = _metrics(out, "388", method, seed)
            ref = _metrics(out_ref, "388", method, seed)
            assert got["self"]["mean"] == ref["self"]["mean"]
            assert got["cross"]["mean"] == ref["cross"]["mean"]


def test_failing_cell_is_retried_once_and_reported(store, ray_cluster, tmp_path):
    # a method whose bank is not in the store fails in its task, every time
    cfg = _cfg(store, tmp_path / "sweep", subjects=("443",), seeds=(0,),
               methods=("vanilla", "broken"), method_defs={"broken": {"aug": "raf",
                                                                       "bank": "nosuch"}})
    status = run_sweep(cfg)
    cells = {c["method"]: c for c in status["cells"]}
    assert cells["vanilla"]["state"] == "done"
    assert cells["broken"]["state"] == "failed" and cells["broken"]["attempts"] == 2
    err = cells["broken"]["error"]
    assert "no bank named 'nosuch'" in err and "\n" not in err
    assert err.startswith(str(store))  # the store's own one-line error, naming the file
    on_disk = json.loads((tmp_path / "sweep" / "sweep" / "status.json").read_text())
    assert on_disk["counts"] == {"queued": 0, "training": 0, "evaluating": 0, "done": 1,
                                 "failed": 1}


class _Proc:
    def __init__(self, res):
        self.returncode, self.stdout, self.stderr = res.exit_code, res.stdout, res.stderr


def _cli(*args):
    """The rafmodel CLI in-process (as a subprocess would show it: exit code, out, err)."""
    from click.testing import CliRunner

    from cli.rafmodel import main

    return _Proc(CliRunner().invoke(main, list(args)))


def test_cli_refuses_bad_grids_in_one_line(store, tmp_path):
    def run(*args):
        return _cli("sweep", *args)

    proc = run(str(store), "--subjects", "388", "--methods", "vanilla,magic", "--out",
               str(tmp_path / "s"))
    assert proc.returncode == 2 and "magic" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run(str(tmp_path / "nope.h5"), "--subjects", "388")
    assert proc.returncode == 2 and "nope.h5" in proc.stderr
    proc = run(str(store), "--subjects", "999", "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "999" in proc.stderr
    bad = tmp_path / "grid.toml"
    bad.write_text("subjects = [388\n")
    proc = run(str(store), "--grid", str(bad))
    assert proc.returncode == 2 and "grid.toml" in proc.stderr
    assert not (tmp_path / "s").exists()  # nothing written for a refused grid


def test_grid_config_merges_the_grid_file_and_the_options(tmp_path):
    from rafdata.errors import RafDataError
    from rafmodel.sweep import grid_config, load_grid

    grid = tmp_path / "grid.toml"
    grid.write_text('subjects = ["388", "422"]\nmethods = ["vanilla", "p25"]\nseeds = [0, 1]\n'
                    '[train]\niters = 3\nresolution = 24\ncameras = "222200037,222200038"\n'
                    '[train.loss]\nl1 = 2.0\n[eval]\nframes = 2\ndrivers = "422"\n'
                    '[methods_def.p25]\naug = "raf"\np = 0.25\n')
    doc = load_grid(grid)
    cfg = grid_config("s.h5", "out", doc, seeds="2, 3",
                      train={"iters": 5, "device": None, "loss": {"vgg_weights": tmp_path,
                                                                  "lpips_weights": None}},
                      evaluation={"cameras": "222200038", "frames": None}, retries=None,
                      cpus_per_run=2)
    assert (cfg.store, cfg.out, cfg.subjects, cfg.methods) == ("s.h5", "out", ("388", "422"),
                                                               ("vanilla", "p25"))
    assert cfg.seeds == (2, 3)  # options replace the file's lists
    # options override the file key by key; None is "not given"; lists split anywhere
    assert cfg.train == {"iters": 5, "resolution": 24, "cameras": ("222200037", "222200038"),
                         "loss": {"l1": 2.0, "vgg_weights": str(tmp_path)}}
    assert cfg.evaluation == {"frames": 2, "drivers": ("422",), "cameras": ("222200038",)}
    assert cfg.method_defs == {"p25": {"aug": "raf", "p": 0.25}}
    assert (cfg.cpus_per_run, cfg.retries, cfg.address) == (2, 1, None)  # unset: defaults
    # no file: the SweepConfig defaults, an untouched loss
    bare = grid_config("s.h5", "out", subjects="388 443", train={"loss": {"vgg_weights": None}})
    assert bare.subjects == ("388", "443") and bare.methods == SweepConfig.methods
    assert bare.train == {} and bare.evaluation == {}
    with pytest.raises(RafDataError, match="give --subjects"):
        grid_config("s.h5", "out", {"methods": ("raf",)})
    with pytest.raises(RafDataError, match="seeds must be integers, not 0,x"):
        grid_config("s.h5", "out", subjects="388", seeds="0,x")


def test_cli_sweep_bad_seeds_are_one_line(tmp_path):
    proc = _cli("sweep", str(tmp_path / "s.h5"), "--subjects", "388", "--seeds", "0,x")
    assert proc.returncode == 2 and "seeds must be integers" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_train_and_eval_import_no_ray(store, tmp_path):
    code = ("import sys; "
            "from rafmodel.train import Runner, TrainConfig; "
            "from rafmodel.evaluate import EvalConfig, evaluate; "
            f"out = {str(tmp_path / 'run')!r}; "
            f"Runner(TrainConfig(store={str(store)!r}, subject='388', aug='raf', out=out, "
            "iters=1, resolution=24, num_gaussians=100, mlp_width=16, workers=0, "
            "device='cpu', tensorboard=False), warn=lambda m: None).train(); "
            f"evaluate([out], {str(store)!r}, EvalConfig(frames=1, videos=False, "
            "device='cpu')); print('ray' in sys.modules)")
    proc = run_python(code)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stderr


def test_epochs_derive_iters(store, tmp_path):
    from rafmodel.train import Runner, TrainConfig

    cfg = TrainConfig(store=str(store), subject="422", aug="vanilla", epochs=2, batch_size=3,
                      out=str(tmp_path / "run"), resolution=24, num_gaussians=100,
                      mlp_width=16, workers=0, device="cpu", tensorboard=False)
    runner = Runner(cfg, warn=lambda m: None)
    n = len(runner.dataset)
    assert runner.cfg.iters == -(-2 * n // 3) and runner.cfg.epochs == 2
    assert runner.cfg.densify.refine_stop == max(1, runner.cfg.iters // 2)
    assert any("2 epochs" in line for line in runner.describe())
    from rafdata.errors import RafDataError

    with pytest.raises(RafDataError, match="not both"):
        Runner(TrainConfig(store=str(store), subject="422", iters=3, epochs=1,
                           out=str(tmp_path / "x")), warn=lambda m: None)


def _rec(subject, method, seed, psnr, lpips=None):
    return {"subject": subject, "method": method, "seed": seed,
            "metrics": {"self": {"psnr": psnr, "lpips": lpips}, "cross": {}}}


def test_stats_pair_by_subject_and_seed():
    from rafmodel.stats import format_markdown, summarize, verdicts

    recs = []
    for i, subject in enumerate(("388", "422", "443")):
        for seed in range(3):
            base = 20.0 + 5 * i + seed  # subjects and seeds differ a lot...
            recs += [_rec(subject, "vanilla", seed, base, 0.3),
                     _rec(subject, "raf", seed, base + 0.5 + 0.01 * seed, 0.3 + 0.01 * seed),
                     # ...noise is as likely below as above: no significant difference
                     _rec(subject, "noise", seed, base + (0.4 if (i + seed) % 2 else -0.4))]
    recs.append(_rec("475", "raf", 0, 99.0))  # no vanilla partner: not paired
    s = summarize(recs, n_boot=2000)
    by = {m["method"]: m for m in s["methods"]}
    assert [m["method"] for m in s["methods"]][0] == "vanilla"
    raf = by["raf"]["vs_baseline"]["self_psnr"]
    # the paired difference sees +0.5 through the between-subject spread (std ~4 dB)
    assert raf["n"] == 9 and abs(raf["diff"] - 0.51) < 1e-9
    assert raf["significant"] and raf["better"] and 0.5 <= raf["lo"] < raf["hi"] <= 0.52
    assert by["raf"]["stats"]["self_psnr"]["n"] == 10  # unpaired cells still count here
    lp = by["raf"]["vs_baseline"]["self_lpips"]  # lower is better: higher LPIPS is worse
    assert lp["significant"] and not lp["better"]
    noise = by["noise"]["vs_baseline"]["self_psnr"]
    assert not noise["significant"] and noise["lo"] < 0 < noise["hi"]
    table = format_markdown(s)
    assert "**+0.510 [" in table and "± " in table
    text = " ".join(verdicts(s, "raf"))
    assert "self PSNR: significantly better" in text and "self LPIPS: significantly WORSE" in text
    # the same inputs give the same intervals
    assert summarize(recs, n_boot=2000) == s


def test_compare_stats_over_a_sweep(full_grid, tmp_path):
    out, _ = full_grid
    proc = _cli("compare", "--stats", str(out), "--json", str(tmp_path / "s.json"),
                "--csv", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png"))
    assert proc.returncode == 0, proc.stderr
    assert "| vanilla | 4 |" in proc.stdout and "Paired difference vs vanilla" in proc.stdout
    doc = json.loads((tmp_path / "s.json").read_text())
    raf = next(m for m in doc["methods"] if m["method"] == "raf")
    assert raf["vs_baseline"]["self_psnr"]["n"] == 4
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "s.csv").read_text().splitlines()) > 2


def test_stats_from_metrics_files_equal_stats_from_cells(full_grid):
    """compare --stats over eval outputs (no cell.json) pairs the same cells: method from the
    run's label, seed from its training config."""
    from rafdata.errors import RafDataError
    from rafmodel.stats import load_records, summarize

    out, _ = full_grid
    files = sorted(out.glob("*/*/seed*/eval/metrics.json"))
    assert len(files) == 8
    assert summarize(load_records(files), n_boot=500) == summarize(load_records([out]),
                                                                   n_boot=500)
    run = out / "388" / "raf" / "seed0"
    with pytest.raises(RafDataError, match="second result"):  # one cell given twice
        load_records([run / "cell.json", run / "eval" / "metrics.json"])


def test_cells_evaluate_with_what_they_train_with(tmp_path):
    """A cell's evaluation takes the device, renderer and LPIPS weight files it trains with,
    unless the grid's eval settings say otherwise: a --device cpu sweep on a GPU machine must
    not evaluate on CUDA."""
    from rafmodel.sweep import grid_config

    vgg = tmp_path / "vgg.pth"
    cfg = grid_config("s.h5", "out", subjects="388", methods="vanilla", seeds="0",
                      train={"device": "cpu", "backend": "torch",
                             "loss": {"vgg_weights": vgg, "lpips_weights": None}})
    (cell,) = cfg.cells()
    ecfg = cell.eval_config(tmp_path / "eval")
    assert (ecfg.device, ecfg.backend, ecfg.vgg_weights, ecfg.lpips_weights, ecfg.out) == (
        "cpu", "torch", str(vgg), None, str(tmp_path / "eval"))
    cfg = grid_config("s.h5", "out", subjects="388", methods="vanilla", seeds="0",
                      train={"device": "cpu"}, evaluation={"device": "auto", "frames": 2})
    ecfg = cfg.cells()[0].eval_config("e")
    assert (ecfg.device, ecfg.frames) == ("auto", 2)  # the grid's own eval settings win
