"""An ImageNet-style tree: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (torchvision ImageFolder)."""
from __future__ import annotations

import os

from torch.utils.data import get_worker_info
from torchvision.datasets import ImageFolder

from .common import SkipCounter
from .locations import DataError, split_dir

MAX_CONSECUTIVE_UNREADABLE = 50  # timm's ImageDataset gives up after as many


class Folder(ImageFolder):
    """ImageFolder whose failures are one-line DataErrors, optionally returning sample metadata.

    ``classes``: the class names whose indices the labels are (the train split's, for the val split): ImageFolder
    numbers each tree's own folders, so a val tree without one of the classes would shift every label after it. A
    class folder that is not among them is a DataError; a class without a folder here is allowed.

    An image that cannot be read (truncated, not an image) is skipped, counted in ``skipped`` and logged, and the next
    one in the tree stands in for it, as in timm's ImageDataset: one bad file must not end a week-long run. Only
    ``MAX_CONSECUTIVE_UNREADABLE`` in a row are a DataError.
    """

    def __init__(self, root: str, split: str, transform, with_meta: bool = False, classes: list[str] | None = None,
                 skipped: SkipCounter | None = None):
        path = split_dir(root, split)
        self.split, self.given_classes = split, classes
        try:
            super().__init__(path, transform=transform, allow_empty=classes is not None)
        except (FileNotFoundError, OSError) as exn:
            raise DataError(f"imagefolder {split} directory {path}: {str(exn).splitlines()[0]}") from None
        self.with_meta = with_meta
        self.skipped = skipped if skipped is not None else SkipCounter()

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found, class_to_idx = super().find_classes(directory)
        if self.given_classes is None:
            return found, class_to_idx
        unknown = sorted(set(found) - set(self.given_classes))
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise DataError(f"imagefolder {self.split} directory {directory}: class folder {unknown[0]!r}{more} is not "
                            "one of the train directory's classes")
        return list(self.given_classes), {name: index for index, name in enumerate(self.given_classes)}

    def __getitem__(self, index: int):
        for tried in range(MAX_CONSECUTIVE_UNREADABLE):
            index_read = (index + tried) % len(self)
            try:
                x, label = super().__getitem__(index_read)
                break
            except OSError as exn:  # PIL's truncated or unidentified image, a file gone
                self.skipped.add("unreadable image", self.samples[index_read][0], exn)
        else:
            raise DataError(f"imagefolder {self.split}: {MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row from "
                            f"{self.samples[index][0]}")
        index = index_read
        if not self.with_meta:
            return x, label
        worker = get_worker_info()
        return x, label, {"key": os.path.relpath(self.samples[index][0], self.root), "url": self.root,
                          "worker": worker.id if worker else 0}
