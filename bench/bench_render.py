"""Rasterizer: our tile-based PyTorch rasterizer vs the per-pixel reference, and training-size
forward+backward times on CPU."""

from __future__ import annotations

import sys

import numpy as np
import torch
from common import machine, table, timed

from rafmodel.render import opencv_to_gsplat_K, render
from rafmodel.render.reference import reference_render


def random_scene(n: int, size: int, seed: int = 0) -> dict:
    """n Gaussians in a box in front of a camera at the origin, some overlapping."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([2.0, 2.0, 1.0])
    means[:, 2] += 3.0
    return dict(
        means=means, quats=torch.rand(n, 4, generator=g) - 0.5,
        scales=0.01 + 0.08 * torch.rand(n, 3, generator=g),
        opacities=0.1 + 0.9 * torch.rand(n, generator=g), colors=torch.rand(n, 3, generator=g),
        world_to_cam=torch.eye(4),
        K=torch.tensor([[1.2 * size, 0, (size - 1) / 2], [0, 1.2 * size, (size - 1) / 2],
                        [0, 0, 1]]),
        width=size, height=size)


def head_scene(n: int, size: int, seed: int = 0) -> dict:
    """A training-like scene: n small Gaussians on a head-sized ellipsoid filling the view."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    means = d * torch.tensor([0.09, 0.12, 0.10]) + 0.01 * torch.randn(n, 3, generator=g)
    w2c = torch.eye(4)
    w2c[2, 3] = 0.6
    return dict(
        means=means, quats=torch.randn(n, 4, generator=g),
        scales=0.002 + 0.006 * torch.rand(n, 3, generator=g),
        opacities=0.1 + 0.8 * torch.rand(n, generator=g), colors=torch.rand(n, 3, generator=g),
        world_to_cam=w2c,
        K=torch.tensor([[2.2 * size, 0, (size - 1) / 2], [0, 2.2 * size, (size - 1) / 2],
                        [0, 0, 1]]),
        width=size, height=size)


def _fwd_bwd(scene: dict, reps: int) -> tuple[float, float, float]:
    """Best-of-reps (forward s, backward s, fraction of pixels with alpha > 0.5)."""
    fwd, bwd = [], []
    for _ in range(reps):
        leaves = {k: scene[k].clone().requires_grad_()
                  for k in ("means", "quats", "scales", "opacities", "colors")}
        s = dict(scene, **leaves)
        t_f, out = timed(lambda s=s: render(**s, backend="torch"))
        t_b, _ = timed(lambda out=out: out.image.sum().backward())
        fwd.append(t_f)
        bwd.append(t_b)
    return min(fwd), min(bwd), float((out.alpha > 0.5).float().mean())


def run(quick: bool = False) -> str:
    """The `## Rasterizer` section of docs/benchmarks.md."""
    threads = torch.get_num_threads()
    rows = []
    for n, size in ([(300, 32)] if quick else [(300, 32), (2000, 64)]):
        scene = random_scene(n, size)
        with torch.no_grad():
            t_ours, out = min((timed(lambda sc=scene: render(**sc, backend="torch"))
                               for _ in range(3)), key=lambda r: r[0])
        s = {k: v.numpy() if torch.is_tensor(v) else v for k, v in scene.items()}
        s["K"] = opencv_to_gsplat_K(scene["K"]).numpy()
        t_ref, (ref_img, _) = timed(lambda s=s: reference_render(**s))
        diff = float(np.abs(out.image.numpy() - ref_img).max())
        rows.append([f"{n} Gaussians, {size}x{size}", f"{t_ours * 1e3:.0f} ms",
                     f"{t_ref * 1e3:.0f} ms", f"{t_ref / t_ours:.0f}x", f"{diff:.1e}"])
    out_md = ["## Rasterizer", "",
              f"Machine: {machine()}; torch {torch.__version__}, {threads} intra-op threads.", "",
              "Forward only, random scene, our tile rasterizer (float32) vs the per-pixel "
              "NumPy reference (float64) in the same process:", "",
              table(["scene", "ours", "reference", "speed-up", "max abs diff"], rows), ""]

    train_rows = []
    sizes = [(5000, 128)] if quick else [(20000, 128), (20000, 256)]
    thread_opts = sorted({threads, 1}, reverse=True)
    for n, size in sizes:
        scene = head_scene(n, size)
        for th in thread_opts:
            torch.set_num_threads(th)
            try:
                f, b, cover = _fwd_bwd(scene, reps=1 if quick else 3)
            finally:
                torch.set_num_threads(threads)
            train_rows.append([f"{n} Gaussians, {size}x{size}", th, f"{f:.2f} s", f"{b:.2f} s",
                               f"{f + b:.2f} s", f"{cover:.0%}"])
    out_md += ["Forward + backward (autograd) on CPU, a head-like scene filling the view "
               f"(best of {1 if quick else 3}):", "",
               table(["scene", "threads", "forward", "backward", "total", "pixels covered"],
                     train_rows), ""]
    return "\n".join(out_md)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
