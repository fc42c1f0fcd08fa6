"""Which compute device and renderer backend a run gets.

gsplat JIT-compiles CUDA code on first use and cannot run without a GPU, so it is only looked
up (never imported) here; CPU runs use our own PyTorch rasterizer.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import torch

from rafdata.errors import RafDataError
from rafmodel.config import DEVICES
from rafmodel.render import gsplat_available, resolve_backend


@dataclass(frozen=True)
class DeviceInfo:
    torch: str
    python: str
    cuda_available: bool
    cuda_devices: tuple[str, ...]
    gsplat_installed: bool
    device: str  # what --device auto picks
    renderer: str  # "gsplat" on CUDA, "torch" otherwise

    def as_dict(self) -> dict:
        return asdict(self)


def select_device(preference: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. A user's choice that cannot be met ('cuda'
    without a GPU, an unknown name) is a RafDataError: one line in every command."""
    if preference not in DEVICES:
        raise RafDataError(None, f"--device must be one of {', '.join(DEVICES)}, not "
                           f"{preference!r}")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RafDataError(None, "--device cuda asked for, but torch sees no CUDA device")
    return torch.device(preference)


def describe(preference: str = "auto") -> DeviceInfo:
    cuda = torch.cuda.is_available()
    names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if cuda else ()
    gsplat = gsplat_available()
    device = select_device(preference)
    return DeviceInfo(
        torch=torch.__version__,
        python=platform.python_version(),
        cuda_available=cuda,
        cuda_devices=names,
        gsplat_installed=gsplat,
        device=str(device),
        renderer=resolve_backend("auto", device),
    )
