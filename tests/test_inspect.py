"""rafdata.inspect: `verify` counts damaged images apart by what failed (CRC-32 or decoding),
from the error's ``kind``, never from its message."""

from __future__ import annotations

import pytest

from rafdata.errors import CorruptImageError
from rafdata.inspect import verify
from rafdata.store import Store
from tests.store_helpers import flip_bytes, image_chunk, write_store

CRC_LINE = "/images: {n} images fail their CRC-32 (first at row {row})"
DECODE_LINE = "/images: {n} images cannot be decompressed (first at row {row})"


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, identities=("388",), sequences=("A",))
    return path


def test_verify_sorts_damaged_images_by_kind(store, monkeypatch):
    """Messages that say the opposite of their kind: only ``kind`` decides the count."""
    with Store(store) as s:
        real = s.read_rgb

        def read_rgb(i: int):
            if i == 1:
                raise CorruptImageError(s.path, i, "chunk cannot be decoded",
                                        kind=CorruptImageError.CRC)
            if i in (2, 4):
                raise CorruptImageError(s.path, i, "colour fails its CRC-32",
                                        kind=CorruptImageError.DECODE)
            return real(i)

        monkeypatch.setattr(s, "read_rgb", read_rgb)
        problems = verify(s).problems
    assert problems == [DECODE_LINE.format(n=2, row=2), CRC_LINE.format(n=1, row=1)]


def test_kind_is_checked():
    with pytest.raises(ValueError, match="kind"):
        CorruptImageError(None, 0, "x", kind="crc-32")


@pytest.mark.parametrize("where, line", [
    ("payload", CRC_LINE),
    ("header", DECODE_LINE),
])
def test_verify_names_real_damage(store, where, line):
    """Bytes inverted in the middle of a chunk: it decodes, the CRC-32 differs. In the Blosc
    header: the chunk cannot be decoded at all."""
    path, offset, size = image_chunk(store, 3)
    if where == "header":
        flip_bytes(path, offset, 16)
    else:
        flip_bytes(path, offset + size // 2, 8)
    with Store(store) as s:
        result = verify(s)
    assert not result.ok and line.format(n=1, row=3) in result.problems
