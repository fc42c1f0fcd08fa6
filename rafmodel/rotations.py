"""Rotation maths shared by the avatar, the densification strategy and the rasterizer.

Quaternions are wxyz and need not be normalised on input; axis-angle vectors are in radians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def axis_angle_to_quat(aa: Tensor) -> Tensor:
    """(..., 3) axis-angle (rad) -> (..., 4) unit quaternion wxyz; smooth at zero angle."""
    theta2 = (aa * aa).sum(-1, keepdim=True)
    small = theta2 < 1e-8
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    half = 0.5 * theta
    # sin(theta/2)/theta -> 1/2 - theta^2/48 near 0 (avoids 0/0 and keeps gradients finite)
    k = torch.where(small, 0.5 - theta2 / 48.0, torch.sin(half) / theta)
    w = torch.where(small, 1.0 - theta2 / 8.0, torch.cos(half))
    return torch.cat([w, aa * k], dim=-1)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a * b of (..., 4) wxyz quaternions (rotation b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def quat_to_matrix(q: Tensor) -> Tensor:
    """(..., 4) wxyz (normalised here) -> (..., 3, 3) rotation matrices."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(q.shape[:-1] + (3, 3))


def axis_angle_to_matrix(aa: Tensor) -> Tensor:
    """(..., 3) axis-angle (rad) -> (..., 3, 3), Rodrigues via the unit quaternion."""
    return quat_to_matrix(axis_angle_to_quat(aa))
