"""rafmodel eval / compare: outputs, metric helpers, the synthetic ground truth, Table 2."""

from __future__ import annotations

import csv
import json
import math

import av
import numpy as np
import pytest
import torch
from PIL import Image

from rafdata.errors import RafDataError
from rafdata.store import Store, copy_store
from rafmodel.compare import COLUMNS, compare, format_table, write_csv, write_json
from rafmodel.evaluate import (
    PSNR_CAP,
    EvalConfig,
    SynthGroundTruth,
    evaluate,
    frame_metrics,
    pick_frames,
    render_K,
    split_runs_and_store,
)

FRAMES = 3  # timesteps per held-out sequence evaluated (of 4)


class ZeroRegressor:
    """Stand-in CoefficientRegressor: always predicts zeros, so AED (driver frame vs render,
    both read by it) is exactly 0, and the tracked extra is mean |driver exp|."""

    name = "zeros"

    def __init__(self, exp_dim: int):
        self.exp_dim = exp_dim

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = images.shape[0]
        return torch.zeros(b, self.exp_dim), torch.zeros(b, 6)


class Grid50:
    """A plug-in of another expression space (50 dims, like a FLAME/DECA read-out on a BFM
    store): the mean grey level of a 5 x 10 grid over the image; pose: mean and std of RGB."""

    name = "grid-50"
    exp_dim = 50

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), (10, 5))
        return g.flatten(1), torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)


class MeanColour:
    """Stand-in FeatureExtractor: the mean RGB of the image."""

    name = "mean-colour"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """(synth folder, store path): 3 identities x (EXP-1-head, FREE) x 2 cameras x 4 frames;
    images only for 388 and 422 (443 has coefficients only, as most of a paper-scale store)."""
    from rafdata.ingest import IngestConfig, ingest
    from rafdata.synth import SynthConfig, write_dataset

    base = tmp_path_factory.mktemp("eval")
    cfg = SynthConfig(participants=("388", "422", "443"), sequences=("EXP-1-head", "FREE"),
                      cameras=("222200037", "222200038"), frames=4, width=64, height=80)
    write_dataset(base / "src", cfg)
    ingest(base / "src", base / "store.h5", IngestConfig(workers=1,
                                                         images_for=("388", "422")))
    return base / "src", base / "store.h5"


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    """Two tiny runs of subject 388: vanilla and noise."""
    from tests.train_helpers import train_tiny

    base = tmp_path_factory.mktemp("runs")
    return {aug: train_tiny(synth[1], base / f"388-{aug}", aug=aug, iters=5)
            for aug in ("vanilla", "noise")}


@pytest.fixture(scope="module")
def evaluated(synth, runs, tmp_path_factory):
    """Both runs evaluated together, driven by 422 and (explicitly) by 388 itself; a 50-dim
    plug-in regressor on the 64-dim BFM store and the built-in emotion extractor (``auto``)."""
    out = tmp_path_factory.mktemp("evalout") / "eval"
    cfg = EvalConfig(out=str(out), frames=FRAMES, drivers=("422", "388"),
                     regressor=Grid50(), device="cpu")
    summary = evaluate([runs["vanilla"], runs["noise"]], synth[1], cfg)
    return out, summary


# -- metric helpers --------------------------------------------------------------------------


def test_frame_metrics_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g)
    same = frame_metrics(x, x.clone())
    assert torch.all(same["psnr"] == PSNR_CAP)  # +inf capped, as documented
    assert torch.allclose(same["ssim"], torch.ones(2), atol=1e-5)
    # A uniform error of 0.1 on [0, 1] images: MSE 0.01 -> exactly 20 dB.
    y = (x * 0.5 + 0.2)
    off = frame_metrics(y, y + 0.1)
    assert torch.allclose(off["psnr"], torch.full((2,), 20.0), atol=1e-3)
    assert torch.all(off["ssim"] < 1.0)
    # Masked: the error only outside the mask does not count; full-frame values still see it.
    mask = torch.zeros(2, 1, 24, 20)
    mask[:, :, :12] = 1
    z = y.clone()
    z[:, :, 12:] += 0.1
    m = frame_metrics(y, z, mask=mask)
    assert torch.all(m["psnr"] == PSNR_CAP)
    assert torch.all(m["psnr_full"] < 30)
    # An empty mask gives NaN (skipped in averages), never a fake perfect score.
    assert torch.isnan(frame_metrics(y, z, mask=torch.zeros_like(mask))["psnr"]).all()


