"""Densification and pruning of the avatar's Gaussians (3DGS's adaptive density control).

Two strategies with one interface, the :class:`Strategy` protocol (``step_pre_backward``,
``step_post_backward``, ``state_dict``, ``load_state_dict``); :func:`make_strategy` picks one:

- :class:`GsplatStrategy`: gsplat's own ``DefaultStrategy`` driven on our model (the default
  on CUDA when gsplat is installed);
- :class:`SimpleStrategy`: our device-agnostic equivalent (the default elsewhere).

SimpleStrategy is a re-implementation of what gsplat's ``DefaultStrategy`` does, on our model
(:class:`rafmodel.avatar.GaussianHeadAvatar`, whose per-Gaussian tensors live in the
``nn.ParameterDict`` ``model.gaussians``) and our renderer output
(:class:`rafmodel.render.RenderOutput`). It runs on CPU and CUDA alike.

Every ``refine_every`` steps between ``refine_start`` and ``refine_stop``:

- Gaussians whose mean view-space gradient is high are grown: *cloned* (an exact copy) when
  small, *split* into two samples drawn from themselves, with scales / 1.6, when large;
- Gaussians that are almost transparent or too large are pruned;

and every ``reset_every`` steps all opacities are clamped down to ``2 * prune_opacity`` so
that useless Gaussians fade out and get pruned.

Units. ``grow_grad2d`` is in gsplat's units: the pixel-space gradient ``means2d.grad`` (what
our renderer returns) times (W/2, H/2), i.e. the gradient w.r.t. NDC-like coordinates, so
one threshold (3DGS/gsplat: 0.0002) suits any image size. Scale thresholds are in head radii
(``model.head_radius``): gsplat's are fractions of the scene extent (0.01 to grow, 0.1 to
prune), and for a NeRSemble-like rig whose cameras sit ~1 m from the head (extent ~1.1 m) that
is 1.1 cm and 11 cm, about 0.1 and 1 head radii of 10 cm.

Optimizer state. Every change to the rows of a parameter is applied to its Adam state too
(``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``): surviving rows keep theirs, new rows start
at zero, pruned rows go; the Parameter objects are replaced both in ``model.gaussians`` and in
the optimizer's ``param_groups`` (the state moves with them). Optimizers are found by
parameter identity, so any grouping works.

Training loop order (as gsplat): ``out = render(...)``; ``strategy.step_pre_backward(out)``;
``loss.backward()``; ``strategy.step_post_backward(step, model, optimizers, out)``;
``optimizer.step()``; ``optimizer.zero_grad()``. Stepping the optimizer before
``step_post_backward`` also works (``means2d.grad`` stays on ``out``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rafmodel.config import STRATEGIES, DensifyConfig
from rafmodel.rotations import quat_to_matrix


@runtime_checkable
class Strategy(Protocol):
    """What the trainer asks of a densification strategy (as gsplat's ``strategy/base.py``
    ``Strategy`` does for gsplat's), in the trainer's terms: render outputs of our renderer
    and our model rather than gsplat's ``params`` / ``info`` dicts.

    Per step: ``step_pre_backward(out)`` before ``loss.backward()``; then
    ``step_post_backward(step, model, optimizers, out)``, which may replace the model's
    per-Gaussian parameters (and their optimizer state) and returns counts for logging:
    ``cloned``, ``split``, ``pruned``, ``reset`` (0/1) and ``n`` (Gaussians after). ``out`` is
    one :class:`rafmodel.render.RenderOutput` or a list, one per view rendered this step.
    ``state_dict`` / ``load_state_dict`` carry what an exact resume needs (tensors and plain
    values only: checkpoints load with ``weights_only=True``).
    """

    cfg: DensifyConfig

    def step_pre_backward(self, out: Any) -> None: ...

    def step_post_backward(self, step: int, model: nn.Module, optimizers: Any,
                           out: Any) -> dict[str, int]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _optimizer_list(optimizers: Any) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    if isinstance(optimizers, Mapping):
        return list(optimizers.values())
    return list(optimizers)


RowFn = Callable[[str, Tensor], Tensor]


def retain_means2d_grad(out: Any) -> None:
    """Have ``means2d`` of each render output (one or a list) keep its gradient."""
    for o in out if isinstance(out, Sequence) else [out]:
        if o.means2d.requires_grad and not o.means2d.is_leaf:
            o.means2d.retain_grad()


def update_rows(model: nn.Module, optimizers: Any, param_fn: RowFn, state_fn: RowFn,
                keys: Iterable[str] | None = None) -> None:
    """Replace per-Gaussian parameters and their optimizer state consistently.

    For each key of ``model.gaussians`` (or ``keys``): the new Parameter holds
    ``param_fn(key, old_data)``; in every optimizer holding the old Parameter, it takes its
    place in ``param_groups`` and each per-row state tensor ``v`` (first dim N) becomes
    ``state_fn(key, v)``; scalars such as Adam's ``step`` are kept.
    """
    opts = _optimizer_list(optimizers)
    for key in list(model.gaussians.keys() if keys is None else keys):
        old = model.gaussians[key]
        n_old = old.shape[0]
        new = nn.Parameter(param_fn(key, old.detach()), requires_grad=old.requires_grad)
        for opt in opts:
            for group in opt.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is not old:
                        continue
                    group["params"][i] = new
                    st = opt.state.pop(old, None)
                    if st is not None:
                        opt.state[new] = {
                            k: state_fn(key, v) if isinstance(v, Tensor) and v.ndim > 0
                            and v.shape[0] == n_old else v
                            for k, v in st.items()}
        model.gaussians[key] = new


class SimpleStrategy:
    """Clone / split / prune / opacity reset for :class:`GaussianHeadAvatar` (CPU or CUDA).

    Keeps per-Gaussian statistics since the last refinement: ``grad2d`` (N,) summed gradient
    norms (gsplat units), ``count`` (N,) views in which the Gaussian was visible (radius > 0),
    ``radii`` (N,) max screen radius as a fraction of max(W, H).
    """

    def __init__(self, cfg: DensifyConfig | None = None) -> None:
        self.cfg = cfg or DensifyConfig()
        self.grad2d: Tensor | None = None
        self.count: Tensor | None = None
        self.radii: Tensor | None = None
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.resets = 0

    # -- persistence (for exact resume)

    def state_dict(self) -> dict[str, Any]:
        return {"grad2d": self.grad2d, "count": self.count, "radii": self.radii,
                "generator": self.generator.get_state(), "resets": self.resets}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.grad2d, self.count, self.radii = state["grad2d"], state["count"], state["radii"]
        self.generator.set_state(state["generator"])
        self.resets = int(state["resets"])

    # -- hooks

    def step_pre_backward(self, out: Any) -> None:
        """Make sure the projected means keep their gradient (our renderer already does)."""
        retain_means2d_grad(out)

    @torch.no_grad()
    def step_post_backward(self, step: int, model: nn.Module, optimizers: Any,
                           out: Any) -> dict[str, int]:
        """Accumulate statistics from ``out`` (one RenderOutput or a list, one per rendered
        view of the current N Gaussians), then refine / reset if this step is due.

        Returns counts for logging: cloned, split, pruned, reset (0/1), n (after).
        """
        c = self.cfg
        info = {"cloned": 0, "split": 0, "pruned": 0, "reset": 0}
        if step >= c.refine_stop:
            info["n"] = model.num_gaussians
            return info
        self._accumulate(model, out)
        if step > c.refine_start and step % c.refine_every == 0:
            info.update(self.refine(model, optimizers, step))
        if c.reset_every > 0 and step > 0 and step % c.reset_every == 0:
            self.reset_opacity(model, optimizers)
            info["reset"] = 1
        info["n"] = model.num_gaussians
        return info

    # -- statistics

    def _ensure_state(self, n: int, device: torch.device) -> None:
        if self.grad2d is None or self.grad2d.shape[0] != n:
            self.grad2d = torch.zeros(n, device=device)
            self.count = torch.zeros(n, device=device)
            self.radii = torch.zeros(n, device=device)

    def _accumulate(self, model: nn.Module, out: Any) -> None:
        n = model.num_gaussians
        self._ensure_state(n, model.gaussians["xyz"].device)
        for o in out if isinstance(out, Sequence) else [out]:
            grad = o.means2d.grad
            if grad is None:
                continue  # nothing was visible, or the loss did not depend on this view
            if grad.shape[0] != n:
                raise ValueError(f"render output has {grad.shape[0]} Gaussians, model {n}: "
                                 "pass the output of this step's render")
            h, w = o.image.shape[0], o.image.shape[1]
            g = (grad * grad.new_tensor([w / 2.0, h / 2.0])).norm(dim=-1)
            # Dense updates, not boolean-mask indexing: the same numbers (invisible rows add 0,
            # their radius is 0) without the device syncs that masks cost on CUDA.
            vis = o.radii > 0
            self.grad2d += torch.where(vis, g, torch.zeros_like(g))
            self.count += vis
            self.radii = torch.maximum(self.radii, o.radii.float() / max(w, h))

    # -- operations

    def refine(self, model: nn.Module, optimizers: Any, step: int = 0) -> dict[str, int]:
        """Grow then prune now, from the statistics gathered so far; resets them."""
        c = self.cfg
        n = model.num_gaussians
        self._ensure_state(n, model.gaussians["xyz"].device)
        r = float(model.head_radius)
        avg = self.grad2d / self.count.clamp_min(1)
        high = avg > c.grow_grad2d
        big = model.gaussians["log_scales"].exp().amax(dim=1) > c.grow_scale3d * r
        clone, split = high & ~big, high & big
        if c.max_gaussians is not None:
            # Each candidate adds one Gaussian (a clone) or split_samples - 1 (a split).
            cost = max(1, c.split_samples - 1)
            budget = max(0, c.max_gaussians - n)
            cand = torch.nonzero(high, as_tuple=True)[0]
            if cand.numel() * cost > budget:
                order = cand[avg[cand].argsort(descending=True)]
                keep = torch.zeros_like(high)
                keep[order[: budget // cost]] = True
                clone, split = clone & keep, split & keep
        # Screen-size pruning uses statistics of the rows before growth; carry the flags.
        too_big_2d = self.radii > c.prune_scale2d if c.prune_scale2d is not None else \
            torch.zeros_like(high)
        n_clone, n_split = int(clone.sum()), int(split.sum())
        if n_clone:
            self.clone(model, optimizers, clone)
            too_big_2d = torch.cat([too_big_2d, too_big_2d.new_zeros(n_clone)])
        if n_split:
            split_mask = torch.cat([split, split.new_zeros(n_clone)])
            self.split(model, optimizers, split_mask)
            too_big_2d = torch.cat([too_big_2d[~split_mask],
                                    too_big_2d.new_zeros(n_split * c.split_samples)])

        opac = torch.sigmoid(model.gaussians["opacity_logit"])
        prune = (opac < c.prune_opacity) | too_big_2d
        if self.resets > 0:
            prune |= model.gaussians["log_scales"].exp().amax(dim=1) > c.prune_scale3d * r
        n_pruned = int(prune.sum())
        if n_pruned >= model.num_gaussians:
            prune[:] = False  # never empty the model: an empty cloud cannot learn back
            n_pruned = 0
        if n_pruned:
            self.prune(model, optimizers, prune)
        self.grad2d = self.count = self.radii = None
        self._ensure_state(model.num_gaussians, model.gaussians["xyz"].device)
        return {"cloned": n_clone, "split": n_split, "pruned": n_pruned}

    def clone(self, model: nn.Module, optimizers: Any, mask: Tensor) -> None:
        """Append an exact copy of the Gaussians in ``mask`` (N,) bool; new state rows 0."""
        sel = torch.nonzero(mask, as_tuple=True)[0]
        update_rows(model, optimizers,
                    lambda k, p: torch.cat([p, p[sel]]),
                    lambda k, v: torch.cat([v, v.new_zeros((sel.numel(),) + v.shape[1:])]))

    def split(self, model: nn.Module, optimizers: Any, mask: Tensor) -> None:
        """Replace each Gaussian in ``mask`` by ``split_samples`` children drawn from it
        (positions ~ N(mean, cov)), scales divided by ``split_shrink``; the others keep their
        rows (in order) and the children are appended with zero optimizer state."""
        c = self.cfg
        sel = torch.nonzero(mask, as_tuple=True)[0]
        rest = torch.nonzero(~mask, as_tuple=True)[0]
        m, k = sel.numel(), c.split_samples
        g = model.gaussians
        std = g["log_scales"][sel].exp()  # (m, 3) canonical units
        rot = quat_to_matrix(g["rotation"][sel])  # (m, 3, 3)
        z = torch.randn(k, m, 3, generator=self.generator).to(std)
        offsets = torch.einsum("mij,kmj->kmi", rot, z * std)
        children = {
            "xyz": (g["xyz"][sel][None] + offsets).reshape(k * m, 3),
            "log_scales": (g["log_scales"][sel] - math.log(c.split_shrink)).repeat(k, 1),
        }

        def param_fn(key: str, p: Tensor) -> Tensor:
            new = children.get(key)
            if new is None:
                new = p[sel].repeat((k,) + (1,) * (p.ndim - 1))
            return torch.cat([p[rest], new.to(p)])

        update_rows(model, optimizers, param_fn,
                    lambda key, v: torch.cat([v[rest], v.new_zeros((k * m,) + v.shape[1:])]))

    def prune(self, model: nn.Module, optimizers: Any, mask: Tensor) -> None:
        """Remove the Gaussians in ``mask`` (N,) bool, with their optimizer state rows."""
        keep = torch.nonzero(~mask, as_tuple=True)[0]
        update_rows(model, optimizers, lambda k, p: p[keep], lambda k, v: v[keep])

    def reset_opacity(self, model: nn.Module, optimizers: Any) -> None:
        """Clamp opacities to at most 2 * prune_opacity; zero their optimizer state (gsplat)."""
        v = 2.0 * self.cfg.prune_opacity
        cap = math.log(v / (1.0 - v))
        update_rows(model, optimizers, lambda k, p: p.clamp_max(cap),
                    lambda k, s: torch.zeros_like(s), keys=["opacity_logit"])
        self.resets += 1


class GsplatStrategy:
    """gsplat's ``DefaultStrategy`` (clone / split / prune) on :class:`GaussianHeadAvatar`.

    gsplat names the per-Gaussian tensors ``means``, ``scales`` (log), ``quats`` and
    ``opacities`` (logits) and wants one optimizer per tensor; our model's keys map onto those
    (:attr:`GSPLAT_NAMES`), the others (``features``, ``color_logit``) ride along, and the
    optimizers must be a dict keyed like ``model.gaussians`` with one single-parameter group
    each (what :func:`rafmodel.train.make_optimizers` builds). Scene scale is the head radius,
    so ``DensifyConfig``'s thresholds in head radii pass through unchanged.

    Each step's views (a list of :class:`RenderOutput`, one per sample, all of one size) are
    handed to gsplat as one batch of ``n_cameras`` views, the way gsplat's own trainer renders a
    batch, so its gradient normalisation applies as written.

    Public gsplat API only. A ``DefaultStrategy`` holds the settings and makes the running
    state (``initialize_state``); the step itself follows ``DefaultStrategy.step_post_backward``
    of gsplat 1.5.3 rule for rule (statistics, the grow and prune decisions, when they run),
    and every change to the Gaussians is made by gsplat's public operations
    (``gsplat.strategy.ops``: ``duplicate``, ``split``, ``remove``, ``reset_opa``), which carry
    its split sampling and optimizer-state handling. Driving the step here, rather than through
    ``DefaultStrategy.step_post_backward``, is what lets each step report what it did without
    wrapping gsplat's private ``_grow_gs`` / ``_prune_gs``.

    Opacity reset. gsplat 1.5.3 tests ``step % reset_every == 0 & step > 0``, which Python
    reads as a chained comparison ending in ``0 > 0``: the reset never runs. This class runs
    ``reset_opa`` at 3DGS's schedule.

    Importing gsplat's strategy module compiles nothing, so this class also runs on a CPU
    (the tests drive it with our rasterizer's output).
    """

    GSPLAT_NAMES = {"xyz": "means", "log_scales": "scales", "rotation": "quats",
                    "opacity_logit": "opacities"}

    def __init__(self, cfg: DensifyConfig | None = None, head_radius: float = 1.0) -> None:
        from gsplat.strategy import DefaultStrategy

        self.cfg = c = cfg or DensifyConfig()
        if c.max_gaussians is not None:
            raise ValueError("gsplat's DefaultStrategy has no cap on the number of Gaussians; "
                             "use the simple strategy with max_gaussians")
        never = 2**62
        self.inner = DefaultStrategy(
            prune_opa=c.prune_opacity, grow_grad2d=c.grow_grad2d, grow_scale3d=c.grow_scale3d,
            prune_scale3d=c.prune_scale3d,
            prune_scale2d=c.prune_scale2d if c.prune_scale2d is not None else 0.15,
            refine_scale2d_stop_iter=c.refine_stop if c.prune_scale2d is not None else 0,
            refine_start_iter=c.refine_start, refine_stop_iter=c.refine_stop,
            refine_every=c.refine_every, reset_every=c.reset_every or never)
        self.state: dict[str, Any] = self.inner.initialize_state(scene_scale=float(head_radius))
        self.resets = 0

    # -- persistence (for exact resume)

    def state_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.state.items() if k != "scene_scale"},
                "resets": self.resets}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self.state:
            if k != "scene_scale":
                self.state[k] = state.get(k)
        self.resets = int(state["resets"])

    # -- name mapping

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {self.GSPLAT_NAMES.get(k, k): p for k, p in model.gaussians.items()}

    def _optimizers(self, model: nn.Module, optimizers: Any) -> dict[str, torch.optim.Optimizer]:
        if not isinstance(optimizers, Mapping):
            raise TypeError("GsplatStrategy needs a dict of optimizers, one per Gaussian tensor")
        out = {}
        for key, p in model.gaussians.items():
            if not p.requires_grad:
                continue
            opt = optimizers.get(key)
            if opt is None or len(opt.param_groups) != 1 or \
                    opt.param_groups[0]["params"] != [p]:
                raise ValueError(f"optimizers[{key!r}] must hold model.gaussians[{key!r}] "
                                 "alone, in one parameter group (gsplat's convention)")
            out[self.GSPLAT_NAMES.get(key, key)] = opt
        return out

    def _write_back(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        for key in list(model.gaussians.keys()):
            model.gaussians[key] = params[self.GSPLAT_NAMES.get(key, key)]

    @staticmethod
    def _info(out: Any) -> dict[str, Any] | None:
        """One gsplat ``info`` dict (unpacked, C views) from our per-view outputs."""
        views = [o for o in (out if isinstance(out, Sequence) else [out])
                 if o.means2d.grad is not None]
        if not views:
            return None  # nothing visible, or the loss ignored every view
        h, w = views[0].image.shape[:2]
        if any(o.image.shape[:2] != (h, w) for o in views):
            raise ValueError("all views of one step must have the same size")
        means2d = torch.stack([o.means2d.detach() for o in views])
        # gsplat reads .grad of info["means2d"]; the gradients were averaged over the views by
        # the loss, which is what gsplat's n_cameras factor undoes.
        means2d.grad = torch.stack([o.means2d.grad for o in views])
        radii = torch.stack([o.radii for o in views])
        return {"means2d": means2d, "radii": torch.stack([radii, radii], dim=-1),
                "width": w, "height": h, "n_cameras": len(views), "gaussian_ids": None}

    # -- DefaultStrategy's rules (gsplat 1.5.3, unpacked views, means2d gradients)

    def _update_state(self, params: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        """Add this step's view-space gradient norms (NDC units), visibility counts and (with
        screen-size rules on) screen radii to the running state."""
        g, st = self.inner, self.state
        grads = info["means2d"].grad.clone()
        grads[..., 0] *= info["width"] / 2.0 * info["n_cameras"]
        grads[..., 1] *= info["height"] / 2.0 * info["n_cameras"]
        n = len(params["means"])
        if st["grad2d"] is None:
            st["grad2d"] = torch.zeros(n, device=grads.device)
        if st["count"] is None:
            st["count"] = torch.zeros(n, device=grads.device)
        if g.refine_scale2d_stop_iter > 0 and st["radii"] is None:
            st["radii"] = torch.zeros(n, device=grads.device)
        sel = (info["radii"] > 0.0).all(dim=-1)  # (C, N)
        ids = torch.where(sel)[1]
        norms = grads[sel].norm(dim=-1)
        st["grad2d"].index_add_(0, ids, norms)
        st["count"].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        if g.refine_scale2d_stop_iter > 0:
            radii = info["radii"][sel].max(dim=-1).values
            st["radii"][ids] = torch.maximum(
                st["radii"][ids], radii / float(max(info["width"], info["height"])))

    def _grow(self, params: dict[str, nn.Parameter], opts: dict[str, torch.optim.Optimizer],
              step: int) -> tuple[int, int]:
        """Clone small Gaussians with high mean gradient, then split large ones."""
        from gsplat.strategy.ops import duplicate, split

        g, st = self.inner, self.state
        grads = st["grad2d"] / st["count"].clamp_min(1)
        high = grads > g.grow_grad2d
        small = torch.exp(params["scales"]).max(dim=-1).values \
            <= g.grow_scale3d * st["scene_scale"]
        dupli = high & small
        to_split = high & ~small
        if step < g.refine_scale2d_stop_iter:
            to_split |= st["radii"] > g.grow_scale2d
        n_dupli, n_split = int(dupli.sum()), int(to_split.sum())
        if n_dupli:
            duplicate(params=params, optimizers=opts, state=st, mask=dupli)
        # clones are appended after the originals and are never split in the same step
        to_split = torch.cat([to_split, to_split.new_zeros(n_dupli)])
        if n_split:
            split(params=params, optimizers=opts, state=st, mask=to_split,
                  revised_opacity=g.revised_opacity)
        return n_dupli, n_split

    def _prune(self, params: dict[str, nn.Parameter], opts: dict[str, torch.optim.Optimizer],
               step: int) -> int:
        """Remove nearly transparent Gaussians, and (after the first reset period) big ones."""
        from gsplat.strategy.ops import remove

        g, st = self.inner, self.state
        prune = torch.sigmoid(params["opacities"].flatten()) < g.prune_opa
        if step > g.reset_every:
            too_big = torch.exp(params["scales"]).max(dim=-1).values \
                > g.prune_scale3d * st["scene_scale"]
            if step < g.refine_scale2d_stop_iter:
                too_big |= st["radii"] > g.prune_scale2d
            prune |= too_big
        n_prune = int(prune.sum())
        if n_prune:
            remove(params=params, optimizers=opts, state=st, mask=prune)
        return n_prune

    # -- hooks

    def step_pre_backward(self, out: Any) -> None:
        """Make sure the projected means keep their gradient (our renderer already does)."""
        retain_means2d_grad(out)

    @torch.no_grad()
    def step_post_backward(self, step: int, model: nn.Module, optimizers: Any,
                           out: Any) -> dict[str, int]:
        """As :meth:`SimpleStrategy.step_post_backward`, by gsplat's ``DefaultStrategy`` rules.

        A step in which no Gaussian was visible adds no statistics and refines nothing.
        """
        from gsplat.strategy.ops import reset_opa

        c, g = self.cfg, self.inner
        counts = {"cloned": 0, "split": 0, "pruned": 0, "reset": 0}
        gs_info = self._info(out)
        if step < g.refine_stop_iter and gs_info is not None:
            params, opts = self._params(model), self._optimizers(model, optimizers)
            self._update_state(params, gs_info)
            if step > g.refine_start_iter and step % g.refine_every == 0 \
                    and step % g.reset_every >= g.pause_refine_after_reset:
                counts["cloned"], counts["split"] = self._grow(params, opts, step)
                counts["pruned"] = self._prune(params, opts, step)
                for key in ("grad2d", "count", "radii"):
                    if self.state.get(key) is not None:
                        self.state[key].zero_()
                if params["means"].is_cuda:
                    torch.cuda.empty_cache()  # as gsplat: the old tensors' memory goes back
            if c.reset_every > 0 and step > 0 and step % c.reset_every == 0:
                reset_opa(params=params, optimizers=opts, state=self.state,
                          value=2.0 * c.prune_opacity)
                self.resets += 1
                counts["reset"] = 1
            self._write_back(model, params)
        return {**counts, "n": model.num_gaussians}


def make_strategy(name: str, cfg: DensifyConfig, head_radius: float,
                  device: torch.device) -> Strategy:
    """'auto' -> gsplat's DefaultStrategy on CUDA when gsplat is installed, else ours.

    Raises ValueError for an unknown name or 'gsplat' without gsplat installed.
    """
    from rafmodel.render import gsplat_available

    if name not in STRATEGIES:
        raise ValueError(f"unknown densification strategy {name!r}; expected one of "
                         f"{STRATEGIES}")
    if name == "auto":
        name = "gsplat" if device.type == "cuda" and gsplat_available() \
            and cfg.max_gaussians is None else "simple"
    if name == "gsplat":
        if not gsplat_available():
            raise ValueError("densification strategy 'gsplat' asked for, but gsplat is not "
                             "installed")
        return GsplatStrategy(cfg, head_radius)
    return SimpleStrategy(cfg)


__all__ = ["STRATEGIES", "DensifyConfig", "GsplatStrategy", "SimpleStrategy", "Strategy",
           "make_strategy", "update_rows"]
