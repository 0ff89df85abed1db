"""Write and submit the sbatch script of a multi-node run, following Lightning's SLURM rules.

Lightning (``SLURMEnvironment``) takes over process management when the job runs under
``srun`` with one task per device: ``--ntasks-per-node`` must equal ``trainer.devices`` and
``--nodes`` must equal ``trainer.num_nodes``. For auto-requeue, SLURM sends ``SIGUSR1`` to
the tasks 90 s before the time limit (``--signal=SIGUSR1@90``); after the next optimizer step the
ranks save ``signal_ckpt_N.ckpt`` into the run directory together and rank 0 calls ``scontrol
requeue`` (:class:`tome_train.requeue.StopOnSignal`, in place of Lightning's handler). The
restarted job must find that checkpoint (:func:`tome_train.cli.find_resume_checkpoint`: the
newest in the run directory) and continue the same wandb run, so the script fixes both the run
directory and the wandb run id in the training command line: every restart of the job runs
exactly the same command.

The script, for ``nodes=2, gpus_per_node=4``::

    #!/bin/bash
    #SBATCH --job-name=tome-deit_small_r13
    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=4
    #SBATCH --gpus-per-node=4
    #SBATCH --signal=SIGUSR1@90
    #SBATCH --requeue
    #SBATCH --output=/abs/run_dir/slurm-%j.out
    #SBATCH --open-mode=append
    ...
    srun /abs/python /abs/train.py --recipe deit_small_r13 output_dir=/abs/run_dir wandb.id=... \
        trainer.num_nodes=2 trainer.devices=4
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import PROJECT_ROOT, ConfigError

TRAIN_SCRIPT = PROJECT_ROOT / "train.py"
SCRIPT_NAME = "job.sbatch"
# SIGUSR1 this long before the time limit (SLURM's timing is good to about a minute): the ranks save, rank 0 requeues
WARNING_SECONDS = 90
# Lightning refuses to manage processes itself for these job names (interactive allocations).
RESERVED_JOB_NAMES = ("bash", "interactive")


class SlurmError(ConfigError):
    """A one-line, user-facing SLURM problem: bad options, no ``sbatch``, a refused submission."""


@dataclass
class SlurmOptions:
    """What goes into the ``#SBATCH`` header. ``None`` leaves a value to the cluster's default."""

    nodes: int = 1
    gpus_per_node: int = 1  # tasks (= Lightning devices) per node; GPUs per node with accelerator gpu
    accelerator: str = "gpu"  # gpu: request gpus_per_node GPUs; cpu: gpus_per_node CPU processes, no GPUs
    partition: Optional[str] = None
    time: Optional[str] = None  # e.g. "2-00:00:00"
    account: Optional[str] = None
    qos: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, e.g. "400G"
    constraint: Optional[str] = None
    extra_sbatch: list[str] = field(default_factory=list)  # more header lines: "--exclusive" or "#SBATCH --exclusive"
    setup: list[str] = field(default_factory=list)  # shell lines run before srun, e.g. "module load cuda"


def job_name_for(name: str) -> str:
    """A job name SLURM and Lightning both accept (no spaces; not ``bash``/``interactive``)."""
    clean = re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-") or "tome-train"
    return f"tome-{clean}" if clean in RESERVED_JOB_NAMES else clean


def _argv_value(argv: list[str], key: str) -> Optional[str]:
    value = None
    for item in argv:
        if item.startswith(key + "="):
            value = item.split("=", 1)[1]
    return value


# sbatch's --time formats ("minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes", "days-hours:minutes:seconds", or no limit) and --mem's size with an optional unit.
_TIME = re.compile(r"(\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite)", re.IGNORECASE)
_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)


