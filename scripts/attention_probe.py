"""Time the ways onto scaled_dot_product_attention for proportional attention, one attention layer at ViT-B's
shape and the token counts of a ToMe schedule, next to plain attention (what the unpatched model runs):
the log-size mask as tome_train uses it (``bias``), under each backend and mask layout, the library's
Triton flash kernels that add the bias per key (``triton``; ``triton_MxN`` with ``--blocks MxN``: their forward
with M queries per program and N keys per step, and ``MxN/OxI`` their backward too with O rows per program and I
per step), and without a mask as two calls (``values``). Measured on an H100 and dropped (docs/performance.md):
the bias as one more head dimension of queries and keys, and as a FlexAttention score modification.

Under ``torch.compile`` (``*_compiled``; ``_dynamic``: the token count a dynamic dim, as ``compile_tome``
compiles it): inductor lowers the masked call to memory-efficient attention and, by its stride rules for
that kernel's bias (``sdpa_constraint``, torch/_inductor/lowering.py), keeps the bias broadcast over heads
but not over queries, so each layer would write and read a ``[B, 1, N, N]`` bias where eager reads
``[B, N]``: a suspect for the compiled ToMe model's slowness on the H100. These rows measure it.

    python scripts/attention_probe.py --device cuda --output probe.json

Rows: ``variant``, ``tokens``, ``mode`` (infer: forward, fp16; train: forward and backward, bf16), ``ms``
(the device's work per call: ``time_ms``), ``host_us`` (the host's time per call, enqueued without waiting), ``vs_plain`` (plain attention's
time over this one's), or ``error`` where a kernel refuses.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tome_train.tome import kernels
from tome_train.tome.attention import packed_heads, proportional_attention, size_bias


def aligned_bias(q, k, v, size):
    """The log-size mask with the token count padded to a multiple of 8 (padded keys masked out)."""
    n = q.shape[2]
    pad = -n % 8
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    bias = F.pad(size_bias(size).to(q.dtype), (0, pad), value=float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)[:, :, :n]


def full_bias(q, k, v, size):
    """The log-size mask materialized as ``[B, H, N, N]``."""
    b, h, n, _ = q.shape
    bias = size_bias(size).to(q.dtype).expand(b, h, n, n).contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def size_weighted_values(q, k, v, size):
    """No mask: ``softmax(q k^T) (s v) / softmax(q k^T) s``, two calls the flash kernels take."""
    s = size.to(v.dtype)[:, None]
    return F.scaled_dot_product_attention(q, k, v * s) / F.scaled_dot_product_attention(q, k, s.expand_as(v).contiguous())


def triton_bias(qkv, heads, size):
    """The library's Triton flash kernels with the bias per key (forward, and backward in training, which writes
    the gradient of the packed qkv directly)."""
    from tome_train.tome.triton_attention import size_biased_attention_trainable

    return size_biased_attention_trainable(qkv, heads, size[..., 0])


def triton_blocks(spec: str):
    """The Triton kernels as in ``triton`` with other block sizes (fitted down to the token count as the library
    fits its own): ``spec`` ``"MxN"``, the forward with ``M`` queries per program and ``N`` keys per step, or
    ``"MxN/OxI"``, the backward too with ``O`` rows per program and ``I`` per step (else the library's). The
    variant ``triton_<spec>`` that ``--blocks`` adds, to choose the library's defaults by."""
    from tome_train.tome.triton_attention import (BLOCKS, _default_scale, _fitted,
                                                  triton_proportional_attention_trainable)

    blocks = {**BLOCKS, **dict(zip(BLOCKS, (int(side) for side in spec.replace("/", "x").split("x"))))}

    def attend(qkv, heads, size):
        fitted = {name: _fitted(block, qkv.shape[1]) for name, block in blocks.items()}
        return triton_proportional_attention_trainable(qkv, heads, size[..., 0], _default_scale(qkv, heads), **fitted)
    return attend


def block_spec(text: str) -> str:
    """``--blocks``' argparse type: ``MxN`` or ``MxN/OxI``, powers of two from 16."""
    pairs = text.split("/")
    sides = [side for pair in pairs for side in pair.split("x")]
    if not (len(pairs) <= 2 and len(sides) == 2 * len(pairs)
            and all(side.isdigit() and int(side) >= 16 and int(side) & (int(side) - 1) == 0 for side in sides)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MxN or MxN/OxI with powers of two from 16 (e.g. 64x32 or 64x32/64x32)")
    return text


def plain(q, k, v, size):
    return F.scaled_dot_product_attention(q, k, v)


def masked(q, k, v, size):
    """The log-size mask through SDPA, as the compiled regions trace it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size).to(q.dtype))


def on_heads(attend):
    """``attend(q, k, v, size)`` as a variant: on the heads of timm's packed qkv, as a ToMe block has them (so that
    in training the gradient goes back through timm's split of the heads, as it does there)."""
    return lambda qkv, heads, size: attend(*packed_heads(qkv, heads), size)


VARIANTS = {
    "plain": (on_heads(plain), None),
    "bias": (on_heads(proportional_attention), None),
    "bias_cudnn": (on_heads(proportional_attention), SDPBackend.CUDNN_ATTENTION),
    "bias_efficient": (on_heads(proportional_attention), SDPBackend.EFFICIENT_ATTENTION),
    "bias_aligned": (on_heads(aligned_bias), None),
    "bias_full": (on_heads(full_bias), None),
    "triton": (triton_bias, None),
    "values": (on_heads(size_weighted_values), None),
    "values_cudnn": (on_heads(size_weighted_values), SDPBackend.CUDNN_ATTENTION),
    "plain_compiled": (torch.compile(on_heads(plain)), None),
    "bias_compiled": (torch.compile(on_heads(masked)), None),
    "bias_compiled_dynamic": (torch.compile(on_heads(masked), dynamic=True), None),
}


def time_ms(fn, device, warmup, steps):
    """Milliseconds of the device's work per call of ``fn()`` after ``warmup`` calls (median of three runs of
    ``steps`` back-to-back calls, the host's launches hidden behind a sleep of the device, as a step that keeps the
    device busy hides them); on a CPU, of wall time."""
    for _ in range(warmup):
        fn()
    return kernels.device_seconds_per_call(fn, device, (), calls=steps) * 1e3


def host_us(fn, device, calls=10, runs=5):
    """Microseconds of the host's time per call: ``calls`` back-to-back calls enqueued without waiting for
    the device (which a few calls cannot fill), median of ``runs``. Where a step is bound by the host, this
    and not ``ms`` is a call's cost; a Triton launch binds and checks each argument in Python."""
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[197, 117, 37])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   default=[name for name in VARIANTS if "compiled" not in name], help="default: all but *_compiled")
    p.add_argument("--blocks", nargs="+", type=block_spec, default=[], metavar="MxN[/OxI]",
                   help="also the Triton kernels with M queries per program and N keys per step in the forward, "
                        "and O rows per program and I per step in the backward (variants triton_<spec>), "
                        "e.g. 64x32 128x64 64x32/64x32")
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--host-calls", type=int, default=10, help="back-to-back calls per run of host_us (5 runs)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants}
    variants.update({f"triton_{spec}": (triton_blocks(spec), None) for spec in args.blocks})
    device = torch.device(args.device)
    dtypes = {"infer": torch.float16, "train": torch.bfloat16} if device.type == "cuda" else \
        {"infer": torch.float32, "train": torch.float32}
    rows = []
    for mode in args.mode:
        for n in args.tokens:
            g = torch.Generator(device).manual_seed(n)
            qkv = torch.randn(args.batch_size, n, 3 * args.heads * args.head_dim, generator=g, device=device,
                              dtype=dtypes[mode])
            size = torch.randint(1, 8, (args.batch_size, n, 1), generator=g, device=device).to(dtypes[mode])
            if mode == "train":
                qkv.requires_grad_()
                grad = torch.randn(args.batch_size, args.heads, n, args.head_dim, generator=g, device=device,
                                   dtype=dtypes[mode])
            plain_ms = None
            for name, (attend, backend) in variants.items():

                def step():
                    with sdpa_kernel([backend]) if backend is not None else nullcontext():
                        out = attend(qkv, args.heads, size)
                        if mode == "train":
                            torch.autograd.backward(out, grad)
                        return out

                row = {"variant": name, "tokens": n, "mode": mode, "dtype": str(dtypes[mode])}
                try:
                    with torch.inference_mode() if mode == "infer" else nullcontext():
                        row["ms"] = round(time_ms(step, device, args.warmup, args.steps), 4)
                        row["host_us"] = round(host_us(step, device, args.host_calls), 1)
                except RuntimeError as err:
                    row["error"] = str(err).splitlines()[0][:200]
                if name == "plain":
                    plain_ms = row.get("ms")
                if plain_ms and "ms" in row:
                    row["vs_plain"] = float(f"{plain_ms / row['ms']:.3g}")
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    if args.output:
        json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "rows": rows}, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
