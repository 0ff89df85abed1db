"""The training framework end to end on the bundled digits: fit, metrics, wandb, trade-off, resume."""
import csv
import gc
import os
import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from tome_train.cli import main, train
from tome_train.config import load_config, peak_lr
from tome_train.models import build_model
from tome_train.module import ToMeClassifier
from tome_train.tome import apply_tome, set_r, token_counts
from tome_train.tradeoff import format_table, images_per_s, trained_summary

from conftest import ROOT, SHORT_FIT
from wandb_records import history, run_config, summary, written_run_file


def test_short_fit_beats_chance_by_a_wide_margin(digits_run):
    assert digits_run.result["val_top1"] > 50.0  # chance is 10%


def test_checkpoints_keep_best_and_last(digits_run):
    names = sorted(p.name for p in (digits_run.run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    ckpt = torch.load(digits_run.last, map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["name"] == digits_run.cfg.name
    assert ckpt["global_step"] > 0


def test_wandb_offline_run_holds_history_config_and_table(digits_run):
    runs = list((digits_run.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "no API key: the run must be offline, in one run directory"
    run = runs[0]
    run_file = written_run_file(digits_run.run_dir)
    rows = history(run_file)
    keys = set().union(*rows)
    for key in ("train/loss", "train/lr", "train/device/samples_per_sec", "tokens/final", "tokens/layer_00", "val/top1", "val/top5"):
        assert key in keys, key
    rate = next(row for row in rows if "train/device/samples_per_sec" in row)
    module = ToMeClassifier(load_config(None, []))  # FLOPs per training image: forward at r=6 and the backward
    assert rate["train/device/flops_per_sec"] / rate["train/device/samples_per_sec"] == pytest.approx(
        3 * module.image_flops(6), rel=1e-9)
    val = [row["val/top1"] for row in rows if "val/top1" in row]
    assert len(val) == 8  # once per epoch, untouched by the r sweep after training
    assert [row["data/unreadable"] for row in rows if "data/unreadable" in row] == [0.0] * 8
    assert abs(val[-1] - digits_run.result["val_top1"]) < 1e-6
    tokens = [row["tokens/final"] for row in rows if "tokens/final" in row]
    assert set(tokens) == {token_counts([6] * 6, 65, 1)[-1]}
    assert list(run.glob("files/media/table/tradeoff/table_*.table.json"))
    config = run_config(run_file)
    assert config["name"] == "digits_vit_r6" and config["tome"]["r_train"] == 6
    assert config["trainer"]["epochs"] == 8  # the resolved config, overrides included


def test_tradeoff_table_plot_and_merge_pictures(digits_run, capsys):
    with open(digits_run.run_dir / "tradeoff.csv") as f:
        rows = list(csv.DictReader(f))
    # what the run bought at its trained r=6, as scalars of the run's wandb summary (its table of runs sorts by them)
    bought = summary(written_run_file(digits_run.run_dir))
    trained, untrained = (next(row for row in rows if row["r"] == r) for r in ("6", "0"))
    assert bought["tradeoff/speedup"] == pytest.approx(float(trained["speedup"]))
    assert bought["tradeoff/flop_bound"] == pytest.approx(float(trained["flop_bound"])) and bought["tradeoff/flop_bound"] > 1.4
    assert bought["tradeoff/top1_change"] == pytest.approx(float(trained["top1"]) - float(untrained["top1"]))
    assert trained_summary([{**row, "r": int(row["r"])} for row in rows], (6, -1)) == {}  # a schedule is not swept
    assert [int(r["r"]) for r in rows] == [0, 6, 8]
    assert [int(r["tokens_final"]) for r in rows] == [65, token_counts([6] * 6, 65, 1)[-1], token_counts([8] * 6, 65, 1)[-1]]
    assert float(rows[0]["speedup"]) == 1.0 and float(rows[0]["flop_bound"]) == 1.0
    assert float(rows[2]["flop_bound"]) > float(rows[1]["flop_bound"]) > 1.0
    # at the r it was trained with, the sweep validates the trained model as the last epoch did
    assert float(rows[1]["top1"]) == pytest.approx(digits_run.result["val_top1"], abs=1e-4)
    assert float(rows[0]["top1"]) > 50.0  # unmerged, the same weights still classify (chance is 10%)
    assert [float(r["top1"]) for r in rows] == pytest.approx([row["top1"] for row in digits_run.result["tradeoff"]], abs=1e-4)
    table = format_table(digits_run.result["tradeoff"], 6).splitlines()
    assert [line.split()[:2] for line in table[1:]] == [["0", "65"], ["6", "(trained)"], ["8", rows[2]["tokens_final"]]]
    for name in ("tradeoff.png", "merge_vis.png"):
        with Image.open(digits_run.run_dir / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100


def test_throughput_sweep_times_every_r_in_turn_at_its_own_token_count():
    model = apply_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=3,
                                         num_heads=2, num_classes=10), r=0).eval()
    tokens_out = []
    model.blocks[-1].register_forward_hook(lambda block, args, out: tokens_out.append(out.shape[1]))
    order = []

    def set_and_record(r):
        order.append(r)
        set_r(model, r)

    measured = images_per_s(model, torch.randn(4, 3, 32, 32), set_and_record, [0, 6, 8], steps=3)
    assert order == [0, 6, 8] + [0, 6, 8] + [8, 6, 0] + [0, 6, 8]  # a warm-up pass each, then rounds both ways
    final = {r: token_counts([r] * 3, 65, 1)[-1] for r in (0, 6, 8)}
    assert tokens_out == [final[r] for r in order] and len(set(final.values())) == 3
    assert sorted(measured) == [0, 6, 8] and all(v > 0 for v in measured.values())


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_the_trade_off_is_measured_in_the_precision_the_run_trained_in(tmp_path, precision):
    """bf16-true: weights in bf16, so the sweep's images must be too (an fp32 batch was a traceback after training);
    bf16-mixed: under autocast. Both as Lightning's precision plugin runs the steps."""
    cfg = load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
                             f"trainer.precision={precision}", "tradeoff.r_values=[0,6]", "tradeoff.bench_steps=1",
                             "tradeoff.num_vis_images=1", "wandb.mode=disabled", f"output_dir={tmp_path}"])
    rows = train(cfg)["tradeoff"]
    assert [row["r"] for row in rows] == [0, 6] and all(row["images_per_s"] > 0 for row in rows)
    with Image.open(tmp_path / "merge_vis.png") as image:
        assert image.size[0] > 100


def test_a_two_process_ddp_run_validates_and_measures_its_trade_off_on_every_rank(tmp_path):
    """Two CPU processes (Lightning's DDP launcher starts the second as ``train.py`` again): each rank validates
    its share of the sweep and times the model; rank 0 writes. Validation's top-1, the same on both ranks once
    torchmetrics has synced its counts, is logged without Lightning's warning of unsynced epoch-level logs. With an
    EMA, as the DeiT recipes have: its copy's parameters wanted gradients, so DDP stopped the second step."""
    command = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(tmp_path), "trainer.devices=2",
               "optim.ema_decay=0.9", "trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
               "tradeoff.r_values=[0,6]", "tradeoff.bench_steps=1", "tradeoff.num_vis_images=1", "wandb.mode=disabled"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sync_dist" not in result.stderr
    with open(tmp_path / "tradeoff.csv") as f:
        assert [int(row["r"]) for row in csv.DictReader(f)] == [0, 6]


def test_mixup_and_cutmix_train_on_soft_targets_as_the_deit_and_mae_recipes_do(tmp_path):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from tome_train.module import ToMeClassifier

    cfg = load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
                             "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0", "trainer.accumulate_grad_batches=2",
                             "trainer.log_every_n_steps=1", "tradeoff.enabled=false", f"output_dir={tmp_path}"])
    module = ToMeClassifier(cfg)
    assert isinstance(module.mixup, Mixup) and isinstance(module.train_loss, SoftTargetCrossEntropy)
    train(cfg)
    losses = [row["train/loss"] for row in history(written_run_file(tmp_path)) if "train/loss" in row]
    assert losses and all(0 < loss < 10 for loss in losses)


