"""Data for tome-train: the bundled digits, ImageFolder trees and WebDataset shards behind one DataModule.

See docs/data.md for the sources, the DDP guarantees and the shard layout.
"""
from .locations import DataError, check_locations

__all__ = ["ImageDataModule", "DataError", "check_locations", "write_digits_shards", "write_imagefolder_shards",
           "write_split"]


def __getattr__(name):
    # torch loads with the DataModule, not with the package: a missing path is found before it
    # (.locations); the shard writer loads lazily, so `python -m tome_train.data.shards` runs it only once
    if name == "ImageDataModule":
        from .datamodule import ImageDataModule

        return ImageDataModule
    if name in ("write_digits_shards", "write_imagefolder_shards", "write_split"):
        from . import shards

        return getattr(shards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
