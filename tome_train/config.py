"""Run configuration: a typed schema, recipes composed from fragments, dotted overrides.

A recipe ``recipes/NAME.yaml`` lists fragments under ``defaults`` (``configs/GROUP/NAME.yaml``,
each a partial config with top-level sections) and then sets its own values; command-line
``dotted.key=value`` overrides come last. Every merge goes through OmegaConf's structured
config, so unknown keys and wrong types are refused with the key named. Every value a recipe
tunes is MISSING here and comes from a fragment or a recipe, set once (a fragment may list other fragments under its
own ``defaults``, as ``configs/optim/mae_vitb.yaml`` does). The few defaults the schema keeps switch a feature off (no
mixup, no random erasing, no repeated augmentation, no layer decay, no gradient clipping, no EMA), are how a feature
works once a recipe switches it on (``mixup.prob``, ``switch_prob`` and ``mode``, timm's defaults; ``data.re_mode`` and
``re_count``: the values of DeiT and MAE, whose recipes set only the strength), or are engineering settings; no
fragment or recipe restates one. A field the schema types as text keeps the text as written (``wandb.name=yes`` is
'yes', ``wandb.mode=off`` is 'off', not YAML 1.1's booleans).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = PROJECT_ROOT / "recipes"
FRAGMENT_DIR = PROJECT_ROOT / "configs"
DEFAULT_RECIPE = "digits_vit_r6"
DATA_SOURCES = ("digits", "imagefolder", "webdataset")  # what tome_train.data reads


class ConfigError(ValueError):
    """Bad user input in a recipe or override; the message is one line for the user."""


@dataclass
class ModelConfig:
    arch: str = MISSING  # timm model name
    img_size: int = MISSING
    num_classes: int = MISSING
    drop_path_rate: float = MISSING
    global_pool: str = MISSING  # token | avg
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # any other timm.create_model argument
    checkpoint: Optional[str] = None  # local pretrained weights: MAE .pth, timm state dict or safetensors
    head_init_std: Optional[float] = None  # re-initialise the classifier (the MAE model fragments set it)


@dataclass
class ToMeConfig:
    r_train: Any = MISSING  # int r, per-layer list, or {r: R, inflect: I}
    r_eval: Any = None  # None: same as r_train
    prop_attn: bool = MISSING


@dataclass
class DataConfig:
    source: str = MISSING  # digits | imagefolder | webdataset
    root: Optional[str] = None  # imagefolder: dir with train/ val/; webdataset: dir or URL prefix of shards
    train_shards: Optional[str] = None  # webdataset: brace pattern under root
    val_shards: Optional[str] = None
    train_samples: Optional[int] = None  # webdataset has no index: the sample counts come from here
    val_samples: Optional[int] = None
    batch_size: int = MISSING  # per device
    num_workers: int = MISSING
    val_fraction: Optional[float] = None  # digits: the fixed held-out share
    shuffle_buffer: int = 1000  # webdataset: raw samples in each worker's shuffle buffer
    # training augmentation, timm's create_transform names
    scale: list[float] = MISSING
    ratio: list[float] = MISSING
    hflip: float = MISSING
    color_jitter: Optional[float] = None
    auto_augment: Optional[str] = None
    interpolation: str = MISSING
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    crop_pct: float = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    repeated_aug: int = 1  # copies of each decoded image per epoch (configs/optim/deit.yaml sets DeiT's)


@dataclass
class MixupConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    label_smoothing: float = 0.0


@dataclass
class OptimConfig:
    blr: float = MISSING  # peak lr = blr * global_batch / lr_base_batch
    lr_base_batch: int = MISSING  # the global batch blr is quoted for (configs/optim/*.yaml)
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    layer_decay: Optional[float] = None
    warmup_epochs: float = MISSING
    warmup_prefix: bool = MISSING  # true: the cosine starts after the warmup (MAE); false: it spans the run (DeiT, timm)
    warmup_lr: float = MISSING
    min_lr: float = MISSING
    clip_grad: Optional[float] = None
    ema_decay: Optional[float] = None


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    accelerator: str = "auto"
    devices: Any = MISSING  # int or "auto"
    num_nodes: int = MISSING
    precision: str = MISSING  # Lightning's names: one of _CHOICES["trainer.precision"] below
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = MISSING
    compile: Any = False  # false, true, or a torch.compile mode (reduce-overhead: CUDA graphs on a GPU)
    channels_last: bool = False
    # as Lightning takes them: an int counts batches, a float in [0, 1] is a fraction of the epoch
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    checkpoint_every_n_steps: Optional[int] = None  # besides every epoch end
    deterministic: bool = False


@dataclass
class LayoutConfig:
    """The published cluster layout the recipe's batch and learning rate assume."""

    nodes: int = 1
    gpus_per_node: int = 1


