"""Training that loses nothing when killed: kill -9 and rerun, non-finite loss, determinism."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import wandb

from tome_train.cli import main, train
from tome_train.config import load_config

from conftest import ROOT
from linear_fit import fit_linear
from wandb_records import exit_code, written_run_file

QUICK = ["trainer.log_every_n_steps=1", "tradeoff.enabled=false", "trainer.limit_val_batches=2"]


def _command(run_dir, *overrides):
    return [sys.executable, str(ROOT / "train.py"), "--output-dir", str(run_dir), *QUICK, *overrides]


STEPS_PER_EPOCH = 12  # of the 22 a digits epoch has (1,437 // 64): enough to be killed mid-epoch


@pytest.mark.parametrize("epochs, every_n_steps, saved_at", [
    (2, 4, 4),  # last.ckpt every 4 steps
    (3, None, STEPS_PER_EPOCH),  # and at every epoch's end (Lightning's save_last alone wrote it only at the end)
])
def test_kill_9_mid_epoch_then_same_command_resumes(tmp_path, epochs, every_n_steps, saved_at):
    run_dir = tmp_path / "run"
    cmd = _command(run_dir, f"trainer.epochs={epochs}", f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
                   f"trainer.checkpoint_every_n_steps={every_n_steps or 'null'}")
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= saved_at:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert saved_at <= killed_at < epochs * STEPS_PER_EPOCH and killed_at % saved_at == 0  # saved mid-training
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        torch.load(ckpt, map_location="cpu", weights_only=False)  # whole: writes go to .NAME.partial, then rename

    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {last}" in again.stdout
    # Lightning's notes that say nothing here: a resumed run's checkpoint directory is its own; its hosted-logger tip
    assert "exists and is not empty" not in again.stderr and "litlogger" not in again.stdout + again.stderr
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == epochs * STEPS_PER_EPOCH
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, "the restarted run continues the same wandb run id"


def test_last_checkpoint_holds_the_final_step_between_step_saves(tmp_path):
    """Every 7 steps of 2 x 10: Lightning's save_last alone left last.ckpt at step 14, six steps short of the
    trained model, which export and a rerun then took for the run's end."""
    cfg = load_config(None, [*QUICK, "trainer.epochs=2", "trainer.limit_train_batches=10",
                             "trainer.checkpoint_every_n_steps=7", f"output_dir={tmp_path}"])
    train(cfg)
    assert [p.name for p in (tmp_path / "checkpoints").glob("last*")] == ["last.ckpt"]  # in place, no last-v1
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 20


def test_non_finite_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # A learning rate this large sends the weights to inf within a few steps.
    code = main(["--output-dir", str(run_dir), *QUICK, "trainer.epochs=1", "optim.blr=1e30", "optim.warmup_epochs=0",
                 "optim.clip_grad=null", "trainer.checkpoint_every_n_steps=1"])
    stderr = capsys.readouterr().err
    assert code == 1, stderr[-2000:]
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: non-finite loss") and "at global step" in error
    step = int(error.split("at global step ")[1].split(";")[0])
    assert step >= 1
    # its wandb run ended as failed: the next run in this process starts its own
    assert wandb.run is None
    assert exit_code(written_run_file(run_dir)) == 1
    assert error.endswith(f"; the newest checkpoint is kept: {run_dir / 'checkpoints' / 'last.ckpt'}")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] <= step
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    # saving only at the epoch's end, nothing was saved before the loss went non-finite: it said a checkpoint was kept
    assert main(["--output-dir", str(tmp_path / "unsaved"), *QUICK, "trainer.epochs=1", "optim.blr=1e30",
                 "optim.warmup_epochs=0", "optim.clip_grad=null"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("; no checkpoint had been saved")


def test_same_seed_same_world_size_same_first_steps(tmp_path):
    states = []
    for name in ("a", "b"):
        cfg = load_config(None, [*QUICK, "trainer.epochs=1", "trainer.limit_train_batches=3",
                                 f"output_dir={tmp_path / name}"])
        train(cfg)
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        states.append(ckpt["state_dict"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-write")


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    from tome_train.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 7, "weights": torch.ones(1000)}, target)
    good = target.read_bytes()
    # torch.save has written part of the file when the unpicklable value is reached
    try:
        io.save_checkpoint({"weights": torch.zeros(1000), "global_step": _Unpicklable()}, target)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the save should have failed")
    assert target.read_bytes() == good
    assert torch.load(target, weights_only=True)["global_step"] == 7


def test_a_requeue_saves_right_after_an_optimizer_step(tmp_path, monkeypatch, capsys):
    """With gradient accumulation, SIGUSR1 between the two batches of step 3: the requeue checkpoint comes after the
    step's second batch, not after the batch the signal followed, whose gradient it would lose. Without scontrol on
    PATH (a container), the requeue says so and the checkpoint is there. It replaces the one an earlier requeue
    saved (a job requeued for days piled them up, each a whole training state)."""
    import pytorch_lightning as pl

    from tome_train.data import ImageDataModule
    from tome_train.requeue import RunRequeued, StopOnSignal

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))
    requeue = StopOnSignal(requeue=True)

    class SignalAfterBatch4(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:  # batches 4 and 5 make step 3
                os.kill(os.getpid(), signal.SIGUSR1)

    datamodule = ImageDataModule(load_config(None, ["data.batch_size=100"]).data, 8, seed=0, with_meta=True)
    (tmp_path / "signal_ckpt_1.ckpt").write_bytes(b"an earlier requeue's")
    with pytest.raises(RunRequeued):
        fit_linear(datamodule, [SignalAfterBatch4(), requeue], max_epochs=1, accumulate_grad_batches=2,
                   default_root_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "signal" in p.name) == ["signal_ckpt_2.ckpt"]
    checkpoint = torch.load(tmp_path / "signal_ckpt_2.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_done": 6}]
    assert "Requeuing SLURM job 4242 failed (no scontrol on PATH)" in capsys.readouterr().out


