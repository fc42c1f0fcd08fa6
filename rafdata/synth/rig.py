"""The capture rig: camera intrinsics and extrinsics, backgrounds and colour calibrations."""

from __future__ import annotations

import numpy as np

from rafdata.synth.config import rng_for
from rafdata.synth.geometry import look_at

# (yaw, pitch) in degrees of the i-th camera of a config, frontal first, then alternating
# sides so that any prefix spreads over the front hemisphere (~ +-60 deg yaw, some pitch).
CAMERA_ANGLES = (
    (0, 0), (-50, 5), (50, 5), (-25, -8), (25, -8), (-60, -4), (60, -4), (-12, 12),
    (12, 12), (-38, 14), (38, 14), (0, -14), (-30, 18), (30, 18), (0, 20), (-45, -15),
)  # fmt: skip
CAMERA_DISTANCE = 1.0  # metres from the world origin (the head centre)
FOCAL_PER_HEIGHT = 2.9  # focal length / image height: a ~0.21 m head fills ~60% of the height


def camera_angles(index: int) -> tuple[float, float]:
    """(yaw, pitch) degrees of the camera at ``index`` in the config's camera list."""
    if index < len(CAMERA_ANGLES):
        return CAMERA_ANGLES[index]
    # Beyond the table: a golden-angle spiral over the same region, still deterministic.
    g = (index * 0.6180339887) % 1.0
    return (-60.0 + 120.0 * g, -15.0 + 30.0 * ((index * 0.7548776662) % 1.0))


def intrinsics(width: int, height: int) -> np.ndarray:
    """Shared K (3, 3) float64 in pixels; principal point at the image centre, OpenCV centres."""
    f = FOCAL_PER_HEIGHT * height
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def camera_rig(cameras: tuple[str, ...], width: int, height: int) -> tuple[np.ndarray, dict]:
    """(K (3, 3), {serial: world_to_cam (4, 4)}) of the rig, all cameras looking at the origin.

    World axes: y up, the head looks along +z, x to the subject's left (image right in the
    frontal camera). Distances vary by +-3% so the cameras are not all on one sphere.
    """
    w2c = {}
    for i, serial in enumerate(cameras):
        yaw, pitch = np.deg2rad(camera_angles(i))
        dist = CAMERA_DISTANCE * (1.0 + 0.03 * ((i % 3) - 1))
        eye = dist * np.array(
            [np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)]
        )
        w2c[serial] = look_at(eye, np.zeros(3))
    return intrinsics(width, height), w2c


def color_calibration(seed: int, participant: str, serial: str) -> np.ndarray:
    """A near-identity colour-correction matrix (3, 3), the 3-term form of NeRSemble's
    color_calibration.json (applied to linear RGB, see :func:`rafdata.geometry.color_correct`).

    The synthetic videos are rendered in already-corrected colours (C is not applied
    inversely), so applying C changes colours by only ~1-2%.
    """
    rng = rng_for(seed, "color", participant, serial)
    return np.eye(3) + rng.normal(0.0, 0.01, (3, 3))


def background_image(
    seed: int, participant: str, serial: str, width: int, height: int
) -> np.ndarray:
    """The empty backdrop of one camera, uint8 (H, W, 3): a light, smooth, textured wall.

    Resolution independent (defined on normalised coordinates), so any size shows the same
    wall. Light grey like NeRSemble's backdrop, so heads stand out.
    """
    rng = rng_for(seed, "background", participant, serial)
    y, x = np.meshgrid(
        (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij"
    )
    base = np.array([0.78, 0.78, 0.76]) + rng.normal(0.0, 0.02, 3)
    img = base[None, None, :] * (1.0 - 0.12 * y[..., None])  # darker towards the floor
    for _ in range(4):  # a few soft waves and a tint gradient
        kx, ky = rng.uniform(1.0, 6.0, 2) * rng.choice([-1.0, 1.0], 2)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.015, 0.04) * rng.normal(1.0, 0.3, 3)
        img = img + amp[None, None, :] * np.sin(2 * np.pi * (kx * x + ky * y) + phase)[..., None]
    tint = rng.normal(0.0, 0.03, 3)
    img = img + tint[None, None, :] * (x[..., None] - 0.5)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
