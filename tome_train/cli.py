"""What ``train.py`` calls: train (default), ``export``, ``bench``, dry run and SLURM submission.

The flow of a run, one call per arrow:
recipe -> config -> data module + ToMe model -> LightningModule -> Trainer -> checkpoints
-> trade-off report.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import netrc
import os
import signal
import sys
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .arguments import OneLineArgumentParser, integer_at_least
from .config import ConfigError, allowed_values, check_schedules_fit, describe_recipes, load_config, world_size
from .data import DataError, check_locations

EARLY_USER_ERRORS = (ConfigError, DataError, FileNotFoundError)  # bad input said before torch is imported
WANDB_ID_FILE = "wandb_run_id"
# not Lightning's hpc_ckpt_*, which its validate() under SLURM loads unasked (tome_train.requeue writes them)
SIGNAL_CHECKPOINTS = "signal_ckpt_*.ckpt"


def _user_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input (one line, exit 2), not a bug, besides those of :data:`EARLY_USER_ERRORS`:
    their modules import torch."""
    from .checkpoint_io import ResumeError
    from .models import CheckpointError
    from .tome import ScheduleError, UnsupportedModelError

    return (CheckpointError, ResumeError, ScheduleError, UnsupportedModelError)


# --slurm's options, each a field of slurm.SlurmOptions: its type, and the config key it sets (None: only the job's)
SLURM_FLAGS = {
    "nodes": (integer_at_least(1), "trainer.num_nodes"),
    "gpus_per_node": (integer_at_least(1), "trainer.devices"),
    **{name: (str, None) for name in ("partition", "time", "account", "qos", "mem", "constraint")},
    "cpus_per_task": (integer_at_least(1), None),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="train.py",
        description="Train a timm ViT with Token Merging. Subcommands: `export ...`, `bench ...`.",
    )
    p.add_argument("--recipe", help="recipe name or YAML path (default: the bundled digits recipe)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. trainer.epochs=3")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan (or the sbatch script) and exit")
    p.add_argument("--resume", metavar="PATH", help="checkpoint to resume from (default: newest in the run dir)")
    p.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<recipe>)")
    s = p.add_argument_group("SLURM")
    s.add_argument("--slurm", action="store_true", help="write an sbatch script into the run dir and submit it")
    for name, (kind, key) in SLURM_FLAGS.items():
        s.add_argument(_flag(name), type=kind,
                       help=key and f"default: the recipe's {key} (its published layout)")
    return p


def override_sets(item: str, key: str) -> bool:
    """Whether the override ``item`` sets the dotted ``key``: ``key=...``, or a section holding it
    (``trainer={num_nodes: 4}``). One that does not parse sets nothing here; :func:`.config.load_config` refuses it."""
    name = item.split("=", 1)[0].strip()
    if name == key:
        return True
    if not key.startswith(name + "."):
        return False
    absent = object()
    try:
        return OmegaConf.select(OmegaConf.from_dotlist([item]), key, default=absent,
                                throw_on_resolution_failure=False) is not absent
    except (OmegaConfBaseException, yaml.YAMLError):
        return False


