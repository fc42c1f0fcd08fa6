"""rafdata.sources: tracker readers, the NeRSemble and GHA layouts, layout detection."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from rafdata.errors import FrameCountError, SourceError
from rafdata.rotations import matrix_to_axis_angle
from rafdata.sources import GhaSource, NersembleSource, SourceOptions, open_source
from rafdata.sources.tracking import read_bfm_params, read_flame_npz
from rafdata.synth.geometry import rodrigues
from tests.helpers_media import (
    coded_frames,
    flame_arrays,
    frame_colour,
    truncate,
    write_bfm_params,
    write_jpg,
    write_json,
    write_mp4,
)

H, W, N = 48, 32, 6  # portrait, like NeRSemble
SERIALS = ("222200037", "222200038")


def _K(f: float = 100.0) -> list[list[float]]:
    return [[f, 0.0, W / 2], [0.0, f, H / 2], [0.0, 0.0, 1.0]]


def _w2c(i: int) -> list[list[float]]:
    m = np.eye(4)
    m[:3, 3] = [0.1 * i, -0.2, 1.0 + i]
    return m.tolist()


def alpha_value(i: int) -> int:
    return 250 - 30 * i


def make_calibration(pdir: Path, *, per_serial: bool = False, serials=SERIALS) -> None:
    intr = {s: _K(100.0 + i) for i, s in enumerate(serials)} if per_serial else _K()
    write_json(pdir / "calibration" / "camera_params.json",
               {"world_2_cam": {s: _w2c(i) for i, s in enumerate(serials)}, "intrinsics": intr})


def make_videos(seq: Path, n: int = N, serials=SERIALS, alpha: bool = True) -> None:
    for s in serials:
        write_mp4(seq / "images" / f"cam_{s}.mp4", coded_frames(n, H, W))
        if alpha:
            mats = np.stack([np.full((H, W, 3), alpha_value(i), np.uint8) for i in range(n)])
            write_mp4(seq / "alpha_maps" / f"cam_{s}.mp4", mats)


@pytest.fixture()
def nersemble(tmp_path: Path) -> Path:
    """SRC with participant 017: EXP-1-head (BFM, frames 0,2,4), GLASSES (untracked),
    BACKGROUND (jpgs), shared intrinsics, colour calibration, alpha maps."""
    root = tmp_path / "src"
    pdir = root / "017"
    make_calibration(pdir)
    write_json(pdir / "calibration" / "color_calibration.json",
               {SERIALS[0]: (np.eye(3) * 1.1).tolist()})
    seq = pdir / "sequences" / "EXP-1-head"
    make_videos(seq)
    write_bfm_params(seq / "params", [0, 2, 4], pad=4)
    make_videos(pdir / "sequences" / "GLASSES", n=2, alpha=False)
    write_jpg(pdir / "sequences" / "BACKGROUND" / f"image_{SERIALS[0]}.jpg",
              np.zeros((H, W, 3), np.uint8))
    return root


# -- tracker readers ------------------------------------------------------------------------


def test_bfm_any_zero_padding(tmp_path: Path) -> None:
    want = {}
    for frame, pad in ((12, 6), (0, 1), (3, 4)):  # folders "000012", "0", "0003"
        want[frame] = write_bfm_params(tmp_path / "p", [frame], pad=pad, seed=frame)
    tr = read_bfm_params(tmp_path / "p")
    assert tr.frames.tolist() == [0, 3, 12] and tr.frames.dtype == np.int64
    assert tr.exp.shape == (3, 64) and tr.exp.dtype == np.float32 and tr.exp_space == "bfm09"
    assert tr.pose.shape == (3, 6) and tr.scale.shape == (3,)
    for row, frame in enumerate([0, 3, 12]):
        np.testing.assert_array_equal(tr.exp[row], want[frame]["exp"][0])
        np.testing.assert_array_equal(tr.pose[row], want[frame]["pose"][0])
        assert tr.scale[row] == want[frame]["scale"][0]


def test_bfm_nan_names_the_frame_npz(tmp_path: Path) -> None:
    write_bfm_params(tmp_path / "p", [0, 1, 2])
    bad = tmp_path / "p" / "0001" / "params.npz"
    d = dict(np.load(bad))
    d["pose"][0, 2] = np.nan
    np.savez(bad, **d)
    with pytest.raises(SourceError, match=r"0001/params\.npz.*'pose'.*NaN"):
        read_bfm_params(tmp_path / "p")


def test_bfm_wrong_dim_missing_key_empty_duplicate(tmp_path: Path) -> None:
    write_bfm_params(tmp_path / "a", [0, 1], exp_dim=50)
    with pytest.raises(SourceError, match=r"a/0000/params\.npz.*'exp_coeff'.*64"):
        read_bfm_params(tmp_path / "a")
    write_bfm_params(tmp_path / "b", [0])
    np.savez(tmp_path / "b" / "0000" / "params.npz", exp_coeff=np.zeros((1, 64)))
    with pytest.raises(SourceError, match=r"b/0000/params\.npz.*missing key 'pose'"):
        read_bfm_params(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(SourceError, match="empty"):
        read_bfm_params(tmp_path / "c")
    write_bfm_params(tmp_path / "d", [3], pad=1)
    write_bfm_params(tmp_path / "d", [3], pad=4)
    with pytest.raises(SourceError, match="frame 3 appears twice"):
        read_bfm_params(tmp_path / "d")


def test_flame_parts(tmp_path: Path) -> None:
    arrays = flame_arrays([0, 3, 6, 9])
    np.savez(tmp_path / "t.npz", **arrays)
    tr = read_flame_npz(tmp_path / "t.npz")
    assert tr.exp_space == "flame2023:expression+jaw" and tr.exp.shape == (4, 103)
    np.testing.assert_array_equal(tr.exp[:, 100:], arrays["jaw"])
    np.testing.assert_allclose(tr.pose[:, :3], matrix_to_axis_angle(arrays["rotation_matrices"]),
                               atol=1e-6)
    np.testing.assert_array_equal(tr.pose[:, 3:], arrays["translation"])
    np.testing.assert_allclose(tr.scale, np.full(4, 1.05, np.float32))
    assert tr.frames.tolist() == [0, 3, 6, 9] and tr.frames.dtype == np.int64
    tr = read_flame_npz(tmp_path / "t.npz", "eyes+expression+neck")
    assert tr.exp.shape == (4, 109) and tr.exp_space == "flame2023:eyes+expression+neck"
    np.testing.assert_array_equal(tr.exp[:, :6], arrays["eyes"])
    np.testing.assert_array_equal(tr.exp[:, 106:], arrays["neck"])
    assert read_flame_npz(tmp_path / "t.npz", "expression").exp.shape == (4, 100)
    with pytest.raises(SourceError, match="t.npz.*invalid FLAME"):
        read_flame_npz(tmp_path / "t.npz", "expression+tongue")


def test_flame_rotation_conventions(tmp_path: Path) -> None:
    """The store's axis-angle comes from rotation_matrices when the file has them, else from
    `rotation` read as intrinsic XYZ Euler angles (the NeRSemble toolkit's convention)."""
    arrays = flame_arrays([0, 3, 6, 9], seed=4)
    with_matrices = read_flame_npz(_save(tmp_path / "a.npz", arrays)).pose[:, :3]
    euler_only = read_flame_npz(_save(tmp_path / "b.npz", arrays, drop="rotation_matrices"))
    np.testing.assert_allclose(euler_only.pose[:, :3], with_matrices, atol=1e-6)
    for aa, m in zip(with_matrices, arrays["rotation_matrices"], strict=True):
        np.testing.assert_allclose(rodrigues(aa), m, atol=1e-6)
    # not the Euler angles themselves (which an axis-angle reading would have taken)
    assert np.abs(with_matrices - arrays["rotation"]).max() > 1e-3
    # the matrices win over a `rotation` key in another convention
    other = dict(arrays, rotation=arrays["rotation"][:, ::-1].copy())
    np.testing.assert_allclose(read_flame_npz(_save(tmp_path / "c.npz", other)).pose[:, :3],
                               with_matrices, atol=1e-6)
    bad = dict(arrays, rotation_matrices=arrays["rotation_matrices"].copy())
    bad["rotation_matrices"][2] *= 1.5
    with pytest.raises(SourceError, match=r"d\.npz.*not rotations \(first at index 2\)"):
        read_flame_npz(_save(tmp_path / "d.npz", bad))
    short = dict(arrays, rotation_matrices=arrays["rotation_matrices"][:3])
    with pytest.raises(SourceError, match=r"'rotation_matrices' has shape \(3, 3, 3\)"):
        read_flame_npz(_save(tmp_path / "e.npz", short))


def _save(path: Path, arrays: dict, drop: str | None = None) -> Path:
    np.savez(path, **{k: v for k, v in arrays.items() if k != drop})
    return path


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda a: a.pop("jaw"), "missing key 'jaw'"),
        (lambda a: a.pop("frames"), "missing key 'frames'"),
        (lambda a: a.update(translation=a["translation"][:3]), r"'translation' has shape \(3, 3\)"),
        (lambda a: a["expression"].__setitem__((2, 5), np.inf), "'expression'.*NaN or inf"),
        (lambda a: a.update(frames=np.array([0, 3, 3, 9])), "not strictly increasing"),
        (lambda a: a.update(frames=np.array([-1, 3, 4, 9])), "negative"),
    ],
)
def test_flame_bad_files(tmp_path: Path, mutate, pattern: str) -> None:
    arrays = flame_arrays([0, 3, 6, 9])
    mutate(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SourceError, match=rf"bad\.npz.*{pattern}"):
        read_flame_npz(tmp_path / "bad.npz")