def test_resume_continues_the_global_step(digits_run, tmp_path):
    first = torch.load(digits_run.last, map_location="cpu", weights_only=False)
    steps_per_epoch = first["global_step"] // 8
    cfg = load_config(None, [*SHORT_FIT, "trainer.epochs=9", "tradeoff.enabled=false", f"output_dir={tmp_path}"])
    train(cfg, resume=str(digits_run.last))
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 9 * steps_per_epoch
    assert resumed["epoch"] == first["epoch"] + 1


def test_resuming_another_models_checkpoint_is_one_line_exit_2_and_writes_nothing(digits_run, tmp_path, capsys):
    """Lightning would find the mismatch when it restores, after the run directory and the wandb run are made."""
    for override, said in (("model.num_classes=12", "model.head.weight is [10, 96] in the checkpoint and [12, 96] in "
                                                    "this model; resume with the config of the run that wrote it"),
                           ("optim.ema_decay=0.9", "(and 79 more) is in this model, not in the checkpoint")):
        code = main(["--output-dir", str(tmp_path / "run"), "--resume", str(digits_run.last), override])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: cannot resume from {digits_run.last}: ") and said in err, err
        assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, devices, share", [
    (["data.batch_size=2000"], 1, 1437),
    (["data.batch_size=1000", "trainer.devices=2"], 2, 719),  # ceil(1437 / 2): the sampler pads the ranks equal
])
def test_a_batch_larger_than_a_devices_share_of_the_data_is_one_line_exit_2(tmp_path, capsys, args, devices, share):
    """It trained nothing and reported the untrained model as a finished run's."""
    assert main(["--output-dir", str(tmp_path / "run"), *args]) == 2
    assert capsys.readouterr().err == (f"error: {args[0]} leaves no whole training batch: each of {devices} device(s) "
                                       f"gets {share} training images an epoch; use a batch size of at most {share}\n")
    assert list(tmp_path.iterdir()) == []
    assert main(["--dry-run", *args]) == 2 and "leaves no whole training batch" in capsys.readouterr().err


