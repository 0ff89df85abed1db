"""SLURM's warning signal handled at a step boundary, so that every rank saves together; a SIGTERM saves too.

On ``SIGUSR1`` (``#SBATCH --signal=SIGUSR1@90``) Lightning's own handler saves the requeue
checkpoint from inside the signal handler. With several ranks the signal lands on each at a
different point, possibly inside a gradient all-reduce, and the checkpoint's collectives then
pair with the wrong operations and hang. Here the handler only records the signal; every
``check_every`` steps the ranks agree on it with one tiny all-reduce, save
``hpc_ckpt_N.ckpt`` together, rank 0 requeues the job and fit ends at once (:class:`RunRequeued`). The check comes
once per optimizer step, right after it: with gradient accumulation a save between two of a step's batches would lose
the gradients of the first, which a checkpoint does not hold.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException


def next_hpc_checkpoint(root: str | Path) -> Path:
    """``hpc_ckpt_N.ckpt`` with N one above the newest there, the name Lightning resumes from."""
    root = Path(root)
    numbers = [int(p.stem.rsplit("_", 1)[1]) for p in root.glob("hpc_ckpt_*.ckpt") if p.stem.rsplit("_", 1)[1].isdigit()]
    return root / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class RunRequeued(Exception):
    """Raised on every rank once the requeue checkpoint is saved. Fit ends there: stopping it by ``should_stop`` would
    let Lightning validate the part epoch and write its epoch-end checkpoints, which the restarted job would resume
    as if the epoch were done."""


class SlurmRequeue(pl.Callback):
    def __init__(self, check_every: int = 10):
        self.check_every = check_every
        self.signalled = False
        self._checked_at_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            signal.signal(signal.SIGUSR1, self._record)

    def _record(self, signum, frame) -> None:
        self.signalled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._checked_at_step = trainer.global_step  # a resumed run's step was checked before its save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # the first batch end at a new global step is the one its optimizer step followed
        if trainer.global_step % self.check_every or trainer.global_step == self._checked_at_step:
            return
        self._checked_at_step = trainer.global_step
        flag = torch.tensor(float(self.signalled), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if not flag.item():
            return
        if trainer.is_global_zero:
            print(f"Handling auto-requeue signal: {signal.SIGUSR1} at global step {trainer.global_step}", flush=True)
        for logger in trainer.loggers:
            logger.finalize("finished")
        checkpoint = next_hpc_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(checkpoint)
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            try:
                result = subprocess.call(["scontrol", "requeue", job])
            except FileNotFoundError:  # a container without SLURM's tools: the checkpoint is saved all the same
                result = "no scontrol on PATH"
            print(f"Requeued SLURM job: {job}" if result == 0 else f"Requeuing SLURM job {job} failed ({result})", flush=True)
        raise RunRequeued(f"saved {checkpoint} at global step {trainer.global_step} and requeued the job")


class CheckpointOnSigterm(pl.Callback):
    """A run stopped by SIGTERM (a preemption, ``scancel``, a cloud reclaiming its machine) saves where it stopped, as
    ``hpc_ckpt_N.ckpt``, which the same command resumes. Lightning stops every rank at the same batch end on SIGTERM
    (its ``SIGTERMException``), so the ranks save together. With gradient accumulation a SIGTERM between a step's
    batches loses their gradients (a SIGUSR1 requeue waits for the step: :class:`SlurmRequeue`)."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        saved = "nothing saved in validation; the same command resumes from the newest checkpoint"
        if trainer.training:
            checkpoint = next_hpc_checkpoint(trainer.default_root_dir)
            trainer.save_checkpoint(checkpoint)
            saved = f"saved {checkpoint}, which the same command resumes"
        if trainer.is_global_zero:
            print(f"stopped by SIGTERM at global step {trainer.global_step}: {saved}", flush=True)
