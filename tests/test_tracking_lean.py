"""The lean per-frame npz reader (issue #12) and read_trackings.

The lean reader must give exactly what np.load gives, and must hand every file it does not
understand to np.load, so messages stay what they were.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rafdata.errors import SourceError
from rafdata.sources import tracking
from rafdata.sources.tracking import (
    BFM_KEYS,
    _get,
    _load_npz,
    read_bfm_params,
    read_npz_arrays,
    read_trackings,
)
from tests.helpers_media import write_bfm_params


@pytest.fixture()
def no_fallback(monkeypatch):
    """Make the np.load fallback fail loudly: the test then proves the lean path read it."""
    def refuse(path):
        raise AssertionError(f"fell back to np.load for {path}")
    monkeypatch.setattr(tracking, "_load_npz", refuse)


@pytest.fixture()
def fallbacks(monkeypatch) -> list[Path]:
    """Record every fallback to np.load (and still do it)."""
    seen: list[Path] = []

    def spy(path):
        seen.append(Path(path))
        return _load_npz(Path(path))
    monkeypatch.setattr(tracking, "_load_npz", spy)
    return seen


def _same(got: dict, want: dict, keys) -> None:
    for k in keys:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k])


def _np_load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


ARRAYS = {
    "f32": np.arange(64, dtype=np.float32).reshape(1, 64) / 7,
    "f64": np.linspace(-1e300, 1e300, 6).reshape(1, 6),
    "i64": np.array([[-(2**62), 3, 2**40]], np.int64),
    "i32": np.arange(-5, 7, dtype=np.int32).reshape(3, 4),
    "u8": np.arange(10, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "big_endian": np.arange(5, dtype=">f8"),
    "scalar": np.float32(2.5).reshape(()),
    "one": np.ones(1, np.float32),
    "empty": np.zeros((0, 3), np.float32),
    "f16": np.arange(4, dtype=np.float16),
}


def test_lean_reader_equals_np_load(tmp_path: Path, no_fallback) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, **ARRAYS)
    got = read_npz_arrays(path, ARRAYS)
    assert set(got) == set(ARRAYS)
    _same(got, _np_load(path), ARRAYS)
    # only the wanted keys come back
    assert set(read_npz_arrays(path, ["f32", "u8"])) == {"f32", "u8"}


def _zip_of_npy(path: Path, arrays: dict, version=None, compression=zipfile.ZIP_STORED,
                fortran: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for k, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asfortranarray(a) if fortran else a,
                                      version=version)
            zf.writestr(k + ".npy", buf.getvalue())
    return path


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_header_versions(tmp_path: Path, version, no_fallback) -> None:
    arrays = {k: ARRAYS[k] for k in ("f32", "f64", "i64", "bool", "scalar")}
    path = _zip_of_npy(tmp_path / "v.npz", arrays, version=version)
    raw = path.read_bytes()
    assert b"\x93NUMPY" + bytes([version[0], 0]) in raw  # the version we meant to test
    _same(read_npz_arrays(path, arrays), _np_load(path), arrays)


@pytest.mark.parametrize("case", ["compressed", "fortran", "odd_header", "not_npy",
                                  "comment", "prefix"])
def test_unusual_files_fall_back_to_np_load(tmp_path: Path, fallbacks, case: str) -> None:
    arrays = {k: ARRAYS[k] for k in ("f32", "i32", "f64")}
    path = tmp_path / f"{case}.npz"
    if case == "compressed":
        np.savez_compressed(path, **arrays)
    elif case == "fortran":
        _zip_of_npy(path, arrays, fortran=True)
        assert not _np_load(path)["i32"].flags.c_contiguous
    elif case == "odd_header":  # a valid header numpy would not write: keys reordered
        _zip_of_npy(path, arrays)
        raw = path.read_bytes()
        with zipfile.ZipFile(path, "w") as zf:
            for k, a in arrays.items():
                head = (f"{{'shape': {a.shape}, 'fortran_order': False, "
                        f"'descr': '{a.dtype.str}'}}").ljust(117) + "\n"
                zf.writestr(k + ".npy", b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little")
                            + head.encode() + a.tobytes())
        assert path.read_bytes() != raw
    elif case == "not_npy":  # np.load hands such a member over as bytes
        np.savez(path, **arrays)
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("notes.txt", b"tracked with v2")
    elif case == "comment":
        np.savez(path, **arrays)
        with zipfile.ZipFile(path, "a") as zf:
            zf.comment = b"an archive comment"
    else:  # bytes before the archive: zipfile shifts every offset by their length
        np.savez(path, **arrays)
        path.write_bytes(b"PK\x03\x04" + b"\0" * 60 + path.read_bytes())
    got = read_npz_arrays(path, arrays)
    assert fallbacks == [path]
    _same(got, _np_load(path), arrays)


def _params(tmp_path: Path) -> Path:
    write_bfm_params(tmp_path / "p", [0, 1, 2])
    return tmp_path / "p" / "0001" / "params.npz"


def test_missing_key_same_error_as_np_load(tmp_path: Path, fallbacks) -> None:
    path = _params(tmp_path)
    np.savez(path, exp_coeff=np.zeros((1, 64), np.float32), scale=np.ones(1, np.float32))
    with pytest.raises(SourceError) as lean:
        read_bfm_params(tmp_path / "p")
    with pytest.raises(SourceError) as old:
        _get(_np_load(path), path, "pose")
    assert str(lean.value) == str(old.value)
    assert "0001/params.npz: missing key 'pose' (has: exp_coeff, scale)" in str(lean.value)
    assert fallbacks == [path]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_truncated_file_is_one_line_naming_it(tmp_path: Path, fraction: float) -> None:
    path = _params(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(SourceError) as err:
        read_bfm_params(tmp_path / "p")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_every_truncation_and_byte_flip_is_np_loads_verdict(tmp_path: Path) -> None:
    """Damage anywhere in a params.npz: the lean reader accepts exactly what np.load accepts
    (with the same arrays) and refuses the rest with a SourceError, never another exception."""
    good = _params(tmp_path)
    raw = good.read_bytes()
    path = tmp_path / "x.npz"
    variants = [raw[:n] for n in range(0, len(raw), 7)]
    for i in range(len(raw)):
        for value in (raw[i] ^ 0x01, raw[i] ^ 0x80):
            variants.append(raw[:i] + bytes([value]) + raw[i + 1:])
    accepted = 0
    for data in variants:
        path.write_bytes(data)
        try:
            want = _load_npz(path)
        except SourceError:
            want = None
        try:
            got = read_npz_arrays(path, BFM_KEYS)
        except SourceError:
            assert want is None, f"lean refused what np.load reads ({len(data)} bytes)"
            continue
        assert want is not None, "lean accepted what np.load refuses"
        for k in BFM_KEYS:
            assert (k in got) == (k in want)
            if k in got:
                assert got[k].dtype == want[k].dtype
                np.testing.assert_array_equal(got[k], want[k])
        accepted += 1
    assert accepted > 100  # flips in dates, attributes and padding are harmless


def test_crc_mismatch_is_an_error(tmp_path: Path) -> None:
    path = _params(tmp_path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x93NUMPY", raw.index(b"exp_coeff.npy")) + 200  # inside exp_coeff data
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=r"0001/params\.npz: cannot read npz: Bad CRC-32"):
        read_bfm_params(tmp_path / "p")


def test_object_member_refused(tmp_path: Path) -> None:
    path = _params(tmp_path)
    np.savez(path, exp_coeff=np.array([None] * 64, dtype=object), pose=np.zeros((1, 6)),
             scale=np.ones(1))
    with pytest.raises(SourceError, match=r"0001/params\.npz: cannot read npz: .*allow_pickle"):
        read_bfm_params(tmp_path / "p")


def test_member_that_is_not_an_array(tmp_path: Path) -> None:
    path = _params(tmp_path)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("exp_coeff.npy", b"not a numpy file")
    with pytest.raises(SourceError, match=r"key 'exp_coeff' is not a \.npy array"):
        read_bfm_params(tmp_path / "p")


def test_bfm_reader_uses_the_lean_path(tmp_path: Path, no_fallback) -> None:
    want = write_bfm_params(tmp_path / "p", [0, 3, 6, 9], seed=3)
    tr = read_bfm_params(tmp_path / "p")
    np.testing.assert_array_equal(tr.exp, want["exp"])
    np.testing.assert_array_equal(tr.pose, want["pose"])
    np.testing.assert_array_equal(tr.scale, want["scale"])


# -- read_trackings ---------------------------------------------------------------------------


class _Fake:
    def __init__(self, i: int, fn):
        self.participant, self.name, self.path = "388", f"S{i}", Path(f"S{i}")
        self.i, self.fn = i, fn

    def tracking(self):
        return self.fn(self.i)


def test_read_trackings_keeps_order(tmp_path: Path) -> None:
    from rafdata.sources import NersembleSource, SourceOptions

    for s in range(5):
        write_bfm_params(tmp_path / "388" / "sequences" / f"EXP-{s}" / "params",
                         list(range(0, 3 * (s + 2), 3)), seed=s)
    seqs = NersembleSource(tmp_path, SourceOptions()).sequences("388")
    fresh = NersembleSource(tmp_path, SourceOptions()).sequences("388")
    want = [s.tracking() for s in seqs]
    got = read_trackings(fresh, workers=3)
    assert [len(t.frames) for t in got] == [2, 3, 4, 5, 6]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.exp, b.exp)
        assert a.path == b.path
    assert read_trackings([], 4) == []


def test_read_trackings_runs_in_parallel() -> None:
    barrier = threading.Barrier(2, timeout=10)  # passes only if two run at once

    def meet(i):
        barrier.wait()
        return i
    assert read_trackings([_Fake(i, meet) for i in range(2)], workers=2) == [0, 1]


def test_read_trackings_raises_first_error_in_sequence_order() -> None:
    ran: list[int] = []

    def work(i):
        ran.append(i)
        if i == 1:
            time.sleep(0.3)  # fails last in time, first in order
            raise SourceError(Path(f"S{i}"), "first in order")
        if i == 2:
            raise SourceError(Path(f"S{i}"), "first in time")
        time.sleep(0.05)
        return i
    with pytest.raises(SourceError, match="first in order"):
        read_trackings([_Fake(i, work) for i in range(40)], workers=2)
    assert len(ran) < 40  # the rest was cancelled
    with pytest.raises(SourceError, match="first in order"):  # and the serial path agrees
        read_trackings([_Fake(i, work) for i in range(3)], workers=1)
