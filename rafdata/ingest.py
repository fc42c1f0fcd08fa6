"""Ingest: source layouts (videos, calibration, tracking) -> the HDF5 store.

A sequence is the unit of work. Tracking of every pending sequence is read and validated
first (cheap), so a NaN in the last participant stops the run before hours of decoding; then
each sequence is decoded and committed in turn. Rerunning skips committed sequences, and a
crash mid-sequence leaves rows the store's counters never expose.

Policy for bad input (see docs/ingest.md):
- stop: unreadable or inconsistent tracking (NaN/inf, wrong dimension, a second expression
  space), missing calibration, a video shorter than its tracking (frame-count mismatch), a
  store of a newer format, images of another size than the store's;
- skip with a warning (``--strict`` stops instead): one camera's video missing, unreadable or
  corrupt in one sequence; the rest of the sequence is ingested without that camera.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from rafdata.config import IngestConfig
from rafdata.errors import FrameCountError, SourceError
from rafdata.geometry import ImageTransform, color_correct
from rafdata.lock import WriterLock
from rafdata.progress import NullProgress, Progress
from rafdata.sources import open_source
from rafdata.sources.base import CameraCalib, SequenceSource, Tracking
from rafdata.sources.tracking import read_trackings
from rafdata.store import ImageCodec
from rafdata.writer import SegmentSink, StoreWriter

QUEUE_DEPTH = 4  # encoded frames buffered per decoding thread ahead of the writer, at least
# Frames a sequence may buffer ahead of the writer, in bytes: the threads that finish their
# share of a sequence go on decoding the next one while the last of its videos is decoded,
# instead of stalling (with 3 cameras on 2 threads that stall cost ~15% of the run).
LOOKAHEAD_BYTES = 128 << 20


@dataclass
class IngestReport:
    """What a run did; ``skipped`` are sequences an earlier run had already committed."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timesteps: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class _Pending:
    seq: SequenceSource
    tracking: Tracking
    frames_mask: np.ndarray  # which tracked rows are kept (temporal subsampling)
    cameras: list[CameraCalib]
    order: int = 0  # position in the source's listing: segments merge in this order

    @property
    def label(self) -> str:
        return f"{self.seq.participant}/{self.seq.name}"


class _CameraFailed(Exception):
    """A camera's video broke while decoding; the sequence is retried without it."""

    def __init__(self, serial: str, error: SourceError):
        super().__init__(str(error))
        self.serial = serial
        self.error = error


class UnitExecutor(Protocol):
    """Runs the units of an ingest: here, in threads (:class:`LocalExecutor`), or as Ray
    tasks (``rafdata.distributed``). Both write the same segments; the writer merges them."""

    def prepare(self, store: Path, lock: WriterLock) -> None:
        """Called holding the writer lock, before the store's state is read."""

    def run(self, writer: StoreWriter, units: list[list[_Pending]], cfg: IngestConfig,
            progress: Progress, report: IngestReport) -> None:
        """Write every unit (a list of sequences committed together) through ``writer``."""


def ingest(
    src: str | Path,
    out: str | Path,
    cfg: IngestConfig | None = None,
    progress: Progress | None = None,
    executor: UnitExecutor | None = None,
) -> IngestReport:
    """Ingest the source at ``src`` into the store ``out`` (created or appended to).

    executor: where units run (default: this process, decoding in threads).
    """
    cfg = cfg or IngestConfig()
    progress = progress or NullProgress()
    executor = executor or LocalExecutor()
    cfg.validate()
    t0 = time.perf_counter()
    report = IngestReport()
    src = Path(src)
    source = open_source(src, cfg.layout, cfg.source_options(), warn=progress.warn)
    sequences = [s for pid in source.participants() for s in source.sequences(pid)]
    if not sequences:
        raise SourceError(src, "no sequence with tracking found (check --tracking/--participants)")

    with WriterLock(out) as lock:
        executor.prepare(Path(out), lock)
        with StoreWriter(out, compression=cfg.compression, lock=lock) as writer:
            if writer.compression != cfg.compression:
                progress.warn(f"{out}: the store's images use {writer.compression}; appending "
                              f"with it (--compression {cfg.compression} applies to new stores "
                              "only)")
                cfg = replace(cfg, compression=writer.compression)  # the history says so
            todo = []
            for order, s in enumerate(sequences):
                if writer.has_sequence(s.participant, s.name):
                    report.skipped.append(f"{s.participant}/{s.name}")
                else:
                    todo.append((order, s))
            pending = _read_tracking(todo, writer, cfg, progress)
            _record_provenance(writer, src, cfg)
            executor.run(writer, list(_commit_units(pending)), cfg, progress, report)
    report.warnings = list(getattr(progress, "warnings", []))
    report.seconds = time.perf_counter() - t0
    return report


