"""Would a layer's merge plan hide behind its attention on a second CUDA stream? One merging layer's first half at
ViT-B's (or ViT-L's) shape, fp16, as CUDA graphs replay it: the qkv projection, then proportional attention (the
library's Triton kernel) and the output projection, and the one-kernel plan on the keys (``fused_plan_layer``)
either after them on the same stream (``serial``: as the library runs it under a CUDA-graph capture), or on a side
stream forked after the qkv projection and joined before the merge would read it (``overlapped``: what the library
may choose per layer in eager inference, ``timm_patch.merging_first_half_plan_beside``). The plan is latency-bound
(one program per image), so the attention's kernels may fill the SMs it leaves idle.

    python scripts/overlap_probe.py --tokens 181 117 37 --heads 12 --head-dim 64 --output overlap.json

Rows: ``tokens``, ``serial_ms`` and ``overlapped_ms`` (device time per replay, CUDA events over ``--steps``
replays), ``plan_ms`` and ``attention_ms`` (each part alone, its own graph), ``hidden`` (the share of the plan's
time the overlap saved). Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from tome_train.bench import capture_cuda_graph
from tome_train.tome.attention import packed_heads
from tome_train.tome.triton_attention import size_biased_attention
from tome_train.tome.triton_kernels import fused_plan_layer


def replay_ms(step: Callable[[], object], warmup: int, steps: int) -> float:
    """Milliseconds of device time per replay of ``step`` captured as one CUDA graph (as the benchmark captures a
    step)."""
    graph = capture_cuda_graph(step, torch.device("cuda"), warmups=warmup)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def layer_steps(batch: int, tokens: int, heads: int, head_dim: int, r: int) -> dict[str, Callable[[], object]]:
    """The four ways to run a merging layer's first half: ``serial``, ``overlapped``, and its ``plan`` and
    ``attention`` alone."""
    device, dim = torch.device("cuda"), heads * head_dim
    g = torch.Generator(device).manual_seed(tokens)
    x = torch.randn(batch, tokens, dim, generator=g, device=device, dtype=torch.float16)
    qkv_weight = torch.randn(3 * dim, dim, generator=g, device=device, dtype=torch.float16) * dim ** -0.5
    proj_weight = torch.randn(dim, dim, generator=g, device=device, dtype=torch.float16) * dim ** -0.5
    size = torch.randint(1, 4, (batch, tokens), generator=g, device=device).float()
    side = torch.cuda.Stream()

    def qkv_heads():
        qkv = x @ qkv_weight.T
        return packed_heads(qkv, heads)

    def attention(q, k, v):
        out = size_biased_attention(q, k, v, size)
        return out.transpose(1, 2).reshape(batch, tokens, dim) @ proj_weight.T

    def plan(k):
        return fused_plan_layer(k, size.reshape(-1), r, 1, torch.float32)

    def serial():
        q, k, v = qkv_heads()
        return attention(q, k, v), plan(k)

    def overlapped():
        q, k, v = qkv_heads()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            planned = plan(k)
        branch = attention(q, k, v)
        torch.cuda.current_stream().wait_stream(side)
        return branch, planned

    q, k, v = qkv_heads()
    return {"serial": serial, "overlapped": overlapped, "plan": lambda: plan(k),
            "attention": lambda: attention(q, k, v)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tokens", type=int, nargs="+", default=[181, 117, 37])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        p.exit(2, f"--device {args.device}: the probe times CUDA streams and graphs; use cuda on a machine with one\n")
    rows = []
    for tokens in args.tokens:
        steps = layer_steps(args.batch_size, tokens, args.heads, args.head_dim, args.r)
        row = {"tokens": tokens}
        for name, step in steps.items():
            row[f"{name}_ms"] = round(replay_ms(step, args.warmup, args.steps), 4)
        row["hidden"] = round((row["serial_ms"] - row["overlapped_ms"]) / row["plan_ms"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    if args.output:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                  open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
