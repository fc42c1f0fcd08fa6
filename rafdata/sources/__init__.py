"""Source layout adapters: NeRSemble v2 raw (``nersemble``) and GHA preprocessed (``gha``).

:func:`open_source` picks the adapter for a dataset root; everything downstream talks to the
:mod:`rafdata.sources.base` interface only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rafdata.config import LAYOUTS
from rafdata.errors import SourceError
from rafdata.sources.base import (
    CameraCalib,
    Frame,
    SequenceSource,
    Source,
    SourceOptions,
    Tracking,
)
from rafdata.sources.gha import GhaSource
from rafdata.sources.nersemble import NersembleSource

__all__ = [
    "LAYOUTS",
    "CameraCalib",
    "Frame",
    "GhaSource",
    "NersembleSource",
    "SequenceSource",
    "Source",
    "SourceOptions",
    "Tracking",
    "detect_layout",
    "open_source",
]



def _any(it) -> bool:
    return next(iter(it), None) is not None  # globs are lazy: stop at the first hit


def _looks_nersemble(base: Path) -> bool:
    return _any(base.glob("*/calibration/camera_params.json")) or _any(
        p for p in base.glob("*/sequences") if p.is_dir()
    )


def _looks_gha(base: Path) -> bool:
    for pdir in base.iterdir():
        if not (pdir.is_dir() and (pdir / "params").is_dir() and (pdir / "images").is_dir()):
            continue
        if _any(pdir.glob("images/*/image_*.jpg")):
            return True
    return False


def detect_layout(root: Path, options: SourceOptions | None = None) -> str:
    """"nersemble" or "gha" for a dataset root; SourceError naming the root otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(root, "source folder not found")
    track = Path(options.tracking_root) if options and options.tracking_root else None
    ners = _looks_nersemble(root) or (track is not None and track.is_dir()
                                      and _looks_nersemble(track))
    gha = _looks_gha(root)
    if ners and gha:
        raise SourceError(root, "looks like both the nersemble and the gha layout; "
                          "choose one with --layout")
    if ners:
        return "nersemble"
    if gha:
        return "gha"
    raise SourceError(root, "unrecognised source layout: expected NeRSemble "
                      "({pid}/calibration/camera_params.json or {pid}/sequences/) or GHA "
                      "({pid}/images/{frame}/image_{serial}.jpg with {pid}/params/)")


def open_source(
    root: Path,
    layout: str = "auto",
    options: SourceOptions | None = None,
    warn: Callable[[str], None] | None = None,
) -> Source:
    """Open a dataset root as a :class:`Source` of the given (or detected) layout.

    ``warn`` receives one line per thing the source passes over: a sequence without
    tracking, a folder whose name cannot be used, a camera with an unusable calibration.
    """
    root = Path(root)
    options = options or SourceOptions()
    if layout not in LAYOUTS:
        raise SourceError(root, f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise SourceError(root, "source folder not found")
    if layout == "auto":
        layout = detect_layout(root, options)
    if layout == "nersemble":
        return NersembleSource(root, options, warn=warn)
    return GhaSource(root, options, warn=warn)
