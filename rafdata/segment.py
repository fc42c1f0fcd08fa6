"""Segment files: the immutable units a store grows by.

A segment is a complete, self-contained store file (same schema as docs/store.md, its own
small tables with local row numbers, real image datasets) holding one unit of work: one
sequence with images, or a group of coefficient-only sequences. It is written under a
temporary name, made durable and renamed into ``store.h5.parts/``; from then on it is never
modified. The main file references segments (``rafdata.merge``), so a unit is committed the
moment its segment is renamed, and a process killed at any instant can cost only the unit it
was writing.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rafdata import faults
from rafdata.commit import GuardedFile, ensure_space, fsync_dir
from rafdata.errors import SourceError, StoreError
from rafdata.store import (
    _COLUMNS,
    _IMAGE_COLUMNS,
    _STR,
    FORMAT,
    FORMAT_VERSION,
    POSE_DIM,
    TABLES,
    EncodedImage,
    ImageCodec,
    compression_options,
    create_column,
    find_identity,
)

SEGMENT_SUFFIX = ".h5"
SEGMENT_TMP = ".tmp"  # a segment being written: {name}.h5.tmp


def parts_dir(store: str | Path) -> Path:
    """The folder beside a store that holds its segment files: ``store.h5.parts``."""
    store = Path(store)
    return store.with_name(store.name + ".parts")


def new_segment_name(order: Sequence[int | str] = ()) -> str:
    """A unique file name; ``order`` only makes listings readable (merges sort by attribute)."""
    stem = "-".join(str(o) for o in order) or "seg"
    return f"{stem}-{os.getpid():x}-{os.urandom(4).hex()}{SEGMENT_SUFFIX}"


def check_exp_space(store_space: str, store_dim: int, exp_space: str, exp_dim: int,
                    source: Path) -> None:
    """Every vector in one store lives in one expression space; refuse a second one
    (SourceError naming the tracking file ``source``). An empty ``store_space``: none yet."""
    if store_space and (exp_space != store_space or exp_dim != store_dim):
        raise SourceError(
            source,
            f"expression space {exp_space} ({exp_dim} dims) differs from the store's "
            f"{store_space} ({store_dim} dims); one store holds one space",
        )


@dataclass
class SegmentContext:
    """What a new segment must agree with: the store and the segments committed before it.

    cameras: (identity name, serial) -> (K (3,3), world_to_cam (4,4)) already stored.
    image_size: (H, W) of the store's images, or None before the first image.
    """

    compression: str
    exp_space: str = ""
    exp_dim: int = 0
    image_size: tuple[int, int] | None = None
    cameras: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    store: Path | None = None  # named in errors
    # Root attributes of the store set by this writer (ingest history, synthetic manifest):
    # every segment carries them, so they survive a run killed before its merge.
    store_attrs: dict[str, str] = field(default_factory=dict)


class SegmentWriter:
    """Writes one new segment file; see :class:`rafdata.writer.StoreWriter` for the public API.

    Rows are staged in memory and written once by :meth:`finish`; images go to the file as
    they arrive (one chunk each), so memory stays bounded by a few frames.
    """

    def __init__(self, path: Path, ctx: SegmentContext, order: Sequence[int | str] = ()):
        self.path = Path(path)
        self.ctx = ctx
        self.compression = ctx.compression
        self.codec = ImageCodec(ctx.compression)
        self._fh = GuardedFile(self.path, "xb+")  # see GuardedFile: failures stay clean
        self.f = h5py.File(self._fh, "w", locking=False)
        self._create_schema(order)
        self.exp_space, self.exp_dim = ctx.exp_space, ctx.exp_dim
        self.identities: list[str] = []
        self._cameras: dict[tuple[int, str], int] = {}  # (local identity, serial) -> row
        self._staged: dict[str, dict[str, list[np.ndarray]]] = {g: {} for g in TABLES}
        self._staged_n = dict.fromkeys(TABLES, 0)
        self._staged_cams: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.done: list[tuple[str, str]] = []  # (identity, sequence) written here
        self.image_size: tuple[int, int] | None = None  # (H, W) once images are written

    # -- schema ----------------------------------------------------------------------------
    def _create_schema(self, order: Sequence[int | str]) -> None:
        f = self.f
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["exp_space"] = ""
        f.attrs["exp_dim"] = 0
        f.attrs["pose_dim"] = POSE_DIM
        f.attrs["segment"] = True
        f.attrs["segment_order"] = np.asarray([int(o) for o in order] or [0], np.int64)
        f.attrs["store_attrs"] = json.dumps(self.ctx.store_attrs)
        for group in TABLES:  # columns are created by finish(), sized to their data
            f.create_group(group).attrs["rows"] = 0

    # -- used by SequenceWriter --------------------------------------------------------------
    @property
    def store_path(self) -> Path:
        return self.ctx.store or self.path

    def identity_row(self, name: str) -> int | None:
        return find_identity(self.identities, name)

    def check_exp_space(self, exp_space: str, exp_dim: int, source: Path) -> None:
        check_exp_space(self.exp_space, self.exp_dim, exp_space, exp_dim, source)

    def sequence(self, identity: str, name: str, held_out: bool, source: str) -> SequenceWriter:
        return SequenceWriter(self, identity, name, held_out, source)

    def _stage(self, group: str, **columns: np.ndarray) -> int:
        """Queue rows for a table; returns the row index the first of them will get."""
        start = self._staged_n[group]
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of {group} differ in length: {lengths}")
        for name, values in columns.items():
            self._staged[group].setdefault(name, []).append(values)
        self._staged_n[group] += lengths.pop()
        return start

    # -- finishing ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Write the staged tables, trim reserved image slots, close the file (made durable
        when it is published: publish_segment)."""
        f = self.f
        specs = {g: dict(c) for g, c in _COLUMNS.items()}
        specs["identities"] = {"name": (_STR, (), 1024)}
        if self.exp_dim:
            specs["timesteps"]["exp"] = (np.float32, (self.exp_dim,),
                                         max(1, 65536 // self.exp_dim))
        specs["images"] = {k: (v, (), 65536) for k, v in _IMAGE_COLUMNS.items()}
        for group, cols in specs.items():
            for name, (dtype, shape, chunk) in cols.items():
                parts = self._staged[group].get(name)
                data = np.concatenate(parts) if parts else np.zeros(
                    (0, *shape), object if dtype is _STR else dtype)
                create_column(f[group], name, data, dtype, shape, chunk)
            f[group].attrs["rows"] = self._staged_n[group]
        im = f["images"]
        for name in ("rgb", "mask"):  # reserved capacity beyond the last image
            if name in im and im[name].shape[0] != self._staged_n["images"]:
                im[name].resize(self._staged_n["images"], axis=0)
        f.attrs["exp_space"] = self.exp_space
        f.attrs["exp_dim"] = self.exp_dim
        faults.point("segment-finish")
        f.close()
        self.f = None  # type: ignore[assignment]
        if self._fh.failed is not None:
            raise self._fh.failed
        self._fh.close()  # made durable by publish_segment

    def discard(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except Exception:  # noqa: BLE001 - a full disk can fail the close; the file goes
                pass
            self.f = None  # type: ignore[assignment]
        self._fh.close()
        self.path.unlink(missing_ok=True)


@contextmanager
def segment_file(folder: Path, ctx: SegmentContext, order: Sequence[int | str] = (),
                 publisher: Publisher | None = None) -> Iterator[SegmentWriter]:
    """Write a new segment in ``folder``: committed (made durable and renamed to its final
    name) after a clean exit, deleted on any exception. ``writer.path`` is the final path
    afterwards. With a ``publisher`` the fsync and rename happen on its thread, overlapping
    the next unit's work; without, before this returns."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / new_segment_name(order)
    tmp = final.with_name(final.name + SEGMENT_TMP)
    if publisher is not None:
        publisher.check()  # a failed fsync stops the producer at the next unit
    try:
        seg = SegmentWriter(tmp, ctx, order)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # FileExistsError cannot happen: the name is random
        raise StoreError(tmp, f"cannot create a segment file ({err})") from None
    try:
        yield seg
        seg.finish()
    except OSError as err:  # a full disk, a file-size limit, an I/O error
        seg.discard()
        raise _write_failed(ctx.store or folder, err) from None
    except BaseException:
        seg.discard()
        raise
    seg.path = final
    if publisher is not None:
        publisher.submit(tmp, final, ctx.store or folder)
    else:
        publish_segment(tmp, final, ctx.store or folder)


def _write_failed(where: Path, err: OSError) -> StoreError:
    return StoreError(where, f"writing a segment failed ({_short(err)}); units committed "
                      "before are kept: fix the cause and rerun")


def publish_segment(tmp: Path, final: Path, where: Path) -> None:
    """Commit a finished segment: fsync its data, rename it, fsync the folder."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.point("segment-publish")
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_failed(where, err) from None
    faults.point("segment-published")


class Publisher:
    """Commits finished segments on a background thread, in the order they were submitted.

    Making a segment durable (fsync of ~100 MB of images) takes as long as decoding a few
    frames; done here, it overlaps with the next unit instead of stalling the writer.
    ``on_published(final)`` runs on this thread after each rename. :meth:`drain` waits for
    every submitted segment and raises the first failure; after a failure the rest of the
    queue is dropped (deleted, to be redone) and :meth:`check` raises it to the producer.
    """

    def __init__(self, on_published: Callable[[Path], None]):
        self.on_published = on_published
        self._q: queue.Queue = queue.Queue()
        self._error: StoreError | None = None
        self._thread: threading.Thread | None = None

    def submit(self, tmp: Path, final: Path, where: Path) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raf-publish", daemon=True)
            self._thread.start()
        self._q.put((tmp, final, where))

    def _run(self) -> None:
        while True:
            tmp, final, where = self._q.get()
            try:
                if self._error is None:
                    publish_segment(tmp, final, where)
                    self.on_published(final)
                else:
                    tmp.unlink(missing_ok=True)
            except StoreError as err:
                self._error = err
            finally:
                self._q.task_done()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        """Wait until every submitted segment is committed; raise the first failure."""
        self._q.join()
        self.check()


def _short(err: OSError) -> str:
    """The OS's reason without HDF5's multi-line diagnostics."""
    if err.errno:
        return os.strerror(err.errno)
    return str(err).splitlines()[0][:200]


def read_segment_state(path: Path, segment: bool = True) -> dict[str, Any]:
    """The small tables of a committed segment (or any store file), checked as the reader
    checks a store (``rafdata.store.Store``), with local row numbers.

    Returns rows (per table), identities (list), sequences/cameras/timesteps/images (dicts
    of arrays), attrs (root attributes), image_shape (the rgb dataset's shape or None) and
    compression.
    """
    from rafdata.store import Store

    try:
        with Store(path, verify_crc=False) as st:
            f = st.h5()
            im = f["images"]
            obj = lambda names: np.array(names, dtype=object)  # noqa: E731
            seqs, cams, ts = st.sequences, st.cameras, st.timesteps
            out: dict[str, Any] = {
                "rows": {"identities": len(st.identities), "sequences": len(seqs),
                         "cameras": len(cams), "timesteps": len(ts), "images": st.n_images},
                "attrs": dict(st.attrs),
                "identities": list(st.identities),
                "sequences": {k: (obj(v) if isinstance(v, list) else v)
                              for k, v in vars(seqs).items()},
                "cameras": {k: (obj(v) if isinstance(v, list) else v)
                            for k, v in vars(cams).items()},
                "timesteps": dict(vars(ts)),
                "images": {"timestep": st.image_timestep, "camera": st.image_camera,
                           "has_mask": st.image_has_mask, "crc": st.image_crc,
                           "mask_crc": st.image_mask_crc},
                "image_shape": tuple(im["rgb"].shape) if "rgb" in im else None,
                "compression": im.attrs.get("compression", ""),
                "segments": _segment_table(f),
            }
            if not st.exp_dim:
                out["timesteps"].pop("exp")
    except StoreError as err:
        if not segment:
            raise
        raise StoreError(path, f"{err.problem} (delete a damaged segment and rerun the ingest "
                         "to redo its unit)") from None
    if isinstance(out["compression"], bytes):
        out["compression"] = out["compression"].decode()
    return out


def _segment_table(f: h5py.File) -> dict[str, np.ndarray]:
    """A main file's /segments columns (empty for segments and format-1 files)."""
    from rafdata.store import _str_list

    if "segments" not in f:
        return {}
    g = f["segments"]
    n = int(g.attrs.get("rows", 0))
    return {name: (np.array(_str_list(ds, n), dtype=object) if ds.dtype.kind == "O"
                   else ds[:n]) for name, ds in g.items()}


def _write_chunk(ds: h5py.Dataset, row: int, image: EncodedImage) -> None:
    """Write one image as chunk ``row``: raw bytes when pre-compressed, else through HDF5."""
    if image.shape != ds.shape[1:]:
        raise ValueError(f"image shape {image.shape} does not match {ds.shape[1:]}")
    if image.payload is not None:
        ds.id.write_direct_chunk((row,) + (0,) * (ds.ndim - 1), image.payload, image.filter_mask)
    else:
        ds[row] = image.array


class _ImageColumns:
    """Growable per-slot image columns (timestep, camera, has_mask, crc, mask_crc)."""

    def __init__(self, n: int):
        self.cols = {
            "timestep": np.full(n, -1, np.int64),
            "camera": np.zeros(n, np.int32),
            "has_mask": np.zeros(n, bool),
            "crc": np.zeros(n, np.uint32),
            "mask_crc": np.zeros(n, np.uint32),
        }

    def grow(self, n: int) -> None:
        old = len(self.cols["timestep"])
        if n <= old:
            return
        new = _ImageColumns(max(n, 2 * old))
        for k, v in self.cols.items():
            new.cols[k][:old] = v
        self.cols = new.cols

    def set_rgb(self, slot: int, timestep: int, camera: int, crc: int) -> None:
        c = self.cols
        c["timestep"][slot] = timestep
        c["camera"][slot] = camera
        c["crc"][slot] = crc

    def set_mask(self, slot: int, mask_crc: int | None) -> None:
        self.cols["has_mask"][slot] = mask_crc is not None
        self.cols["mask_crc"][slot] = mask_crc or 0

    def view(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.cols.items()}


class SequenceWriter:
    """Rows of one sequence being written; see :meth:`rafdata.writer.StoreWriter.sequence`."""

    def __init__(self, w: SegmentWriter, identity: str, name: str, held_out: bool, source: str):
        self.w = w
        self.f = w.f
        self.name = name
        self.held_out = held_out
        self.source = source
        row = w.identity_row(identity)
        if row is None:
            row = w._stage("identities", name=np.array([identity], dtype=object))
            w.identities.append(identity)
        self.identity = row
        self.identity_name = w.identities[row]
        self.sequence = w._staged_n["sequences"]
        self.timestep_start = w._staged_n["timesteps"]
        self.image_start = w._staged_n["images"]
        self.n_timesteps = 0
        self.n_images = 0
        # Per-image columns of this sequence, indexed by slot (row - image_start); written
        # once at commit. timestep -1 marks a slot not filled yet.
        self._rgb: h5py.Dataset | None = None
        self._mask: h5py.Dataset | None = None
        self._meta = _ImageColumns(0)

    def add_timesteps(
        self,
        frames: np.ndarray,
        exp: np.ndarray,
        pose: np.ndarray,
        scale: np.ndarray,
        exp_space: str,
    ) -> np.ndarray:
        """Append T timesteps: frames (T,), exp (T,D), pose (T,6), scale (T,).

        Returns their rows in /timesteps, shape (T,).
        """
        exp = np.asarray(exp, np.float32)
        dim = int(exp.shape[1])
        self.w.check_exp_space(exp_space, dim, Path(self.source))
        self.w.exp_space, self.w.exp_dim = exp_space, dim
        n = len(frames)
        start = self.w._stage(
            "timesteps",
            frame=np.asarray(frames, np.int64),
            identity=np.full(n, self.identity, np.int32),
            sequence=np.full(n, self.sequence, np.int32),
            exp=exp,
            pose=np.asarray(pose, np.float32).reshape(n, POSE_DIM),
            scale=np.asarray(scale, np.float32).reshape(n),
        )
        self.n_timesteps += n
        return np.arange(start, start + n)

    def camera(self, serial: str, K: np.ndarray, world_to_cam: np.ndarray) -> int:
        """Row of /cameras for this identity's camera, added on first use.

        A camera seen before must come with the same calibration (a store keeps one crop and
        size per camera); a mismatch is a StoreError.
        """
        key = (self.identity, serial)
        w = self.w
        K = np.asarray(K, np.float64)
        world_to_cam = np.asarray(world_to_cam, np.float64)
        if key in w._cameras:
            row = w._cameras[key]
            old = w._staged_cams[row]
        else:
            row = None
            old = w.ctx.cameras.get((self.identity_name, serial))
        if old is not None and not (np.allclose(old[0], K, atol=1e-6)
                                    and np.allclose(old[1], world_to_cam, atol=1e-6)):
            raise StoreError(
                w.store_path,
                f"camera {serial} of identity {self.identity_name} is stored "
                "with other intrinsics/extrinsics (different --crop/--size than before?)",
            )
        if row is not None:
            return row
        row = w._stage("cameras", serial=np.array([serial], dtype=object),
                       identity=np.array([self.identity], np.int32), K=K[None],
                       world_to_cam=world_to_cam[None])
        w._cameras[key] = row
        w._staged_cams[row] = (K, world_to_cam)
        return row

    def _image_datasets(self, height: int, width: int) -> None:
        im = self.f["images"]
        size = tuple(im["rgb"].shape[1:3]) if "rgb" in im else self.w.ctx.image_size
        if size is not None:
            h, w = size
            if (h, w) != (height, width):
                raise StoreError(
                    self.w.store_path,
                    f"images are {width}x{height} but the store holds {w}x{h}; pass "
                    f"--size {w} {h} to resize on ingest",
                )
        if "rgb" in im:
            return
        opts = compression_options(self.w.compression, checksum=False)
        im.create_dataset("rgb", shape=(0, height, width, 3), maxshape=(None, height, width, 3),
                          dtype=np.uint8, chunks=(1, height, width, 3), **opts)
        im.create_dataset("mask", shape=(0, height, width), maxshape=(None, height, width),
                          dtype=np.uint8, chunks=(1, height, width), fillvalue=0, **opts)
        im.attrs["compression"] = self.w.compression
        self.w.image_size = (height, width)

    def reserve_images(self, n: int, height: int, width: int) -> None:
        """Make room for ``n`` more image slots of size (height, width).

        Slots can then be filled in any order with :meth:`put_rgb` and :meth:`put_mask` (or
        :meth:`put_image`); rows keep slot order, so parallel producers give the same store as
        a sequential run.
        """
        # Worst case on disk: raw colour + matte; checked so a full disk fails here, cleanly.
        ensure_space(self.w.path.parent, n * height * width * 4 + (1 << 20),
                     f"{n} images of sequence {self.name}")
        if self._rgb is None or self._rgb.shape[1:3] != (height, width):
            self._image_datasets(height, width)  # creates them, or raises on a size mismatch
            self._rgb, self._mask = self.f["images/rgb"], self.f["images/mask"]
        total = self.n_images + n
        for ds in (self._rgb, self._mask):
            if ds.shape[0] < self.image_start + total:
                # grow in steps: each resize touches HDF5 metadata
                ds.resize(self.image_start + total + 64, axis=0)
        self._meta.grow(total)
        self.n_images = total

    def put_image(self, slot: int, rgb: EncodedImage, mask: EncodedImage | None,
                  timestep: int, camera: int) -> None:
        """Fill reserved slot ``slot`` (0-based within this sequence) with one image."""
        self.put_rgb(slot, rgb, timestep, camera)
        self.put_mask(slot, mask)

    def put_rgb(self, slot: int, rgb: EncodedImage, timestep: int, camera: int) -> None:
        """The colour of reserved slot ``slot``, taken by ``timestep`` of ``camera``."""
        faults.point("image")
        _write_chunk(self._rgb, self._row(slot), rgb)
        self._meta.set_rgb(slot, timestep, camera, rgb.crc)

    def put_mask(self, slot: int, mask: EncodedImage | None) -> None:
        """The matte of reserved slot ``slot`` (None: the image has none; the default)."""
        row = self._row(slot)
        if mask is not None:
            _write_chunk(self._mask, row, mask)
        self._meta.set_mask(slot, None if mask is None else mask.crc)

    def _row(self, slot: int) -> int:
        if not 0 <= slot < self.n_images:
            raise IndexError(f"image slot {slot} not reserved ({self.n_images} are)")
        return self.image_start + slot

    def add_images(
        self,
        rgb: np.ndarray | Sequence[EncodedImage],
        mask: np.ndarray | Sequence[EncodedImage] | None,
        timesteps: Sequence[int] | np.ndarray,
        camera: int,
    ) -> None:
        """Append a batch of B images of one camera.

        rgb: (B,H,W,3) uint8 or B EncodedImages from ``self.w.codec``; mask: (B,H,W) uint8, B
        EncodedImages, or None where the source has no matte.
        """
        codec = self.w.codec
        if isinstance(rgb, np.ndarray):
            rgb = [codec.encode(im) for im in rgb]
        if isinstance(mask, np.ndarray):
            mask = [codec.encode(m) for m in mask]
        first = self.n_images
        self.reserve_images(len(rgb), *rgb[0].shape[:2])
        for i, t in enumerate(timesteps):
            self.put_image(first + i, rgb[i], None if mask is None else mask[i], int(t), camera)

    def _finish(self) -> None:
        """Stage this sequence's image columns and its /sequences row (committed by the
        writer: at once, or with its group)."""
        w = self.w
        if self.n_images:
            meta = self._meta.view(self.n_images)
            empty = np.flatnonzero(meta["timestep"] < 0)
            if empty.size:
                raise StoreError(w.store_path, f"{empty.size} reserved image slots of sequence "
                                 f"{self.name} were never written (first: slot {empty[0]})")
            w._stage("images", **{k: v.copy() for k, v in meta.items()})
        w._stage(
            "sequences",
            name=np.array([self.name], dtype=object),
            identity=np.array([self.identity], np.int32),
            held_out=np.array([self.held_out]),
            timestep_start=np.array([self.timestep_start], np.int64),
            timestep_count=np.array([self.n_timesteps], np.int64),
            image_start=np.array([self.image_start], np.int64),
            image_count=np.array([self.n_images], np.int64),
            source=np.array([self.source], dtype=object),
        )
        w.done.append((self.identity_name, self.name))
