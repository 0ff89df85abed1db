"""What a trade-off report was measured on: the step wandb logs it at, and the record beside its table."""
import json
import shutil

import torch

from tome_train.cli import train
from tome_train.config import load_config

from conftest import SHORT_FIT
from wandb_records import history, summary, written_run_file


def test_rerunning_a_finished_run_logs_its_trade_off_at_the_runs_step(digits_run, tmp_path):
    """A re-run (``make demo`` twice) logged the table, plot and pictures to the run at ``trainer/global_step`` 0, the
    step metric of a process in which Lightning had logged nothing: the run's summary then said step 0, and wandb may
    drop such rows on sync as below the run's step. The first run logged it at the step of its last batch, one short
    of its checkpoint's."""
    shutil.copytree(digits_run.run_dir, tmp_path, dirs_exist_ok=True)
    first_runs = set((tmp_path / "wandb").glob("offline-run-*"))
    train(load_config(None, [*SHORT_FIT, f"output_dir={tmp_path}"]))
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    first_run_file = written_run_file(digits_run.run_dir)  # on disk whole, as the re-run's, once wandb has ended
    (rerun,) = set((tmp_path / "wandb").glob("offline-run-*")) - first_runs
    (rerun_file,) = rerun.glob("run-*.wandb")
    for run_file in (first_run_file, rerun_file):
        rows = [row for row in history(run_file) if "tradeoff/table/_type" in row]  # wandb flattens a Table's fields
        assert [row["trainer/global_step"] for row in rows] == [step] and step > 0
    assert summary(rerun_file)["trainer/global_step"] == step
    assert json.loads((tmp_path / "tradeoff.json").read_text())["global_step"] == step
