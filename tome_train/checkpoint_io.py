"""Checkpoint files that are either whole or absent, whatever kills the process."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write into a temporary file beside the target, fsync, then rename over it.

    Lightning's own save stages the file in the system temp directory and moves it, which
    becomes a plain copy when the run directory is on another filesystem (a cluster's shared
    storage): a kill during that copy would leave half a checkpoint under the final name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
