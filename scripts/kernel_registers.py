"""Registers and spills of the library's Triton kernels as a GPU would build them, on a machine without one.

Each kernel's wrapper (``tome_train.tome.triton_kernels``, ``tome_train.tome.triton_attention``) is called on CPU
tensors of one merging layer's shapes (the keys, rows and attention inputs of timm's packed qkv) with every launch
recorded instead of run. Each launch is then compiled for a GPU target with the specializations Triton's launcher
gives it (pointers and integers divisible by 16 marked so, integers equal to 1 made constants: without them a
build misleads, docs/performance.md), and the wheel's ``ptxas -v`` reports its registers and spill bytes.

    python scripts/kernel_registers.py --tokens 197 117 37 --heads 12 --head-dim 64 --dtype fp16 bf16

One row per launch: ``kernel``, ``tokens``, ``dtype``, the launch's constexprs, ``registers``, ``spill_bytes``
(stores). Needs triton compiled, not interpreted (``TRITON_INTERPRET`` unset or 0).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tome_train.bench import DTYPES
from tome_train.tome import triton_attention, triton_builds, triton_kernels
from tome_train.tome.attention import packed_heads

POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
                 torch.int32: "*i32"}


def specialized(kernel, args: tuple, kwargs: dict) -> tuple[ASTSource, dict]:
    """The build a launch of ``kernel`` with ``args`` and ``kwargs`` gets, and its compile options."""
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    for i, param in enumerate(kernel.params):
        name = param.name
        value = values[name] if name in values else param.default
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{kernel.__name__}'s {name}={value!r}: a launch argument the build does not type")
        elif value == 1:
            signature[name], constexprs[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), options


def registers(kernel, args: tuple, kwargs: dict, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes of spill stores of the launch's build for ``sm_<arch>``."""
    source, options = specialized(kernel, args, kwargs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.devnull], capture_output=True,
                                text=True, check=True).stderr
    return (int(re.search(r"Used (\d+) registers", report).group(1)),
            int(re.search(r"(\d+) bytes spill stores", report).group(1)))


def layer_calls(batch: int, tokens: int, heads: int, head_dim: int, r: int, dtype: torch.dtype
                ) -> dict[str, Callable[[], object]]:
    """The library's kernel wrappers on one merging layer's inputs, as a ViT block hands them over: the keys of
    the packed qkv (``dtype``), token rows in fp32 with the attention branch in ``dtype``, sizes."""
    qkv = torch.zeros(batch, tokens, 3 * heads * head_dim, dtype=dtype)
    q, k, v = packed_heads(qkv, heads)
    size = torch.ones(batch, tokens)
    rows = torch.zeros(batch * tokens, heads * head_dim)
    branch = torch.zeros_like(rows, dtype=dtype)
    perm = torch.arange(batch * tokens)
    weight = torch.ones(batch * tokens, 1)
    norm = torch.ones(heads * head_dim)
    kept = batch * (tokens - r)
    out = torch.zeros(batch, heads, tokens, head_dim, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    lse = torch.zeros(batch, heads, tokens)
    return {
        "plan_layer": lambda: triton_kernels.fused_plan_layer(k, size.reshape(-1), r, 1, torch.float32),
        "merge": lambda: triton_kernels.fused_merge(rows, perm, perm, weight, kept, branch),
        "merge_norm": lambda: triton_kernels.fused_merge_norm(rows, perm, perm, weight, kept, branch, norm, norm, 1e-6,
                                                              dtype, batch),
        "merge_backward": lambda: triton_kernels.fused_merge_backward(rows[:kept], perm, perm, weight),
        "attention": lambda: triton_attention.size_biased_attention(q, k, v, size),
        "attention_forward": lambda: triton_attention.size_biased_attention_forward(qkv, heads, size),
        "attention_backward": lambda: triton_attention.size_biased_attention_backward(qkv, heads, size, out, lse, out),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[197, 117, 37])
    p.add_argument("--batch-size", type=int, default=16, help="a multiple of 16 builds as batch 256 does")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp16"])
    p.add_argument("--kernels", nargs="+", default=None, help="wrappers to build (default: all)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off"):
        p.exit(2, f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}: the kernels build only with Triton compiling "
                  "them; unset it or set it to 0\n")
    rows = []
    for dtype in args.dtype:
        for tokens in args.tokens:
            calls = layer_calls(args.batch_size, tokens, args.heads, args.head_dim, args.r, DTYPES[dtype])
            unknown = set(args.kernels or ()) - set(calls)
            if unknown:
                p.error(f"--kernels {' '.join(sorted(unknown))}: not a wrapper; choose from {', '.join(calls)}")
            for wrapper in args.kernels or calls:
                with triton_builds.launches_recorded() as launches:
                    calls[wrapper]()
                for kernel, kernel_args, kwargs in launches:
                    regs, spilled = registers(kernel, kernel_args, kwargs, args.arch)
                    row = {"wrapper": wrapper, "kernel": kernel.__name__, "tokens": tokens, "dtype": dtype,
                           "constexprs": {k: v for k, v in kwargs.items() if k.isupper()}, "registers": regs,
                           "spill_bytes": spilled}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    if args.output:
        json.dump({"triton": triton.__version__, "arch": args.arch, "rows": rows}, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
