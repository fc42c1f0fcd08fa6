"""Identities, expression styles, head motion and the tracker outputs derived from them.

Expression styles (what the coverage analysis later measures):

- There are K = len(participants) global expression *prototypes* (64-dim vectors drawn from
  the seed). Participant i (position in the config) owns prototype i.
- Training sequences (every sequence but FREE) of participant i stay close to its prototype:
  prototype + a small personal offset + smooth variation with std 0.15 over 3 semantic dims
  (chosen per sequence) and 0.03 over all dims. A narrow, identity-specific style.
- FREE of every participant visits all K prototypes in turn (random order) with smooth
  variation of std 0.3 in every dim: a much wider distribution, and one that the other
  identities' training styles cover, which is the point of retrieval augmentation.

Tracker noise: written coefficients = true + N(0, noise^2) on expression and rotation
(radians), N(0, (0.1 noise)^2) metres on translation; scale is exact and constant per
participant (FLAME tracking stores one scale per sequence). Videos use the true values.
"""

from __future__ import annotations

import numpy as np

from rafdata.rotations import matrix_to_euler_xyz_intrinsic
from rafdata.synth.config import (
    EXP_DIM,
    FLAME_EXP_DIM,
    FLAME_SHAPE_DIM,
    HELD_OUT_SEQUENCE,
    ID_DIM,
    SynthConfig,
    rng_for,
)
from rafdata.synth.geometry import rodrigues
from rafdata.synth.head import N_SEMANTIC

HEAD_SCALE = 0.1  # metres per canonical unit (head radius ~10 cm)
TRAIN_ACTIVE_STD = 0.15  # std of a training sequence's few active dims
TRAIN_BASE_STD = 0.03  # std of every dim within a training sequence
FREE_STD = 0.3  # std of every dim around the current prototype in FREE
_FLAME_SEED = 100_064  # fixed: the BFM -> FLAME expression map is the same for every dataset


def identity_coeff(seed: int, participant: str) -> np.ndarray:
    """The participant's BFM identity coefficients (80,) float32: a per-identity constant."""
    return rng_for(seed, "identity", participant).standard_normal(ID_DIM).astype(np.float32)


def identity_scale(id_coeff: np.ndarray) -> float:
    """Metres per canonical unit for this identity (~0.1; constant over all its sequences)."""
    return float(np.float32(HEAD_SCALE * (1.0 + 0.04 * np.tanh(float(id_coeff[-1])))))


def prototypes(cfg: SynthConfig) -> np.ndarray:
    """The K global expression prototypes (K, 64), K = len(cfg.participants).

    Semantic dims are drawn wider (and biased towards an open mouth) than the small-effect dims.
    """
    rng = rng_for(cfg.seed, "prototypes")
    k = len(cfg.participants)
    p = rng.normal(0.0, 0.4, (k, EXP_DIM))
    p[:, :N_SEMANTIC] = rng.normal(0.2, 0.7, (k, N_SEMANTIC))
    return p


def smooth_noise(rng: np.random.Generator, n: int, dims: int, sigma: float) -> np.ndarray:
    """(n, dims) Gaussian noise smoothed over time (Gaussian kernel, ``sigma`` frames).

    Normalised so every sample keeps unit marginal variance, whatever ``sigma``.
    """
    if sigma <= 0:
        return rng.standard_normal((n, dims))
    half = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    k /= np.sqrt((k * k).sum())
    white = rng.standard_normal((n + 2 * half, dims))
    out = np.zeros((n, dims))
    for i, w in enumerate(k):  # a short FIR filter; taps, not pixels
        out += w * white[i : i + n]
    return out


