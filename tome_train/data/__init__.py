"""Data for tome-train: the bundled digits, ImageFolder trees and WebDataset shards behind one DataModule.

See docs/data.md for the sources, the DDP guarantees and the shard layout.
"""
from .common import DataError
from .datamodule import ImageDataModule
from .shards import write_digits_shards, write_imagefolder_shards, write_split

__all__ = ["ImageDataModule", "DataError", "write_digits_shards", "write_imagefolder_shards", "write_split"]
