"""Committing segments into a store's main file, and rebuilding it.

The main file (``store.h5``) holds the tables of every committed sequence, the banks, a
``/segments`` table naming the segment files in ``store.h5.parts/`` and, for plain HDF5
readers, ``/images/rgb`` and ``/images/mask`` as virtual datasets over those segments. It is
never modified in place: :func:`merge` builds a new main file from the old one plus new
segments and renames it over the old one (``rafdata.commit``). Segments are merged in the
order of their ``segment_order`` attribute (the unit's position in the ingest plan), so a run
that was killed and resumed gives the same rows as one that was not.

Why virtual datasets rather than copying chunks into one file (measured in
docs/benchmarks.md): a merge then costs time in the size of the tables, not of the images,
so committing a few segments into a store of terabytes takes seconds, and the images are
written exactly once. ``rafdata consolidate --compact`` copies the chunks of many segments
into one where fewer files are wanted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rafdata import faults
from rafdata.commit import ensure_space, in_memory_file, remove_temporaries
from rafdata.errors import StoreError
from rafdata.lock import WriterLock
from rafdata.progress import NullProgress, Progress
from rafdata.segment import SEGMENT_SUFFIX, parts_dir, read_segment_state
from rafdata.store import (
    _COLUMNS,
    _IMAGE_COLUMNS,
    _STR,
    FORMAT,
    FORMAT_VERSION,
    POSE_DIM,
    _str_list,
    create_column,
    find_identity,
    open_h5,
)

SEGMENT_COLUMNS = {"file": _STR, "image_start": np.int64, "image_count": np.int64,
                   "sequence_start": np.int64, "sequence_count": np.int64}
LEGACY_PREFIX = "legacy-v1-"


@dataclass
class Tables:
    """The store's tables in memory: identities (names) and one dict of columns per table."""

    identities: list[str] = field(default_factory=list)
    cols: dict[str, dict[str, list[np.ndarray]]] = field(
        default_factory=lambda: {g: {} for g in ("sequences", "cameras", "timesteps", "images",
                                                 "segments")})
    n: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("sequences", "cameras", "timesteps", "images", "segments"), 0))
    cameras: dict[tuple[int, str], int] = field(default_factory=dict)
    K: list[np.ndarray] = field(default_factory=list)  # per camera row, for consistency checks
    world_to_cam: list[np.ndarray] = field(default_factory=list)
    done: set[tuple[int, str]] = field(default_factory=set)
    exp_space: str = ""
    exp_dim: int = 0
    image_shape: tuple[int, ...] | None = None
    compression: str = ""

    def add(self, table: str, **columns: np.ndarray) -> None:
        lengths = {len(v) for v in columns.values()}
        assert len(lengths) <= 1, (table, lengths)
        for k, v in columns.items():
            self.cols[table].setdefault(k, []).append(np.asarray(v))
        if lengths:
            self.n[table] += lengths.pop()

    def column(self, table: str, name: str, dtype: Any, shape: tuple[int, ...] = ()):
        parts = self.cols[table].get(name)
        if not parts:
            return np.zeros((0, *shape), dtype=object if dtype is _STR else dtype)
        return np.concatenate(parts)


def committed_segments(f: h5py.File) -> list[str]:
    """File names (relative to the store's folder) of the segments a main file references."""
    if "segments" not in f:
        return []
    n = int(f["segments"].attrs.get("rows", 0))
    return _str_list(f["segments/file"], n)


def pending_segments(store: str | Path, main: Tables | None = None) -> list[Path]:
    """Finished segment files in ``store.h5.parts`` that the main file does not reference
    yet (committed units of a run that stopped before its merge). ``main``: the main file's
    tables when the caller has read them already (else it is opened here)."""
    store = Path(store)
    folder = parts_dir(store)
    if not folder.is_dir():
        return []
    known: set[str] = set()
    if main is not None:
        known = {Path(n).name for n in main.column("segments", "file", _STR)}
    elif store.exists():
        f = open_h5(store, "r")
        try:
            known = {Path(name).name for name in committed_segments(f)}
        finally:
            f.close()
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith(SEGMENT_SUFFIX) and p.name not in known)


def remove_segment_temporaries(store: str | Path) -> list[Path]:
    """Delete half-written segments (``*.h5.tmp``) of killed writers; lock holders only."""
    folder = parts_dir(store)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if p.name.endswith(SEGMENT_SUFFIX + ".tmp")]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def segment_order(state: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in np.atleast_1d(state["attrs"].get("segment_order", [0])))


