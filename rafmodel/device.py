"""Which compute device and renderer backend a run gets.

gsplat JIT-compiles CUDA code on first use and cannot run without a GPU, so it is only looked
up (never imported) here; CPU runs use our own PyTorch rasterizer.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import asdict, dataclass

import torch


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
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU raises ValueError."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(preference)


def describe(preference: str = "auto") -> DeviceInfo:
    cuda = torch.cuda.is_available()
    names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if cuda else ()
    gsplat = importlib.util.find_spec("gsplat") is not None
    device = select_device(preference)
    return DeviceInfo(
        torch=torch.__version__,
        python=platform.python_version(),
        cuda_available=cuda,
        cuda_devices=names,
        gsplat_installed=gsplat,
        device=str(device),
        renderer="gsplat" if device.type == "cuda" and gsplat else "torch",
    )
