"""Which frames the study shows: query timesteps and, per query, the candidate pairs.

Items: ``nn_vs_random`` (the query's nearest neighbour in the full bank vs a random bank
member), ``nn_vs_small`` (full-bank vs small-bank nearest neighbour) and ``catch`` (the query
itself vs a random member; the answer is known). Candidates are never of the query's
identity: the neighbour tables guarantee it for neighbours, random members are drawn among
the other identities' members.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rafdata.bank import read_bank
from rafdata.config import StudyConfig
from rafdata.store import Store
from rafdata.study.keyfile import KeyRow, StudyError


@dataclass(frozen=True)
class StudyPlan:
    batch: str
    rows: list[KeyRow]  # in presentation order

    @property
    def timesteps(self) -> list[int]:
        """Every timestep whose face the pages show, ascending."""
        out = {t for r in self.rows for t in (r.query, r.left_timestep, r.right_timestep)}
        return sorted(out)


def query_pool(st: Store) -> np.ndarray:
    """Held-out timesteps of identities with images, else any timestep with images, else any
    held-out timestep, else any (their frames then come from ``--source``)."""
    with_images = np.zeros(len(st.timesteps), bool)
    if st.n_images:
        with_images[st.image_timestep] = True
    held = st.sequences.held_out[st.timesteps.sequence]
    ids_with_images = np.unique(st.timesteps.identity[with_images])
    of_imaged_ids = np.isin(st.timesteps.identity, ids_with_images)
    for keep in (held & of_imaged_ids & with_images, with_images, held,
                 np.ones(len(held), bool)):
        if keep.any():
            return np.flatnonzero(keep)
    raise StudyError(st.path, "the store has no timesteps to sample queries from")


def plan_study(store: str | Path, n_queries: int, *, bank: str = StudyConfig.bank,
               small_bank: str | None = None, catch: int = 0, seed: int = 0) -> StudyPlan:
    """Sample ``n_queries`` queries (fewer if the pool is smaller) and their items, with the
    left/right order and the item order randomised by ``seed``; item ids are opaque."""
    StudyConfig(queries=n_queries, catch=catch).validate(store)
    rng = np.random.default_rng(seed)
    with Store(store) as st:
        full = read_bank(st, bank)
        small = read_bank(st, small_bank) if small_bank else None
        pool = query_pool(st)
        queries = np.sort(rng.choice(pool, size=min(n_queries, len(pool)), replace=False))
        ident = st.timesteps.identity
        member_ident = ident[full.members]
    batch = uuid.uuid4().hex[:12]  # never seeded: two batches made alike still differ
    others_of: dict[int, np.ndarray] = {}  # identity row -> members of the other identities

    def random_member(q: int) -> int:
        i = int(ident[q])
        if i not in others_of:  # one pass over the bank per identity, not per query
            others_of[i] = full.members[member_ident != i]
        others = others_of[i]
        if not len(others):
            raise StudyError(Path(store), f"bank {bank!r} has no member of another identity")
        return int(rng.choice(others))

    triples: list[tuple[str, int, str, int, str, int]] = []
    for q in queries.tolist():
        triples.append(("nn_vs_random", q, "nn_full", int(full.index[q, 0]), "random",
                        random_member(q)))
        if small is not None:
            triples.append(("nn_vs_small", q, "nn_full", int(full.index[q, 0]), "nn_small",
                            int(small.index[q, 0])))
    for q in rng.choice(queries, size=min(catch, len(queries)), replace=False).tolist():
        triples.append(("catch", int(q), "self", int(q), "random", random_member(int(q))))
    order = rng.permutation(len(triples))
    ids = set()
    rows = []
    for i in order.tolist():
        comp, q, ma, ta, mb, tb = triples[i]
        if rng.random() < 0.5:
            ma, ta, mb, tb = mb, tb, ma, ta
        item = uuid.UUID(bytes=rng.bytes(16)).hex[:10]
        while item in ids:  # 40 random bits: a collision is rare but must not merge items
            item = uuid.UUID(bytes=rng.bytes(16)).hex[:10]
        ids.add(item)
        rows.append(KeyRow(batch, item, comp, q, ma, ta, mb, tb))
    return StudyPlan(batch, rows)