def resolve(args: argparse.Namespace) -> DictConfig:
    """The run's config: the recipe, the ``key=value`` overrides and the flags that set a key.

    A flag and an override of the same key are refused rather than one silently winning, as are the SLURM flags
    without ``--slurm``, which nothing else would read."""
    if not args.slurm and (given := [name for name in SLURM_FLAGS if getattr(args, name) is not None]):
        key = SLURM_FLAGS[given[0]][1]
        local = f" (a run started here takes {key}=N)" if key else ""
        raise ConfigError(f"{_flag(given[0])} {getattr(args, given[0])} is an option of --slurm, which was not "
                          f"given{local}")
    flag_keys = {"output_dir": ("--output-dir", args.output_dir)}
    if args.slurm:
        flag_keys |= {key: (_flag(name), getattr(args, name)) for name, (_, key) in SLURM_FLAGS.items() if key}
    flagged = {key: (flag, value) for key, (flag, value) in flag_keys.items() if value is not None}
    for item in args.overrides:
        for key, (flag, value) in flagged.items():
            if override_sets(item, key):
                raise ConfigError(f"{flag} {value} and the override {item!r} both set {key}: give one of them")
    return load_config(args.recipe, [*args.overrides, *(f"{key}={value}" for key, (_, value) in flagged.items())])


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest of the signals' ``signal_ckpt_N.ckpt`` and ``checkpoints/last.ckpt``; where a kill cut
    ``last.ckpt``'s rewrite short (its ``.last.ckpt.partial`` is left, or the first is missing), the ``best-*.ckpt``
    written just before it at that epoch's end too. (By time: a copied run directory, which keeps no file times,
    must not resume an older epoch's best.)"""
    checkpoints = run_dir / "checkpoints"
    lasts = list(checkpoints.glob("last*.ckpt"))
    candidates = [*run_dir.glob(SIGNAL_CHECKPOINTS), *lasts]
    if not lasts or (checkpoints / ".last.ckpt.partial").exists():
        candidates += checkpoints.glob("best-*.ckpt")
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def wandb_run_id(cfg: DictConfig, run_dir: Path) -> str:
    """The recipe's fixed id, else the run dir's (:func:`keep_wandb_run_id`), else a new one."""
    if cfg.wandb.id:
        return cfg.wandb.id
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    return uuid.uuid4().hex[:12]


def keep_wandb_run_id(cfg: DictConfig, run_dir: Path, run_id: str) -> None:
    """Write a new ``run_id`` into ``run_dir`` (which must exist), so that a restarted run continues the same run."""
    id_file = run_dir / WANDB_ID_FILE
    if not cfg.wandb.id and not id_file.is_file():
        id_file.write_text(run_id)


def _wandb_key_configured() -> bool:
    """Whether wandb finds an API key: ``WANDB_API_KEY``, or ``~/.netrc``'s entry for its server (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_mode(cfg: DictConfig) -> str:
    """``wandb.mode``, else ``WANDB_MODE``, else online where an API key is configured and offline where not."""
    if cfg.wandb.mode:
        return cfg.wandb.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _wandb_key_configured() else "offline"


def build_trainer(cfg: DictConfig, run_dir: Path):
    """The run's Lightning Trainer; ``run_dir`` and its wandb id are made once Lightning has taken the config."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.plugins.environments import SLURMEnvironment
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from .checkpoint_io import AtomicCheckpointIO, MovableModelCheckpoint
    from .module import ModelSummaryWithFlops, ThroughputOfReadBatches
    from .requeue import StopOnSignal

    t = cfg.trainer
    run_id = wandb_run_id(cfg, run_dir)
    logger = WandbLogger(
        project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or cfg.name,
        tags=list(cfg.wandb.tags), id=run_id, resume="allow",
        save_dir=str(run_dir), mode=_wandb_mode(cfg), config=OmegaConf.to_container(cfg, resolve=True),
    )
    ckpt_dir = run_dir / "checkpoints"

    def newest(**trigger) -> MovableModelCheckpoint:
        # last.ckpt as the one "best" by global step, rewritten in place: Lightning 2.6's save_last writes it only
        # where a top-k file is written at the same step, and at the end of training only if it never did
        return MovableModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor="step", mode="max", save_top_k=1,
                               enable_version_counter=False, **trigger)

    callbacks = [
        MovableModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}", monitor="val/top1", mode="max",
                               save_top_k=1),
        newest(every_n_epochs=1),  # so the last epoch's end, the end of training, too
        ModelSummaryWithFlops(),
        # images/s (and model FLOPs utilization on a GPU Lightning knows) over each logging interval's batches
        ThroughputOfReadBatches(batch_size_fn=lambda batch: len(batch[0]), window_size=max(t.log_every_n_steps, 2)),
    ]
    if t.checkpoint_every_n_steps:
        callbacks.append(newest(every_n_train_steps=t.checkpoint_every_n_steps))
    callbacks.append(StopOnSignal(requeue=SLURMEnvironment.detect()))  # in place of Lightning's signal handlers
    distributed = world_size(t) > 1
    try:
        trainer = pl.Trainer(
            default_root_dir=str(run_dir), max_epochs=t.epochs, accelerator=t.accelerator, devices=t.devices,
            num_nodes=t.num_nodes, precision=t.precision, accumulate_grad_batches=t.accumulate_grad_batches,
            log_every_n_steps=t.log_every_n_steps, limit_train_batches=t.limit_train_batches,
            limit_val_batches=t.limit_val_batches, deterministic=t.deterministic, callbacks=callbacks,
            gradient_clip_val=cfg.optim.clip_grad, gradient_clip_algorithm="norm",
            logger=logger, plugins=[AtomicCheckpointIO()], strategy="ddp" if distributed else "auto",
            use_distributed_sampler=False,  # the data module splits by rank and worker itself
        )
    except (MisconfigurationException, ValueError) as e:  # an accelerator, device count or precision it cannot run
        raise ConfigError(f"trainer.accelerator={t.accelerator}, devices={t.devices}, precision={t.precision}: "
                          f"{str(e).splitlines()[0]}") from None
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: Lightning may refuse the trainer config above
    keep_wandb_run_id(cfg, run_dir, run_id)
    return trainer