# -- NeRSemble layout -----------------------------------------------------------------------


def test_nersemble_round_trip(nersemble: Path) -> None:
    warnings: list[str] = []
    src = open_source(nersemble, warn=warnings.append)
    assert isinstance(src, NersembleSource) and src.layout == "nersemble"
    assert src.participants() == ["017"]
    seqs = src.sequences("17")  # numeric match with the zero-padded folder
    assert [s.name for s in seqs] == ["EXP-1-head"]
    assert len(warnings) == 1 and "GLASSES" in warnings[0] and src.skipped == warnings
    seq = seqs[0]
    cams = seq.cameras()
    assert [c.serial for c in cams] == list(SERIALS)
    np.testing.assert_array_equal(cams[0].K, np.array(_K()))
    np.testing.assert_array_equal(cams[1].world_to_cam, np.array(_w2c(1)))
    np.testing.assert_array_equal(cams[0].color, np.eye(3) * 1.1)
    assert cams[1].color is None
    tr = seq.tracking()
    assert tr.frames.tolist() == [0, 2, 4] and tr.exp_space == "bfm09"
    for c in cams:
        seq.check_camera(c.serial, tr.frames)
    got = list(seq.read_frames(SERIALS[1], tr.frames))
    assert len(got) == 3
    for fr, i in zip(got, tr.frames.tolist(), strict=True):
        assert fr.rgb.shape == (H, W, 3)
        assert np.abs(fr.rgb.astype(int) - frame_colour(i).astype(int)).max() <= 3
        assert fr.mask is not None and fr.mask.shape == (H, W)
        assert abs(int(fr.mask.mean()) - alpha_value(i)) <= 2


