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


CALIBRATION_TOLERANCE = 1e-3  # max |R^T R - I| entry of a stored camera rotation (float32 round-off)


def check_calibration(K: np.ndarray, world_to_cam: np.ndarray) -> str | None:
    """What is wrong with one camera's calibration, as a short phrase, or None if it is usable.

    K: (3, 3) intrinsics in pixels; world_to_cam: (4, 4) rigid transform, OpenCV axes. A usable
    camera has a finite, invertible K with positive focal lengths (K[0, 0], K[1, 1] > 0) and
    last row [0, 0, 1], and a finite world_to_cam whose 3x3 part is a rotation (orthonormal
    within :data:`CALIBRATION_TOLERANCE`, det +1) and whose last row is [0, 0, 0, 1].
    An all-zero or singular matrix passes every shape check but makes training divide by
    zero or fit garbage, so every reader of calibration asks this one function.
    """
    K = np.asarray(K)
    w2c = np.asarray(world_to_cam)
    if K.shape != (3, 3):
        return f"intrinsics have shape {K.shape}, expected (3, 3)"
    if w2c.shape != (4, 4):
        return f"world_to_cam has shape {w2c.shape}, expected (4, 4)"
    with np.errstate(all="ignore"):  # a float128 beyond float64 becomes inf: that is the check
        K = K.astype(np.float64)
        w2c = w2c.astype(np.float64)
    if not np.all(np.isfinite(K)):
        return "intrinsics hold NaN or inf values"
    fx, fy = K[0, 0], K[1, 1]
    if not (fx > 0 and fy > 0):
        return f"intrinsics have focal lengths fx={fx:g}, fy={fy:g}; both must be positive"
    if np.abs(K[2] - [0.0, 0.0, 1.0]).max() > 1e-6:
        return f"intrinsics have last row {_row(K[2])}, expected [0, 0, 1]"
    # Relative test: a K whose rows are (nearly) dependent cannot be inverted to cast rays.
    if 1.0 / np.linalg.cond(K) < 1e-12:
        return "intrinsics are singular (not invertible)"
    if not np.all(np.isfinite(w2c)):
        return "world_to_cam holds NaN or inf values"
    if np.abs(w2c[3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-6:
        return f"world_to_cam has last row {_row(w2c[3])}, expected [0, 0, 0, 1]"
    R = w2c[:3, :3]
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > CALIBRATION_TOLERANCE:
        return (f"world_to_cam rotation is not orthonormal (max |R^T R - I| = {err:.3g}, "
                f"tolerance {CALIBRATION_TOLERANCE:g})")
    det = float(np.linalg.det(R))
    if det < 0:
        return f"world_to_cam rotation has det {det:.3g}, expected +1 (a mirror, not a rotation)"
    return None


def _row(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def project(points: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, 2) (col, row) of world points (N, 3) with a (3, 3) K and a (4, 4)
    world_to_cam, OpenCV pixel centres."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    cam = p @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    uvw = cam @ np.asarray(K, dtype=np.float64).T
    return uvw[:, :2] / uvw[:, 2:3]
