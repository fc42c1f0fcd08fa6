"""Image codecs for the store, and random single-image reads against per-frame image files.

Claims (docs/benchmarks.md): the default lossless codec writes faster than video decodes and
reads fast; random single-image reads from the store beat decoding the same images from
per-frame JPEG files (the Gaussian Head Avatar layout) by a wide margin.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
from common import SCRATCH, best_of, table, timed, video_dataset
from PIL import Image


def _frames(quick: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decoded frames and mattes of the synthetic dataset: (N, H, W, 3), (N, H, W) uint8."""
    from rafdata.video import read_frames

    src, _, frames = video_dataset(quick)
    rgb, mask = [], []
    for path in sorted(src.glob("*/sequences/*/images/cam_*.mp4"))[:4]:
        rgb += list(read_frames(path, np.arange(frames)))
        alpha = path.parents[1] / "alpha_maps" / path.name
        mask += list(read_frames(alpha, np.arange(frames), channel0=True))
    return np.stack(rgb), np.stack(mask)


def _codec_rows(rgb: np.ndarray, mask: np.ndarray, order: np.ndarray) -> dict[str, list]:
    """Write all images (colour + matte) through StoreWriter with each codec, then read them
    back at random: colour alone, and colour + matte (a training sample)."""
    from rafdata.inspect import summarize
    from rafdata.store import COMPRESSIONS, Store, remove_store
    from rafdata.writer import StoreWriter

    n = len(rgb)
    writes = {}
    for codec in COMPRESSIONS:
        path = SCRATCH / f"codec-{codec}.h5"
        remove_store(path)

        def write(path=path, codec=codec):
            with StoreWriter(path, compression=codec) as w:
                with w.sequence("bench", "A", False, "bench") as sw:
                    ts = sw.add_timesteps(np.arange(n), np.zeros((n, 4)), np.zeros((n, 6)),
                                          np.ones(n), "bench")
                    cam = sw.camera("0", np.eye(3), np.eye(4))
                    for a in range(0, n, 8):
                        sw.add_images(rgb[a : a + 8], mask[a : a + 8], ts[a : a + 8], cam)

        os.sync()  # no writeback of the previous codec's file during this one's writes
        writes[codec] = timed(write)[0]
    # Reads only once the kernel has written everything back: its flushing would otherwise
    # compete for the cores with whichever codec is read first.
    os.sync()
    rows = {}
    for codec in COMPRESSIONS:
        with Store(SCRATCH / f"codec-{codec}.h5") as s:
            s.read_rgb(0)
            t_r = best_of(3, lambda s=s: each(order, lambda i: s.read_rgb(int(i))))
            t_s = best_of(3, lambda s=s: each(order, lambda i: (s.read_rgb(int(i)),
                                                                s.read_mask(int(i)))))
            info = summarize(s)  # sizes over the segment files
            r_rgb = info["image_compression_ratio"]
            r_mask = info["mask_compression_ratio"]
        rows[codec] = [codec, f"{n / writes[codec]:.0f}", f"{len(order) / t_r:.0f}",
                       f"{len(order) / t_s:.0f}", f"{r_rgb:.2f}", f"{r_mask:.1f}"]
    return rows


def each(items, fn) -> None:
    """Call ``fn`` on every item, dropping results at once, as a training loop would (keeping
    hundreds of decoded frames alive turns every read into fresh page faults)."""
    for i in items:
        fn(i)


