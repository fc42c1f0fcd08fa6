"""Configuration of the synthetic dataset and the deterministic random streams it draws from."""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from rafdata.errors import RafDataError

FPS = 25  # frame rate of the written videos (NeRSemble captures at 73 fps; 25 is what we encode)
EXP_DIM = 64  # BFM expression coefficients
ID_DIM = 80  # BFM identity coefficients
FLAME_EXP_DIM = 100  # FLAME 2023 expression coefficients
FLAME_SHAPE_DIM = 300
HELD_OUT_SEQUENCE = "FREE"  # never part of a training style; the wide "free performance"

# Real NeRSemble camera serials; 222200037 is the frontal camera of the benchmark.
NERSEMBLE_SERIALS = (
    "222200037", "222200038", "222200039", "220700191", "221501007", "222200036",
    "222200040", "222200041", "222200042", "222200043", "222200044", "222200045",
    "222200046", "222200047", "222200048", "222200049",
)  # fmt: skip


@dataclass
class SynthConfig:
    """What :func:`rafdata.synth.write_dataset` writes.

    participants: 3-digit folder names. sequences: sequence folder names; ``FREE`` (if present)
    is the wide, held-out performance, every other sequence a narrow identity-specific style.
    cameras: camera serials. frames: tracked frames per sequence; the video holds
    ``frames * frame_step`` frames and tracking covers every ``frame_step``-th one. width,
    height: video size in pixels (both even, H.264 yuv420p needs it). tracking: which tracker
    outputs to write: ``"bfm"``, ``"flame"`` or ``"both"``. alpha_maps: write matte videos.
    seed: everything (identities, expressions, poses, backgrounds, noise) derives from it.
    noise: std of the tracker noise added to the written coefficients (expression units and
    radians; translation noise is ``0.1 * noise`` metres); videos use the noise-free values.
    sensor_noise: std, in 8-bit levels, of the camera noise added to every colour frame
    (independent per pixel, channel and frame; mattes stay clean). Studio footage carries a
    few levels; without it the videos are far cheaper to decode and far more compressible
    than real ones, which would flatter every image benchmark.
    """

    participants: tuple[str, ...] = ("388", "422", "443", "445")
    sequences: tuple[str, ...] = ("EXP-1-head", "EMO-1-shout+laugh", "FREE")
    cameras: tuple[str, ...] = NERSEMBLE_SERIALS[:4]
    frames: int = 12
    frame_step: int = 1
    width: int = 96
    height: int = 136
    tracking: str = "bfm"
    alpha_maps: bool = True
    seed: int = 0
    noise: float = 0.01
    sensor_noise: float = 2.0

    def __post_init__(self) -> None:
        # Tuples even when a caller (or JSON) hands lists: the config is hashed into seeds.
        self.participants = tuple(str(p) for p in self.participants)
        self.sequences = tuple(str(s) for s in self.sequences)
        self.cameras = tuple(str(c) for c in self.cameras)
        self.validate()

    def validate(self) -> None:
        """Raise RafDataError (one line) if the config cannot produce a dataset."""
        problems = []
        if not self.participants or not self.sequences or not self.cameras:
            problems.append("participants, sequences and cameras must be non-empty")
        for name in ("participants", "sequences", "cameras"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                problems.append(f"{name} has duplicates")
        if "BACKGROUND" in self.sequences:
            problems.append("BACKGROUND is written automatically, not a sequence")
        if self.frames < 1 or self.frame_step < 1:
            problems.append("frames and frame_step must be >= 1")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            problems.append("width and height must be even and >= 16 (H.264 yuv420p)")
        if self.tracking not in ("bfm", "flame", "both"):
            problems.append(f"tracking must be bfm, flame or both, not {self.tracking!r}")
        for name in ("noise", "sensor_noise"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be a finite number >= 0")
        if problems:
            raise RafDataError(None, "invalid synth config: " + "; ".join(problems))

    def check_gha(self) -> None:
        """Raise RafDataError (one line) for options a GHA-layout dataset cannot honour: GHA's
        preprocessing always leaves BFM params and masks, so FLAME tracking or no mattes
        would be silently ignored (the writer itself may add FLAME files for tests)."""
        if not self.alpha_maps or self.tracking != "bfm":
            raise RafDataError(None, "the gha layout always holds BFM params/ and mask_*.jpg: "
                               "--tracking flame|both and --no-alpha are for the nersemble "
                               "layout")

    @property
    def video_frames(self) -> int:
        """Frames in each video: ``frames * frame_step``."""
        return self.frames * self.frame_step

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (newer manifests)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def stable_hash(text: str) -> int:
    """A process-independent 32-bit hash (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent random stream named by ``keys``: same seed and keys, same numbers.

    Streams are keyed by names (participant id, sequence name, purpose) rather than by
    position, so e.g. participant "388" looks the same whatever else is in the config.
    """
    words = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        words.append(stable_hash(k) if isinstance(k, str) else int(k) & 0xFFFFFFFF)
    return np.random.default_rng(np.random.SeedSequence(words))
