"""Write WebDataset shards in the public ImageNet layout.

``imagenet1k-train-0000.tar ...`` and ``imagenet1k-validation-00.tar ...``; every sample holds ``jpg``
(the JPEG bytes), ``cls`` (the integer label) and ``json`` (label, class name, source file). The number
of shards is ``round(samples / per_shard)`` with samples spread evenly, so ImageNet's 1,281,167 / 50,000
images at 1251 / 781 per shard give exactly the public 1024 / 64 shards. Training samples are written
in a fixed shuffled order (each shard mixes classes, as streaming shuffles only within a buffer);
validation keeps the tree's order.

    python -m tome_train.data.shards --imagefolder ROOT --out DIR [--train-per-shard 1251 --val-per-shard 781]
    python -m tome_train.data.shards --digits --out DIR   # the bundled digits, as JPEGs (smoke tests)
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import sys
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Optional, Sequence

from PIL import Image

from ..arguments import OneLineArgumentParser, integer_at_least
from .locations import DataError, split_dir

PREFIX = {"train": "imagenet1k-train", "val": "imagenet1k-validation"}
INDEX_DIGITS = {"train": 4, "val": 2}  # the public layout's shard numbering


@dataclass
class SplitInfo:
    split: str
    pattern: str  # brace pattern for data.train_shards / data.val_shards
    shards: int
    samples: int


def shard_name(split: str, index: int, width: int) -> str:
    return f"{PREFIX[split]}-{index:0{width}d}.tar"


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _write_one(bounds: tuple[str, int, int], items: Sequence, to_sample: Callable[[Any], Optional[dict]]) -> int:
    """One shard of ``items[start:stop]`` at ``path``; the samples written (``to_sample`` gives ``None`` for one it
    cannot)."""
    import webdataset as wds

    path, start, stop = bounds
    written = 0
    with wds.TarWriter(path, mtime=0) as sink:
        for item in items[start:stop]:
            sample = to_sample(item)
            if sample is not None:
                sink.write(sample)
                written += 1
    return written


_JOB: Optional[Callable] = None


def _run_job(bounds: tuple[str, int, int]) -> int:
    return _JOB(bounds)


class _Staging:
    """Shards written under a temporary name in the output folder (``.NAME.partial``) and given their own names
    together when every one is whole: an error or an interrupt (a full disk, Ctrl-C, a split with no readable image)
    leaves no half-written shard, and an earlier run's shards as they were."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.renames: list[tuple[str, str]] = []
        self.made_dir = False

    def __enter__(self) -> "_Staging":
        self.made_dir = not os.path.exists(self.out_dir)
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a file at the path, or above it
            raise DataError(f"shard output directory {self.out_dir} is not a directory") from None
        return self

    def _remove_staged(self) -> None:
        for staged, _ in self.renames:
            with contextlib.suppress(FileNotFoundError):
                os.remove(staged)

    def path(self, name: str) -> str:
        """Where to write the shard ``name`` until it is done."""
        final = os.path.join(self.out_dir, name)
        if os.path.isdir(final):  # found now, not at the renames, when the shards before it would be in place
            raise DataError(f"{final} is a directory, where a shard is to be written: move it away")
        staged = os.path.join(self.out_dir, f".{name}.partial")
        self.renames.append((staged, final))
        return staged

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                for staged, final in self.renames:
                    os.replace(staged, final)
            except OSError:  # a folder of a shard's name: those not yet renamed are left out too
                self._remove_staged()
                raise
            return
        self._remove_staged()
        if self.made_dir:
            with contextlib.suppress(OSError):  # only where it is still empty
                os.rmdir(self.out_dir)


def check_per_shard(split: str, per_shard: int) -> None:
    """Raise DataError unless ``per_shard`` is a positive number of samples per shard."""
    if per_shard < 1:
        raise DataError(f"{split} samples per shard must be positive, not {per_shard}")


def write_split(out_dir: str, split: str, items: Sequence, to_sample: Callable[[Any], dict],
                per_shard: int, workers: int = 1) -> SplitInfo:
    """Write ``items`` (each turned into a sample dict by ``to_sample``, or ``None`` where it cannot be) as one split's
    shards, whole or not at all (a split none of whose samples could be written is a DataError); the samples counted
    are those written.

    A sample dict holds ``__key__`` (no dots, unique), ``jpg`` (bytes), ``cls`` (int) and ``json`` (dict).
    """
    with _Staging(out_dir) as staging:
        return _write_split(staging, split, items, to_sample, per_shard, workers)