def test_a_signal_on_an_epochs_last_batch_saves_after_a_whole_step_of_the_next_epoch(tmp_path):
    """With gradient accumulation, SIGTERM in epoch 0's last batch: the save waits for epoch 1's first optimizer step,
    its two batches. It came after epoch 1's first batch, whose gradient the checkpoint lost: the last batch's step
    had not counted as checked, so the next batch end looked like a step's."""
    import pytorch_lightning as pl

    from tome_train.data import ImageDataModule
    from tome_train.requeue import RunStopped, StopOnSignal

    class SignalAtTheLastBatch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx + 1 == trainer.num_training_batches:
                os.kill(os.getpid(), signal.SIGTERM)

    datamodule = ImageDataModule(load_config(None, ["data.batch_size=100"]).data, 8, seed=0, with_meta=True)
    with pytest.raises(RunStopped):
        fit_linear(datamodule, [SignalAtTheLastBatch(), StopOnSignal(requeue=False)], max_epochs=2,
                   accumulate_grad_batches=2, limit_train_batches=6, default_root_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "signal_ckpt_1.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_done": 2}]


def test_the_newest_checkpoint_resumes_a_best_one_written_just_before_a_kill(tmp_path):
    """A kill -9 while last.ckpt is rewritten at an epoch's end leaves the best-*.ckpt written just before it, of the
    same step, as the newest whole checkpoint; the run resumed from the last.ckpt of an epoch before."""
    from tome_train.cli import find_resume_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    files = [tmp_path / "signal_ckpt_1.ckpt", checkpoints / "last.ckpt", checkpoints / "best-epoch=001.ckpt",
             checkpoints / ".last.ckpt.partial"]
    for age, path in enumerate(files):
        path.write_bytes(b"")
        os.utime(path, (1e9 + age, 1e9 + age))
    assert find_resume_checkpoint(tmp_path) == checkpoints / "best-epoch=001.ckpt"
    os.utime(checkpoints / "last.ckpt", (2e9, 2e9))
    assert find_resume_checkpoint(tmp_path) == checkpoints / "last.ckpt"
    (checkpoints / ".last.ckpt.partial").unlink()  # a whole last.ckpt: an older epoch's best never resumes
    os.utime(checkpoints / "best-epoch=001.ckpt", (3e9, 3e9))  # as a copy that keeps no times may leave it
    assert find_resume_checkpoint(tmp_path) == checkpoints / "last.ckpt"
    (checkpoints / "last.ckpt").unlink()  # killed at the first epoch's end, before last.ckpt's write began
    assert find_resume_checkpoint(tmp_path) == checkpoints / "best-epoch=001.ckpt"
    assert find_resume_checkpoint(tmp_path / "nothing") is None


