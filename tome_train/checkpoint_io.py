"""Checkpoint files that are either whole or absent, whatever kills the process."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig


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


class ResumeError(ValueError):
    """A checkpoint that cannot resume this run; the message is one line for the user."""


def check_resume_fits(path: Path, module: torch.nn.Module, cfg: DictConfig, chosen: bool) -> list[str]:
    """Raise :class:`ResumeError` unless the Lightning checkpoint at ``path`` holds ``module``'s weights, key for key
    and shape for shape, and, unless the user ``chosen`` it (``--resume``), was trained with the config ``cfg``
    trains with (:func:`.config.training_changes`: a run's directory found with another run's checkpoint in it is
    not continued as if it were this one). Returns the changes a chosen checkpoint resumes with. Lightning finds a
    mismatch only when it restores, after the run directory and the wandb run are made; the file is mapped here,
    not read whole."""
    from .config import training_changes

    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise ResumeError(f"cannot resume from {path}: not a checkpoint ({type(e).__name__})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if state is None:
        raise ResumeError(f"cannot resume from {path}: not a Lightning checkpoint (no state_dict)")
    fix = "resume with the config of the run that wrote it"
    own = module.state_dict()
    for absent, there, here in ((sorted(own.keys() - state.keys()), "this model", "the checkpoint"),
                                (sorted(state.keys() - own.keys()), "the checkpoint", "this model")):
        if absent:
            raise ResumeError(f"cannot resume from {path}: {absent[0]} (and {len(absent) - 1} more) is in {there}, not in "
                              f"{here}; {fix}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ResumeError(f"cannot resume from {path}: {key} is {list(value.shape)} in the checkpoint and "
                              f"{list(own[key].shape)} in this model; {fix}")
    saved = checkpoint.get("hyper_parameters", {}).get("config")
    changes = training_changes(saved, cfg) if isinstance(saved, dict) else []
    if changes and not chosen:
        more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
        raise ResumeError(f"cannot resume from {path}: its run was trained with other settings ({changes[0]}{more}); "
                          f"rerun with them, start a new run with --output-dir DIR, or continue this one with these "
                          f"by --resume {path}")
    return changes
