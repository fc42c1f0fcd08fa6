"""Ingest round trips against the generator's ground truth, resume, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from rafdata.errors import FrameCountError, SourceError, StoreError
from rafdata.ingest import IngestConfig, ingest
from rafdata.inspect import check_invariants, verify
from rafdata.progress import NullProgress
from rafdata.rotations import euler_xyz_intrinsic_to_matrix
from rafdata.store import Store
from rafdata.synth.geometry import rodrigues
from tests.store_helpers import sha256


def decode_all(path: Path, channel0: bool = False) -> np.ndarray:
    """Every frame of a video, decoded independently of rafdata (PyAV)."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    arr = np.stack(frames)
    return arr[..., 0] if channel0 else arr


def bfm_truth(root: Path, pid: str, seq: str) -> dict[int, dict]:
    out = {}
    for d in sorted((root / pid / "sequences" / seq / "params").iterdir()):
        with np.load(d / "params.npz") as z:
            out[int(d.name)] = {k: z[k] for k in z.files}
    return out


# --------------------------------------------------------------------------------------------
# round trips


def test_bfm_round_trip(synth_bfm, bfm_store):
    with Store(bfm_store) as s:
        assert s.exp_space == "bfm09" and s.exp_dim == 64
        assert s.identities == ["388", "422", "443"]
        assert s.image_size == (64, 48)
        assert [s.sequences.name[k] for k in range(len(s.sequences))] == ["EXP-1-head", "FREE"] * 3
        assert s.sequences.held_out.tolist() == [False, True] * 3
        assert s.synthetic is not None and s.synthetic["config"]["seed"] == 3
        for pid in s.identities:
            for seq in ("EXP-1-head", "FREE"):
                truth = bfm_truth(synth_bfm, pid, seq)
                rows = s.timestep_rows(identity=pid, sequences=[seq])
                assert s.timesteps.frame[rows].tolist() == sorted(truth)
                for r in rows:
                    t = truth[int(s.timesteps.frame[r])]
                    # coefficients equal exactly
                    np.testing.assert_array_equal(s.timesteps.exp[r], t["exp_coeff"][0])
                    np.testing.assert_array_equal(s.timesteps.pose[r], t["pose"][0])
                    assert s.timesteps.scale[r] == t["scale"][0]
        # images equal the decoded source video frames at the tracked indices, masks too
        for serial in ("222200037", "222200038"):
            seq_dir = synth_bfm / "422" / "sequences" / "EXP-1-head"
            video = decode_all(seq_dir / "images" / f"cam_{serial}.mp4")
            alpha = decode_all(seq_dir / "alpha_maps" / f"cam_{serial}.mp4", channel0=True)
            rows = s.image_rows(identity="422", sequences=["EXP-1-head"], serials=[serial])
            assert len(rows) == 4
            for i in rows:
                sample = s.image(i)
                ref = video[sample.frame].astype(int)
                assert np.abs(sample.rgb.astype(int) - ref).mean() < 1.0
                assert np.abs(sample.mask.astype(int) - alpha[sample.frame]).mean() < 1.0
        assert check_invariants(s) == []
        assert verify(s).ok


def test_images_match_the_rendered_source(synth_bfm, bfm_store):
    """The stored image of a timestep is the generator's render of its true coefficients."""
    from rafdata.synth import SynthHead

    with Store(bfm_store) as s:
        head = SynthHead.from_manifest(synth_bfm, "443")
        rows = s.image_rows(identity="443", sequences=["EXP-1-head"])
        for i in rows[:3]:
            sample = s.image(i)
            # the tracking carries noise; the alpha of the render must still overlap the mask
            _, alpha = head.render(sample.exp, sample.pose, sample.scale, sample.K,
                                   sample.world_to_cam, 48, 64)
            a = alpha > 0.5
            m = sample.mask > 127
            iou = (a & m).sum() / max((a | m).sum(), 1)
            assert iou > 0.85