@dataclass
class ReferenceConfig:
    """The paper's numbers for this recipe (ImageNet-1k val top-1, V100 fp32 im/s)."""

    source: str = ""
    baseline_top1: Optional[float] = None
    baseline_ims: Optional[float] = None
    tome_top1: Optional[float] = None
    tome_ims: Optional[float] = None


@dataclass
class TradeoffConfig:
    enabled: bool = True
    r_values: Optional[list[int]] = None  # None: num_points values from 0 to the largest r; 0 and r_train always added
    num_points: int = 5
    batch_size: int = MISSING
    bench_steps: int = MISSING  # timed rounds over every r of the sweep; an r's images/s is from its median step
    limit_val_batches: Optional[int] = None
    num_vis_images: int = 4


@dataclass
class WandbConfig:
    project: str = "tome-train"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; None: offline unless an API key is set
    id: Optional[str] = None  # fixed id: a restarted job continues the same run


@dataclass
class RunConfig:
    name: str = MISSING
    description: str = ""  # one line, which --list-recipes shows beside the recipe's name
    output_dir: str = "runs/${name}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tome: ToMeConfig = field(default_factory=ToMeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    tradeoff: TradeoffConfig = field(default_factory=TradeoffConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def describe_recipes() -> list[str]:
    """A line per recipe: its name and its ``description``."""
    names = list_recipes()
    width = max(map(len, names), default=0) + 2
    return [f"{name:<{width}}{_load_yaml(RECIPE_DIR / f'{name}.yaml')[0].get('description') or ''}".rstrip()
            for name in names]


