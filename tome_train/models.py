"""Build the timm ViT a config names, and load local pretrained weights into it.

Weights are never downloaded (``pretrained=False`` always); ``model.checkpoint`` names a local
file in one of these formats:

- the official MAE format: a torch file with key ``model`` (pretrain checkpoints also hold the
  decoder ``decoder_*`` and ``mask_token``, which fine-tuning ignores, and the encoder's final
  ``norm``, which a global-pool model replaces by a fresh ``fc_norm``); the official DeiT format
  is the same container;
- a timm / torch state dict: the dict itself, or a dict holding it under ``state_dict_ema``,
  ``model_ema``, ``state_dict`` or ``model`` (timm's order of preference);
- a ``.safetensors`` file.

The position embedding is resampled (bicubic, prefix tokens kept) when the patch grid differs,
by timm's ``checkpoint_filter_fn``/``resample_abs_pos_embed``. After loading, the only weights
the checkpoint may leave out are the classifier (``head.*``) and ``fc_norm.*``; anything else
missing, any key the model does not have, or any shape that does not fit raises
:class:`CheckpointError` with a one-line message naming the file.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.layers import trunc_normal_
from timm.models import VisionTransformer, clean_state_dict
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from .config import ConfigError, did_you_mean

__all__ = [
    "CheckpointError",
    "LoadReport",
    "build_model",
    "checkpoint_summary",
    "init_head",
    "load_pretrained",
    "network_weights",
    "read_checkpoint",
]

_logger = logging.getLogger(__name__)

# The classifier (DeiT distilled models have a second one): re-initialised, may be absent.
CLASSIFIER_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
# What a checkpoint may leave out: the classifier and the global-pool norm (MAE fine-tuning).
ALLOWED_MISSING = frozenset(CLASSIFIER_KEYS + ("fc_norm.weight", "fc_norm.bias"))
# Containers of a state dict inside a checkpoint, in timm's order of preference (EMA first).
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# MAE pretraining keys a fine-tuned encoder has no use for.
_MAE_PRETRAIN_ONLY = re.compile(r"^(decoder_|mask_token$)")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; one line for the user."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did."""

    path: str
    format: str
    missing: list[str] = field(default_factory=list)  # left at their init (a subset of ALLOWED_MISSING)
    ignored: list[str] = field(default_factory=list)  # in the checkpoint, deliberately not loaded
    pos_embed_resized: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None  # (from, to) shapes
    head_reinit: bool = False


