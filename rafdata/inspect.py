"""What a store holds (summary) and whether it keeps the contract (verify).

``summarize`` reads only the small tables and dataset metadata. ``verify`` reads every chunk
of every dataset, so HDF5's Fletcher32 checksums catch damaged bytes, and checks every
invariant of the store contract (docs/store.md); it returns the violations found.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rafdata.bank import (
    BANK_DATASETS,
    BANKS_GROUP,
    bank_info,
    bank_names,
    bank_problems,
    is_leftover,
    plain_attr,
)
from rafdata.errors import CorruptImageError
from rafdata.progress import NullProgress, Progress
from rafdata.store import TABLES, Store


def _storage(ds: h5py.Dataset) -> tuple[int, int]:
    """(bytes on disk, bytes uncompressed) of a dataset."""
    return ds.id.get_storage_size(), ds.size * ds.dtype.itemsize if ds.dtype.kind != "O" else 0


def _datasets(group: h5py.Group) -> Iterator[tuple[str, h5py.Dataset]]:
    """Every dataset under ``group`` (hard links), except inside leftover ``/banks/.tmp-*``
    groups of older bank builds: a killed build can leave one whose object header is garbage,
    so it is never opened (visititems would fail on it, and with it inspect)."""
    found: list[tuple[str, h5py.Dataset]] = []

    def visit(g: h5py.Group, prefix: str) -> None:
        for name in g:
            if prefix == f"{BANKS_GROUP}/" and is_leftover(name):
                continue
            if not isinstance(g.get(name, getlink=True), h5py.HardLink):
                continue
            try:
                obj = g[name]
            except (KeyError, OSError, RuntimeError):
                if prefix.startswith(f"{BANKS_GROUP}/"):
                    continue  # a damaged bank: its checks report it (one line per bank)
                raise
            if isinstance(obj, h5py.Dataset):
                found.append((f"{prefix}{name}", obj))
            elif isinstance(obj, h5py.Group):
                visit(obj, f"{prefix}{name}/")

    visit(group, "")
    yield from found


def summarize(store: Store) -> dict[str, Any]:
    """A JSON-ready description of the store: tables, counts, sizes, banks."""
    f = store.h5()
    ts = store.timesteps
    seqs = store.sequences
    # One pass per table, not one per identity: stores hold hundreds of identities.
    n_id = len(store.identities)

    def per_identity(ids: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(ids, weights=weights, minlength=n_id)[:n_id]

    n_seq, n_ts = per_identity(seqs.identity), per_identity(ts.identity)
    n_img = per_identity(seqs.identity, seqs.image_count)
    n_cam = per_identity(store.cameras.identity)
    identities = [{"name": name, "sequences": int(n_seq[i]), "timesteps": int(n_ts[i]),
                   "images": int(n_img[i]), "cameras": int(n_cam[i])}
                  for i, name in enumerate(store.identities)]
    sequences = [
        {
            "identity": store.identities[int(seqs.identity[k])],
            "name": seqs.name[k],
            "held_out": bool(seqs.held_out[k]),
            "timesteps": int(seqs.timestep_count[k]),
            "images": int(seqs.image_count[k]),
        }
        for k in range(len(seqs))
    ]
    stored = raw = 0
    for _, ds in _datasets(f):
        if not ds.is_virtual:  # virtual images are counted in their segments below
            s, r = _storage(ds)
            stored, raw = stored + s, raw + r
    img_stored = img_raw = mask_stored = mask_raw = 0
    file_bytes = store.path.stat().st_size
    for images, path in _image_groups(store):
        s, r = _storage(images["rgb"])
        img_stored, img_raw = img_stored + s, img_raw + r
        s2, r2 = _storage(images["mask"])
        mask_stored, mask_raw = mask_stored + s2, mask_raw + r2
        if path != store.path:
            stored, raw = stored + s + s2, raw + r + r2
            file_bytes += path.stat().st_size
    banks = [bank_info(store, name) for name in bank_names(store)]
    h, w = store.image_size or (0, 0)
    return {
        "path": str(store.path),
        "format_version": store.format_version,
        "exp_space": store.exp_space,
        "exp_dim": store.exp_dim,
        "pose_dim": store.pose_dim,
        "synthetic": store.synthetic is not None,
        "identities": identities,
        "sequences": sequences,
        "cameras": len(store.cameras),
        "timesteps": len(ts),
        "images": store.n_images,
        "images_with_mask": int(store.image_has_mask.sum()),
        "resolution": {"width": w, "height": h},
        "compression": plain_attr(f["images"].attrs.get("compression", "")),
        "file_bytes": file_bytes,
        "segments": len(store.segment_paths),
        "data_bytes_raw": raw,
        "data_bytes_stored": stored,
        "image_compression_ratio": (img_raw / img_stored) if img_stored else None,
        "mask_compression_ratio": (mask_raw / mask_stored) if mask_stored else None,
        "banks": banks,
    }


def _image_groups(store: Store) -> Iterator[tuple[h5py.Group, Path]]:
    """(/images group, its file) where image chunks really are: each segment, or the main
    file of a format-1 store."""
    if not store.segment_paths:
        if store.n_images:
            yield store.h5()["images"], store.path
        return
    for path in store.segment_paths:
        with h5py.File(path, "r", locking=False) as seg:
            yield seg["images"], path


@dataclass
class VerifyResult:
    chunks_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store, progress: Progress | None = None) -> VerifyResult:
    """Read every chunk (checksums) and check every invariant of the contract."""
    progress = progress or NullProgress()
    result = VerifyResult()
    f = store.h5()
    problems = result.problems

    # 1. every byte readable and matching its checksum: Fletcher32 on tables (HDF5 checks it
    # on read), CRC-32 of the content on images
    # (bank datasets are read, checksums included, by the bank checks in check_invariants)
    datasets = [(n, ds) for n, ds in _datasets(f)
                if n not in ("images/rgb", "images/mask") and not _bank_dataset(n)]
    total = sum(_n_chunks(ds) for _, ds in datasets) + store.n_images
    progress.start("reading chunks", total)
    for name, ds in datasets:
        try:
            result.chunks_read += _read_all(ds, progress)
        except OSError as err:
            problems.append(f"/{name}: unreadable or checksum mismatch ({err})")
    result.chunks_read += _check_images(store, problems, progress)

    # 2. the contract
    problems.extend(check_invariants(store))
    return result


def _check_images(store: Store, problems: list[str], progress: Progress) -> int:
    """Decompress every image (and matte) chunk and compare its CRC-32 with the stored one."""
    bad: list[int] = []
    unreadable: list[int] = []
    read = 0
    for i in range(store.n_images):
        try:
            store.read_rgb(i)
            read += 1
            if store.image_has_mask[i]:
                store.read_mask(i)
                read += 1
        except CorruptImageError as err:
            (bad if err.kind == CorruptImageError.CRC else unreadable).append(i)
        progress.advance()
    if unreadable:
        problems.append(f"/images: {len(unreadable)} images cannot be decompressed "
                        f"(first at row {unreadable[0]})")
    if bad:
        problems.append(f"/images: {len(bad)} images fail their CRC-32 (first at row {bad[0]})")
    return read


def _n_chunks(ds: h5py.Dataset) -> int:
    if ds.chunks is None or ds.shape[0] == 0:
        return 1
    return -(-ds.shape[0] // ds.chunks[0])


def _read_all(ds: h5py.Dataset, progress: Progress) -> int:
    if ds.chunks is None or ds.shape[0] == 0:
        ds[()]
        progress.advance()
        return 1
    step = ds.chunks[0]
    n = 0
    for start in range(0, ds.shape[0], step):
        ds[start : start + step]
        n += 1
        progress.advance()
    return n


def check_invariants(store: Store) -> list[str]:
    """Contract checks on the committed tables; returns human-readable violations."""
    out: list[str] = []
    f = store.h5()
    n_id, n_seq, n_cam = len(store.identities), len(store.sequences), len(store.cameras)
    ts, seqs, cams = store.timesteps, store.sequences, store.cameras
    T = len(ts)

    for group in TABLES:
        rows = store.rows[group]
        for name, ds in f[group].items():
            if isinstance(ds, h5py.Dataset) and ds.shape[0] < rows:
                out.append(f"/{group}/{name}: {ds.shape[0]} rows, fewer than committed {rows}")

    def in_range(name: str, values: np.ndarray, n: int) -> None:
        bad = np.flatnonzero((values < 0) | (values >= n))
        if bad.size:
            out.append(f"{name}: {bad.size} indices out of range [0, {n}) (first at row {bad[0]})")

    in_range("/sequences/identity", seqs.identity, n_id)
    in_range("/cameras/identity", cams.identity, n_id)
    in_range("/timesteps/identity", ts.identity, n_id)
    in_range("/timesteps/sequence", ts.sequence, n_seq)
    if store.n_images:
        in_range("/images/timestep", store.image_timestep, T)
        in_range("/images/camera", store.image_camera, n_cam)

    if T:
        if store.exp_dim and ts.exp.shape[1] != store.exp_dim:
            out.append(f"/timesteps/exp has {ts.exp.shape[1]} dims, root says {store.exp_dim}")
        for name in ("exp", "pose", "scale"):
            arr = getattr(ts, name)
            bad = ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
            if bad.any():
                out.append(f"/timesteps/{name}: {int(bad.sum())} rows not finite "
                           f"(first at row {int(np.flatnonzero(bad)[0])})")
        if not out:
            if (seqs.identity[ts.sequence] != ts.identity).any():
                out.append("/timesteps: identity differs from its sequence's identity")
    if not np.isfinite(cams.K).all() or not np.isfinite(cams.world_to_cam).all():
        out.append("/cameras: non-finite intrinsics or extrinsics")

    for k in range(n_seq):
        a, n = int(seqs.timestep_start[k]), int(seqs.timestep_count[k])
        if a < 0 or a + n > T or (n and (ts.sequence[a : a + n] != k).any()):
            out.append(f"/sequences row {k} ({seqs.name[k]}): timestep range does not match")
        if n > 1 and (np.diff(ts.frame[a : a + n]) <= 0).any():
            out.append(f"/sequences row {k} ({seqs.name[k]}): frames not increasing")
        ia, ni = int(seqs.image_start[k]), int(seqs.image_count[k])
        if ia < 0 or ia + ni > store.n_images:
            out.append(f"/sequences row {k} ({seqs.name[k]}): image range out of bounds")
        elif ni and not out:
            t_of = store.image_timestep[ia : ia + ni]
            if (ts.sequence[t_of] != k).any():
                out.append(f"/sequences row {k} ({seqs.name[k]}): images of other sequences")

    if store.n_images and not out:
        img_id = ts.identity[store.image_timestep]
        cam_id = cams.identity[store.image_camera]
        bad = np.flatnonzero(img_id != cam_id)
        if bad.size:
            out.append(f"/images: {bad.size} images use another identity's camera "
                       f"(first at row {bad[0]})")
        pairs = store.image_timestep.astype(np.int64) * max(n_cam, 1) + store.image_camera
        if len(np.unique(pairs)) != len(pairs):
            out.append("/images: the same (timestep, camera) is stored twice")

    out.extend(_check_banks(store))
    return out


def _bank_dataset(path: str) -> bool:
    """``banks/NAME/members`` etc.: the datasets that rafdata.bank reads and checks itself."""
    parts = path.split("/", 2)
    return len(parts) == 3 and parts[0] == BANKS_GROUP and parts[2] in BANK_DATASETS


def _check_banks(store: Store) -> list[str]:
    """Every bank's violations, one line each, from rafdata.bank (which owns /banks):
    unreadable datasets and Fletcher32 / CRC-32 mismatches, missing members, tables or HNSW
    index, members or neighbours out of range, negative or held out (a test-set leak),
    neighbours of the same identity or outside the bank, and distances that are not
    ascending or not those of the expression vectors. Leftover ``.tmp-*`` groups of older
    builds are ignored."""
    out: list[str] = []
    for name in bank_names(store):
        out.extend(bank_problems(store, name))
    return out


# Root and bank attributes that record when or how long, not what: left out of digests.
_UNSTABLE_ATTRS = {"ingest_history", "created", "build_seconds"}


def digest(store: Store) -> str:
    """SHA-256 over everything the store contract defines: tables, every image and matte,
    root attributes, banks (but not run times and history). Equal digests: equal stores, as
    any reader sees them, however their segments are cut."""
    import hashlib

    h = hashlib.sha256()

    def add(name: str, value: Any) -> None:
        h.update(name.encode())
        arr = np.asarray(value)
        if arr.dtype == object:
            h.update(repr(arr.tolist()).encode())
        else:
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())

    add("identities", store.identities)
    for table in ("sequences", "cameras", "timesteps"):
        for k, v in vars(getattr(store, table)).items():
            add(f"{table}/{k}", v)
    for k in ("image_timestep", "image_camera", "image_has_mask", "image_crc",
              "image_mask_crc"):
        add(k, getattr(store, k))
    for i in range(store.n_images):
        add("rgb", store.read_rgb(i))
        mask = store.read_mask(i)
        add("mask", np.zeros(0, np.uint8) if mask is None else mask)
    add("attrs", sorted((k, str(v)) for k, v in store.attrs.items()
                        if k not in _UNSTABLE_ATTRS))
    f = store.h5()
    for name in bank_names(store):
        g = f[BANKS_GROUP][name]
        add(f"bank/{name}", sorted((k, str(v)) for k, v in g.attrs.items()
                                   if k not in _UNSTABLE_ATTRS))
        for n, ds in _datasets(g):
            add(f"bank/{name}/{n}", ds[()])
    return h.hexdigest()
