"""Time ToMe's own work in one layer, PyTorch's ops against fused Triton kernels, at ViT-B's shape.

    python scripts/merge_probe.py --device cuda --output merge.json

Eight parts, as ``tome_train.tome.merge`` does them:

- ``match``: cosine similarity of every set-A key to every set-B key and its row max and argmax (norm,
  divide, bmm, max: four kernels and a ``[B, Na, Nb]`` score matrix); fused, one kernel that keeps the
  running max per row (scores as three TF32 products per fp32 one, as the library's: ``triton_ieee`` below).
- ``plan``: from the row maxima to the merge's rows (a stable argsort, a sort of the unmerged, a gather, three
  adds and three concatenations); fused, one kernel per image that ranks the maxima by comparing every pair.
- ``weights``: each row's share of its destination's new size (two ``index_select``, ``scatter_add``,
  divide); fused, one kernel per image.
- ``layer``: the key mean over heads, ``match``, ``plan`` and ``weights`` as a merging block runs them
  (``merge.plan_layer``); fused, one kernel per image for all four (``triton``, set A in blocks of up to 128 in
  its matching, the keys of four heads loaded at once; ``triton_a64``: set A in blocks of 64, which reads set B
  twice at ViT-B's first layers; ``triton_heads1``: each head's keys waited for before the next head's are
  loaded), or the mean and the three kernels above (``triton_parts``); ``triton_ieee``: ``match`` and ``layer``
  with their similarity products as fp32 FMAs instead of three TF32 tensor-core products each; ``triton_warps4`` and
  ``triton_warps16``: ``layer`` with each image's program in 4 or 16 warps instead of 8.
- ``merge``: every token row read in a permuted order, scaled, and the merged-away rows added onto their
  destinations (``index_select``, ``mul_``, ``scatter_add_``: three kernels, about four passes over the
  rows); fused, two kernels and two passes (the kept rows stored, the merged-away rows added atomically,
  as ``scatter_add_`` does on a GPU).
- ``add_merge``: the residual add that ends the attention half of a block (``x + attn``, fp32 stream plus
  the branch in the attention dtype) and the merge after it, as the library does them (the block hands
  the merge its branch); fused, the merge reads both and the summed stream is never written (two passes
  over the rows fewer).
- ``add_merge_norm``: ``add_merge`` and the layer norm that the block's MLP starts with, its output in the MLP's
  dtype (fp16 on a GPU: autocast norms in fp32 and casts for the MLP's first matmul), as an inference step runs
  them (``merge._weighted_merge_norm``); fused, one kernel in which every output row gathers what merges into it
  and is normalized at once (``triton``), or the merge kernels and then PyTorch's norm and cast
  (``triton_then_norm``, the library's path before, and still where the one kernel measures slower).
- ``merge_backward``: every row's gradient is its destination's times its weight (``index_select``,
  ``mul_``, ``index_copy_``: three kernels, six passes); fused, one kernel, two passes.

The kernels are the library's (``tome_train.tome.triton_kernels``, used on a GPU where they measure faster
for the shape at hand).

Rows: ``variant``, ``tokens``, ``part``, ``ms`` (the device's work per call, as ``attention_probe.time_ms``
measures it), ``host_us`` (the host's time per call, enqueued without waiting: what a call costs where the host
sets the pace), ``vs_torch`` (the PyTorch ops' time over this
one's), ``max_diff`` (from the PyTorch ops' result: row maxima, rows of the plan, weights, merged rows,
gradients; in the merge, rows that receive several tokens may differ in the order of their additions),
``same_argmax`` for ``match``,
or ``error``.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
import triton

from attention_probe import host_us, time_ms
from tome_train.tome import bipartite_soft_matching, kernels
from tome_train.tome.triton_kernels import (fused_merge, fused_merge_backward, fused_merge_norm, fused_most_similar,
                                            fused_plan_layer, fused_plan_merge, fused_size_weights)
from tome_train.tome.merge import (_weighted_merge, _weighted_merge_backward, _weighted_merge_norm, most_similar,
                                   plan_layer, plan_merge, size_weights)


def torch_layer(*args):
    """:func:`plan_layer` with PyTorch's ops only (the kernels of its parts switched off)."""
    with kernels.pytorch_ops_only():
        return plan_layer(*args)


def torch_merge_norm(*args):
    """:func:`_weighted_merge_norm` with PyTorch's ops only."""
    with kernels.pytorch_ops_only():
        return _weighted_merge_norm(*args)


def kernels_then_norm(rows, perm, dest, weight, num_kept, branch, norm_weight, norm_bias, eps, normed_dtype, _):
    """The merge kernels, then PyTorch's layer norm and cast."""
    merged = fused_merge(rows, perm, dest, weight, num_kept, branch)
    return merged, torch.nn.functional.layer_norm(merged, merged.shape[-1:], norm_weight, norm_bias, eps).to(normed_dtype)


def kernels_layer(keys, size, r, num_protected, dtype):
    """:func:`plan_layer` as the three kernels of its parts after the key mean."""
    t = keys.shape[2]
    node_max, node_idx = fused_most_similar(keys.mean(1, dtype=torch.float32), num_protected)
    perm, dest = fused_plan_merge(node_max, node_idx, r, num_protected, t)
    return (perm, dest, *fused_size_weights(perm, dest, size, t, r, dtype), node_max, node_idx)


