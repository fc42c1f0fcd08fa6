"""Tiny media fixtures for tests: mp4 videos, JPEGs, tracker npz files, guarded calls."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from rafdata.rotations import euler_xyz_intrinsic_to_matrix


def frame_colour(i: int) -> np.ndarray:
    """(3,) uint8 flat colour of frame ``i``: far apart between frames, mid-range so that
    yuv420p rounding stays within a few levels."""
    return np.array([30 + (i * 37) % 200, 220 - (i * 53) % 190, 40 + (i * 71) % 180], np.uint8)


def coded_frames(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    """(n, h, w, 3) uint8 frames, each one flat colour (see :func:`frame_colour`)."""
    return np.stack([np.broadcast_to(frame_colour(i), (h, w, 3)) for i in range(n)]).copy()


def write_mp4(
    path: Path, frames: np.ndarray, *, faststart: bool = True, fps: int = 25
) -> Path:
    """Encode (n, h, w, 3) uint8 frames as near-lossless H.264 yuv420p (h, w even).

    ``faststart`` puts the index at the front, as downloads usually are, so cutting the file
    short leaves a header that over-reports the frame count.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(path: Path, fraction: float) -> Path:
    """Cut ``path`` to ``fraction`` of its bytes, in place."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_jpg(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)
    return path


def write_bfm_params(
    folder: Path, frames: list[int], *, pad: int = 4, exp_dim: int = 64, seed: int = 0
) -> dict[str, np.ndarray]:
    """Multiview-3DMM-Fitting output: ``folder/{frame:0{pad}d}/params.npz``; returns the
    stacked arrays written (exp (T, exp_dim), pose (T, 6), scale (T,))."""
    rng = np.random.default_rng(seed)
    exp = rng.normal(size=(len(frames), exp_dim)).astype(np.float32)
    pose = rng.normal(size=(len(frames), 6)).astype(np.float32)
    scale = rng.uniform(0.9, 1.1, size=len(frames)).astype(np.float32)
    for t, f in enumerate(frames):
        d = folder / f"{f:0{pad}d}"
        d.mkdir(parents=True, exist_ok=True)
        np.savez(
            d / "params.npz",
            id_coeff=np.zeros((1, 80), np.float32),
            exp_coeff=exp[t][None],
            scale=scale[t : t + 1],
            pose=pose[t][None],
        )
        np.save(d / "lmk_3d.npy", np.zeros((68, 3), np.float32))
    return {"exp": exp, "pose": pose, "scale": scale}


def flame_arrays(frames: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """The keys of a NeRSemble-benchmark FLAME tracking npz for ``frames``."""
    rng = np.random.default_rng(seed)
    t = len(frames)
    euler = rng.normal(scale=0.3, size=(t, 3))  # the toolkit's intrinsic XYZ Euler angles
    return {
        "expression": rng.normal(size=(t, 100)).astype(np.float32),
        "rotation": euler.astype(np.float32),
        "translation": rng.normal(size=(t, 3)).astype(np.float32),
        "rotation_matrices": euler_xyz_intrinsic_to_matrix(euler).astype(np.float32),
        "frames": np.asarray(frames, np.int32),
        "scale": np.full((1, 1), 1.05, np.float32),
        "jaw": rng.normal(size=(t, 3)).astype(np.float32),
        "neck": rng.normal(size=(t, 3)).astype(np.float32),
        "eyes": rng.normal(size=(t, 6)).astype(np.float32),
        "shape": rng.normal(size=(1, 300)).astype(np.float32),
    }


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def call_with_timeout(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``fn`` in a daemon thread; fail (rather than hang the suite) if it does not return.

    Returns fn's result, or the exception it raised (so tests can assert on it).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: B036 - handed back to the test thread
            box["value"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"call did not finish within {timeout} s (decoder hang?)")
    return box["value"]
