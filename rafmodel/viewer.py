"""A web viewer of trained avatars (viser), after training (`rafmodel view`) or during it
(`rafmodel train --viewer`).

viser serves its web client from its own wheel (``viser/client/build``) and talks to the page
over a websocket on the same port: nothing is fetched from the internet, and the server binds
to localhost only. The scene holds the store's cameras of the subject as frustums (click one
to jump there); the avatar itself is rendered here with :func:`rafmodel.render.render`
(gsplat on CUDA, our rasterizer on the CPU) from each browser's camera and sent as the
scene's background image, one panel per run, side by side.

Controls (shared by every browser; the camera is each browser's own):
- driver: any sequence of any identity. The subject's own sequences are self-driving (pose
  as tracked); another identity's are cross-driving with the evaluation's pose rule (the
  driver's rotation, the subject's mean translation and median scale);
- frame slider, play / fps;
- expression PCs: offsets along the first principal components of the expression bank, in
  units of the bank's standard deviation along each, added to the driver's expression (push
  the avatar to expressions no sequence has);
- RAF neighbour: drive with the bank neighbour the frame's expression is swapped for in
  training (``/banks/{bank}/neighbors/index[t, 0]``; the pose stays the frame's, as in
  training);
- camera: jump to a store camera; render size: the longest side rendered, in pixels.

Rendering happens in :meth:`Viewer.tick`, called by one thread only: a thread of the viewer's
own for `rafmodel view`, the training loop between steps for `rafmodel train --viewer` (so the
model is never read while the optimiser writes it, and a run without ``--viewer`` pays
nothing).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rafdata.errors import RafDataError
from rafmodel.config import VIEWER_RENDER_SIZES, ViewerConfig
from rafmodel.evaluate.config import FRONTAL_SERIAL  # the camera a browser starts at
from rafmodel.evaluate.frames import cameras_of
from rafmodel.export import SubjectPose, driving_coeffs

PC_SLIDERS = 5


@dataclass
class AvatarSource:
    """One avatar shown in the viewer.

    model: called at render time (the training loop may replace parameters between steps);
    background (3,) float on the model's device; subject: the participant id it was trained
    on; label: shown above the panels.
    """

    label: str
    subject: str
    model: Callable[[], torch.nn.Module]
    background: torch.Tensor
    bank: str | None = None


def camera_from_client(wxyz: np.ndarray, position: np.ndarray, fov: float, aspect: float,
                       longest: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A viser camera (OpenCV axes: +z forward, +y down; ``wxyz``/``position`` its pose in
    the world; ``fov`` vertical, radians; ``aspect`` width / height) as render() inputs:
    (world_to_cam (4, 4), K (3, 3) OpenCV pixel centres, width, height) with the longest side
    ``longest`` px."""
    from viser import transforms as tf

    c2w = np.eye(4)
    c2w[:3, :3] = tf.SO3(np.asarray(wxyz, np.float64)).as_matrix()
    c2w[:3, 3] = position
    if aspect >= 1:
        w, h = longest, max(8, round(longest / aspect))
    else:
        w, h = max(8, round(longest * aspect)), longest
    fy = h / 2 / math.tan(fov / 2)
    # square pixels; the principal point at the image centre in OpenCV's convention
    K = np.array([[fy, 0, (w - 1) / 2], [0, fy, (h - 1) / 2], [0, 0, 1]])
    return np.linalg.inv(c2w), K, w, h


