"""An ImageNet-style tree: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (torchvision ImageFolder)."""
from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

from torch.utils.data import default_collate, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ..config import and_more
from .common import SkipCounter
from .locations import DataError, hidden, split_dir

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_UNREADABLE = 50  # timm's ImageDataset gives up after as many


class Folder(ImageFolder):
    """ImageFolder whose failures are one-line DataErrors, optionally returning sample metadata.

    ``classes``: the class names whose indices the labels are (the train split's, for the val split): ImageFolder
    numbers each tree's own folders, so a val tree without one of the classes would shift every label after it. A
    class folder that is not among them is a DataError; a class without a folder here is allowed. Hidden folders and
    files (``.ipynb_checkpoints``, macOS's ``._x.jpg``) are no classes and no images. Symlinked folders are followed,
    as ImageFolder follows them, except one that leads back to a folder it is in (:func:`walk_files`).

    An image that cannot be read (truncated, not an image, whatever the decoder raises) is skipped, counted in
    ``skipped`` and logged. In training (``stand_in``) the next one in the tree stands in for it, as in timm's
    ImageDataset: one bad file must not end a week-long run, and only ``MAX_CONSECUTIVE_UNREADABLE`` in a row are a
    DataError. In validation, where each image counts once, the item is ``None``, which :func:`collate_readable`
    leaves out of its batch.
    """

    def __init__(self, root: str, split: str, transform, with_meta: bool = False, classes: list[str] | None = None,
                 skipped: SkipCounter | None = None, stand_in: bool = True):
        path = split_dir(root, split)
        self.split, self.given_classes, self.stand_in = split, classes, stand_in
        try:
            super().__init__(path, transform=transform, allow_empty=classes is not None,
                             is_valid_file=partial(visible_image, top=path))
        except (FileNotFoundError, OSError) as exn:
            raise DataError(f"imagefolder {split} directory {path}: {str(exn).splitlines()[0]}") from None
        self.with_meta = with_meta
        self.skipped = skipped if skipped is not None else SkipCounter()

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found, _ = super().find_classes(directory)
        found = [name for name in found if not name.startswith(".")]
        if not found and self.given_classes is None:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")  # as ImageFolder says it
        if self.given_classes is None:
            return found, {name: index for index, name in enumerate(found)}
        unknown = sorted(set(found) - set(self.given_classes))
        if unknown:
            raise DataError(f"imagefolder {self.split} directory {directory}: class folder {unknown[0]!r}"
                            f"{and_more(unknown)} is not "
                            "one of the train directory's classes")
        return list(self.given_classes), {name: index for index, name in enumerate(self.given_classes)}

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: Optional[tuple[str, ...]] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """ImageFolder's (path, class index) list, in its order, walked by :func:`walk_files` (``is_valid_file`` is
        always given here)."""
        samples, empty = [], []
        for name in sorted(class_to_idx):
            class_dir = os.path.join(directory, name)
            found = [(path, class_to_idx[name]) for path in walk_files(class_dir) if is_valid_file(path)]
            if not found:
                empty.append(name)
            samples += found
        if empty and not allow_empty:  # ImageFolder's message, with the extensions it lists where it is given them
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                    f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")
        return samples

    def _read(self, index: int, count: bool = True):
        """The image at ``index``, or ``None`` where it cannot be read (counted and logged where ``count``: a stand-in
        that fails is counted when its own turn comes)."""
        path = self.samples[index][0]
        try:
            return self.loader(path)
        except Exception as exn:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            if count:
                self.skipped.add("unreadable image", path, exn)
            return None

    def __getitem__(self, index: int):
        image = self._read(index)
        if image is None and not self.stand_in:
            return None
        index_read = index
        for tried in range(1, MAX_CONSECUTIVE_UNREADABLE):
            if image is not None:
                break
            index_read = (index + tried) % len(self)
            image = self._read(index_read, count=False)
        if image is None:
            raise DataError(f"imagefolder {self.split}: {MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row from "
                            f"{self.samples[index][0]}")
        x = self.transform(image) if self.transform is not None else image
        label = self.samples[index_read][1]
        if not self.with_meta:
            return x, label
        worker = get_worker_info()
        return x, label, {"key": os.path.relpath(self.samples[index_read][0], self.root), "url": self.root,
                          "worker": worker.id if worker else 0}


def walk_files(top: str) -> Iterator[str]:
    """The files under ``top`` in ImageFolder's order (``sorted(os.walk(top, followlinks=True))``), symlinked folders
    followed, except one that leads back to a folder it is in (or above ``top``), which is logged and left out.

    ImageFolder follows such a loop until the OS refuses (40 links deep): a folder linking to its parent listed each
    image 40 times, two such links 2**40 times (it never finished). ``find -L`` leaves loops out the same way.
    """
    if not os.path.isdir(top):
        return  # a class the val tree has no folder for
    outer = frozenset((st.st_dev, st.st_ino) for st in map(os.stat, (top, *Path(os.path.abspath(top)).parents,
                                                                      *Path(os.path.realpath(top)).parents)))
    inside = {top: outer}  # per folder walked, the folders it is in
    listed = []
    for folder, subdirs, files in os.walk(top, followlinks=True):
        above = inside.pop(folder)
        kept = []
        for name in subdirs:
            path = os.path.join(folder, name)
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in above:
                log.warning("not following %s: it leads back to %s, a folder it is in", path, os.path.realpath(path))
                continue
            inside[path] = above | {(st.st_dev, st.st_ino)}
            kept.append(name)
        subdirs[:] = kept  # os.walk descends only into these
        listed.append((folder, files))
    for folder, files in sorted(listed):
        for name in sorted(files):
            yield os.path.join(folder, name)


def visible_image(path: str, top: str) -> bool:
    return has_file_allowed_extension(path, IMG_EXTENSIONS) and not hidden(path, top)


def collate_readable(batch: list):
    """``default_collate`` of the items that could be read; a batch none of which could is ``None``."""
    readable = [item for item in batch if item is not None]
    return default_collate(readable) if readable else None
