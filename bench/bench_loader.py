"""What checking every image's CRC-32 on read costs the training loader.

Claim (docs/benchmarks.md): ``Store.read_rgb`` / ``read_mask`` verify each image against its
stored CRC-32 (``/images/crc``, ``/images/mask_crc``) so that damaged bytes stop a run (or are
skipped with ``--skip-corrupt``) instead of being trained on; the check costs the loader little
next to decoding, and nothing that limits training.

Measured in one run over the same store, alternating the two settings so that both see the
same page cache and machine load: single-process reads (``Store`` alone: decode + CRC) and the
training loader (``SubjectDataset`` through ``make_loader``, as ``rafmodel train`` builds it),
each with ``verify_crc`` on (the default) and off (the baseline).
"""

from __future__ import annotations

import sys
import time

from common import SCRATCH, table, video_dataset

ROUNDS = 3  # each setting measured this many times, interleaved; the best is reported


def _store(quick: bool):
    from rafdata.ingest import IngestConfig, ingest

    src, size, _ = video_dataset(quick)
    store = SCRATCH / f"loader-crc-{size}.h5"
    if not store.exists():
        ingest(src, store, IngestConfig(participants=("388",)))
    return store, size


def _read_rate(store, rows, verify: bool) -> float:
    """Images (colour + matte) per second read by one process, after one warm-up pass."""
    from rafdata.store import Store

    with Store(store, verify_crc=verify) as s:
        for r in rows:
            s.read_rgb(int(r))
            s.read_mask(int(r))
        t0 = time.perf_counter()
        for r in rows:
            s.read_rgb(int(r))
            s.read_mask(int(r))
        return len(rows) / (time.perf_counter() - t0)


def _loader_rate(store, workers: int, n: int, verify: bool) -> float:
    """Samples per second from the trainer's loader (batch 1), after its first batch."""
    from rafmodel.data import AugmentConfig, InfiniteLoader, SubjectDataset, make_loader

    ds = SubjectDataset(store, "388", AugmentConfig(mode="vanilla"), split="train",
                        mark_corrupt=True, verify_crc=verify)
    it = InfiniteLoader(make_loader(ds, batch_size=1, workers=workers, shuffle=True, seed=0,
                                    pin_memory=False))
    next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    rate = n / (time.perf_counter() - t0)
    del it  # stops the workers before the next measurement
    return rate


def _best(fn, verify_values=(True, False)) -> dict[bool, float]:
    best = {v: 0.0 for v in verify_values}
    for _ in range(ROUNDS):
        for v in verify_values:
            best[v] = max(best[v], fn(v))
    return best


def measure(quick: bool) -> dict:
    from rafdata.store import Store

    store, size = _store(quick)
    with Store(store) as s:
        rows = s.image_rows(identity="388", held_out=False)
    n = 300 if quick else 1000
    out = {"size": size, "images": len(rows), "samples": n}
    out["reads"] = _best(lambda v: _read_rate(store, rows, v))
    for workers in (0, 2):
        out[f"loader{workers}"] = _best(lambda v, w=workers: _loader_rate(store, w, n, v))
    return out


def run(quick: bool = False) -> str:
    r = measure(quick)
    rows = []
    for key, label in (("reads", "`Store.read_rgb` + `read_mask`, one process"),
                       ("loader0", "training loader, 0 workers (reads in the trainer)"),
                       ("loader2", "training loader, 2 workers (`make_loader`)")):
        on, off = r[key][True], r[key][False]
        # per-image cost of the check: difference of the per-image times
        cost_ms = max(0.0, 1e3 / on - 1e3 / off)
        rows.append([label, f"{off:.0f}", f"{on:.0f}", f"{on / off:.2f}", f"{cost_ms:.3f}"])
    size = r["size"]
    return "\n\n".join([
        "## CRC-32 check on read",
        f"Images read per second from a {size}x{size} store (subject 388, {r['images']} training "
        f"images; colour and matte each checked against `/images/crc` / `/images/mask_crc`), "
        f"with `Store(verify_crc=...)` off (the baseline) and on (the default), interleaved, "
        f"best of {ROUNDS}; loaders over {r['samples']} samples after the first batch, batch 1, "
        "no pinning.",
        table(["reader", "samples/s, CRC off", "samples/s, CRC on", "rate on / off",
               "check cost (ms/image)"], rows),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
