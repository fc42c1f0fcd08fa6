"""Ingest on Ray (issue #12): one local cluster per session, tiny workloads."""

from __future__ import annotations

import pytest

from rafdata.errors import StoreError
from rafdata.ingest import IngestConfig, ingest
from tests.cli_helpers import run_cli, run_python
from tests.crash_helpers import assert_same_store, killed


@pytest.fixture(scope="module")
def local_stores(synth_bfm, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    out = {}
    for name, cfg in (("images", IngestConfig(workers=2)),
                      ("noimages", IngestConfig(no_images=True))):
        out[name] = root / f"{name}.h5"
        ingest(synth_bfm, out[name], cfg)
    return out


@pytest.mark.parametrize("mode", ["images", "noimages"])
def test_distributed_equals_local(ray_cluster, synth_bfm, tmp_path, local_stores, mode):
    """Same rows in the same order, same bytes per image, same coefficients and attributes."""
    from rafdata.distributed import ingest_distributed

    out = tmp_path / "ray.h5"
    shards = tmp_path / "shards"
    report = ingest_distributed(synth_bfm, out, IngestConfig(workers=1,
                                                             no_images=mode == "noimages"),
                                shard_dir=shards)
    assert len(report.written) == 6
    assert not [p for p in shards.iterdir() if p.name.endswith(".h5")]  # all taken in
    assert_same_store(out, local_stores[mode])


def test_damaged_shard_is_refused_by_name(ray_cluster, synth_bfm, tmp_path):
    from rafdata.distributed import ingest_distributed

    shards = tmp_path / "shards"
    shards.mkdir()
    bad = shards / "0-1-deadbeef.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # an HDF5 signature and nothing else
    with pytest.raises(StoreError, match="0-1-deadbeef.h5"):
        ingest_distributed(synth_bfm, tmp_path / "s.h5", IngestConfig(workers=1),
                           shard_dir=shards)
    assert bad.exists() and not (tmp_path / "s.h5").exists()


def test_killed_driver_and_killed_tasks_resume(ray_cluster, synth_bfm, tmp_path, local_stores):
    """The driver killed before its merge, then every task killed before its shard is
    complete: each rerun keeps what finished, and the last equals a local ingest."""
    out, shards = tmp_path / "k.h5", tmp_path / "shards"
    args = ["ingest", str(synth_bfm), "-o", str(out), "--ray", "--address", ray_cluster,
            "--shard-dir", str(shards), "--quiet"]
    proc = run_cli("rafdata", *args, fault="main-write:1")
    assert killed(proc), proc.stderr
    assert not out.exists() and len(list(shards.glob("*.h5"))) + len(
        list((tmp_path / "k.h5.parts").glob("*.h5"))) == 6  # every unit finished
    proc = run_cli("rafdata", *args[:-1], "--participants", "388,422", "--quiet",
                   fault="segment-publish:1")
    assert proc.returncode == 0, proc.stderr  # nothing left to do for them: adopted
    (tmp_path / "k.h5").unlink()
    for p in (tmp_path / "k.h5.parts").glob("*.h5"):  # lose the two last units
        if p.name.startswith(("4-", "5-")):
            p.unlink()
    proc = run_cli("rafdata", *args, fault="segment-publish:1")
    assert proc.returncode == 2 and "died" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    rerun = run_cli("rafdata", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(out, local_stores["images"])


def test_local_ingest_imports_no_ray(synth_bfm, tmp_path):
    code = ("import sys; from rafdata.ingest import IngestConfig, ingest; "
            f"ingest({str(synth_bfm)!r}, {str(tmp_path / 'x.h5')!r}, "
            "IngestConfig(no_images=True)); print('ray' in sys.modules)")
    proc = run_python(code)
    assert proc.stdout.strip() == "False", proc.stderr
