"""Cross-driving: a subject's avatar driven by other identities' held-out sequences, with
side-by-side videos, a frame grid, and (synthetic stores) ground-truth renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rafdata.errors import RafDataError
from rafdata.progress import Progress
from rafdata.store import Store
from rafmodel.evaluate.config import FRONTAL_SERIAL, EvalConfig
from rafmodel.evaluate.frames import DamagedImages, cameras_of, image_lookup, target_frame
from rafmodel.evaluate.ground_truth import SynthGroundTruth
from rafmodel.evaluate.media import Mp4Writer, compose_row, safe_name
from rafmodel.evaluate.metrics import (
    Readout,
    average,
    frame_metrics,
    mean_finite,
    pick_frames,
    readback,
    readout_metrics,
    tracked_metrics,
    with_table_metrics,
)
from rafmodel.evaluate.runs import RunInfo, render_avatar
from rafmodel.targets import render_K


def _cross_camera(store: Store, identity: int, cameras: tuple[str, ...] | None) -> int:
    cams = cameras_of(store, identity)
    by_serial = {store.cameras.serial[c]: c for c in cams}
    if not cams:
        raise RafDataError(store.path, f"identity {store.identities[identity]} has no cameras")
    if cameras:
        if cameras[0] not in by_serial:
            raise RafDataError(store.path, f"subject {store.identities[identity]} has no camera "
                               f"{cameras[0]} (has: {', '.join(sorted(by_serial))})")
        return by_serial[cameras[0]]
    return by_serial.get(FRONTAL_SERIAL, cams[0])


def driver_identities(store: Store) -> list[int]:
    """Identities with held-out images in the store (the default cross-driving drivers, and
    what ``rafdata coverage --drivers images`` restricts Table 1 to): on a paper-scale store,
    the few with frames, not the hundreds with coefficients only."""
    from rafdata.coverage import identities_with_held_out_images

    return identities_with_held_out_images(store)


def subject_pose(store: Store, identity: int) -> tuple[np.ndarray, float]:
    """The subject's mean translation (3,) and median scale over all its timesteps: the
    cross-driving pose rule keeps the driver's rotation and uses these."""
    rows = store.timestep_rows(identity=identity)
    ts = store.timesteps
    return ts.pose[rows, 3:].astype(np.float64).mean(0), float(np.median(ts.scale[rows]))


