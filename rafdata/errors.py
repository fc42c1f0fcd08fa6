"""Errors a user can cause, reported as one line naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class RafDataError(Exception):
    """A problem with the user's input or files.

    The CLI prints ``str(err)`` as a single line and exits non-zero; no traceback. ``path`` is
    the file (or folder) at fault, ``problem`` says what is wrong with it.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = " ".join(str(problem).split())  # keep it on one line
        super().__init__(f"{self.path}: {self.problem}" if self.path is not None else self.problem)


class StoreError(RafDataError):
    """The store file is missing, damaged, of an unknown version or violates the contract."""


class SourceError(RafDataError):
    """A source dataset (videos, calibration, tracking) is missing or inconsistent."""


class FrameCountError(SourceError):
    """A video holds fewer frames than its tracking refers to (tracking and video disagree)."""


class CorruptImageError(StoreError):
    """A stored image (or matte) whose chunk cannot be decoded or whose CRC-32 does not match.

    ``row`` is the image's row in /images; training and evaluation either stop on it or, with
    ``--skip-corrupt``, count it and go on. ``kind`` says which check failed: :attr:`CRC` (the
    chunk decoded but its pixels differ from the stored CRC-32) or :attr:`DECODE` (the chunk
    cannot be read or decompressed at all); ``inspect --verify`` counts the two apart.
    """

    CRC = "crc"
    DECODE = "decode"

    def __init__(self, path: str | Path | None, row: int, problem: str, *, kind: str):
        if kind not in (self.CRC, self.DECODE):
            raise ValueError(f"kind must be {self.CRC!r} or {self.DECODE!r}, got {kind!r}")
        self.row = int(row)
        self.kind = kind
        super().__init__(path, f"image row {row}: {problem}")


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""
