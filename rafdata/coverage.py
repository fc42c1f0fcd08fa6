"""Expression coverage: how well a subject's training expressions cover the driver expressions.

The paper's Table 1 (RAF, "coverage analysis"): for a subject, compare the expression vectors
it trains on (Vanilla) with those it trains on under retrieval augmentation (+RAF) against the
*target*, the expressions of the held-out driver sequences (FREE). Three metrics, lower is
better for all of them:

- :func:`mmd_rbf`: squared maximum mean discrepancy with a Gaussian (RBF) kernel;
- :func:`kl_kde`: KL(P_train || P_target) from Gaussian kernel density estimates in a PCA
  space of the target;
- :func:`b2t`: "bank to target", the mean distance of a target vector to its nearest training
  vector.

The metric functions take numpy arrays (N, D) and compute pairwise quantities in row blocks
with torch (CPU), so tens of thousands of vectors per side take seconds and memory stays at a
few blocks of ``_BLOCK_ELEMS`` floats. :func:`subject_coverage` and :func:`all_subjects` run the
analysis on a store with a bank (``rafdata build-bank``), :func:`coverage_report` either for
``rafdata coverage``; see docs/coverage.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rafdata.bank import neighbor_table, opened
from rafdata.config import CoverageConfig, config_dict  # noqa: F401  (re-exported)
from rafdata.errors import StoreError
from rafdata.progress import NullProgress, Progress
from rafdata.store import Store, find_identity

if TYPE_CHECKING:  # torch is imported by the functions that compute: `rafdata --help` and
    import torch  # the store readers must not pay for it

_BLOCK_ELEMS = 1 << 23  # pairwise entries per block (8M float32 = 32 MB per temporary)
_MEDIAN_SAMPLE = 2000  # points of the pooled sample used by the median heuristic
METRICS = ("mmd", "kl", "b2t")

# ---------------------------------------------------------------------------------------------
# Blocked pairwise helpers (torch on CPU)


def _as_tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(a), dtype=torch.float32 if dtype is None else dtype)


def _check_2d(name: str, a: np.ndarray, dim: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or len(a) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} dims, expected {dim}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def _row_blocks(n_rows: int, n_cols: int):
    step = max(1, _BLOCK_ELEMS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _sqdist(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances, clamped at 0 (one fused matmul)."""
    import torch

    d = torch.addmm(b_sq[None, :], a, b.T, alpha=-2.0)
    d.add_((a * a).sum(1, keepdim=True))
    return d.clamp_min_(0.0)


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float) -> float:
    """sum_ij exp(-gamma ||a_i - b_j||^2): float32 row sums, accumulated in float64."""
    b_sq = (b * b).sum(1)
    total = 0.0
    for s, e in _row_blocks(len(a), len(b)):
        k = _sqdist(a[s:e], b, b_sq).mul_(-gamma).exp_()
        total += float(k.sum(1).double().sum())
    return total


def _kernel_sum_self(a: torch.Tensor, gamma: float) -> float:
    """:func:`_kernel_sum` (a, a) using symmetry: only blocks on and above the diagonal."""
    a_sq = (a * a).sum(1)
    total = 0.0
    for s, e in _row_blocks(len(a), len(a)):
        k = _sqdist(a[s:e], a[s:], a_sq[s:]).mul_(-gamma).exp_()
        diag = float(k[:, : e - s].sum(1).double().sum())
        rest = float(k[:, e - s :].sum(1).double().sum())
        total += diag + 2.0 * rest
    return total


def _logsumexp_rows(a: torch.Tensor, b: torch.Tensor, gamma: float) -> torch.Tensor:
    """(len(a),) float64: log sum_j exp(-gamma ||a_i - b_j||^2), max-shifted per row."""
    import torch

    b_sq = (b * b).sum(1)
    out = torch.empty(len(a), dtype=torch.float64)
    for s, e in _row_blocks(len(a), len(b)):
        d = _sqdist(a[s:e], b, b_sq)
        low = d.min(1, keepdim=True).values
        d.sub_(low).mul_(-gamma).exp_()
        out[s:e] = d.sum(1).double().log() - gamma * low[:, 0].double()
    return out


