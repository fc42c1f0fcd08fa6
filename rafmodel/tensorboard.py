"""TensorBoard event files for a training run, beside metrics.jsonl.

``rafmodel train`` writes them to ``RUN/tensorboard/`` (``tensorboard --logdir runs/`` shows
every run). Tags, one scalar per metrics.jsonl row (the same window means, at the same steps):

    loss/<term>          every loss part (total, l1, lpips or dssim, ...)
    metrics/psnr         dB against the composited target
    aug/swap_rate        realised RAF swap rate in the window; aug/swap_rate_total since step 0
    model/gaussians      Gaussian count after densification
    time/step_s          seconds computing a step; time/data_s waiting for data
    data/skipped_corrupt damaged samples skipped so far

and ``previews`` images (render | target) at each preview step.

Cost: torch's SummaryWriter serialises each value to a protobuf and hands it to a
background thread that writes the file. Measured here: ~0.3 ms per logged row (~10 scalars,
every ``--log-every`` = 10 steps) and ~11 ms per 512x1024 preview (every 100 steps, beside the
PNG the run saves anyway): about 0.1% and 0.5% of a 22 ms GPU step at the defaults, less on a
CPU. That is why it is on by default (``--no-tensorboard`` turns it off).
On ``--resume`` the writer purges events after the checkpoint's step, as metrics.jsonl is
truncated, so no step is shown twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# metrics.jsonl keys that are not losses, and the tag each one gets
_TAGS = {"psnr": "metrics/psnr", "swap_rate": "aug/swap_rate",
         "swap_rate_total": "aug/swap_rate_total", "gaussians": "model/gaussians",
         "step_s": "time/step_s", "data_s": "time/data_s",
         "skipped_corrupt": "data/skipped_corrupt"}
_NOT_LOGGED = {"step", "time", "epoch"}  # the x axis and wall clock are TensorBoard's own


def scalar_tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl key (None: not logged)."""
    if key in _NOT_LOGGED:
        return None
    return _TAGS.get(key, f"loss/{key}")


class TensorBoardLog:
    """Scalars and preview images of one run in ``folder`` (event files, TensorBoard's
    format). ``purge_step``: on resume, events at or after it from the interrupted run are
    hidden by TensorBoard (the step after the checkpoint's)."""

    def __init__(self, folder: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.folder = Path(folder)
        # flush_secs: a live `tensorboard` shows a run within 10 s; the writes stay off the
        # training thread either way.
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step,
                                    flush_secs=10)

    def scalars(self, row: dict[str, float], step: int) -> None:
        """One metrics.jsonl row (key -> number) at ``step``."""
        for key, value in row.items():
            tag = scalar_tag(key)
            if tag is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), global_step=step)

    def image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        """image: (H, W, 3) uint8, or float in [0, 1]."""
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        self.writer.add_image(tag, arr, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files in ``folder``, read with TensorBoard's own
    EventAccumulator (what the TensorBoard UI shows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


__all__ = ["TensorBoardLog", "read_scalars", "scalar_tag"]
