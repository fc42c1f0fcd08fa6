"""Ingest throughput against decoding alone, and peak memory of ingest.

Claim (docs/benchmarks.md): ingest of 512x512 NeRSemble-layout videos costs little more than
decoding the same frames with decord alone, and its memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from common import ROOT, SCRATCH, synth_dataset, table, timed


def _decode_alone(src) -> int:
    """Decode every video (colour and alpha) of the dataset with decord, one after another."""
    import decord

    n = 0
    for path in sorted(src.glob("*/sequences/*/*/cam_*.mp4")):
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
        for start in range(0, len(vr), 16):
            vr.get_batch(list(range(start, min(start + 16, len(vr))))).asnumpy()
            n += min(16, len(vr) - start)
    return n


_PEAK = """
import json, resource, sys
sys.path.insert(0, {root!r})
from rafdata.ingest import IngestConfig, ingest
r = ingest({src!r}, {out!r}, IngestConfig(workers={workers}, participants={pids!r}))
print(json.dumps({{"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images": r.images, "seconds": r.seconds}}))
"""


def _ingest_subprocess(src, out, workers: int, pids=None) -> dict:
    if out.exists():
        out.unlink()
    code = _PEAK.format(root=str(ROOT), src=str(src), out=str(out), workers=workers, pids=pids)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> str:
    frames = 20 if quick else 40
    size = 256 if quick else 512
    src = synth_dataset(
        f"ingest-{size}-{frames}", participants=("388", "422"), frame_step=1,
        sequences=("EXP-1-head", "FREE"), cameras=("222200037", "222200038", "222200039"),
        frames=frames, width=size, height=size,
    )
    work = SCRATCH / "ingest-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    t_dec, n_dec = timed(lambda: _decode_alone(src))
    one = _ingest_subprocess(src, work / "w1.h5", workers=1)
    two = _ingest_subprocess(src, work / "w2.h5", workers=2)
    half = _ingest_subprocess(src, work / "half.h5", workers=2, pids=("388",))
    n_img = one["images"]
    rows = [
        ["decord alone, 1 thread (colour + alpha videos)", f"{n_dec}", f"{t_dec:.2f}",
         f"{n_dec / t_dec:.0f}", "1.00"],
        ["ingest, --workers 1", f"{n_img}", f"{one['seconds']:.2f}",
         f"{n_img / one['seconds']:.0f}", f"{one['seconds'] / t_dec:.2f}"],
        ["ingest, --workers 2", f"{n_img}", f"{two['seconds']:.2f}",
         f"{n_img / two['seconds']:.0f}", f"{two['seconds'] / t_dec:.2f}"],
    ]
    mem = [
        ["1 participant", half["images"], f"{half['rss_mb']:.0f}"],
        ["2 participants", two["images"], f"{two['rss_mb']:.0f}"],
    ]
    return "\n\n".join([
        "## Ingest",
        f"Synthetic NeRSemble layout, {size}x{size} H.264 colour + alpha-map videos, "
        f"{n_img} images (each image = one colour and one alpha frame). Time relative to "
        "decoding the same videos with decord alone, measured in the same run.",
        table(["run", "images", "seconds", "images/s", "time vs decode"], rows),
        "Peak resident memory of the whole ingest process (Python, torch-free imports, "
        "HDF5): it must not grow with the number of sequences.",
        table(["ingest of", "images", "peak RSS (MiB)"], mem),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