def check_output_dir(output_dir: str) -> None:
    """The run directory is one, or can be made: not a file, nor under one, and where this user may write."""
    path = Path(output_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under the file {existing}"
        raise ConfigError(f"output_dir={output_dir} {where}: pass a directory (a new one, or a run's)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={output_dir}: {existing} is not writable by this user")


def check_run_inputs(cfg: DictConfig, resume: str | None = None) -> Path | None:
    """The paths a run reads and writes, checked before torch and Lightning are imported (which takes seconds): the
    data (:func:`.data.check_locations`), the run directory (:func:`check_output_dir`), an online wandb run's API
    key, the checkpoint it resumes (``resume``, else the newest in its run directory) and, where it resumes none, the
    one it starts from (``model.checkpoint``). Returns the checkpoint to resume."""
    check_locations(cfg.data)
    check_output_dir(cfg.output_dir)
    modes = [mode for mode in allowed_values("wandb.mode") if mode]
    if not cfg.wandb.mode and os.environ.get("WANDB_MODE") and os.environ["WANDB_MODE"] not in modes:
        raise ConfigError(f"WANDB_MODE={os.environ['WANDB_MODE']!r} is not allowed: use one of {', '.join(modes)}")
    if _wandb_mode(cfg) == "online" and not _wandb_key_configured():
        source = f"wandb.mode={cfg.wandb.mode}" if cfg.wandb.mode else "WANDB_MODE=online"
        raise ConfigError(f"{source} needs an API key: set WANDB_API_KEY or run `wandb login`, or use "
                          "wandb.mode=offline (`wandb sync` uploads the run later)")
    ckpt = Path(resume) if resume else find_resume_checkpoint(Path(cfg.output_dir).resolve())
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"--resume {ckpt}: no such checkpoint file")
    start = Path(cfg.model.checkpoint) if cfg.model.checkpoint and ckpt is None else None
    if start is not None and start.is_dir():
        raise FileNotFoundError(f"model.checkpoint={start}: is a folder; pass a weights file (an export's "
                                f"{start / 'model.safetensors'})")
    if start is not None and not start.is_file():
        raise FileNotFoundError(f"model.checkpoint={start}: no such file")
    return ckpt


def _starting_checkpoint(path: str) -> str:
    """What a fresh run starts from: the checkpoint's format (a tome-train checkpoint's EMA weights where it has them,
    as timm takes them), size and shape."""
    from .models import checkpoint_summary

    return f"checkpoint {path}: " + ", ".join(f"{k}={v}" for k, v in checkpoint_summary(path).items())


