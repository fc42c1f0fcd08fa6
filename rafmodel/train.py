"""Training a subject's avatar from the store, with RAF (or a baseline) augmentation.

One config dataclass (:class:`TrainConfig`), one :class:`Runner` holding the data, model,
optimizer, densification strategy and loss, and a loop that logs, previews and checkpoints.

Per step: one batch of the subject's own frames; each sample's expression vector is the
augmented one (RAF swaps it for another identity's neighbour with probability p); the avatar
is deformed and posed with it and rendered into the sample's camera; the loss compares the
render with the subject's frame composited on the background colour. Averaged over samples
this is (1 - p) L_self + p L_RAF, the paper's objective.

Outputs in ``--out``: ``config.json`` (every setting, resolved), ``metrics.jsonl`` (one line per
logged step), ``previews/step_XXXXXXX.png`` (render | target), ``checkpoints/last.pt`` and
periodic ``step_XXXXXXX.pt``, ``summary.json`` at the end. Checkpoints hold only tensors and
plain values, so ``torch.load(..., weights_only=True)`` opens them, and are written atomically
(a temporary file in the same folder, flushed to disk, then renamed over the old one);
``--resume`` continues exactly (same batches, same augmentation draws, same optimizer and
densification state) and first cuts ``metrics.jsonl`` back to the checkpoint's step, so rows
logged after it and before the interruption are not repeated.

Damaged images (a chunk that does not decode, a CRC-32 that differs) stop the run with the
store's one-line :class:`rafdata.errors.CorruptImageError`; with ``skip_corrupt`` the sample is
dropped from its batch and counted (``skipped_corrupt`` in metrics.jsonl and summary.json).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rafdata.commit import TMP_MARK, atomic_write, atomic_write_text  # noqa: F401
from rafdata.errors import RafDataError
from rafmodel.avatar import (
    AvatarConfig,
    GaussianHeadAvatar,
    HullSample,
    canonical_head_radius,
    head_ellipsoid_radii,
    init_ellipsoid,
    init_from_visual_hull,
)
from rafmodel.config import CPU_DEFAULTS, GPU_DEFAULTS, TrainConfig
from rafmodel.data import (
    CorruptSkips,
    InfiniteLoader,
    SubjectDataset,
    SwapStats,
    first_corrupt,
    make_loader,
    to_unit,
)
from rafmodel.device import select_device
from rafmodel.losses import build_loss, psnr, to_host
from rafmodel.render import render, resolve_backend
from rafmodel.strategy import Strategy, make_strategy
from rafmodel.targets import composite_target, render_K

CHECKPOINT_VERSION = 2  # 2: one optimizer per Gaussian tensor (gsplat's convention)


def epochs_to_iters(epochs: int, images: int, batch_size: int) -> int:
    """Optimisation steps for ``epochs`` passes over ``images`` training images (an epoch =
    every image once) in batches of ``batch_size``; the last batch of a pass may be short."""
    return max(1, -(-int(epochs) * int(images) // int(batch_size)))


def render_size(image_hw: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(h, w) to render: the store's size scaled so its longest side is ``resolution``."""
    h, w = image_hw
    s = min(1.0, resolution / max(h, w))
    return max(8, round(h * s)), max(8, round(w * s))


