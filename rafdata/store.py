"""The rafdata store: one chunked HDF5 file holding frames, cameras and tracked coefficients.

Layout (format version 1; see docs/store.md for the full contract)::

    /                  attrs: format, format_version, exp_space, exp_dim, pose_dim, ...
    /identities/name   (I,) str
    /sequences/...     name, identity, held_out, timestep_start/count, image_start/count, source
    /cameras/...       serial, identity, K (C,3,3), world_to_cam (C,4,4)
    /timesteps/...     identity, sequence, frame, exp (T,D), pose (T,6), scale (T,)
    /images/...        rgb (N,H,W,3) uint8, mask (N,H,W) uint8, has_mask, timestep, camera
    /banks/{name}/...  written by rafdata.bank

Crash safety: every table group carries an attribute ``rows``, the number of committed rows.
Writers append past it and raise it only when a whole sequence is written (then flush), so a
crash leaves rows the reader never shows; the next writer truncates them away. A sequence row
exists only for complete sequences, which makes "is this sequence done?" a lookup.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter in this process; readers need it too)
import numpy as np

from rafdata.errors import StoreError

FORMAT = "rafdata"
FORMAT_VERSION = 1
POSE_DIM = 6

TABLES = ("identities", "sequences", "cameras", "timesteps", "images")
_STR = h5py.string_dtype("utf-8")

# Column specs per table: name -> (dtype, per-row shape, chunk rows). Images are created lazily
# (their per-row shape is the image size) and are handled separately.
_COLUMNS: dict[str, dict[str, tuple[Any, tuple[int, ...], int]]] = {
    "identities": {"name": (_STR, (), 1024)},
    "sequences": {
        "name": (_STR, (), 1024),
        "identity": (np.int32, (), 1024),
        "held_out": (np.bool_, (), 1024),
        "timestep_start": (np.int64, (), 1024),
        "timestep_count": (np.int64, (), 1024),
        "image_start": (np.int64, (), 1024),
        "image_count": (np.int64, (), 1024),
        "source": (_STR, (), 1024),
    },
    "cameras": {
        "serial": (_STR, (), 1024),
        "identity": (np.int32, (), 1024),
        "K": (np.float64, (3, 3), 1024),
        "world_to_cam": (np.float64, (4, 4), 1024),
    },
    "timesteps": {
        "identity": (np.int32, (), 65536),
        "sequence": (np.int32, (), 65536),
        "frame": (np.int64, (), 65536),
        "pose": (np.float32, (POSE_DIM,), 16384),
        "scale": (np.float32, (), 65536),
        # exp is created with the store's expression dimension
    },
}
_IMAGE_COLUMNS = {
    "timestep": np.int64,
    "camera": np.int32,
    "has_mask": np.bool_,
    "crc": np.uint32,  # CRC-32 of the raw rgb bytes (see ImageCodec)
    "mask_crc": np.uint32,  # CRC-32 of the raw mask bytes; 0 without a mask
}

COMPRESSIONS = ("blosc-blosclz", "blosc-lz4", "blosc-zstd", "gzip", "lzf", "none")
# Chosen by measurement (bench/bench_store.py, bench/bench_ingest.py; docs/benchmarks.md): on
# frames with real-camera noise LZ4 shrinks colour only ~1.2x, for ~1 ms of CPU per 512 px
# image at ingest and 4x slower reads; BloscLZ-1 keeps mattes ~25x smaller at almost no cost.
DEFAULT_COMPRESSION = "blosc-blosclz"
# Blosc codecs: (compressor, level). BloscLZ at level 1 gives up quickly on blocks it cannot
# shrink (noisy colour) and still packs mattes ~25x: compression only where it is cheap.
_BLOSC = {"blosc-blosclz": ("blosclz", 1), "blosc-lz4": ("lz4", 5), "blosc-zstd": ("zstd", 3)}


def compression_options(name: str, checksum: bool = True) -> dict[str, Any]:
    """``create_dataset`` keywords for a lossless codec.

    ``checksum`` adds HDF5's Fletcher32 filter (tables). Image datasets go without it: their
    chunks are compressed outside HDF5 and written directly, and carry a CRC-32 of the raw
    content in /images/crc instead, which ``rafdata inspect --verify`` checks.
    """
    if name in _BLOSC:
        cname, level = _BLOSC[name]
        opts: dict[str, Any] = dict(
            hdf5plugin.Blosc(cname=cname, clevel=level, shuffle=hdf5plugin.Blosc.SHUFFLE)
        )
    elif name == "gzip":
        opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    elif name == "lzf":
        opts = {"compression": "lzf", "shuffle": True}
    elif name == "none":
        opts = {}
    else:
        raise ValueError(f"unknown compression {name!r}; choose from {', '.join(COMPRESSIONS)}")
    if checksum:
        opts["fletcher32"] = True
    return opts


def _blosc_for_threads() -> None:
    """Set python-blosc up for use from many threads (process-wide, idempotent).

    Parallelism comes from encoding or reading several images at once in separate threads, so
    blosc's own thread pool would only oversubscribe the cores; and python-blosc holds the GIL
    while it (de)compresses unless told otherwise, which would serialise those threads.
    """
    import blosc

    blosc.set_nthreads(1)
    blosc.set_releasegil(True)


@dataclass(frozen=True)
class EncodedImage:
    """An image ready for the writer: its chunk bytes (Blosc codecs) or the array itself.

    shape: the image shape. crc: CRC-32 of the raw bytes. payload: the compressed chunk exactly
    as the HDF5 Blosc filter would write it, or None when HDF5 compresses (gzip, lzf, none).
    """

    shape: tuple[int, ...]
    crc: int
    payload: bytes | memoryview | None
    array: np.ndarray | None


class ImageCodec:
    """Compresses images off the writer thread.

    The HDF5 Blosc filter stores exactly what ``blosc_compress`` returns, so python-blosc can
    produce the chunk in a decoding thread (it releases the GIL) and the writer only copies
    bytes with ``write_direct_chunk``; HDF5 decompresses them on read as usual.
    """

    def __init__(self, name: str = DEFAULT_COMPRESSION, direct: bool = True):
        compression_options(name)  # validates the name
        self.name = name
        # Blosc chunks are compressed here; "none" chunks are the raw bytes. Both go to the
        # file with write_direct_chunk, skipping HDF5's per-write selection machinery.
        self.direct = direct and (name in _BLOSC or name == "none")
        if self.direct and name in _BLOSC:
            _blosc_for_threads()

    def encode(self, image: np.ndarray) -> EncodedImage:
        """Checksum and (for Blosc codecs) compress one uint8 image; thread-safe."""
        data = np.ascontiguousarray(image, dtype=np.uint8)
        crc = zlib.crc32(data)
        if not self.direct:
            return EncodedImage(data.shape, crc, None, data)
        if self.name == "none":
            return EncodedImage(data.shape, crc, memoryview(data).cast("B"), None)
        import blosc

        cname, level = _BLOSC[self.name]
        payload = blosc.compress(data, typesize=1, clevel=level, shuffle=blosc.SHUFFLE,
                                 cname=cname)
        return EncodedImage(data.shape, crc, payload, None)


BLOSC_FILTER_ID = 32001


def blosc_only(ds: h5py.Dataset) -> bool:
    """True when the dataset's only filter is Blosc: its chunks are exactly Blosc frames, so
    they can be written and read raw (any other filter, e.g. a checksum, changes the bytes)."""
    dcpl = ds.id.get_create_plist()
    return dcpl.get_nfilters() == 1 and dcpl.get_filter(0)[0] == BLOSC_FILTER_ID


def _takes_direct(ds: h5py.Dataset, compression: str) -> bool:
    """Chunks made by ``ImageCodec(compression)`` can be written raw into ``ds``: its filters
    are exactly Blosc (Blosc codecs) or none at all ("none")."""
    if compression in _BLOSC:
        return blosc_only(ds)
    return compression == "none" and ds.id.get_create_plist().get_nfilters() == 0


def check_format(f: h5py.File, path: Path) -> None:
    """Refuse files that are not rafdata stores or come from a newer format version."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise StoreError(path, "not a rafdata store (no format='rafdata' attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            path,
            f"written by a newer rafdata (format version {version}); this one reads "
            f"version {FORMAT_VERSION}: upgrade rafdata",
        )
    if version < 1:
        raise StoreError(path, f"unknown format version {version}")