def _nearest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a),) int64: index of the nearest row of b for every row of a."""
    import torch

    b_sq = (b * b).sum(1)
    out = torch.empty(len(a), dtype=torch.int64)
    for s, e in _row_blocks(len(a), len(b)):
        out[s:e] = _sqdist(a[s:e], b, b_sq).argmin(1)
    return out


# ---------------------------------------------------------------------------------------------
# Metrics on arrays


def median_heuristic(x: np.ndarray, y: np.ndarray | None = None,
                     max_points: int = _MEDIAN_SAMPLE) -> float:
    """Median Euclidean distance between distinct points of the pooled sample x ∪ y.

    Uses all points when there are at most ``max_points``; otherwise a fixed-seed random subset
    of ``max_points`` drawn from the rows in lexicographic order, so the result does not depend
    on the order of the rows (nor on which set a point came from). Returns 1.0 if every
    distance is 0 (all points equal), so a kernel width always exists.
    """
    import torch

    pooled = np.asarray(x, np.float64) if y is None else np.concatenate(
        [np.asarray(x, np.float64), np.asarray(y, np.float64)])
    if len(pooled) > max_points:
        order = np.lexsort(pooled.T[::-1])
        pick = np.sort(np.random.default_rng(0).choice(len(pooled), max_points, replace=False))
        pooled = pooled[order[pick]]
    if len(pooled) < 2:
        return 1.0
    p = torch.as_tensor(pooled - pooled.mean(0))
    d2 = _sqdist(p, p, (p * p).sum(1))
    iu = torch.triu_indices(len(p), len(p), offset=1)
    med = float(d2[iu[0], iu[1]].median().sqrt())
    return med if med > 0 else 1.0


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None,
            unbiased: bool = False) -> float:
    """Squared maximum mean discrepancy MMD^2(P, Q) with k(a, b) = exp(-|a-b|^2 / (2 s^2)).

    x: (n, D) samples of P, y: (m, D) samples of Q, any units. bandwidth: the kernel width s in
    the units of x; None takes the median heuristic (:func:`median_heuristic` over x ∪ y).

    Estimator: by default the *biased V-statistic*
    ``mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)`` (all pairs, diagonal
    included), which is >= 0 and 0 (up to float32 rounding, ~1e-7) when x and y are the same
    set. ``unbiased=True``
    gives the U-statistic (diagonal terms of the within-set means dropped; may be < 0).
    Computed in float32 row blocks (within-set sums over one triangle), sums accumulated in
    float64; dimensionless, in [0, 2].
    """
    x = _check_2d("x", x)
    y = _check_2d("y", y, x.shape[1])
    s = median_heuristic(x, y) if bandwidth is None else float(bandwidth)
    if not s > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    center = np.concatenate([x, y]).mean(0)  # translation-invariant; improves float32 accuracy
    xt, yt = _as_tensor(x - center), _as_tensor(y - center)
    return _mmd_from_tensors(xt, yt, 1.0 / (2.0 * s * s), unbiased)


def _mmd_from_tensors(xt: torch.Tensor, yt: torch.Tensor, gamma: float, unbiased: bool,
                      kyy_sum: float | None = None) -> float:
    n, m = len(xt), len(yt)
    kxx = _kernel_sum_self(xt, gamma)
    kyy = _kernel_sum_self(yt, gamma) if kyy_sum is None else kyy_sum
    kxy = _kernel_sum(xt, yt, gamma)
    if unbiased:
        if n < 2 or m < 2:
            raise ValueError("the unbiased MMD needs at least 2 samples per set")
        return (kxx - n) / (n * (n - 1)) + (kyy - m) / (m * (m - 1)) - 2.0 * kxy / (n * m)
    return max(0.0, kxx / (n * n) + kyy / (m * m) - 2.0 * kxy / (n * m))


@dataclass(frozen=True)
class PCA:
    """A PCA basis: mean (D,), components (d, D) orthonormal rows, std (d,) of the fitted data
    along each component (the whitening scale)."""

    mean: np.ndarray
    components: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, data: np.ndarray, n_components: int) -> PCA:
        data = np.asarray(data, np.float64)
        mean = data.mean(0)
        _, sv, vt = np.linalg.svd(data - mean, full_matrices=False)
        d = max(1, min(int(n_components), vt.shape[0]))
        # Deterministic signs: the largest-magnitude loading of each component is positive.
        comps = vt[:d] * np.sign(vt[:d][np.arange(d), np.abs(vt[:d]).argmax(1)])[:, None]
        std = sv[:d] / math.sqrt(max(1, len(data) - 1))
        return cls(mean, comps, np.where(std > 1e-12, std, 1.0))

    def transform(self, a: np.ndarray, whiten: bool = False) -> np.ndarray:
        z = (np.asarray(a, np.float64) - self.mean) @ self.components.T
        return z / self.std if whiten else z

    def explained_variance_ratio(self, data: np.ndarray) -> np.ndarray:
        total = float(np.asarray(data, np.float64).var(0, ddof=1).sum())
        return self.std**2 / total if total > 0 else np.zeros_like(self.std)


def scott_bandwidth(n: int, dims: int) -> float:
    """Scott's factor n^(-1/(d+4)): the KDE width in units of the data's standard deviation."""
    return float(max(1, n) ** (-1.0 / (dims + 4)))


def kl_kde(p: np.ndarray, q: np.ndarray, n_components: int = 8,
           bandwidth: float | None = None) -> float:
    """KL(P || Q) in nats, from Gaussian kernel density estimates in a PCA space of Q.

    p: (n, D) samples of P (the training expressions), q: (m, D) samples of Q (the target).

    1. PCA is fitted on q (the target; so every P compared with one target is measured in the
       same space), keeping ``n_components`` components (at most D), and both sets are
       projected and *whitened* by q's standard deviation along each component.
    2. Both densities are isotropic Gaussian KDEs over their own samples with one shared width
       h (whitened units): ``bandwidth``, or Scott's rule h = m^(-1/(d+4)) for None. That is the
       kernel covariance scipy's ``gaussian_kde`` would choose for q, used for p as well.
    3. Monte-Carlo over P's samples (all of them, no leave-one-out, so identical sets give
       exactly 0): KL = mean_i [log p^(p_i) - log q^(p_i)], with
       log p^(z) = logsumexp_j(-|z - p_j|^2 / 2h^2) - log n (the Gaussian normaliser cancels).

    Computed in row blocks with log-sum-exp in float64.
    """
    p = _check_2d("p", p)
    q = _check_2d("q", q, p.shape[1])
    pca = PCA.fit(q, n_components)
    return _kl_whitened(pca.transform(p, whiten=True), pca.transform(q, whiten=True), bandwidth)


def _kl_whitened(zp: np.ndarray, zq: np.ndarray, bandwidth: float | None) -> float:
    h = scott_bandwidth(len(zq), zq.shape[1]) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    gamma = 1.0 / (2.0 * h * h)
    tp, tq = _as_tensor(zp), _as_tensor(zq)
    log_p = _logsumexp_rows(tp, tp, gamma) - math.log(len(zp))
    log_q = _logsumexp_rows(tp, tq, gamma) - math.log(len(zq))
    return float((log_p - log_q).mean())


def b2t(train: np.ndarray, target: np.ndarray) -> float:
    """Mean over target vectors of the Euclidean distance to the nearest training vector.

    train: (n, D), target: (m, D); the result is in the units of the vectors. The nearest
    training vector is searched in float32 blocks (||a||^2 + ||b||^2 - 2ab after centring), then
    its distance is recomputed exactly in float64, so e.g. a copy shifted by v gives |v|.
    """
    train = _check_2d("train", train)
    target = _check_2d("target", target, train.shape[1])
    center = train.mean(0)
    nn = _nearest(_as_tensor(target - center), _as_tensor(train - center)).numpy()
    diff = np.asarray(target, np.float64) - np.asarray(train, np.float64)[nn]
    return float(np.sqrt((diff * diff).sum(1)).mean())


# ---------------------------------------------------------------------------------------------
# The analysis on a store


@dataclass
class _Target:
    """Prepared target of one analysis: vectors, PCA, kernel settings, cached sums."""

    rows: np.ndarray  # (M,) rows of /timesteps
    vectors: np.ndarray  # (M, D)
    center: np.ndarray  # (D,)
    mmd_bandwidth: float
    pca: PCA
    kde_bandwidth: float
    _kyy: float | None = None
    _t: torch.Tensor | None = None
    _z: np.ndarray | None = None

    @property
    def tensor(self) -> torch.Tensor:
        if self._t is None:
            self._t = _as_tensor(self.vectors - self.center)
        return self._t

    @property
    def whitened(self) -> np.ndarray:
        if self._z is None:
            self._z = self.pca.transform(self.vectors, whiten=True)
        return self._z

    def kyy(self, gamma: float) -> float:
        if self._kyy is None:
            self._kyy = _kernel_sum_self(self.tensor, gamma)
        return self._kyy


def _top1(store: Store, bank: str) -> np.ndarray:
    """(T,) int64: each timestep's nearest bank member of another identity (the table is
    checked by rafdata.bank: in range, never held out, never the same identity)."""
    return np.ascontiguousarray(neighbor_table(store, bank)[:, 0])


def _driver_rows(store: Store, cfg: CoverageConfig) -> np.ndarray:
    if cfg.drivers is None:
        rows = store.timestep_rows(held_out=True)
        what = "held-out sequences"
    else:
        known = set(store.sequences.name)
        missing = [d for d in cfg.drivers if d not in known]
        if missing:
            raise StoreError(store.path, f"driver sequence(s) {', '.join(missing)} not in the "
                                         f"store (has: {', '.join(sorted(known))})")
        rows = store.timestep_rows(sequences=cfg.drivers)
        what = f"sequences {', '.join(cfg.drivers)}"
    if cfg.driver_identities is not None:
        ids = _driver_identity_rows(store, cfg.driver_identities)
        rows = rows[np.isin(store.timesteps.identity[rows], ids)]
        what += f" of identities {', '.join(store.identities[i] for i in ids) or '(none)'}"
    if len(rows) < 2:
        raise StoreError(store.path, f"fewer than 2 driver timesteps in {what}; nothing to "
                                     "cover (pass --drivers)")
    return rows


def identities_with_held_out_images(store: Store) -> list[int]:
    """Rows of /identities with held-out images in the store (`rafmodel eval`'s default
    cross-driving drivers)."""
    rows = store.image_rows(held_out=True) if store.n_images else np.zeros(0, np.int64)
    if len(rows) == 0:
        return []
    ts = np.unique(store.image_timestep[rows])
    return sorted(int(i) for i in np.unique(store.timesteps.identity[ts]))


def _driver_identity_rows(store: Store, names: Sequence[str]) -> list[int]:
    """Identity rows of ``names`` (``images``: those with held-out images); StoreError for an
    unknown identity."""
    out: set[int] = set()
    for n in names:
        if n == "images":
            out.update(identities_with_held_out_images(store))
        else:
            out.add(store.identity_index(n))
    return sorted(out)


def split_drivers(store: str | Path | Store, tokens: Sequence[str]
                  ) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """`rafdata coverage --drivers A,B,...`: (sequence names, identities) among the tokens.

    A token that names a sequence of the store is a driver sequence; ``images`` or an identity
    of the store is a driver identity; anything else is a StoreError naming the store.
    """
    with opened(store) as st:
        seqs = set(st.sequences.name)
        s_out, i_out, bad = [], [], []
        for t in tokens:
            if t in seqs:
                s_out.append(t)
            elif t == "images" or find_identity(st.identities, t) is not None:
                i_out.append(t)
            else:
                bad.append(t)
        if bad:
            raise StoreError(st.path, f"--drivers: {', '.join(bad)} is neither a sequence nor "
                             f"an identity of the store (sequences: "
                             f"{', '.join(sorted(seqs))}; or `images`)")
        return tuple(s_out) or None, tuple(i_out) or None


def _prepare_target(store: Store, rows: np.ndarray, cfg: CoverageConfig) -> _Target:
    if len(rows) > cfg.max_target:
        rng = np.random.default_rng([cfg.seed, 1])
        rows = np.sort(rng.choice(rows, cfg.max_target, replace=False))
    vectors = np.asarray(store.timesteps.exp[rows], np.float64)
    if not np.isfinite(vectors).all():
        raise StoreError(store.path, "driver expression vectors hold NaN or infinite values")
    pca = PCA.fit(vectors, cfg.pca_components)
    d = len(pca.std)
    return _Target(
        rows=rows,
        vectors=vectors,
        center=vectors.mean(0),
        mmd_bandwidth=cfg.mmd_bandwidth or median_heuristic(vectors),
        pca=pca,
        kde_bandwidth=cfg.kde_bandwidth or scott_bandwidth(len(rows), d),
    )


def _metrics(train: np.ndarray, target: _Target, unbiased: bool) -> dict[str, float]:
    gamma = 1.0 / (2.0 * target.mmd_bandwidth**2)
    xt = _as_tensor(train - target.center)
    mmd = _mmd_from_tensors(xt, target.tensor, gamma, unbiased, kyy_sum=target.kyy(gamma))
    kl = _kl_whitened(target.pca.transform(train, whiten=True), target.whitened,
                      target.kde_bandwidth)
    return {"mmd": float(mmd), "kl": kl, "b2t": b2t(train, target.vectors)}


def _change(vanilla: dict[str, float], raf: dict[str, float]) -> dict[str, float]:
    """Relative change of +RAF against Vanilla, in percent (negative: +RAF is lower)."""
    out = {}
    for m in METRICS:
        v = vanilla[m]
        out[m] = 100.0 * (raf[m] - v) / abs(v) if v != 0 else float("nan")
    return out


def _train_rows(store: Store, ident: int, driver_rows: np.ndarray) -> np.ndarray:
    """The subject's timesteps outside held-out sequences and outside the driver timesteps."""
    rows = store.timestep_rows(identity=ident, held_out=False)
    return np.setdiff1d(rows, driver_rows)


