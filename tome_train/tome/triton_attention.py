"""Proportional attention in flash-attention kernels, forward and backward (imported only on first use on a GPU:
importing triton costs time, and CPU builds of torch come without it).

``softmax(q k^T * scale + log(size)) v`` with the per-key bias added inside the kernel's key loop:
PyTorch's SDPA takes the bias only as an attention mask ``[B, 1, 1, N]``, which on an H100 costs
2.3-3x plain attention (:mod:`.attention`); here the bias is one vector load of sizes per key block, its
log taken in the kernel (the mask's log and cast would be two more launches per layer).
:func:`size_biased_attention_trainable` adds a flash-attention-2 backward for timm's packed qkv (the sizes
are detached in ToMe, so ``size`` gets no gradient): the forward keeps each row's log-sum-exp and the
backward recomputes the softmax weights from it, one kernel for dq and one for dk and dv, without atomics,
writing them where q, k and v lie in qkv's gradient.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .attention import packed_heads

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native exponential


@triton.jit
def _image_head(num_heads):
    """This program's (batch, head) pair from grid axis 1: the flat index and the two, as int64 (a large
    batch of packed qkv passes 2**31 elements)."""
    bh = tl.program_id(1)
    return bh, (bh // num_heads).to(tl.int64), (bh % num_heads).to(tl.int64)


@triton.jit
def _tile(ptr, b, h, rows, dims, stride_b, stride_h, stride_n, stride_d):
    """Pointers to the ``rows`` x ``dims`` tile of image ``b``, head ``h`` of a ``[B, H, N, D]`` tensor."""
    return ptr + b * stride_b + h * stride_h + rows[:, None] * stride_n + dims[None, :] * stride_d


@triton.jit
def _size_bias(size_row, stride_size_n, cols, col_ok, dtype):
    """The keys' bias in base 2, fp32: ``log(size)`` rounded to the attention's ``dtype`` (as SDPA's mask holds it)
    times log2(e). Keys past the sequence load a size of 0, so a bias of -inf: the mask costs nothing more."""
    size = tl.load(size_row + cols * stride_size_n, mask=col_ok, other=0.0).to(tl.float32)
    return tl.log(size).to(dtype).to(tl.float32) * LOG2E


@triton.jit
def _key_block(q, k_base, v_base, size_row, stride_kn, stride_vn, stride_size_n, start, num_tokens, dim_ok, qk_scale,
               BLOCK_N: tl.constexpr):
    """The ``BLOCK_N`` keys and values from ``start`` and the base-2 logits of ``q`` against them (``q k^T``
    times ``qk_scale`` plus the keys' bias, :func:`_size_bias`); keys past the sequence load as 0."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < num_tokens
    kv_ok = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kn, mask=kv_ok, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn, mask=kv_ok, other=0.0)
    bias = _size_bias(size_row, stride_size_n, cols, col_ok, q.dtype)
    # "ieee" changes fp32 operands only (no TF32); fp16 and bf16 go to the tensor cores as they are
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale + bias[None, :]
    return k, v, logits


@triton.jit
def _proportional_attention_fwd(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, num_heads, num_tokens, head_dim,
                                qk_scale,
                                stride_qb, stride_qh, stride_qn, stride_qd,
                                stride_kb, stride_kh, stride_kn, stride_kd,
                                stride_vb, stride_vh, stride_vn, stride_vd,
                                stride_size_b, stride_size_n,
                                stride_ob, stride_oh, stride_on, stride_od,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                STORE_LSE: tl.constexpr):
    """One block of ``BLOCK_M`` queries of one (batch, head) against all keys, with an online softmax in
    base 2: ``qk_scale`` is ``scale * log2(e)`` and the bias is multiplied by ``log2(e)`` as it is computed.
    ``STORE_LSE`` also writes each row's ``max + log2(sum)`` to ``lse_ptr`` (fp32 ``[B * H, N]``) for the
    backward; without it the store is compiled out and ``lse_ptr`` is never touched."""
    bh, b, h = _image_head(num_heads)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)  # the head dim padded to a power of two: the columns past it read as 0
    dim_ok = dims < head_dim
    row_ok = rows < num_tokens
    q = tl.load(_tile(q_ptr, b, h, rows, dims, stride_qb, stride_qh, stride_qn, stride_qd),
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh + dims[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + dims[None, :] * stride_vd

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, num_tokens, BLOCK_N):
        k, v, logits = _key_block(q, k_base, v_base, size_ptr + b * stride_size_b, stride_kn, stride_vn,
                                  stride_size_n, start, num_tokens, dim_ok, qk_scale, BLOCK_N)
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        p = tl.exp2(logits - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    out = acc / row_sum[:, None]
    tl.store(_tile(out_ptr, b, h, rows, dims, stride_ob, stride_oh, stride_on, stride_od),
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + bh.to(tl.int64) * num_tokens + rows, row_max + tl.log2(row_sum), mask=row_ok)


@triton.jit
def _proportional_attention_bwd_dq(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
                                   num_heads, num_tokens, head_dim, scale, qk_scale,
                                   stride_qb, stride_qh, stride_qn, stride_qd,
                                   stride_kb, stride_kh, stride_kn, stride_kd,
                                   stride_vb, stride_vh, stride_vn, stride_vd,
                                   stride_size_b, stride_size_n,
                                   stride_ob, stride_oh, stride_on, stride_od,
                                   stride_dob, stride_doh, stride_don, stride_dod,
                                   stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dq`` of one block of ``BLOCK_M`` queries of one (batch, head), stepping through the keys by ``BLOCK_N``.

    It first writes ``delta = rowsum(dO * O)`` (fp32 ``[B * H, N]``) of its rows, which the dk/dv kernel,
    launched after it, reads: this program loads its rows of ``dO`` anyway, so a separate preprocess kernel
    would cost one more launch and one more read of all of ``dO``."""
    bh, b, h = _image_head(num_heads)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    dim_ok = dims < head_dim
    row_ok = rows < num_tokens
    block_ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(_tile(q_ptr, b, h, rows, dims, stride_qb, stride_qh, stride_qn, stride_qd),
                mask=block_ok, other=0.0)
    do = tl.load(_tile(dout_ptr, b, h, rows, dims, stride_dob, stride_doh, stride_don, stride_dod),
                 mask=block_ok, other=0.0)
    o = tl.load(_tile(out_ptr, b, h, rows, dims, stride_ob, stride_oh, stride_on, stride_od),
                mask=block_ok, other=0.0)
    row_offset = bh.to(tl.int64) * num_tokens + rows
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + row_offset, delta, mask=row_ok)
    # rows beyond N read q and dO as 0; an lse of +inf also makes their weights exp2(-inf) = 0 outright
    lse = tl.load(lse_ptr + row_offset, mask=row_ok, other=float("inf"))
    k_base = k_ptr + b * stride_kb + h * stride_kh + dims[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + dims[None, :] * stride_vd

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, num_tokens, BLOCK_N):
        k, v, logits = _key_block(q, k_base, v_base, size_ptr + b * stride_size_b, stride_kn, stride_vn,
                                  stride_size_n, start, num_tokens, dim_ok, qk_scale, BLOCK_N)
        p = tl.exp2(logits - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")

    tl.store(_tile(dq_ptr, b, h, rows, dims, stride_dqb, stride_dqh, stride_dqn, stride_dqd),
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=block_ok)


@triton.jit
def _proportional_attention_bwd_dkdv(q_ptr, k_ptr, v_ptr, size_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                     num_heads, num_tokens, head_dim, scale, qk_scale,
                                     stride_qb, stride_qh, stride_qn, stride_qd,
                                     stride_kb, stride_kh, stride_kn, stride_kd,
                                     stride_vb, stride_vh, stride_vn, stride_vd,
                                     stride_size_b, stride_size_n,
                                     stride_dob, stride_doh, stride_don, stride_dod,
                                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dk`` and ``dv`` of one block of ``BLOCK_N`` keys of one (batch, head), stepping through the queries by
    ``BLOCK_M``; the weights are computed transposed (keys by queries) so that both sums are plain dots."""
    bh, b, h = _image_head(num_heads)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    dim_ok = dims < head_dim
    col_ok = cols < num_tokens
    kv_ok = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(_tile(k_ptr, b, h, cols, dims, stride_kb, stride_kh, stride_kn, stride_kd),
                mask=kv_ok, other=0.0)
    v = tl.load(_tile(v_ptr, b, h, cols, dims, stride_vb, stride_vh, stride_vn, stride_vd),
                mask=kv_ok, other=0.0)
    bias = _size_bias(size_ptr + b * stride_size_b, stride_size_n, cols, col_ok, k.dtype)
    q_base = q_ptr + b * stride_qb + h * stride_qh + dims[None, :] * stride_qd
    do_base = dout_ptr + b * stride_dob + h * stride_doh + dims[None, :] * stride_dod
    row_base = bh.to(tl.int64) * num_tokens

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(0, num_tokens, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < num_tokens
        block_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn, mask=block_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don, mask=block_ok, other=0.0)
        lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
        logits_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale + bias[:, None]
        p_t = tl.exp2(logits_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")

    tl.store(_tile(dk_ptr, b, h, cols, dims, stride_dkb, stride_dkh, stride_dkn, stride_dkd),
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(_tile(dv_ptr, b, h, cols, dims, stride_dvb, stride_dvh, stride_dvn, stride_dvd),
             dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


def _head_dim_block(head_dim: int) -> int:
    return max(triton.next_power_of_2(head_dim), 16)


def _forward(q, k, v, size, scale, block_m, block_n, store_lse):
    B, H, N, D = q.shape
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if store_lse else None
    grid = (triton.cdiv(N, block_m), B * H)
    _proportional_attention_fwd[grid](q, k, v, size, out, out if lse is None else lse, H, N, D,
                                      scale * LOG2E.value,
                                      *q.stride(), *k.stride(), *v.stride(), *size.stride(), *out.stride(),
                                      HEAD_DIM=_head_dim_block(D), BLOCK_M=block_m, BLOCK_N=block_n,
                                      STORE_LSE=store_lse, num_warps=8 if D > 64 else 4, num_stages=3)
    return out, lse


# The block sizes (before fitting to the token count, :func:`_fitted`): the forward's queries per program and keys
# per step (see :func:`triton_proportional_attention`), the backward's rows per program and per step (see
# :func:`triton_proportional_attention_backward`)
BLOCKS = {"block_m": 64, "block_n": 32, "block_outer": 128, "block_inner": 32}


def triton_proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, scale: float,
                                  *, block_m: int = BLOCKS["block_m"], block_n: int = BLOCKS["block_n"]
                                  ) -> torch.Tensor:
    """``softmax(q k^T * scale + log(size)) v``: keys weighed by the tokens they hold, the same for every head and
    query (``log(size)`` rounded to ``q``'s dtype, as SDPA's mask would hold it, and added in fp32).

    Args:
        q, k, v: ``[B, H, N, D]`` fp16, bf16 or fp32, any strides (timm's are views of one packed qkv: they are
            read where they lie, never copied); any head dim ``D`` (padded to a power of two >= 16 in the kernel,
            which ``tl.dot`` needs: ViT-H's 80 computes as 128).
        size: ``[B, N]``, the tokens each key holds (any float dtype, any strides; 1: plain attention).
        scale: the logit scale, usually ``D ** -0.5``.
        block_m, block_n: queries per program and keys per loop step. The defaults were measured on an H100
            (2026-11-27, ``docs/gpu-runs/2026-11-27-h100-kernels-check/sweep.json``: fp16, B 256, H 12, D 64,
            64 or 128 queries, 32, 64 or 128 keys, 4 or 8 warps): over ViT-B r16's token counts 181, 133,
            101, 69 and 37, 64 x 32 took 0.55 ms of device time, 128 x 64 0.70 ms, and the best pair for
            each count 0.52 ms. 64-query programs pad 181 tokens to 192 rather than 256 and give twice the
            programs; at 4 warps (8 past head dim 64) with 3 stages. ptxas for sm_90 (Triton 3.8, built ahead of
            time with a launch's specializations: ViT-B's packed qkv): 82-96 registers, no spills, in fp16 and
            bf16 at head dims 64 and 80 (128x64 took 188-239).

    Returns ``[B, H, N, D]`` in ``q``'s dtype, laid out in memory as ``[B, N, H, D]`` so that the caller's
    ``out.transpose(1, 2).reshape(B, N, H * D)`` is a view. No gradient: see
    :func:`triton_proportional_attention_trainable`.
    """
    return _forward(q, k, v, size, scale, block_m, block_n, store_lse=False)[0]


def _fitted(block: int, num_tokens: int) -> int:
    """``block`` rows, or fewer where the whole sequence is shorter: a late layer's 21 tokens would pad to
    64 (``tl.dot`` takes at least 16)."""
    return min(block, max(16, triton.next_power_of_2(num_tokens)))


def size_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """:func:`triton_proportional_attention` at SDPA's default scale ``D ** -0.5``, blocks fitted to the token count:
    the candidate for :func:`.attention._masked_attention`, with its arguments."""
    blocks = _fitted_blocks(q.shape[2])
    return triton_proportional_attention(q, k, v, size, q.shape[-1] ** -0.5, block_m=blocks["block_m"],
                                         block_n=blocks["block_n"])


def triton_proportional_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor,
                                           out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, scale: float,
                                           *, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                                           block_outer: int = BLOCKS["block_outer"],
                                           block_inner: int = BLOCKS["block_inner"]
                                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` of :func:`triton_proportional_attention`, flash-attention-2 style: the softmax weights are
    recomputed from the forward's log-sum-exp, never stored, and each gradient has one writer (deterministic).

    Args:
        q, k, v, size, scale: the forward's arguments (any strides).
        out: the forward's result ``[B, H, N, D]``; ``lse``: its ``max + log2(sum)`` per row, fp32 ``[B, H, N]``.
        grad_out: ``[B, H, N, D]`` in ``q``'s dtype, any strides (an expanded gradient of stride 0 too).
        grads: where to write ``dq, dk, dv`` (``[B, H, N, D]`` each, any strides: views of one packed gradient);
            ``None`` allocates them contiguous.
        block_outer, block_inner: rows a program owns (queries for dq, keys for dk/dv) and rows of the other side
            per loop step, Triton's fused-attention tutorial's Hopper sizes (not timed here). For an H100 at
            N ~ 200 and D 64: 128 owned rows read the stepped-through operands half as often as 64 and still give
            B*H*2 programs per kernel (197 pads to 256 with 64 or 128 alike); 32-row steps pad 197 only to 224
            and keep the fp32 128 x 32 tiles (logits, weights, dp, ds) beside the fp32 128 x 64 accumulators
            (dq in 4 warps' registers, 8 past head dim 64; dk and dv, two accumulators, in 8).

    Returns ``dq, dk, dv`` in ``q``'s dtype (accumulated in fp32).
    """
    B, H, N, D = q.shape
    dq, dk, dv = grads if grads is not None else (torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
                                                  for _ in range(3))
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    # ptxas for sm_90 (Triton 3.6 and 3.8): at 4 warps the dk/dv kernel spills (20 bytes per thread at head
    # dim 64, 1.4 KB at 128), and so do the forward and dq kernels past head dim 64; 8 warps hold them in
    # registers (every variant a ViT-B/H schedule meets compiles without spills)
    common = dict(HEAD_DIM=_head_dim_block(D), num_stages=3)
    scales = (scale, scale * LOG2E.value)
    # dq first: it writes delta, which every dk/dv program reads for all queries
    _proportional_attention_bwd_dq[(triton.cdiv(N, block_outer), B * H)](
        q, k, v, size, out, grad_out, lse, delta, dq, H, N, D, *scales,
        *q.stride(), *k.stride(), *v.stride(), *size.stride(), *out.stride(), *grad_out.stride(), *dq.stride(),
        BLOCK_M=block_outer, BLOCK_N=block_inner, num_warps=8 if D > 64 else 4, **common)
    _proportional_attention_bwd_dkdv[(triton.cdiv(N, block_outer), B * H)](
        q, k, v, size, grad_out, lse, delta, dk, dv, H, N, D, *scales,
        *q.stride(), *k.stride(), *v.stride(), *size.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        BLOCK_M=block_inner, BLOCK_N=block_outer, num_warps=8, **common)
    return dq, dk, dv


def _packed_forward(qkv: torch.Tensor, num_heads: int, size: torch.Tensor, scale: float, blocks: dict[str, int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(*packed_heads(qkv, num_heads), size, scale, blocks["block_m"], blocks["block_n"], store_lse=True)


def _packed_backward(qkv: torch.Tensor, num_heads: int, size: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     grad_out: torch.Tensor, scale: float, blocks: dict[str, int]) -> torch.Tensor:
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    triton_proportional_attention_backward(*packed_heads(qkv, num_heads), size, out, lse, grad_out, scale,
                                           grads=packed_heads(grad_qkv, num_heads), block_outer=blocks["block_outer"],
                                           block_inner=blocks["block_inner"])
    return grad_qkv


class ProportionalAttention(torch.autograd.Function):
    """:func:`triton_proportional_attention` of timm's packed ``qkv``, differentiable in it: the backward kernels write
    ``dq, dk, dv`` where ``q, k, v`` lie in one ``[B, N, 3 * H * D]`` gradient, which goes to the qkv projection
    as it is (autograd through timm's split of the heads would stack the three and copy them into that layout).
    ``size`` gets no gradient (ToMe detaches the sizes). ``apply(qkv, num_heads, size, scale, blocks)`` with
    ``blocks`` a dict of :func:`triton_proportional_attention_trainable`'s block sizes."""

    @staticmethod
    def forward(ctx, qkv, num_heads, size, scale, blocks):
        out, lse = _packed_forward(qkv, num_heads, size, scale, blocks)
        ctx.save_for_backward(qkv, size, out, lse)
        ctx.num_heads, ctx.scale, ctx.blocks = num_heads, scale, blocks
        return out

    @staticmethod
    @once_differentiable  # the backward is a kernel: a second derivative would be silently wrong, so it raises
    def backward(ctx, grad_out):
        qkv, size, out, lse = ctx.saved_tensors
        return _packed_backward(qkv, ctx.num_heads, size, out, lse, grad_out, ctx.scale, ctx.blocks), None, None, \
            None, None


def triton_proportional_attention_trainable(qkv: torch.Tensor, num_heads: int, size: torch.Tensor, scale: float, *,
                                            block_m: int = BLOCKS["block_m"], block_n: int = BLOCKS["block_n"],
                                            block_outer: int = BLOCKS["block_outer"],
                                            block_inner: int = BLOCKS["block_inner"]) -> torch.Tensor:
    """:func:`triton_proportional_attention` of ``q, k, v`` split from timm's packed ``qkv`` ``[B, N, 3 * H * D]``
    (:func:`.attention.packed_heads`), with a gradient for ``qkv`` (:func:`triton_proportional_attention_backward`; the
    block sizes are theirs). The forward is the same kernel, which also keeps each row's log-sum-exp (fp32
    ``[B, H, N]``, 1/32 of ``q`` at D 64 in fp16) for the backward."""
    blocks = dict(block_m=block_m, block_n=block_n, block_outer=block_outer, block_inner=block_inner)
    return ProportionalAttention.apply(qkv, num_heads, size, scale, blocks)


def _fitted_blocks(num_tokens: int) -> dict[str, int]:
    """:func:`triton_proportional_attention_trainable`'s block sizes, fitted to the token count (:func:`_fitted`)."""
    return {name: _fitted(block, num_tokens) for name, block in BLOCKS.items()}


def _default_scale(qkv: torch.Tensor, num_heads: int) -> float:
    return (qkv.shape[-1] // (3 * num_heads)) ** -0.5


def size_biased_attention_trainable(qkv: torch.Tensor, num_heads: int, size: torch.Tensor) -> torch.Tensor:
    """:func:`size_biased_attention` of the heads of timm's packed ``qkv`` ``[B, N, 3 * H * D]``, differentiable
    in ``qkv`` (``size`` ``[B, N]`` gets no gradient): the training counterpart of
    :func:`.attention._packed_masked_attention`."""
    return ProportionalAttention.apply(qkv, num_heads, size, _default_scale(qkv, num_heads),
                                       _fitted_blocks(qkv.shape[1]))


def size_biased_attention_forward(qkv: torch.Tensor, num_heads: int, size: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of :func:`size_biased_attention_trainable` on its own (for an op pair under
    ``torch.compile``): the output ``[B, H, N, D]`` (laid out as ``[B, N, H, D]``) and each row's
    log-sum-exp, fp32 ``[B, H, N]``, which :func:`size_biased_attention_backward` takes."""
    return _packed_forward(qkv, num_heads, size, _default_scale(qkv, num_heads), _fitted_blocks(qkv.shape[1]))


def size_biased_attention_backward(qkv: torch.Tensor, num_heads: int, size: torch.Tensor, out: torch.Tensor,
                                   lse: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The backward of :func:`size_biased_attention_trainable` on its own: the gradient of ``qkv`` (contiguous,
    its shape) from :func:`size_biased_attention_forward`'s output and log-sum-exp."""
    return _packed_backward(qkv, num_heads, size, out, lse, grad_out, _default_scale(qkv, num_heads),
                            _fitted_blocks(qkv.shape[1]))