def _slurm_job(monkeypatch, tmp_path) -> Path:
    """This process as the one task of SLURM job 777, Lightning's SLURM environment and all; ``scontrol`` a script
    that writes down its arguments (SLURM itself: tests/test_slurm.py)."""
    for key, value in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="tome", SLURM_JOB_ID="777",
                           SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost").items():
        monkeypatch.setenv(key, value)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_a_requeue_mid_epoch_stops_at_once_and_the_restart_trains_the_rest_of_that_epoch(tmp_path, monkeypatch):
    """SIGUSR1 in epoch 1's third batch; the requeue comes right after its step, global step 9. Nothing runs after its
    checkpoint: no validation of the part epoch, no epoch-end checkpoint, which the restart would resume as the
    whole epoch. The restarted job resumes signal_ckpt_1 and trains the epoch's last 3 batches. Once it has finished,
    the same command validates the final weights: the signal's checkpoint, named hpc_ckpt_1 as Lightning's, was what
    Lightning's validate() loads unasked under SLURM, so the finished run's top-1 and its trade-off sweep measured
    the weights of step 9."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from tome_train.module import ToMeClassifier

    calls = _slurm_job(monkeypatch, tmp_path)
    assert SLURMEnvironment.detect()
    training_step = ToMeClassifier.training_step

    def signalled_at_batch_2(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what --signal=SIGUSR1@90 sends before the time limit
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(ToMeClassifier, "training_step", signalled_at_batch_2)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*QUICK, "trainer.epochs=2", "trainer.limit_train_batches=6", f"output_dir={run_dir}"])
    assert train(cfg) == {"run_dir": str(run_dir), "requeued": True}
    assert calls.read_text() == "requeue 777\n"
    saved = torch.load(run_dir / "signal_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 9 and saved["epoch"] == 1
    epoch_end_saves = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert epoch_end_saves == ["best-epoch=000.ckpt", "last.ckpt"]  # of epoch 0, at step 6
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6

    monkeypatch.setattr(ToMeClassifier, "training_step", training_step)
    finished = train(cfg)["val_top1"]
    assert train(cfg)["val_top1"] == finished
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12


def test_a_requeue_on_an_epochs_last_batch_waits_for_its_validation_and_checkpoints(tmp_path, monkeypatch):
    """Saved after the epoch's last step, the requeue checkpoint restarted past the epoch's end: the epoch was never
    validated and had no epoch-end checkpoint. It now comes after the next epoch's first step."""
    from tome_train.module import ToMeClassifier

    _slurm_job(monkeypatch, tmp_path)
    training_step = ToMeClassifier.training_step

    def signalled_at_the_last_batch(self, batch, batch_idx):
        if self.current_epoch == 0 and batch_idx == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(ToMeClassifier, "training_step", signalled_at_the_last_batch)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*QUICK, "trainer.epochs=2", "trainer.limit_train_batches=6", f"output_dir={run_dir}"])
    assert train(cfg)["requeued"]
    assert torch.load(run_dir / "signal_ckpt_1.ckpt", weights_only=False)["global_step"] == 7
    assert torch.load(run_dir / "checkpoints" / "best-epoch=000.ckpt", weights_only=False)["global_step"] == 6


def _stopped_by_sigterm(cmd: list[str], run_dir: Path, env: dict) -> Path:
    """Run ``cmd``, send SIGTERM to each of its processes once ``last.ckpt`` is there, as SLURM sends it (a preemption,
    scancel), and check that it said where it saved and exited 143; returns the checkpoint it saved."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be stopped"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a hung rank or worker, which the assertion below names
    assert proc.returncode == 143, err[-2000:]
    saved = run_dir / "signal_ckpt_1.ckpt"
    step = torch.load(saved, map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= step < STEPS_PER_EPOCH
    assert f"stopped by SIGTERM at global step {step}: saved {saved}; the same command resumes it\n" in out
    return saved


def test_a_sigterm_saves_where_it_stopped_and_exits_143_and_the_same_command_resumes(tmp_path):
    """Its DataLoader workers get the SIGTERM too, which took the run down with a traceback before it could save."""
    run_dir = tmp_path / "run"
    cmd = _command(run_dir, "trainer.epochs=1", f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
                   "trainer.checkpoint_every_n_steps=2", "data.num_workers=2")
    env = {**os.environ, "WANDB_SILENT": "true"}
    saved = _stopped_by_sigterm(cmd, run_dir, env)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {saved}" in again.stdout
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == STEPS_PER_EPOCH


def test_a_sigterm_to_every_process_of_a_two_process_ddp_run_stops_both_ranks_at_one_step(tmp_path):
    """Lightning's SIGTERM handler broadcast from rank 0 inside the signal handler, which met the other rank inside a
    gradient all-reduce: both ranks hung, nothing saved. The ranks now agree after a step, save and exit 143."""
    run_dir = tmp_path / "run"
    cmd = _command(run_dir, "trainer.devices=2", "trainer.epochs=1", f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
                   "trainer.checkpoint_every_n_steps=2", "data.num_workers=1", "wandb.mode=disabled")
    _stopped_by_sigterm(cmd, run_dir, {**os.environ, "OMP_NUM_THREADS": "1"})


SANITY_CHECK_SIGTERM_ON_RANK_1 = """
import os, signal, sys