def test_nersemble_per_serial_intrinsics_flame_tracking_root(tmp_path: Path) -> None:
    """mono_flame_avatar style: per-serial intrinsics, one camera, FLAME tracking elsewhere."""
    src, track = tmp_path / "src", tmp_path / "track"
    make_calibration(src / "017", per_serial=True)
    make_videos(src / "017" / "sequences" / "EMO-1", serials=SERIALS[1:], alpha=False)
    (track / "17" / "sequences" / "EMO-1" / "tracking").mkdir(parents=True)
    np.savez(track / "17" / "sequences" / "EMO-1" / "tracking" / "flame2023_tracking_v2.npz",
             **flame_arrays([1, 5]))
    opts = SourceOptions(tracking_root=track, participants=["17"], flame_exp="expression")
    source = open_source(src, options=opts)
    assert source.participants() == ["017"]
    (seq,) = source.sequences("017")
    (cam,) = seq.cameras()
    assert cam.serial == SERIALS[1]
    np.testing.assert_array_equal(cam.K, np.array(_K(101.0)))
    assert seq.tracking().exp.shape == (2, 100)
    (frame,) = list(seq.read_frames(cam.serial, np.array([5])))
    assert frame.mask is None and np.abs(frame.rgb.astype(int) - frame_colour(5)).max() <= 3


def test_nersemble_polynomial_colour_matrices(nersemble: Path) -> None:
    """color_calibration.json holds (3, T) Cheung 2004 matrices; other shapes are refused."""
    from rafdata.sources.nersemble import read_calibration

    calib = nersemble / "017" / "calibration"
    ccm = np.hstack([np.eye(3), np.full((3, 7), 0.01)])  # 10 terms
    write_json(calib / "color_calibration.json", {SERIALS[0]: ccm.tolist()})
    np.testing.assert_array_equal(read_calibration(calib)[SERIALS[0]].color, ccm)
    write_json(calib / "color_calibration.json", {SERIALS[0]: np.eye(3, 6).tolist()})
    with pytest.raises(SourceError, match=rf"color_calibration\.json.*'{SERIALS[0]}' has shape "
                                          r"\(3, 6\), expected \(3, T\)"):
        read_calibration(calib)


def test_nersemble_missing_calibration(nersemble: Path) -> None:
    (nersemble / "017" / "calibration" / "camera_params.json").unlink()
    (seq,) = NersembleSource(nersemble, SourceOptions()).sequences("017")
    assert seq.tracking().frames.size == 3  # tracking does not need calibration
    with pytest.raises(SourceError, match=r"calibration/camera_params\.json.*not found"):
        seq.cameras()


def test_nersemble_video_without_calibration(nersemble: Path) -> None:
    make_calibration(nersemble / "017", serials=SERIALS[:1])
    (seq,) = NersembleSource(nersemble).sequences("017")
    with pytest.raises(SourceError, match=rf"camera_params\.json.*camera {SERIALS[1]}"):
        seq.cameras()
    # ... unless that camera is filtered out
    (seq,) = NersembleSource(nersemble, SourceOptions(cameras=[SERIALS[0]])).sequences("017")
    assert [c.serial for c in seq.cameras()] == [SERIALS[0]]


