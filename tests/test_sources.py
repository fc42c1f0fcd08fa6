"""rafdata.sources: tracker readers, the NeRSemble and GHA layouts, layout detection."""

from __future__ import annotations

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
