"""Losses and image metrics: SSIM, PSNR, VGG16 trunk loading, LPIPS, and the training loss.

No real weights exist here, so every weight file is made by the tests: a random VGG16 saved
in torchvision's key layout and random non-negative LPIPS heads in lpips' layout.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rafmodel.losses import (
    LPIPS,
    LPIPS_CHANNELS,
    VGG16_CACHE_NAME,
    VGG16_CONV_INDICES,
    LossConfig,
    VGG16Features,
    build_loss,
    d_ssim,
    default_vgg_path,
    load_lpips_heads,
    psnr,
    ssim,
    try_load_lpips,
)


def _image(seed: int, b: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    """Smooth random images in [0, 1] (structure for SSIM/VGG to see, not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")


def _noisy(x: torch.Tensor, std: float, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def vgg_ckpt(tmp_path_factory) -> Path:
    """A random VGG16 in torchvision's checkpoint layout, classifier keys included."""
    torch.manual_seed(0)
    net = VGG16Features()
    state = {}
    for name, value in net.features.state_dict().items():
        # He init so activations survive 13 layers (the default init shrinks them a lot).
        v = torch.randn_like(value) * (math.sqrt(2.0 / value[0].numel()) if value.dim() == 4 else 0.01)
        state[f"features.{name}"] = v
    state["classifier.0.weight"] = torch.randn(8, 4)
    state["classifier.0.bias"] = torch.randn(8)
    path = tmp_path_factory.mktemp("vgg") / VGG16_CACHE_NAME
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(1)
    state = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
             for i, c in enumerate(LPIPS_CHANNELS)}
    path = tmp_path_factory.mktemp("heads") / "vgg.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def lpips_model(vgg_ckpt, heads_file) -> LPIPS:
    return LPIPS.from_files(vgg_ckpt, heads_file)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME with no cached weights; no lpips/torchmetrics heads visible either."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr("rafmodel.losses.find_lpips_heads", lambda: None)
    return tmp_path / "torch_home"


# ---------------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one():
    x = _image(0)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert torch.allclose(d_ssim(x, x), torch.zeros(2), atol=1e-6)


def test_ssim_decreases_with_noise_and_is_symmetric():
    x = _image(0)
    values = [ssim(x, _noisy(x, s)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]
    y = _noisy(x, 0.1)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)


def test_ssim_known_value_for_constant_images():
    # Flat images: variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.6, 0.01**2
    x = torch.full((1, 3, 20, 20), a, dtype=torch.float64)
    y = torch.full((1, 3, 20, 20), b, dtype=torch.float64)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-9)
    # float32: E[x^2] - E[x]^2 cancels to ~1e-8, small beside C2 = 9e-4.
    assert ssim(x.float(), y.float()).item() == pytest.approx(expected, abs=5e-4)


def _naive_ssim(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5) -> float:
    """Wang et al.'s SSIM with explicit loops over window positions (float64, one image)."""
    c1, c2 = 0.01**2, 0.03**2
    r = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    w2 = torch.outer(g, g) / torch.outer(g, g).sum()
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                a, b = x[c, i : i + win, j : j + win], y[c, i : i + win, j : j + win]
                ma, mb = (w2 * a).sum(), (w2 * b).sum()
                va, vb = (w2 * (a - ma) ** 2).sum(), (w2 * (b - mb) ** 2).sum()
                cov = (w2 * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                            / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_matches_naive_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 13, 14, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    for k in range(2):
        assert got[k].item() == pytest.approx(_naive_ssim(x[k], y[k]), abs=1e-9)


def test_ssim_mask_ignores_unmasked_pixels():
    x = _image(0)
    y = x.clone()
    y[:, :, :, 16:] = 1 - y[:, :, :, 16:]  # corrupt the right half only
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :, :8] = 1  # valid-region SSIM is centred: keep clear of the corrupted half
    assert torch.allclose(ssim(x, y, mask=mask), torch.ones(2), atol=1e-5)
    assert (ssim(x, y) < 0.9).all()
    # Same along rows, with the mask on the far side of the corruption.
    y = x.clone()
    y[:, :, :16] = 1 - y[:, :, :16]
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 24:] = 1
    assert torch.allclose(ssim(x, y, mask=mask), torch.ones(2), atol=1e-5)


def test_ssim_gradient_flows():
    x = _image(0)
    y = _noisy(x, 0.1).requires_grad_(True)
    d_ssim(y, x).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0 and torch.isfinite(y.grad).all()


def test_ssim_small_images_and_shape_errors():
    x = torch.rand(1, 3, 6, 9)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        ssim(x, torch.rand(1, 3, 6, 8))


# ---------------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_inf_and_cap_applies():
    x = _image(0)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.equal(psnr(x, x, cap=100.0), torch.full((2,), 100.0))


