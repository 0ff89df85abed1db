"""ImageDataModule: one LightningDataModule over the digits, imagefolder and webdataset sources."""
from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from . import digits, imagefolder, locations, stream
from .common import (
    EpochDataLoader,
    ExactSampler,
    SkipCounter,
    TrainDataLoader,
    TrainSampler,
    as_config,
    dist_info,
    eval_transform,
    init_worker,
    train_transform,
)


class ImageDataModule(pl.LightningDataModule):
    """Batches of (images float32 [B, 3, S, S] normalized with data.mean/std, labels int64 [B]).

    ``data_cfg`` is the ``data`` section of a run config (``cfg.data``), ``img_size`` the model's input
    size and ``seed`` the run seed (shuffles and shard assignment derive from it). ``with_meta=True``
    adds a third batch element, ``{"key": [...], "url": [...], "worker": tensor}``, naming each sample
    (for tests and debugging).

    Per-device batch = ``data.batch_size``; the training loader drops the last partial batch, shuffles
    and splits over ranks; the validation loader does neither and sees every sample exactly once across
    ranks (no padding). World size and rank come from the attached trainer, else torch.distributed.
    """

    def __init__(self, data_cfg: Any, img_size: int, seed: int = 0, *, with_meta: bool = False):
        super().__init__()
        self.cfg = as_config(data_cfg)
        locations.check_source(self.cfg)
        self.img_size = int(img_size)
        self.seed = int(seed)
        self.with_meta = with_meta
        self._datasets: dict[str, Dataset] = {}
        self._urls: dict[str, list[str]] = {}
        self._skipped = SkipCounter()
        self._label_limit: Optional[int] = None  # the model's num_classes, once check_classes has seen it

    # -- facts ------------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        return self.cfg.source

    def check(self, num_classes: int | None = None, world_size: int | None = None) -> None:
        """Raise DataError (one line naming the missing path or pattern, the bad augmentation policy, or what does
        not fit) unless the data is there and readable, holds no more classes than a model's ``num_classes``
        outputs (:meth:`check_classes`) and gives each of ``world_size`` ranks a whole batch (:meth:`check_batches`)."""
        if self.source == "digits":
            digits.digits_split(float(self.cfg.val_fraction))
        elif self.source == "imagefolder":
            self._dataset("train")  # an empty or unreadable tree fails here, with its path
            self._dataset("val")
        else:
            self._shards("train")  # kept for the loaders: a shard list is checked once
            self._shards("val")
        if self.source != "digits" and self.cfg.auto_augment:
            self._check_auto_augment()
        if num_classes is not None:
            self.check_classes(num_classes)
        if world_size is not None:
            self.check_batches(world_size)

    def _check_auto_augment(self) -> None:
        """timm reads the policy string when it builds the training transform, in each worker: built once here, a
        bad one is one line, before the run starts."""
        try:
            train_transform(self.cfg, self.img_size)
        except (AssertionError, ValueError, KeyError) as e:  # timm's parser asserts
            raise locations.DataError(f"data.auto_augment={self.cfg.auto_augment!r} is not allowed: {e} (timm's "
                                      "policies, e.g. rand-m9-mstd0.5-inc1, augmix-m5, original)") from None

    def _shards(self, split: str) -> list[str]:
        if split not in self._urls:
            self._urls[split] = locations.webdataset_shards(self.cfg, split)
        return self._urls[split]

    @property
    def num_train_samples(self) -> int:
        if self.source == "webdataset":
            return int(self.cfg.train_samples)
        return len(self._dataset("train"))

    @property
    def num_val_samples(self) -> int:
        if self.source == "webdataset":
            return int(self.cfg.val_samples)
        return len(self._dataset("val"))

    @property
    def class_names(self) -> Optional[list[str]]:
        """Class names where the source knows them (shards carry only integer labels: None)."""
        if self.source == "webdataset":
            return None
        return list(self._dataset("train").classes)

    @property
    def num_classes(self) -> Optional[int]:
        names = self.class_names
        return len(names) if names is not None else None

    @property
    def num_corrupt(self) -> int:
        """Images (or tar members) the imagefolder and webdataset sources skipped as unreadable, over all workers."""
        return int(self._skipped)

    def _train_samples_per_rank(self, world_size: int) -> int:
        if self.source == "webdataset":
            return int(self.cfg.train_samples) // world_size
        n = self.num_train_samples
        if int(self.cfg.repeated_aug) > 1:
            from timm.data.distributed_sampler import RepeatAugSampler

            return len(RepeatAugSampler(range(n), num_replicas=world_size, rank=0,
                                        num_repeats=int(self.cfg.repeated_aug)))
        return math.ceil(n / world_size)  # DistributedSampler pads to equal lengths

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Training batches per rank per epoch on ``world_size`` ranks (the last partial batch dropped)."""
        return self._train_samples_per_rank(world_size) // int(self.cfg.batch_size)

    def check_classes(self, num_classes: int) -> None:
        """Raise DataError if the source knows more classes than the model's ``num_classes`` outputs (a label past
        them stops training at its first batch). Shards carry no class list: their streams check each label they
        read against ``num_classes`` instead."""
        self._label_limit = num_classes
        found = self.num_classes
        if found is not None and found > num_classes:
            raise locations.DataError(f"the {self.source} data has {found} classes, more than model.num_classes="
                                      f"{num_classes}: set model.num_classes={found}")

    def state_dict(self) -> dict[str, Any]:
        """What a run's checkpoints keep of its data (Lightning saves it under this class's name): the class names
        where the source knows them, which ``export`` gives the model's outputs (timm's ``label_names``)."""
        names = self.class_names
        return {"class_names": names} if names is not None else {}

    def check_batches(self, world_size: int) -> None:
        """Raise DataError unless each of ``world_size`` ranks gets at least one whole training batch an epoch."""
        per_rank = self._train_samples_per_rank(world_size)
        if per_rank < int(self.cfg.batch_size):
            raise locations.DataError(
                f"data.batch_size={self.cfg.batch_size} leaves no whole training batch: each of {world_size} "
                f"device(s) gets {per_rank} training images an epoch; use a batch size of at most {per_rank}")

    def describe(self) -> dict[str, Any]:
        """What the data source found (for the dry run); raises DataError where data is missing."""
        self.check()
        info: dict[str, Any] = {
            "source": self.source,
            "root": self.cfg.root if self.source != "digits" else "sklearn.datasets.load_digits",
            "img_size": self.img_size,
            "batch_size": int(self.cfg.batch_size),
            "num_workers": int(self.cfg.num_workers),
            "repeated_aug": int(self.cfg.repeated_aug),
            # shards carry no class list: their labels are checked against model.num_classes as they are read
            "num_classes": self.num_classes if self.num_classes is not None else "not listed (shards)",
            "steps_per_epoch_1_device": self.steps_per_epoch(1),
        }
        for split in ("train", "val"):
            samples = self.num_train_samples if split == "train" else self.num_val_samples
            if self.source == "webdataset":
                urls = self._shards(split)
                info[split] = {"shards": len(urls), "samples": samples, "first_shard": urls[0],
                               "pattern": self.cfg.train_shards if split == "train" else self.cfg.val_shards}
            else:
                info[split] = {"samples": samples}
        return info

    # -- datasets ---------------------------------------------------------------------------------

    def _dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            train = split == "train"
            if self.source == "digits":
                ds = digits.DigitsDataset(self.cfg, self.img_size, train=train, with_meta=self.with_meta)
            elif self.source == "imagefolder":
                locations.check_locations(self.cfg)
                tf = train_transform(self.cfg, self.img_size) if train else eval_transform(self.cfg, self.img_size)
                classes = None if train else self._dataset("train").classes  # labels by the train tree's classes
                ds = imagefolder.Folder(self.cfg.root, split, tf, with_meta=self.with_meta, classes=classes,
                                        skipped=self._skipped, stand_in=train)
            else:
                raise AssertionError("streams are built per loader")
            self._datasets[split] = ds
        return self._datasets[split]

    def _stream(self, split: str, world_size: int, rank: int) -> stream.ShardStream:
        train = split == "train"
        return stream.ShardStream(
            self._shards(split),
            train_transform(self.cfg, self.img_size) if train else eval_transform(self.cfg, self.img_size),
            train=train,
            batch_size=int(self.cfg.batch_size),
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            samples_per_epoch=int(self.cfg.train_samples) if train else None,
            repeats=int(self.cfg.repeated_aug) if train else 1,
            shuffle_buffer=self.cfg.shuffle_buffer,
            with_meta=self.with_meta,
            skipped=self._skipped,
            num_classes=self._label_limit,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        self.check()

    # -- loaders ----------------------------------------------------------------------------------

    def _epoch(self) -> Optional[int]:
        """The epoch of the pass about to start, as Lightning gives it to ``set_epoch``: after a restore from an
        epoch-end checkpoint that is the next epoch, where ``current_epoch`` is still the one that ended (the pass is
        built before Lightning moves it on, and its workers would have drawn the ended epoch's order)."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else None

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches this rank has trained of it): what a checkpoint saved now has trained. At an epoch's last
        batch that is the next epoch, none of it: a restore builds the pass before Lightning moves the epoch on, and
        the ended epoch with all its batches done would be an empty pass, kept for the next epoch."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        epoch, done = int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return (epoch + 1, 0) if done >= trainer.num_training_batches else (epoch, done)

    def _loader(self, split: str) -> EpochDataLoader:
        world_size, rank = dist_info(getattr(self, "trainer", None))
        train = split == "train"
        workers = int(self.cfg.num_workers)
        loader_class = partial(TrainDataLoader, progress_fn=self._progress) if train else EpochDataLoader
        kwargs: dict[str, Any] = dict(
            batch_size=int(self.cfg.batch_size),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=partial(init_worker, rank=rank),
            epoch_fn=self._epoch,
        )
        if self.source == "webdataset":
            # whole batches come out of each worker; quotas make len(loader) exact for training
            dataset = self._stream(split, world_size, rank)
            # Lightning warns that an IterableDataset's __len__ may be off with several workers; the
            # training stream's length is exact by construction (per-worker quotas)
            warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")
            return loader_class(dataset, drop_last=False, **kwargs)
        dataset = self._dataset(split)
        if train:
            sampler = TrainSampler(dataset, world_size, rank, self.seed, int(self.cfg.repeated_aug))
        else:
            sampler = ExactSampler(dataset, world_size, rank)
        if self.source == "imagefolder" and not train:
            kwargs["collate_fn"] = imagefolder.collate_readable  # an unreadable image is left out, not stood in for
        return loader_class(dataset, sampler=sampler, drop_last=train, persistent_workers=workers > 0, **kwargs)

    def train_dataloader(self) -> TrainDataLoader:
        return self._loader("train")

    def val_dataloader(self) -> EpochDataLoader:
        return self._loader("val")