from tome_train.cli import main
from tome_train.module import ToMeClassifier

validation_step = ToMeClassifier.validation_step


def signalled_in_the_sanity_check(self, batch, batch_idx):
    if self.trainer.sanity_checking and self.global_rank == 1 and batch_idx == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return validation_step(self, batch, batch_idx)


ToMeClassifier.validation_step = signalled_in_the_sanity_check
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_to_one_ddp_rank_in_the_sanity_check_stops_both_before_the_first_step(tmp_path):
    """Lightning's handler, in place until training started, broadcast from inside the signal handler on rank 1 while
    rank 0 gathered the sanity check's metrics: both ranks hung. Now both stop where training starts, exit 143, with
    nothing to save. (Lightning starts rank 1 by running this script again.)"""
    script = tmp_path / "signalled.py"
    script.write_text(SANITY_CHECK_SIGTERM_ON_RANK_1)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(script), "--output-dir", str(run_dir), *QUICK, "trainer.devices=2", "trainer.epochs=1",
           "trainer.limit_train_batches=2", "wandb.mode=disabled"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # hung ranks
    assert proc.returncode == 143, err[-2000:]
    assert ("stopped by SIGTERM before the first step of this fit: nothing new to save; the same command runs it "
            "again\n") in out
    assert not list(run_dir.glob("**/*.ckpt"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_in_the_last_validation_ends_the_run_before_its_trade_off_sweep(tmp_path, monkeypatch, capsys,
                                                                                   signum):
    """SIGUSR1, SLURM's time-limit warning, was recorded there and then forgotten: the job ran into its time limit. It
    now requeues the job, whose restart validates the last checkpoint and measures the trade-off."""
    from tome_train.module import ToMeClassifier

    calls = _slurm_job(monkeypatch, tmp_path) if signum == signal.SIGUSR1 else None
    validation_step = ToMeClassifier.validation_step

    def signalled_in_the_last_validation(self, batch, batch_idx):
        if not self.trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), signum)  # recorded: the step's end it waits for never comes
        return validation_step(self, batch, batch_idx)

    monkeypatch.setattr(ToMeClassifier, "validation_step", signalled_in_the_last_validation)
    run_dir = tmp_path / "run"
    code = main(["--output-dir", str(run_dir), *QUICK, "tradeoff.enabled=true", "trainer.epochs=1",
                 "trainer.limit_train_batches=2", "wandb.mode=disabled"])
    out = capsys.readouterr().out
    if signum == signal.SIGTERM:
        assert code == 143
        assert ("stopped by SIGTERM after the last step: the run's checkpoints are saved; the same command validates "
                "the last one and measures the trade-off\n") in out
    else:
        assert code == 0 and calls.read_text() == "requeue 777\n"
        assert ("Handling auto-requeue signal (SIGUSR1) after the last step: the run's checkpoints are saved; "
                "requeuing the job\n") in out
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (run_dir / "tradeoff.csv").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_after_training_ends_the_run_at_once_and_says_so(tmp_path, monkeypatch, signum):
    """Validating a finished run's checkpoint and sweeping its trade-off have nothing to save: SIGTERM ends the process
    there (Lightning's handler would broadcast inside it, as in training), with a line saying why. SIGUSR1, SLURM's
    time-limit warning, ended it by its default action, saying nothing and not requeuing the job; it now requeues it,
    and the restart sweeps the trade-off."""
    calls = _slurm_job(monkeypatch, tmp_path) if signum == signal.SIGUSR1 else None
    run_dir = tmp_path / "run"
    cmd = _command(run_dir, "trainer.epochs=1", "trainer.limit_train_batches=2", "wandb.mode=disabled")
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    written = last.read_bytes()
    sweep = [*cmd, "tradeoff.enabled=true", "tradeoff.r_values=[0,2,4,6,8,10,12,14,16]", "tradeoff.bench_steps=20"]
    proc = subprocess.Popen(sweep, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("the run had already finished"):
                proc.send_signal(signum)
                break
        out = proc.stdout.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signum
    if signum == signal.SIGTERM:
        assert ("stopped by SIGTERM after training: the run's checkpoints are whole; the same command validates the "
                "last one and measures the trade-off\n") in out
    else:
        assert ("Handling auto-requeue signal (SIGUSR1) after training: the run's checkpoints are whole; requeuing the "
                "job\n") in out
        assert calls.read_text() == "requeue 777\n"
    assert last.read_bytes() == written and not (run_dir / "tradeoff.csv").exists()
