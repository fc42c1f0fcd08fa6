"""Per-frame image metrics, averaging, frame picking, and the coefficient / emotion metrics
of cross-driving (AED, APD, emotion similarity, the synthetic read-back)."""

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


def regressor_metrics(regressor, renders: list[Tensor], alphas: list[Tensor], exp_d: Tensor,
                       pose_d: Tensor, rows: list[dict[str, float]]) -> None:
    """Adds aed, apd, apd_rot per frame (mean L1 per dimension) to ``rows``.

    The render's alpha is the matte a regressor that crops to the face may use
    (``rafmodel.regressor.regress`` passes it only to regressors that accept masks).
    """
    from rafmodel.regressor import regress

    exp_p, pose_p = regress(regressor, torch.stack(renders), torch.stack(alphas))
    e = (exp_p - exp_d).abs().mean(1)
    p = (pose_p - pose_d).abs()
    for j in range(e.shape[0]):
        rows[j].update(aed=float(e[j]), apd=float(p[j].mean()), apd_rot=float(p[j, :3].mean()))


def emotion_metrics(extractor, renders: list[Tensor], drivers: list[Tensor | None],
                     rows: list[dict[str, float]]) -> None:
    """Adds emotion_sim (cosine similarity of features) where the driver frame exists."""
    pairs = [(i, d) for i, d in enumerate(drivers) if d is not None]
    if not pairs:
        return
    a = torch.stack([renders[i] for i, _ in pairs])
    b = torch.stack([d for _, d in pairs])
    from rafmodel.regressor import extract_features

    fr, fd = extract_features(extractor, a), extract_features(extractor, b)
    sim = F.cosine_similarity(fr, fd, dim=1)
    for (i, _), s in zip(pairs, sim, strict=True):
        rows[i]["emotion_sim"] = float(s)


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