# ----------------------------------------------------------------------------------------------
# reading


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only`` (argparse.Namespace allowed, as in MAE/DeiT ``args``)."""

    def load(mmap: bool) -> Any:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)  # cheap for big checkpoints; needs the zip format
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return load(mmap=False)
    except pickle.UnpicklingError:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - only for the message
            unsafe = []
        if not unsafe:
            raise CheckpointError(f"checkpoint {path}: cannot be read as a torch file (corrupt or not a checkpoint)") from None
        raise CheckpointError(
            f"checkpoint {path}: holds pickled objects that are not weights ({', '.join(unsafe[:5])}); "
            "refusing to unpickle it, save its state dict (or .safetensors) instead"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise CheckpointError(f"checkpoint {path}: cannot be read as a torch file ({_short(e)})") from None


def _safetensors_load(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not meta:
            return load_file(str(path), device="cpu")
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = getattr(torch, _SAFETENSORS_DTYPES.get(sl.get_dtype(), "float32"))
                out[k] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        return out
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: cannot be read as safetensors ({_short(e)})") from None


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def network_weights(state_dict: dict[str, torch.Tensor], ema: bool) -> dict[str, torch.Tensor]:
    """The timm model's weights in the state dict of a :class:`~tome_train.module.ToMeClassifier` (which holds the
    network as ``model`` and its EMA copy as ``ema.module``), prefix removed; empty where it holds none."""
    prefix = "ema.module." if ema else "model."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_checkpoint(path: Union[str, Path], meta: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``path`` (cleaned of DDP/compile prefixes) and its format's name.

    ``meta=True`` gives meta tensors of the right shapes and dtypes (nothing is copied into memory:
    torch files are memory-mapped, safetensors read through their header).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file (weights are never downloaded)")
    if path.suffix == ".safetensors":
        sd, fmt = _safetensors_load(path, meta), "safetensors"
    else:
        obj = _torch_load(path)
        fmt = "state dict"
        if isinstance(obj, dict) and not _is_state_dict(obj):
            for key in STATE_DICT_KEYS:
                if isinstance(obj.get(key), dict):
                    obj, fmt = obj[key], f"dict['{key}']"
                    break
        if not _is_state_dict(obj):
            raise CheckpointError(
                f"checkpoint {path}: no state dict found (expected a dict of tensors, or one under "
                f"{'/'.join(STATE_DICT_KEYS)})"
            )
        sd = obj
        if meta:
            sd = {k: v.to("meta") for k, v in sd.items()}
    sd = clean_state_dict(sd)
    for ema in (True, False):  # a tome-train checkpoint: its EMA weights first, as timm prefers them
        weights = network_weights(sd, ema)
        if weights:
            sd, fmt = weights, f"{fmt}, {'EMA' if ema else 'raw'} weights"
            break
    if any(_MAE_PRETRAIN_ONLY.match(k) for k in sd):
        fmt = "MAE pretrain " + fmt
    return sd, fmt


# ----------------------------------------------------------------------------------------------
# loading


def init_head(model: nn.Module, std: float) -> bool:
    """Re-initialise the classifier: weight trunc_normal(std), bias 0 (as MAE's fine-tuning does:
    ``model.head_init_std``)."""
    done = False
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            with torch.no_grad():
                trunc_normal_(head.weight, std=std)
                if head.bias is not None:
                    nn.init.zeros_(head.bias)
            done = True
    return done


def _fmt_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _mismatch(path: Path, key: str, ckpt: torch.Tensor, mine: torch.Tensor, arch: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} does not fit {arch}: '{key}' has shape {_fmt_shape(ckpt)} in the checkpoint "
        f"but {_fmt_shape(mine)} in the model (wrong architecture?)"
    )


def _list(keys: list[str], limit: int = 12) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _pool_hint(keys: list[str]) -> str:
    if any(k.startswith(("norm.", "fc_norm.")) for k in keys):
        return " (model.global_pool does not match the checkpoint's: 'avg' uses fc_norm, 'token' norm)"
    return ""


def load_pretrained(
    model: nn.Module,
    path: Union[str, Path],
    head_init_std: Optional[float] = None,
) -> LoadReport:
    """Load the local checkpoint ``path`` into ``model`` (a timm ViT); see the module doc.

    On a meta-device model the checkpoint is only checked (shapes and keys), nothing is copied.
    """
    path = Path(path).expanduser()
    on_meta = any(p.is_meta for p in model.parameters())
    sd, fmt = read_checkpoint(path, meta=on_meta)
    arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    own = model.state_dict()
    report = LoadReport(path=str(path), format=fmt)

    # 1. keys deliberately left behind
    ignored = [k for k in sd if _MAE_PRETRAIN_ONLY.match(k) and k not in own]
    if "norm.weight" not in own and "fc_norm.weight" in own:
        # MAE fine-tuning with global pooling: the encoder's final norm is replaced by a fresh fc_norm
        ignored += [k for k in ("norm.weight", "norm.bias") if k in sd]
    for k in CLASSIFIER_KEYS:
        if k in sd and k not in own:
            ignored.append(k)  # a model without classifier (num_classes=0)
        elif k in sd and sd[k].shape != own[k].shape:
            ignored.append(k)  # a classifier for another number of classes
    report.ignored = ignored
    sd = {k: v for k, v in sd.items() if k not in set(ignored)}

    # 2. the architecture must match before anything is converted (timm would silently resample a
    #    patch embedding of another patch size); pos_embed may differ in its number of tokens
    for k, mine in own.items():
        if k not in sd:
            continue
        v = sd[k]
        if k == "pos_embed":
            if v.ndim != mine.ndim or v.shape[-1] != mine.shape[-1]:
                raise _mismatch(path, k, v, mine, arch)
        elif k == "patch_embed.proj.weight" and v.ndim < 4:
            if v.numel() != mine.numel():  # linear patchify of old checkpoints, reshaped by timm
                raise _mismatch(path, k, v, mine, arch)
        elif v.shape != mine.shape:
            raise _mismatch(path, k, v, mine, arch)

    # 3. timm's conversions: pos_embed resampling (bicubic, prefix tokens kept), conv patch embed
    src_pos = sd.get("pos_embed")
    sd = checkpoint_filter_fn(sd, model, interpolation="bicubic", antialias=True)
    if src_pos is not None and "pos_embed" in sd and sd["pos_embed"].shape != src_pos.shape:
        report.pos_embed_resized = (tuple(src_pos.shape), tuple(sd["pos_embed"].shape))
        _logger.info("checkpoint %s: pos_embed resampled %s -> %s", path, *report.pos_embed_resized)

    # 4. keys: nothing unknown, nothing missing but the head and fc_norm; shapes after conversion
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} ({fmt}) has keys {arch} does not have: {_list(unexpected)}{_pool_hint(unexpected)}"
        )
    missing = [k for k in own if k not in sd]
    bad_missing = [k for k in missing if k not in ALLOWED_MISSING]
    if bad_missing:
        hint = _pool_hint(bad_missing)
        raise CheckpointError(
            f"checkpoint {path} ({fmt}) lacks weights of {arch}: {_list(bad_missing)}; only "
            f"{', '.join(sorted(ALLOWED_MISSING))} may be missing{hint}"
        )
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise _mismatch(path, k, v, own[k], arch)
    report.missing = missing

    # 5. load, then the fresh classifier
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(missing), result
    if head_init_std is not None:
        report.head_reinit = init_head(model, head_init_std)
    _logger.info(
        "loaded %s (%s): missing %s, ignored %d keys%s", path, fmt, missing or "none", len(ignored),
        f", head re-initialised (std {head_init_std:g})" if report.head_reinit else "",
    )
    return report


# ----------------------------------------------------------------------------------------------
# building


def _as_dict(x: Any) -> dict:
    if x is None:
        return {}
    if isinstance(x, DictConfig):
        return OmegaConf.to_container(x, resolve=True)
    return dict(x)


def check_patch_grid(model: nn.Module, arch: str, img_size: Any, key: str = "model.img_size") -> None:
    """The image must tile into whole patches: timm builds the model for any size and fails at the first forward.
    :class:`ConfigError` names the size as ``key``."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "dynamic_img_pad", False) or getattr(embed, "img_size", None) is None:
        return
    if any(size % patch for size, patch in zip(embed.img_size, embed.patch_size)):
        height, width = embed.patch_size
        raise ConfigError(f"{key}={img_size} is not allowed for {arch} with {height}x{width} patches: use a multiple "
                          "of the patch size")


