"""rafmodel.data: the subject dataset, expression augmentation (vanilla, noise, RAF) and loaders.

A small synth store is ingested once per session and given an exact neighbour table written
here by brute force (independent of rafdata.bank), so every swap can be checked exactly.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from rafdata.errors import StoreError
from rafdata.store import Store, copy_store
from rafmodel.data import (
    AugmentConfig,
    EpochSampler,
    ExpressionAugmenter,
    InfiniteLoader,
    SubjectDataset,
    SwapStats,
    load_neighbors,
    make_loader,
    to_unit,
)

K_TABLE = 6  # neighbours per timestep in the test table (topk tests use up to 5)
SUBJECT = "388"


def write_exact_neighbors(path: Path, name: str, k: int, identities: list[int] | None = None,
                          ) -> np.ndarray:
    """Write ``/banks/{name}`` with an exact (T, k) neighbour table; returns the index table.

    Members are the non-held-out timesteps (of ``identities`` when given); each timestep's
    neighbours are the k nearest members of another identity, ascending, ties by row.
    """
    st = Store(path)
    ts = st.timesteps
    held = st.sequences.held_out[ts.sequence]
    member = ~held
    if identities is not None:
        member &= np.isin(ts.identity, identities)
    members = np.flatnonzero(member)
    exp = ts.exp.astype(np.float64)
    d = np.linalg.norm(exp[:, None, :] - exp[None, members, :], axis=-1)  # (T, B)
    d[ts.identity[:, None] == ts.identity[members][None, :]] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    index = members[order].astype(np.int64)
    dist = np.take_along_axis(d, order, axis=1).astype(np.float32)
    assert np.isfinite(dist).all(), "test store too small for the table"
    st.close()
    with h5py.File(path, "r+", locking=False) as f:
        g = f.require_group("banks").create_group(name)
        g.create_dataset("members", data=members.astype(np.int64))
        nb = g.create_group("neighbors")
        nb.create_dataset("index", data=index)
        nb.create_dataset("dist", data=dist)
        nb.attrs["k"] = k
        nb.attrs["metric"] = "l2"
    return index


@pytest.fixture(scope="session")
def data_store(tmp_path_factory) -> Path:
    """3 identities x (EXP-1-head, FREE held out) x 2 cameras x 6 frames, with mattes and an
    exact neighbour table in bank "full" (read-only for tests)."""
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.synth import SynthConfig, write_dataset

    tmp = tmp_path_factory.mktemp("data_store")
    write_dataset(tmp / "src", SynthConfig(
        participants=("388", "422", "443"), sequences=("EXP-1-head", "FREE"),
        cameras=("222200037", "222200038"), frames=6, width=64, height=80))
    out = tmp / "store.h5"
    ingest(tmp / "src", out, IngestConfig(workers=1))
    write_exact_neighbors(out, "full", K_TABLE)
    return out


@pytest.fixture(scope="session")
def nomatte_store(tmp_path_factory) -> Path:
    """2 identities without mattes; only 388 has images stored (422: coefficients only)."""
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.synth import SynthConfig, write_dataset

    tmp = tmp_path_factory.mktemp("nomatte_store")
    write_dataset(tmp / "src", SynthConfig(
        participants=("388", "422"), sequences=("EXP-1-head",), cameras=("222200037",),
        frames=3, width=32, height=32, alpha_maps=False))
    out = tmp / "store.h5"
    ingest(tmp / "src", out, IngestConfig(workers=1, images_for=("388",)))
    return out


@pytest.fixture(scope="session")
def store(data_store) -> Store:
    st = Store(data_store)
    yield st
    st.close()


@pytest.fixture(scope="session")
def table(store) -> np.ndarray:
    return np.asarray(store.h5()["banks/full/neighbors/index"][()])


def subject_timesteps(store: Store) -> np.ndarray:
    return store.timestep_rows(identity=SUBJECT, held_out=False)


def binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k / n - p) <= sigmas * np.sqrt(p * (1 - p) / n)


# -- the test table itself -------------------------------------------------------------------
def test_exact_table_is_valid(store, table):
    ident = store.timesteps.identity
    assert table.shape == (len(store.timesteps), K_TABLE)
    assert (ident[table] != ident[:, None]).all()
    held = store.sequences.held_out[store.timesteps.sequence]
    assert not held[table].any()
    d = np.asarray(store.h5()["banks/full/neighbors/dist"][()])
    assert (np.diff(d, axis=1) >= 0).all()


# -- augmentation ----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.5, 0.2, 1.0, 0.0])
def test_raf_swap_rate_near_p(store, p):
    aug = ExpressionAugmenter.from_store(store, AugmentConfig(mode="raf", p=p))
    rng = np.random.default_rng(11)
    ts = subject_timesteps(store)
    n = 4000
    swaps = sum(aug(int(ts[i % len(ts)]), rng)[1] for i in range(n))
    assert aug.calls == n and aug.swaps == swaps
    assert aug.swap_rate == pytest.approx(swaps / n)
    if p in (0.0, 1.0):
        assert swaps == p * n
    else:
        assert binomial_ok(swaps, n, p), (swaps, n, p)


@pytest.mark.parametrize("topk", [1, 3])
def test_swapped_vectors_are_table_neighbours_of_another_identity(store, table, topk):
    aug = ExpressionAugmenter.from_store(store, AugmentConfig(mode="raf", p=0.5, topk=topk))
    rng = np.random.default_rng(5)
    ident = store.timesteps.identity
    exp = store.timesteps.exp
    seen_swap = seen_keep = 0
    for t in np.tile(subject_timesteps(store), 50):
        vec, swapped, src = aug(int(t), rng)
        assert vec.dtype == np.float32 and vec.shape == (store.exp_dim,)
        if swapped:
            seen_swap += 1
            assert src in table[t, :topk]
            assert ident[src] != ident[t]
            np.testing.assert_array_equal(vec, exp[src])
        else:
            seen_keep += 1
            assert src == t
            np.testing.assert_array_equal(vec, exp[t])
    assert seen_swap > 0 and seen_keep > 0


def test_topk_sampling_is_uniform_over_k(store, table):
    topk, n = 5, 5000
    aug = ExpressionAugmenter.from_store(store, AugmentConfig(mode="raf", p=1.0, topk=topk))
    rng = np.random.default_rng(2)
    t = int(subject_timesteps(store)[3])
    cols = []
    for _ in range(n):
        _, swapped, src = aug(t, rng)
        assert swapped
        hit = np.flatnonzero(table[t] == src)
        assert hit.size == 1 and hit[0] < topk
        cols.append(int(hit[0]))
    counts = np.bincount(cols, minlength=topk)
    expected = n / topk
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, counts  # df=4: P(chi2 > 25) ~ 5e-5 under uniformity


def test_noise_mode_statistics(store):
    std = 0.08
    aug = ExpressionAugmenter.from_store(store, AugmentConfig(mode="noise", noise_std=std,
                                                              bank="absent"))
    rng = np.random.default_rng(9)
    t = int(subject_timesteps(store)[0])
    n = 4000
    draws = []
    for _ in range(n):
        vec, swapped, src = aug(t, rng)
        assert not swapped and src == t
        draws.append(vec)
    diff = np.stack(draws) - store.timesteps.exp[t]
    assert np.abs(diff.mean(axis=0)).max() < 5 * std / np.sqrt(n)
    assert diff.std() == pytest.approx(std, rel=0.02)
    assert aug.swap_rate == 0.0


def test_vanilla_is_identity(data_store):
    ds = SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="vanilla", bank="absent"))
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["exp"], item["exp_orig"])
        assert not bool(item["swapped"])
        assert int(item["exp_source"]) == int(item["timestep"])


def test_config_validation():
    with pytest.raises(ValueError):
        AugmentConfig(mode="mixup")
    with pytest.raises(ValueError):
        AugmentConfig(p=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(topk=0)
    with pytest.raises(ValueError):
        AugmentConfig(noise_std=-1.0)


# -- the dataset -----------------------------------------------------------------------------
def test_dataset_items_belong_to_the_subject(data_store, store, table):
    ds = SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="raf", p=0.5, topk=2), seed=1)
    subj = store.identity_index(SUBJECT)
    assert len(ds) == len(store.image_rows(identity=subj, held_out=False)) == 12
    h, w = store.image_size
    swapped_any = False
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            row, t, cam = (int(item[k]) for k in ("image_index", "timestep", "camera"))
            assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.uint8
            np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(),
                                          store.read_rgb(row))
            assert item["mask"].shape == (1, h, w) and item["mask"].dtype == torch.uint8
            np.testing.assert_array_equal(item["mask"][0].numpy(), store.read_mask(row))
            assert bool(item["has_mask"])
            unit = to_unit(item["image"])
            assert unit.dtype == torch.float32 and float(unit.max()) <= 1.0
            np.testing.assert_allclose(unit.permute(1, 2, 0).numpy(),
                                       store.read_rgb(row) / 255.0, atol=1e-6)
            assert store.timesteps.identity[t] == subj
            assert store.cameras.identity[cam] == subj
            assert not store.sequences.held_out[store.timesteps.sequence[t]]
            assert int(store.image_timestep[row]) == t and int(store.image_camera[row]) == cam
            np.testing.assert_allclose(item["K"].numpy(), store.cameras.K[cam], rtol=1e-6)
            np.testing.assert_allclose(item["world_to_cam"].numpy(),
                                       store.cameras.world_to_cam[cam], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(item["exp_orig"].numpy(), store.timesteps.exp[t])
            np.testing.assert_array_equal(item["pose"].numpy(), store.timesteps.pose[t])
            assert float(item["scale"]) == pytest.approx(float(store.timesteps.scale[t]))
            src = int(item["exp_source"])
            np.testing.assert_array_equal(item["exp"].numpy(), store.timesteps.exp[src])
            if bool(item["swapped"]):
                swapped_any = True
                assert src in table[t, :2] and store.timesteps.identity[src] != subj
            else:
                assert src == t
    assert swapped_any


def test_held_out_split_and_camera_filter(data_store, store):
    ds = SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="vanilla"), split="held_out")
    assert len(ds) == 12
    for i in range(len(ds)):
        t = int(ds[i]["timestep"])
        assert store.sequences.name[store.timesteps.sequence[t]] == "FREE"
    one = SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="vanilla"),
                         cameras=["222200038"])
    assert len(one) == 6
    assert {store.cameras.serial[int(one[i]["camera"])] for i in range(len(one))} == \
        {"222200038"}
    with pytest.raises(StoreError, match="no camera 999"):
        SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="vanilla"), cameras=["999"])
    with pytest.raises(ValueError):
        SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="vanilla"), split="test")


def test_dataset_is_reproducible_per_epoch_and_seed(data_store):
    cfg = AugmentConfig(mode="raf", p=0.5, topk=3)
    a = SubjectDataset(data_store, SUBJECT, cfg, seed=4)
    b = SubjectDataset(data_store, SUBJECT, cfg, seed=4)
    pattern = {}
    for epoch in range(4):
        a.set_epoch(epoch)
        # Order of access must not matter: b reads backwards with explicit (epoch, i) keys.
        got_a = [a[i] for i in range(len(a))]
        got_b = [b[(epoch, i)] for i in reversed(range(len(b)))][::-1]
        for x, y in zip(got_a, got_b, strict=True):
            assert torch.equal(x["exp"], y["exp"]) and bool(x["swapped"]) == bool(y["swapped"])
        pattern[epoch] = tuple(int(x["exp_source"]) for x in got_a)
    assert len(set(pattern.values())) > 1  # epochs draw afresh


def test_no_matte_gives_ones_and_has_mask_false(nomatte_store):
    ds = SubjectDataset(nomatte_store, "388", AugmentConfig(mode="vanilla"))
    item = ds[0]
    assert not bool(item["has_mask"])
    assert torch.equal(to_unit(item["mask"]), torch.ones(1, 32, 32))


# -- loaders ---------------------------------------------------------------------------------
def _collect(ds: SubjectDataset, workers: int, n_batches: int, batch_size: int = 4,
             pack: bool = True):
    loader = make_loader(ds, batch_size=batch_size, workers=workers, shuffle=True, seed=7,
                         prefetch=2, pack=pack)
    it = InfiniteLoader(loader)
    return [next(it) for _ in range(n_batches)], it


def test_loader_workers_match_single_process(data_store):
    cfg = AugmentConfig(mode="raf", p=0.5, topk=2)
    ds = SubjectDataset(data_store, SUBJECT, cfg, seed=3)
    n_batches = 8  # 12 samples, batch 4: two full epochs and a bit
    single, it0 = _collect(ds, 0, n_batches)
    multi, it2 = _collect(ds, 2, n_batches)
    assert it0.state_dict() == it2.state_dict() == {"epoch": 2, "batch_in_epoch": 2}
    for x, y in zip(single, multi, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert single[0]["image"].shape == (4, 3, 80, 64)
    assert single[0]["swapped"].dtype == torch.bool and single[0]["scale"].shape == (4,)
    # Every sample of an epoch once; the next epoch is another permutation.
    ep0 = torch.cat([b["image_index"] for b in single[:3]])
    ep1 = torch.cat([b["image_index"] for b in single[3:6]])
    assert sorted(ep0.tolist()) == sorted(ep1.tolist()) == sorted(ds.rows.tolist())
    assert ep0.tolist() != ep1.tolist()
    stats = SwapStats()
    for b in single:
        stats.update(b["swapped"])
    assert stats.total == 32 and 0 < stats.rate < 1


def test_infinite_loader_resumes_exactly(data_store):
    ds = SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="raf", p=0.5), seed=0)
    full, _ = _collect(ds, 0, 10, batch_size=5)  # 12 samples: 3 batches per epoch (5, 5, 2)
    first, it = _collect(ds, 0, 4, batch_size=5)
    state = it.state_dict()
    assert state == {"epoch": 1, "batch_in_epoch": 1}
    resumed = InfiniteLoader(make_loader(ds, batch_size=5, workers=0, seed=7))
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(6)]
    for x, y in zip(full, first + rest, strict=True):
        assert torch.equal(x["image_index"], y["image_index"])
        assert torch.equal(x["exp"], y["exp"])


def test_epoch_sampler_orders():
    s = EpochSampler(10, shuffle=True, seed=1)
    a = list(s)
    assert [e for e, _ in a] == [0] * 10 and sorted(i for _, i in a) == list(range(10))
    s.set_epoch(1, start=4)
    b = list(s)
    assert len(b) == len(s) == 6 and all(e == 1 for e, _ in b)
    assert [i for _, i in b] == s.order(1)[4:].tolist()
    assert list(EpochSampler(3, shuffle=False)) == [(0, 0), (0, 1), (0, 2)]


def test_swap_stats_windows():
    stats = SwapStats()
    assert np.isnan(stats.rate)
    stats.update(torch.tensor([True, False, False, False]))
    stats.update(True)
    assert stats.window_rate == pytest.approx(0.4)
    assert stats.pop_window() == pytest.approx(0.4)
    assert np.isnan(stats.window_rate)
    stats.update(np.array([False, False]))
    assert stats.window_rate == 0.0 and stats.rate == pytest.approx(2 / 7)


# -- refusals --------------------------------------------------------------------------------
def test_refuses_unknown_subject(data_store):
    with pytest.raises(StoreError, match="'999' is not in the store") as err:
        SubjectDataset(data_store, "999", AugmentConfig(mode="vanilla"))
    assert "\n" not in str(err.value) and str(data_store) in str(err.value)


def test_refuses_missing_bank_for_raf_and_names_the_banks(data_store):
    with pytest.raises(StoreError, match=r"no bank named 'half'.*banks: full"):
        SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="raf", bank="half"))
    # Other modes never read a bank.
    SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="noise", bank="half"))


def test_refuses_raf_on_store_without_banks(nomatte_store):
    with pytest.raises(StoreError, match="banks: none"):
        SubjectDataset(nomatte_store, "388", AugmentConfig(mode="raf"))


def test_refuses_topk_beyond_table(data_store):
    with pytest.raises(StoreError, match=f"keeps {K_TABLE} neighbours"):
        SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="raf", topk=K_TABLE + 1))


def test_refuses_subject_without_training_images(nomatte_store):
    with pytest.raises(StoreError, match="subject 422 has no training images"):
        SubjectDataset(nomatte_store, "422", AugmentConfig(mode="vanilla"))


def test_refuses_newer_format_version(data_store, tmp_path):
    newer = tmp_path / "newer.h5"
    copy_store(data_store, newer)
    with h5py.File(newer, "r+", locking=False) as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="newer rafdata"):
        SubjectDataset(newer, SUBJECT, AugmentConfig(mode="vanilla"))


def test_refuses_table_with_same_identity_neighbour(data_store, tmp_path):
    bad = tmp_path / "bad.h5"
    copy_store(data_store, bad)
    with h5py.File(bad, "r+", locking=False) as f:
        ds = f["banks/full/neighbors/index"]
        ds[0, 0] = 1  # timestep 1 is the same identity (and sequence) as timestep 0
    st = Store(bad)
    try:
        with pytest.raises(StoreError, match="same identity"):
            load_neighbors(st, "full")
    finally:
        st.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_batches_equal_plain_ones(data_store, workers):
    """Packing the small fields into one float64 tensor between processes changes nothing:
    same keys, dtypes, shapes and values as default_collate gives."""
    ds = SubjectDataset(data_store, SUBJECT, AugmentConfig(mode="raf", p=0.5, topk=2), seed=3)
    packed, _ = _collect(ds, workers, 4, batch_size=3)
    plain, _ = _collect(ds, workers, 4, batch_size=3, pack=False)
    for x, y in zip(packed, plain, strict=True):
        assert set(x) == set(y)
        for key in y:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
    assert plain[0]["image_index"].dtype == torch.int64 and packed[0]["K"].shape == (3, 3, 3)
