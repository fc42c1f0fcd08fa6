"""The synthetic dataset: layouts, videos against renders, determinism, geometry, styles."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from rafdata.errors import RafDataError, SourceError
from rafdata.rotations import euler_xyz_intrinsic_to_matrix
from rafdata.synth import (
    EXP_DIM,
    NOSE_TIP,
    SynthConfig,
    SynthHead,
    background_image,
    camera_rig,
    canonical_to_world,
    composite,
    flame_from_exp_matrix,
    identity_coeff,
    load_manifest,
    manifest_config,
    project,
    rodrigues,
    tracked_coefficients,
    true_coefficients,
    write_dataset,
    write_gha_dataset,
)

TINY = SynthConfig(
    participants=("388", "422"),
    sequences=("EXP-1-head", "FREE"),
    cameras=("222200037", "222200038"),
    frames=4,
    width=64,  # decord 0.6 fails on some widths (16, 24, 48, 72 measured): avoid 48
    height=80,
    tracking="both",
    seed=3,
)


class _Calls(list):
    """A progress callback that records its calls."""

    def append_pair(self, done: int, total: int) -> None:
        self.append((done, total))


@pytest.fixture(scope="module")
def nersemble_root(tmp_path_factory) -> tuple[Path, list]:
    calls = _Calls()
    out = write_dataset(tmp_path_factory.mktemp("synth") / "nersemble", TINY, calls.append_pair)
    return out, calls


@pytest.fixture(scope="module")
def gha_root(tmp_path_factory) -> Path:
    return write_gha_dataset(tmp_path_factory.mktemp("synth") / "gha", TINY)


def _decode(path: Path) -> np.ndarray:
    """All frames of a video as (N, H, W, 3) uint8 (PyAV)."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_nersemble_layout(nersemble_root):
    root, calls = nersemble_root
    assert (root / "metadata_participants.csv").read_text().startswith("ID,")
    assert "EXP-1-head" in (root / "metadata_sequences.csv").read_text()
    manifest = load_manifest(root)
    assert manifest["layout"] == "nersemble_v2"
    assert manifest_config(root) == TINY
    n_video = TINY.video_frames
    for pid in TINY.participants:
        cal = json.loads((root / pid / "calibration" / "camera_params.json").read_text())
        assert set(cal["world_2_cam"]) == set(TINY.cameras)
        assert np.asarray(cal["intrinsics"]).shape == (3, 3)
        for m in cal["world_2_cam"].values():
            m = np.asarray(m)
            assert m.shape == (4, 4)
            np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)
        colour = json.loads((root / pid / "calibration" / "color_calibration.json").read_text())
        for serial in TINY.cameras:
            c = np.asarray(colour[serial])
            assert c.shape == (3, 3) and np.abs(c - np.eye(3)).max() < 0.1
            bg = Image.open(root / pid / "sequences" / "BACKGROUND" / f"image_{serial}.jpg")
            assert bg.size == (TINY.width, TINY.height) and bg.mode == "RGB"
        for seq in TINY.sequences:
            sdir = root / pid / "sequences" / seq
            folders = sorted(p.name for p in (sdir / "params").iterdir())
            assert folders == [f"{f:04d}" for f in range(TINY.frames)]
            p = _npz(sdir / "params" / "0002" / "params.npz")
            expect = {"id_coeff": (1, 80), "exp_coeff": (1, 64), "scale": (1,), "pose": (1, 6)}
            assert {k: v.shape for k, v in p.items()} == expect
            assert all(v.dtype == np.float32 for v in p.values())
            fl = _npz(sdir / "tracking" / "flame2023_tracking_v2.npz")
            t = TINY.frames
            shapes = {
                "expression": (t, 100), "rotation": (t, 3), "translation": (t, 3),
                "rotation_matrices": (t, 3, 3), "frames": (t,), "scale": (1, 1), "jaw": (t, 3),
                "neck": (t, 3), "eyes": (t, 6), "shape": (1, 300),
            }  # fmt: skip
            assert {k: v.shape for k, v in fl.items()} == shapes
            assert all(v.dtype == np.float32 for k, v in fl.items() if k != "frames")
            assert np.issubdtype(fl["frames"].dtype, np.integer)
            for serial in TINY.cameras:
                for kind in ("images", "alpha_maps"):
                    frames = _decode(sdir / kind / f"cam_{serial}.mp4")
                    assert frames.shape == (n_video, TINY.height, TINY.width, 3)
    total = len(TINY.participants) * len(TINY.sequences) * len(TINY.cameras) * n_video
    assert len(calls) == total and calls[-1] == (total, total)