# --------------------------------------------------------------------------------------------
def read_main(store: Path) -> tuple[Tables, dict[str, Any], int]:
    """Tables, root attributes and format version of an existing main file (read and
    checked once, through the reader)."""
    state = read_segment_state(store, segment=False)
    t = Tables()
    _append_state(t, state, store, segment_name=None)
    for name, values in state["segments"].items():
        t.cols["segments"][name] = [values]
        t.n["segments"] = len(values)
    return t, state["attrs"], int(state["attrs"]["format_version"])


def _append_state(t: Tables, s: dict[str, Any], path: Path, segment_name: str | None) -> None:
    """Append one segment's (or an old main file's) tables, remapping its local rows."""
    rows = s["rows"]
    if rows["sequences"] == 0 and rows["timesteps"] == 0:
        return
    space, dim = str(s["attrs"].get("exp_space", "")), int(s["attrs"].get("exp_dim", 0))
    if space:
        if t.exp_space and (space, dim) != (t.exp_space, t.exp_dim):
            raise StoreError(path, f"holds expression space {space} ({dim} dims), the store "
                             f"{t.exp_space} ({t.exp_dim} dims); one store holds one space")
        t.exp_space, t.exp_dim = space, dim
    if s["image_shape"] is not None and rows["images"]:
        shape = tuple(s["image_shape"][1:])
        if t.image_shape is not None and shape != t.image_shape:
            raise StoreError(path, f"holds images of shape {shape}, the store {t.image_shape}")
        t.image_shape = shape
        t.compression = t.compression or s["compression"]
    # identities by name
    id_map = np.empty(len(s["identities"]), np.int32)
    for i, name in enumerate(s["identities"]):
        row = find_identity(t.identities, name)
        if row is None:
            row = len(t.identities)
            t.identities.append(name)
        id_map[i] = row
    # cameras by (identity, serial), calibration must agree
    c = s["cameras"]
    cam_map = np.empty(rows["cameras"], np.int32)
    for i in range(rows["cameras"]):
        key = (int(id_map[c["identity"][i]]), str(c["serial"][i]))
        K, w2c = c["K"][i], c["world_to_cam"][i]
        if key in t.cameras:
            j = t.cameras[key]
            if not (np.allclose(t.K[j], K, atol=1e-6) and np.allclose(t.world_to_cam[j], w2c,
                                                                        atol=1e-6)):
                raise StoreError(path, f"camera {key[1]} of identity {t.identities[key[0]]} "
                                 "differs from the one already stored (other --crop/--size?)")
            cam_map[i] = j
        else:
            cam_map[i] = j = len(t.K)
            t.cameras[key] = j
            t.K.append(K)
            t.world_to_cam.append(w2c)
            t.add("cameras", serial=np.array([key[1]], object),
                  identity=np.array([key[0]], np.int32), K=K[None], world_to_cam=w2c[None])
    sq = s["sequences"]
    for i in range(rows["sequences"]):
        key = (int(id_map[sq["identity"][i]]), str(sq["name"][i]))
        if key in t.done:
            raise StoreError(path, f"sequence {t.identities[key[0]]}/{key[1]} is already in "
                             "the store (a second segment for the same unit?)")
        t.done.add(key)
    base_t, base_s, base_i = t.n["timesteps"], t.n["sequences"], t.n["images"]
    t.add("sequences", name=sq["name"], identity=id_map[sq["identity"]],
          held_out=sq["held_out"], timestep_start=sq["timestep_start"] + base_t,
          timestep_count=sq["timestep_count"], image_start=sq["image_start"] + base_i,
          image_count=sq["image_count"], source=sq["source"])
    ts = s["timesteps"]
    t.add("timesteps", identity=id_map[ts["identity"]], sequence=ts["sequence"] + base_s,
          frame=ts["frame"], exp=ts["exp"] if "exp" in ts else np.zeros((rows["timesteps"],
                                                                          dim), np.float32),
          pose=ts["pose"], scale=ts["scale"])
    im = s["images"]
    if rows["images"]:
        t.add("images", timestep=im["timestep"] + base_t, camera=cam_map[im["camera"]],
              has_mask=im["has_mask"], crc=im["crc"], mask_crc=im["mask_crc"])
    if segment_name is not None:
        t.add("segments", file=np.array([segment_name], object),
              image_start=np.array([base_i], np.int64),
              image_count=np.array([rows["images"]], np.int64),
              sequence_start=np.array([base_s], np.int64),
              sequence_count=np.array([rows["sequences"]], np.int64))


