"""NeRSemble v2 raw layout (download kit, and the benchmark's mono_flame_avatar download).

::

    SRC/{pid}/calibration/camera_params.json      world_2_cam {serial: 4x4}, intrinsics 3x3
                                                  (shared) or {serial: 3x3}
    SRC/{pid}/calibration/color_calibration.json  {serial: 3xT}  (optional)
    SRC/{pid}/sequences/{SEQ}/images/cam_{serial}.mp4
    SRC/{pid}/sequences/{SEQ}/alpha_maps/cam_{serial}.mp4   (optional, matte in channel 0)
    TRACK/{pid}/sequences/{SEQ}/params/{frame}/params.npz    BFM (Multiview-3DMM-Fitting)
    TRACK/{pid}/sequences/{SEQ}/tracking/*.npz               FLAME (NeRSemble benchmark)

TRACK is ``SourceOptions.tracking_root`` (default SRC). Participant folders are matched
between SRC and TRACK by number, so "17" and "017" are the same participant. Calibration and
videos are only touched by :meth:`NersembleSequence.cameras` and later calls, so a
coefficient-only ingest needs neither.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from rafdata import video
from rafdata.config import TRACKING_FORMATS
from rafdata.errors import FrameCountError, SourceError
from rafdata.geometry import CCM_TERMS, check_calibration
from rafdata.sources.base import (
    IMAGE_PARTS,
    CameraCalib,
    SequenceSource,
    SourceOptions,
    Tracking,
    is_number,
    name_problem,
    shown,
)
from rafdata.sources.tracking import parse_flame_exp, read_bfm_params, read_flame_npz

NOT_SEQUENCES = frozenset({"BACKGROUND"})  # background plates, never tracked or ingested


class NersembleSource:
    """A NeRSemble v2 dataset root (see the module docstring for the layout).

    ``skipped`` collects one line per thing passed over: a sequence folder without tracking
    (e.g. GLASSES, HAIR), a folder whose name cannot be a participant, sequence, frame or
    camera (``'422 '``, ``'①'``, not UTF-8), a camera with an unusable calibration;
    ``warn``, if given, is also called with each line.
    Video decoding options come from ``options.extra``: "video_backend" (auto | decord | pyav)
    and "decode_threads" (int, 0 = decoder's choice).
    """

    layout = "nersemble"

    def __init__(
        self,
        root: Path,
        options: SourceOptions | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.root = Path(root)
        self.options = options or SourceOptions()
        self.tracking_root = (
            Path(self.options.tracking_root) if self.options.tracking_root else self.root
        )
        if self.options.tracking_format not in TRACKING_FORMATS:
            raise SourceError(None, f"unknown tracking format {self.options.tracking_format!r}"
                              f" (choose from {', '.join(TRACKING_FORMATS)})")
        try:
            parse_flame_exp(self.options.flame_exp)
        except ValueError as exc:
            raise SourceError(None, str(exc)) from exc
        self.skipped: list[str] = []
        self._warn = warn
        self._calib: dict[Path, tuple[dict[str, CameraCalib], dict[str, str]]] = {}
        self._told: set[tuple[Path, str]] = set()  # bad cameras already warned about
        self._dirs: dict[int, tuple[str, Path | None, Path | None]] | None = None

    # -- participants and sequences ------------------------------------------------------

    def _participant_dirs(self) -> dict[int, tuple[str, Path | None, Path | None]]:
        """{number: (name, SRC folder or None, TRACK folder or None)}, filtered by options;
        scanned once (``sequences`` asks for every participant)."""
        if self._dirs is None:
            self._dirs = self._scan_participants()
        return self._dirs

    def _scan_participants(self) -> dict[int, tuple[str, Path | None, Path | None]]:
        found: dict[int, list] = {}
        odd: set[Path] = set()  # SRC and TRACK may be one folder: say it once

        def scan(base: Path, markers: tuple[str, ...], slot: int) -> None:
            if not base.is_dir():
                return
            for d in base.iterdir():
                if not (d.is_dir() and any((d / m).is_dir() for m in markers)):
                    continue  # not a participant folder (metadata, other tools' output)
                if not is_number(d.name):
                    # Laid out like a participant but not named by a number: '422 ' or '①'
                    # would otherwise disappear without a word.
                    if d not in odd:
                        odd.add(d)
                        self._skip(f"{base}: folder {shown(d.name)} skipped: a participant "
                                   "folder is named by its number in ASCII digits")
                    continue
                entry = found.setdefault(int(d.name), [d.name, None, None])
                if entry[slot] is not None and entry[slot] != d:
                    raise SourceError(base, f"participant {int(d.name)} appears twice: "
                                      f"{entry[slot].name} and {d.name}")
                entry[slot] = d

        scan(self.root, ("calibration", "sequences"), 1)
        scan(self.tracking_root, ("sequences",), 2)
        wanted = self.options.participants
        if wanted is not None:
            keep = {_as_int(p) for p in wanted}
            found = {k: v for k, v in found.items() if k in keep}
        return {k: tuple(v) for k, v in sorted(found.items())}

    def participants(self) -> list[str]:
        """Participant folder names (as SRC writes them, else as TRACK does), by number."""
        return [name for name, _, _ in self._participant_dirs().values()]

    def sequences(self, participant: str) -> list[NersembleSequence]:
        """Tracked sequences of one participant, sorted by name, filtered by options.

        Raises SourceError when, with tracking format "auto", a sequence has both BFM params
        and FLAME tracking, or a FLAME tracking folder holds more than one npz.
        """
        dirs = self._participant_dirs().get(_as_int(participant))
        if dirs is None:
            raise SourceError(self.root, f"participant {participant} not found")
        name, src, track = dirs
        names: set[str] = set()
        for base in (src, track):
            if base is not None and (base / "sequences").is_dir():
                names.update(d.name for d in (base / "sequences").iterdir() if d.is_dir())
        for seq in sorted(names):
            problem = name_problem(seq)
            if problem is not None:  # the store keeps the name: it must be usable text
                names.discard(seq)
                self._skip(f"{name}: sequence folder {shown(seq)} skipped: {problem}")
        wanted = set(self.options.sequences) if self.options.sequences is not None else None
        out = []
        for seq in sorted(names - NOT_SEQUENCES):
            if wanted is not None and seq not in wanted:
                continue
            tdir = (track / "sequences" / seq) if track is not None else None
            kind, tpath = self._find_tracking(tdir)
            if kind is None:
                self._skip(f"{name}/{seq}: skipped, no {self._wanted_tracking()} tracking "
                           f"in {tdir if tdir is not None else self.tracking_root / name}")
                continue
            src_seq = src / "sequences" / seq if src is not None else None
            out.append(NersembleSequence(
                participant=name, name=seq,
                path=src_seq if src_seq is not None and src_seq.is_dir() else tdir,
                video_dir=src_seq, calib_dir=src / "calibration" if src is not None else None,
                tracking_kind=kind, tracking_path=tpath, source=self,
            ))
        return out

    def _wanted_tracking(self) -> str:
        return {"auto": "BFM or FLAME", "bfm": "BFM (params/)",
                "flame": "FLAME (tracking/*.npz)"}[self.options.tracking_format]

    def _find_tracking(self, tdir: Path | None) -> tuple[str | None, Path | None]:
        if tdir is None or not tdir.is_dir():
            return None, None
        params = tdir / "params"
        has_bfm = params.is_dir()
        npzs = sorted((tdir / "tracking").glob("*.npz")) if (tdir / "tracking").is_dir() else []
        fmt = self.options.tracking_format
        if fmt == "auto" and has_bfm and npzs:
            raise SourceError(tdir, "has both BFM params/ and FLAME tracking/*.npz; "
                              "choose one with --tracking-format bfm|flame")
        if has_bfm and fmt in ("auto", "bfm"):
            return "bfm", params
        if npzs and fmt in ("auto", "flame"):
            if len(npzs) > 1:
                raise SourceError(tdir / "tracking", "expected exactly one tracking npz, found "
                                  + ", ".join(p.name for p in npzs))
            return "flame", npzs[0]
        return None, None

    def _skip(self, line: str) -> None:
        self.skipped.append(line)
        if self._warn is not None:
            self._warn(line)

    # -- calibration ----------------------------------------------------------------------

    def calibration(self, calib_dir: Path) -> dict[str, CameraCalib]:
        """The usable calibrated cameras of one participant, read once and cached."""
        return self._calibration(calib_dir)[0]

    def _calibration(self, calib_dir: Path) -> tuple[dict[str, CameraCalib], dict[str, str]]:
        """({serial: usable camera}, {serial: why its calibration is unusable})."""
        if calib_dir not in self._calib:
            bad: dict[str, str] = {}
            self._calib[calib_dir] = read_calibration(calib_dir, bad), bad
        return self._calib[calib_dir]

    def _skip_camera(self, calib_dir: Path, serial: str, problem: str) -> None:
        """Warn once per participant and camera, however many sequences have its video."""
        if (calib_dir, serial) not in self._told:
            self._told.add((calib_dir, serial))
            self._skip(f"{calib_dir / 'camera_params.json'}: camera {serial} skipped: {problem}")


class NersembleSequence(SequenceSource):
    """One tracked sequence; implements :class:`rafdata.sources.base.SequenceSource`."""

    def __init__(
        self,
        *,
        participant: str,
        name: str,
        path: Path,
        video_dir: Path | None,
        calib_dir: Path | None,
        tracking_kind: str,
        tracking_path: Path,
        source: NersembleSource,
    ):
        self.participant = participant
        self.name = name
        self.path = path
        self.video_dir = video_dir
        self.calib_dir = calib_dir
        self.tracking_kind = tracking_kind  # "bfm" | "flame"
        self.tracking_path = tracking_path
        self._source = source
        self._infos: dict[Path, video.VideoInfo] = {}
        self._tracking: Tracking | None = None

    def __repr__(self) -> str:
        return f"NersembleSequence({self.participant}/{self.name}, {self.tracking_kind})"

    def video_path(self, serial: str) -> Path | None:
        return self.video_dir / "images" / f"cam_{serial}.mp4" if self.video_dir else None

    def alpha_path(self, serial: str) -> Path | None:
        return self.video_dir / "alpha_maps" / f"cam_{serial}.mp4" if self.video_dir else None

    def video_serials(self) -> list[str]:
        """Serials with a video in this sequence (before the options.cameras filter).

        A video whose serial cannot be a camera name (not UTF-8, stray spaces) is skipped
        with a warning: it could never match a calibration entry anyway.
        """
        if self.video_dir is None or not (self.video_dir / "images").is_dir():
            return []
        serials = []
        for p in sorted((self.video_dir / "images").glob("cam_*.mp4")):
            serial = p.stem[len("cam_"):]
            problem = name_problem(serial)
            if problem is None:
                serials.append(serial)
            else:
                self._source._skip(f"{p.parent}: video {shown(p.name)} skipped: "
                                   f"camera {problem}")
        return serials

    def cameras(self) -> list[CameraCalib]:
        """Cameras with a video here and a calibration, filtered by options.cameras, by serial.

        A camera whose calibration is unusable (:func:`rafdata.geometry.check_calibration`)
        is skipped with one warning per participant naming camera_params.json, the serial and
        the problem. Raises SourceError naming camera_params.json when it is missing, lacks a
        serial that has a video, or when every camera with a video here is unusable. A
        sequence without videos has no cameras (and needs no calibration).
        """
        serials = self.video_serials()
        wanted = self._source.options.cameras
        if wanted is not None:
            keep = {str(c) for c in wanted}
            serials = [s for s in serials if s in keep]
        if not serials:
            return []
        calib_dir = self.calib_dir or self._source.root / self.participant / "calibration"
        calib, bad = self._source._calibration(calib_dir)
        out = []
        for s in serials:
            if s in bad:
                self._source._skip_camera(calib_dir, s, bad[s])
                continue
            if s not in calib:
                raise SourceError(calib_dir / "camera_params.json",
                                  f"no calibration for camera {s}, which has video "
                                  f"{self.video_path(s)}")
            out.append(calib[s])
        if not out:
            first = serials[0]
            raise SourceError(calib_dir / "camera_params.json",
                              f"no camera with video in {self.participant}/{self.name} has a "
                              f"usable calibration (camera {first}: {bad[first]})")
        return out

    def tracking(self) -> Tracking:
        if self._tracking is None:
            if self.tracking_kind == "bfm":
                self._tracking = read_bfm_params(self.tracking_path, warn=self._source._skip)
            else:
                self._tracking = read_flame_npz(self.tracking_path, self._source.options.flame_exp)
        return self._tracking

    def _probe(self, path: Path) -> video.VideoInfo:
        if path not in self._infos:
            self._infos[path] = video.probe(path)
        return self._infos[path]

    def check_camera(self, serial: str, frames: np.ndarray) -> None:
        """Probe the video (and alpha map, if any) without decoding; see the base class."""
        vpath = self.video_path(serial)
        if vpath is None or not vpath.is_file():
            raise SourceError(vpath or self.path, f"no video for camera {serial}")
        info = self._probe(vpath)
        self._check_count(info, frames)
        apath = self.alpha_path(serial)
        if apath is not None and apath.exists():
            ainfo = self._probe(apath)
            if (ainfo.width, ainfo.height) != (info.width, info.height):
                raise SourceError(apath, f"alpha map is {ainfo.width}x{ainfo.height}, "
                                  f"video is {info.width}x{info.height}")
            self._check_count(ainfo, frames)

    def _check_count(self, info: video.VideoInfo, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.size and info.n_frames <= int(frames.max()):
            raise FrameCountError(
                info.path, f"video has {info.n_frames} frames but tracking "
                f"{self.tracking_path} refers to frame {int(frames.max())}",
            )

    def frame_size(self, serial: str) -> tuple[int, int]:
        """(width, height) of the camera's video, from its (cached) probe."""
        vpath = self.video_path(serial)
        if vpath is None or not vpath.is_file():
            raise SourceError(vpath or self.path, f"no video for camera {serial}")
        info = self._probe(vpath)
        return info.width, info.height

    def image_parts(self, serial: str) -> tuple[str, ...]:
        apath = self.alpha_path(serial)
        return ("rgb", "mask") if apath is not None and apath.exists() else ("rgb",)

    def read_part(self, serial: str, part: str, frames: np.ndarray) -> Iterator[np.ndarray]:
        """Decode the colour video ("rgb", (H, W, 3) uint8) or the alpha map ("mask", its
        channel 0, (H, W) uint8) of one camera."""
        if part not in IMAGE_PARTS:
            raise ValueError(f"part must be one of {IMAGE_PARTS}, got {part!r}")
        path = self.video_path(serial) if part == "rgb" else self.alpha_path(serial)
        if path is None or not path.is_file():
            what = "video" if part == "rgb" else "alpha map"
            raise SourceError(path or self.path, f"no {what} for camera {serial}")
        extra = self._source.options.extra
        return video.read_frames(path, frames, channel0=part == "mask", info=self._probe(path),
                                 backend=extra.get("video_backend", "auto"),
                                 threads=int(extra.get("decode_threads", 0)))


def read_calibration(calib_dir: Path, bad: dict[str, str] | None = None) -> dict[str, CameraCalib]:
    """Parse camera_params.json (+ optional color_calibration.json) into {serial: CameraCalib}.

    Intrinsics are either one shared 3x3 (v2 download kit) or {serial: 3x3}
    (mono_flame_avatar download); a serial without intrinsics is left out. A camera whose
    K and world_to_cam fail :func:`rafdata.geometry.check_calibration` is left out too and,
    when ``bad`` is given, recorded there as {serial: problem}. Raises SourceError naming
    the file when it is malformed or when it has cameras but none is usable.
    """
    path = calib_dir / "camera_params.json"
    params = _load_json(path)
    w2c = params.get("world_2_cam") if isinstance(params, dict) else None
    intr = params.get("intrinsics") if isinstance(params, dict) else None
    if not isinstance(w2c, dict):
        raise SourceError(path, "missing or malformed 'world_2_cam' (expected {serial: 4x4})")
    if intr is None:
        raise SourceError(path, "missing 'intrinsics'")
    shared = None if isinstance(intr, dict) else _matrix(intr, (3, 3), path, "intrinsics")
    colors: dict = {}
    cpath = calib_dir / "color_calibration.json"
    if cpath.exists():
        colors = _load_json(cpath)
        if not isinstance(colors, dict):
            raise SourceError(cpath, "expected {serial: 3xT colour-correction matrix}")
    out = {}
    problems: dict[str, str] = {}
    for serial, m in w2c.items():
        serial = str(serial)
        if shared is None and serial not in intr:
            continue
        try:  # one camera's malformed or non-finite matrix costs that camera only
            K = shared if shared is not None else _matrix(intr[serial], (3, 3), path,
                                                          f"intrinsics/{serial}")
            world_to_cam = _matrix(m, (4, 4), path, f"world_2_cam/{serial}")
        except SourceError as err:
            problems[serial] = err.problem
            continue
        problem = check_calibration(K, world_to_cam)
        if problem is not None:
            problems[serial] = problem
            continue
        color = None
        if serial in colors:
            color = _ccm(colors[serial], cpath, serial)
        out[serial] = CameraCalib(serial=serial, K=K.copy(), world_to_cam=world_to_cam,
                                  color=color)
    if problems and not out:
        first = min(problems)
        raise SourceError(path, f"no usable camera: all {len(problems)} calibrations are bad "
                          f"(camera {first}: {problems[first]})")
    if bad is not None:
        bad.update(problems)
    return out


def _load_json(path: Path):
    if not path.is_file():
        raise SourceError(path, "calibration file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(path, f"cannot parse JSON: {exc}") from exc


def _ccm(value, path: Path, key: str) -> np.ndarray:
    """A (3, T) polynomial colour-correction matrix (T terms of Cheung et al. 2004)."""
    arr = np.asarray(value, dtype=object)
    terms = arr.shape[1] if arr.ndim == 2 else -1
    if terms not in CCM_TERMS:
        raise SourceError(path, f"'{key}' has shape {arr.shape}, expected (3, T) with T in "
                          f"{', '.join(map(str, CCM_TERMS))}")
    return _matrix(value, (3, terms), path, key)


def _matrix(value, shape: tuple[int, int], path: Path, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SourceError(path, f"'{key}' is not a numeric matrix") from exc
    if arr.shape == (3, 4) and shape == (4, 4):  # some exports drop the constant last row
        arr = np.vstack([arr, [0.0, 0.0, 0.0, 1.0]])
    if arr.shape != shape:
        raise SourceError(path, f"'{key}' has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise SourceError(path, f"'{key}' holds NaN or inf values")
    return arr


def _as_int(name: str | int) -> int:
    """A participant number from a folder name or a user's --participants entry; -1 (no
    participant) unless it is ASCII digits (int() would take ' 17', '1_7' and '٣')."""
    if isinstance(name, int):
        return name
    return int(name) if is_number(str(name)) else -1