def test_pick_frames_evenly_spaced():
    assert pick_frames(10, None).tolist() == list(range(10))
    assert pick_frames(10, 3).tolist() == [0, 4, 9]  # round(4.5) == 4 (banker's)
    assert pick_frames(2, 5).tolist() == [0, 1]


# -- synthetic ground truth ------------------------------------------------------------------


def _held_out_sample(store: Store, who: str):
    rows = store.image_rows(identity=who, held_out=True, serials=["222200037"])
    return store.image(int(rows[0]))


def test_ground_truth_reproduces_the_stored_frame(synth):
    store = Store(synth[1])
    gt = SynthGroundTruth(store.synthetic)  # rebuilt from the store alone: no synth folder
    s = _held_out_sample(store, "388")
    h, w = store.image_size
    bg = torch.tensor([1.0, 1.0, 1.0])
    mask = torch.from_numpy(s.mask)[None, None].float() / 255
    real = torch.from_numpy(s.rgb).permute(2, 0, 1)[None].float() / 255
    real = real * mask + bg[None, :, None, None] * (1 - mask)

    true = gt.true_coefficients("388", store.sequences.name[s.sequence])

    def score(who: str, exp: np.ndarray, pose: np.ndarray) -> float:
        img, alpha = gt.render(who, exp, pose, s.scale, s.K, s.world_to_cam, w, h, bg)
        return float(frame_metrics(img[None], real, mask=mask)["psnr"][0])

    own = score("388", true["exp"][s.frame], true["pose"][s.frame])
    tracked = score("388", s.exp, s.pose)
    other = score("422", true["exp"][s.frame], true["pose"][s.frame])
    # The true coefficients reproduce the frame up to H.264 (crf 12) loss; the tracked ones
    # carry the synth's tracker noise; another identity's head is far off.
    assert own > 30.0, own
    assert own > tracked + 3.0, (own, tracked)
    assert own > other + 8.0, (own, other)
    store.close()


def test_ground_truth_differs_between_drivers(synth):
    store = Store(synth[1])
    gt = SynthGroundTruth(store.synthetic)
    a, b = _held_out_sample(store, "388"), _held_out_sample(store, "422")
    K = render_K(a.K, store.image_size, 26, 32).numpy()
    bg = torch.ones(3)
    img_a, _ = gt.render("388", a.exp, a.pose, a.scale, K, a.world_to_cam, 26, 32, bg)
    img_b, _ = gt.render("388", b.exp, a.pose, a.scale, K, a.world_to_cam, 26, 32, bg)
    assert float((img_a - img_b).abs().mean()) > 1e-3
    store.close()


def test_store_without_manifest_needs_synth_root(synth, tmp_path):

    import h5py

    from rafmodel.evaluate import load_synth

    path = tmp_path / "plain.h5"
    copy_store(synth[1], path)
    with h5py.File(path, "a") as f:
        del f.attrs["synthetic"]
    store = Store(path)
    none, note = load_synth(store, None)
    assert none is None and "not a synthetic store" in note
    gt, note = load_synth(store, synth[0])
    assert gt is not None and gt.has("388") and "synth.json" in note
    store.close()


# -- eval end to end -------------------------------------------------------------------------