# --------------------------------------------------------------------------------------------
def write_main(f: h5py.File, t: Tables, attrs: dict[str, Any], store: Path) -> None:
    """Write tables, the segment table and the virtual image datasets into a fresh file."""
    for k, v in attrs.items():
        f.attrs[k] = v
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["exp_space"] = t.exp_space
    f.attrs["exp_dim"] = t.exp_dim
    f.attrs["pose_dim"] = POSE_DIM
    f.create_group("identities").create_dataset(
        "name", data=np.array(t.identities, dtype=object), dtype=_STR, maxshape=(None,),
        chunks=(1024,))
    n_rows = {"identities": len(t.identities)}
    for group in ("sequences", "cameras", "timesteps"):
        g = f.create_group(group)
        cols = dict(_COLUMNS[group])
        if group == "timesteps" and t.exp_dim:
            cols["exp"] = (np.float32, (t.exp_dim,), max(1, 65536 // max(1, t.exp_dim)))
        for name, (dtype, shape, chunk) in cols.items():
            create_column(g, name, t.column(group, name, dtype, shape), dtype, shape, chunk)
        n_rows[group] = t.n[group]
    g = f.create_group("images")
    for name, dtype in _IMAGE_COLUMNS.items():
        create_column(g, name, t.column("images", name, dtype), dtype, (), 65536)
    n_rows["images"] = t.n["images"]
    seg = f.create_group("segments")
    for name, dtype in SEGMENT_COLUMNS.items():
        create_column(seg, name, t.column("segments", name, dtype), dtype, (), 1024)
    seg.attrs["rows"] = t.n["segments"]
    for group, n in n_rows.items():
        f[group].attrs["rows"] = n
    if t.image_shape is not None:
        _virtual_images(f, t, store)
        g.attrs["compression"] = t.compression


def _virtual_images(f: h5py.File, t: Tables, store: Path) -> None:
    """``/images/rgb`` and ``/images/mask`` as virtual datasets over the segments' images."""
    n = t.n["images"]
    h, w = t.image_shape[:2]
    folder = parts_dir(store).name
    files = t.column("segments", "file", _STR)
    starts = t.column("segments", "image_start", np.int64)
    counts = t.column("segments", "image_count", np.int64)
    for name, shape in (("rgb", (h, w, 3)), ("mask", (h, w))):
        layout = h5py.VirtualLayout(shape=(n, *shape), dtype=np.uint8,
                                    maxshape=(None, *shape))
        for file, start, count in zip(files, starts, counts, strict=True):
            if count:
                # Relative to the main file's folder: store and parts move together.
                src = h5py.VirtualSource(f"{folder}/{file}", f"images/{name}",
                                         shape=(int(count), *shape))
                layout[int(start): int(start + count)] = src
        f["images"].create_virtual_dataset(name, layout, fillvalue=0)


# --------------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    merged: list[str] = field(default_factory=list)
    sequences: int = 0
    images: int = 0


def merge(store: str | Path, segments: Sequence[Path] | None = None,
          attrs: dict[str, Any] | None = None, rebuild: bool = False,
          lock: WriterLock | None = None, progress: Progress | None = None) -> MergeReport:
    """Commit ``segments`` (default: every pending one) into the main file, atomically.

    attrs: root attributes to set (e.g. the ingest history). rebuild: ignore the old main's
    tables and rebuild them from every segment in the parts folder (banks are kept when the
    old main can still be read). A main file of format version 1 (images inside it) is taken
    in as the first segment by a hard link, so upgrading copies no image. ``progress``: a
    "reading segments" stage, one step per segment file read (the part that grows with the
    store; writing the new main file is one step at the end).
    """
    store = Path(store)
    progress = progress or NullProgress()
    report = MergeReport()
    with lock or WriterLock(store):
        remove_temporaries(store)
        remove_segment_temporaries(store)
        old: Tables | None = None
        old_attrs: dict[str, Any] = {}
        version = FORMAT_VERSION
        if store.exists() and not rebuild:
            old, old_attrs, version = read_main(store)
        elif store.exists():
            old_attrs = _readable_attrs(store)
        if rebuild:
            todo = sorted(parts_dir(store).glob(f"*{SEGMENT_SUFFIX}"))
        else:
            todo = list(pending_segments(store, old) if segments is None else segments)
        if version < 2 and old is not None and old.n["images"] + old.n["timesteps"]:
            todo.insert(0, _link_legacy(store))
            old = None  # its rows come back through the legacy segment, first
        if not todo and not attrs and old is not None and version == FORMAT_VERSION:
            return report
        t = old if old is not None else Tables()
        states = []
        progress.start("reading segments", len(todo))
        for p in todo:
            st = read_segment_state(p)
            if not st["attrs"].get("segment") and not p.name.startswith(LEGACY_PREFIX):
                raise StoreError(p, "not a segment file")
            states.append((0 if p.name.startswith(LEGACY_PREFIX) else 1, segment_order(st),
                           p.name, p, st))
            progress.advance()
        states.sort(key=lambda x: x[:3])
        carried: dict[str, Any] = {}
        for *_, p, st in states:
            _append_state(t, st, p, segment_name=p.name)
            carried.update(json.loads(st["attrs"].get("store_attrs") or "{}"))
            report.merged.append(p.name)
            report.sequences += st["rows"]["sequences"]
            report.images += st["rows"]["images"]
        new_attrs = {k: v for k, v in old_attrs.items()
                     if k not in ("format", "format_version", "exp_space", "exp_dim")}
        new_attrs.update(carried)
        new_attrs.update(attrs or {})
        table_bytes = sum(sum(a.nbytes for a in parts if a.dtype != object) for cols in
                          t.cols.values() for parts in cols.values())
        old_bytes = store.stat().st_size if store.exists() else 0
        ensure_space(store.parent, old_bytes + 2 * table_bytes + (4 << 20),
                     "the updated main file")
        progress.start("writing the main file", 1)
        try:
            with in_memory_file(store) as dst:
                write_main(dst, t, new_attrs, store)
                if store.exists():
                    _copy_banks(store, dst)
                faults.point("main-write")
        except OSError as err:
            raise StoreError(store, f"could not write the updated main file "
                             f"({os.strerror(err.errno) if err.errno else err}); the "
                             "store is unchanged and the new units stay in "
                             f"{parts_dir(store).name}/ for the next run") from None
        progress.advance()
    return report


def consolidate(store: str | Path, rebuild: bool = False,
                progress: Progress | None = None) -> MergeReport:
    """`rafdata consolidate`: :func:`merge` every pending segment (or, with ``rebuild``, every
    segment) into the main file of an existing store. Refused (StoreError) when there is
    neither a main file nor a segment folder: merging nothing would create an empty store."""
    store = Path(store)
    if not store.exists() and not parts_dir(store).is_dir():
        raise StoreError(store, "no such store file and no segment folder beside it")
    return merge(store, rebuild=rebuild, progress=progress)


def _readable_attrs(store: Path) -> dict[str, Any]:
    try:
        f = open_h5(store, "r")
    except StoreError:
        return {}
    try:
        return dict(f.attrs.items())
    except OSError:
        return {}
    finally:
        f.close()


def _copy_banks(store: Path, dst: h5py.File) -> None:
    try:
        src = open_h5(store, "r")
    except StoreError:
        return  # rebuilding a main file that cannot be opened: banks must be built again
    try:
        if "banks" in src:
            from rafdata.bank import is_leftover

            banks = dst.create_group("banks")
            for k, v in src["banks"].attrs.items():
                banks.attrs[k] = v
            for name in src["banks"]:
                if not is_leftover(name):  # half-built banks of an older rafdata stay behind
                    src["banks"].copy(src["banks"][name], banks, name=name)
    finally:
        src.close()


def _link_legacy(store: Path) -> Path:
    """Hard-link a format-1 main file into the parts folder as its first segment."""
    folder = parts_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.glob(f"{LEGACY_PREFIX}*{SEGMENT_SUFFIX}"):
        if os.path.samefile(p, store):
            return p
    target = folder / f"{LEGACY_PREFIX}{os.urandom(4).hex()}{SEGMENT_SUFFIX}"
    try:
        os.link(store, target)
    except OSError as err:
        raise StoreError(store, f"cannot upgrade this format-1 store in place ({err}); copy "
                         f"it to {target} and rerun") from None
    return target