def test_psnr_known_mse():
    x = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 20.0), atol=1e-4)
    # 8-bit range: offset 25.5 of 255 is the same 20 dB.
    assert psnr(x * 255, x * 255 + 25.5, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-3)


def test_psnr_mask_counts_only_masked_pixels():
    x = torch.zeros(1, 3, 8, 8)
    y = x.clone()
    y[..., :4] = 0.1  # left half off by 0.1 (20 dB), right half exact
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    assert psnr(x, y, mask=mask).item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(x, y).item() == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-4)
    assert torch.isinf(psnr(x, y, mask=1 - mask)).all()


# ---------------------------------------------------------------------------- VGG16 trunk


def test_vgg16_layout_matches_torchvision():
    feats = VGG16Features().features
    assert len(feats) == 31
    convs = [i for i, m in enumerate(feats) if isinstance(m, torch.nn.Conv2d)]
    pools = [i for i, m in enumerate(feats) if isinstance(m, torch.nn.MaxPool2d)]
    assert tuple(convs) == VGG16_CONV_INDICES
    assert pools == [4, 9, 16, 23, 30]
    assert all(isinstance(feats[i + 1], torch.nn.ReLU) for i in convs)
    assert sum(p.numel() for p in feats.parameters()) == 14_714_688  # torchvision's count


def test_vgg16_loads_checkpoint_exactly(vgg_ckpt, tmp_path):
    saved = torch.load(vgg_ckpt, weights_only=True)
    net = VGG16Features.from_file(vgg_ckpt)
    for name, value in net.features.state_dict().items():
        assert torch.equal(value, saved[f"features.{name}"]), name
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training

    # Wrapped under "state_dict" with a DataParallel prefix loads the same.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, wrapped)
    net2 = VGG16Features.from_file(wrapped)
    assert torch.equal(net2.features[28].weight, saved["features.28.weight"])

    x = torch.rand(1, 3, 32, 48)
    taps = net(x)
    assert [tuple(t.shape[1:]) for t in taps] == [
        (64, 32, 48), (128, 16, 24), (256, 8, 12), (512, 4, 6), (512, 2, 3)
    ]
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 are torchvision's features[:4], [:9], ...
    for tap, end in zip(taps, (4, 9, 16, 23, 30), strict=True):
        assert torch.allclose(tap, net.features[:end](x), atol=1e-6)
        assert (tap >= 0).all()


