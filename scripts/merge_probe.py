"""Time the size-weighted merge of one layer, PyTorch's ops against fused Triton kernels, at ViT-B's shape.

    python scripts/merge_probe.py --device cuda --output merge.json

The merge of ``tome_train.tome.merge`` reads every token row in a permuted order, scales it and adds the
merged-away rows onto their destinations: three kernels and about four passes over the rows forward
(``index_select``, ``mul_``, ``scatter_add_``), three kernels and six passes backward (``index_select``,
``mul_``, ``index_copy_``). The ``triton`` variant does the same arithmetic in two kernels and two passes
forward (the kept rows stored, the merged-away rows added atomically, as ``scatter_add_`` does on a GPU)
and in one kernel and two passes backward. Measured here first; it enters the library only if it wins.

Rows: ``variant``, ``tokens``, ``pass`` (forward or backward), ``ms`` (median), ``vs_torch`` (the PyTorch
ops' time over this one's), ``max_diff`` (from the PyTorch ops' result; kept rows are equal bit for bit,
rows that receive several tokens may differ in the order of their additions), or ``error``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from attention_probe import time_ms
from tome_train.tome import bipartite_soft_matching
from tome_train.tome.merge import _weighted_merge


@triton.jit
def _scaled_row_copy(src_ptr, src_index_ptr, dst_ptr, dst_index_ptr, weight_ptr, start, count, num_cols,
                     ATOMIC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """``dst[dst_index[i]] (+)= weight[i] * src[src_index[i]]`` for ``i`` in ``[start, start + count)``."""
    i = start + tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = i < start + count
    src_row = tl.load(src_index_ptr + i, mask=row_ok, other=0)
    dst_row = tl.load(dst_index_ptr + i, mask=row_ok, other=0)
    weight = tl.load(weight_ptr + i, mask=row_ok, other=0.0)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = row_ok[:, None] & (col < num_cols)[None, :]
    values = tl.load(src_ptr + src_row[:, None] * num_cols + col[None, :], mask=ok, other=0.0) * weight[:, None]
    out = dst_ptr + dst_row[:, None] * num_cols + col[None, :]
    if ATOMIC:
        tl.atomic_add(out, values, mask=ok)
    else:
        tl.store(out, values, mask=ok)


def _launch(src, src_index, dst, dst_index, weight, start, count, atomic, block_rows=16, block_cols=128):
    num_cols = src.shape[1]
    grid = (triton.cdiv(count, block_rows), triton.cdiv(num_cols, block_cols))
    _scaled_row_copy[grid](src, src_index, dst, dst_index, weight, start, count, num_cols,
                           ATOMIC=atomic, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)


def triton_merge(rows, perm, dest, weight, num_kept):
    """:func:`tome_train.tome.merge._weighted_merge` in two kernels: ``rows`` ``[M, C]`` -> ``[K, C]``."""
    out = rows.new_empty(num_kept, rows.shape[1])
    _launch(rows, perm, out, dest, weight, 0, num_kept, atomic=False)
    _launch(rows, perm, out, dest, weight, num_kept, perm.shape[0] - num_kept, atomic=True)
    return out


def torch_merge_backward(grad, perm, dest, weight):
    """The backward of the library's merge (``_WeightedMerge.backward``): ``[K, C]`` -> ``[M, C]``."""
    grad_merged = grad.index_select(0, dest).mul_(weight)
    return grad.new_empty(perm.shape[0], grad.shape[1]).index_copy_(0, perm, grad_merged)


def triton_merge_backward(grad, perm, dest, weight):
    """The same gradient in one kernel: every row's gradient is its destination's, times its weight."""
    grad_rows = grad.new_empty(perm.shape[0], grad.shape[1])
    _launch(grad, dest, grad_rows, perm, weight, 0, perm.shape[0], atomic=False)
    return grad_rows


VARIANTS = {
    "torch": (_weighted_merge, torch_merge_backward),
    "triton": (triton_merge, triton_merge_backward),
}


def merge_inputs(batch_size: int, tokens: int, channels: int, r: int, device, seed: int = 0):
    """A real layer's merge (matching of random keys with a class token, sizes 1-7) and its token rows:
    ``rows`` ``[B * N, C]``, ``perm``, ``dest``, ``weight`` ``[B * N, 1]``, ``num_kept``."""
    g = torch.Generator(device).manual_seed(seed)
    metric = torch.randn(batch_size, tokens, 64, generator=g, device=device)
    merge = bipartite_soft_matching(metric, r, num_protected=1)
    size = torch.randint(1, 8, (batch_size * tokens, 1), generator=g, device=device).float()
    sizes = size.index_select(0, merge.perm)
    k = merge.num_kept
    new_size = sizes[:k].scatter_add(0, merge.dst_rows[:, None], sizes[k:])
    weight = sizes / new_size.index_select(0, merge.dest)
    rows = torch.randn(batch_size * tokens, channels, generator=g, device=device)
    return rows, merge.perm, merge.dest, weight, k


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[197, 117, 37], help="r=16 merges at each")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows_out = []
    for n in args.tokens:
        rows, perm, dest, weight, k = merge_inputs(args.batch_size, n, args.channels, args.r, device, seed=n)
        grad = torch.randn(k, args.channels, device=device)
        expected = {"forward": _weighted_merge(rows, perm, dest, weight, k),
                    "backward": torch_merge_backward(grad, perm, dest, weight)}
        torch_ms = {}
        for name in args.variants:
            forward, backward = VARIANTS[name]
            calls = {"forward": lambda: forward(rows, perm, dest, weight, k),
                     "backward": lambda: backward(grad, perm, dest, weight)}
            for pass_, call in calls.items():
                row = {"variant": name, "tokens": n, "pass": pass_}
                try:
                    row["max_diff"] = float((call() - expected[pass_]).abs().max())
                    row["ms"] = round(time_ms(call, device, args.warmup, args.steps), 4)
                except RuntimeError as err:
                    row["error"] = str(err).splitlines()[0][:200]
                if name == "torch":
                    torch_ms[pass_] = row.get("ms")
                if torch_ms.get(pass_) and "ms" in row:
                    row["vs_torch"] = round(torch_ms[pass_] / row["ms"], 3)
                rows_out.append(row)
                print(json.dumps(row), file=sys.stderr)
    if args.output:
        json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "triton": triton.__version__, "rows": rows_out},
                  open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