def test_nersemble_coefficient_only(tmp_path: Path) -> None:
    track = tmp_path / "track"
    write_bfm_params(track / "388" / "sequences" / "EXP-2-eyes" / "params", [0, 1])
    (tmp_path / "src").mkdir()
    source = open_source(tmp_path / "src", options=SourceOptions(tracking_root=track))
    assert source.layout == "nersemble" and source.participants() == ["388"]
    (seq,) = source.sequences("388")
    assert seq.cameras() == [] and seq.tracking().exp.shape == (2, 64)


def test_nersemble_both_formats(nersemble: Path) -> None:
    tdir = nersemble / "017" / "sequences" / "EXP-1-head" / "tracking"
    tdir.mkdir()
    np.savez(tdir / "flame2023_tracking_v2.npz", **flame_arrays([0, 1]))
    with pytest.raises(SourceError, match="EXP-1-head.*--tracking-format"):
        NersembleSource(nersemble).sequences("017")
    (seq,) = NersembleSource(nersemble, SourceOptions(tracking_format="flame")).sequences("017")
    assert seq.tracking().exp_space == "flame2023:expression+jaw"
    (seq,) = NersembleSource(nersemble, SourceOptions(tracking_format="bfm")).sequences("017")
    assert seq.tracking().exp_space == "bfm09"
    np.savez(tdir / "other.npz", **flame_arrays([0, 1]))
    with pytest.raises(SourceError, match="exactly one tracking npz"):
        NersembleSource(nersemble, SourceOptions(tracking_format="flame")).sequences("017")


def test_nersemble_sequence_and_participant_filters(nersemble: Path) -> None:
    write_bfm_params(nersemble / "017" / "sequences" / "GLASSES" / "params", [0])
    assert [s.name for s in NersembleSource(nersemble).sequences("017")] == ["EXP-1-head",
                                                                            "GLASSES"]
    only = NersembleSource(nersemble, SourceOptions(sequences=["GLASSES"]))
    assert [s.name for s in only.sequences("017")] == ["GLASSES"]
    assert NersembleSource(nersemble, SourceOptions(participants=["18"])).participants() == []


def test_nersemble_frame_count_mismatch(nersemble: Path) -> None:
    (seq,) = NersembleSource(nersemble).sequences("017")
    with pytest.raises(FrameCountError, match=rf"cam_{SERIALS[0]}\.mp4.*{N} frames.*frame 9"):
        seq.check_camera(SERIALS[0], np.array([0, 4, 9]))
    seq.check_camera(SERIALS[0], np.array([0, N - 1]))  # the last frame is fine


def test_nersemble_corrupt_and_missing_video(nersemble: Path) -> None:
    vdir = nersemble / "017" / "sequences" / "EXP-1-head" / "images"
    (vdir / f"cam_{SERIALS[0]}.mp4").write_bytes(b"")
    truncate(vdir / f"cam_{SERIALS[1]}.mp4", 0.6)
    (seq,) = NersembleSource(nersemble).sequences("017")
    for s in SERIALS:
        with pytest.raises(SourceError, match=f"cam_{s}.mp4") as err:
            seq.check_camera(s, np.array([0]))
        assert not isinstance(err.value, FrameCountError)
    with pytest.raises(SourceError, match="no video for camera 123"):
        seq.check_camera("123", np.array([0]))


# -- GHA layout -----------------------------------------------------------------------------


def make_gha(root: Path, frames=(0, 1, 2)) -> Path:
    pdir = root / "388"
    rng = np.random.default_rng(0)
    for f in frames:
        idir = pdir / "images" / f"{f:04d}"
        for k, s in enumerate(SERIALS):
            write_jpg(idir / f"image_{s}.jpg", np.broadcast_to(frame_colour(f), (H, W, 3)).copy())
            write_jpg(idir / f"image_lowres_{s}.jpg", np.zeros((8, 8, 3), np.uint8))
            mask = np.full((H, W), 200 - 50 * f, np.uint8)
            write_jpg(idir / f"mask_{s}.jpg", mask if k == 0 else np.stack([mask] * 3, -1))
            cdir = pdir / "cameras" / f"{f:04d}"
            cdir.mkdir(parents=True, exist_ok=True)
            np.savez(cdir / f"camera_{s}.npz", extrinsic=np.array(_w2c(k))[:3],
                     intrinsic=np.array(_K(100.0 + k)))
    write_bfm_params(pdir / "params", list(frames))
    write_jpg(pdir / "background" / f"image_{SERIALS[0]}.jpg", rng.integers(0, 255, (H, W, 3),
                                                                            dtype=np.uint8))
    return root


