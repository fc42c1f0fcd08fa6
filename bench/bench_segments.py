"""How segments join the main store, and what a distributed ingest costs.

Claims (docs/benchmarks.md, docs/ingest.md):
- committing segments by reference (a new main file with virtual datasets) costs time in the
  size of the tables, far less than copying their image chunks into one file would;
- random image reads through segment files are as fast as from one file;
- a local Ray ingest gives the same store as a local one, at a cost measured here.
"""

from __future__ import annotations

import random
import shutil
import sys
import time

import h5py
from common import SCRATCH, best_of, table, timed, video_dataset


def _copy_into_one_file(store, out) -> int:
    """The alternative to references: every image chunk copied raw into one new file, with
    the tables, as a "consolidate by copy" would do. Returns bytes copied."""
    from rafdata.store import Store, compression_options

    copied = 0
    with Store(store) as s, h5py.File(out, "w") as dst:
        src = s.h5()
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for group in ("identities", "sequences", "cameras", "timesteps"):
            src.copy(src[group], dst, name=group)
        im = dst.create_group("images")
        for name in ("timestep", "camera", "has_mask", "crc", "mask_crc"):
            src.copy(src["images"][name], im, name=name)
        for k, v in src["images"].attrs.items():
            im.attrs[k] = v
        opts = compression_options(str(src["images"].attrs["compression"]), checksum=False)
        h, w = s.image_size
        targets = {name: im.create_dataset(name, shape=(s.n_images, *shape), dtype="u1",
                                           chunks=(1, *shape), **opts)
                   for name, shape in (("rgb", (h, w, 3)), ("mask", (h, w)))}
        for row in range(s.n_images):
            rgb, mask, local, _, _ = s._locate(row)
            for name, ds in (("rgb", rgb), ("mask", mask)):
                if name == "mask" and not s.image_has_mask[row]:
                    continue
                fmask, chunk = ds.id.read_direct_chunk((local,) + (0,) * (ds.ndim - 1))
                targets[name].id.write_direct_chunk((row,) + (0,) * (ds.ndim - 1), chunk, fmask)
                copied += len(chunk)
    return copied


def _random_reads(path, n: int, seed: int = 0) -> float:
    from rafdata.store import Store

    with Store(path) as s:
        rows = random.Random(seed).choices(range(s.n_images), k=n)
        t0 = time.perf_counter()
        for r in rows:
            s.read_rgb(r)
            s.read_mask(r)
        return (time.perf_counter() - t0) / n


def run(quick: bool = False) -> str:
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.merge import merge
    from rafdata.store import Store

    src, size, _ = video_dataset(quick)
    work = SCRATCH / "segments"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = work / "store.h5"
    t_local, rep = timed(lambda: ingest(src, store, IngestConfig(workers=2)))
    with Store(store) as s:
        n_images, n_segments = s.n_images, len(s.segment_paths)
        image_bytes = sum(p.stat().st_size for p in s.segment_paths)

    t_merge = best_of(3, lambda: merge(store, rebuild=True))
    one = work / "one.h5"
    t_copy = best_of(3, lambda: (one.unlink(missing_ok=True), _copy_into_one_file(store, one)))
    reads = 300 if quick else 1000
    _random_reads(store, 50)
    _random_reads(one, 50)  # warm the page cache for both
    r_seg = min(_random_reads(store, reads, seed) for seed in range(3))
    r_one = min(_random_reads(one, reads, seed) for seed in range(3))

    rows = [
        ["commit by reference: new main file over all segments (`consolidate --rebuild`)",
         f"{t_merge:.3f}", "1.00"],
        ["copy every image chunk into one file (the alternative)", f"{t_copy:.3f}",
         f"{t_copy / t_merge:.1f}"],
    ]
    read_rows = [["through segment files (Store)", f"{r_seg * 1e3:.3f}", "1.00"],
                 ["one file holding every chunk", f"{r_one * 1e3:.3f}", f"{r_one / r_seg:.2f}"]]

    ray_rows = []
    try:
        import ray  # noqa: F401

        from rafdata.distributed import ingest_distributed
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        t_init = time.perf_counter() - t0
        t_ray, _ = timed(lambda: ingest_distributed(src, work / "ray.h5",
                                                    IngestConfig(workers=1)))
        ray.shutdown()
        ray_rows = [["local ingest (threads, --workers 2)", f"{t_local:.2f}", "1.00"],
                    ["--ray on a local 2-CPU cluster, 1 CPU per task (cluster start "
                     f"{t_init:.1f} s not included)", f"{t_ray:.2f}", f"{t_ray / t_local:.2f}"]]
    except ImportError:
        ray_rows = [["--ray", "ray not installed", "-"]]

    return "\n\n".join([
        "## Segments: committing, reading, distributing",
        f"The ingest benchmark's videos ({size} px): {rep.images} images in {n_segments} "
        f"segments, {image_bytes / 2**20:.0f} MiB. Committing segments into the main file "
        "by reference (virtual datasets) against copying their chunks into one file: best of "
        "three each, relative to the first row.",
        table(["commit", "seconds", "relative"], rows),
        f"Random single-image reads (colour + matte), mean of {reads}, best of three seeds, "
        "page cache warm:",
        table(["read", "ms per image", "relative"], read_rows),
        "Ingest of the same source, in one command:",
        table(["ingest", "seconds", "relative"], ray_rows),
        f"Images: {n_images}.",
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
