"""rafdata.bank: members, HNSW tables with identity exclusion, recall, store writes, CLI;
checked reading (every damage refused in one line), kills and a full disk during a build."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.rafdata_bank import build_bank as build_bank_cmd
from rafdata.bank import (
    Bank,
    BankConfig,
    bank_names,
    bank_problems,
    build_bank,
    build_index,
    exact_search,
    neighbor_table,
    read_bank,
    recall,
    search_excluding,
    select_identities,
)
from rafdata.errors import RafDataError, StoreError
from rafdata.store import Store, copy_store
from rafdata.writer import StoreWriter
from tests.cli_helpers import cli_process, command_group, run_cli, run_python
from tests.crash_helpers import crash_points, killed, require_tmpfs, run_unshared
from tests.store_helpers import sha256

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
    return copy_store(store20, tmp_path / "s.h5")


def raw_bank(path: Path, name: str) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        g = f["banks"][name]
        out = {"members": g["members"][:], "index": g["neighbors/index"][:],
               "dist": g["neighbors/dist"][:], "attrs": dict(g.attrs),
               "nb_attrs": dict(g["neighbors"].attrs)}
        out["hnsw"] = g["hnsw"][:] if "hnsw" in g else None
    return out


def temporaries(path: Path) -> list[Path]:
    """Main-file temporaries left beside a store (``s.h5.tmp-PID``)."""
    return sorted(Path(path).parent.glob(Path(path).name + ".tmp-*"))


def check_tables(path: Path, name: str) -> dict:
    """Invariants every bank must hold; returns the bank."""
    st = Store(path)
    b = raw_bank(path, name)
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
    a, b = raw_bank(store, "full"), raw_bank(store, "again")
    np.testing.assert_array_equal(a["members"], b["members"])
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["dist"], b["dist"])
    np.testing.assert_array_equal(a["hnsw"], b["hnsw"])
    build_bank(store, BankConfig(name="other", frames_per_id=30, seed=6))
    assert not np.array_equal(raw_bank(store, "other")["members"], a["members"])


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
    b = raw_bank(store, "full")
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
    half = raw_bank(store, "half0")
    with pytest.raises(StoreError, match="--force"):
        build_bank(store, BankConfig(frames_per_id=10))
    # A crash while the new bank is being written leaves the old one intact.
    old = raw_bank(store, "full")
    real = h5py.Group.create_dataset

    def crash(self, name, *a, **kw):
        if name == "dist":
            raise KeyboardInterrupt
        return real(self, name, *a, **kw)

    before = sha256(store)
    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        build_bank(store, BankConfig(frames_per_id=10, force=True))
    monkeypatch.undo()
    assert sha256(store) == before  # the main file was never opened for writing
    assert not temporaries(store)
    np.testing.assert_array_equal(raw_bank(store, "full")["index"], old["index"])
    assert Bank.load(store, "full").members.tolist() == old["members"].tolist()
    rep = build_bank(store, BankConfig(frames_per_id=10, force=True))
    assert rep.replaced and rep.members == 200
    with h5py.File(store, "r", locking=False) as f:
        assert sorted(f["banks"]) == ["full", "half0"]
    new_half = raw_bank(store, "half0")
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


def test_cli(store):
    runner = CliRunner()
    cli = command_group(build_bank_cmd)
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
    assert len(raw_bank(store, "full")["attrs"]["identities"]) == 10
    res = runner.invoke(cli, ["build-bank", str(store), "--identities", "999", "--name", "x"])
    assert res.exit_code == 2 and "999" in res.output
    res = runner.invoke(cli, ["build-bank", str(store.parent / "missing.h5")])
    assert res.exit_code == 2 and "no such store" in res.output


def test_errors_are_rafdata_errors():
    assert issubclass(StoreError, RafDataError)


# ---------------------------------------------------------------------------------------------
# Checked reading: every damage is one line in verify and one StoreError for every reader


@pytest.fixture(scope="module")
def banked(store20, tmp_path_factory) -> Path:
    """store20 with an HNSW bank "full" (25 per identity, k=8); read-only (copy to damage)."""
    path = copy_store(store20, tmp_path_factory.mktemp("banked") / "s.h5")
    build_bank(path, BankConfig(frames_per_id=25, threads=2))
    return path


@pytest.fixture
def damaged(banked, tmp_path) -> Path:
    return copy_store(banked, tmp_path / "s.h5")


def test_bank_datasets_carry_checksums(banked):
    with h5py.File(banked, "r", locking=False) as f:
        g = f["banks/full"]
        for key in ("members", "hnsw", "neighbors/index", "neighbors/dist"):
            assert g[key].fletcher32 and g[key].chunks, key
        import zlib

        assert g.attrs["hnsw_crc32"] == zlib.crc32(g["hnsw"][()])
    with Store(banked) as st:
        assert bank_problems(st, "full") == []
        assert neighbor_table(st, "full").shape == (len(st.timesteps), 8)


def _timestep(path: Path, held_out: bool, not_identity_of: int = 0) -> int:
    """A timestep row of a held-out (or training) sequence, of another identity than row
    ``not_identity_of``."""
    with Store(path) as st:
        ts = st.timesteps
        held = st.sequences.held_out[ts.sequence]
        ok = (held == held_out) & (ts.identity != ts.identity[not_identity_of])
        return int(np.flatnonzero(ok)[0])


def _edit(path: Path, fn) -> None:
    with h5py.File(path, "r+", locking=False) as f:
        fn(f["banks/full"])


def _flip_on_disk(path: Path, dataset: str) -> None:
    """Flip one byte of a dataset's first chunk in the file itself (under Fletcher32)."""
    with h5py.File(path, "r", locking=False) as f:
        info = f[dataset].id.get_chunk_info(0)
        offset = info.byte_offset + info.size // 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))


