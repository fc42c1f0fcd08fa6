"""One rendering interface, two backends: gsplat on CUDA, our PyTorch rasterizer elsewhere.

Pixel convention. The store's K (and ``render``'s ``K`` argument) is OpenCV's: the *centre*
of pixel (col, row) projects to (col, row). gsplat, and our rasterizer which follows it, put
pixel centres at (col + 0.5, row + 0.5). ``render`` therefore adds 0.5 to cx and cy before
calling a backend; callers always pass OpenCV intrinsics and never shift them themselves.

View-space gradients for densification. ``RenderOutput.means2d`` retains its gradient: after
``loss.backward()``, ``out.means2d.grad`` is dLoss/d(projected centre), (N, 2) in pixels, on
both backends (gsplat's strategies additionally scale it by (W/2, H/2) to NDC units).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

from rafmodel.config import BACKENDS


@dataclass
class RenderOutput:
    """One rendered view of N Gaussians.

    image: (H, W, C) float, composited over the background.
    alpha: (H, W, 1) accumulated opacity, 1 - final transmittance.
    means2d: (N, 2) projected centres in pixels, gsplat convention (OpenCV + 0.5); retains its
        gradient, so ``means2d.grad`` is the view-space gradient after ``backward()``.
    radii: (N,) int32 pixel radius of the screen-space box (the larger of its x and y
        half-sizes, gsplat's opacity-aware 3-sigma extent); 0 = culled / not visible.
    """

    image: Tensor
    alpha: Tensor
    means2d: Tensor
    radii: Tensor


@dataclass(frozen=True)
class Splats:
    """N 3D Gaussians as the backends take them.

    means (N, 3) world units; quats (N, 4) wxyz, need not be normalised; scales (N, 3) linear
    standard deviations; opacities (N,) in [0, 1]; colors (N, C), C >= 1.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor


@dataclass(frozen=True)
class View:
    """One pinhole camera as the backends take it: world_to_cam (4, 4); K (3, 3) in gsplat's
    convention (pixel centres at +0.5, see :func:`opencv_to_gsplat_K`); width, height px."""

    world_to_cam: Tensor
    K: Tensor
    width: int
    height: int


@dataclass(frozen=True)
class Limits:
    """Culling and blur shared by both backends (gsplat's defaults): Gaussians nearer than
    ``near_plane`` or beyond ``far_plane`` (camera depth) are culled; ``eps2d`` px² is added to
    the projected covariance."""

    near_plane: float = 0.01
    far_plane: float = 1e10
    eps2d: float = 0.3


def gsplat_available() -> bool:
    """gsplat is installed (looked up, never imported: importing it may compile CUDA)."""
    return importlib.util.find_spec("gsplat") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'gsplat' for CUDA tensors with gsplat installed, else 'torch'.

    Raises ValueError for an unknown name or for 'gsplat' without CUDA tensors / gsplat.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown render backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "gsplat" if device.type == "cuda" and gsplat_available() else "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise ValueError("render backend 'gsplat' needs CUDA tensors; use 'torch' on CPU")
        if not gsplat_available():
            raise ValueError("render backend 'gsplat' asked for, but gsplat is not installed")
    return backend


def opencv_to_gsplat_K(K: Tensor) -> Tensor:
    """(3, 3) OpenCV intrinsics (pixel centres at integers) -> gsplat's (centres at +0.5)."""
    shift = torch.zeros_like(K)
    shift[0, 2] = 0.5
    shift[1, 2] = 0.5
    return K + shift  # not in place: K may be a leaf that requires grad


def render(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    world_to_cam: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
    backend: str = "auto",
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> RenderOutput:
    """Render N 3D Gaussians into one pinhole camera, differentiably.

    means (N, 3) world units; quats (N, 4) wxyz, need not be normalised; scales (N, 3) linear
    standard deviations (not log), world units; opacities (N,) in [0, 1]; colors (N, C), C >= 1
    (RGB or a feature vector); world_to_cam (4, 4); K (3, 3) OpenCV convention (see module
    doc); width, height in pixels; background (C,) or None (= zeros).
    backend: "auto" (gsplat for CUDA tensors when installed, else torch), "torch", "gsplat".
    Gaussians with camera depth below ``near_plane`` (behind the camera included) are culled.
    """
    n = means.shape[0]
    if means.shape != (n, 3) or quats.shape != (n, 4) or scales.shape != (n, 3):
        raise ValueError(f"means/quats/scales must be (N,3)/(N,4)/(N,3); got "
                         f"{tuple(means.shape)}/{tuple(quats.shape)}/{tuple(scales.shape)}")
    if opacities.shape != (n,) or colors.ndim != 2 or colors.shape[0] != n:
        raise ValueError(f"opacities must be (N,) and colors (N, C) for N={n}; got "
                         f"{tuple(opacities.shape)} and {tuple(colors.shape)}")
    if world_to_cam.shape != (4, 4) or K.shape != (3, 3):
        raise ValueError(f"world_to_cam must be (4, 4) and K (3, 3); got "
                         f"{tuple(world_to_cam.shape)} and {tuple(K.shape)}")
    if background is not None and background.shape != (colors.shape[1],):
        raise ValueError(f"background must be ({colors.shape[1]},); got {tuple(background.shape)}")

    which = resolve_backend(backend, means.device)
    splats = Splats(means, quats, scales, opacities, colors)
    view = View(world_to_cam, opencv_to_gsplat_K(K), width, height)
    limits = Limits(near_plane, far_plane, eps2d)
    if which == "gsplat":
        from .gsplat_backend import render_gsplat

        return render_gsplat(splats, view, background, limits)

    from .torch_rasterizer import rasterize

    image, alpha, means2d, radii = rasterize(splats, view, background, limits)
    if means2d.requires_grad:
        means2d.retain_grad()
    return RenderOutput(image=image, alpha=alpha, means2d=means2d, radii=radii.amax(dim=-1))


__all__ = ["BACKENDS", "Limits", "RenderOutput", "Splats", "View", "gsplat_available",
           "opencv_to_gsplat_K", "render", "resolve_backend"]
