"""Crop, resize and colour-correct images while keeping their intrinsics exact.

Convention: K maps camera coordinates to pixels with OpenCV pixel centres, i.e. the centre of
pixel (col, row) is at (col, row) and the image spans [-0.5, W - 0.5]. Resampling uses the
half-pixel-centre mapping of PIL/OpenCV (edges map to edges), so after scaling by s a point
at u lands at (u + 0.5) * s - 0.5. Cropping at (x, y) shifts by (-x, -y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImageTransform:
    """Crop (in source pixels, may extend past the frame: padded with zeros) then resize.

    crop: (x, y, w, h) or None for the whole frame; size: output (w, h) or None for no resize.
    """

    crop: tuple[int, int, int, int] | None = None
    size: tuple[int, int] | None = None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) of the stored image for a (width, height) source frame."""
        if self.size is not None:
            return self.size
        if self.crop is not None:
            return self.crop[2], self.crop[3]
        return width, height

    def apply_K(self, K: np.ndarray, width: int, height: int) -> np.ndarray:
        """Intrinsics (3,3) of the transformed image from those of a (width, height) frame."""
        K = np.array(K, np.float64, copy=True)
        cw, ch = width, height
        if self.crop is not None:
            x, y, cw, ch = self.crop
            K[0, 2] -= x
            K[1, 2] -= y
        if self.size is not None:
            sx, sy = self.size[0] / cw, self.size[1] / ch
            K[0, 0] *= sx
            K[0, 1] *= sx
            K[1, 1] *= sy
            K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
            K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return K

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Transform an (H,W,3) or (H,W) uint8 image."""
        if self.crop is not None:
            image = crop_padded(image, *self.crop)
        if self.size is not None and (image.shape[1], image.shape[0]) != tuple(self.size):
            # Bilinear with PIL's antialiasing support: exact on linear ramps, no ringing.
            image = np.asarray(
                Image.fromarray(image).resize(tuple(self.size), Image.Resampling.BILINEAR)
            )
        return image

    @property
    def identity(self) -> bool:
        return self.crop is None and self.size is None


def crop_padded(image: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Crop box (x, y, w, h) of an image; parts outside the frame are zero."""
    out = np.zeros((h, w, *image.shape[2:]), image.dtype)
    H, W = image.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
    return out


def color_correct(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 3x3 colour matrix to (H,W,3) uint8 RGB as ``rgb @ matrix.T`` on [0,1] values."""
    out = rgb.astype(np.float32) @ np.asarray(matrix, np.float32).T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def project(points: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, 2) (col, row) of world points (N, 3) with a (3, 3) K and a (4, 4)
    world_to_cam, OpenCV pixel centres."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    cam = p @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    uvw = cam @ np.asarray(K, dtype=np.float64).T
    return uvw[:, :2] / uvw[:, 2:3]
