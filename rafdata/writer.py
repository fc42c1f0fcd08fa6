"""Appending to a store: a writer session that commits each unit as a segment.

``StoreWriter`` is the one way to add sequences to a store. It holds the writer lock for its
whole life, writes every unit (one sequence, or a group of coefficient-only sequences) as a
new segment file that is committed by an atomic rename, and merges the committed segments
into the main file (atomically again) when it closes or when :meth:`commit` is called. Nothing
already committed is ever opened for writing, so a process killed at any instant, a full disk
or a file-size limit costs at most the unit in progress; the next writer removes temporaries
and merges segments that a killed run had committed but not merged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rafdata.commit import remove_temporaries
from rafdata.errors import StoreError
from rafdata.lock import WriterLock
from rafdata.merge import (
    MergeReport,
    Tables,
    merge,
    pending_segments,
    read_main,
    remove_segment_temporaries,
)
from rafdata.segment import (
    Publisher,
    SegmentContext,
    SegmentWriter,
    SequenceWriter,
    check_exp_space,
    parts_dir,
    read_segment_state,
    segment_file,
)
from rafdata.store import DEFAULT_COMPRESSION, ImageCodec, find_identity


class SegmentSink:
    """Writes units as segment files into a folder; the part of a writer a worker needs.

    ``sequence`` and ``group`` commit each unit by renaming its finished segment into
    ``folder``; ``written`` lists the segment files. No lock, no main file: a distributed
    ingest worker writes its shard with this, and the driver (a :class:`StoreWriter`) takes
    the finished shards in.
    """

    def __init__(self, folder: Path, ctx: SegmentContext):
        self.folder = Path(folder)
        self.ctx = ctx
        self.codec = ImageCodec(ctx.compression)
        self.written: list[Path] = []  # committed (durable, renamed) segment files
        self._grouped: SegmentWriter | None = None
        self._session = time.time_ns()
        self._counter = 0
        self.publisher = Publisher(self._published)

    def drain(self) -> None:
        """Wait until every finished segment is committed (see Publisher)."""
        self.publisher.drain()

    # -- writing ---------------------------------------------------------------------------
    def _order(self, order: Sequence[int] | None) -> tuple[int, ...]:
        self._counter += 1
        return tuple(order) if order is not None else (self._session, self._counter)

    @contextmanager
    def sequence(self, identity: str, name: str, held_out: bool, source: str | Path,
                 order: Sequence[int] | None = None) -> Iterator[SequenceWriter]:
        """Write one sequence; committed (as its own segment) on a clean exit, discarded on
        any exception. Inside :meth:`group`, it joins the group's segment.

        order: where the unit sorts among segments merged together (ingest passes its
        position in the plan, so a resumed run keeps the uninterrupted run's row order).
        """
        if self._grouped is not None:
            sw = self._grouped.sequence(identity, str(name), held_out, str(source))
            yield sw
            sw._finish()
            return
        with segment_file(self.folder, self.ctx, self._order(order), self.publisher) as seg:
            sw = seg.sequence(identity, str(name), held_out, str(source))
            yield sw
            sw._finish()
        self._committed(seg)

    @contextmanager
    def group(self, order: Sequence[int] | None = None) -> Iterator[SegmentSink]:
        """Commit all sequences written inside as one segment (all or none).

        For many small sequences (coefficients only), where a segment per sequence would cost
        more than the data; a crash loses at most the group.
        """
        if self._grouped is not None:
            raise RuntimeError("groups do not nest")
        with segment_file(self.folder, self.ctx, self._order(order), self.publisher) as seg:
            self._grouped = seg
            try:
                yield self
            finally:
                self._grouped = None
        self._committed(seg)

    def _committed(self, seg: SegmentWriter) -> None:
        """A unit is finished (its segment is being published): later units must agree."""

    def _published(self, path: Path) -> None:
        """On the publisher's thread: the segment at ``path`` is committed."""
        self.written.append(path)


class StoreWriter(SegmentSink):
    """Appends sequences to a store (created if missing), one committed unit at a time.

    Usage::

        with StoreWriter(path) as w:  # compression="blosc-blosclz" by default
            with w.sequence("388", "EXP-1-head", held_out=False, source=...) as seq:
                rows = seq.add_timesteps(frames, exp, pose, scale, "bfm09")  # (T,) rows
                cam = seq.camera("222200037", K, world_to_cam)
                seq.add_images(rgb, mask, rows, cam)  # (T,H,W,3), (T,H,W) or None

    Row numbers handed out by a SequenceWriter are local to its segment; the merge maps
    them to the store's rows. A second process opening the same store for writing is
    refused (StoreLockedError) while this one lives.
    """

    def __init__(self, path: str | Path, compression: str = DEFAULT_COMPRESSION,
                 lock: WriterLock | None = None):
        self.path = Path(path)
        ImageCodec(compression)  # validates the name before anything is touched
        self.compression = compression
        self._lock = lock or WriterLock(self.path)
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        SegmentSink.__init__(self, parts_dir(self.path), self.ctx)
        self.last_merge = time.monotonic()

    def _open(self) -> None:
        """Remove temporaries of killed writers; learn what the main file and the committed
        but unmerged segments already hold (sequences, cameras, space, image size)."""
        remove_temporaries(self.path)
        remove_segment_temporaries(self.path)
        self.attrs: dict[str, Any] = {}
        self._new_attrs: dict[str, Any] = {}
        self.identities: list[str] = []
        self._done: set[tuple[str, str]] = set()
        self.ctx = SegmentContext(self.compression, store=self.path)
        main = self._take_main() if self.path.exists() else None
        self.pending = pending_segments(self.path, main)
        for p in self.pending:
            self._take_segment(read_segment_state(p))
        self.ctx.compression = self.compression

    def _take_main(self) -> Tables:
        """Learn the committed state from the main file; returns its tables."""
        t, attrs, _ = read_main(self.path)
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        self.identities = list(t.identities)
        ctx = self.ctx
        ctx.exp_space, ctx.exp_dim = t.exp_space, t.exp_dim
        if t.image_shape is not None:
            ctx.image_size = tuple(t.image_shape[:2])
            self.compression = t.compression or self.compression
        for (i, serial), j in t.cameras.items():
            ctx.cameras[(t.identities[i], serial)] = (t.K[j], t.world_to_cam[j])
        self._done |= {(t.identities[i], name) for i, name in t.done}
        return t

    def _take_segment(self, st: dict[str, Any]) -> None:
        """Fold a committed, not yet merged segment into what new segments must agree with."""
        ctx, cameras = self.ctx, self.ctx.cameras
        if st["attrs"].get("exp_space"):
            ctx.exp_space = str(st["attrs"]["exp_space"])
            ctx.exp_dim = int(st["attrs"]["exp_dim"])
        if st["image_shape"] is not None and st["rows"]["images"]:
            ctx.image_size = tuple(st["image_shape"][1:3])
            self.compression = st["compression"] or self.compression
        ids = st["identities"]
        c = st["cameras"]
        for i in range(st["rows"]["cameras"]):
            cameras[(ids[c["identity"][i]], str(c["serial"][i]))] = (c["K"][i],
                                                                    c["world_to_cam"][i])
        sq = st["sequences"]
        for i in range(st["rows"]["sequences"]):
            self._mark_done(ids[sq["identity"][i]], str(sq["name"][i]))

    def _mark_done(self, identity: str, name: str) -> None:
        """Record a committed sequence under the store's spelling of its identity."""
        row = find_identity(self.identities, identity)
        if row is None:
            row = len(self.identities)
            self.identities.append(identity)
        self._done.add((self.identities[row], name))

    # -- queries ---------------------------------------------------------------------------
    @property
    def exp_space(self) -> str:
        return self.ctx.exp_space

    @property
    def exp_dim(self) -> int:
        return self.ctx.exp_dim

    def has_sequence(self, identity: str, name: str) -> bool:
        """True when this (identity, sequence) was committed by an earlier run or this one."""
        i = find_identity(self.identities, identity)
        return i is not None and (self.identities[i], name) in self._done

    def check_exp_space(self, exp_space: str, exp_dim: int, source: Path) -> None:
        """Every vector in one store lives in one expression space; refuse a second one."""
        check_exp_space(self.exp_space, self.exp_dim, exp_space, exp_dim, source)

    def set_attr(self, name: str, value: str) -> None:
        """A root attribute of the main file (e.g. the synthetic manifest), set at the next
        merge; segments written from now on carry it too."""
        self.attrs[name] = value
        self._new_attrs[name] = value
        self.ctx.store_attrs[name] = str(value)

    def _published(self, path: Path) -> None:
        super()._published(path)
        self.pending.append(path)

    def _committed(self, seg: SegmentWriter) -> None:
        ctx = self.ctx
        if seg.exp_space:
            ctx.exp_space, ctx.exp_dim = seg.exp_space, seg.exp_dim
        for (i, serial), row in seg._cameras.items():
            ctx.cameras[(seg.identities[i], serial)] = seg._staged_cams[row]
        ctx.image_size = seg.image_size or ctx.image_size
        for identity, name in seg.done:
            self._mark_done(identity, name)

    def adopt(self, segment: Path) -> None:
        """Take in a segment committed by another process (a distributed ingest's task)."""
        self._take_segment(read_segment_state(segment))
        self.pending.append(segment)

    def commit(self) -> MergeReport:
        """Merge the segments committed so far into the main file (atomic)."""
        self.drain()
        report = MergeReport()
        if self.pending or self._new_attrs or not self.path.exists():
            report = merge(self.path, self.pending, attrs=self._new_attrs, lock=self._lock)
            self.pending = []
            self._new_attrs = {}
            self.ctx.store_attrs = {}
        self.last_merge = time.monotonic()
        return report

    def close(self, failed: bool = False) -> None:
        """Merge what is pending and release the lock. After an error (``failed``) committed
        units are still merged, but a store that would be empty is not created."""
        if self._lock is None:
            return
        try:
            if not failed:
                self.commit()
            else:
                try:
                    self.drain()
                    if self.pending:
                        self.commit()
                except StoreError:
                    pass  # the first error is the one to report; the next run merges
        finally:
            self._lock.release()
            self._lock = None  # type: ignore[assignment]

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)