def _file_reads(rgb: np.ndarray, mask: np.ndarray, order: np.ndarray) -> dict[str, float]:
    """Seconds per read of per-frame files as the GHA layout holds them (decoded each time)."""
    d = SCRATCH / "frames"
    d.mkdir(exist_ok=True)
    for i, (img, m) in enumerate(zip(rgb, mask, strict=True)):
        Image.fromarray(img).save(d / f"image_{i}.jpg", quality=95)
        Image.fromarray(m).save(d / f"mask_{i}.jpg", quality=95)
        Image.fromarray(img).save(d / f"image_{i}.png")

    def load(name: str, mode: str) -> np.ndarray:
        return np.asarray(Image.open(d / name).convert(mode))

    k = len(order)
    os.sync()
    t_jpg = best_of(3, lambda: each(order, lambda i: load(f"image_{i}.jpg", "RGB")))
    t_pair = best_of(3, lambda: each(order, lambda i: (load(f"image_{i}.jpg", "RGB"),
                                                       load(f"mask_{i}.jpg", "L"))))
    t_png = best_of(3, lambda: each(order, lambda i: load(f"image_{i}.png", "RGB")))
    jpeg_bytes = [(d / f"image_{i}.jpg").read_bytes() for i in range(len(rgb))]
    t_mem = best_of(3, lambda: each(order, lambda i: np.asarray(
        Image.open(io.BytesIO(jpeg_bytes[i])))))
    return {"jpg": t_jpg / k, "pair": t_pair / k, "png": t_png / k, "mem": t_mem / k,
            "jpg_kb": float(np.mean([len(b) for b in jpeg_bytes])) / 1e3}


def run(quick: bool = False) -> str:
    import hdf5plugin  # noqa: F401

    from rafdata.store import DEFAULT_COMPRESSION

    SCRATCH.mkdir(parents=True, exist_ok=True)
    rgb, mask = _frames(quick)
    n = len(rgb)
    order = np.random.default_rng(0).integers(0, n, 200 if quick else 600)
    codecs = _codec_rows(rgb, mask, order)
    files = _file_reads(rgb, mask, order)
    default = codecs[DEFAULT_COMPRESSION]
    one, pair = 1.0 / float(default[2]), 1.0 / float(default[3])
    read_rows = [
        [f"store ({DEFAULT_COMPRESSION}, the default)", f"{1 / one:.0f}", "1.0",
         f"{1 / pair:.0f}", "1.0"],
        [f"JPEG files (quality 95, {files['jpg_kb']:.0f} KB), PIL", f"{1 / files['jpg']:.0f}",
         f"{files['jpg'] / one:.1f}", f"{1 / files['pair']:.0f}",
         f"{files['pair'] / pair:.1f}"],
        ["PNG files, PIL", f"{1 / files['png']:.0f}", f"{files['png'] / one:.1f}", "", ""],
        ["JPEG decode from memory only", f"{1 / files['mem']:.0f}",
         f"{files['mem'] / one:.1f}", "", ""],
    ]
    for codec in ("blosc-lz4", "none"):
        if codec != DEFAULT_COMPRESSION:
            r = codecs[codec]
            read_rows.append([f"store ({codec})", r[2], f"{float(r[2]) * one:.2f}", r[3],
                              f"{float(r[3]) * pair:.2f}"])
    h, w = rgb.shape[1:3]
    return "\n\n".join([
        "## Store codecs and random reads",
        f"{n} decoded frames and mattes of the synthetic videos, {w}x{h}, written through "
        "StoreWriter (one chunk per image, CRC-32 per image; Blosc and uncompressed chunks "
        f"made outside HDF5 and written directly), then {len(order)} random reads through "
        "Store.read_rgb (colour) and read_rgb + read_mask (a training sample), best of 3 "
        "passes (files and their JPEG/PNG counterparts alike). Writes here "
        "run on one thread; ingest encodes in its decoding threads. Rates in images/s; "
        "ratios are the compression ratios of colour and of mattes.",
        table(["codec", "write/s", "read colour/s", "read colour+matte/s", "colour ratio",
               "matte ratio"], list(codecs.values())),
        "The same frames as GHA-layout files (`image_{serial}.jpg`, `mask_{serial}.jpg`), "
        "decoded at random; speed-up = time per read over the default store's.",
        table(["random reads", "colour/s", "store speed-up", "colour+matte/s",
               "store speed-up"], read_rows),
    ])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
