"""The rafdata store: frames, cameras and tracked coefficients in chunked HDF5 (reader side).

Layout (format version 2; see docs/store.md for the full contract)::

    /                  attrs: format, format_version, exp_space, exp_dim, pose_dim, ...
    /identities/name   (I,) str
    /sequences/...     name, identity, held_out, timestep_start/count, image_start/count, source
    /cameras/...       serial, identity, K (C,3,3), world_to_cam (C,4,4)
    /timesteps/...     identity, sequence, frame, exp (T,D), pose (T,6), scale (T,)
    /images/...        rgb (N,H,W,3) uint8, mask (N,H,W) uint8, has_mask, timestep, camera
    /segments/...      file, image_start/count, sequence_start/count: the segment files
    /banks/{name}/...  written by rafdata.bank

Since version 2 the images live in immutable segment files in ``store.h5.parts/`` and
``/images/rgb`` and ``/images/mask`` are virtual datasets over them (plain h5py reads them as
usual); this reader goes to the segment file itself. Writers never modify a committed file:
see rafdata.writer (appending), rafdata.merge (the main file) and rafdata.commit. Version-1
files (images inside the main file) are read as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter in this process; readers need it too)
import numpy as np

from rafdata.checksum import crc32
from rafdata.errors import CorruptImageError, StoreError

FORMAT = "rafdata"
FORMAT_VERSION = 2
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

from rafdata.codecs import BLOSC_CODECS, COMPRESSIONS, DEFAULT_COMPRESSION  # noqa: E402,F401


def compression_options(name: str, checksum: bool = True) -> dict[str, Any]:
    """``create_dataset`` keywords for a lossless codec.

    ``checksum`` adds HDF5's Fletcher32 filter (tables). Image datasets go without it: their
    chunks are compressed outside HDF5 and written directly, and carry a CRC-32 of the raw
    content in /images/crc instead, which ``rafdata inspect --verify`` checks.
    """
    if name in BLOSC_CODECS:
        cname, level = BLOSC_CODECS[name]
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


# filter_mask of a chunk stored without its dataset's one filter (Blosc): HDF5 skips the
# filters whose bit is set when it reads the chunk, so a raw chunk needs no Blosc header.
RAW_CHUNK = 0b1


@dataclass(frozen=True)
class EncodedImage:
    """An image ready for the writer: its chunk bytes (Blosc codecs) or the array itself.

    shape: the image shape. crc: CRC-32 of the raw bytes. payload: the chunk exactly as it is
    stored (a Blosc frame, or the raw bytes), or None when HDF5 compresses (gzip, lzf).
    filter_mask: HDF5's per-chunk record of skipped filters: 0, or RAW_CHUNK for raw bytes in
    a Blosc dataset.
    """

    shape: tuple[int, ...]
    crc: int
    payload: bytes | memoryview | None
    array: np.ndarray | None
    filter_mask: int = 0


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
        self.direct = direct and (name in BLOSC_CODECS or name == "none")
        if self.direct and name in BLOSC_CODECS:
            _blosc_for_threads()

    def encode(self, image: np.ndarray, compress: bool = True,
               min_saving: float = 0.0) -> EncodedImage:
        """Checksum and (for Blosc codecs) compress one uint8 image; thread-safe.

        A Blosc codec stores the bytes as they are (a raw chunk, marked so that HDF5 skips
        Blosc when reading it) without trying when ``compress`` is False, and when the Blosc
        frame saves less than ``min_saving`` of the bytes (a raw chunk reads without a
        decompression copy and takes about the same space).
        """
        data = np.ascontiguousarray(image, dtype=np.uint8)
        crc = crc32(data)
        if not self.direct:
            return EncodedImage(data.shape, crc, None, data)
        if self.name == "none":
            return EncodedImage(data.shape, crc, memoryview(data).cast("B"), None)
        if not compress:
            return EncodedImage(data.shape, crc, memoryview(data).cast("B"), None, RAW_CHUNK)
        import blosc

        cname, level = BLOSC_CODECS[self.name]
        payload = blosc.compress(data, typesize=1, clevel=level, shuffle=blosc.SHUFFLE,
                                 cname=cname)
        if min_saving and len(payload) >= (1 - min_saving) * data.nbytes:
            return EncodedImage(data.shape, crc, memoryview(data).cast("B"), None, RAW_CHUNK)
        return EncodedImage(data.shape, crc, payload, None)

    def stream(self) -> StreamEncoder:
        """An encoder for one stream of similar images (one video, in order)."""
        return StreamEncoder(self)


class StreamEncoder:
    """Encodes one stream of images (e.g. one camera's video) and stops trying to compress
    what does not shrink.

    Colour with real camera noise does not shrink under BloscLZ-1 (ratio 1.00, docs/
    benchmarks.md) yet costs ~0.3 ms per 512 px frame to try; mattes shrink ~25x. So a Blosc
    codec tries compression on the first image and every ``PROBE_EVERY``-th one; a try that
    saves less than ``MIN_SAVING`` is stored raw (see :meth:`ImageCodec.encode`), and so are
    the images up to the next try, without trying. The choice depends only on the stream's
    own images in order, so every run over the same video writes the same bytes. Not
    thread-safe: one per producer.
    """

    PROBE_EVERY = 16
    MIN_SAVING = 0.05  # a try saving less than this share of the bytes is not kept

    def __init__(self, codec: ImageCodec):
        self.codec = codec
        self.n = 0
        self.compress = True

    def encode(self, image: np.ndarray) -> EncodedImage:
        probe = self.n % self.PROBE_EVERY == 0
        self.n += 1
        enc = self.codec.encode(image, compress=probe or self.compress,
                                min_saving=self.MIN_SAVING)
        if probe:
            self.compress = enc.filter_mask != RAW_CHUNK
        return enc


BLOSC_FILTER_ID = 32001


def blosc_only(ds: h5py.Dataset) -> bool:
    """True when the dataset's only filter is Blosc: its chunks are exactly Blosc frames, so
    they can be written and read raw (any other filter, e.g. a checksum, changes the bytes)."""
    dcpl = ds.id.get_create_plist()
    return dcpl.get_nfilters() == 1 and dcpl.get_filter(0)[0] == BLOSC_FILTER_ID


def _takes_direct(ds: h5py.Dataset, compression: str) -> bool:
    """Chunks made by ``ImageCodec(compression)`` can be written raw into ``ds``: its filters
    are exactly Blosc (Blosc codecs) or none at all ("none")."""
    if compression in BLOSC_CODECS:
        return blosc_only(ds)
    return compression == "none" and ds.id.get_create_plist().get_nfilters() == 0


def check_format(f: h5py.File, path: Path) -> None:
    """Refuse files that are not rafdata stores or come from a newer format version."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise StoreError(path, "not a rafdata store (no format='rafdata' attribute)")
    try:
        version = int(f.attrs.get("format_version", -1))
    except (TypeError, ValueError):
        raise StoreError(path, f"format_version {f.attrs.get('format_version')!r} is not a "
                         "number: the root attributes are damaged") from None
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
        # process holds it, and HDF5's locks fail outright on NFS. Writers take the store's
        # own lock (rafdata.lock).
        return h5py.File(path, mode, locking=False)
    except FileNotFoundError:
        raise StoreError(path, "no such store file") from None
    except OSError as err:
        first = " ".join(str(err).split())
        hint = ""
        parts = Path(path).with_name(Path(path).name + ".parts")
        if mode == "r" and parts.is_dir():
            hint = f"; {RECOVERY_HINT.replace('STORE', str(path))}"
        raise StoreError(path, f"cannot open as HDF5 ({err.__class__.__name__}: {first})"
                         f"{hint}") from None


# What to do about a main file whose tables are damaged: its segments hold every committed
# sequence, and rebuilding the tables from them is one command.
RECOVERY_HINT = ("`rafdata consolidate STORE --rebuild` rebuilds its tables from its "
                 "segment files (banks must then be built again)")


def create_column(g: h5py.Group, name: str, data: np.ndarray, dtype: Any,
                  shape: tuple[int, ...], chunk: int) -> h5py.Dataset:
    """A table column holding ``data`` (rows of ``shape``), resizable, with Fletcher32 on
    numbers. Chunks hold at most ``chunk`` rows and no more than the data needs: a column
    of five rows must not cost a 512 KiB chunk in every segment file."""
    data = np.asarray(data, dtype=object if dtype is _STR else dtype)
    data = data.reshape(len(data), *shape) if data.size else np.zeros((0, *shape), data.dtype)
    rows = max(1, min(chunk, len(data)))
    return g.create_dataset(name, data=data, dtype=dtype, maxshape=(None, *shape),
                            chunks=(rows, *shape), fletcher32=dtype is not _STR)


def _str_list(ds: h5py.Dataset, n: int) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[:n]]