def test_tracking_files_agree_with_truth(nersemble_root):
    root, _ = nersemble_root
    pid, seq = "422", "FREE"
    sdir = root / pid / "sequences" / seq
    tracked = tracked_coefficients(TINY, pid, seq)
    true = true_coefficients(TINY, pid, seq)
    fl = _npz(sdir / "tracking" / "flame2023_tracking_v2.npz")
    exp = np.concatenate(
        [_npz(sdir / "params" / f"{f:04d}" / "params.npz")["exp_coeff"] for f in fl["frames"]]
    )
    np.testing.assert_array_equal(exp, tracked["exp"])
    # FLAME expression is the fixed orthonormal map of the same vectors: invertible.
    np.testing.assert_allclose(fl["expression"] @ flame_from_exp_matrix(), exp, atol=1e-5)
    # rotation_matrices = R(tracked axis-angle); `rotation` = the same as intrinsic XYZ Euler
    rot = np.stack([rodrigues(r) for r in tracked["pose"][fl["frames"], :3]])
    np.testing.assert_allclose(fl["rotation_matrices"], rot, atol=1e-5)
    np.testing.assert_allclose(euler_xyz_intrinsic_to_matrix(fl["rotation"]), rot, atol=1e-5)
    np.testing.assert_allclose(fl["scale"][0, 0], true["scale"], rtol=1e-6)
    # Written = true + small tracker noise (std TINY.noise), not the truth itself.
    err = exp - true["exp"][fl["frames"]]
    assert 0.3 * TINY.noise < err.std() < 3 * TINY.noise


def test_frame_step(tmp_path):
    cfg = SynthConfig(
        participants=("388",), sequences=("FREE",), cameras=("222200037",), frames=3,
        frame_step=2, width=32, height=32, alpha_maps=False, tracking="flame",
    )  # fmt: skip
    root = write_dataset(tmp_path / "d", cfg)
    sdir = root / "388" / "sequences" / "FREE"
    assert _decode(sdir / "images" / "cam_222200037.mp4").shape[0] == 6
    assert not (sdir / "alpha_maps").exists() and not (sdir / "params").exists()
    np.testing.assert_array_equal(
        _npz(sdir / "tracking" / "flame2023_tracking_v2.npz")["frames"], [0, 2, 4]
    )


def test_gha_layout(gha_root):
    root = gha_root
    assert load_manifest(root)["layout"] == "gha"
    n = TINY.frames  # one training sequence; FREE is skipped
    for pid in TINY.participants:
        assert sorted(p.name for p in (root / pid / "images").iterdir()) == [
            f"{g:04d}" for g in range(n)
        ]
        assert sorted(p.name for p in (root / pid / "params").iterdir()) == [
            f"{g:04d}" for g in range(n)
        ]
        p = _npz(root / pid / "params" / "0001" / "params.npz")
        assert p["exp_coeff"].shape == (1, 64) and p["pose"].shape == (1, 6)
        np.testing.assert_array_equal(
            p["exp_coeff"][0], tracked_coefficients(TINY, pid, "EXP-1-head")["exp"][1]
        )
        for serial in TINY.cameras:
            cam = _npz(root / pid / "cameras" / "0003" / f"camera_{serial}.npz")
            assert cam["extrinsic"].shape == (3, 4) and cam["intrinsic"].shape == (3, 3)
            img = np.asarray(Image.open(root / pid / "images" / "0000" / f"image_{serial}.jpg"))
            mask = np.asarray(Image.open(root / pid / "images" / "0000" / f"mask_{serial}.jpg"))
            assert img.shape == mask.shape == (TINY.height, TINY.width, 3)
            assert mask.max() > 200 and mask.min() < 50  # head and background both there
            assert (root / pid / "background" / f"image_{serial}.jpg").is_file()


def test_videos_match_renders(nersemble_root):
    """Decoded video frames equal a fresh render over the background, up to compression."""
    root, _ = nersemble_root
    decord = pytest.importorskip("decord")
    cal = json.loads((root / "422" / "calibration" / "camera_params.json").read_text())
    K = np.asarray(cal["intrinsics"])
    head = SynthHead.from_manifest(root, "422")
    true = true_coefficients(TINY, "422", "FREE")
    errors, wrong = [], []
    for serial in TINY.cameras:
        sdir = root / "422" / "sequences" / "FREE"
        video = decord.VideoReader(str(sdir / "images" / f"cam_{serial}.mp4"))
        assert len(video) == TINY.video_frames
        frames = video.get_batch(list(range(len(video)))).asnumpy()
        mattes = _decode(sdir / "alpha_maps" / f"cam_{serial}.mp4")[..., 0]
        bg = background_image(TINY.seed, "422", serial, TINY.width, TINY.height)
        w2c = np.asarray(cal["world_2_cam"][serial])
        renders = []
        for f in range(TINY.video_frames):
            rgb, alpha = head.render(
                true["exp"][f], true["pose"][f], true["scale"], K, w2c, TINY.width, TINY.height
            )
            renders.append(composite(rgb, alpha, bg))
            errors.append(np.abs(frames[f].astype(float) - renders[-1]).mean())
            errors.append(np.abs(mattes[f].astype(float) - alpha * 255).mean())
        wrong.append(np.abs(frames[0].astype(float) - renders[-1]).mean())
    assert max(errors) < 4.0, errors
    assert min(wrong) > 2 * max(errors)  # the comparison can tell frames apart


