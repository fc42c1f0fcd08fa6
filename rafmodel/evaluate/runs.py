"""Trained runs as the evaluation sees them: loading, labels, rendering an avatar."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rafdata.errors import RafDataError


@dataclass
class RunInfo:
    """A trained run as evaluation sees it."""

    path: Path
    label: str
    subject: str
    train: dict[str, Any]
    width: int
    height: int
    background: Tensor  # (3,) float in [0, 1]
    model: torch.nn.Module
    checkpoint: Path
    method: dict[str, Any] = field(default_factory=dict)


def method_label(train: dict[str, Any]) -> str:
    """The Table 2 row name of a run: its aug, plus topk / bank / p when not the defaults."""
    aug = str(train.get("aug", "?"))
    parts = [aug]
    if aug == "raf":
        if int(train.get("topk", 1)) != 1:
            parts.append(f"top{int(train['topk'])}")
        if str(train.get("bank", "full")) != "full":
            parts.append(f"bank={train['bank']}")
        if float(train.get("p", 0.5)) != 0.5:
            parts.append(f"p={train['p']}")
    if aug == "noise" and float(train.get("noise_std", 0.08)) != 0.08:
        parts.append(f"std={train['noise_std']}")
    return " ".join(parts)


def split_runs_and_store(paths: Sequence[str | Path], *,
                         store_required: bool) -> tuple[list[Path], Path | None]:
    """The (runs, store) of a command's RUN... STORE arguments (runs: folders or checkpoints).

    store_required (``rafmodel eval``: RUN... STORE): the last path is the store, whatever it
    is. Otherwise (``rafmodel view``: RUN... [STORE]) the last of several paths is the store
    when it is neither a checkpoint (``.pt``) nor a folder (those are runs), and None means
    each run's training store. RafDataError (one line) when no run, or no required store, is
    given.
    """
    runs = [Path(p) for p in paths]
    if store_required:
        if len(runs) < 2:
            raise RafDataError(None, "give at least one RUN and the STORE (the last argument)")
        return runs[:-1], runs[-1]
    store = None
    if len(runs) > 1 and runs[-1].suffix != ".pt" and not runs[-1].is_dir():
        store = runs.pop()
    if not runs:
        raise RafDataError(None, "give at least one RUN folder (or checkpoint)")
    return runs, store


def load_run(path: str | Path, device: torch.device) -> RunInfo:
    """A run folder (with config.json and checkpoints/last.pt) or a checkpoint file in one."""
    from rafmodel.train import load_avatar

    path = Path(path)
    if path.is_file():
        ckpt = path
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        run, ckpt = path, path / "checkpoints" / "last.pt"
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise RafDataError(run, "not a rafmodel run (no config.json)")
    try:
        info = json.loads(cfg_path.read_text())
        train = info["train"]
        width, height = (int(v) for v in info["render_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise RafDataError(cfg_path, f"unreadable run config ({err})") from None
    if not ckpt.is_file():
        raise RafDataError(ckpt, "no checkpoint (has the run saved one?)")
    model = load_avatar(ckpt, device)
    bg = torch.tensor([float(v) for v in train.get("background", (1, 1, 1))], device=device)
    return RunInfo(path=run, label=method_label(train), subject=str(info.get("subject",
                   train["subject"])), train=train, width=width, height=height, background=bg,
                   model=model, checkpoint=ckpt,
                   method={k: train.get(k) for k in ("aug", "p", "topk", "noise_std", "bank",
                                                     "iters", "seed")})


def unique_labels(runs: list[RunInfo]) -> None:
    """Make run labels unique (two vanilla runs: 'vanilla (runA)', 'vanilla (runB)')."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"


@torch.no_grad()
def render_avatar(run: RunInfo, exp: Tensor, pose: Tensor, scale: Tensor, K: Tensor,
                  world_to_cam: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(image (3, h, w) in [0, 1] on the CPU, alpha (1, h, w)) of the avatar at render size.

    exp (D,), pose (6,), scale (), K (3, 3) OpenCV at render size, world_to_cam (4, 4).
    """
    from rafmodel.render import render

    dev = run.background.device
    g = run.model(exp.to(dev).float(), pose.to(dev).float(), scale.to(dev).float())
    out = render(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                 world_to_cam.to(dev).float(), K.to(dev).float(), run.width, run.height,
                 background=run.background, backend=backend)
    return (out.image.permute(2, 0, 1).clamp(0, 1).cpu(),
            out.alpha.permute(2, 0, 1).cpu())