VARIANTS = {
    "torch": {"match": most_similar, "plan": plan_merge, "weights": size_weights, "layer": torch_layer,
              "merge": _weighted_merge, "add_merge": _weighted_merge, "add_merge_norm": torch_merge_norm,
              "merge_backward": _weighted_merge_backward},
    "triton": {"match": fused_most_similar, "plan": fused_plan_merge, "weights": fused_size_weights,
               "layer": fused_plan_layer, "merge": fused_merge, "add_merge": fused_merge,
               "add_merge_norm": fused_merge_norm, "merge_backward": fused_merge_backward},
    "triton_parts": {"layer": kernels_layer},
    # set A in blocks of 64 in the matching (the library's for fp16 keys before run f, for bf16 keys before tf32x3):
    # set B read once per block
    "triton_a64": {"layer": functools.partial(fused_plan_layer, block_match=64)},
    # the heads' keys loaded one at a time, each waited for (the library's before: now four at a time)
    "triton_heads1": {"layer": functools.partial(fused_plan_layer, heads_per_step=1)},
    # the similarity products as fp32 FMAs on the CUDA cores (the library's before: now three TF32 products each)
    "triton_ieee": {"match": functools.partial(fused_most_similar, products="ieee"),
                    "layer": functools.partial(fused_plan_layer, products="ieee")},
    # an image's program in 4 or 16 warps instead of 8: the plan is latency-bound, one program per image
    "triton_warps4": {"layer": functools.partial(fused_plan_layer, num_warps=4)},
    "triton_warps16": {"layer": functools.partial(fused_plan_layer, num_warps=16)},
    "triton_then_norm": {"add_merge_norm": kernels_then_norm},
}


def merge_inputs(batch_size: int, tokens: int, channels: int, r: int, device, seed: int = 0) -> dict:
    """A real layer's keys ``keys`` ``[B, 12, N, 64]`` (a view of a packed qkv, in fp16 on a GPU) and their mean
    ``metric`` ``[B, N, 64]`` (random, a class token first), their maxima, their merge, sizes 1-7 ``[B * N]``
    and the merge's weights, and token rows ``[B * N, C]``."""
    g = torch.Generator(device).manual_seed(seed)
    qkv = torch.randn(batch_size, tokens, 3 * 12 * 64, generator=g, device=device)
    keys = qkv.to(torch.float16 if device.type == "cuda" else qkv.dtype).reshape(
        batch_size, tokens, 3, 12, 64).permute(2, 0, 3, 1, 4)[1]
    metric = keys.mean(1, dtype=torch.float32)
    merge = bipartite_soft_matching(metric, r, num_protected=1)
    sizes = torch.randint(1, 8, (batch_size * tokens,), generator=g, device=device).float()
    weight, _ = merge.weights(sizes, torch.float32)
    rows = torch.randn(batch_size * tokens, channels, generator=g, device=device)
    return dict(keys=keys, metric=metric, maxima=most_similar(metric, 1), sizes=sizes, rows=rows, perm=merge.perm,
                dest=merge.dest, weight=weight, num_kept=merge.num_kept)


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
    p.add_argument("--host-calls", type=int, default=10, help="back-to-back calls per run of host_us (5 runs)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows_out = []
    for n in args.tokens:
        layer = merge_inputs(args.batch_size, n, args.channels, args.r, device, seed=n)
        rows, perm, dest, weight, k = (layer[key] for key in ("rows", "perm", "dest", "weight", "num_kept"))
        grad = torch.randn(k, args.channels, device=device)
        norm_weight, norm_bias = (torch.randn(args.channels, device=device) for _ in range(2))
        # the attention branch in the attention dtype (fp16 under autocast on a GPU), the stream in fp32
        branch = torch.randn_like(rows, dtype=torch.float16 if device.type == "cuda" else rows.dtype)
        inputs = {"match": (layer["metric"], 1), "plan": (*layer["maxima"], args.r, 1, n),
                  "weights": (perm, dest, layer["sizes"], n, args.r, torch.float32),
                  "layer": (layer["keys"], layer["sizes"], args.r, 1, torch.float32),
                  "merge": (rows, perm, dest, weight, k),
                  "add_merge": (rows, perm, dest, weight, k, branch),
                  "add_merge_norm": (rows, perm, dest, weight, k, branch, norm_weight, norm_bias, 1e-6, branch.dtype,
                                     args.batch_size),
                  "merge_backward": (grad, perm, dest, weight)}
        expected = {part: fn(*inputs[part]) for part, fn in VARIANTS["torch"].items()}
        torch_ms = {}
        for name in args.variants:
            for part, fn in VARIANTS[name].items():
                row = {"variant": name, "tokens": n, "part": part}
                try:
                    result = fn(*inputs[part])
                    if part == "match":
                        row["same_argmax"] = bool(torch.equal(result[1], expected[part][1]))
                        result, reference = result[0], expected[part][0]
                    else:
                        reference = expected[part]
                    pairs = zip(result, reference) if isinstance(result, tuple) else [(result, reference)]
                    row["max_diff"] = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
                    row["ms"] = round(time_ms(lambda: fn(*inputs[part]), device, args.warmup, args.steps), 4)
                    row["host_us"] = round(host_us(lambda: fn(*inputs[part]), device, args.host_calls), 1)
                except RuntimeError as err:
                    row["error"] = str(err).splitlines()[0][:200]
                if name == "torch":
                    torch_ms[part] = row.get("ms")
                if torch_ms.get(part) and "ms" in row:
                    row["vs_torch"] = float(f"{torch_ms[part] / row['ms']:.3g}")
                rows_out.append(row)
                print(json.dumps(row), file=sys.stderr)
    if args.output:
        json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "triton": triton.__version__, "rows": rows_out},
                  open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
