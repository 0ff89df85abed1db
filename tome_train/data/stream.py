"""WebDataset shards (the public ImageNet layout) as a streaming source that is exact under DDP.

Each DataLoader worker of each rank is a *slot*; slot ``g = rank * num_workers + worker`` of
``S = world_size * num_workers`` slots.

* Shard assignment: with at least as many shards as slots, slot g reads shards g, g + S, ... (training
  first permutes the shard list with ``seed + epoch``, the same permutation on every rank, so the
  assignment changes each epoch and stays disjoint). With fewer shards than slots, the slots sharing
  shard i each keep every k-th sample of it (k = number of sharers), so slots still see disjoint samples.
* Training: a worker cycles through its shards (reshuffled each cycle) through a shuffle buffer seeded
  with ``(seed, epoch, rank, worker)``, spreads each sample's ``repeated_aug`` copies through a small second
  shuffle buffer, decodes each image once (for the first of its copies to come out), augments each copy
  independently, and stops after its quota of whole batches.
  Quotas add up to ``train_samples // (world_size * batch_size)`` batches on every rank: equal batch
  counts per rank, no DDP hang, and ``len(loader)`` is exact.
* Validation: no shuffle, no cycling, no padding; every sample is read by exactly one slot. Ranks may
  end with different batch counts, which is safe when metrics are reduced only at epoch end
  (docs/data.md).
* Corrupt images and unreadable tar members are skipped, counted in a shared counter and logged; a label
  outside ``num_classes`` stops the run (the config does not fit the data).
"""
from __future__ import annotations

import io
import itertools
import logging
import random
from collections import Counter
from typing import Callable, Iterator, Optional

