"""Render targets: frames resized and composited the same way for training and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from rafmodel.targets import composite_target, render_K


def test_render_K_follows_the_resize():
    K = np.array([[100.0, 0, 47.5], [0, 100.0, 63.5], [0, 0, 1]])
    K2 = render_K(K, (128, 96), 48, 64).numpy()  # half size
    np.testing.assert_allclose(K2, [[50, 0, 23.5], [0, 50, 31.5], [0, 0, 1]], atol=1e-5)
    assert torch.equal(render_K(torch.from_numpy(K), (128, 96), 48, 64), torch.from_numpy(K2))


def test_composite_puts_the_background_outside_the_matte():
    image = torch.full((1, 3, 8, 8), 0.2)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # left half is the head
    target, m = composite_target(image, mask, (4, 4), torch.tensor([1.0, 0.0, 0.5]))
    assert target.shape == (1, 3, 4, 4) and m.shape == (1, 1, 4, 4)
    assert torch.allclose(target[0, :, :, :2], torch.tensor(0.2))
    assert torch.allclose(target[0, :, :, 2:], torch.tensor([1.0, 0.0, 0.5])[:, None, None])
    same, none = composite_target(image, None, (4, 4), torch.zeros(3))
    assert none is None and torch.allclose(same, torch.tensor(0.2))
