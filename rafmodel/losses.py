"""Image losses and metrics: L1, SSIM / D-SSIM, PSNR and LPIPS-VGG, with no downloads.

The paper trains with ``L1 + 0.1 * LPIPS-VGG``. LPIPS needs two sets of weights:

- the VGG16 trunk, ImageNet-trained. Only torchvision downloads it, and torchvision is not a
  dependency here, so :class:`VGG16Features` rebuilds ``torchvision.models.vgg16().features``
  layer for layer and loads a torchvision checkpoint the user supplies (``--vgg-weights``) or
  finds in the torchvision cache, ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``;
- the five small linear heads of LPIPS v0.1, calibrated on human judgements. They are looked
  for in a file the user names, else in an installed ``lpips`` or ``torchmetrics`` package
  (found on disk, never imported). Without them the heads are uniform (1/C per channel) and
  the module says it is "LPIPS-like, uncalibrated": the trunk still makes it a perceptual
  loss, but its values are not comparable with published LPIPS numbers.

Nothing here ever downloads. When the VGG16 trunk is absent, :func:`build_loss` falls back to
``L1 + dssim * D-SSIM`` and warns, naming the path it looked at.

All images are float tensors (B, C, H, W) with values in [0, data_range] (default [0, 1]);
masks are (B, 1, H, W) with values in [0, 1] (1 = counts).

Typical use::

    loss_fn, description = build_loss(LossConfig(vgg_weights=args.vgg_weights), device, warn)
    total, parts = loss_fn(pred, target)          # parts: {"l1": .., "lpips": .., "total": ..}

    metric = try_load_lpips(vgg_path, warn=print)  # None when the trunk is missing
    psnr(pred, gt, mask=m), ssim(pred, gt, mask=m), metric(pred * m, gt * m)
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rafmodel.config import LossConfig

__all__ = [
    "LPIPS",
    "LPIPS_CHANNELS",
    "LossConfig",
    "ReconstructionLoss",
    "VGG16Features",
    "VGG16_CACHE_NAME",
    "VGG16_CONV_INDICES",
    "build_loss",
    "d_ssim",
    "default_vgg_path",
    "find_lpips_heads",
    "load_lpips_heads",
    "load_vgg16_features_state",
    "psnr",
    "ssim",
    "to_host",
    "try_load_lpips",
]

Warn = Callable[[str], None]

# torchvision's file name for the ImageNet VGG16 weights (VGG16_Weights.IMAGENET1K_V1).
VGG16_CACHE_NAME = "vgg16-397923af.pth"

# torchvision's `vgg16().features`: config "D" = 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M.
# Each conv is followed by a ReLU, so these are the indices holding weights.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_CFG = "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M".split()
# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the five LPIPS taps (the ends of the
# slices [0,4), [4,9), [9,16), [16,23), [23,30) in lpips' pretrained_networks.vgg16).
_VGG16_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)

# LPIPS v0.1 "ScalingLayer": inputs in [-1, 1] are shifted/scaled to roughly the ImageNet
# normalisation the trunk was trained with.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_LPIPS_EPS = 1e-10  # lpips.normalize_tensor's epsilon

# Where installed packages keep the LPIPS v0.1 VGG heads (relative to the package folder).
_PACKAGED_HEADS = (
    ("lpips", ("weights", "v0.1", "vgg.pth")),
    ("torchmetrics", ("functional", "image", "lpips_models", "vgg.pth")),
)


# --------------------------------------------------------------------------------------------
# SSIM and PSNR
# --------------------------------------------------------------------------------------------


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    """Depthwise 2-D Gaussian kernel (channels, 1, size, size), summing to 1 per channel."""
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"{name}: expected two (B,C,H,W) tensors of one shape, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )


def _check_mask(mask: Tensor, x: Tensor, name: str) -> None:
    b, _, h, w = x.shape
    if mask.dim() != 4 or mask.shape[0] != b or mask.shape[1] != 1 or mask.shape[2:] != (h, w):
        raise ValueError(
            f"{name}: mask must be (B,1,H,W) = ({b},1,{h},{w}), got {tuple(mask.shape)}"
        )


def ssim_map(
    x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> Tensor:
    """Per-pixel SSIM (Wang et al. 2004) of ``x`` and ``y``, (B, C, H', W').

    Gaussian-weighted local statistics with K1 = 0.01, K2 = 0.03, computed over the 'valid'
    region only (H' = H - window + 1), as skimage/torchmetrics do, so no padding value leaks
    into the borders. Images smaller than the window use the largest odd window that fits.
    """
    _check_pair(x, y, "ssim")
    # float32 at least: E[x^2] - E[x]^2 cancels catastrophically in half precision.
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    c = x.shape[1]
    size = min(window, x.shape[2], x.shape[3])
    if size % 2 == 0:
        size -= 1
    if size < 1:
        raise ValueError(f"ssim: image {tuple(x.shape[2:])} is empty")
    kernel = _gaussian_window(size, sigma, c, x)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    # Same expression for x and y so SSIM(x, x) is exactly 1 and SSIM(x, y) == SSIM(y, x).
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def ssim(
    x: Tensor,
    y: Tensor,
    window: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean SSIM per batch element, (B,); 1 for identical images, differentiable.

    Args:
        x, y: (B, C, H, W) in [0, data_range].
        window, sigma: Gaussian window size (odd) and standard deviation, in pixels.
        data_range: the value span of the images (1 for [0,1], 255 for 8-bit).
        mask: optional (B, 1, H, W) weights in [0, 1]; the SSIM map is averaged with these
            weights (cropped to the valid region). An all-zero mask gives NaN for that element.
    """
    smap = ssim_map(x, y, window, sigma, data_range)
    if mask is None:
        return smap.mean(dim=(1, 2, 3))
    _check_mask(mask, x, "ssim")
    h, w = smap.shape[2:]
    top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    m = mask[:, :, top : top + h, left : left + w].to(smap.dtype)
    return (smap * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * smap.shape[1])


def d_ssim(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """Structural dissimilarity (1 - SSIM) / 2 per batch element, (B,), in [0, 1]."""
    return (1.0 - ssim(x, y, **kwargs)) / 2.0


def psnr(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    mask: Tensor | None = None,
    cap: float | None = None,
) -> Tensor:
    """Peak signal-to-noise ratio per batch element in dB, (B,).

    ``10 log10(data_range^2 / MSE)`` with the MSE over all channels and pixels (only the
    masked ones when ``mask`` is given, weighted by its values).

    Identical images have MSE 0 and PSNR ``+inf``; pass ``cap`` (e.g. 100.0) to clamp to a
    finite maximum so that averages over frames stay finite. An all-zero mask gives NaN.
    """
    _check_pair(x, y, "psnr")
    dtype = torch.promote_types(x.dtype, torch.float32)
    se = (x.to(dtype) - y.to(dtype)) ** 2
    if mask is None:
        mse = se.mean(dim=(1, 2, 3))
    else:
        _check_mask(mask, x, "psnr")
        m = mask.to(dtype)
        mse = (se * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * x.shape[1])
    # log10(0) = -inf, so mse == 0 yields +inf without special-casing.
    out = 10.0 * torch.log10(data_range**2 / mse)
    if cap is not None:
        out = out.clamp(max=cap)
    return out


# --------------------------------------------------------------------------------------------
# VGG16 trunk and LPIPS
# --------------------------------------------------------------------------------------------


def default_vgg_path() -> Path:
    """Where torchvision caches the ImageNet VGG16: ``$TORCH_HOME/hub/checkpoints/...``.

    ``torch.hub.get_dir()`` applies torchvision's own rules (TORCH_HOME, then
    XDG_CACHE_HOME/torch, then ~/.cache/torch), read afresh on every call.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_CACHE_NAME


def find_lpips_heads() -> Path | None:
    """The LPIPS v0.1 VGG heads shipped by an installed ``lpips`` or ``torchmetrics``, or None.

    Located with ``importlib.util.find_spec`` so neither package is imported (both import
    torchvision, which does not work beside this torch).
    """
    for package, parts in _PACKAGED_HEADS:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            candidate = Path(root).joinpath(*parts)
            if candidate.is_file():
                return candidate
    return None


def _load_state(path: Path, what: str) -> Mapping[str, Tensor]:
    """torch.load a weights-only state dict, unwrapping {"state_dict": ...} / {"model": ...}."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, a pickle of code, not a torch file at all
        raise ValueError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: {what} must be a state dict, got {type(obj).__name__}")
    return obj


def _vgg16_layers() -> nn.Sequential:
    """``torchvision.models.vgg16().features`` with the same module indices (0..30)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1))
            # Not in-place (torchvision's is): the taps keep ReLU outputs that later layers
            # must not overwrite.
            layers.append(nn.ReLU(inplace=False))
            in_ch = int(v)
    return nn.Sequential(*layers)


def load_vgg16_features_state(path: str | Path) -> dict[str, Tensor]:
    """Read the ``features.N.weight/bias`` tensors of a torchvision VGG16 checkpoint.

    Accepts a plain state dict (torchvision's ``vgg16-397923af.pth``), one wrapped under
    ``"state_dict"``/``"model"``, and a ``module.`` prefix (DataParallel). ``classifier.*``
    keys are ignored. Returns keys without the ``features.`` prefix (``"0.weight"``, ...).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, or missing keys / wrong shapes (named in the message).
    """
    path = Path(path).expanduser()
    state = _load_state(path, "VGG16 checkpoint")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key[len("module.") :] if key.startswith("module.") else key
        if k.startswith("features.") and isinstance(value, Tensor):
            out[k[len("features.") :]] = value
    expected = _vgg16_layers().state_dict()
    missing = [f"features.{k}" for k in expected if k not in out]
    if missing:
        raise ValueError(
            f"{path}: not a torchvision VGG16 checkpoint, missing {len(missing)} keys "
            f"(e.g. {', '.join(missing[:3])})"
        )
    for k, ref in expected.items():
        if out[k].shape != ref.shape:
            raise ValueError(
                f"{path}: features.{k} has shape {tuple(out[k].shape)}, VGG16 needs "
                f"{tuple(ref.shape)}"
            )
    return {k: out[k] for k in expected}


class VGG16Features(nn.Module):
    """Frozen VGG16 convolutional trunk returning the five LPIPS taps.

    ``self.features`` has exactly torchvision's ``vgg16().features`` layout (convs at
    :data:`VGG16_CONV_INDICES`, ReLU after each, max-pools at 4, 9, 16, 23, 30), so
    ``features.*`` keys of a torchvision checkpoint load as they are.

    forward(x): x (B, 3, H, W), already normalised for the trunk; H, W >= 16 (four pools
    precede relu5_3). Returns [relu1_2 (B,64,H,W), relu2_2 (B,128,H/2,W/2),
    relu3_3 (B,256,H/4,W/4), relu4_3 (B,512,H/8,W/8), relu5_3 (B,512,H/16,W/16)].

    Parameters never require grad and the module stays in eval mode (gradients still flow to
    the input).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_layers()
        self.source = "random init (no weights loaded)"
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> VGG16Features:
        """Trunk with the weights of a torchvision VGG16 checkpoint (see loader for formats)."""
        net = cls()
        net.features.load_state_dict(load_vgg16_features_state(path))
        net.source = str(Path(path).expanduser())
        return net

    def train(self, mode: bool = True) -> VGG16Features:
        # Frozen feature extractor: a parent's .train() must not flip it.
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps: list[Tensor] = []
        h = x
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG16_TAPS:
                taps.append(h)
                if i == _VGG16_TAPS[-1]:
                    break  # the final max-pool (30) is not used by LPIPS
        return taps


def load_lpips_heads(path: str | Path) -> list[Tensor]:
    """The five LPIPS linear heads from an lpips-format file, as (1, C, 1, 1) tensors.

    Keys ``lin{i}.model.1.weight`` (lpips' layout, dropout at model.0) or
    ``lin{i}.model.0.weight`` (saved without dropout) for i = 0..4, with C = 64, 128, 256,
    512, 512. Weights must be non-negative, as LPIPS training keeps them.
    """
    path = Path(path).expanduser()
    state = _load_state(path, "LPIPS linear heads")
    heads: list[Tensor] = []
    for i, c in enumerate(LPIPS_CHANNELS):
        w = state.get(f"lin{i}.model.1.weight", state.get(f"lin{i}.model.0.weight"))
        if w is None:
            raise ValueError(f"{path}: LPIPS heads file lacks lin{i}.model.1.weight")
        if w.numel() != c:
            raise ValueError(
                f"{path}: lin{i} has {w.numel()} weights, LPIPS-VGG needs {c} (a VGG heads "
                "file, not alex/squeeze?)"
            )
        if bool((w < 0).any()):
            raise ValueError(f"{path}: lin{i} has negative weights; LPIPS heads are >= 0")
        heads.append(w.detach().float().reshape(1, c, 1, 1).clone())
    return heads


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018, v0.1) distance, (B,); 0 for identical images.

    For images in [0, 1]: map to [-1, 1], apply LPIPS' scaling layer, take the five VGG16
    taps, unit-normalise each along channels, square the differences, weight channels with a
    non-negative 1x1 linear head per tap, average spatially and sum over taps.

    With calibrated heads (``calibrated``) the values match the ``lpips`` package's
    ``LPIPS(net='vgg')(x, y, normalize=True)``; with uniform heads it is "LPIPS-like,
    uncalibrated" (see ``description``). Frozen, eval mode; differentiable in the inputs.
    """

    def __init__(
        self,
        trunk: VGG16Features | None = None,
        heads: Sequence[Tensor] | None = None,
        heads_source: str | None = None,
    ) -> None:
        super().__init__()
        self.net = trunk if trunk is not None else VGG16Features()
        self.calibrated = heads is not None
        if heads is None:
            heads = [torch.full((1, c, 1, 1), 1.0 / c) for c in LPIPS_CHANNELS]
        if len(heads) != len(LPIPS_CHANNELS):
            raise ValueError(f"LPIPS needs {len(LPIPS_CHANNELS)} heads, got {len(heads)}")
        for i, (w, c) in enumerate(zip(heads, LPIPS_CHANNELS, strict=True)):
            # Buffers, not parameters: they follow .to(device) but are never optimised.
            self.register_buffer(f"lin{i}", w.detach().float().reshape(1, c, 1, 1).clone())
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.heads_source = heads_source or ("given" if self.calibrated else "uniform 1/C")
        self.eval()

    @property
    def description(self) -> str:
        """One line saying which weights this instance uses."""
        name = "LPIPS-VGG v0.1" if self.calibrated else "LPIPS-like VGG (uncalibrated)"
        return f"{name} [VGG16: {self.net.source}; linear heads: {self.heads_source}]"

    @classmethod
    def from_files(
        cls,
        vgg_path: str | Path | None = None,
        lin_path: str | Path | None = None,
        warn: Warn | None = None,
    ) -> LPIPS:
        """Build from a torchvision VGG16 checkpoint and (optionally) an LPIPS heads file.

        Args:
            vgg_path: torchvision-format VGG16 state dict; None -> :func:`default_vgg_path`.
            lin_path: lpips-format heads file; None -> the one an installed ``lpips`` /
                ``torchmetrics`` ships (:func:`find_lpips_heads`), else uniform heads and a
                warning through ``warn`` (default: ``warnings.warn``).

        Raises:
            FileNotFoundError: a named or default file does not exist (nothing is downloaded).
            ValueError: a file exists but is not what it should be.
        """
        warn = warn or _default_warn
        vgg = Path(vgg_path).expanduser() if vgg_path is not None else default_vgg_path()
        if not vgg.is_file():
            raise FileNotFoundError(_missing_vgg_message(vgg, given=vgg_path is not None))
        trunk = VGG16Features.from_file(vgg)
        if lin_path is not None:
            lin = Path(lin_path).expanduser()
            if not lin.is_file():
                raise FileNotFoundError(f"{lin}: LPIPS linear heads file not found")
        else:
            lin = find_lpips_heads()
        if lin is None:
            warn(
                "LPIPS linear heads not found (no lpips_weights given, no lpips/torchmetrics "
                "package on disk): using uniform 1/C heads, an uncalibrated LPIPS-like "
                "distance whose values are not comparable with published LPIPS"
            )
            return cls(trunk)
        return cls(trunk, load_lpips_heads(lin), heads_source=str(lin))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (B, 3, H, W) in [0, 1], H, W >= 16 -> (B,) distances (>= 0)."""
        _check_pair(x, y, "lpips")
        if x.shape[1] != 3:
            raise ValueError(f"lpips: expected RGB (B,3,H,W), got {tuple(x.shape)}")
        if min(x.shape[2:]) < 16:
            raise ValueError(f"lpips: images must be at least 16x16, got {tuple(x.shape[2:])}")
        b = x.shape[0]
        # One trunk pass over both images: half the kernel launches.
        both = torch.cat([x, y], dim=0).float()
        both = ((2.0 * both - 1.0) - self.shift) / self.scale
        total = x.new_zeros(b, dtype=torch.float32)
        for i, f in enumerate(self.net(both)):
            f = f / (torch.sqrt((f * f).sum(dim=1, keepdim=True)) + _LPIPS_EPS)
            diff = (f[:b] - f[b:]) ** 2
            head: Tensor = getattr(self, f"lin{i}")
            total = total + (diff * head).sum(dim=1).mean(dim=(1, 2))
        return total


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _missing_vgg_message(path: Path, given: bool) -> str:
    where = "the --vgg-weights path" if given else "the torchvision cache"
    return (
        f"{path}: VGG16 ImageNet weights not found ({where}); supply torchvision's "
        f"{VGG16_CACHE_NAME} with --vgg-weights PATH or place it there (nothing is downloaded)"
    )


def try_load_lpips(
    vgg_path: str | Path | None = None,
    lin_path: str | Path | None = None,
    warn: Warn | None = None,
    device: torch.device | str = "cpu",
) -> LPIPS | None:
    """:meth:`LPIPS.from_files` for evaluation: None (after a warning) when the trunk is absent.

    A path the caller named explicitly that does not exist still raises FileNotFoundError:
    a typo should stop the run, not silently drop the metric.
    """
    warn = warn or _default_warn
    if vgg_path is None and not default_vgg_path().is_file():
        warn(_missing_vgg_message(default_vgg_path(), given=False) + ": LPIPS not computed")
        return None
    return LPIPS.from_files(vgg_path, lin_path, warn=warn).to(device)


# --------------------------------------------------------------------------------------------
# Training loss
# --------------------------------------------------------------------------------------------


class ReconstructionLoss(nn.Module):
    """``l1 * L1 + lpips_w * LPIPS + dssim_w * D-SSIM`` (terms with weight 0 are skipped).

    forward(pred, target, mask=None) -> (total scalar tensor, {name: float}):
        pred, target: (B, 3, H, W) in [0, 1]; mask: optional (B, 1, H, W) in [0, 1].
        With a mask, L1 and D-SSIM are mask-weighted means and LPIPS compares
        ``pred * mask`` with ``target * mask`` (both black outside it).
        The dict holds each used term (unweighted, batch mean) and "total".
    """

    def __init__(
        self,
        l1: float = 1.0,
        lpips_weight: float = 0.0,
        dssim_weight: float = 0.0,
        lpips: LPIPS | None = None,
        description: str = "",
    ) -> None:
        super().__init__()
        if lpips_weight > 0 and lpips is None:
            raise ValueError("an LPIPS weight > 0 needs an LPIPS module")
        self.l1_weight = float(l1)
        self.lpips_weight = float(lpips_weight)
        self.dssim_weight = float(dssim_weight)
        self.lpips = lpips
        self.description = description

    def forward(
        self, pred: Tensor, target: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """(total loss, {term: value}) with the values on the host (one copy for all)."""
        total, terms = self.terms(pred, target, mask)
        return total, to_host(terms)

    def terms(
        self, pred: Tensor, target: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {term: 0-dim tensor, "total" included}), nothing copied to the host: a
        training step copies them once, after its optimizer step."""
        _check_pair(pred, target, "loss")
        terms: dict[str, Tensor] = {}
        total = pred.new_zeros((), dtype=torch.float32)
        if self.l1_weight:
            err = (pred - target).abs()
            if mask is None:
                l1 = err.mean()
            else:
                _check_mask(mask, pred, "loss")
                l1 = (err * mask).sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)
            terms["l1"] = l1
            total = total + self.l1_weight * l1
        if self.lpips_weight and self.lpips is not None:
            p, t = (pred, target) if mask is None else (pred * mask, target * mask)
            lp = self.lpips(p, t).mean()
            terms["lpips"] = lp
            total = total + self.lpips_weight * lp
        if self.dssim_weight:
            ds = d_ssim(pred, target, mask=mask).mean()
            terms["dssim"] = ds
            total = total + self.dssim_weight * ds
        terms["total"] = total
        return total, terms


def to_host(values: dict[str, Tensor]) -> dict[str, float]:
    """0-dim tensors -> floats in one device->host copy (one sync on CUDA, not one each)."""
    host = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return dict(zip(values.keys(), host, strict=True))


def build_loss(
    cfg: LossConfig, device: torch.device | str = "cpu", warn: Warn | None = None
) -> tuple[ReconstructionLoss, str]:
    """The training loss the config asks for, and a one-line description of what it is.

    - VGG16 trunk found (``cfg.vgg_weights`` or the torchvision cache): ``L1 + lpips *
      LPIPS-VGG``, the paper's loss (LPIPS-like/uncalibrated if no heads file is found; the
      description and a warning say so).
    - No ``cfg.vgg_weights`` and nothing in the cache: warns, naming the path looked at, and
      uses ``L1 + dssim * D-SSIM``.
    - ``cfg.lpips == 0``: ``L1 + dssim * D-SSIM`` with no warning and no VGG lookup.

    Raises FileNotFoundError / ValueError when an explicitly named file is missing or
    invalid: a mistyped ``--vgg-weights`` must not silently change the loss of a long run.
    The description is meant to be printed and saved in the run config.
    """
    warn = warn or _default_warn
    lpips_mod: LPIPS | None = None
    fallback_reason = ""
    if cfg.lpips > 0:
        if cfg.vgg_weights is None and not default_vgg_path().is_file():
            fallback_reason = f"VGG16 weights not found at {default_vgg_path()}"
            warn(
                f"{_missing_vgg_message(default_vgg_path(), given=False)}: training with "
                f"L1 + {cfg.dssim:g} * D-SSIM instead of the paper's L1 + {cfg.lpips:g} * LPIPS"
            )
        else:
            lpips_mod = LPIPS.from_files(cfg.vgg_weights, cfg.lpips_weights, warn=warn)
            lpips_mod = lpips_mod.to(device)
    if lpips_mod is not None:
        loss = ReconstructionLoss(cfg.l1, cfg.lpips, 0.0, lpips=lpips_mod)
        desc = f"{cfg.l1:g} * L1 + {cfg.lpips:g} * {lpips_mod.description}"
    else:
        loss = ReconstructionLoss(cfg.l1, 0.0, cfg.dssim)
        why = fallback_reason or "LPIPS disabled (lpips weight 0)"
        desc = f"{cfg.l1:g} * L1 + {cfg.dssim:g} * D-SSIM (11x11 Gaussian, sigma 1.5) [{why}]"
    loss.description = desc
    return loss.to(device), desc

