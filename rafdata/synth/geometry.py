"""Small rigid-geometry helpers shared by the renderer, the rig and the tracking writers."""

from __future__ import annotations

import numpy as np


def rodrigues(axis_angle: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) float64 of an axis-angle vector (3,) in radians (Rodrigues)."""
    v = np.asarray(axis_angle, dtype=np.float64).reshape(3)
    theta = float(np.linalg.norm(v))
    if theta < 1e-12:
        return np.eye(3)
    k = v / theta
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(theta) * kx + (1.0 - np.cos(theta)) * (kx @ kx)


def euler_xyz(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix (3, 3) ``Rz @ Ry @ Rx`` of angles in radians."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """world_to_cam (4, 4) of a camera at ``eye`` looking at ``target``, OpenCV axes.

    Camera x points right, y down, z forward; ``up`` (default world +y) appears upward.
    """
    eye = np.asarray(eye, dtype=np.float64)
    up = np.array([0.0, 1.0, 0.0]) if up is None else np.asarray(up, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(-up, fwd)  # OpenCV: x = y cross z with y = down
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    m = np.eye(4)
    m[:3, :3] = np.stack([right, down, fwd])
    m[:3, 3] = -m[:3, :3] @ eye
    return m


def canonical_to_world(x: np.ndarray, pose: np.ndarray, scale: float) -> np.ndarray:
    """World points (N, 3) of canonical points x (N, 3): ``scale * R(pose[:3]) @ x + pose[3:]``."""
    pose = np.asarray(pose, dtype=np.float64).reshape(6)
    x = np.asarray(x, dtype=np.float64).reshape(-1, 3)
    return float(scale) * x @ rodrigues(pose[:3]).T + pose[3:]
