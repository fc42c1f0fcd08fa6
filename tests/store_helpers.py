"""Small helpers that write tiny stores directly through StoreWriter (no videos needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from rafdata.writer import StoreWriter


def fake_sequence(rng: np.random.Generator, t: int = 5, d: int = 8):
    frames = np.arange(t) * 3
    exp = rng.normal(size=(t, d)).astype(np.float32)
    pose = rng.normal(scale=0.1, size=(t, 6)).astype(np.float32)
    scale = np.full(t, 0.1, np.float32)
    return frames, exp, pose, scale


def camera(i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    K = np.array([[100.0, 0, 16 + i], [0, 100.0, 12], [0, 0, 1]])
    w2c = np.eye(4)
    w2c[2, 3] = 1.0 + i
    return K, w2c


def write_store(
    path: Path,
    identities=("388", "422"),
    sequences=("EXP-1-head", "FREE"),
    cams: int = 2,
    t: int = 5,
    d: int = 8,
    size: tuple[int, int] = (24, 32),
    masks: bool = True,
    seed: int = 0,
    compression: str | None = None,
) -> dict:
    """A store with random images; returns the ground truth written, keyed by (id, seq)."""
    rng = np.random.default_rng(seed)
    truth = {}
    h, w = size
    with StoreWriter(path, **({"compression": compression} if compression else {})) as writer:
        for pid in identities:
            for seq in sequences:
                frames, exp, pose, scale = fake_sequence(rng, t, d)
                rgb = rng.integers(0, 256, size=(cams, t, h, w, 3), dtype=np.uint8)
                mask = rng.integers(0, 256, size=(cams, t, h, w), dtype=np.uint8)
                with writer.sequence(pid, seq, held_out=seq == "FREE", source="mem") as sw:
                    rows = sw.add_timesteps(frames, exp, pose, scale, "test")
                    for c in range(cams):
                        K, w2c = camera(c)
                        row = sw.camera(f"22220003{c}", K, w2c)
                        sw.add_images(rgb[c], mask[c] if masks else None, rows, row)
                truth[(pid, seq)] = dict(frames=frames, exp=exp, pose=pose, scale=scale,
                                         rgb=rgb, mask=mask if masks else None)
    return truth


def image_chunk(store: Path, row: int, what: str = "rgb") -> tuple[Path, int, int]:
    """(file, byte offset, size) of the chunk holding image ``row`` (colour or "mask"), for
    tests that damage stored bytes. Works for segment files and format-1 stores alike."""
    from rafdata.store import Store

    with Store(store) as s:
        rgb, mask, local, _, path = s._locate(int(row))
        ds = rgb if what == "rgb" else mask
        info = ds.id.get_chunk_info_by_coord((local,) + (0,) * (ds.ndim - 1))
        return path, int(info.byte_offset), int(info.size)


def flip_bytes(path: Path, offset: int, count: int = 16) -> None:
    """Invert ``count`` bytes of ``path`` starting at ``offset`` (in place)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(count))
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (to check a file is byte-identical after a refusal)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