class LocalExecutor:
    """Units one after another in this process; cameras decode in a pool of threads."""

    def prepare(self, store: Path, lock: WriterLock) -> None:
        pass

    def run(self, writer: StoreWriter, units: list[list[_Pending]], cfg: IngestConfig,
            progress: Progress, report: IngestReport) -> None:
        n_images = sum(int(p.frames_mask.sum()) * len(p.cameras) for u in units for p in u)
        if n_images:
            progress.start("images", n_images)
        with _Decoders(cfg, writer.codec, progress) as decoders:
            decoders.order([p for u in units for p in u if p.cameras])
            for unit in units:
                write_unit(writer, unit, cfg, progress, decoders, report)
                if time.monotonic() - writer.last_merge > MERGE_EVERY_S:
                    writer.commit()  # readers see progress; committed units are safe anyway


def write_unit(writer: SegmentSink, unit: list[_Pending], cfg: IngestConfig,
               progress: Progress, decoders: _Decoders, report: IngestReport) -> None:
    """Write one unit as one segment: a sequence, or a group of image-less sequences."""
    # Sequences without images are tiny: committed in groups, not one by one.
    with writer.group(order=(unit[0].order,)) if len(unit) > 1 else nullcontext():
        results = [(p, _write_sequence(writer, p, cfg, progress, decoders)) for p in unit]
    for p, (t, n) in results:
        report.written.append(p.label)
        report.timesteps += t
        report.images += n


COEFFICIENT_GROUP = 64  # image-less sequences committed together
# Units are durable once their segment is renamed; merging them into the main file only makes
# them visible to readers, so it runs at the end and every few minutes of a long run.
MERGE_EVERY_S = 300.0


def _commit_units(pending: list[_Pending]) -> Iterator[list[_Pending]]:
    """Sequences with images one by one; runs of image-less ones in groups."""
    group: list[_Pending] = []
    for p in pending:
        if p.cameras:
            if group:
                yield group
                group = []
            yield [p]
        else:
            group.append(p)
            if len(group) == COEFFICIENT_GROUP:
                yield group
                group = []
    if group:
        yield group


def _read_tracking(
    todo: Sequence[tuple[int, SequenceSource]], writer: StoreWriter | None, cfg: IngestConfig,
    progress: Progress,
) -> list[_Pending]:
    """Read and validate the tracking of every pending sequence before writing anything."""
    if todo:
        progress.start("tracking", len(todo))
    pending = []
    no_video: dict[str, list[str]] = {}
    space: tuple[str, int, Path] | None = None
    trackings = _tracking_in_batches([s for _, s in todo], progress)
    for (order, s), tr in zip(todo, trackings, strict=True):
        dim = int(tr.exp.shape[1])
        if writer is not None:
            writer.check_exp_space(tr.exp_space, dim, tr.path)
        if space is not None and (tr.exp_space, dim) != space[:2]:
            raise SourceError(
                tr.path,
                f"expression space {tr.exp_space} ({dim} dims) differs from {space[0]} "
                f"({space[1]} dims) of {space[2]}; one store holds one space",
            )
        space = (tr.exp_space, dim, tr.path)
        keep = np.zeros(len(tr.frames), bool)
        keep[:: cfg.every] = True
        cams = s.cameras() if cfg.wants_images(s.participant) else []
        if cfg.wants_images(s.participant) and not cams:
            no_video.setdefault(s.participant, []).append(s.name)
        pending.append(_Pending(s, tr, keep, cams, order))
    for pid, names in no_video.items():
        progress.warn(f"participant {pid}: no camera videos in {len(names)} sequence(s) "
                      f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); their "
                      "coefficients are ingested without images (--no-images or --images-for "
                      "say this is intended)")
    _warn_missing_cameras(pending, progress)
    return pending


