"""Atomic replacement of a store's main file.

HDF5 updates its metadata (B-trees, heaps, object headers) in place and in no particular
order, so a process killed while writing into a file can leave it unreadable, and a later
writer can turn a torn file into silent damage. The store therefore never writes into a
committed file: every change builds a new file beside the old one, makes it durable
(``fsync``), and renames it over the old one, which POSIX makes atomic. A kill at any instant
leaves either the old file or the new one, plus a temporary that the next writer removes.

Images, which are large, are not rewritten this way: they live in immutable segment files
(``rafdata.segments``) that the main file references.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import h5py

from rafdata import faults
from rafdata.errors import StoreError
from rafdata.lock import WriterLock

TMP_MARK = ".tmp-"  # temporaries are named {store}.tmp-{pid}; removed by the next writer


def fsync_file(path: str | Path) -> None:
    """Force a file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or unlink inside folder ``path`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def ensure_space(folder: str | Path, need: int, what: str) -> None:
    """Refuse before writing ``need`` bytes into ``folder`` that cannot fit.

    Checks the free space of the filesystem and the process's file-size limit (``ulimit
    -f``). A write that fails midway is handled too (the temporary is discarded), but a
    check first gives the plainer message. ``RAFDATA_SPACE_CHECK=0`` turns the check off so
    the tests can exercise the failing writes themselves.
    """
    import resource

    if os.environ.get("RAFDATA_SPACE_CHECK") == "0":
        return
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free is not None and need > free:
        raise StoreError(folder, f"not enough space for {what}: needs about {_mib(need)}, "
                         f"{_mib(free)} free; committed data is kept, free space and rerun")
    if limit != resource.RLIM_INFINITY and need > limit:
        raise StoreError(folder, f"{what} needs about {_mib(need)}, more than the file-size "
                         f"limit of {_mib(limit)} (ulimit -f); committed data is kept")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# A segment starts its writeback every so many bytes, so that the fsync committing it finds
# little left to write: otherwise the last segment's fsync is idle time at the end of a run
# (~40 ms per 100 MB measured), and dirty pages pile up in memory on long runs.
WRITEBACK_EVERY = 16 << 20


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    import ctypes
    import ctypes.util

    if os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing dirty pages, do not wait


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting for them (a
    no-op where ``sync_file_range`` is missing). Durability still comes from fsync."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class GuardedFile(io.FileIO):
    """A file for HDF5's file-object driver that stops writing after its first failure.

    When a write fails (full disk, file-size limit) HDF5 is told once; every later write is
    dropped and reported as done. Without this, HDF5 retries its metadata writes while the
    file's objects are closed and freed, and prints a traceback per object from C, or
    crashes outright. The caller discards the file after any failure, so dropped writes never
    reach a committed file.
    """

    failed: OSError | None = None
    _unflushed = 0  # bytes written since writeback was last started

    def write(self, b) -> int:
        if self.failed is not None:
            return len(memoryview(b))
        try:
            n = super().write(b)
        except OSError as err:
            self.failed = err
            raise
        self._unflushed += n
        if self._unflushed >= WRITEBACK_EVERY:
            self._unflushed = 0
            start_writeback(self.fileno())
        return n

    def flush(self) -> None:
        if self.failed is None:
            super().flush()


@contextmanager
def in_memory_file(path: str | Path) -> Iterator[h5py.File]:
    """A new HDF5 file built in memory, written to ``path`` atomically on a clean exit.

    For the main file, which holds tables and references but no images: building it in
    memory means a full disk can only fail our own plain write of its bytes (a clean
    OSError), never HDF5 halfway through its metadata.
    """
    path = Path(path)
    f = h5py.File(f"{path.name}-in-memory", "w", driver="core", backing_store=False)
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    with new_file(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(image)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def remove_temporaries(store: str | Path) -> list[Path]:
    """Delete main-file temporaries left by killed writers. Call only while holding the lock."""
    store = Path(store)
    removed = []
    for p in store.parent.glob(f"{store.name}{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def publish(tmp: Path, path: Path) -> None:
    """Make ``tmp`` durable, then rename it over ``path`` and make the rename durable."""
    fsync_file(tmp)
    faults.point("main-publish")
    os.replace(tmp, path)
    fsync_dir(path.parent if str(path.parent) else ".")
    faults.point("main-published")


@contextmanager
def new_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` atomically.

    On any exception (including a full disk or a file-size limit) the temporary is removed
    and ``path`` is as it was.
    """
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically: ``write(f)`` fills a temporary beside ``path`` (binary), which
    is made durable and renamed over ``path`` (see :func:`new_file`). Returns ``path``."""
    path = Path(path)
    with new_file(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically: readers see the old file or the new one."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def copy_contents(src: h5py.File, dst: h5py.File, exclude: tuple[str, ...] = ()) -> None:
    """Copy root attributes and every top-level object of ``src`` into ``dst``.

    ``exclude`` names paths (e.g. ``"banks/full"``) left out of the copy. Copying into a fresh
    file, rather than copying the file's bytes, also drops the space of objects deleted
    earlier (HDF5 never gives it back within a file).
    """
    for k, v in src.attrs.items():
        dst.attrs[k] = v
    skip = {e.strip("/") for e in exclude}

    def copy(group: h5py.Group, target: h5py.Group, prefix: str) -> None:
        for name in group:
            full = f"{prefix}{name}"
            if full in skip:
                continue
            inner = [s for s in skip if s.startswith(full + "/")]
            if inner and isinstance(group[name], h5py.Group):
                g = target.create_group(name)
                for k, v in group[name].attrs.items():
                    g.attrs[k] = v
                copy(group[name], g, full + "/")
            else:
                group.copy(group[name], target, name=name)

    copy(src, dst, "")


@contextmanager
def rewrite_main(store: str | Path, exclude: tuple[str, ...] = (),
                 lock: WriterLock | None = None) -> Iterator[h5py.File]:
    """A writable fresh copy of the store's main file, committed atomically on a clean exit.

    Takes the writer lock (re-entrant within this process). ``exclude``: paths not copied
    (e.g. a bank about to be replaced). On an exception the copy is discarded and the store
    is untouched; OSError from writing (full disk, file-size limit) becomes one StoreError.
    """
    from rafdata.store import check_format, open_h5

    store = Path(store)
    with lock or WriterLock(store):
        remove_temporaries(store)
        src = open_h5(store, "r")
        try:
            check_format(src, store)
            ensure_space(store.parent, 2 * store.stat().st_size + (4 << 20), "the updated store")
            try:
                with in_memory_file(store) as dst:
                    copy_contents(src, dst, exclude)
                    yield dst
                    faults.point("main-write")
            except OSError as err:
                raise StoreError(store, f"could not write the updated store "
                                 f"({os.strerror(err.errno) if err.errno else err}); "
                                 "the store is unchanged") from None
        finally:
            src.close()