def and_more(items: list) -> str:
    """What follows the first of ``items`` in a one-line message: the count of the others (a model's keys run into
    the hundreds)."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def did_you_mean(value: str, allowed: list[str]) -> str:
    by_lower = {a.lower(): a for a in allowed}  # MAE_VITL_R8 means mae_vitl_r8
    match = difflib.get_close_matches(value.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def _dotted_keys(schema: type = None, prefix: str = "") -> list[str]:
    """Every dotted key the schema allows, for 'did you mean' hints."""
    keys = []
    for f in dataclasses.fields(schema or RunConfig):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)):
            keys += _dotted_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


def _text_fields(schema: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """The dotted keys the schema types as text: ``"str"`` for a string, ``"list"`` for a list of strings."""
    kinds = {}
    for name, hint in typing.get_type_hints(schema).items():
        if typing.get_origin(hint) in (Union, types.UnionType):  # Optional[X]
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            kinds |= _text_fields(hint, f"{prefix}{name}.")
        elif hint is str:
            kinds[prefix + name] = "str"
        elif typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
            kinds[prefix + name] = "list"
    return kinds


_TEXT_FIELDS = _text_fields()


def _as_text(value: Any, text: Any) -> Any:
    """``text`` (the scalar as written) where YAML made ``value`` a bool or a number of it, else ``value``."""
    return text if isinstance(text, str) and isinstance(value, (bool, int, float)) else value


def _keep_text(value: Any, text: Any, key: str = "") -> Any:
    """``value`` (a plain container as YAML read it), with the text as written, ``text`` (the same YAML read with
    yaml's BaseLoader, every scalar a string), where the schema takes text: YAML 1.1 reads off, yes and on as
    booleans and 012 as 10, but ``wandb.mode=off`` means 'off' and ``wandb.name=012`` the run '012'. A null stays
    null."""
    kind = _TEXT_FIELDS.get(key)
    if isinstance(value, dict) and isinstance(text, dict):
        return {k: _keep_text(v, text.get(str(k)), f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if kind == "list" and isinstance(value, list) and isinstance(text, list) and len(text) == len(value):
        return [_as_text(v, t) for v, t in zip(value, text)]
    return _as_text(value, text) if kind == "str" else value


def _read_text(source: str) -> Any:
    """The YAML ``source`` with every scalar a string as written (None where yaml cannot read it)."""
    try:
        return yaml.load(source, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return None


def _with_text(layer: DictConfig, text: Any) -> DictConfig:
    """``layer`` with the text of ``text`` kept where the schema takes text (:func:`_keep_text`)."""
    plain = OmegaConf.to_container(layer)
    kept = _keep_text(plain, text)
    return layer if kept == plain else OmegaConf.create(kept)  # text kept is a str, equal to no bool or number


def _text_at(text: Any, key: str) -> Optional[str]:
    """The scalar of ``text`` (:func:`_read_text`) at OmegaConf's ``key`` (``a.b``, ``a.b[1]``), if it has one."""
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(text, dict):
            text = text.get(part)
        elif isinstance(text, list) and part.isdigit() and int(part) < len(text):
            text = text[int(part)]
        else:
            return None
    return text if isinstance(text, str) else None


def _section_keys(section: str) -> list[str]:
    """The dotted keys directly under ``section`` if it is a section of the schema (``model``, ``data``, ...), else
    an empty list."""
    return [k for k in _dotted_keys() if k.startswith(section + ".") and "." not in k[len(section) + 1:]]


def _load_yaml(path: Path) -> tuple[DictConfig, Any]:
    """The config in ``path``, text kept where the schema takes text, and the file as :func:`_read_text` reads it."""
    try:
        layer = OmegaConf.load(path)
    except OmegaConfBaseException as e:  # yaml errors surface as OmegaConf or yaml exceptions
        raise ConfigError(f"{path}: not a valid YAML config ({e})") from None
    except Exception as e:
        raise ConfigError(f"{path}: not a valid YAML config ({type(e).__name__}: {e})".splitlines()[0]) from None
    text = _read_text(path.read_text())
    return _with_text(layer, text), text


_COLON_HINT = " (YAML reads {a:1} as the one key 'a:1': write {a: 1}, a space after the colon)"


def _merge(base: DictConfig, layer: DictConfig, origin: str, text: Any = None) -> DictConfig:
    """``layer`` merged over ``base``; ``text``: the layer as written (:func:`_read_text`), for the values errors
    quote."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        if "Key" in type(e).__name__ and key:
            hint = did_you_mean(key, _dotted_keys())
            if ":" in key:
                hint = _COLON_HINT
            raise ConfigError(f"{origin}: unknown key {key!r}{hint}") from None
        value = getattr(e, "value", None)
        shown, written = repr(value), _text_at(text, key)
        if written is not None and written != str(value):  # as written, not as YAML 1.1 read it (yes: True)
            shown = f"{written!r} (YAML reads it as {value!r})"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{origin}: bad value {shown} for {key!r}: {msg}") from None


def _read_recipe(name_or_path: str) -> tuple[str, str, DictConfig, Any]:
    """The recipe's name, the file its errors name, its content and its text (:func:`_load_yaml`). A name is a recipe
    of ``recipes/``; what has a ``/`` or ends in ``.yaml`` is a file's path."""
    allowed = list_recipes()
    if not name_or_path.strip():
        raise ConfigError(f"recipe {name_or_path!r} is empty: use a recipe name ({', '.join(allowed)}) or the path of "
                          "a YAML file")
    path = Path(name_or_path)
    if "/" in name_or_path or os.sep in name_or_path or path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            why = "not a file" if path.exists() else "no such file"
            raise ConfigError(f"recipe file {name_or_path}: {why}{did_you_mean(path.stem, allowed)}")
        return path.stem, name_or_path, *_load_yaml(path)
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown recipe {name_or_path!r}{did_you_mean(name_or_path, allowed)}; recipes: {', '.join(allowed)}"
        )
    return name_or_path, f"recipes/{name_or_path}.yaml", *_load_yaml(path)


