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

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

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
    os.replace(tmp, path)
    fsync_dir(path.parent if str(path.parent) else ".")


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
            with new_file(store) as tmp:
                try:
                    with h5py.File(tmp, "w", locking=False) as dst:
                        copy_contents(src, dst, exclude)
                        yield dst
                except OSError as err:
                    raise StoreError(store, f"could not write the updated store ({err}); "
                                     "the store is unchanged") from None
        finally:
            src.close()
