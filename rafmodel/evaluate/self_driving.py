"""Self-driving: a run's subject rendered from its own held-out coefficients into the stored
cameras and compared with the real frames (PSNR, SSIM, LPIPS), and both read by the same
extractors (AED, APD, emotion similarity)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rafdata.progress import Progress
from rafdata.store import Store
from rafmodel.evaluate.config import EvalConfig
from rafmodel.evaluate.frames import DamagedImages, target_frame
from rafmodel.evaluate.metrics import (
    Readout,
    average,
    frame_metrics,
    pick_frames,
    readout_metrics,
    tracked_metrics,
    with_table_metrics,
)
from rafmodel.evaluate.runs import RunInfo, render_avatar
from rafmodel.targets import render_K


def evaluate_self(run: RunInfo, store: Store, cfg: EvalConfig, lpips, progress: Progress,
                  reader: DamagedImages | None = None, regressor=None, emotion=None,
                  tracked: bool = False) -> dict[str, Any]:
    """Self-driving metrics of one run on its subject's held-out frames (see the package doc).

    regressor, emotion: extractors reading both the real frame and the render of the same
    timestep and camera (AED, APD, emotion similarity; the render's alpha is their matte when
    the real frame has one, so both are framed alike). tracked: the regressor predicts the
    store's space, so its read-out of the render is also compared with the tracked
    coefficients (``regressor_tracked_*``).

    reader: reads the frames and counts damaged ones (None: a fresh reader following
    ``cfg.skip_corrupt``); frames it skips are not scored (``skipped_corrupt`` in the result).
    """
    reader = reader if reader is not None else DamagedImages(cfg.skip_corrupt)
    ident = store.identity_index(run.subject)
    serials = list(cfg.cameras) if cfg.cameras else None
    rows = store.image_rows(identity=ident, held_out=True, serials=serials)
    if len(rows) == 0:
        progress.warn(f"{run.label}: subject {run.subject} has no held-out images in the store: "
                      "no self-driving metrics")
        return {"frames": 0, "note": "no held-out images of the subject in the store",
                "mean": with_table_metrics({})}
    steps = np.unique(store.image_timestep[rows])
    keep = set(steps[pick_frames(len(steps), cfg.frames)].tolist())
    rows = [int(r) for r in rows if int(store.image_timestep[r]) in keep]
    per_cam: dict[str, list[dict[str, float]]] = {}
    masked = []
    skipped = 0
    progress.start(f"self-driving {run.label}", len(rows))
    for r in rows:
        s = reader.read(store, r)
        if s is None:  # damaged, and skip_corrupt
            skipped += 1
            progress.advance()
            continue
        target, mask = target_frame(s.rgb, s.mask, run.width, run.height, run.background)
        K = render_K(s.K, store.image_size, run.width, run.height)
        pred, alpha = render_avatar(run, torch.from_numpy(np.asarray(s.exp, np.float32)),
                                torch.from_numpy(np.asarray(s.pose, np.float32)),
                                torch.tensor(s.scale), K,
                                torch.from_numpy(np.asarray(s.world_to_cam, np.float32)),
                                cfg.backend)
        m = frame_metrics(pred[None], target[None], None if mask is None else mask[None], lpips)
        row = {k: float(v[0]) for k, v in m.items()}
        if regressor is not None or emotion is not None:
            real = torch.from_numpy(s.rgb).permute(2, 0, 1).float() / 255.0
            real_m = None if s.mask is None else torch.from_numpy(s.mask)[None].float() / 255.0
            drv = Readout.of(regressor, emotion, real, real_m)
            ren = Readout.of(regressor, emotion, pred, None if real_m is None else alpha)
            row.update(readout_metrics(drv, ren))
            if tracked:
                row.update(tracked_metrics(ren, s.exp, s.pose))
        per_cam.setdefault(s.serial, []).append(row)
        masked.append(mask is not None)
        progress.advance()
    all_rows = [x for v in per_cam.values() for x in v]
    return {
        "frames": len(all_rows),
        "timesteps": len(keep),
        "masked": "all" if all(masked) else ("none" if not any(masked) else "some"),
        "skipped_corrupt": skipped,
        "cameras": {k: {**average(v), "frames": len(v)} for k, v in per_cam.items()},
        "mean": with_table_metrics(average(all_rows)),
    }
