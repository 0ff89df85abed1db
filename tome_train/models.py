"""Build the timm ViT a config names, and load local pretrained weights into it."""
from __future__ import annotations

import timm
from omegaconf import DictConfig, OmegaConf
from timm.models import VisionTransformer


def build_model(model_cfg: DictConfig) -> VisionTransformer:
    """A timm ViT from ``cfg.model`` (no download: ``pretrained`` is always False)."""
    kwargs = OmegaConf.to_container(model_cfg.timm_kwargs, resolve=True)
    return timm.create_model(
        model_cfg.arch,
        pretrained=False,
        num_classes=model_cfg.num_classes,
        img_size=model_cfg.img_size,
        drop_path_rate=model_cfg.drop_path_rate,
        global_pool=model_cfg.global_pool,
        **kwargs,
    )
