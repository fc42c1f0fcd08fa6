"""The command line: thin wrappers that print one-line errors and exit non-zero."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.rafdata import main as rafdata
from cli.rafmodel import main as rafmodel
from rafdata.store import copy_store
from tests.cli_helpers import ProgressRecorder, run_cli, run_python


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_inspect_json_and_verify(runner, bfm_store):
    res = runner.invoke(rafdata, ["inspect", str(bfm_store), "--json", "--verify"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["timesteps"] == 24 and info["images"] == 48 and info["exp_space"] == "bfm09"
    assert info["verify"]["ok"] and info["verify"]["chunks_read"] > 48
    assert [i["name"] for i in info["identities"]] == ["388", "422", "443"]
    assert sum(s["held_out"] for s in info["sequences"]) == 3
    # mattes (mostly 0 and 255) shrink a lot more than noisy colour frames
    assert info["compression"] == "blosc-blosclz"
    assert info["mask_compression_ratio"] > 2 * info["image_compression_ratio"] > 1.5


def test_inspect_tables(runner, bfm_store):
    res = runner.invoke(rafdata, ["inspect", str(bfm_store)])
    assert res.exit_code == 0
    assert "bfm09 (64 dims)" in res.output and "held out" in res.output and "48 x 64" in res.output
    assert "colour " in res.output and "mattes " in res.output


def test_verify_failure_exits_one(runner, bfm_store, tmp_path):
    bad = tmp_path / "bad.h5"
    copy_store(bfm_store, bad)
    with h5py.File(bad, "r+") as f:
        f["images/timestep"][0] = 10_000
    res = runner.invoke(rafdata, ["inspect", str(bad), "--verify", "--quiet"])
    assert res.exit_code == 1
    assert "out of range" in res.output


def test_ingest_then_resume_via_cli(runner, synth_bfm, tmp_path):
    out = tmp_path / "cli.h5"
    args = ["ingest", str(synth_bfm), "-o", str(out), "--participants", "388,422",
            "--sequences", "FREE", "--size", "24", "32", "--quiet"]
    assert runner.invoke(rafdata, args).exit_code == 0
    res = runner.invoke(rafdata, args[:-1])
    assert res.exit_code == 0 and "wrote 0 sequences" in res.output and "2 already" in res.output


def test_user_errors_are_one_line_without_traceback(synth_copy, tmp_path):
    (synth_copy / "388" / "calibration" / "camera_params.json").unlink()
    proc = run_cli("rafdata", "ingest", str(synth_copy), "-o", str(tmp_path / "o.h5"), "--quiet")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "camera_params.json" in lines[0]
    assert "Traceback" not in proc.stderr

    proc = run_cli("rafdata", "inspect", str(tmp_path / "missing.h5"))
    assert proc.returncode == 2 and "no such store file" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run_cli("rafdata", "ingest", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o.h5"))
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_synth_command_writes_layout(runner, tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(rafdata, ["synth", str(out), "--participants", "017", "--sequences",
                                  "FREE", "--cameras", "222200037", "--frames", "2", "--width",
                                  "32", "--height", "48", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "017" / "sequences" / "FREE" / "images" / "cam_222200037.mp4").is_file()
    assert (out / "017" / "calibration" / "camera_params.json").is_file()
    res = runner.invoke(rafdata, ["synth", str(tmp_path / "t"), "--width", "33"])
    assert res.exit_code == 2 and "even" in res.output


def test_rafmodel_env(runner):
    res = runner.invoke(rafmodel, ["env", "--json"])
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert info["renderer"] in ("torch", "gsplat") and info["device"] in ("cpu", "cuda")
    if not info["cuda_available"]:
        assert runner.invoke(rafmodel, ["env", "--device", "cuda"]).exit_code == 2


def test_rafmodel_defaults_and_choices_come_from_the_library():
    """One source of truth: each option's default and choices are the library's."""
    import dataclasses

    from rafmodel.compare import GROUPINGS
    from rafmodel.config import (
        DEVICES,
        EMOTION_DEVICE,
        FRONTAL_SERIAL,
        REGRESSOR_FIT_DEVICE,
        TRAIN_CHOICES,
        EvalConfig,
        ExportConfig,
        TrainConfig,
        ViewerConfig,
    )
    from rafmodel.stats import BASELINE
    from rafmodel.sweep import METHODS, SweepConfig

    def opts(name):
        return {p.name: p for p in rafmodel.commands[name].params}

    def defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}

    train = opts("train")
    for name, value in defaults(TrainConfig).items():
        if name in train and name not in ("iters", "resolution", "num_gaussians", "mlp_width"):
            assert train[name].default == value, name  # those four: None = by device
    for name, choices in TRAIN_CHOICES.items():
        assert tuple(train[name].type.choices) == choices, name
    assert train["viewer_port"].default == ViewerConfig.port
    assert opts("env")["device"].default == TrainConfig.device
    view = opts("view")
    assert {k: view[k].default for k in ("port", "host", "render_size", "device")} == {
        k: v for k, v in defaults(ViewerConfig).items() if k != "backend"}
    assert opts("export")["device"].default == ExportConfig.device
    compare = opts("compare")
    assert tuple(compare["by"].type.choices) == GROUPINGS
    assert compare["by"].default == GROUPINGS[0] and compare["baseline"].default == BASELINE
    sweep = opts("sweep")
    assert all(m in sweep["methods"].help for m in METHODS)
    assert {p for p in sweep if p in TRAIN_CHOICES} == set(TRAIN_CHOICES) - {"aug"}
    assert str(sweep["out"].default) == SweepConfig.out
    # the sweep's eval options default to None (= EvalConfig's); their help names it
    assert f"[default: {EvalConfig.emotion}]" in sweep["emotion"].help
    assert "[default: on]" in sweep["videos"].help and EvalConfig.videos
    ev = opts("eval")
    shown = {name: value for name, value in defaults(EvalConfig).items() if name in ev}
    assert set(shown) == {"out", "cameras", "drivers", "frames", "regressor", "emotion",
                          "vgg_weights", "lpips_weights", "synth_root", "videos",
                          "skip_corrupt", "device"}
    assert {name: ev[name].default for name in shown} == shown
    assert tuple(ev["device"].type.choices) == DEVICES
    assert FRONTAL_SERIAL in ev["cameras"].help
    fit = opts("fit-regressor")["device"]
    assert fit.default == REGRESSOR_FIT_DEVICE and tuple(fit.type.choices) == DEVICES
    emotion = opts("emotion")["device"]
    assert emotion.default == EMOTION_DEVICE and tuple(emotion.type.choices) == DEVICES


def test_rafmodel_eval_needs_runs_and_a_store(tmp_path):
    """RUN... STORE with the store missing: one line on stderr, exit 2, no traceback."""
    proc = run_cli("rafmodel", "eval", str(tmp_path))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "at least one RUN and the STORE" in lines[0] and "Traceback" not in proc.stderr


def test_inspect_shows_banks_and_verifies_them(runner, banked_store_copy):
    path = banked_store_copy
    res = runner.invoke(rafdata, ["inspect", str(path), "--json", "--verify", "--quiet"])
    info = json.loads(res.stdout)
    assert res.exit_code == 0 and info["verify"]["ok"]
    (bank,) = info["banks"]
    assert bank["name"] == "full" and bank["members"] == 12 and bank["k"] == 4
    assert bank["neighbors_recall_at_k"] == 1.0
    table = runner.invoke(rafdata, ["inspect", str(path)]).output
    assert "banks" in table and "full" in table
    with h5py.File(path, "r+") as f:  # a same-identity neighbour breaks the contract
        t0_identity = f["timesteps/identity"][0]
        same = int(np.flatnonzero(f["timesteps/identity"][:] == t0_identity)[1])
        f["banks/full/neighbors/index"][0, 0] = same
    res = runner.invoke(rafdata, ["inspect", str(path), "--verify", "--quiet"])
    assert res.exit_code == 1 and "same identity" in res.output


def test_inspect_summarises_large_stores(runner, tmp_path):
    from tests.store_helpers import write_store

    path = tmp_path / "many.h5"
    ids = tuple(f"{i:03d}" for i in range(30))
    write_store(path, identities=ids, sequences=("EXP-1-head", "FREE"), cams=1, t=2,
                size=(8, 8))
    out = runner.invoke(rafdata, ["inspect", str(path)]).output
    assert "sequences (by name, over all identities)" in out  # 60 rows -> 2 summary rows
    assert out.count("EXP-1-head") == 1 and "identities" in out
    assert len(json.loads(runner.invoke(rafdata, ["inspect", str(path), "--json"]).stdout)[
        "sequences"]) == 60


@pytest.mark.parametrize("args, pattern", [
    (["--every", "0"], "--every must be >= 1"),
    (["--size", "0", "32"], "--size W H needs W, H >= 1"),
    (["--crop", "0", "0", "0", "8"], "--crop X Y W H needs W, H >= 1"),
])
def test_ingest_bad_options_are_one_line(runner, synth_bfm, tmp_path, args, pattern):
    out = tmp_path / "o.h5"
    res = runner.invoke(rafdata, ["ingest", str(synth_bfm), "-o", str(out), "--quiet", *args])
    assert res.exit_code == 2 and pattern in res.output and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize("tool", ["rafdata", "rafmodel"])
def test_help_loads_no_heavy_module(tool):
    """`--help` must start at once: the command modules import numpy, h5py, torch, hnswlib,
    matplotlib and ray only inside the commands that use them."""
    heavy = ("numpy", "h5py", "torch", "hnswlib", "matplotlib", "ray", "av", "decord")
    code = (f"import sys; import cli.{tool} as m; "
            "from click.testing import CliRunner; "
            "assert CliRunner().invoke(m.main, ['--help']).exit_code == 0; "
            f"print(sorted(x for x in {heavy!r} if x in sys.modules))")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_inspect_digest_equal_for_equal_stores(runner, bfm_store, synth_bfm, tmp_path):
    """Copies, and stores cut into other segments, share the digest; any change moves it."""
    def digest(path):
        res = runner.invoke(rafdata, ["inspect", str(path), "--json", "--digest"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["digest"]

    ref = digest(bfm_store)
    assert digest(copy_store(bfm_store, tmp_path / "copy.h5")) == ref
    split = tmp_path / "split.h5"  # two runs: other segments and history, same contents
    for pids in ("388", "388,422,443"):
        assert runner.invoke(rafdata, ["ingest", str(synth_bfm), "-o", str(split), "--quiet",
                                       "--participants", pids]).exit_code == 0
    assert digest(split) == ref
    with h5py.File(tmp_path / "copy.h5", "r+") as f:
        f["timesteps/scale"][0] += 1
    assert digest(tmp_path / "copy.h5") != ref


def test_consolidate_refuses_a_missing_store(runner, tmp_path):
    """Neither main file nor segment folder: refused before any lock or file is made."""
    from rafdata.errors import StoreError
    from rafdata.merge import consolidate

    missing = tmp_path / "none.h5"
    with pytest.raises(StoreError, match="no such store file and no segment folder"):
        consolidate(missing)
    res = runner.invoke(rafdata, ["consolidate", str(missing)])
    assert res.exit_code == 2 and "no such store file" in res.output
    assert not list(tmp_path.iterdir())


def test_consolidate_reports_progress(runner, bfm_store, tmp_path):
    """A long merge shows a bar: one step per segment read, then the main file written."""
    from rafdata.merge import consolidate
    from rafdata.store import Store

    path = copy_store(bfm_store, tmp_path / "s.h5")
    with Store(path) as s:
        segments = len(s.segment_paths)
    rec = ProgressRecorder()
    report = consolidate(path, rebuild=True, progress=rec)
    assert len(report.merged) == segments > 1
    assert rec.stages == [("reading segments", segments), ("writing the main file", 1)]
    assert rec.steps == segments + 1
    res = runner.invoke(rafdata, ["consolidate", str(path), "--quiet"])
    assert res.exit_code == 0 and res.output == ""


def test_ray_task_workers_default():
    """--ray without --workers: one decoding thread per task (Ray runs a task per CPU)."""
    from rafdata.distributed import TASK_WORKERS, task_workers

    assert task_workers(None) == TASK_WORKERS == 1 and task_workers(3) == 3


def test_ingest_workers_zero_is_refused(runner, synth_bfm, tmp_path):
    out = tmp_path / "o.h5"
    res = runner.invoke(rafdata, ["ingest", str(synth_bfm), "-o", str(out), "--quiet",
                                  "--workers", "0"])
    assert res.exit_code == 2 and "--workers must be >= 1 (got 0)" in res.output
    assert not out.exists()


def test_progress_prints_nothing_before_its_first_stage():
    """A command that fails before any work shows its one-line error alone: the bar (and its
    trailing newline) only appears once a stage starts."""
    import io

    from rich.console import Console

    from rafdata.progress import RichProgress

    out = io.StringIO()
    with RichProgress(console=Console(file=out, force_terminal=False, width=80)) as p:
        p.warn("careful")
    assert out.getvalue() == "warning: careful\n"
    with RichProgress(console=Console(file=out, force_terminal=False, width=80)) as p:
        p.start("frames", 3)
        p.advance(3)
    assert "frames" in out.getvalue() and "3/3" in out.getvalue()


@pytest.mark.parametrize("args", [["--tracking", "flame"], ["--tracking", "both"],
                                  ["--no-alpha"]])
def test_synth_gha_refuses_what_gha_never_holds(runner, tmp_path, args):
    """GHA preprocessing always leaves BFM params and masks: asking for FLAME tracking or no
    mattes is one line (SynthConfig.check_gha), and nothing is written."""
    from cli.rafdata import main

    r = runner.invoke(main, ["synth", str(tmp_path / "g"), "--layout", "gha", *args])
    assert r.exit_code != 0 and "gha layout always holds BFM" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "g").exists()