class Runner:
    """Builds and runs one training job (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, warn: Callable[[str], None] = print,
                 resume: bool = False):
        self.warn = warn
        self.device = select_device(cfg.device)
        cfg.validate()
        try:
            resolve_backend(cfg.backend, self.device)  # now, not at the first render
        except ValueError as err:
            raise RafDataError(None, str(err)) from None
        self.cfg = cfg.resolved(self.device)
        self.out = Path(self.cfg.out)
        self._check_out(resume)
        state = None
        if resume:
            # A resumed run keeps the settings it was started with (data, model, loss);
            # only a new --iters applies, to extend it, and --skip-corrupt (a run stopped on
            # a damaged image is resumed with it).
            state = load_checkpoint(self.out / "checkpoints" / "last.pt")
            saved = TrainConfig.from_dict(json.loads(state["config"]))
            self.cfg = replace(saved, out=self.cfg.out,
                               iters=cfg.iters if cfg.iters is not None else saved.iters,
                               skip_corrupt=cfg.skip_corrupt)
        if resume:  # watching (TensorBoard, viewer) is this invocation's choice
            self.cfg = replace(self.cfg, tensorboard=cfg.tensorboard, viewer=cfg.viewer,
                               viewer_port=cfg.viewer_port)
        torch.manual_seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)

        c = self.cfg
        # Loader workers mark damaged images instead of raising (see SubjectDataset); this
        # process skips or raises (_next_batch).
        self.dataset = SubjectDataset(c.store, c.subject, c.augment(), split="train",
                                      cameras=c.cameras, seed=c.seed, mark_corrupt=True)
        if cfg.epochs is not None:  # iters follow from epochs once the images are counted
            self.cfg = c = self._iters_from_epochs(cfg.epochs, cfg.densify, resume)
        self.loader = InfiniteLoader(make_loader(self.dataset, batch_size=c.batch_size,
                                                 workers=c.workers, shuffle=True, seed=c.seed))
        self.height, self.width = render_size(self.dataset.image_size, c.resolution)
        self.background = torch.tensor(c.background, dtype=torch.float32, device=self.device)
        self.loss_fn, self.loss_description = build_loss(c.loss, self.device, warn)
        self.swaps = SwapStats()
        self.corrupt = CorruptSkips()
        self._xyz_lr0: float | None = None
        self.step = 0
        self.avatar_cfg = AvatarConfig(exp_dim=self.dataset.exp_dim,
                                       num_gaussians=c.num_gaussians, mlp_width=c.mlp_width)
        if state is not None:
            self._load(state)
            truncate_metrics(self.out / "metrics.jsonl", self.step)
            self._write_config()  # a new --iters or --skip-corrupt shows in config.json
        else:
            self.model = GaussianHeadAvatar(self.avatar_cfg, self._initial_cloud(),
                                            setup_device=self.device).to(self.device)
            self.optimizers = make_optimizers(self.model, c.lr_net, c.lr_preset)
            self.strategy = self._make_strategy()
            self._write_config()

    def describe(self) -> list[str]:
        """A few lines saying what this run is (the CLI prints them; config.json has all)."""
        c = self.cfg
        aug = {"raf": f"raf: p {c.p}, uniform over the {c.topk} nearest of bank {c.bank!r}"
                      if c.topk > 1 else f"raf: p {c.p}, nearest neighbour of bank {c.bank!r}",
               "vanilla": "vanilla: no augmentation",
               "noise": f"noise: N(0, {c.noise_std}^2) per dimension"}[c.aug]
        start = f"resumed at step {self.step}" if self.step else "new"
        return [
            f"run {self.out} ({start}); all settings in {self.out / 'config.json'}",
            f"subject {self.dataset.subject}: {len(self.dataset)} training images of {c.store}"
            f", rendered at {self.width}x{self.height}",
            f"aug {aug}",
            f"{c.iters} steps"
            + (f" (= {c.epochs} epochs of {len(self.dataset)} images)" if c.epochs else "")
            + f" of batch {c.batch_size} on {self.device} (renderer "
            f"{resolve_backend(c.backend, self.device)}), {self.model.num_gaussians} Gaussians "
            f"({type(self.strategy).__name__}); loss {self.loss_description}",
            "damaged images: " + ("skipped and counted" if c.skip_corrupt
                                  else "stop the run (--skip-corrupt to skip them)"),
        ]

    # -- set-up ----------------------------------------------------------------------------
    def _iters_from_epochs(self, epochs: int, densify, resume: bool) -> TrainConfig:
        """The config with ``iters = ceil(epochs * training images / batch_size)``. A new run
        derives its densification schedule from these iters (unless one was given); a resumed
        run keeps its saved schedule, as with a new ``--iters``, so it continues exactly."""
        iters = epochs_to_iters(epochs, len(self.dataset), self.cfg.batch_size)
        cfg = replace(self.cfg, iters=iters, epochs=epochs)
        return cfg if resume else replace(cfg, densify=densify).resolved(self.device)

    def _check_out(self, resume: bool) -> None:
        started = (self.out / "config.json").exists()
        if resume and not (self.out / "checkpoints" / "last.pt").exists():
            raise RafDataError(self.out, "no checkpoints/last.pt to resume from")
        if resume:  # temporaries of saves a crash interrupted: never read, so drop them
            for folder in (self.out, self.out / "checkpoints"):
                for tmp in folder.glob(f"*{TMP_MARK}*"):
                    tmp.unlink(missing_ok=True)
        if not resume and started:
            if not (self.out / "checkpoints" / "last.pt").exists():
                raise RafDataError(self.out, "holds a run that stopped before its first "
                                   "checkpoint; delete the folder or choose another --out")
            raise RafDataError(self.out, "already holds a run; pass --resume to continue it "
                               "or choose another --out")

    def _initial_cloud(self):
        """Visual hull from the masks of several views; a head-sized ellipsoid without masks."""
        c = self.cfg
        ds = self.dataset
        rng = np.random.default_rng(c.seed)
        picks = rng.choice(len(ds), size=min(c.hull_views, len(ds)), replace=False)
        items = [ds[(0, int(i))] for i in np.sort(picks)]
        bad = [int(it["image_index"]) for it in items if bool(it["corrupt"])]
        if bad and not c.skip_corrupt:
            ds.raise_corrupt(bad[0])
        items = [it for it in items if not bool(it["corrupt"])]
        if not items:
            raise RafDataError(ds.store.path, f"every image picked for the initial point cloud "
                               f"is damaged (rows {', '.join(map(str, bad))}); run `rafdata "
                               "inspect --verify`")
        scale = float(np.median([float(it["scale"]) for it in items]))
        if all(bool(it["has_mask"]) for it in items):
            views = [HullSample(mask=it["mask"][0], K=it["K"], world_to_cam=it["world_to_cam"],
                                pose=it["pose"], scale=float(it["scale"]), image=it["image"])
                     for it in items]
            try:
                return init_from_visual_hull(views, c.num_gaussians, seed=c.seed)
            except ValueError as err:
                self.warn(f"visual hull failed ({err}); starting from an ellipsoid")
        else:
            self.warn("the store has no masks for this subject: starting from a head-sized "
                      "ellipsoid, and the background will be learned into the avatar")
        r = canonical_head_radius(scale)
        t_ref = torch.stack([it["pose"][3:] for it in items]).mean(0)
        return init_ellipsoid((0.0, 0.0, 0.0), head_ellipsoid_radii(r), c.num_gaussians,
                              seed=c.seed, head_radius=r, pose_t_ref=t_ref)

    def _make_strategy(self) -> Strategy:
        try:
            return make_strategy(self.cfg.strategy, self.cfg.densify,
                                 float(self.model.head_radius), self.device)
        except ValueError as err:
            raise RafDataError(None, str(err)) from None

    def _write_config(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        info = {"train": self.cfg.to_dict(), "avatar": self.avatar_cfg.to_dict(),
                "loss": self.loss_description, "device": str(self.device),
                "strategy": type(self.strategy).__name__,
                "render_size": [self.width, self.height], "subject": self.dataset.subject,
                "train_images": len(self.dataset)}
        atomic_write_text(self.out / "config.json", json.dumps(info, indent=2))

    # -- one step --------------------------------------------------------------------------
    def _next_batch(self) -> dict:
        """The next batch without damaged-image markers; with ``skip_corrupt`` off, the first
        marker raises the store's CorruptImageError (one line naming store and row)."""
        # A whole epoch of markers in a row means no image can be read: stop, not spin.
        limit = -(-len(self.dataset) // self.cfg.batch_size) + 1
        for _ in range(limit):
            batch = next(self.loader)
            row = first_corrupt(batch)
            if row is None:
                return batch
            if not self.cfg.skip_corrupt:
                self.dataset.raise_corrupt(row)
            kept = self.corrupt.drop(batch)
            if kept is not None:
                return kept
        raise RafDataError(self.dataset.store.path, f"no readable image of subject "
                           f"{self.dataset.subject} in a whole epoch ({self.corrupt.count} "
                           "damaged samples skipped); run `rafdata inspect --verify`")

    def _target(self, batch: dict) -> torch.Tensor:
        """(B,3,h,w) frames on the background colour, at render size."""
        # The dataset serves all-ones masks where a store has no matte: compositing is then
        # a no-op, so one code path serves both.
        # Resized and composited where the render is: on a GPU this is ~0.1 ms, on the
        # host several ms per 512 px frame.
        dev = self.device
        target, _ = composite_target(to_unit(batch["image"].to(dev, non_blocking=True)),
                                     to_unit(batch["mask"].to(dev, non_blocking=True)),
                                     (self.height, self.width), self.background)
        return target

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on a batch; returns the numbers worth logging."""
        target = self._target(batch)
        renders, preds = [], []
        for b in range(target.shape[0]):
            g = self.model(batch["exp"][b].to(self.device), batch["pose"][b].to(self.device),
                           batch["scale"][b].to(self.device))
            out = render(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                         batch["world_to_cam"][b].to(self.device),
                         render_K(batch["K"][b], self.dataset.image_size, self.width,
                                  self.height).to(self.device), self.width, self.height,
                         background=self.background, backend=self.cfg.backend)
            renders.append(out)
            preds.append(out.image.permute(2, 0, 1))
        pred = torch.stack(preds)
        self.strategy.step_pre_backward(renders)
        loss, terms = self.loss_fn.terms(pred, target)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self._decay_position_lr()
        for opt in self.optimizers.values():
            opt.step()
        refined = self.strategy.step_post_backward(self.step, self.model, self.optimizers,
                                                   renders)
        with torch.no_grad():
            terms["psnr"] = psnr(pred.detach().clamp(0, 1), target).mean()
        self.swaps.update(batch["swapped"])
        self._last = (pred.detach()[0], target[0])
        return {**to_host(terms), "gaussians": refined["n"]}

    def _decay_position_lr(self) -> None:
        """3D Gaussian Splatting's schedule: the position rate falls 100x, exponentially, over
        the run (a function of the step only, so a resumed run follows the same curve)."""
        if self.cfg.lr_preset != "3dgs":
            return
        if self._xyz_lr0 is None:
            base = self.model.param_groups(self.cfg.lr_net, self.cfg.lr_preset)
            self._xyz_lr0 = next(g["lr"] for g in base if g["name"] == "xyz")
        lr0 = self._xyz_lr0
        for group in self.optimizers["xyz"].param_groups:
            group["lr"] = lr0 * 0.01 ** (self.step / max(1, self.cfg.iters))

    # -- loop ------------------------------------------------------------------------------
    def train(self, progress: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
        """Run until ``cfg.iters``; ``progress(step, logged numbers)`` after each step."""
        c = self.cfg
        t0 = time.perf_counter()
        window: list[dict[str, float]] = []
        log = (self.out / "metrics.jsonl").open("a")
        try:
            self._open_watchers()  # closed in `finally`, even if the viewer cannot start
            while self.step < c.iters:
                t_data = time.perf_counter()
                batch = self._next_batch()
                t_step = time.perf_counter()
                numbers = self.train_step(batch)
                if self._viewer is not None:
                    self._viewer.tick(self.step + 1)  # renders only what a client asked for
                t_end = time.perf_counter()
                self.step += 1
                numbers.update(data_s=t_step - t_data, step_s=t_end - t_step)
                window.append(numbers)
                if self.step % c.log_every == 0 or self.step == c.iters:
                    row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    row.update(step=self.step, swap_rate=self.swaps.pop_window(),
                               swap_rate_total=self.swaps.rate, time=time.perf_counter() - t0,
                               skipped_corrupt=self.corrupt.count)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if self._tb is not None:
                        self._tb.scalars(row, self.step)
                    window = []
                if self.step % c.preview_every == 0 or self.step == c.iters:
                    self.save_preview()
                if self.step % c.checkpoint_every == 0 or self.step == c.iters:
                    self.save_checkpoint()
                if progress is not None:
                    progress(self.step, {**numbers, "swap_rate": self.swaps.rate})
        finally:
            log.close()
            self._close_watchers()
        summary = {"steps": self.step, "seconds": time.perf_counter() - t0,
                   "swap_rate": self.swaps.rate, "gaussians": self.model.num_gaussians,
                   "skip_corrupt": self.cfg.skip_corrupt,
                   "skipped_corrupt": self.corrupt.count,
                   "corrupt_rows": sorted(self.corrupt.rows)}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    # -- outputs ---------------------------------------------------------------------------
    def save_preview(self) -> Path:
        pred, target = self._last
        both = torch.cat([pred, target], dim=2).clamp(0, 1)
        arr = (both.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        path = self.out / "previews" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        if self._tb is not None:
            self._tb.image("previews", arr, self.step)
        return path

    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as tensors and plain values."""
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": json.dumps(self.cfg.to_dict()),
            "avatar_config": json.dumps(self.avatar_cfg.to_dict()),
            "model": self.model.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "strategy": self.strategy.state_dict(),
            "loader": self.loader.state_dict(),
            "swaps": self.swaps.state_dict(),
            "corrupt": self.corrupt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # gsplat's split draws from the CUDA generator
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }

    def save_checkpoint(self) -> Path:
        folder = self.out / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state()
        # A crash mid-save never leaves a torn checkpoint under a checkpoint's name.
        atomic_torch_save(state, folder / "last.pt")
        if self.step % self.cfg.checkpoint_every == 0:
            atomic_torch_save(state, folder / f"step_{self.step:07d}.pt")
        return folder / "last.pt"

    def _load(self, state: dict[str, Any]) -> None:
        """Restore model, optimizer, strategy, loader position and RNG from a checkpoint."""
        self.avatar_cfg = AvatarConfig.from_dict(json.loads(state["avatar_config"]))
        self.model = GaussianHeadAvatar.from_state_dict(self.avatar_cfg, state["model"])
        self.model.to(self.device)
        self.optimizers = make_optimizers(self.model, self.cfg.lr_net, self.cfg.lr_preset)
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self.strategy = self._make_strategy()
        self.strategy.load_state_dict(state["strategy"])
        self.loader.load_state_dict(state["loader"])
        self.swaps.load_state_dict(state["swaps"])
        self.corrupt.load_state_dict(state.get("corrupt", {}))
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])

    # -- watching: TensorBoard and the live viewer (both None when off) --------------------
    _tb = None  # rafmodel.tensorboard.TensorBoardLog while train() runs with cfg.tensorboard
    _viewer = None  # rafmodel.viewer.Viewer while train() runs with cfg.viewer

    def _open_watchers(self) -> None:
        """Start TensorBoard logging and the viewer as the config asks (imported only then,
        so a run with both off pays nothing)."""
        if self.cfg.tensorboard and self._tb is None:
            from rafmodel.tensorboard import TensorBoardLog

            # a resumed run hides the interrupted run's events after the checkpoint
            self._tb = TensorBoardLog(self.out / "tensorboard",
                                      purge_step=self.step + 1 if self.step else None)
        if self.cfg.viewer and self._viewer is None:
            from rafmodel.viewer import Viewer

            self._viewer = Viewer.for_training(self, port=self.cfg.viewer_port)
            self.warn(f"viewer: {self._viewer.url}")

    def _close_watchers(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._viewer is not None:
            self._viewer.stop()
            self._viewer = None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, made durable, then renamed over
    ``path`` (rafdata.commit.atomic_write): readers see the old file or the whole new one,
    never a torn one; a temporary left by a crash is never read."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep only the rows of ``metrics.jsonl`` with ``step <= step`` (a resume from the
    checkpoint of ``step`` logs the later ones again), one per step (the last: files written
    before this fix may repeat steps); rewritten atomically. A torn line (the process died
    mid-write) goes too. Returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    last: dict[int, int] = {}  # step -> index of its last row (older files may repeat steps)
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            s = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if s <= step:
            last[s] = i
    keep = sorted(last.values())
    dropped = len(lines) - len(keep)
    if dropped:
        atomic_write_text(path, "".join(f"{lines[i]}\n" for i in keep))
    return dropped


