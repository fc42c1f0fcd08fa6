"""Session-scoped tiny datasets and stores made by the synthetic generator (h5py-style small
helpers); the shared command, store, media and training helpers live in tests/*_helpers.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_SYNTH = dict(  # the session datasets (see tests/train_helpers.py for training)
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

    cfg = SynthConfig(**{**TINY_SYNTH, **overrides})
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


@pytest.fixture(scope="session")
def banked_store(bfm_store, tmp_path_factory) -> Path:
    """A copy of ``bfm_store`` with bank "full" (every training frame a member, k=4), for
    RAF training, viewers, studies (read-only for tests: copy it, or use
    ``banked_store_copy``, to modify)."""
    from rafdata.bank import BankConfig, build_bank
    from rafdata.store import copy_store

    path = copy_store(bfm_store, tmp_path_factory.mktemp("banked") / "store.h5")
    build_bank(path, BankConfig(frames_per_id=200, k=4, threads=1))
    return path


@pytest.fixture
def banked_store_copy(banked_store, tmp_path) -> Path:
    """A private copy of ``banked_store`` that a test may modify."""
    from rafdata.store import copy_store

    return copy_store(banked_store, tmp_path / "banked.h5")


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