def test_same_seed_same_coefficients():
    a = tracked_coefficients(TINY, "388", "EXP-1-head")
    b = tracked_coefficients(SynthConfig(**TINY.to_dict()), "388", "EXP-1-head")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = tracked_coefficients(SynthConfig(**{**TINY.to_dict(), "seed": 4}), "388", "EXP-1-head")
    assert not np.allclose(a["exp"], c["exp"])
    assert not np.allclose(a["id_coeff"], c["id_coeff"])
    # Identity is constant across sequences and differs across participants.
    np.testing.assert_array_equal(
        a["id_coeff"], tracked_coefficients(TINY, "388", "FREE")["id_coeff"]
    )
    assert not np.allclose(a["id_coeff"], tracked_coefficients(TINY, "422", "FREE")["id_coeff"])


def test_points_on_the_head_project_onto_the_head_in_every_view(nersemble_root):
    root, _ = nersemble_root
    cal = json.loads((root / "388" / "calibration" / "camera_params.json").read_text())
    K = np.asarray(cal["intrinsics"])
    head = SynthHead.from_manifest(root, "388")
    true = true_coefficients(TINY, "388", "EXP-1-head")
    w, h = 96, 128  # any size: scale K to it
    Ks = np.diag([w / TINY.width, h / TINY.height, 1.0]) @ K
    Ks[:2, 2] = [(w - 1) / 2, (h - 1) / 2]
    for f in (0, TINY.video_frames - 1):
        pose, scale = true["pose"][f], true["scale"]
        inside = canonical_to_world(np.stack([NOSE_TIP, np.zeros(3)]), pose, scale)
        above = canonical_to_world(np.array([[0.0, 1.5, 0.0]]), pose, scale)
        for serial, w2c in cal["world_2_cam"].items():
            w2c = np.asarray(w2c)
            _, alpha = head.render(true["exp"][f], pose, scale, Ks, w2c, w, h)
            for col, row in np.round(project(inside, Ks, w2c)).astype(int):
                assert alpha[row, col] == 1.0, (serial, f, col, row)
            col, row = np.round(project(above, Ks, w2c)[0]).astype(int)
            assert 0 <= row < h and 0 <= col < w
            assert alpha[row, col] == 0.0, (serial, f)
    # The nose tip is the front-most point: in the frontal view it is nearer than the face.
    frontal = np.asarray(cal["world_2_cam"]["222200037"])
    nose_cam = canonical_to_world(NOSE_TIP[None], np.zeros(6), 0.1) @ frontal[:3, :3].T
    cheek_cam = (
        canonical_to_world(np.array([[0.3, -0.2, 0.8]]), np.zeros(6), 0.1) @ frontal[:3, :3].T
    )
    assert nose_cam[0, 2] < cheek_cam[0, 2]


def _frontal_render(head: SynthHead, exp: np.ndarray, w: int = 96, h: int = 128):
    K, w2c = camera_rig(("front",), w, h)
    rgb, alpha = head.render(exp, np.zeros(6), 0.1, K, w2c["front"], w, h)
    return rgb, alpha, K, w2c["front"]


def _region(point: np.ndarray, K: np.ndarray, w2c: np.ndarray, r: int = 2):
    col, row = np.round(project(canonical_to_world(point[None], np.zeros(6), 0.1), K, w2c)[0])
    return slice(int(row) - r, int(row) + r + 1), slice(int(col) - r, int(col) + r + 1)


@pytest.mark.parametrize("participants", [("388", "422"), ("443", "445")])
def test_same_expression_same_effect_on_every_identity(participants):
    mouth = np.array([0.0, -0.45, 0.93])
    eye_l, eye_r = np.array([0.33, 0.13, 0.87]), np.array([-0.33, 0.13, 0.87])
    forehead = np.array([0.0, 0.45, 0.85])
    for pid in participants:
        head = SynthHead(identity_coeff(TINY.seed, pid))
        neutral, _, K, w2c = _frontal_render(head, np.zeros(64))
        lum = neutral.mean(axis=2)
        open_ = np.zeros(64)
        open_[0] = 1.5
        opened = _frontal_render(head, open_)[0].mean(axis=2)
        m = _region(mouth, K, w2c)
        assert opened[m].mean() < 0.7 * lum[m].mean(), pid  # dark open mouth
        f = _region(forehead, K, w2c)
        np.testing.assert_allclose(opened[f], lum[f], atol=1e-6)  # the forehead stays
        blink = np.zeros(64)
        blink[3] = 2.0  # the subject's left eye: image right in the frontal view
        closed = _frontal_render(head, blink)[0].mean(axis=2)
        left, right = _region(eye_l, K, w2c, 1), _region(eye_r, K, w2c, 1)
        assert np.abs(closed[left] - lum[left]).mean() > 0.1, pid
        np.testing.assert_allclose(closed[right], lum[right], atol=1e-6)
        # A small-effect dim changes something, but far less than a semantic one.
        small = np.zeros(64)
        small[40] = 1.0
        d_small = np.abs(_frontal_render(head, small)[0].mean(axis=2) - lum).mean()
        assert 0 < d_small < np.abs(opened - lum).mean()


