"""The writer lock: one process at a time may change a store.

HDF5's own file locking is turned off (readers must open a store another process is writing,
and HDF5's locks fail outright on some NFS mounts), so writers take an advisory lock on a
sidecar file ``store.h5.lock`` instead. ``flock`` locks are released by the kernel when the
holder exits, even on SIGKILL, so a lock is never left stale; the file's text (pid, host,
start time, command) only names the holder in the refusal.

Where it holds: local filesystems; NFS v4 and NFS v3 with a lock manager (Linux emulates
``flock`` with byte-range locks there, which the server arbitrates across hosts). Where it
does not: NFS mounted ``nolock`` or ``local_lock=all`` (locks are then per host only), and
filesystems without locks (ENOLCK): the refusal then says so, and ``RAFDATA_NO_LOCK=1``
proceeds without a lock, at the user's risk. Readers never take the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from rafdata.errors import StoreError, StoreLockedError


def lock_path(store: str | Path) -> Path:
    """The sidecar lock file of a store: ``store.h5.lock``."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


class WriterLock:
    """Exclusive, non-blocking writer lock on ``store.h5.lock`` (a context manager).

    Re-entrant within one process: taking the lock of a store this process already holds
    (e.g. a bank rewrite inside a larger update) only counts, so each library call can take
    it without deadlocking on itself.
    """

    # Per process: lock file -> [fd or None (RAFDATA_NO_LOCK), how many holders].
    _held: dict[Path, list] = {}

    def __init__(self, store: str | Path, command: str | None = None):
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        self._taken = 0  # how often this object holds it (nested library calls)

    def acquire(self) -> WriterLock:
        key = self.path.resolve()
        entry = WriterLock._held.get(key)
        if entry is None:
            WriterLock._held[key] = [self._lock(), 1]
        else:
            entry[1] += 1
        self._taken += 1
        return self

    def _lock(self) -> int | None:
        if os.environ.get("RAFDATA_NO_LOCK") == "1":
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(self.store, f"another process is writing this store "
                                       f"({holder}); wait for it to finish or stop it") from None
            if err.errno == errno.ENOLCK:
                raise StoreError(self.store, "the filesystem offers no file locks (NFS mounted "
                                 "nolock?); set RAFDATA_NO_LOCK=1 to write without one, making "
                                 "sure no other process writes this store") from None
            raise StoreError(self.store, f"cannot lock {self.path}: {err.strerror}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return fd

    def release(self) -> None:
        if not self._taken:
            return
        self._taken -= 1
        key = self.path.resolve()
        entry = WriterLock._held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del WriterLock._held[key]
            if entry[0] is not None:
                # The holder text stays; it is read only by a process refused the lock.
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return (f"pid {info['pid']} on {info['host']} since {when}: "
                f"{info.get('command', '?')}")
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"
