"""Ingest on Ray: each unit (a sequence with images, or a group of coefficient-only
sequences) is a Ray task that writes its own shard, a segment file; the driver takes finished
shards into the store.

Why it is safe: a shard is an ordinary segment (``rafdata.segment``), written by exactly one
task under a temporary name and renamed when complete, so no HDF5 file ever has two writers.
The driver holds the store's writer lock for the whole run, moves each finished shard into
``store.h5.parts/`` (a rename, or copy + fsync + rename across filesystems) and merges them
into the main file in plan order, which makes the result the same, row for row and byte for
byte, as a local ingest of the same source. A task that dies loses only its unit (Ray retries
it); a driver that dies loses nothing finished: the next run adopts the shards it finds.

Nothing here is imported unless ``--ray`` is given.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rafdata.commit import fsync_dir, fsync_file
from rafdata.errors import RafDataError, StoreError
from rafdata.ingest import (
    IngestConfig,
    IngestReport,
    _Decoders,
    _Pending,
    _read_tracking,
    write_unit,
)
from rafdata.lock import WriterLock
from rafdata.progress import NullProgress, Progress
from rafdata.segment import (
    SEGMENT_SUFFIX,
    SEGMENT_TMP,
    SegmentContext,
    parts_dir,
    read_segment_state,
)
from rafdata.sources import open_source
from rafdata.writer import SegmentSink, StoreWriter

TASK_WORKERS = 1  # decoding threads (= Ray CPUs) per task unless told: Ray runs as many tasks
# as the cluster has CPUs, so one thread each already fills every node


def task_workers(workers: int | None) -> int:
    """Decoding threads (and Ray CPUs) each task uses: ``workers`` as given (``--workers``),
    else :data:`TASK_WORKERS`. A local ingest defaults to the cores instead
    (:func:`rafdata.config.default_workers`): there one process decodes everything."""
    return TASK_WORKERS if workers is None else workers


@dataclass(frozen=True)
class UnitSpec:
    """What a task needs to find its sequences again: (participant, sequence, plan order)."""

    sequences: tuple[tuple[str, str, int], ...]


class RayExecutor:
    """Runs units as Ray tasks (see the module docstring).

    address: a Ray cluster (``ray://...`` or ``auto``); None starts a local one. shard_dir:
    where tasks write (default: the store's parts folder; on a cluster, a folder every node
    and the driver see). cpus_per_task: Ray CPUs each task reserves (= its decoding threads).
    """

    def __init__(self, src: Path, address: str | None = None, shard_dir: Path | None = None,
                 cpus_per_task: int = 1):
        self.src = Path(src)
        self.address = address
        self.shard_dir = Path(shard_dir) if shard_dir else None
        self.cpus_per_task = max(1, cpus_per_task)

    # -- before the store is read: shards finished by a driver that stopped ------------------
    def prepare(self, store: Path, lock: WriterLock) -> None:
        folder = self.shard_dir or parts_dir(store)
        if not folder.is_dir() or folder == parts_dir(store):
            return
        for p in sorted(folder.iterdir()):
            if p.name.endswith(SEGMENT_SUFFIX + SEGMENT_TMP):
                p.unlink(missing_ok=True)  # a task killed mid-write; its unit is redone
            elif p.name.endswith(SEGMENT_SUFFIX):
                adopt_shard(p, store)

    # -- the run -------------------------------------------------------------------------------
    def run(self, writer: StoreWriter, units: list[list[_Pending]], cfg: IngestConfig,
            progress: Progress, report: IngestReport) -> None:
        if not units:
            return
        ray = _ray(self.address)
        folder = self.shard_dir or writer.folder
        folder.mkdir(parents=True, exist_ok=True)
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_task, "max_retries": 2}
        if os.environ.get("RAFDATA_FAULT"):  # crash tests reach into the tasks too
            opts["runtime_env"] = {"env_vars": {"RAFDATA_FAULT": os.environ["RAFDATA_FAULT"]}}
        task = ray.remote(_run_unit).options(**opts)
        tcfg = replace(cfg, workers=self.cpus_per_task)
        specs = {}
        for unit in units:
            spec = UnitSpec(tuple((p.seq.participant, p.seq.name, p.order) for p in unit))
            specs[task.remote(str(self.src), tcfg, spec, writer.ctx, str(folder))] = unit
        progress.start("units (ray)", len(specs))
        todo = list(specs)
        try:
            while todo:
                done, todo = ray.wait(todo, num_returns=1)
                result = _get(ray, done[0], specs[done[0]])
                for shard in result["segments"]:
                    writer.adopt(adopt_shard(Path(shard), writer.path))
                report.written.extend(result["written"])
                report.timesteps += result["timesteps"]
                report.images += result["images"]
                for w in result["warnings"]:
                    progress.warn(w)
                progress.advance()
        finally:
            for ref in todo:  # an error stops the run; finished units stay committed
                ray.cancel(ref, force=True)


def _ray(address: str | None):
    try:
        import ray
    except ImportError:
        raise RafDataError(None, "--ray needs the ray package (a dependency of raf-toolkit): pip install ray")\
            from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def _get(ray, ref, unit: list[_Pending]) -> dict[str, Any]:
    """A task's result; its RafDataError comes back as itself (one line), a crashed worker
    as one line naming the unit."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        if isinstance(cause, RafDataError):
            raise RafDataError(cause.path, cause.problem) from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.TaskCancelledError) as err:
        names = ", ".join(f"{p.seq.participant}/{p.seq.name}" for p in unit[:3])
        raise RafDataError(None, f"the Ray task for {names} died ({err.__class__.__name__}) "
                           "after its retries; rerun the ingest to redo it (finished units "
                           "are kept)") from None