def test_more_classes_in_the_data_than_the_model_has_outputs_is_one_line_exit_2(tmp_path, capsys):
    """A label past the model's outputs stopped training at its first batch, the run directory made."""
    assert main(["--output-dir", str(tmp_path / "run"), "model.num_classes=5"]) == 2
    assert capsys.readouterr().err == ("error: the digits data has 10 classes, more than model.num_classes=5: set "
                                       "model.num_classes=10\n")
    assert list(tmp_path.iterdir()) == []


def test_a_shard_label_past_the_models_outputs_is_one_line_exit_2_on_a_line_of_its_own(tmp_path, capsys):
    """Shards carry no class list, so the label is found as the data is read: in a DataLoader worker, whose error
    PyTorch re-raises with the worker's traceback as its message, under Lightning's progress bar."""
    from tome_train.data import write_digits_shards

    info = write_digits_shards(str(tmp_path / "shards"), img_size=32)
    args = ["--output-dir", str(tmp_path / "run"), *SHORT_FIT, "model.img_size=32", "model.num_classes=5",
            "wandb.mode=disabled", "data.source=webdataset", f"data.root={tmp_path / 'shards'}", "data.num_workers=2",
            f"data.train_shards={info['train']['pattern']}", f"data.val_shards={info['val']['pattern']}",
            f"data.train_samples={info['train']['samples']}", f"data.val_samples={info['val']['samples']}"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    error = err.splitlines()[-1]  # after wandb's own warnings
    assert error.startswith("error: webdataset: sample digits_") and error.endswith(
        f" in {tmp_path / 'shards'}/imagenet1k-validation-00.tar has label 8, not one of model.num_classes=5's 0..4")
    assert "Traceback" not in err
    assert out.endswith(("\n", "\r")), "the progress bar the error came under is closed: the error starts a line"
    gc.collect()  # the failed run's loader workers, held in reference cycles, end now rather than in xdist's shutdown


def _imagefolder_run(tmp_path, unreadable_val: int) -> list[str]:
    """Arguments of a one-epoch run on a tree of 2 classes x 4 images, ``unreadable_val`` of its 8 validation images
    text files named .png."""
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(4):
                path = tmp_path / "tree" / split / c / f"{c}{i}.png"
                if split == "val" and 4 * ("ant", "bee").index(c) + i < unreadable_val:
                    path.write_text("not an image")
                else:
                    Image.new("RGB", (32, 32), (60 * i, 30, 200)).save(path)
    return ["--output-dir", str(tmp_path / "run"), "data.source=imagefolder", f"data.root={tmp_path / 'tree'}",
            "data.batch_size=2", "trainer.epochs=2", "tradeoff.enabled=false", "wandb.mode=disabled"]


def test_a_validation_that_read_no_image_is_one_line_exit_2(tmp_path, capsys):
    """Every validation image unreadable: the run reported a top-1 of 0.00% and exited 0."""
    assert main(_imagefolder_run(tmp_path, unreadable_val=8)) == 2
    err = capsys.readouterr().err
    assert err.endswith("error: validation read no images: every one was unreadable or missing (see the warnings of "
                        "skipped images): check the validation data\n"), err[-500:]


def test_a_validation_short_of_the_data_is_said_once(tmp_path, capsys):
    """Some validation images unreadable (a truncated shard, a bad copy): the top-1 is over fewer images than the
    data holds, which only warnings of skipped images hinted at."""
    assert main(_imagefolder_run(tmp_path, unreadable_val=3)) == 0
    out = capsys.readouterr().out
    assert out.count("note: validation read 5 of the 8 images of the data (data.val_samples for shards): its top-1 "
                     "is over those it read; the others were unreadable or missing") == 1, out[-2000:]


def test_resuming_on_data_of_other_classes_is_refused_unless_chosen(tmp_path, capsys):
    """A data location may change on resume (the data moved); its classes may not: the model's outputs would mean
    other classes. ``--resume`` continues all the same, saying so."""
    for root, classes in (("a", ("ant", "bee", "cat")), ("b", ("ant", "bee", "dog"))):
        for c in classes:
            (tmp_path / root / "train" / c).mkdir(parents=True)
            (tmp_path / root / "val" / c).mkdir(parents=True)
            for i in range(4):
                image = Image.new("RGB", (40, 36), (60 * i, 0, 0))
                image.save(tmp_path / root / ("train" if i else "val") / c / f"{c}{i}.jpg")
    run = tmp_path / "run"
    args = ["--output-dir", str(run), "trainer.epochs=1", "tradeoff.enabled=false", "wandb.mode=disabled",
            "data.source=imagefolder", "data.batch_size=3"]
    assert main([*args, f"data.root={tmp_path / 'a'}"]) == 0
    last = run / "checkpoints" / "last.ckpt"
    written = last.read_bytes()
    capsys.readouterr()
    assert main([*args, f"data.root={tmp_path / 'b'}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot resume from {last}: its run was trained with other settings (data class 2: 'cat' -> 'dog'); "
        f"rerun with them, start a new run with --output-dir DIR, or continue this one with these by --resume {last}")
    assert last.read_bytes() == written
    assert main([*args, f"data.root={tmp_path / 'b'}", "--dry-run", "--resume", str(last)]) == 0
    assert "with changes: data class 2: 'cat' -> 'dog'" in capsys.readouterr().out


def test_a_warmup_as_long_as_the_run_is_said(tmp_path, capsys):
    """``python train.py trainer.epochs=2`` on the digits recipe (2 warmup epochs) trains only while the lr warms up;
    timm's scheduler said only that its cosine annealing would have no effect."""
    quick = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "tradeoff.enabled=false",
             "wandb.mode=disabled"]
    assert main(["--output-dir", str(tmp_path / "two"), "trainer.epochs=2", *quick]) == 0
    assert ("note: optim.warmup_epochs=2 covers the whole run (2 epoch(s), 4 steps): the lr only rises from 1e-05 "
            "toward 0.002 and never decays") in capsys.readouterr().out
    assert main(["--output-dir", str(tmp_path / "three"), "trainer.epochs=3", *quick]) == 0
    assert "note: optim.warmup_epochs" not in capsys.readouterr().out


@pytest.mark.parametrize("r, flops", [("6", "67.6 M"), ("8@-1", "46.2 M")])
def test_the_model_summary_counts_the_models_flops(caplog, r, flops):
    """Lightning's summary counted FLOPs only by an example forward, so every run's printed "0 Total Flops": the
    model's row and the total are one digits image's forward at the training schedule, a multiply-add two FLOPs
    (at r=0 96.6 M, which torch's counter gives with attention computed by plain products)."""
    import logging

    import pytorch_lightning as pl

    from tome_train.module import ModelSummaryWithFlops, ToMeClassifier

    module = ToMeClassifier(load_config(None, [f"tome.r_train={r}"]))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning.callbacks.model_summary"):
        ModelSummaryWithFlops().on_fit_start(trainer, module)
    rows = caplog.text.splitlines()
    assert [row.split("|")[-1].strip() for row in rows if "| model " in row] == [flops]
    assert f"{flops:<10}Total Flops" in rows


def test_unreadable_images_are_logged_per_epoch(tmp_path):
    """One unreadable validation image (the last, past the sanity check's batches): one per epoch in wandb."""
    from tome_train.data import write_digits_shards
    from tome_train.data.digits import digits_split

    _, val_indices = digits_split(0.2)
    info = write_digits_shards(str(tmp_path / "shards"), img_size=32, corrupt=[f"digits_{val_indices[-1]:04d}"])
    cfg = load_config(None, [
        "trainer.epochs=2", "trainer.limit_train_batches=2", "tradeoff.enabled=false", "data.source=webdataset",
        f"data.root={tmp_path / 'shards'}", f"data.train_shards={info['train']['pattern']}",
        f"data.val_shards={info['val']['pattern']}", f"data.train_samples={info['train']['samples']}",
        f"data.val_samples={info['val']['samples']}", f"output_dir={tmp_path / 'run'}"])
    train(cfg)
    rows = history(written_run_file(tmp_path / "run"))
    assert [row["data/unreadable"] for row in rows if "data/unreadable" in row] == [1.0, 1.0]


def test_rerunning_a_finished_run_reports_its_accuracy(digits_run, tmp_path, capsys):
    """The same command again (``make demo`` twice): nothing more to train, the same checkpoint and
    the same final accuracy, not a missing one."""
    import shutil

    shutil.copytree(digits_run.run_dir / "checkpoints", tmp_path / "checkpoints")
    last = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    cfg = load_config(None, [*SHORT_FIT, "tradeoff.enabled=false", f"output_dir={tmp_path}"])
    result = train(cfg)
    assert "already finished" in capsys.readouterr().out
    assert result["val_top1"] == pytest.approx(digits_run.result["val_top1"], abs=1e-4)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == last


def test_a_run_directory_holding_a_run_of_other_settings_is_resumed_only_when_chosen(digits_run, tmp_path, capsys):
    """``python train.py tome.r_train=8`` after the default run must not continue that r=6 run in its directory as if
    it were this one (and overwrite its checkpoints); ``--resume`` continues it with the change, saying so."""
    import shutil

    shutil.copytree(digits_run.run_dir / "checkpoints", tmp_path / "checkpoints")
    last = tmp_path / "checkpoints" / "last.ckpt"
    written = last.read_bytes()
    args = ["--output-dir", str(tmp_path), *SHORT_FIT, "tradeoff.enabled=false", "tome.r_train=8"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: cannot resume from {last}: its run was trained with other settings (tome.r_train: 6 -> 8); rerun "
        f"with them, start a new run with --output-dir DIR, or continue this one with these by --resume {last}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"] and last.read_bytes() == written
    # a fine-tune from other weights into that directory is no continuation of its run either (it resumed it, and
    # the weights it was given went unused, unsaid)
    start = digits_run.run_dir / "checkpoints" / "last.ckpt"
    assert main(["--output-dir", str(tmp_path), *SHORT_FIT, "tradeoff.enabled=false", f"model.checkpoint={start}"]) == 2
    assert f"(model.checkpoint: None -> '{start}')" in capsys.readouterr().err
    assert main([*args, "--dry-run"]) == 2 and capsys.readouterr().err.startswith(f"error: cannot resume from {last}:")
    assert main([*args, "--dry-run", "--resume", str(last)]) == 0
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert f"\nresumes {last} at step {step}, with changes: tome.r_train: 6 -> 8\n" in capsys.readouterr().out
    assert main([*args, "trainer.epochs=12", "--resume", str(last)]) == 0  # a change of trainer.* is no other run
    assert f"resuming from {last} with changes: tome.r_train: 6 -> 8\n" in capsys.readouterr().out


def test_a_moved_run_directory_keeps_its_best_checkpoint(digits_run, tmp_path):
    """Lightning forgets its best scores where the checkpoint folder's path changed: a run directory copied or moved
    elsewhere and resumed saved its next epoch as the best, even when worse, beside the best it no longer knew."""
    import shutil

    shutil.copytree(digits_run.run_dir / "checkpoints", tmp_path / "checkpoints")
    cfg = load_config(None, [*SHORT_FIT, "tradeoff.enabled=false", f"trainer.epochs={digits_run.cfg.trainer.epochs + 1}",
                             f"output_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1


def test_a_checkpoint_of_another_run_directory_starts_its_best_afresh(tmp_path):
    """``--resume runs/a/checkpoints/last.ckpt --output-dir runs/b``: b's best is b's own, as Lightning has it; only a
    directory that moved, whose best file moved with it, keeps its best."""
    from tome_train.checkpoint_io import MovableModelCheckpoint

    old, new = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    state = {"monitor": "val/top1", "best_model_score": torch.tensor(90.0), "best_model_path": str(old / "best.ckpt"),
             "current_score": torch.tensor(90.0), "dirpath": str(old), "kth_value": torch.tensor(90.0),
             "best_k_models": {str(old / "best.ckpt"): torch.tensor(90.0)}, "kth_best_model_path": str(old / "best.ckpt"),
             "last_model_path": ""}
    another_run = MovableModelCheckpoint(dirpath=new, monitor="val/top1", mode="max")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        another_run.load_state_dict(state)
    assert another_run.best_model_score is None and another_run.best_k_models == {}
    new.mkdir(parents=True)
    (new / "best.ckpt").touch()
    moved = MovableModelCheckpoint(dirpath=new, monitor="val/top1", mode="max")
    moved.load_state_dict(state)
    assert moved.best_model_path == str(new / "best.ckpt") and moved.best_k_models == {str(new / "best.ckpt"): 90.0}


def test_a_loaded_checkpoint_predicts_at_its_evaluation_schedule(digits_run):
    """trainer.predict ran the schedule the module was built with, r_train, where validation and export run r_eval."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from tome_train.module import ToMeClassifier

    config = OmegaConf.to_container(OmegaConf.merge(digits_run.cfg, {"tome": {"r_eval": 0}}), resolve=True)
    module = ToMeClassifier.load_from_checkpoint(digits_run.last, map_location="cpu", config=config).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    predicted = trainer.predict(module, dataloaders=torch.utils.data.DataLoader(images, batch_size=4))[0]
    labelled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(4)), batch_size=4)
    assert torch.equal(trainer.predict(module, dataloaders=labelled)[0], predicted)  # the data module's batches
    module.set_schedule(0)
    with torch.no_grad():
        unmerged = module(images)
    module.set_schedule(module.train_r)
    with torch.no_grad():
        merged = module(images)
    assert torch.allclose(predicted, unmerged, atol=1e-6) and not torch.allclose(predicted, merged, atol=1e-3)


def test_ema_is_evaluated_and_checkpointed(tmp_path, monkeypatch, capsys):
    """The EMA takes in the weights once per optimizer step (two batches each here), and a fine-tuning run given the
    checkpoint as model.checkpoint starts from the EMA weights, as timm prefers them, and says so."""
    from timm.utils import ModelEmaV3

    cfg = load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
                             "trainer.accumulate_grad_batches=2", "optim.ema_decay=0.9", "tradeoff.enabled=false",
                             f"output_dir={tmp_path}"])
    update, steps = ModelEmaV3.update, []
    monkeypatch.setattr(ModelEmaV3, "update", lambda self, model, step=None: (steps.append(step),
                                                                               update(self, model, step))[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert steps == [1, 2]
    assert not [w for w in caught if "eval mode" in str(w.message)]  # the EMA copy is no mistake to warn of
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # Lightning's, of torch's LeafSpec
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ema = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}
    raw = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert len(ema) == len(raw) > 0
    assert any(not torch.equal(ema["ema.module." + k[6:]], v) for k, v in raw.items() if v.is_floating_point())
    assert any("val/ema_top1" in row for row in history(written_run_file(tmp_path)))
    last = tmp_path / "checkpoints" / "last.ckpt"
    finetuned = build_model(OmegaConf.merge(cfg.model, {"checkpoint": str(last)}))
    assert all(torch.equal(v, ema["ema.module." + k]) for k, v in finetuned.state_dict().items())
    capsys.readouterr()
    train(load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                             "tradeoff.enabled=false", f"model.checkpoint={last}", f"output_dir={tmp_path / 'tuned'}"]))
    assert capsys.readouterr().out.startswith(f"checkpoint {last}: format=dict['state_dict'], EMA weights, tensors=")


def test_the_logged_lr_is_the_schedules_under_layer_decay(tmp_path):
    cfg = load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                             "trainer.log_every_n_steps=1", "optim.warmup_epochs=0", "optim.layer_decay=0.5",
                             "tradeoff.enabled=false", f"output_dir={tmp_path}"])
    train(cfg)
    first = next(row["train/lr"] for row in history(written_run_file(tmp_path)) if "train/lr" in row)
    assert first == pytest.approx(peak_lr(cfg, cfg.data.batch_size), rel=1e-6)  # the deepest group's is 0.5**depth of it


@pytest.mark.parametrize("clip_grad, moved", [(None, (0.5, 1.01)), (1e-9, (0.0, 0.01))])
def test_gradients_are_clipped_to_optim_clip_grad(tmp_path, clip_grad, moved):
    """One AdamW step from the seeded initial weights, without weight decay: each weight moves by about the lr
    (Adam's first step is g/|g|), and by a tiny share of it where the gradient's norm was clipped far below eps."""
    cfg = load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                             "optim.warmup_epochs=0", "optim.weight_decay=0", f"optim.clip_grad={clip_grad or 'null'}",
                             "tradeoff.enabled=false", f"output_dir={tmp_path}"])
    pl.seed_everything(cfg.seed, verbose=False)
    initial = ToMeClassifier(cfg).model.blocks[0].mlp.fc1.weight.detach().clone()
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    step = (ckpt["state_dict"]["model.blocks.0.mlp.fc1.weight"] - initial).abs().max().item()
    low, high = moved
    assert low * peak_lr(cfg, cfg.data.batch_size) <= step <= high * peak_lr(cfg, cfg.data.batch_size)


def test_compiled_training_in_a_compile_mode(tmp_path, monkeypatch):
    """trainer.compile=reduce-overhead (CUDA graphs on a GPU; on this CPU the compiler alone): the patched
    model is compiled in place, trains and validates, and its checkpoint keeps the plain parameter names.
    Two blocks (both merging), as every block compiles on its own token count. The fit chooses the kernels by the
    device's time alone (its steps replay as CUDA graphs), and only the fit."""
    import contextlib

    from torch._dynamo.utils import counters

    from tome_train.tome import kernels

    choosing_for_graphs, fits = kernels.choosing_for_graphs, []

    @contextlib.contextmanager
    def recorded():
        with choosing_for_graphs():
            fits.append(kernels.FastestPath.device_time_only)
            yield

    monkeypatch.setattr(kernels, "choosing_for_graphs", recorded)
    graphs = counters["stats"]["unique_graphs"]
    cfg = load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                             "model.timm_kwargs.depth=2", "trainer.compile=reduce-overhead", "tradeoff.enabled=false",
                             f"output_dir={tmp_path}"])
    train(cfg)
    assert fits == [True] and not kernels.FastestPath.device_time_only
    assert counters["stats"]["unique_graphs"] > graphs
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1  # an int limit counts batches, as Lightning's does, even at 1
    assert ckpt["state_dict"] and not any("_orig_mod" in key for key in ckpt["state_dict"])


@pytest.mark.parametrize("argv, error", [
    (["--bogus"], "error: unrecognized arguments: --bogus (see train.py --help)\n"),
    (["--nodes", "x"], "error: argument --nodes: 'x' is not allowed: use an integer >= 1 (see train.py --help)\n"),
])
def test_a_command_line_argparse_refuses_is_one_line_exit_2(capsys, argv, error):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and capsys.readouterr().err == error


@pytest.mark.parametrize("argv, error", [
    (["--output-dir", "{run}", "output_dir={run}b"],
     "error: --output-dir {run} and the override 'output_dir={run}b' both set output_dir: give one of them\n"),
    (["--slurm", "--dry-run", "--nodes", "2", "trainer.num_nodes=4"],
     "error: --nodes 2 and the override 'trainer.num_nodes=4' both set trainer.num_nodes: give one of them\n"),
    (["--slurm", "--dry-run", "--gpus-per-node", "2", "trainer={{epochs: 1, devices: 4}}"],  # {{: str.format's {
     "error: --gpus-per-node 2 and the override 'trainer={{epochs: 1, devices: 4}}' both set trainer.devices: give one of "
     "them\n"),
    (["--nodes", "2"], "error: --nodes 2 is an option of --slurm, which was not given (a run started here takes "
                       "trainer.num_nodes=N)\n"),
    (["--partition", "gpu", "trainer.epochs=1"], "error: --partition gpu is an option of --slurm, which was not given\n"),
])
def test_a_flag_no_run_would_read_or_one_an_override_contradicts_is_refused(tmp_path, capsys, argv, error):
    """The flag used to win silently over an override of its key, and SLURM flags without --slurm were ignored: a
    run on one node where two were asked for."""
    run = tmp_path / "run"
    assert main([a.format(run=run) for a in argv]) == 2
    assert capsys.readouterr().err == error.format(run=run) and not run.exists()


def test_the_sweep_always_holds_r_0_and_the_trained_r():
    """Without r=0 the speedups were over the smallest r swept, labelled as over r=0; without the trained r the run
    had no row of its own (no star, no summary scalars)."""
    from tome_train.tradeoff import sweep_values

    assert sweep_values(load_config(None, ["tradeoff.r_values=[8,6]"]), 65, 1, 6) == [0, 6, 8]
    assert sweep_values(load_config(None, ["tradeoff.r_values=[0,8]"]), 65, 1, 6) == [0, 6, 8]
    assert sweep_values(load_config(None, ["tradeoff.r_values=[8]"]), 65, 1, [4, 4]) == [0, 8]


def test_a_validation_limited_to_one_batch_is_not_said_to_be_short_of_the_data(tmp_path, capsys):
    """Lightning's limit_val_batches=1 (an int) is one batch, which equals 1.0 (the whole set) in Python."""
    cfg = load_config(None, ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                             "tradeoff.enabled=false", "wandb.mode=disabled", f"output_dir={tmp_path}"])
    train(cfg)
    assert "note: validation read" not in capsys.readouterr().out
