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


def crop_padded(image: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Crop box (x, y, w, h) of an image; parts outside the frame are zero."""
    out = np.zeros((h, w, *image.shape[2:]), image.dtype)
    H, W = image.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
    return out


# Term counts of Cheung et al. (2004)'s polynomial colour correction (colour-science's
# matrix_augmented_Cheung2004), the form of NeRSemble's color_calibration.json matrices.
CCM_TERMS = (3, 4, 5, 7, 8, 10, 11, 14, 16, 17, 19, 20, 22, 35)


def cheung2004_expand(rgb: np.ndarray, terms: int) -> np.ndarray:
    """(N, 3) RGB -> (N, terms) polynomial expansion of Cheung et al. (2004)."""
    if terms not in CCM_TERMS:
        raise ValueError(f"no Cheung 2004 expansion has {terms} terms; expected one of "
                         f"{CCM_TERMS}")
    r, g, b = (rgb[:, i] for i in range(3))
    one = np.ones_like(r)
    quad = [r * g, r * b, g * b, r * r, g * g, b * b]
    cubic = [r * r * g, g * g * b, b * b * r]
    cubic2 = [r * r * b, g * g * r, b * b * g]
    cubes = [r**3, g**3, b**3]
    table = {
        3: [r, g, b], 4: [r, g, b, one], 5: [r, g, b, r * g * b, one],
        7: [r, g, b, *quad[:3], one], 8: [r, g, b, *quad[:3], r * g * b, one],
        10: [r, g, b, *quad, one], 11: [r, g, b, *quad, r * g * b, one],
        14: [r, g, b, *quad, r * g * b, *cubes, one],
        16: [r, g, b, *quad, r * g * b, *cubic, *cubes],
        17: [r, g, b, *quad, r * g * b, *cubic, *cubes, one],
        19: [r, g, b, *quad, r * g * b, *cubic, *cubic2, *cubes],
        20: [r, g, b, *quad, r * g * b, *cubic, *cubic2, *cubes, one],
        22: [r, g, b, *quad, r * g * b, *cubic, *cubic2, *cubes,
             r * r * g * b, r * g * g * b, r * g * b * b],
        35: [r, g, b, *quad, r * g * b, *cubic, *cubic2, *cubes,
             r**3 * g, r**3 * b, g**3 * r, g**3 * b, b**3 * r, b**3 * g,
             r * r * g * b, r * g * g * b, r * g * b * b,
             r * r * g * g, r * r * b * b, g * g * b * b, r**4, g**4, b**4, one],
    }
    return np.stack(table[terms], axis=1)


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """The sRGB decoding curve (IEC 61966-2-1) on [0, 1] values."""
    return np.where(v <= 0.04045, v / 12.92, ((np.maximum(v, 0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`srgb_to_linear`; negative values keep their sign (as colour does)."""
    a = np.abs(x)
    return np.sign(x) * np.where(a <= 0.0031308, a * 12.92, 1.055 * a ** (1 / 2.4) - 0.055)


def color_correct(rgb: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """NeRSemble's colour correction of (H, W, 3) uint8 RGB, as its toolkit applies it.

    ccm: (3, T) polynomial colour-correction matrix of one camera (color_calibration.json;
    T in :data:`CCM_TERMS`, 3 = a plain 3x3 matrix). The frame is decoded from sRGB to linear
    values, expanded (:func:`cheung2004_expand`), multiplied by ``ccm``, encoded back and
    rounded (the toolkit truncates; the two differ by less than one level).
    """
    ccm = np.asarray(ccm, np.float64)
    lut = srgb_to_linear(np.arange(256) / 255.0)
    lin = lut[rgb.reshape(-1, 3)]
    out = cheung2004_expand(lin, ccm.shape[1]) @ ccm.T
    out = linear_to_srgb(out) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(rgb.shape)


def project(points: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, 2) (col, row) of world points (N, 3) with a (3, 3) K and a (4, 4)
    world_to_cam, OpenCV pixel centres."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    cam = p @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    uvw = cam @ np.asarray(K, dtype=np.float64).T
    return uvw[:, :2] / uvw[:, 2:3]
