"""imgcls: a reproducible image-classification pipeline (library part; stages/ are thin entrypoints)."""

__version__ = "0.1.0"
