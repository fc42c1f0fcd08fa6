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
A camera whose calibration is unusable there is skipped with a warning; a participant whose
cameras are all unusable is an error.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from rafdata.errors import SourceError
from rafdata.geometry import check_calibration
from rafdata.sources.base import (
    IMAGE_PARTS,
    CameraCalib,
    SequenceSource,
    SourceOptions,
    Tracking,
    is_number,
    name_problem,
    shown,
)
from rafdata.sources.tracking import frame_folders, read_bfm_params
from rafdata.store import identity_matches

SEQUENCE_NAME = "all"


class GhaSource:
    """A GHA-preprocessed dataset root (see the module docstring for the layout).

    ``options.sequences``, if given, must include "all" for anything to be yielded.
    ``skipped`` collects one line per thing passed over: a folder whose name cannot be a
    participant or frame (``'422 '``, ``'①'``, not UTF-8), a camera with an unusable
    calibration; ``warn``, if given, is also called with each line.
    """

    layout = "gha"

    def __init__(
        self,
        root: Path,
        options: SourceOptions | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.root = Path(root)
        self.options = options or SourceOptions()
        self.skipped: list[str] = []
        self._warn = warn

    def _skip(self, line: str) -> None:
        self.skipped.append(line)
        if self._warn is not None:
            self._warn(line)

    def participants(self) -> list[str]:
        """Folders holding images/ and params/, numeric names sorted by number.

        A folder laid out so whose name cannot be stored ('422 ', '①', not UTF-8) is
        skipped with a warning.
        """
        if not self.root.is_dir():
            raise SourceError(self.root, "source folder not found")
        names = []
        for d in self.root.iterdir():
            if not (d.is_dir() and (d / "images").is_dir() and (d / "params").is_dir()):
                continue
            problem = name_problem(d.name)
            if problem is not None:
                self._skip(f"{self.root}: folder {shown(d.name)} skipped: participant {problem}")
                continue
            names.append(d.name)
        wanted = self.options.participants
        if wanted is not None:
            names = [n for n in names if any(identity_matches(n, str(w)) for w in wanted)]
        return sorted(names, key=lambda n: (0, int(n), n) if is_number(n) else (1, 0, n))

    def sequences(self, participant: str) -> list[GhaSequence]:
        path = self.root / participant
        if not ((path / "images").is_dir() and (path / "params").is_dir()):
            raise SourceError(path, "not a GHA participant folder (needs images/ and params/)")
        if self.options.sequences is not None and SEQUENCE_NAME not in self.options.sequences:
            return []
        return [GhaSequence(participant, path, self.options, warn=self._skip)]


class GhaSequence(SequenceSource):
    """All frames of one GHA participant; implements ``base.SequenceSource``.

    ``warn`` hears about skipped folders and cameras (the source's ``_skip``).
    """

    def __init__(self, participant: str, path: Path, options: SourceOptions,
                 warn: Callable[[str], None] | None = None):
        self.participant = participant
        self.name = SEQUENCE_NAME
        self.path = path
        self._options = options
        self._warn = warn
        self._tracking: Tracking | None = None
        self._image_dirs: dict[int, Path] | None = None
        self._cameras: list[CameraCalib] | None = None

    def __repr__(self) -> str:
        return f"GhaSequence({self.participant})"

    def tracking(self) -> Tracking:
        if self._tracking is None:
            self._tracking = read_bfm_params(self.path / "params", warn=self._warn)
        return self._tracking

    def image_dirs(self) -> dict[int, Path]:
        """{frame: images/{frame} folder}, whatever the zero padding."""
        if self._image_dirs is None:
            self._image_dirs = dict(frame_folders(self.path / "images", self._warn))
        return self._image_dirs

    def _image_dir(self, frame: int) -> Path:
        # The folder that should exist, for messages, when it does not.
        return self.image_dirs().get(frame, self.path / "images" / f"{frame:04d}")

    def cameras(self) -> list[CameraCalib]:
        """Serials with image_{serial}.jpg in the first tracked frame; calibration from that
        frame's cameras/ npz, checked equal on the middle and last tracked frames.

        A camera whose calibration fails :func:`rafdata.geometry.check_calibration` on any of
        those frames is skipped with a warning naming the npz, the serial and the problem;
        SourceError when every camera is. Read once and cached (the warnings are said once).
        """
        if self._cameras is None:
            self._cameras = self._read_cameras()
        return list(self._cameras)

    def _read_cameras(self) -> list[CameraCalib]:
        frames = self.tracking().frames
        first = self._image_dir(int(frames[0]))
        if not first.is_dir():
            raise SourceError(first, "image folder of the first tracked frame is missing")
        serials = []
        for p in sorted(first.glob("image_*.jpg")):
            if p.name.startswith("image_lowres_"):
                continue
            serial = p.stem[len("image_"):]
            problem = name_problem(serial)
            if problem is None:
                serials.append(serial)
            elif self._warn is not None:  # it could never be stored or matched to a camera
                self._warn(f"{first}: image {shown(p.name)} skipped: camera {problem}")
        if self._options.cameras is not None:
            keep = {str(c) for c in self._options.cameras}
            serials = [s for s in serials if s in keep]
        cam_dirs = dict(frame_folders(self.path / "cameras", self._warn)) \
            if (self.path / "cameras").is_dir() else {}
        checks = sorted({int(frames[0]), int(frames[len(frames) // 2]), int(frames[-1])})
        out = []
        bad: list[str] = []
        for s in serials:
            try:
                calibs = [self._read_camera(cam_dirs, f, s) for f in checks]
            except _UnusableCamera as err:
                line = f"{err.path}: camera {s} skipped: {err.problem}"
                bad.append(line)
                if self._warn is not None:
                    self._warn(line)
                continue
            for f, c in zip(checks[1:], calibs[1:], strict=True):
                if not (np.allclose(c.K, calibs[0].K, rtol=1e-5, atol=1e-6)
                        and np.allclose(c.world_to_cam, calibs[0].world_to_cam, rtol=1e-5, atol=1e-6)):
                    raise SourceError(
                        self._camera_path(cam_dirs, f, s), f"camera {s} differs from frame "
                        f"{checks[0]}: per-frame cameras are not supported",
                    )
            out.append(calibs[0])
        if bad and not out:
            raise SourceError(self.path / "cameras", f"no camera of participant "
                              f"{self.participant} has a usable calibration ({bad[0]})")
        return out

    def _camera_path(self, cam_dirs: dict[int, Path], frame: int, serial: str) -> Path:
        folder = cam_dirs.get(frame, self.path / "cameras" / f"{frame:04d}")
        return folder / f"camera_{serial}.npz"

    def _read_camera(self, cam_dirs: dict[int, Path], frame: int, serial: str) -> CameraCalib:
        """One frame's calibration of one camera: SourceError when the file is missing or
        unreadable, _UnusableCamera when its values are (the camera is skipped)."""
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
                raise _UnusableCamera(path, f"missing key '{key}'")
            if data[key].dtype.kind not in "biuf":  # text or complex: np.isfinite would raise
                raise _UnusableCamera(path, f"key '{key}' is not numeric "
                                      f"(dtype {data[key].dtype})")
            if data[key].shape not in shapes:
                raise _UnusableCamera(path, f"key '{key}' has shape {data[key].shape}, "
                                      f"expected {shapes[0]}")
            with np.errstate(over="ignore"):  # float128 beyond float64: inf, refused below
                data[key] = data[key].astype(np.float64)
            if not np.all(np.isfinite(data[key])):  # after the cast to what is stored
                raise _UnusableCamera(path, f"key '{key}' holds NaN or inf values")
        w2c = np.eye(4)
        w2c[: data["extrinsic"].shape[0]] = data["extrinsic"]
        problem = check_calibration(data["intrinsic"], w2c)
        if problem is not None:
            raise _UnusableCamera(path, problem)
        return CameraCalib(serial=serial, K=data["intrinsic"], world_to_cam=w2c)

    def check_camera(self, serial: str, frames: np.ndarray) -> None:
        """Every frame has images/{frame}/image_{serial}.jpg (existence only, no decoding)."""
        for f in np.asarray(frames).tolist():
            p = self._image_dir(int(f)) / f"image_{serial}.jpg"
            if not p.is_file():
                raise SourceError(p, f"image missing for camera {serial} at frame {f} "
                                  "(first missing file)")

    def frame_size(self, serial: str) -> tuple[int, int]:
        """(width, height) of the camera's image in the first tracked frame (header only)."""
        return _image_size(self._image_dir(int(self.tracking().frames[0]))
                           / f"image_{serial}.jpg")

    def image_parts(self, serial: str) -> tuple[str, ...]:
        """GHA writes a mask per frame where it has one: the part exists when any of the
        sequence's frames has ``mask_{serial}.jpg`` (frames without one read as None)."""
        has = any((d / f"mask_{serial}.jpg").is_file() for d in self.image_dirs().values())
        return IMAGE_PARTS if has else ("rgb",)

    def read_part(self, serial: str, part: str, frames: np.ndarray
                  ) -> Iterator[np.ndarray | None]:
        """rgb (H, W, 3) uint8 from image_{serial}.jpg; mask (H, W) uint8, channel 0 of
        mask_{serial}.jpg, or None where that frame has no mask."""
        if part not in IMAGE_PARTS:
            raise ValueError(f"part must be one of {IMAGE_PARTS}, got {part!r}")
        for f in np.asarray(frames).tolist():
            folder = self._image_dir(int(f))
            if part == "rgb":
                yield _load_image(folder / f"image_{serial}.jpg")
                continue
            mpath = folder / f"mask_{serial}.jpg"
            if not mpath.is_file():
                yield None
                continue
            m = _load_image(mpath, rgb=False)
            mask = np.ascontiguousarray(m if m.ndim == 2 else m[..., 0])
            size = _image_size(folder / f"image_{serial}.jpg")  # its header only
            if (mask.shape[1], mask.shape[0]) != size:
                raise SourceError(mpath, f"mask is {mask.shape[1]}x{mask.shape[0]}, image is "
                                  f"{size[0]}x{size[1]}")
            yield mask


class _UnusableCamera(SourceError):
    """A camera file that reads but whose values cannot be used: the camera is skipped."""


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as err:
        raise SourceError(path, f"unreadable image ({err})") from None


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
