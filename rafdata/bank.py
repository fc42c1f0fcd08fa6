"""Expression banks: sampled members, an HNSW index and cross-identity neighbour tables.

RAF swaps a training frame's expression vector ``e_t`` for its nearest neighbour among bank
vectors of *another* identity. This module builds that bank and the neighbour table of every
timestep of a store, so the trainer only reads rows.

Two layers:

- **Core on numpy arrays** (used by the store layer, the benchmarks and tests):
  :func:`select_identities`, :func:`sample_members`, :func:`build_index`,
  :func:`search_excluding` (HNSW with identity exclusion), :func:`exact_search` (blocked brute
  force, same exclusion), :func:`recall`, :func:`serialize_index` / :func:`deserialize_index`.
- **Store layer**: :func:`build_bank` samples members from ``/timesteps``, builds, queries every
  timestep, measures recall against exact search and commits ``/banks/{name}`` by rewriting
  the store's main file (:func:`rafdata.commit.rewrite_main`): a fresh copy with the new bank
  is renamed over the store, so a kill or a full disk leaves the old store byte for byte.
  :class:`Bank` loads a bank back for new queries.
- **Checked reading**: this module owns ``/banks``. :func:`bank_names`, :func:`read_bank`,
  :func:`neighbor_table` (for the trainer, coverage and plots) and :func:`bank_problems` (for
  ``inspect --verify``) all go through one checker, so a damaged or inconsistent bank is
  refused in one line (StoreError) everywhere, never with a traceback.

Store layout written (docs/store.md, "Banks")::

    /banks/{name}/members          (B,) int64 rows of /timesteps, ascending, none held out
    /banks/{name}/hnsw             (bytes,) uint8: hnswlib's save_index file (absent if exact);
                                   the group's attr ``hnsw_crc32`` is its CRC-32
    /banks/{name}/neighbors/index  (T, K) int64 rows of /timesteps, never the same identity
    /banks/{name}/neighbors/dist   (T, K) float32 Euclidean (not squared), ascending

Every dataset is chunked with Fletcher32, so HDF5 checks each chunk as it is read; the
hnsw blob's CRC-32 is checked before hnswlib sees the bytes (hnswlib trusts its input and can
crash on a damaged one). The tables are never padded: a build refuses k larger than the
members of other identities some timestep can have, so every entry is a valid row and a
negative index is damage. Groups named ``.tmp-*`` under ``/banks`` are leftovers of builds by
older versions (which wrote there in place): they are never opened, so a half-written one
cannot break readers, and the next build drops them.

Identity exclusion (see the hnswlib field notes in DESIGN.md): a Python ``filter`` callback is
~15x slower, so we query ``k + margin`` unfiltered, drop same-identity hits, re-query only the
rows left short with a growing k (up to ``same-identity members + k``, which guarantees K
others), and use exact search for any row still short. This holds however many members the
query's own identity owns.

Determinism: members come from seeded per-identity generators; the index is built with one
thread, a fixed ``random_seed`` and a fixed insertion order (multi-threaded hnswlib builds are
not reproducible). Queries may use several threads: each query is independent of the others.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import hdf5plugin  # noqa: F401  (the store's image filters must be registered in every process)
import numpy as np

from rafdata.checksum import crc32
from rafdata.commit import rewrite_main
from rafdata.config import BankConfig, default_threads  # noqa: F401  (re-exported)
from rafdata.errors import StoreError
from rafdata.lock import WriterLock
from rafdata.progress import NullProgress, Progress
from rafdata.store import Store, identity_matches

if TYPE_CHECKING:  # hnswlib and torch are imported where they are used: `rafdata --help`,
    import hnswlib  # the trainer's table reader and inspect need neither

BANKS_GROUP = "banks"
HNSW_CRC_ATTR = "hnsw_crc32"  # attr of /banks/{name}: zlib.crc32 of the hnsw bytes
# Datasets of a bank that the checks below read in full (Fletcher32 checked on every chunk).
BANK_DATASETS = ("members", "hnsw", "neighbors/index", "neighbors/dist")
# Groups of unfinished builds by older versions (which wrote /banks/.tmp-NAME in place, then
# moved it). Readers never open them (a killed writer can leave one whose object header is
# garbage: even deleting its link fails) and build_bank leaves them out of the rewritten file.
LEFTOVER_PREFIX = ".tmp-"
METRIC = "l2"

# Rows handled per hnswlib call: large enough to keep both threads busy, small enough for a
# responsive progress bar and bounded (rows x k) temporaries.
_QUERY_CHUNK = 16384
# Points inserted per add_items call during the (single-threaded) build; only for progress.
_BUILD_CHUNK = 4096


# ---------------------------------------------------------------------------------------------
# Core: numpy arrays in, numpy arrays out


def select_identities(
    names: Sequence[str],
    *,
    identities: Sequence[str] | None = None,
    fraction: float | None = None,
    subset_seed: int = 0,
    part: int = 0,
    candidates: np.ndarray | None = None,
    path: str | Path | None = None,
) -> np.ndarray:
    """Rows of ``names`` (the store's identities) that a bank draws from, ascending.

    ``identities``: explicit names (numeric ids compare as integers); an unknown one is a
    StoreError. ``fraction``: permute ``candidates`` (default: all rows) with ``subset_seed`` and
    cut the permutation into consecutive blocks of ``round(fraction * n)`` identities; ``part``
    picks the block, so parts 0 and 1 of ``fraction=0.5`` are disjoint halves.
    """
    cand = np.arange(len(names)) if candidates is None else np.asarray(candidates, np.int64)
    if identities is not None and fraction is not None:
        raise StoreError(path, "give either an identity list or an identity fraction, not both")
    if identities is not None:
        rows = []
        for q in identities:
            hit = [i for i, n in enumerate(names) if identity_matches(n, str(q))]
            if not hit:
                raise StoreError(
                    path,
                    f"identity {q!r} is not in the store (has: {', '.join(names) or 'none'})",
                )
            rows.extend(hit)
        return np.unique(np.asarray(rows, np.int64))
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise StoreError(path, f"identity fraction must be in (0, 1], got {fraction}")
        size = max(1, round(fraction * len(cand)))
        blocks = len(cand) // size
        if not 0 <= part < max(blocks, 1):
            raise StoreError(
                path,
                f"subset part {part} does not exist: fraction {fraction} of {len(cand)} "
                f"identities gives parts 0..{max(blocks, 1) - 1}",
            )
        perm = np.random.default_rng(subset_seed).permutation(cand)
        return np.sort(perm[part * size : (part + 1) * size])
    return np.sort(cand)


def sample_members(
    identity: np.ndarray,
    eligible: np.ndarray,
    identity_rows: np.ndarray,
    frames_per_id: int,
    seed: int,
) -> np.ndarray:
    """Timestep rows of the bank, ascending, shape (B,) int64.

    identity: (T,) identity row per timestep. eligible: (T,) bool (False for held-out
    sequences). For every identity in ``identity_rows`` draw ``frames_per_id`` eligible
    timesteps without replacement (all of them where fewer). Each identity has its own
    generator seeded by ``(seed, identity row)``, so an identity gets the same members in the
    full bank and in a subset bank.
    """
    if frames_per_id <= 0:
        raise ValueError(f"frames_per_id must be positive, got {frames_per_id}")
    identity = np.asarray(identity)
    eligible = np.asarray(eligible, bool)
    order = np.argsort(identity, kind="stable")  # group rows by identity once: O(T log T)
    sorted_ids = identity[order]
    out = []
    for i in np.asarray(identity_rows, np.int64):
        lo, hi = np.searchsorted(sorted_ids, [i, i + 1])
        rows = order[lo:hi]
        rows = np.sort(rows[eligible[rows]])
        if len(rows) > frames_per_id:
            rng = np.random.default_rng([int(seed), int(i)])
            rows = np.sort(rng.choice(rows, frames_per_id, replace=False))
        out.append(rows)
    if not out:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate(out)).astype(np.int64)


def build_index(
    vectors: np.ndarray,
    M: int = BankConfig.M,
    ef_construction: int = BankConfig.ef_construction,
    seed: int = 0,
    threads: int = 1,
    progress: Progress | None = None,
) -> hnswlib.Index:
    """An L2 HNSW index over ``vectors`` (B, D) float32; label i is row i.

    ``threads=1`` (default) is deterministic: hnswlib's multi-threaded insertion order depends
    on scheduling, so only single-thread builds reproduce bit for bit.
    """
    progress = progress or NullProgress()
    vectors = np.ascontiguousarray(vectors, np.float32)
    n, dim = vectors.shape
    import hnswlib

    index = hnswlib.Index(space=METRIC, dim=dim)
    index.init_index(max_elements=max(n, 1), M=M, ef_construction=ef_construction,
                     random_seed=seed)
    progress.start("building index", n)
    for a in range(0, n, _BUILD_CHUNK):
        b = min(n, a + _BUILD_CHUNK)
        index.add_items(vectors[a:b], np.arange(a, b), num_threads=threads)
        progress.advance(b - a)
    return index


def serialize_index(index: hnswlib.Index) -> np.ndarray:
    """hnswlib's own file format as a (bytes,) uint8 array, for an HDF5 dataset.

    ``save_index`` does not keep ``ef``; the caller stores it beside the bytes.
    """
    with tempfile.TemporaryDirectory(prefix="rafdata-hnsw-") as tmp:
        p = os.path.join(tmp, "index.bin")
        index.save_index(p)
        return np.fromfile(p, dtype=np.uint8)


def deserialize_index(data: np.ndarray, dim: int, max_elements: int, ef: int) -> hnswlib.Index:
    """Inverse of :func:`serialize_index`; ``ef`` is set on the loaded index."""
    with tempfile.TemporaryDirectory(prefix="rafdata-hnsw-") as tmp:
        p = os.path.join(tmp, "index.bin")
        np.asarray(data, np.uint8).tofile(p)
        import hnswlib

        index = hnswlib.Index(space=METRIC, dim=dim)
        index.load_index(p, max_elements=max(max_elements, 1))
    index.set_ef(ef)
    return index


@dataclass
class SearchResult:
    """Neighbours of Q queries in a bank of B vectors.

    pos: (Q, k) int64 rows of the bank (not of /timesteps). dist: (Q, k) float32 Euclidean
    (not squared), ascending per row. requeried: rows that needed a second HNSW query with a
    larger k. exact_rows: rows answered by exact search because HNSW could not fill them.
    """

    pos: np.ndarray
    dist: np.ndarray
    requeried: int = 0
    exact_rows: int = 0

    @property
    def fallback_rate(self) -> float:
        """Share of rows that needed more than the first query."""
        q = len(self.pos)
        return (self.requeried + self.exact_rows) / q if q else 0.0


def _first_k_valid(labels: np.ndarray, d2: np.ndarray, ok: np.ndarray, k: int):
    """Per row, the first k columns where ``ok`` (results are already sorted by distance)."""
    # Stable argsort of ~ok puts the valid columns first, in their original (ascending) order.
    cols = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(labels, cols, axis=1),
            np.take_along_axis(d2, cols, axis=1))


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.ascontiguousarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (Q, {dim}), got {q.shape}")
    return q


def search_excluding(
    index: hnswlib.Index,
    member_identity: np.ndarray,
    queries: np.ndarray,
    query_identity: np.ndarray | None,
    k: int,
    ef: int = BankConfig.ef,
    threads: int | None = None,
    bank_vectors: np.ndarray | None = None,
    progress: Progress | None = None,
    label: str = "querying",
) -> SearchResult:
    """k nearest bank members of another identity for every query (HNSW, approximate).

    index: built over the bank, label = bank row. member_identity: (B,) identity per bank row.
    queries: (Q, D) float32. query_identity: (Q,) identity to exclude per query (-1 or None:
    exclude nothing). The first unfiltered query asks for max(3k, ef); short rows are
    re-queried with a doubling k, capped at (same-identity members + k), which by pigeonhole
    returns at least k others. Rows HNSW still cannot fill (hnswlib raises when the graph
    yields fewer than k results) use exact search over ``bank_vectors``.

    Raises ValueError when some query has fewer than k members of other identities.
    """
    progress = progress or NullProgress()
    threads = threads or default_threads()
    member_identity = np.asarray(member_identity, np.int64)
    n_bank = len(member_identity)
    queries = _check_queries(queries, index.dim)
    n_q = len(queries)
    qid = (np.full(n_q, -1, np.int64) if query_identity is None
           else np.asarray(query_identity, np.int64))
    # Members per identity, to know how far a short row may need to grow.
    ids, counts = np.unique(member_identity, return_counts=True)
    same = np.zeros(n_q, np.int64)
    where = np.searchsorted(ids, qid).clip(0, max(len(ids) - 1, 0))
    if len(ids):
        hit = ids[where] == qid
        same[hit] = counts[where[hit]]
    if n_q and (n_bank - same).min() < k:
        r = int(np.argmin(n_bank - same))
        raise ValueError(f"query {r} has only {n_bank - same[r]} bank members of other "
                         f"identities, fewer than k={k}")
    pos = np.zeros((n_q, k), np.int64)
    d2 = np.zeros((n_q, k), np.float32)
    requeried = 0
    exact_rows: list[np.ndarray] = []
    index.set_ef(ef)
    # hnswlib searches with a beam of max(ef, k) anyway, so asking for ef results costs about
    # the same as asking for 3k, and it leaves far fewer rows short (fewer re-queries).
    k0 = min(n_bank, max(3 * k, ef))
    progress.start(label, n_q)
    for a in range(0, n_q, _QUERY_CHUNK):
        rows = np.arange(a, min(n_q, a + _QUERY_CHUNK))
        kq = k0
        first = True
        while len(rows):
            try:
                lab, dd = index.knn_query(queries[rows], k=kq, num_threads=threads)
                lab = lab.astype(np.int64)
                ok = member_identity[lab] != qid[rows, None]
                full = ok.sum(axis=1) >= k
            except RuntimeError:
                # hnswlib found fewer than kq results for some row of this call: treat the whole
                # call as short and let the grown query (or exact search) answer it.
                full = np.zeros(len(rows), bool)
            if full.any():
                lab_k, d_k = _first_k_valid(lab[full], dd[full], ok[full], k)
                pos[rows[full]] = lab_k
                d2[rows[full]] = d_k
            rows = rows[~full]
            if not len(rows):
                break
            if first:
                requeried += len(rows)
                first = False
            # Rows already queried with k >= same + k cannot be helped by a larger k.
            cap = same[rows] + k
            give_up = cap <= kq
            if give_up.any() or kq >= n_bank:
                stuck = rows if kq >= n_bank else rows[give_up]
                exact_rows.append(stuck)
                rows = np.setdiff1d(rows, stuck)
            kq = min(n_bank, max(2 * kq, k0 + 1))
        progress.advance(min(n_q, a + _QUERY_CHUNK) - a)
    n_exact = 0
    if exact_rows:
        stuck = np.concatenate(exact_rows)
        n_exact = len(stuck)
        if bank_vectors is None:
            bank_vectors = np.asarray(index.get_items(np.arange(n_bank)), np.float32)
        ex = exact_search(bank_vectors, member_identity, queries[stuck], qid[stuck], k,
                          threads=threads)
        pos[stuck] = ex.pos
        d2[stuck] = ex.dist.astype(np.float64) ** 2
    return SearchResult(pos=pos, dist=np.sqrt(np.maximum(d2, 0)).astype(np.float32),
                        requeried=requeried, exact_rows=n_exact)


def exact_search(
    bank_vectors: np.ndarray,
    member_identity: np.ndarray | None,
    queries: np.ndarray,
    query_identity: np.ndarray | None,
    k: int,
    threads: int | None = None,
    block_elems: int = 1 << 24,
    progress: Progress | None = None,
    label: str = "exact search",
) -> SearchResult:
    """Exact k nearest bank members of another identity: blocked brute force with torch.

    bank_vectors: (B, D). member_identity: (B,) or None. queries: (Q, D). query_identity: (Q,)
    (-1 or None: exclude nothing). Squared distances come from ||q||^2 - 2 q.x + ||x||^2 in
    float32 blocks of about ``block_elems`` entries (memory bound: 4 bytes each); the k + 4
    best candidates are then re-scored in float64 from the differences, so the order is not
    spoilt by the expansion's cancellation error. Ties break by bank row.

    Raises ValueError when a query has fewer than k members of other identities.
    """
    import torch

    progress = progress or NullProgress()
    xb = np.ascontiguousarray(bank_vectors, np.float32)
    queries = _check_queries(queries, xb.shape[1])
    n_bank, n_q = len(xb), len(queries)
    mid = (np.full(n_bank, -2, np.int64) if member_identity is None
           else np.asarray(member_identity, np.int64))
    qid = (np.full(n_q, -1, np.int64) if query_identity is None
           else np.asarray(query_identity, np.int64))
    kk = min(n_bank, k + 4)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        xt = torch.from_numpy(xb)
        xn = (xt * xt).sum(1)
        mt = torch.from_numpy(mid)
        bank_block = max(1, min(n_bank, block_elems // 256))
        q_block = max(1, min(n_q, block_elems // bank_block))
        pos = np.zeros((n_q, k), np.int64)
        dist = np.zeros((n_q, k), np.float64)
        progress.start(label, n_q)
        for a in range(0, n_q, q_block):
            b = min(n_q, a + q_block)
            qt = torch.from_numpy(queries[a:b])
            qn = (qt * qt).sum(1, keepdim=True)
            qi = torch.from_numpy(qid[a:b])[:, None]
            best_v = torch.full((b - a, 0), float("inf"))
            best_i = torch.zeros((b - a, 0), dtype=torch.int64)
            for c in range(0, n_bank, bank_block):
                e = min(n_bank, c + bank_block)
                d = qn - 2.0 * (qt @ xt[c:e].T) + xn[None, c:e]
                d.masked_fill_(mt[None, c:e] == qi, float("inf"))
                v, i = torch.topk(d, min(kk, e - c), dim=1, largest=False, sorted=False)
                best_v = torch.cat([best_v, v], 1)
                best_i = torch.cat([best_i, i + c], 1)
                if best_v.shape[1] > kk:  # keep the running candidate list at kk columns
                    v, j = torch.topk(best_v, kk, dim=1, largest=False, sorted=False)
                    best_v, best_i = v, torch.gather(best_i, 1, j)
            if (torch.isfinite(best_v).sum(1) < k).any():
                raise ValueError(f"a query has fewer than k={k} bank members of other "
                                 "identities")
            bi = best_i.numpy()
            # Re-score in float64 and sort by (distance, row) for a deterministic order;
            # masked (same-identity) candidates survive only when few others exist: sink them.
            diff = xb[bi].astype(np.float64) - queries[a:b, None, :].astype(np.float64)
            d2 = np.einsum("qkd,qkd->qk", diff, diff)
            d2[mid[bi] == qid[a:b, None]] = np.inf
            order = np.lexsort((bi, d2), axis=1)[:, :k]
            pos[a:b] = np.take_along_axis(bi, order, 1)
            dist[a:b] = np.take_along_axis(d2, order, 1)
            progress.advance(b - a)
    finally:
        torch.set_num_threads(old_threads)
    return SearchResult(pos=pos, dist=np.sqrt(dist).astype(np.float32))


def recall(approx: SearchResult, exact: SearchResult, rtol: float = 1e-5) -> tuple[float, float]:
    """(recall@1, recall@K) of ``approx`` against ``exact`` over the same queries.

    A returned neighbour counts as a hit when it is in the exact top-K, or when its distance
    ties the exact K-th distance (within ``rtol``): equidistant members are equally right.
    recall@1 asks the same of the first neighbour against the exact first.
    """
    if len(exact.pos) == 0:
        return 1.0, 1.0
    k = exact.pos.shape[1]
    tol_k = exact.dist[:, -1:].astype(np.float64) * (1 + rtol) + 1e-7
    in_set = (approx.pos[:, :, None] == exact.pos[:, None, :]).any(axis=2)
    hits = in_set | (approx.dist <= tol_k)
    tol_1 = exact.dist[:, 0].astype(np.float64) * (1 + rtol) + 1e-7
    top1 = (approx.pos[:, 0] == exact.pos[:, 0]) | (approx.dist[:, 0] <= tol_1)
    return float(top1.mean()), float(hits.sum() / (len(hits) * k))


# ---------------------------------------------------------------------------------------------
# Store layer: bank names and checked reading (the only code that reads /banks)


def is_leftover(name: str) -> bool:
    """True for ``/banks`` entries left by unfinished builds of older versions (``.tmp-*``)."""
    return name.startswith(LEFTOVER_PREFIX)


def _link_names(f: h5py.File, path: Path) -> list[str]:
    """Every link name under /banks. Only the names are read: no bank object is opened."""
    if BANKS_GROUP not in f:
        return []
    try:
        return list(f[BANKS_GROUP])
    except (KeyError, OSError, RuntimeError) as err:
        raise StoreError(path, f"/{BANKS_GROUP} cannot be read ({_one_line(err)})") from None


def leftover_paths(f: h5py.File) -> tuple[str, ...]:
    """``banks/.tmp-*`` paths of an open main file, for ``exclude`` of
    :func:`rafdata.commit.rewrite_main` (copying a half-written leftover can fail)."""
    return tuple(f"{BANKS_GROUP}/{n}" for n in _link_names(f, Path(f.filename))
                 if is_leftover(n))


@contextmanager
def opened(store: str | Path | Store) -> Iterator[Store]:
    """The store itself (left open: it is the caller's), or a Store of the path, closed on
    exit (a later writer in this process needs every read handle closed). The one way the
    store readers (banks, coverage, plots) accept either."""
    if isinstance(store, Store):
        yield store
        return
    st = Store(store)
    try:
        yield st
    finally:
        st.close()


def bank_names(store: str | Path | Store) -> list[str]:
    """Names of the banks in a store, sorted (leftover ``.tmp-*`` groups are skipped)."""
    with opened(store) as st:
        return sorted(n for n in _link_names(st.h5(), st.path) if not is_leftover(n))


def bank_info(store: Store, name: str) -> dict[str, Any]:
    """What ``inspect`` shows of a bank, from metadata only (nothing is checked or read in
    bulk): the group's attrs, ``members`` (B), ``k`` and the neighbour attrs as
    ``neighbors_*``. A bank whose objects cannot be opened gets ``error`` instead of failing."""
    info: dict[str, Any] = {"name": name}
    try:
        g = store.h5()[BANKS_GROUP][name]
        info.update({k: plain_attr(v) for k, v in g.attrs.items()})
        info["name"] = name
        if "members" in g:
            info["members"] = int(g["members"].shape[0])
        if "neighbors/index" in g and len(g["neighbors/index"].shape) == 2:
            info["k"] = int(g["neighbors/index"].shape[1])
        if "neighbors" in g:
            info.update({f"neighbors_{k}": plain_attr(v) for k, v in g["neighbors"].attrs.items()})
    except (KeyError, OSError, RuntimeError, TypeError, AttributeError) as err:
        info["error"] = _one_line(err)
    return info


def plain_attr(v: Any) -> Any:
    """An attribute value as JSON-ready Python."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [plain_attr(x) for x in v.tolist()]
    return v


def _no_bank(name: str, names: list[str]) -> str:
    how = "" if name == BankConfig.name else f" --name {name}"
    return (f"no bank named {name!r} (banks: {', '.join(names) or 'none'}); build it with "
            f"`rafdata build-bank{how}`")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _rebuild_hint(name: str) -> str:
    how = "" if name == BankConfig.name else f" --name {name}"
    return f"rebuild it with `rafdata build-bank{how} --force`"


@dataclass
class BankTables:
    """One bank as read from a store, checked against the store contract.

    members: (B,) int64 rows of /timesteps. index: (T, K) int64 neighbour rows of every
    timestep. dist: (T, K) float32 Euclidean distances, ascending. attrs / nb_attrs: the
    attributes of ``/banks/{name}`` and ``/banks/{name}/neighbors``. hnsw: the serialized
    index (CRC-checked) when it was asked for and the bank has one, else None.
    """

    name: str
    members: np.ndarray
    index: np.ndarray
    dist: np.ndarray
    attrs: dict[str, Any]
    nb_attrs: dict[str, Any]
    hnsw: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.index.shape[1])

    @property
    def built_with_hnsw(self) -> bool:
        return built_with_hnsw(self.attrs)


def built_with_hnsw(attrs: dict[str, Any]) -> bool:
    """Whether a bank's attrs say it was built with HNSW, so that it must hold ``hnsw``.
    Banks without the ``exact`` attr (written by other tools) may or may not have one."""
    return "exact" in attrs and not bool(attrs["exact"])


def _attrs(obj: h5py.Group | h5py.Dataset) -> dict[str, Any]:
    return {k: plain_attr(v) for k, v in obj.attrs.items()}


# hnswlib's save_index header (hnswalg.h, saveIndex): offsetLevel0, max_elements,
# cur_element_count, size_data_per_element, label_offset, offsetData, maxlevel (int),
# enterpoint_node (uint32), maxM, maxM0, M, mult (double), ef_construction.
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def _hnsw_header_problem(blob: np.ndarray, n_members: int | None, dim: int) -> str | None:
    """Why a serialized index cannot be this bank's (None when its header fits).

    Checked before hnswlib sees the bytes, also for banks without a CRC: hnswlib trusts the
    header's sizes and offsets, so a damaged one can crash the process.
    """
    if len(blob) < _HNSW_HEADER.size:
        return f"{len(blob)} bytes, shorter than an hnswlib index header"
    (off0, max_el, count, per_el, label_off, data_off, max_level, entry, _max_m, max_m0, _m,
     _mult, _efc) = _HNSW_HEADER.unpack_from(blob.tobytes()[: _HNSW_HEADER.size])
    if n_members is not None and count != n_members:
        return f"holds {count} vectors but the bank has {n_members} members"
    links0 = max_m0 * 4 + 4
    consistent = (
        off0 == 0 and count <= max_el and data_off == links0 and label_off == links0 + 4 * dim
        and per_el == links0 + 4 * dim + 8 and 0 <= max_level < 64
        and (count == 0 or entry < count)
        and len(blob) >= _HNSW_HEADER.size + count * per_el + 4 * count
    )
    if not consistent:
        return f"the index header does not describe {count} vectors of {dim} dims (damaged)"
    return None


class _Stop(Exception):
    """Ends a fail-fast check at its first problem."""


class _BankCheck:
    """Reads one bank and collects what breaks the contract, one line per problem.

    Each line names the dataset (``/banks/{name}/...``) and the problem. ``fail_fast`` stops at
    the first (readers); otherwise every problem is listed (``inspect --verify``).
    """

    def __init__(self, st: Store, name: str, fail_fast: bool):
        self.st = st
        self.name = name
        self.where = f"/{BANKS_GROUP}/{name}"
        self.fail_fast = fail_fast
        self.problems: list[str] = []

    def fail(self, sub: str, problem: str) -> None:
        self.problems.append(f"{self.where}{sub}: {problem}")
        if self.fail_fast:
            raise _Stop

    def has(self, g: h5py.Group, key: str) -> bool:
        try:
            return key in g
        except (KeyError, OSError, RuntimeError):
            return False

    def read(self, g: h5py.Group, key: str, prefix: str = "") -> np.ndarray | None:
        """A whole dataset; Fletcher32 and decompression failures become one problem."""
        sub = f"{prefix}/{key}"
        if not self.has(g, key):
            self.fail(sub, "missing")
            return None
        try:
            ds = g[key]
            if not isinstance(ds, h5py.Dataset):
                self.fail(sub, "not a dataset")
                return None
            return ds[()]
        except (KeyError, OSError, RuntimeError) as err:
            # h5py raises OSError when a chunk's Fletcher32 checksum or decompression fails.
            self.fail(sub, f"unreadable or checksum mismatch ({_one_line(err)})")
            return None

    def group(self, g: h5py.Group, key: str) -> h5py.Group | None:
        if not self.has(g, key):
            self.fail(f"/{key}", "missing")
            return None
        try:
            sub = g[key]
            if isinstance(sub, h5py.Group):
                return sub
            self.fail(f"/{key}", "not a group")
        except (KeyError, OSError, RuntimeError) as err:
            self.fail(f"/{key}", f"cannot be opened ({_one_line(err)})")
        return None

    def run(self, deep: bool) -> BankTables | None:
        st = self.st
        try:
            g = st.h5()[BANKS_GROUP][self.name]
            if not isinstance(g, h5py.Group):
                raise TypeError("not a group")
            attrs = _attrs(g)
        except (KeyError, OSError, RuntimeError, TypeError) as err:
            self.fail("", f"cannot be opened ({_one_line(err)})")
            return None
        ts = st.timesteps
        n_t = len(ts)
        held = (np.asarray(st.sequences.held_out, bool)[ts.sequence] if n_t
                else np.zeros(0, bool))
        raw_members = self.read(g, "members")
        members = None if raw_members is None else self.check_members(raw_members, n_t, held)
        index = dist = None
        nb_attrs: dict[str, Any] = {}
        nb = self.group(g, "neighbors")
        if nb is not None:
            index = self.read(nb, "index", "/neighbors")
            dist = self.read(nb, "dist", "/neighbors")
            try:
                nb_attrs = _attrs(nb)
            except (OSError, RuntimeError) as err:
                self.fail("/neighbors", f"attributes unreadable ({_one_line(err)})")
        if index is not None and dist is not None:
            self.check_tables(index, dist, members, held, nb_attrs, deep)
        blob = self.check_hnsw(g, attrs, members)
        if self.problems or members is None or index is None or dist is None:
            return None
        return BankTables(self.name, members, index.astype(np.int64, copy=False), dist.astype(np.float32, copy=False),
                          attrs, nb_attrs, blob)

    def check_members(self, m: np.ndarray, n_t: int, held: np.ndarray) -> np.ndarray | None:
        if m.ndim != 1 or m.dtype.kind not in "iu" or len(m) == 0:
            self.fail("/members", f"shape {m.shape} of {m.dtype}; expected (B,) integer "
                                  "timestep rows, B >= 1")
            return None
        m = m.astype(np.int64)
        bad = (m < 0) | (m >= n_t)
        if bad.any():
            self.fail("/members", f"{int(bad.sum())} rows outside the store's {n_t} timesteps "
                                  f"(first: {int(m[bad][0])})")
            return None
        if held[m].any():
            self.fail("/members", f"{int(held[m].sum())} held-out timesteps in the bank (first: "
                                  f"{int(m[held[m]][0])}); held-out sequences are test drivers")
        if len(np.unique(m)) != len(m):
            self.fail("/members", "a timestep is listed twice")
        return m

    def check_tables(self, index: np.ndarray, dist: np.ndarray, members: np.ndarray | None,
                     held: np.ndarray, nb_attrs: dict[str, Any], deep: bool) -> None:
        ts = self.st.timesteps
        n_t = len(ts)
        if index.ndim == 2 and index.dtype.kind in "iu" and 0 < index.shape[0] < n_t:
            self.fail("/neighbors/index", f"covers {index.shape[0]} timesteps but the store "
                                          f"has {n_t} (timesteps were added after the bank "
                                          "was built)")
            return
        if (index.ndim != 2 or index.shape[0] != n_t or index.shape[1] < 1
                or index.dtype.kind not in "iu"):
            self.fail("/neighbors/index", f"shape {index.shape} of {index.dtype}; expected "
                                          f"({n_t}, K) integer rows for the store's timesteps")
            return
        if dist.shape != index.shape or dist.dtype.kind != "f":
            self.fail("/neighbors/dist", f"shape {dist.shape} of {dist.dtype} does not match "
                                         f"the index table {index.shape}")
            return
        k_attr = nb_attrs.get("k")
        if k_attr is not None and int(k_attr) != index.shape[1]:
            self.fail("/neighbors", f"attr k={int(k_attr)} but the tables have "
                                    f"{index.shape[1]} columns")

        def first_row(mask: np.ndarray) -> int:
            return int(np.flatnonzero(mask.any(axis=1))[0])

        idx = index.astype(np.int64, copy=False)
        neg = idx < 0
        if neg.any():
            # build_bank never pads (it refuses a k that some timestep cannot fill), so a
            # negative entry is damage, not a marker of a short row.
            self.fail("/neighbors/index", f"{int(neg.sum())} negative entries (first at "
                                          f"timestep {first_row(neg)}); tables are never "
                                          "padded")
        high = idx >= n_t
        if high.any():
            self.fail("/neighbors/index", f"{int(high.sum())} entries beyond the store's {n_t} "
                                          f"timesteps (first at timestep {first_row(high)})")
        ok = ~(neg | high)
        safe = np.where(ok, idx, 0)
        leak = ok & held[safe]
        if leak.any():
            self.fail("/neighbors/index", f"{int(leak.sum())} neighbours are held-out "
                                          f"timesteps, a test-set leak (first at timestep "
                                          f"{first_row(leak)})")
        same = ok & (ts.identity[safe] == ts.identity[:, None])
        if same.any():
            self.fail("/neighbors/index", f"a neighbour of the same identity (timestep "
                                          f"{first_row(same)})")
        if members is not None:
            stray = ok & ~leak & ~same & ~np.isin(safe, members)
            if stray.any():
                self.fail("/neighbors/index", f"{int(stray.sum())} neighbours are not bank "
                                              f"members (first at timestep {first_row(stray)})")
        d = dist.astype(np.float64)
        broken = ~np.isfinite(d) | (d < 0)
        if broken.any():
            self.fail("/neighbors/dist", f"{int(broken.sum())} entries negative, NaN or "
                                         f"infinite (first at timestep {first_row(broken)})")
        elif index.shape[1] > 1 and (np.diff(d, axis=1) < -1e-6).any():
            self.fail("/neighbors/dist", f"not ascending (first at timestep "
                                         f"{first_row(np.diff(d, axis=1) < -1e-6)})")
        if deep and not broken.any():
            self.check_distances(safe, ok, d)

    def check_distances(self, safe: np.ndarray, ok: np.ndarray, d: np.ndarray) -> None:
        """The stored distances are those of the expression vectors (in row blocks)."""
        exp = self.st.timesteps.exp
        n_t, k = safe.shape
        step = max(1, (1 << 22) // max(1, k * exp.shape[1]))
        wrong = 0
        first = -1
        for a in range(0, n_t, step):
            b = min(n_t, a + step)
            diff = exp[safe[a:b]].astype(np.float64) - exp[a:b, None].astype(np.float64)
            true = np.sqrt(np.einsum("tkd,tkd->tk", diff, diff))
            bad = ok[a:b] & ~(np.abs(true - d[a:b]) <= 1e-3 * true + 1e-4)
            if bad.any():
                wrong += int(bad.sum())
                if first < 0:
                    first = a + int(np.flatnonzero(bad.any(axis=1))[0])
        if wrong:
            self.fail("/neighbors/dist", f"{wrong} distances differ from those of the expression "
                                         f"vectors (first at timestep {first})")

    def check_hnsw(self, g: h5py.Group, attrs: dict[str, Any],
                   members: np.ndarray | None) -> np.ndarray | None:
        """The index bytes: present where the attrs say HNSW, CRC-32 (where stored) and
        header matching the bank."""
        if not self.has(g, "hnsw"):
            if built_with_hnsw(attrs):
                self.fail("/hnsw", "missing, but the bank was built with HNSW (attr exact is "
                                   "false)")
            return None
        blob = self.read(g, "hnsw")
        if blob is None:
            return None
        if blob.ndim != 1 or blob.dtype != np.uint8:
            self.fail("/hnsw", f"shape {blob.shape} of {blob.dtype}; expected (bytes,) uint8")
            return None
        want = attrs.get(HNSW_CRC_ATTR)
        if want is not None:
            got = crc32(np.ascontiguousarray(blob))
            if got != int(want):
                self.fail("/hnsw", f"CRC-32 {got:08x} differs from the stored {int(want):08x}: "
                                   "the index bytes are damaged")
                return None
        problem = _hnsw_header_problem(blob, None if members is None else len(members),
                                       int(self.st.timesteps.exp.shape[1]))
        if problem:
            self.fail("/hnsw", problem)
            return None
        return blob


def _check(st: Store, name: str, *, deep: bool,
           fail_fast: bool) -> tuple[BankTables | None, list[str]]:
    check = _BankCheck(st, name, fail_fast)
    try:
        tables = check.run(deep)
    except _Stop:
        tables = None
    return tables, check.problems


def read_bank(store: str | Path | Store, name: str = "full", *, hnsw: bool = False
              ) -> BankTables:
    """Bank ``name`` of a store with its tables, checked; StoreError (one line) otherwise.

    Refused: a missing bank, a missing or unreadable dataset (Fletcher32 mismatch included),
    members out of range, held out or listed twice, neighbour tables whose shape does not
    match /timesteps, negative or out-of-range entries, held-out neighbours (a test-set leak),
    neighbours outside the bank or of the query's own identity, distances not finite or not
    ascending, a bank built with HNSW that lost its index, and index bytes whose CRC-32 or
    header do not match (every reader refuses the same damage, even one that does not use the
    index). ``hnsw``: keep the index bytes in the result (:class:`Bank` loads them).
    """
    with opened(store) as st:
        names = bank_names(st)
        if name not in names:
            raise StoreError(st.path, _no_bank(name, names))
        tables, problems = _check(st, name, deep=False, fail_fast=True)
        if problems or tables is None:
            problem = problems[0] if problems else f"/{BANKS_GROUP}/{name}: cannot be read"
            raise StoreError(st.path, f"{problem}; {_rebuild_hint(name)}")
        if not hnsw:
            tables.hnsw = None
        return tables


def neighbor_table(store: str | Path | Store, bank: str = "full") -> np.ndarray:
    """(T, K) int64 ``/banks/{bank}/neighbors/index``: for every timestep, its K nearest bank
    members of other identities, nearest first; checked as :func:`read_bank` checks it."""
    return read_bank(store, bank).index


def bank_problems(store: Store, name: str) -> list[str]:
    """Every violation of the contract by bank ``name``, one line each (``inspect
    --verify``): :func:`read_bank`'s checks, the hnsw bytes' CRC-32, and the stored distances
    recomputed from the expression vectors."""
    return _check(store, name, deep=True, fail_fast=False)[1]


# ---------------------------------------------------------------------------------------------
# Store layer: building


@dataclass
class BankReport:
    """What :func:`build_bank` did; seconds are wall-clock."""

    path: Path
    name: str
    members: int
    identities: list[str]
    timesteps: int
    k: int
    exact: bool
    recall_at_1: float
    recall_at_k: float
    recall_queries: int
    fallback_rate: float
    index_bytes: int
    replaced: bool
    seconds: dict[str, float]


def _check_name(path: Path, name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise StoreError(path, f"bad bank name {name!r}: use letters, digits, '-' or '_'")


def build_bank(
    store: str | Path | Store,
    config: BankConfig | None = None,
    progress: Progress | None = None,
) -> BankReport:
    """Build bank ``config.name`` of a store and return what was done.

    Members: ``config.frames_per_id`` timesteps per selected identity, never from held-out
    sequences. Neighbour tables cover *every* timestep (held-out ones included: evaluation
    needs them). The writer lock is held from the first read to the commit (the tables must
    describe the timesteps they were computed from); everything is computed before anything is
    written, and the bank is committed by rewriting the main file
    (:func:`rafdata.commit.rewrite_main`): a failure at any point, a kill or a full disk
    included, leaves the store as it was, byte for byte.
    """
    cfg = config or BankConfig()
    progress = progress or NullProgress()
    if isinstance(store, Store):
        path = store.path
        store.close()  # its tables may predate the lock; read them again under it
    else:
        path = Path(store)
        Store(path).close()  # a missing or foreign file is refused before any lock file
    _check_name(path, cfg.name)
    cfg.validate(path)
    with WriterLock(path):
        st = Store(path)
        try:
            return _build_bank(st, cfg, progress)
        finally:
            # Close every read handle, also on refusal: a later writer in this process
            # must not find the file held.
            st.close()


def _build_bank(st: Store, cfg: BankConfig, progress: Progress) -> BankReport:
    path = st.path
    ts = st.timesteps
    n_t = len(ts)
    if n_t == 0 or ts.exp.ndim != 2 or ts.exp.shape[1] == 0:
        raise StoreError(path, "the store has no timesteps (run `rafdata ingest` first)")
    exists = cfg.name in bank_names(st)
    leftovers = leftover_paths(st.h5())  # never copied into the rewritten file
    if exists and not cfg.force:
        raise StoreError(path, f"bank {cfg.name!r} already exists; pass --force to replace it")
    exp = np.ascontiguousarray(ts.exp, np.float32)
    bad = ~np.isfinite(exp).all(axis=1)
    if bad.any():
        raise StoreError(path, f"{int(bad.sum())} timesteps have non-finite expression "
                               f"coefficients (first: row {int(np.flatnonzero(bad)[0])})")
    held_seq = np.asarray(st.sequences.held_out, bool)
    eligible = ~held_seq[ts.sequence]
    held_names = sorted({st.sequences.name[s] for s in np.flatnonzero(held_seq)})
    with_frames = np.unique(ts.identity[eligible])

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    chosen = select_identities(
        st.identities, identities=cfg.identities, fraction=cfg.identity_fraction,
        subset_seed=cfg.subset_seed, part=cfg.subset_part, candidates=with_frames, path=path)
    empty = np.setdiff1d(chosen, with_frames)
    for i in empty:
        progress.warn(f"identity {st.identities[i]} has only held-out timesteps; not in the bank")
    chosen = np.intersect1d(chosen, with_frames)
    if len(chosen) == 0:
        raise StoreError(path, "no identity with timesteps outside held-out sequences to "
                               "build a bank from")
    members = sample_members(ts.identity, eligible, chosen, cfg.frames_per_id, cfg.seed)
    member_identity = ts.identity[members].astype(np.int64)
    # Refuse (rather than pad) when some timestep cannot get k members of other identities.
    per_id = np.bincount(member_identity, minlength=len(st.identities))
    others = len(members) - per_id[np.unique(ts.identity)]
    if others.min() < cfg.k:
        worst = np.unique(ts.identity)[int(np.argmin(others))]
        raise StoreError(
            path,
            f"k={cfg.k} but identity {st.identities[worst]} has only {int(others.min())} bank "
            f"members of other identities; lower --k or use more identities/frames",
        )
    seconds["sample"] = time.perf_counter() - t0

    bank_vectors = exp[members]
    query_identity = ts.identity.astype(np.int64)
    index_bytes: np.ndarray | None = None
    if cfg.exact:
        t0 = time.perf_counter()
        result = exact_search(bank_vectors, member_identity, exp, query_identity, cfg.k,
                              threads=cfg.threads, progress=progress, label="exact tables")
        seconds["query"] = time.perf_counter() - t0
        r1 = rk = 1.0
        n_recall = 0
    else:
        t0 = time.perf_counter()
        index = build_index(bank_vectors, cfg.M, cfg.ef_construction, cfg.seed,
                            progress=progress)
        seconds["index"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = search_excluding(index, member_identity, exp, query_identity, cfg.k,
                                  ef=cfg.ef, threads=cfg.threads, bank_vectors=bank_vectors,
                                  progress=progress, label="neighbour tables")
        seconds["query"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_recall = min(n_t, max(0, cfg.recall_sample))
        sample = np.sort(np.random.default_rng(cfg.seed).choice(n_t, n_recall, replace=False))
        truth = exact_search(bank_vectors, member_identity, exp[sample], query_identity[sample],
                             cfg.k, threads=cfg.threads, progress=progress,
                             label="measuring recall")
        r1, rk = recall(SearchResult(result.pos[sample], result.dist[sample]), truth)
        seconds["recall"] = time.perf_counter() - t0
        index_bytes = serialize_index(index)
        del index

    t0 = time.perf_counter()
    group_attrs: dict[str, Any] = {
        "frames_per_id": cfg.frames_per_id,
        "seed": cfg.seed,
        "identities": [st.identities[i] for i in chosen],
        "sequences_excluded": held_names,
        "identity_filter": list(cfg.identities) if cfg.identities is not None else [],
        "identity_fraction": -1.0 if cfg.identity_fraction is None else cfg.identity_fraction,
        "subset_seed": cfg.subset_seed,
        "subset_part": cfg.subset_part,
        "M": cfg.M,
        "ef_construction": cfg.ef_construction,
        "ef": cfg.ef,
        "metric": METRIC,
        "exp_space": st.exp_space,
        "exp_dim": int(exp.shape[1]),
        "threads": cfg.threads,
        "exact": cfg.exact,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    nb_attrs: dict[str, Any] = {
        "k": cfg.k,
        "metric": METRIC,
        "recall_at_1": r1,
        "recall_at_k": rk,
        "recall_queries": n_recall,
        "fallback_rate": result.fallback_rate,
        "exact": cfg.exact,
    }
    st.close()  # the write below opens its own handle; never keep a read handle beside it
    group_attrs["build_seconds"] = float(sum(seconds.values()))
    progress.start("writing", 1)
    _write_bank(path, cfg.name, leftovers, members, index_bytes, members[result.pos],
                result.dist, group_attrs, nb_attrs)
    progress.advance(1)
    seconds["write"] = time.perf_counter() - t0
    return BankReport(
        path=path, name=cfg.name, members=len(members),
        identities=group_attrs["identities"], timesteps=n_t, k=cfg.k, exact=cfg.exact,
        recall_at_1=r1, recall_at_k=rk, recall_queries=n_recall,
        fallback_rate=result.fallback_rate,
        index_bytes=0 if index_bytes is None else int(index_bytes.nbytes),
        replaced=exists, seconds=seconds,
    )


def _write_bank(
    path: Path,
    name: str,
    leftovers: Sequence[str],
    members: np.ndarray,
    index_bytes: np.ndarray | None,
    nb_index: np.ndarray,
    nb_dist: np.ndarray,
    group_attrs: dict[str, Any],
    nb_attrs: dict[str, Any],
) -> None:
    """Commit ``/banks/{name}``: a fresh copy of the main file without the old bank (and
    without ``leftovers``) gets the new one, then is renamed over the store.

    Every dataset is chunked with Fletcher32; the hnsw bytes also get a CRC-32 attr (checked
    before hnswlib loads them). rewrite_main builds the new file in memory and refuses or
    reports a full disk or a file-size limit as one StoreError, the store unchanged.
    """
    exclude = (f"{BANKS_GROUP}/{name}", *leftovers)
    with rewrite_main(path, exclude=exclude) as f:
        g = f.require_group(BANKS_GROUP).create_group(name)
        members = np.asarray(members, np.int64)
        g.create_dataset("members", data=members, chunks=(max(1, min(len(members), 1 << 16)),),
                         fletcher32=True)
        if index_bytes is not None:
            blob = np.ascontiguousarray(index_bytes, np.uint8)
            g.create_dataset("hnsw", data=blob, chunks=(max(1, min(len(blob), 1 << 20)),),
                             fletcher32=True)
            group_attrs = {**group_attrs, HNSW_CRC_ATTR: crc32(blob)}
        nb = g.create_group("neighbors")
        t, k = nb_index.shape
        chunk_rows = max(1, min(t, 65536))
        nb.create_dataset("index", data=np.asarray(nb_index, np.int64), chunks=(chunk_rows, k),
                          fletcher32=True)
        nb.create_dataset("dist", data=np.asarray(nb_dist, np.float32), chunks=(chunk_rows, k),
                          fletcher32=True)
        for key, v in group_attrs.items():
            g.attrs[key] = v
        for key, v in nb_attrs.items():
            nb.attrs[key] = v


class Bank:
    """A bank loaded from a store, for new queries (e.g. a driver's expressions at eval time).

    members: (B,) int64 rows of /timesteps. member_identity: (B,) identity rows. vectors:
    (B, D) float32 bank vectors. ``identities`` are the store's identity names (row -> name).
    """

    def __init__(
        self,
        name: str,
        members: np.ndarray,
        member_identity: np.ndarray,
        vectors: np.ndarray,
        identities: list[str],
        index: hnswlib.Index | None,
        attrs: dict[str, Any],
        threads: int | None = None,
    ):
        self.name = name
        self.members = members
        self.member_identity = member_identity
        self.vectors = vectors
        self.identities = identities
        self.index = index
        self.attrs = attrs
        self.ef = int(attrs.get("ef", BankConfig.ef))
        self.threads = threads or default_threads()

    def __len__(self) -> int:
        return len(self.members)

    @classmethod
    def load(cls, store: str | Path | Store, name: str = "full",
             threads: int | None = None) -> Bank:
        """Read bank ``name``; StoreError (one line) when it is missing or damaged
        (:func:`read_bank`'s checks, the hnsw bytes' CRC-32 and header included)."""
        with opened(store) as st:
            return cls._load(st, name, threads)

    @classmethod
    def _load(cls, st: Store, name: str, threads: int | None) -> Bank:
        tables = read_bank(st, name, hnsw=True)  # checked, the hnsw bytes' CRC-32 included
        members = tables.members
        vectors = np.ascontiguousarray(st.timesteps.exp[members], np.float32)
        member_identity = st.timesteps.identity[members].astype(np.int64)
        ef = int(tables.attrs.get("ef", BankConfig.ef))
        index = None
        if tables.hnsw is not None:
            try:
                index = deserialize_index(tables.hnsw, vectors.shape[1], len(members), ef)
            except RuntimeError as err:
                raise StoreError(st.path, f"/{BANKS_GROUP}/{name}/hnsw cannot be loaded "
                                          f"({_one_line(err)}); {_rebuild_hint(name)}") from None
            if index.get_current_count() != len(members):
                raise StoreError(st.path, f"/{BANKS_GROUP}/{name}/hnsw holds "
                                          f"{index.get_current_count()} vectors, members "
                                          f"{len(members)}; {_rebuild_hint(name)}")
        return cls(name, members, member_identity, vectors, list(st.identities), index,
                   tables.attrs, threads)

    def _identity_rows(self, exclude: Any, n: int) -> np.ndarray | None:
        if exclude is None:
            return None

        def row(x: Any) -> int:
            if isinstance(x, str):
                # A name the store does not know owns no member: it excludes nothing.
                hit = [i for i, nm in enumerate(self.identities) if identity_matches(nm, x)]
                return hit[0] if hit else -1
            return int(x)

        if isinstance(exclude, (str, int, np.integer)):
            return np.full(n, row(exclude), np.int64)
        rows = np.asarray([row(x) for x in exclude], np.int64)
        if len(rows) != n:
            raise ValueError(f"exclude_identity has {len(rows)} entries for {n} queries")
        return rows

    def query(
        self,
        vectors: np.ndarray,
        k: int = 1,
        exclude_identity: Any = None,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest bank members of ``vectors`` (Q, D) (or one (D,) vector).

        exclude_identity: None, one identity (row index or name, "17" matches "017") for all
        queries, or one per query. Returns (rows (Q, k) int64 rows of /timesteps, dist (Q, k)
        float32 Euclidean, ascending). ``exact`` (or a bank built with --exact) uses brute
        force; otherwise the stored HNSW index with the bank's ef.
        """
        v = np.asarray(vectors, np.float32)
        if v.ndim == 1:
            v = v[None]
        qid = self._identity_rows(exclude_identity, len(v))
        if exact or self.index is None:
            res = exact_search(self.vectors, self.member_identity, v, qid, k,
                               threads=self.threads)
        else:
            res = search_excluding(self.index, self.member_identity, v, qid, k, ef=self.ef,
                                   threads=self.threads, bank_vectors=self.vectors)
        return self.members[res.pos], res.dist