def test_eval_writes_every_output(evaluated, runs):
    out, summary = evaluated
    labels = {r["label"] for r in summary["runs"]}
    assert labels == {"vanilla", "noise"}
    for r in summary["runs"]:
        doc = json.loads(open(r["metrics"]).read())
        assert doc["subject"] == "388" and doc["method"]["aug"] == r["label"]
        self_ = doc["self"]
        assert self_["masked"] == "all" and self_["timesteps"] == FRAMES
        assert self_["frames"] == FRAMES * 2  # two cameras
        assert set(self_["cameras"]) == {"222200037", "222200038"}
        for k in ("psnr", "ssim", "psnr_full", "ssim_full", "aed", "apd_rot", "apd_trans",
                  "emotion_sim"):
            assert math.isfinite(self_["mean"][k]), k
        assert self_["mean"]["aed"] > 0 and -1 <= self_["mean"]["emotion_sim"] <= 1
        for cam in self_["cameras"].values():
            assert math.isfinite(cam["aed"]) and math.isfinite(cam["emotion_sim"])
        cross = doc["cross"]
        assert cross["camera"] == "222200037" and cross["ground_truth"] is True
        assert set(cross["drivers"]) == {"422", "388"}
        for d in cross["drivers"].values():
            assert d["frames"] == FRAMES
            for k in ("gt_psnr", "gt_ssim", "psnr", "ssim", "aed", "apd_rot", "apd_trans",
                      "emotion_sim", "readback_exp_l1", "driver_noise_exp_l1"):
                assert math.isfinite(d[k]), k
            assert d["psnr"] == d["gt_psnr"]  # cross PSNR is against the synthetic GT
            # A 50-dim regressor on a 64-dim store: no comparison with tracked coefficients.
            assert not any(k.startswith("regressor_tracked") for k in d)
        for section in (self_, cross):  # the names compare and the sweep statistics read
            assert {"psnr", "ssim", "lpips", "aed", "apd_rot", "apd_trans",
                    "emotion_sim"} <= set(section["mean"])
        assert cross["drivers"]["422"]["gt_psnr"] != cross["drivers"]["388"]["gt_psnr"]
        cw = doc["computed_with"]
        assert "grid-50" in cw["aed"] and "mini-Xception" in cw["emotion_sim"]
        assert cw["regressor_tracked"].startswith("not computed")
        assert "generator" in cw["ground_truth"]
        assert cw["lpips"].startswith(("not computed", "LPIPS"))
    # Both drivers' videos decode with one frame per evaluated timestep; a grid PNG exists.
    assert len(summary["videos"]) == 2
    for v in summary["videos"]:
        with av.open(v) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == FRAMES
        assert frames[0].shape[1] > frames[0].shape[0]  # driver | GT | vanilla | noise side by side
    (grid,) = summary["grids"]
    with Image.open(grid) as im:
        assert im.size[1] >= 2 * 128  # a row per chosen frame of each driver
    assert json.loads((out / "summary.json").read_text())["videos"] == summary["videos"]


def test_aed_reads_both_frames_with_one_extractor(synth, runs, tmp_path):
    """AED compares the extractor's read-outs of driver frame and render: a regressor that
    always says 0 gives exactly 0 (the old protocol, read-back vs tracked coefficients, would
    give mean |driver exp|, which is now the clearly named extra)."""
    summary = evaluate([runs["vanilla"]], synth[1],
                       EvalConfig(out=str(tmp_path / "e"), frames=FRAMES, drivers=("422",),
                                  regressor=ZeroRegressor(64), emotion=MeanColour(),
                                  videos=False, device="cpu"))
    doc = json.loads(open(summary["runs"][0]["metrics"]).read())
    store = Store(synth[1])
    steps = store.timestep_rows(identity="422", held_out=True)
    steps = steps[pick_frames(len(steps), FRAMES)]
    expect = float(np.abs(store.timesteps.exp[steps]).mean())
    store.close()
    for section in (doc["self"]["mean"], doc["cross"]["drivers"]["422"]):
        assert section["aed"] == 0.0 and section["apd_rot"] == 0.0 and \
            section["apd_trans"] == 0.0
        assert math.isfinite(section["emotion_sim"])
    cross = doc["cross"]["drivers"]["422"]
    assert cross["regressor_tracked_exp_l1"] == pytest.approx(expect, rel=1e-5)
    assert "mean-colour" in doc["computed_with"]["emotion_sim"]
    assert doc["computed_with"]["regressor_tracked"].startswith("extra")