def test_identities_look_different():
    a = _frontal_render(
        SynthHead(tracked_coefficients(TINY, "388", "FREE")["id_coeff"]), np.zeros(64)
    )
    b = _frontal_render(
        SynthHead(tracked_coefficients(TINY, "422", "FREE")["id_coeff"]), np.zeros(64)
    )
    assert np.abs(a[0] - b[0]).mean() > 0.02  # colours
    assert np.abs(a[1] - b[1]).sum() > 20  # silhouettes (pixels)


def test_free_is_wider_than_each_training_style():
    cfg = SynthConfig(frames=60, sequences=("EXP-1-head", "EMO-1-shout+laugh", "FREE"))
    train = {
        p: np.concatenate([true_coefficients(cfg, p, s)["exp"] for s in cfg.sequences[:2]])
        for p in cfg.participants
    }
    for p in cfg.participants:
        free = true_coefficients(cfg, p, "FREE")["exp"]
        own = np.trace(np.cov(train[p].T))
        assert np.trace(np.cov(free.T)) > 10 * own, p
        # Other identities' training expressions cover FREE much better than one's own.
        others = np.concatenate([train[q] for q in cfg.participants if q != p])

        def b2t(bank, free=free):
            return np.linalg.norm(free[:, None] - bank[None], axis=2).min(axis=1).mean()

        assert b2t(np.concatenate([train[p], others])) < 0.7 * b2t(train[p]), p


def test_manifest_and_config_errors(nersemble_root, tmp_path):
    root, _ = nersemble_root
    head = SynthHead.from_manifest(root, "388")
    np.testing.assert_array_equal(
        head.id_coeff, tracked_coefficients(TINY, "388", "FREE")["id_coeff"].astype(np.float64)
    )
    with pytest.raises(SourceError, match="synth.json"):
        load_manifest(tmp_path)
    with pytest.raises(SourceError, match="999"):
        SynthHead.from_manifest(root, "999")
    with pytest.raises(RafDataError, match="even"):
        SynthConfig(width=33)
    with pytest.raises(RafDataError, match="tracking"):
        SynthConfig(tracking="mano")


def test_frames_carry_camera_noise_and_detail(nersemble_root):
    """Version 2 data: colour frames differ from the clean render by seeded camera noise of the
    configured strength; heads carry fine detail that a version 1 manifest turns off."""
    from rafdata.synth import render_sequence

    root, _ = nersemble_root
    clean = replace(TINY, sensor_noise=0.0)
    noisy = [f for _, _, f, _ in render_sequence(TINY, "388", "FREE", np.arange(2))]
    again = [f for _, _, f, _ in render_sequence(TINY, "388", "FREE", np.arange(2))]
    flat = [f for _, _, f, _ in render_sequence(clean, "388", "FREE", np.arange(2))]
    diff = np.stack(noisy).astype(float) - np.stack(flat)
    assert np.array_equal(np.stack(noisy), np.stack(again))  # seeded
    assert abs(diff.std() - TINY.sensor_noise) < 0.3 and abs(diff.mean()) < 0.2

    coeff = np.asarray(load_manifest(root)["participants"]["388"]["id_coeff"])
    detailed = _frontal_render(SynthHead(coeff), np.zeros(EXP_DIM))[0]
    smooth = _frontal_render(SynthHead(coeff, detail=False), np.zeros(EXP_DIM))[0]
    assert np.abs(detailed - smooth).mean() > 1e-3
    np.testing.assert_array_equal(
        _frontal_render(SynthHead.from_manifest(root, "388"), np.zeros(EXP_DIM))[0], detailed)

    old = root.parent / "v1"
    shutil.copytree(root, old, dirs_exist_ok=True)
    manifest = json.loads((old / "synth.json").read_text())
    manifest["version"] = 1
    del manifest["config"]["sensor_noise"]
    (old / "synth.json").write_text(json.dumps(manifest))
    assert manifest_config(old).sensor_noise == 0.0
    np.testing.assert_array_equal(
        _frontal_render(SynthHead.from_manifest(old, "388"), np.zeros(EXP_DIM))[0], smooth)
