"""Proportional attention in one flash-attention kernel (imported only on first use on a GPU: importing
triton costs time, and CPU builds of torch come without it).

``softmax(q k^T * scale + log(size)) v`` with the per-key bias added inside the kernel's key loop:
PyTorch's SDPA takes the bias only as an attention mask ``[B, 1, 1, N]``, which on an H100 costs
2.3-3x plain attention (:mod:`.attention`); here the bias is one vector load per key block.
Inference only: there is no backward.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native exponential


@triton.jit
def _proportional_attention_fwd(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, num_heads, num_tokens, head_dim, qk_scale,
                                stride_qb, stride_qh, stride_qn, stride_qd,
                                stride_kb, stride_kh, stride_kn, stride_kd,
                                stride_vb, stride_vh, stride_vn, stride_vd,
                                stride_bias_b, stride_bias_n,
                                stride_ob, stride_oh, stride_on, stride_od,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of ``BLOCK_M`` queries of one (batch, head) against all keys, with an online softmax in
    base 2: ``qk_scale`` is ``scale * log2(e)`` and the bias is multiplied by ``log2(e)`` as it is loaded."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)  # int64: a large batch of packed qkv passes 2**31 elements
    h = (bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)  # the head dim padded to a power of two: the columns past it read as 0
    dim_ok = dims < head_dim
    row_ok = rows < num_tokens
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh + dims[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + dims[None, :] * stride_vd

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, num_tokens, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < num_tokens
        kv_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=kv_ok, other=0.0)
        # keys beyond N get a bias of -inf: the mask costs nothing more than the bias
        bias = tl.load(bias_ptr + b * stride_bias_b + cols * stride_bias_n, mask=col_ok,
                       other=float("-inf")).to(tl.float32)
        # "ieee" changes fp32 operands only (no TF32); fp16 and bf16 go to the tensor cores as they are
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale + bias[None, :] * LOG2E
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        p = tl.exp2(logits - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    out = acc / row_sum[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor, scale: float,
                           *, block_m: int = 128, block_n: int = 64) -> torch.Tensor:
    """``softmax(q k^T * scale + log_size) v`` with ``log_size`` a bias per key, the same for every head and query.

    Args:
        q, k, v: ``[B, H, N, D]`` fp16, bf16 or fp32, any strides (timm's are views of one packed qkv: they are
            read where they lie, never copied); any head dim ``D`` (padded to a power of two >= 16 in the kernel,
            which ``tl.dot`` needs: ViT-H's 80 computes as 128).
        log_size: ``[B, N]``, ``log`` of the tokens each key holds (any float dtype; added in fp32).
        scale: the logit scale, usually ``D ** -0.5``.
        block_m, block_n: queries per program and keys per loop step. The defaults are for an H100 at
            N ~ 200: 197 tokens pad to 256 with 64 or 128 either way, so 128 queries per program read every
            K/V block half as often as 64 and still give B*H*2 programs (6144 at B 256, H 12, 46 per SM);
            64 keys per step keep the fp32 logits and accumulator (128 x 64 each) in the registers of
            4 warps, and 3 stages double-buffer K and V (2 stages keep one buffer) over a 4-step loop.

    Returns ``[B, H, N, D]`` in ``q``'s dtype, laid out in memory as ``[B, N, H, D]`` so that the caller's
    ``out.transpose(1, 2).reshape(B, N, H * D)`` is a view.
    """
    B, H, N, D = q.shape
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    grid = (triton.cdiv(N, block_m), B * H)
    _proportional_attention_fwd[grid](q, k, v, log_size, out, H, N, D, scale * LOG2E.value,
                                      *q.stride(), *k.stride(), *v.stride(), *log_size.stride(), *out.stride(),
                                      HEAD_DIM=max(triton.next_power_of_2(D), 16), BLOCK_M=block_m, BLOCK_N=block_n,
                                      num_warps=4, num_stages=3)
    return out


def size_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor) -> torch.Tensor:
    """:func:`proportional_attention` at SDPA's default scale ``D ** -0.5``: the candidate for
    :func:`.attention._masked_attention`, with its arguments."""
    return proportional_attention(q, k, v, log_size, q.shape[-1] ** -0.5)
