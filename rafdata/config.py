"""Settings of the bank build and the coverage analysis (dataclasses only).

Kept free of numpy, h5py and the other heavy imports so that the command line can take its
defaults and choices from these classes and still start in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rafdata.errors import StoreError
from rafdata.resources import cores_available


def default_threads() -> int:
    """Query threads by default: every core this process may use."""
    return cores_available()


@dataclass(frozen=True)
class BankConfig:
    """How to build one bank.

    Defaults were chosen with bench/bench_bank.py (docs/benchmarks.md) on clustered synthetic
    vectors: ef_construction=200 (100 lost ~2% recall at 300k vectors) and ef=256 (64 gave
    recall@8 0.985 at the paper's 83k x 64 and 0.96 at 300k; 256 gives 0.997-1.0), with a
    single-thread (deterministic) build of ~6 s for 83k vectors.
    """

    name: str = "full"
    frames_per_id: int = 200  # members drawn per identity (all of them where fewer)
    seed: int = 0  # member sampling, HNSW random_seed and the recall sample
    k: int = 8  # neighbours per timestep (top-1 and top-5 sampling both fit)
    M: int = 16  # HNSW graph degree
    ef_construction: int = 200
    ef: int = 256  # search beam; hnswlib uses max(ef, k_query)
    threads: int = field(default_factory=default_threads)  # query threads (build uses one)
    identities: tuple[str, ...] | None = None  # restrict to these ids ("17" matches "017")
    identity_fraction: float | None = None  # or: a seeded share of the identities ...
    subset_seed: int = 0  # ... permuted with this seed ...
    subset_part: int = 0  # ... taking this block (0, 1, ...: disjoint blocks of the permutation)
    exact: bool = False  # blocked brute force instead of HNSW (recall 1 by construction)
    recall_sample: int = 1000  # queries compared with exact search (all when fewer)
    force: bool = False  # replace an existing bank of this name

    def validate(self, path: str | Path | None) -> None:
        """StoreError (one line, naming ``path``) for settings hnswlib or sampling cannot use."""
        for opt, value, low in (("--frames-per-id", self.frames_per_id, 1), ("--k", self.k, 1),
                                ("--M", self.M, 2), ("--ef-construction", self.ef_construction, 1),
                                ("--ef", self.ef, 1), ("--recall-sample", self.recall_sample, 0),
                                ("--threads", self.threads, 1)):
            if value < low:
                raise StoreError(path, f"{opt} must be at least {low}, got {value}")



@dataclass(frozen=True)
class CoverageConfig:
    """Settings of :func:`subject_coverage` / :func:`all_subjects` (see docs/coverage.md).

    n: training vectors per condition (Vanilla and +RAF alike); None means min(2000, the
    subject's training timesteps). seed: the sampling seed. bank: which /banks/{name}
    neighbour table gives the +RAF neighbours. drivers: sequence names whose timesteps (of all
    identities) form the target; None means every held-out sequence (FREE by default).
    driver_identities: only the driver timesteps of these identities form the target (e.g. the
    identities that drive the avatars in `rafmodel eval`); the word ``images`` stands for every
    identity with held-out images in the store (`rafmodel eval`'s default drivers). None: all.
    include_own_drivers: keep the subject's own driver timesteps in its target (the paper uses
    all drivers). max_target: at most this many target vectors (a seeded subset beyond it).
    pca_components, kde_bandwidth (None: Scott's rule), mmd_bandwidth (None: median heuristic on
    the target), mmd_unbiased: metric settings as in :func:`kl_kde` and :func:`mmd_rbf`.
    """

    n: int | None = None
    seed: int = 0
    bank: str = "full"
    drivers: tuple[str, ...] | None = None
    driver_identities: tuple[str, ...] | None = None
    include_own_drivers: bool = True
    max_target: int = 20000
    pca_components: int = 8
    kde_bandwidth: float | None = None
    mmd_bandwidth: float | None = None
    mmd_unbiased: bool = False

    def validate(self, path: Path | None = None) -> None:
        problems = []
        if self.n is not None and self.n < 2:
            problems.append(f"n must be at least 2, got {self.n}")
        if self.max_target < 2:
            problems.append(f"max_target must be at least 2, got {self.max_target}")
        if self.pca_components < 1:
            problems.append(f"pca_components must be at least 1, got {self.pca_components}")
        for name in ("kde_bandwidth", "mmd_bandwidth"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                problems.append(f"{name} must be a positive number, got {v}")
        if self.drivers is not None and not self.drivers:
            problems.append("drivers names no sequence")
        if self.driver_identities is not None and not self.driver_identities:
            problems.append("driver_identities names no identity")
        if problems:
            raise StoreError(path, "; ".join(problems))


def config_dict(cfg: CoverageConfig) -> dict:
    """JSON-ready settings."""
    d = asdict(cfg)
    d["drivers"] = None if cfg.drivers is None else list(cfg.drivers)
    d["driver_identities"] = None if cfg.driver_identities is None \
        else list(cfg.driver_identities)
    return d
