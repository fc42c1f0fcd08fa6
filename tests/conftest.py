"""Session-scoped tiny datasets made by the synthetic generator (h5py-style small helpers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY = dict(
    participants=("388", "422", "443"),
    sequences=("EXP-1-head", "FREE"),
    cameras=("222200037", "222200038"),
    frames=4,
    frame_step=2,
    width=48,
    height=64,
    seed=3,
)


def _synth(root: Path, layout: str = "nersemble", **overrides) -> Path:
    from rafdata.synth import SynthConfig, write_dataset, write_gha_dataset

    cfg = SynthConfig(**{**TINY, **overrides})
    (write_gha_dataset if layout == "gha" else write_dataset)(root, cfg)
    return root


@pytest.fixture(scope="session")
def synth_bfm(tmp_path_factory) -> Path:
    """NeRSemble layout with Multiview-3DMM-Fitting (BFM) tracking: 3 ids x 2 seqs x 2 cams."""
    return _synth(tmp_path_factory.mktemp("synth_bfm") / "src")


@pytest.fixture(scope="session")
def synth_flame(tmp_path_factory) -> Path:
    """NeRSemble layout with NeRSemble-benchmark FLAME tracking."""
    return _synth(tmp_path_factory.mktemp("synth_flame") / "src", tracking="flame",
                  participants=("388", "422"))


@pytest.fixture(scope="session")
def synth_gha(tmp_path_factory) -> Path:
    """Gaussian Head Avatar preprocessed layout."""
    return _synth(tmp_path_factory.mktemp("synth_gha") / "src", layout="gha",
                  participants=("388", "422"))


@pytest.fixture(scope="session")
def bfm_store(synth_bfm, tmp_path_factory) -> Path:
    """The BFM synth dataset ingested with default options (read-only for tests)."""
    from rafdata.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("store") / "store.h5"
    ingest(synth_bfm, out, IngestConfig(workers=2))
    return out


@pytest.fixture
def synth_copy(synth_bfm, tmp_path) -> Path:
    """A private copy of the BFM dataset that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(synth_bfm, dst)
    return dst


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (2 CPUs), always shut down."""
    ray = pytest.importorskip("ray", reason="ray is not installed (make install installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
