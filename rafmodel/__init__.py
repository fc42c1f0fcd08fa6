"""rafmodel: trains Gaussian head avatars from a rafdata store, with retrieval augmentation."""

__version__ = "0.1.0"
