"""What every source layout adapter yields: cameras, tracking and frames of one sequence.

A *source* is a folder in some upstream layout (NeRSemble v2 raw, Gaussian Head Avatar
preprocessed, ...). Adapters turn it into :class:`SequenceSource` objects; ``rafdata.ingest``
only ever talks to this interface, so a new layout is one new module in ``rafdata/sources``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from rafdata.store import is_number  # noqa: F401 - the adapters take it from here


@dataclass(frozen=True)
class CameraCalib:
    """One calibrated camera as the source images see it.

    K: (3, 3) float64 intrinsics in pixels of the source image, OpenCV convention (the centre
    of pixel (col, row) projects to (col, row)). world_to_cam: (4, 4) float64, OpenCV camera
    axes (x right, y down, z forward). color: optional (3, T) polynomial colour-correction matrix
    (NeRSemble's color_calibration.json; applied by :func:`rafdata.geometry.color_correct`).
    """

    serial: str
    K: np.ndarray
    world_to_cam: np.ndarray
    color: np.ndarray | None = None


@dataclass
class Tracking:
    """Tracked coefficients of one sequence, one row per tracked video frame.

    frames: (T,) int64 video frame indices, strictly increasing. exp: (T, D) float32
    expression vectors in space ``exp_space``. pose: (T, 6) float32, axis-angle rotation then
    translation, so a canonical point x maps to world as ``scale * R(pose[:3]) @ x + pose[3:]``.
    scale: (T,) float32. ``path`` is the file (or folder) they were read from, for messages.
    """

    frames: np.ndarray
    exp: np.ndarray
    pose: np.ndarray
    scale: np.ndarray
    exp_space: str
    path: Path


@dataclass
class Frame:
    """One decoded image: rgb (H, W, 3) uint8 and, where the source has a matte, mask (H, W) uint8."""

    rgb: np.ndarray
    mask: np.ndarray | None = None


IMAGE_PARTS = ("rgb", "mask")


class SequenceSource(Protocol):
    """One captured sequence of one participant (adapters subclass it for ``read_frames``)."""

    participant: str  # e.g. "388": the folder name, kept as the source writes it
    name: str  # e.g. "EXP-1-head"; "all" where the layout has no sequences
    path: Path  # the sequence's folder, for messages

    def cameras(self) -> list[CameraCalib]:
        """Calibrated cameras with images in this sequence (raises SourceError on bad calibration)."""
        ...

    def tracking(self) -> Tracking:
        """Validated tracking (finite, shapes checked); raises SourceError naming the file."""
        ...

    def check_camera(self, serial: str, frames: np.ndarray) -> None:
        """Cheap check, without decoding, that ``frames`` can be read for this camera.

        Raises SourceError (the camera is unusable: missing, unreadable, corrupt) or
        FrameCountError (the camera has fewer frames than tracking needs).
        """
        ...

    def frame_size(self, serial: str) -> tuple[int, int]:
        """(width, height) in pixels of this camera's source frames, without decoding."""
        ...

    def image_parts(self, serial: str) -> tuple[str, ...]:
        """The parts of this camera's images: ``("rgb", "mask")`` where it has mattes (every
        frame or some), ``("rgb",)`` where it has none. Each part reads on its own
        (:meth:`read_part`), so ingest decodes them on separate threads."""
        ...

    def read_part(self, serial: str, part: str, frames: np.ndarray) -> Iterator[np.ndarray | None]:
        """Decode one part of the given frames of one camera, in order, one at a time.

        part "rgb": (H, W, 3) uint8 images; "mask": (H, W) uint8 mattes, or None for a frame
        without one. Raises SourceError naming the file that cannot be read.
        """
        ...

    def read_frames(self, serial: str, frames: np.ndarray) -> Iterator[Frame]:
        """Decode the given frames of one camera, colour and matte together, in order."""
        parts = self.image_parts(serial)
        rgbs = self.read_part(serial, "rgb", frames)
        if "mask" not in parts:
            return (Frame(rgb=rgb) for rgb in rgbs)
        masks = self.read_part(serial, "mask", frames)
        return (Frame(rgb=rgb, mask=m) for rgb, m in zip(rgbs, masks, strict=True))


class Source(Protocol):
    """A dataset root in one layout."""

    layout: str
    root: Path

    def participants(self) -> list[str]:
        ...

    def sequences(self, participant: str) -> list[SequenceSource]:
        ...


@dataclass
class SourceOptions:
    """Choices that shape what a source yields (from the ingest command line)."""

    tracking_root: Path | None = None  # where tracking lives when it is not beside the videos
    tracking_format: str = "auto"  # auto | bfm | flame
    flame_exp: str = "expression+jaw"  # which FLAME parts form the expression vector
    participants: Sequence[str] | None = None
    sequences: Sequence[str] | None = None
    cameras: Sequence[str] | None = None
    extra: dict = field(default_factory=dict)


# Folder names are data: participant numbers, sequence names and frame numbers come from
# them (see rafdata.store.is_number: "017" is a number, "①" and " 17" are names).
def shown(name: str) -> str:
    """``name`` quoted for a message, printable whatever it holds.

    A folder name that is not valid UTF-8 reaches Python as surrogate escapes, which cannot be
    printed or stored; they are shown as ``\\xff``. The quotes make stray spaces visible.
    """
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return f"'{text}'" if text.isprintable() else repr(text)


def name_problem(name: str) -> str | None:
    """Why a folder name cannot become a participant, sequence or camera name, or None.

    The store keeps names as UTF-8 text and users type them on the command line, so names
    that are not UTF-8, that hide whitespace at either end, or that hold control characters
    are refused (``"FREE "`` would silently not match ``--held-out FREE``).
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if name != name.strip():
        return "name has leading or trailing whitespace"
    if not name.isprintable():
        return "name holds control characters"
    if name.isdigit() and not is_number(name):
        return "name looks like a number but is not ASCII digits"
    return None