def true_coefficients(cfg: SynthConfig, participant: str, sequence: str) -> dict:
    """Noise-free coefficients of every VIDEO frame of one sequence (what the videos show).

    Returns exp (N, 64) float64, pose (N, 6) float64 (axis-angle rad, translation m), scale
    (float, metres per canonical unit), N = cfg.video_frames. Deterministic in (cfg.seed,
    participant, sequence, participant's position, number of participants, video frames).
    """
    n = cfg.video_frames
    i = cfg.participants.index(participant)
    protos = prototypes(cfg)
    rng = rng_for(cfg.seed, "trajectory", participant, sequence)
    sigma = 2.0 * cfg.frame_step  # smooth over ~2 tracked frames
    if sequence == HELD_OUT_SEQUENCE:
        order = rng.permutation(len(protos))
        seg = np.minimum(np.arange(n) * len(protos) // n, len(protos) - 1)
        mean = protos[order[seg]]
        exp = mean + FREE_STD * smooth_noise(rng, n, EXP_DIM, sigma)
    else:
        offset = rng_for(cfg.seed, "style", participant).normal(0.0, 0.05, EXP_DIM)
        active = rng.choice(N_SEMANTIC, size=3, replace=False)
        exp = protos[i] + offset + TRAIN_BASE_STD * smooth_noise(rng, n, EXP_DIM, sigma)
        exp[:, active] += TRAIN_ACTIVE_STD * smooth_noise(rng, n, 3, sigma)
    # Head motion: small smooth rotations (more yaw in head-movement sequences) and a few cm.
    rot_amp = np.array([0.06, 0.2 if "head" in sequence.lower() else 0.1, 0.04])
    pose = np.zeros((n, 6))
    pose[:, :3] = rot_amp * smooth_noise(rng, n, 3, 2 * sigma)
    pose[:, 3:] = np.array([0.01, 0.01, 0.015]) * smooth_noise(rng, n, 3, 2 * sigma)
    scale = identity_scale(identity_coeff(cfg.seed, participant))
    return {"exp": exp, "pose": pose, "scale": scale}


def tracked_coefficients(cfg: SynthConfig, participant: str, sequence: str) -> dict:
    """What the tracker writes: every ``frame_step``-th video frame, with tracker noise.

    Returns frames (T,) int64 video frame indices, exp (T, 64) float32, pose (T, 6) float32,
    scale (T,) float32 (constant), id_coeff (80,) float32; T = cfg.frames.
    """
    true = true_coefficients(cfg, participant, sequence)
    frames = np.arange(cfg.frames, dtype=np.int64) * cfg.frame_step
    rng = rng_for(cfg.seed, "tracker-noise", participant, sequence)
    exp = true["exp"][frames] + rng.normal(0.0, cfg.noise, (len(frames), EXP_DIM))
    pose = true["pose"][frames].copy()
    pose[:, :3] += rng.normal(0.0, cfg.noise, (len(frames), 3))
    pose[:, 3:] += rng.normal(0.0, 0.1 * cfg.noise, (len(frames), 3))
    return {
        "frames": frames,
        "exp": exp.astype(np.float32),
        "pose": pose.astype(np.float32),
        "scale": np.full(len(frames), true["scale"], dtype=np.float32),
        "id_coeff": identity_coeff(cfg.seed, participant),
    }


def flame_from_exp_matrix() -> np.ndarray:
    """The fixed map F (100, 64) from BFM-like expressions to FLAME ``expression`` vectors.

    Orthonormal columns (F.T @ F = I), so ``expression = e @ F.T`` keeps Euclidean distances
    (coverage metrics agree in both spaces) and ``e = expression @ F`` recovers e exactly.
    """
    rng = np.random.default_rng(_FLAME_SEED)
    q, r = np.linalg.qr(rng.standard_normal((FLAME_EXP_DIM, EXP_DIM)))
    return q * np.sign(np.diag(r))[None, :]  # sign-fixed: unique whatever the LAPACK


def flame_tracking(tracked: dict) -> dict:
    """NeRSemble-benchmark FLAME tracking arrays (all float32 but ``frames``) of one sequence.

    expression (T, 100) = exp @ F.T (:func:`flame_from_exp_matrix`); rotation_matrices =
    R(pose[:, :3]) and rotation = the same rotations as intrinsic XYZ Euler angles (the
    NeRSemble toolkit's convention), translation = pose[:, 3:]; scale (1, 1); jaw (T, 3) =
    [0.2 * max(exp[:, 0], 0), 0, 0] radians (the mouth-open dim as a jaw pitch); eyes (T, 6) =
    the gaze dim as yaw of both eyes, [0, 0.2 g, 0, 0, 0.2 g, 0]; neck zeros; shape (1, 300) =
    id_coeff zero-padded. frames (T,) int64 video frame indices.
    """
    exp = np.asarray(tracked["exp"], dtype=np.float64)
    pose = np.asarray(tracked["pose"], dtype=np.float64)
    t = len(exp)
    jaw = np.zeros((t, 3))
    jaw[:, 0] = 0.2 * np.maximum(exp[:, 0], 0.0)
    eyes = np.zeros((t, 6))
    eyes[:, 1] = eyes[:, 4] = 0.2 * exp[:, 9]
    rot = np.stack([rodrigues(r) for r in pose[:, :3]]).reshape(t, 3, 3)
    shape = np.zeros((1, FLAME_SHAPE_DIM))
    shape[0, :ID_DIM] = tracked["id_coeff"]
    f32 = np.float32
    return {
        "expression": (exp @ flame_from_exp_matrix().T).astype(f32),
        "rotation": matrix_to_euler_xyz_intrinsic(rot).astype(f32),
        "translation": pose[:, 3:].astype(f32),
        "rotation_matrices": rot.astype(f32),
        "frames": np.asarray(tracked["frames"], dtype=np.int64),
        "scale": np.array([[tracked["scale"][0]]], dtype=f32),
        "jaw": jaw.astype(f32),
        "neck": np.zeros((t, 3), dtype=f32),
        "eyes": eyes.astype(f32),
        "shape": shape.astype(f32),
    }


def bfm_params(tracked: dict, row: int) -> dict:
    """Multiview-3DMM-Fitting ``params.npz`` arrays of one tracked frame.

    id_coeff (1, 80), exp_coeff (1, 64), scale (1,), pose (1, 6), all float32.
    """
    return {
        "id_coeff": np.asarray(tracked["id_coeff"], dtype=np.float32).reshape(1, ID_DIM),
        "exp_coeff": tracked["exp"][row : row + 1].astype(np.float32),
        "scale": tracked["scale"][row : row + 1].astype(np.float32),
        "pose": tracked["pose"][row : row + 1].astype(np.float32),
    }
