"""The command line: thin wrappers that print one-line errors and exit non-zero."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.rafdata import main as rafdata
from cli.rafmodel import main as rafmodel
from rafdata.store import copy_store


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


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.rafdata", *args], capture_output=True,
                          text=True)


def test_user_errors_are_one_line_without_traceback(synth_copy, tmp_path):
    (synth_copy / "388" / "calibration" / "camera_params.json").unlink()
    proc = _run("ingest", str(synth_copy), "-o", str(tmp_path / "o.h5"), "--quiet")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "camera_params.json" in lines[0]
    assert "Traceback" not in proc.stderr

    proc = _run("inspect", str(tmp_path / "missing.h5"))
    assert proc.returncode == 2 and "no such store file" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = _run("ingest", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o.h5"))
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


def test_inspect_shows_banks_and_verifies_them(runner, bfm_store, tmp_path):

    from rafdata.bank import BankConfig, build_bank

    path = tmp_path / "banked.h5"
    copy_store(bfm_store, path)
    build_bank(path, BankConfig(k=4, threads=1))
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
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
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