def _fine_tunes_from_scratch(cfg: DictConfig) -> str | None:
    """What to tell of a fine-tuning recipe (its head re-initialised, as MAE's is) given no checkpoint to fine-tune."""
    if cfg.model.head_init_std is None or cfg.model.checkpoint:
        return None
    return (f"recipe {cfg.name} fine-tunes (model.head_init_std={cfg.model.head_init_std:g}) but model.checkpoint is not "
            "set: it trains from random weights; pass model.checkpoint=PATH (the MAE pretrain checkpoint)")


def _not_a_logger_advert(record: logging.LogRecord) -> bool:
    """Lightning's tip at every run to install its hosted logger: the run logs to wandb."""
    return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def _run_ended_on_error():
    """A run that raises an error closes its progress bars, so that the error's one line is a line of its own, and
    ends its wandb run as failed, so that the next run in this process (a notebook, the tests) starts its own instead
    of logging into this one. A run stopped by a signal (:class:`~tome_train.requeue.RunStopped`) ends the process, and
    wandb's exit hook ends the run."""
    try:
        yield
    except Exception:
        import wandb
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # Lightning's bars stay open mid-line when a step raises
            bar.close()
        if wandb.run is not None:
            with contextlib.suppress(Exception):  # wandb's service may have gone down with the error, which is the news
                wandb.run.finish(exit_code=1)
        raise


