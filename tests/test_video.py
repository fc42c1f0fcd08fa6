"""rafdata.video: probing counts packets, decoding returns exactly the asked frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rafdata import video
from rafdata.errors import FrameCountError, SourceError
from tests.helpers_media import call_with_timeout, coded_frames, frame_colour, truncate, write_mp4

N, H, W = 12, 32, 48  # W=48 is a width decord 0.6 cannot decode
BACKENDS = ["pyav"] + (["decord", "auto"] if video.decord_available() else ["auto"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("v") / "clip.mp4", coded_frames(N, H, W))


@pytest.fixture(scope="module")
def clip64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width decord handles, so decord really decodes (no fallback)."""
    return write_mp4(tmp_path_factory.mktemp("v") / "clip64.mp4", coded_frames(N, H, 64))


def _assert_frames(frames: list[np.ndarray], idx: list[int], h: int, w: int) -> None:
    assert len(frames) == len(idx)
    for got, i in zip(frames, idx, strict=True):
        assert got.shape == (h, w, 3) and got.dtype == np.uint8
        err = np.abs(got.astype(int) - frame_colour(i).astype(int)).max()
        assert err <= 3, f"frame {i}: off by {err}"


def test_probe_counts_frames(clip: Path) -> None:
    info = video.probe(clip)
    assert (info.width, info.height, info.n_frames, info.header_frames) == (W, H, N, N)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_dense(clip64: Path, backend: str) -> None:
    idx = list(range(N))
    _assert_frames(list(video.read_frames(clip64, np.array(idx), backend=backend)), idx, H, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_sparse_small_chunks(clip64: Path, backend: str) -> None:
    idx = [1, 4, 7, 10, 11]
    got = list(video.read_frames(clip64, np.array(idx), backend=backend, chunk=2))
    _assert_frames(got, idx, H, 64)


def test_decord_equals_pyav(clip64: Path) -> None:
    if not video.decord_available():
        pytest.skip("decord not installed")
    idx = np.arange(0, N, 3)
    a = list(video.read_frames(clip64, idx, backend="decord"))
    b = list(video.read_frames(clip64, idx, backend="pyav"))
    assert len(a) == len(b) == idx.size
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_auto_decodes_where_decord_fails(clip: Path) -> None:
    """Width 48 makes decord 0.6 fail (an error naming the file); auto (PyAV) decodes it."""
    idx = [0, 5, 11]
    _assert_frames(list(video.read_frames(clip, np.array(idx), backend="auto")), idx, H, W)
    if video.decord_available():
        with pytest.raises(SourceError, match="clip.mp4"):
            list(video.read_frames(clip, np.array(idx), backend="decord"))


def test_channel0(clip64: Path) -> None:
    got = list(video.read_frames(clip64, np.array([2, 3]), channel0=True))
    assert [g.shape for g in got] == [(H, 64), (H, 64)]
    for g, i in zip(got, [2, 3], strict=True):
        assert abs(int(g.mean()) - int(frame_colour(i)[0])) <= 3


def test_index_beyond_count_is_frame_count_error(clip: Path) -> None:
    with pytest.raises(FrameCountError, match=rf"clip.mp4.*{N} frames.*{N}"):
        list(video.read_frames(clip, np.array([0, N])))


def test_bad_indices_rejected(clip: Path) -> None:
    for bad in ([3, 2], [1, 1], [-1, 2], [[0, 1]]):
        with pytest.raises(ValueError):
            video.read_frames(clip, np.array(bad))
    assert list(video.read_frames(clip, np.array([], np.int64))) == []


def test_truncated_video_caught_without_hang(tmp_path: Path) -> None:
    path = truncate(write_mp4(tmp_path / "cut.mp4", coded_frames(30, H, 64)), 0.6)
    res = call_with_timeout(lambda: video.probe(path))
    assert isinstance(res, SourceError) and "cut.mp4" in str(res) and "truncated" in str(res)
    info = video.probe(path, allow_truncated=True)
    assert info.header_frames == 30 and 0 < info.n_frames < 30
    # Every frame the probe admits decodes, with either backend, and never hangs.
    idx = np.arange(info.n_frames)
    for backend in BACKENDS:
        got = call_with_timeout(
            lambda b=backend: list(video.read_frames(path, idx, backend=b, info=info))
        )
        if backend == "decord" and isinstance(got, SourceError):
            assert "cut.mp4" in str(got)  # decord may refuse the file: an error, not a hang
            continue
        assert isinstance(got, list), got
        _assert_frames(got, idx.tolist(), H, 64)
    # Asking for a frame the file lost is an error, not a hang.
    res = call_with_timeout(lambda: list(video.read_frames(path, np.array([0, 29]), info=info)))
    assert isinstance(res, FrameCountError) and "cut.mp4" in str(res)


def test_truncated_without_faststart_is_unreadable(tmp_path: Path) -> None:
    path = truncate(write_mp4(tmp_path / "tail.mp4", coded_frames(10, H, 64), faststart=False), 0.6)
    with pytest.raises(SourceError, match="tail.mp4"):
        video.probe(path)


def test_zero_byte_missing_and_garbage(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    for name in ("empty.mp4", "junk.mp4", "missing.mp4"):
        with pytest.raises(SourceError, match=name):
            video.probe(tmp_path / name)
        with pytest.raises(SourceError, match=name):
            list(video.read_frames(tmp_path / name, np.array([0])))


def _both_probes(path: Path) -> tuple[tuple, tuple]:
    """What the MP4 sample table says, and what demuxing with FFmpeg says, in one shape."""
    from rafdata.mp4 import read_video_track

    track = read_video_track(path)
    assert track is not None, f"{path.name}: the sample table reader did not apply"
    lean = (track.width, track.height, track.sample_count, track.complete, track.partial)
    return lean, video._demux_count(path)


def test_mp4_sample_table_agrees_with_demuxing(tmp_path: Path) -> None:
    """The table reader counts what FFmpeg's demuxer counts, on whole files and on files cut
    anywhere (inside a frame, at the end, into the header), with B-frames (ultrafast x264
    writes none; the default preset does) and without."""
    frames = np.random.default_rng(0).integers(0, 256, (30, 32, 64, 3), dtype=np.uint8)
    plain = write_mp4(tmp_path / "plain.mp4", frames)
    lean, demux = _both_probes(plain)
    assert lean == demux == (64, 32, 30, 30, False)
    import av

    bframes = tmp_path / "bframes.mp4"  # x264 defaults: B-frames and an edit list
    with av.open(str(bframes), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for img in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    assert _both_probes(bframes)[0] == _both_probes(bframes)[1]
    data = plain.read_bytes()
    for cut in np.linspace(0.35, 0.999, 23):
        part = tmp_path / f"cut{cut:.3f}.mp4"
        part.write_bytes(data[: int(len(data) * cut)])
        lean, demux = _both_probes(part)
        assert lean == demux, f"cut at {cut:.3f}"
        assert lean[3] < 30  # a cut file holds fewer complete frames than it claims
    # Cut into the index itself: no table to read, and FFmpeg cannot open it either.
    (tmp_path / "head.mp4").write_bytes(data[:200])
    with pytest.raises(SourceError, match="head.mp4"):
        video.probe(tmp_path / "head.mp4")


def test_probe_falls_back_to_demuxing(tmp_path: Path) -> None:
    """Files the table reader leaves alone (Matroska; MP4 with the index at the end, cut
    short) are probed by demuxing, as before."""
    import av

    from rafdata.mp4 import read_video_track

    mkv = tmp_path / "clip.mkv"
    with av.open(str(mkv), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for img in coded_frames(7, 32, 64):
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    assert read_video_track(mkv) is None
    info = video.probe(mkv)
    assert (info.width, info.height, info.n_frames) == (64, 32, 7)
    tail = truncate(write_mp4(tmp_path / "tail.mp4", coded_frames(10, H, 64), faststart=False),
                    0.6)
    assert read_video_track(tail) is None
