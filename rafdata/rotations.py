"""Rotation conversions for tracker outputs (numpy, batched).

The store keeps every head pose as GHA does: axis-angle (radians) + translation, mapping a
canonical point x to world as ``s * R(pose[:3]) x + pose[3:]``. Trackers write rotations in
other forms: the NeRSemble benchmark's FLAME tracking stores ``rotation`` as intrinsic XYZ
Euler angles (its toolkit builds the model-to-world matrix with scipy's
``from_euler('XYZ', ...)``) beside the ``rotation_matrices`` themselves.
"""

from __future__ import annotations

import numpy as np


def euler_xyz_intrinsic_to_matrix(angles: np.ndarray) -> np.ndarray:
    """(..., 3) intrinsic X-Y'-Z'' Euler angles (radians) -> (..., 3, 3) ``Rx @ Ry @ Rz``."""
    a = np.asarray(angles, dtype=np.float64)
    cx, cy, cz = np.cos(a[..., 0]), np.cos(a[..., 1]), np.cos(a[..., 2])
    sx, sy, sz = np.sin(a[..., 0]), np.sin(a[..., 1]), np.sin(a[..., 2])
    rows = [
        [cy * cz, -cy * sz, sy],
        [cx * sz + sx * sy * cz, cx * cz - sx * sy * sz, -sx * cy],
        [sx * sz - cx * sy * cz, sx * cz + cx * sy * sz, cx * cy],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler_xyz_intrinsic(R: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_xyz_intrinsic_to_matrix` for the middle angle in
    (-pi/2, pi/2) (away from gimbal lock, which head poses never reach): (..., 3)."""
    R = np.asarray(R, dtype=np.float64)
    ry = np.arcsin(np.clip(R[..., 0, 2], -1.0, 1.0))
    rx = np.arctan2(-R[..., 1, 2], R[..., 2, 2])
    rz = np.arctan2(-R[..., 0, 1], R[..., 0, 0])
    return np.stack([rx, ry, rz], axis=-1)


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 3) axis-angle, angle in [0, pi].

    Through the unit quaternion (Shepperd's choice of the largest component), so rotations
    near 0 and near pi are as accurate as the rest.
    """
    R = np.asarray(R, dtype=np.float64)
    m = R.reshape(-1, 3, 3)
    tr = np.trace(m, axis1=1, axis2=2)
    diag = np.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], axis=1)
    case = np.argmax(diag, axis=1)
    q = np.empty((len(m), 4))  # w, x, y, z
    for k in range(4):
        sel = case == k
        if not sel.any():
            continue
        r = m[sel]
        if k == 0:
            s = 2.0 * np.sqrt(1.0 + tr[sel])
            q[sel] = np.stack([s / 4, (r[:, 2, 1] - r[:, 1, 2]) / s,
                               (r[:, 0, 2] - r[:, 2, 0]) / s, (r[:, 1, 0] - r[:, 0, 1]) / s], 1)
        else:
            i = k - 1
            j, m2 = (i + 1) % 3, (i + 2) % 3
            s = 2.0 * np.sqrt(np.maximum(1.0 + r[:, i, i] - r[:, j, j] - r[:, m2, m2], 1e-300))
            qq = np.empty((len(r), 4))
            qq[:, 0] = (r[:, m2, j] - r[:, j, m2]) / s
            qq[:, 1 + i] = s / 4
            qq[:, 1 + j] = (r[:, j, i] + r[:, i, j]) / s
            qq[:, 1 + m2] = (r[:, m2, i] + r[:, i, m2]) / s
            q[sel] = qq
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)  # w >= 0: the angle in [0, pi]
    xyz = q[:, 1:]
    n = np.linalg.norm(xyz, axis=1)
    angle = 2.0 * np.arctan2(n, q[:, 0])
    # angle / sin(angle / 2) -> 2 as the angle -> 0
    factor = np.where(n > 1e-12, angle / np.maximum(n, 1e-300), 2.0)
    return (xyz * factor[:, None]).reshape(R.shape[:-2] + (3,))


def rotation_errors(R: np.ndarray) -> np.ndarray:
    """(...,) how far each (..., 3, 3) matrix is from a rotation: max |R^T R - I| entry, or
    inf where det(R) <= 0."""
    R = np.asarray(R, dtype=np.float64)
    err = np.abs(np.swapaxes(R, -1, -2) @ R - np.eye(3)).max(axis=(-2, -1))
    return np.where(np.linalg.det(R) > 0, err, np.inf)


__all__ = ["euler_xyz_intrinsic_to_matrix", "matrix_to_axis_angle",
           "matrix_to_euler_xyz_intrinsic", "rotation_errors"]
