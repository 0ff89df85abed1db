"""An ImageNet-style tree: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (torchvision ImageFolder)."""
from __future__ import annotations

import os

from torch.utils.data import get_worker_info
from torchvision.datasets import ImageFolder

from .locations import DataError, split_dir


class Folder(ImageFolder):
    """ImageFolder whose failures are one-line DataErrors, optionally returning sample metadata."""

    def __init__(self, root: str, split: str, transform, with_meta: bool = False):
        path = split_dir(root, split)
        try:
            super().__init__(path, transform=transform)
        except (FileNotFoundError, OSError) as exn:
            raise DataError(f"imagefolder {split} directory {path}: {str(exn).splitlines()[0]}") from None
        self.with_meta = with_meta

    def __getitem__(self, index: int):
        x, label = super().__getitem__(index)
        if not self.with_meta:
            return x, label
        worker = get_worker_info()
        return x, label, {"key": os.path.relpath(self.samples[index][0], self.root), "url": self.root,
                          "worker": worker.id if worker else 0}
