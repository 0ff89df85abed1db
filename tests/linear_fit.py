"""A real Lightning fit of a linear classifier on 8 px images, for tests of what the framework's data and callbacks
do inside Lightning's loops (resuming, requeues) without the cost of a ViT."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from tome_train.module import stepping_batches


class LinearClassifier(pl.LightningModule):
    """Logits of flattened [B, 3, 8, 8] images; records the sample keys of every training batch (``with_meta``)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 8 * 8, num_classes)
        self.keys: list[tuple[str, ...]] = []

    def training_step(self, batch, batch_idx):
        images, labels, meta = batch
        self.keys.append(tuple(meta["key"]))
        return F.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        stepping_batches(self.trainer)  # as the framework's lr schedule asks for them, building the loader early
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_linear(datamodule: pl.LightningDataModule, callbacks: list[pl.Callback], ckpt_path: str | None = None,
               **trainer_kwargs) -> list[tuple[str, ...]]:
    """Fit on ``datamodule`` (built ``with_meta=True``) without validation; returns the keys of each trained batch."""
    module = LinearClassifier()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.keys
