"""The viser viewer: its camera maths, its controls, a real headless browser connecting and
receiving the scene, `rafmodel view` serving and stopping, `train --viewer`.

Only localhost traffic: the page and its websocket come from the viser server under test.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import torch

from rafmodel.config import ViewerConfig
from rafmodel.evaluate.runs import load_run, render_avatar
from rafmodel.targets import render_K
from rafmodel.train import Runner, TrainConfig
from tests.browser import chromium, needs_browser
from tests.cli_helpers import cli_process
from tests.train_helpers import TINY_TRAIN, train_tiny

pytest.importorskip("viser")


@pytest.fixture(scope="module")
def run_and_store(banked_store, tmp_path_factory):
    """The session's banked store and a 2-step RAF run of 388 on it."""
    run = train_tiny(banked_store, tmp_path_factory.mktemp("viewer") / "run", aug="raf")
    return run, banked_store


@pytest.fixture(scope="module")
def viewer(run_and_store):
    from rafmodel.viewer import Viewer

    run, store = run_and_store
    v = Viewer.from_runs([run, run], store, ViewerConfig(port=0, device="cpu", render_size=48))
    yield v
    v.stop()


def _port_closed(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    except OSError:
        return True
    return False


def test_store_camera_round_trips_and_renders_as_the_run(viewer, run_and_store):
    from rafmodel.viewer import camera_from_client, client_pose_of

    run = load_run(run_and_store[0], torch.device("cpu"))
    st = viewer.store
    cam = viewer.cameras["222200037"]
    h0, w0 = st.image_size
    wxyz, pos, fov, aspect = client_pose_of(st.cameras.world_to_cam[cam], st.cameras.K[cam],
                                            (h0, w0))
    w2c, K, w, h = camera_from_client(wxyz, pos, fov, run.width / run.height,
                                      max(run.width, run.height))
    assert (w, h) == (run.width, run.height)
    np.testing.assert_allclose(w2c, st.cameras.world_to_cam[cam], atol=1e-6)
    K_run = render_K(st.cameras.K[cam], (h0, w0), w, h).numpy()
    # the synth rig's principal point is centred, so the client's camera is the store's
    np.testing.assert_allclose(K, K_run, rtol=1e-3, atol=0.05)

    viewer.show_neighbor = False
    viewer.pc_values[:] = 0
    t = viewer.current_timestep()
    c = viewer.coeffs(viewer.sources[0])
    img = viewer.render_view(st.cameras.world_to_cam[cam], K_run, w, h)
    assert img.shape == (h, 2 * w, 3)  # two runs side by side
    ref, _ = render_avatar(run, c[0], c[1], c[2], torch.from_numpy(K_run),
                           torch.from_numpy(st.cameras.world_to_cam[cam].astype(np.float32)))
    ref = (ref.permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(img[:, :w].astype(float) - ref).max() <= 1
    assert np.array_equal(img[:, :w], img[:, w:])
    assert viewer.driver.startswith("388 FREE (self")  # the evaluation's own driver first
    np.testing.assert_array_equal(c[0].numpy(), st.timesteps.exp[t])


def test_controls_neighbour_pcs_and_cross_driving(viewer):
    st = viewer.store
    src = viewer.sources[0]
    viewer.show_neighbor = False
    viewer.pc_values[:] = 0
    cross = next(d for d in viewer.drivers if d.startswith("422 "))
    viewer.driver, viewer.frame = cross, 1
    t = viewer.current_timestep()
    assert st.identities[int(st.timesteps.identity[t])] == "422"
    exp, pose, _ = viewer.coeffs(src)
    np.testing.assert_array_equal(exp.numpy(), st.timesteps.exp[t])
    np.testing.assert_allclose(pose[:3].numpy(), st.timesteps.pose[t, :3], atol=1e-6)
    own = np.flatnonzero(st.timesteps.identity == st.identity_index("388"))
    np.testing.assert_allclose(pose[3:].numpy(), st.timesteps.pose[own, 3:].mean(0), rtol=1e-4)

    viewer.show_neighbor = True
    nb = int(viewer.neighbors[t, 0])
    assert int(st.timesteps.identity[nb]) != int(st.timesteps.identity[t])
    np.testing.assert_array_equal(viewer.coeffs(src)[0].numpy(), st.timesteps.exp[nb])
    assert "neighbour in bank `full`" in viewer._describe_neighbor()
    viewer.show_neighbor = False

    viewer.pc_values[0] = 2.0
    moved = viewer.coeffs(src)[0].double().numpy() - st.timesteps.exp[t]
    np.testing.assert_allclose(moved, 2.0 * viewer.pc_std[0] * viewer.pc_axes[0], atol=1e-5)
    viewer.pc_values[:] = 0
    viewer.driver, viewer.frame = next(iter(viewer.drivers)), 0


def test_cross_driving_pose_is_not_recomputed_per_render(viewer, monkeypatch):
    """The subject's pose summary is made once, when the viewer starts, not per frame."""
    import rafmodel.export as export

    def fail(*_):
        raise AssertionError("subject_pose called per render")

    monkeypatch.setattr(export, "subject_pose", fail)
    for label in (d for d in viewer.drivers if d.startswith("422 ")):
        viewer.driver = label
        for frame in range(len(viewer.drivers[label])):
            viewer.frame = frame
            viewer.coeffs(viewer.sources[0])
    viewer.driver, viewer.frame = next(iter(viewer.drivers)), 0


@needs_browser
def test_headless_browser_connects_and_receives_the_scene(run_and_store):
    from rafmodel.viewer import Viewer

    run, store = run_and_store
    v = Viewer.from_runs([run], store, ViewerConfig(port=0, device="cpu", render_size=48))
    port = v.port
    driver = None
    try:
        driver = chromium(640, 480, webgl=True)
        driver.get(v.url)
        deadline = time.time() + 30
        while time.time() < deadline and not any(v.frames_sent.values()):
            time.sleep(0.05)
        clients = v.server.get_clients()
        assert len(clients) == 1, "the page did not connect to the viewer"
        client = next(iter(clients.values()))
        # the browser reported its camera (so its JavaScript runs), and was sent our render
        assert client.camera.update_timestamp > 0
        assert v.frames_sent.get(client.client_id, 0) >= 1
        np.testing.assert_allclose(client.camera.position,
                                   np.linalg.inv(v.store.cameras.world_to_cam[
                                       v.cameras["222200037"]])[:3, 3], atol=1e-4)
        # the browser holds the scene: render it, from behind camera 222200037, whose frustum
        # (drawn blue) must then be in view
        c2w = np.linalg.inv(v.store.cameras.world_to_cam[v.cameras["222200037"]])
        pic = client.get_render(120, 160, wxyz=client.camera.wxyz,
                                position=c2w[:3, 3] - 0.3 * c2w[:3, 2], fov=0.6, timeout=20)
        assert pic.shape == (120, 160, 3)
        blue = (pic[..., 2].astype(int) - pic[..., 0] > 60) & (pic[..., 2] > 120)
        assert blue.sum() > 20, "camera frustum not drawn by the browser"
        assert v.camera_nodes["222200037"].name == "/cameras/222200037"
    finally:
        if driver is not None:
            driver.quit()
        v.stop()
    assert _port_closed(port)


def test_view_command_serves_the_page_and_stops_on_ctrl_c(run_and_store):
    run, store = run_and_store
    # Ctrl-C as a terminal sends it: with SIGINT's default disposition, whatever this test
    # process inherited (a shell's background job, CI's included, starts with it ignored).
    proc = cli_process("rafmodel", "view", str(run), str(store), "--port", "0", "--device",
                       "cpu", env={"PYTHONUNBUFFERED": "1"}, stderr=subprocess.STDOUT,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        port, lines = None, []
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert b"<html" in page.lower() or b"<!doctype" in page.lower()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "Traceback" not in rest
        assert _port_closed(port)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_view_refuses_bad_input_in_one_line(run_and_store, tmp_path):
    from click.testing import CliRunner

    from cli.rafmodel import main

    run, _ = run_and_store
    for args, says in (([str(tmp_path)], "not a rafmodel run"),
                       ([str(run), str(tmp_path / "nope.h5")], "nope.h5: no such store file"),
                       # viser retries the next port on any bind error: this must not hang
                       ([str(run), "--host", "256.0.0.1"], "cannot serve on host '256.0.0.1'")):
        res = CliRunner().invoke(main, ["view", *args, "--port", "0", "--device", "cpu"])
        assert res.exit_code == 2 and says in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_train_with_viewer_serves_and_stops(run_and_store, tmp_path):
    _, store = run_and_store
    said = []
    runner = Runner(TrainConfig(store=str(store), subject="388", aug="vanilla", iters=2,
                                out=str(tmp_path / "live"), viewer=True, viewer_port=0,
                                **TINY_TRAIN), warn=said.append)
    runner.train()
    url = next(m for m in said if m.startswith("viewer: http://127.0.0.1:"))
    assert runner._viewer is None  # stopped with the loop
    assert _port_closed(int(url.rsplit(":", 1)[1]))