def test_default_drivers_have_images(synth, runs, tmp_path):
    """443 has held-out coefficients but no images: not a default driver; naming it is
    allowed (a note says it has no frames)."""
    summary = evaluate([runs["vanilla"]], synth[1],
                       EvalConfig(out=str(tmp_path / "e"), frames=1, self_driving=False,
                                  videos=False, emotion="none", device="cpu"))
    doc = json.loads(open(summary["runs"][0]["metrics"]).read())
    assert set(doc["cross"]["drivers"]) == {"422"}
    assert doc["computed_with"]["emotion_sim"].startswith("not computed")
    summary = evaluate([runs["vanilla"]], synth[1],
                       EvalConfig(out=str(tmp_path / "e2"), frames=1, self_driving=False,
                                  videos=False, emotion="none", drivers=("443",),
                                  device="cpu"))
    assert any("443" in n and "no held-out images" in n for n in summary["notes"])


def test_eval_refuses_bad_input(synth, runs, tmp_path):
    with pytest.raises(RafDataError, match="no camera"):
        evaluate([runs["vanilla"]], synth[1], EvalConfig(out=str(tmp_path / "e"),
                                                         cameras=("999",), device="cpu"))
    with pytest.raises(RafDataError, match="config.json"):
        evaluate([tmp_path], synth[1], EvalConfig(out=str(tmp_path / "e"), device="cpu"))


def test_split_runs_and_store(tmp_path):
    """eval's RUN... STORE and view's RUN... [STORE]: one rule, a flag for the store."""
    run, ckpt, store = tmp_path / "run", tmp_path / "last.pt", tmp_path / "store.h5"
    run.mkdir()
    # view: the last of several paths is the store unless it is a run
    assert split_runs_and_store([run], store_required=False) == ([run], None)
    assert split_runs_and_store([run, str(store)], store_required=False) == ([run], store)
    assert split_runs_and_store([run, ckpt], store_required=False) == ([run, ckpt], None)
    assert split_runs_and_store([run, run], store_required=False) == ([run, run], None)
    assert split_runs_and_store([store], store_required=False) == ([store], None)
    with pytest.raises(RafDataError, match="at least one RUN folder"):
        split_runs_and_store([], store_required=False)
    # eval: the last path is always the store, so one path is not enough
    assert split_runs_and_store([run, ckpt, str(store)], store_required=True) == (
        [run, ckpt], store)
    assert split_runs_and_store([run, run], store_required=True) == ([run], run)
    for paths in ([], [run], [store]):
        with pytest.raises(RafDataError, match="at least one RUN and the STORE"):
            split_runs_and_store(paths, store_required=True)


def test_eval_with_the_real_regressor(synth, runs, tmp_path):
    """The built-in regressor (rafmodel.regressor) plugs into AED/APD and is checked."""
    reg = pytest.importorskip("rafmodel.regressor",
                              reason="rafmodel.regressor is not in this tree yet")
    cfg = reg.RegressorConfig(size=16, channels=(8, 8), iters=1)
    ok = reg.BuiltinRegressor(cfg, 64, "bfm09", trained_on=("422",))  # untrained weights
    summary = evaluate([runs["vanilla"]], synth[1],
                       EvalConfig(out=str(tmp_path / "e"), frames=1, regressor=ok,
                                  self_driving=False, videos=False, device="cpu"))
    doc = json.loads(open(summary["runs"][0]["metrics"]).read())
    assert math.isfinite(doc["cross"]["mean"]["aed"]) and doc["cross"]["mean"]["aed"] > 0
    assert ok.name in doc["computed_with"]["aed"]
    leaked = reg.BuiltinRegressor(cfg, 64, "bfm09", trained_on=("388",))
    with pytest.raises(RafDataError, match="trained on the evaluated subject"):
        evaluate([runs["vanilla"]], synth[1],
                 EvalConfig(out=str(tmp_path / "e2"), regressor=leaked, device="cpu"))


# -- compare ---------------------------------------------------------------------------------


