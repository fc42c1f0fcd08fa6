"""rafdata: NeRSemble ingest, the HDF5 store, expression banks and coverage analysis."""

__version__ = "0.1.0"
