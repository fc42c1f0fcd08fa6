"""Image codecs for the store, and random single-image reads against per-frame image files.

Claims (docs/benchmarks.md): the default lossless codec writes faster than video decodes and
reads fast; random single-image reads from the store beat decoding the same images from
per-frame JPEG files (the Gaussian Head Avatar layout) by a wide margin.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from common import SCRATCH, table, timed, video_dataset
from PIL import Image


def _frames(quick: bool) -> np.ndarray:
    """Decoded 512x512 frames of the synthetic dataset, (N, H, W, 3) uint8."""
    from rafdata.video import read_frames

    src, _, frames = video_dataset(quick)
    out = []
    for path in sorted(src.glob("*/sequences/*/images/cam_*.mp4"))[:4]:
        out += list(read_frames(path, np.arange(frames)))
    return np.stack(out)


def _codec_rows(images: np.ndarray, reads: int, rng) -> list[list[str]]:
    """Write all images through StoreWriter with each codec, then read them back at random."""
    from rafdata.store import COMPRESSIONS, Store, StoreWriter

    n = len(images)
    rows = []
    for codec in COMPRESSIONS:
        path = SCRATCH / f"codec-{codec}.h5"
        path.unlink(missing_ok=True)

        def write(path=path, codec=codec):
            with StoreWriter(path, compression=codec) as w:
                with w.sequence("bench", "A", False, "bench") as sw:
                    ts = sw.add_timesteps(np.arange(n), np.zeros((n, 4)), np.zeros((n, 6)),
                                          np.ones(n), "bench")
                    cam = sw.camera("0", np.eye(3), np.eye(4))
                    for a in range(0, n, 8):
                        sw.add_images(images[a : a + 8], None, ts[a : a + 8], cam)

        t_w, _ = timed(write)
        order = rng.integers(0, n, reads)
        with Store(path) as s:
            s.read_rgb(0)
            t_r, _ = timed(lambda s=s, order=order: [s.read_rgb(int(i)) for i in order])
            ratio = images.nbytes / s.h5()["images/rgb"].id.get_storage_size()
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
        f"{n} decoded frames of the synthetic videos, {w}x{h}, written through StoreWriter "
        "(one chunk per image, CRC-32 per image; Blosc chunks compressed outside HDF5 and "
        f"written directly), then {reads} random single-image reads through Store.read_rgb. "
        "Writes here run on one thread; ingest encodes in its decoding threads. "
        "Rates in images/s.",
        table(["codec", "write/s", "random read/s", "ratio"], codec_rows),
        table(["random single-image reads", "images/s", "store speed-up"], read_rows),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
