"""A real two-process CPU run (gloo, Lightning's DDP launcher) through ImageDataModule.

The test runs this file as a script; Lightning's ``strategy="ddp"`` starts the second rank by running
it again. Each rank records, per batch, which worker produced it and which samples it held, and
writes them out; the test then checks, from outside:

* webdataset training: ranks x workers read disjoint shards, every rank runs the same number of
  batches (the one Lightning expects from ``len(loader)``), and epochs reshuffle the assignment;
* webdataset validation: every validation sample evaluated exactly once across ranks and workers,
  although the shards do not divide evenly (the ranks get different batch counts and the metrics,
  reduced at epoch end, still come out; a per-step collective would have hung here);
* digits (map-style) validation: every sample exactly once as well;
* both, stopped mid-epoch and resumed from a checkpoint: each rank trains on the batches it had not.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BATCH = 16
EPOCHS = 2
BATCHES_PER_EPOCH = 44  # 1,437 training images over 2 ranks, 16 a batch (the shards: 1,437 // 32; digits: 719 // 16)
RESUMED_AT = 48  # the checkpoint every 4 steps the stopped run (max_steps 50) saved last: 4 batches into epoch 1


def _data_cfg(source: str, shards: dict | None, root: str | None):
    from omegaconf import OmegaConf

    from tome_train.config import DataConfig

    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(OmegaConf.load(REPO / "configs/data/digits.yaml").data)
    cfg.source, cfg.batch_size, cfg.num_workers = source, BATCH, 2
    if shards is not None:
        cfg.root = root
        cfg.train_shards, cfg.val_shards = shards["train"]["pattern"], shards["val"]["pattern"]
        cfg.train_samples, cfg.val_samples = shards["train"]["samples"], shards["val"]["samples"]
    return cfg


def _run_rank(out: Path) -> None:
    """What each rank runs: two short fits (webdataset, then digits) recording what they saw."""
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    import torchmetrics

    from tome_train.data import ImageDataModule

    torch.set_num_threads(1)
    shards = json.loads((out / "shards.json").read_text())

    class Probe(pl.LightningModule):
        def __init__(self, tag: str):
            super().__init__()
            self.tag = tag
            self.head = torch.nn.Linear(3, 10)
            self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)
            self.seen = defaultdict(list)

        def _step(self, batch, split):
            x, y, meta = batch
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
            workers = meta["worker"].unique().tolist()
            assert len(workers) == 1, "a batch comes from one worker"
            self.seen[f"{split}/{self.current_epoch}"].append(
                {"worker": workers[0], "keys": list(meta["key"]), "urls": sorted(set(meta["url"]))}
            )
            logits = self.head(x.mean((2, 3)))
            return logits, F.cross_entropy(logits, y), y

        def training_step(self, batch, index):
            return self._step(batch, "train")[1]

        def validation_step(self, batch, index):
            logits, loss, y = self._step(batch, "val")
            self.acc.update(logits, y)
            # metrics reduced across ranks once, at epoch end: safe with unequal batch counts
            self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
            self.log("val_acc", self.acc, on_step=False, on_epoch=True)

        def on_train_epoch_end(self):  # runs after this epoch's validation
            self.seen[f"metrics/{self.current_epoch}"].append(float(self.trainer.callback_metrics["val_loss"]))

        def on_fit_end(self):
            samplers = [type(self.trainer.train_dataloader.sampler).__name__,
                        type(self.trainer.val_dataloaders.sampler).__name__]
            record = {"rank": self.global_rank, "world": self.trainer.world_size, "samplers": samplers,
                      "num_training_batches": self.trainer.num_training_batches, "seen": self.seen}
            (out / f"{self.tag}_rank{self.global_rank}.json").write_text(json.dumps(record))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit(tag: str, cfg, ckpt_path: str | None = None, **kwargs) -> None:
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, logger=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            **{"enable_checkpointing": False, **kwargs},
        )
        trainer.fit(Probe(tag), datamodule=ImageDataModule(cfg, img_size=32, seed=0, with_meta=True),
                    ckpt_path=ckpt_path)

    for tag, cfg in (("wds", _data_cfg("webdataset", shards, str(out / "shards"))),
                     ("digits", _data_cfg("digits", None, None))):
        fit(tag, cfg)
        every_4_steps = ModelCheckpoint(dirpath=out / f"{tag}_checkpoints", every_n_train_steps=4, save_top_k=-1)
        fit(f"{tag}_stopped", cfg, max_steps=RESUMED_AT + 2, enable_checkpointing=True, callbacks=[every_4_steps])
        fit(f"{tag}_resumed", cfg, ckpt_path=str(out / f"{tag}_checkpoints" / f"epoch=1-step={RESUMED_AT}.ckpt"))


def _load(out: Path, tag: str) -> list[dict]:
    return [json.loads((out / f"{tag}_rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from tome_train.data import write_digits_shards

    out = tmp_path_factory.mktemp("ddp")
    # 8 train shards for 2 ranks x 2 workers; 5 val shards: slots get 2, 1, 1, 1 shards (unequal)
    shards = write_digits_shards(str(out / "shards"), img_size=32, train_per_shard=180, val_per_shard=72)
    assert shards["train"]["shards"] == 8 and shards["val"]["shards"] == 5
    (out / "shards.json").write_text(json.dumps(shards))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # Under load (pytest-xdist beside other DDP tests), a DataLoader worker forked while a thread of its rank held a
    # lock can hang in a futex before it starts (seen twice on 2 cores: the child still in popen_fork, the rank
    # waiting for its batch). Such a try is killed, its ranks and workers with it, and run once more; a hang of the
    # data itself (ranks with unequal batch counts) hangs both tries.
    for attempt in range(2):
        for stale in out.glob("*_checkpoints"):  # a killed try's: the next would save beside them as -v1
            shutil.rmtree(stale)
        proc = subprocess.Popen([sys.executable, __file__, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=240)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if attempt == 1:
                raise
    assert proc.returncode == 0, stderr[-4000:]
    return out, shards


def test_train_shards_disjoint_across_ranks_and_workers(ddp_run):
    out, shards = ddp_run
    ranks = _load(out, "wds")
    assignments = {}
    for epoch in range(EPOCHS):
        owner = {}
        for rec in ranks:
            for batch in rec["seen"][f"train/{epoch}"]:
                for url in batch["urls"]:
                    slot = (rec["rank"], batch["worker"])
                    assert owner.setdefault(url, slot) == slot, f"{url} read by {owner[url]} and {slot}"
        assert len(owner) == shards["train"]["shards"]  # 8 shards over 4 slots: all read
        assert len(set(owner.values())) == 4
        assignments[epoch] = owner
    assert assignments[0] != assignments[1], "the shard assignment should change with the epoch"


def test_equal_train_batch_counts(ddp_run):
    out, shards = ddp_run
    expected = shards["train"]["samples"] // (2 * BATCH)
    for rec in _load(out, "wds"):
        assert rec["num_training_batches"] == expected
        for epoch in range(EPOCHS):
            batches = rec["seen"][f"train/{epoch}"]
            assert len(batches) == expected
            assert all(len(b["keys"]) == BATCH for b in batches)
            # two workers share the quota: 22 + 22 batches
            per_worker = defaultdict(int)
            for b in batches:
                per_worker[b["worker"]] += 1
            assert sorted(per_worker.values()) == [expected // 2, expected - expected // 2]
    a, b = (rec["seen"]["train/0"] for rec in _load(out, "wds"))
    assert [x["keys"] for x in a] != [x["keys"] for x in b]


@pytest.mark.parametrize("tag", ["wds", "digits"])
def test_validation_covers_every_sample_exactly_once(ddp_run, tag):
    from tome_train.data.digits import digits_split

    out, shards = ddp_run
    _, val_idx = digits_split(0.2)
    expected = sorted(f"digits_{i:04d}" for i in val_idx)
    ranks = _load(out, tag)
    for epoch in range(EPOCHS):
        keys = [k for rec in ranks for batch in rec["seen"][f"val/{epoch}"] for k in batch["keys"]]
        assert len(keys) == len(expected), "no sample dropped, none padded or repeated"
        assert sorted(keys) == expected
        metrics = [rec["seen"][f"metrics/{epoch}"][0] for rec in ranks]
        assert metrics[0] == pytest.approx(metrics[1])  # reduced over both ranks
    if tag == "digits":  # Lightning kept our samplers (no DistributedSampler injected, no padding)
        assert all(rec["samplers"] == ["TrainSampler", "ExactSampler"] for rec in ranks)
    if tag == "wds":  # the uneven shards give the ranks different batch counts, and nothing hung
        counts = [len(rec["seen"]["val/0"]) for rec in ranks]
        assert counts[0] != counts[1]


@pytest.mark.parametrize("tag", ["wds", "digits"])
def test_a_run_resumed_mid_epoch_trains_each_rank_on_the_batches_it_had_not(ddp_run, tag):
    """The checkpoint is rank 0's; every rank leaves out the batches it had trained of the epoch, and trains the
    others in the unbroken run's order (the sampler's indices run on; the shard workers' turns start at the one whose
    batch came next)."""
    out, _ = ddp_run
    for unbroken, resumed in zip(_load(out, tag), _load(out, f"{tag}_resumed")):
        assert len(unbroken["seen"]["train/1"]) == BATCHES_PER_EPOCH
        expected = [tuple(b["keys"]) for b in unbroken["seen"]["train/1"][RESUMED_AT - BATCHES_PER_EPOCH:]]
        trained = [tuple(b["keys"]) for b in resumed["seen"]["train/1"]]
        assert "train/0" not in resumed["seen"] and len(trained) == BATCHES_PER_EPOCH - 4
        assert trained == expected


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _run_rank(Path(sys.argv[1]))
