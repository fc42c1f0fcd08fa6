"""Image codecs for the store, and random single-image reads against per-frame image files.

Claims (docs/benchmarks.md): the default lossless codec writes faster than video decodes and
reads fast; random single-image reads from the store beat decoding the same images from
per-frame JPEG files (the Gaussian Head Avatar layout) by a wide margin.
"""

from __future__ import annotations

import io
import sys

import h5py
import numpy as np
from common import SCRATCH, synth_dataset, table, timed
from PIL import Image


def _frames(quick: bool) -> np.ndarray:
    """Decoded 512x512 frames of the synthetic dataset, (N, H, W, 3) uint8."""
    from rafdata.video import read_frames

    size = 256 if quick else 512
    frames = 20 if quick else 40
    src = synth_dataset(
        f"ingest-{size}-{frames}", participants=("388", "422"), frame_step=1,
        sequences=("EXP-1-head", "FREE"), cameras=("222200037", "222200038", "222200039"),
        frames=frames, width=size, height=size,
    )
    out = []
    for path in sorted(src.glob("*/sequences/*/images/cam_*.mp4"))[:4]:
        out += list(read_frames(path, np.arange(frames)))
    return np.stack(out)


def _codec_rows(images: np.ndarray, reads: int, rng) -> list[list[str]]:
    from rafdata.store import COMPRESSIONS, compression_options

    n, h, w, _ = images.shape
    rows = []
    for codec in COMPRESSIONS:
        path = SCRATCH / f"codec-{codec}.h5"

        def write(path=path, codec=codec):
            with h5py.File(path, "w") as f:
                ds = f.create_dataset("rgb", shape=(n, h, w, 3), dtype=np.uint8,
                                      chunks=(1, h, w, 3), **compression_options(codec))
                for i in range(n):
                    ds[i] = images[i]

        t_w, _ = timed(write)
        order = rng.integers(0, n, reads)
        with h5py.File(path, "r") as f:
            ds = f["rgb"]
            t_r, _ = timed(lambda ds=ds, order=order: [ds[int(i)] for i in order])
            ratio = images.nbytes / ds.id.get_storage_size()
        rows.append([codec, f"{n / t_w:.0f}", f"{reads / t_r:.0f}", f"{ratio:.2f}"])
    return rows


def run(quick: bool = False) -> str:
    import hdf5plugin  # noqa: F401

    SCRATCH.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = _frames(quick)
    n = len(images)
    reads = 200 if quick else 600
    codec_rows = _codec_rows(images, reads, rng)

    # Per-frame files as GHA writes them, read back at random (decode from disk each time).
    jpg_dir = SCRATCH / "frames"
    jpg_dir.mkdir(exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(jpg_dir / f"{i}.jpg", quality=95)
        Image.fromarray(img).save(jpg_dir / f"{i}.png")
    order = rng.integers(0, n, reads)
    t_jpg, _ = timed(lambda: [np.asarray(Image.open(jpg_dir / f"{i}.jpg").convert("RGB"))
                              for i in order])
    t_png, _ = timed(lambda: [np.asarray(Image.open(jpg_dir / f"{i}.png").convert("RGB"))
                              for i in order])
    jpeg_bytes = [(jpg_dir / f"{i}.jpg").read_bytes() for i in range(n)]
    t_mem, _ = timed(lambda: [np.asarray(Image.open(io.BytesIO(jpeg_bytes[i])))
                              for i in order])
    store_rate = float(next(r for r in codec_rows if r[0] == "blosc-lz4")[2])
    read_rows = [
        ["store (blosc-lz4), one image per read", f"{store_rate:.0f}", "1.00"],
        ["JPEG files (quality 95), PIL", f"{reads / t_jpg:.0f}", f"{store_rate * t_jpg / reads:.1f}"],
        ["PNG files, PIL", f"{reads / t_png:.0f}", f"{store_rate * t_png / reads:.1f}"],
        ["JPEG decode from memory only", f"{reads / t_mem:.0f}",
         f"{store_rate * t_mem / reads:.1f}"],
    ]
    h, w = images.shape[1:3]
    return "\n\n".join([
        "## Store codecs and random reads",
        f"{n} decoded frames of the synthetic videos, {w}x{h}, one chunk per image with a "
        f"Fletcher32 checksum; {reads} random single-image reads. Rates in images/s.",
        table(["codec", "write/s", "random read/s", "ratio"], codec_rows),
        table(["random single-image reads", "images/s", "store speed-up"], read_rows),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