def build_model(
    model_cfg: DictConfig,
    device: Union[str, torch.device, None] = None,
) -> VisionTransformer:
    """A timm ViT from ``cfg.model``, with ``model.checkpoint`` loaded when set.

    No download ever (``pretrained=False``). ``head_init_std`` re-initialises the classifier
    (also without a checkpoint). ``device='meta'`` builds without allocating memory (dry runs of
    big models); a checkpoint is then checked against the model but not copied. Other devices:
    built and loaded on the CPU, then moved.
    """
    meta = device is not None and torch.device(device).type == "meta"
    kwargs = _as_dict(getattr(model_cfg, "timm_kwargs", None))
    create = dict(
        pretrained=False,
        num_classes=model_cfg.num_classes,
        img_size=model_cfg.img_size,
        drop_path_rate=model_cfg.drop_path_rate,
        global_pool=model_cfg.global_pool,
    )
    create.update(kwargs)
    create["pretrained"] = False
    if not timm.is_model(model_cfg.arch):
        raise ConfigError(f"model.arch={model_cfg.arch!r} is not a timm model{did_you_mean(model_cfg.arch, timm.list_models())}")
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = timm.create_model(model_cfg.arch, **create)
    except TypeError as e:  # an argument the model's constructor does not take: a typo in model.timm_kwargs
        raise ConfigError(f"model.timm_kwargs={kwargs}: {model_cfg.arch} does not take them ({e})") from None
    check_patch_grid(model, model_cfg.arch, model_cfg.img_size)

    checkpoint = getattr(model_cfg, "checkpoint", None)
    head_init_std = getattr(model_cfg, "head_init_std", None)
    if checkpoint:
        load_pretrained(model, checkpoint, head_init_std)
    elif head_init_std is not None and not meta:
        init_head(model, head_init_std)
    if device is not None and not meta:
        model = model.to(device)
    return model


# ----------------------------------------------------------------------------------------------
# dry run


def checkpoint_summary(path: Union[str, Path]) -> dict[str, Any]:
    """What a checkpoint holds, read cheaply (memory-mapped / header only), for the dry run.

    Keys: format, tensors, params, embed_dim, depth, patch_size, grid, prefix_tokens (guessed from
    the pos_embed length and the grid), pool ('avg' when it has fc_norm, 'token' when it has norm),
    num_classes (of its head, None when it has none), decoder (MAE pretrain decoder present).
    """
    sd, fmt = read_checkpoint(path, meta=True)
    out: dict[str, Any] = {"format": fmt, "tensors": len(sd), "params": sum(v.numel() for v in sd.values())}
    pe = sd.get("patch_embed.proj.weight")
    out["embed_dim"] = int(pe.shape[0]) if pe is not None else (
        int(sd["cls_token"].shape[-1]) if "cls_token" in sd else None)
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    out["depth"] = max(blocks) + 1 if blocks else None
    out["patch_size"] = tuple(int(s) for s in pe.shape[-2:]) if pe is not None and pe.ndim == 4 else None
    pos = sd.get("pos_embed")
    out["grid"] = out["prefix_tokens"] = None
    if pos is not None and pos.ndim == 3:
        n = pos.shape[1]
        for prefix in (1, 0, 2) + tuple(range(3, 9)):  # cls token, none, cls+dist, registers
            side = math.isqrt(max(n - prefix, 0))
            if side > 0 and side * side == n - prefix:
                out["grid"], out["prefix_tokens"] = (side, side), prefix
                break
    out["pool"] = "avg" if "fc_norm.weight" in sd else ("token" if "norm.weight" in sd else None)
    head = sd.get("head.weight")
    out["num_classes"] = int(head.shape[0]) if head is not None else None
    out["decoder"] = any(_MAE_PRETRAIN_ONLY.match(k) for k in sd)
    return out
