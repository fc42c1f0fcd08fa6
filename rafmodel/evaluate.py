"""Evaluation of trained avatars: self-driving, cross-driving, videos and a synthetic benchmark.

``evaluate(runs, store, cfg)`` loads one or more runs of ``rafmodel train`` and measures:

Self-driving
    Each run's subject is rendered from its own tracked coefficients of its held-out
    sequence (FREE, never trained on) into every stored camera (or ``cfg.cameras``) and
    compared with the real frames, resized to the run's render size and composited on the
    run's background colour with their matte, exactly as training saw its targets. PSNR and
    SSIM are averaged over the head matte when the store has mattes (full-frame values are
    reported beside them); LPIPS-VGG over the whole composited frame when VGG16 weights exist.

Cross-driving
    The avatar is driven by the held-out sequences of other identities (``cfg.drivers``;
    default all with held-out data). Pose: the driver's *rotation* with the subject's own mean
    translation and median scale, so the head stays where the avatar's cameras expect it (a
    driver's translation is in its own capture's world frame, and its scale is its head size:
    applied to another subject they would push the head off-centre or resize it). The paper
    transfers the driver's expression and pose; rotation is the part of pose that carries
    over. Rendered from the subject's frontal camera (serial 222200037 when present, else the
    first of ``cfg.cameras`` / the subject's cameras). Side-by-side mp4 videos (driver | GT |
    one column per run) and a PNG grid of chosen frames are written.

    AED / APD (``cfg.regressor``): mean absolute difference per dimension (L1 averaged over
    dimensions, then over frames) between the coefficients that drove the render (the driver's
    stored expression; the pose actually rendered) and the regressor's read-back from the
    rendered frame. Emotion similarity (``cfg.emotion``): cosine similarity of a feature
    extractor's vectors of the driver's real frame and the rendered frame.

Synthetic ground truth
    When the store was made from ``rafdata synth`` data (``Store.synthetic``), the generator's
    manifest holds every identity's coefficients, so the subject's synthetic head can be
    rendered with the driver's coefficients and the same pose and camera: a ground-truth image
    for every cross-driven frame. It uses the generator's *noise-free* coefficients of the
    driver's frames (expression and rotation; translation and scale as for the avatar): what
    the driver really did, as self-driving's real frames show what the subject really did.
    The avatar receives the stored (tracked) ones, which carry the synth's tracker noise
    (``SynthConfig.noise``, 0.01 per dimension by default), reported per driver as
    ``driver_noise_exp_l1``. That noise is not negligible in pixels: rendering a subject's
    head with its tracked instead of its true coefficients loses ~10 dB of PSNR at 64x80
    (measured: ~22-24 dB vs ~33 dB against the stored frame), so cross-driving GT PSNR has a
    ceiling well below self-driving's cap. The generator also gives a coefficient read-back
    without a regressor: each avatar frame is matched (mean absolute pixel error) against the
    ground-truth renders of all evaluated frames of that driver and the true coefficients of
    the best match are compared with those of the frame (``readback_exp_l1``,
    ``readback_pose_l1``, L1 per dimension; ``readback_hit`` = share matched to its own
    frame). It is only as fine as the set of candidate frames (``--frames``).

Outputs in ``cfg.out`` (default ``RUN/eval`` for one run, ``PARENT/eval`` for several):
``metrics.json`` (one run) or ``{label}/metrics.json`` (several), ``summary.json``,
``videos/{subject}_by_{driver}.mp4`` and ``grid_{subject}.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from rafdata.errors import RafDataError
from rafdata.progress import NullProgress, Progress
from rafdata.store import Store
from rafmodel.device import select_device
from rafmodel.losses import psnr, ssim
from rafmodel.targets import composite_target, render_K

PSNR_CAP = 100.0  # dB: identical frames would give +inf; the cap keeps averages finite
FRONTAL_SERIAL = "222200037"  # NeRSemble's frontal camera (also the synth rig's first)
VIDEO_FPS = 25
MIN_PANEL_HEIGHT = 128  # tiny renders are upscaled (nearest) so labels and faces are visible
LABEL_HEIGHT = 14


@dataclass
class EvalConfig:
    """Options of ``rafmodel eval``.

    out: output folder (None: RUN/eval for one run, the first run's parent/eval for several).
    cameras: serials for self-driving (None: all the subject's stored cameras); the first
    one is also the cross-driving camera (None: 222200037 when present, else the first).
    drivers: identities driving the avatar (None: all others with held-out data).
    frames: at most this many held-out timesteps per subject (self-driving) and per driver
        (cross-driving), evenly spaced (None: all).
    regressor: path / ``module:factory`` spec for ``rafmodel.regressor.load_regressor``, or
    an object with ``predict(images) -> (exp, pose)`` (None: no AED/APD).
    emotion: spec for ``load_feature_extractor`` or an object with ``features(images)``.
    vgg_weights, lpips_weights: LPIPS files (None: torchvision cache / installed heads).
    synth_root: the ``rafdata synth`` folder, only needed when the store lacks the manifest.
    grid_frames: frames per driver in the PNG grid. device: auto | cpu | cuda.
    backend: renderer (auto | torch | gsplat). self_driving, cross_driving: which parts to run.
    """

    out: str | None = None
    cameras: tuple[str, ...] | None = None
    drivers: tuple[str, ...] | None = None
    frames: int | None = None
    regressor: Any = None
    emotion: Any = None
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    synth_root: str | None = None
    grid_frames: int = 3
    device: str = "auto"
    backend: str = "auto"
    self_driving: bool = True
    cross_driving: bool = True
    videos: bool = True

    def describe(self) -> dict[str, Any]:
        """JSON-ready copy (objects given as regressor / emotion are shown by name)."""
        d = asdict(self)
        for k in ("regressor", "emotion"):
            v = d[k]
            if v is not None and not isinstance(v, str):
                d[k] = getattr(v, "name", type(v).__name__)
        for k in ("cameras", "drivers"):
            d[k] = list(d[k]) if d[k] else None
        return d


# --------------------------------------------------------------------------------------------
# Per-frame metrics


def frame_metrics(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    lpips: torch.nn.Module | None = None,
) -> dict[str, Tensor]:
    """Image metrics of a batch, each (B,) float on the CPU.

    pred, target: (B, 3, H, W) in [0, 1]. mask: (B, 1, H, W) weights in [0, 1] (the head) or
    None. Returns ``psnr`` and ``ssim`` (masked when a mask is given, else full frame),
    ``psnr_full``, ``ssim_full`` (always full frame) and ``lpips`` (full frame) when an LPIPS
    module is given. PSNR is in dB, capped at :data:`PSNR_CAP` (identical images give exactly
    the cap rather than +inf); SSIM of identical images is 1; LPIPS of identical images is 0.
    A mask with no weight gives NaN for that frame (skipped in averages).
    """
    pred = pred.clamp(0, 1)
    out = {
        "psnr_full": psnr(pred, target, cap=PSNR_CAP),
        "ssim_full": ssim(pred, target),
    }
    if mask is not None:
        out["psnr"] = psnr(pred, target, mask=mask, cap=PSNR_CAP)
        out["ssim"] = ssim(pred, target, mask=mask)
    else:
        out["psnr"], out["ssim"] = out["psnr_full"], out["ssim_full"]
    if lpips is not None:
        with torch.no_grad():
            out["lpips"] = lpips(pred, target)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values; None when there are none (JSON null)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _average(rows: list[dict[str, float]]) -> dict[str, float | None]:
    """Key-wise mean over frames (or drivers); keys present in any row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: _mean([r.get(k) for r in rows]) for k in keys}


def pick_frames(n: int, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` of ``n`` items, evenly spaced, first and last included."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, int(limit)).round().astype(np.int64))


# --------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunInfo:
    """A trained run as evaluation sees it."""

    path: Path
    label: str
    subject: str
    train: dict[str, Any]
    width: int
    height: int
    background: Tensor  # (3,) float in [0, 1]
    model: torch.nn.Module
    checkpoint: Path
    method: dict[str, Any] = field(default_factory=dict)


def method_label(train: dict[str, Any]) -> str:
    """The Table 2 row name of a run: its aug, plus topk / bank / p when not the defaults."""
    aug = str(train.get("aug", "?"))
    parts = [aug]
    if aug == "raf":
        if int(train.get("topk", 1)) != 1:
            parts.append(f"top{int(train['topk'])}")
        if str(train.get("bank", "full")) != "full":
            parts.append(f"bank={train['bank']}")
        if float(train.get("p", 0.5)) != 0.5:
            parts.append(f"p={train['p']}")
    if aug == "noise" and float(train.get("noise_std", 0.08)) != 0.08:
        parts.append(f"std={train['noise_std']}")
    return " ".join(parts)


def load_run(path: str | Path, device: torch.device) -> RunInfo:
    """A run folder (with config.json and checkpoints/last.pt) or a checkpoint file in one."""
    from rafmodel.train import load_avatar

    path = Path(path)
    if path.is_file():
        ckpt = path
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        run, ckpt = path, path / "checkpoints" / "last.pt"
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise RafDataError(run, "not a rafmodel run (no config.json)")
    try:
        info = json.loads(cfg_path.read_text())
        train = info["train"]
        width, height = (int(v) for v in info["render_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise RafDataError(cfg_path, f"unreadable run config ({err})") from None
    if not ckpt.is_file():
        raise RafDataError(ckpt, "no checkpoint (has the run saved one?)")
    model = load_avatar(ckpt, device)
    bg = torch.tensor([float(v) for v in train.get("background", (1, 1, 1))], device=device)
    return RunInfo(path=run, label=method_label(train), subject=str(info.get("subject",
                   train["subject"])), train=train, width=width, height=height, background=bg,
                   model=model, checkpoint=ckpt,
                   method={k: train.get(k) for k in ("aug", "p", "topk", "noise_std", "bank",
                                                     "iters", "seed")})


def _unique_labels(runs: list[RunInfo]) -> None:
    """Make run labels unique (two vanilla runs: 'vanilla (runA)', 'vanilla (runB)')."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"


# --------------------------------------------------------------------------------------------
# Rendering


@torch.no_grad()
def render_avatar(run: RunInfo, exp: Tensor, pose: Tensor, scale: Tensor, K: Tensor,
                  world_to_cam: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(image (3, h, w) in [0, 1] on the CPU, alpha (1, h, w)) of the avatar at render size.

    exp (D,), pose (6,), scale (), K (3, 3) OpenCV at render size, world_to_cam (4, 4).
    """
    from rafmodel.render import render

    dev = run.background.device
    g = run.model(exp.to(dev).float(), pose.to(dev).float(), scale.to(dev).float())
    out = render(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                 world_to_cam.to(dev).float(), K.to(dev).float(), run.width, run.height,
                 background=run.background, backend=backend)
    return (out.image.permute(2, 0, 1).clamp(0, 1).cpu(),
            out.alpha.permute(2, 0, 1).cpu())


def target_frame(rgb: np.ndarray, mask: np.ndarray | None, width: int, height: int,
                 background: Tensor) -> tuple[Tensor, Tensor | None]:
    """A stored frame as training saw it: (3, h, w) on ``background`` and its (1, h, w) matte.

    rgb (H, W, 3) uint8, mask (H, W) uint8 or None (then the frame is used as is).
    """
    img = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    m = None if mask is None else torch.from_numpy(mask)[None, None].float() / 255.0
    target, m = composite_target(img, m, (height, width), background.cpu())
    return target[0], None if m is None else m[0]


# --------------------------------------------------------------------------------------------
# Synthetic ground truth


class SynthGroundTruth:
    """Renders identities of a synthetic store with any coefficients (the generator's heads).

    manifest: the generator's manifest (``Store.synthetic`` or ``synth.json``). Coefficients
    must be in the generator's 64-dim BFM-like space; ``true_coefficients`` gives the
    noise-free ones of a sequence for stores that hold another space (FLAME).
    """

    def __init__(self, manifest: dict):
        from rafdata.synth.writer import config_of

        self.manifest = manifest
        self.config = config_of(manifest)
        self.participants: dict = manifest.get("participants", {})
        self._heads: dict[str, Any] = {}

    def has(self, participant: str) -> bool:
        return self._key(participant) is not None

    def _key(self, participant: str) -> str | None:
        from rafdata.store import identity_matches

        for k in self.participants:
            if identity_matches(str(k), str(participant)):
                return str(k)
        return None

    def head(self, participant: str):
        """The participant's :class:`rafdata.synth.SynthHead` (cached)."""
        from rafdata.synth import SynthHead
        from rafdata.synth.writer import has_detail

        key = self._key(participant)
        if key is None:
            raise KeyError(participant)
        if key not in self._heads:
            coeff = self.participants[key]["id_coeff"]
            self._heads[key] = SynthHead(np.asarray(coeff, dtype=np.float64),
                                         detail=has_detail(self.manifest))
        return self._heads[key]

    def true_coefficients(self, participant: str, sequence: str) -> dict:
        """Noise-free exp (N, 64), pose (N, 6), scale of every video frame of a sequence."""
        from rafdata.synth import true_coefficients

        return true_coefficients(self.config, self._key(participant) or participant, sequence)

    def render(self, participant: str, exp: np.ndarray, pose: np.ndarray, scale: float,
               K: np.ndarray, world_to_cam: np.ndarray, width: int, height: int,
               background: Tensor) -> tuple[Tensor, Tensor]:
        """(image (3, h, w) on ``background``, alpha (1, h, w)) float32, like the avatar's.

        exp (64,), pose (6,) axis-angle + translation (m), scale (m per canonical unit), K
        (3, 3) OpenCV at (width, height), world_to_cam (4, 4), background (3,) in [0, 1].
        """
        rgb, alpha = self.head(participant).render(np.asarray(exp, np.float64),
                                                   np.asarray(pose, np.float64), float(scale),
                                                   np.asarray(K, np.float64),
                                                   np.asarray(world_to_cam, np.float64),
                                                   width, height)
        a = torch.from_numpy(alpha)[None]
        img = torch.from_numpy(rgb).permute(2, 0, 1)
        bg = background.detach().float().cpu()[:, None, None]
        return img * a + bg * (1 - a), a


def load_synth(store: Store, synth_root: str | Path | None) -> tuple[SynthGroundTruth | None,
                                                                     str]:
    """The ground-truth renderer of a synthetic store and a note saying where it came from."""
    manifest = store.synthetic
    where = "the store's `synthetic` manifest"
    if synth_root is not None:
        from rafdata.synth import load_manifest

        manifest = load_manifest(Path(synth_root))
        where = f"{Path(synth_root) / 'synth.json'}"
    if manifest is None:
        return None, "not a synthetic store: no ground truth for cross-driving"
    if not manifest.get("participants") or "config" not in manifest:
        return None, (f"{where} lacks participants/config: pass --synth-root DIR (the "
                      "rafdata synth folder) for cross-driving ground truth")
    return SynthGroundTruth(manifest), f"rafdata.synth generator, identities from {where}"


# --------------------------------------------------------------------------------------------
# Regressors (rafmodel.regressor, imported lazily: optional)


def _resolve_regressor(spec: Any, device: torch.device, store: Store,
                       subjects: Sequence[str]):
    """The regressor object, checked against the store and the evaluated subjects.

    ``rafmodel.regressor.check_regressor`` refuses one predicting another expression space or
    trained on an evaluated subject (it would have memorised the faces it is asked to read).
    """
    if spec is None:
        return None
    from rafmodel.regressor import check_regressor, load_regressor

    if not hasattr(spec, "predict"):
        spec = load_regressor(spec, device=str(device))
    check_regressor(spec, store, subjects)
    return spec


def _resolve_emotion(spec: Any, device: torch.device):
    if spec is None or hasattr(spec, "features"):
        return spec
    from rafmodel.regressor import load_feature_extractor

    return load_feature_extractor(spec, device=str(device))


# --------------------------------------------------------------------------------------------
# Video and grid


def _font():
    try:
        from PIL import ImageFont

        return ImageFont.load_default()
    except Exception:  # noqa: BLE001 - any font problem: PIL's built-in bitmap font
        return None


def _to_uint8(img: Tensor | None, width: int, height: int) -> np.ndarray:
    """(3, h, w) float -> (height, width, 3) uint8; None -> a grey panel."""
    if img is None:
        return np.full((height, width, 3), 96, np.uint8)
    if img.shape[1:] != (height, width):
        img = F.interpolate(img[None].float(), size=(height, width), mode="bilinear",
                            align_corners=False)[0]
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def compose_row(panels: list[Tensor | None], labels: list[str], width: int,
                height: int) -> np.ndarray:
    """Panels side by side under a label strip: (h', W', 3) uint8 with even sides (H.264).

    Panels are scaled (nearest, an integer factor) so they are at least
    :data:`MIN_PANEL_HEIGHT` pixels high; None panels are grey ("no image").
    """
    k = max(1, math.ceil(MIN_PANEL_HEIGHT / height))
    pw = width * k
    tiles = []
    font = _font()
    for img, label in zip(panels, labels, strict=True):
        arr = _to_uint8(img, width, height)
        arr = np.repeat(np.repeat(arr, k, axis=0), k, axis=1)
        strip = Image.new("RGB", (pw, LABEL_HEIGHT), (0, 0, 0))
        ImageDraw.Draw(strip).text((2, 1), label if img is not None else f"{label} (none)",
                                   fill=(255, 255, 255), font=font)
        tiles.append(np.concatenate([np.asarray(strip), arr], axis=0))
    row = np.concatenate(tiles, axis=1)
    pad_h, pad_w = row.shape[0] % 2, row.shape[1] % 2
    if pad_h or pad_w:
        row = np.pad(row, ((0, pad_h), (0, pad_w), (0, 0)))
    return row


class Mp4Writer:
    """H.264 mp4 (libx264, yuv420p) written frame by frame with PyAV; size from frame one."""

    def __init__(self, path: Path, fps: int = VIDEO_FPS):
        self.path = path
        self.fps = fps
        self.container = None
        self.stream = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        import av

        if self.container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), mode="w")
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = frame.shape[1], frame.shape[0]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "18", "preset": "veryfast"}
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None


# --------------------------------------------------------------------------------------------
# The evaluation


def _load_lpips(cfg: EvalConfig, device: torch.device, progress: Progress):
    from rafmodel.losses import try_load_lpips

    try:
        return try_load_lpips(cfg.vgg_weights, cfg.lpips_weights, warn=progress.warn,
                              device=device)
    except FileNotFoundError as err:
        raise RafDataError(None, str(err)) from None
    except ValueError as err:
        raise RafDataError(cfg.vgg_weights, f"not usable VGG16/LPIPS weights ({err})") from None


def _cameras_of(store: Store, identity: int) -> list[int]:
    return [c for c in range(len(store.cameras)) if int(store.cameras.identity[c]) == identity]


def _image_lookup(store: Store, identity: int) -> dict[tuple[int, int], int]:
    """(timestep, camera) -> image row for one identity's held-out images."""
    rows = store.image_rows(identity=identity, held_out=True)
    return {(int(store.image_timestep[r]), int(store.image_camera[r])): int(r) for r in rows}


def _cross_camera(store: Store, identity: int, cameras: tuple[str, ...] | None) -> int:
    cams = _cameras_of(store, identity)
    by_serial = {store.cameras.serial[c]: c for c in cams}
    if not cams:
        raise RafDataError(store.path, f"identity {store.identities[identity]} has no cameras")
    if cameras:
        if cameras[0] not in by_serial:
            raise RafDataError(store.path, f"subject {store.identities[identity]} has no camera "
                               f"{cameras[0]} (has: {', '.join(sorted(by_serial))})")
        return by_serial[cameras[0]]
    return by_serial.get(FRONTAL_SERIAL, cams[0])


def _subject_pose(store: Store, identity: int) -> tuple[np.ndarray, float]:
    """The subject's mean translation (3,) and median scale over all its timesteps."""
    rows = store.timestep_rows(identity=identity)
    ts = store.timesteps
    return ts.pose[rows, 3:].astype(np.float64).mean(0), float(np.median(ts.scale[rows]))


def evaluate_self(run: RunInfo, store: Store, cfg: EvalConfig, lpips,
                  progress: Progress) -> dict[str, Any]:
    """Self-driving metrics of one run on its subject's held-out frames (see module doc)."""
    ident = store.identity_index(run.subject)
    serials = list(cfg.cameras) if cfg.cameras else None
    rows = store.image_rows(identity=ident, held_out=True, serials=serials)
    if len(rows) == 0:
        progress.warn(f"{run.label}: subject {run.subject} has no held-out images in the store: "
                      "no self-driving metrics")
        return {"frames": 0, "note": "no held-out images of the subject in the store"}
    steps = np.unique(store.image_timestep[rows])
    keep = set(steps[pick_frames(len(steps), cfg.frames)].tolist())
    rows = [int(r) for r in rows if int(store.image_timestep[r]) in keep]
    per_cam: dict[str, list[dict[str, float]]] = {}
    masked = []
    progress.start(f"self-driving {run.label}", len(rows))
    for r in rows:
        s = store.image(r)
        target, mask = target_frame(s.rgb, s.mask, run.width, run.height, run.background)
        K = render_K(s.K, store.image_size, run.width, run.height)
        pred, _ = render_avatar(run, torch.from_numpy(np.asarray(s.exp, np.float32)),
                                torch.from_numpy(np.asarray(s.pose, np.float32)),
                                torch.tensor(s.scale), K,
                                torch.from_numpy(np.asarray(s.world_to_cam, np.float32)),
                                cfg.backend)
        m = frame_metrics(pred[None], target[None], None if mask is None else mask[None], lpips)
        per_cam.setdefault(s.serial, []).append({k: float(v[0]) for k, v in m.items()})
        masked.append(mask is not None)
        progress.advance()
    all_rows = [x for v in per_cam.values() for x in v]
    return {
        "frames": len(all_rows),
        "timesteps": len(keep),
        "masked": "all" if all(masked) else ("none" if not any(masked) else "some"),
        "cameras": {k: {**_average(v), "frames": len(v)} for k, v in per_cam.items()},
        "mean": _average(all_rows),
    }


def evaluate(runs: Sequence[str | Path], store_path: str | Path, cfg: EvalConfig | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate runs of ``rafmodel train`` on ``store_path``; returns the summary dict.

    See the module docstring for what is measured and written. Raises RafDataError for user
    errors (missing run, unknown camera or driver, a store without held-out data).
    """
    cfg = cfg or EvalConfig()
    progress = progress or NullProgress()
    if not runs:
        raise RafDataError(None, "no run given")
    device = select_device(cfg.device)
    store = Store(store_path)
    try:
        infos = [load_run(r, device) for r in runs]
        _unique_labels(infos)
        for r in infos:
            dim = int(getattr(r.model.cfg, "exp_dim", store.exp_dim))
            if dim != store.exp_dim:
                raise RafDataError(store.path, f"run {r.path} was trained on {dim}-dim expressions; "
                                   f"the store holds {store.exp_dim} ({store.exp_space})")
            if Path(str(r.train.get("store", ""))).name != Path(store_path).name:
                progress.warn(f"{r.path}: trained on {r.train.get('store')}, evaluated on "
                              f"{store_path}")
        out = Path(cfg.out) if cfg.out else (infos[0].path / "eval" if len(infos) == 1
                                             else infos[0].path.parent / "eval")
        out.mkdir(parents=True, exist_ok=True)

        lpips = _load_lpips(cfg, device, progress)
        regressor = _resolve_regressor(cfg.regressor, device, store,
                                       sorted({r.subject for r in infos}))
        emotion = _resolve_emotion(cfg.emotion, device)
        synth, synth_note = load_synth(store, cfg.synth_root)
        computed_with = _computed_with(cfg, store, lpips, regressor, emotion, synth, synth_note,
                                       device)

        results: dict[str, dict[str, Any]] = {}
        for r in infos:
            results[r.label] = {
                "run": str(r.path), "checkpoint": str(r.checkpoint), "label": r.label,
                "subject": r.subject, "method": r.method, "store": str(store_path),
                "render_size": [r.width, r.height],
                "background": [float(v) for v in r.background.cpu()],
            }
            if cfg.self_driving:
                results[r.label]["self"] = evaluate_self(r, store, cfg, lpips, progress)

        videos: list[str] = []
        grids: list[str] = []
        notes: list[str] = []
        if cfg.cross_driving:
            by_subject: dict[str, list[RunInfo]] = {}
            for r in infos:
                by_subject.setdefault(r.subject, []).append(r)
            for group in by_subject.values():
                cross, v, g, n = _evaluate_cross(group, store, cfg, out, lpips, regressor, emotion,
                                                 synth, progress)
                for r in group:
                    results[r.label]["cross"] = cross[r.label]
                videos += v
                grids += g
                notes += n

        metrics_files = []
        for r in infos:
            doc = {**results[r.label], "computed_with": computed_with, "config": cfg.describe()}
            path = out / "metrics.json" if len(infos) == 1 else out / _safe(r.label) / "metrics.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=2, allow_nan=False, default=_json_default))
            metrics_files.append(str(path))

        summary = {
            "out": str(out),
            "runs": [{"label": r.label, "run": str(r.path), "subject": r.subject,
                      "metrics": metrics_files[i],
                      "self": results[r.label].get("self", {}).get("mean"),
                      "cross": results[r.label].get("cross", {}).get("mean")}
                     for i, r in enumerate(infos)],
            "videos": videos,
            "grids": grids,
            "notes": notes,
            "computed_with": computed_with,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False,
                                                     default=_json_default))
    finally:
        store.close()
    return summary


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "run"


def _computed_with(cfg: EvalConfig, store: Store, lpips, regressor, emotion, synth,
                   synth_note: str, device: torch.device) -> dict[str, str]:
    """What every metric was computed with, in words (saved and printed)."""
    has_masks = bool(np.any(store.image_has_mask)) if store.n_images else False
    return {
        "psnr": f"10 log10(1 / MSE) per frame on [0,1] RGB, capped at {PSNR_CAP:g} dB, "
                "averaged over frames; `psnr` masked to the head matte when the frame has one, "
                "`psnr_full` over the whole frame (both images on the run's background)",
        "ssim": "Gaussian-window SSIM (11 px, sigma 1.5) per frame; `ssim` weighted by the "
                "head matte when present, `ssim_full` unweighted",
        "masks": "stored mattes (head only)" if has_masks
                 else "none in the store: all metrics are full-frame",
        "lpips": (lpips.description + " on the full composited frame") if lpips is not None
                 else "not computed: no VGG16 ImageNet weights (pass --vgg-weights)",
        "cross_pose": "driver's rotation (axis-angle) with the subject's mean translation and "
                      "median scale",
        "aed": (f"mean |exp_driver - exp_read| over {store.exp_dim} dims and frames, read by "
                f"regressor {getattr(regressor, 'name', type(regressor).__name__)}")
               if regressor is not None else "not computed: no --regressor",
        "apd": ("mean |pose_rendered - pose_read| over the 6 pose dims (axis-angle rad, "
                "translation) and frames; apd_rot over the 3 rotation dims")
               if regressor is not None else "not computed: no --regressor",
        "emotion_sim": (f"cosine similarity of {getattr(emotion, 'name', '?')} features of the "
                        "driver's real frame and the rendered frame")
                       if emotion is not None else "not computed: no --emotion extractor",
        "ground_truth": synth_note if synth is not None else f"none ({synth_note})",
        "readback": "nearest ground-truth frame (mean abs pixel error) among the evaluated "
                    "frames of the same driver; L1 per dimension of its coefficients vs the "
                    "driving ones" if synth is not None else "not computed: no ground truth",
        "device": str(device),
        "backend": cfg.backend,
    }


def _evaluate_cross(runs: list[RunInfo], store: Store, cfg: EvalConfig, out: Path, lpips,
                    regressor, emotion, synth: SynthGroundTruth | None,
                    progress: Progress) -> tuple[dict[str, dict], list[str], list[str],
                                                 list[str]]:
    """Cross-driving of the runs of one subject; per-run results, videos, grids, notes."""
    subject = runs[0].subject
    ident = store.identity_index(subject)
    cam = _cross_camera(store, ident, cfg.cameras)
    serial = store.cameras.serial[cam]
    t_mean, scale = _subject_pose(store, ident)
    w2c = torch.from_numpy(store.cameras.world_to_cam[cam].astype(np.float32))
    notes: list[str] = []

    held = store.sequences.held_out.astype(bool)
    with_held = sorted({int(store.sequences.identity[s]) for s in np.flatnonzero(held)})
    if cfg.drivers:
        drivers = [store.identity_index(d) for d in cfg.drivers]
        bad = [store.identities[d] for d in drivers if d not in with_held]
        if bad:
            raise RafDataError(store.path, f"driver(s) {', '.join(bad)} have no held-out "
                               "sequence in the store")
    else:
        drivers = [d for d in with_held if d != ident]
    if not drivers:
        notes.append(f"subject {subject}: no other identity has held-out data: no cross-driving")
        progress.warn(notes[-1])
    gt_ok = synth is not None and synth.has(subject)
    if synth is not None and not gt_ok:
        notes.append(f"subject {subject} is not in the synthetic manifest: no ground truth")
    # Ground truth uses the generator's noise-free coefficients of the driver's video frames
    # (what the driver really did; what self-driving's real frames show). The tracked ones
    # the avatar receives differ by the synth's tracker noise, reported when comparable
    # (the store holds the generator's own 64-dim space, not FLAME).
    stored_is_gen = store.exp_dim == 64 and str(store.exp_space).startswith("bfm")

    per_run: dict[str, dict[str, dict]] = {r.label: {} for r in runs}
    videos, grids = [], []
    grid_rows: list[np.ndarray] = []
    for d in drivers:
        dname = store.identities[d]
        steps = store.timestep_rows(identity=d, held_out=True)
        steps = steps[pick_frames(len(steps), cfg.frames)]
        images = _image_lookup(store, d)
        dcams = {store.cameras.serial[c]: c for c in _cameras_of(store, d)}
        dcam = dcams.get(serial, next(iter(dcams.values()), None))
        ts = store.timesteps
        rows: dict[str, list[dict[str, float]]] = {r.label: [] for r in runs}
        renders: dict[str, list[Tensor]] = {r.label: [] for r in runs}
        alphas: dict[str, list[Tensor]] = {r.label: [] for r in runs}
        gts: dict[str, list[tuple[Tensor, Tensor]]] = {r.label: [] for r in runs}
        driver_frames: list[Tensor | None] = []
        coeffs = []
        noise: list[float] = []
        gt_coeffs: list[tuple[np.ndarray, np.ndarray]] = []
        true_cache: dict[str, dict] = {}
        writer = Mp4Writer(out / "videos" / f"{_safe(subject)}_by_{_safe(dname)}.mp4")
        labels = [f"driver {dname}"] + (["ground truth"] if gt_ok else []) + \
                 [r.label for r in runs]
        chosen = set(pick_frames(len(steps), cfg.grid_frames).tolist())
        progress.start(f"cross-driving {subject} by {dname}", len(steps))
        try:
            for i, t in enumerate(steps):
                t = int(t)
                exp = ts.exp[t].astype(np.float32)
                pose = np.concatenate([ts.pose[t, :3].astype(np.float64), t_mean])
                coeffs.append((exp, pose))
                row = images.get((t, dcam)) if dcam is not None else None
                drv = None
                if row is not None:
                    s = store.image(row)
                    # The driver panel shows the real frame with its own background, unmatted.
                    drv = target_frame(s.rgb, None, runs[0].width, runs[0].height,
                                       runs[0].background)[0]
                driver_frames.append(drv)
                gt = None
                if gt_ok:
                    assert synth is not None
                    seq = store.sequences.name[int(ts.sequence[t])]
                    if seq not in true_cache:
                        true_cache[seq] = synth.true_coefficients(dname, seq)
                    true, f = true_cache[seq], int(ts.frame[t])
                    gexp = true["exp"][f]
                    gpose = np.concatenate([true["pose"][f, :3], t_mean])
                    gt_coeffs.append((gexp.astype(np.float32), gpose.astype(np.float32)))
                    if stored_is_gen:
                        noise.append(float(np.abs(exp - gexp).mean()))
                    # One ground truth per render size and background among the runs.
                    frame_gt: dict[tuple, tuple[Tensor, Tensor]] = {}
                    for r in runs:
                        key = (r.width, r.height, tuple(r.background.tolist()))
                        if key not in frame_gt:
                            Kr = render_K(store.cameras.K[cam], store.image_size, r.width,
                                          r.height)
                            frame_gt[key] = synth.render(subject, gexp, gpose, scale,
                                                         Kr.numpy(),
                                                         store.cameras.world_to_cam[cam],
                                                         r.width, r.height, r.background)
                        gts[r.label].append(frame_gt[key])
                    gt = gts[runs[0].label][-1][0]
                panels: list[Tensor | None] = [drv] + ([gt] if gt_ok else [])
                for r in runs:
                    K = render_K(store.cameras.K[cam], store.image_size, r.width, r.height)
                    pred, alpha = render_avatar(r, torch.from_numpy(exp),
                                                torch.from_numpy(pose.astype(np.float32)),
                                                torch.tensor(scale), K, w2c, cfg.backend)
                    renders[r.label].append(pred)
                    alphas[r.label].append(alpha)
                    panels.append(pred)
                    m: dict[str, float] = {}
                    if gt_ok:
                        g_img, g_alpha = gts[r.label][-1]
                        fm = frame_metrics(pred[None], g_img[None], g_alpha[None], lpips)
                        m.update({f"gt_{k}": float(v[0]) for k, v in fm.items()})
                    rows[r.label].append(m)
                if cfg.videos:
                    frame = compose_row(panels, labels, runs[0].width, runs[0].height)
                    writer.write(frame)
                    if i in chosen:
                        grid_rows.append(compose_row(
                            panels, [f"{lab} t{int(ts.frame[t])}" if j == 0 else lab
                                     for j, lab in enumerate(labels)],
                            runs[0].width, runs[0].height))
                progress.advance()
        finally:
            writer.close()
        if writer.frames:
            videos.append(str(writer.path))

        exp_d = torch.from_numpy(np.stack([c[0] for c in coeffs])) if coeffs else None
        pose_d = torch.from_numpy(np.stack([c[1] for c in coeffs]).astype(np.float32)) \
            if coeffs else None
        for r in runs:
            frames = rows[r.label]
            if coeffs and regressor is not None:
                _regressor_metrics(regressor, renders[r.label], alphas[r.label], exp_d,
                                   pose_d, frames)
            if coeffs and emotion is not None:
                _emotion_metrics(emotion, renders[r.label], driver_frames, frames)
            if gts[r.label]:
                _readback(renders[r.label], [g for g, _ in gts[r.label]],
                          torch.from_numpy(np.stack([c[0] for c in gt_coeffs])),
                          torch.from_numpy(np.stack([c[1] for c in gt_coeffs])), frames)
            entry = {"frames": len(frames), **_average(frames)}
            if noise:
                entry["driver_noise_exp_l1"] = _mean(noise)
            per_run[r.label][dname] = entry

    if grid_rows:
        width = max(g.shape[1] for g in grid_rows)
        grid = np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0)))
                               for g in grid_rows], axis=0)
        path = out / f"grid_{_safe(subject)}.png"
        Image.fromarray(grid).save(path)
        grids.append(str(path))

    result = {}
    for r in runs:
        by_driver = per_run[r.label]
        mean = _average([{k: v for k, v in e.items() if k != "frames"}
                         for e in by_driver.values()])
        result[r.label] = {"camera": serial, "drivers": by_driver, "mean": mean,
                           "ground_truth": gt_ok,
                           "pose": "driver rotation, subject mean translation and median scale"}
    return result, videos, grids, notes


def _regressor_metrics(regressor, renders: list[Tensor], alphas: list[Tensor], exp_d: Tensor,
                       pose_d: Tensor, rows: list[dict[str, float]]) -> None:
    """Adds aed, apd, apd_rot per frame (mean L1 per dimension) to ``rows``.

    The render's alpha is the matte a regressor that crops to the face may use
    (``rafmodel.regressor.regress`` passes it only to regressors that accept masks).
    """
    from rafmodel.regressor import regress

    exp_p, pose_p = regress(regressor, torch.stack(renders), torch.stack(alphas))
    e = (exp_p - exp_d).abs().mean(1)
    p = (pose_p - pose_d).abs()
    for j in range(e.shape[0]):
        rows[j].update(aed=float(e[j]), apd=float(p[j].mean()), apd_rot=float(p[j, :3].mean()))


def _emotion_metrics(extractor, renders: list[Tensor], drivers: list[Tensor | None],
                     rows: list[dict[str, float]]) -> None:
    """Adds emotion_sim (cosine similarity of features) where the driver frame exists."""
    pairs = [(i, d) for i, d in enumerate(drivers) if d is not None]
    if not pairs:
        return
    a = torch.stack([renders[i] for i, _ in pairs])
    b = torch.stack([d for _, d in pairs])
    from rafmodel.regressor import extract_features

    fr, fd = extract_features(extractor, a), extract_features(extractor, b)
    sim = F.cosine_similarity(fr, fd, dim=1)
    for (i, _), s in zip(pairs, sim, strict=True):
        rows[i]["emotion_sim"] = float(s)


def _readback(renders: list[Tensor], gts: list[Tensor], exp_d: Tensor, pose_d: Tensor,
              rows: list[dict[str, float]]) -> None:
    """Adds readback_exp_l1 / readback_pose_l1 / readback_hit per frame (see module doc)."""
    g = torch.stack(gts).flatten(1)  # (N, 3hw)
    for i, pred in enumerate(renders):
        j = int((g - pred.flatten()[None]).abs().mean(1).argmin())
        rows[i].update(readback_exp_l1=float((exp_d[j] - exp_d[i]).abs().mean()),
                       readback_pose_l1=float((pose_d[j] - pose_d[i]).abs().mean()),
                       readback_hit=float(j == i))


__all__ = ["EvalConfig", "PSNR_CAP", "RunInfo", "SynthGroundTruth", "compose_row", "evaluate",
           "evaluate_self", "frame_metrics", "load_run", "load_synth", "method_label",
           "pick_frames", "render_K", "render_avatar", "target_frame"]
