"""The renderer: CPU rasterizer vs a per-pixel reference, gradients, conventions, gsplat on CUDA."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from rafmodel.render import Splats, View, opencv_to_gsplat_K, render, resolve_backend
from rafmodel.render.reference import reference_render
from rafmodel.render.torch_rasterizer import composite, project, rasterize


def backend_inputs(scene: dict) -> tuple[Splats, View]:
    """A make_scene dict as the backends take it (K shifted to gsplat's convention)."""
    splats = Splats(*(scene[k] for k in ("means", "quats", "scales", "opacities", "colors")))
    view = View(scene["world_to_cam"], opencv_to_gsplat_K(scene["K"]), scene["width"],
                scene["height"])
    return splats, view


def make_scene(seed: int, n: int = 120, width: int = 40, height: int = 32,
               dtype: torch.dtype = torch.float32, channels: int = 3) -> dict:
    """Random Gaussians around a camera looking down +z from a random pose.

    Mixed on purpose: overlapping blobs, some partly or wholly off-screen, some behind the
    camera, strongly anisotropic scales, and a dense opaque cluster that drives pixels to
    the T < 1e-4 early stop.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    n_dense = n // 3
    cam = torch.stack([(rand(n) - 0.5) * 2.4, (rand(n) - 0.5) * 2.0, 0.5 + rand(n) * 3.0], 1)
    cam[: n // 10, 2] = -rand(n // 10) * 2.0  # behind the camera
    cam[-n_dense:] = torch.tensor([0.1, -0.1, 2.0]) + (rand(n_dense, 3) - 0.5) * 0.2
    scales = 0.01 + rand(n, 3) * 0.15
    scales[: n // 4, 0] *= 0.1  # thin, anisotropic
    opac = 0.05 + 0.95 * rand(n)
    opac[-n_dense:] = 0.9 + 0.099 * rand(n_dense)  # opaque: transmittance collapses
    quats = rand(n, 4) - 0.5

    # A random rigid camera: world = R^T (cam - t), so world_to_cam = [R | t].
    axis = rand(3) - 0.5
    angle = 0.4 * rand(1)
    kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    kx = kx / axis.norm()
    R = torch.eye(3, dtype=torch.float64) + torch.sin(angle) * kx + (1 - torch.cos(angle)) * kx @ kx
    t = rand(3) - 0.5
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3], w2c[:3, 3] = R, t
    means = (cam - t) @ R  # R^T (cam - t), row-wise
    f = 0.9 * width
    K = torch.tensor([[f, 0, (width - 1) / 2 + 1.3], [0, f * 1.05, (height - 1) / 2 - 0.7],
                      [0, 0, 1]], dtype=torch.float64)
    scene = dict(means=means, quats=quats, scales=scales, opacities=opac,
                 colors=rand(n, channels), world_to_cam=w2c, K=K)
    scene = {k: v.to(dtype) for k, v in scene.items()}
    return dict(scene, width=width, height=height)


def reference(scene: dict, background=None) -> tuple[np.ndarray, np.ndarray]:
    """The per-pixel reference, fed OpenCV K shifted to gsplat's convention as render does."""
    s = {k: v.numpy() if torch.is_tensor(v) else v for k, v in scene.items()}
    s["K"] = opencv_to_gsplat_K(scene["K"]).numpy()
    return reference_render(**s, background=background)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_per_pixel_reference(seed: int) -> None:
    scene = make_scene(seed, n=150 if seed < 3 else 400, width=45, height=37)
    bg = torch.tensor([0.2, 0.5, 0.9])
    out = render(**scene, background=bg, backend="torch")
    ref_img, ref_alpha = reference(scene, background=bg.numpy())
    assert out.image.shape == (37, 45, 3) and out.alpha.shape == (37, 45, 1)
    assert np.abs(out.image.numpy() - ref_img).max() < 1e-4
    assert np.abs(out.alpha.numpy() - ref_alpha).max() < 1e-4
    # The scene really exercises what it is meant to: culling and saturated pixels.
    assert (out.radii == 0).any() and (out.radii > 0).sum() > len(out.radii) // 2
    assert ref_alpha.max() > 1 - 1.1e-4


def test_dense_scene_and_chunking() -> None:
    """Many opaque Gaussians per tile: the early stop must cross chunk boundaries exactly."""
    scene = make_scene(7, n=600, width=32, height=32)
    ref_img, ref_alpha = reference(scene)
    for chunk in (5, 64, 1000):
        img, alpha, _, _ = rasterize(*backend_inputs(scene), chunk=chunk)
        assert np.abs(img.numpy() - ref_img).max() < 1e-4
        assert np.abs(alpha.numpy() - ref_alpha).max() < 1e-4


def test_feature_channels_and_odd_size() -> None:
    scene = make_scene(4, n=80, width=19, height=23, channels=5)
    out = render(**scene, backend="torch")
    ref_img, ref_alpha = reference(scene)
    assert out.image.shape == (23, 19, 5)
    assert np.abs(out.image.numpy() - ref_img).max() < 1e-4


def test_gradients_match_finite_differences() -> None:
    """Every input that carries a gradient, against central differences (float64)."""
    scene = make_scene(5, n=6, width=12, height=10, dtype=torch.float64)
    # Keep the tiny scene away from the non-differentiable places (culling, 1/255, clamps).
    scene["means"] = torch.tensor([[0.0, 0.0, 2.0], [0.1, 0.05, 2.5], [-0.1, 0.0, 3.0],
                                   [0.05, -0.1, 2.2], [-0.05, 0.08, 2.8], [0.0, 0.02, 3.5]],
                                  dtype=torch.float64)
    scene["world_to_cam"] = torch.eye(4, dtype=torch.float64)
    scene["scales"] = 0.03 + scene["scales"] * 0.3
    scene["opacities"] = 0.3 + 0.5 * scene["opacities"]
    names = ["means", "quats", "scales", "opacities", "colors"]
    weights = torch.rand(10, 12, 3, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    bg = torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64, requires_grad=True)

    def fn(*args):
        s = dict(scene, **dict(zip(names, args, strict=True)))
        out = render(**s, background=bg, backend="torch")
        return (out.image * weights).sum() + out.alpha.sum()

    inputs = tuple(scene[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_means2d_retains_view_space_gradient() -> None:
    scene = make_scene(6, n=50)
    scene["means"].requires_grad_()
    out = render(**scene, backend="torch")
    out.image.sum().backward()
    g = out.means2d.grad
    assert g is not None and g.shape == (50, 2)
    assert torch.all(g[out.radii == 0] == 0)  # culled: no gradient
    assert g[out.radii > 0].abs().sum() > 0
    assert scene["means"].grad is not None and torch.isfinite(scene["means"].grad).all()


def test_opencv_pixel_convention() -> None:
    """A tiny Gaussian at OpenCV pixel (col, row) lights up exactly that pixel brightest."""
    w, h = 20, 16
    K = torch.tensor([[50.0, 0, 9.5], [0, 50.0, 7.5], [0, 0, 1]])  # centre of a 20x16 image
    for col, row in [(3, 4), (10, 7), (17, 12)]:
        z = 2.0
        x, y = (col - K[0, 2]) * z / K[0, 0], (row - K[1, 2]) * z / K[1, 1]
        out = render(torch.tensor([[x, y, z]]), torch.tensor([[1.0, 0, 0, 0]]),
                     torch.full((1, 3), 0.004), torch.tensor([0.9]), torch.ones(1, 1),
                     torch.eye(4), K, w, h, backend="torch")
        lum = out.image[..., 0]
        assert divmod(int(lum.argmax()), w) == (row, col)
        # Symmetric about that pixel's centre: the left and right neighbours match.
        assert torch.isclose(lum[row, col - 1], lum[row, col + 1], atol=1e-6)
        assert torch.allclose(out.means2d[0], torch.tensor([col + 0.5, row + 0.5]), atol=1e-4)


def test_background_compositing_and_culling() -> None:
    K = torch.tensor([[30.0, 0, 7.5], [0, 30.0, 7.5], [0, 0, 1]])
    bg = torch.tensor([0.1, 0.2, 0.3])
    # One Gaussian behind the camera, one in front but looking away is the same thing: z < 0.
    means = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, 0.005]])
    out = render(means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.5),
                 torch.ones(2), torch.ones(2, 3), torch.eye(4), K, 16, 16, background=bg,
                 backend="torch")
    assert torch.all(out.radii == 0)
    assert torch.allclose(out.image, bg.expand(16, 16, 3)) and torch.all(out.alpha == 0)

    # A half-transparent wall in front: image = o * colour + (1 - o) * background.
    out = render(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0, 0, 0]]),
                 torch.tensor([[50.0, 50.0, 0.01]]), torch.tensor([0.4]),
                 torch.tensor([[1.0, 0.0, 0.5]]), torch.eye(4), K, 16, 16, background=bg,
                 backend="torch")
    expect = 0.4 * torch.tensor([1.0, 0.0, 0.5]) + 0.6 * bg
    assert torch.allclose(out.image, expect.expand(16, 16, 3), atol=1e-4)
    assert torch.allclose(out.alpha, torch.full((16, 16, 1), 0.4), atol=1e-4)