def test_gha_round_trip(tmp_path: Path) -> None:
    root = make_gha(tmp_path / "gha")
    source = open_source(root)
    assert isinstance(source, GhaSource) and source.participants() == ["388"]
    (seq,) = source.sequences("388")
    assert seq.name == "all"
    cams = seq.cameras()
    assert [c.serial for c in cams] == list(SERIALS)
    np.testing.assert_array_equal(cams[1].world_to_cam, np.array(_w2c(1)))
    np.testing.assert_array_equal(cams[1].K, np.array(_K(101.0)))
    tr = seq.tracking()
    assert tr.frames.tolist() == [0, 1, 2]
    seq.check_camera(SERIALS[1], tr.frames)
    for s in SERIALS:  # grey and 3-channel mask JPEGs both give (H, W)
        got = list(seq.read_frames(s, tr.frames))
        for fr, f in zip(got, tr.frames.tolist(), strict=True):
            assert np.abs(fr.rgb.astype(int) - frame_colour(f)).max() <= 6
            assert fr.mask.shape == (H, W) and abs(int(fr.mask.mean()) - (200 - 50 * f)) <= 3


def test_gha_masks_per_frame(tmp_path: Path) -> None:
    """GHA writes a mask per frame where it has one: a frame without it reads as None, a
    camera without any has no mask part, and a mask of another size than its image is an
    error naming the mask file."""
    root = make_gha(tmp_path / "gha")
    idir = root / "388" / "images"
    (idir / "0001" / f"mask_{SERIALS[0]}.jpg").unlink()
    for f in ("0000", "0001", "0002"):
        (idir / f / f"mask_{SERIALS[1]}.jpg").unlink()
    (seq,) = GhaSource(root).sequences("388")
    frames = seq.tracking().frames
    assert seq.image_parts(SERIALS[0]) == ("rgb", "mask")
    assert seq.image_parts(SERIALS[1]) == ("rgb",)
    masks = list(seq.read_part(SERIALS[0], "mask", frames))
    assert [m is None for m in masks] == [False, True, False]
    assert [fr.mask is None for fr in seq.read_frames(SERIALS[1], frames)] == [True] * 3
    write_jpg(idir / "0002" / f"mask_{SERIALS[0]}.jpg", np.zeros((H + 2, W), np.uint8))
    with pytest.raises(SourceError, match=rf"0002/mask_{SERIALS[0]}\.jpg.*mask is {W}x{H + 2}"):
        list(seq.read_part(SERIALS[0], "mask", frames))


def test_gha_errors(tmp_path: Path) -> None:
    root = make_gha(tmp_path / "gha")
    (seq,) = GhaSource(root).sequences("388")
    (root / "388" / "images" / "0001" / f"image_{SERIALS[0]}.jpg").unlink()
    with pytest.raises(SourceError, match=rf"0001/image_{SERIALS[0]}\.jpg.*missing"):
        seq.check_camera(SERIALS[0], seq.tracking().frames)
    cam = root / "388" / "cameras" / "0002" / f"camera_{SERIALS[1]}.npz"
    np.savez(cam, extrinsic=np.array(_w2c(5))[:3], intrinsic=np.array(_K()))
    with pytest.raises(SourceError, match=rf"0002/camera_{SERIALS[1]}\.npz.*differs"):
        seq.cameras()


# -- detection --------------------------------------------------------------------------------


def test_open_source_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nowhere.*not found"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty.*unrecognised"):
        open_source(tmp_path / "empty")
    with pytest.raises(SourceError, match="unknown layout"):
        open_source(tmp_path / "empty", layout="blender")
    # An explicit layout needs no detection.
    assert open_source(tmp_path / "empty", layout="gha").participants() == []


def test_damaged_npz_is_named_as_such(tmp_path):
    folder = tmp_path / "params"
    write_bfm_params(folder, np.arange(3))
    bad = sorted(folder.iterdir())[1] / "params.npz"
    bad.write_bytes(b"garbage, not a zip archive")
    with pytest.raises(SourceError, match="not an .npz archive") as err:
        read_bfm_params(folder)
    assert str(bad) in str(err.value)


# -- numbers the store keeps: finite after the cast to float32 (issue #15) ---------------------


@pytest.mark.parametrize("key, value, dtype", [
    ("exp_coeff", 1e39, np.float64),
    ("pose", -1e39, np.float64),
    ("scale", 1e300, np.float64),
    ("exp_coeff", np.inf, np.float32),
])
def test_bfm_values_beyond_float32(tmp_path: Path, key: str, value: float, dtype) -> None:
    write_bfm_params(tmp_path / "p", [0, 1, 2])
    bad = tmp_path / "p" / "0002" / "params.npz"
    d = {k: v.astype(dtype) for k, v in np.load(bad).items()}
    d[key].reshape(-1)[-1] = value
    np.savez(bad, **d)
    what = "beyond the float32 range" if np.isfinite(value) else "NaN or inf"
    with pytest.raises(SourceError, match=rf"0002/params\.npz: key '{key}' holds .*{what}"):
        read_bfm_params(tmp_path / "p")
    # the largest float32 is fine, and stored as it is
    d[key].reshape(-1)[-1] = float(np.finfo(np.float32).max)
    np.savez(bad, **d)
    tr = read_bfm_params(tmp_path / "p")
    assert np.isfinite(tr.exp).all() and np.isfinite(tr.pose).all() and np.isfinite(tr.scale).all()


