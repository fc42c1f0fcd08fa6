"""Guarded video decoding: probe a container before trusting it, then decode chosen frames.

Two traps shape this module (see DESIGN.md, field notes on decord):

* A truncated download keeps its header, which still claims the full frame count; decord
  then spins forever when asked for a frame that is not there. :func:`probe` therefore
  counts the complete video packets by demuxing (no decoding, so it is I/O bound) and treats
  that count as the truth; :func:`read_frames` never asks a decoder for an index at or beyond
  it.
* decord 0.6 is fragile (it rejects some frame widths, e.g. 48 or 72 pixels, spins on
  truncated files, grows memory on large frames) and, measured here, slower: PyAV with one
  reused colour converter decodes the same frames in ~0.8 of decord's time
  (docs/benchmarks.md, "Ingest"). ``backend="auto"`` is PyAV; ``"decord"`` stays available.

Frame index ``i`` means the ``i``-th frame in presentation order, counting from 0, which is
what both decord and a sequential PyAV decode produce (pixel-identical RGB, tested).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from rafdata.errors import FrameCountError, SourceError
from rafdata.mp4 import read_video_track

try:  # decord is optional: x86_64 wheels only, and PyAV gives the same frames.
    import decord as _decord
except ImportError:  # pragma: no cover - depends on the platform
    _decord = None

BACKENDS = ("auto", "decord", "pyav")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learnt about a video without decoding it.

    width, height: frame size in pixels. n_frames: number of complete video packets (= frames
    that can be decoded), the count to trust. header_frames: the count the container header
    claims (0 where the container does not say, e.g. Matroska).
    """

    path: Path
    width: int
    height: int
    n_frames: int
    header_frames: int = 0


def decord_available() -> bool:
    """Whether the decord backend can be used in this environment."""
    return _decord is not None


