"""Write the synthetic dataset to disk: NeRSemble v2 layout and Gaussian Head Avatar layout."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from rafdata.errors import SourceError
from rafdata.synth.config import EXP_DIM, FPS, HELD_OUT_SEQUENCE, ID_DIM, SynthConfig, rng_for
from rafdata.synth.head import SEMANTIC_DIMS, SynthHead, composite
from rafdata.synth.motion import (
    HEAD_SCALE,
    bfm_params,
    flame_tracking,
    identity_coeff,
    identity_scale,
    tracked_coefficients,
    true_coefficients,
)
from rafdata.synth.rig import background_image, camera_rig, color_calibration

MANIFEST = "synth.json"
MANIFEST_FORMAT = "rafdata-synth"
MANIFEST_VERSION = 2  # 2: heads with fine surface detail, frames with camera noise
_READABLE_VERSIONS = (1, 2)
VIDEO_CRF = 12  # near-lossless: tests compare decoded frames with fresh renders
JPEG_QUALITY = 95

Progress = Callable[[int, int], None]


class VideoWriter:
    """An H.264 (libx264, yuv420p, 25 fps) mp4 written one frame at a time with PyAV.

    ``grey=True`` takes (H, W) uint8 frames (mattes); otherwise (H, W, 3) uint8 RGB.
    """

    def __init__(self, path: Path, width: int, height: int, grey: bool = False):
        import av  # here, not at the top: readers of synth data (evaluation) need no encoder

        path.parent.mkdir(parents=True, exist_ok=True)
        self.grey = grey
        self._av = av
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=FPS)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        # One thread per encoder: many encoders are open at once and rendering keeps the
        # other core busy; x264's own threading only adds latency at these sizes.
        self.stream.options = {"crf": str(VIDEO_CRF), "preset": "veryfast", "threads": "1"}

    def write(self, image: np.ndarray) -> None:
        frame = self._av.VideoFrame.from_ndarray(
            np.ascontiguousarray(image), format="gray" if self.grey else "rgb24"
        )
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def load_manifest(root: Path) -> dict:
    """The manifest ``root/synth.json`` (config, identities); SourceError if missing or bad."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(path, "not found: not a synthetic dataset (run rafdata synth)") from None
    except (OSError, ValueError) as err:
        raise SourceError(path, f"unreadable manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise SourceError(path, f"not a {MANIFEST_FORMAT} manifest")
    if manifest.get("version") not in _READABLE_VERSIONS:
        raise SourceError(path, f"manifest version {manifest.get('version')!r} is not supported")
    return manifest


def manifest_config(root: Path) -> SynthConfig:
    """The SynthConfig a dataset was written with."""
    return config_of(load_manifest(root))


def config_of(manifest: dict) -> SynthConfig:
    """The SynthConfig of a manifest; version 1 data had no camera noise."""
    cfg = dict(manifest["config"])
    if manifest.get("version", 1) < 2:
        cfg.setdefault("sensor_noise", 0.0)
    return SynthConfig.from_dict(cfg)


def has_detail(manifest: dict) -> bool:
    """Whether the manifest's heads carry fine surface detail (version 2 on)."""
    return manifest.get("version", 1) >= 2


def _manifest(cfg: SynthConfig, layout: str, extra: dict | None = None) -> dict:
    participants = {}
    for i, pid in enumerate(cfg.participants):
        coeff = identity_coeff(cfg.seed, pid)
        participants[pid] = {
            # float32 values written exactly (as float64 decimals) so renders match bit for bit
            "id_coeff": [float(x) for x in coeff],
            "scale": identity_scale(coeff),
            "prototype": i,
        }
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "layout": layout,
        "config": cfg.to_dict(),
        "fps": FPS,
        "exp_dim": EXP_DIM,
        "id_dim": ID_DIM,
        "head_scale": HEAD_SCALE,
        "semantic_dims": list(SEMANTIC_DIMS),
        "held_out_sequence": HELD_OUT_SEQUENCE,
        "participants": participants,
        "conventions": {
            "pose": "canonical x -> world: scale * R(pose[:3]) @ x + pose[3:], axis-angle rad, m",
            "cameras": "world_2_cam OpenCV axes; K pixel centres at integer (col, row)",
            "world": "y up, the neutral head looks along +z, x to the subject's left",
            "noise": "written = true + N(0, noise^2) (translation: 0.1 * noise m)",
            "flame_expression": "e @ F.T, F = rafdata.synth.motion.flame_from_exp_matrix()",
        },
        **(extra or {}),
    }


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # never a half-written manifest