def test_gha_tracking_beyond_float32(tmp_path: Path) -> None:
    root = make_gha(tmp_path / "gha")
    bad = root / "388" / "params" / "0001" / "params.npz"
    d = {k: v.astype(np.float64) for k, v in np.load(bad).items()}
    d["exp_coeff"][0, 5] = 1e39
    np.savez(bad, **d)
    (seq,) = open_source(root).sequences("388")
    with pytest.raises(SourceError, match=r"0001/params\.npz: key 'exp_coeff' holds a value "
                                          r"beyond the float32 range .*1e\+39.*index \(5,\)"):
        seq.tracking()


@pytest.mark.parametrize("key, index, pattern", [
    ("expression", (2, 5), r"'expression' holds a value beyond the float32 range the store "
                           r"keeps \(1e\+39, "
                           r"first at frame 6, index \(2, 5\)\)"),
    ("translation", (3, 0), r"'translation' holds a value beyond .*frame 9"),
    ("scale", (0, 0), r"'scale' holds a value beyond the float32 range the store keeps "
                      r"\(1e\+300"),
    ("jaw", (1, 1), r"'jaw' holds NaN or inf values \(first at frame 3, index \(1, 1\)\)"),
])
def test_flame_values_beyond_float32(tmp_path: Path, key, index, pattern) -> None:
    arrays = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
              for k, v in flame_arrays([0, 3, 6, 9]).items()}
    arrays[key][index] = np.nan if key == "jaw" else (1e300 if key == "scale" else 1e39)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SourceError, match=rf"bad\.npz: key {pattern}"):
        read_flame_npz(tmp_path / "bad.npz")


def test_flame_frames_beyond_int64(tmp_path: Path) -> None:
    arrays = flame_arrays([0, 3, 6, 9])
    arrays["frames"] = np.array([0, 3, 6, 1e300])
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SourceError, match="'frames' holds values beyond the int64 range"):
        read_flame_npz(tmp_path / "bad.npz")


def test_complex_and_text_coefficients_refused(tmp_path: Path) -> None:
    write_bfm_params(tmp_path / "p", [0])
    path = tmp_path / "p" / "0000" / "params.npz"
    d = dict(np.load(path))
    np.savez(path, **dict(d, pose=d["pose"].astype(np.complex64)))
    with pytest.raises(SourceError, match=r"'pose' is not numeric \(dtype complex64\)"):
        read_bfm_params(tmp_path / "p")
    np.savez(path, **dict(d, scale=np.array(["1.0"])))
    with pytest.raises(SourceError, match=r"'scale' is not numeric"):
        read_bfm_params(tmp_path / "p")


# -- calibration sanity (issue #15) -------------------------------------------------------------


def _rot(axis: int, angle: float) -> np.ndarray:
    return rodrigues(np.eye(3)[axis] * angle)


@pytest.mark.parametrize("K, w2c, problem", [
    (np.zeros((3, 3)), np.eye(4), "focal lengths fx=0, fy=0"),
    (np.diag([100.0, -100.0, 1.0]), np.eye(4), "fx=100, fy=-100"),
    (np.array([[100.0, 100.0, 16], [100.0, 100.0, 24], [0, 0, 1]]), np.eye(4), "singular"),
    (np.array([[100.0, 0, 16], [0, 100.0, 24], [0, 0, 0]]), np.eye(4), r"last row \[0, 0, 0\]"),
    (np.array([[np.nan, 0, 16], [0, 100.0, 24], [0, 0, 1]]), np.eye(4), "intrinsics hold NaN"),
    (np.array(_K()), np.zeros((4, 4)), r"last row \[0, 0, 0, 0\]"),
    (np.array(_K()), np.diag([1.0, 1.0, -1.0, 1.0]), "det -1"),
    (np.array(_K()), np.diag([1.1, 1.0, 1.0, 1.0]), r"not orthonormal \(max \|R\^T R - I\| = 0.21"),
    (np.array(_K()), np.full((4, 4), np.inf), "world_to_cam holds NaN or inf"),
    (np.eye(2), np.eye(4), r"shape \(2, 2\)"),
])
def test_check_calibration_problems(K, w2c, problem: str) -> None:
    from rafdata.geometry import check_calibration

    got = check_calibration(K, w2c)
    assert got is not None and re.search(problem, got), got


