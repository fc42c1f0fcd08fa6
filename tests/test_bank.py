"""rafdata.bank: members, HNSW tables with identity exclusion, recall, store writes, CLI."""

from __future__ import annotations

from pathlib import Path

import click
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.common import FriendlyGroup
from cli.rafdata_bank import build_bank as build_bank_cmd
from rafdata.bank import (
    Bank,
    BankConfig,
    build_bank,
    build_index,
    exact_search,
    recall,
    search_excluding,
    select_identities,
)
from rafdata.errors import RafDataError, StoreError
from rafdata.store import Store
from rafdata.writer import StoreWriter

D = 16


def write_timesteps(
    path: Path,
    identities: list[str],
    frames: dict[str, int] | int = 40,
    sequences: tuple[str, ...] = ("EXP-1-head", "FREE"),
    seed: int = 0,
) -> Path:
    """A store with timesteps only: per identity an offset, shared expression modes, noise."""
    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(12, D))
    with StoreWriter(path) as w:
        for pid in identities:
            n = frames[pid] if isinstance(frames, dict) else frames
            offset = rng.normal(scale=0.4, size=D)
            for seq in sequences:
                exp = (modes[rng.integers(0, len(modes), n)] + offset
                       + rng.normal(scale=0.3, size=(n, D))).astype(np.float32)
                with w.sequence(pid, seq, held_out=seq == "FREE", source="mem") as sw:
                    sw.add_timesteps(np.arange(n), exp, np.zeros((n, 6), np.float32),
                                     np.ones(n, np.float32), "test")
    return path


@pytest.fixture(scope="module")
def store20(tmp_path_factory) -> Path:
    """20 identities x (40 EXP + 40 FREE) timesteps; read-only for tests (copy to modify)."""
    return write_timesteps(tmp_path_factory.mktemp("bank") / "s.h5",
                           [f"{i:03d}" for i in range(20)])


@pytest.fixture
def store(store20, tmp_path) -> Path:
    dst = tmp_path / "s.h5"
    dst.write_bytes(store20.read_bytes())
    return dst


def read_bank(path: Path, name: str) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        g = f["banks"][name]
        out = {"members": g["members"][:], "index": g["neighbors/index"][:],
               "dist": g["neighbors/dist"][:], "attrs": dict(g.attrs),
               "nb_attrs": dict(g["neighbors"].attrs)}
        out["hnsw"] = g["hnsw"][:] if "hnsw" in g else None
    return out


def check_tables(path: Path, name: str) -> dict:
    """Invariants every bank must hold; returns the bank."""
    st = Store(path)
    b = read_bank(path, name)
    ts = st.timesteps
    held = st.sequences.held_out[ts.sequence]
    assert not held[b["members"]].any()
    assert b["index"].shape == (len(ts), b["nb_attrs"]["k"])
    assert np.isin(b["index"], b["members"]).all()
    assert (ts.identity[b["index"]] != ts.identity[:, None]).all()
    assert (np.diff(b["dist"], axis=1) >= 0).all()
    true = np.linalg.norm(ts.exp[b["index"]] - ts.exp[:, None], axis=2)
    np.testing.assert_allclose(b["dist"], true, rtol=1e-4, atol=1e-4)
    st.close()
    return b


# ---------------------------------------------------------------------------------------------
# core on arrays


def test_exclusion_when_own_identity_dominates():
    """Identity 0 owns 600 members packed around the queries, far more than k: never returned."""
    rng = np.random.default_rng(1)
    own = rng.normal(scale=0.05, size=(600, D))
    others = rng.normal(scale=1.0, size=(300, D)) + 0.5
    bank = np.concatenate([own, others]).astype(np.float32)
    ident = np.concatenate([np.zeros(600, np.int64), 1 + np.arange(300) % 30])
    queries = rng.normal(scale=0.05, size=(200, D)).astype(np.float32)
    qid = np.zeros(200, np.int64)
    index = build_index(bank, M=8, ef_construction=50, seed=0)
    res = search_excluding(index, ident, queries, qid, k=8, ef=32, threads=2)
    assert (ident[res.pos] != 0).all()
    assert res.fallback_rate > 0.5  # the margin had to grow for these rows
    truth = exact_search(bank, ident, queries, qid, k=8)
    r1, rk = recall(res, truth)
    assert rk >= 0.97 and r1 >= 0.95
    # Queries of another identity still may (and do) return identity-0 members.
    res2 = search_excluding(index, ident, queries, np.full(200, 5), k=8)
    assert (ident[res2.pos] == 0).all()
    with pytest.raises(ValueError):
        search_excluding(index, ident, queries, qid, k=301)


