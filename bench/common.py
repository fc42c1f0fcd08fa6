"""Shared pieces of the benchmarks: scratch data, timing, markdown tables."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRATCH = Path(os.environ.get("RAF_BENCH_DIR", "/tmp/raf-bench"))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(n: int, fn: Callable[[], object]) -> float:
    """Seconds of the fastest of ``n`` calls: the run least disturbed by the rest of the
    machine (page-cache writeback, other processes)."""
    return min(timed(fn)[0] for _ in range(n))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def synth_dataset(name: str, **overrides) -> Path:
    """A synthetic NeRSemble-layout dataset under SCRATCH, made once and reused."""
    from rafdata.synth import SynthConfig, write_dataset

    out = SCRATCH / name
    if (out / "synth.json").is_file():
        return out
    cfg = SynthConfig(**overrides)
    write_dataset(out, cfg)
    return out


def video_dataset(quick: bool) -> tuple[Path, int, int]:
    """The ingest/store benchmark data: 2 ids x 2 sequences x 3 cameras of square video.

    Returns (root, image side, frames per sequence): 512 px and 40 frames, or 256 and 20 quick.
    """
    size, frames = (256, 20) if quick else (512, 40)
    src = synth_dataset(
        f"ingest-{size}-{frames}", participants=("388", "422"), frame_step=1,
        sequences=("EXP-1-head", "FREE"), cameras=("222200037", "222200038", "222200039"),
        frames=frames, width=size, height=size,
    )
    return src, size, frames
