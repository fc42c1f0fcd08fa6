"""The avatar: canonical 3D Gaussians deformed by expression and pose, in the style of GHA.

Gaussian Head Avatar (Xu et al., CVPR 2024; "GHA" below) keeps one set of Gaussians in the
tracker's canonical head space and, per frame, moves and recolours them with small MLPs:

- expression branch: PE(x) + e -> xyz offset; [tanh(f), e] -> colour and attribute deltas;
- pose branch:       PE(x) + PE(pose) -> xyz offset; [tanh(f), PE(pose)] -> colour, attributes;
- a per-Gaussian weight lambda blends the two: 1 near the face (expression drives it), 0 far
  from it (only head pose changes its look: hair, neck), a linear ramp between ``t_near`` and
  ``t_far`` of the distance to the face anchors;
- finally the tracked rigid transform ``x_world = scale * R(pose[:3]) @ x + pose[3:]``.

Units. Canonical coordinates are the tracker's (BFM or FLAME, or the synth head). We measure
every canonical length the config talks about in *head radii*: ``head_radius`` (a buffer, in
canonical units) is ``head_radius_m / scale`` (0.1 m of world head radius divided by the
tracker's metres per canonical unit) or set explicitly. GHA states t_near, t_far,
deform_scale in its own normalised canonical space, where the head is about one unit across
its half-width; expressing them in head radii keeps their meaning whatever the tracker's units.
(GHA's code ramps on the *squared* nearest-landmark distance as returned by pytorch3d's
``knn_points``; ``AvatarConfig.squared_distance=True`` reproduces that literally.)

Face anchors. The store has no landmarks, so the anchors are taken from the initial point
cloud: points in a cone around +z from the head centre, +z being the face direction of both
the BFM and FLAME canonical spaces (and of the synth head). They are a buffer that
:meth:`GaussianHeadAvatar.set_face_anchors` replaces (e.g. with tracked neutral landmarks).

Initialisation needs no mesh stage: :func:`init_from_visual_hull` carves a voxel grid in
canonical space against the masks of several (camera, timestep) samples; :func:`init_ellipsoid`
is a head-sized fallback. Both return a :class:`PointCloudInit` to build the model from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rafmodel.rotations import (
    axis_angle_to_matrix,
    axis_angle_to_quat,
    quat_multiply,
    quat_to_matrix,
)

# --------------------------------------------------------------------------- configuration


@dataclass
class AvatarConfig:
    """Sizes and constants of the avatar. Lengths marked "head radii" scale with head_radius.

    Sources: GHA's NeRSemble config (``train_gaussianhead_N031.yaml``) unless marked "ours".

    exp_dim: D, from the store's ``exp_dim`` (GHA: 64, BFM). pose_dim: 6 (axis-angle + t).
    feature_dim: per-Gaussian feature (GHA 128; ``tanh`` applied before the MLPs as in GHA).
    color_dim: channels rendered (ours 3, sigmoid RGB; GHA renders a 32-channel feature image
        for its super-resolution network).
    mlp_width: hidden width of every MLP (GHA 256; its pose colour/attribute nets use 128).
    *_depth: hidden layers per MLP (GHA: exp deform 5, pose deform 2, exp colour 2, pose
        colour 1, exp attributes 3, pose attributes 2).
    pos_freqs, pose_freqs: positional-encoding octaves (GHA 4 for both; input included, so
        3 -> 27 and 6 -> 54 dims). Positions are encoded in head radii around head_center,
        pose translations relative to ``pose_t_ref`` in units of ``pose_t_unit`` (ours).
    t_near, t_far: blend ramp, head radii (GHA 0.1, 0.25). squared_distance: ramp on the
        squared distance like GHA's code (default off: a plain distance, as the paper reads).
    deform_scale: max xyz offset, head radii, ``tanh`` bounded (GHA 0.3).
    attributes_scale: factor on the attribute deltas (log-scale, quaternion, opacity logit)
        (GHA 0.2).
    num_gaussians: initial count (ours 3000 for CPU; GHA ~100k mesh vertices + 3000 mouth).
    init_scale: initial Gaussian std in head radii; None = GHA's rule, the RMS distance to the
        3 nearest neighbours. init_opacity: GHA 0.3.
    head_radius_m: world head radius used to turn the tracker scale into head_radius (ours).
    face_cone_deg, face_max_dist, max_face_anchors: anchor selection (ours, see module doc).
    zero_init_last: last layer of every MLP starts at zero, so training starts from the
        canonical cloud (ours; GHA copies them from its mesh stage).
    base_color: a per-Gaussian colour logit added to the MLP colours, so colours from images
        can initialise the avatar (ours; GHA has none).
    seed: of the MLP and feature initialisation (the global RNG is left untouched).
    """

    exp_dim: int
    pose_dim: int = 6
    feature_dim: int = 128
    color_dim: int = 3
    mlp_width: int = 256
    exp_deform_depth: int = 5
    pose_deform_depth: int = 2
    exp_color_depth: int = 2
    pose_color_depth: int = 1
    exp_attr_depth: int = 3
    pose_attr_depth: int = 2
    pos_freqs: int = 4
    pose_freqs: int = 4
    t_near: float = 0.1
    t_far: float = 0.25
    squared_distance: bool = False
    deform_scale: float = 0.3
    attributes_scale: float = 0.2
    num_gaussians: int = 3000
    init_scale: float | None = None
    init_opacity: float = 0.3
    head_radius_m: float = 0.1
    face_cone_deg: float = 60.0
    face_max_dist: float = 1.5
    max_face_anchors: int = 256
    zero_init_last: bool = True
    base_color: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.exp_dim < 1:
            raise ValueError(f"exp_dim must be >= 1, not {self.exp_dim}")
        if self.pose_dim != 6:
            raise ValueError(f"pose_dim must be 6 (axis-angle + translation), not {self.pose_dim}")
        if not 0.0 <= self.t_near < self.t_far:
            raise ValueError(f"need 0 <= t_near < t_far, got {self.t_near}, {self.t_far}")
        if not 0.0 < self.init_opacity < 1.0:
            raise ValueError(f"init_opacity must be in (0, 1), not {self.init_opacity}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AvatarConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo should not pass)."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown AvatarConfig keys: {sorted(extra)}")
        return cls(**dict(d))


# --------------------------------------------------------------------------- small maths
# (rotations live in rafmodel.rotations)


def positional_encoding(x: Tensor, n_freqs: int) -> Tensor:
    """NeRF-style encoding [x, sin(2^k x), cos(2^k x)]_k=0..n-1: (..., d) -> (..., d(1+2n))."""
    if n_freqs == 0:
        return x
    freqs = 2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device)
    xf = (x[..., None, :] * freqs[:, None]).flatten(-2)  # (..., n*d), octave-major
    return torch.cat([x, torch.sin(xf), torch.cos(xf)], dim=-1)


def knn_mean_sq_dist(xyz: Tensor, k: int = 3, chunk_elems: int = 1 << 24) -> Tensor:
    """(N,) mean squared distance of each point to its k nearest others (GHA's distCUDA2 rule).

    Chunked brute force so N ~ 1e5 fits in memory; self-matches are excluded.
    """
    n = xyz.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return torch.ones(n, dtype=xyz.dtype, device=xyz.device)
    out = torch.empty(n, dtype=xyz.dtype, device=xyz.device)
    rows = max(1, chunk_elems // max(n, 1))
    for s in range(0, n, rows):
        d2 = torch.cdist(xyz[s:s + rows], xyz).square_()
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = float("inf")
        out[s:s + rows] = d2.topk(k, dim=1, largest=False).values.mean(1)
    return out


def _mlp(d_in: int, width: int, depth: int, d_out: int, zero_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU(inplace=True)]
        d = width
    last = nn.Linear(d, d_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def _as_tensor(x: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    return x.detach().to("cpu", dtype) if isinstance(x, Tensor) else torch.as_tensor(
        np.asarray(x), dtype=dtype)


# --------------------------------------------------------------------------- initialisation


@dataclass
class PointCloudInit:
    """A canonical point cloud to start the avatar from.

    xyz (N, 3) canonical units; rgb (N, 3) in [0, 1] or None; center (3,) canonical head
    centre (anchors are chosen around it); head_radius: canonical units per head radius;
    pose_t_ref (3,) world translation the pose encoding is centred on; pose_t_unit: world
    units of one step of pose translation in the encoding (default 0.1 m, a head radius).
    """

    xyz: Tensor
    rgb: Tensor | None
    center: Tensor
    head_radius: float
    pose_t_ref: Tensor
    pose_t_unit: float = 0.1


def canonical_head_radius(scale: float | Tensor, head_radius_m: float = 0.1) -> float:
    """Canonical units per head radius: ``head_radius_m`` world metres over the tracker scale.

    ``scale`` is the tracker's metres per canonical unit (median it over timesteps first).
    """
    s = float(scale)
    if not s > 0.0:
        raise ValueError(f"tracker scale must be positive, not {s}")
    return head_radius_m / s


def head_ellipsoid_radii(head_radius: float) -> Tensor:
    """Semi-axes (3,) of a head-sized ellipsoid (x width, y height, z depth), canonical units.

    Proportions of an adult head (~15 x 23 x 20 cm incl. chin) scaled to one head radius.
    """
    return torch.tensor([0.78, 1.0, 0.92], dtype=torch.float64) * head_radius


def init_ellipsoid(center: Sequence[float] | Tensor, radii: Sequence[float] | Tensor, n: int,
                   *, seed: int = 0, head_radius: float | None = None,
                   pose_t_ref: Sequence[float] | Tensor | None = None,
                   pose_t_unit: float = 0.1) -> PointCloudInit:
    """n points on an ellipsoid surface (canonical units), deterministic in ``seed``.

    The fallback when no masks exist: ``init_ellipsoid((0, 0, 0), head_ellipsoid_radii(r), n,
    head_radius=r)`` with ``r = canonical_head_radius(scale)``. Points are normal-distributed
    directions pushed to the surface, plus a small inward jitter (2% of the radii) so the
    cloud is not degenerate for the 3-NN scale rule. head_radius defaults to max(radii).
    """
    c = _as_tensor(center).reshape(3)
    r = _as_tensor(radii).reshape(3)
    if n < 1 or (r <= 0).any():
        raise ValueError(f"need n >= 1 and positive radii, got n={n}, radii={r.tolist()}")
    g = torch.Generator().manual_seed(int(seed))
    d = torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    shrink = 1.0 - 0.02 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    xyz = c + d * r * shrink
    t_ref = torch.zeros(3, dtype=torch.float64) if pose_t_ref is None else \
        _as_tensor(pose_t_ref).reshape(3)
    return PointCloudInit(xyz=xyz.float(), rgb=None, center=c.float(),
                          head_radius=float(head_radius if head_radius else r.max()),
                          pose_t_ref=t_ref.float(), pose_t_unit=pose_t_unit)


@dataclass
class HullSample:
    """One view for carving: mask (H, W) (uint8 255 = head, or float in [0, 1]); K (3, 3)
    OpenCV pixels; world_to_cam (4, 4); pose (6,) and scale of its timestep; image (H, W, 3)
    uint8 or float in [0, 1], optional, for initial colours."""

    mask: Any
    K: Any
    world_to_cam: Any
    pose: Any
    scale: float
    image: Any = None


def _unit(x: Any) -> Tensor:
    """float32 in [0, 1]: uint8 arrays and tensors are divided by 255, floats kept."""
    t = _as_tensor(x, torch.float32)
    return t / 255.0 if getattr(x, "dtype", None) in (np.uint8, torch.uint8) else t


def _mask01(m: Any) -> Tensor:
    t = _unit(m)
    if t.ndim == 3:  # (1, H, W) as the dataset serves it, or (H, W, C)
        t = t[0] if t.shape[0] == 1 else t[..., 0]
    return t


def _image01(im: Any) -> Tensor:
    t = _unit(im)
    if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
        t = t.permute(1, 2, 0)  # (3, H, W) as the dataset serves it -> (H, W, 3)
    return t


def init_from_visual_hull(samples: Sequence[HullSample | tuple], n: int, *, seed: int = 0,
                          head_radius: float | None = None, head_radius_m: float = 0.1,
                          resolution: int = 64, box_radius: float = 2.0,
                          bounds: Sequence[Sequence[float]] | Tensor | None = None,
                          max_misses: int | None = None, min_views: int = 2,
                          outside_is_empty: bool = True,
                          with_colors: bool = True) -> PointCloudInit:
    """Carve a visual hull from masks and sample n canonical points on its surface.

    samples: (mask, K, world_to_cam, pose, scale[, image]) tuples or :class:`HullSample` of
    several cameras and timesteps. The grid lives directly in *canonical* space: every voxel
    centre is mapped to the world with its sample's ``scale * R(pose[:3]) @ x + pose[3:]`` and
    projected, so samples from timesteps with different head poses carve one consistent hull
    (equivalent to carving in the world and applying the inverse rigid transform for a single
    timestep; body parts that do not follow the head get carved away, which is fine).

    Bounds: ``bounds`` (2, 3) canonical min/max, else a cube of ``box_radius`` head radii
    around the canonical origin (the tracked head position). head_radius (canonical units)
    defaults to ``head_radius_m / median(scale)``.
    A voxel is kept when at most ``max_misses`` views see it outside their mask (default: 10%
    of the views, rounded; masks and tracking are imperfect) and at least ``min_views`` views
    see it at all (project inside the image, in front of the camera). With
    ``outside_is_empty`` (default; the head is whole in every view of a capture rig) a voxel
    projecting outside an image counts as a miss too; turn it off for crops that cut the head. Surface voxels (an
    empty or out-of-grid 6-neighbour) are sampled with replacement when fewer than n, and
    jittered uniformly inside their voxel; deterministic in ``seed``.
    Colours (``with_colors`` and images given): from the view that faces the point best
    (outward direction from the hull centre vs direction to the camera), without occlusion.
    Raises ValueError when nothing survives (wrong poses, empty masks, bounds off the head).
    """
    views = [s if isinstance(s, HullSample) else HullSample(*s) for s in samples]
    if not views:
        raise ValueError("init_from_visual_hull needs at least one sample")
    scales = torch.tensor([float(v.scale) for v in views], dtype=torch.float64)
    poses = torch.stack([_as_tensor(v.pose).reshape(6) for v in views])
    if head_radius is None:
        head_radius = canonical_head_radius(scales.median(), head_radius_m)
    if bounds is None:
        lo = torch.full((3,), -box_radius * head_radius, dtype=torch.float64)
        hi = -lo
    else:
        b = _as_tensor(bounds).reshape(2, 3)
        lo, hi = b[0], b[1]
    if max_misses is None:
        max_misses = int(round(0.1 * len(views)))

    res = int(resolution)
    axes = [lo[i] + (torch.arange(res, dtype=torch.float64) + 0.5) * (hi[i] - lo[i]) / res
            for i in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    grid32 = grid.float()  # projection in float32: ~1e-7 relative, far below a pixel
    voxel = (hi - lo) / res

    misses = torch.zeros(grid.shape[0], dtype=torch.int32)
    seen = torch.zeros(grid.shape[0], dtype=torch.int32)
    for v, pose in zip(views, poses, strict=True):
        inside, ok = _project_into_mask(grid32, v, pose)
        seen += ok.int()
        misses += (~inside if outside_is_empty else ok & ~inside).int()
    occupied = (misses <= max_misses) & (seen >= min_views)
    if not occupied.any():
        raise ValueError("visual hull is empty: no voxel lies inside the masks; check poses, "
                         "cameras and masks, or widen bounds")

    occ = occupied.reshape(res, res, res)
    pad = F.pad(occ[None, None].float(), (1, 1, 1, 1, 1, 1), value=0.0)[0, 0]
    full_nb = torch.ones_like(occ)
    for dim in range(3):
        for shift in (0, 2):
            sl = [slice(1, res + 1)] * 3
            sl[dim] = slice(shift, shift + res)
            full_nb &= pad[tuple(sl)] > 0.5
    surface = (occ & ~full_nb).reshape(-1)
    pts = grid[surface]

    g = torch.Generator().manual_seed(int(seed))
    if pts.shape[0] >= n:
        idx = torch.randperm(pts.shape[0], generator=g)[:n]
    else:
        idx = torch.randint(pts.shape[0], (n,), generator=g)
    xyz = pts[idx] + (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * voxel

    # The head centre: mean of the carved volume near the tracked head position, so that a
    # neck or shoulders in the masks pull it less.
    vol = grid[occupied]
    near = vol[vol.norm(dim=1) < 1.5 * head_radius]
    center = (near if near.shape[0] > 0 else vol).mean(0)

    rgb = None
    if with_colors and all(v.image is not None for v in views):
        rgb = _colors_from_views(xyz, center, views, poses)
    return PointCloudInit(xyz=xyz.float(), rgb=rgb, center=center.float(),
                          head_radius=float(head_radius), pose_t_ref=poses[:, 3:].mean(0).float(),
                          pose_t_unit=head_radius_m)


def _canonical_to_pixels(v: HullSample, pose: Tensor) -> Tensor:
    """(3, 4) float64 matrix P with ``P @ [x; 1] = depth * [u, v, 1]`` for canonical x:
    K [R_c | t_c] composed with the rigid ``x -> scale R(pose) x + t`` (one matmul per view)."""
    rigid = torch.eye(4, dtype=torch.float64)
    rigid[:3, :3] = float(v.scale) * axis_angle_to_matrix(pose[:3])
    rigid[:3, 3] = pose[3:]
    w2c = _as_tensor(v.world_to_cam).reshape(4, 4)
    return _as_tensor(v.K).reshape(3, 3) @ (w2c @ rigid)[:3]


def _pixel_lookup(x: Tensor, P: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest pixel (OpenCV centres at integers) of canonical x (M, 3) -> (row, col, in view);
    in view = in front of the camera and inside the image."""
    P = P.to(x.dtype)
    uvw = torch.addmm(P[:, 3], x, P[:, :3].T)
    z = uvw[:, 2]
    zs = z.clamp_min(1e-9)
    col = torch.round(uvw[:, 0] / zs)
    row = torch.round(uvw[:, 1] / zs)
    ok = (z > 1e-6) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return row.clamp_(0, h - 1).long(), col.clamp_(0, w - 1).long(), ok


def _project_into_mask(x: Tensor, v: HullSample, pose: Tensor) -> tuple[Tensor, Tensor]:
    m = _mask01(v.mask) > 0.5
    row, col, ok = _pixel_lookup(x, _canonical_to_pixels(v, pose), m.shape[0], m.shape[1])
    return m[row, col] & ok, ok


def _colors_from_views(xyz: Tensor, center: Tensor, views: Sequence[HullSample],
                       poses: Tensor) -> Tensor:
    n = xyz.shape[0]
    best = torch.full((n,), -2.0, dtype=torch.float64)
    rgb = torch.full((n, 3), 0.5, dtype=torch.float32)
    normal_c = F.normalize(xyz - center, dim=1)
    for v, pose in zip(views, poses, strict=True):
        im = _image01(v.image)
        row, col, ok = _pixel_lookup(xyz, _canonical_to_pixels(v, pose), im.shape[0],
                                     im.shape[1])
        xw = float(v.scale) * xyz @ axis_angle_to_matrix(pose[:3]).T + pose[3:]
        w2c = _as_tensor(v.world_to_cam).reshape(4, 4)
        cam_centre = -w2c[:3, :3].T @ w2c[:3, 3]
        normal_w = normal_c @ axis_angle_to_matrix(pose[:3]).T
        score = (normal_w * F.normalize(cam_centre - xw, dim=1)).sum(1)
        take = ok & (score > best)
        best = torch.where(take, score, best)
        rgb[take] = im[row[take], col[take], :3]
    return rgb


def select_face_anchors(xyz: Tensor, center: Tensor, head_radius: float, *,
                        cone_deg: float = 60.0, max_dist: float = 1.5,
                        max_anchors: int = 256) -> Tensor:
    """Face-region anchors (A, 3): points within ``cone_deg`` of +z seen from ``center`` and
    within ``max_dist`` head radii of it, thinned by farthest-point sampling (deterministic,
    starting at the most frontal point) to at most ``max_anchors`` spread over the face.

    Assumes +z is the face direction of the canonical space (BFM, FLAME, synth head). Falls
    back to the ``max_anchors`` most frontal points when the cone holds none.
    """
    x = xyz.detach().to(torch.float64)
    rel = x - center.detach().to(x)
    dist = rel.norm(dim=1)
    cos = rel[:, 2] / dist.clamp_min(1e-12)
    pick = (cos >= math.cos(math.radians(cone_deg))) & (dist <= max_dist * head_radius)
    cand = x[pick]
    if cand.shape[0] == 0:
        cand = x[rel[:, 2].topk(min(max_anchors, x.shape[0])).indices]
    if cand.shape[0] <= max_anchors:
        return cand.to(xyz.dtype)
    chosen = [int((cand[:, 2] - center[2].to(x)).argmax())]
    d = (cand - cand[chosen[0]]).norm(dim=1)
    for _ in range(max_anchors - 1):
        i = int(d.argmax())
        chosen.append(i)
        d = torch.minimum(d, (cand - cand[i]).norm(dim=1))
    return cand[chosen].to(xyz.dtype)


# --------------------------------------------------------------------------- the model


class GaussianHeadAvatar(nn.Module):
    """Canonical Gaussians + expression/pose-conditioned MLPs -> world-space Gaussians.

    Per-Gaussian parameters live in ``self.gaussians`` (an ``nn.ParameterDict``; a
    densification strategy replaces its tensors, see :mod:`rafmodel.strategy`):

    - ``xyz`` (N, 3) canonical position; ``features`` (N, F) (``tanh`` applied, as GHA);
    - ``rotation`` (N, 4) wxyz, not necessarily normalised; ``log_scales`` (N, 3) log std in
      canonical units; ``opacity_logit`` (N,); ``color_logit`` (N, C) (ours; zeros when
      ``cfg.base_color`` is off, and then not trained).

    Buffers: ``face_anchors`` (A, 3), ``head_center`` (3,), ``head_radius`` () canonical
    units, ``pose_t_ref`` (3,) and ``pose_t_unit`` () (pose-encoding normalisation).
    """

    def __init__(self, cfg: AvatarConfig, init: PointCloudInit,
                 anchors: Tensor | None = None,
                 setup_device: torch.device | str = "cpu") -> None:
        """``setup_device``: where the initial scales' nearest-neighbour search runs (brute
        force, O(N^2): seconds for GHA's 100k points on a CPU, milliseconds on a GPU); the
        module itself is built on the CPU either way."""
        super().__init__()
        self.cfg = cfg
        xyz = init.xyz.detach().float().cpu()
        n = xyz.shape[0]
        r = float(init.head_radius)
        if n < 1 or not r > 0:
            raise ValueError(f"need at least one point and a positive head radius (n={n}, r={r})")
        self.register_buffer("head_radius", torch.tensor(r))
        self.register_buffer("head_center", init.center.detach().float().cpu().reshape(3))
        self.register_buffer("pose_t_ref", init.pose_t_ref.detach().float().cpu().reshape(3))
        self.register_buffer("pose_t_unit", torch.tensor(float(init.pose_t_unit)))
        if anchors is None:
            anchors = select_face_anchors(xyz, self.head_center, r, cone_deg=cfg.face_cone_deg,
                                          max_dist=cfg.face_max_dist,
                                          max_anchors=cfg.max_face_anchors)
        self.register_buffer("face_anchors", anchors.detach().float().cpu().reshape(-1, 3))

        if cfg.init_scale is not None:
            log_s = torch.full((n, 3), math.log(cfg.init_scale * r))
        else:
            d2 = knn_mean_sq_dist(xyz.to(setup_device)).cpu()
            log_s = 0.5 * torch.log(d2.clamp_min(1e-14))[:, None].repeat(1, 3)
        rot = torch.zeros(n, 4)
        rot[:, 0] = 1.0
        if init.rgb is not None and cfg.base_color:
            c = init.rgb.detach().float().cpu().clamp(0.02, 0.98)
            if cfg.color_dim != c.shape[1]:
                raise ValueError(f"init colours have {c.shape[1]} channels, model {cfg.color_dim}")
            col = torch.log(c) - torch.log1p(-c)
        else:
            col = torch.zeros(n, cfg.color_dim)
        p = cfg.init_opacity
        self.gaussians = nn.ParameterDict({
            "xyz": nn.Parameter(xyz),
            # GHA starts features from its mesh stage; without one, small noise breaks symmetry
            "features": nn.Parameter(
                0.01 * torch.randn(n, cfg.feature_dim, generator=torch.Generator().manual_seed(cfg.seed))),
            "rotation": nn.Parameter(rot),
            "log_scales": nn.Parameter(log_s.float()),
            "opacity_logit": nn.Parameter(torch.full((n,), math.log(p / (1 - p)))),
            "color_logit": nn.Parameter(col, requires_grad=cfg.base_color),
        })

        d_pos = 3 * (1 + 2 * cfg.pos_freqs)
        d_pose = 6 * (1 + 2 * cfg.pose_freqs)
        w, z, f, e = cfg.mlp_width, cfg.zero_init_last, cfg.feature_dim, cfg.exp_dim
        # A private RNG stream: the same config gives the same model whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.exp_deform_mlp = _mlp(d_pos + e, w, cfg.exp_deform_depth, 3, z)
            self.pose_deform_mlp = _mlp(d_pos + d_pose, w, cfg.pose_deform_depth, 3, z)
            self.exp_color_mlp = _mlp(f + e, w, cfg.exp_color_depth, cfg.color_dim, z)
            self.pose_color_mlp = _mlp(f + d_pose, w, cfg.pose_color_depth, cfg.color_dim, z)
            self.exp_attr_mlp = _mlp(f + e, w, cfg.exp_attr_depth, 8, z)
            self.pose_attr_mlp = _mlp(f + d_pose, w, cfg.pose_attr_depth, 8, z)

    # -- construction helpers

    @classmethod
    def from_state_dict(cls, cfg: AvatarConfig, state: Mapping[str, Tensor]) -> GaussianHeadAvatar:
        """A model shaped like ``state`` (any N, any anchor count) with its weights loaded."""
        # Built from one point: load_state_dict resizes every per-Gaussian tensor to the
        # checkpoint's N, and an N-point init would run the O(N^2) initial-scale search for
        # nothing (minutes for a grown GPU model).
        init = PointCloudInit(xyz=torch.zeros(1, 3), rgb=None, center=torch.zeros(3),
                              head_radius=1.0, pose_t_ref=torch.zeros(3))
        model = cls(cfg, init, anchors=torch.zeros(1, 3))
        model.load_state_dict(state)
        return model

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False):
        """As ``nn.Module.load_state_dict``, but first resizes the per-Gaussian parameters and
        the anchors to the checkpoint's counts (densification changes N). Build optimizers
        after loading: the parameter objects are new."""
        for key in list(self.gaussians.keys()):
            t = state_dict.get(f"gaussians.{key}")
            if t is not None and t.shape != self.gaussians[key].shape:
                old = self.gaussians[key]
                self.gaussians[key] = nn.Parameter(torch.empty(t.shape, dtype=old.dtype,
                                                                device=old.device),
                                                   requires_grad=old.requires_grad)
        a = state_dict.get("face_anchors")
        if a is not None and a.shape != self.face_anchors.shape:
            self.face_anchors = torch.empty(a.shape, dtype=self.face_anchors.dtype,
                                            device=self.face_anchors.device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_face_anchors(self, anchors: Tensor) -> None:
        """Replace the face anchors (A, 3) canonical, e.g. with tracked neutral landmarks."""
        self.face_anchors = anchors.detach().to(self.face_anchors).reshape(-1, 3)

    @property
    def num_gaussians(self) -> int:
        return int(self.gaussians["xyz"].shape[0])

    # -- the deformation

    def blend_weight(self, xyz: Tensor | None = None) -> Tensor:
        """lambda (N,) in [0, 1]: 1 within t_near head radii of the nearest face anchor, 0
        beyond t_far, linear in between (on the squared distance if cfg.squared_distance)."""
        x = self.gaussians["xyz"] if xyz is None else xyz
        d = torch.cdist(x, self.face_anchors).amin(dim=1) / self.head_radius
        if self.cfg.squared_distance:
            d = d * d
        c = self.cfg
        return ((c.t_far - d) / (c.t_far - c.t_near)).clamp(0.0, 1.0)

    def encode_pose(self, pose: Tensor) -> Tensor:
        """(B, 6) -> (B, 6(1+2L)): axis-angle as is, translation centred on pose_t_ref in units
        of pose_t_unit (so a PE octave means the same for any world unit), then PE."""
        t = (pose[:, 3:] - self.pose_t_ref) / self.pose_t_unit
        return positional_encoding(torch.cat([pose[:, :3], t], dim=1), self.cfg.pose_freqs)

    def forward(self, exp: Tensor, pose: Tensor, scale: Tensor) -> dict[str, Tensor]:
        """World-space Gaussians for one sample or a batch.

        exp (D,) or (B, D); pose (6,) or (B, 6), axis-angle rad + world translation; scale ()
        or (B,), world units per canonical unit. Returns, with a leading B only for batched
        input: ``means`` (N, 3) world; ``quats`` (N, 4) unit wxyz, world; ``scales`` (N, 3)
        linear std, world units; ``opacities`` (N,); ``colors`` (N, C) in [0, 1];
        ``xyz_deformed`` (N, 3) canonical after deformation; ``blend`` (N,) lambda.
        """
        single = exp.ndim == 1
        exp_b = exp.reshape(-1, exp.shape[-1])
        pose_b = pose.reshape(-1, 6)
        scale_b = scale.reshape(-1)
        b = exp_b.shape[0]
        if exp_b.shape[1] != self.cfg.exp_dim or pose_b.shape[0] != b or scale_b.shape[0] != b:
            raise ValueError(f"expected exp (B, {self.cfg.exp_dim}), pose (B, 6), scale (B,); got "
                             f"{tuple(exp.shape)}, {tuple(pose.shape)}, {tuple(scale.shape)}")
        g = self.gaussians
        xyz, n = g["xyz"], self.num_gaussians
        feat = torch.tanh(g["features"])
        lam = self.blend_weight()
        x_pe = positional_encoding((xyz - self.head_center) / self.head_radius, self.cfg.pos_freqs)
        p_pe = self.encode_pose(pose_b)

        # Like GHA, run each branch only on the Gaussians it controls (lambda > 0 / < 1):
        # most of the head is pose-only, so this roughly halves the expression MLP work.
        d_xyz = xyz.new_zeros(b, n, 3)
        d_attr = xyz.new_zeros(b, n, 8)
        d_col = xyz.new_zeros(b, n, self.cfg.color_dim)
        for branch, cond, w in (("exp", exp_b, lam), ("pose", p_pe, 1.0 - lam)):
            idx = torch.nonzero(w > 0, as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            m = idx.numel()
            c = cond[:, None, :].expand(b, m, cond.shape[1])
            geo_in = torch.cat([x_pe[idx].expand(b, m, x_pe.shape[1]), c], dim=-1)
            app_in = torch.cat([feat[idx].expand(b, m, feat.shape[1]), c], dim=-1)
            wi = w[idx][None, :, None]
            deform = getattr(self, f"{branch}_deform_mlp")(geo_in)
            d_xyz = d_xyz.index_add(1, idx, torch.tanh(deform) * wi)
            d_attr = d_attr.index_add(1, idx, getattr(self, f"{branch}_attr_mlp")(app_in) * wi)
            d_col = d_col.index_add(1, idx, getattr(self, f"{branch}_color_mlp")(app_in) * wi)

        x_def = xyz + d_xyz * (self.cfg.deform_scale * self.head_radius)
        a = self.cfg.attributes_scale
        log_s = g["log_scales"] + a * d_attr[..., 0:3]
        quat = F.normalize(g["rotation"] + a * d_attr[..., 3:7], dim=-1)
        opac = torch.sigmoid(g["opacity_logit"] + a * d_attr[..., 7])
        colors = torch.sigmoid(g["color_logit"] + d_col)

        # Rigid head transform: x_world = s R x + t; orientations composed with R; scales * s.
        q_head = axis_angle_to_quat(pose_b[:, :3])  # (B, 4)
        R = quat_to_matrix(q_head)  # (B, 3, 3)
        s = scale_b[:, None, None]
        means = s * torch.einsum("bij,bnj->bni", R, x_def) + pose_b[:, None, 3:]
        quats = quat_multiply(q_head[:, None, :].expand(b, n, 4), quat)
        out = {"means": means, "quats": quats, "scales": torch.exp(log_s) * s,
               "opacities": opac, "colors": colors, "xyz_deformed": x_def,
               "blend": lam.expand(b, n)}
        return {k: v[0] for k, v in out.items()} if single else out

    # -- optimisation

    def network_parameters(self) -> list[Tensor]:
        """Every MLP weight (everything that is not per-Gaussian)."""
        return [p for name, p in self.named_parameters() if not name.startswith("gaussians.")]

    def param_groups(self, lr_net: float = 1e-4, preset: str = "3dgs") -> list[dict[str, Any]]:
        """Adam parameter groups, one per per-Gaussian key (``name`` = key) plus ``networks``.

        lr_net: all MLPs (GHA/paper 1e-4). Per-Gaussian rates:
        - ``"gha"``: GHA's multiples of lr_net (xyz 0.1, features 0.1, log_scales 0.3,
          rotation 0.1, opacity 1.0; ours: color 1.0). GHA starts from a fitted mesh-head, so
          these small rates refine rather than learn geometry; xyz is scaled by head_radius
          (GHA's canonical unit is about one head radius).
        - ``"3dgs"`` (default, better from a hull/ellipsoid start): 3D Gaussian Splatting's
          rates: xyz 1.6e-4 head radii/step, colour 2.5e-3, features 2.5e-3, opacity 5e-2,
          log_scales 5e-3, rotation 1e-3 (3DGS decays the xyz rate 100x over training).
        """
        r = float(self.head_radius)
        if preset == "gha":
            rates = {"xyz": 0.1 * lr_net * r, "features": 0.1 * lr_net, "rotation": 0.1 * lr_net,
                     "log_scales": 0.3 * lr_net, "opacity_logit": lr_net, "color_logit": lr_net}
        elif preset == "3dgs":
            rates = {"xyz": 1.6e-4 * r, "features": 2.5e-3, "rotation": 1e-3, "log_scales": 5e-3,
                     "opacity_logit": 5e-2, "color_logit": 2.5e-3}
        else:
            raise ValueError(f"unknown preset {preset!r}; expected 'gha' or '3dgs'")
        groups = [{"name": k, "params": [p], "lr": rates[k]} for k, p in self.gaussians.items()
                  if p.requires_grad]
        groups.append({"name": "networks", "params": self.network_parameters(), "lr": lr_net})
        return groups


__all__ = [
    "AvatarConfig", "GaussianHeadAvatar", "HullSample", "PointCloudInit",
    "axis_angle_to_matrix", "axis_angle_to_quat", "canonical_head_radius", "head_ellipsoid_radii",
    "init_ellipsoid", "init_from_visual_hull", "knn_mean_sq_dist", "positional_encoding",
    "quat_multiply", "quat_to_matrix", "select_face_anchors",
]