def evaluate_cross(runs: list[RunInfo], store: Store, cfg: EvalConfig, out: Path, lpips,
                   regressor, emotion, synth: SynthGroundTruth | None, progress: Progress,
                   reader: DamagedImages | None = None, tracked: bool = False
                   ) -> tuple[dict[str, dict], list[str], list[str], list[str]]:
    """Cross-driving of the runs of one subject; per-run results, videos, grids, notes.

    reader: reads the drivers' real frames (the video's first panel and emotion similarity)
    and counts damaged ones (None: a fresh reader following ``cfg.skip_corrupt``); a skipped
    frame shows as a grey panel and has no AED / APD / emotion similarity. Those read the
    driver's real frame (at the store's resolution, its matte as the extractors' face crop) and
    the render (its alpha as matte when the driver frame has one) with the same extractors.
    tracked: the regressor predicts the store's space, so its read-out of the render is also
    compared with the coefficients that drove it (``regressor_tracked_*``). With a synthetic
    ground truth, ``psnr`` / ``ssim`` / ``lpips`` are the ``gt_*`` values (the render against
    what the subject would look like); without one they are null.
    """
    reader = reader if reader is not None else DamagedImages(cfg.skip_corrupt)
    subject = runs[0].subject
    ident = store.identity_index(subject)
    cam = _cross_camera(store, ident, cfg.cameras)
    serial = store.cameras.serial[cam]
    t_mean, scale = subject_pose(store, ident)
    w2c = torch.from_numpy(store.cameras.world_to_cam[cam].astype(np.float32))
    notes: list[str] = []

    held = store.sequences.held_out.astype(bool)
    with_held = sorted({int(store.sequences.identity[s]) for s in np.flatnonzero(held)})
    with_images = driver_identities(store)
    if cfg.drivers:
        drivers = [store.identity_index(d) for d in cfg.drivers]
        bad = [store.identities[d] for d in drivers if d not in with_held]
        if bad:
            raise RafDataError(store.path, f"driver(s) {', '.join(bad)} have no held-out "
                               "sequence in the store")
        blind = [store.identities[d] for d in drivers if d not in with_images]
        if blind:
            notes.append(f"driver(s) {', '.join(blind)} have no held-out images in the store: "
                         "no driver frames, so no AED / APD / emotion similarity for them")
            progress.warn(notes[-1])
    else:
        drivers = [d for d in with_images if d != ident]
    if not drivers:
        notes.append(f"subject {subject}: no other identity has held-out images: no "
                     "cross-driving")
        progress.warn(notes[-1])
    gt_ok = synth is not None and synth.has(subject)
    if synth is not None and not gt_ok:
        notes.append(f"subject {subject} is not in the synthetic manifest: no ground truth")
    # Ground truth uses the generator's noise-free coefficients of the driver's video frames
    # (what the driver really did; what self-driving's real frames show). The tracked ones
    # the avatar receives differ by the synth's tracker noise, reported when comparable
    # (the store holds the generator's own 64-dim space, not FLAME).
    stored_is_gen = store.exp_dim == 64 and str(store.exp_space).startswith("bfm")

    per_run: dict[str, dict[str, dict]] = {r.label: {} for r in runs}
    videos, grids = [], []
    grid_rows: list[np.ndarray] = []
    for d in drivers:
        dname = store.identities[d]
        steps = store.timestep_rows(identity=d, held_out=True)
        steps = steps[pick_frames(len(steps), cfg.frames)]
        images = image_lookup(store, d)
        dcams = {store.cameras.serial[c]: c for c in cameras_of(store, d)}
        dcam = dcams.get(serial, next(iter(dcams.values()), None))
        ts = store.timesteps
        rows: dict[str, list[dict[str, float]]] = {r.label: [] for r in runs}
        renders: dict[str, list[Tensor]] = {r.label: [] for r in runs}
        gts: dict[str, list[tuple[Tensor, Tensor]]] = {r.label: [] for r in runs}
        coeffs = []
        noise: list[float] = []
        gt_coeffs: list[tuple[np.ndarray, np.ndarray]] = []
        true_cache: dict[str, dict] = {}
        writer = Mp4Writer(out / "videos" / f"{safe_name(subject)}_by_{safe_name(dname)}.mp4")
        labels = [f"driver {dname}"] + (["ground truth"] if gt_ok else []) + \
                 [r.label for r in runs]
        chosen = set(pick_frames(len(steps), cfg.grid_frames).tolist())
        progress.start(f"cross-driving {subject} by {dname}", len(steps))
        try:
            for i, t in enumerate(steps):
                t = int(t)
                exp = ts.exp[t].astype(np.float32)
                pose = np.concatenate([ts.pose[t, :3].astype(np.float64), t_mean])
                coeffs.append((exp, pose))
                row = images.get((t, dcam)) if dcam is not None else None
                drv = None
                drv_read = None
                s = reader.read(store, row) if row is not None else None
                if s is not None and (regressor is not None or emotion is not None):
                    real = torch.from_numpy(s.rgb).permute(2, 0, 1).float() / 255.0
                    real_m = None if s.mask is None else \
                        torch.from_numpy(s.mask)[None].float() / 255.0
                    drv_read = Readout.of(regressor, emotion, real, real_m)
                if s is not None:
                    # The driver panel shows the real frame with its own background, unmatted.
                    drv = target_frame(s.rgb, None, runs[0].width, runs[0].height,
                                       runs[0].background)[0]
                gt = None
                if gt_ok:
                    assert synth is not None
                    seq = store.sequences.name[int(ts.sequence[t])]
                    if seq not in true_cache:
                        true_cache[seq] = synth.true_coefficients(dname, seq)
                    true, f = true_cache[seq], int(ts.frame[t])
                    gexp = true["exp"][f]
                    gpose = np.concatenate([true["pose"][f, :3], t_mean])
                    gt_coeffs.append((gexp.astype(np.float32), gpose.astype(np.float32)))
                    if stored_is_gen:
                        noise.append(float(np.abs(exp - gexp).mean()))
                    # One ground truth per render size and background among the runs.
                    frame_gt: dict[tuple, tuple[Tensor, Tensor]] = {}
                    for r in runs:
                        key = (r.width, r.height, tuple(r.background.tolist()))
                        if key not in frame_gt:
                            Kr = render_K(store.cameras.K[cam], store.image_size, r.width,
                                          r.height)
                            frame_gt[key] = synth.render(subject, gexp, gpose, scale,
                                                         Kr.numpy(),
                                                         store.cameras.world_to_cam[cam],
                                                         r.width, r.height, r.background)
                        gts[r.label].append(frame_gt[key])
                    gt = gts[runs[0].label][-1][0]
                panels: list[Tensor | None] = [drv] + ([gt] if gt_ok else [])
                for r in runs:
                    K = render_K(store.cameras.K[cam], store.image_size, r.width, r.height)
                    pred, alpha = render_avatar(r, torch.from_numpy(exp),
                                                torch.from_numpy(pose.astype(np.float32)),
                                                torch.tensor(scale), K, w2c, cfg.backend)
                    renders[r.label].append(pred)
                    panels.append(pred)
                    m: dict[str, float] = {}
                    if gt_ok:
                        g_img, g_alpha = gts[r.label][-1]
                        fm = frame_metrics(pred[None], g_img[None], g_alpha[None], lpips)
                        m.update({f"gt_{k}": float(v[0]) for k, v in fm.items()})
                        m.update({k: m[f"gt_{k}"] for k in ("psnr", "ssim", "lpips")
                                  if f"gt_{k}" in m})
                    if drv_read is not None:
                        ren = Readout.of(regressor, emotion, pred,
                                         alpha if s is not None and s.mask is not None else None)
                        m.update(readout_metrics(drv_read, ren))
                        if tracked:
                            m.update(tracked_metrics(ren, exp, pose))
                    rows[r.label].append(m)
                if cfg.videos:
                    frame = compose_row(panels, labels, runs[0].width, runs[0].height)
                    writer.write(frame)
                    if i in chosen:
                        grid_rows.append(compose_row(
                            panels, [f"{lab} t{int(ts.frame[t])}" if j == 0 else lab
                                     for j, lab in enumerate(labels)],
                            runs[0].width, runs[0].height))
                progress.advance()
        finally:
            writer.close()
        if writer.frames:
            videos.append(str(writer.path))

        for r in runs:
            frames = rows[r.label]
            if gts[r.label]:
                readback(renders[r.label], [g for g, _ in gts[r.label]],
                          torch.from_numpy(np.stack([c[0] for c in gt_coeffs])),
                          torch.from_numpy(np.stack([c[1] for c in gt_coeffs])), frames)
            entry = {"frames": len(frames), **average(frames)}
            if noise:
                entry["driver_noise_exp_l1"] = mean_finite(noise)
            per_run[r.label][dname] = entry

    if grid_rows:
        width = max(g.shape[1] for g in grid_rows)
        grid = np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0)))
                               for g in grid_rows], axis=0)
        path = out / f"grid_{safe_name(subject)}.png"
        Image.fromarray(grid).save(path)
        grids.append(str(path))

    result = {}
    for r in runs:
        by_driver = per_run[r.label]
        mean = average([{k: v for k, v in e.items() if k != "frames"}
                         for e in by_driver.values()])
        result[r.label] = {"camera": serial, "drivers": by_driver,
                           "mean": with_table_metrics(mean),
                           "ground_truth": gt_ok,
                           "pose": "driver rotation, subject mean translation and median scale"}
    return result, videos, grids, notes
