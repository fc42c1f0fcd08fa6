"""Readers for real tracker outputs, each returning a validated :class:`Tracking`.

* Multiview-3DMM-Fitting (BFM09, as used by Gaussian Head Avatar): one folder per frame,
  ``{frame}/params.npz`` with id_coeff (1, 80), exp_coeff (1, 64), scale (1,), pose (1, 6).
* NeRSemble benchmark FLAME tracking: one npz per sequence with per-frame arrays.

Every error is a SourceError naming the exact file (for BFM, the frame's npz) and the key.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from rafdata.errors import SourceError
from rafdata.rotations import euler_xyz_intrinsic_to_matrix, matrix_to_axis_angle, rotation_errors
from rafdata.sources.base import Tracking

BFM_EXP_DIM = 64
BFM_EXP_SPACE = "bfm09"
FLAME_PARTS = {"expression": 100, "jaw": 3, "neck": 3, "eyes": 6}


def frame_folders(folder: Path) -> list[tuple[int, Path]]:
    """Sub-folders of ``folder`` named by a frame number (any zero padding), sorted by it.

    Raises SourceError when two folders name the same frame (e.g. "3" and "0003").
    """
    found: dict[int, Path] = {}
    for child in folder.iterdir():
        if child.name.isdigit() and child.is_dir():
            frame = int(child.name)
            if frame in found:
                raise SourceError(
                    folder, f"frame {frame} appears twice: {found[frame].name} and {child.name}"
                )
            found[frame] = child
    return sorted(found.items())


def read_bfm_params(folder: Path) -> Tracking:
    """Read ``folder/{frame}/params.npz`` for every frame folder (other files are ignored).

    Returns frames (T,) int64 sorted, exp (T, 64) float32 in space "bfm09", pose (T, 6)
    float32 (axis-angle, translation), scale (T,) float32.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(folder, "BFM params folder not found")
    items = frame_folders(folder)
    if not items:
        raise SourceError(folder, "no frame folders (e.g. 0000/params.npz): tracking is empty")
    t = len(items)
    frames = np.empty(t, np.int64)
    exp = np.empty((t, BFM_EXP_DIM), np.float32)
    pose = np.empty((t, 6), np.float32)
    scale = np.empty(t, np.float32)
    for row, (frame, sub) in enumerate(items):
        path = sub / "params.npz"
        data = _load_npz(path)
        frames[row] = frame
        exp[row] = _vector(data, path, "exp_coeff", BFM_EXP_DIM)
        pose[row] = _vector(data, path, "pose", 6)
        scale[row] = _vector(data, path, "scale", 1)[0]
    return Tracking(frames=frames, exp=exp, pose=pose, scale=scale, exp_space=BFM_EXP_SPACE,
                    path=folder)


def parse_flame_exp(flame_exp: str) -> list[str]:
    """Split "expression+jaw" into its parts, validated against :data:`FLAME_PARTS`."""
    parts = [p.strip() for p in flame_exp.split("+")]
    bad = [p for p in parts if p not in FLAME_PARTS]
    if bad or not parts or len(set(parts)) != len(parts):
        raise ValueError(
            f"invalid FLAME expression parts {flame_exp!r}: give distinct parts among "
            f"{'+'.join(FLAME_PARTS)}, joined by '+'"
        )
    return parts


def flame_exp_space(flame_exp: str) -> str:
    """The store's exp_space for a FLAME parts selection, e.g. "flame2023:expression+jaw"."""
    return "flame2023:" + "+".join(parse_flame_exp(flame_exp))


def read_flame_npz(path: Path, flame_exp: str = "expression+jaw") -> Tracking:
    """Read a NeRSemble-benchmark FLAME tracking npz.

    exp: (T, D) float32, the concatenation of the ``flame_exp`` parts in the given order
    (expression 100, jaw 3, neck 3, eyes 6; "expression+jaw" gives D = 103). pose: (T, 6)
    float32 = concat(axis-angle rotation, translation): the rotation from
    ``rotation_matrices`` when present, else from ``rotation`` read as intrinsic XYZ Euler
    angles (the toolkit's convention). scale: (T,) float32 broadcast from (1, 1).
    frames: (T,) int64 video frame indices from the ``frames`` key.
    """
    path = Path(path)
    try:
        parts = parse_flame_exp(flame_exp)
    except ValueError as exc:
        raise SourceError(path, str(exc)) from exc
    data = _load_npz(path)
    frames_raw = _get(data, path, "frames")
    if frames_raw.ndim != 1:
        raise SourceError(path, f"key 'frames' has shape {frames_raw.shape}, expected (T,)")
    t = frames_raw.shape[0]
    if t == 0:
        raise SourceError(path, "tracking is empty (key 'frames' has no entries)")
    frames = _frame_indices(frames_raw, path)

    def per_frame(key: str, dim: int) -> np.ndarray:
        arr = _get(data, path, key)
        if arr.shape != (t, dim):
            raise SourceError(path, f"key '{key}' has shape {arr.shape}, expected ({t}, {dim}) "
                              f"to match 'frames' ({t},)")
        _finite(arr, path, key)
        return arr.astype(np.float32)

    exp = np.concatenate([per_frame(p, FLAME_PARTS[p]) for p in parts], axis=1)
    rotation = _flame_axis_angle(data, path, per_frame, t)
    pose = np.concatenate([rotation, per_frame("translation", 3)], axis=1)
    scale_raw = _get(data, path, "scale")
    if scale_raw.size == 1:
        scale = np.full(t, float(scale_raw.reshape(())), np.float32)
    elif scale_raw.size == t:
        scale = scale_raw.reshape(t).astype(np.float32)
    else:
        raise SourceError(path, f"key 'scale' has shape {scale_raw.shape}, expected (1, 1) or ({t},)")
    _finite(scale, path, "scale")
    return Tracking(frames=frames, exp=np.ascontiguousarray(exp), pose=pose, scale=scale,
                    exp_space=flame_exp_space(flame_exp), path=path)