def _run_unit(src: str, cfg: IngestConfig, spec: UnitSpec, ctx: SegmentContext,
              folder: str) -> dict[str, Any]:
    """A Ray task: write one unit's segment into ``folder``; return what it wrote."""
    warnings: list[str] = []
    progress = NullProgress()
    progress.warn = warnings.append  # type: ignore[method-assign]
    pids = tuple(dict.fromkeys(p for p, _, _ in spec.sequences))
    names = tuple(dict.fromkeys(n for _, n, _ in spec.sequences))
    tcfg = replace(cfg, participants=pids, sequences=names)
    source = open_source(Path(src), tcfg.layout, tcfg.source_options(), warn=warnings.append)
    found = {(s.participant, s.name): s for pid in source.participants()
             for s in source.sequences(pid)}
    todo = []
    for pid, name, order in spec.sequences:
        if (pid, name) not in found:
            raise StoreError(Path(src), f"sequence {pid}/{name} is not in the source any more")
        todo.append((order, found[(pid, name)]))
    pending = _read_tracking(todo, None, tcfg, progress)
    sink = SegmentSink(Path(folder), ctx)
    report = IngestReport()
    with _Decoders(tcfg, sink.codec, progress) as decoders:
        decoders.order([p for p in pending if p.cameras])
        write_unit(sink, pending, tcfg, progress, decoders, report)
    sink.drain()
    return {"segments": [str(p) for p in sink.written], "written": report.written,
            "timesteps": report.timesteps, "images": report.images, "warnings": warnings}


def adopt_shard(shard: Path, store: Path) -> Path:
    """Check a finished shard and move it into the store's parts folder; returns its path
    there. A damaged shard is a StoreError naming it (and it is left where it is)."""
    state = read_segment_state(shard)  # raises, naming the file, when it cannot be read
    if not state["attrs"].get("segment"):
        raise StoreError(shard, "not a segment file (no segment attribute)")
    n = state["rows"]["images"]
    if n and (state["image_shape"] is None or state["image_shape"][0] != n):
        raise StoreError(shard, f"damaged shard: {n} image rows but image data of shape "
                         f"{state['image_shape']}; delete it and rerun to redo its unit")
    target = parts_dir(store) / shard.name
    if shard.resolve() == target.resolve():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(shard, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        tmp = target.with_name(target.name + SEGMENT_TMP)
        shutil.copyfile(shard, tmp)  # another filesystem: copy, make durable, then rename
        fsync_file(tmp)
        os.replace(tmp, target)
        shard.unlink()
    fsync_dir(target.parent)
    return target


def ingest_distributed(src: str | Path, out: str | Path, cfg: IngestConfig | None = None,
                       progress: Progress | None = None, address: str | None = None,
                       shard_dir: str | Path | None = None) -> IngestReport:
    """``rafdata ingest --ray``: :func:`rafdata.ingest.ingest` with units as Ray tasks."""
    from rafdata.ingest import ingest

    cfg = cfg or IngestConfig(workers=TASK_WORKERS)
    t0 = time.perf_counter()
    report = ingest(src, out, cfg, progress, executor=RayExecutor(
        Path(src), address, Path(shard_dir) if shard_dir else None, cfg.workers))
    report.seconds = time.perf_counter() - t0
    return report
