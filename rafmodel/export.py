"""Deformed Gaussians of one frame as a standard 3D Gaussian Splatting ``.ply``.

The layout is the one the original 3DGS code writes and the common viewers (SuperSplat,
antimatter15/splat, ...) load: one binary little-endian ``vertex`` element with float32
properties

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 .. f_rest_44  opacity
    scale_0 scale_1 scale_2  rot_0 rot_1 rot_2 rot_3

- x y z: world position (the store's world units); nx ny nz: zeros (3DGS writes zeros too);
- f_dc: degree-0 spherical-harmonic coefficient, ``(rgb - 0.5) / C0`` with C0 = 0.2820948, so a
  viewer's ``0.5 + C0 * f_dc`` gives back our RGB; f_rest: zeros (our colours do not depend on
  the view direction), 45 of them, as degree-3 viewers expect;
- opacity: a logit (viewers apply a sigmoid); scale_*: natural logs of the linear standard
  deviations (viewers apply exp); rot_*: the unit quaternion w x y z.

The round trip (:func:`write_ply` then :func:`read_ply`) loses only float32 rounding: the
re-rendered image matches the avatar's own render to ~1e-6 (tested below 1e-5 on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rafdata.commit import atomic_write
from rafdata.errors import RafDataError
from rafdata.progress import NullProgress, Progress
from rafmodel.config import ExportConfig
from rafmodel.evaluate.cross_driving import subject_pose  # the eval's pose rule, shared

SH_C0 = 0.28209479177387814  # degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
N_REST = 45  # f_rest_* of a degree-3 3DGS file (15 coefficients x 3 channels)
# Opacity stored as a logit: keep it finite. 1 - 1e-7 still rounds to 1 in float32 on read,
# and the renderers clamp alpha to 0.999 anyway, so the clamp changes no pixel.
_OPACITY_EPS = 1e-7


def ply_properties() -> list[str]:
    """The vertex property names, in file order."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(N_REST)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


