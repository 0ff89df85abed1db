"""Pieces every source shares: the error type, rank/worker lookup, samplers, seeding, transforms."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
from typing import Any, Callable, Optional

import torch.distributed as dist
from lightning_fabric.utilities.seed import pl_worker_init_function
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


def as_config(data_cfg: Any) -> DictConfig:
    """Accept a DictConfig, a DataConfig dataclass or a plain dict."""
    if isinstance(data_cfg, DictConfig):
        return data_cfg
    if dataclasses.is_dataclass(data_cfg):
        return OmegaConf.structured(data_cfg)
    return OmegaConf.create(dict(data_cfg))


def dist_info(trainer: Any = None) -> tuple[int, int]:
    """(world_size, global_rank): from the Lightning trainer, else torch.distributed, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts; the same parts give the same seed in every process."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def init_worker(worker_id: int, rank: int) -> None:
    """DataLoader ``worker_init_fn``. Lightning's worker seeding, set here as Lightning adds it only in a Trainer after
    ``seed_everything(workers=True)``: from one global seed torch seeds worker k of every rank alike (and numpy not at
    all), so every rank drew the same random crops; this mixes the rank into torch's, python's and numpy's seeds.

    And SIGTERM ignored unless the main process sends it (:func:`_end_only_on_sigterm_from_parent`), and SLURM's
    time-limit warning (SIGUSR1, sent to every process of the job) always: the main process acts on it, and a worker
    would otherwise run the handler it inherited (requeue the job, or die by the signal's default action).
    """
    pl_worker_init_function(worker_id, rank=rank)
    _end_only_on_sigterm_from_parent()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _end_only_on_sigterm_from_parent() -> None:
    """In a DataLoader worker: a SIGTERM from the main process ends it, any other is ignored.

    SLURM (a preemption, ``scancel``) signals every process of a job, and a worker it killed failed the run at once
    (torch raises in the main process) before the ranks could stop together and save
    (:class:`~tome_train.requeue.StopOnSignal`). But the main process ends its workers with SIGTERM too: torch's
    loader where one does not stop, and Python at exit where an error left the loader's iterator alive (a DataError
    raised in a worker, its traceback holding the iterator): a worker ignoring every SIGTERM left that exit waiting
    for it forever. The signal is blocked and taken by a thread that asks who sent it.
    """
    parent = mp.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent_pid:
            pass
        os._exit(0)  # asked to: torch reports a worker that ends with an error or by a signal as a failure

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


class SkipCounter:
    """Counts the samples a source skipped as unreadable, across DataLoader worker processes (a shared integer),
    and logs each."""

    def __init__(self):
        self.value = mp.get_context().Value("l", 0)

    def add(self, what: str, where: str, exn: BaseException) -> None:
        with self.value.get_lock():
            self.value.value += 1
            count = self.value.value
        log.warning("skipped %s %s (%s: %s); %d skipped so far", what, where, type(exn).__name__, exn, count)

    def __int__(self) -> int:
        return int(self.value.value)


class TrainSampler(DistributedSampler):
    """The training sampler of the map-style sources: shuffled, split over ranks, reseeded per epoch.

    ``repeats > 1`` delegates to timm's RepeatAugSampler (DeiT's RASampler: every index repeated
    ``repeats`` times, consecutive copies on different ranks, the epoch as long as the dataset split
    over ranks). Otherwise it is DistributedSampler's shuffle, per-rank split and epoch seeding, which it
    inherits; Lightning, told ``use_distributed_sampler=False`` (cli.py), uses it as given.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, repeats: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.repeats = int(repeats)
        self._start = 0
        self.inner = None
        if self.repeats > 1:
            from timm.data.distributed_sampler import RepeatAugSampler

            self.inner = RepeatAugSampler(
                dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=self.repeats
            )

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.inner is not None:
            # RepeatAugSampler seeds its permutation with the epoch alone: mix in our seed
            self.inner.set_epoch(derive_seed(self.seed, epoch))

    def skip_batches(self, count: int, batch_size: int) -> None:
        """The next pass leaves out its first ``count`` batches of ``batch_size`` (the ones a resumed run trained
        before it stopped); its length stays the epoch's, as Lightning counts those batches as done."""
        self._start = count * batch_size

    def __iter__(self):
        indices = iter(self.inner) if self.inner is not None else super().__iter__()
        start, self._start = self._start, 0
        return itertools.islice(indices, start, None)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else super().__len__()


