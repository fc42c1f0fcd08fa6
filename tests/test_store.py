"""Store contract: round trip, commit/rollback, crash recovery, version refusal, checksums."""

from __future__ import annotations

import pickle
import textwrap

import h5py
import numpy as np
import pytest

from rafdata.errors import CorruptImageError, SourceError, StoreError
from rafdata.inspect import check_invariants, verify
from rafdata.store import COMPRESSIONS, FORMAT_VERSION, Store
from rafdata.writer import StoreWriter
from tests.cli_helpers import run_python
from tests.store_helpers import (
    camera,
    fake_sequence,
    flip_bytes,
    image_chunk,
    sha256,
    write_store,
)


def test_round_trip_tables_and_images(tmp_path):
    path = tmp_path / "s.h5"
    truth = write_store(path)
    with Store(path) as s:
        assert s.identities == ["388", "422"]
        assert s.exp_space == "test" and s.exp_dim == 8 and s.pose_dim == 6
        assert s.image_size == (24, 32)
        assert len(s.sequences) == 4 and s.n_images == 4 * 2 * 5
        for (pid, seq), t in truth.items():
            rows = s.timestep_rows(identity=pid, sequences=[seq])
            np.testing.assert_array_equal(s.timesteps.exp[rows], t["exp"])
            np.testing.assert_array_equal(s.timesteps.pose[rows], t["pose"])
            np.testing.assert_array_equal(s.timesteps.frame[rows], t["frames"])
            imgs = s.image_rows(identity=pid, sequences=[seq], serials=["222200031"])
            assert len(imgs) == 5
            for k, i in enumerate(imgs):
                sample = s.image(i)
                np.testing.assert_array_equal(sample.rgb, t["rgb"][1, k])
                np.testing.assert_array_equal(sample.mask, t["mask"][1, k])
                np.testing.assert_array_equal(sample.exp, t["exp"][k])
                assert sample.serial == "222200031"
                np.testing.assert_allclose(sample.K, camera(1)[0])
        assert s.sequences.held_out.tolist() == [False, True, False, True]
        assert len(s.timestep_rows(held_out=False)) == 10
        assert s.identity_index("0388") == 0
        with pytest.raises(StoreError, match="identity '999' is not in the store"):
            s.identity_index("999")
    assert check_invariants(Store(path)) == []


def test_store_pickles_without_handle(tmp_path):
    path = tmp_path / "s.h5"
    truth = write_store(path, identities=("388",), sequences=("A",))
    s = Store(path)
    s.read_rgb(0)
    clone = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(clone.read_rgb(3), truth[("388", "A")]["rgb"][0, 3])


