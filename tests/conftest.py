"""Shared fixtures: one short real training run on the bundled digits, reused by the tests
that need a trained checkpoint, a wandb offline run or a trade-off report."""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_MODE", None)  # the framework must pick offline by itself without an API key
os.environ.pop("WANDB_API_KEY", None)
# Triton kernels (scripts/merge_probe.py) run on the CPU by Triton's interpreter; it must be chosen before
# anything imports triton, whose library functions are wrapped for one mode or the other at import. On a GPU,
# TRITON_INTERPRET=0 runs the GPU-only tests on compiled kernels, as the library runs them.
os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    # one worker per core (make test: -n auto): one intra-op thread each, in every process a test starts too;
    # torch's default of a thread per core in every worker oversubscribes the cores many times over
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent

# A short schedule on the default recipe: enough to learn digits well above chance.
SHORT_FIT = ["trainer.epochs=8", "optim.warmup_epochs=1", "tradeoff.r_values=[0,6,8]", "tradeoff.bench_steps=2", "tradeoff.num_vis_images=2"]


def dotted_leaves(node: dict, prefix: str = "") -> dict:
    """A nested config as ``{"a.b": value}`` (an empty section is a leaf)."""
    leaves = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            leaves |= dotted_leaves(value, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """An in-process run leaves WANDB_SERVICE set so that child processes share its wandb-core;
    a training command started by a test (or by SLURM) must start its own, as a user's would."""
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture
def load_script(monkeypatch):
    """A function that imports ``scripts/<name>.py`` as a module, ``scripts/`` on the path (a probe imports another)."""
    import importlib.util

    scripts = ROOT / "scripts"
    monkeypatch.syspath_prepend(str(scripts))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The short fit, trained once per test run: under pytest-xdist its workers share their run's base folder,
    and the first worker to need the fit trains it while any other waits on the lock, then reads it."""
    from filelock import FileLock

    from tome_train.cli import train
    from tome_train.config import load_config

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    run_dir, result_file = shared / "digits_run", shared / "digits_run.json"
    cfg = load_config(None, [*SHORT_FIT, f"output_dir={run_dir}"])
    with FileLock(shared / "digits_run.lock"):
        if not result_file.is_file():
            result_file.write_text(json.dumps(train(cfg)))
    result = json.loads(result_file.read_text())
    return SimpleNamespace(cfg=cfg, run_dir=run_dir, result=result, last=run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="session")
def imagenet_layout(tmp_path_factory):
    """The public shard names, as empty files: enough for a dry run, which reads no sample."""
    root = tmp_path_factory.mktemp("imagenet-wds")
    for i in range(1024):
        (root / f"imagenet1k-train-{i:04d}.tar").touch()
    for i in range(64):
        (root / f"imagenet1k-validation-{i:02d}.tar").touch()
    return root
