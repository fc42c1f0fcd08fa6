"""Readers for real tracker outputs, each returning a validated :class:`Tracking`.

* Multiview-3DMM-Fitting (BFM09, as used by Gaussian Head Avatar): one folder per frame,
  ``{frame}/params.npz`` with id_coeff (1, 80), exp_coeff (1, 64), scale (1,), pose (1, 6).
* NeRSemble benchmark FLAME tracking: one npz per sequence with per-frame arrays.

Every error is a SourceError naming the exact file (for BFM, the frame's npz) and the key.
Every number is checked *after* its cast to the store's float32: 1e39 is a finite float64 but
an inf in the store.

The per-frame BFM files are many (249k at paper scale) and tiny, so they go through a lean npz
reader (:func:`read_npz_arrays`) that skips most of ``np.load``'s per-file machinery;
:func:`read_trackings` reads many sequences on a thread pool.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rafdata.errors import SourceError
from rafdata.rotations import euler_xyz_intrinsic_to_matrix, matrix_to_axis_angle, rotation_errors
from rafdata.sources.base import SequenceSource, Tracking, is_number, shown

BFM_EXP_DIM = 64
BFM_EXP_SPACE = "bfm09"
FLAME_PARTS = {"expression": 100, "jaw": 3, "neck": 3, "eyes": 6}


def frame_folders(folder: Path, warn: Callable[[str], None] | None = None) -> list[tuple[int, Path]]:
    """Sub-folders of ``folder`` named by a frame number (any zero padding), sorted by it.

    Frame numbers are ASCII digits only. Other sub-folders are skipped, with one line to
    ``warn`` naming them (hidden ones, ".*", silently): "0003 " or "①" would otherwise vanish
    without a word. Raises SourceError when two folders name the same frame ("3" and "0003").
    """
    return [(frame, Path(sub)) for frame, sub in _frame_entries(folder, warn)]


def _frame_entries(folder: Path, warn: Callable[[str], None] | None) -> list[tuple[int, str]]:
    """:func:`frame_folders` with str paths: a Path per frame costs more than reading it."""
    found: dict[int, str] = {}
    odd: list[str] = []
    # scandir: the file type comes with the listing, no stat per entry (250k frame folders).
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _is_dir(entry):
                continue
            name = entry.name
            if not is_number(name):
                if not name.startswith("."):
                    odd.append(name)
                continue
            frame = int(name)
            if frame in found:
                raise SourceError(folder, f"frame {frame} appears twice: "
                                  f"{os.path.basename(found[frame])} and {name}")
            found[frame] = entry.path
    if odd and warn is not None:
        odd.sort()
        more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
        warn(f"{folder}: skipped {len(odd)} folder(s) not named by a frame number (ASCII "
             f"digits): {', '.join(shown(n) for n in odd[:3])}{more}")
    return sorted(found.items())


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a dangling link or a permission problem: not a frame folder
        return False


BFM_KEYS = ("exp_coeff", "pose", "scale")  # what the store keeps of a params.npz


def read_bfm_params(folder: Path, warn: Callable[[str], None] | None = None) -> Tracking:
    """Read ``folder/{frame}/params.npz`` for every frame folder (other files are ignored).

    Returns frames (T,) int64 sorted, exp (T, 64) float32 in space "bfm09", pose (T, 6)
    float32 (axis-angle, translation), scale (T,) float32. ``warn`` hears about sub-folders
    skipped because their name is not a frame number.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(folder, "BFM params folder not found")
    items = _frame_entries(folder, warn)
    if not items:
        raise SourceError(folder, "no frame folders (e.g. 0000/params.npz): tracking is empty")
    t = len(items)
    frames = np.empty(t, np.int64)
    exp = np.empty((t, BFM_EXP_DIM), np.float32)
    pose = np.empty((t, 6), np.float32)
    scale = np.empty(t, np.float32)
    for row, (frame, sub) in enumerate(items):
        path = os.path.join(sub, "params.npz")  # str: a Path is made only for a message
        data = read_npz_arrays(path, BFM_KEYS)
        frames[row] = frame
        exp[row] = _vector(data, path, "exp_coeff", BFM_EXP_DIM)
        pose[row] = _vector(data, path, "pose", 6)
        scale[row] = _vector(data, path, "scale", 1)[0]
    return Tracking(frames=frames, exp=exp, pose=pose, scale=scale, exp_space=BFM_EXP_SPACE,
                    path=folder)


TRACKING_THREADS = 4  # read_trackings' default: reads in flight, not cores (I/O bound cold)


