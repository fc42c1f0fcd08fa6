"""Reading per-frame BFM tracking (Multiview-3DMM-Fitting params.npz) at paper scale.

Claim (docs/benchmarks.md, issue #12): reading the per-frame params.npz files of many
sequences takes at most half the time of a plain single-threaded ``np.load`` loop over the
same files on 2 cores. Paper scale is 249k files (415 participants x 4 sequences x 150
frames); the default here is 20k files (34 participants), ``--full`` runs the paper scale.

Measured in one run over one generated tree, every ratio against (a):

(a) plain loop: for each sequence, list and sort its frame folders, ``np.load`` each
    params.npz and take exp_coeff, pose and scale (no validation);
(b) ``read_bfm_params`` per sequence, single-threaded (the lean npz reader, with validation);
(c) ``read_trackings`` over the sequences of a NersembleSource, ``--workers`` threads (4);
(d) for the choice of pool only: ``read_bfm_params`` on a fork process pool, one per core.

Each is timed warm (files in the page cache) and cold (dropped from it with posix_fadvise
first, as a first ingest meets them). Threads win nothing warm (the parsing holds the GIL)
but overlap the reads cold; processes win a little warm and nothing more cold.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from common import SCRATCH, table, timed

PAPER = (415, 4, 150)  # participants, sequences each, tracked frames each: 249k files
DEFAULT = (34, 4, 150)  # 20.4k files, about a minute in all
QUICK = (10, 4, 150)  # 6k files, for `bench/run.py --quick`


def make_tree(participants: int, sequences: int, frames: int) -> tuple[Path, bool]:
    """TRACK/{pid}/sequences/EXP-{s}/params/{frame:04d}/params.npz as Multiview-3DMM-Fitting
    writes them (np.savez, uncompressed; id_coeff (1, 80), exp_coeff (1, 64), scale (1,),
    pose (1, 6), float32), every third video frame; made once under SCRATCH and reused.
    Returns (root, whether it was written now)."""
    root = SCRATCH / f"tracking-{participants}x{sequences}x{frames}"
    stamp = root / "tree.json"
    if stamp.is_file():
        return root, False
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    id_coeff = np.zeros((1, 80), np.float32)
    scale = np.ones(1, np.float32)
    for p in range(participants):
        for s in range(sequences):
            seq = root / f"{100 + p:03d}" / "sequences" / f"EXP-{s + 1}" / "params"
            exp = rng.normal(size=(frames, 1, 64)).astype(np.float32)
            pose = rng.normal(scale=0.1, size=(frames, 1, 6)).astype(np.float32)
            for f in range(frames):
                folder = seq / f"{3 * f:04d}"
                folder.mkdir(parents=True)
                buf = io.BytesIO()  # np.savez's own bytes, one write per file
                np.savez(buf, id_coeff=id_coeff, exp_coeff=exp[f], scale=scale, pose=pose[f])
                (folder / "params.npz").write_bytes(buf.getvalue())
    stamp.write_text(json.dumps({"participants": participants, "sequences": sequences,
                                 "frames": frames}))
    return root, True


def _param_folders(root: Path) -> list[Path]:
    return sorted(root.glob("*/sequences/*/params"))


def plain_loop(folders: list[Path]) -> int:
    """(a): the baseline a user would write, np.load per file; returns the frames read."""
    n = 0
    for folder in folders:
        names = sorted((d for d in os.listdir(folder) if d.isdigit()), key=int)
        exp = np.empty((len(names), 64), np.float32)
        pose = np.empty((len(names), 6), np.float32)
        scale = np.empty(len(names), np.float32)
        for row, name in enumerate(names):
            with np.load(folder / name / "params.npz") as npz:
                exp[row] = npz["exp_coeff"].reshape(64)
                pose[row] = npz["pose"].reshape(6)
                scale[row] = npz["scale"].reshape(())
        n += len(names)
    return n


def lean_loop(folders: list[Path]) -> int:
    """(b): our reader, one sequence after another."""
    from rafdata.sources.tracking import read_bfm_params

    return sum(len(read_bfm_params(f).frames) for f in folders)


def pooled(root: Path, workers: int) -> tuple[int, float]:
    """(c): read_trackings over fresh sequence sources (their tracking cache is empty);
    returns (frames read, seconds): listing participants and sequences is not timed."""
    from rafdata.sources import NersembleSource, SourceOptions
    from rafdata.sources.tracking import read_trackings

    source = NersembleSource(root, SourceOptions(tracking_format="bfm"))
    seqs = [s for pid in source.participants() for s in source.sequences(pid)]
    seconds, trackings = timed(lambda: read_trackings(seqs, workers))
    return sum(len(t.frames) for t in trackings), seconds


def _read_one(folder: Path) -> int:
    from rafdata.sources.tracking import read_bfm_params

    return len(read_bfm_params(folder).frames)


def process_pool(folders: list[Path], workers: int) -> int:
    """(d): the alternative to threads, fork processes each reading whole sequences."""
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return sum(pool.map(_read_one, folders, chunksize=8))


def evict(root: Path) -> bool:
    """Drop the tree's files from the page cache (posix_fadvise, no root needed): the next
    read comes from disk, as in a first ingest. False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in root.glob("*/sequences/*/params/*/params.npz"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def ingest_all(root: Path) -> int:
    """Coefficient-only ingest of the tree into a fresh store; returns timesteps written."""
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.store import remove_store

    out = SCRATCH / "tracking-ingest.h5"
    remove_store(out)
    return ingest(root, out, IngestConfig(no_images=True)).timesteps


def run(quick: bool = False, full: bool = False, workers: int = 4, repeat: int = 3) -> str:
    shape = PAPER if full else QUICK if quick else DEFAULT
    t_make, (root, made) = timed(lambda: make_tree(*shape))
    os.sync()  # dirty pages cannot be evicted: the cold runs need the tree on disk
    folders = _param_folders(root)
    files = len(folders) * shape[2]
    cores = min(2, os.cpu_count() or 1)

    def check(n: int) -> None:
        assert n == files, f"read {n} frames, expected {files}"

    def seconds_of(fn) -> Callable[[], float]:
        def call() -> float:
            seconds, n = timed(fn)
            check(n)
            return seconds
        return call

    def pooled_call() -> float:
        n, seconds = pooled(root, workers)
        check(n)
        return seconds

    readers = [
        ("(a) plain `np.load` loop, 1 thread", seconds_of(lambda: plain_loop(folders))),
        ("(b) `read_bfm_params`, 1 thread", seconds_of(lambda: lean_loop(folders))),
        (f"(c) `read_trackings`, {workers} threads", pooled_call),
        (f"(d) `read_bfm_params` on {cores} fork processes",
         seconds_of(lambda: process_pool(folders, cores))),
        ("(e) the whole `rafdata ingest TRACK -o store.h5 --no-images`",
         seconds_of(lambda: ingest_all(root))),
    ]
    lean_loop(folders)  # warm the page cache and the imports
    warm = [min(fn() for _ in range(repeat)) for _, fn in readers]
    cold: list[float | None] = [None] * len(readers)
    if evict(root):
        cold = []
        for _, fn in readers:
            best = float("inf")
            for _ in range(max(1, repeat - 1)):
                evict(root)
                best = min(best, fn())
            cold.append(best)
    rows = []
    for (label, _), w, c in zip(readers, warm, cold, strict=True):
        rows.append([label, f"{w:.2f}", f"{files / w:,.0f}", f"{w / warm[0]:.2f}",
                     "-" if c is None else f"{c:.2f}",
                     "-" if c is None else f"{c / cold[0]:.2f}"])
    p, s, f = shape
    return "\n\n".join([
        "## Per-frame BFM tracking (params.npz)",
        f"{files:,} Multiview-3DMM-Fitting `params/{{frame}}/params.npz` files ({p} "
        f"participants x {s} sequences x {f} frames{', paper scale' if full else ''}; the "
        f"tree was {f'written in {t_make:.0f} s' if made else 'reused'}). Warm: the files in "
        f"the page cache, best of {repeat}. Cold: each run after dropping the files from the "
        f"page cache (posix_fadvise), as a first ingest reads them, best of "
        f"{max(1, repeat - 1)}. Target: (c) and the whole ingest (e) <= 0.50 of (a) on 2 "
        "cores; "
        f"{os.cpu_count()} cores here.",
        table(["reader", "warm s", "warm files/s", "warm vs (a)", "cold s", "cold vs (a)"],
              rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="paper scale: 249k files")
    parser.add_argument("--quick", action="store_true", help="6k files")
    parser.add_argument("--workers", type=int, default=4, help="threads of read_trackings")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    print(run(args.quick, args.full, args.workers, args.repeat))


if __name__ == "__main__":
    sys.exit(main())