def test_backend_choice_and_errors() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("gsplat", cpu)
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("opengl", cpu)
    scene = make_scene(0, n=5)
    with pytest.raises(ValueError, match="background"):
        render(**scene, background=torch.zeros(4))


def test_gsplat_adapter_with_a_stand_in(monkeypatch) -> None:
    """The gsplat adapter's plumbing (shapes, K, view-space gradient) without CUDA: a stand-in
    module with gsplat's `rasterization` signature and output layout, run by our rasterizer."""
    from rafmodel.render.gsplat_backend import render_gsplat

    seen = {}

    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                      near_plane, far_plane, eps2d, packed, backgrounds, rasterize_mode):
        seen.update(K=Ks[0].clone(), packed=packed)
        bg = None if backgrounds is None else backgrounds[0]
        p = project(means, quats, scales, opacities, viewmats[0], Ks[0], width, height)
        src = p.means2d[None]  # like gsplat: the batched tensor is what compositing reads
        img, alpha = composite(src[0], p.conics, p.depths, p.radii, opacities, colors,
                               width, height, bg)
        return img[None], alpha[None], {"means2d": src, "radii": p.radii[None]}

    monkeypatch.setitem(sys.modules, "gsplat", types.SimpleNamespace(rasterization=rasterization))
    scene = make_scene(2, n=60)
    scene["means"].requires_grad_()
    K_gs = opencv_to_gsplat_K(scene["K"])
    out = render_gsplat(*backend_inputs(scene), background=torch.ones(3))
    ref = render(**scene, background=torch.ones(3), backend="torch")
    assert seen["packed"] is False and torch.equal(seen["K"], K_gs)
    assert out.image.shape == (32, 40, 3) and out.radii.shape == (60,)
    assert torch.allclose(out.image, ref.image) and torch.equal(out.radii, ref.radii)
    out.image.sum().backward()
    ref.image.sum().backward()
    assert out.means2d.grad is not None and out.means2d.grad.shape == (60, 2)
    assert torch.allclose(out.means2d.grad, ref.means2d.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and gsplat)")