def _write_split(staging: _Staging, split: str, items: Sequence, to_sample: Callable[[Any], dict],
                 per_shard: int, workers: int) -> SplitInfo:
    if split not in PREFIX:
        raise DataError(f"split must be one of {', '.join(PREFIX)}, not {split!r}")
    check_per_shard(split, per_shard)
    n = len(items)
    if n == 0:
        raise DataError(f"no {split} samples to write")
    n_shards = max(1, round(n / per_shard))
    width = max(INDEX_DIGITS[split], len(str(n_shards - 1)))
    bounds = [(staging.path(shard_name(split, i, width)), i * n // n_shards, (i + 1) * n // n_shards)
              for i in range(n_shards)]
    job = partial(_write_one, items=items, to_sample=to_sample)
    if workers > 1 and n_shards > 1:
        import multiprocessing as mp

        global _JOB
        _JOB = job  # forked workers inherit it: the item list is not pickled per shard
        try:
            with mp.get_context("fork").Pool(min(workers, n_shards)) as pool:
                written = sum(pool.map(_run_job, bounds, chunksize=1))
        finally:
            _JOB = None
    else:
        written = sum(job(b) for b in bounds)
    if written == 0:  # shards of no sample: data.*_samples=0 is no epoch
        raise DataError(f"none of the {n} {split} samples could be written (not one readable image): no shards written")
    pattern = f"{PREFIX[split]}-{{{0:0{width}d}..{n_shards - 1:0{width}d}}}.tar"
    return SplitInfo(split, pattern, n_shards, written)


# -- digits -------------------------------------------------------------------------------------------


def _digits_sample(item: tuple[int, Any, int]) -> dict:
    index, image, label = item
    return {
        "__key__": f"digits_{index:04d}",
        "jpg": jpeg_bytes(Image.fromarray(image)),
        "cls": int(label),
        "json": {"label": int(label), "class": str(label), "index": int(index)},
    }


def write_digits_shards(out_dir: str, img_size: Optional[int] = None, train_per_shard: int = 180,
                        val_per_shard: int = 90, val_fraction: Optional[float] = None,
                        corrupt: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The bundled digits as JPEG shards in the public layout; ``img_size`` and ``val_fraction`` default to the
    default recipe's (``model.img_size``, ``data.val_fraction``) and the images are upsampled with its
    ``data.interpolation``, so that the shards hold the digits source's split and images.

    ``corrupt`` lists sample keys (``digits_0005``) whose image is written as undecodable bytes, for
    tests of the skip-and-count path. Returns each split's :class:`SplitInfo` as a dict (``{"train": {...}, "val":
    ...}``); the keys of the samples are ``digits_<index into load_digits()>``.
    """
    from ..config import load_config
    from .digits import digits_labels, digits_images, digits_split

    recipe = load_config()
    img_size = recipe.model.img_size if img_size is None else img_size
    val_fraction = recipe.data.val_fraction if val_fraction is None else val_fraction
    if img_size < 1:
        raise DataError(f"img_size={img_size} is not allowed: use a positive integer")
    check_per_shard("train", train_per_shard)  # both before a shard is written
    check_per_shard("val", val_per_shard)
    bad = set(corrupt or ())

    def to_sample(item):
        sample = _digits_sample(item)
        if sample["__key__"] in bad:
            sample["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg" + bytes(64)
        return sample

    result = {}
    with _Staging(out_dir) as staging:
        for split, indices, per_shard in zip(("train", "val"), digits_split(float(val_fraction)),
                                             (train_per_shard, val_per_shard)):
            images = digits_images(indices, img_size, recipe.data.interpolation)[:, 0].numpy()
            labels = digits_labels(indices).tolist()
            items = [(int(i), img, lab) for i, img, lab in zip(indices, images, labels)]
            if split == "train":
                random.Random(0).shuffle(items)
            result[split] = asdict(_write_split(staging, split, items, to_sample, per_shard, workers=1))
    return result


# -- an ImageNet-style tree ---------------------------------------------------------------------------


def list_tree(root: str, split: str, classes: Optional[list[str]] = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(sorted (path, label) pairs, class names) of ``root/<split>/<class>/<image>``, listed by the imagefolder
    source's own dataset so that the shards hold exactly the images it would read (hidden files and folders left
    out), labelled by ``classes`` (the train split's, for val) where given."""
    from .imagefolder import Folder

    folder = Folder(root, split, transform=None, classes=classes)
    return folder.samples, folder.classes