class ExactSampler(DistributedSampler):
    """Validation: rank r takes indices r, r + world, ...; every sample exactly once, no padding.

    Ranks may get one sample (and so one batch) more than others; see docs/data.md for why that is safe.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its sampler or streaming dataset the epoch just before each pass.

    ``epoch_fn`` returns the epoch (the trainer's current_epoch) or None, in which case the loader
    counts its own passes. Lightning calls ``set_epoch`` on samplers too, but after the first ``iter()``
    on a resumed run and never on iterable datasets; setting it here covers both.
    """

    def __init__(self, *args, epoch_fn: Optional[Callable[[], Optional[int]]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0

    def _start_pass(self) -> int:
        """Tell the sampler or dataset the epoch of the pass about to start; returns it."""
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        if epoch is None:
            epoch = self._passes
        self._passes += 1
        return self._set_epoch(epoch)

    def _set_epoch(self, epoch: int) -> int:
        for target in (self.dataset, self.sampler):
            set_epoch = getattr(target, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
        return epoch

    def __iter__(self):
        self._start_pass()
        return super().__iter__()


class TrainDataLoader(EpochDataLoader):
    """The training loader: an :class:`EpochDataLoader` that a run resumed mid-epoch continues where it stopped.

    It is Lightning's ``Stateful``: a checkpoint holds ``state_dict()``, the epoch and the batches this rank had
    trained of it (``progress_fn``, read from the trainer at the save), and Lightning gives it back to
    ``load_state_dict`` before the resumed run's first pass, which then leaves those batches out
    (``skip_batches`` of the sampler or the streaming dataset). Without it the resumed epoch started its data over:
    its permutation is seeded by the epoch, so it trained again on the batches it had trained before the stop, and
    never on as many of its last ones.
    """

    def __init__(self, *args, progress_fn: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.progress_fn = progress_fn
        self._resume: Optional[dict[str, int]] = None

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self.progress_fn()
        return {"epoch": int(epoch), "batches_done": int(batches_done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def _start_pass(self) -> int:
        epoch = super()._start_pass()
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] > epoch:  # saved at an epoch's last batch: the next epoch's start
            epoch = self._set_epoch(resume["epoch"])
        if resume is not None and resume["epoch"] == epoch and resume["batches_done"] > 0:
            target = self.sampler if hasattr(self.sampler, "skip_batches") else self.dataset
            target.skip_batches(resume["batches_done"], self.batch_size)
        return epoch


def _pair(value) -> tuple[float, float]:
    return tuple(float(v) for v in value)


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits kept meaning what it meant before Pillow 13: a black image."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def fix_posterize(transform):
    """Make timm's RandAugment survive Pillow >= 13, in place; returns the transform.

    ``PosterizeIncreasing`` keeps ``4 - int(4 * m / 10)`` bits: 0 when the sampled magnitude reaches 10
    (DeiT's m9 with mstd 0.5 does, for ~2% of its draws). Pillow 13 raises ValueError for 0 bits, which
    would kill a DataLoader worker a few minutes into an ImageNet run. Older Pillow returned black.
    """
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def train_transform(cfg: DictConfig, img_size: int):
    """timm's training transform with the config's augmentation (PIL image -> normalized tensor)."""
    from timm.data import create_transform

    return fix_posterize(create_transform(
        img_size,
        is_training=True,
        scale=_pair(cfg.scale),
        ratio=_pair(cfg.ratio),
        hflip=float(cfg.hflip),
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        mean=_pair(cfg.mean),
        std=_pair(cfg.std),
        re_prob=float(cfg.re_prob),
        re_mode=cfg.re_mode,
        re_count=int(cfg.re_count),
    ))


def eval_transform(cfg: DictConfig, img_size: int):
    """timm's eval transform: resize the short side to img_size / crop_pct, center crop img_size."""
    from timm.data import create_transform

    return create_transform(
        img_size,
        is_training=False,
        interpolation=cfg.interpolation,
        mean=_pair(cfg.mean),
        std=_pair(cfg.std),
        crop_pct=float(cfg.crop_pct),
    )
