"""SLURM's warning signal and SIGTERM handled at an optimizer step's end, where every rank saves and stops together.

SLURM sends ``SIGUSR1`` before the time limit (``#SBATCH --signal=SIGUSR1@90``) and ``SIGTERM`` to every process of a
job it preempts or cancels; a cloud sends SIGTERM when it takes its machine back. Lightning's own handlers act inside
the signal handler: its requeue saves the checkpoint there, and its SIGTERM handler broadcasts from rank 0 there. With
several ranks a signal lands on each at a different point, possibly inside a gradient all-reduce, and those
collectives then pair with the wrong operations and hang (both seen: the two-node SLURM test, a two-process DDP run
given SIGTERM). Here the handlers only record the signal. Right after each optimizer step the ranks agree on what they
received with one tiny all-reduce; on either signal they save ``hpc_ckpt_N.ckpt`` together, rank 0 requeues a SLURM
job on SIGUSR1, and fit ends at once. Only after an optimizer step: with gradient accumulation a save between two of a
step's batches would lose the gradients of the first, which a checkpoint does not hold.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn


def next_hpc_checkpoint(root: str | Path) -> Path:
    """``hpc_ckpt_N.ckpt`` with N one above the newest there, the name Lightning resumes from."""
    root = Path(root)
    numbers = [int(p.stem.rsplit("_", 1)[1]) for p in root.glob("hpc_ckpt_*.ckpt") if p.stem.rsplit("_", 1)[1].isdigit()]
    return root / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class RunStopped(Exception):
    """Raised on every rank once a signal's checkpoint is saved. Fit ends there: stopping it by ``should_stop`` would
    let Lightning validate the part epoch and write its epoch-end checkpoints, which a restart would resume as if the
    epoch were done."""


class RunRequeued(RunStopped):
    """A :class:`RunStopped` of a SLURM job that was requeued: SLURM restarts it from the checkpoint."""


class StopOnSignal(pl.Callback):
    """SIGTERM, and with ``requeue`` (a SLURM job) SIGUSR1, recorded, and acted on by every rank at once after an
    optimizer step (see the module's docstring)."""

    def __init__(self, requeue: bool):
        self.received = {signal.SIGTERM: False} | ({signal.SIGUSR1: False} if requeue else {})
        self._checked_at_step = -1

    def _record(self, signum: int, frame) -> None:
        self.received[signum] = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # in place of Lightning's, which it installed just before (its teardown puts back those from before fit)
        for signum in self.received:
            _install(signum, self._record)
        self._checked_at_step = trainer.global_step  # a resumed run's step was checked before its save

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # in place of Lightning's, which it installed just before
            _install(signal.SIGTERM, _ending_at_once(trainer.is_global_zero))

    def _agreed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[int, bool]:
        """What any rank received."""
        flags = torch.tensor([float(v) for v in self.received.values()], device=pl_module.device)
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        return dict(zip(self.received, map(bool, flags.tolist())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # the first batch end at a new global step is the one its optimizer step followed; an epoch's last is left
        # to the next (a checkpoint of it restarts past the epoch's validation and epoch-end checkpoints)
        if trainer.global_step == self._checked_at_step or batch_idx + 1 == trainer.num_training_batches:
            return
        self._checked_at_step = trainer.global_step
        received = self._agreed(trainer, pl_module)
        if not any(received.values()):
            return
        checkpoint = next_hpc_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(checkpoint)
        if received.get(signal.SIGUSR1):
            if trainer.is_global_zero:
                print(f"Handling auto-requeue signal: {signal.SIGUSR1} at global step {trainer.global_step}", flush=True)
                _requeue()
            raise RunRequeued(f"saved {checkpoint} at global step {trainer.global_step} and requeued the job")
        message = f"stopped by SIGTERM at global step {trainer.global_step}: saved {checkpoint}, which the same command resumes"
        if trainer.is_global_zero:
            print(message, flush=True)
        raise RunStopped(message)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a SIGTERM in the last validation, after the last step: the checkpoints are written, the trade-off sweep is not
        if self._agreed(trainer, pl_module)[signal.SIGTERM]:
            message = ("stopped by SIGTERM after the last step: the run's checkpoints are saved; the same command "
                       "validates the last one and measures the trade-off")
            if trainer.is_global_zero:
                print(message, flush=True)
            raise RunStopped(message)


def _install(signum: int, handler) -> Any:
    """``signal.signal`` where Python lets a handler be set, in the main thread (as Lightning sets its own); the
    handler it replaced."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signum, handler)
    return None


def _ending_at_once(says: bool):
    """A SIGTERM handler that ends the process by the signal itself, rank 0 (``says``) saying so first."""

    def end(signum: int, frame) -> None:
        if says:
            print("stopped by SIGTERM after training: the run's checkpoints are whole; the same command validates the "
                  "last one and measures the trade-off", flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return end


@contextlib.contextmanager
def sigterm_ends_the_process(says: bool) -> Iterator[None]:
    """After training (validating the last checkpoint, the trade-off sweep) there is nothing to save: a SIGTERM ends
    the process at once (:func:`_ending_at_once`)."""
    previous = _install(signal.SIGTERM, _ending_at_once(says))
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _requeue() -> None:
    """``scontrol requeue`` this SLURM job (an array job's task)."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        result = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:  # a container without SLURM's tools: the checkpoint is saved all the same
        result = "no scontrol on PATH"
    print(f"Requeued SLURM job: {job}" if result == 0 else f"Requeuing SLURM job {job} failed ({result})", flush=True)