def open_h5(path: Path, mode: str) -> h5py.File:
    try:
        # locking=False: readers (DataLoader workers, inspect) must open a store while another
        # process holds it, and HDF5's locks fail outright on NFS.
        return h5py.File(path, mode, locking=False)
    except FileNotFoundError:
        raise StoreError(path, "no such store file") from None
    except OSError as err:
        raise StoreError(path, f"cannot open as HDF5 ({err.__class__.__name__}: {err})") from None


def _str_list(ds: h5py.Dataset, n: int) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[:n]]


def identity_matches(name: str, query: str) -> bool:
    """Participant ids compare as integers when both are numeric ("17" == "017")."""
    if name == query:
        return True
    return name.isdigit() and query.isdigit() and int(name) == int(query)


def find_identity(identities: Sequence[str], name: str) -> int | None:
    """Index of the participant ``name`` in ``identities`` (see identity_matches) or None."""
    return next((i for i, known in enumerate(identities) if identity_matches(known, str(name))),
                None)


# --------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True)
class SequenceTable:
    """All committed sequences; arrays of shape (S,)."""

    name: list[str]
    identity: np.ndarray
    held_out: np.ndarray
    timestep_start: np.ndarray
    timestep_count: np.ndarray
    image_start: np.ndarray
    image_count: np.ndarray
    source: list[str]

    def __len__(self) -> int:
        return len(self.name)


