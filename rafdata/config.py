"""Settings of ingest, the bank build, the coverage analysis, the bank figure and the user
study (dataclasses and constants only).

Kept free of numpy, h5py and the other heavy imports so that the command line can take its
defaults and choices from these classes and still start in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rafdata.codecs import DEFAULT_COMPRESSION
from rafdata.errors import RafDataError, StoreError
from rafdata.resources import cores_available
from rafdata.study.keyfile import StudyError

if TYPE_CHECKING:
    from rafdata.sources.base import SourceOptions

LAYOUTS = ("auto", "nersemble", "gha")  # source layouts ingest reads (auto: detected)
TRACKING_FORMATS = ("auto", "bfm", "flame")  # tracker outputs (auto: whichever is present)

DEFAULT_BANK = "full"  # the bank a build writes and every reader uses unless told otherwise


def default_threads() -> int:
    """Query threads by default: every core this process may use."""
    return cores_available()


def default_workers() -> int:
    """Decoding threads by default: the cores available, at most 8."""
    return min(8, cores_available())


@dataclass
class IngestConfig:
    """What to ingest and how; mirrors ``rafdata ingest`` options."""

    layout: str = "auto"  # one of LAYOUTS
    tracking_root: Path | None = None  # default: the source root itself
    tracking_format: str = "auto"  # one of TRACKING_FORMATS
    flame_exp: str = "expression+jaw"  # FLAME parts forming the expression vector
    participants: tuple[str, ...] | None = None
    sequences: tuple[str, ...] | None = None
    cameras: tuple[str, ...] | None = None
    held_out: tuple[str, ...] = ("FREE",)  # sequences kept out of banks and training
    images_for: tuple[str, ...] | None = None  # participants whose images are stored (None: all)
    no_images: bool = False  # coefficients only, no video is opened
    every: int = 1  # keep every n-th tracked frame
    crop: tuple[int, int, int, int] | None = None  # x y w h in source pixels
    size: tuple[int, int] | None = None  # output w h
    color_correct: bool = False
    workers: int = field(default_factory=default_workers)
    compression: str = DEFAULT_COMPRESSION  # one of rafdata.codecs.COMPRESSIONS
    strict: bool = False  # stop on a bad camera instead of skipping it

    def validate(self) -> None:
        """Raise RafDataError (one line) for option values no run could use."""
        problems = []
        if self.every < 1:
            problems.append(f"--every must be >= 1 (got {self.every})")
        if self.crop is not None and (len(self.crop) != 4 or min(self.crop[2:]) < 1):
            problems.append(f"--crop X Y W H needs W, H >= 1 (got {self.crop})")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            problems.append(f"--size W H needs W, H >= 1 (got {self.size})")
        if self.workers < 1:
            problems.append(f"--workers must be >= 1 (got {self.workers})")
        if problems:
            raise RafDataError(None, "; ".join(problems))

    def source_options(self) -> SourceOptions:
        from rafdata.sources.base import SourceOptions

        return SourceOptions(
            tracking_root=self.tracking_root,
            tracking_format=self.tracking_format,
            flame_exp=self.flame_exp,
            participants=self.participants,
            sequences=self.sequences,
            cameras=self.cameras,
            # Cameras decode in parallel threads; one decoder thread each when they fill the
            # cores: measured faster than fewer readers with ffmpeg's own frame threading.
            extra={"decode_threads": max(1, cores_available() // max(1, self.workers))},
        )

    def wants_images(self, participant: str) -> bool:
        from rafdata.store import identity_matches

        if self.no_images:
            return False
        if self.images_for is None:
            return True
        return any(identity_matches(participant, p) for p in self.images_for)


@dataclass(frozen=True)
class BankConfig:
    """How to build one bank.

    Defaults were chosen with bench/bench_bank.py (docs/benchmarks.md) on clustered synthetic
    vectors: ef_construction=200 (100 lost ~2% recall at 300k vectors) and ef=256 (64 gave
    recall@8 0.985 at the paper's 83k x 64 and 0.96 at 300k; 256 gives 0.997-1.0), with a
    single-thread (deterministic) build of ~6 s for 83k vectors.
    """

    name: str = DEFAULT_BANK
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
    bank: str = DEFAULT_BANK
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


@dataclass(frozen=True)
class PlotBankConfig:
    """Settings of :func:`rafdata.plots.plot_bank`.

    bank: the /banks/{name} to draw. queries: timestep rows to show; None draws ``n_queries``
    held-out rows at random with ``seed`` (:func:`rafdata.plots.default_queries`).
    """

    bank: str = DEFAULT_BANK
    queries: tuple[int, ...] | None = None
    n_queries: int = 4
    seed: int = 0


@dataclass(frozen=True)
class StudyConfig:
    """Settings of :func:`rafdata.study.make.make_study`.

    queries: query frames (fewer when the store has fewer to sample from). bank: the full
    bank; small_bank: a smaller one for the NN-full vs NN-small comparison (None: no such
    items). catch: catch trials (a query against itself vs a random frame). seed: sampling
    and presentation order. source: the ingest's source tree, for frames the store has no
    image of (None: the path its last ingest recorded). size: face crop side in pixels.
    url_prefix: prefix of the image URLs in crowd_input.csv.
    """

    queries: int = 1000
    bank: str = DEFAULT_BANK
    small_bank: str | None = None
    catch: int = 0
    seed: int = 0
    source: Path | None = None
    size: int = 256
    url_prefix: str = ""

    def validate(self, path: str | Path | None) -> None:
        """StudyError (one line, naming ``path``) for settings no study can be made with."""
        problems = [f"{opt} must be at least {low}, got {value}"
                    for opt, value, low in (("--queries", self.queries, 1),
                                            ("--catch", self.catch, 0),
                                            ("--size", self.size, 1))
                    if value < low]
        if problems:
            raise StudyError(path, "; ".join(problems))