TRACKING_BATCH = 32  # sequences read in parallel between progress updates


def _tracking_in_batches(seqs: list[SequenceSource], progress: Progress) -> Iterator[Tracking]:
    """Every sequence's tracking, in order, read by parallel threads (read_trackings) a batch
    at a time so the progress bar moves; the first error in sequence order stops it."""
    for start in range(0, len(seqs), TRACKING_BATCH):
        batch = seqs[start:start + TRACKING_BATCH]
        yield from read_trackings(batch)
        progress.advance(len(batch))


def _warn_missing_cameras(pending: list[_Pending], progress: Progress) -> None:
    """A camera a participant has elsewhere but not in this sequence is worth a warning."""
    by_participant: dict[str, set[str]] = {}
    for p in pending:
        by_participant.setdefault(p.seq.participant, set()).update(c.serial for c in p.cameras)
    for p in pending:
        if not p.cameras:
            continue
        missing = by_participant[p.seq.participant] - {c.serial for c in p.cameras}
        for serial in sorted(missing):
            progress.warn(f"{p.seq.path}: no video for camera {serial}; "
                          f"{p.label} is ingested without it")


def _record_provenance(writer: StoreWriter, src: Path, cfg: IngestConfig) -> None:
    """Keep the generator manifest of synthetic data and a history of ingest runs."""
    manifest = src / "synth.json"
    if manifest.is_file() and "synthetic" not in writer.attrs:
        writer.set_attr("synthetic", manifest.read_text())
    history = json.loads(writer.attrs.get("ingest_history", "[]"))
    entry = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    history.append({"source": str(src.resolve()), "time": time.time(), "config": entry})
    writer.set_attr("ingest_history", json.dumps(history))


def _write_sequence(
    writer: SegmentSink, p: _Pending, cfg: IngestConfig, progress: Progress,
    decoders: _Decoders,
) -> tuple[int, int]:
    """Write one sequence; cameras that fail are dropped (or stop the run with --strict)."""
    tr = p.tracking
    while True:
        job = decoders.job(p)  # started ahead of time while the previous sequence was written
        try:
            with writer.sequence(
                p.seq.participant, p.seq.name, p.seq.name in cfg.held_out, p.seq.path,
                order=(p.order,),
            ) as sw:
                rows = sw.add_timesteps(
                    tr.frames[p.frames_mask], tr.exp[p.frames_mask], tr.pose[p.frames_mask],
                    tr.scale[p.frames_mask], tr.exp_space,
                )
                n_images = _write_images(sw, job, rows, progress)
            decoders.done(p)
            return len(rows), n_images
        except _CameraFailed as failed:
            if cfg.strict:
                raise failed.error from None
            progress.warn(f"{failed.error}; camera {failed.serial} skipped for {p.label}")
            decoders.retry_without(p, failed.serial)


@dataclass
class _Plan:
    """What to decode for one sequence: the usable cameras and the output geometry."""

    frames: np.ndarray  # video frame indices
    cameras: list[CameraCalib]
    sizes: list[tuple[int, int]]  # source (w, h) per camera
    transform: ImageTransform

    @property
    def output_size(self) -> tuple[int, int]:
        """(w, h) of the stored images (one size for all cameras: checked by _plan)."""
        return self.transform.output_size(*self.sizes[0])