def test_flame_round_trip(synth_flame, tmp_path):
    out = tmp_path / "flame.h5"
    report = ingest(synth_flame, out, IngestConfig(workers=1))
    assert len(report.written) == 4 and report.images == 4 * 2 * 4
    with Store(out) as s:
        assert s.exp_space == "flame2023:expression+jaw" and s.exp_dim == 103
        for pid in ("388", "422"):
            npz = synth_flame / pid / "sequences" / "FREE" / "tracking"
            (path,) = list(npz.glob("*.npz"))
            with np.load(path) as z:
                rows = s.timestep_rows(identity=pid, sequences=["FREE"])
                np.testing.assert_array_equal(s.timesteps.frame[rows], z["frames"])
                np.testing.assert_array_equal(
                    s.timesteps.exp[rows], np.concatenate([z["expression"], z["jaw"]], 1))
                # the store's axis-angle is the file's rotation, whose `rotation` key holds it
                # as intrinsic XYZ Euler angles
                rot = np.stack([rodrigues(r) for r in s.timesteps.pose[rows, :3]])
                np.testing.assert_allclose(rot, z["rotation_matrices"], atol=1e-6)
                np.testing.assert_allclose(rot, euler_xyz_intrinsic_to_matrix(z["rotation"]),
                                           atol=1e-6)
                np.testing.assert_array_equal(s.timesteps.pose[rows, 3:], z["translation"])
        assert check_invariants(s) == []


def test_flame_parts_option(synth_flame, tmp_path):
    out = tmp_path / "flame_only.h5"
    ingest(synth_flame, out, IngestConfig(flame_exp="expression", no_images=True))
    with Store(out) as s:
        assert s.exp_space == "flame2023:expression" and s.exp_dim == 100 and s.n_images == 0


def test_gha_round_trip(synth_gha, tmp_path):
    out = tmp_path / "gha.h5"
    ingest(synth_gha, out, IngestConfig(workers=2))
    with Store(out) as s:
        assert s.exp_space == "bfm09"
        assert s.sequences.name == ["all", "all"] and not s.sequences.held_out.any()
        assert s.image_has_mask.all()
        pid_dir = synth_gha / "388"
        frames = sorted(int(p.name) for p in (pid_dir / "params").iterdir())
        rows = s.timestep_rows(identity="388")
        assert s.timesteps.frame[rows].tolist() == frames
        with np.load(pid_dir / "params" / f"{frames[2]:04d}" / "params.npz") as z:
            np.testing.assert_array_equal(s.timesteps.exp[rows[2]], z["exp_coeff"][0])
        i = s.image_rows(identity="388", serials=["222200037"])[2]
        sample = s.image(i)
        with np.load(pid_dir / "cameras" / f"{sample.frame:04d}" / "camera_222200037.npz") as z:
            np.testing.assert_allclose(sample.world_to_cam[:3], z["extrinsic"])
            np.testing.assert_allclose(sample.K, z["intrinsic"])
        from PIL import Image

        jpg = np.asarray(Image.open(pid_dir / "images" / f"{sample.frame:04d}"
                                    / "image_222200037.jpg").convert("RGB"))
        np.testing.assert_array_equal(sample.rgb, jpg)
        assert check_invariants(s) == []


def test_gha_frames_without_a_mask(synth_gha, tmp_path):
    """Colour and masks decode as separate parts: a frame whose mask file is missing is
    stored without a matte (has_mask False, mask_crc 0), every other image keeps its own."""
    src = tmp_path / "gha"
    shutil.copytree(synth_gha, src)
    frames = sorted((src / "388" / "images").iterdir())
    (frames[1] / "mask_222200037.jpg").unlink()
    out = tmp_path / "gha.h5"
    ingest(src, out, IngestConfig(workers=2, participants=("388",)))
    with Store(out) as s:
        missing = [i for i in range(s.n_images)
                   if s.cameras.serial[s.image_camera[i]] == "222200037"
                   and s.timesteps.frame[s.image_timestep[i]] == int(frames[1].name)]
        assert len(missing) == 1
        expect = np.ones(s.n_images, bool)
        expect[missing] = False
        np.testing.assert_array_equal(s.image_has_mask, expect)
        assert s.image_mask_crc[missing[0]] == 0 and verify(s).ok
        assert check_invariants(s) == []