def test_torch_backend_matches_gsplat_on_cuda() -> None:
    """Same scene through gsplat and our rasterizer (both float32 on the GPU): images, alphas,
    radii and gradients agree."""
    pytest.importorskip("gsplat")
    for seed in range(3):
        scene = make_scene(seed, n=3000, width=96, height=80)
        scene = {k: v.cuda() if torch.is_tensor(v) else v for k, v in scene.items()}
        bg = torch.tensor([0.2, 0.4, 0.6], device="cuda")
        outs, grads = [], []
        for backend in ("gsplat", "torch"):
            leaves = {k: scene[k].clone().requires_grad_()
                      for k in ("means", "quats", "scales", "opacities", "colors")}
            out = render(**dict(scene, **leaves), background=bg, backend=backend)
            (out.image * torch.linspace(0, 1, 3, device="cuda")).sum().backward()
            outs.append(out)
            grads.append({k: v.grad for k, v in leaves.items()})
        a, b = outs
        assert (a.image - b.image).abs().max() < 1e-3
        assert (a.alpha - b.alpha).abs().max() < 1e-3
        assert (a.radii > 0).eq(b.radii > 0).float().mean() > 0.999
        vis = (a.radii > 0) & (b.radii > 0)
        assert torch.allclose(a.means2d[vis], b.means2d[vis], atol=1e-3)
        assert torch.allclose(a.means2d.grad[vis], b.means2d.grad[vis], atol=1e-3, rtol=1e-2)
        for k in grads[0]:
            ga, gb = grads[0][k], grads[1][k]
            assert torch.allclose(ga, gb, atol=1e-3 * gb.abs().max().item() + 1e-5), k
