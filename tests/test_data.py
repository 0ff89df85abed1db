"""tome_train.data: the three sources, the shard writer, repeated augmentation and bad input (fast, CPU)."""
from __future__ import annotations

import io
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint

from tome_train.config import DataConfig, load_config
from tome_train.data import DataError, ImageDataModule, write_digits_shards
from tome_train.data.digits import digits_labels, digits_split
from tome_train.data.shards import main as shards_main
from tome_train.data.stream import assign

from linear_fit import fit_linear

REPO = Path(__file__).resolve().parent.parent
IMG = 32


def loader_error(loader) -> DataError:
    """The DataError iterating ``loader`` raises, its traceback dropped: the traceback's frames hold the loader's
    iterator and so its worker processes, which were then ended by the garbage collector at the end of the session,
    inside pytest-xdist's shutdown (a KeyboardInterrupt in the DataLoader's ``__del__``)."""
    try:
        for _ in loader:
            pass
    except DataError as e:
        return e.with_traceback(None)
    raise AssertionError("the loader raised no DataError")


def data_cfg(**overrides):
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(OmegaConf.load(REPO / "configs/data/digits.yaml").data)
    cfg.merge_with(overrides)
    return cfg


def shard_cfg(root, info, **overrides):
    fields = dict(source="webdataset", root=str(root), train_shards=info["train"]["pattern"],
                  val_shards=info["val"]["pattern"], train_samples=info["train"]["samples"],
                  val_samples=info["val"]["samples"])
    return data_cfg(**{**fields, **overrides})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return root, write_digits_shards(str(root), img_size=IMG, train_per_shard=180, val_per_shard=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A tiny ImageFolder tree: 3 classes, 6 train and 2 val JPEGs each, of varied sizes."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = 40 + 4 * i, 36
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{c}{i}.jpg")
    return root


# -- digits ----------------------------------------------------------------------------------------


def test_digits_split_fixed_stratified_disjoint():
    train, val = digits_split(0.2)
    assert len(train) == 1437 and len(val) == 360
    assert not set(train) & set(val) and len(set(train) | set(val)) == 1797
    assert val[:8].tolist() == [21, 24, 28, 34, 35, 37, 39, 42] and int(val.sum()) == 337944  # fixed forever
    counts = np.bincount(digits_labels(val).numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each class


def test_digits_batches_shapes_and_normalization():
    dm = ImageDataModule(data_cfg(), img_size=IMG, seed=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, IMG, IMG) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray as 3 channels
    val = list(dm.val_dataloader())
    xv = torch.cat([b[0] for b in val])
    yv = torch.cat([b[1] for b in val])
    _, val_idx = digits_split(0.2)
    assert torch.equal(yv, digits_labels(val_idx))  # val: every sample, in order, not shuffled
    assert xv.min() == -1.0 and xv.max() <= 1.0  # (0..1 - 0.5) / 0.5; background is 0
    assert dm.num_classes == 10 and dm.class_names[3] == "3"
    assert dm.num_train_samples == 1437 and dm.num_val_samples == 360


def test_digits_train_shuffles_per_epoch_and_steps_match():
    dm = ImageDataModule(data_cfg(batch_size=100), img_size=IMG, seed=0)
    loader = dm.train_dataloader()
    first, second = (torch.cat([y for _, y in loader]) for _ in range(2))
    assert len(loader) == dm.steps_per_epoch(1) == 14 and len(first) == 1400
    assert not torch.equal(first, second)
    assert dm.steps_per_epoch(2) == 7  # ceil(1437 / 2) // 100
    info = dm.describe()
    assert info["source"] == "digits" and info["train"]["samples"] == 1437 and info["val"]["samples"] == 360


# -- webdataset ------------------------------------------------------------------------------------


def test_shards_public_layout(shards):
    root, info = shards
    names = sorted(os.listdir(root))
    assert names[0] == "imagenet1k-train-0000.tar" and names[-1] == "imagenet1k-validation-03.tar"
    assert info["train"] == {"split": "train", "pattern": "imagenet1k-train-{0000..0007}.tar", "shards": 8,
                             "samples": 1437}
    assert info["val"]["pattern"] == "imagenet1k-validation-{00..03}.tar" and info["val"]["samples"] == 360
    with tarfile.open(root / "imagenet1k-validation-00.tar") as tar:
        members = tar.getnames()[:3]
    assert [m.rsplit(".", 1)[1] for m in members] == ["cls", "jpg", "json"]


def test_webdataset_val_reads_back_labels_and_images(shards):
    root, info = shards
    dm = ImageDataModule(shard_cfg(root, info, num_workers=0), img_size=IMG, seed=0, with_meta=True)
    info_found = dm.describe()
    assert info_found["train"]["shards"] == 8 and info_found["val"]["shards"] == 4
    assert info_found["num_classes"] == "not listed (shards)"
    xs, ys, keys = [], [], []
    for x, y, meta in dm.val_dataloader():
        xs.append(x), ys.append(y), keys.extend(meta["key"])
    _, val_idx = digits_split(0.2)
    assert keys == [f"digits_{i:04d}" for i in val_idx]  # val keeps order, each sample once
    assert torch.equal(torch.cat(ys), digits_labels(val_idx))
    reference = torch.cat([b[0] for b in ImageDataModule(data_cfg(), IMG, 0).val_dataloader()])
    assert (torch.cat(xs) - reference).abs().mean() < 0.05  # the same pictures, through JPEG


def test_webdataset_train_epoch_length_and_shuffle(shards):
    root, info = shards
    dm = ImageDataModule(shard_cfg(root, info, num_workers=2, batch_size=50), img_size=IMG, seed=0,
                         with_meta=True)
    loader = dm.train_dataloader()
    assert len(loader) == dm.steps_per_epoch(1) == 1437 // 50
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader) and all(len(b[1]) == 50 for b in batches)
        keys = [k for b in batches for k in b[2]["key"]]
        assert len(set(keys)) == len(keys)  # one pass emits each sample once
        epochs.append(keys)
    assert epochs[0] != epochs[1]


def test_corrupt_jpeg_skipped_and_counted(tmp_path, caplog):
    _, val_idx = digits_split(0.2)
    bad = f"digits_{val_idx[5]:04d}"
    info = write_digits_shards(str(tmp_path), img_size=IMG, train_per_shard=720, val_per_shard=180, corrupt=[bad])
    for workers in (0, 2):
        dm = ImageDataModule(shard_cfg(tmp_path, info, num_workers=workers), IMG, 0, with_meta=True)
        with caplog.at_level("WARNING", logger="tome_train.data.common"):
            keys = [k for _, _, meta in dm.val_dataloader() for k in meta["key"]]
        assert len(keys) == 359 and bad not in keys
        assert dm.num_corrupt == 1
    assert any(bad in r.getMessage() and "1 skipped so far" in r.getMessage() for r in caplog.records)


def test_unreadable_training_shards_fail_instead_of_spinning(tmp_path):
    train_idx, _ = digits_split(0.2)
    info = write_digits_shards(str(tmp_path), img_size=8, train_per_shard=1437, val_per_shard=360,
                               corrupt=[f"digits_{i:04d}" for i in train_idx])
    for workers in (0, 2):  # from a worker process, PyTorch re-raises it with the worker's traceback as its message
        dm = ImageDataModule(shard_cfg(tmp_path, info, num_workers=workers), 8, 0)
        error = loader_error(dm.train_dataloader())
        assert str(error) == f"webdataset: no readable samples in {tmp_path / 'imagenet1k-train-0000.tar'}"
        assert dm.num_corrupt == 1437 if workers == 0 else dm.num_corrupt >= 1437 // 2  # one worker's half, at least


def test_an_epoch_longer_than_the_shards_is_named(shards, caplog):
    """data.train_samples ten times what the shards hold (a typo) made every epoch read its samples ten times, silently.
    A first pass of at least half the quota is not named: with shards of equal size a slot's whole share can be that
    little of its quota (3 shards over 2 slots: one slot reads 1 and needs 1.5)."""
    root, info = shards
    for samples, warned in ((info["train"]["samples"] * 10, True), (info["train"]["samples"] * 2, False)):
        caplog.clear()
        dm = ImageDataModule(shard_cfg(root, info, num_workers=0, batch_size=100, train_samples=samples), IMG, 0)
        with caplog.at_level("WARNING", logger="tome_train.data.stream"):
            for index, _ in enumerate(dm.train_dataloader()):
                if index == 15:  # 1,600 images: the 1,437 of one pass and more
                    break
        assert index == 15
        messages = [r.getMessage() for r in caplog.records]
        assert messages == ([
            "webdataset: the first DataLoader worker of rank 0 read all 1437 samples of its 8 shard(s) before half of "
            "the 14300 images its share of data.train_samples=14370 needs; the epoch reads its samples again: is "
            "data.train_samples more than the 8 shards hold?"] if warned else []), messages


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_label_past_the_models_classes_stops_the_stream(shards, workers):
    """Shards carry no class list for check() to count; a label past the outputs was an IndexError in the loss (on a
    GPU, a device-side assert)."""
    root, info = shards
    dm = ImageDataModule(shard_cfg(root, info, num_workers=workers), IMG, 0, with_meta=True)
    dm.check(num_classes=10)
    assert sum(len(labels) for _, labels, _ in dm.val_dataloader()) == 360
    dm.check(num_classes=5)
    message = str(loader_error(dm.val_dataloader()))
    assert message.startswith("webdataset: sample digits_") and "\n" not in message
    assert message.endswith(", not one of model.num_classes=5's 0..4")
    key = message.split()[2]
    label = digits_labels([int(key.removeprefix("digits_"))]).item()
    assert label >= 5 and f" has label {label}," in message


def test_repeated_augmentation_in_the_stream(shards):
    root, info = shards
    dm = ImageDataModule(shard_cfg(root, info, num_workers=0, batch_size=60, repeated_aug=3), IMG, 0,
                         with_meta=True)
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.steps_per_epoch(1) == 1437 // 60  # epoch length: the dataset size
    keys = [k for b in batches for k in b[2]["key"]]
    counts = Counter(keys)
    assert max(counts.values()) == 3 and sum(c < 3 for c in counts.values()) <= 24  # cut off at the quota: the 24-item buffer
    assert len(counts) >= len(keys) // 3
    positions = {}
    for i, k in enumerate(keys):
        positions.setdefault(k, []).append(i)
    spreads = [p[-1] - p[0] for p in positions.values() if len(p) == 3]
    # emitted back to back every image's copies would span 2 positions; the 24-item buffer spreads them
    back_to_back = sum(s == 2 for s in spreads) / len(spreads)
    assert back_to_back < 0.1 and sorted(spreads)[len(spreads) // 2] >= 8, (back_to_back, sorted(spreads))
    x = torch.cat([b[0] for b in batches])
    # independent augmentations of one decode (one crop and flip in a few hundred may come out the same)
    alike = [torch.equal(x[p[0]], x[p[1]]) for p in positions.values() if len(p) == 3]
    assert sum(alike) / len(alike) < 0.1, sum(alike)


def test_assign_covers_every_sample_once():
    for n_items in (1, 3, 5, 8, 64):
        for n_slots in (1, 2, 4, 7, 10, 320):
            kept = Counter()
            for slot in range(n_slots):
                for item, k, j in assign(n_items, slot, n_slots):
                    kept.update((item, s) for s in range(30) if s % k == j)
            assert kept == Counter((i, s) for i in range(n_items) for s in range(30))


# -- imagefolder and repeated augmentation on the map-style sources --------------------------------


def test_imagefolder_source(tree):
    cfg = data_cfg(source="imagefolder", root=str(tree), batch_size=4, interpolation="bicubic", hflip=0.5,
                   auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, scale=[0.08, 1.0], crop_pct=0.875)
    dm = ImageDataModule(cfg, img_size=IMG, seed=0, with_meta=True)
    info = dm.describe()
    assert info["num_classes"] == 3 and info["train"]["samples"] == 18 and info["val"]["samples"] == 6
    assert dm.class_names == ["ant", "bee", "cat"]
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.steps_per_epoch(1) == 4
    x, y, _ = batches[0]
    assert x.shape == (4, 3, IMG, IMG) and x.dtype == torch.float32 and y.dtype == torch.int64
    val_keys = [k for _, _, m in dm.val_dataloader() for k in m["key"]]
    assert sorted(val_keys) == sorted(f"{c}/{c}{i}.jpg" for c in ("ant", "bee", "cat") for i in range(2))
    dm.check_classes(3)
    dm.check_classes(1000)  # a model with more outputs than the data's classes trains on them
    with pytest.raises(DataError, match=r"^the imagefolder data has 3 classes, more than model.num_classes=2: set "
                                        r"model.num_classes=3$"):
        dm.check_classes(2)
    dm.check_batches(5)  # 18 images: 4 a device (the sampler pads), one batch of 4
    with pytest.raises(DataError, match=r"^data.batch_size=4 leaves no whole training batch: each of 6 device\(s\) "
                                        r"gets 3 training images an epoch; use a batch size of at most 3$"):
        dm.check_batches(6)


def test_imagefolder_val_labels_are_the_train_trees_class_indices(tmp_path):
    """A val tree without one of the train classes (bee): ImageFolder alone numbers cat 1 there, 2 in training."""
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.full((36, 40, 3), 128, dtype=np.uint8)).save(tmp_path / split / c / f"{c}.jpg")
    dm = ImageDataModule(data_cfg(source="imagefolder", root=str(tmp_path), batch_size=1), IMG, 0, with_meta=True)
    labels = {m["key"][0].split("/")[0]: int(y) for _, y, m in dm.val_dataloader()}
    assert labels == {"ant": 0, "cat": 2} and dm.class_names == ["ant", "bee", "cat"]
    (tmp_path / "val" / "dog").mkdir()
    Image.fromarray(np.full((36, 40, 3), 128, dtype=np.uint8)).save(tmp_path / "val" / "dog" / "dog.jpg")
    with pytest.raises(DataError, match=r"imagefolder val directory .*/val: class folder 'dog' is not one of the "
                                        r"train directory's classes$"):
        ImageDataModule(data_cfg(source="imagefolder", root=str(tmp_path)), IMG, 0).check()


def test_an_unreadable_imagefolder_image_is_skipped_counted_and_stood_in_for(tmp_path, caplog):
    """A truncated JPEG, a file that is no image and a PPM whose header PIL reads as a ValueError, in a tree of 6
    training images: the training loader gives the next image in their place (a traceback from a DataLoader worker,
    mid-run, before), each counted once; validation leaves its unreadable image out instead (it stood in the next
    one, counting it twice). Hidden folders and files are no classes and no images."""
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((36, 40, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / c / f"{c}{i}.jpg")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()  # a class, shifting every label, or an empty class
        (tmp_path / split / "ant" / "._ant0.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble
        (tmp_path / split / "bee" / ".cache").mkdir()  # below a class folder too
        Image.new("RGB", (8, 8)).save(tmp_path / split / "bee" / ".cache" / "bee0-copy.jpg")
    good = (tmp_path / "train" / "ant" / "ant1.jpg").read_bytes()
    (tmp_path / "train" / "ant" / "ant1.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "train" / "bee" / "bee2.jpg").write_text("not an image")
    (tmp_path / "train" / "bee" / "bee3.ppm").write_bytes(b"P6\n4x 4\n255\n" + bytes(48))  # PIL: ValueError
    (tmp_path / "val" / "bee" / "bee1.jpg").write_text("not an image")
    cfg = data_cfg(source="imagefolder", root=str(tmp_path), batch_size=1, hflip=0.0, scale=[1.0, 1.0],
                   ratio=[1.0, 1.0], interpolation="bilinear")
    for workers in (0, 2):
        dm = ImageDataModule(OmegaConf.merge(cfg, {"num_workers": workers}), IMG, 0, with_meta=True)
        with caplog.at_level("WARNING", logger="tome_train.data.common"):
            keys = Counter(k for _, _, m in dm.train_dataloader() for k in m["key"])
        assert dm.class_names == ["ant", "bee"]
        # ant1 -> ant2; bee2 and bee3 -> ant0, the tree's first, after the last
        assert keys == Counter({"ant/ant0.jpg": 3, "ant/ant2.jpg": 2, "bee/bee0.jpg": 1, "bee/bee1.jpg": 1})
        assert dm.num_corrupt == 3
        val = [k for batch in dm.val_dataloader() if batch is not None for k in batch[2]["key"]]
        assert sorted(val) == ["ant/ant0.jpg", "ant/ant1.jpg", "ant/ant2.jpg", "bee/bee0.jpg", "bee/bee2.jpg"]
        assert dm.num_corrupt == 4
    assert any("skipped unreadable image" in r.getMessage() and r.getMessage().endswith("3 skipped so far")
               for r in caplog.records)
    for path in (tmp_path / "train").rglob("*.jpg"):
        path.write_text("not an image")
    dm = ImageDataModule(OmegaConf.merge(cfg, {"num_workers": 2}), IMG, 0)
    assert str(loader_error(dm.train_dataloader())).startswith("imagefolder train: 50 unreadable images in a row from ")


def test_repeated_augmentation_sampler(tree):
    from tome_train.data.common import TrainSampler

    cfg = data_cfg(source="imagefolder", root=str(tree), batch_size=2, repeated_aug=3)
    dm = ImageDataModule(cfg, img_size=IMG, seed=0)
    dataset = dm._dataset("train")
    samplers = [TrainSampler(dataset, 2, rank, seed=0, repeats=3) for rank in range(2)]
    for s in samplers:
        s.set_epoch(0)
    per_rank = [list(s) for s in samplers]
    assert [len(p) for p in per_rank] == [9, 9]  # the dataset size, split over ranks
    counts = Counter(per_rank[0] + per_rank[1])
    assert set(counts.values()) <= {1, 2, 3} and sum(counts.values()) == 18 and len(counts) == 6
    # consecutive copies go to different ranks, as in DeiT's RASampler
    assert per_rank[0][0] == per_rank[1][0]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]
    assert dm.steps_per_epoch(2) == 9 // 2 and len(dm.train_dataloader()) == 18 // 2


class _RngDraws(torch.utils.data.Dataset):
    """What an augmentation draws in a DataLoader worker: a number from each RNG timm's transforms use."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        import random

        return torch.rand(()).item(), random.random(), float(np.random.rand())


def test_every_worker_of_every_rank_draws_its_own_augmentations():
    """torch seeds worker k of every rank alike from one global seed, and numpy not at all: without the rank mixed in
    by the loader's worker_init_fn, every rank drew the same random crops (and numpy the same in every worker)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    draws = []
    for rank in (0, 1):
        dm = ImageDataModule(data_cfg(num_workers=2), IMG, 0)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0)
        init = dm.train_dataloader().worker_init_fn
        with torch.random.fork_rng():
            torch.manual_seed(0)  # seed_everything: the same on every rank
            draws += list(DataLoader(_RngDraws(), batch_size=None, num_workers=2, worker_init_fn=init))
    for rng in range(3):  # torch, python, numpy: 2 ranks x 2 workers x 2 draws, no two alike
        assert len({d[rng] for d in draws}) == 8


def test_randaugment_posterize_zero_bits_survives_pillow():
    from timm.data.auto_augment import RandAugment

    from tome_train.data.common import train_transform

    tf = train_transform(data_cfg(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic"), IMG)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # keeps 4 - 4 = 0 bits
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert np.asarray(out).max() == 0  # black, as with Pillow < 13, instead of a ValueError


# -- bad input -------------------------------------------------------------------------------------


def test_missing_data_raises_one_line_data_error(tmp_path, shards):
    root, info = shards
    cases = [
        (data_cfg(source="imagefolder", root=str(tmp_path / "nope")), str(tmp_path / "nope")),
        (shard_cfg(tmp_path / "nope", info), str(tmp_path / "nope")),
        (data_cfg(source="webdataset", root=str(root)), "data.train_shards is required"),
        (shard_cfg(root, info, train_shards="imagenet1k-train-{0000..0009}.tar"), "imagenet1k-train-0008.tar"),
    ]
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    cases.append((data_cfg(source="imagefolder", root=str(tmp_path / "half")), str(tmp_path / "half" / "val")))
    for cfg, named in cases:
        with pytest.raises(DataError) as err:
            ImageDataModule(cfg, IMG, 0).check()
        assert named in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="data.root is required"):
        ImageDataModule(data_cfg(source="webdataset"), IMG, 0).describe()
    with pytest.raises(DataError) as err:
        ImageDataModule(shard_cfg(root, info, auto_augment="rand-x9"), IMG, 0).check()
    assert str(err.value).startswith("data.auto_augment='rand-x9' is not allowed: Unknown RandAugment config section")
    ImageDataModule(shard_cfg(root, info, auto_augment="rand-m9-mstd0.5-inc1"), IMG, 0).check()
    assert issubclass(DataError, ValueError)


def test_digit_shards_hold_the_digits_sources_split(tmp_path, capsys):
    """``--digits`` with no size or split given: the default recipe's image size and validation split (the digits
    source's 1,437 / 360), 180 and 90 per shard."""
    assert shards_main(["--digits", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "data.train_samples=1437 data.val_samples=360" in printed and "imagenet1k-train-{0000..0007}.tar" in printed
    info = {"train": {"pattern": "imagenet1k-train-{0000..0007}.tar", "samples": 1437},
            "val": {"pattern": "imagenet1k-validation-{00..03}.tar", "samples": 360}}
    shards = ImageDataModule(shard_cfg(tmp_path, info, batch_size=120), IMG, 0, with_meta=True)
    images = next(iter(shards.val_dataloader()))[0]
    assert images.shape[-2:] == (load_config().model.img_size,) * 2
    keys = {key for _, _, meta in shards.val_dataloader() for key in meta["key"]}
    assert keys == {f"digits_{i:04d}" for i in digits_split(data_cfg().val_fraction)[1]}


def test_shard_writer_cli(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert shards_main(["--imagefolder", str(tree), "--out", str(out), "--train-per-shard", "5",
                        "--val-per-shard", "4"]) == 0
    printed = capsys.readouterr().out
    assert "imagenet1k-train-{0000..0003}.tar" in printed and "data.val_samples=6" in printed
    assert sorted(os.listdir(out))[-1] == "imagenet1k-validation-01.tar"
    info = {"train": {"pattern": "imagenet1k-train-{0000..0003}.tar", "samples": 18},
            "val": {"pattern": "imagenet1k-validation-{00..01}.tar", "samples": 6}}
    dm = ImageDataModule(shard_cfg(out, info, batch_size=3), IMG, 0, with_meta=True)
    labels = {k: int(y) for _, ys, m in dm.val_dataloader() for k, y in zip(m["key"], ys)}
    assert labels == {f"{c}{i}": n for n, c in enumerate(("ant", "bee", "cat")) for i in range(2)}

    assert shards_main(["--imagefolder", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "missing") in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        shards_main(["--digits", "--out", str(tmp_path / "digits"), "--img-size", "0"])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith(
        "error: argument --img-size: '0' is not allowed: use an integer >= 1")
    assert not (tmp_path / "digits").exists()
    with pytest.raises(SystemExit) as exit_:
        shards_main(["--out", str(out)])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_digit_shards_are_upsampled_with_the_recipes_interpolation(tmp_path, monkeypatch):
    """The writer took the recipe's image size and split but upsampled with a default of its own (bilinear)."""
    import tome_train.config
    from tome_train.data.digits import digits_images

    recipe = load_config(overrides=["data.interpolation=nearest"])
    monkeypatch.setattr(tome_train.config, "load_config", lambda: recipe)
    write_digits_shards(str(tmp_path), img_size=16, val_per_shard=360)
    with tarfile.open(tmp_path / "imagenet1k-validation-00.tar") as tar:
        jpg = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg"))
    written = np.asarray(Image.open(io.BytesIO(jpg)).convert("L"), dtype=np.float32)
    first = digits_split(recipe.data.val_fraction)[1][:1]
    error = {mode: np.abs(written - digits_images(first, 16, mode)[0, 0].numpy()).mean()
             for mode in ("nearest", "bilinear")}
    assert error["nearest"] < 3 < error["bilinear"], error  # JPEG's loss, against the other interpolation's


def test_shard_writer_lists_what_the_imagefolder_source_reads(tmp_path):
    """The writer had a listing of its own beside the imagefolder source's: the same images, hidden files and folders
    and files that are no image left out, and val labelled by train's classes (a class without a val folder)."""
    from tome_train.data.imagefolder import Folder
    from tome_train.data.shards import list_tree, write_imagefolder_shards

    tree = tmp_path / "tree"
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for c in classes:
            (tree / split / c / "deeper").mkdir(parents=True)
            for name in (f"{c}.jpg", f"{c}.JPEG", f"deeper/{c}.png", f".{c}.jpg", f"{c}.txt", f"{c}.jpg.bak"):
                Image.new("RGB", (8, 8)).save(tree / split / c / name, format="PNG")
            (tree / split / c / ".cache").mkdir()
            Image.new("RGB", (8, 8)).save(tree / split / c / ".cache" / f"{c}.jpg")
        (tree / split / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (8, 8)).save(tree / split / ".ipynb_checkpoints" / "x.jpg")
    train, classes = list_tree(str(tree), "train")
    val, _ = list_tree(str(tree), "val", classes)
    source = ImageDataModule(data_cfg(source="imagefolder", root=str(tree)), IMG, 0)
    assert train == source._dataset("train").samples and val == source._dataset("val").samples
    assert classes == ["ant", "bee", "cat"] and [label for _, label in val] == [0, 0, 0, 2, 2, 2]
    assert {os.path.relpath(path, tree / "val") for path, _ in val} == {
        f"{c}/{name}" for c in ("ant", "cat") for name in (f"{c}.jpg", f"{c}.JPEG", f"deeper/{c}.png")}
    written = write_imagefolder_shards(str(tree), str(tmp_path / "out"))
    assert (written["train"]["samples"], written["val"]["samples"], written["classes"]) == (9, 6, 3)
    (tree / "val" / "dog").mkdir()
    with pytest.raises(DataError, match="class folder 'dog' is not one of the train directory's classes"):
        write_imagefolder_shards(str(tree), str(tmp_path / "out"))
    assert len(Folder(str(tree), "train", None).samples) == 9


def test_shard_writer_keeps_files_of_one_name_and_skips_what_it_cannot_read(tmp_path, capfd):
    """Keys were the file names' stems: a.b.jpg and a_b.jpg, img.jpg and img.png became one key twice and the reader
    lost the second of each; a PNG PIL could not read ended the writer with a traceback or a line naming no file,
    leaving a half-written shard; a hidden folder became a class."""
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
        for hidden in (tmp_path / "tree" / split / ".cache", tmp_path / "tree" / split / "ant" / ".cache"):
            hidden.mkdir()
            Image.new("RGB", (8, 8)).save(hidden / "x.jpg")
        for name in ("a.b.jpg", "a_b.jpg", "img.jpg", "img.png"):
            Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "tree" / split / "ant" / name)
        Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "tree" / split / "bee" / "img.jpg")
    bad = tmp_path / "tree" / "train" / "bee" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    out = tmp_path / "out"
    assert shards_main(["--imagefolder", str(tmp_path / "tree"), "--out", str(out), "--train-per-shard", "3",
                        "--val-per-shard", "5", "--workers", "2"]) == 0
    printed, err = capfd.readouterr()  # the line comes from the writing process
    assert err.startswith(f"skipped {bad}: not a readable image (") and err.count("\n") == 1
    assert "data.train_samples=5 data.val_samples=5" in printed  # the written ones: 6 train files, 1 unreadable
    info = {"train": {"pattern": "imagenet1k-train-{0000..0001}.tar", "samples": 5},
            "val": {"pattern": "imagenet1k-validation-{00..00}.tar", "samples": 5}}
    dm = ImageDataModule(shard_cfg(out, info, batch_size=5), IMG, 0, with_meta=True)
    labels = {k: int(y) for _, ys, m in dm.val_dataloader() for k, y in zip(m["key"], ys)}
    assert labels == {"a_b": 0, "a_b_2": 0, "img": 0, "img_2": 0, "img_3": 1} and dm.num_corrupt == 0


def _jpegs(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / name)


def test_imagefolder_follows_symlinked_folders_but_not_a_loop(tmp_path, caplog):
    """A folder linking to a folder it is in was followed until the OS refused, 40 links deep: each image listed 40
    times in its class, and with two such links 2**40 times (the listing never ended)."""
    from tome_train.data.imagefolder import Folder

    _jpegs(tmp_path / "tree" / "train" / "ant", "a0.jpg", "a1.jpg")
    _jpegs(tmp_path / "elsewhere" / "bee", "b0.jpg")
    (tmp_path / "tree" / "train" / "bee").symlink_to(tmp_path / "elsewhere" / "bee")  # a symlinked class: followed
    train = tmp_path / "tree" / "train"
    listed = [(str(train / "ant" / "a0.jpg"), 0), (str(train / "ant" / "a1.jpg"), 0), (str(train / "bee" / "b0.jpg"), 1)]
    (train / "ant" / "up").symlink_to("..")  # the split folder
    assert Folder(str(tmp_path / "tree"), "train", None).samples == listed
    assert f"not following {train / 'ant' / 'up'}: it leads back to {train}, a folder it is in" in caplog.text
    (train / "ant" / "up").unlink()
    (tmp_path / "elsewhere" / "bee" / "root").symlink_to(tmp_path / "tree")  # above the split folder, behind a link
    assert Folder(str(tmp_path / "tree"), "train", None).samples == listed


def test_shard_writer_checks_everything_before_it_writes_a_shard(tree, tmp_path, capsys):
    """A bad --val-per-shard or a val tree without images was found after the train shards were written."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        shards_main(["--imagefolder", str(tree), "--out", str(out), "--val-per-shard", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: argument --val-per-shard: '0' is not allowed: use an integer >= 1 "
        "(see python -m tome_train.data.shards --help)\n")
    assert not out.exists()
    with pytest.raises(DataError, match="^val samples per shard must be positive, not 0$"):
        write_digits_shards(str(out), img_size=8, val_per_shard=0)
    assert not out.exists()
    _jpegs(tmp_path / "novals" / "train" / "ant", "a.jpg")
    (tmp_path / "novals" / "val" / "ant").mkdir(parents=True)
    (tmp_path / "novals" / "val" / "ant" / "notes.txt").write_text("no image")
    assert shards_main(["--imagefolder", str(tmp_path / "novals"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: imagefolder val directory {tmp_path / 'novals' / 'val'} holds no images\n"
    assert not out.exists()
    out.write_text("a file")
    assert shards_main(["--imagefolder", str(tree), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: shard output directory {out} is not a directory\n"


def test_shard_writer_leaves_no_half_written_shard(tree, tmp_path, capfd):
    """Shards were written under their own names: an interrupt (Ctrl-C, a full disk) left a half-written one that
    read as whole, and a split of no readable image gave empty shards and data.val_samples=0."""
    from tome_train.data.shards import write_split

    out = tmp_path / "out"
    assert shards_main(["--imagefolder", str(tree), "--out", str(out), "--train-per-shard", "9"]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert sorted(before) == ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar", "imagenet1k-validation-00.tar"]

    def sample(item):
        return {"__key__": f"k{item}", "jpg": b"\xff\xd8" + bytes(8), "cls": 0, "json": {}}

    def interrupted(item):
        if item == 12:
            raise KeyboardInterrupt
        return sample(item)

    with pytest.raises(KeyboardInterrupt):
        write_split(str(out), "train", list(range(18)), interrupted, per_shard=6)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # shard 0 and 1 written, 2 not

    unreadable = tmp_path / "unreadable"
    _jpegs(unreadable / "train" / "ant", "a.jpg")
    (unreadable / "val" / "ant").mkdir(parents=True)
    (unreadable / "val" / "ant" / "a.png").write_bytes(b"not a png")
    capfd.readouterr()
    assert shards_main(["--imagefolder", str(unreadable), "--out", str(out)]) == 2
    assert capfd.readouterr().err.splitlines()[-1] == (
        "error: none of the 1 val samples could be written (not one readable image): no shards written")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before

    blocked = tmp_path / "blocked"  # a folder of shard 1's name: found before a shard is written
    (blocked / "imagenet1k-train-0001.tar").mkdir(parents=True)
    with pytest.raises(DataError, match=r"imagenet1k-train-0001.tar is a directory, where a shard is to be written"):
        write_split(str(blocked), "train", list(range(18)), sample, per_shard=6)
    assert os.listdir(blocked) == ["imagenet1k-train-0001.tar"]


class _Pid(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> int:
        return os.getpid()


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (an ended child not yet reaped is a zombie, state Z)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_loader_worker_ends_on_sigterm_from_its_main_process_only():
    """Workers ignored every SIGTERM (SLURM's, to every process of a job, must not end them), the main process's
    too: a DataError raised in a worker left ``python train.py`` waiting forever at exit, where Python ends the
    workers of a loader an error's traceback kept alive with SIGTERM and waits for them."""
    import signal
    import subprocess
    import time
    from functools import partial

    from tome_train.data.common import init_worker

    loader = torch.utils.data.DataLoader(_Pid(), batch_size=None, num_workers=1,
                                         worker_init_fn=partial(init_worker, rank=0))
    batches = iter(loader)
    worker = next(batches)
    subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker}, signal.SIGTERM)"],
                   check=True)  # from another process, as SLURM sends it
    time.sleep(0.5)
    assert _running(worker) and next(batches) == worker
    os.kill(worker, signal.SIGTERM)  # from the main process, as Python's exit and torch's loader end a worker
    deadline = time.monotonic() + 3
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker)
    del batches


@pytest.mark.parametrize("args, said", [(["--images", "8"], "argument --images: '8' is not allowed: use an integer >= 10"),
                                        (["--repeats", "0"], "argument --repeats: '0' is not allowed: use an integer >= 1"),
                                        (["--measure", "x"], "argument --measure: 'x' is not allowed")])
def test_data_benchmark_refuses_what_it_cannot_run_in_one_line(args, said, tmp_path, capsys):
    from tome_train.data.bench import main as data_bench_main

    with pytest.raises(SystemExit) as stop:
        data_bench_main(["--dir", str(tmp_path / "scratch"), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {said}") and err.count("\n") == 1
    assert not (tmp_path / "scratch").exists()


def test_data_benchmark_refuses_a_scratch_dir_it_cannot_use_in_one_line(tmp_path, capsys):
    from tome_train.data.bench import main as data_bench_main

    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    blocked = a_file / "scratch"  # its parent is a file: cannot be made
    for scratch, said in ((a_file, "not a directory"), (blocked, "cannot make it")):
        with pytest.raises(SystemExit) as stop:
            data_bench_main(["--dir", str(scratch)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: --dir {scratch}: {said}") and err.count("\n") == 1
    assert a_file.read_text() == "kept"


# -- resuming mid-epoch ------------------------------------------------------------------------------


@pytest.mark.parametrize("source, workers, repeats", [("digits", 0, 1), ("digits", 2, 3), ("webdataset", 2, 1),
                                                      ("webdataset", 2, 3)])
def test_a_run_resumed_mid_epoch_trains_on_the_batches_it_had_not(tmp_path, source, workers, repeats):
    """Stopped after step 19 of 2 epochs of 14 batches (12 with the sampler's repeated augmentation) and resumed from its step-16
    checkpoint, a run trains on exactly the batches the unbroken run trained from step 16 on. It used to restart the
    epoch's data: the epoch's permutation is seeded by the epoch, so it trained on the epoch's first batches again
    and never on its last ones."""
    if source == "webdataset":
        cfg = shard_cfg(tmp_path, write_digits_shards(str(tmp_path), img_size=8), num_workers=workers, batch_size=100,
                        repeated_aug=repeats)
    else:
        cfg = data_cfg(num_workers=workers, batch_size=100, repeated_aug=repeats)

    def fit(run_dir, **kwargs):
        every_4_steps = ModelCheckpoint(dirpath=tmp_path / run_dir, every_n_train_steps=4, save_top_k=-1)
        return fit_linear(ImageDataModule(cfg, 8, seed=0, with_meta=True), [every_4_steps], max_epochs=2, **kwargs)

    unbroken = fit("unbroken")
    epoch_length = len(unbroken) // 2
    assert epoch_length == (12 if repeats > 1 and source == "digits" else 14)  # the stream's epoch: train_samples
    assert fit("stopped", max_steps=19) == unbroken[:19]
    checkpoint = tmp_path / "stopped" / "epoch=1-step=16.ckpt"
    assert torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches_done": 16 - epoch_length}]
    resumed = fit("stopped", ckpt_path=str(checkpoint))
    # the sampler's indices run on from where they stopped; each shard worker's batches run on, the workers' turns
    # from the one whose batch came next
    assert resumed == unbroken[16:]