def test_crop_and_resize_keep_geometry(synth_bfm, bfm_store, tmp_path):
    """After --crop/--size the stored K re-renders the stored content (masks overlap)."""
    from rafdata.synth import SynthHead

    out = tmp_path / "crop.h5"
    ingest(synth_bfm, out, IngestConfig(participants=("388",), crop=(-6, 8, 54, 48),
                                        size=(36, 32), workers=1))
    head = SynthHead.from_manifest(synth_bfm, "388")
    with Store(out) as s, Store(bfm_store) as full:
        assert s.image_size == (32, 36)
        for i in s.image_rows(identity="388")[::3]:
            sample = s.image(i)
            _, alpha = head.render(sample.exp, sample.pose, sample.scale, sample.K,
                                   sample.world_to_cam, 36, 32)
            a, m = alpha > 0.5, sample.mask > 127
            assert (a & m).sum() / max((a | m).sum(), 1) > 0.8
        # the intrinsics moved by the crop offset and scaled by 36/54 and 32/48
        c = full.cameras.serial.index("222200037")
        K0, K1 = full.cameras.K[c], s.cameras.K[s.cameras.serial.index("222200037")]
        np.testing.assert_allclose(K1[0, 2], (K0[0, 2] + 6 + 0.5) * 36 / 54 - 0.5)
        np.testing.assert_allclose(K1[1, 1], K0[1, 1] * 32 / 48)


# --------------------------------------------------------------------------------------------
# selection, coefficients-only, resume


def test_coefficients_only_never_opens_videos(synth_bfm, tmp_path):
    track = tmp_path / "tracking_only"
    for params in synth_bfm.glob("*/sequences/*/params"):
        shutil.copytree(params, track / params.relative_to(synth_bfm))
    out = tmp_path / "coef.h5"
    report = ingest(track, out, IngestConfig(no_images=True))
    assert report.images == 0 and len(report.written) == 6 and report.warnings == []
    # asking for images where there are no videos says so, and still ingests the coefficients
    report = ingest(track, tmp_path / "coef2.h5", IngestConfig(images_for=("388",)))
    assert len(report.written) == 6 and report.images == 0
    assert [w for w in report.warnings if "no camera videos" in w] == [
        "participant 388: no camera videos in 2 sequence(s) (EXP-1-head, FREE); their "
        "coefficients are ingested without images (--no-images or --images-for say this is "
        "intended)"]
    with Store(out) as s:
        assert s.n_images == 0 and len(s.timesteps) == 6 * 4 and len(s.cameras) == 0


def test_images_for_subset_and_every(synth_bfm, tmp_path):
    out = tmp_path / "subset.h5"
    ingest(synth_bfm, out, IngestConfig(images_for=("422",), every=2, sequences=("EXP-1-head",)))
    with Store(out) as s:
        assert len(s.sequences) == 3 and len(s.timesteps) == 3 * 2
        assert set(s.timesteps.frame.tolist()) == {0, 4}
        counts = {pid: len(s.image_rows(identity=pid)) for pid in s.identities}
        assert counts == {"388": 0, "422": 2 * 2, "443": 0}


def test_resume_appends_and_skips(synth_bfm, tmp_path):
    out = tmp_path / "resume.h5"
    first = ingest(synth_bfm, out, IngestConfig(participants=("388",)))
    assert first.written == ["388/EXP-1-head", "388/FREE"]
    second = ingest(synth_bfm, out, IngestConfig())
    assert second.skipped == ["388/EXP-1-head", "388/FREE"] and len(second.written) == 4
    third = ingest(synth_bfm, out, IngestConfig())
    assert third.written == [] and len(third.skipped) == 6
    with Store(out) as s:
        assert len(s.sequences) == 6 and s.n_images == 6 * 2 * 4
        assert check_invariants(s) == []