def read_trackings(sequences: Iterable[SequenceSource],
                   workers: int = TRACKING_THREADS) -> list[Tracking]:
    """``[s.tracking() for s in sequences]`` read by ``workers`` threads, in the same order.

    Raises the error of the first failing sequence in sequence order (not the first to fail
    in time), as the plain loop would; sequences not started by then are cancelled.
    ``workers`` <= 1 reads in the calling thread. Warnings a source gives while reading
    (its ``warn``) come from the worker threads, so their order may differ from the loop's.

    Threads, chosen by measurement (bench/bench_tracking.py, 20k params.npz on 2 cores):
    from the page cache the reading is GIL-bound parsing and threads gain nothing, while a
    fork process pool gains ~1.2-1.8x; from disk (a first ingest) 4 threads read ~2x faster
    than one, as fast as processes. Processes would also have to pickle sources that hold
    ``warn`` callables and caches, lose the warnings, and fork beside the progress bar's
    refresh thread.
    """
    sequences = list(sequences)
    if workers <= 1 or len(sequences) <= 1:
        return [s.tracking() for s in sequences]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raf-tracking") as pool:
        futures = [pool.submit(s.tracking) for s in sequences]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


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
        return _float32(arr, path, key, frames)

    exp = np.concatenate([per_frame(p, FLAME_PARTS[p]) for p in parts], axis=1)
    rotation = _flame_axis_angle(data, path, per_frame, t)
    pose = np.concatenate([rotation, per_frame("translation", 3)], axis=1)
    scale_raw = _get(data, path, "scale")
    if scale_raw.size == 1:
        scale = np.full(t, _float32(scale_raw.reshape(1), path, "scale")[0], np.float32)
    elif scale_raw.size == t:
        scale = _float32(scale_raw.reshape(t), path, "scale", frames)
    else:
        raise SourceError(path, f"key 'scale' has shape {scale_raw.shape}, expected (1, 1) or ({t},)")
    return Tracking(frames=frames, exp=np.ascontiguousarray(exp), pose=pose, scale=scale,
                    exp_space=flame_exp_space(flame_exp), path=path)


def _flame_axis_angle(data: dict[str, np.ndarray], path: Path, per_frame, t: int) -> np.ndarray:
    """(T, 3) float32 axis-angle head rotations of a FLAME tracking file.

    ``rotation_matrices`` (T, 3, 3), when present, is unambiguous and wins; otherwise
    ``rotation`` is read as the NeRSemble toolkit reads it, intrinsic XYZ Euler angles.
    """
    if "rotation_matrices" in data:
        mats = _get(data, path, "rotation_matrices")
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
    try:  # is_zipfile calls an unreadable file "not a zip": say what it is
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror or exc}") from exc
    if not zipfile.is_zipfile(path):  # np.load would call anything else a pickle
        raise SourceError(path, "not an .npz archive (damaged or truncated file?)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError,
            RuntimeError) as exc:
        # NotImplementedError: a compression method zipfile lacks; RuntimeError: encrypted.
        raise SourceError(path, f"cannot read npz: {exc}") from exc


# -- the lean npz reader --------------------------------------------------------------------
#
# An npz is a zip of .npy files; np.savez stores them uncompressed. For a 1.5 kB params.npz,
# np.load's cost is all per-file machinery: zipfile parses the archive into ZipInfo objects,
# every member is opened as a ZipExtFile and its .npy header is parsed by ast.literal_eval.
# Here the file is read in one call, the central directory is walked with struct, and the
# header dict numpy writes is matched by a regular expression. Anything else (compressed or
# encrypted members, zip64, a missing key, a header numpy did not write, a CRC mismatch,
# object or fortran-ordered arrays) goes to np.load, so errors read exactly as before.

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_CDIR = struct.Struct("<4s4B4HL2L5H2L")  # central directory file header, 46 bytes (zipfile's)
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, 30 bytes
_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=]?[biuf][0-9]{1,2})', 'fortran_order': False, "
    r"'shape': \(((?:[0-9]+, )*[0-9]*|[0-9]+,)\), \} *\n"
)
NPY_MAX_HEADER = 10000  # np.load's max_header_size default
ZIP_MAX_VERSION = 63  # zipfile.MAX_EXTRACT_VERSION: newer members are refused there


