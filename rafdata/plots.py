"""Figures of the analysis: the bank in a 2-D PCA with query neighbourhoods (paper Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from rafdata.bank import opened, read_bank  # noqa: E402
from rafdata.config import PlotBankConfig  # noqa: E402
from rafdata.coverage import PCA  # noqa: E402
from rafdata.errors import RafDataError, StoreError  # noqa: E402
from rafdata.store import Store  # noqa: E402

N_NEIGHBORS = 10
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "8")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")


def _members(store: Store, bank: str) -> np.ndarray:
    """The bank's members, checked by rafdata.bank (the same refusals as coverage and the
    trainer: a missing or damaged bank is one StoreError)."""
    members = read_bank(store, bank).members
    if len(members) < 2:
        raise StoreError(store.path, f"/banks/{bank}/members holds {len(members)} timestep; "
                                     "a PCA needs 2")
    return members


def default_queries(store: Store, n_queries: int, seed: int = 0) -> np.ndarray:
    """``n_queries`` random timestep rows of the held-out (driver) sequences, or of all
    timesteps when there are none: one per identity (identities in random order, then further
    rounds if there are fewer identities than queries), seeded."""
    rng = np.random.default_rng(seed)
    pool = store.timestep_rows(held_out=True)
    if not len(pool):
        pool = np.arange(len(store.timesteps))
    ident = np.full(len(store.timesteps), -1, np.int64)
    ident[pool] = store.timesteps.identity[pool]
    ids = rng.permutation(np.unique(ident[pool]))
    picked: list[int] = []
    while len(picked) < n_queries:
        added = False
        for i in ids:
            if len(picked) >= n_queries:
                break
            rows = np.setdiff1d(np.flatnonzero(ident == i), picked)
            if len(rows):
                picked.append(int(rng.choice(rows)))
                added = True
        if not added:  # fewer timesteps than queries
            break
    return np.asarray(picked, np.int64)


def query_neighbors(store: Store, members: np.ndarray, queries: np.ndarray,
                    k: int = N_NEIGHBORS) -> np.ndarray:
    """(Q, k') exact nearest bank members (timestep rows) of each query, in the original
    expression space, never of the query's identity; k' = min(k, eligible members);
    rows shorter than k' are padded with -1."""
    exp = np.asarray(store.timesteps.exp, np.float64)
    mem_exp = exp[members]
    mem_id = store.timesteps.identity[members]
    out = np.full((len(queries), k), -1, np.int64)
    for qi, q in enumerate(queries):
        ok = mem_id != store.timesteps.identity[q]
        d = np.sqrt(((mem_exp[ok] - exp[q]) ** 2).sum(1))
        order = np.argsort(d, kind="stable")[:k]
        out[qi, : len(order)] = members[ok][order]
    return out


def plot_bank(store: str | Path | Store, out_png: str | Path,
              cfg: PlotBankConfig | None = None) -> dict:
    """Write a PNG: the bank's member expressions in the first two principal components (grey),
    query expressions (stars) and their 10 nearest bank members of other identities (computed
    exactly in the original space), one colour per query, one marker shape per identity.

    cfg.queries: timestep rows; None draws ``cfg.n_queries`` at random
    (:func:`default_queries`). The PCA is fitted on the bank members. Returns {"queries"
    (Q,) timestep rows, "neighbors" (Q, 10) timestep rows (-1 pads), "explained" (2,)
    variance ratios}.
    """
    cfg = cfg or PlotBankConfig()
    bank, queries = cfg.bank, cfg.queries
    if Path(out_png).suffix.lower() != ".png":
        raise RafDataError(out_png, "plot-bank writes a PNG: give a path ending in .png")
    with opened(store) as st:
        members = _members(st, bank)
        n_t = len(st.timesteps)
        if queries is None:
            if cfg.n_queries < 1:
                raise StoreError(st.path, f"n_queries must be at least 1, got {cfg.n_queries}")
            q = default_queries(st, cfg.n_queries, cfg.seed)
        else:
            q = np.asarray(list(queries), np.int64)
            bad = [int(r) for r in q if not 0 <= r < n_t]
            if bad or not len(q):
                raise StoreError(st.path, f"query timestep rows {bad or '(none)'} are not in "
                                          f"0..{n_t - 1}")
        nb = query_neighbors(st, members, q)
        exp = np.asarray(st.timesteps.exp, np.float64)
        pca = PCA.fit(exp[members], 2)
        ratio = pca.explained_variance_ratio(exp[members])
        names = st.identities
        ident = st.timesteps.identity
        seq_names = st.sequences.name

        shown = sorted({int(ident[r]) for r in np.concatenate([q, nb[nb >= 0]])})
        marker = {i: _MARKERS[k % len(_MARKERS)] for k, i in enumerate(shown)}
        many = len(shown) > len(_MARKERS)  # shapes repeat: annotate neighbours with the id

        fig, ax = plt.subplots(figsize=(11, 7), dpi=120)
        z = pca.transform(exp[members])
        ax.scatter(z[:, 0], z[:, 1], s=6, c="0.78", lw=0, zorder=1, rasterized=True)
        for qi, row in enumerate(q):
            color = _COLORS[qi % len(_COLORS)]
            valid = nb[qi][nb[qi] >= 0]
            zq = pca.transform(exp[row][None])[0]
            zn = pca.transform(exp[valid]) if len(valid) else np.zeros((0, 2))
            for p in zn:
                ax.plot([zq[0], p[0]], [zq[1], p[1]], color=color, lw=0.5, alpha=0.35, zorder=2)
            for r, p in zip(valid, zn, strict=True):
                ax.scatter(p[0], p[1], s=46, marker=marker[int(ident[r])], facecolor=color,
                           edgecolor="black", lw=0.5, alpha=0.9, zorder=3)
                if many:
                    ax.annotate(names[int(ident[r])], p, fontsize=6, xytext=(3, 3),
                                textcoords="offset points", color=color)
            ax.scatter(zq[0], zq[1], s=420, marker="*", facecolor=color, edgecolor="black",
                       lw=1.2, zorder=4)
            ax.annotate(f"q{qi + 1}", zq, fontsize=9, fontweight="bold", xytext=(8, 8),
                        textcoords="offset points", color=color, zorder=5)

        query_handles = [
            Line2D([], [], ls="", marker="*", ms=14, mfc=_COLORS[qi % len(_COLORS)], mec="black",
                   label=f"q{qi + 1}: {names[int(ident[r])]} "
                         f"{seq_names[int(st.timesteps.sequence[r])]} t{int(r)}")
            for qi, r in enumerate(q)
        ]
        id_handles = [Line2D([], [], ls="", marker=marker[i], ms=7, mfc="white", mec="black",
                             label=f"id {names[i]}") for i in shown]
        grey = Line2D([], [], ls="", marker="o", ms=4, mfc="0.78", mec="none",
                      label=f"bank '{bank}' ({len(members)} members)")
        leg1 = ax.legend(handles=[grey, *query_handles], loc="upper left",
                         bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=8,
                         title=f"queries (stars), each with its\n{N_NEIGHBORS} nearest "
                               "neighbours (same colour)")
        ax.add_artist(leg1)
        leg2 = ax.legend(handles=id_handles, loc="lower left", bbox_to_anchor=(1.01, 0.0),
                         fontsize=8, title="identity (marker shape)", title_fontsize=8,
                         ncol=1 + len(id_handles) // 16)
        ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)" if len(ratio) > 1 else "PC 2")
        ax.set_title(f"Expression bank '{bank}' ({st.exp_space or 'exp'}, {st.exp_dim} dims), "
                     "first two principal components\nqueries and their nearest bank "
                     "neighbours of other identities (found in the full space)", fontsize=10)
        ax.grid(True, lw=0.3, alpha=0.5)
        fig.tight_layout()
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        # bbox "tight" with the legends named: they sit outside the axes and must not be cut.
        fig.savefig(out_png, bbox_inches="tight", bbox_extra_artists=[leg1, leg2])
        plt.close(fig)
        return {"queries": q.tolist(), "neighbors": nb.tolist(),
                "explained": [float(r) for r in ratio]}