import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .common import SkipCounter, derive_seed
from .locations import DataError

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def assign(n_items: int, slot: int, n_slots: int) -> list[tuple[int, int, int]]:
    """Items for one slot as (item, k, j): keep the samples of ``item`` whose index % k == j.

    Over all slots every sample of every item is kept exactly once.
    """
    if n_items >= n_slots:
        return [(i, 1, 0) for i in range(slot, n_items, n_slots)]
    item = slot % n_items
    sharers = len(range(item, n_slots, n_items))
    return [(item, sharers, slot // n_items)]


class ShardStream(IterableDataset):
    """Samples of a list of shards for one rank, split over that rank's DataLoader workers."""

    def __init__(
        self,
        urls: list[str],
        transform: Callable,
        *,
        train: bool,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int,
        samples_per_epoch: Optional[int] = None,
        repeats: int,
        shuffle_buffer: int,
        with_meta: bool = False,
        skipped: Optional[SkipCounter] = None,
        num_classes: Optional[int] = None,
    ):
        self.urls = list(urls)
        self.transform = transform
        self.train = train
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.repeats = max(1, int(repeats))
        self.shuffle_buffer = int(shuffle_buffer)
        self.with_meta = with_meta
        self.skipped = skipped if skipped is not None else SkipCounter()
        self.num_classes = num_classes
        self.epoch = 0
        self._skip = 0
        self.batches_per_rank = None
        self.samples_per_epoch = samples_per_epoch
        if train:
            if samples_per_epoch is None:
                raise ValueError("a training stream needs samples_per_epoch")
            self.batches_per_rank = int(samples_per_epoch) // (self.world_size * self.batch_size)
            if self.batches_per_rank < 1:
                raise DataError(
                    f"webdataset: {samples_per_epoch} training samples are fewer than one batch of "
                    f"{self.batch_size} per rank on {self.world_size} ranks"
                )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._skip = 0

    def skip_batches(self, count: int, batch_size: int) -> None:
        """The next training pass (of the epoch last set) leaves out its first ``count`` batches, the ones a resumed
        run trained before it stopped. They came round-robin from the DataLoader workers, so each worker passes over
        the copies of its share of them, the same ones in the same order, without decoding them: exactly, where those
        samples were readable (an unreadable one passed over counts as trained, so the pass resumes that much early).
        The workers' turns start at the one whose batch came next (:meth:`__iter__`), so the batches come in the
        unbroken pass's order, and a checkpoint of the resumed run holds the right count again."""
        if batch_size != self.batch_size:
            raise ValueError(f"batch size {batch_size} is not the stream's {self.batch_size}")
        self._skip = int(count)

    def __len__(self) -> int:
        # only the training stream has a known length: exactly batches_per_rank whole batches
        if self.batches_per_rank is None:
            raise TypeError("the validation stream has no length (webdataset shards carry no index)")
        return self.batches_per_rank * self.batch_size

    # -- the pieces -------------------------------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _tar_handler(self, exn: BaseException) -> bool:
        self.skipped.add("unreadable tar data", "", exn)
        return True

    def _read(self, url: str, k: int, j: int) -> Iterator[dict]:
        samples = wds.tarfile_samples([dict(url=url)], handler=self._tar_handler)
        for index, sample in enumerate(samples):
            if index % k == j:
                yield sample

    def _decode(self, sample: dict) -> Optional[tuple[Image.Image, int]]:
        try:
            data = next((sample[key] for key in IMAGE_KEYS if key in sample), None)
            if data is None:
                raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) in the sample")
            label = int(sample["cls"])
            with Image.open(io.BytesIO(data)) as img:
                image = img.convert("RGB")  # convert() loads: decoding errors surface here
        except Exception as exn:  # a bad sample must not end a week-long run
            self.skipped.add("corrupt sample", f"{sample.get('__key__')} in {sample.get('__url__')}", exn)
            return None
        # a label past the model's outputs is a config that does not fit the data (on a GPU, a device-side assert)
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise DataError(f"webdataset: sample {sample.get('__key__')} in {sample.get('__url__')} has label {label}, "
                            f"not one of model.num_classes={self.num_classes}'s 0..{self.num_classes - 1}")
        return image, label

    def _output(self, x, label: int, sample: dict, worker: int):
        if not self.with_meta:
            return x, label
        return x, label, {"key": sample["__key__"], "url": sample["__url__"], "worker": worker}

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self):
        worker, workers = self._worker()
        if self.train:
            # DataLoader worker w plays worker (w + skipped batches) % workers: the loader takes batches from its
            # workers in turn from worker 0 on every pass, so a resumed pass starts at the worker whose batch came next
            # and runs in the unbroken pass's order. Otherwise, after an odd count with two workers, worker 0's came
            # first, and the count a later checkpoint held was not the first batches of the order it skips: the next
            # resume trained a batch of worker 0 again and never one of worker 1
            worker = (worker + min(self._skip, self.batches_per_rank)) % workers
        slot, n_slots = self.rank * workers + worker, self.world_size * workers
        if self.train:
            yield from self._train(worker, workers, slot, n_slots)
        else:
            yield from self._val(worker, slot, n_slots)

    def _val(self, worker: int, slot: int, n_slots: int):
        for item, k, j in assign(len(self.urls), slot, n_slots):
            for sample in self._read(self.urls[item], k, j):
                decoded = self._decode(sample)
                if decoded is not None:
                    yield self._output(self.transform(decoded[0]), decoded[1], sample, worker)

    def _train(self, worker: int, workers: int, slot: int, n_slots: int):
        n = self.batches_per_rank
        skipped = len(range(worker, min(self._skip, n), workers)) * self.batch_size
        quota = (n // workers + (1 if worker < n % workers else 0)) * self.batch_size - skipped
        if quota <= 0:
            return
        images_needed = -(-(quota + skipped) // self.repeats)  # the worker's share of the whole epoch
        urls = list(self.urls)
        random.Random(derive_seed(self.seed, self.epoch, "shards")).shuffle(urls)  # same on every rank
        mine = [(urls[i], k, j) for i, k, j in assign(len(urls), slot, n_slots)]
        rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker))
        buffer = max(1, self.shuffle_buffer)
        reads: list[int] = []  # the samples of each pass over this worker's shards that has ended
        unreadable: Counter[int] = Counter()  # of each pass's samples, those found unreadable

        def no_readable_samples(pass_index: int) -> None:
            if pass_index < len(reads) and unreadable[pass_index] == reads[pass_index]:
                raise DataError(f"webdataset: no readable samples in {', '.join(u for u, _, _ in mine)}")

        def copies():
            # each pass over this worker's shards goes through its own shuffle buffer and drains it, so
            # a pass emits every sample once; passes repeat only when the quota outlasts the shards
            for pass_index in itertools.count():
                rng.shuffle(mine)
                one_pass = (s for url, k, j in mine for s in self._read(url, k, j))
                read = 0
                for sample in wds.shuffle(buffer, initial=max(1, buffer // 2), rng=rng)(one_pass):
                    read += 1
                    pending = _Copies(sample, pass_index, self.repeats)
                    for _ in range(self.repeats):
                        yield pending
                reads.append(read)
                no_readable_samples(pass_index)
                # shards of equal size give a slot at least half its quota in one pass: less says the epoch length
                # (data.train_samples) is more than the shards hold, and every epoch repeats its samples
                if pass_index == 0 and self.rank == 0 and worker == 0 and read < images_needed / 2:
                    log.warning(
                        "webdataset: the first DataLoader worker of rank 0 read all %d samples of its %d shard(s) "
                        "before half of the %d images its share of data.train_samples=%d needs; the epoch reads its "
                        "samples again: is data.train_samples more than the %d shards hold?",
                        read, len(mine), images_needed, self.samples_per_epoch, len(self.urls))

        # The copies are spread (the second buffer) before any is decoded, so that a resumed pass finds the very
        # copies the stopped run had trained on, and passes over them without decoding them.
        out = copies()
        if self.repeats > 1:
            out = wds.shuffle(self.repeats * 8, initial=self.repeats * 4, rng=rng)(out)
        for index, pending in enumerate(out):
            if index < skipped:
                pending.pass_over()
                continue
            sample = pending.sample
            if not pending.decoded and not pending.decode(self._decode):
                unreadable[pending.pass_index] += 1
                no_readable_samples(pending.pass_index)
            image_label = pending.take()
            if image_label is not None:
                yield self._output(self.transform(image_label[0]), image_label[1], sample, worker)
                quota -= 1
                if quota == 0:
                    return


class _Copies:
    """A training sample read from its shard and its copies still to come out of the stream (``repeated_aug``): the
    image is decoded for the first copy that is wanted, and let go after the last."""

    __slots__ = ("sample", "pass_index", "left", "decoded", "image_label")

    def __init__(self, sample: dict, pass_index: int, copies: int):
        self.sample, self.pass_index, self.left = sample, pass_index, copies
        self.decoded, self.image_label = False, None

    def decode(self, decode: Callable[[dict], Optional[tuple[Image.Image, int]]]) -> bool:
        """Decodes the sample; whether it is readable."""
        self.image_label, self.decoded = decode(self.sample), True
        return self.image_label is not None

    def take(self) -> Optional[tuple[Image.Image, int]]:
        """The decoded image and label for one copy (``None``: unreadable)."""
        image_label = self.image_label
        self.pass_over()
        return image_label

    def pass_over(self) -> None:
        """One copy goes by unused (a resumed run's, trained before it stopped)."""
        self.left -= 1
        if self.left == 0:
            self.sample, self.image_label = None, None