def probe(path: str | os.PathLike, *, allow_truncated: bool = False) -> VideoInfo:
    """Count the complete video frames (packets) of ``path`` without decoding.

    MP4 files are read from their sample table (``rafdata.mp4``: no FFmpeg, ~0.2 ms); other
    containers, or MP4s that table reader does not handle, are demuxed with PyAV.

    Raises SourceError naming the file when it is missing, unreadable, not a video, has no
    frames, or holds a corrupt packet; also when its header claims more frames than it holds
    (a truncated file), unless ``allow_truncated`` is set, in which case ``n_frames`` is the
    number of complete leading packets.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(path, "video file not found")
    if path.stat().st_size == 0:
        raise SourceError(path, "video file is empty (0 bytes)")
    try:
        track = read_video_track(path)
    except OSError as exc:
        raise SourceError(path, f"cannot read video: {_reason(exc)}") from exc
    if track is not None:
        width, height, header = track.width, track.height, track.sample_count
        good, corrupt = track.complete, track.partial
    else:
        width, height, header, good, corrupt = _demux_count(path)
    if width <= 0 or height <= 0:
        raise SourceError(path, f"video has an invalid frame size {width}x{height}")
    if good == 0:
        raise SourceError(path, "video holds no complete frames")
    if not allow_truncated:
        if corrupt:
            raise SourceError(
                path, f"video is truncated or corrupt: packet {good} is incomplete"
                + (f" (header says {header} frames)" if header else ""),
            )
        if header > good:
            raise SourceError(
                path, f"video is truncated: header says {header} frames, only {good} present"
            )
    return VideoInfo(path=path, width=width, height=height, n_frames=good, header_frames=header)


def _demux_count(path: Path) -> tuple[int, int, int, int, bool]:
    """(width, height, header frames, complete packets, stopped at a corrupt packet) of the
    first video stream, by demuxing with PyAV."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(path, f"cannot open video: {_reason(exc)}") from exc
    try:
        if not container.streams.video:
            raise SourceError(path, "file has no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        header = int(stream.frames or 0)
        good, corrupt = 0, False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream flush packet
                    continue
                if packet.is_corrupt:  # e.g. the last packet of a file cut short
                    corrupt = True
                    break
                good += 1
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(path, f"video is corrupt after {good} frames: {_reason(exc)}") from exc
    finally:
        container.close()
    return width, height, header, good, corrupt


def read_frames(
    path: str | os.PathLike,
    frames: np.ndarray,
    *,
    channel0: bool = False,
    chunk: int = 16,
    backend: str = "auto",
    info: VideoInfo | None = None,
    threads: int = 0,
) -> Iterator[np.ndarray]:
    """Decode exactly the frame indices ``frames`` of the video at ``path``, in order.

    frames: (F,) non-negative ints, strictly increasing (sparse is fine). Yields, one at a
    time, (H, W, 3) uint8 RGB arrays, or (H, W) uint8 channel 0 when ``channel0`` (NeRSemble
    alpha maps store the matte in channel 0). At most ``chunk`` decoded frames are held at
    once. ``info``: a :func:`probe` result to reuse (probing demuxes the whole file).
    ``backend``: "auto" or "pyav" (PyAV), "decord".
    ``threads``: decoder threads, 0 lets the decoder choose.

    Raises FrameCountError if an index is beyond the video's probed frame count, SourceError
    naming the file if the video cannot be opened or decoding fails midway, ValueError for
    an invalid ``frames`` or ``backend`` argument.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "decord" and _decord is None:
        raise ValueError("backend 'decord' requested but decord is not installed")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    idx = _check_indices(frames)
    # Validate everything before the first yield would be nicer, but a generator runs
    # nothing until iterated; _read does the probing on first next().
    return _read(path, idx, channel0, chunk, backend, info, threads)


def _read(
    path: Path,
    idx: np.ndarray,
    channel0: bool,
    chunk: int,
    backend: str,
    info: VideoInfo | None,
    threads: int,
) -> Iterator[np.ndarray]:
    if idx.size == 0:
        return
    if info is None:
        info = probe(path)
    if int(idx[-1]) >= info.n_frames:
        raise FrameCountError(
            path, f"video has {info.n_frames} frames, frame index {int(idx[-1])} was requested"
        )
    if backend != "decord":
        yield from _read_pyav(path, idx, info, channel0, threads)
        return
    done = 0
    try:
        for frame in _read_decord(path, idx, chunk, info, threads):
            yield frame[..., 0].copy() if channel0 else frame
            done += 1
    except _DecordFailed as exc:
        raise SourceError(path, f"decord failed after {done} frames: {exc}") from exc


class _DecordFailed(Exception):
    pass


def _read_decord(
    path: Path, idx: np.ndarray, chunk: int, info: VideoInfo, threads: int
) -> Iterator[np.ndarray]:
    """decord backend: one reader per call (readers must not cross threads or forks)."""
    try:
        reader = _decord.VideoReader(str(path), ctx=_decord.cpu(0), num_threads=threads)
        n = len(reader)
    except Exception as exc:  # decord raises its own DECORDError (and RuntimeError)
        raise _DecordFailed(_reason(exc)) from exc
    if n < int(idx[-1]) + 1:
        raise _DecordFailed(f"decord sees only {n} frames")
    try:
        for start in range(0, idx.size, chunk):
            part = idx[start : start + chunk]
            try:
                batch = _as_numpy(reader.get_batch(part.tolist()))
            except Exception as exc:
                raise _DecordFailed(_reason(exc)) from exc
            if batch.shape != (part.size, info.height, info.width, 3):
                raise _DecordFailed(f"decord returned shape {batch.shape}")
            yield from batch
            del batch
    finally:
        del reader


class _DLPackView:
    """Hands a decord NDArray to ``np.from_dlpack``: decord (0.6) predates the ``__dlpack__``
    protocol and only offers the capsule."""

    def __init__(self, nd):
        self.nd = nd

    def __dlpack__(self, **_kw):
        return self.nd.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU, device 0: decord.cpu() arrays only


def _as_numpy(nd) -> np.ndarray:
    """A decoded batch as a read-only numpy view of decord's own buffer (no copy).

    ``asnumpy()`` copies every frame (~0.2 ms per 512 px frame, a tenth of its decoding);
    the view keeps decord's buffer alive for as long as any frame of it is referenced.
    Falls back to the copy where numpy or decord cannot share it.
    """
    try:
        return np.from_dlpack(_DLPackView(nd))
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return nd.asnumpy()


def _read_pyav(
    path: Path, idx: np.ndarray, info: VideoInfo, channel0: bool, threads: int
) -> Iterator[np.ndarray]:
    """PyAV backend: sequential decode, converting only the wanted frames.

    One converter serves the whole video: ``frame.to_ndarray(format=...)`` would set up a new
    swscale context for every frame: ~0.3 ms of a 512 px frame, a fifth of its decoding.
    """
    if idx.size == 0:
        return
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(path, f"cannot open video: {_reason(exc)}") from exc
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads; frames stay in order
        if threads:
            stream.codec_context.thread_count = threads
        convert = VideoReformatter()
        want = iter(idx.tolist())
        target = next(want)
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i < target:
                    continue
                rgb = convert.reformat(frame, format="rgb24").to_ndarray()
                if rgb.shape != (info.height, info.width, 3):
                    raise SourceError(
                        path, f"frame {i} is {rgb.shape[1]}x{rgb.shape[0]}, "
                        f"expected {info.width}x{info.height}",
                    )
                yield rgb[..., 0].copy() if channel0 else rgb
                target = next(want, None)
                if target is None:
                    return
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(path, f"decoding failed at frame {i + 1}: {_reason(exc)}") from exc
        raise SourceError(path, f"video ended after {i + 1} frames, frame {target} was requested")
    finally:
        container.close()


def _check_indices(frames: np.ndarray) -> np.ndarray:
    idx = np.asarray(frames)
    if idx.ndim != 1:
        raise ValueError(f"frames must be 1-D, got shape {idx.shape}")
    if idx.size == 0:
        return idx.astype(np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"frames must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx[0] < 0 or np.any(np.diff(idx) <= 0):
        raise ValueError("frames must be non-negative and strictly increasing")
    return idx


def _reason(exc: BaseException) -> str:
    """One short line from a library exception (decord's messages carry a C++ backtrace)."""
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
