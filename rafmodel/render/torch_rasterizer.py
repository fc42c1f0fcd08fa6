"""A differentiable, tile-based Gaussian rasterizer in plain PyTorch (the CPU backend).

It follows gsplat 1.5.3's classic 3DGS path (``rasterization(..., packed=False,
rasterize_mode="classic")``) so that a model trained on CPU renders the same on a GPU:

- projection: world -> camera, 3D covariance ``R S S^T R^T`` pushed through the perspective
  Jacobian, with x/z and y/z clamped to 1.3x the field of view (gsplat's ``persp_proj``);
- ``eps2d`` (0.3 px^2) added to the 2D covariance diagonal, no opacity compensation;
- culling: depth outside [near, far], det <= 0, opacity < 1/255, bounding box off-image;
- extent: gsplat's opacity-aware box, per axis ``ceil(e * sqrt(cov2d_ii))`` with
  ``e = min(3.33, sqrt(2 ln(255 o)))``: it holds every pixel where alpha >= 1/255, so the tiles
  never cut a Gaussian short;
- pixel centres at +0.5 (the K given here is already in gsplat's convention);
- ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` with ``(a, b, c)`` the conic (inverse 2D
  covariance) and ``d = centre - pixel``; ``alpha = min(0.999, o exp(-sigma))``; a Gaussian
  with ``sigma < 0`` or ``alpha < 1/255`` is skipped;
- front-to-back compositing by camera depth; a pixel stops *before* the Gaussian that would
  take its transmittance to <= 1e-4, and ignores everything behind it.

Gradients come from autograd. The image is cut into 16x16 tiles; each tile gathers the
Gaussians whose box touches it (already depth sorted) and composites them in depth-ordered
chunks of (pixels x Gaussians) tensors, stopping once every pixel of the tile is saturated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rafmodel.render import Limits, Splats, View
from rafmodel.rotations import quat_to_matrix

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's ALPHA_THRESHOLD: weaker contributions are skipped
MAX_ALPHA = 0.999  # gsplat clamps alpha so that one Gaussian never makes a pixel fully opaque
T_STOP = 1e-4  # a pixel is finished once its transmittance would fall to this
EXTENT = 3.33  # gsplat's largest box half-size, in standard deviations


@dataclass
class Projected:
    """Per-Gaussian screen-space quantities for one camera (N Gaussians).

    means2d: (N, 2) pixel coordinates of the centres (gsplat convention), 0 where culled.
    conics: (N, 3) inverse 2D covariance (a, b, c) = ([0,0], [0,1], [1,1]), px^-2.
    depths: (N,) camera-space z, world units.
    radii: (N, 2) int32 box half-sizes in pixels (x, y); (0, 0) = culled.
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor


def project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    world_to_cam: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> Projected:
    """Project N 3D Gaussians into one pinhole camera, as gsplat's fused projection does.

    means (N, 3) world; quats (N, 4) wxyz; scales (N, 3) linear std-devs, world units;
    opacities (N,) in [0, 1]; world_to_cam (4, 4); K (3, 3) with pixel centres at +0.5.
    Differentiable in means2d, conics and depths; radii are integers (no gradient).
    """
    R, t = world_to_cam[:3, :3], world_to_cam[:3, 3]
    mc = means @ R.T + t  # (N, 3) camera space
    rot = quat_to_matrix(quats)
    M = R @ (rot * scales[:, None, :])  # camera-space R_cam R_g S
    cov_c = M @ M.transpose(1, 2)  # (N, 3, 3)

    x, y, z = mc.unbind(-1)
    valid = (z >= near_plane) & (z <= far_plane)
    # Culled Gaussians still flow through the maths below; a safe depth keeps their (unused)
    # values finite so that zero gradients do not turn into 0 * inf = NaN.
    zs = torch.where(valid, z, torch.ones_like(z))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    # The Jacobian is evaluated at a point clamped to 1.3x the view frustum (gsplat): far
    # off-axis Gaussians otherwise get huge, meaningless footprints.
    tx = zs * torch.minimum(torch.maximum(x / zs, -lim_x_neg), lim_x_pos)
    ty = zs * torch.minimum(torch.maximum(y / zs, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(zs)
    J = torch.stack([fx / zs, zero, -fx * tx / zs**2,
                     zero, fy / zs, -fy * ty / zs**2], dim=-1).reshape(-1, 2, 3)
    cov2d = J @ cov_c @ J.transpose(1, 2)  # (N, 2, 2)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)

    c00 = cov2d[:, 0, 0] + eps2d
    c11 = cov2d[:, 1, 1] + eps2d
    c01 = 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0])
    det = c00 * c11 - c01 * c01
    valid = valid & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c11 / det, -c01 / det, c00 / det], dim=-1)

    with torch.no_grad():
        o = opacities.detach()
        valid = valid & (o >= ALPHA_THRESHOLD)
        # Opacity-aware extent: beyond it alpha < 1/255 everywhere, so nothing is lost.
        extend = torch.sqrt(2.0 * torch.log(o.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = extend.clamp(max=EXTENT)
        rx = torch.ceil(extend * torch.sqrt(c00.detach().clamp(min=0)))
        ry = torch.ceil(extend * torch.sqrt(c11.detach().clamp(min=0)))
        mx, my = means2d.detach().unbind(-1)
        valid = valid & ((rx > 0) | (ry > 0))
        valid = valid & (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        radii = torch.stack([rx, ry], dim=-1).to(torch.int32) * valid[:, None]

    means2d = torch.where(valid[:, None], means2d, torch.zeros_like(means2d))
    return Projected(means2d=means2d, conics=conics, depths=z, radii=radii)


def _tile_pairs(
    means2d: Tensor, radii: Tensor, tile_size: int, tiles_x: int, tiles_y: int
) -> tuple[Tensor, Tensor]:
    """(Gaussian, tile) intersections, grouped by tile, Gaussians kept in the input order.

    means2d (M, 2), radii (M, 2) of visible Gaussians. Returns (gauss (P,), tile_start
    (tiles + 1,)): the Gaussians of tile k are gauss[tile_start[k]:tile_start[k + 1]].
    """
    m = means2d.detach()
    r = radii.to(m.dtype)
    # gsplat's isect_tiles: the box [centre - r, centre + r] in tile units, floor/ceil, clamped.
    x0 = torch.floor((m[:, 0] - r[:, 0]) / tile_size).clamp(0, tiles_x).long()
    x1 = torch.ceil((m[:, 0] + r[:, 0]) / tile_size).clamp(0, tiles_x).long()
    y0 = torch.floor((m[:, 1] - r[:, 1]) / tile_size).clamp(0, tiles_y).long()
    y1 = torch.ceil((m[:, 1] + r[:, 1]) / tile_size).clamp(0, tiles_y).long()
    w = x1 - x0
    counts = w * (y1 - y0)
    n_tiles = tiles_x * tiles_y
    gauss = torch.repeat_interleave(torch.arange(len(m), device=m.device), counts)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(len(gauss), device=m.device) - first[gauss]
    tile = (y0[gauss] + k // w[gauss]) * tiles_x + x0[gauss] + k % w[gauss]
    # A stable sort by tile keeps each tile's Gaussians in their (depth) order.
    tile, order = torch.sort(tile, stable=True)
    gauss = gauss[order]
    start = torch.zeros(n_tiles + 1, dtype=torch.long, device=m.device)
    start[1:] = torch.cumsum(torch.bincount(tile, minlength=n_tiles), 0)
    return gauss, start


def rasterize(
    splats: Splats,
    view: View,
    background: Tensor | None = None,
    limits: Limits | None = None,
    *,
    tile_size: int = 16,
    chunk: int = 64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Render N Gaussians into one camera: ``project`` then ``composite``.

    splats, view (K in gsplat's convention, pixel centres at +0.5), limits: see
    :mod:`rafmodel.render`; background (C,) or None (zeros).

    Returns (image (H, W, C), alpha (H, W, 1), means2d (N, 2), radii (N, 2) int32). ``means2d``
    is the tensor the compositing reads, so its ``.grad`` (after ``retain_grad()``) is the
    view-space gradient used for densification.
    """
    s, w, h = splats, view.width, view.height
    limits = limits or Limits()
    proj = project(s.means, s.quats, s.scales, s.opacities, view.world_to_cam, view.K, w, h,
                   eps2d=limits.eps2d, near_plane=limits.near_plane, far_plane=limits.far_plane)
    image, alpha = composite(proj.means2d, proj.conics, proj.depths, proj.radii, s.opacities,
                             s.colors, w, h, background, tile_size=tile_size, chunk=chunk)
    return image, alpha, proj.means2d, proj.radii


def composite(
    means2d: Tensor,
    conics: Tensor,
    depths: Tensor,
    radii: Tensor,
    opacities: Tensor,
    colors: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
    *,
    tile_size: int = 16,
    chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite projected Gaussians front to back (gsplat's ``rasterize_to_pixels``).

    means2d (N, 2) px, conics (N, 3), depths (N,), radii (N, 2) int (0 = skip) as from
    ``project``; opacities (N,); colors (N, C); background (C,) or None. ``chunk`` Gaussians
    are composited per step within a tile (64 keeps each op under PyTorch's parallel grain
    size: on a busy CPU, threading these small ops costs more than it gains).
    Returns (image (H, W, C), alpha (H, W, 1)).
    """
    device, dtype = means2d.device, means2d.dtype
    n_ch = colors.shape[-1]
    ids = torch.nonzero((radii > 0).all(dim=-1)).squeeze(1)
    ids = ids[torch.argsort(depths.detach()[ids], stable=True)]  # front to back

    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    gauss, start = _tile_pairs(means2d[ids], radii[ids], tile_size, tiles_x, tiles_y)
    # One gather for every (tile, Gaussian) pair, then views per tile and chunk via split:
    # indexing per chunk would make autograd allocate and add a full (N, .) gradient each time.
    feats = torch.cat([means2d, conics, opacities[:, None].to(dtype), colors.to(dtype)], dim=1)
    pair_feats = feats[ids][gauss]  # (pairs, 6 + C), grouped by tile, depth order within
    per_tile = torch.split(pair_feats, torch.diff(start).tolist())

    # Pixel centres of one tile, relative to its corner, +0.5 as gsplat.
    local = torch.arange(tile_size, device=device, dtype=dtype) + 0.5
    ly, lx = torch.meshgrid(local, local, indexing="ij")
    lx, ly = lx.reshape(-1), ly.reshape(-1)
    n_pix = tile_size * tile_size

    colour_tiles: list[Tensor] = []
    trans_tiles: list[Tensor] = []
    for k, tile_feats in enumerate(per_tile):
        ty, tx = divmod(k, tiles_x)
        px, py = lx + tx * tile_size, ly + ty * tile_size
        # Padding pixels beyond the image are "done" from the start so that they never
        # keep a tile busy; they are cropped below.
        done = (px > width) | (py > height)
        T = torch.ones(n_pix, device=device, dtype=dtype)
        acc = torch.zeros(n_pix, n_ch, device=device, dtype=dtype)
        for f in torch.split(tile_feats, chunk):
            if len(f) == 0 or bool(done.all()):
                break
            dx = f[:, 0][None, :] - px[:, None]  # (P, L) centre - pixel
            dy = f[:, 1][None, :] - py[:, None]
            sigma = 0.5 * (f[:, 2] * dx * dx + f[:, 4] * dy * dy) + f[:, 3] * dx * dy
            # exp of a large -sigma gives denormal floats, which are ~100x slower on CPU; such
            # alphas are far below 1/255 and skipped anyway.
            alpha = torch.clamp(f[:, 5] * torch.exp(-sigma.clamp(max=40.0)), max=MAX_ALPHA)
            keep = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD) & ~done[:, None]
            alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
            # Transmittance after each Gaussian if all kept ones were composited; it only
            # falls, so "stop before the first one that takes it to <= 1e-4" is exactly
            # "composite those whose running transmittance stays above 1e-4".
            with torch.no_grad():
                t_after = T.detach()[:, None] * torch.cumprod(1 - alpha.detach(), dim=1)
                used = t_after > T_STOP
            alpha = torch.where(used, alpha, torch.zeros_like(alpha))
            t_incl = T[:, None] * torch.cumprod(1 - alpha, dim=1)
            t_excl = torch.cat([T[:, None], t_incl[:, :-1]], dim=1)
            acc = acc + (alpha * t_excl) @ f[:, 6:]
            T = t_incl[:, -1]
            done = done | (t_after[:, -1] <= T_STOP)
        colour_tiles.append(acc)
        trans_tiles.append(T)

    def assemble(parts: list[Tensor], ch: int) -> Tensor:
        img = torch.stack(parts).reshape(tiles_y, tiles_x, tile_size, tile_size, ch)
        img = img.permute(0, 2, 1, 3, 4).reshape(tiles_y * tile_size, tiles_x * tile_size, ch)
        return img[:height, :width]

    image = assemble(colour_tiles, n_ch)
    T_img = assemble(trans_tiles, 1)
    if background is not None:
        image = image + T_img * background.to(dtype)
    return image, 1 - T_img
