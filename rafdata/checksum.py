"""CRC-32 of stored bytes (images, HNSW blobs): one function, the fastest one installed.

ISA-L's CRC-32 (package ``isal``) computes exactly zlib's checksum, the one the store format
records, about 15x faster (carry-less multiply instructions): at ingest and on every training
read it is the difference between a visible cost and none (docs/benchmarks.md). zlib's is the
fallback where the wheel is missing (e.g. an unusual platform); stored checksums are the same
either way.
"""

from __future__ import annotations

# crc32(data, value=0) -> int: zlib's CRC-32 of a C-contiguous bytes-like object.
try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - depends on the platform
    from zlib import crc32

__all__ = ["crc32"]
