"""The ImageNet recipes' features together under DDP: two CPU processes (gloo, Lightning's launcher) run the real
``train.py`` on the digits with EMA, mixup and cutmix, drop path, layer decay, repeated augmentation, random erasing,
average pooling and a checkpoint every 4 steps; stopped mid-epoch (both ranks gone at once, as a kill -9 leaves them)
and started again with the same command.

The test runs this file as a script, which wraps the module's hooks to write down what each rank did, then calls
``tome_train.cli.main``; Lightning starts the second rank by running the script again. Checked from outside:

* the resumed run trains, on every rank, the batches the stopped run had not trained of its epoch (it trained the
  epoch's first batches again: Lightning drops a loader's checkpointed state once ``estimated_stepping_batches`` has
  built the loader, which the lr schedule asks for);
* the ranks draw their own mixup lambdas and drop-path masks (every rank drew the same from the one run seed);
* the ranks agree on validation, EMA's too, over the 360 images counted once; one run's checkpoints and wandb files.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 6
SAVED_AT, STOPPED_AT = 8, 10  # a checkpoint every 4 steps; stopped at epoch 1's 5th batch, resumed at its 3rd
RECIPE_FEATURES = [
    "trainer.devices=2", "trainer.epochs=2", f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.limit_val_batches=1.0", "trainer.checkpoint_every_n_steps=4", "tradeoff.enabled=false",
    "wandb.mode=offline", "optim.ema_decay=0.99", "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0",
    "model.drop_path_rate=0.1", "optim.layer_decay=0.75", "data.repeated_aug=3", "data.re_prob=0.25",
    "model.global_pool=avg",
]


def _record(out: Path, name: str, **fields) -> None:
    with open(out / name, "a") as f:
        f.write(json.dumps(fields) + "\n")


def _run_rank(out: Path, argv: list[str]) -> int:
    """What each rank runs: train.py's main, each training step and the fit's end written down, the process gone at
    global step ``STOP_AT`` (environment) where set."""
    import hashlib

    import torch
    from timm.data import Mixup

    from tome_train.cli import main
    from tome_train.module import ToMeClassifier

    stop_at = int(os.environ.get("STOP_AT", "-1"))
    lambdas = []
    params_per_batch = Mixup._params_per_batch

    def drawn(self):
        lam, use_cutmix = params_per_batch(self)
        lambdas.append(float(lam))
        return lam, use_cutmix

    training_step = ToMeClassifier.training_step

    def recorded_step(self, batch, batch_idx):
        if self.global_step == stop_at:
            os._exit(3)
        # torch's generator as this step's drop-path masks will find it
        torch_state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        loss = training_step(self, batch, batch_idx)
        _record(out, f"steps_rank{self.global_rank}.jsonl", step=self.global_step, labels=batch[1].tolist(),
                lam=lambdas[-1], torch_state=torch_state)
        return loss

    note_short = ToMeClassifier._note_validation_short_of_the_data

    def counted(self, seen):
        if not self.trainer.sanity_checking:  # its 2 batches a rank
            _record(out, f"val_rank{self.global_rank}.jsonl", seen=seen)
        return note_short(self, seen)

    def on_fit_end(self):
        ema = torch.cat([p.detach().flatten() for p in self.ema.module.parameters()])
        _record(out, f"fit_rank{self.global_rank}.jsonl", ema=hashlib.sha256(ema.numpy().tobytes()).hexdigest(),
                metrics={k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")})

    Mixup._params_per_batch = drawn
    ToMeClassifier.training_step = recorded_step
    ToMeClassifier._note_validation_short_of_the_data = counted
    ToMeClassifier.on_fit_end = on_fit_end
    return main(argv)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train(out: Path, run_dir: Path, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_SILENT="true", **env_extra)
    cmd = [sys.executable, __file__, str(out), "--output-dir", str(run_dir), *RECIPE_FEATURES]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # a rank waiting in a collective for the other: the ranks and all go
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipe_ddp")
    run_dir, stopped, resumed = base / "run", base / "stopped", base / "resumed"
    stopped.mkdir(), resumed.mkdir()
    first = _train(stopped, run_dir, STOP_AT=str(STOPPED_AT))
    assert first.returncode == 3, first.stderr[-4000:]
    again = _train(resumed, run_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in again.stdout
    return run_dir, stopped, resumed


def test_the_resumed_run_trains_each_rank_on_the_batches_it_had_not(stopped_and_resumed):
    _, stopped, resumed = stopped_and_resumed
    for rank in range(2):
        before = {rec["step"]: rec["labels"] for rec in _read(stopped / f"steps_rank{rank}.jsonl")}
        after = {rec["step"]: rec["labels"] for rec in _read(resumed / f"steps_rank{rank}.jsonl")}
        assert sorted(before) == list(range(STOPPED_AT)) and sorted(after) == list(range(SAVED_AT, 2 * STEPS_PER_EPOCH))
        # the sampler's permutation is the epoch's: the batches after the checkpoint are the stopped run's
        assert [after[s] for s in range(SAVED_AT, STOPPED_AT)] == [before[s] for s in range(SAVED_AT, STOPPED_AT)]
        epoch_1_before = [before[s] for s in range(STEPS_PER_EPOCH, SAVED_AT)]
        assert not any(labels in epoch_1_before for labels in after.values()), "an epoch's batch trained twice"


def test_each_rank_draws_its_own_mixup_and_drop_path(stopped_and_resumed):
    _, stopped, _ = stopped_and_resumed
    ranks = [_read(stopped / f"steps_rank{rank}.jsonl") for rank in range(2)]
    for a, b in zip(*ranks):
        assert a["step"] == b["step"]
        assert a["lam"] != b["lam"] and a["torch_state"] != b["torch_state"]


def test_the_ranks_agree_on_validation_over_every_image_once(stopped_and_resumed):
    run_dir, stopped, resumed = stopped_and_resumed
    for out in (stopped, resumed):
        for rank in range(2):
            assert {rec["seen"] for rec in _read(out / f"val_rank{rank}.jsonl")} == {360}
    fits = [_read(resumed / f"fit_rank{rank}.jsonl") for rank in range(2)]
    assert fits[0] == fits[1]  # the EMA weights and every val/ metric, val/ema_top1 among them
    assert {"val/top1", "val/ema_top1", "val/ema_top5"} <= set(fits[0][0]["metrics"])
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # rank 0's, each once: no -v1, no .partial
    assert len(saved) == 2 and saved[0].startswith("best-epoch=") and saved[1] == "last.ckpt"
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))  # one a start, both of the one run
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(_run_rank(Path(sys.argv[1]), sys.argv[2:]))