def unique_keys(paths: Sequence[str]) -> list[str]:
    """A sample key per path: its file name without the extension, dots made underscores (a dot ends a key in a
    tar), numbered on where two would be the same (``a.b.jpg`` and ``a_b.jpg``, ``img.jpg`` and ``img.png``; the
    second of a pair was lost in reading)."""
    keys, taken = [], set()
    for path in paths:
        stem = key = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
        copy = 1
        while key in taken:
            copy += 1
            key = f"{stem}_{copy}"
        taken.add(key)
        keys.append(key)
    return keys


def _file_sample(item: tuple[str, int, str], root: str, classes: list[str]) -> Optional[dict]:
    path, label, key = item
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\xff\xd8"):  # not a JPEG: re-encode (the key is jpg)
        try:
            with Image.open(io.BytesIO(data)) as img:
                data = jpeg_bytes(img)
        except Exception as exn:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            print(f"skipped {path}: not a readable image ({type(exn).__name__}: {str(exn).splitlines()[0]})",
                  file=sys.stderr)
            return None
    return {
        "__key__": key,
        "jpg": data,
        "cls": label,
        "json": {"label": label, "class": classes[label], "filename": os.path.relpath(path, root)},
    }


def write_imagefolder_shards(root: str, out_dir: str, train_per_shard: int = 1251, val_per_shard: int = 781,
                             seed: int = 0, workers: int = 1) -> dict[str, Any]:
    """``root/train`` and ``root/val`` (ImageFolder trees) as shards in ``out_dir``: the images and labels the
    imagefolder source reads from the same tree (val labelled by train's classes; a val class folder not among them
    is a DataError, a class without a val folder is allowed)."""
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory")
    check_per_shard("train", train_per_shard)  # all of it before a shard is written
    check_per_shard("val", val_per_shard)
    train, classes = list_tree(root, "train")
    val, _ = list_tree(root, "val", classes)
    if not val:
        raise DataError(f"imagefolder val directory {split_dir(root, 'val')} holds no images")
    random.Random(seed).shuffle(train)
    result = {}
    with _Staging(out_dir) as staging:
        for split, items, per_shard in (("train", train, train_per_shard), ("val", val, val_per_shard)):
            items = [(path, label, key) for (path, label), key in zip(items, unique_keys([path for path, _ in items]))]
            to_sample = partial(_file_sample, root=split_dir(root, split), classes=classes)
            result[split] = asdict(_write_split(staging, split, items, to_sample, per_shard, workers))
    result["classes"] = len(classes)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineArgumentParser(prog="python -m tome_train.data.shards", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--imagefolder", metavar="ROOT", help="tree with train/<class>/ and val/<class>/")
    source.add_argument("--digits", action="store_true", help="the bundled scikit-learn digits")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--train-per-shard", type=integer_at_least(1),
                        help="default: 1251 (ImageNet's 1024 shards); --digits 180")
    parser.add_argument("--val-per-shard", type=integer_at_least(1),
                        help="default: 781 (ImageNet's 64 shards); --digits 90")
    parser.add_argument("--seed", type=int, default=0, help="order of the training samples")
    parser.add_argument("--workers", type=integer_at_least(1), default=1, help="processes writing shards")
    parser.add_argument("--img-size", type=integer_at_least(1),
                        help="--digits: image size (default: the default recipe's)")
    args = parser.parse_args(argv)
    per_shard = {key: value for key, value in (("train_per_shard", args.train_per_shard),
                                               ("val_per_shard", args.val_per_shard)) if value is not None}
    try:
        if args.digits:
            result = write_digits_shards(args.out, args.img_size, **per_shard)
        else:
            result = write_imagefolder_shards(args.imagefolder, args.out, seed=args.seed, workers=args.workers,
                                              **per_shard)
    except (DataError, OSError) as exn:
        print(f"error: {str(exn).splitlines()[0]}", file=sys.stderr)
        return 2
    train, val = result["train"], result["val"]
    print(f"wrote {train['shards']} train shards ({train['samples']} samples) and "
          f"{val['shards']} val shards ({val['samples']} samples) to {args.out}")
    print("use: data.source=webdataset data.root=" + os.path.abspath(args.out)
          + f" data.train_shards='{train['pattern']}' data.val_shards='{val['pattern']}'"
          + f" data.train_samples={train['samples']} data.val_samples={val['samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