def _fragments(node: DictConfig, origin: str) -> list[tuple[str, DictConfig, Any]]:
    """The fragments ``node`` lists under ``defaults``, each preceded by its own defaults: ``(file, content, text)``."""
    layers = []
    for ref in node.pop("defaults", []):
        path = FRAGMENT_DIR / f"{ref}.yaml"
        if not path.is_file():
            allowed = sorted(str(p.relative_to(FRAGMENT_DIR).with_suffix("")) for p in FRAGMENT_DIR.rglob("*.yaml"))
            raise ConfigError(f"{origin}: unknown config fragment {ref!r}{did_you_mean(str(ref), allowed)}")
        fragment, text = _load_yaml(path)
        layers += _fragments(fragment, f"configs/{ref}.yaml")
        layers.append((f"configs/{ref}.yaml", fragment, text))
    return layers


def _nested(key: str, value: Any) -> Any:
    """``{"a": {"b": value}}`` for the key ``a.b``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Resolve a recipe (name or path) with its fragments and ``key=value`` overrides.

    Raises :class:`ConfigError` with a one-line message for any bad input.
    """
    name, recipe_file, recipe_cfg, recipe_text = _read_recipe(DEFAULT_RECIPE if recipe is None else recipe)
    cfg = OmegaConf.structured(RunConfig)
    for origin, layer, text in _fragments(recipe_cfg, f"recipe {name}"):
        cfg = _merge(cfg, layer, origin, text)
    cfg = _merge(cfg, OmegaConf.create({"name": name}), f"recipe {name}")
    cfg = _merge(cfg, recipe_cfg, recipe_file, recipe_text)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
        except yaml.YAMLError as e:  # OmegaConf reads the value as YAML: an unclosed {, [ or quote
            raise ConfigError(f"override {item!r}: the value is not YAML ({getattr(e, 'problem', None) or e})") from None
        key, value = item.split("=", 1)
        under = _section_keys(key)
        if under and not isinstance(OmegaConf.select(layer, key), DictConfig):
            raise ConfigError(f"override {item!r}: {key} is a section, not a value; set its keys ({', '.join(under)}), "
                              f"e.g. {under[0]}=...")
        text = _nested(key, _read_text(value))
        cfg = _merge(cfg, _with_text(layer, text), f"override {item!r}", text)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"recipe {name}: no value for {', '.join(missing)}")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _choice(value, allowed, key: str) -> None:
    if value not in allowed:
        names = ["null" if choice is None else str(choice) for choice in allowed]
        same = [name for name, choice in zip(names, allowed) if choice is not None and name.lower() == str(value).lower()]
        hint = f" (did you mean {same[0]!r}? the choices are lower case)" if same else ""  # OFFLINE
        raise ConfigError(f"{key}={value!r} is not allowed: use one of {', '.join(names)}{hint}")


