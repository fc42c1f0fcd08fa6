"""Crop and resize keep intrinsics exact: a projected point lands on the same content."""

from __future__ import annotations

import numpy as np
import pytest

from rafdata.geometry import (
    CCM_TERMS,
    ImageTransform,
    cheung2004_expand,
    color_correct,
    crop_padded,
    linear_to_srgb,
    project,
    srgb_to_linear,
)


def ramp(width: int, height: int) -> np.ndarray:
    """R channel = column, G channel = row: pixel content encodes its source coordinates."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8)


def bilinear(img: np.ndarray, u: float, v: float) -> np.ndarray:
    x0, y0 = int(np.floor(u)), int(np.floor(v))
    a, b = u - x0, v - y0
    p = img.astype(np.float64)
    return ((1 - a) * (1 - b) * p[y0, x0] + a * (1 - b) * p[y0, x0 + 1]
            + (1 - a) * b * p[y0 + 1, x0] + a * b * p[y0 + 1, x0 + 1])


@pytest.mark.parametrize(
    "crop,size",
    [(None, (100, 75)), ((20, 10, 160, 120), None), ((20, 10, 160, 120), (80, 60)),
     ((30, 40, 120, 160), (90, 120)), ((10, 5, 200, 150), (300, 225))],
)
def test_projection_lands_on_same_content(crop, size):
    W, H = 200, 150
    K = np.array([[180.0, 0, 97.3], [0, 185.0, 71.8], [0, 0, 1]])
    w2c = np.eye(4)
    w2c[2, 3] = 2.0
    rng = np.random.default_rng(0)
    points = rng.uniform([-0.5, -0.4, -0.3], [0.5, 0.4, 0.3], size=(40, 3))
    tf = ImageTransform(crop, size)
    src = ramp(W, H)
    out = tf.apply(src)
    assert out.shape[1::-1] == tf.output_size(W, H)
    K2 = tf.apply_K(K, W, H)
    uv_src = project(points, K, w2c)
    uv_out = project(points, K2, w2c)
    checked = 0
    for (u, v), (u2, v2) in zip(uv_src, uv_out, strict=True):
        # stay away from borders, where resampling sees padding
        if 3 <= u2 < out.shape[1] - 4 and 3 <= v2 < out.shape[0] - 4 and 0 < u < W - 1:
            got = bilinear(out, u2, v2)
            assert got[0] == pytest.approx(u, abs=0.6) and got[1] == pytest.approx(v, abs=0.6)
            checked += 1
    assert checked > 10


def test_crop_pads_outside_frame():
    img = np.full((4, 5, 3), 9, np.uint8)
    out = crop_padded(img, -2, 1, 5, 4)
    assert out.shape == (4, 5, 3)
    assert (out[:, :2] == 0).all() and (out[:3, 2:] == 9).all() and (out[3] == 0).all()


def test_color_correct_identity_and_swap():
    rgb = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)
    assert (color_correct(rgb, np.eye(3)) == rgb).all()  # every level survives the round trip
    swap = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
    assert color_correct(rgb[:1, :1], swap).tolist() == [[rgb[0, 0, ::-1].tolist()]]
    assert (color_correct(rgb, np.hstack([np.eye(3), np.zeros((3, 1))])) == rgb).all()


def test_color_correct_works_in_linear_light():
    """A gain of 2 on linear values is not a gain of 2 on the stored (sRGB) levels."""
    rgb = np.array([[[50, 100, 20]]], np.uint8)
    out = color_correct(rgb, 2 * np.eye(3)).astype(float)[0, 0]
    lin = srgb_to_linear(rgb[0, 0] / 255.0)
    np.testing.assert_allclose(out, np.rint(linear_to_srgb(2 * lin) * 255))
    assert out[0] < 2 * 50 - 20  # gamma-encoded: ~1.37x, not 2x
    np.testing.assert_allclose(srgb_to_linear(linear_to_srgb(np.linspace(0, 1, 41))),
                               np.linspace(0, 1, 41), atol=1e-12)
    assert linear_to_srgb(np.array([-0.25]))[0] == -linear_to_srgb(np.array([0.25]))[0]


def test_cheung2004_expansion_and_matrix_match_colour_science():
    """Values of colour-science's documented examples (matrix_augmented_Cheung2004 and
    apply_matrix_colour_correction_Cheung2004)."""
    rgb = np.array([[0.17224810, 0.09170660, 0.06416938]])
    np.testing.assert_allclose(cheung2004_expand(rgb, 5)[0],
                               [0.1722481, 0.0917066, 0.0641693, 0.0010136, 1.0], atol=1e-7)
    ccm = np.array([[1.05263767, 0.13780789, -0.22763399],
                    [0.07395843, 1.02939945, -0.1060115],
                    [0.05725508, -0.20526336, 1.10151945]])
    np.testing.assert_allclose(cheung2004_expand(rgb, 3) @ ccm.T,
                               [[0.1793456, 0.1003392, 0.0617218]], atol=1e-7)
    for terms in CCM_TERMS:
        e = cheung2004_expand(rgb, terms)
        assert e.shape == (1, terms)
        np.testing.assert_allclose(e[0, :3], rgb[0])
    with pytest.raises(ValueError, match="6 terms"):
        cheung2004_expand(rgb, 6)
