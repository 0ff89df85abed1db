"""Where a run's data lies, checked without torch: a missing root, split directory or shard is one line and exit
code 2 in a fraction of a second, before the seconds torch, torchvision and Lightning take to import
(``python train.py`` checks here first; :meth:`.ImageDataModule.check` starts here, then reads the data)."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
from omegaconf import DictConfig

from ..config import DATA_SOURCES

IMAGEFOLDER_SPLITS = {"train": "train", "val": "val"}


class DataError(ValueError):
    """Missing or unusable data; the message is one line naming the path or pattern.

    One raised in a DataLoader worker comes back to the main process as a DataError whose message is PyTorch's
    "Caught DataError in DataLoader worker process N" and the worker's traceback; ``str`` of it is still the one line
    the worker raised.
    """

    def __str__(self) -> str:
        text = super().__str__()
        last = text.rstrip().rsplit("\n", 1)[-1]
        raised_as = f"{type(self).__module__}.{type(self).__qualname__}: "
        if text.startswith(f"Caught {type(self).__name__} in DataLoader worker") and last.startswith(raised_as):
            return last[len(raised_as):]
        return text


def check_source(cfg: DictConfig) -> None:
    if cfg.source not in DATA_SOURCES:
        raise DataError(f"data.source={cfg.source!r} is not one of {', '.join(DATA_SOURCES)}")


def split_dir(root: str, split: str) -> str:
    return os.path.join(root, IMAGEFOLDER_SPLITS[split])


def check_tree(root: str) -> None:
    """Both split directories of an ImageFolder tree exist and hold at least one class directory."""
    if not root or not os.path.isdir(root):
        raise DataError(f"imagefolder root {root} is not a directory")
    for split in IMAGEFOLDER_SPLITS:
        path = split_dir(root, split)
        if not os.path.isdir(path):
            raise DataError(f"imagefolder {split} directory {path} does not exist")
        if not any(entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(path)):
            raise DataError(f"imagefolder {split} directory {path} has no class directories")


def is_local(root: str) -> bool:
    scheme = urlparse(root).scheme
    return scheme in ("", "file") and not root.startswith("pipe:")


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def hidden(path: str, top: str) -> bool:
    """Whether ``path`` or a folder of it under ``top`` is hidden (a leading dot: ``.ipynb_checkpoints``, ``._x.jpg``)."""
    return any(part.startswith(".") for part in Path(os.path.relpath(path, top)).parts)


def shard_urls(root: str, pattern: str) -> list[str]:
    """Brace-expand ``pattern`` under ``root`` (a directory, file:, http(s):, pipe:... prefix)."""
    base = root.rstrip("/") + "/" if root else ""
    try:
        return [base + p for p in braceexpand.braceexpand(pattern)]
    except braceexpand.UnbalancedBracesError:
        raise DataError(f"shard pattern {pattern!r} has unbalanced braces: write a range as "
                        "imagenet1k-train-{0000..1023}.tar") from None


def check_shards(root: str, pattern: str, split: str) -> list[str]:
    """Expanded shard URLs; local shards must all exist (else one DataError line naming them)."""
    urls = shard_urls(root, pattern)
    if not urls:
        raise DataError(f"webdataset {split} shards: pattern {pattern!r} expands to nothing")
    if is_local(root):
        rootdir = local_path(root)
        if not os.path.isdir(rootdir):
            raise DataError(f"webdataset root {rootdir} is not a directory")
        missing = [u for u in urls if not os.path.isfile(local_path(u))]
        if missing:
            raise DataError(
                f"webdataset {split} shards: {len(missing)} of {len(urls)} missing for "
                f"{os.path.join(rootdir, pattern)} (first: {local_path(missing[0])})"
            )
    return urls


def webdataset_shards(cfg: DictConfig, split: str) -> list[str]:
    """The shard URLs of ``split`` that the ``data`` section names (local shards all present)."""
    if not cfg.root:
        raise DataError("data.root is required for data.source=webdataset: the shards' folder (data.root=DIR, or "
                        "IMAGENET_WDS=DIR in the environment for the ImageNet recipes)")
    for key in (f"{split}_shards", f"{split}_samples"):
        if cfg[key] is None:
            raise DataError(f"data.{key} is required for data.source=webdataset (see configs/data/imagenet_wds.yaml)")
    return check_shards(cfg.root, cfg.train_shards if split == "train" else cfg.val_shards, split)


def check_locations(cfg: DictConfig) -> None:
    """Raise DataError unless the ``data`` section's source is known and its root, split directories or shards are
    there (the digits come with scikit-learn)."""
    check_source(cfg)
    if cfg.source == "digits" and cfg.val_fraction is None:
        raise DataError("data.val_fraction is required for data.source=digits: the held-out share, in (0, 1)")
    if cfg.source == "imagefolder":
        if not cfg.root:
            raise DataError("data.root is required for data.source=imagefolder")
        check_tree(cfg.root)
    elif cfg.source == "webdataset":
        for split in ("train", "val"):
            webdataset_shards(cfg, split)
