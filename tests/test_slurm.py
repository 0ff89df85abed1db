"""SLURM: the sbatch script we write (no SLURM needed), and the same scripts run on a real
two-node SLURM started by tests/slurm_cluster.py (marked ``slurm``; skipped with the reason
when SLURM cannot run here: `bash scripts/ci_slurm_setup.sh` installs it as root).

Set ``TOME_TRAIN_REQUIRE_SLURM=1`` to make an unavailable SLURM a failure instead of a skip (CI).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tome_train.slurm import SlurmError, SlurmOptions, job_name_for, render_sbatch, submit, write_sbatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, SlurmUnavailable, unavailable_reason  # noqa: E402

PYTHON = sys.executable


def _header(text: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]


def _srun_argv(text: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith("srun ")]
    return shlex.split(line)[1:]


def _train_argv(run_dir: Path, nodes: int, devices: int, run_id: str = "abc123") -> list[str]:
    return ["--recipe", "deit_small_r13", f"output_dir={run_dir}", f"wandb.id={run_id}",
            f"trainer.num_nodes={nodes}", f"trainer.devices={devices}"]


# ---------------------------------------------------------------- the script (no SLURM needed)

def test_write_sbatch_follows_lightnings_rules(tmp_path):
    run_dir = tmp_path / "run"
    opts = SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", time="2-00:00:00", account="proj", qos="high",
                        cpus_per_task=10, mem="400G", constraint="h100", extra_sbatch=["--exclusive", "#SBATCH --comment=x"])
    script = write_sbatch(run_dir, "tome-deit_small_r13", opts, _train_argv(run_dir, 4, 8), python="/opt/py/bin/python")
    assert script == run_dir / "job.sbatch" and script.is_file() and os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    h = _header(text)
    assert "--nodes=4" in h
    assert "--ntasks-per-node=8" in h  # one task per device
    assert "--gpus-per-node=8" in h
    assert "--signal=SIGUSR1@90" in h and "--requeue" in h
    assert f"--output={run_dir.resolve()}/slurm-%j.out" in h and "--open-mode=append" in h
    for line in ("--partition=gpu", "--time=2-00:00:00", "--account=proj", "--qos=high", "--cpus-per-task=10",
                 "--mem=400G", "--constraint=h100", "--exclusive", "--comment=x", "--job-name=tome-deit_small_r13"):
        assert line in h, line
    argv = _srun_argv(text)
    assert argv[0] == "/opt/py/bin/python" and argv[1].endswith("train.py") and Path(argv[1]).is_absolute()
    assert f"output_dir={run_dir}" in argv and "wandb.id=abc123" in argv
    assert "trainer.num_nodes=4" in argv and "trainer.devices=8" in argv
    # the header lines come before any command (sbatch stops reading #SBATCH at the first command)
    first_cmd = next(i for i, line in enumerate(text.splitlines()[1:]) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in text.splitlines()[1 + first_cmd:])


def test_write_sbatch_is_the_same_on_every_write(tmp_path):
    """A requeued job reruns the same script: nothing in it may depend on when it was written."""
    args = (tmp_path, "job", SlurmOptions(nodes=2, gpus_per_node=2), _train_argv(tmp_path, 2, 2))
    first = write_sbatch(*args).read_text()
    assert write_sbatch(*args).read_text() == first


def test_write_sbatch_cpu_processes_have_no_gpu_line(tmp_path):
    opts = SlurmOptions(nodes=2, gpus_per_node=3, accelerator="cpu")
    h = _header(write_sbatch(tmp_path, "x", opts, _train_argv(tmp_path, 2, 3)).read_text())
    assert "--ntasks-per-node=3" in h and "--nodes=2" in h
    assert not [line for line in h if "gpu" in line or "gres" in line]
    h = _header(render_sbatch(tmp_path, "x", SlurmOptions(gpus_per_node=2), _train_argv(tmp_path, 1, 2)))
    assert "--gpus-per-node=2" in h
    # optional values left out stay out of the header
    assert not [line for line in h if line.startswith(("--partition", "--time", "--account", "--qos", "--mem"))]


def test_write_sbatch_refuses_a_layout_lightning_would_reject(tmp_path):
    with pytest.raises(SlurmError, match="trainer.devices=4.*2"):
        write_sbatch(tmp_path, "x", SlurmOptions(nodes=1, gpus_per_node=2), _train_argv(tmp_path, 1, 4))
    with pytest.raises(SlurmError, match="trainer.num_nodes=1"):
        write_sbatch(tmp_path, "x", SlurmOptions(nodes=2, gpus_per_node=4), _train_argv(tmp_path, 1, 4))
    with pytest.raises(SlurmError, match="nodes=0"):
        write_sbatch(tmp_path, "x", SlurmOptions(nodes=0), [])
    with pytest.raises(SlurmError, match="accelerator"):
        write_sbatch(tmp_path, "x", SlurmOptions(accelerator="tpu"), [])
    with pytest.raises(SlurmError, match=r"slurm time='3 days' is not allowed: use minutes, \[days-\]hours:minutes:seconds"):
        write_sbatch(tmp_path, "x", SlurmOptions(time="3 days"), [])
    with pytest.raises(SlurmError, match="slurm mem='lots' is not allowed: use a size per node"):
        write_sbatch(tmp_path, "x", SlurmOptions(mem="lots"), [])
    assert list(tmp_path.iterdir()) == []
    for time_limit, mem in (("30", "0"), ("72:00:00", "400G"), ("2-12", "512000M"), ("2-12:00:00", "8g"),
                            ("UNLIMITED", "64T")):
        header = render_sbatch(tmp_path, "x", SlurmOptions(time=time_limit, mem=mem), [])
        assert f"#SBATCH --time={time_limit}" in header and f"#SBATCH --mem={mem}" in header
    assert not (tmp_path / "job.sbatch").exists()


def test_job_name_is_never_an_interactive_one():
    """Lightning ignores SLURM for jobs named bash/interactive: it would not manage the processes."""
    assert job_name_for("bash") not in ("bash", "interactive")
    assert job_name_for("interactive") not in ("bash", "interactive")
    assert job_name_for("my run/1") == "my-run-1"
    assert job_name_for("tome-deit_small_r13") == "tome-deit_small_r13"


def test_quoting_survives_spaces(tmp_path):
    run_dir = tmp_path / "a run"
    text = render_sbatch(run_dir, "x", SlurmOptions(), ["--recipe", "r", f"output_dir={run_dir}", "wandb.name=a b"],
                         python="/p/python")
    argv = _srun_argv(text)
    assert f"output_dir={run_dir}" in argv and "wandb.name=a b" in argv


def test_slurm_runs_the_recipes_layout_unless_told_otherwise(tmp_path, capsys, imagenet_layout):
    """``train.py --slurm`` without ``--nodes`` or ``--gpus-per-node`` asks for the recipe's published layout (MAE
    ViT-L: 4 nodes of 8 GPUs); either flag replaces its part; ``trainer.devices=auto`` is refused, writing nothing."""
    from tome_train.cli import main

    for flags, (nodes, gpus) in (([], (4, 8)), (["--nodes", "2"], (2, 8)), (["--gpus-per-node", "4"], (4, 4))):
        run_dir = tmp_path / f"run{nodes}x{gpus}"
        assert main(["--recipe", "mae_vitl_r8", "--slurm", "--dry-run", "--output-dir", str(run_dir), *flags,
                     f"data.root={imagenet_layout}"]) == 0
        text = capsys.readouterr().out
        assert {f"--nodes={nodes}", f"--ntasks-per-node={gpus}", f"--gpus-per-node={gpus}"} <= set(_header(text))
        argv = _srun_argv(text)
        assert f"trainer.num_nodes={nodes}" in argv and f"trainer.devices={gpus}" in argv
    assert main(["--slurm", "--dry-run", "--output-dir", str(tmp_path / "auto"), "trainer.devices=auto"]) == 2
    assert capsys.readouterr().err == ("error: trainer.devices=auto is not allowed with --slurm: pass --gpus-per-node N "
                                       "(one task per GPU)\n")
    assert not (tmp_path / "auto").exists()
    # it was dropped from the job's command: the job started afresh, or from whatever its directory held
    assert main(["--slurm", "--dry-run", "--output-dir", str(tmp_path / "re"), "--resume", "x/last.ckpt"]) == 2
    assert capsys.readouterr().err == ("error: --resume x/last.ckpt is not allowed with --slurm: a job resumes from the "
                                       "newest checkpoint in its run directory; pass that run's directory as "
                                       "--output-dir to continue it\n")
    assert not (tmp_path / "re").exists()


def test_slurm_refuses_what_the_job_would_fail_on_before_writing_it(tmp_path, capsys, imagenet_layout):
    """``--slurm`` checked only the config, so a job without its data or with a model timm does not know was written,
    submitted, and failed once it had waited in the queue. It now runs the dry run's checks first and prints its plan
    above the script."""
    from tome_train.cli import main

    run_dir = tmp_path / "run"
    for overrides, error in (
        ([], "error: data.root is required for data.source=webdataset"),
        ([f"data.root={imagenet_layout}", "model.arch=vit_nope"], "error: model.arch='vit_nope' is not a timm model"),
        ([f"data.root={imagenet_layout}", "tome.r_train=99"], "error: tome.r_train: r=99 is not possible"),
    ):
        assert main(["--recipe", "mae_vitl_r8", "--slurm", "--dry-run", "--output-dir", str(run_dir), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith(error) and err.count("\n") == 1, err
        assert not run_dir.exists()
    assert main(["--recipe", "mae_vitl_r8", "--slurm", "--dry-run", f"output_dir={run_dir}", "trainer.devices=8",
                 f"data.root={imagenet_layout}"]) == 0
    plan, script = capsys.readouterr().out.split("\n\n", 1)
    argv = _srun_argv(script)  # the keys the script fixes, once each (an override of them was repeated)
    assert [a for a in argv if a.split("=")[0] in ("output_dir", "trainer.devices")] == [
        f"output_dir={run_dir}", "trainer.devices=8"]
    assert plan.startswith("recipe mae_vitl_r8: vit_large_patch16_224 on webdataset, 4 node(s) x 8 device(s)\n")
    assert "r_train 8: merges per layer [8, 8," in plan
    assert plan.endswith("\ncheckpoint: none (training from scratch)\nnote: recipe mae_vitl_r8 fine-tunes "
                         "(model.head_init_std=2e-05) but model.checkpoint is not set: it trains from random weights; "
                         "pass model.checkpoint=PATH (the MAE pretrain checkpoint)")
    assert script.startswith("#!/bin/bash\n") and script == (run_dir / "job.sbatch").read_text()  # print ends it


def test_submit_without_sbatch_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, imagenet_layout):
    from tome_train.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError) as e:
        submit(tmp_path / "job.sbatch")
    assert "sbatch not found" in str(e.value) and "\n" not in str(e.value)
    run_dir = tmp_path / "run"
    assert main(["--recipe", "mae_vitl_r8", "--slurm", "--output-dir", str(run_dir), f"data.root={imagenet_layout}"]) == 2
    assert capsys.readouterr().err.startswith("error: sbatch not found on PATH: submit from a SLURM login node")
    assert not run_dir.exists()  # neither its script nor its wandb id


def test_submit_reports_refusal_and_parses_the_job_id(tmp_path, monkeypatch):
    fake = tmp_path / "sbatch"
    fake.write_text('#!/bin/sh\n[ "$1" = --parsable ] || exit 3\n'
                    'case "$2" in *bad*) echo "sbatch: error: Invalid partition name specified" >&2; exit 1;; esac\n'
                    'echo "4242;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert submit(tmp_path / "job.sbatch") == "4242"
    with pytest.raises(SlurmError) as e:
        submit(tmp_path / "bad.sbatch")
    assert str(e.value) == (f"sbatch {tmp_path / 'bad.sbatch'} failed: sbatch: error: Invalid partition name specified; "
                            f"the script stays for `sbatch {tmp_path / 'bad.sbatch'}`")


# ---------------------------------------------------------------- a real SLURM

def _skip_or_fail(reason: str):
    if os.environ.get("TOME_TRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"TOME_TRAIN_REQUIRE_SLURM=1 but: {reason}")
    pytest.skip(reason)


def _running_cluster(path: Path, nodes: int):
    """A started SlurmCluster, stopped afterwards; skip (or fail, when required) if it can't start."""
    reason = unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    c = SlurmCluster(path, nodes=nodes, cpus=2)
    try:
        c.start()
    except SlurmUnavailable as e:
        _skip_or_fail(str(e))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from _running_cluster(tmp_path_factory.mktemp("slurm") / "cluster", nodes=2)