@dataclass(frozen=True)
class CameraTable:
    """All committed cameras: serial, identity (C,), K (C,3,3) and world_to_cam (C,4,4).

    K and world_to_cam are as the stored images see them (after crop and resize), K in pixels
    with OpenCV pixel centres (pixel (col, row) has its centre at (col, row)).
    """

    serial: list[str]
    identity: np.ndarray
    K: np.ndarray
    world_to_cam: np.ndarray

    def __len__(self) -> int:
        return len(self.serial)


@dataclass(frozen=True)
class TimestepTable:
    """Tracked coefficients, one row per timestep.

    identity, sequence: (T,) int indices into /identities and /sequences. frame: (T,) video frame
    index. exp: (T, D) float32. pose: (T, 6) float32 axis-angle + translation. scale: (T,).
    """

    identity: np.ndarray
    sequence: np.ndarray
    frame: np.ndarray
    exp: np.ndarray
    pose: np.ndarray
    scale: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)


@dataclass(frozen=True)
class ImageSample:
    """One stored image with everything needed to render it.

    rgb: (H, W, 3) uint8. mask: (H, W) uint8 (255 = head) or None where the source had no matte.
    K: (3, 3), world_to_cam: (4, 4) float64. exp: (D,), pose: (6,) float32; scale float.
    """

    index: int
    rgb: np.ndarray
    mask: np.ndarray | None
    timestep: int
    camera: int
    serial: str
    K: np.ndarray
    world_to_cam: np.ndarray
    identity: int
    sequence: int
    frame: int
    exp: np.ndarray
    pose: np.ndarray
    scale: float


