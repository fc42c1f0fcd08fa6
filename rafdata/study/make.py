"""`study make`: plan the items, write faces, pages, key and manifest into a new folder.

Everything is written to ``OUT.tmp-PID`` and renamed at the end, so a failure (a missing
video, a bad bank) leaves no half-made study behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rafdata.config import StudyConfig
from rafdata.progress import NullProgress, Progress
from rafdata.study.keyfile import StudyError, write_key, write_manifest
from rafdata.study.pages import write_faces, write_pages
from rafdata.study.sampling import plan_study


def make_study(store: str | Path, out: str | Path, cfg: StudyConfig | None = None,
               progress: Progress | None = None) -> dict:
    """Make study folder ``out`` from ``store``; returns the manifest.

    ``progress`` sees one stage, "faces", of one step per face image written (the slow part:
    frames the store has no image of are decoded from the source videos).
    """
    cfg = cfg or StudyConfig()
    progress = progress or NullProgress()
    out = Path(out)
    cfg.validate(store)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudyError(out, "exists and is not empty: choose a new folder for the study")
    plan = plan_study(store, cfg.queries, bank=cfg.bank, small_bank=cfg.small_bank,
                      catch=cfg.catch, seed=cfg.seed)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        faces = write_faces(store, plan.timesteps, tmp, size=cfg.size,
                            source=None if cfg.source is None else Path(cfg.source),
                            progress=progress)
        write_pages(tmp, plan.rows, faces, cfg.url_prefix)
        write_key(tmp, plan.batch, plan.rows)
        manifest = {
            "batch": plan.batch, "store": str(Path(store).resolve()), "bank": cfg.bank,
            "small_bank": cfg.small_bank, "seed": cfg.seed,
            "queries": len({r.query for r in plan.rows}),
            "catch": sum(r.comparison == "catch" for r in plan.rows), "size": cfg.size,
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