# Names are data: participant numbers, sequence names and frame numbers come from folder
# names. str.isdigit() is True for '①' and '²' (which int() refuses) and int() accepts '٣',
# ' 17' and '1_7', so numbers are matched as ASCII digits only.
_ASCII_NUMBER = re.compile(r"[0-9]+")


def is_number(name: str) -> bool:
    """True when ``name`` is a plain non-negative number in ASCII digits ("017", not "①")."""
    return _ASCII_NUMBER.fullmatch(name) is not None


def identity_matches(name: str, query: str) -> bool:
    """Participant ids compare as integers when both are numbers (:func:`is_number`: "17" ==
    "017"; "①" is a name, not a number)."""
    if name == query:
        return True
    return is_number(name) and is_number(query) and int(name) == int(query)


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


class _BadChunk(Exception):
    pass


def _read_blosc_chunk(ds: h5py.Dataset, row: int) -> np.ndarray:
    """Image ``row`` of a dataset whose only filter is Blosc, read raw from its chunk: a Blosc
    frame is decompressed here, a raw chunk (RAW_CHUNK) is the image itself, read straight
    into the returned array."""
    shape = ds.shape[1:]
    size = int(np.prod(shape))
    # Room for a Blosc frame of an image that did not shrink: its bytes plus a 16-byte header
    # (a larger chunk is damage: h5py refuses to read it into this buffer).
    buf = np.empty(size + 16, np.uint8)
    mask, chunk = ds.id.read_direct_chunk((row,) + (0,) * (ds.ndim - 1), out=buf)
    if mask == 0:  # the Blosc filter ran on this chunk
        return _blosc_decode(chunk, shape)
    if mask != RAW_CHUNK or len(chunk) != size:
        raise _BadChunk(f"raw chunk of {len(chunk)} bytes (filter mask {mask}), expected "
                        f"{size}")
    return buf[:size].reshape(shape)


