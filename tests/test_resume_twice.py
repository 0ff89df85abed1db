"""Two preemptions in one epoch: a run resumed mid-epoch, whose own checkpoint later in that epoch is resumed again,
trains exactly the unbroken run's batches, in its order (real Lightning fits of a linear classifier).

The unbroken run's checkpoint at step 15 (epoch 1, one batch of 14 trained) is resumed up to step 20; that run's
checkpoint at step 18 (four batches) is resumed to the end. With two shard-reading workers, the resumed stream took its
batches from worker 0 first, as every pass does: after an odd count its workers' batches came in the other order, so
that the second checkpoint's four batches were three of worker 0's and one of worker 1's, where the count assumes two
each: the second resume trained a batch of worker 0 again and never one of worker 1.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from tome_train.config import DataConfig
from tome_train.data import ImageDataModule, write_digits_shards

from conftest import ROOT
from linear_fit import fit_linear

EVERY, FIRST, SECOND, STOP = 3, 15, 18, 20  # checkpoints every 3 steps; 14 batches an epoch, 2 epochs


def _data_cfg(tmp_path, source: str, workers: int):
    """The digits at 8 px in batches of 100 (14 a training epoch), as they are or as shards written to ``tmp_path``."""
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(OmegaConf.load(ROOT / "configs/data/digits.yaml").data)
    cfg.merge_with(dict(num_workers=workers, batch_size=100))
    if source == "webdataset":
        info = write_digits_shards(str(tmp_path), img_size=8)
        cfg.merge_with(dict(source="webdataset", root=str(tmp_path), train_shards=info["train"]["pattern"],
                            val_shards=info["val"]["pattern"], train_samples=info["train"]["samples"],
                            val_samples=info["val"]["samples"]))
    return cfg


@pytest.mark.parametrize("source, workers", [("webdataset", 2), ("digits", 0)])
def test_a_run_resumed_twice_in_one_epoch_trains_the_unbroken_runs_batches(tmp_path, source, workers):
    cfg = _data_cfg(tmp_path, source, workers)

    def fit(run, **kwargs):
        every = ModelCheckpoint(dirpath=tmp_path / run, every_n_train_steps=EVERY, save_top_k=-1)
        return fit_linear(ImageDataModule(cfg, 8, seed=0, with_meta=True), [every], max_epochs=2, **kwargs)

    unbroken = fit("unbroken")
    assert len(unbroken) == 28 and len(set(unbroken)) == 28
    first = fit("first", max_steps=STOP, ckpt_path=str(tmp_path / "unbroken" / f"epoch=1-step={FIRST}.ckpt"))
    second_ckpt = tmp_path / "first" / f"epoch=1-step={SECOND}.ckpt"
    state = torch.load(second_ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": 1, "batches_done": SECOND - 14}]  # the epoch's, not the resumed run's 3
    second = fit("second", ckpt_path=str(second_ckpt))
    # epoch 1 as trained up to each checkpoint that was resumed, then to the end: none twice, none missing
    assert sorted(unbroken[14:FIRST] + first[:SECOND - FIRST] + second) == sorted(unbroken[14:])
    assert first == unbroken[FIRST:STOP] and second == unbroken[SECOND:]  # in the unbroken run's order


@pytest.mark.parametrize("source, workers", [("webdataset", 2), ("digits", 2)])
def test_a_run_resumed_at_an_epochs_end_trains_the_next_epoch_in_the_unbroken_order(tmp_path, source, workers):
    """Saved at epoch 0's last batch (``every_n_train_steps`` landing there), the resumed pass was built before
    Lightning moved the epoch on: all of epoch 0's batches done, it was empty, and epoch 1 trained nothing. Saved at
    the epoch's end (``on_train_epoch_end``), its workers drew epoch 0's order for epoch 1."""
    cfg = _data_cfg(tmp_path, source, workers)

    def fit(run, **kwargs):
        callbacks = [ModelCheckpoint(dirpath=tmp_path / run, every_n_train_steps=7, save_top_k=-1),
                     ModelCheckpoint(dirpath=tmp_path / run, filename="end-{epoch}", every_n_epochs=1,
                                     save_on_train_epoch_end=True, save_top_k=-1)]
        return fit_linear(ImageDataModule(cfg, 8, seed=0, with_meta=True), callbacks, max_epochs=3, **kwargs)

    unbroken = fit("unbroken")
    assert len(unbroken) == 42 and len(set(unbroken)) == 42
    for name in ("epoch=0-step=14.ckpt", "end-epoch=0.ckpt"):
        assert fit("resumed", ckpt_path=str(tmp_path / "unbroken" / name)) == unbroken[14:], name
