"""Per-frame image metrics, averaging, frame picking, and the extractor metrics of self- and
cross-driving (AED, APD, emotion similarity: driver frame and render read by the same
extractors), the tracked-coefficient extra and the synthetic read-back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rafmodel.evaluate.config import PSNR_CAP
from rafmodel.losses import psnr, ssim


def frame_metrics(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    lpips: torch.nn.Module | None = None,
) -> dict[str, Tensor]:
    """Image metrics of a batch, each (B,) float on the CPU.

    pred, target: (B, 3, H, W) in [0, 1]. mask: (B, 1, H, W) weights in [0, 1] (the head) or
    None. Returns ``psnr`` and ``ssim`` (masked when a mask is given, else full frame),
    ``psnr_full``, ``ssim_full`` (always full frame) and ``lpips`` (full frame) when an LPIPS
    module is given. PSNR is in dB, capped at :data:`PSNR_CAP` (identical images give exactly
    the cap rather than +inf); SSIM of identical images is 1; LPIPS of identical images is 0.
    A mask with no weight gives NaN for that frame (skipped in averages).
    """
    pred = pred.clamp(0, 1)
    out = {
        "psnr_full": psnr(pred, target, cap=PSNR_CAP),
        "ssim_full": ssim(pred, target),
    }
    if mask is not None:
        out["psnr"] = psnr(pred, target, mask=mask, cap=PSNR_CAP)
        out["ssim"] = ssim(pred, target, mask=mask)
    else:
        out["psnr"], out["ssim"] = out["psnr_full"], out["ssim_full"]
    if lpips is not None:
        with torch.no_grad():
            out["lpips"] = lpips(pred, target)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def mean_finite(values: Sequence[float]) -> float | None:
    """Mean of the finite values; None when there are none (JSON null)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def average(rows: list[dict[str, float]]) -> dict[str, float | None]:
    """Key-wise mean over frames (or drivers); keys present in any row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: mean_finite([r.get(k) for r in rows]) for k in keys}


def pick_frames(n: int, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` of ``n`` items, evenly spaced, first and last included."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, int(limit)).round().astype(np.int64))


# The names every metrics.json section's ``mean`` carries (null when not computed), for
# `rafmodel compare` and the sweep statistics.
TABLE_METRICS = ("psnr", "ssim", "lpips", "aed", "apd_rot", "apd_trans", "emotion_sim")


def with_table_metrics(mean: dict[str, float | None]) -> dict[str, float | None]:
    """``mean`` with every :data:`TABLE_METRICS` key present (None where not computed)."""
    return {**{k: None for k in TABLE_METRICS}, **mean}


class Readout:
    """What the extractors read from one image: the regressor's expression and pose, the
    emotion extractor's features (each None when that extractor is not used).

    ``Readout.of(regressor, emotion, image, mask)``: image (3,H,W) float [0,1], mask (1,H,W)
    or None (a matte: the regressor and the built-in emotion extractor crop the face with it).
    """

    def __init__(self, exp: Tensor | None, pose: Tensor | None, feat: Tensor | None):
        self.exp, self.pose, self.feat = exp, pose, feat

    @classmethod
    def of(cls, regressor, emotion, image: Tensor, mask: Tensor | None) -> Readout:
        from rafmodel.regressor import extract_features, regress

        x = image[None].float()
        m = None if mask is None else mask[None].float()
        exp = pose = feat = None
        if regressor is not None:
            e, p = regress(regressor, x, m)
            exp, pose = e[0], p[0]
        if emotion is not None:
            feat = extract_features(emotion, x, m)[0]
        return cls(exp, pose, feat)


def readout_metrics(driver: Readout, render: Readout) -> dict[str, float]:
    """AED / APD / emotion similarity of a render against its driver frame, both read by the
    same extractors: ``aed`` mean |exp_driver - exp_render| over the regressor's expression
    dims, ``apd_rot`` over the 3 rotation dims (axis-angle, rad), ``apd_trans`` over the 3
    translation dims, ``emotion_sim`` the cosine similarity of the emotion features."""
    out: dict[str, float] = {}
    if driver.exp is not None and render.exp is not None:
        out["aed"] = float((driver.exp - render.exp).abs().mean())
        d = (driver.pose - render.pose).abs()
        out["apd_rot"] = float(d[:3].mean())
        out["apd_trans"] = float(d[3:].mean())
    if driver.feat is not None and render.feat is not None:
        out["emotion_sim"] = float(F.cosine_similarity(driver.feat[None], render.feat[None])[0])
    return out


def tracked_metrics(render: Readout, exp: np.ndarray | Tensor,
                    pose: np.ndarray | Tensor) -> dict[str, float]:
    """The extra column (not AED): the regressor's read-out of the render against the stored
    (tracked) coefficients that drove it, L1 per dimension; only for a regressor of the store's
    expression space. ``regressor_tracked_exp_l1`` and ``regressor_tracked_rot_l1``."""
    if render.exp is None:
        return {}
    e = torch.as_tensor(np.asarray(exp, np.float32))
    p = torch.as_tensor(np.asarray(pose, np.float32))
    return {"regressor_tracked_exp_l1": float((render.exp - e).abs().mean()),
            "regressor_tracked_rot_l1": float((render.pose[:3] - p[:3]).abs().mean())}


def readback(renders: list[Tensor], gts: list[Tensor], exp_d: Tensor, pose_d: Tensor,
              rows: list[dict[str, float]]) -> None:
    """Adds readback_exp_l1 / readback_pose_l1 / readback_hit per frame (see the package
    docstring)."""
    g = torch.stack(gts).flatten(1)  # (N, 3hw)
    for i, pred in enumerate(renders):
        j = int((g - pred.flatten()[None]).abs().mean(1).argmin())
        rows[i].update(readback_exp_l1=float((exp_d[j] - exp_d[i]).abs().mean()),
                       readback_pose_l1=float((pose_d[j] - pose_d[i]).abs().mean()),
                       readback_hit=float(j == i))