@pytest.fixture
def one_node_cluster(tmp_path):
    yield from _running_cluster(tmp_path / "cluster", nodes=1)


@pytest.fixture
def cluster_env(cluster, monkeypatch):
    """This process talks to the test cluster: plain `sbatch` on PATH, `submit()` included."""
    for key, value in cluster.env.items():
        if key in ("PATH", "SLURM_CONF"):
            monkeypatch.setenv(key, value)
    return cluster


def _script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.slurm
def test_two_nodes_have_their_own_hostname_and_address(cluster, tmp_path):
    out = tmp_path / "out.txt"
    script = _script(tmp_path / "hosts.sbatch", f"""\
        #!/bin/bash
        #SBATCH --job-name=hosts
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --output={out}
        srun bash -c 'echo "$SLURM_PROCID $(hostname) $(hostname -i)"'
        """)
    job = cluster.submit(script)
    cluster.wait_state(job, "COMPLETED", timeout=30)
    lines = sorted(out.read_text().split("\n"))
    rows = sorted(line.split() for line in lines if line.strip())
    assert [r[1] for r in rows] == ["node1", "node2"]
    assert [r[2] for r in rows] == cluster.node_addrs
    assert cluster.job_nodes(job) == ["node1", "node2"]


DDP_SCRIPT = """\
import json, os, socket, sys
import torch
import torch.distributed as dist

# what Lightning's SLURMEnvironment does: ranks and world size from SLURM, the master is
# the first host of the node list (MASTER_ADDR exported by the sbatch setup line)
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
names = [None] * world
dist.all_gather_object(names, socket.gethostname())
out = {"rank": rank, "world": world, "host": socket.gethostname(), "sum": t.item(), "hosts": names,
       "master": os.environ["MASTER_ADDR"], "argv": sys.argv[1:]}
with open(os.path.join(os.environ["OUT_DIR"], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.mark.slurm
def test_write_sbatch_runs_gloo_all_reduce_across_two_nodes(cluster_env, tmp_path):
    """The script write_sbatch makes, submitted with submit(): one task per node, gloo between them."""
    cluster = cluster_env
    train = tmp_path / "ddp.py"
    train.write_text(DDP_SCRIPT)
    opts = SlurmOptions(nodes=2, gpus_per_node=1, accelerator="cpu", cpus_per_task=1, setup=[
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "export MASTER_PORT=29533",
        f"export OUT_DIR={tmp_path}",
    ])
    script = write_sbatch(tmp_path, "ddp", opts, ["wandb.id=fixed1", "trainer.num_nodes=2", "trainer.devices=1"],
                          python=PYTHON, train_script=train)
    job = submit(script)  # plain sbatch from PATH: the cluster's wrapper
    cluster.wait_state(job, "COMPLETED", timeout=60)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert sorted(r["host"] for r in results) == ["node1", "node2"]
    assert all(r["master"] == "node1" and r["world"] == 2 for r in results)
    assert results[0]["argv"] == ["wandb.id=fixed1", "trainer.num_nodes=2", "trainer.devices=1"]
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"job {job} restart 0 on node[1-2]" in log


REQUEUE_SCRIPT = """\
import os, signal, subprocess, sys, time
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
job, restart = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", "0"))
if restart:
    (out / f"restart{restart}").write_text(os.environ["SLURM_PROCID"])
    print("restarted", restart, flush=True)
    sys.exit(0)

