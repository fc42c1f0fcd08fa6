"""Coefficient-only ingest of hundreds of participants (the bank's identities).

Claim (docs/benchmarks.md): ingesting tracking alone for hundreds of participants takes
seconds: no video is opened, only the tracker's npz files are read.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
from common import SCRATCH, table, timed


def _flame_tree(root, participants: int, sequences: int, frames: int) -> int:
    """NeRSemble-benchmark FLAME tracking: one npz per sequence; returns the file count."""
    rng = np.random.default_rng(0)
    for p in range(participants):
        for s in range(sequences):
            folder = root / f"{100 + p:03d}" / "sequences" / f"EXP-{s + 1}" / "tracking"
            folder.mkdir(parents=True)
            t = frames
            np.savez(folder / "flame2023_tracking_v2.npz",
                     expression=rng.normal(size=(t, 100)).astype(np.float32),
                     rotation=rng.normal(scale=0.1, size=(t, 3)).astype(np.float32),
                     translation=rng.normal(scale=0.01, size=(t, 3)).astype(np.float32),
                     rotation_matrices=np.tile(np.eye(3, dtype=np.float32), (t, 1, 1)),
                     frames=np.arange(t) * 3, scale=np.ones((1, 1), np.float32),
                     jaw=np.zeros((t, 3), np.float32), neck=np.zeros((t, 3), np.float32),
                     eyes=np.zeros((t, 6), np.float32), shape=np.zeros((1, 300), np.float32))
    return participants * sequences


def _bfm_tree(root, participants: int, sequences: int, frames: int) -> int:
    """Multiview-3DMM-Fitting tracking: one params.npz per frame; returns the file count."""
    rng = np.random.default_rng(0)
    for p in range(participants):
        for s in range(sequences):
            seq = root / f"{100 + p:03d}" / "sequences" / f"EXP-{s + 1}" / "params"
            for f in range(frames):
                d = seq / f"{3 * f:04d}"
                d.mkdir(parents=True)
                np.savez(d / "params.npz", id_coeff=np.zeros((1, 80), np.float32),
                         exp_coeff=rng.normal(size=(1, 64)).astype(np.float32),
                         scale=np.ones(1, np.float32),
                         pose=rng.normal(scale=0.1, size=(1, 6)).astype(np.float32))
    return participants * sequences * frames


def run(quick: bool = False) -> str:
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.store import remove_store

    rows = []
    cases = [("FLAME npz per sequence", _flame_tree, 415, 25, 200),
             ("BFM params.npz per frame", _bfm_tree, 100, 10, 50)]
    if quick:
        cases = [(n, f, p // 5, s, fr // 2) for n, f, p, s, fr in cases]
    for name, make, participants, sequences, frames in cases:
        root = SCRATCH / f"coef-{make.__name__}"
        shutil.rmtree(root, ignore_errors=True)
        files = make(root, participants, sequences, frames)
        out = SCRATCH / "coef.h5"
        remove_store(out)
        seconds, report = timed(lambda root=root, out=out: ingest(
            root, out, IngestConfig(no_images=True)))
        rows.append([name, f"{participants}", f"{participants * sequences}", f"{files}",
                     f"{report.timesteps}", f"{seconds:.1f}", f"{report.timesteps / seconds:.0f}"])
        shutil.rmtree(root, ignore_errors=True)
    return "\n\n".join([
        "## Coefficient-only ingest",
        "`rafdata ingest TRACK -o store.h5 --no-images` over generated tracking trees in the "
        "upstream formats (no video anywhere).",
        table(["tracking format", "participants", "sequences", "files", "timesteps",
               "seconds", "timesteps/s"], rows),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