def train(cfg: DictConfig, resume: str | None = None) -> dict:
    """Fit the recipe, then measure and log the accuracy/throughput trade-off."""
    ckpt = check_run_inputs(cfg, resume)
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from .checkpoint_io import check_same_training, check_weights_fit, read_resume_checkpoint
    from .data import ImageDataModule
    from .module import ToMeClassifier
    from .requeue import RunRequeued, signals_end_the_process
    from .tome import GRAPHED_COMPILE_MODES, kernels

    # Lightning's hint that srun exists but is unused: a local run on a SLURM login node is intended.
    warnings.filterwarnings("ignore", message="The `srun` command is available")
    # Lightning 2.6's own use of torch 2.14's deprecated LeafSpec (its pytree helper): nothing a run can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"pytorch_lightning\.")
    # A run directory holds one run's checkpoints, which it resumes (check_same_training refuses another run's).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_a_logger_advert)
    run_dir = Path(cfg.output_dir).resolve()
    datamodule = ImageDataModule(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    datamodule.check(cfg.model.num_classes, world_size(cfg.trainer))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the run's config; bad input stays one line
    module = ToMeClassifier(cfg, pretrained=ckpt is None and cfg.model.checkpoint is not None)
    changes = []
    if ckpt is not None:
        checkpoint = read_resume_checkpoint(ckpt)
        check_weights_fit(ckpt, checkpoint, module)
        changes = check_same_training(ckpt, checkpoint, cfg, chosen=resume is not None, datamodule=datamodule)
        del checkpoint  # Lightning reads it again to restore
    if cfg.trainer.compile:
        module.model.compile(mode=None if cfg.trainer.compile is True else cfg.trainer.compile)
    trainer = build_trainer(cfg, run_dir)
    if ckpt is not None and trainer.is_global_zero:
        print(f"resuming from {ckpt}" + (f" with changes: {'; '.join(changes)}" if changes else ""))
    elif trainer.is_global_zero and cfg.model.checkpoint:
        print(_starting_checkpoint(cfg.model.checkpoint))
    elif trainer.is_global_zero and (note := _fine_tunes_from_scratch(cfg)):
        print(f"note: {note}")
    # compiled graphs replayed as CUDA graphs: the kernels are chosen by the device's time alone
    graphed = cfg.trainer.compile in GRAPHED_COMPILE_MODES
    with _run_ended_on_error():
        try:
            with kernels.choosing_for_graphs() if graphed else contextlib.nullcontext():
                trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
        except RunRequeued:  # SLURM restarts the job from its checkpoint, into the same wandb run
            if trainer.logger is not None:
                trainer.logger.experiment.finish()
            return {"run_dir": str(run_dir), "requeued": True}
        # after training there is nothing to save
        with signals_end_the_process(trainer.is_global_zero, requeue=SLURMEnvironment.detect()):
            return _after_fit(cfg, trainer, module, datamodule, run_dir)


def _after_fit(cfg: DictConfig, trainer, module, datamodule, run_dir: Path) -> dict:
    """The fitted run's result: its top-1 (validating a run that had already finished) and trade-off report."""
    from .tradeoff import report_tradeoff

    top1 = trainer.callback_metrics.get("val/top1")
    if top1 is None:  # the run had already finished, so fit did nothing: validate the checkpoint it resumed
        if trainer.is_global_zero:
            print("the run had already finished: validating its last checkpoint")
        loggers, trainer.loggers = trainer.loggers, []  # the run's val/top1 history stays as it was
        top1 = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/top1"]
        trainer.loggers = loggers
    result = {"run_dir": str(run_dir), "val_top1": float(top1)}
    if cfg.tradeoff.enabled:
        result["tradeoff"] = report_tradeoff(trainer, module, datamodule, run_dir)
    if trainer.logger is not None:
        trainer.logger.experiment.finish()  # writes the run's summary and config files
    if trainer.is_global_zero:
        print(f"final validation top-1: {result['val_top1']:.2f}%  (run dir: {run_dir})")
    return result


def dry_run(cfg: DictConfig, resume: str | None = None) -> str:
    """The plan of a run: batch, lr, steps, schedule and FLOPs, data found, the checkpoint it resumes or starts
    from."""
    from .config import eval_schedule, global_batch, peak_lr, schedule_of

    ckpt = check_run_inputs(cfg, resume)
    from .checkpoint_io import check_same_training, read_resume_checkpoint
    from .data import ImageDataModule
    from .models import build_model
    from .tome import ViTDims, apply_tome, flop_bound, tome_state, vit_flops

    t = cfg.trainer
    world = world_size(t)
    batch = global_batch(cfg, world, t.accumulate_grad_batches)
    datamodule = ImageDataModule(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    datamodule.check(cfg.model.num_classes, world)
    steps = datamodule.steps_per_epoch(world) // t.accumulate_grad_batches
    model = build_model(cfg.model, device="meta")  # checks a checkpoint's keys and shapes, allocates nothing
    dims = ViTDims.from_timm(model)
    check_schedules_fit(cfg, dims)
    lines = [
        f"recipe {cfg.name}: {cfg.model.arch} on {cfg.data.source}, {t.num_nodes} node(s) x {world // t.num_nodes} "
        "device(s)",
        f"global batch {batch} = {cfg.data.batch_size} per device x {world} x accumulate {t.accumulate_grad_batches}"
        f" (recipe layout {cfg.layout.nodes}x{cfg.layout.gpus_per_node})",
        f"peak lr {peak_lr(cfg, batch):.4g} = {cfg.optim.blr:g} x {batch} / {cfg.optim.lr_base_batch}; "
        f"warmup {cfg.optim.warmup_epochs:g} epochs from {cfg.optim.warmup_lr:g}, "
        f"{'then cosine' if cfg.optim.warmup_prefix else 'cosine over the whole run'} to {cfg.optim.min_lr:g}",
        f"steps: {steps} per epoch x {t.epochs} epochs = {steps * t.epochs}",
    ]
    base = vit_flops(dims)
    for key in ("r_train", "r_eval"):
        r = schedule_of(cfg.tome.r_train) if key == "r_train" else eval_schedule(cfg.tome)
        apply_tome(model, r=r, prop_attn=cfg.tome.prop_attn)
        schedule = tome_state(model).schedule
        counts = dims.tokens_per_layer(schedule)
        merges = [n_in - n_out for n_in, n_out in zip(counts, counts[1:])]
        capped = "" if merges == schedule else (
            f" (asked {schedule}: at most half of a layer's unprotected tokens merge, as in the paper's code)")
        flops = vit_flops(dims, schedule)
        bound = flop_bound(dims, schedule)
        lines.append(
            f"{key} {r}: merges per layer {merges}{capped}; tokens {counts}; "
            f"{flops / 1e9:.2f} GFLOPs vs {base / 1e9:.2f} baseline ({bound:.2f}x bound)"
        )
    found = datamodule.describe()
    lines.append("data: " + ", ".join(f"{k}={v}" for k, v in found.items()))
    if ckpt is not None:
        checkpoint = read_resume_checkpoint(ckpt)
        changes = check_same_training(ckpt, checkpoint, cfg, chosen=resume is not None, datamodule=datamodule)
        lines.append(f"resumes {ckpt} at step {checkpoint.get('global_step')}"
                     + (f", with changes: {'; '.join(changes)}" if changes else ""))
    elif cfg.model.checkpoint:
        lines.append(_starting_checkpoint(cfg.model.checkpoint))
    else:
        lines.append("checkpoint: none (training from scratch)")
        note = _fine_tunes_from_scratch(cfg)
        lines += [f"note: {note}"] if note else []
    return "\n".join(lines)


def submit_slurm(cfg: DictConfig, args: argparse.Namespace) -> str:
    """Write the run's sbatch script into its run directory and submit it (``--dry-run``: only write it), once the
    checks of a dry run pass; returns the run's plan, then the job id (or the script)."""
    from .slurm import SlurmOptions, check_job, find_sbatch, submit, write_sbatch

    nodes, gpus_per_node = cfg.trainer.num_nodes, cfg.trainer.devices
    if gpus_per_node == "auto":
        raise ConfigError("trainer.devices=auto is not allowed with --slurm: pass --gpus-per-node N (one task per GPU)")
    if args.resume:  # each start of the job, its requeues too, takes the run directory's newest checkpoint
        raise ConfigError(f"--resume {args.resume} is not allowed with --slurm: a job resumes from the newest checkpoint "
                          "in its run directory; pass that run's directory as --output-dir to continue it")
    # what a local run would refuse, refused here rather than once the job has waited in the queue: the data and
    # checkpoint paths as this node sees them (a cluster's shared file system), the model, the schedule
    plan = dry_run(cfg)
    run_dir = Path(cfg.output_dir).resolve()
    fixed = {"output_dir": run_dir, "trainer.num_nodes": nodes, "trainer.devices": gpus_per_node}
    train_argv = [
        "--recipe", args.recipe or cfg.name,
        *(o for o in args.overrides if o.split("=", 1)[0].strip() not in fixed),  # each of those once, resolved
        *(f"{key}={value}" for key, value in fixed.items()),
    ]
    opts = SlurmOptions(
        nodes=nodes, gpus_per_node=gpus_per_node, accelerator="cpu" if cfg.trainer.accelerator == "cpu" else "gpu",
        **{name: getattr(args, name) for name, (_, key) in SLURM_FLAGS.items() if key is None},
    )
    check_job(opts, train_argv)  # before the run directory and its wandb id are made
    if not args.dry_run:
        find_sbatch()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = wandb_run_id(cfg, run_dir)
    keep_wandb_run_id(cfg, run_dir, run_id)
    train_argv.append(f"wandb.id={run_id}")
    script = write_sbatch(run_dir, f"tome-{cfg.name}", opts, train_argv)
    if args.dry_run:
        return f"{plan}\n\n{script.read_text().rstrip()}"
    return f"{plan}\nsubmitted job {submit(script)}; script {script}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        from .export import main as export_main

        return export_main(argv[1:])
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="train.py bench")

    args = build_parser().parse_intermixed_args(argv)  # overrides before, between and after the options
    if args.list_recipes:
        print("\n".join(describe_recipes()))
        return 0
    try:
        cfg = resolve(args)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        elif args.slurm:
            print(submit_slurm(cfg, args))
        elif args.dry_run:
            print(dry_run(cfg, resume=args.resume))
        else:
            train(cfg, resume=args.resume)
    except EARLY_USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .module import NonFiniteLossError
        from .requeue import RunStopped

        if isinstance(e, RunStopped):  # by SIGTERM, which it said: a stopped run is no finished one
            return 128 + signal.SIGTERM
        if not isinstance(e, (*_user_errors(), NonFiniteLossError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2
    return 0