def _plan(p: _Pending, cfg: IngestConfig, progress: Progress) -> _Plan:
    """Check every camera without decoding (probe); drop unusable ones (or stop)."""
    frames = p.tracking.frames[p.frames_mask]
    cams: list[CameraCalib] = []
    for cam in p.cameras:
        try:
            p.seq.check_camera(cam.serial, frames)
        except FrameCountError:
            raise
        except SourceError as err:
            if cfg.strict:
                raise
            progress.warn(f"{err}; camera {cam.serial} skipped for {p.label}")
            progress.advance(len(frames))
            continue
        cams.append(cam)
    if p.cameras and not cams:
        raise SourceError(p.seq.path, "no camera of this sequence could be read")
    transform = ImageTransform(cfg.crop, cfg.size)
    sizes = [p.seq.frame_size(c.serial) for c in cams]
    if len({transform.output_size(w, h) for w, h in sizes}) > 1:
        raise SourceError(p.seq.path, "cameras have different frame sizes "
                          f"({', '.join(f'{w}x{h}' for w, h in sorted(set(sizes)))}); "
                          "pass --size W H to store them at one size")
    for cam, (w, h) in zip(cams, sizes, strict=True):
        cx, cy = float(cam.K[0, 2]), float(cam.K[1, 2])
        if not (0.2 * w < cx < 0.8 * w and 0.2 * h < cy < 0.8 * h):
            # Intrinsics written for another resolution put the principal point far off the
            # centre (e.g. at the corner for half-size videos): every projection would be off.
            progress.warn(f"{p.seq.path}: camera {cam.serial}: principal point ({cx:.0f}, "
                          f"{cy:.0f}) is far from the centre of its {w}x{h} frames; are the "
                          "intrinsics for another resolution?")
    return _Plan(frames, cams, sizes, transform)