@dataclass
class PlyGaussians:
    """N Gaussians as :func:`rafmodel.render.render` takes them (all float32, CPU).

    means (N, 3) world; quats (N, 4) unit wxyz; scales (N, 3) linear std, world units;
    opacities (N,) in [0, 1]; colors (N, 3) RGB in [0, 1] (from f_dc; f_rest is ignored).
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor

    def __len__(self) -> int:
        return int(self.means.shape[0])


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def write_ply(path: str | Path, means: Tensor, quats: Tensor, scales: Tensor,
              opacities: Tensor, colors: Tensor) -> Path:
    """Write N Gaussians (the avatar's forward output, world space) as a 3DGS ``.ply``.

    means (N, 3); quats (N, 4) wxyz (normalised here); scales (N, 3) linear std > 0;
    opacities (N,) in [0, 1]; colors (N, 3) RGB in [0, 1]. Written to a temporary file beside
    ``path`` and renamed, so a reader never sees half a file. Returns ``path``.
    """
    n = means.shape[0]
    if colors.ndim != 2 or colors.shape[1] != 3:
        raise ValueError(f"a 3DGS .ply holds RGB colours; got colors {tuple(colors.shape)}")
    if (means.shape != (n, 3) or quats.shape != (n, 4) or scales.shape != (n, 3)
            or opacities.shape != (n,) or colors.shape[0] != n):
        raise ValueError("means/quats/scales/opacities/colors must be (N,3)/(N,4)/(N,3)/(N,)/"
                         f"(N,3); got {tuple(means.shape)}/{tuple(quats.shape)}/"
                         f"{tuple(scales.shape)}/{tuple(opacities.shape)}/{tuple(colors.shape)}")
    # float64 for the transforms so that only the final float32 cast rounds
    q = _np(quats)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    o = _np(opacities).clip(_OPACITY_EPS, 1 - _OPACITY_EPS)
    cols = [_np(means), np.zeros((n, 3)), (_np(colors) - 0.5) / SH_C0, np.zeros((n, N_REST)),
            (np.log(o) - np.log1p(-o))[:, None], np.log(_np(scales).clip(1e-30)), q]
    data = np.concatenate(cols, axis=1).astype("<f4")
    names = ply_properties()
    header = ("ply\nformat binary_little_endian 1.0\ncomment rafmodel export: 3DGS layout\n"
              f"element vertex {n}\n" + "".join(f"property float {p}\n" for p in names)
              + "end_header\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = np.ascontiguousarray(data).tobytes()
    return atomic_write(path, lambda f: (f.write(header.encode("ascii")), f.write(body)))


def read_ply(path: str | Path) -> PlyGaussians:
    """Read a 3DGS ``.ply`` (ours or another tool's: binary little-endian, float vertex
    properties in any order, extra properties ignored) back into render() inputs.

    Raises RafDataError naming the file when it is not such a file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RafDataError(path, "no such file") from None
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise RafDataError(path, "not a PLY file (no 'ply' / 'end_header')")
    header = raw[:end].decode("ascii", "replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise RafDataError(path, "only binary little-endian PLY files are read")
    n, props, in_vertex = None, [], False
    types = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
             "uchar": "u1", "uint8": "u1", "int": "<i4", "int32": "<i4"}
    for line in header:
        parts = line.split()
        if parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                n = int(parts[2])
            elif n is None:
                raise RafDataError(path, "the vertex element must come first")
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] == "list" or parts[1] not in types:
                raise RafDataError(path, f"unsupported vertex property: {line}")
            props.append((parts[2], types[parts[1]]))
    if n is None:
        raise RafDataError(path, "no vertex element")
    dtype = np.dtype(props)
    body = raw[end + len(b"end_header\n"):]
    if len(body) < n * dtype.itemsize:
        raise RafDataError(path, f"truncated: {n} vertices need {n * dtype.itemsize} bytes, "
                           f"the file has {len(body)}")
    v = np.frombuffer(body, dtype=dtype, count=n)
    missing = [p for p in ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0",
                           "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
               if p not in dtype.names]
    if missing:
        raise RafDataError(path, f"not a 3DGS PLY: missing {', '.join(missing)}")

    def cols(*names: str) -> np.ndarray:
        return np.stack([v[c].astype(np.float64) for c in names], axis=1)

    q = cols("rot_0", "rot_1", "rot_2", "rot_3")
    q /= np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return PlyGaussians(
        means=t(cols("x", "y", "z")), quats=t(q),
        scales=t(np.exp(cols("scale_0", "scale_1", "scale_2"))),
        opacities=t(1.0 / (1.0 + np.exp(-v["opacity"].astype(np.float64)))),
        colors=t(cols("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5))


# -- which frame ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameCoeffs:
    """What drives the avatar for one exported frame.

    exp (D,), pose (6,) axis-angle + translation, scale () as the avatar takes them;
    timestep: the /timesteps row they come from; label: for file names and messages.
    """

    exp: Tensor
    pose: Tensor
    scale: Tensor
    timestep: int
    label: str


@dataclass(frozen=True)
class SubjectPose:
    """What the cross-driving pose rule takes from the avatar's subject: its /identities row,
    mean translation (3,) float64 (world units) and median scale. The same for every frame:
    make it once per subject (:meth:`of`) and pass it to :func:`driving_coeffs`."""

    identity: int
    translation: np.ndarray
    scale: float

    @classmethod
    def of(cls, store, subject: str) -> SubjectPose:
        """``subject``'s pose summary (RafDataError for an identity not in the store)."""
        identity = store.identity_index(subject)
        translation, scale = subject_pose(store, identity)
        return cls(identity, translation, scale)


def driving_coeffs(store, subject: SubjectPose, timestep: int) -> FrameCoeffs:
    """The coefficients that drive ``subject``'s avatar with /timesteps row ``timestep``.

    The subject's own timestep (self-driving) is used as tracked; another identity's timestep
    (cross-driving) keeps its expression and head rotation and takes the subject's mean
    translation and median scale, as ``rafmodel eval`` does.
    """
    ts = store.timesteps
    if not 0 <= timestep < len(ts):
        raise RafDataError(store.path, f"timestep {timestep} out of range (the store has "
                           f"{len(ts)}: 0..{len(ts) - 1})")
    pose = ts.pose[timestep].astype(np.float64)
    scale = float(ts.scale[timestep])
    if int(ts.identity[timestep]) != subject.identity:
        pose = np.concatenate([pose[:3], subject.translation])
        scale = subject.scale
    ident = store.identities[int(ts.identity[timestep])]
    seq = store.sequences.name[int(ts.sequence[timestep])]
    return FrameCoeffs(exp=torch.from_numpy(ts.exp[timestep].astype(np.float32)),
                       pose=torch.from_numpy(pose.astype(np.float32)),
                       scale=torch.tensor(scale, dtype=torch.float32), timestep=timestep,
                       label=f"{ident}_{seq}_{int(ts.frame[timestep]):05d}")


def sequence_timesteps(store, driver: str, sequence: str | None = None) -> np.ndarray:
    """/timesteps rows of one of ``driver``'s sequences, in frame order (default: its first
    held-out sequence, the evaluation's driver, else its first sequence)."""
    ident = store.identity_index(driver)
    seqs = store.sequence_rows(identity=ident)
    if not len(seqs):
        raise RafDataError(store.path, f"identity {driver} has no sequences")
    names = {store.sequences.name[s]: s for s in seqs}
    if sequence is None:
        held = [s for s in seqs if bool(store.sequences.held_out[s])]
        seq = int(held[0] if held else seqs[0])
    elif sequence in names:
        seq = int(names[sequence])
    else:
        raise RafDataError(store.path, f"identity {driver} has no sequence {sequence!r} "
                           f"(has: {', '.join(sorted(names))})")
    rows = np.flatnonzero(store.timesteps.sequence == seq)
    return rows[np.argsort(store.timesteps.frame[rows], kind="stable")]


def find_frame(store, driver: str, frame: int, sequence: str | None = None) -> int:
    """The /timesteps row of ``driver``'s video frame ``frame`` (as stored in
    /timesteps/frame) in ``sequence`` (default as :func:`sequence_timesteps`)."""
    rows = sequence_timesteps(store, driver, sequence)
    frames = store.timesteps.frame[rows]
    hit = np.flatnonzero(frames == frame)
    if not len(hit):
        seq = store.sequences.name[int(store.timesteps.sequence[rows[0]])]
        raise RafDataError(store.path, f"{driver} {seq} has no tracked frame {frame} (frames "
                           f"{int(frames.min())}..{int(frames.max())}, "
                           f"{len(frames)} tracked)")
    return int(rows[hit[0]])


def export_timesteps(store, subject: str, cfg: ExportConfig) -> list[int]:
    """The /timesteps rows ``cfg`` exports for ``subject``'s avatar, in frame order:
    ``cfg.timestep`` itself; every frame of the driver's sequence (``cfg.all_frames``); the
    driver's video frame ``cfg.frame``; else the first frame of the driver's sequence. The
    driver defaults to ``subject``. RafDataError (one line) for contradicting options, an
    unknown driver, sequence or frame."""
    cfg.validate()
    if cfg.timestep is not None:
        return [cfg.timestep]
    driver = cfg.driver or subject
    if cfg.frame is not None:
        return [find_frame(store, driver, cfg.frame, cfg.sequence)]
    rows = sequence_timesteps(store, driver, cfg.sequence)
    return [int(t) for t in (rows if cfg.all_frames is not None else rows[:1])]


@torch.no_grad()
def frame_gaussians(model: torch.nn.Module, c: FrameCoeffs,
                    device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The avatar's world-space Gaussians for one frame (the forward pass, no grad)."""
    return model(c.exp.to(device), c.pose.to(device), c.scale.to(device))


def export_frames(model: torch.nn.Module, frames: list[FrameCoeffs], out: Path,
                  single: bool, device: torch.device | str = "cpu",
                  progress: Callable[[], None] | None = None) -> list[Path]:
    """Write one ``.ply`` per frame: ``out`` itself when ``single``, else
    ``out/{identity}_{sequence}_{frame:05d}.ply``. Returns the written paths."""
    paths = []
    for c in frames:
        g = frame_gaussians(model, c, device)
        path = out if single else out / f"{c.label}.ply"
        paths.append(write_ply(path, g["means"], g["quats"], g["scales"], g["opacities"],
                               g["colors"]))
        if progress is not None:
            progress()
    return paths


@dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote: ``paths`` (one per frame, in frame order), the
    ``frames`` that drove the avatar, and the Gaussians per frame."""

    paths: list[Path]
    frames: list[FrameCoeffs]
    num_gaussians: int


def export_run(run: str | Path, store: str | Path | None, cfg: ExportConfig,
               progress: Progress | None = None) -> Exported:
    """Export a trained run's Gaussians as ``cfg`` says (see :class:`ExportConfig`).

    run: run folder or checkpoint; store: None for the run's training store. The options are
    checked before anything is loaded; RafDataError (one line) for bad options, a bad run or
    store, an unknown frame. ``progress``: one step per file written."""
    from rafdata.store import Store
    from rafmodel.device import select_device
    from rafmodel.evaluate.runs import load_run

    cfg.validate()
    progress = progress or NullProgress()
    device = select_device(cfg.device)
    info = load_run(run, device)
    with Store(store if store is not None else info.train["store"]) as st:
        subject = SubjectPose.of(st, info.subject)  # once: the same for every frame
        frames = [driving_coeffs(st, subject, t)
                  for t in export_timesteps(st, info.subject, cfg)]
    single = cfg.ply is not None
    progress.start("exporting", len(frames))
    paths = export_frames(info.model, frames, Path(cfg.ply if single else cfg.all_frames),
                          single=single, device=device, progress=lambda: progress.advance(1))
    return Exported(paths, frames, info.model.num_gaussians)


__all__ = ["N_REST", "SH_C0", "Exported", "FrameCoeffs", "PlyGaussians", "SubjectPose",
           "driving_coeffs", "export_frames", "export_run", "export_timesteps", "find_frame",
           "frame_gaussians", "ply_properties", "read_ply", "sequence_timesteps", "write_ply"]