def test_exact_search_matches_numpy():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(500, D)).astype(np.float32)
    ident = np.arange(500) % 7
    q = rng.normal(size=(50, D)).astype(np.float32)
    qid = np.arange(50) % 7
    res = exact_search(bank, ident, q, qid, k=5, block_elems=4096)  # many small blocks
    d = np.linalg.norm(q[:, None] - bank[None], axis=2)
    d[ident[None] == qid[:, None]] = np.inf
    np.testing.assert_array_equal(res.pos, np.argsort(d, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(res.dist, np.sort(d, axis=1)[:, :5], rtol=1e-5)


def test_select_identities_halves_disjoint():
    names = [f"{i:03d}" for i in range(41)]
    a = select_identities(names, fraction=0.5, subset_seed=3, part=0)
    b = select_identities(names, fraction=0.5, subset_seed=3, part=1)
    assert len(a) == len(b) == 20 and not set(a) & set(b)
    assert list(select_identities(names, identities=["7", "012"])) == [7, 12]
    with pytest.raises(StoreError, match="not in the store"):
        select_identities(names, identities=["999"])
    with pytest.raises(StoreError, match="part 2"):
        select_identities(names, fraction=0.5, part=2)


# ---------------------------------------------------------------------------------------------
# store layer


def test_build_bank_tables_and_recall(store):
    rep = build_bank(store, BankConfig(frames_per_id=25, recall_sample=10_000, threads=2))
    b = check_tables(store, "full")
    with Store(store) as st:
        n_t = len(st.timesteps)
    assert rep.members == 20 * 25 and len(b["members"]) == 500
    # Tables cover held-out timesteps too; members never come from them.
    assert b["index"].shape[0] == n_t == 20 * 80
    assert rep.recall_queries == n_t  # all of them when fewer than asked
    assert b["nb_attrs"]["recall_at_k"] >= 0.99 and b["nb_attrs"]["recall_at_1"] >= 0.99
    assert b["attrs"]["sequences_excluded"].tolist() == ["FREE"]
    assert b["attrs"]["metric"] == "l2" and not b["nb_attrs"]["exact"]
    # Against exact brute force tables built by --exact.
    build_bank(store, BankConfig(name="exact", frames_per_id=25, exact=True))
    e = check_tables(store, "exact")
    np.testing.assert_array_equal(e["members"], b["members"])
    assert e["hnsw"] is None and e["nb_attrs"]["exact"]
    hits = (b["index"][:, :, None] == e["index"][:, None, :]).any(axis=2).mean()
    assert hits >= 0.99


def test_deterministic(store):
    cfg = BankConfig(frames_per_id=30, seed=5, threads=2)
    build_bank(store, cfg)
    build_bank(store, BankConfig(name="again", frames_per_id=30, seed=5, threads=1))
    a, b = read_bank(store, "full"), read_bank(store, "again")
    np.testing.assert_array_equal(a["members"], b["members"])
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["dist"], b["dist"])
    np.testing.assert_array_equal(a["hnsw"], b["hnsw"])
    build_bank(store, BankConfig(name="other", frames_per_id=30, seed=6))
    assert not np.array_equal(read_bank(store, "other")["members"], a["members"])


def test_big_identity_in_store(tmp_path):
    """One identity owns 400 members (k=8): exclusion holds over the whole table."""
    path = write_timesteps(tmp_path / "big.h5", ["001", "002", "003", "004"],
                           frames={"001": 400, "002": 10, "003": 10, "004": 10})
    rep = build_bank(path, BankConfig(frames_per_id=1000, k=8))
    assert rep.members == 430
    check_tables(path, "full")
    assert rep.fallback_rate > 0


def test_half_banks(store):
    for part in (0, 1):
        build_bank(store, BankConfig(name=f"half{part}", frames_per_id=20,
                                     identity_fraction=0.5, subset_seed=1, subset_part=part))
    a, b = check_tables(store, "half0"), check_tables(store, "half1")
    ia, ib = set(a["attrs"]["identities"]), set(b["attrs"]["identities"])
    assert len(ia) == len(ib) == 10 and not ia & ib
    with Store(store) as st:
        ts = st.timesteps
    assert set(ts.identity[a["members"]]).isdisjoint(ts.identity[b["members"]])


def test_identity_filter(store):
    rep = build_bank(store, BankConfig(name="some", identities=("3", "004", "5"), k=4))
    assert rep.identities == ["003", "004", "005"]
    check_tables(store, "some")


def test_round_trip_query(store):
    build_bank(store, BankConfig(frames_per_id=30))
    b = read_bank(store, "full")
    bank = Bank.load(store, "full")
    st = Store(store)
    st.close()  # tables stay in memory; the handle must not outlive the test
    rows = np.arange(0, len(st.timesteps), 7)
    got, dist = bank.query(st.timesteps.exp[rows], 8, exclude_identity=st.timesteps.identity[rows])
    np.testing.assert_array_equal(got, b["index"][rows])
    np.testing.assert_allclose(dist, b["dist"][rows], rtol=1e-6)
    # By name, one identity for all queries, and a single vector.
    name = st.identities[st.timesteps.identity[rows[0]]]
    one, _ = bank.query(st.timesteps.exp[rows[0]], 8, exclude_identity=str(int(name)))
    np.testing.assert_array_equal(one[0], b["index"][rows[0]])
    ex, _ = bank.query(st.timesteps.exp[rows], 8, exclude_identity=st.timesteps.identity[rows],
                       exact=True)
    assert (ex == got).mean() > 0.95
    with pytest.raises(StoreError, match="no bank"):
        Bank.load(store, "nope")


def test_atomic_replace_and_force(store, monkeypatch):
    build_bank(store, BankConfig(frames_per_id=20))
    build_bank(store, BankConfig(name="half0", frames_per_id=20, identity_fraction=0.5))
    half = read_bank(store, "half0")
    with pytest.raises(StoreError, match="--force"):
        build_bank(store, BankConfig(frames_per_id=10))
    # A crash while the new bank is being written leaves the old one intact.
    old = read_bank(store, "full")
    real = h5py.Group.create_dataset

    def crash(self, name, *a, **kw):
        if name == "dist":
            raise KeyboardInterrupt
        return real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        build_bank(store, BankConfig(frames_per_id=10, force=True))
    monkeypatch.undo()
    with h5py.File(store, "r", locking=False) as f:
        assert ".tmp-full" in f["banks"]
    np.testing.assert_array_equal(read_bank(store, "full")["index"], old["index"])
    assert Bank.load(store, "full").members.tolist() == old["members"].tolist()
    rep = build_bank(store, BankConfig(frames_per_id=10, force=True))
    assert rep.replaced and rep.members == 200
    with h5py.File(store, "r", locking=False) as f:
        assert sorted(f["banks"]) == ["full", "half0"]  # the stale .tmp group is gone
    new_half = read_bank(store, "half0")
    for key in ("members", "index", "dist", "hnsw"):
        np.testing.assert_array_equal(new_half[key], half[key])


def test_bad_inputs(store, tmp_path):
    empty = tmp_path / "empty.h5"
    StoreWriter(empty).close()
    with pytest.raises(StoreError, match="no timesteps"):
        build_bank(empty)
    with pytest.raises(StoreError, match="not in the store"):
        build_bank(store, BankConfig(identities=("388",)))
    with pytest.raises(StoreError, match="k=50"):
        build_bank(store, BankConfig(identities=("1", "2"), frames_per_id=20, k=50))
    with pytest.raises(StoreError, match="bad bank name"):
        build_bank(store, BankConfig(name=".tmp-x"))
    with h5py.File(store, "r", locking=False) as f:
        assert "banks" not in f  # nothing was written by the refusals


def _cli() -> click.Group:
    @click.group(cls=FriendlyGroup)
    def group() -> None:
        pass

    group.add_command(build_bank_cmd)
    return group


def test_cli(store):
    runner = CliRunner()
    cli = _cli()
    res = runner.invoke(cli, ["build-bank", str(store), "--frames-per-id", "20", "--k", "5",
                              "--M", "8", "--ef", "40", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert "recall@5" in res.output
    b = check_tables(store, "full")
    assert b["attrs"]["M"] == 8 and b["attrs"]["ef"] == 40 and b["nb_attrs"]["k"] == 5
    res = runner.invoke(cli, ["build-bank", str(store), "--quiet"])
    assert res.exit_code == 2 and "--force" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["build-bank", str(store), "--quiet", "--force",
                              "--identity-fraction", "0.5", "--subset-part", "1"])
    assert res.exit_code == 0, res.output
    assert len(read_bank(store, "full")["attrs"]["identities"]) == 10
    res = runner.invoke(cli, ["build-bank", str(store), "--identities", "999", "--name", "x"])
    assert res.exit_code == 2 and "999" in res.output
    res = runner.invoke(cli, ["build-bank", str(store.parent / "missing.h5")])
    assert res.exit_code == 2 and "no such store" in res.output


def test_errors_are_rafdata_errors():
    assert issubclass(StoreError, RafDataError)