class Store:
    """Read-only view of a store, showing committed rows only.

    Small tables (identities, sequences, cameras, timesteps) are read into memory on open;
    images are read one at a time (fancy indexing many rows of a chunked 4-D dataset is far
    slower). The HDF5 handle is opened lazily and dropped when pickled, so a Store can be passed
    to DataLoader workers and each worker opens its own handle after the fork.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._image_ds: tuple[h5py.Dataset, h5py.Dataset] | None = None
        self._load()

    # -- lifecycle -------------------------------------------------------------------------
    def _h5(self) -> h5py.File:
        if self._file is None:
            self._file = open_h5(self.path, "r")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._image_ds = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py objects do not pickle; each process reopens
        state["_image_ds"] = None
        return state

    def _load(self) -> None:
        try:
            self._load_tables()
        except OSError as err:  # a checksum or decompression failure in a table chunk
            raise StoreError(self.path, f"damaged table data ({err}); run `rafdata inspect "
                             "--verify` on a copy to locate it") from None

    def _load_tables(self) -> None:
        f = self._h5()
        check_format(f, self.path)
        for group in TABLES:
            if group not in f:
                raise StoreError(self.path, f"missing group /{group}")
        self.attrs: dict[str, Any] = {
            k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()
        }
        self.format_version = int(self.attrs["format_version"])
        self.exp_space = str(self.attrs.get("exp_space", ""))
        self.exp_dim = int(self.attrs.get("exp_dim", 0))
        self.pose_dim = int(self.attrs.get("pose_dim", POSE_DIM))
        rows = {g: int(f[g].attrs.get("rows", 0)) for g in TABLES}
        self.rows = rows
        self.identities = _str_list(f["identities/name"], rows["identities"])
        s = f["sequences"]
        n = rows["sequences"]
        self.sequences = SequenceTable(
            name=_str_list(s["name"], n),
            identity=s["identity"][:n],
            held_out=s["held_out"][:n],
            timestep_start=s["timestep_start"][:n],
            timestep_count=s["timestep_count"][:n],
            image_start=s["image_start"][:n],
            image_count=s["image_count"][:n],
            source=_str_list(s["source"], n),
        )
        c = f["cameras"]
        n = rows["cameras"]
        self.cameras = CameraTable(
            serial=_str_list(c["serial"], n),
            identity=c["identity"][:n],
            K=c["K"][:n],
            world_to_cam=c["world_to_cam"][:n],
        )
        t = f["timesteps"]
        n = rows["timesteps"]
        exp = t["exp"][:n] if "exp" in t else np.zeros((0, 0), np.float32)
        self.timesteps = TimestepTable(
            identity=t["identity"][:n],
            sequence=t["sequence"][:n],
            frame=t["frame"][:n],
            exp=exp,
            pose=t["pose"][:n],
            scale=t["scale"][:n],
        )
        im = f["images"]
        n = rows["images"]
        self.n_images = n
        self.image_timestep = im["timestep"][:n]
        self.image_camera = im["camera"][:n]
        self.image_has_mask = im["has_mask"][:n]
        self._blosc = "rgb" in im and blosc_only(im["rgb"])
        if self._blosc:
            _blosc_for_threads()  # DataLoader workers read in parallel
        self.image_size: tuple[int, int] | None = (
            (int(im["rgb"].shape[1]), int(im["rgb"].shape[2])) if "rgb" in im else None
        )  # (H, W)

    # -- lookups ---------------------------------------------------------------------------
    @property
    def synthetic(self) -> dict | None:
        """The generator manifest when the store was made from ``rafdata synth`` data."""
        raw = self.attrs.get("synthetic")
        return json.loads(raw) if raw else None

    def identity_index(self, name: str) -> int:
        """Row of /identities for a participant id ("17" finds "017"); StoreError if absent."""
        i = find_identity(self.identities, name)
        if i is not None:
            return i
        raise StoreError(
            self.path,
            f"identity {name!r} is not in the store (has: {', '.join(self.identities) or 'none'})",
        )

    def sequence_rows(
        self,
        identity: str | int | None = None,
        names: Iterable[str] | None = None,
        held_out: bool | None = None,
    ) -> np.ndarray:
        """Indices of /sequences matching all given filters."""
        keep = np.ones(len(self.sequences), bool)
        if identity is not None:
            idx = identity if isinstance(identity, int) else self.identity_index(identity)
            keep &= self.sequences.identity == idx
        if names is not None:
            wanted = set(names)
            keep &= np.array([n in wanted for n in self.sequences.name], bool)
        if held_out is not None:
            keep &= self.sequences.held_out == held_out
        return np.flatnonzero(keep)

    def timestep_rows(
        self,
        identity: str | int | None = None,
        sequences: Iterable[str] | None = None,
        held_out: bool | None = None,
    ) -> np.ndarray:
        """Indices of /timesteps in the selected sequences, ascending."""
        seqs = self.sequence_rows(identity, sequences, held_out)
        return np.flatnonzero(np.isin(self.timesteps.sequence, seqs))

    def image_rows(
        self,
        identity: str | int | None = None,
        sequences: Iterable[str] | None = None,
        held_out: bool | None = None,
        serials: Iterable[str] | None = None,
    ) -> np.ndarray:
        """Indices of /images whose timestep is selected (and whose camera serial, if given)."""
        ts = np.zeros(len(self.timesteps), bool)
        ts[self.timestep_rows(identity, sequences, held_out)] = True
        keep = ts[self.image_timestep] if self.n_images else np.zeros(0, bool)
        if serials is not None:
            wanted = set(serials)
            cam_ok = np.array([s in wanted for s in self.cameras.serial], bool)
            keep &= cam_ok[self.image_camera]
        return np.flatnonzero(keep)

    # -- images ----------------------------------------------------------------------------
    def _images(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        # Looking a dataset up by path costs more than reading a small chunk: keep handles.
        if self._image_ds is None or self._file is None:
            im = self._h5()["images"]
            self._image_ds = (im["rgb"], im["mask"])
        return self._image_ds

    def read_rgb(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 image ``index``."""
        self._check_image_index(index)
        return self._read_chunk(self._images()[0], index)

    def _read_chunk(self, ds: h5py.Dataset, index: int) -> np.ndarray:
        """One image chunk. Blosc chunks are fetched raw and decompressed here: skipping the
        HDF5 filter pipeline makes random single-image reads markedly faster."""
        if self._blosc:
            mask, payload = ds.id.read_direct_chunk((index,) + (0,) * (ds.ndim - 1))
            if mask == 0:  # the Blosc filter ran on this chunk
                import blosc

                out = np.empty(ds.shape[1:], np.uint8)
                blosc.decompress_ptr(payload, out.ctypes.data)
                return out
        return ds[index]

    def read_mask(self, index: int) -> np.ndarray | None:
        """(H, W) uint8 matte of image ``index`` or None when the source had none."""
        self._check_image_index(index)
        if not self.image_has_mask[index]:
            return None
        return self._read_chunk(self._images()[1], index)

    def image(self, index: int) -> ImageSample:
        """Image ``index`` with its camera and timestep row."""
        index = int(index)
        t = int(self.image_timestep[index])
        c = int(self.image_camera[index])
        ts = self.timesteps
        return ImageSample(
            index=index,
            rgb=self.read_rgb(index),
            mask=self.read_mask(index),
            timestep=t,
            camera=c,
            serial=self.cameras.serial[c],
            K=self.cameras.K[c],
            world_to_cam=self.cameras.world_to_cam[c],
            identity=int(ts.identity[t]),
            sequence=int(ts.sequence[t]),
            frame=int(ts.frame[t]),
            exp=ts.exp[t],
            pose=ts.pose[t],
            scale=float(ts.scale[t]),
        )

    def _check_image_index(self, index: int) -> None:
        if not 0 <= index < self.n_images:
            raise IndexError(f"image {index} out of range (store has {self.n_images})")

    def h5(self) -> h5py.File:
        """The open HDF5 file (read-only), for modules that own other groups (banks)."""
        return self._h5()


