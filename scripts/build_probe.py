"""How long a ViT's first ToMe step takes to build its Triton kernels, one after another and in a pool of threads.

Each run is a fresh process with an empty Triton cache that makes the pass ahead of a first step (the patched
model's own, :func:`tome_train.tome.kernels.build_ahead`) with ``--workers`` build threads, and reports the kernels
it built and its seconds. On a GPU the model runs there; without one, Triton is told the device is an sm_``--arch``
one (a build needs only the target) and the kernels choose on the CPU, so the builds are those of a GPU's first step
(a batch divisible by 16 specializes as 256 does).

    python scripts/build_probe.py --model vit_base_patch16_224 --r 16 --dtype fp16 --mode infer --workers 1 2

One JSON row per run: ``model``, ``r``, ``mode``, ``dtype``, ``workers``, ``builds``, ``seconds``, ``device``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

from tome_train.bench import DTYPES


def one_run(args) -> dict:
    """The pass ahead of one first step, in this process."""
    import contextlib
    import time

    import timm
    import torch
    from triton.runtime import driver

    from tome_train.tome import apply_tome, kernels, triton_builds

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        triton_builds.build_for(args.arch)
        for path in list(kernels.FastestPath.paths):
            path.device_types = (*path.device_types, "cpu")
    workers = args.workers[0]
    triton_builds.built_not_run = functools.partial(triton_builds.built_not_run, workers=workers)
    model = apply_tome(timm.create_model(args.model, num_classes=10), args.r).to(device)
    model.train(args.mode == "train")
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    with (torch.autocast(device.type, dtype, enabled=dtype != torch.float32),
          torch.no_grad() if args.mode == "infer" else contextlib.nullcontext()):
        model._tome_begin(images, None, False)
        assert model._tome_build_ahead(images), "no pass ahead: does this Triton build in a pool?"
    seconds = time.perf_counter() - started
    ours = {id(v): v for m in triton_builds.KERNEL_MODULES for v in vars(m).values()
            if isinstance(v, triton_builds.JITFunction)}.values()
    index = driver.active.get_current_device()
    builds = sum(len(kernel.device_caches[index][0]) for kernel in ours if index in kernel.device_caches)
    return {"model": args.model, "r": args.r, "mode": args.mode, "dtype": args.dtype, "workers": workers,
            "builds": builds, "seconds": round(seconds, 2),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu (sm_{args.arch} builds)"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    p.add_argument("--arch", type=int, default=90, help="the target built for without a GPU")
    p.add_argument("--output", default=None)
    p.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off"):
        p.exit(2, f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}: nothing builds with Triton interpreting the "
                  "kernels; unset it or set it to 0\n")
    import timm

    if args.model not in timm.list_models():
        p.exit(2, f"--model {args.model}: not a timm model (timm.list_models() names them)\n")
    if min(args.workers) < 1:
        p.exit(2, f"--workers {' '.join(map(str, args.workers))}: build threads are counted from 1\n")
    if args.one_run:
        print(json.dumps(one_run(args)))
        return
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as cache:
            done = subprocess.run(
                [sys.executable, __file__, "--one-run", "--model", args.model, "--r", str(args.r), "--mode", args.mode,
                 "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--workers", str(workers),
                 "--arch", str(args.arch)],
                env=dict(os.environ, TRITON_CACHE_DIR=cache), capture_output=True, text=True)
        if done.returncode != 0:
            p.exit(1, done.stderr[-3000:])
        rows.append(json.loads(done.stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.output:
        json.dump({"rows": rows}, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