def on_usr1(signum, frame):  # what Lightning's SLURMEnvironment handler does: save, then requeue
    (out / "usr1").write_text(str(signum))
    print("got SIGUSR1, requeueing", flush=True)
    time.sleep(1)  # srun forwards the line to the log before the requeue ends the step (it lost it once, loaded)
    subprocess.run(["scontrol", "requeue", job], check=True)

signal.signal(signal.SIGUSR1, on_usr1)
(out / "ready").write_text("")
print("ready", flush=True)
time.sleep(120)
sys.exit(1)
"""


@pytest.mark.slurm
def test_usr1_reaches_the_task_which_requeues_and_restarts(cluster_env, tmp_path):
    cluster = cluster_env
    train = tmp_path / "requeue.py"
    train.write_text(REQUEUE_SCRIPT)
    opts = SlurmOptions(nodes=1, gpus_per_node=1, accelerator="cpu", setup=[f"export OUT_DIR={tmp_path}"])
    script = write_sbatch(tmp_path, "requeue", opts, [], python=PYTHON, train_script=train)
    job = submit(script)
    # generous bounds (about 6 s in all on a quiet machine): one failure in a loaded full run, not seen since
    cluster.wait_for(lambda: (tmp_path / "ready").exists(), 90, "the task to install its SIGUSR1 handler")
    t0 = time.monotonic()
    cluster.signal(job, "USR1")  # what --signal=SIGUSR1@90 sends before the time limit
    cluster.wait_for(lambda: (tmp_path / "restart1").exists(), 90, "the requeued job to restart")
    cluster.wait_state(job, "COMPLETED", timeout=60)
    assert (tmp_path / "usr1").read_text() == "10"
    assert cluster.restart_count(job) == 1
    log = (tmp_path / f"slurm-{job}.out").read_text()  # --open-mode=append: both runs in one log
    assert "got SIGUSR1" in log and f"job {job} restart 1 on" in log and "restarted 1" in log
    print(f"requeue to restart took {time.monotonic() - t0:.1f}s")


@pytest.mark.slurm
def test_one_node_mode(one_node_cluster, tmp_path):
    out = tmp_path / "one.out"
    script = _script(tmp_path / "one.sbatch", f"""\
        #!/bin/bash
        #SBATCH --job-name=one
        #SBATCH --ntasks-per-node=2
        #SBATCH --output={out}
        srun hostname
        """)
    job = one_node_cluster.submit(script)
    one_node_cluster.wait_state(job, "COMPLETED", timeout=30)
    assert out.read_text().split() == ["node1", "node1"]


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _ckpt_step(path: Path) -> tuple[int, int]:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return int(ckpt["global_step"]), int(ckpt["epoch"])


def _submit_digits(cluster, run_dir: Path, nodes: int, tasks_per_node: int, epochs: int, steps_per_epoch: int,
                   overrides: tuple[str, ...] = ()) -> str:
    """``train.py --slurm`` of a short digits run (CPU processes) to ``cluster``; the job id."""
    env = dict(cluster.env, OMP_NUM_THREADS="1")  # the ranks share this machine's cores
    proc = subprocess.run(
        [PYTHON, str(PROJECT_ROOT / "train.py"), "--recipe", "digits_vit_r6", "--slurm", "--nodes", str(nodes),
         "--gpus-per-node", str(tasks_per_node), "--output-dir", str(run_dir), f"trainer.epochs={epochs}",
         f"trainer.limit_train_batches={steps_per_epoch}", "trainer.limit_val_batches=1",
         "tradeoff.enabled=false", "wandb.mode=offline", *overrides],
        env=env, cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


@pytest.mark.slurm
@pytest.mark.slow
def test_lightning_two_node_training_requeues_and_resumes(cluster, tmp_path):
    """train.py --slurm on 2 nodes x 1 CPU process: SIGUSR1 mid-training -> signal checkpoint and
    requeue -> the restarted job resumes from it (same step, same run dir, same wandb id) and finishes."""
    if not (PROJECT_ROOT / "train.py").is_file():
        pytest.skip("train.py not there yet")
    run_dir = tmp_path / "run"
    # last.ckpt only at epoch ends, and the signal early in an 8-step epoch: StopOnSignal saves signal_ckpt_1 mid-epoch,
    # requeues and ends fit at once, so the newest checkpoint, which the restart resumes, is signal_ckpt_1
    epochs, steps_per_epoch = 3, 8
    job = _submit_digits(cluster, run_dir, nodes=2, tasks_per_node=1, epochs=epochs, steps_per_epoch=steps_per_epoch)
    script = (run_dir / "job.sbatch").read_text()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert f"wandb.id={run_id}" in _srun_argv(script) and f"output_dir={run_dir}" in _srun_argv(script)
    log = run_dir / f"slurm-{job}.out"

    def text() -> str:
        return log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""

    # signal mid-training, once the second epoch is under way (Lightning's handler is installed by then)
    cluster.wait_for(lambda: "Epoch 1:" in text(), 240, f"epoch 1 in {log}")
    cluster.signal(job, "USR1")  # what --signal=SIGUSR1@90 sends before the time limit
    cluster.wait_for(lambda: "restart 1 on" in text(), 90, "the requeued job to restart")
    cluster.wait_state(job, "COMPLETED", timeout=240)
    assert cluster.restart_count(job) == 1
    assert cluster.job_nodes(job) == ["node1", "node2"]

    first, second = text().split(f"job {job} restart 1 on", 1)
    assert "Handling auto-requeue signal" in first and f"Requeued SLURM job: {job}" in first
    saved = run_dir / "signal_ckpt_1.ckpt"
    step, epoch = _ckpt_step(saved)
    assert steps_per_epoch <= step < epochs * steps_per_epoch and epoch >= 1  # saved mid-training
    resumed = re.findall(r"^resuming from (\S+)$", second, re.M)  # the CLI's line (rank 0)
    assert resumed == [str(saved)], f"restart resumed from {resumed}, not {saved} (step {step})"
    assert f"Restored all states from the checkpoint at {saved}" in second
    assert "Epoch 0:" not in second  # resumed, not started over
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt")[0] == epochs * steps_per_epoch
    assert (run_dir / "job.sbatch").read_text() == script
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs


@pytest.mark.slurm
@pytest.mark.slow
def test_lightning_one_node_two_tasks_trains_with_ddp(one_node_cluster, tmp_path):
    """train.py --slurm on 1 node x 2 CPU processes: srun starts both ranks, Lightning runs DDP
    over them (world size 2), and the run finishes with every rank's steps counted once."""
    run_dir = tmp_path / "run"
    epochs, steps_per_epoch = 2, 4
    job = _submit_digits(one_node_cluster, run_dir, nodes=1, tasks_per_node=2, epochs=epochs,
                         # the assertions count ranks and steps, not images: a small batch keeps the steps short
                         steps_per_epoch=steps_per_epoch, overrides=("data.batch_size=16",))
    one_node_cluster.wait_state(job, "COMPLETED", timeout=240)
    log = (run_dir / f"slurm-{job}.out").read_text(errors="replace")
    assert "GLOBAL_RANK: 0" in log and "GLOBAL_RANK: 1" in log, log[-3000:]
    assert "world size 2 differs" in log  # the recipe's 1x1 layout, reported at start
    assert "--ntasks-per-node=2" in (run_dir / "job.sbatch").read_text()
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt")[0] == epochs * steps_per_epoch