def test_crash_mid_sequence_then_rerun_equals_clean_run(synth_bfm, bfm_store, tmp_path,
                                                       monkeypatch):
    from rafdata.segment import SequenceWriter

    out = tmp_path / "crash.h5"
    real_put = SequenceWriter.put_rgb
    calls = {"n": 0}

    def flaky_put(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # inside the third sequence (2 x 2 cameras x 4 frames before)
            raise KeyboardInterrupt
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(SequenceWriter, "put_rgb", flaky_put)
    with pytest.raises(KeyboardInterrupt):
        ingest(synth_bfm, out, IngestConfig(workers=2))
    with Store(out) as s:
        assert len(s.sequences) == 2  # only complete sequences are visible
        assert s.n_images == 2 * 2 * 4 and check_invariants(s) == []
    monkeypatch.setattr(SequenceWriter, "put_rgb", real_put)
    report = ingest(synth_bfm, out, IngestConfig(workers=2))
    assert len(report.skipped) == 2 and len(report.written) == 4
    with Store(out) as a, Store(bfm_store) as b:
        np.testing.assert_array_equal(a.timesteps.exp, b.timesteps.exp)
        np.testing.assert_array_equal(a.image_timestep, b.image_timestep)
        for i in (0, a.n_images // 2, a.n_images - 1):
            np.testing.assert_array_equal(a.read_rgb(i), b.read_rgb(i))
        assert verify(a).ok


# --------------------------------------------------------------------------------------------
# bad input: one line naming the file, store unharmed


def _existing_store(synth, tmp_path) -> Path:
    out = tmp_path / "existing.h5"
    ingest(synth, out, IngestConfig(participants=("388",), no_images=True))
    return out


@pytest.mark.parametrize("key,value", [("exp_coeff", np.nan), ("pose", np.inf)])
def test_non_finite_coefficients_stop_and_leave_store_unharmed(synth_copy, tmp_path, key, value):
    out = _existing_store(synth_copy, tmp_path)
    bad = synth_copy / "443" / "sequences" / "FREE" / "params" / "0002" / "params.npz"
    with np.load(bad) as z:
        data = {k: z[k] for k in z.files}
    data[key][0, 1] = value
    np.savez(bad, **data)
    with pytest.raises(SourceError) as err:
        ingest(synth_copy, out, IngestConfig())
    assert str(bad) in str(err.value) and key in str(err.value) and "\n" not in str(err.value)
    with Store(out) as s:  # the run wrote nothing: tracking is validated before writing
        assert s.identities == ["388"] and len(s.sequences) == 2
        assert check_invariants(s) == [] and verify(s).ok


def test_wrong_expression_dim(synth_copy, tmp_path):
    bad = synth_copy / "422" / "sequences" / "EXP-1-head" / "params" / "0004" / "params.npz"
    with np.load(bad) as z:
        data = {k: z[k] for k in z.files}
    data["exp_coeff"] = data["exp_coeff"][:, :50]
    np.savez(bad, **data)
    with pytest.raises(SourceError, match="64"):
        ingest(synth_copy, tmp_path / "o.h5", IngestConfig())
    # a refused new store leaves nothing behind (no empty store file, no segment folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5.lock", "src"]


def test_mixing_expression_spaces(synth_bfm, synth_flame, tmp_path):
    out = _existing_store(synth_bfm, tmp_path)
    before = sha256(out)
    with pytest.raises(SourceError, match="one store holds one space"):
        ingest(synth_flame, out, IngestConfig(participants=("422",)))
    assert sha256(out) == before


def test_missing_calibration(synth_copy, tmp_path):
    calib = synth_copy / "422" / "calibration" / "camera_params.json"
    calib.unlink()
    with pytest.raises(SourceError, match="camera_params.json"):
        ingest(synth_copy, tmp_path / "o.h5", IngestConfig())
    # coefficient-only ingest does not need calibration
    report = ingest(synth_copy, tmp_path / "c.h5", IngestConfig(no_images=True))
    assert len(report.written) == 6


def test_frame_count_mismatch_stops(synth_copy, tmp_path):
    params = synth_copy / "388" / "sequences" / "FREE" / "params"
    shutil.copytree(params / "0006", params / "0040")  # tracking beyond the 8-frame video
    with pytest.raises(FrameCountError) as err:
        ingest(synth_copy, tmp_path / "o.h5", IngestConfig())
    assert "cam_222200037.mp4" in str(err.value) or "cam_222200038.mp4" in str(err.value)


def test_corrupt_camera_skipped_with_warning(synth_copy, tmp_path):
    video = synth_copy / "422" / "sequences" / "FREE" / "images" / "cam_222200038.mp4"
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    progress = NullProgress()
    report = ingest(synth_copy, tmp_path / "o.h5", IngestConfig(), progress)
    assert any("cam_222200038.mp4" in w and "skipped" in w for w in report.warnings)
    with Store(tmp_path / "o.h5") as s:
        rows = s.image_rows(identity="422", sequences=["FREE"])
        assert {s.cameras.serial[c] for c in s.image_camera[rows]} == {"222200037"}
        assert s.n_images == 6 * 2 * 4 - 4
        assert check_invariants(s) == []
    with pytest.raises(SourceError, match="cam_222200038.mp4"):
        ingest(synth_copy, tmp_path / "strict.h5", IngestConfig(strict=True))


def test_missing_camera_in_one_sequence(synth_copy, tmp_path):
    (synth_copy / "443" / "sequences" / "EXP-1-head" / "images" / "cam_222200037.mp4").unlink()
    report = ingest(synth_copy, tmp_path / "o.h5", IngestConfig())
    with Store(tmp_path / "o.h5") as s:
        assert len(s.image_rows(identity="443", sequences=["EXP-1-head"])) == 4
        assert len(s.image_rows(identity="443", sequences=["FREE"])) == 8
    assert report.images == 6 * 2 * 4 - 4


def test_newer_store_refused_untouched(synth_bfm, tmp_path):
    import h5py

    out = _existing_store(synth_bfm, tmp_path)
    with h5py.File(out, "r+") as f:
        f.attrs["format_version"] = 99
    before = sha256(out)
    with pytest.raises(StoreError, match="newer rafdata"):
        ingest(synth_bfm, out, IngestConfig())
    assert sha256(out) == before


def test_size_mismatch_needs_size_option(synth_bfm, tmp_path):
    out = tmp_path / "o.h5"
    ingest(synth_bfm, out, IngestConfig(participants=("388",), size=(24, 32)))
    with pytest.raises(StoreError, match="--size 24 32"):
        ingest(synth_bfm, out, IngestConfig(participants=("422",)))
    ingest(synth_bfm, out, IngestConfig(participants=("422",), size=(24, 32)))
    with Store(out) as s:
        assert len(s.sequences) == 4 and check_invariants(s) == []


def test_history_recorded(synth_bfm, bfm_store):
    with Store(bfm_store) as s:
        history = json.loads(s.attrs["ingest_history"])
    assert history[0]["config"]["held_out"] == ["FREE"] or history[0]["config"]["held_out"] == (
        "FREE",)


def _break_mid_decode(monkeypatch, broken: Path, after: int = 2) -> None:
    """Make decoding ``broken`` fail after ``after`` frames, as a damaged stream that probing
    cannot see does."""
    from rafdata.sources import nersemble

    real = nersemble.video.read_frames

    def read_frames(path, frames, **kw):
        it = real(path, frames, **kw)
        if Path(path) != broken:
            return it

        def failing():
            for i, frame in enumerate(it):
                if i == after:
                    raise SourceError(path, f"decoding failed at frame {i + 1}")
                yield frame
        return failing()

    monkeypatch.setattr(nersemble.video, "read_frames", read_frames)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_camera_failing_mid_decode_is_dropped_and_the_sequence_redone(synth_copy, tmp_path,
                                                                       monkeypatch, workers):
    """The failure surfaces while other sequences decode ahead; the sequence is written again
    without that camera and every other sequence stays complete."""
    broken = synth_copy / "422" / "sequences" / "EXP-1-head" / "images" / "cam_222200038.mp4"
    _break_mid_decode(monkeypatch, broken)
    report = ingest(synth_copy, tmp_path / "o.h5", IngestConfig(workers=workers))
    assert any("cam_222200038.mp4" in w and "decoding failed" in w for w in report.warnings)
    with Store(tmp_path / "o.h5") as s:
        rows = s.image_rows(identity="422", sequences=["EXP-1-head"])
        assert {s.cameras.serial[c] for c in s.image_camera[rows]} == {"222200037"}
        assert s.n_images == 6 * 2 * 4 - 4 == report.images
        assert check_invariants(s) == [] and verify(s).ok
        ref = decode_all(synth_copy / "422" / "sequences" / "EXP-1-head" / "images"
                         / "cam_222200037.mp4")
        np.testing.assert_array_equal(s.read_rgb(int(rows[0])), ref[0])
    with pytest.raises(SourceError, match="cam_222200038.mp4"):
        ingest(synth_copy, tmp_path / "strict.h5", IngestConfig(strict=True, workers=workers))


def test_alpha_map_failing_mid_decode_drops_its_camera(synth_copy, tmp_path, monkeypatch):
    """The alpha map decodes on its own thread: its failure drops the camera like a colour
    video's, named in the warning."""
    broken = synth_copy / "388" / "sequences" / "FREE" / "alpha_maps" / "cam_222200037.mp4"
    _break_mid_decode(monkeypatch, broken, after=1)
    report = ingest(synth_copy, tmp_path / "o.h5", IngestConfig(workers=2))
    assert any("alpha_maps/cam_222200037.mp4" in w for w in report.warnings)
    with Store(tmp_path / "o.h5") as s:
        rows = s.image_rows(identity="388", sequences=["FREE"])
        assert {s.cameras.serial[c] for c in s.image_camera[rows]} == {"222200038"}
        assert s.image_has_mask.all() and verify(s).ok and check_invariants(s) == []


def test_error_found_ahead_stops_only_at_its_sequence(synth_copy, tmp_path):
    """A frame-count mismatch in the last sequence is found while earlier ones are written
    (the decoders plan one sequence ahead); those are committed, the run stops at it."""
    params = synth_copy / "443" / "sequences" / "FREE" / "params"
    shutil.copytree(params / "0006", params / "0040")
    with pytest.raises(FrameCountError):
        ingest(synth_copy, tmp_path / "o.h5", IngestConfig(workers=2))
    with Store(tmp_path / "o.h5") as s:
        assert len(s.sequences) == 5
        assert check_invariants(s) == []
    shutil.rmtree(params / "0040")
    report = ingest(synth_copy, tmp_path / "o.h5", IngestConfig(workers=2))
    assert report.written == ["443/FREE"] and len(report.skipped) == 5


def test_intrinsics_for_another_resolution_are_flagged(synth_copy, tmp_path):
    """Intrinsics of a video twice the size put the principal point at the frame's corner: the
    run goes on, with a warning naming the camera."""
    path = synth_copy / "422" / "calibration" / "camera_params.json"
    params = json.loads(path.read_text())
    K = np.asarray(params["intrinsics"], float)
    K[:2] *= 2.0
    params["intrinsics"] = K.tolist()
    path.write_text(json.dumps(params))
    report = ingest(synth_copy, tmp_path / "o.h5", IngestConfig(participants=("388", "422")))
    flagged = [w for w in report.warnings if "principal point" in w]
    assert flagged and all("422" in w for w in flagged)
    assert {w.split("camera ")[1].split(":")[0] for w in flagged} == {"222200037", "222200038"}
