"""What a render is compared with: stored frames and cameras at the render size.

Training and evaluation must see frames the same way: area-resized to the render size,
composited on the run's background with their matte, with intrinsics that follow the resize.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rafdata.geometry import ImageTransform


def render_K(K: np.ndarray | Tensor, image_hw: tuple[int, int], width: int, height: int) -> Tensor:
    """(3, 3) float32 intrinsics of a (width, height) render from those of the stored image.

    K: OpenCV pixels of the stored image of size image_hw = (H, W).
    """
    h0, w0 = image_hw
    K = K.detach().cpu().numpy() if isinstance(K, Tensor) else np.asarray(K)
    return torch.from_numpy(ImageTransform(size=(width, height)).apply_K(K, w0, h0)).float()


def composite_target(image: Tensor, mask: Tensor | None, size: tuple[int, int],
                     background: Tensor) -> tuple[Tensor, Tensor | None]:
    """Frames as the avatar should render them.

    image (B, 3, H, W) in [0, 1]; mask (B, 1, H, W) in [0, 1] or None; size (h, w);
    background (3,). Returns (target (B, 3, h, w) on the background where the matte is 0,
    mask (B, 1, h, w) or None); without a matte the frame is used as is.
    """
    image = F.interpolate(image.float(), size=size, mode="area")
    if mask is None:
        return image, None
    mask = F.interpolate(mask.float(), size=size, mode="area")
    bg = background.to(image.device, image.dtype)[None, :, None, None]
    return image * mask + bg * (1 - mask), mask
