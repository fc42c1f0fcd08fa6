"""The CUDA backend: gsplat's ``rasterization`` (imported here, lazily: it compiles on first use)."""

from __future__ import annotations

from torch import Tensor

from . import Limits, RenderOutput, Splats, View


def render_gsplat(splats: Splats, view: View, background: Tensor | None = None,
                  limits: Limits | None = None) -> RenderOutput:
    """Render with gsplat; as ``rafmodel.render.render``, from its validated inputs (K of
    ``view`` already in gsplat's convention)."""
    from gsplat import rasterization

    s, limits = splats, limits or Limits()
    image, alpha, meta = rasterization(
        s.means, s.quats, s.scales, s.opacities, s.colors,
        viewmats=view.world_to_cam[None], Ks=view.K[None], width=view.width,
        height=view.height, near_plane=limits.near_plane, far_plane=limits.far_plane,
        eps2d=limits.eps2d, packed=False,
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
