"""Synthetic ground truth for cross-driving: the generator's heads rendered with any
coefficients (stores made from ``rafdata synth`` data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rafdata.store import Store


class SynthGroundTruth:
    """Renders identities of a synthetic store with any coefficients (the generator's heads).

    manifest: the generator's manifest (``Store.synthetic`` or ``synth.json``). Coefficients
    must be in the generator's 64-dim BFM-like space; ``true_coefficients`` gives the
    noise-free ones of a sequence for stores that hold another space (FLAME).
    """

    def __init__(self, manifest: dict):
        from rafdata.synth.writer import config_of

        self.manifest = manifest
        self.config = config_of(manifest)
        self.participants: dict = manifest.get("participants", {})
        self._heads: dict[str, Any] = {}

    def has(self, participant: str) -> bool:
        return self._key(participant) is not None

    def _key(self, participant: str) -> str | None:
        from rafdata.store import identity_matches

        for k in self.participants:
            if identity_matches(str(k), str(participant)):
                return str(k)
        return None

    def head(self, participant: str):
        """The participant's :class:`rafdata.synth.SynthHead` (cached)."""
        from rafdata.synth import SynthHead
        from rafdata.synth.writer import has_detail

        key = self._key(participant)
        if key is None:
            raise KeyError(participant)
        if key not in self._heads:
            coeff = self.participants[key]["id_coeff"]
            self._heads[key] = SynthHead(np.asarray(coeff, dtype=np.float64),
                                         detail=has_detail(self.manifest))
        return self._heads[key]

    def true_coefficients(self, participant: str, sequence: str) -> dict:
        """Noise-free exp (N, 64), pose (N, 6), scale of every video frame of a sequence."""
        from rafdata.synth import true_coefficients

        return true_coefficients(self.config, self._key(participant) or participant, sequence)

    def render(self, participant: str, exp: np.ndarray, pose: np.ndarray, scale: float,
               K: np.ndarray, world_to_cam: np.ndarray, width: int, height: int,
               background: Tensor) -> tuple[Tensor, Tensor]:
        """(image (3, h, w) on ``background``, alpha (1, h, w)) float32, like the avatar's.

        exp (64,), pose (6,) axis-angle + translation (m), scale (m per canonical unit), K
        (3, 3) OpenCV at (width, height), world_to_cam (4, 4), background (3,) in [0, 1].
        """
        rgb, alpha = self.head(participant).render(np.asarray(exp, np.float64),
                                                   np.asarray(pose, np.float64), float(scale),
                                                   np.asarray(K, np.float64),
                                                   np.asarray(world_to_cam, np.float64),
                                                   width, height)
        a = torch.from_numpy(alpha)[None]
        img = torch.from_numpy(rgb).permute(2, 0, 1)
        bg = background.detach().float().cpu()[:, None, None]
        return img * a + bg * (1 - a), a


def load_synth(store: Store, synth_root: str | Path | None) -> tuple[SynthGroundTruth | None,
                                                                     str]:
    """The ground-truth renderer of a synthetic store and a note saying where it came from."""
    manifest = store.synthetic
    where = "the store's `synthetic` manifest"
    if synth_root is not None:
        from rafdata.synth import load_manifest

        manifest = load_manifest(Path(synth_root))
        where = f"{Path(synth_root) / 'synth.json'}"
    if manifest is None:
        return None, "not a synthetic store: no ground truth for cross-driving"
    if not manifest.get("participants") or "config" not in manifest:
        return None, (f"{where} lacks participants/config: pass --synth-root DIR (the "
                      "rafdata synth folder) for cross-driving ground truth")
    return SynthGroundTruth(manifest), f"rafdata.synth generator, identities from {where}"
