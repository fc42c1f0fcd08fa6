"""3DGS .ply export: the standard layout, read back by plyfile and by us, re-renders to the
run's own image; frame selection and the CLI's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.rafmodel import main as rafmodel
from rafdata.errors import RafDataError
from rafdata.store import Store
from rafmodel.config import ExportConfig
from rafmodel.evaluate.cross_driving import subject_pose
from rafmodel.evaluate.runs import load_run, render_avatar
from rafmodel.export import (
    SH_C0,
    SubjectPose,
    driving_coeffs,
    export_run,
    export_timesteps,
    find_frame,
    frame_gaussians,
    ply_properties,
    read_ply,
    sequence_timesteps,
    write_ply,
)
from rafmodel.render import render
from rafmodel.targets import render_K
from tests.train_helpers import train_tiny


@pytest.fixture(scope="module")
def tiny_run(bfm_store, tmp_path_factory):
    """A 2-step CPU run of subject 388 (the avatar need not be good, only trained)."""
    return train_tiny(bfm_store, tmp_path_factory.mktemp("export") / "run")


def test_ply_has_the_3dgs_layout_and_rerenders_to_the_same_image(tiny_run, bfm_store,
                                                                   tmp_path):
    plyfile = pytest.importorskip("plyfile")
    run = load_run(tiny_run, torch.device("cpu"))
    with Store(bfm_store) as st:
        t = int(sequence_timesteps(st, "388")[1])
        c = driving_coeffs(st, SubjectPose.of(st, "388"), t)
        cam = int(np.flatnonzero(st.cameras.identity == st.identity_index("388"))[0])
        K = render_K(st.cameras.K[cam], st.image_size, run.width, run.height)
        w2c = torch.from_numpy(st.cameras.world_to_cam[cam].astype(np.float32))
    g = frame_gaussians(run.model, c)
    path = write_ply(tmp_path / "frame.ply", g["means"], g["quats"], g["scales"],
                     g["opacities"], g["colors"])

    # what the common viewers read: plyfile sees one float32 vertex element in 3DGS order
    ply = plyfile.PlyData.read(str(path))
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == ply_properties()
    assert len(ply_properties()) == 62 and vertex.count == run.model.num_gaussians
    assert all(vertex[p].dtype == np.float32 for p in ("x", "opacity", "rot_0", "f_rest_44"))
    np.testing.assert_allclose(vertex["x"], g["means"][:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(0.5 + SH_C0 * vertex["f_dc_1"], g["colors"][:, 1].numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(np.exp(vertex["scale_2"]), g["scales"][:, 2].numpy(), rtol=1e-5)
    np.testing.assert_allclose(1 / (1 + np.exp(-vertex["opacity"])), g["opacities"].numpy(),
                               atol=1e-6)
    assert np.all(vertex["nx"] == 0) and np.all(vertex["f_rest_0"] == 0)
    q = np.stack([vertex[f"rot_{i}"] for i in range(4)], 1)
    np.testing.assert_allclose(np.abs((q * g["quats"].numpy()).sum(1)), 1.0, atol=1e-5)

    # read back and re-rendered through render(): the run's own image
    back = read_ply(path)
    image, _ = render_avatar(run, c.exp, c.pose, c.scale, K, w2c)
    again = render(back.means, back.quats, back.scales, back.opacities, back.colors, w2c, K,
                   run.width, run.height, background=run.background, backend="torch")
    diff = (again.image.permute(2, 0, 1).clamp(0, 1) - image).abs().max().item()
    assert diff < 1e-5
    assert image.std() > 0.01  # a picture of the head, not an empty frame

    # plyfile's arrays and ours agree (our reader is a plain parser, no plyfile needed)
    np.testing.assert_array_equal(back.means[:, 1].numpy(), vertex["y"])


def test_cross_driving_uses_the_evaluation_pose_rule(bfm_store):
    with Store(bfm_store) as st:
        other = int(sequence_timesteps(st, "422")[2])
        me = SubjectPose.of(st, "388")
        c = driving_coeffs(st, me, other)
        t_mean, scale = subject_pose(st, st.identity_index("388"))
        assert me.identity == st.identity_index("388") and me.scale == scale
        np.testing.assert_allclose(c.pose[:3].numpy(), st.timesteps.pose[other, :3], atol=1e-6)
        np.testing.assert_allclose(c.pose[3:].numpy(), t_mean, rtol=1e-5)
        assert abs(float(c.scale) - scale) < 1e-5
        np.testing.assert_array_equal(c.exp.numpy(), st.timesteps.exp[other])
        own = int(sequence_timesteps(st, "388")[0])  # self-driving: pose as tracked
        np.testing.assert_allclose(driving_coeffs(st, me, own).pose.numpy(),
                                   st.timesteps.pose[own], atol=1e-6)
        frame = int(st.timesteps.frame[other])
        assert find_frame(st, "422", frame) == other
        with pytest.raises(RafDataError, match="no tracked frame 999"):
            find_frame(st, "422", 999)
        with pytest.raises(RafDataError, match="no sequence 'NOPE'"):
            sequence_timesteps(st, "422", "NOPE")


def test_export_timesteps_picks_the_frames_the_options_name(bfm_store):
    with Store(bfm_store) as st:
        own = [int(t) for t in sequence_timesteps(st, "388")]
        other = [int(t) for t in sequence_timesteps(st, "422")]
        frame = int(st.timesteps.frame[other[1]])
        for cfg, rows in (
            (ExportConfig(ply="a.ply"), own[:1]),  # the subject's held-out sequence, 1st frame
            (ExportConfig(ply="a.ply", timestep=other[2]), [other[2]]),
            (ExportConfig(ply="a.ply", driver="422", frame=frame), [other[1]]),
            (ExportConfig(all_frames="d", driver="422"), other),
            (ExportConfig(all_frames="d"), own),
        ):
            assert export_timesteps(st, "388", cfg) == rows, cfg
        assert len(own) > 1 and len(other) > 1
        for cfg, says in (
            (ExportConfig(), "exactly one of --ply FILE or --all-frames DIR"),
            (ExportConfig(ply="a", all_frames="d"), "exactly one of"),
            (ExportConfig(ply="a", timestep=0, driver="422"), "--timestep names the frame"),
            (ExportConfig(all_frames="d", frame=3), "--all-frames writes a whole sequence"),
            (ExportConfig(ply="a", driver="999"), "999"),
        ):
            with pytest.raises(RafDataError, match=says):
                export_timesteps(st, "388", cfg)


def test_export_run_writes_a_sequence_with_one_subject_pose(tiny_run, bfm_store, tmp_path,
                                                           monkeypatch):
    """The subject's pose summary is computed once for a whole sequence, not per frame."""
    import rafmodel.export as export

    calls = []
    real = export.subject_pose
    monkeypatch.setattr(export, "subject_pose", lambda *a: calls.append(a) or real(*a))
    done = export_run(tiny_run, None, ExportConfig(all_frames=str(tmp_path / "seq"),
                                                   driver="422"))
    assert len(calls) == 1 and len(done.paths) == len(done.frames) > 1
    assert done.num_gaussians == 200 and all(p.is_file() for p in done.paths)
    with pytest.raises(RafDataError, match="exactly one of"):  # checked before loading
        export_run(tmp_path / "no-run", None, ExportConfig())


