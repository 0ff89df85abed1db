"""The bundled default source: scikit-learn's 1,797 real 8x8 handwritten digits, held in memory.

A fixed stratified split (``val_fraction``, fixed random_state) makes train and val the same on every
machine. Images are upsampled once to ``img_size`` and kept as uint8 tensors; training augmentation
(RandomResizedCrop with the config's scale/ratio/interpolation, optional flip and random erasing) works
on tensors, so no PIL round trip per sample.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import Dataset, get_worker_info

CLASS_NAMES = [str(i) for i in range(10)]
SPLIT_RANDOM_STATE = 0  # the split is part of the data set's definition, not a hyperparameter


@lru_cache(maxsize=None)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


@lru_cache(maxsize=None)
def digits_split(val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) into load_digits(), sorted; stratified and fixed."""
    from sklearn.model_selection import train_test_split

    _, labels = _load()
    train, val = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=SPLIT_RANDOM_STATE
    )
    return np.sort(train), np.sort(val)


def digits_images(indices: np.ndarray, img_size: int, interpolation: str) -> torch.Tensor:
    """uint8 [N, 1, img_size, img_size]: the 0..16 digits scaled to 0..255 and upsampled."""
    images, _ = _load()
    x = torch.from_numpy(images[indices]).unsqueeze(1) / 16.0
    mode = interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bilinear"
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    x = F.interpolate(x, size=(img_size, img_size), mode=mode, **kwargs)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def digits_labels(indices: np.ndarray) -> torch.Tensor:
    _, labels = _load()
    return torch.from_numpy(labels[indices])


def _tensor_train_transform(cfg: DictConfig, img_size: int):
    from timm.data.transforms import str_to_interp_mode
    from torchvision.transforms import v2

    ops = [
        v2.RandomResizedCrop(
            img_size,
            scale=tuple(float(s) for s in cfg.scale),
            ratio=tuple(float(r) for r in cfg.ratio),
            interpolation=str_to_interp_mode(cfg.interpolation),
            antialias=True,
        )
    ]
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(float(cfg.hflip)))
    return v2.Compose(ops)


class DigitsDataset(Dataset):
    """One split of the digits: (image float32 [3, S, S] normalized, label int64)."""

    def __init__(self, cfg: DictConfig, img_size: int, train: bool, with_meta: bool = False):
        train_idx, val_idx = digits_split(float(cfg.val_fraction))
        self.indices = train_idx if train else val_idx
        self.images = digits_images(self.indices, img_size, cfg.interpolation)
        self.labels = digits_labels(self.indices)
        self.mean = torch.tensor([float(m) for m in cfg.mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in cfg.std]).view(3, 1, 1)
        self.transform = _tensor_train_transform(cfg, img_size) if train else None
        self.erase = None
        if train and cfg.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(float(cfg.re_prob), mode=cfg.re_mode, max_count=int(cfg.re_count), device="cpu")
        self.with_meta = with_meta
        self.classes = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        x = (img.float().div_(255).expand(3, -1, -1) - self.mean) / self.std
        if self.erase is not None:
            x = self.erase(x)
        label = int(self.labels[i])
        if not self.with_meta:
            return x, label
        worker = get_worker_info()
        return x, label, {"key": f"digits_{int(self.indices[i]):04d}", "url": "digits", "worker": worker.id if worker else 0}