def render_sequence(
    cfg: SynthConfig,
    participant: str,
    sequence: str,
    frames: np.ndarray | None = None,
    head: SynthHead | None = None,
) -> Iterator[tuple[int, str, np.ndarray, np.ndarray]]:
    """Yield (video frame, serial, frame uint8 (H, W, 3), matte uint8 (H, W)) in frame order.

    The frame is the head composited over the camera's background, exactly what the videos
    hold before compression. ``frames`` defaults to every video frame.
    """
    head = head or SynthHead(identity_coeff(cfg.seed, participant))
    K, w2c = camera_rig(cfg.cameras, cfg.width, cfg.height)
    bgs = {
        s: background_image(cfg.seed, participant, s, cfg.width, cfg.height) for s in cfg.cameras
    }
    true = true_coefficients(cfg, participant, sequence)
    frames = np.arange(cfg.video_frames) if frames is None else np.asarray(frames)
    for f in frames:
        for serial in cfg.cameras:
            rgb, alpha = head.render(
                true["exp"][f],
                true["pose"][f],
                true["scale"],
                K,
                w2c[serial],
                cfg.width,
                cfg.height,
            )
            matte = np.clip(np.round(alpha * 255.0), 0, 255).astype(np.uint8)
            frame = composite(rgb, alpha, bgs[serial])
            if cfg.sensor_noise > 0:
                noise = rng_for(cfg.seed, participant, sequence, serial, int(f), "sensor")
                frame = add_sensor_noise(frame, cfg.sensor_noise, noise)
            yield int(f), serial, frame, matte


