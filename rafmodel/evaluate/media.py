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
    """H.264 mp4 written frame by frame, its size taken from the first frame.

    The encoding itself is the project's one mp4 writer, :class:`rafdata.synth.writer.
    VideoWriter` (PyAV, libx264, yuv420p, 25 fps, crf 12); this only opens it lazily, so a
    driver without frames leaves no empty file.
    """

    def __init__(self, path: Path, fps: int = VIDEO_FPS):
        self.path = path
        self.fps = fps  # the shared writer's rate (25 fps) is the project's one frame rate
        self.writer = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        if self.writer is None:
            from rafdata.synth.writer import VideoWriter

            self.writer = VideoWriter(self.path, frame.shape[1], frame.shape[0])
        self.writer.write(frame)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def safe_name(label: str) -> str:
    """A label as a file name: characters other than letters, digits, - _ . become _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "run"