def make_optimizers(model: GaussianHeadAvatar, lr_net: float,
                    preset: str) -> dict[str, torch.optim.Optimizer]:
    """One Adam per per-Gaussian tensor (keyed like ``model.gaussians``) plus ``networks``:
    gsplat's convention, which its strategies rely on; rates from ``model.param_groups``."""
    return {g["name"]: torch.optim.Adam([g], eps=1e-15)
            for g in model.param_groups(lr_net, preset)}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, loaded safely (tensors and plain values only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RafDataError(path, "no such checkpoint") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise RafDataError(path, f"not a readable rafmodel checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise RafDataError(path, "not a rafmodel checkpoint of a known version")
    return state


def load_avatar(path: str | Path, device: str | torch.device = "cpu") -> GaussianHeadAvatar:
    """The trained avatar of a checkpoint (for evaluation), in eval mode."""
    state = load_checkpoint(path)
    cfg = AvatarConfig.from_dict(json.loads(state["avatar_config"]))
    model = GaussianHeadAvatar.from_state_dict(cfg, state["model"]).to(device)
    return model.eval()


__all__ = ["CPU_DEFAULTS", "GPU_DEFAULTS", "Runner", "TrainConfig", "atomic_torch_save",
           "epochs_to_iters",
           "atomic_write_text", "load_avatar", "load_checkpoint", "make_optimizers",
           "render_size", "truncate_metrics"]