def test_check_calibration_accepts_real_cameras() -> None:
    from rafdata.geometry import check_calibration

    m = np.eye(4)
    m[:3, :3] = _rot(1, 0.7) @ _rot(0, -0.2)
    m[:3, 3] = [0.1, -0.3, 1.2]
    assert check_calibration(np.array(_K()), m) is None
    m32 = m.astype(np.float32).astype(np.float64)  # GHA stores float32 extrinsics
    assert check_calibration(np.array(_K(), np.float32), m32) is None
    skew = np.array(_K())
    skew[0, 1] = 0.5  # a skewed sensor is still a camera
    assert check_calibration(skew, m) is None


def _write_params(pdir: Path, w2c: dict, intr) -> None:
    write_json(pdir / "calibration" / "camera_params.json",
               {"world_2_cam": {s: np.asarray(m).tolist() for s, m in w2c.items()},
                "intrinsics": intr})


def test_nersemble_bad_camera_skipped_with_warning(nersemble: Path) -> None:
    pdir = nersemble / "017"
    _write_params(pdir, {SERIALS[0]: _w2c(0), SERIALS[1]: np.zeros((4, 4))},
                  {SERIALS[0]: _K(), SERIALS[1]: _K()})
    warnings: list[str] = []
    source = open_source(nersemble, warn=warnings.append)
    (seq,) = source.sequences("017")
    assert [c.serial for c in seq.cameras()] == [SERIALS[0]]
    assert [c.serial for c in seq.cameras()] == [SERIALS[0]]  # and warned once
    (line,) = [w for w in warnings if "camera_params" in w]
    assert str(pdir / "calibration" / "camera_params.json") in line
    assert f"camera {SERIALS[1]} skipped" in line and "last row [0, 0, 0, 0]" in line
    # asked for the bad camera only: an error, not a sequence without images
    only_bad = NersembleSource(nersemble, SourceOptions(cameras=[SERIALS[1]]))
    (seq,) = only_bad.sequences("017")
    with pytest.raises(SourceError, match=rf"camera_params\.json: no camera with video in "
                                          rf"017/EXP-1-head has a usable calibration "
                                          rf"\(camera {SERIALS[1]}: world_to_cam"):
        seq.cameras()


@pytest.mark.parametrize("intr, w2c, problem", [
    (np.zeros((3, 3)).tolist(), {s: _w2c(i) for i, s in enumerate(SERIALS)}, "fx=0"),
    (_K(), {s: np.zeros((4, 4)) for s in SERIALS}, "last row"),
    ({s: [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]] for s in SERIALS},
     {s: _w2c(0) for s in SERIALS}, "singular"),
    ({s: [[float("nan")] * 3] * 3 for s in SERIALS}, {s: _w2c(0) for s in SERIALS},
     r"'intrinsics/\d+' holds NaN"),
])
def test_nersemble_every_camera_bad_is_an_error(nersemble: Path, intr, w2c, problem) -> None:
    _write_params(nersemble / "017", w2c, intr)
    (seq,) = NersembleSource(nersemble).sequences("017")
    with pytest.raises(SourceError, match=rf"camera_params\.json: no usable camera: all 2 "
                                          rf"calibrations are bad \(camera {SERIALS[0]}: "
                                          rf".*{problem}"):
        seq.cameras()


def test_nersemble_bad_camera_numbers_cost_that_camera_only(nersemble: Path) -> None:
    """A per-camera matrix of the wrong shape or with NaN is that camera's problem."""
    pdir = nersemble / "017"
    _write_params(pdir, {SERIALS[0]: _w2c(0), SERIALS[1]: [[1.0, 2.0]]}, _K())
    warnings: list[str] = []
    (seq,) = NersembleSource(nersemble, warn=warnings.append).sequences("017")
    assert [c.serial for c in seq.cameras()] == [SERIALS[0]]
    assert any(f"camera {SERIALS[1]} skipped: 'world_2_cam/{SERIALS[1]}' has shape (1, 2)"
               in w for w in warnings)


def test_gha_bad_camera_skipped_then_all_bad_is_an_error(tmp_path: Path) -> None:
    root = make_gha(tmp_path / "gha")
    cam = root / "388" / "cameras" / "0001" / f"camera_{SERIALS[1]}.npz"
    bad_w2c = np.array(_w2c(1))[:3]
    bad_w2c[:3, :3] *= 2.0  # a scaled "rotation"
    np.savez(cam, extrinsic=bad_w2c, intrinsic=np.array(_K(101.0)))
    warnings: list[str] = []
    (seq,) = open_source(root, warn=warnings.append).sequences("388")
    assert [c.serial for c in seq.cameras()] == [SERIALS[0]]
    (line,) = warnings
    assert line.startswith(f"{cam}: camera {SERIALS[1]} skipped: world_to_cam rotation is not "
                           "orthonormal")
    assert seq.cameras() and len(warnings) == 1  # cached: warned once
    for s in SERIALS:
        for f in ("0000", "0001", "0002"):
            np.savez(root / "388" / "cameras" / f / f"camera_{s}.npz",
                     extrinsic=np.array(_w2c(0))[:3], intrinsic=np.zeros((3, 3)))
    (seq,) = GhaSource(root).sequences("388")
    with pytest.raises(SourceError, match=r"388/cameras: no camera of participant 388 has a "
                                          r"usable calibration \(.*camera_222200037\.npz: "
                                          r"camera 222200037 skipped: intrinsics have focal"):
        seq.cameras()