def schedule_of(value) -> Any:
    """A config schedule as the ToMe core takes it: an int, a per-layer list, or the (r, inflect) tuple of
    ``{r: R, inflect: I}``; text in the command line's forms of ``bench --r`` and ``export --r`` (``16@-1``,
    ``8,8,4``) too."""
    from .tome.schedule import ScheduleError, schedule_from_text

    if isinstance(value, (DictConfig, dict)):
        if set(value.keys()) != {"r", "inflect"}:  # YAML reads {r:16,inflect:-1} as keys 'r:16' and 'inflect:-1'
            raise ScheduleError(f"r={dict(value)!r} is not allowed: use {{r: 16, inflect: -1}} (a space after each "
                                "colon), 16@-1, an integer (13) or a per-layer list ([8,8,4])")
        return (value["r"], float(value["inflect"]))
    if OmegaConf.is_list(value):
        return list(value)
    if isinstance(value, str):
        return schedule_from_text(value)
    return value


def eval_schedule(tome: DictConfig) -> Any:
    """The schedule a trained model runs at by default: ``tome.r_eval``, or ``tome.r_train`` where it is unset."""
    return schedule_of(tome.r_eval if tome.r_eval is not None else tome.r_train)


def check_schedules_fit(cfg: DictConfig, dims) -> None:
    """The run's merge counts (``tome.r_train``, ``tome.r_eval``, the trade-off's ``tradeoff.r_values``) within what
    a layer of the model of ``dims`` (a :class:`~tome_train.tome.ViTDims`) can merge."""
    from .tome.schedule import ScheduleError, check_fits

    named = {"tome.r_train": schedule_of(cfg.tome.r_train), "tome.r_eval": eval_schedule(cfg.tome)}
    if cfg.tradeoff.enabled and cfg.tradeoff.r_values is not None:
        named["tradeoff.r_values"] = max(cfg.tradeoff.r_values)
    for key, r in named.items():
        try:
            check_fits(r, dims)
        except ScheduleError as e:
            raise ConfigError(f"{key}: {e}") from None


def world_size(trainer: DictConfig) -> int:
    """Processes a trainer config runs: ``devices`` per node (``auto``: at least one) times ``num_nodes``."""
    return (trainer.devices if isinstance(trainer.devices, int) else 1) * trainer.num_nodes


def global_batch(cfg: DictConfig, world_size: int, accumulate: int) -> int:
    """Images per optimizer step: ``data.batch_size`` per device, ``world_size`` devices, ``accumulate`` batches."""
    return cfg.data.batch_size * world_size * accumulate


def peak_lr(cfg: DictConfig, batch: int) -> float:
    """The recipe's scaling rule at a global batch of ``batch``: ``optim.blr * batch / optim.lr_base_batch``."""
    return cfg.optim.blr * batch / cfg.optim.lr_base_batch


# What a run may resume with changed: where it reads from, how it runs and what it reports, not what it trains.
RESUMABLE_CHANGES = ("description", "output_dir", "tome.r_eval", "data.root", "data.train_shards",
                     "data.val_shards", "data.num_workers", "trainer", "layout", "reference", "tradeoff", "wandb")