# --------------------------------------------------------------------------------------------
# Writer


class StoreWriter:
    """Appends sequences to a store, one committed sequence at a time.

    Usage::

        with StoreWriter(path) as w:  # compression="blosc-blosclz" by default
            with w.sequence("388", "EXP-1-head", held_out=False, source=...) as seq:
                rows = seq.add_timesteps(frames, exp, pose, scale, "bfm09")  # (T,) rows
                cam = seq.camera("222200037", K, world_to_cam)
                seq.add_images(rgb, mask, rows, cam)  # (T,H,W,3), (T,H,W) or None

    Opening an existing store checks its format version read-only first, so a newer store is
    refused before anything is written, then drops rows left over from an interrupted run.
    """

    def __init__(self, path: str | Path, compression: str = DEFAULT_COMPRESSION):
        self.path = Path(path)
        self.compression = compression
        self.codec = ImageCodec(compression)  # validates the name early
        if self.path.exists():
            probe = open_h5(self.path, "r")
            try:
                check_format(probe, self.path)
            finally:
                probe.close()
            self.f = open_h5(self.path, "r+")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open_h5(self.path, "w-")
            self._create_schema()
        self._recover()
        im = self.f["images"]
        stored = im.attrs.get("compression")
        if stored and stored != compression:  # chunks must match the dataset's filter
            self.compression = str(stored)
            self.codec = ImageCodec(self.compression)
        if "rgb" in im and self.codec.direct and not _takes_direct(im["rgb"], self.compression):
            self.codec = ImageCodec(self.compression, direct=False)  # let HDF5 filter it

    # -- schema ----------------------------------------------------------------------------
    def _create_schema(self) -> None:
        f = self.f
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["exp_space"] = ""
        f.attrs["exp_dim"] = 0
        f.attrs["pose_dim"] = POSE_DIM
        for group, cols in _COLUMNS.items():
            g = f.create_group(group)
            g.attrs["rows"] = 0
            for name, (dtype, shape, chunk) in cols.items():
                g.create_dataset(
                    name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                    chunks=(chunk, *shape), fletcher32=dtype is not _STR,
                )
        g = f.create_group("images")
        g.attrs["rows"] = 0
        for name, dtype in _IMAGE_COLUMNS.items():
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(65536,),
                             fletcher32=True)
        f.flush()

    def _recover(self) -> None:
        """Drop uncommitted rows (from a crash) and load the committed state."""
        f = self.f
        for group in TABLES:
            rows = int(f[group].attrs["rows"])
            for ds in f[group].values():
                if isinstance(ds, h5py.Dataset) and ds.shape[0] != rows:
                    ds.resize(rows, axis=0)
        self.exp_space = str(f.attrs["exp_space"])
        self.exp_dim = int(f.attrs["exp_dim"])
        self.identities = _str_list(f["identities/name"], f["identities"].attrs["rows"])
        n = int(f["cameras"].attrs["rows"])
        self._cameras = {
            (int(i), s): k
            for k, (i, s) in enumerate(
                zip(f["cameras/identity"][:n], _str_list(f["cameras/serial"], n), strict=True)
            )
        }
        n = int(f["sequences"].attrs["rows"])
        self._done = {
            (int(i), s)
            for i, s in zip(
                f["sequences/identity"][:n], _str_list(f["sequences/name"], n), strict=True
            )
        }
        # Rows written by sequences but not yet committed: appended to the file in one go per
        # commit (a sequence, or a whole group of them), so many small sequences cost few
        # HDF5 calls and flushes.
        self._base = {g: int(f[g].attrs["rows"]) for g in TABLES}
        self._staged: dict[str, dict[str, list[np.ndarray]]] = {g: {} for g in TABLES}
        self._staged_n = dict.fromkeys(TABLES, 0)
        self._staged_cams: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._staged_done: list[tuple[int, str]] = []
        self._grouped = False

    def close(self) -> None:
        if self.f:
            self.f.flush()
            self.f.close()
            self.f = None  # type: ignore[assignment]

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ---------------------------------------------------------------------------
    def identity_row(self, name: str) -> int | None:
        return find_identity(self.identities, name)

    def has_sequence(self, identity: str, name: str) -> bool:
        """True when this (identity, sequence) was committed by an earlier run."""
        i = self.identity_row(identity)
        return i is not None and (i, name) in self._done

    def set_attr(self, name: str, value: Any) -> None:
        """A root attribute outside the committed tables (e.g. the synthetic manifest)."""
        self.f.attrs[name] = value

    def check_exp_space(self, exp_space: str, exp_dim: int, source: Path) -> None:
        """Every vector in one store lives in one expression space; refuse a second one."""
        from rafdata.errors import SourceError

        if self.exp_space and (exp_space != self.exp_space or exp_dim != self.exp_dim):
            raise SourceError(
                source,
                f"expression space {exp_space} ({exp_dim} dims) differs from the store's "
                f"{self.exp_space} ({self.exp_dim} dims); one store holds one space",
            )

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def sequence(
        self, identity: str, name: str, held_out: bool, source: str | Path
    ) -> Iterator[SequenceWriter]:
        """Write one sequence; committed on clean exit, rolled back on any exception.

        Inside :meth:`group`, the commit waits for the end of the group.
        """
        seq = SequenceWriter(self, identity, name, held_out, str(source))
        try:
            yield seq
            seq._finish()
            if not self._grouped:
                self._publish()
        except BaseException:
            if not self._grouped:
                self._rollback()
            raise

    @contextmanager
    def group(self) -> Iterator[StoreWriter]:
        """Commit all sequences written inside as one unit (all or none).

        For many small sequences (coefficients only), where a commit per sequence would cost
        more than the data; a crash loses at most the group.
        """
        if self._grouped:
            raise RuntimeError("groups do not nest")
        self._grouped = True
        try:
            yield self
            self._grouped = False
            self._publish()
        except BaseException:
            self._grouped = False
            self._rollback()
            raise

    def _stage(self, group: str, **columns: np.ndarray) -> int:
        """Queue rows for a table; returns the row index the first of them will get."""
        start = self._base[group] + self._staged_n[group]
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of {group} differ in length: {lengths}")
        for name, values in columns.items():
            self._staged[group].setdefault(name, []).append(values)
        self._staged_n[group] += lengths.pop()
        return start

    def _publish(self) -> None:
        """Append staged rows, flush, then raise the ``rows`` counters that expose them."""
        f = self.f
        for group, cols in self._staged.items():
            for name, parts in cols.items():
                _append(f[group][name], np.concatenate(parts))
        im = f["images"]
        rows = {g: self._base[g] + self._staged_n[g] for g in TABLES}
        for name in ("rgb", "mask"):  # reserved capacity beyond the last image
            if name in im and im[name].shape[0] != rows["images"]:
                im[name].resize(rows["images"], axis=0)
        if self.exp_space:
            f.attrs["exp_space"] = self.exp_space
            f.attrs["exp_dim"] = self.exp_dim
        f.flush()  # the data must be durable before the counters that expose it
        for group in TABLES:
            f[group].attrs["rows"] = rows[group]
        f.flush()
        self._base = rows
        self._staged = {g: {} for g in TABLES}
        self._staged_n = dict.fromkeys(TABLES, 0)
        self._staged_cams.clear()
        self._done.update(self._staged_done)
        self._staged_done.clear()

    def _rollback(self) -> None:
        """Forget everything since the last commit (rows past the committed counts)."""
        self.f.flush()
        self._recover()


