"""Side-by-side videos (H.264 mp4) and PNG frame grids of the evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from rafmodel.evaluate.config import LABEL_HEIGHT, MIN_PANEL_HEIGHT, VIDEO_FPS


def _font():
    try:
        from PIL import ImageFont

        return ImageFont.load_default()
    except Exception:  # noqa: BLE001 - any font problem: PIL's built-in bitmap font
        return None


def _to_uint8(img: Tensor | None, width: int, height: int) -> np.ndarray:
    """(3, h, w) float -> (height, width, 3) uint8; None -> a grey panel."""
    if img is None:
        return np.full((height, width, 3), 96, np.uint8)
    if img.shape[1:] != (height, width):
        img = F.interpolate(img[None].float(), size=(height, width), mode="bilinear",
                            align_corners=False)[0]
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def compose_row(panels: list[Tensor | None], labels: list[str], width: int,
                height: int) -> np.ndarray:
    """Panels side by side under a label strip: (h', W', 3) uint8 with even sides (H.264).

    Panels are scaled (nearest, an integer factor) so they are at least
    :data:`MIN_PANEL_HEIGHT` pixels high; None panels are grey ("no image").
    """
    k = max(1, math.ceil(MIN_PANEL_HEIGHT / height))
    pw = width * k
    tiles = []
    font = _font()
    for img, label in zip(panels, labels, strict=True):
        arr = _to_uint8(img, width, height)
        arr = np.repeat(np.repeat(arr, k, axis=0), k, axis=1)
        strip = Image.new("RGB", (pw, LABEL_HEIGHT), (0, 0, 0))
        ImageDraw.Draw(strip).text((2, 1), label if img is not None else f"{label} (none)",
                                   fill=(255, 255, 255), font=font)
        tiles.append(np.concatenate([np.asarray(strip), arr], axis=0))
    row = np.concatenate(tiles, axis=1)
    pad_h, pad_w = row.shape[0] % 2, row.shape[1] % 2
    if pad_h or pad_w:
        row = np.pad(row, ((0, pad_h), (0, pad_w), (0, 0)))
    return row


class Mp4Writer:
    """H.264 mp4 (libx264, yuv420p) written frame by frame with PyAV; size from frame one."""

    def __init__(self, path: Path, fps: int = VIDEO_FPS):
        self.path = path
        self.fps = fps
        self.container = None
        self.stream = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        import av

        if self.container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), mode="w")
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = frame.shape[1], frame.shape[0]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "18", "preset": "veryfast"}
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None


def safe_name(label: str) -> str:
    """A label as a file name: characters other than letters, digits, - _ . become _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "run"
