"""The LightningModule: a timm ViT patched with ToMe, its loss, metrics and optimization.

The module holds the science (what is optimized and measured); the Trainer built in
:mod:`tome_train.cli` holds the engineering (devices, precision, checkpoints, logging).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelSummary, ThroughputMonitor
from pytorch_lightning.utilities.model_summary import get_human_readable_count
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .config import check_schedules_fit, eval_schedule, global_batch, peak_lr, schedule_of
from .data.common import derive_seed
from .data.locations import DataError
from .models import build_model
from .tome import ViTDims, apply_tome, set_r, tome_state, vit_flops


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def _accuracy(num_classes: int, k: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")


def seed_rank(seed: int, rank: int) -> None:
    """Seed this rank's generators (python's, numpy's, torch's) apart from every other rank's, as DeiT's and MAE's
    codes seed each rank with ``seed + rank``. A run seeds every rank alike, so that they build the same model; the
    training steps' draws then came out the same on every rank: one mixup lambda and cutmix box for the whole global
    batch and the same drop-path masks (numpy's and torch's generators in the training process), and the same digits
    crops where no DataLoader worker makes them. Rank 0 keeps its generators as they are, those of a one-process run.
    """
    if rank != 0:  # Lightning's seeding takes 32 bits, as numpy does
        pl.seed_everything(derive_seed(seed, "rank", rank) % 2**32, workers=True, verbose=False)


def stepping_batches(trainer: pl.Trainer) -> int:
    """``trainer.estimated_stepping_batches``: the run's optimizer steps, for the lr schedule. Lightning counts them by
    building the training loader and starting its pass, before it restores a checkpoint's loop state, and then keeps
    that loader, which never gets the state (Lightning issue #20550): a run resumed mid-epoch trained its epoch's
    first batches again instead of the ones it had not (:class:`~tome_train.data.common.TrainDataLoader`). Resuming,
    the loader is dropped here, so that the fit loop builds it again after the restore and gives it the state."""
    steps = trainer.estimated_stepping_batches
    # FSDP and DeepSpeed restore after this (ckpt_path is not yet set then)
    if trainer.ckpt_path is not None or trainer.strategy.restore_checkpoint_after_setup:
        trainer.fit_loop._combined_loader = None
    return int(steps)


class ToMeClassifier(pl.LightningModule):
    """Image classification with a ToMe-patched timm ViT.

    Training runs ``tome.r_train``; validation and ``trainer.predict`` (logits of images, or of a loader's
    ``(images, labels)`` batches) run ``tome.r_eval``, as export does. Called directly, the module runs the schedule
    last set (``r_train`` once built or loaded; :meth:`set_schedule` changes it).

    Args:
        config: the resolved run config (plain dict or DictConfig); saved in every checkpoint.
        pretrained: load ``model.checkpoint`` (fresh runs only; a resumed run has its weights).
    """

    def __init__(self, config: dict | DictConfig, pretrained: bool = False):
        super().__init__()
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg = OmegaConf.create(config)
        cfg = self.cfg

        model_cfg = cfg.model if pretrained else OmegaConf.merge(cfg.model, {"checkpoint": None})
        self.model = build_model(model_cfg)
        self.dims = ViTDims.from_timm(self.model)
        check_schedules_fit(cfg, self.dims)
        self.train_r = schedule_of(cfg.tome.r_train)
        self.eval_r = eval_schedule(cfg.tome)
        apply_tome(self.model, r=self.train_r, prop_attn=cfg.tome.prop_attn)

        mix = cfg.mixup
        self.mixup = None
        if mix.mixup_alpha > 0 or mix.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
                switch_prob=mix.switch_prob, mode=mix.mode, label_smoothing=mix.label_smoothing,
                num_classes=cfg.model.num_classes,
            )
            self.train_loss = SoftTargetCrossEntropy()
        elif mix.label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=mix.label_smoothing)
        else:
            self.train_loss = torch.nn.CrossEntropyLoss()

        self.ema = ModelEmaV3(self.model, decay=cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        if self.ema is not None:  # DDP refuses a parameter that wants a gradient and gets none: ema.update sets these
            self.ema.requires_grad_(False)
        n = cfg.model.num_classes
        accuracy = MetricCollection({"top1": _accuracy(n, 1), "top5": _accuracy(n, 5)})
        self.val_accuracy = accuracy.clone(prefix="val/")
        self.ema_accuracy = accuracy.clone(prefix="val/ema_") if self.ema is not None else None
        # a metric, not a per-step log: a rank whose batches were all unreadable logs it all the same (a per-step
        # value it never logged would leave it a collective short of the others at the epoch's sync)
        self.val_loss = MeanMetric()
        if self.ema is not None:
            # timm leaves its copy in eval mode; Lightning puts every module in eval mode for validation itself, and
            # the copy, never run in training, need not set off its warning about modules left in eval mode
            self.ema.train()
        self._ema_updated_at = 0  # the global step of the weights the EMA last took in
        self._unreadable_logged = 0
        self._said_short = False  # that validation read fewer images than the data holds

    # ---- ToMe schedule ---------------------------------------------------------------
    def set_schedule(self, r: Any) -> list[int]:
        """Per-layer merge counts of the raw (and EMA) model for ``r``."""
        schedule = set_r(self.model, r)
        if self.ema is not None:
            set_r(self.ema.module, r)
        return schedule

    def tokens_per_layer(self) -> list[int]:
        """Tokens entering each block at the current schedule, and after the last one."""
        schedule = tome_state(self.model).schedule
        return self.dims.tokens_per_layer(schedule)

    def image_flops(self, r: Any) -> int:
        """FLOPs of one image's forward at the schedule ``r``, the transformer counted as
        :func:`~tome_train.tome.vit_flops` does, in Lightning's convention (a multiply-add is two FLOPs), the matching
        not counted."""
        return int(2 * vit_flops(self.dims, r))

    @property
    def flops_per_batch(self) -> int:
        """A batch's FLOPs on one device, for Lightning's ThroughputMonitor (its model FLOPs utilization): in training
        the forward at the training schedule and the backward's twice that; in validation the forward at the
        evaluation schedule."""
        if self.training:
            return 3 * self.image_flops(self.train_r) * self.cfg.data.batch_size
        return self.image_flops(self.eval_r) * self.cfg.data.batch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        self.set_schedule(self.train_r)

    def on_validation_epoch_start(self) -> None:
        self.set_schedule(self.eval_r)

    def on_predict_epoch_start(self) -> None:  # a checkpoint predicts as it validates and is exported
        self.set_schedule(self.eval_r)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of a batch of images ``[B, 3, H, W]``, or of a data loader's ``(images,
        labels)``."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(self._channels(images))

    # ---- steps -----------------------------------------------------------------------
    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.trainer.channels_last else images

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self(self._channels(images)), targets)
        if not torch.isfinite(loss):
            saved = [cb.best_model_path for cb in self.trainer.checkpoint_callbacks if Path(cb.best_model_path).is_file()]
            kept = (f"the newest checkpoint is kept: {max(saved, key=os.path.getmtime)}" if saved
                    else "no checkpoint had been saved")
            raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at global step {self.global_step}; {kept}")
        self.log("train/loss", loss, prog_bar=True)
        # layer decay scales each group's lr by its depth; the head's group, unscaled, carries the schedule's own
        self.log("train/lr", max(group["lr"] for group in self.trainer.optimizers[0].param_groups))
        return loss

    def on_train_start(self) -> None:
        self._ema_updated_at = self.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # once per optimizer step: a batch that only accumulates gradients has not changed the weights
        if self.ema is not None and self.global_step > self._ema_updated_at:
            self.ema.update(self.model, step=self.global_step)
            self._ema_updated_at = self.global_step
        if self.global_step % self.trainer.log_every_n_steps == 0:
            counts = self.tokens_per_layer()
            self.log_dict({f"tokens/layer_{i:02d}": float(c) for i, c in enumerate(counts[:-1])})
            self.log("tokens/final", float(counts[-1]))

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch is None:  # none of its images could be read (imagefolder.collate_readable)
            return
        images, targets = batch
        images = self._channels(images)
        logits = self(images)
        self.val_loss.update(F.cross_entropy(logits, targets), weight=images.shape[0])
        self.val_accuracy.update(logits, targets)
        if self.ema is not None:
            self.ema_accuracy.update(self.ema.module(images), targets)

    def on_train_epoch_end(self) -> None:
        # images the data skipped as unreadable in this epoch's training and validation, over every rank: on a run of
        # days, a disk or a file system failing shows as a curve rather than as lines in a log
        skipped = getattr(self.trainer.datamodule, "num_corrupt", None)
        if skipped is not None:
            self.log("data/unreadable", float(skipped - self._unreadable_logged), reduce_fx="sum", sync_dist=True)
            self._unreadable_logged = skipped

    def on_validation_epoch_end(self) -> None:
        seen = int(self.all_gather(self.val_loss.weight).sum())  # images validated, every rank's (weight: each batch's)
        if seen == 0 and not self.trainer.sanity_checking:  # it reported a top-1 of 0% and ended as if it had trained
            raise DataError("validation read no images: every one was unreadable or missing (see the warnings of "
                            "skipped images): check the validation data")
        self._note_validation_short_of_the_data(seen)
        # torchmetrics syncs its counts across ranks once here, so ranks may see unequal batch counts; every rank then
        # holds the same value, which sync_dist averages to itself (Lightning warns of epoch-level logs without it).
        self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        self.val_loss.reset()
        for accuracy in (self.val_accuracy, self.ema_accuracy):
            if accuracy is not None:
                for name, value in accuracy.compute().items():
                    self.log(name, value * 100, prog_bar=name == "val/top1", sync_dist=True)  # in percent, as papers
                accuracy.reset()

    def _note_validation_short_of_the_data(self, seen: int) -> None:
        """Says once per run where a whole validation pass read fewer images than the data holds (unreadable ones, a
        truncated shard), so that a top-1 over fewer images is not taken for one over all."""
        trainer = self.trainer
        holds = getattr(trainer.datamodule, "num_val_samples", None)
        # Lightning's 1.0 (a float) is the whole set, its 1 (an int) one batch
        whole = trainer.limit_val_batches is None or (isinstance(trainer.limit_val_batches, float)
                                                      and trainer.limit_val_batches == 1.0)
        if (trainer.sanity_checking or not whole or holds is None or seen >= holds or self._said_short
                or not trainer.is_global_zero):
            return
        self._said_short = True
        print(f"note: validation read {seen} of the {holds} images of the data (data.val_samples for shards): its "
              "top-1 is over those it read; the others were unreadable or missing (data/unreadable counts them)")

    # ---- optimization ------------------------------------------------------------------
    def global_batch(self) -> int:
        """Images per optimizer step across every device of every node, at run time."""
        return global_batch(self.cfg, self.trainer.world_size, self.trainer.accumulate_grad_batches)

    def peak_lr(self) -> float:
        """The recipe's scaling rule at the run's global batch."""
        return peak_lr(self.cfg, self.global_batch())

    def configure_optimizers(self):
        opt = self.cfg.optim
        optimizer = create_optimizer_v2(
            self.model, opt="adamw", lr=self.peak_lr(), weight_decay=opt.weight_decay,
            betas=tuple(opt.betas), eps=opt.eps, layer_decay=opt.layer_decay,
        )
        total_steps = max(stepping_batches(self.trainer), 1)
        steps_per_epoch = max(total_steps // max(self.trainer.max_epochs, 1), 1)
        warmup_steps = int(opt.warmup_epochs * steps_per_epoch)
        if warmup_steps >= total_steps and self.trainer.is_global_zero:  # timm says only that its cosine has no effect
            print(f"note: optim.warmup_epochs={opt.warmup_epochs:g} covers the whole run ({self.trainer.max_epochs} "
                  f"epoch(s), {total_steps} steps): the lr only rises from {opt.warmup_lr:g} toward {self.peak_lr():.3g}"
                  " and never decays")
        scheduler = CosineLRScheduler(
            optimizer, t_initial=max(total_steps - (warmup_steps if opt.warmup_prefix else 0), 1), lr_min=opt.min_lr,
            warmup_t=warmup_steps, warmup_lr_init=opt.warmup_lr, warmup_prefix=opt.warmup_prefix, t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def on_fit_start(self) -> None:
        seed_rank(self.cfg.seed, self.global_rank)  # the ranks' models are alike by now (DDP has synced them)
        layout = self.cfg.layout
        intended = layout.nodes * layout.gpus_per_node
        if self.trainer.world_size != intended:
            actual_batch = self.global_batch()
            intended_batch = global_batch(self.cfg, intended, self.trainer.accumulate_grad_batches)
            msg = (
                f"world size {self.trainer.world_size} differs from the recipe's layout "
                f"{layout.nodes}x{layout.gpus_per_node}: global batch {actual_batch} instead of {intended_batch}, "
                f"peak lr {self.peak_lr():.3g} instead of {peak_lr(self.cfg, intended_batch):.3g}"
            )
            if self.trainer.is_global_zero:
                print(f"note: {msg}")



class ModelSummaryWithFlops(ModelSummary):
    """Lightning's model summary with its FLOPs filled in: one image's forward through the model at the training
    schedule (:meth:`ToMeClassifier.image_flops`). Lightning counts only by running an
    ``example_input_array``, and its counter (torch's ``FlopCounterMode``) leaves out attention where it runs on a
    kernel the counter does not know, such as the CPU's."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: ToMeClassifier) -> None:
        self._model_flops = pl_module.image_flops(pl_module.train_r)
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data: list[tuple[str, list[str]]], total_parameters: int,
                  trainable_parameters: int, model_size: float, total_training_modes: dict[str, int],
                  total_flops: int, **summarize_kwargs: Any) -> None:
        columns = dict(summary_data)
        columns["FLOPs"] = [get_human_readable_count(self._model_flops) if name == "model" else flops
                            for name, flops in zip(columns["Name"], columns["FLOPs"])]
        super().summarize(list(columns.items()), total_parameters, trainable_parameters, model_size,
                          total_training_modes, self._model_flops, **summarize_kwargs)


class ThroughputOfReadBatches(ThroughputMonitor):
    """Lightning's ThroughputMonitor, passing over a validation batch none of whose images could be read (``None``:
    :func:`~tome_train.data.imagefolder.collate_readable`), which it would count as a batch of no images."""

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        if batch is not None:
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
