"""The store's frames as the evaluation reads them: targets as training saw them, camera and
image lookups, and damaged images (skipped and counted with ``skip_corrupt``, else raised)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rafdata.errors import CorruptImageError
from rafdata.store import ImageSample, Store
from rafmodel.targets import composite_target


def target_frame(rgb: np.ndarray, mask: np.ndarray | None, width: int, height: int,
                 background: Tensor) -> tuple[Tensor, Tensor | None]:
    """A stored frame as training saw it: (3, h, w) on ``background`` and its (1, h, w) matte.

    rgb (H, W, 3) uint8, mask (H, W) uint8 or None (then the frame is used as is).
    """
    img = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    m = None if mask is None else torch.from_numpy(mask)[None, None].float() / 255.0
    target, m = composite_target(img, m, (height, width), background.cpu())
    return target[0], None if m is None else m[0]


def cameras_of(store: Store, identity: int) -> list[int]:
    """Rows of /cameras belonging to ``identity``."""
    return [c for c in range(len(store.cameras)) if int(store.cameras.identity[c]) == identity]


def image_lookup(store: Store, identity: int) -> dict[tuple[int, int], int]:
    """(timestep, camera) -> image row for one identity's held-out images."""
    rows = store.image_rows(identity=identity, held_out=True)
    return {(int(store.image_timestep[r]), int(store.image_camera[r])): int(r) for r in rows}


class DamagedImages:
    """Reads images for the evaluation; damaged ones raise, or with ``skip`` are counted.

    ``read(store, row)`` is ``store.image(row)``, or None for a damaged image when ``skip``
    (the store's :class:`CorruptImageError` otherwise). ``count`` is the number of reads
    skipped (the same image evaluated for two runs counts twice), ``rows`` the distinct
    /images rows with the store's problem for each.
    """

    def __init__(self, skip: bool = False):
        self.skip = bool(skip)
        self.count = 0
        self.rows: dict[int, str] = {}

    def read(self, store: Store, row: int) -> ImageSample | None:
        try:
            return store.image(row)  # pixels via Store.read_rgb / read_mask: CRC-checked
        except CorruptImageError as err:
            if not self.skip:
                raise
            self.count += 1
            self.rows.setdefault(int(err.row), err.problem)
            return None

    def summary(self) -> dict:
        """JSON-ready: whether skipping was on, reads skipped, and the damaged rows."""
        return {"skip_corrupt": self.skip, "skipped_corrupt": self.count,
                "corrupt_rows": sorted(self.rows)}