def test_gha_non_finite_or_text_camera_skipped(tmp_path: Path) -> None:
    root = make_gha(tmp_path / "gha")
    cdir = root / "388" / "cameras" / "0002"
    big = np.array(_K(), np.longdouble)
    big[0, 0] = np.longdouble("1e400")  # finite as float128, inf as the stored float64
    np.savez(cdir / f"camera_{SERIALS[0]}.npz", extrinsic=np.array(_w2c(0))[:3], intrinsic=big)
    np.savez(cdir / f"camera_{SERIALS[1]}.npz", extrinsic=np.array(_w2c(1))[:3],
             intrinsic=np.array([["a"] * 3] * 3))
    warnings: list[str] = []
    (seq,) = GhaSource(root, warn=warnings.append).sequences("388")
    with pytest.raises(SourceError, match="no camera of participant 388"):
        seq.cameras()
    assert "key 'intrinsic' holds NaN or inf values" in warnings[0]
    assert "key 'intrinsic' is not numeric (dtype <U1)" in warnings[1]


# -- odd folder names (issue #15) -----------------------------------------------------------------


def test_nersemble_odd_participant_folders_warned(nersemble: Path) -> None:
    import shutil

    for name in ("①", "17 ", "٣"):
        shutil.copytree(nersemble / "017", nersemble / name)
    warnings: list[str] = []
    source = NersembleSource(nersemble, SourceOptions(participants=["3", "17"]),
                             warn=warnings.append)
    assert source.participants() == ["017"]
    odd = sorted(w for w in warnings if "participant folder" in w)
    assert len(odd) == 3
    for line, name in zip(odd, ["'17 '", "'٣'", "'①'"], strict=True):
        assert line.startswith(f"{nersemble}: folder {name} skipped")


def test_nersemble_non_utf8_sequence_and_frame_folders(nersemble: Path) -> None:
    import os
    import shutil

    seqs = os.fsencode(nersemble / "017" / "sequences")
    shutil.copytree(os.fsdecode(seqs + b"/EXP-1-head"), os.fsdecode(seqs + b"/EXP-\xff"))
    shutil.copytree(seqs + b"/EXP-1-head", seqs + b"/FREE ")
    params = nersemble / "017" / "sequences" / "EXP-1-head" / "params"
    shutil.copytree(params / "0002", params / "①")
    shutil.copytree(params / "0002", params / "0006 ")
    (params / ".cache").mkdir()  # hidden: passed over silently
    warnings: list[str] = []
    source = open_source(nersemble, warn=warnings.append)
    (seq,) = source.sequences("017")
    assert seq.name == "EXP-1-head"
    assert "017: sequence folder 'EXP-\\xff' skipped: name is not valid UTF-8" in warnings
    assert "017: sequence folder 'FREE ' skipped: name has leading or trailing whitespace" \
        in warnings
    assert seq.tracking().frames.tolist() == [0, 2, 4]
    (line,) = [w for w in warnings if "frame number" in w]
    assert line == (f"{params}: skipped 2 folder(s) not named by a frame number (ASCII digits): "
                    "'0006 ', '①'")
    assert source.skipped == warnings
    for w in warnings:
        w.encode("utf-8")  # printable as it is: no surrogate escapes left


def test_gha_odd_participant_and_frame_folders(tmp_path: Path) -> None:
    import os
    import shutil

    root = make_gha(tmp_path / "gha")
    shutil.copytree(root / "388", root / "①")
    shutil.copytree(root / "388", os.fsdecode(os.fsencode(root) + b"/p\xe9"))
    shutil.copytree(root / "388" / "images" / "0001", root / "388" / "images" / "²")
    warnings: list[str] = []
    source = open_source(root, warn=warnings.append)
    assert source.participants() == ["388"]
    assert f"{root}: folder '①' skipped: participant name looks like a number but is not " \
           "ASCII digits" in warnings
    assert f"{root}: folder 'p\\xe9' skipped: participant name is not valid UTF-8" in warnings
    (seq,) = source.sequences("388")
    seq.check_camera(SERIALS[0], seq.tracking().frames)
    assert any("images: skipped 1 folder(s)" in w and "'²'" in w for w in warnings)


def test_participant_filter_is_ascii_digits(nersemble: Path) -> None:
    assert NersembleSource(nersemble, SourceOptions(participants=["17"])).participants() \
        == ["017"]
    for query in ("1_7", " 17", "١٧"):  # int() takes all three
        assert NersembleSource(nersemble, SourceOptions(participants=[query])) \
            .participants() == []