def add_sensor_noise(frame: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``frame`` (H, W, 3) uint8 plus N(0, std^2) levels per pixel and channel, rounded."""
    noisy = frame + rng.normal(0.0, std, frame.shape).astype(np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _save_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=JPEG_QUALITY)


def write_dataset(out: Path, cfg: SynthConfig, progress: Progress | None = None) -> Path:
    """Write a NeRSemble-v2-layout dataset with known coefficients to ``out``; returns ``out``.

    Layout (``{pid}`` participant folder, ``{serial}`` camera):
    ``synth.json`` (config and identities: enough to re-render, see
    :meth:`SynthHead.from_manifest`), ``metadata_participants.csv``,
    ``metadata_sequences.csv``, ``{pid}/calibration/camera_params.json`` (``world_2_cam``
    {serial: 4x4}, ``intrinsics`` one shared 3x3), ``{pid}/calibration/color_calibration.json``,
    ``{pid}/sequences/BACKGROUND/image_{serial}.jpg``, and per sequence
    ``images/cam_{serial}.mp4``, ``alpha_maps/cam_{serial}.mp4`` (if ``cfg.alpha_maps``),
    ``params/{frame:04d}/params.npz`` (BFM; frame = video frame index) and/or
    ``tracking/flame2023_tracking_v2.npz`` (FLAME), as ``cfg.tracking`` says.

    ``progress(done, total)`` is called after each rendered image. ``synth.json`` is written
    last, so a folder without it is an interrupted write.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = len(cfg.participants) * len(cfg.sequences) * len(cfg.cameras) * cfg.video_frames
    done = 0
    K, w2c = camera_rig(cfg.cameras, cfg.width, cfg.height)
    for pid in cfg.participants:
        pdir = out / pid
        _write_json(
            pdir / "calibration" / "camera_params.json",
            {"world_2_cam": {s: m.tolist() for s, m in w2c.items()}, "intrinsics": K.tolist()},
        )
        _write_json(
            pdir / "calibration" / "color_calibration.json",
            {s: color_calibration(cfg.seed, pid, s).tolist() for s in cfg.cameras},
        )
        for serial in cfg.cameras:
            bg = background_image(cfg.seed, pid, serial, cfg.width, cfg.height)
            _save_jpeg(pdir / "sequences" / "BACKGROUND" / f"image_{serial}.jpg", bg)
        head = SynthHead(identity_coeff(cfg.seed, pid))
        for seq in cfg.sequences:
            sdir = pdir / "sequences" / seq
            tracked = tracked_coefficients(cfg, pid, seq)
            if cfg.tracking in ("bfm", "both"):
                for row, f in enumerate(tracked["frames"]):
                    _save_npz(sdir / "params" / f"{f:04d}" / "params.npz", bfm_params(tracked, row))
            if cfg.tracking in ("flame", "both"):
                _save_npz(sdir / "tracking" / "flame2023_tracking_v2.npz", flame_tracking(tracked))
            videos = {
                s: VideoWriter(sdir / "images" / f"cam_{s}.mp4", cfg.width, cfg.height)
                for s in cfg.cameras
            }
            mattes = {
                s: VideoWriter(sdir / "alpha_maps" / f"cam_{s}.mp4", cfg.width, cfg.height, True)
                for s in (cfg.cameras if cfg.alpha_maps else ())
            }
            try:
                for _, serial, image, matte in render_sequence(cfg, pid, seq, head=head):
                    videos[serial].write(image)
                    if serial in mattes:
                        mattes[serial].write(matte)
                    done += 1
                    if progress is not None:
                        progress(done, total)
            finally:
                for w in (*videos.values(), *mattes.values()):
                    w.close()
    _write_metadata(out, cfg)
    _write_json(out / MANIFEST, _manifest(cfg, "nersemble_v2"))
    return out


def _write_metadata(out: Path, cfg: SynthConfig) -> None:
    """metadata_participants.csv (one row per participant) and metadata_sequences.csv.

    The sequence table is wide: a row per participant, a column per sequence holding its
    number of video frames (empty where the participant lacks it; here none do).
    """
    with open(out / "metadata_participants.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "synthetic", "seed", "scale"])
        for pid in cfg.participants:
            w.writerow([pid, 1, cfg.seed, identity_scale(identity_coeff(cfg.seed, pid))])
    with open(out / "metadata_sequences.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", *cfg.sequences, "BACKGROUND"])
        for pid in cfg.participants:
            w.writerow([pid, *[cfg.video_frames] * len(cfg.sequences), 1])


def gha_frame_table(cfg: SynthConfig) -> list[tuple[str, int]]:
    """(sequence, video frame) of each global GHA frame number, same for every participant.

    GHA's preprocessing concatenates a participant's sequences and skips FREE; only tracked
    frames (every ``frame_step``-th video frame) become GHA frames.
    """
    table = []
    for seq in cfg.sequences:
        if seq == HELD_OUT_SEQUENCE:
            continue
        table += [(seq, int(f) * cfg.frame_step) for f in range(cfg.frames)]
    return table


def write_gha_dataset(out: Path, cfg: SynthConfig, progress: Progress | None = None) -> Path:
    """Write the Gaussian Head Avatar preprocessed layout to ``out``; returns ``out``.

    Per participant: ``images/{frame:04d}/image_{serial}.jpg`` and ``mask_{serial}.jpg``
    (3-channel grey matte), ``cameras/{frame:04d}/camera_{serial}.npz`` (extrinsic (3, 4),
    intrinsic (3, 3), float32), ``params/{frame:04d}/params.npz`` (BFM keys) and
    ``background/image_{serial}.jpg``. Frames are numbered globally over the participant's
    sequences except FREE (:func:`gha_frame_table`, also in ``synth.json`` as
    ``gha_frames``). ``progress(done, total)`` after each rendered image.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = gha_frame_table(cfg)
    total = len(cfg.participants) * len(table) * len(cfg.cameras)
    done = 0
    K, w2c = camera_rig(cfg.cameras, cfg.width, cfg.height)
    for pid in cfg.participants:
        pdir = out / pid
        for serial in cfg.cameras:
            bg = background_image(cfg.seed, pid, serial, cfg.width, cfg.height)
            _save_jpeg(pdir / "background" / f"image_{serial}.jpg", bg)
        head = SynthHead(identity_coeff(cfg.seed, pid))
        g = 0
        for seq in dict.fromkeys(s for s, _ in table):
            tracked = tracked_coefficients(cfg, pid, seq)
            row_of = {int(f): r for r, f in enumerate(tracked["frames"])}
            frame_no = {}
            for f in tracked["frames"]:
                frame_no[int(f)] = g
                for serial in cfg.cameras:
                    _save_npz(
                        pdir / "cameras" / f"{g:04d}" / f"camera_{serial}.npz",
                        {
                            "extrinsic": w2c[serial][:3].astype(np.float32),
                            "intrinsic": K.astype(np.float32),
                        },
                    )
                _save_npz(
                    pdir / "params" / f"{g:04d}" / "params.npz", bfm_params(tracked, row_of[int(f)])
                )
                g += 1
            for f, serial, image, matte in render_sequence(
                cfg, pid, seq, frames=tracked["frames"], head=head
            ):
                fdir = pdir / "images" / f"{frame_no[f]:04d}"
                _save_jpeg(fdir / f"image_{serial}.jpg", image)
                _save_jpeg(fdir / f"mask_{serial}.jpg", np.repeat(matte[..., None], 3, axis=2))
                done += 1
                if progress is not None:
                    progress(done, total)
    _write_json(
        out / MANIFEST,
        _manifest(cfg, "gha", {"gha_frames": [[s, f] for s, f in table]}),
    )
    return out