def test_read_ply_refuses_damaged_files(tmp_path):
    g = torch.rand(5, 3)
    path = write_ply(tmp_path / "a.ply", g, torch.rand(5, 4) + 0.1, g + 0.1, torch.rand(5), g)
    raw = path.read_bytes()
    (tmp_path / "cut.ply").write_bytes(raw[:-10])
    with pytest.raises(RafDataError, match="cut.ply: truncated"):
        read_ply(tmp_path / "cut.ply")
    (tmp_path / "text.ply").write_text("hello")
    with pytest.raises(RafDataError, match="not a PLY file"):
        read_ply(tmp_path / "text.ply")
    assert len(read_ply(path)) == 5


def test_export_cli(tiny_run, bfm_store, tmp_path):
    cli = CliRunner()
    res = cli.invoke(rafmodel, ["export", str(tiny_run), "--ply", str(tmp_path / "one.ply"),
                                "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(read_ply(tmp_path / "one.ply")) == 200
    res = cli.invoke(rafmodel, ["export", str(tiny_run), str(bfm_store), "--all-frames",
                                str(tmp_path / "seq"), "--driver", "422", "--quiet"])
    assert res.exit_code == 0, res.output
    with Store(bfm_store) as st:
        n = len(sequence_timesteps(st, "422"))
    files = sorted((tmp_path / "seq").glob("422_FREE_*.ply"))
    assert len(files) == n > 1
    for args, says in (
        (["--ply", str(tmp_path / "x.ply"), "--driver", "422", "--frame", "999"],
         "no tracked frame 999"),
        (["--ply", str(tmp_path / "x.ply"), "--timestep", "100000"], "out of range"),
        ([], "exactly one of --ply FILE or --all-frames DIR"),
    ):
        res = cli.invoke(rafmodel, ["export", str(tiny_run), *args, "--quiet"])
        assert res.exit_code == 2 and says in res.output, res.output
        assert "Traceback" not in res.output
    res = cli.invoke(rafmodel, ["export", str(tmp_path / "nope"), "--ply", "x.ply"])
    assert res.exit_code == 2 and "not a rafmodel run" in res.output