class _DecodeJob:
    """The image parts of one sequence (colour and matte of every camera) decoding on the
    shared pool, one task per part, into one bounded queue."""

    def __init__(self, pool: ThreadPoolExecutor, p: _Pending, plan: _Plan, cfg: IngestConfig,
                 codec: ImageCodec, workers: int):
        self.p, self.plan = p, plan
        w, h = plan.output_size
        depth = max(QUEUE_DEPTH * workers, LOOKAHEAD_BYTES // (w * h * 3))
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.streams = [(ci, part) for ci, cam in enumerate(plan.cameras)
                        for part in p.seq.image_parts(cam.serial)]
        self.futures = [
            pool.submit(_produce, ci, part, p.seq, plan.cameras[ci], plan.frames,
                        plan.transform, cfg.color_correct, codec, self.q, self.stop)
            for ci, part in self.streams]

    def cancel(self) -> None:
        """Stop the producers and wait for them (each notices within one frame)."""
        self.stop.set()
        wait(self.futures)


class _Decoders:
    """One pool of decoding threads for the whole run, one sequence ahead of the writer.

    While the writer drains sequence k, the cameras of the next image sequence are already
    queued on the pool, so threads that finish k's last cameras go straight on to it: with a
    barrier per sequence, e.g. 3 cameras on 2 threads leave a core idle a third of the time.
    Memory stays bounded: at most two sequences have queues, each of ``QUEUE_DEPTH`` frames
    per thread. Errors found while planning ahead (a bad camera, a short video) are raised
    when their sequence's turn comes, so earlier sequences are committed as before.
    """

    def __init__(self, cfg: IngestConfig, codec: ImageCodec, progress: Progress):
        self.cfg, self.codec, self.progress = cfg, codec, progress
        self.workers = max(1, cfg.workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode")
        self.next: dict[int, _Pending] = {}  # id(sequence) -> the image sequence after it
        self.plans: dict[int, _Plan | BaseException] = {}
        self.jobs: dict[int, _DecodeJob] = {}

    def __enter__(self) -> _Decoders:
        return self

    def __exit__(self, *exc: object) -> None:
        for job in self.jobs.values():
            job.cancel()
        self.pool.shutdown(wait=True)

    def order(self, image_sequences: Sequence[_Pending]) -> None:
        """The image sequences in the order they will be written."""
        for a, b in zip(image_sequences, image_sequences[1:], strict=False):
            self.next[id(a)] = b

    def _start(self, p: _Pending) -> None:
        key = id(p)
        if key in self.jobs:
            return
        if key not in self.plans:
            try:
                self.plans[key] = _plan(p, self.cfg, self.progress)
            except Exception as err:  # noqa: BLE001 - raised in turn, by job()
                self.plans[key] = err
        plan = self.plans[key]
        if not isinstance(plan, BaseException) and plan.cameras:
            self.jobs[key] = _DecodeJob(self.pool, p, plan, self.cfg, self.codec, self.workers)

    def job(self, p: _Pending) -> _DecodeJob | None:
        """The running job of ``p`` (None: no camera left), with the next one started."""
        if not p.cameras:
            return None
        self._start(p)
        plan = self.plans[id(p)]
        if isinstance(plan, BaseException):
            raise plan
        nxt = self.next.get(id(p))
        if nxt is not None:
            self._start(nxt)
        return self.jobs.get(id(p))

    def done(self, p: _Pending) -> None:
        self.jobs.pop(id(p), None)
        self.plans.pop(id(p), None)

    def retry_without(self, p: _Pending, serial: str) -> None:
        """Restart ``p`` without camera ``serial``. The job ahead is stopped too: its
        producers could hold every thread the retry needs."""
        for key in (id(p), id(self.next.get(id(p)))):
            job = self.jobs.pop(key, None)
            if job is not None:
                job.cancel()
        plan = self.plans[id(p)]
        assert isinstance(plan, _Plan)
        keep = [i for i, c in enumerate(plan.cameras) if c.serial != serial]
        if not keep:
            raise SourceError(p.seq.path, "no camera of this sequence could be read")
        self.plans[id(p)] = _Plan(plan.frames, [plan.cameras[i] for i in keep],
                                  [plan.sizes[i] for i in keep], plan.transform)


def _write_images(sw, job: _DecodeJob | None, rows, progress) -> int:
    """Write the frames ``job`` decodes, in whatever order they arrive.

    Every (camera, frame) has a reserved slot (camera-major), so the rows of the store do not
    depend on which thread finishes first, while one shared, bounded queue keeps all decoding
    threads busy and memory bounded by a few frames per thread. Colour and matte of a slot
    arrive separately (their videos decode on different threads).
    """
    if job is None:  # coefficients only
        return 0
    plan, seq = job.plan, job.p.seq
    cams = plan.cameras
    out_w, out_h = plan.output_size
    cam_rows = [sw.camera(c.serial, plan.transform.apply_K(c.K, *size), c.world_to_cam)
                for c, size in zip(cams, plan.sizes, strict=True)]
    n = len(plan.frames)
    first = sw.n_images
    sw.reserve_images(len(cams) * n, out_h, out_w)
    delivered = dict.fromkeys(job.streams, 0)
    running = len(job.streams)
    while running:
        ci, part, fi, item = job.q.get()
        if item is _DONE:
            running -= 1
            if delivered[ci, part] != n:
                what = "video" if part == "rgb" else "alpha map"
                raise _CameraFailed(cams[ci].serial, SourceError(
                    seq.path, f"the {what} of camera {cams[ci].serial} gave "
                    f"{delivered[ci, part]} frames, its tracking has {n}"))
            continue
        if isinstance(item, SourceError):
            raise _CameraFailed(cams[ci].serial, item)
        if isinstance(item, BaseException):
            raise item
        slot = first + ci * n + fi
        if part == "rgb":
            sw.put_rgb(slot, item, int(rows[fi]), cam_rows[ci])
            progress.advance()
        else:
            sw.put_mask(slot, item)  # None: this frame has no matte (GHA masks are per frame)
        delivered[ci, part] += 1
    return len(cams) * n


_DONE = object()


def _produce(ci, part, seq, cam, frames, transform, correct, codec, q, stop) -> None:
    """Decode, transform and encode one part of one camera into the shared queue, then put
    _DONE.

    Items are (camera index, part, frame index, encoded image or None for a frame without a
    matte), or an exception in place of the image. Compression happens here, in parallel threads, so the single writer thread
    only copies chunk bytes.
    """

    def put(fi, item) -> bool:
        while not stop.is_set():
            try:
                q.put((ci, part, fi, item), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    encoder = codec.stream()
    try:
        for fi, image in enumerate(seq.read_part(cam.serial, part, frames)):
            if image is not None:  # None: a frame without a matte
                if correct and part == "rgb" and cam.color is not None:
                    image = color_correct(image, cam.color)
                image = encoder.encode(transform.apply(image))
            if not put(fi, image):
                return
        put(-1, _DONE)
    except BaseException as err:  # handed to the writer thread, which decides
        put(-1, err)
