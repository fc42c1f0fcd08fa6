"""The sample table of an MP4 video track, read from the file's boxes without FFmpeg.

Probing a video (``rafdata.video.probe``) must know how many frames are really in the file
(a truncated download keeps a header claiming them all). Opening it with FFmpeg to demux
costs ~3 ms per file because ``avformat_find_stream_info`` decodes several frames, and ingest
opens every video twice (probe, decode): for NeRSemble's short clips that is a visible part of
decoding. An MP4 says where every sample lies (``stsz``, ``stsc``, ``stco``/``co64`` in the
``moov`` box), so the complete samples can be counted from the file size alone.

Only plain MP4/MOV files with the ``moov`` box are read here; anything else (fragmented
files, no ``moov``, a malformed table) gives None and the caller falls back to FFmpeg.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}
MAX_MOOV = 256 << 20  # a moov box larger than this is not a video we know


@dataclass(frozen=True)
class VideoTrack:
    """The first video track of an MP4 file.

    width, height: the sample entry's frame size in pixels. sample_count: samples the table
    lists (= frames the header claims). complete: leading samples whose bytes lie entirely
    inside the file (a truncated file has fewer). partial: the first incomplete sample has
    some of its bytes in the file (the file was cut inside it).
    """

    width: int
    height: int
    sample_count: int
    complete: int
    partial: bool = False


def read_video_track(path: str | os.PathLike) -> VideoTrack | None:
    """Parse the first video track of the MP4/MOV file at ``path``; None where this reader
    does not apply (not an MP4 with a ``moov`` box, fragmented, no video track, a table that
    does not add up). Raises OSError only where the file cannot be read at all."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        moov = None
        pos = 0
        while pos + 8 <= size:
            f.seek(pos)
            kind, start, end = _box_header(f, pos, size)
            if kind is None:
                return None
            if kind == b"moof":  # fragmented: samples are described outside moov
                return None
            if kind == b"moov":
                if end - start > MAX_MOOV:
                    return None
                f.seek(start)
                moov = f.read(end - start)
            pos = end
    if moov is None:
        return None
    try:
        return _video_track(moov, size)
    except (struct.error, ValueError, IndexError):
        return None


def _box_header(f, pos: int, limit: int) -> tuple[bytes | None, int, int]:
    """(type, payload start, end) of the box at ``pos`` of a file; type None if malformed."""
    head = f.read(8)
    if len(head) < 8:
        return None, 0, 0
    size, kind = struct.unpack(">I4s", head)
    start = pos + 8
    if size == 1:
        big = f.read(8)
        if len(big) < 8:
            return None, 0, 0
        (size,) = struct.unpack(">Q", big)
        start += 8
    elif size == 0:  # the box runs to the end of the file
        size = limit - pos
    end = pos + size
    if end < start:
        return None, 0, 0
    return kind, start, min(end, limit) if kind == b"mdat" else end


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """Yield (type, payload start, end) of the boxes in ``data[start:end]``."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            body += 8
        elif size == 0:
            size = end - pos
        if size < body - pos or pos + size > end:
            raise ValueError("box overruns its parent")
        yield kind, body, pos + size
        pos += size


def _find(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for k, s, e in _boxes(data, start, end):
        if k == kind:
            return s, e
    return None


def _video_track(moov: bytes, file_size: int) -> VideoTrack | None:
    for kind, s, e in _boxes(moov):
        if kind != b"trak":
            continue
        stbl = _path(moov, s, e, (b"mdia", b"minf", b"stbl"))
        hdlr = _path(moov, s, e, (b"mdia", b"hdlr"))
        if stbl is None or hdlr is None or moov[hdlr[0] + 8:hdlr[0] + 12] != b"vide":
            continue
        return _sample_table(moov, *stbl, file_size)
    return None


def _path(data: bytes, start: int, end: int, kinds: tuple[bytes, ...]) -> tuple[int, int] | None:
    span: tuple[int, int] | None = (start, end)
    for kind in kinds:
        span = _find(data, *span, kind)
        if span is None:
            return None
    return span


def _sample_table(d: bytes, start: int, end: int, file_size: int) -> VideoTrack | None:
    boxes = {k: (s, e) for k, s, e in _boxes(d, start, end)}
    if not {b"stsd", b"stsz", b"stsc"} <= boxes.keys() or not ({b"stco", b"co64"} & boxes.keys()):
        return None
    # stsd: version/flags, entry count, then the first visual sample entry (8-byte box header,
    # 6 reserved, data reference index, 16 bytes pre-defined/reserved, width, height).
    s, _ = boxes[b"stsd"]
    width, height = struct.unpack_from(">HH", d, s + 8 + 8 + 6 + 2 + 16)
    # stsz: version/flags, a common sample size (0: one size per sample), sample count.
    s, _ = boxes[b"stsz"]
    common, count = struct.unpack_from(">II", d, s + 4)
    sizes = (np.full(count, common, np.int64) if common
             else np.frombuffer(d, ">u4", count, s + 12).astype(np.int64))
    # stsc: runs of (first chunk (1-based), samples per chunk, description index).
    s, _ = boxes[b"stsc"]
    (runs,) = struct.unpack_from(">I", d, s + 4)
    stsc = np.frombuffer(d, ">u4", 3 * runs, s + 8).reshape(runs, 3).astype(np.int64)
    if b"stco" in boxes:
        s, _ = boxes[b"stco"]
        (n,) = struct.unpack_from(">I", d, s + 4)
        offsets = np.frombuffer(d, ">u4", n, s + 8).astype(np.int64)
    else:
        s, _ = boxes[b"co64"]
        (n,) = struct.unpack_from(">I", d, s + 4)
        offsets = np.frombuffer(d, ">u8", n, s + 8).astype(np.int64)
    if count == 0 or runs == 0 or n == 0 or width == 0 or height == 0:
        return None
    first = stsc[:, 0] - 1
    if first[0] != 0 or np.any(np.diff(first) <= 0) or first[-1] >= n or np.any(stsc[:, 1] < 1):
        return None
    per_chunk = np.repeat(stsc[:, 1], np.diff(np.append(first, n)))  # samples in each chunk
    chunk = np.repeat(np.arange(n), per_chunk)[:count]
    if chunk.size != count:
        return None  # the chunks hold fewer samples than stsz lists
    # A sample starts at its chunk's offset plus the sizes of the samples before it there.
    before = np.cumsum(sizes) - sizes
    chunk_first = np.searchsorted(chunk, np.arange(n))  # index of each chunk's first sample
    starts = offsets[chunk] + before - before[np.minimum(chunk_first, count - 1)][chunk]
    ends = starts + sizes
    inside = ends <= file_size
    complete = int(count if inside.all() else np.argmin(inside))
    partial = complete < count and bool(starts[complete] < file_size)
    return VideoTrack(width=int(width), height=int(height), sample_count=int(count),
                      complete=complete, partial=partial)
