"""Options of ``rafmodel eval`` and the constants the evaluation modules share.

EvalConfig and FRONTAL_SERIAL live in the torch-free :mod:`rafmodel.config` (the command
line builds ``rafmodel eval``'s options from them); they are re-exported here so the
evaluation modules import all their settings from one place.
"""

from __future__ import annotations

from rafmodel.config import FRONTAL_SERIAL, EvalConfig

PSNR_CAP = 100.0  # dB: identical frames would give +inf; the cap keeps averages finite
VIDEO_FPS = 25
MIN_PANEL_HEIGHT = 128  # tiny renders are upscaled (nearest) so labels and faces are visible
LABEL_HEIGHT = 14

__all__ = ["FRONTAL_SERIAL", "LABEL_HEIGHT", "MIN_PANEL_HEIGHT", "PSNR_CAP", "VIDEO_FPS",
           "EvalConfig"]