def _garble_header(path: Path, obj: str) -> None:
    """Overwrite an object's header in the file: opening it fails in HDF5."""
    with h5py.File(path, "r", locking=False) as f:
        addr = h5py.h5o.get_info(f[obj].id).addr
    with open(path, "r+b") as fh:
        fh.seek(addr)
        fh.write(b"\0" * 8)  # its version / signature: the neighbours' headers are intact


def _set(key: str, where, value):
    def fn(g):
        ds = g[key]
        data = ds[()]
        data[where] = value(g) if callable(value) else value
        ds[...] = data
    return fn


def _flip_hnsw_bytes(g):
    data = g["hnsw"][()]
    data[200:216] ^= 0x5A  # rewritten through h5py: Fletcher32 matches, the CRC-32 does not
    g["hnsw"][...] = data


# (id, damage(path), what verify and every reader report, readers refuse it too)
DAMAGES = [
    ("members-deleted", lambda p: _edit(p, lambda g: g.__delitem__("members")),
     "/banks/full/members: missing", True),
    ("index-deleted", lambda p: _edit(p, lambda g: g.__delitem__("neighbors/index")),
     "/banks/full/neighbors/index: missing", True),
    ("dist-deleted", lambda p: _edit(p, lambda g: g.__delitem__("neighbors/dist")),
     "/banks/full/neighbors/dist: missing", True),
    ("hnsw-deleted", lambda p: _edit(p, lambda g: g.__delitem__("hnsw")),
     "/banks/full/hnsw: missing, but the bank was built with HNSW", True),
    ("hnsw-bytes-flipped", lambda p: _edit(p, _flip_hnsw_bytes),
     "/banks/full/hnsw: CRC-32", True),
    ("held-out-neighbour",
     lambda p: _edit(p, _set("neighbors/index", (0, 0), _timestep(p, held_out=True))),
     "a test-set leak (first at timestep 0)", True),
    ("negative-neighbour", lambda p: _edit(p, _set("neighbors/index", (3, 2), -5)),
     "/banks/full/neighbors/index: 1 negative entries (first at timestep 3)", True),
    ("neighbour-out-of-range", lambda p: _edit(p, _set("neighbors/index", (4, 0), 10**6)),
     "/banks/full/neighbors/index: 1 entries beyond", True),
    ("same-identity-neighbour", lambda p: _edit(p, _set("neighbors/index", (0, 0), 1)),
     "a neighbour of the same identity (timestep 0)", True),
    ("member-out-of-range", lambda p: _edit(p, _set("members", 0, 10**6)),
     "/banks/full/members: 1 rows outside", True),
    ("held-out-member",
     lambda p: _edit(p, _set("members", 0, _timestep(p, held_out=True))),
     "/banks/full/members: 1 held-out timesteps in the bank", True),
    ("index-chunk-damaged-on-disk", lambda p: _flip_on_disk(p, "banks/full/neighbors/index"),
     "/banks/full/neighbors/index: unreadable or checksum mismatch", True),
    ("bank-group-damaged", lambda p: _garble_header(p, "banks/full"),
     "/banks/full: cannot be opened", True),
    ("neighbors-group-damaged", lambda p: _garble_header(p, "banks/full/neighbors"),
     "/banks/full/neighbors: cannot be opened", True),
    ("hnsw-chunk-damaged-on-disk", lambda p: _flip_on_disk(p, "banks/full/hnsw"),
     "/banks/full/hnsw: unreadable or checksum mismatch", True),
    ("dist-not-ascending", lambda p: _edit(p, _set("neighbors/dist", (5, 0), 1e3)),
     "/banks/full/neighbors/dist: not ascending (first at timestep 5)", True),
    # Only verify recomputes the distances from the expression vectors.
    ("dist-scaled", lambda p: _edit(p, _set("neighbors/dist", slice(None), lambda g: (
        g["neighbors/dist"][()] * 2))),
     "/banks/full/neighbors/dist: 12800 distances differ from those of the expression vectors",
     False),
]