def read_npz_arrays(path: str | Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an uncompressed npz, as np.load would give them.

    Returns {key: array} for exactly ``keys`` (read-only arrays over the file's bytes), or,
    when the file is anything but the plain case (see the comment above), everything
    :func:`_load_npz` returns: the caller's missing-key and validation messages stay as they
    were. Raises SourceError naming the file when it is missing, not a zip or damaged.
    """
    keys = tuple(keys)
    try:
        with open(path, "rb") as fh:
            buf = fh.read()
    except OSError:
        return _load_npz(Path(path))  # not found, a folder, no permission: say it as before
    out = _lean_npz(buf, keys)
    return out if out is not None else _load_npz(Path(path))


def _lean_npz(buf: bytes, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """``keys`` read from an npz's bytes, or None for anything but the plain case.

    Every member is checked as np.load (which reads them all) would check it: local header
    and name, bounds, CRC-32, .npy header; a file np.load refuses is never accepted here.
    """
    members = _stored_members(buf)
    if members is None:
        return None
    arrays: dict[str, np.ndarray] = {}
    for name, raw_name, offset, size, crc, limit in members:
        if offset + _LOCAL.size > limit:
            return None
        sig, _, _, _, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack_from(buf, offset)
        start = offset + _LOCAL.size + name_len + extra_len
        if sig != b"PK\x03\x04" or start + size > limit \
                or buf[offset + _LOCAL.size:offset + _LOCAL.size + name_len] != raw_name:
            return None
        data = buf[start:start + size]
        if zlib.crc32(data) != crc:  # zipfile checks it too: a flipped bit is an error there
            return None
        arr = _npy(data)
        if arr is None:
            return None
        arrays[name[:-4] if name.endswith(".npy") else name] = arr
    if any(key not in arrays for key in keys):
        return None  # the caller's message lists the keys the file has: np.load's view
    return {key: arrays[key] for key in keys}


def _stored_members(buf: bytes) -> list[tuple[str, bytes, int, int, int, int]] | None:
    """[(name, raw name, local header offset, size, crc32, end of the member's room)] of a
    plain uncompressed zip, in file order; None for anything else."""
    end = len(buf) - _EOCD.size  # numpy writes no archive comment
    if end < 0 or buf[:4] != b"PK\x03\x04" or buf[end:end + 4] != b"PK\x05\x06" \
            or buf[end - 20:end - 16] == b"PK\x06\x07":  # zip64 locator
        return None
    _, disk, cd_disk, _, count, cd_size, cd_offset, comment_len = _EOCD.unpack_from(buf, end)
    if disk or cd_disk or comment_len or cd_offset + cd_size != end:
        return None  # multi-disk, or data before the archive (zipfile shifts offsets then)
    entries = []
    pos = cd_offset
    for _ in range(count):
        if pos + _CDIR.size > end:
            return None
        (sig, _, _, version, _, flags, method, _, _, crc, csize, usize, name_len, extra_len,
         comment_len, _, _, _, offset) = _CDIR.unpack_from(buf, pos)
        if sig != b"PK\x01\x02" or method != 0 or flags & ~0x800 or csize != usize \
                or extra_len or version > ZIP_MAX_VERSION:
            return None  # compressed, encrypted, streamed, zip64 or newer than zipfile
        raw_name = buf[pos + _CDIR.size:pos + _CDIR.size + name_len]
        try:
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            return None
        entries.append((offset, name, raw_name, usize, crc))
        pos += _CDIR.size + name_len + comment_len
    if pos != end or len({e[1] for e in entries}) != len(entries):
        return None  # a directory of another size than it says, or a repeated name
    entries.sort()
    # A member's data must end before the next member's header (zipfile: "overlapped").
    limits = [e[0] for e in entries[1:]] + [cd_offset]
    return [(name, raw, offset, size, crc, limit)
            for (offset, name, raw, size, crc), limit in zip(entries, limits, strict=True)]


def _npy(data: bytes) -> np.ndarray | None:
    """The array in a .npy file's bytes when its header is one numpy writes, else None."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10 or data[7] != 0:
        return None  # np.load knows versions (1, 0), (2, 0) and (3, 0) only
    major = data[6]
    if major == 1:
        (hlen,), start = struct.unpack_from("<H", data, 8), 10
    elif major in (2, 3):
        if len(data) < 12:
            return None
        (hlen,), start = struct.unpack_from("<I", data, 8), 12
    else:
        return None
    if hlen > NPY_MAX_HEADER or start + hlen > len(data):
        return None
    raw = data[6:start + hlen]  # version, length and header: the same in every frame's file
    parsed = _HEADERS.get(raw)
    if parsed is None:
        parsed = _parse_npy_header(data[start:start + hlen], major)
        if parsed is None:
            return None
        if len(_HEADERS) < 1024:
            _HEADERS[raw] = parsed
    dtype, shape, count = parsed
    body = start + hlen
    if len(data) - body < count * dtype.itemsize:
        return None  # np.load says how short it is
    return np.frombuffer(data, dtype, count, body).reshape(shape)


_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}  # header bytes -> parsed


def _parse_npy_header(header: bytes, major: int) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, element count) of a .npy header dict as numpy writes it, else None."""
    try:
        text = header.decode("utf-8" if major == 3 else "latin1")
    except UnicodeDecodeError:
        return None
    match = _NPY_HEADER.fullmatch(text)
    if match is None:
        return None
    descr, dims = match.groups()
    try:
        dtype = np.dtype(descr)
    except TypeError:
        return None
    shape = tuple(int(d) for d in dims.split(",") if d.strip())
    count = 1
    for d in shape:
        count *= d
    return dtype, shape, count


# -- validation -----------------------------------------------------------------------------


def _get(data: dict[str, np.ndarray], path: str | Path, key: str) -> np.ndarray:
    if key not in data:
        raise SourceError(path, f"missing key '{key}' (has: {', '.join(sorted(data)) or 'none'})")
    arr = data[key]
    if not isinstance(arr, np.ndarray):  # np.load hands a member that is not .npy as bytes
        raise SourceError(path, f"key '{key}' is not a .npy array")
    if arr.dtype.kind not in "biuf":  # bool, integers, floats; not complex, dates, text
        raise SourceError(path, f"key '{key}' is not numeric (dtype {arr.dtype})")
    return arr


def _vector(data: dict[str, np.ndarray], path: str | Path, key: str, dim: int) -> np.ndarray:
    """One frame's vector: (1, dim), (dim,) or a scalar when dim == 1; (dim,) float32."""
    arr = _get(data, path, key)
    if arr.size != dim:
        raise SourceError(path, f"key '{key}' has shape {arr.shape}, expected (1, {dim})")
    return _float32(arr.reshape(dim), path, key)


def _float32(arr: np.ndarray, path: str | Path, key: str,
             frames: np.ndarray | None = None) -> np.ndarray:
    """``arr`` as the store keeps it, float32, checked finite after the cast.

    ``frames`` (T,): video frame indices of the rows, named in the message.
    """
    if arr.dtype == np.float32:
        out = arr
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        _nonfinite(arr, out, path, key, frames)
    return out


def _finite(arr: np.ndarray, path: Path, key: str) -> None:
    """Finite in its own dtype (for values the store keeps as float64)."""
    if not np.all(np.isfinite(arr)):
        _nonfinite(arr, arr, path, key)


def _nonfinite(raw: np.ndarray, cast: np.ndarray, path: str | Path, key: str,
               frames: np.ndarray | None = None) -> None:
    """Raise the SourceError for the first non-finite value of ``cast`` (``raw`` cast)."""
    i = tuple(int(j) for j in np.argwhere(~np.isfinite(cast))[0])
    at = f"index {i}" if i else "its value"
    if frames is not None and i:
        at = f"frame {int(frames[i[0]])}, {at}"
    value = raw[i]
    if np.isfinite(value):
        raise SourceError(path, f"key '{key}' holds a value beyond the float32 range the store "
                          f"keeps ({float(value):.3g}, first at {at})")
    raise SourceError(path, f"key '{key}' holds NaN or inf values (first at {at})")


def _frame_indices(raw: np.ndarray, path: Path) -> np.ndarray:
    """(T,) int64 frame indices; must be integral, non-negative and strictly increasing."""
    if np.issubdtype(raw.dtype, np.floating):
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise SourceError(path, "key 'frames' holds non-integer values")
    elif not np.issubdtype(raw.dtype, np.integer):
        raise SourceError(path, f"key 'frames' has dtype {raw.dtype}, expected integers")
    with np.errstate(invalid="ignore"):
        frames = raw.astype(np.int64)
    # 1e300 or a uint64 beyond int64 does not survive the cast: say so, not "negative".
    if np.issubdtype(raw.dtype, np.floating) and np.any(np.abs(raw) >= 2.0**63) \
            or np.issubdtype(raw.dtype, np.unsignedinteger) and np.any(frames < 0):
        raise SourceError(path, "key 'frames' holds values beyond the int64 range")
    if frames.size and frames.min() < 0:
        raise SourceError(path, f"key 'frames' holds a negative frame index {int(frames.min())}")
    if np.any(np.diff(frames) <= 0):
        i = int(np.argmax(np.diff(frames) <= 0))
        raise SourceError(path, f"key 'frames' is not strictly increasing "
                          f"({int(frames[i])} then {int(frames[i + 1])})")
    return frames
