"""Gaussian Head Avatar preprocessed layout (one folder per participant, JPEG per frame).

::

    SRC/{pid}/images/{frame}/image_{serial}.jpg      (image_lowres_*, visible_* are ignored)
    SRC/{pid}/images/{frame}/mask_{serial}.jpg       (optional; matte in channel 0)
    SRC/{pid}/cameras/{frame}/camera_{serial}.npz    extrinsic (3, 4) world_to_cam, intrinsic (3, 3)
    SRC/{pid}/params/{frame}/params.npz              BFM (Multiview-3DMM-Fitting)
    SRC/{pid}/background/image_{serial}.jpg

GHA numbers frames across the concatenated sequences of a participant (FREE is excluded by
its preprocessing), so each participant is one sequence named "all". Frame folder names may
carry any zero padding. Cameras are static: checked on the first, middle and last frame.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from rafdata.errors import SourceError
from rafdata.sources.base import CameraCalib, Frame, SourceOptions, Tracking
from rafdata.sources.tracking import frame_folders, read_bfm_params
from rafdata.store import identity_matches

SEQUENCE_NAME = "all"


class GhaSource:
    """A GHA-preprocessed dataset root (see the module docstring for the layout).

    ``options.sequences``, if given, must include "all" for anything to be yielded.
    """

    layout = "gha"

    def __init__(self, root: Path, options: SourceOptions | None = None):
        self.root = Path(root)
        self.options = options or SourceOptions()
        self.skipped: list[str] = []

    def participants(self) -> list[str]:
        """Folders holding images/ and params/, numeric names sorted by number."""
        if not self.root.is_dir():
            raise SourceError(self.root, "source folder not found")
        names = [d.name for d in self.root.iterdir()
                 if d.is_dir() and (d / "images").is_dir() and (d / "params").is_dir()]
        wanted = self.options.participants
        if wanted is not None:
            names = [n for n in names if any(identity_matches(n, str(w)) for w in wanted)]
        return sorted(names, key=lambda n: (0, int(n), n) if n.isdigit() else (1, 0, n))

    def sequences(self, participant: str) -> list[GhaSequence]:
        path = self.root / participant
        if not ((path / "images").is_dir() and (path / "params").is_dir()):
            raise SourceError(path, "not a GHA participant folder (needs images/ and params/)")
        if self.options.sequences is not None and SEQUENCE_NAME not in self.options.sequences:
            return []
        return [GhaSequence(participant, path, self.options)]


class GhaSequence:
    """All frames of one GHA participant; implements ``base.SequenceSource``."""

    def __init__(self, participant: str, path: Path, options: SourceOptions):
        self.participant = participant
        self.name = SEQUENCE_NAME
        self.path = path
        self._options = options
        self._tracking: Tracking | None = None
        self._image_dirs: dict[int, Path] | None = None

    def __repr__(self) -> str:
        return f"GhaSequence({self.participant})"

    def tracking(self) -> Tracking:
        if self._tracking is None:
            self._tracking = read_bfm_params(self.path / "params")
        return self._tracking

    def image_dirs(self) -> dict[int, Path]:
        """{frame: images/{frame} folder}, whatever the zero padding."""
        if self._image_dirs is None:
            self._image_dirs = dict(frame_folders(self.path / "images"))
        return self._image_dirs

    def _image_dir(self, frame: int) -> Path:
        # The folder that should exist, for messages, when it does not.
        return self.image_dirs().get(frame, self.path / "images" / f"{frame:04d}")

    def cameras(self) -> list[CameraCalib]:
        """Serials with image_{serial}.jpg in the first tracked frame; calibration from that
        frame's cameras/ npz, checked equal on the middle and last tracked frames."""
        frames = self.tracking().frames
        first = self._image_dir(int(frames[0]))
        if not first.is_dir():
            raise SourceError(first, "image folder of the first tracked frame is missing")
        serials = sorted(
            p.stem[len("image_"):] for p in first.glob("image_*.jpg")
            if not p.name.startswith("image_lowres_")
        )
        if self._options.cameras is not None:
            keep = {str(c) for c in self._options.cameras}
            serials = [s for s in serials if s in keep]
        cam_dirs = dict(frame_folders(self.path / "cameras")) if (self.path / "cameras").is_dir() \
            else {}
        checks = sorted({int(frames[0]), int(frames[len(frames) // 2]), int(frames[-1])})
        out = []
        for s in serials:
            calibs = [self._read_camera(cam_dirs, f, s) for f in checks]
            for f, c in zip(checks[1:], calibs[1:], strict=True):
                if not (np.allclose(c.K, calibs[0].K, rtol=1e-5, atol=1e-6)
                        and np.allclose(c.world_to_cam, calibs[0].world_to_cam, rtol=1e-5, atol=1e-6)):
                    raise SourceError(
                        self._camera_path(cam_dirs, f, s), f"camera {s} differs from frame "
                        f"{checks[0]}: per-frame cameras are not supported",
                    )
            out.append(calibs[0])
        return out

    def _camera_path(self, cam_dirs: dict[int, Path], frame: int, serial: str) -> Path:
        folder = cam_dirs.get(frame, self.path / "cameras" / f"{frame:04d}")
        return folder / f"camera_{serial}.npz"

    def _read_camera(self, cam_dirs: dict[int, Path], frame: int, serial: str) -> CameraCalib:
        path = self._camera_path(cam_dirs, frame, serial)
        if not path.is_file():
            raise SourceError(path, f"camera file for camera {serial} not found")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise SourceError(path, f"cannot read npz: {exc}") from exc
        for key, shapes in (("extrinsic", ((3, 4), (4, 4))), ("intrinsic", ((3, 3),))):
            if key not in data:
                raise SourceError(path, f"missing key '{key}'")
            if data[key].shape not in shapes:
                raise SourceError(path, f"key '{key}' has shape {data[key].shape}, "
                                  f"expected {shapes[0]}")
            if not np.all(np.isfinite(data[key])):
                raise SourceError(path, f"key '{key}' holds NaN or inf values")
        w2c = np.eye(4)
        w2c[: data["extrinsic"].shape[0]] = data["extrinsic"]
        return CameraCalib(serial=serial, K=data["intrinsic"].astype(np.float64), world_to_cam=w2c)

    def check_camera(self, serial: str, frames: np.ndarray) -> None:
        """Every frame has images/{frame}/image_{serial}.jpg (existence only, no decoding)."""
        for f in np.asarray(frames).tolist():
            p = self._image_dir(int(f)) / f"image_{serial}.jpg"
            if not p.is_file():
                raise SourceError(p, f"image missing for camera {serial} at frame {f} "
                                  "(first missing file)")

    def frame_size(self, serial: str) -> tuple[int, int]:
        """(width, height) of the camera's image in the first tracked frame (header only)."""
        path = self._image_dir(int(self.tracking().frames[0])) / f"image_{serial}.jpg"
        try:
            with Image.open(path) as im:
                return im.size
        except OSError as err:
            raise SourceError(path, f"unreadable image ({err})") from None

    def read_frames(self, serial: str, frames: np.ndarray) -> Iterator[Frame]:
        """rgb (H, W, 3) uint8 from the JPEG; mask (H, W) uint8, channel 0 of mask_{serial}.jpg,
        or None where that frame has no mask."""
        for f in np.asarray(frames).tolist():
            folder = self._image_dir(int(f))
            rgb = _load_image(folder / f"image_{serial}.jpg")
            mpath = folder / f"mask_{serial}.jpg"
            mask = None
            if mpath.is_file():
                m = _load_image(mpath, rgb=False)
                mask = np.ascontiguousarray(m if m.ndim == 2 else m[..., 0])
                if mask.shape != rgb.shape[:2]:
                    raise SourceError(mpath, f"mask is {mask.shape[1]}x{mask.shape[0]}, image is "
                                      f"{rgb.shape[1]}x{rgb.shape[0]}")
            yield Frame(rgb=rgb, mask=mask)


def _load_image(path: Path, rgb: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or (when not ``rgb``) the image's own L or RGB pixels."""
    if not path.is_file():
        raise SourceError(path, "image not found")
    try:
        with Image.open(path) as im:
            if rgb:
                im = im.convert("RGB")
            elif im.mode not in ("L", "RGB"):  # e.g. LA, CMYK: keep a grey matte grey
                im = im.convert("L" if im.mode.startswith(("L", "I")) else "RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except OSError as exc:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise SourceError(path, f"cannot decode image: {exc}") from exc