def test_compare_marks_the_best_and_writes_files(evaluated, tmp_path):
    out, _ = evaluated
    rows = compare([out])
    assert {r["method"] for r in rows} == {"vanilla", "noise"}
    table = format_table(rows)
    best = max(r["self_psnr"] for r in rows)
    col = 2  # | method | runs | self PSNR | ...
    for r, line in zip(rows, table.splitlines()[2:], strict=True):
        cell = line.split("|")[1 + col].strip()
        text = f"{r['self_psnr']:.3f}"
        # Bold exactly when it shows the best value (ties at the shown precision included).
        assert cell == (f"**{text}**" if text == f"{best:.3f}" else text), (cell, text)
    # Table 2 / 3 layout: both groups, each PSNR, SSIM, AED, APD, emotion (no LPIPS weights
    # here), self group first.
    head = table.splitlines()[0]
    shown = ["self PSNR", "self SSIM", "self AED", "self APD", "self emo sim",
             "cross PSNR (GT)", "cross SSIM (GT)", "cross AED", "cross APD", "cross emo sim"]
    pos = [head.index(h + " ") for h in shown]
    assert pos == sorted(pos), head
    for r in rows:
        assert all(r[k] is not None for k in ("self_aed", "self_apd", "self_emotion",
                                              "cross_aed", "cross_apd", "cross_emotion"))
    doc = json.loads(write_json(rows, tmp_path / "t.json").read_text())
    assert doc["best"]["self_psnr"] == [r["method"] for r in rows if r["self_psnr"] == best]
    with open(write_csv(rows, tmp_path / "t.csv")) as fh:
        lines = list(csv.DictReader(fh))
    assert {r["method"] for r in lines} == {"vanilla", "noise"}
    assert "cross_gt_psnr" in lines[0]


def _doc(aug: str, psnr: float, lpips: float, aed: float, topk: int = 1) -> dict:
    return {"method": {"aug": aug, "topk": topk, "bank": "full", "p": 0.5, "noise_std": 0.08},
            "label": aug, "subject": "388",
            "self": {"mean": {"psnr": psnr, "ssim": 0.9, "lpips": lpips}},
            "cross": {"mean": {"aed": aed, "apd": 0.1}}}


def test_compare_directions_and_method_names(tmp_path):
    docs = {"a": _doc("vanilla", 20.0, 0.30, 0.50), "b": _doc("raf", 22.0, 0.20, 0.40),
            "c": _doc("raf", 21.0, 0.25, 0.45, topk=5), "d": _doc("noise", 19.0, 0.35, 0.60)}
    for name, doc in docs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(doc))
    rows = {r["method"]: r for r in compare([tmp_path])}
    assert set(rows) == {"vanilla", "raf", "raf top5", "noise"}
    table = format_table(list(rows.values()))
    assert "**22.000**" in table  # PSNR: higher is better
    assert "**0.200**" in table and "**0.350**" not in table  # LPIPS: lower is better
    assert "**0.400**" in table  # AED: lower is better
    assert "**0.900**" in table  # a tie: every row bold
    keys = [c.key for c in COLUMNS]
    assert keys.index("self_psnr") < keys.index("cross_aed")


def test_cli_compare(evaluated, tmp_path):
    from click.testing import CliRunner

    from cli.rafmodel_eval import compare_command

    out, _ = evaluated
    res = CliRunner().invoke(compare_command, [str(out), "--csv", str(tmp_path / "t.csv"),
                                               "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    assert "| method |" in res.output and "**" in res.output
    assert (tmp_path / "t.csv").is_file() and (tmp_path / "t.json").is_file()


def test_cli_eval(synth, runs, tmp_path):
    from click.testing import CliRunner

    from cli.rafmodel_eval import eval_command

    out = tmp_path / "cli"
    res = CliRunner().invoke(eval_command, [str(runs["noise"]), str(synth[1]), "--out",
                                            str(out), "--frames", "1", "--cameras",
                                            "222200038", "--no-videos", "--device", "cpu",
                                            "--regressor", "tests.test_evaluate:Grid50",
                                            "--quiet"])
    assert res.exit_code == 0, res.output
    assert "computed with" in res.output and "lpips:" in res.output
    doc = json.loads((out / "metrics.json").read_text())
    for section in ("self", "cross"):  # a 50-dim plug-in and the built-in emotion extractor
        for k in ("aed", "apd_rot", "apd_trans", "emotion_sim"):
            assert math.isfinite(doc[section]["mean"][k]), (section, k)
    assert "grid-50" in doc["computed_with"]["aed"]
    assert list(doc["self"]["cameras"]) == ["222200038"] and doc["cross"]["camera"] == "222200038"
    assert not (out / "videos").exists()
    res = CliRunner().invoke(eval_command, [str(synth[1])])
    assert isinstance(res.exception, RafDataError)  # the rafmodel group prints it in one line