def _flame_axis_angle(data: dict[str, np.ndarray], path: Path, per_frame, t: int) -> np.ndarray:
    """(T, 3) float32 axis-angle head rotations of a FLAME tracking file.

    ``rotation_matrices`` (T, 3, 3), when present, is unambiguous and wins; otherwise
    ``rotation`` is read as the NeRSemble toolkit reads it, intrinsic XYZ Euler angles.
    """
    if "rotation_matrices" in data:
        mats = data["rotation_matrices"]
        if mats.shape != (t, 3, 3):
            raise SourceError(path, f"key 'rotation_matrices' has shape {mats.shape}, expected "
                              f"({t}, 3, 3) to match 'frames' ({t},)")
        _finite(mats, path, "rotation_matrices")
        bad = np.flatnonzero(rotation_errors(mats) > ROTATION_TOLERANCE)
        if bad.size:
            raise SourceError(path, f"key 'rotation_matrices' holds {bad.size} matrices that are "
                              f"not rotations (first at index {int(bad[0])})")
        return matrix_to_axis_angle(mats).astype(np.float32)
    euler = per_frame("rotation", 3).astype(np.float64)
    return matrix_to_axis_angle(euler_xyz_intrinsic_to_matrix(euler)).astype(np.float32)


ROTATION_TOLERANCE = 1e-3  # max |R^T R - I| entry of a stored rotation (float32 round-off)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an npz, loaded eagerly (the file is closed on return)."""
    if not path.is_file():
        raise SourceError(path, "tracking file not found")
    if not zipfile.is_zipfile(path):  # np.load would call anything else a pickle
        raise SourceError(path, "not an .npz archive (damaged or truncated file?)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SourceError(path, f"cannot read npz: {exc}") from exc


def _get(data: dict[str, np.ndarray], path: Path, key: str) -> np.ndarray:
    if key not in data:
        raise SourceError(path, f"missing key '{key}' (has: {', '.join(sorted(data)) or 'none'})")
    arr = data[key]
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise SourceError(path, f"key '{key}' is not numeric (dtype {arr.dtype})")
    return arr


def _vector(data: dict[str, np.ndarray], path: Path, key: str, dim: int) -> np.ndarray:
    """One frame's vector: (1, dim), (dim,) or a scalar when dim == 1."""
    arr = _get(data, path, key)
    if arr.size != dim:
        raise SourceError(path, f"key '{key}' has shape {arr.shape}, expected (1, {dim})")
    arr = arr.reshape(dim)
    _finite(arr, path, key)
    return arr


def _finite(arr: np.ndarray, path: Path, key: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))
        where = f" (first at index {tuple(int(i) for i in bad[0])})" if bad.size else ""
        raise SourceError(path, f"key '{key}' holds NaN or inf values{where}")


def _frame_indices(raw: np.ndarray, path: Path) -> np.ndarray:
    """(T,) int64 frame indices; must be integral, non-negative and strictly increasing."""
    if np.issubdtype(raw.dtype, np.floating):
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise SourceError(path, "key 'frames' holds non-integer values")
    elif not np.issubdtype(raw.dtype, np.integer):
        raise SourceError(path, f"key 'frames' has dtype {raw.dtype}, expected integers")
    frames = raw.astype(np.int64)
    if frames.size and frames.min() < 0:
        raise SourceError(path, f"key 'frames' holds a negative frame index {int(frames.min())}")
    if np.any(np.diff(frames) <= 0):
        i = int(np.argmax(np.diff(frames) <= 0))
        raise SourceError(path, f"key 'frames' is not strictly increasing "
                          f"({int(frames[i])} then {int(frames[i + 1])})")
    return frames
