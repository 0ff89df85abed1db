"""SLURM's warning signal and SIGTERM handled at an optimizer step's end, where every rank saves and stops together.

SLURM sends ``SIGUSR1`` before the time limit (``#SBATCH --signal=SIGUSR1@90``) and ``SIGTERM`` to every process of a
job it preempts or cancels; a cloud sends SIGTERM when it takes its machine back. Lightning's own handlers act inside
the signal handler: its requeue saves the checkpoint there, and its SIGTERM handler broadcasts from rank 0 there. With
several ranks a signal lands on each at a different point, possibly inside a gradient all-reduce or the sanity check's
metric gathering, and those collectives then pair with the wrong operations and hang (all seen: the two-node SLURM
test, two-process DDP runs given SIGTERM in training and, on one rank, in the sanity check). Here, from the start of
fit, the handlers only record the signal and Lightning installs none. Right after each optimizer step the ranks agree
on what they received with one tiny all-reduce; on SIGTERM, or in a SLURM job SIGUSR1, they save
``signal_ckpt_N.ckpt`` together (a step that ends an epoch waits for the next epoch's first), rank 0
requeues a SLURM job on SIGUSR1, and fit ends at once. Only after an optimizer step: with gradient accumulation a save
between two of a step's batches would lose the gradients of the first, which a checkpoint does not hold. A signal
before the first step (the restore, the sanity check) stops the run when training starts, with nothing new to save;
one after the last, in the last validation, once fit is done. After fit (:func:`signals_end_the_process`) there is
nothing to save and a signal ends the process at once.
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

from .cli import SIGNAL_CHECKPOINTS


def next_signal_checkpoint(root: str | Path) -> Path:
    """``signal_ckpt_N.ckpt`` with N one above the newest in ``root``."""
    numbers = [int(p.stem.rsplit("_", 1)[1]) for p in Path(root).glob(SIGNAL_CHECKPOINTS)
               if p.stem.rsplit("_", 1)[1].isdigit()]
    return Path(root) / SIGNAL_CHECKPOINTS.replace("*", str(max(numbers, default=0) + 1))


class RunStopped(Exception):
    """Raised on every rank once a signal's checkpoint is saved. Fit ends there: stopping it by ``should_stop`` would
    let Lightning validate the part epoch and write its epoch-end checkpoints, which a restart would resume as if the
    epoch were done."""


class RunRequeued(RunStopped):
    """A :class:`RunStopped` of a SLURM job that was requeued: SLURM restarts it from the checkpoint."""


class StopOnSignal(pl.Callback):
    """SIGTERM, and with ``requeue`` (a SLURM job) SIGUSR1, recorded during fit, and acted on by every rank at once
    after an optimizer step (see the module's docstring)."""

    def __init__(self, requeue: bool):
        self.received = {signal.SIGTERM: False} | ({signal.SIGUSR1: False} if requeue else {})
        self._checked_at_step = -1
        self._replaced: dict[int, Any] = {}

    def _record(self, signum: int, frame) -> None:
        self.received[signum] = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning installs its handlers after this hook, for fit and for validate alike, and nothing public turns
        # them off; outside fit the caller's (signals_end_the_process) stay
        trainer._signal_connector.register_signal_handlers = lambda: None
        if stage == "fit":
            self.received = dict.fromkeys(self.received, False)
            self._replaced = {signum: _install(signum, self._record) for signum in self.received}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._put_back()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._put_back()

    def _put_back(self) -> None:
        for signum, handler in self._replaced.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._replaced = {}

    def _agreed(self, trainer: pl.Trainer) -> dict[int, bool]:
        """What any rank received."""
        # on the strategy's device: at fit's end the module is back on the CPU, which NCCL cannot reduce
        flags = torch.tensor([float(v) for v in self.received.values()], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        return dict(zip(self.received, map(bool, flags.tolist())))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checked_at_step = trainer.global_step  # a resumed run's step was checked before its save
        received = self._agreed(trainer)
        if any(received.values()):
            self._stop(trainer, received, "before the first step of this fit", "nothing new to save",
                       "the same command runs it again")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # the first batch end at a new global step is the one its optimizer step followed (with gradient accumulation
        # the others end a step's earlier batches); an epoch's last is left to the next (a checkpoint of it restarts
        # past the epoch's validation and epoch-end checkpoints)
        stepped, self._checked_at_step = trainer.global_step != self._checked_at_step, trainer.global_step
        if not stepped or batch_idx + 1 == trainer.num_training_batches:
            return
        received = self._agreed(trainer)
        if not any(received.values()):
            return
        checkpoint = next_signal_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(checkpoint)
        if trainer.is_global_zero:  # each is a whole training state: a job requeued for days piled them up
            for older in Path(trainer.default_root_dir).glob(SIGNAL_CHECKPOINTS):
                if older != checkpoint:
                    with contextlib.suppress(OSError):  # what is left is only disk used: the requeue comes first
                        older.unlink()
        self._stop(trainer, received, f"at global step {trainer.global_step}", f"saved {checkpoint}",
                   "the same command resumes it")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a signal in the last validation, after the last step: the checkpoints are written, the trade-off sweep is not
        received = self._agreed(trainer)
        if any(received.values()):
            self._stop(trainer, received, "after the last step", "the run's checkpoints are saved", AFTER_TRAINING)

    @staticmethod
    def _stop(trainer: pl.Trainer, received: dict[int, bool], when: str, done: str, then: str) -> None:
        """End fit on every rank, rank 0 saying why (and requeuing the job on SLURM's warning)."""
        requeue = received.get(signal.SIGUSR1, False)
        message = _stop_message(signal.SIGUSR1 if requeue else signal.SIGTERM, when, done, then)
        if trainer.is_global_zero:
            print(message, flush=True)
            if requeue:
                _requeue()
        raise (RunRequeued if requeue else RunStopped)(message)


AFTER_TRAINING = "the same command validates the last one and measures the trade-off"


def _stop_message(signum: int, when: str, done: str, then: str) -> str:
    if signum == signal.SIGUSR1:  # the restart runs the same command
        return f"Handling auto-requeue signal (SIGUSR1) {when}: {done}; requeuing the job"
    return f"stopped by SIGTERM {when}: {done}; {then}"


def _install(signum: int, handler) -> Any:
    """``signal.signal`` where Python lets a handler be set, in the main thread (as Lightning sets its own); the
    handler it replaced."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signum, handler)
    return None


def _ending_at_once(says: bool):
    """A handler that ends the process by the signal itself, rank 0 (``says``) saying so first and, on SLURM's warning,
    requeuing the job, whose restart does what this process had left."""

    def end(signum: int, frame) -> None:
        if says:
            print(_stop_message(signum, "after training", "the run's checkpoints are whole", AFTER_TRAINING), flush=True)
            if signum == signal.SIGUSR1:
                _requeue()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return end


@contextlib.contextmanager
def signals_end_the_process(says: bool, requeue: bool) -> Iterator[None]:
    """After training (validating the last checkpoint, the trade-off sweep) there is nothing to save: a SIGTERM, and
    with ``requeue`` (a SLURM job) its time-limit warning, end the process at once (:func:`_ending_at_once`)."""
    signums = [signal.SIGTERM] + ([signal.SIGUSR1] if requeue else [])
    previous = {signum: _install(signum, _ending_at_once(says)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


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
