"""`study make`: plan the items, write faces, pages, key and manifest into a new folder.

Everything is written to ``OUT.tmp-PID`` and renamed at the end, so a failure (a missing
video, a bad bank) leaves no half-made study behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rafdata.study.keyfile import StudyError, write_key, write_manifest
from rafdata.study.pages import write_faces, write_pages
from rafdata.study.sampling import plan_study


def make_study(store: str | Path, out: str | Path, *, queries: int, bank: str = "full",
               small_bank: str | None = None, catch: int = 0, seed: int = 0,
               source: str | Path | None = None, size: int = 256,
               url_prefix: str = "") -> dict:
    """Make study folder ``out`` from ``store``; returns the manifest."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudyError(out, "exists and is not empty: choose a new folder for the study")
    plan = plan_study(store, queries, bank=bank, small_bank=small_bank, catch=catch, seed=seed)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        faces = write_faces(store, plan.timesteps, tmp, size=size,
                            source=None if source is None else Path(source))
        write_pages(tmp, plan.rows, faces, url_prefix)
        write_key(tmp, plan.batch, plan.rows)
        manifest = {
            "batch": plan.batch, "store": str(Path(store).resolve()), "bank": bank,
            "small_bank": small_bank, "seed": seed, "queries": len({r.query for r in plan.rows}),
            "catch": sum(r.comparison == "catch" for r in plan.rows), "size": size,
            "items": [r.item for r in plan.rows],
        }
        write_manifest(tmp, manifest)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