def client_pose_of(world_to_cam: np.ndarray, K: np.ndarray, image_hw: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A store camera as a viser camera: (wxyz (4,), position (3,), vertical fov rad,
    aspect w/h); the inverse of :func:`camera_from_client` for centred principal points."""
    from viser import transforms as tf

    c2w = np.linalg.inv(np.asarray(world_to_cam, np.float64))
    h, w = image_hw
    fov = 2 * math.atan(h / 2 / float(K[1, 1]))
    return tf.SO3.from_matrix(c2w[:3, :3]).wxyz, c2w[:3, 3], fov, w / h


def _check_host(host: str) -> None:
    """RafDataError unless a server socket can bind to ``host``: viser retries the next port
    on any bind error, so an address that can never be bound would make it loop forever."""
    import socket

    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.bind(addr)
    except OSError as err:
        raise RafDataError(None, f"cannot serve on host {host!r}: "
                           f"{err.strerror or err}") from None


def _image_hw(store, K: np.ndarray) -> tuple[int, int]:
    """(H, W) of the stored images; a store without images: from the principal point."""
    if store.image_size is not None:
        return tuple(store.image_size)
    return round(2 * float(K[1, 2]) + 1), round(2 * float(K[0, 2]) + 1)


class Viewer:
    """A viser server showing one or more avatars of the same store (see module doc).

    Use :meth:`from_runs` (trained runs) or :meth:`for_training` (a live Runner); ``stop()``
    shuts the server down. ``frames_sent``: client id -> images sent (tests and status).
    ``cfg.device`` is for :meth:`from_runs`; the constructor renders on ``device``.
    """

    def __init__(self, sources: list[AvatarSource], store, cfg: ViewerConfig, *,
                 device: torch.device | str = "cpu", refresh_s: float | None = None,
                 own_thread: bool = True):
        import viser

        if not sources:
            raise ValueError("nothing to show: no avatar sources")
        self.sources = sources
        self.store = store
        self.device = torch.device(device)
        self.backend = cfg.backend
        # live training changes the avatar under a still camera: re-render every refresh_s
        self.refresh_s = refresh_s
        self.render_size = cfg.render_size or VIEWER_RENDER_SIZES[
            "cuda" if self.device.type == "cuda" else "cpu"]
        # the cross-driving pose rule's summary of each subject: once, not per render
        self._poses = {s.subject: SubjectPose.of(store, s.subject) for s in sources}
        self.frames_sent: dict[int, int] = {}
        self.step: int | None = None
        self._seen: dict[int, float] = {}  # client id -> camera timestamp last rendered
        self._last_render: dict[int, float] = {}
        self._dirty = True
        self._playing_since = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subject = self._poses[sources[0].subject].identity
        self._setup_drivers()
        self._setup_bank()
        _check_host(cfg.host)
        # Port 0: the OS picks a free one (tests); a busy port: viser tries the next ones.
        self.server = viser.ViserServer(host=cfg.host, port=cfg.port, verbose=False)
        self.port = self.server.get_port()
        self.url = f"http://{cfg.host}:{self.port}"
        try:
            self._build_scene()
            self._build_gui()
        except BaseException:
            self.server.stop()  # never leave a half-built server holding the port
            raise
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(lambda c: self._seen.pop(c.client_id, None))
        if own_thread:
            self._thread = threading.Thread(target=self._loop, name="rafmodel-viewer",
                                            daemon=True)
            self._thread.start()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_runs(cls, runs: Sequence[str | Path], store_path: str | Path | None = None,
                  cfg: ViewerConfig | None = None) -> Viewer:
        """A viewer of trained runs (folders or checkpoints). ``store_path``: default the
        first run's training store. ``cfg``: default :class:`ViewerConfig`'s defaults.
        RafDataError (one line) for a bad run or store."""
        from rafdata.store import Store
        from rafmodel.device import select_device
        from rafmodel.evaluate.runs import load_run, unique_labels

        cfg = cfg or ViewerConfig()
        dev = select_device(cfg.device)
        infos = [load_run(r, dev) for r in runs]
        unique_labels(infos)
        store = Store(store_path if store_path is not None else infos[0].train["store"])
        subjects = {i.subject for i in infos}
        sources = [AvatarSource(label=i.label if len(subjects) == 1 else f"{i.subject} {i.label}",
                                subject=i.subject, model=(lambda m=i.model: m),
                                background=i.background, bank=i.train.get("bank"))
                   for i in infos]
        return cls(sources, store, cfg, device=dev)

    @classmethod
    def for_training(cls, runner, port: int = ViewerConfig.port) -> Viewer:
        """A viewer of a live :class:`rafmodel.train.Runner`, on localhost: rendered between
        training steps from the training loop (:meth:`tick`), refreshed every second."""
        from rafdata.store import Store

        c = runner.cfg
        src = AvatarSource(label=f"training {c.aug}", subject=runner.dataset.subject,
                           model=lambda: runner.model, background=runner.background,
                           bank=c.bank)
        cfg = ViewerConfig(port=port, render_size=max(runner.width, runner.height),
                           backend=c.backend)
        return cls([src], Store(c.store), cfg, device=runner.device, refresh_s=1.0,
                   own_thread=False)

    def _setup_drivers(self) -> None:
        st = self.store
        ts = st.timesteps
        self.drivers: dict[str, np.ndarray] = {}  # label -> /timesteps rows in frame order
        order = sorted(range(len(st.sequences)),
                       key=lambda s: (int(st.sequences.identity[s]) != self._subject,
                                      not bool(st.sequences.held_out[s]), s))
        for s in order:
            rows = np.flatnonzero(ts.sequence == s)
            if not len(rows):
                continue
            ident = int(st.sequences.identity[s])
            kind = "self" if ident == self._subject else "cross"
            held = ", held out" if bool(st.sequences.held_out[s]) else ""
            label = f"{st.identities[ident]} {st.sequences.name[s]} ({kind}{held})"
            self.drivers[label] = rows[np.argsort(ts.frame[rows], kind="stable")]
        if not self.drivers:
            raise RafDataError(st.path, "no timesteps to drive the avatar with")
        self.driver = next(iter(self.drivers))
        self.frame = 0

    def _setup_bank(self) -> None:
        """Neighbour table and expression PCA of the first source's bank (or any bank)."""
        from rafdata.bank import bank_names, read_bank

        st = self.store
        names = bank_names(st)
        want = self.sources[0].bank
        name = want if want in names else (names[0] if names else None)
        self.bank_name = name
        self.neighbors = None
        ts = st.timesteps
        if name is not None:
            bank = read_bank(st, name)
            self.neighbors = bank.index
            pool = ts.exp[bank.members]
        else:  # no bank: the PCs of every training expression
            pool = ts.exp[st.timestep_rows(held_out=False)]
        pool = np.asarray(pool, np.float64)
        self.exp_mean = pool.mean(0)
        _, s, vt = np.linalg.svd(pool - self.exp_mean, full_matrices=False)
        k = min(PC_SLIDERS, len(s))
        self.pc_axes = vt[:k]  # (k, D)
        self.pc_std = s[:k] / math.sqrt(max(1, len(pool) - 1))  # (k,)
        self.pc_values = np.zeros(k)
        self.show_neighbor = False

    def _build_scene(self) -> None:
        st = self.store
        t_mean = self._poses[self.sources[0].subject].translation
        self.head_center = t_mean
        cams = cameras_of(st, self._subject)
        self.cameras: dict[str, int] = {st.cameras.serial[c]: c for c in cams}
        self.camera_nodes = {}
        up = np.zeros(3)
        for serial, c in self.cameras.items():
            K = st.cameras.K[c]
            wxyz, pos, fov, aspect = client_pose_of(st.cameras.world_to_cam[c], K,
                                                    _image_hw(st, K))
            dist = float(np.linalg.norm(pos - t_mean))
            node = self.server.scene.add_camera_frustum(
                f"/cameras/{serial}", fov=fov, aspect=aspect, scale=0.08 * dist,
                thickness=0.004 * dist, wxyz=wxyz, position=pos, color=(60, 90, 200))
            node.on_click(lambda event, c=c: self.jump(event.client, c))
            self.camera_nodes[serial] = node
            up -= np.linalg.inv(st.cameras.world_to_cam[c])[:3, 1]  # image up = -y
        if np.linalg.norm(up) > 0:
            self.server.scene.set_up_direction(tuple(up / np.linalg.norm(up)))

    def _build_gui(self) -> None:
        gui = self.server.gui
        labels = " | ".join(s.label for s in self.sources)
        gui.add_markdown(f"**{labels}** (subject {self.sources[0].subject})")
        self.status = gui.add_markdown("")
        self.gui_driver = gui.add_dropdown("driver", options=tuple(self.drivers),
                                           initial_value=self.driver)
        n = len(self.drivers[self.driver])
        self.gui_frame = gui.add_slider("frame", min=0, max=max(1, n - 1), step=1,
                                        initial_value=0)
        self.gui_play = gui.add_checkbox("play", initial_value=False)
        self.gui_fps = gui.add_slider("fps", min=1, max=30, step=1, initial_value=10)
        self.gui_neighbor = gui.add_checkbox(
            "RAF neighbour", initial_value=False, disabled=self.neighbors is None,
            hint="Drive with the bank neighbour this frame's expression is swapped for in "
                 "training" + ("" if self.neighbors is not None else " (the store has no bank)"))
        self.neighbor_info = gui.add_markdown("")
        with gui.add_folder("expression PCs"):
            self.gui_pcs = [gui.add_slider(f"PC{i + 1}", min=-3.0, max=3.0, step=0.1,
                                           initial_value=0.0,
                                           hint="bank standard deviations along this PC")
                            for i in range(len(self.pc_std))]
            reset = gui.add_button("reset PCs")
        with gui.add_folder("view"):
            options = tuple(self.cameras) or ("-",)
            start = FRONTAL_SERIAL if FRONTAL_SERIAL in self.cameras else options[0]
            self.gui_camera = gui.add_dropdown("camera", options=options, initial_value=start)
            jump = gui.add_button("jump to camera")
            self.gui_size = gui.add_slider("render size", min=16,
                                           max=max(1024, int(self.render_size)), step=8,
                                           initial_value=int(self.render_size))

        def changed(_event=None) -> None:
            self._dirty = True

        def driver_changed(_event) -> None:
            self.driver = self.gui_driver.value
            self.gui_frame.max = max(1, len(self.drivers[self.driver]) - 1)
            self.gui_frame.value = 0
            self._dirty = True

        def frame_changed(_event) -> None:
            self.frame = int(self.gui_frame.value)
            self._dirty = True

        def pcs_changed(_event) -> None:
            self.pc_values = np.array([float(s.value) for s in self.gui_pcs])
            self._dirty = True

        def neighbor_changed(_event) -> None:
            self.show_neighbor = bool(self.gui_neighbor.value)
            self._dirty = True

        def size_changed(_event) -> None:
            self.render_size = int(self.gui_size.value)
            self._dirty = True

        def reset_pcs(_event) -> None:
            for s in self.gui_pcs:
                s.value = 0.0
            self.pc_values[:] = 0
            self._dirty = True

        def jump_clicked(event) -> None:
            if self.gui_camera.value in self.cameras and event.client is not None:
                self.jump(event.client, self.cameras[self.gui_camera.value])

        self.gui_driver.on_update(driver_changed)
        self.gui_frame.on_update(frame_changed)
        self.gui_play.on_update(changed)
        for s in self.gui_pcs:
            s.on_update(pcs_changed)
        self.gui_neighbor.on_update(neighbor_changed)
        self.gui_size.on_update(size_changed)
        reset.on_click(reset_pcs)
        jump.on_click(jump_clicked)

    # -- cameras -----------------------------------------------------------------------------
    def _on_connect(self, client) -> None:
        if self.cameras:
            start = self.gui_camera.value
            self.jump(client, self.cameras.get(start, next(iter(self.cameras.values()))))

    def jump(self, client, camera: int) -> None:
        """Move ``client``'s camera to store camera row ``camera``."""
        st = self.store
        K = st.cameras.K[camera]
        wxyz, pos, fov, _ = client_pose_of(st.cameras.world_to_cam[camera], K, _image_hw(st, K))
        c2w = np.linalg.inv(st.cameras.world_to_cam[camera])
        forward = c2w[:3, 2]
        dist = float(np.dot(self.head_center - pos, forward))
        with client.atomic():
            client.camera.up_direction = tuple(-c2w[:3, 1])
            client.camera.position = tuple(pos)
            client.camera.look_at = tuple(pos + forward * max(dist, 1e-3))
            client.camera.wxyz = tuple(wxyz)
            client.camera.fov = fov
        self._dirty = True

    # -- what to show ------------------------------------------------------------------------
    def current_timestep(self) -> int:
        rows = self.drivers[self.driver]
        return int(rows[min(self.frame, len(rows) - 1)])

    def coeffs(self, source: AvatarSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(exp (D,), pose (6,), scale ()) driving ``source`` now: the driver frame (pose
        rule in :func:`rafmodel.export.driving_coeffs`), its RAF neighbour's expression when
        shown, plus the PC offsets."""
        t = self.current_timestep()
        c = driving_coeffs(self.store, self._poses[source.subject], t)
        exp = c.exp.double().numpy()
        if self.show_neighbor and self.neighbors is not None:
            exp = self.store.timesteps.exp[int(self.neighbors[t, 0])].astype(np.float64)
        if np.any(self.pc_values):
            exp = exp + (self.pc_values * self.pc_std) @ self.pc_axes
        return torch.from_numpy(exp.astype(np.float32)), c.pose, c.scale

    def _describe_neighbor(self) -> str:
        if not self.show_neighbor or self.neighbors is None:
            return ""
        st = self.store
        ts = st.timesteps
        nb = int(self.neighbors[self.current_timestep(), 0])
        return (f"neighbour in bank `{self.bank_name}`: {st.identities[int(ts.identity[nb])]} "
                f"{st.sequences.name[int(ts.sequence[nb])]} frame {int(ts.frame[nb])}")

    @torch.no_grad()
    def render_view(self, world_to_cam: np.ndarray, K: np.ndarray, width: int,
                    height: int) -> np.ndarray:
        """(height, width * n_sources, 3) uint8: every source rendered into one camera
        (world_to_cam (4, 4), K (3, 3) OpenCV pixels), side by side."""
        from rafmodel.render import render

        w2c = torch.as_tensor(np.asarray(world_to_cam), dtype=torch.float32, device=self.device)
        Kt = torch.as_tensor(np.asarray(K), dtype=torch.float32, device=self.device)
        panels = []
        for src in self.sources:
            exp, pose, scale = self.coeffs(src)
            g = src.model()(exp.to(self.device), pose.to(self.device), scale.to(self.device))
            out = render(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                         w2c, Kt, width, height, background=src.background.to(self.device),
                         backend=self.backend)
            panels.append(out.image.clamp(0, 1))
        img = torch.cat(panels, dim=1)
        return (img.cpu().numpy() * 255).round().astype(np.uint8)

    def render_client(self, client) -> np.ndarray:
        """Render for one browser's current camera and send it as the background image."""
        cam = client.camera
        n = len(self.sources)
        w2c, K, w, h = camera_from_client(cam.wxyz, cam.position, cam.fov, cam.aspect / n,
                                          self.render_size)
        img = self.render_view(w2c, K, w, h)
        client.scene.set_background_image(img, format="jpeg", jpeg_quality=90)
        self.frames_sent[client.client_id] = self.frames_sent.get(client.client_id, 0) + 1
        return img

    # -- the render loop -----------------------------------------------------------------------
    def tick(self, step: int | None = None) -> int:
        """Advance playback and render for every browser whose camera or settings changed
        (or, live, whose last image is older than ``refresh_s``). Returns images sent."""
        now = time.perf_counter()
        if step is not None:
            self.step = step
        if self.gui_play.value:
            fps = float(self.gui_fps.value)
            if now - self._playing_since >= 1.0 / fps:
                self._playing_since = now
                n = len(self.drivers[self.driver])
                self.frame = (self.frame + 1) % n
                self.gui_frame.value = self.frame  # its callback marks the view dirty
                self._dirty = True
        dirty, self._dirty = self._dirty, False
        if dirty:
            self.neighbor_info.content = self._describe_neighbor()
        sent = 0
        for cid, client in list(self.server.get_clients().items()):
            stamp = client.camera.update_timestamp
            if stamp == 0.0:  # the browser has not reported its camera yet
                continue
            stale = (self.refresh_s is not None
                     and now - self._last_render.get(cid, 0.0) >= self.refresh_s)
            if dirty or stale or self._seen.get(cid) != stamp:
                self._seen[cid] = stamp
                self._last_render[cid] = now
                t0 = time.perf_counter()
                try:
                    self.render_client(client)
                except Exception as err:  # noqa: BLE001 - a viewer problem must not end a run
                    self.status.content = f"render failed: {' '.join(str(err).split())}"
                    continue
                sent += 1
                ms = 1000 * (time.perf_counter() - t0)
                step_txt = f"training step {self.step} · " if self.step is not None else ""
                self.status.content = f"{step_txt}{self._frame_text()} · {ms:.0f} ms/render"
        return sent

    def _frame_text(self) -> str:
        ts = self.store.timesteps
        t = self.current_timestep()
        return f"frame {int(ts.frame[t])} of {self.driver.split(' (')[0]}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.tick()
            except Exception:  # noqa: BLE001 - e.g. a client gone mid-update; keep serving
                sent = 0
            if not sent:
                self._stop.wait(0.02)

    def serve_forever(self) -> None:
        """Block until :meth:`stop` (another thread) or Ctrl-C."""
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Stop rendering and shut the server down (the port is free afterwards)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.server.stop()
        self.store.close()


__all__ = ["AvatarSource", "Viewer", "camera_from_client", "client_pose_of"]