def _append(ds: h5py.Dataset, values: np.ndarray) -> int:
    """Append rows to a resizable dataset; returns the first new row."""
    start = ds.shape[0]
    ds.resize(start + len(values), axis=0)
    ds[start:] = values
    return start


def _write_chunk(ds: h5py.Dataset, row: int, image: EncodedImage) -> None:
    """Write one image as chunk ``row``: raw bytes when pre-compressed, else through HDF5."""
    if image.shape != ds.shape[1:]:
        raise ValueError(f"image shape {image.shape} does not match {ds.shape[1:]}")
    if image.payload is not None:
        ds.id.write_direct_chunk((row,) + (0,) * (ds.ndim - 1), image.payload, 0)
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

    def set(self, slot: int, timestep: int, camera: int, crc: int, mask_crc: int | None) -> None:
        c = self.cols
        c["timestep"][slot] = timestep
        c["camera"][slot] = camera
        c["crc"][slot] = crc
        c["has_mask"][slot] = mask_crc is not None
        c["mask_crc"][slot] = mask_crc or 0

    def view(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.cols.items()}


class SequenceWriter:
    """Rows of one sequence being written; see :meth:`StoreWriter.sequence`."""

    def __init__(self, w: StoreWriter, identity: str, name: str, held_out: bool, source: str):
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
        self.sequence = w._base["sequences"] + w._staged_n["sequences"]
        self.timestep_start = w._base["timesteps"] + w._staged_n["timesteps"]
        self.image_start = w._base["images"] + w._staged_n["images"]
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
        t = self.f["timesteps"]
        dim = int(exp.shape[1])
        if not self.w.exp_space:
            # First vectors of the store fix its space; drop a leftover from a rolled-back run.
            if "exp" in t and t["exp"].shape[1] != dim:
                del t["exp"]
            if "exp" not in t:
                t.create_dataset("exp", shape=(0, dim), maxshape=(None, dim), dtype=np.float32,
                                 chunks=(max(1, 65536 // dim), dim), fletcher32=True)
            self.w.exp_space, self.w.exp_dim = exp_space, dim
        self.w.check_exp_space(exp_space, dim, Path(self.source))
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
        if key in w._cameras:
            row = w._cameras[key]
            if row in w._staged_cams:
                K_old, w2c_old = w._staged_cams[row]
            else:
                K_old, w2c_old = self.f["cameras/K"][row], self.f["cameras/world_to_cam"][row]
            if not (np.allclose(K_old, K, atol=1e-6)
                    and np.allclose(w2c_old, world_to_cam, atol=1e-6)):
                raise StoreError(
                    self.w.path,
                    f"camera {serial} of identity {self.w.identities[self.identity]} is stored "
                    "with other intrinsics/extrinsics (different --crop/--size than before?)",
                )
            return row
        K = np.asarray(K, np.float64)
        world_to_cam = np.asarray(world_to_cam, np.float64)
        row = w._stage("cameras", serial=np.array([serial], dtype=object),
                       identity=np.array([self.identity], np.int32), K=K[None],
                       world_to_cam=world_to_cam[None])
        w._cameras[key] = row
        w._staged_cams[row] = (K, world_to_cam)
        return row

    def _image_datasets(self, height: int, width: int) -> None:
        im = self.f["images"]
        if "rgb" in im:
            h, w = im["rgb"].shape[1:3]
            if (h, w) != (height, width):
                raise StoreError(
                    self.w.path,
                    f"images are {width}x{height} but the store holds {w}x{h}; pass "
                    f"--size {w} {h} to resize on ingest",
                )
            return
        opts = compression_options(self.w.compression, checksum=False)
        im.create_dataset("rgb", shape=(0, height, width, 3), maxshape=(None, height, width, 3),
                          dtype=np.uint8, chunks=(1, height, width, 3), **opts)
        im.create_dataset("mask", shape=(0, height, width), maxshape=(None, height, width),
                          dtype=np.uint8, chunks=(1, height, width), fillvalue=0, **opts)
        im.attrs["compression"] = self.w.compression

    def reserve_images(self, n: int, height: int, width: int) -> None:
        """Make room for ``n`` more image slots of size (height, width).

        Slots can then be filled in any order with :meth:`put_image`; rows keep slot order,
        so parallel producers give the same store as a sequential run.
        """
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
        if not 0 <= slot < self.n_images:
            raise IndexError(f"image slot {slot} not reserved ({self.n_images} are)")
        row = self.image_start + slot
        _write_chunk(self._rgb, row, rgb)
        if mask is not None:
            _write_chunk(self._mask, row, mask)
        self._meta.set(slot, timestep, camera, rgb.crc, None if mask is None else mask.crc)

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
                raise StoreError(w.path, f"{empty.size} reserved image slots of sequence "
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
        w._staged_done.append((self.identity, self.name))
