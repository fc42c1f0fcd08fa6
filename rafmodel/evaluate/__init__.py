"""Evaluation of trained avatars: self-driving, cross-driving, videos and a synthetic benchmark.

``evaluate(runs, store, cfg)`` loads one or more runs of ``rafmodel train`` and measures:

Self-driving
    Each run's subject is rendered from its own tracked coefficients of its held-out
    sequence (FREE, never trained on) into every stored camera (or ``cfg.cameras``) and
    compared with the real frames, resized to the run's render size and composited on the
    run's background colour with their matte, exactly as training saw its targets. PSNR and
    SSIM are averaged over the head matte when the store has mattes (full-frame values are
    reported beside them); LPIPS-VGG over the whole composited frame when VGG16 weights exist.

Cross-driving
    The avatar is driven by the held-out sequences of other identities (``cfg.drivers``;
    default all with held-out *images* in the store). Pose: the driver's *rotation* with the subject's own mean
    translation and median scale, so the head stays where the avatar's cameras expect it (a
    driver's translation is in its own capture's world frame, and its scale is its head size:
    applied to another subject they would push the head off-centre or resize it). The paper
    transfers the driver's expression and pose; rotation is the part of pose that carries
    over. Rendered from the subject's frontal camera (serial 222200037 when present, else the
    first of ``cfg.cameras`` / the subject's cameras). Side-by-side mp4 videos (driver | GT |
    one column per run) and a PNG grid of chosen frames are written.

AED, APD, emotion similarity (self- and cross-driving alike)
    The driver frame (self: the subject's own held-out frame of the same timestep and camera;
    cross: the driver's real frame) and the render are both read by the same extractors and
    the read-outs compared: ``aed`` mean |exp - exp'| per dimension of the regressor's own
    space (any dimension), ``apd_rot`` / ``apd_trans`` the same over its pose's rotation /
    translation dims, ``emotion_sim`` the cosine similarity of the emotion features (the
    built-in :mod:`rafmodel.emotion` extractor by default). The regressor's read-out of the
    render against the tracked coefficients is an extra (``regressor_tracked_*``), only for a
    regressor of the store's space. Every section's ``mean`` carries ``psnr``, ``ssim``,
    ``lpips``, ``aed``, ``apd_rot``, ``apd_trans``, ``emotion_sim`` (null when not computed;
    cross-driving's PSNR / SSIM / LPIPS are against the synthetic ground truth).

Synthetic ground truth
    When the store was made from ``rafdata synth`` data (``Store.synthetic``), the generator's
    manifest holds every identity's coefficients, so the subject's synthetic head can be
    rendered with the driver's coefficients and the same pose and camera: a ground-truth image
    for every cross-driven frame. It uses the generator's *noise-free* coefficients of the
    driver's frames (expression and rotation; translation and scale as for the avatar): what
    the driver really did, as self-driving's real frames show what the subject really did.
    The avatar receives the stored (tracked) ones, which carry the synth's tracker noise
    (``SynthConfig.noise``, 0.01 per dimension by default), reported per driver as
    ``driver_noise_exp_l1``. That noise is not negligible in pixels: rendering a subject's
    head with its tracked instead of its true coefficients loses ~10 dB of PSNR at 64x80
    (measured: ~22-24 dB vs ~33 dB against the stored frame), so cross-driving GT PSNR has a
    ceiling well below self-driving's cap. The generator also gives a coefficient read-back
    without a regressor: each avatar frame is matched (mean absolute pixel error) against the
    ground-truth renders of all evaluated frames of that driver and the true coefficients of
    the best match are compared with those of the frame (``readback_exp_l1``,
    ``readback_pose_l1``, L1 per dimension; ``readback_hit`` = share matched to its own
    frame). It is only as fine as the set of candidate frames (``--frames``).

Outputs in ``cfg.out`` (default ``RUN/eval`` for one run, ``PARENT/eval`` for several):
``metrics.json`` (one run) or ``{label}/metrics.json`` (several), ``summary.json``,
``videos/{subject}_by_{driver}.mp4`` and ``grid_{subject}.png``.

Damaged images (``cfg.skip_corrupt``): a stored frame the store refuses (CRC-32 mismatch,
undecodable chunk) stops the evaluation with the store's one-line error; with
``skip_corrupt`` it is left out (self-driving: the frame is not scored; cross-driving: the
driver panel is grey) and counted: ``skipped_corrupt`` and ``corrupt_rows`` in summary.json,
each metrics.json and each run's self-driving section.

Modules: :mod:`~rafmodel.evaluate.config` (``EvalConfig``), :mod:`~rafmodel.evaluate.runs`
(loading runs, rendering avatars), :mod:`~rafmodel.evaluate.frames` (stored frames, damaged
images), :mod:`~rafmodel.evaluate.metrics`, :mod:`~rafmodel.evaluate.self_driving`,
:mod:`~rafmodel.evaluate.cross_driving`, :mod:`~rafmodel.evaluate.ground_truth` (synthetic
stores), :mod:`~rafmodel.evaluate.media` (videos and grids) and
:mod:`~rafmodel.evaluate.report` (``evaluate``, what ``rafmodel eval`` calls).
"""

from __future__ import annotations

from rafmodel.evaluate.config import PSNR_CAP, EvalConfig
from rafmodel.evaluate.cross_driving import evaluate_cross
from rafmodel.evaluate.frames import DamagedImages, target_frame
from rafmodel.evaluate.ground_truth import SynthGroundTruth, load_synth
from rafmodel.evaluate.media import Mp4Writer, compose_row
from rafmodel.evaluate.metrics import frame_metrics, pick_frames
from rafmodel.evaluate.report import evaluate
from rafmodel.evaluate.runs import (
    RunInfo,
    load_run,
    method_label,
    render_avatar,
    split_runs_and_store,
)
from rafmodel.evaluate.self_driving import evaluate_self
from rafmodel.targets import render_K

__all__ = ["PSNR_CAP", "DamagedImages", "EvalConfig", "Mp4Writer", "RunInfo",
           "SynthGroundTruth", "compose_row", "evaluate", "evaluate_cross", "evaluate_self",
           "frame_metrics", "load_run", "load_synth", "method_label", "pick_frames",
           "render_K", "render_avatar", "split_runs_and_store", "target_frame"]