def _differences(before: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, before, now)`` for each key of both nested dicts whose values differ, section by section (a
    value that is a section on one side only, such as a schedule ``6`` against ``{r: 6, inflect: -1}``, differs as a
    whole)."""
    found = []
    for name in sorted(before.keys() & now.keys()):
        key, old, new = prefix + str(name), before[name], now[name]
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, key + ".")
        elif old != new:
            found.append((key, old, new))
    return found


def training_changes(saved: dict, cfg: DictConfig) -> list[str]:
    """What ``cfg`` trains otherwise than the config a checkpoint was trained with (``saved``, the resolved dict the
    checkpoint holds): ``key: saved -> now`` for each key of both whose value differs, other than those under
    :data:`RESUMABLE_CHANGES` (keys only one of them has, from another version of the schema, are not compared)."""
    return [f"{key}: {old!r} -> {new!r}"
            for key, old, new in _differences(saved, OmegaConf.to_container(cfg, resolve=True))
            if not any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)]


# The choices a string key takes. data.interpolation: timm's names (timm.data.transforms), for training and evaluation.
def allowed_values(key: str) -> tuple:
    """The values the config allows for the dotted ``key`` that takes one of a few (``wandb.mode``: None, online, ...).
    """
    return _CHOICES[key]


_CHOICES = {
    "data.source": DATA_SOURCES,
    "data.interpolation": ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"),
    "data.re_mode": ("const", "rand", "pixel"),  # timm's RandomErasing
    "mixup.mode": ("batch", "pair", "elem"),  # timm's Mixup
    "model.global_pool": ("token", "avg"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"),
    "wandb.mode": (None, "online", "offline", "disabled"),
}

# The range of each number a schema can only type: (test, what is allowed); a null optional value is always allowed.
# No range takes infinity (YAML's inf and .inf, a float too large: 1e999) or nan: a number is finite.
_POSITIVE_INT = (lambda v: v >= 1, "a positive integer")
_NON_NEGATIVE_INT = (lambda v: v >= 0, "an integer >= 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_PROBABILITY = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_FRACTION = (lambda v: 0 < v < 1, "a number in (0, 1)")
_BELOW_ONE = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_RANGES = {
    "model.img_size": _POSITIVE_INT, "model.num_classes": _POSITIVE_INT, "model.drop_path_rate": _BELOW_ONE,
    "model.head_init_std": _POSITIVE,
    "data.batch_size": _POSITIVE_INT, "data.num_workers": _NON_NEGATIVE_INT, "data.val_fraction": _FRACTION,
    "data.train_samples": _POSITIVE_INT, "data.val_samples": _POSITIVE_INT, "data.shuffle_buffer": _NON_NEGATIVE_INT,
    "data.hflip": _PROBABILITY, "data.color_jitter": _NON_NEGATIVE, "data.re_prob": _PROBABILITY,
    "data.re_count": _POSITIVE_INT, "data.crop_pct": _POSITIVE, "data.repeated_aug": _POSITIVE_INT,
    "mixup.mixup_alpha": _NON_NEGATIVE, "mixup.cutmix_alpha": _NON_NEGATIVE, "mixup.prob": _PROBABILITY,
    "mixup.switch_prob": _PROBABILITY, "mixup.label_smoothing": _BELOW_ONE,
    "optim.blr": _POSITIVE, "optim.lr_base_batch": _POSITIVE_INT, "optim.weight_decay": _NON_NEGATIVE,
    "optim.eps": _POSITIVE, "optim.layer_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "optim.warmup_epochs": _NON_NEGATIVE, "optim.warmup_lr": _NON_NEGATIVE, "optim.min_lr": _NON_NEGATIVE,
    "optim.clip_grad": _POSITIVE, "optim.ema_decay": _FRACTION,
    "trainer.epochs": _POSITIVE_INT, "trainer.num_nodes": _POSITIVE_INT, "trainer.accumulate_grad_batches": _POSITIVE_INT,
    "trainer.log_every_n_steps": _POSITIVE_INT, "trainer.checkpoint_every_n_steps": _POSITIVE_INT,
    "layout.nodes": _POSITIVE_INT, "layout.gpus_per_node": _POSITIVE_INT,
    "tradeoff.num_points": _POSITIVE_INT, "tradeoff.batch_size": _POSITIVE_INT, "tradeoff.bench_steps": _POSITIVE_INT,
    "tradeoff.limit_val_batches": _POSITIVE_INT, "tradeoff.num_vis_images": _POSITIVE_INT,
}

# Lists of numbers with a fixed length: (length, test of the list, what is allowed).
_SHAPES = {
    "data.scale": (2, lambda v: 0 < v[0] <= v[1] <= 1, "two numbers 0 < min <= max <= 1"),
    "data.ratio": (2, lambda v: 0 < v[0] <= v[1] < math.inf, "two finite numbers 0 < min <= max"),
    "data.mean": (3, lambda v: all(map(math.isfinite, v)), "three finite numbers, one per RGB channel"),
    "data.std": (3, lambda v: all(map(math.isfinite, v)) and min(v) > 0, "three finite numbers > 0, one per RGB "
                 "channel"),
    "optim.betas": (2, lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
}


def validate(cfg: DictConfig) -> None:
    """Checks a schema cannot express; each failure is one ConfigError line."""
    from .tome.schedule import ScheduleError, parse_schedule

    for key, allowed in _CHOICES.items():
        _choice(OmegaConf.select(cfg, key), allowed, key)
    for key, (test, allowed) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not test(value):
            raise ConfigError(f"{key}={value!r} is not allowed: use {allowed}")
    for key, (length, test, allowed) in _SHAPES.items():
        value = list(OmegaConf.select(cfg, key))
        if len(value) != length or not test(value):
            raise ConfigError(f"{key}={value!r} is not allowed: use {allowed}")
    if not isinstance(cfg.trainer.compile, bool):  # a mode
        from .tome.compile_modes import COMPILE_MODES

        if not isinstance(cfg.trainer.compile, str) or cfg.trainer.compile not in COMPILE_MODES:
            raise ConfigError(f"trainer.compile={cfg.trainer.compile!r} is not allowed: use one of "
                              f"{', '.join(map(str, (False, True, *COMPILE_MODES)))}")
    for key, value in cfg.model.timm_kwargs.items():  # a free-form section, which the schema cannot check
        if ":" in str(key):
            raise ConfigError(f"model.timm_kwargs: unknown key {key!r}{_COLON_HINT}")
        if value is None:  # timm.create_model drops it, so the model would be built with its default unsaid
            raise ConfigError(f"model.timm_kwargs.{key}=null is not allowed: timm leaves a null argument out; give a "
                              "value, or remove the key for the model's default")
    devices = cfg.trainer.devices
    if devices != "auto" and not (isinstance(devices, int) and not isinstance(devices, bool) and devices > 0):
        raise ConfigError(f"trainer.devices={devices!r} is not allowed: use a positive integer or auto")
    # None of them 0: a run trains, and validates to keep its best checkpoint and report its top-1.
    for key in ("limit_train_batches", "limit_val_batches"):
        limit = cfg.trainer[key]
        batches = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
        if not (limit is None or batches or (isinstance(limit, float) and 0.0 < limit <= 1.0)):
            raise ConfigError(f"trainer.{key}={limit!r} is not allowed: use a number of batches (an integer >= 1), "
                              "a fraction of the epoch (a float in (0, 1]) or null")
    limit = cfg.trainer.limit_val_batches
    if cfg.data.source == "webdataset" and isinstance(limit, float) and limit < 1.0:
        raise ConfigError(f"trainer.limit_val_batches={limit!r} is not allowed with data.source=webdataset (shards "
                          "have no index, so the validation stream has no length to take a fraction of): use a number "
                          "of batches (an integer >= 1), 1.0 or null")
    r_values = cfg.tradeoff.r_values
    if r_values is not None and (len(r_values) == 0 or min(r_values) < 0):
        raise ConfigError(f"tradeoff.r_values={list(r_values)!r} is not allowed: use a list of one or more integers "
                          ">= 0, or null (tradeoff.num_points values up to the largest r)")
    if (cfg.mixup.mixup_alpha > 0 or cfg.mixup.cutmix_alpha > 0) and cfg.data.batch_size % 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed with mixup or cutmix (timm's Mixup "
                          "mixes each image with another of its batch): use an even batch size")
    for key in ("r_train", "r_eval"):
        value = cfg.tome[key]
        if value is None:
            continue
        try:
            parse_schedule(schedule_of(value), 10**6)
        except (ScheduleError, TypeError, KeyError) as e:
            raise ConfigError(f"tome.{key}: {e}") from None