def _subject(store: Store, subject: str, cfg: CoverageConfig, nb_top1: np.ndarray,
             driver_rows: np.ndarray, target: _Target | None) -> dict:
    ident = store.identity_index(subject)
    name = store.identities[ident]
    train_rows = _train_rows(store, ident, driver_rows)
    if len(train_rows) < 2:
        raise StoreError(store.path, f"identity {name} has {len(train_rows)} training "
                                     "timesteps (outside held-out/driver sequences); need 2")
    if target is None:
        rows = driver_rows
        if not cfg.include_own_drivers:
            rows = rows[store.timesteps.identity[rows] != ident]
            if len(rows) < 2:
                raise StoreError(store.path, f"no driver timesteps of other identities than "
                                             f"{name}")
        target = _prepare_target(store, rows, cfg)
    n = min(cfg.n or 2000, len(train_rows))
    rng = np.random.default_rng([cfg.seed, ident])
    sample = rng.permutation(train_rows)[:n]
    keep, swap = sample[: n // 2], sample[n // 2:]
    nb = nb_top1[swap]
    exp = store.timesteps.exp
    vanilla = np.asarray(exp[sample], np.float64)
    raf = np.asarray(exp[np.concatenate([keep, nb])], np.float64)
    m_v = _metrics(vanilla, target, cfg.mmd_unbiased)
    m_r = _metrics(raf, target, cfg.mmd_unbiased)
    return {
        "subject": name,
        "n": int(n),
        "n_train_available": int(len(train_rows)),
        "n_swapped": int(len(swap)),
        "n_target": int(len(target.rows)),
        "vanilla": m_v,
        "raf": m_r,
        "change_pct": _change(m_v, m_r),
        "mmd_bandwidth": target.mmd_bandwidth,
        "kde_bandwidth": target.kde_bandwidth,
        "pca_components": int(len(target.pca.std)),
    }


def subject_coverage(store: str | Path | Store, subject: str,
                     cfg: CoverageConfig | None = None) -> dict:
    """Coverage metrics of one subject, Vanilla and +RAF.

    Training timesteps of ``subject``: its timesteps outside held-out sequences (and outside
    ``cfg.drivers``). Vanilla: N of them drawn without replacement (seed ``[cfg.seed,
    identity row]``). +RAF: the first N//2 of that same draw plus the top-1 neighbours (column 0
    of ``/banks/{bank}/neighbors/index``, always another identity) of the other N - N//2.
    Target: the driver timesteps (see :class:`CoverageConfig`). The MMD kernel width, the PCA
    and the KDE width are derived from the target only, so both conditions (and all subjects
    sharing one target) are measured with the same yardstick.

    Returns a JSON-ready dict: subject, n, n_train_available, n_swapped, n_target, vanilla and
    raf ({mmd, kl, b2t}), change_pct ({mmd, kl, b2t}: 100 (raf - vanilla) / vanilla),
    mmd_bandwidth, kde_bandwidth, pca_components. Raises StoreError for an unknown subject, a
    store without the bank, or a subject without training timesteps.
    """
    cfg = cfg or CoverageConfig()
    with opened(store) as st:
        cfg.validate(st.path)
        nb = _top1(st, cfg.bank)
        st.identity_index(subject)  # unknown subject: StoreError before any work
        drivers = _driver_rows(st, cfg)
        target = _prepare_target(st, drivers, cfg) if cfg.include_own_drivers else None
        return _subject(st, subject, cfg, nb, drivers, target)


def subjects_with_drivers(store: Store, cfg: CoverageConfig) -> list[str]:
    """Identities that have timesteps in the driver sequences (held-out ones by default)."""
    rows = _driver_rows(store, cfg)
    ids = np.unique(store.timesteps.identity[rows])
    return [store.identities[int(i)] for i in ids]


def average_row(rows: Sequence[dict]) -> dict:
    """Mean of each metric over subjects, and the mean of the per-subject relative changes."""
    out: dict = {"subject": "average", "n_subjects": len(rows)}
    for part in ("vanilla", "raf", "change_pct"):
        out[part] = {m: float(np.mean([r[part][m] for r in rows])) for m in METRICS}
    return out


def all_subjects(store: str | Path | Store, cfg: CoverageConfig | None = None,
                 progress: Progress | None = None,
                 subjects: Sequence[str] | None = None) -> dict:
    """:func:`subject_coverage` for every identity with driver (held-out) timesteps.

    Identities without training timesteps are skipped with a warning through ``progress``.
    Returns ``{"subjects": [row, ...], "average": row, "config": {...}}`` where the average row
    holds per-metric means over subjects and the mean of the per-subject changes in percent.
    """
    cfg = cfg or CoverageConfig()
    progress = progress or NullProgress()
    with opened(store) as st:
        cfg.validate(st.path)
        nb = _top1(st, cfg.bank)
        drivers = _driver_rows(st, cfg)
        names = list(subjects) if subjects is not None else subjects_with_drivers(st, cfg)
        for s in names:
            st.identity_index(s)
        target = _prepare_target(st, drivers, cfg) if cfg.include_own_drivers else None
        rows = []
        progress.start("coverage", len(names))
        for s in names:
            ident = st.identity_index(s)
            n_train = len(_train_rows(st, ident, drivers))
            if n_train < 2:
                progress.warn(f"identity {s} has {n_train} training timesteps; skipped")
            else:
                rows.append(_subject(st, s, cfg, nb, drivers, target))
            progress.advance(1)
        if not rows:
            raise StoreError(st.path, "no identity with both driver and training timesteps")
        return {"subjects": rows, "average": average_row(rows), "config": config_dict(cfg)}


def coverage_report(store: str | Path | Store, cfg: CoverageConfig | None = None, *,
                    subject: str | None = None, drivers: Sequence[str] | None = None,
                    progress: Progress | None = None) -> dict:
    """`rafdata coverage`: :func:`subject_coverage` of ``subject``, or :func:`all_subjects`
    when it is None, on one opening of the store.

    drivers: the words of ``--drivers`` (sequence names and/or identities, or ``images``),
    sorted into ``cfg.drivers`` and ``cfg.driver_identities`` by :func:`split_drivers`; None
    keeps those of ``cfg``. Returns ``{"subjects": [row, ...], "config": {...}}`` plus
    ``"average"`` for all subjects (the rows as :func:`subject_coverage` returns them).
    """
    cfg = cfg or CoverageConfig()
    with opened(store) as st:
        if drivers is not None:
            seqs, ids = split_drivers(st, drivers)
            cfg = replace(cfg, drivers=seqs, driver_identities=ids)
        if subject is None:
            return all_subjects(st, cfg, progress)
        return {"subjects": [subject_coverage(st, subject, cfg)], "config": config_dict(cfg)}