def _blosc_decode(payload: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """Decompress one Blosc frame into a new uint8 array of ``shape``.

    The frame's header (bytes 4-16: decompressed size, block size, compressed size) is
    checked first: ``decompress_ptr`` trusts it, and a damaged header would otherwise write
    past the output buffer.
    """
    import blosc

    out = np.empty(shape, np.uint8)
    if len(payload) < 16:
        raise _BadChunk(f"Blosc frame of {len(payload)} bytes is truncated")
    nbytes = int.from_bytes(payload[4:8], "little")
    cbytes = int.from_bytes(payload[12:16], "little")
    if nbytes != out.nbytes or cbytes != len(payload):
        raise _BadChunk(f"Blosc header says {nbytes} bytes from {cbytes}, expected "
                        f"{out.nbytes} from {len(payload)}")
    blosc.decompress_ptr(payload, out.ctypes.data)
    return out


class Store:
    """Read-only view of a store, showing committed rows only.

    Small tables (identities, sequences, cameras, timesteps) are read into memory on open;
    images are read one at a time (fancy indexing many rows of a chunked 4-D dataset is far
    slower). The HDF5 handle is opened lazily and dropped when pickled, so a Store can be passed
    to DataLoader workers and each worker opens its own handle after the fork.
    """

    def __init__(self, path: str | Path, verify_crc: bool = True):
        self.path = Path(path)
        # Check each image's CRC-32 on read: ~0.2 ms per 512 px image + matte (bench_loader)
        # against training on silently damaged pixels.
        self.verify_crc = verify_crc
        self._file: h5py.File | None = None
        self._image_ds: tuple[h5py.Dataset, h5py.Dataset] | None = None
        self._segment_files: dict[int, tuple[h5py.File, h5py.Dataset, h5py.Dataset, bool]] = {}
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
        for entry in self._segment_files.values():
            entry[0].close()
        self._segment_files = {}

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py objects do not pickle; each process reopens
        state["_image_ds"] = None
        state["_segment_files"] = {}
        return state

    def _load(self) -> None:
        try:
            self._load_tables()
        except StoreError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
            # A checksum or decompression failure in a table chunk, a deleted dataset, a table
            # whose shape breaks the contract: all damage, all one line.
            self.close()
            what = "damaged table data" if isinstance(err, OSError) else "damaged store"
            raise StoreError(self.path, f"{what} ({err.__class__.__name__}: {err}); "
                             f"{RECOVERY_HINT}") from None

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
        self.image_crc = im["crc"][:n]
        self.image_mask_crc = im["mask_crc"][:n]
        self.image_size: tuple[int, int] | None = (
            (int(im["rgb"].shape[1]), int(im["rgb"].shape[2])) if "rgb" in im else None
        )  # (H, W)
        self._check_shapes()
        self._load_segments(f)
        self._blosc = "rgb" in im and not im["rgb"].is_virtual and blosc_only(im["rgb"])
        _blosc_for_threads()  # DataLoader workers read in parallel

    def _check_shapes(self) -> None:
        """Table lengths and widths that disagree with the counters and attributes."""
        ts = self.timesteps
        n_t = len(ts.frame)
        if self.exp_dim and ts.exp.shape[1:] != (self.exp_dim,):
            raise StoreError(self.path, f"/timesteps/exp has shape {ts.exp.shape}, but the "
                             f"store says exp_dim {self.exp_dim}")
        for name, arr in (("identity", ts.identity), ("sequence", ts.sequence),
                          ("exp", ts.exp), ("pose", ts.pose), ("scale", ts.scale)):
            if len(arr) != n_t:
                raise StoreError(self.path, f"/timesteps/{name} holds {len(arr)} rows, "
                                 f"/timesteps/frame {n_t}: the table is damaged")
        for name, arr in (("timestep", self.image_timestep), ("camera", self.image_camera),
                          ("has_mask", self.image_has_mask), ("crc", self.image_crc),
                          ("mask_crc", self.image_mask_crc)):
            if len(arr) != self.n_images:
                raise StoreError(self.path, f"/images/{name} holds {len(arr)} rows, the "
                                 f"store {self.n_images}: the table is damaged")
        if self.n_images and self.image_size is None:
            raise StoreError(self.path, f"/images/rgb is missing but the store has "
                             f"{self.n_images} images")

    def _load_segments(self, f: h5py.File) -> None:
        """The segment files holding the images (format 2); each must exist."""
        self.segment_paths: list[Path] = []
        self._seg_start = np.zeros(0, np.int64)
        if "segments" not in f:
            return
        g = f["segments"]
        n = int(g.attrs.get("rows", 0))
        files = _str_list(g["file"], n)
        start, count = g["image_start"][:n], g["image_count"][:n]
        has = count > 0
        folder = self.path.with_name(self.path.name + ".parts")
        self.segment_paths = [folder / files[i] for i in np.flatnonzero(has)]
        self._seg_start = start[has].astype(np.int64)
        self._seg_count = count[has].astype(np.int64)
        if int(self._seg_count.sum()) != self.n_images:
            raise StoreError(self.path, f"/segments holds {int(self._seg_count.sum())} images, "
                             f"the store {self.n_images}: the table is damaged")
        for p, c in zip(self.segment_paths, self._seg_count, strict=True):
            if not p.is_file():
                # HDF5 would read a missing source of a virtual dataset as zeros: refuse.
                raise StoreError(self.path, f"segment file {p} is missing ({int(c)} images "
                                 "live there); restore it from a backup, or remove its "
                                 "sequences by re-ingesting into a new store")

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
    MAX_OPEN_SEGMENTS = 64  # file handles kept per process (each DataLoader worker has its own)

    def _locate(self, index: int) -> tuple[h5py.Dataset, h5py.Dataset, int, bool, Path]:
        """(rgb dataset, mask dataset, row in it, Blosc-only?, file) holding image ``index``."""
        if not len(self._seg_start):  # format 1: images in the main file
            if self._image_ds is None or self._file is None:
                # Looking a dataset up by path costs more than reading a small chunk.
                im = self._h5()["images"]
                self._image_ds = (im["rgb"], im["mask"])
            return (*self._image_ds, index, self._blosc, self.path)
        k = int(np.searchsorted(self._seg_start, index, side="right")) - 1
        entry = self._segment_files.get(k)
        path = self.segment_paths[k]
        if entry is None:
            if len(self._segment_files) >= self.MAX_OPEN_SEGMENTS:
                old = next(iter(self._segment_files))
                self._segment_files.pop(old)[0].close()
            f = open_h5(path, "r")
            try:
                rgb, mask = f["images/rgb"], f["images/mask"]
            except KeyError:
                f.close()
                raise StoreError(path, "segment file has no /images/rgb or /images/mask: it "
                                 "is damaged") from None
            entry = (f, rgb, mask, blosc_only(rgb))
            self._segment_files[k] = entry
        return entry[1], entry[2], index - int(self._seg_start[k]), entry[3], path

    def read_rgb(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 image ``index``; CorruptImageError when its bytes are damaged."""
        return self._read_checked(index, 0, self.image_crc, "colour")

    def read_mask(self, index: int) -> np.ndarray | None:
        """(H, W) uint8 matte of image ``index`` or None when the source had none."""
        self._check_image_index(index)
        if not self.image_has_mask[index]:
            return None
        return self._read_checked(index, 1, self.image_mask_crc, "matte")

    def _read_checked(self, index: int, which: int, crcs: np.ndarray, what: str) -> np.ndarray:
        """Image ``index`` of dataset ``which`` (0 colour, 1 matte), its CRC-32 checked."""
        self._check_image_index(index)
        located = self._locate(index)
        ds, row, blosc, path = located[which], located[2], located[3], located[4]
        out = self._decode(ds, row, blosc, index, path, what)
        if self.verify_crc and crc32(out) != int(crcs[index]):
            raise CorruptImageError(self.path, index, f"{what} fails its CRC-32 (damaged "
                                    f"bytes in {path.name})", kind=CorruptImageError.CRC)
        return out

    def _decode(self, ds: h5py.Dataset, row: int, blosc: bool, index: int, path: Path,
                what: str) -> np.ndarray:
        """One image chunk. Blosc chunks are fetched raw and decompressed here: skipping the
        HDF5 filter pipeline makes random single-image reads markedly faster."""
        try:
            if blosc:
                return _read_blosc_chunk(ds, row)
            return ds[row]
        except Exception as err:  # noqa: BLE001 - any failure to decode a chunk is damage
            raise CorruptImageError(self.path, index, f"{what} chunk in {path.name} cannot be "
                                    f"decoded ({err.__class__.__name__}: {err})",
                                    kind=CorruptImageError.DECODE) from None

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




def store_files(path: str | Path) -> list[Path]:
    """The files a store consists of: its main file and its segment folder (if any)."""
    path = Path(path)
    parts = path.with_name(path.name + ".parts")
    return [path, parts] if parts.is_dir() else [path]


def copy_store(src: str | Path, dst: str | Path) -> Path:
    """Copy a store (main file and segment folder) to ``dst``; returns ``dst``.

    Segment paths inside the main file are relative, so the copy reads on its own.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    shutil.copyfile(src, dst)
    parts = src.with_name(src.name + ".parts")
    if parts.is_dir():
        shutil.copytree(parts, dst.with_name(dst.name + ".parts"), dirs_exist_ok=True)
    return dst


def remove_store(path: str | Path) -> None:
    """Delete a store: main file, segment folder, lock file (nothing else)."""
    import shutil

    path = Path(path)
    for p in store_files(path):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    path.with_name(path.name + ".lock").unlink(missing_ok=True)