def _inspect_cli():
    from cli.rafdata import main

    return main


@pytest.mark.parametrize("damage,problem,readers_refuse", [d[1:] for d in DAMAGES],
                         ids=[d[0] for d in DAMAGES])
def test_damaged_bank_is_reported_and_refused(damaged, damage, problem, readers_refuse):
    from rafmodel.data import load_neighbors

    damage(damaged)
    res = CliRunner().invoke(_inspect_cli(), ["inspect", str(damaged), "--verify", "--quiet"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if problem in ln]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("violation: /banks/full")
    js = CliRunner().invoke(_inspect_cli(), ["inspect", str(damaged), "--verify", "--json"])
    assert js.exit_code == 1
    assert any(problem in p for p in json.loads(js.stdout)["verify"]["problems"])

    def refused(read):
        with pytest.raises(StoreError) as err:
            read()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(str(damaged)), msg
        assert problem in msg and "build-bank" in msg, msg

    def training_loader() -> None:
        with Store(damaged) as st:
            load_neighbors(st, "full")

    readers = [lambda: Bank.load(damaged, "full"), lambda: neighbor_table(damaged, "full"),
               training_loader]
    for read in readers:
        if readers_refuse:
            refused(read)
        else:
            read()


def test_damaged_bank_in_coverage_and_plots(damaged, tmp_path):
    from rafdata.coverage import subject_coverage
    from rafdata.plots import plot_bank

    _edit(damaged, lambda g: g.__delitem__("neighbors/dist"))
    with pytest.raises(StoreError, match="/banks/full/neighbors/dist: missing"):
        subject_coverage(damaged, "001")
    with pytest.raises(StoreError, match="/banks/full/neighbors/dist: missing"):
        plot_bank(damaged, tmp_path / "b.png")


def test_bank_older_than_the_timesteps_is_refused(damaged):
    """Ingest appends timesteps after a build: the tables no longer cover the store."""
    with StoreWriter(damaged) as w, w.sequence("999", "EXP-1-head", held_out=False,
                                               source="mem") as sw:
        sw.add_timesteps(np.arange(3), np.zeros((3, D), np.float32),
                         np.zeros((3, 6), np.float32), np.ones(3, np.float32), "test")
    with pytest.raises(StoreError, match=r"covers 1600 timesteps but the store has 1603.*"
                                         r"build-bank --force"):
        Bank.load(damaged, "full")
    with Store(damaged) as st:
        assert len(bank_problems(st, "full")) == 1


def _legacy_leftover(path: Path) -> None:
    """What a build by an older version killed mid-write leaves: /banks/.tmp-full whose object
    header is garbage (even `del` fails on it with "Couldn't delete link")."""
    with h5py.File(path, "r+", locking=False) as f:
        g = f["banks"].create_group(".tmp-full")
        g.create_dataset("members", data=np.arange(10))
        addr = h5py.h5o.get_info(g.id).addr
    with open(path, "r+b") as fh:
        fh.seek(addr)
        fh.write(b"\0" * 64)
    with h5py.File(path, "r+", locking=False) as f, pytest.raises(KeyError, match="delete link"):
        del f["banks/.tmp-full"]


def test_leftover_tmp_group_of_old_builds_is_ignored_then_dropped(damaged):
    from rafmodel.data import load_neighbors

    _legacy_leftover(damaged)
    assert bank_names(damaged) == ["full"]
    res = CliRunner().invoke(_inspect_cli(), ["inspect", str(damaged), "--verify", "--json",
                                              "--quiet"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [b["name"] for b in info["banks"]] == ["full"] and info["verify"]["ok"]
    assert CliRunner().invoke(_inspect_cli(), ["inspect", str(damaged)]).exit_code == 0
    assert len(Bank.load(damaged, "full")) == 500
    with Store(damaged) as st:
        assert load_neighbors(st, "full").shape[1] == 8
    with pytest.raises(StoreError, match="no bank named '.tmp-full'"):
        Bank.load(damaged, ".tmp-full")
    # The next build leaves the leftover out of the rewritten file.
    build_bank(damaged, BankConfig(name="other", frames_per_id=10, k=4))
    with h5py.File(damaged, "r", locking=False) as f:
        assert sorted(f["banks"]) == ["full", "other"]
    with Store(damaged) as st:
        assert bank_problems(st, "full") == [] and bank_problems(st, "other") == []


def test_old_bank_without_checksums_loads(damaged):
    """Banks written before checksums (no Fletcher32, no hnsw_crc32) load and verify as
    before; a damaged hnsw header is still refused before hnswlib sees it."""
    def strip(g):
        del g.attrs["hnsw_crc32"]
        for key in ("members", "hnsw", "neighbors/index", "neighbors/dist"):
            data = g[key][()]
            del g[key]
            g.create_dataset(key, data=data)

    _edit(damaged, strip)
    with h5py.File(damaged, "r", locking=False) as f:
        assert not f["banks/full/hnsw"].fletcher32
    bank = Bank.load(damaged, "full")
    rows, _ = bank.query(bank.vectors[:3], 4, exclude_identity=bank.member_identity[:3])
    assert rows.shape == (3, 4)
    with Store(damaged) as st:
        assert bank_problems(st, "full") == []

    def count(g):  # cur_element_count, the third size_t of hnswlib's header
        data = g["hnsw"][()]
        data[16:24] = np.frombuffer(np.uint64(499).tobytes(), np.uint8)
        g["hnsw"][...] = data

    _edit(damaged, count)
    with pytest.raises(StoreError, match="hnsw: holds 499 vectors but the bank has 500"):
        Bank.load(damaged, "full")


def test_opened_closes_only_the_store_it_opened(banked, monkeypatch):
    """The one helper by which bank, coverage and plot readers take a path or a Store."""
    from rafdata.bank import opened

    closed = []
    real_close = Store.close
    monkeypatch.setattr(Store, "close", lambda self: closed.append(self) or real_close(self))
    with opened(banked) as st:
        assert isinstance(st, Store) and bank_names(st) == ["full"]
    assert closed == [st]  # a path: its Store is closed again on exit
    closed.clear()
    mine = Store(banked)
    with opened(mine) as st:
        assert st is mine
    assert closed == []  # the caller's Store stays the caller's
    mine.close()


def test_bank_attrs_are_plain_python(banked):
    """Attrs come back as JSON-ready Python, as `inspect` shows them (one converter)."""
    tables = read_bank(banked, "full")
    for attrs in (tables.attrs, tables.nb_attrs):
        json.dumps(attrs)
        assert not any(isinstance(v, (bytes, np.generic, np.ndarray)) for v in attrs.values())
    assert tables.attrs["identities"] == [f"{i:03d}" for i in range(20)]
    assert tables.attrs["exact"] is False and tables.nb_attrs["k"] == 8


def test_importing_bank_and_coverage_loads_no_torch_hnswlib_or_matplotlib():
    code = ("import sys, cli.rafdata, rafdata.bank, rafdata.coverage, rafdata.inspect; "
            "print(sorted(m for m in ('torch', 'hnswlib', 'matplotlib') if m in sys.modules))")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# A build killed at any instant, or out of disk space, leaves the store as it was


@pytest.fixture(scope="module")
def small_banked(tmp_path_factory) -> Path:
    """6 identities x (EXP + FREE) x 30 timesteps with bank "full" (seed 0, k=4)."""
    path = write_timesteps(tmp_path_factory.mktemp("small") / "s.h5",
                           [f"{i:03d}" for i in range(6)], frames=30)
    build_bank(path, BankConfig(frames_per_id=20, k=4, threads=1))
    return path


REBUILD = ("--force", "--seed", "1", "--frames-per-id", "20", "--k", "4", "--threads", "1",
           "--quiet")


def _tables(path: Path) -> tuple[np.ndarray, ...]:
    """The bank as every reader sees it, after every check (verify's included)."""
    with Store(path) as st:
        assert bank_problems(st, "full") == []
        t = read_bank(st, "full", hnsw=True)
    return t.members, t.index, t.dist, t.hnsw


def _same(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


REBUILD_SECONDS: list[float] = []  # how long an uninterrupted REBUILD run takes, here


@pytest.fixture(scope="module")
def rebuilt(small_banked, tmp_path_factory) -> tuple[np.ndarray, ...]:
    """The bank that REBUILD writes over small_banked's (seed 1)."""
    path = copy_store(small_banked, tmp_path_factory.mktemp("rebuilt") / "s.h5")
    t0 = time.perf_counter()
    assert run_cli("rafdata", "build-bank", str(path), *REBUILD).returncode == 0
    REBUILD_SECONDS.append(time.perf_counter() - t0)
    return _tables(path)


def test_build_bank_killed_at_every_crash_point_keeps_the_old_bank(small_banked, rebuilt,
                                                                   tmp_path):
    old = _tables(small_banked)
    assert not _same(old, rebuilt)
    scratch = copy_store(small_banked, tmp_path / "scratch.h5")
    points = crash_points("rafdata", "build-bank", str(scratch), *REBUILD)
    assert {"main-write", "main-publish"} <= set(points), points
    for name, n in sorted(points.items()):
        for i in range(1, n + 1):
            (tmp_path / f"{name}-{i}").mkdir()
            path = copy_store(small_banked, tmp_path / f"{name}-{i}" / "s.h5")
            before = sha256(path)
            proc = run_cli("rafdata", "build-bank", str(path), *REBUILD, fault=f"{name}:{i}")
            assert killed(proc), (name, i, proc.stderr)
            state = _tables(path)  # readable and valid whatever the instant
            if sha256(path) == before:
                assert _same(state, old), (name, i)
            else:  # killed after the rename: the new bank is complete
                assert _same(state, rebuilt), (name, i)
            rerun = run_cli("rafdata", "build-bank", str(path), *REBUILD)
            assert rerun.returncode == 0, rerun.stderr
            assert _same(_tables(path), rebuilt) and not temporaries(path)


def test_build_bank_killed_at_random_times_then_rerun(small_banked, rebuilt, tmp_path):
    old = _tables(small_banked)
    path = copy_store(small_banked, tmp_path / "s.h5")
    full_run = REBUILD_SECONDS[0]
    rng = np.random.default_rng(7)
    # Startup (imports) takes most of a run: kill in its second half, where the work is.
    for delay in rng.uniform(0.5 * full_run, 1.05 * full_run, size=4):
        proc = cli_process("rafdata", "build-bank", str(path), *REBUILD)
        time.sleep(delay)
        proc.kill()
        _, err = proc.communicate()
        assert proc.returncode in (0, -9), err
        state = _tables(path)
        assert _same(state, old) or _same(state, rebuilt)
    rerun = run_cli("rafdata", "build-bank", str(path), *REBUILD)
    assert rerun.returncode == 0, rerun.stderr
    assert _same(_tables(path), rebuilt) and not temporaries(path)


def test_build_bank_on_a_full_disk_fails_in_one_line_and_keeps_the_store(small_banked,
                                                                         rebuilt, tmp_path):
    """Replace a bank on a small tmpfs (private mount namespace) with too little room for
    the rewritten main file: refused by the space check, and with the check off
    (RAFDATA_SPACE_CHECK=0) failing in the write itself. Both: one line, exit 2, the store
    byte-identical, no temporary left (an old-build leftover group in it changes nothing).
    With room again the rerun succeeds."""
    require_tmpfs()
    (tmp_path / "src").mkdir()
    src = copy_store(small_banked, tmp_path / "src" / "s.h5")
    _legacy_leftover(src)
    old = _tables(src)
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    q = shlex.quote
    cli = f"{q(sys.executable)} -m cli.rafdata"
    args = " ".join(q(a) for a in REBUILD)
    log = out / "log"
    script = f"""
        set -u
        mount -t tmpfs -o size=64m tmpfs {q(str(mnt))}
        cd {q(str(mnt))}
        cp -r {q(str(src))} {q(str(src))}.parts .
        avail=$(df -k --output=avail . | tail -1)
        main=$(du -k s.h5 | cut -f1)
        head -c $(( (avail - main / 2) * 1024 )) /dev/zero > filler 2>/dev/null
        for check in 1 0; do
          RAFDATA_SPACE_CHECK=$check {cli} build-bank s.h5 {args} 2> err$check
          echo "rc$check=$?" >> {q(str(log))}
          cp err$check {q(str(out))}/
          ls -a > {q(str(out))}/ls$check
        done
        cp s.h5 {q(str(out))}/after.h5
        rm filler
        {cli} build-bank s.h5 {args} 2> {q(str(out))}/err-rerun
        echo "rerun=$?" >> {q(str(log))}
        mkdir {q(str(out))}/final && cp -r s.h5 s.h5.parts {q(str(out))}/final/
    """
    proc = run_unshared(script)
    assert log.exists(), proc.stderr
    rcs = dict(line.split("=", 1) for line in log.read_text().splitlines())
    for check in "10":
        err = (out / f"err{check}").read_text()
        assert rcs[f"rc{check}"] == "2", (rcs, err, proc.stderr)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("error: "), err
        assert ("the store is unchanged" in lines[0] if check == "0"
                else "not enough space" in lines[0]), err
        assert not [n for n in (out / f"ls{check}").read_text().split() if ".tmp-" in n]
    assert sha256(out / "after.h5") == sha256(src)  # byte for byte
    assert rcs["rerun"] == "0", (out / "err-rerun").read_text()
    final = out / "final" / "s.h5"
    assert _same(_tables(final), rebuilt) and not _same(old, rebuilt)
    with h5py.File(final, "r", locking=False) as f:
        assert sorted(f["banks"]) == ["full"]  # the leftover is gone