def test_exception_rolls_back_sequence(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    rng = np.random.default_rng(1)
    with StoreWriter(path) as w:
        with pytest.raises(RuntimeError):
            with w.sequence("500", "B", False, "mem") as sw:
                rows = sw.add_timesteps(*fake_sequence(rng), "test")
                sw.add_images(np.zeros((5, 24, 32, 3), np.uint8), None, rows,
                              sw.camera("1", *camera()))
                raise RuntimeError("boom")
        assert not w.has_sequence("500", "B")
    with Store(path) as s:
        assert s.identities == ["388"]
        assert len(s.timesteps) == 5 and s.n_images == 10 and len(s.cameras) == 2
        assert check_invariants(s) == []


def test_crash_mid_sequence_then_resume(tmp_path):
    """A process killed mid-sequence leaves nothing the reader shows; the next run continues."""
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    script = textwrap.dedent(f"""
        import os, numpy as np
        from rafdata.writer import StoreWriter
        w = StoreWriter({str(path)!r})
        with w.sequence("422", "B", False, "mem") as sw:
            rows = sw.add_timesteps(np.arange(5), np.ones((5, 8)), np.zeros((5, 6)),
                                    np.ones(5), "test")
            cam = sw.camera("9", np.eye(3), np.eye(4))
            sw.add_images(np.full((3, 24, 32, 3), 7, np.uint8), None, rows[:3], cam)
            os._exit(9)
    """)
    proc = run_python(script)
    assert proc.returncode == 9, proc.stderr
    with Store(path) as s:  # the reader sees only the committed sequence
        assert s.identities == ["388"] and len(s.timesteps) == 5 and s.n_images == 10
        assert check_invariants(s) == []
    with StoreWriter(path) as w:  # a new run truncates the leftovers and appends
        assert not w.has_sequence("422", "B")
        with w.sequence("422", "B", False, "mem") as sw:
            sw.add_timesteps(np.arange(2), np.ones((2, 8)), np.zeros((2, 6)),
                                    np.ones(2), "test")
    with Store(path) as s:
        assert s.identities == ["388", "422"] and len(s.timesteps) == 7
        assert s.h5()["timesteps/exp"].shape[0] == 7
        assert check_invariants(s) == []


def test_newer_version_refused_and_untouched(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    before = sha256(path)
    with pytest.raises(StoreError, match="newer rafdata"):
        Store(path)
    with pytest.raises(StoreError, match="newer rafdata"):
        StoreWriter(path)
    assert sha256(path) == before


def test_not_a_store(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a rafdata store"):
        Store(plain)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="cannot open as HDF5"):
        Store(junk)
    with pytest.raises(StoreError, match="no such store file"):
        Store(tmp_path / "missing.h5")


def test_mixing_expression_spaces_refused(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    with StoreWriter(path) as w, pytest.raises(SourceError, match="one store holds one space"):
        w.check_exp_space("flame2023:expression+jaw", 103, tmp_path / "t.npz")
    with StoreWriter(path) as w, pytest.raises(SourceError, match="differs"):
        with w.sequence("422", "B", False, "mem") as sw:
            sw.add_timesteps(np.arange(2), np.ones((2, 9)), np.zeros((2, 6)), np.ones(2), "test")
    assert len(Store(path).timesteps) == 5


def test_image_size_and_camera_mismatch(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    with StoreWriter(path) as w, pytest.raises(StoreError, match="--size 32 24"):
        with w.sequence("422", "B", False, "mem") as sw:
            rows = sw.add_timesteps(*fake_sequence(np.random.default_rng()), "test")
            sw.add_images(np.zeros((5, 10, 10, 3), np.uint8), None, rows,
                          sw.camera("1", *camera()))
    with StoreWriter(path) as w, pytest.raises(StoreError, match="other intrinsics"):
        with w.sequence("388", "B", False, "mem") as sw:
            sw.camera("222200030", np.eye(3), np.eye(4))
    assert len(Store(path).sequences) == 1


def test_verify_detects_damaged_chunk(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    with Store(path) as s:
        ok = verify(s)
        assert ok.ok and ok.chunks_read > 10
    seg, offset, _ = image_chunk(path, 3)
    flip_bytes(seg, offset + 40)
    with Store(path) as s:
        res = verify(s)
        with pytest.raises(CorruptImageError, match="image row 3: colour fails its CRC-32"):
            s.read_rgb(3)
        np.testing.assert_array_equal(s.read_rgb(4).shape, (24, 32, 3))  # the others read
    assert not res.ok and any("CRC-32 (first at row 3)" in p for p in res.problems)


def test_damaged_blosc_header_is_one_error(tmp_path):
    """A chunk whose Blosc header lies about its sizes is refused before decompression."""
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    seg, offset, _ = image_chunk(path, 2, "mask")
    flip_bytes(seg, offset + 4, 4)  # the decompressed size
    with Store(path) as s, pytest.raises(CorruptImageError, match="matte chunk .* cannot be"):
        s.read_mask(2)


def test_verify_detects_damaged_table(tmp_path):
    """Table chunks carry Fletcher32: flipped bytes in /timesteps/exp are reported."""
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",), t=50, d=64)
    with Store(path) as s:
        offset = s.h5()["timesteps/exp"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged table data"):
        Store(path)
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        f["timesteps/exp"][:]  # HDF5 itself refuses the chunk: the checksum works


def test_invariants_catch_bad_rows(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388", "422"), sequences=("A",))
    with h5py.File(path, "r+") as f:
        f["images/camera"][0] = 3  # a camera of the other identity
        f["timesteps/exp"][1, 0] = np.nan
    with Store(path) as s:
        problems = check_invariants(s)
    assert any("not finite" in p for p in problems)
    with h5py.File(path, "r+") as f:
        f["timesteps/exp"][1, 0] = 0
    with Store(path) as s:
        problems = check_invariants(s)
    assert any("another identity's camera" in p for p in problems)


def test_blosc_with_other_filters_is_read_and_appended_through_hdf5(tmp_path):
    """Raw chunk I/O is only for Blosc-only datasets; a pipeline with a checksum goes via HDF5."""
    from rafdata.store import blosc_only, compression_options

    path = tmp_path / "s.h5"
    truth = write_store(path, identities=("388",), sequences=("A",), masks=False)
    seg = image_chunk(path, 0)[0]
    with h5py.File(seg, "r+") as f:  # rewrite the segment's images with a second filter
        assert blosc_only(f["images/rgb"])
        data = f["images/rgb"][:]
        del f["images/rgb"]
        f["images"].create_dataset("rgb", data=data, maxshape=(None, *data.shape[1:]),
                                   chunks=(1, *data.shape[1:]),
                                   **compression_options("blosc-lz4", checksum=True))
        assert not blosc_only(f["images/rgb"])
    with Store(path) as s:
        np.testing.assert_array_equal(s.read_rgb(7), truth[("388", "A")]["rgb"][1, 2])
    extra = np.random.default_rng(5).integers(0, 256, (5, 24, 32, 3), dtype=np.uint8)
    with StoreWriter(path) as w:  # new segments use the store's codec, written directly
        assert w.codec.direct
        with w.sequence("388", "B", False, "mem") as sw:
            rows = sw.add_timesteps(*fake_sequence(np.random.default_rng(1)), "test")
            sw.add_images(extra, None, rows, sw.camera("222200030", *camera(0)))
    with Store(path) as s:
        np.testing.assert_array_equal(s.read_rgb(12), extra[2])
        assert verify(s).ok


def test_group_commits_all_or_nothing(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    rng = np.random.default_rng(2)
    with StoreWriter(path) as w:
        with pytest.raises(RuntimeError), w.group():
            for name in ("B", "C", "D"):
                with w.sequence("422", name, False, "mem") as sw:
                    sw.add_timesteps(*fake_sequence(rng), "test")
                    if name == "D":
                        raise RuntimeError("boom")
        assert not w.has_sequence("422", "B")  # the whole group is gone
        with w.group():
            for name in ("B", "C"):
                with w.sequence("422", name, False, "mem") as sw:
                    sw.add_timesteps(*fake_sequence(rng), "test")
            assert not w.has_sequence("422", "B")  # not committed before the group ends
        assert w.has_sequence("422", "C")
    with Store(path) as s:
        assert s.identities == ["388", "422"] and s.sequences.name == ["A", "B", "C"]
        assert len(s.timesteps) == 15 and check_invariants(s) == []
        assert s.sequences.timestep_start.tolist() == [0, 5, 10]


@pytest.mark.parametrize("codec", COMPRESSIONS)
def test_every_codec_round_trips_and_appends_exactly(tmp_path, codec):
    """Each codec stores images bit-exactly; reopening with another --compression keeps the
    store's own codec; Blosc and uncompressed chunks go to the file directly."""
    path = tmp_path / "s.h5"
    truth = write_store(path, identities=("388",), sequences=("A",), compression=codec)
    extra = np.random.default_rng(9).integers(0, 256, (5, 24, 32, 3), dtype=np.uint8)
    other = "gzip" if codec != "gzip" else "none"
    with StoreWriter(path, compression=other) as w:
        assert w.compression == codec
        assert w.codec.direct == (codec.startswith("blosc-") or codec == "none")
        with w.sequence("388", "B", False, "mem") as sw:
            rows = sw.add_timesteps(*fake_sequence(np.random.default_rng(1)), "test")
            sw.add_images(extra, extra[..., 0], rows, sw.camera("222200030", *camera(0)))
    with Store(path) as s:
        np.testing.assert_array_equal(s.read_rgb(7), truth[("388", "A")]["rgb"][1, 2])
        np.testing.assert_array_equal(s.read_mask(7), truth[("388", "A")]["mask"][1, 2])
        np.testing.assert_array_equal(s.read_rgb(12), extra[2])
        np.testing.assert_array_equal(s.read_mask(12), extra[2, ..., 0])
        assert s.h5()["images"].attrs["compression"] == codec
        assert verify(s).ok
    # Any other HDF5 program (with hdf5plugin's filters) reads the same bytes.
    import hdf5plugin  # noqa: F401

    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["images/rgb"][12], extra[2])
        np.testing.assert_array_equal(f["images/mask"][7], truth[("388", "A")]["mask"][1, 2])


def test_format_1_store_is_read_and_upgraded_by_the_first_write(tmp_path):
    """A version-1 file (images inside, rows past the counters from a crash, reserved image
    capacity) reads as before; appending links it in as the first segment, copying no image."""
    src = tmp_path / "v2.h5"
    truth = write_store(src, identities=("388",), sequences=("A",))
    seg = image_chunk(src, 0)[0]
    old = tmp_path / "old.h5"
    old.write_bytes(seg.read_bytes())
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 1
        for k in ("segment", "segment_order", "store_attrs"):
            del f.attrs[k]
        f["images/rgb"].resize(14, axis=0)  # reserved capacity, as version-1 writers left it
        f["timesteps/frame"].resize(7, axis=0)  # uncommitted rows past the counter
    with Store(old) as s:
        assert s.format_version == 1 and s.n_images == 10
        np.testing.assert_array_equal(s.read_rgb(7), truth[("388", "A")]["rgb"][1, 2])
    extra = np.random.default_rng(5).integers(0, 256, (5, 24, 32, 3), dtype=np.uint8)
    with StoreWriter(old) as w:
        with w.sequence("422", "B", False, "mem") as sw:
            rows = sw.add_timesteps(*fake_sequence(np.random.default_rng(1)), "test")
            sw.add_images(extra, None, rows, sw.camera("222200030", *camera(0)))
    with Store(old) as s:
        assert s.format_version == FORMAT_VERSION and s.n_images == 15
        assert s.identities == ["388", "422"] and len(s.timesteps) == 10
        np.testing.assert_array_equal(s.read_rgb(7), truth[("388", "A")]["rgb"][1, 2])
        np.testing.assert_array_equal(s.read_rgb(12), extra[2])
        assert verify(s).ok
        legacy = s.segment_paths[0]
    assert legacy.name.startswith("legacy-v1-") and legacy.stat().st_nlink == 1
    with h5py.File(old, "r") as f:  # plain HDF5 readers see the images through the VDS
        np.testing.assert_array_equal(f["images/rgb"][12], extra[2])


def test_appending_drops_leftover_bank_groups_of_older_versions(tmp_path):
    """A `/banks/.tmp-*` group from an interrupted build of an older rafdata is not copied
    into the new main file (copying a half-written group can fail)."""
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    with h5py.File(path, "r+") as f:
        f.require_group("banks").create_group(".tmp-full").create_dataset("members", data=[1])
        f["banks"].create_group("kept").attrs["k"] = 3
    with StoreWriter(path) as w, w.sequence("422", "B", False, "mem") as sw:
        sw.add_timesteps(*fake_sequence(np.random.default_rng(1)), "test")
    with h5py.File(path, "r") as f:
        assert list(f["banks"]) == ["kept"] and f["banks/kept"].attrs["k"] == 3


def test_stream_encoder_stops_compressing_what_does_not_shrink(tmp_path, monkeypatch):
    """A stream is tried every PROBE_EVERY-th image: after a try that does not shrink (noise,
    like camera colour) images are stored as raw chunks (HDF5 filter mask: Blosc skipped),
    after one that does (a flat image, a matte) they are compressed. Both kinds read back
    exactly, through Store (CRC checked) and through plain HDF5."""
    from rafdata.store import RAW_CHUNK, ImageCodec, StreamEncoder

    rng = np.random.default_rng(3)
    every = StreamEncoder.PROBE_EVERY
    n = every + 4
    noise = rng.integers(0, 256, (n, 24, 32, 3), dtype=np.uint8)
    noise[every:] = 90  # the stream turns compressible at the second try
    matte = np.zeros((n, 24, 32), np.uint8)
    matte[:, 6:18, 8:24] = 255
    codec = ImageCodec("blosc-blosclz")
    colour_stream, matte_stream = codec.stream(), codec.stream()
    import blosc

    tried, real = [], blosc.compress

    def spy(*args, **kwargs):
        tried.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(blosc, "compress", spy)
    rgb = [colour_stream.encode(im) for im in noise]
    assert len(tried) == 1 + 4  # compression tried at 0, then from the try at 16 on
    monkeypatch.setattr(blosc, "compress", real)
    masks = [matte_stream.encode(m) for m in matte]
    assert [e.filter_mask for e in rgb] == [RAW_CHUNK] * every + [0] * 4
    assert all(len(e.payload) == noise[0].nbytes for e in rgb[:every])  # no header, no copy
    assert all(len(e.payload) < matte[0].nbytes / 4 for e in masks + rgb[every:])
    # The same stream encoded again gives the same bytes (a resumed run writes what a clean one
    # would).
    again = codec.stream()
    assert [bytes(again.encode(im).payload) for im in noise] == [bytes(e.payload) for e in rgb]
    path = tmp_path / "s.h5"
    with StoreWriter(path, compression="blosc-blosclz") as w:
        with w.sequence("388", "A", False, "mem") as sw:
            rows = sw.add_timesteps(*fake_sequence(rng, t=n), "test")
            sw.add_images(rgb, masks, rows, sw.camera("222200030", *camera(0)))
    with Store(path) as s:
        for i in (0, 1, every, n - 1):
            np.testing.assert_array_equal(s.read_rgb(i), noise[i])
            assert s.read_rgb(i).flags.writeable and s.read_rgb(i).flags.c_contiguous
            np.testing.assert_array_equal(s.read_mask(i), matte[i])
        assert verify(s).ok
    import hdf5plugin  # noqa: F401

    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["images/rgb"][:], noise)


def test_crc32_is_zlibs_checksum():
    """The fast CRC-32 (ISA-L) is the checksum the format records: zlib's."""
    import zlib

    from rafdata.checksum import crc32

    rng = np.random.default_rng(0)
    for size in (0, 1, 15, 4096, 786_433):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        assert crc32(data) == zlib.crc32(data)
    assert crc32(b"abc", crc32(b"xyz")) == zlib.crc32(b"abc", zlib.crc32(b"xyz"))
    assert crc32.__module__.startswith("isal")  # a declared dependency: the fast one is used


def test_damage_in_a_raw_chunk_is_caught(tmp_path):
    """Raw chunks (images Blosc cannot shrink) are checked like any other: a flipped byte is
    a CRC error naming the row, and verify counts it."""
    from rafdata.store import RAW_CHUNK, ImageCodec

    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)
    stream = ImageCodec("blosc-blosclz").stream()
    rgb = [stream.encode(im) for im in noise]
    assert all(e.filter_mask == RAW_CHUNK for e in rgb)
    path = tmp_path / "s.h5"
    with StoreWriter(path, compression="blosc-blosclz") as w:
        with w.sequence("388", "A", False, "mem") as sw:
            rows = sw.add_timesteps(*fake_sequence(rng, t=3), "test")
            sw.add_images(rgb, None, rows, sw.camera("222200030", *camera(0)))
    seg, offset, size = image_chunk(path, 1, "rgb")
    assert size == noise[1].nbytes  # stored as is, no Blosc header
    flip_bytes(seg, offset + size // 2, 1)
    with Store(path) as s, pytest.raises(CorruptImageError, match="image row 1: colour fails"):
        s.read_rgb(1)
    with Store(path) as s:
        np.testing.assert_array_equal(s.read_rgb(2), noise[2])
        assert not verify(s).ok
