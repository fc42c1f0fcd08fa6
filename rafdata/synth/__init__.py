"""Synthetic NeRSemble-like data with known coefficients: the data of the tests and the demo.

A few ellipsoid heads (one per participant) are ray-cast from a calibrated camera rig while
their expression and pose follow known trajectories; the videos, mattes, calibration and
tracker outputs are written in the layouts real tools produce (NeRSemble v2 download kit,
Multiview-3DMM-Fitting BFM params, NeRSemble-benchmark FLAME tracking, Gaussian Head Avatar
preprocessing). See :class:`SynthConfig`, :func:`write_dataset`, :func:`write_gha_dataset`.
"""

from rafdata.geometry import project
from rafdata.synth.config import EXP_DIM, FPS, ID_DIM, SynthConfig
from rafdata.synth.geometry import canonical_to_world, rodrigues
from rafdata.synth.head import NOSE_TIP, SEMANTIC_DIMS, SynthHead, composite
from rafdata.synth.motion import (
    flame_from_exp_matrix,
    identity_coeff,
    identity_scale,
    tracked_coefficients,
    true_coefficients,
)
from rafdata.synth.rig import background_image, camera_rig
from rafdata.synth.writer import (
    gha_frame_table,
    load_manifest,
    manifest_config,
    render_sequence,
    write_dataset,
    write_gha_dataset,
)

__all__ = [
    "EXP_DIM",
    "FPS",
    "ID_DIM",
    "NOSE_TIP",
    "SEMANTIC_DIMS",
    "SynthConfig",
    "SynthHead",
    "background_image",
    "camera_rig",
    "canonical_to_world",
    "composite",
    "flame_from_exp_matrix",
    "gha_frame_table",
    "identity_coeff",
    "identity_scale",
    "load_manifest",
    "manifest_config",
    "project",
    "render_sequence",
    "rodrigues",
    "tracked_coefficients",
    "true_coefficients",
    "write_dataset",
    "write_gha_dataset",
]
