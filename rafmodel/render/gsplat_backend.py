"""The CUDA backend: gsplat's ``rasterization`` (imported here, lazily: it compiles on first use)."""

from __future__ import annotations

from torch import Tensor

from . import RenderOutput


def render_gsplat(
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
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> RenderOutput:
    """Render with gsplat; arguments as ``rafmodel.render.render`` except that K is already in
    gsplat's convention (pixel centres at +0.5)."""
    from gsplat import rasterization

    image, alpha, meta = rasterization(
        means, quats, scales, opacities, colors,
        viewmats=world_to_cam[None], Ks=K[None], width=width, height=height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, packed=False,
        backgrounds=None if background is None else background[None],
        rasterize_mode="classic",
    )
    src = meta["means2d"]  # (1, N, 2): the tensor the rasterizer actually read
    means2d = src[0]
    if src.requires_grad:
        # means2d is a view taken after the forward, so autograd never fills its .grad; copy
        # the gradient that reaches `src` into it, accumulating like retain_grad() does.
        means2d.retain_grad()

        def _store(grad: Tensor) -> None:
            g = grad[0].detach()
            means2d.grad = g.clone() if means2d.grad is None else means2d.grad + g

        src.register_hook(_store)
    radii = meta["radii"][0]
    if radii.ndim == 2:  # gsplat >= 1.5: per-axis (x, y) radii
        radii = radii.amax(dim=-1)
    return RenderOutput(image=image[0], alpha=alpha[0], means2d=means2d, radii=radii)