def check_job(opts: SlurmOptions, train_argv: list[str]) -> None:
    """Raise :class:`SlurmError` for options sbatch or Lightning would refuse, before anything is written."""
    for name in ("nodes", "gpus_per_node"):
        value = getattr(opts, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SlurmError(f"slurm {name}={value!r}: use a positive integer")
    if opts.cpus_per_task is not None and (not isinstance(opts.cpus_per_task, int) or opts.cpus_per_task < 1):
        raise SlurmError(f"slurm cpus_per_task={opts.cpus_per_task!r}: use a positive integer")
    if opts.accelerator not in ("gpu", "cpu"):
        raise SlurmError(f"slurm accelerator={opts.accelerator!r}: use gpu or cpu")
    # Lightning's rule: --nodes == trainer.num_nodes and --ntasks-per-node == trainer.devices.
    for key, want in (("trainer.num_nodes", opts.nodes), ("trainer.devices", opts.gpus_per_node)):
        got = _argv_value(train_argv, key)
        if got is not None and got != str(want):
            raise SlurmError(
                f"{key}={got} in the training command does not match the job's {want} "
                f"({'--nodes' if key.endswith('num_nodes') else '--ntasks-per-node'}); Lightning needs them equal"
            )
    for value in (opts.partition, opts.time, opts.account, opts.qos, opts.mem, opts.constraint):
        if value is not None and ("\n" in str(value) or str(value).strip() == ""):
            raise SlurmError(f"slurm option {value!r}: empty or multi-line value")
    if opts.time is not None and not _TIME.fullmatch(opts.time):
        raise SlurmError(f"slurm time={opts.time!r} is not allowed: use minutes, [days-]hours:minutes:seconds "
                         "(e.g. 72:00:00, 2-12:00:00) or unlimited")
    if opts.mem is not None and not _MEM.fullmatch(opts.mem):
        raise SlurmError(f"slurm mem={opts.mem!r} is not allowed: use a size per node, e.g. 400G, 512000M")


def render_sbatch(
    run_dir: Path,
    job_name: str,
    opts: SlurmOptions,
    train_argv: list[str],
    python: str = sys.executable,
    train_script: Optional[Path] = None,
) -> str:
    """The text of the sbatch script (see :func:`write_sbatch`)."""
    check_job(opts, list(train_argv))
    run_dir = Path(run_dir).resolve()
    train_script = Path(train_script or TRAIN_SCRIPT).resolve()
    g = opts.gpus_per_node
    header = [
        f"--job-name={job_name_for(job_name)}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={g}",  # one task per device: Lightning's SLURM rule
    ]
    if opts.accelerator == "gpu":
        header.append(f"--gpus-per-node={g}")
    optional = {
        "cpus-per-task": opts.cpus_per_task, "mem": opts.mem, "partition": opts.partition, "time": opts.time,
        "account": opts.account, "qos": opts.qos, "constraint": opts.constraint,
    }
    header += [f"--{k}={v}" for k, v in optional.items() if v is not None]
    header += [f"--signal=SIGUSR1@{WARNING_SECONDS}", "--requeue"]
    header += [
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--chdir={Path.cwd()}",  # where the job runs: where it was submitted
    ]
    for line in opts.extra_sbatch:
        line = line.strip()
        header.append(line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line)
    command = [python, str(train_script), *map(str, train_argv)]
    lines = ["#!/bin/bash"] + [f"#SBATCH {h}" for h in header] + [
        "",
        "# Written by tome_train.slurm. Every restart of this job (requeue after SIGUSR1 or preemption)",
        "# runs the same command: the run directory and the wandb run id are fixed below, and training",
        "# resumes from the newest checkpoint in the run directory.",
        "echo \"job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST at $(date -Is)\"",
        *opts.setup,
        "srun " + shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def write_sbatch(run_dir: Path, job_name: str, opts: SlurmOptions, train_argv: list[str], **render_args) -> Path:
    """Write ``run_dir/job.sbatch`` (the text of :func:`render_sbatch`) and return its path.

    ``train_argv`` is the training command line after ``train.py``: the recipe, and the fixed
    ``output_dir=<run_dir>``, ``wandb.id=<id>``, ``trainer.num_nodes=N`` and ``trainer.devices=G``
    overrides (a mismatch with ``opts`` is refused). The job runs in the current directory.
    """
    text = render_sbatch(run_dir, job_name, opts, train_argv, **render_args)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / SCRIPT_NAME
    script.write_text(text)
    script.chmod(0o755)
    return script


def find_sbatch(sbatch: str = "sbatch") -> str:
    """The path of ``sbatch``, or :class:`SlurmError`: checked before the run directory and its script are written."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise SlurmError(f"{sbatch} not found on PATH: submit from a SLURM login node, or use --dry-run to only write "
                         "the job's script")
    return exe


def submit(script: Path, sbatch: str = "sbatch") -> str:
    """Submit with ``sbatch --parsable`` and return the job id; :class:`SlurmError` on failure."""
    exe = find_sbatch(sbatch)
    proc = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[-1]
        # the script and the run's wandb id stay, whole: the same command, or sbatch itself, submits it again
        raise SlurmError(f"sbatch {script} failed: {msg}; the script stays for `sbatch {script}`")
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip() if proc.stdout.strip() else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script}: no job id in its output {proc.stdout.strip()!r}")
    return job_id
