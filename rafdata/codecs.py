"""The lossless image codecs a store can use: names and settings only.

Kept apart from ``rafdata.store`` (which imports h5py and numpy) so that command-line
front ends can offer the choices without loading either.
"""

COMPRESSIONS = ("blosc-blosclz", "blosc-lz4", "blosc-zstd", "gzip", "lzf", "none")
# Chosen by measurement (bench/bench_store.py, bench/bench_ingest.py; docs/benchmarks.md): on
# frames with real-camera noise LZ4 shrinks colour only ~1.2x, for ~1 ms of CPU per 512 px
# image at ingest and 4x slower reads; BloscLZ-1 keeps mattes ~25x smaller at almost no cost.
DEFAULT_COMPRESSION = "blosc-blosclz"
# Blosc codecs: (compressor, level). BloscLZ at level 1 gives up quickly on blocks it cannot
# shrink (noisy colour) and still packs mattes ~25x: compression only where it is cheap.
BLOSC_CODECS = {"blosc-blosclz": ("blosclz", 1), "blosc-lz4": ("lz4", 5), "blosc-zstd": ("zstd", 3)}
