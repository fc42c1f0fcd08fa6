"""Coverage metrics (known answers), the per-subject analysis on synth data, the bank figure."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from rafdata import coverage as cov
from rafdata.coverage import CoverageConfig, all_subjects, b2t, kl_kde, mmd_rbf, subject_coverage
from rafdata.errors import StoreError
from rafdata.store import Store, copy_store
from tests.cli_helpers import command_group

# ---------------------------------------------------------------------------------------------
# Helpers


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _mmd_bruteforce(x: np.ndarray, y: np.ndarray, s: float, unbiased: bool) -> float:
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * s * s))

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    if unbiased:
        return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1))
                + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def write_exact_bank(path, name: str = "full", k: int = 4, frames_per_id: int | None = None,
                     seed: int = 0) -> None:
    """A brute-force bank in the layout of rafdata.bank: members = non-held-out timesteps
    (``frames_per_id`` random ones per identity when given), neighbours of every timestep among
    members of other identities, ascending Euclidean distance."""
    with Store(path) as st:
        exp = st.timesteps.exp.astype(np.float64)
        ident = st.timesteps.identity
        train = st.timestep_rows(held_out=False)
    rng = np.random.default_rng(seed)
    members = []
    for i in np.unique(ident[train]):
        rows = train[ident[train] == i]
        if frames_per_id is not None and len(rows) > frames_per_id:
            rows = np.sort(rng.choice(rows, frames_per_id, replace=False))
        members.append(rows)
    members = np.concatenate(members)
    d = np.sqrt(((exp[:, None, :] - exp[members][None]) ** 2).sum(-1))
    d[ident[:, None] == ident[members][None, :]] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    with h5py.File(path, "r+", locking=False) as f:
        banks = f.require_group("banks")
        if name in banks:
            del banks[name]
        g = banks.create_group(name)
        g.create_dataset("members", data=members.astype(np.int64))
        g.create_dataset("neighbors/index", data=members[order].astype(np.int64))
        g.create_dataset("neighbors/dist",
                         data=np.take_along_axis(d, order, 1).astype(np.float32))


@pytest.fixture(scope="module")
def cov_store(tmp_path_factory):
    """Coefficient-only store from synth data: 3 identities x (2 training styles + FREE) x 60
    tracked frames, with an exact bank ``full``."""
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("coverage")
    cfg = SynthConfig(participants=("388", "422", "443"),
                      sequences=("EXP-1-head", "EMO-1-shout+laugh", "FREE"),
                      cameras=("222200037",), frames=60, width=16, height=16, seed=0)
    write_dataset(root / "src", cfg)
    out = root / "store.h5"
    ingest(root / "src", out, IngestConfig(no_images=True, workers=1))
    write_exact_bank(out)
    return out


# ---------------------------------------------------------------------------------------------
# Metrics with known answers


def test_mmd_identical_sets_is_zero():
    x = _rng().normal(size=(300, 16))
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-6)
    assert mmd_rbf(x, x.copy(), bandwidth=2.0) == pytest.approx(0.0, abs=1e-6)
    # The U-statistic of a set against itself is slightly negative, ~ -(1 - mean k) * 2/n.
    assert abs(mmd_rbf(x, x, unbiased=True)) < 2.0 / len(x)


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_matches_bruteforce(unbiased):
    rng = _rng(1)
    x, y = rng.normal(size=(70, 5)), rng.normal(0.5, 1.3, size=(50, 5))
    want = _mmd_bruteforce(x, y, 1.7, unbiased)
    assert mmd_rbf(x, y, bandwidth=1.7, unbiased=unbiased) == pytest.approx(want, abs=1e-6)


def test_blocked_equals_unblocked(monkeypatch):
    rng = _rng(2)
    x, y = rng.normal(size=(257, 8)), rng.normal(0.3, 1, size=(131, 8))
    full = (mmd_rbf(x, y), kl_kde(x, y, n_components=4), b2t(x, y))
    monkeypatch.setattr(cov, "_BLOCK_ELEMS", 500)  # blocks of 1-4 rows
    small = (mmd_rbf(x, y), kl_kde(x, y, n_components=4), b2t(x, y))
    assert small == pytest.approx(full, rel=1e-5, abs=1e-7)


def test_median_heuristic_exact_small():
    x = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3
    assert cov.median_heuristic(x) == pytest.approx(2.0, rel=1e-6)
    assert cov.median_heuristic(np.zeros((5, 3))) == 1.0


def test_kl_identical_sets_is_zero_and_matches_direct_kde():
    rng = _rng(3)
    x = rng.normal(size=(400, 10))
    assert kl_kde(x, x, n_components=5) == pytest.approx(0.0, abs=1e-9)
    # Direct computation of the documented estimator on a small case.
    p, q = rng.normal(size=(40, 3)), rng.normal(0.5, 2.0, size=(60, 3))
    pca = cov.PCA.fit(q, 2)
    zp, zq = pca.transform(p, whiten=True), pca.transform(q, whiten=True)
    h = 60 ** (-1 / 6)

    def log_kde(z, data):
        d2 = ((z[:, None] - data[None]) ** 2).sum(-1)
        return np.log(np.exp(-d2 / (2 * h * h)).mean(1))

    want = float((log_kde(zp, zp) - log_kde(zp, zq)).mean())
    assert kl_kde(p, q, n_components=2) == pytest.approx(want, rel=1e-5)


def test_b2t_of_shifted_copy_is_shift_norm():
    rng = _rng(4)
    x = rng.normal(0, 10.0, size=(500, 64))  # points far apart compared with the shift
    shift = rng.normal(size=64)
    shift *= 0.25 / np.linalg.norm(shift)
    assert b2t(x, x + shift) == pytest.approx(0.25, rel=1e-9)
    assert b2t(x, x) == pytest.approx(0.0, abs=1e-12)
    # Target = training set plus one far point: that point's nearest distance / m.
    far = x[:1] + 100.0
    nearest = np.linalg.norm(x - far, axis=1).min()
    assert b2t(x, np.concatenate([x, far])) == pytest.approx(nearest / 501, rel=1e-9)


def test_metrics_do_not_depend_on_sample_order():
    rng = _rng(5)
    # More than 2000 pooled points: the median heuristic takes its order-free subsample.
    x, y = rng.normal(size=(1200, 12)), rng.normal(0.2, 1.2, size=(1100, 12))
    px, py = rng.permutation(x), rng.permutation(y)
    assert mmd_rbf(px, py) == pytest.approx(mmd_rbf(x, y), rel=1e-5)
    assert mmd_rbf(y, x) == pytest.approx(mmd_rbf(x, y), rel=1e-5)
    assert kl_kde(px, py) == pytest.approx(kl_kde(x, y), rel=1e-5)
    assert b2t(px, py) == pytest.approx(b2t(x, y), rel=1e-9)


def test_different_distribution_scores_worse():
    rng = _rng(6)
    x, x2 = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    far = rng.normal(1.0, 1.0, size=(500, 8))
    assert mmd_rbf(x, far) > 10 * mmd_rbf(x, x2)
    assert kl_kde(x, far, n_components=4) > kl_kde(x, x2, n_components=4) + 0.5
    assert b2t(x, far) > b2t(x, x2)


def test_metric_input_errors():
    with pytest.raises(ValueError):
        mmd_rbf(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        b2t(np.zeros((0, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        kl_kde(np.full((3, 2), np.nan), np.zeros((3, 2)))


def test_twenty_thousand_per_side_is_blocked_and_fast():
    import time

    rng = _rng(7)
    x = rng.normal(size=(20000, 64)).astype(np.float32)
    t = time.perf_counter()
    b2t(x[:2000], x)
    assert time.perf_counter() - t < 20  # 40M pairs; seconds even on a shared 2-core box


# ---------------------------------------------------------------------------------------------
# The analysis on a synth store


def test_raf_improves_coverage_for_every_subject(cov_store):
    result = all_subjects(cov_store, CoverageConfig())
    rows = result["subjects"]
    assert [r["subject"] for r in rows] == ["388", "422", "443"]
    for r in rows:
        assert r["n"] == 120 and r["n_swapped"] == 60 and r["n_target"] == 180
        assert r["raf"]["b2t"] < r["vanilla"]["b2t"], r
        assert r["raf"]["mmd"] < r["vanilla"]["mmd"], r
        assert r["change_pct"]["b2t"] == pytest.approx(
            100 * (r["raf"]["b2t"] / r["vanilla"]["b2t"] - 1))
    avg = result["average"]
    assert avg["vanilla"]["mmd"] == pytest.approx(np.mean([r["vanilla"]["mmd"] for r in rows]))
    assert avg["change_pct"]["b2t"] < -10 and avg["change_pct"]["mmd"] < -10
    json.dumps(result)  # JSON-ready


def test_subject_coverage_is_seeded_and_uses_the_neighbour_table(cov_store, tmp_path):
    cfg = CoverageConfig(n=50, seed=3)
    a = subject_coverage(cov_store, "388", cfg)
    assert a == subject_coverage(cov_store, "388", cfg)
    assert a["n"] == 50 and a["n_swapped"] == 25
    assert subject_coverage(cov_store, "388", CoverageConfig(n=50, seed=4)) != a
    # +RAF really takes rows of the table: a bank whose every neighbour is one member m of
    # another identity makes every swapped vector exp[m]; Vanilla does not change.
    with Store(cov_store) as st:
        ts, held = st.timesteps, st.sequences.held_out[st.timesteps.sequence]
        ident, exp = ts.identity, ts.exp.astype(np.float64)
    members = np.flatnonzero(~held)
    m0 = members[ident[members] != ident[members[0]]][0]  # a member of another identity
    m = np.where(ident == ident[members[0]], m0, members[0])  # (T,) one per timestep
    path = tmp_path / "one.h5"
    copy_store(cov_store, path)
    with h5py.File(path, "r+", locking=False) as f:
        g = f["banks"].create_group("one")
        g.create_dataset("members", data=members)
        g.create_dataset("neighbors/index", data=m[:, None])
        g.create_dataset("neighbors/dist", data=np.linalg.norm(exp[m] - exp, axis=1)[:, None]
                         .astype(np.float32))
    one = subject_coverage(path, "388", CoverageConfig(n=50, seed=3, bank="one"))
    assert one["vanilla"] == a["vanilla"] and one["raf"] != a["raf"]
    # A table with neighbours of the subject's own identity is refused (rafdata.bank checks).
    with h5py.File(path, "r+", locking=False) as f:
        own = f["banks/one/neighbors/index"][()]
        own[0, 0] = members[ident[members] == ident[0]][0]
        f["banks/one/neighbors/index"][...] = own
    with pytest.raises(StoreError, match="same identity"):
        subject_coverage(path, "388", CoverageConfig(n=50, bank="one"))


def test_exclude_own_drivers_and_drivers_option(cov_store):
    own = subject_coverage(cov_store, "388", CoverageConfig(include_own_drivers=False))
    assert own["n_target"] == 120
    r = subject_coverage(cov_store, "388", CoverageConfig(drivers=("FREE",)))
    assert r["n_target"] == 180


def test_driver_identities_restrict_the_target(cov_store, tmp_path):
    """`--drivers IDS`: only those identities' driver timesteps form Table 1's target."""

    from cli.rafdata import main
    from rafdata.coverage import split_drivers

    r = subject_coverage(cov_store, "388", CoverageConfig(driver_identities=("422", "443")))
    assert r["n_target"] == 120  # FREE of 422 and 443, 60 tracked frames each
    r = subject_coverage(cov_store, "388", CoverageConfig(driver_identities=("422",),
                                                          drivers=("FREE",)))
    assert r["n_target"] == 60
    assert split_drivers(cov_store, ["FREE", "422", "images"]) == (("FREE",), ("422", "images"))
    with pytest.raises(StoreError, match="NOPE"):
        split_drivers(cov_store, ["NOPE"])
    # A coefficient-only store: no identity has held-out images, so `images` leaves no target.
    with pytest.raises(StoreError, match="fewer than 2 driver timesteps"):
        subject_coverage(cov_store, "388", CoverageConfig(driver_identities=("images",)))
    out = tmp_path / "cov.json"
    res = CliRunner().invoke(main, ["coverage", str(cov_store), "--subject", "388", "--drivers",
                                    "422", "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["subjects"][0]["n_target"] == 60
    assert doc["config"]["driver_identities"] == ["422"]
    res = CliRunner().invoke(main, ["coverage", str(cov_store), "--subject", "388", "--drivers",
                                    "999", "--quiet"])
    assert res.exit_code == 2 and "999" in res.output


def test_coverage_report_opens_the_store_once(cov_store, monkeypatch):
    """`rafdata coverage`'s library call: --drivers words sorted on the same opening of the
    store as the analysis; one subject or all, the same rows as the direct calls."""
    import rafdata.bank

    opened = []

    class CountingStore(Store):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rafdata.bank, "Store", CountingStore)
    cfg = CoverageConfig(n=40)
    one = cov.coverage_report(cov_store, cfg, subject="388", drivers=["FREE", "422"])
    assert len(opened) == 1
    direct = subject_coverage(cov_store, "388", CoverageConfig(
        n=40, drivers=("FREE",), driver_identities=("422",)))
    assert one["subjects"] == [direct] and "average" not in one
    assert one["config"]["drivers"] == ["FREE"] and one["config"]["driver_identities"] == ["422"]
    opened.clear()
    every = cov.coverage_report(cov_store, cfg)
    assert len(opened) == 1
    assert every == all_subjects(cov_store, cfg)
    with pytest.raises(StoreError, match="NOPE"):
        cov.coverage_report(cov_store, cfg, subject="388", drivers=["NOPE"])


def test_coverage_errors(cov_store):
    with pytest.raises(StoreError, match="999"):
        subject_coverage(cov_store, "999")
    with pytest.raises(StoreError, match="no bank named 'half'"):
        subject_coverage(cov_store, "388", CoverageConfig(bank="half"))
    with pytest.raises(StoreError, match="training timesteps"):  # every sequence is a driver
        subject_coverage(cov_store, "388", CoverageConfig(
            drivers=("EXP-1-head", "EMO-1-shout+laugh", "FREE")))
    with pytest.raises(StoreError, match="NOPE"):
        subject_coverage(cov_store, "388", CoverageConfig(drivers=("NOPE",)))
    with pytest.raises(StoreError, match="n must be"):
        subject_coverage(cov_store, "388", CoverageConfig(n=1))


def test_tiny_fixture_store_without_bank_is_refused(bfm_store):
    with pytest.raises(StoreError, match="build-bank"):
        all_subjects(bfm_store)


def test_with_rafdata_bank(cov_store, tmp_path):
    """The neighbour table written by rafdata.bank (exact mode) gives the same analysis."""
    bank = pytest.importorskip("rafdata.bank")

    copy = tmp_path / "store.h5"
    copy_store(cov_store, copy)
    bank.build_bank(copy, bank.BankConfig(name="built", exact=True, threads=1, k=4,
                                          frames_per_id=10_000))
    mine = subject_coverage(copy, "422", CoverageConfig(n=80))
    theirs = subject_coverage(copy, "422", CoverageConfig(n=80, bank="built"))
    for m in cov.METRICS:
        assert theirs["raf"][m] == pytest.approx(mine["raf"][m], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Commands and the figure


def _cli():
    from cli.rafdata_coverage import coverage, plot_bank

    return command_group(coverage, plot_bank)


def test_coverage_command(cov_store, tmp_path):
    out = tmp_path / "cov.json"
    res = CliRunner().invoke(_cli(), ["coverage", str(cov_store), "--all", "--json", str(out),
                                      "--n", "60", "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert len(data["subjects"]) == 3 and data["subjects"][0]["n"] == 60
    assert data["average"]["subject"] == "average"
    res = CliRunner().invoke(_cli(), ["coverage", str(cov_store), "--subject", "443"])
    assert res.exit_code == 0, res.output
    assert "443" in res.output and "B2T" in res.output and "%" in res.output
    res = CliRunner().invoke(_cli(), ["coverage", str(cov_store), "--subject", "999"])
    assert res.exit_code == 2 and "999" in res.output
    res = CliRunner().invoke(_cli(), ["coverage", str(cov_store)])
    assert res.exit_code == 2


def test_plot_bank_writes_png(cov_store, tmp_path):
    from PIL import Image

    from rafdata.config import PlotBankConfig
    from rafdata.plots import plot_bank

    out = tmp_path / "bank.png"
    info = plot_bank(cov_store, out, PlotBankConfig(n_queries=3, seed=1))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size[0] > 800 and im.size[1] > 500
    with Store(cov_store) as st:
        ident = st.timesteps.identity
        assert len(info["queries"]) == 3
        assert len({int(ident[q]) for q in info["queries"]}) == 3  # one per identity
        for q, nb in zip(info["queries"], info["neighbors"], strict=True):
            assert len(nb) == 10 and all(ident[n] != ident[q] for n in nb)
            d = np.linalg.norm(st.timesteps.exp[nb] - st.timesteps.exp[q], axis=1)
            assert np.all(np.diff(d) >= -1e-6)

    png = tmp_path / "cli.png"
    res = CliRunner().invoke(_cli(), ["plot-bank", str(cov_store), "-o", str(png),
                                      "--queries", "0,200"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(_cli(), ["plot-bank", str(cov_store), "-o", str(png),
                                      "--queries", "99999"])
    assert res.exit_code == 2 and "99999" in res.output
    assert not math.isnan(info["explained"][0])
