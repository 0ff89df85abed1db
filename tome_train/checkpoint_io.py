"""Checkpoint files that are either whole or absent, whatever kills the process; best/last bookkeeping that survives a
moved run directory; which checkpoint a run may resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO
from omegaconf import DictConfig

from .config import and_more


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


class MovableModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose state survives a run directory moved or copied elsewhere: the files it knew
    are taken where they now are, beside the checkpoints. (Lightning forgets its best scores where the folder's path
    changed, and the next epoch was saved as the best even when worse, beside the best it no longer knew.) A
    checkpoint of another run directory (``--resume`` into a new one), whose best is not there, is left to Lightning,
    which starts the new directory's best afresh."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")

        def moved(path: str | None) -> str | None:
            return os.path.join(self.dirpath, os.path.relpath(path, saved)) if path else path

        best = state_dict.get("best_model_path")
        if saved and self.dirpath and saved != self.dirpath and (not best or os.path.isfile(moved(best))):
            state_dict = {**state_dict, "dirpath": self.dirpath,
                          **{key: moved(state_dict.get(key)) for key in
                             ("best_model_path", "kth_best_model_path", "last_model_path")},
                          "best_k_models": {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


class ResumeError(ValueError):
    """A checkpoint that cannot resume this run; the message is one line for the user."""


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The Lightning checkpoint at ``path`` mapped, not read whole (its tensors are read where used), or
    :class:`ResumeError`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise ResumeError(f"cannot resume from {path}: not a checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("state_dict") is None:
        raise ResumeError(f"cannot resume from {path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_weights_fit(path: Path, checkpoint: dict[str, Any], module: torch.nn.Module) -> None:
    """Raise :class:`ResumeError` unless ``checkpoint`` (read from ``path``) holds ``module``'s weights, key for key
    and shape for shape. Lightning finds a mismatch only when it restores, after the run directory and the wandb run
    are made."""
    state = checkpoint["state_dict"]
    fix = "resume with the config of the run that wrote it"
    own = module.state_dict()
    for absent, there, here in ((sorted(own.keys() - state.keys()), "this model", "the checkpoint"),
                                (sorted(state.keys() - own.keys()), "the checkpoint", "this model")):
        if absent:
            raise ResumeError(f"cannot resume from {path}: {absent[0]}{and_more(absent)} is in {there}, not in {here}; "
                              f"{fix}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ResumeError(f"cannot resume from {path}: {key} is {list(value.shape)} in the checkpoint and "
                              f"{list(own[key].shape)} in this model; {fix}")


def class_change(saved: list[str] | None, names: list[str] | None) -> str | None:
    """The first difference between the class names a checkpoint's data had and this run's data has, if both are
    known: the model's outputs would mean other classes (a data location may change on resume; its classes not)."""
    if saved is None or names is None or list(saved) == list(names):
        return None
    if len(saved) != len(names):
        return f"data classes: {len(saved)} -> {len(names)}"
    index = next(i for i, (a, b) in enumerate(zip(saved, names)) if a != b)
    return f"data class {index}: {saved[index]!r} -> {names[index]!r}"


def check_same_training(path: Path, checkpoint: dict[str, Any], cfg: DictConfig, chosen: bool,
                        datamodule: Any = None) -> list[str]:
    """What ``cfg`` trains otherwise than the run that wrote ``checkpoint`` (:func:`.config.training_changes`), and
    what classes ``datamodule``'s data has otherwise (:func:`class_change`). Raise :class:`ResumeError` if anything,
    unless the user ``chosen`` the checkpoint (``--resume``): a run directory found with another run's checkpoint in
    it is not continued as if it were this one's."""
    from .config import training_changes

    saved = checkpoint.get("hyper_parameters", {}).get("config")
    changes = training_changes(saved, cfg) if isinstance(saved, dict) else []
    if datamodule is not None:
        saved_data = checkpoint.get(type(datamodule).__qualname__, {})
        change = class_change(saved_data.get("class_names"), datamodule.class_names)
        if change is not None:
            changes.append(change)
    if changes and not chosen:
        more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
        raise ResumeError(f"cannot resume from {path}: its run was trained with other settings ({changes[0]}{more}); "
                          f"rerun with them, start a new run with --output-dir DIR, or continue this one with these "
                          f"by --resume {path}")
    return changes