def test_vgg16_rejects_bad_checkpoints(vgg_ckpt, tmp_path):
    saved = torch.load(vgg_ckpt, weights_only=True)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in saved.items() if k != "features.26.weight"}, partial)
    with pytest.raises(ValueError, match=r"partial\.pth.*features\.26\.weight"):
        VGG16Features.from_file(partial)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        VGG16Features.from_file(garbage)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        VGG16Features.from_file(tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------- LPIPS


def test_lpips_zero_for_identical_and_grows_with_distortion(lpips_model):
    x = _image(0)
    assert torch.allclose(lpips_model(x, x), torch.zeros(2), atol=1e-7)
    values = [lpips_model(x, _noisy(x, s)) for s in (0.03, 0.1, 0.3)]
    assert (values[0] > 0).all()
    assert (values[0] < values[1]).all() and (values[1] < values[2]).all()


def test_lpips_matches_its_definition(vgg_ckpt, heads_file):
    """An independent computation of LPIPS v0.1 from the taps, with lpips' constants."""
    model = LPIPS.from_files(vgg_ckpt, heads_file)
    heads = torch.load(heads_file, weights_only=True)
    x, y = _image(0), _image(1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx = model.net(((x * 2 - 1) - shift) / scale)
    fy = model.net(((y * 2 - 1) - shift) / scale)
    expected = torch.zeros(2)
    for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        lin = torch.nn.functional.conv2d((a - b) ** 2, heads[f"lin{i}.model.1.weight"])
        expected += lin.mean(dim=(1, 2, 3))
    assert torch.allclose(model(x, y), expected, rtol=1e-5, atol=1e-7)
    assert model.calibrated and "LPIPS-VGG v0.1" in model.description


def test_lpips_heads_loading(heads_file, tmp_path):
    heads = load_lpips_heads(heads_file)
    saved = torch.load(heads_file, weights_only=True)
    assert [tuple(h.shape) for h in heads] == [(1, c, 1, 1) for c in LPIPS_CHANNELS]
    assert torch.equal(heads[3], saved["lin3.model.1.weight"])
    bad = tmp_path / "neg.pth"
    torch.save({**saved, "lin2.model.1.weight": -saved["lin2.model.1.weight"]}, bad)
    with pytest.raises(ValueError, match="lin2 has negative"):
        load_lpips_heads(bad)
    alex = tmp_path / "alex.pth"
    torch.save({**saved, "lin1.model.1.weight": torch.rand(1, 192, 1, 1)}, alex)
    with pytest.raises(ValueError, match="lin1"):
        load_lpips_heads(alex)


def test_lpips_gradient_flows_to_input_only(lpips_model):
    x = _image(0)
    y = _noisy(x, 0.1).requires_grad_(True)
    lpips_model(y, x).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0 and torch.isfinite(y.grad).all()
    assert all(p.grad is None for p in lpips_model.parameters())


def test_lpips_without_heads_is_uniform_and_says_so(vgg_ckpt, empty_torch_home):
    messages: list[str] = []
    model = LPIPS.from_files(vgg_ckpt, warn=messages.append)
    assert len(messages) == 1 and "uncalibrated" in messages[0]
    assert not model.calibrated and "uncalibrated" in model.description
    assert torch.allclose(model.lin1, torch.full((1, 128, 1, 1), 1 / 128))


def test_lpips_missing_weights_explain_never_download(empty_torch_home, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    expected = empty_torch_home / "hub" / "checkpoints" / VGG16_CACHE_NAME
    assert default_vgg_path() == expected
    with pytest.raises(FileNotFoundError, match=VGG16_CACHE_NAME):
        LPIPS.from_files()
    messages: list[str] = []
    assert try_load_lpips(warn=messages.append) is None
    assert len(messages) == 1 and str(expected) in messages[0]


def test_default_vgg_path_is_used(vgg_ckpt, heads_file, empty_torch_home):
    target = empty_torch_home / "hub" / "checkpoints" / VGG16_CACHE_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(vgg_ckpt.read_bytes())
    model = try_load_lpips(lin_path=heads_file)
    assert model is not None and model.net.source == str(target)


# --------------------------------------------------------------------------- training loss


def test_build_loss_falls_back_to_dssim_with_warning(empty_torch_home):
    messages: list[str] = []
    loss_fn, desc = build_loss(LossConfig(), "cpu", warn=messages.append)
    expected = str(empty_torch_home / "hub" / "checkpoints" / VGG16_CACHE_NAME)
    assert len(messages) == 1 and expected in messages[0] and "D-SSIM" in messages[0]
    assert "D-SSIM" in desc and "LPIPS" not in desc.split("[")[0] and expected in desc
    pred, target = _noisy(_image(0), 0.2), _image(0)
    total, parts = loss_fn(pred, target)
    assert set(parts) == {"l1", "dssim", "total"}
    assert parts["total"] == pytest.approx(parts["l1"] + 0.2 * parts["dssim"], rel=1e-5)
    assert total.item() == pytest.approx(parts["total"])


def test_fallback_loss_decreases_towards_target(empty_torch_home):
    loss_fn, _ = build_loss(LossConfig(), "cpu", warn=lambda m: None)
    target = _image(3)
    start = _noisy(_image(4), 0.1)
    values = [loss_fn(start + t * (target - start), target)[0].item() for t in (0, 0.3, 0.7, 1)]
    assert values[0] > values[1] > values[2] > values[3]
    assert values[3] == pytest.approx(0.0, abs=1e-6)


def test_build_loss_uses_lpips_with_given_vgg(vgg_ckpt, heads_file, empty_torch_home):
    messages: list[str] = []
    cfg = LossConfig(vgg_weights=str(vgg_ckpt), lpips_weights=str(heads_file))
    loss_fn, desc = build_loss(cfg, "cpu", warn=messages.append)
    assert messages == []
    assert "LPIPS-VGG v0.1" in desc and str(vgg_ckpt) in desc and "D-SSIM" not in desc
    pred = _noisy(_image(0), 0.2).requires_grad_(True)
    target = _image(0)
    total, parts = loss_fn(pred, target)
    assert set(parts) == {"l1", "lpips", "total"} and parts["lpips"] > 0
    assert parts["total"] == pytest.approx(parts["l1"] + 0.1 * parts["lpips"], rel=1e-5)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_build_loss_explicit_missing_path_is_an_error(tmp_path, empty_torch_home):
    with pytest.raises(FileNotFoundError, match="typo.pth"):
        build_loss(LossConfig(vgg_weights=str(tmp_path / "typo.pth")), "cpu")


def test_build_loss_lpips_disabled_needs_no_weights(empty_torch_home):
    messages: list[str] = []
    loss_fn, desc = build_loss(LossConfig(lpips=0.0), "cpu", warn=messages.append)
    assert messages == [] and "LPIPS disabled" in desc


def test_loss_mask_restricts_l1(empty_torch_home):
    loss_fn, _ = build_loss(LossConfig(lpips=0.0, dssim=0.0), "cpu")
    target = torch.zeros(1, 3, 16, 16)
    pred = target.clone()
    pred[..., 8:] = 0.5
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1
    assert loss_fn(pred, target, mask)[1]["l1"] == pytest.approx(0.0)
    assert loss_fn(pred, target, 1 - mask)[1]["l1"] == pytest.approx(0.5)
    assert loss_fn(pred, target)[1]["l1"] == pytest.approx(0.25)
