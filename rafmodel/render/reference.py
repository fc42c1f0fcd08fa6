"""A slow, obviously-correct per-pixel Gaussian rasterizer (float64 NumPy), for tests and benches.

It shares no code with the tile rasterizer: every pixel looks at every Gaussian in front of the
camera, sorted by depth, and composites them one at a time with gsplat's rules (pixel centres at
+0.5, eps2d, alpha = min(0.999, o exp(-sigma)), skip alpha < 1/255 or sigma < 0, stop before the
Gaussian that would take the transmittance to <= 1e-4). It needs no tiles or radii: gsplat's
opacity-aware box contains every pixel with alpha >= 1/255, so tiling never changes the image.
"""

from __future__ import annotations

import numpy as np


def _rotation(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def reference_render(
    means: np.ndarray,
    quats: np.ndarray,
    scales: np.ndarray,
    opacities: np.ndarray,
    colors: np.ndarray,
    world_to_cam: np.ndarray,
    K: np.ndarray,
    width: int,
    height: int,
    background: np.ndarray | None = None,
    *,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> tuple[np.ndarray, np.ndarray]:
    """Render like ``torch_rasterizer.rasterize`` (K with pixel centres at +0.5), per pixel.

    Shapes as there (arrays, any float type; computed in float64). Returns
    (image (H, W, C), alpha (H, W, 1)).
    """
    means, quats, scales = (np.asarray(a, np.float64) for a in (means, quats, scales))
    opacities, colors = np.asarray(opacities, np.float64), np.asarray(colors, np.float64)
    world_to_cam, K = np.asarray(world_to_cam, np.float64), np.asarray(K, np.float64)
    n_ch = colors.shape[1]
    bg = np.zeros(n_ch) if background is None else np.asarray(background, np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]

    # Per Gaussian: centre in pixels, conic, depth (one at a time, straight from the formulas).
    kept = []
    for i in range(len(means)):
        x, y, z = world_to_cam[:3, :3] @ means[i] + world_to_cam[:3, 3]
        if not near_plane <= z <= far_plane:
            continue
        Rg = _rotation(quats[i])
        cov_w = Rg @ np.diag(scales[i] ** 2) @ Rg.T
        cov_c = world_to_cam[:3, :3] @ cov_w @ world_to_cam[:3, :3].T
        # The Jacobian's x/z, y/z are clamped to 1.3x the field of view (gsplat).
        lim_x = ((width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx)
        lim_y = ((height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy)
        u = min(max(x / z, -lim_x[1]), lim_x[0])
        v = min(max(y / z, -lim_y[1]), lim_y[0])
        J = np.array([[fx / z, 0.0, -fx * u / z], [0.0, fy / z, -fy * v / z]])
        cov2d = J @ cov_c @ J.T + eps2d * np.eye(2)
        if np.linalg.det(cov2d) <= 0:
            continue
        conic = np.linalg.inv(cov2d)
        kept.append((z, fx * x / z + cx, fy * y / z + cy, conic, opacities[i], colors[i]))
    kept.sort(key=lambda g: g[0])

    z = np.array([g[0] for g in kept]).reshape(-1)
    mx = np.array([g[1] for g in kept]).reshape(-1)
    my = np.array([g[2] for g in kept]).reshape(-1)
    con = np.array([g[3] for g in kept]).reshape(-1, 2, 2)
    opa = np.array([g[4] for g in kept]).reshape(-1)
    col_g = np.array([g[5] for g in kept]).reshape(-1, n_ch)
    assert np.all(np.diff(z) >= 0)

    image = np.zeros((height, width, n_ch))
    alpha_img = np.zeros((height, width, 1))
    for row in range(height):
        for col in range(width):
            px, py = col + 0.5, row + 0.5
            # sigma and alpha of every Gaussian at this pixel (vectorised only for speed) ...
            dx, dy = mx - px, my - py
            sigma = 0.5 * (con[:, 0, 0] * dx * dx + con[:, 1, 1] * dy * dy) \
                + con[:, 0, 1] * dx * dy
            alpha = np.minimum(0.999, opa * np.exp(-sigma))
            # ... then front-to-back compositing, one Gaussian at a time.
            T = 1.0
            out = np.zeros(n_ch)
            for j in np.flatnonzero((sigma >= 0) & (alpha >= 1.0 / 255.0)):  # the rest: skipped
                next_T = T * (1 - alpha[j])
                if next_T <= 1e-4:
                    break
                out += alpha[j] * T * col_g[j]
                T = next_T
            image[row, col] = out + T * bg
            alpha_img[row, col, 0] = 1 - T
    return image, alpha_img
