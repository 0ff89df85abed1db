"""The fused Triton kernels of the matching and the merge (imported by :mod:`.kernels` only on first use on a
GPU: importing triton costs time, and CPU builds of torch come without it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scaled_row_copy(src_ptr, branch_ptr, src_index_ptr, dst_ptr, dst_index_ptr, weight_ptr, start, count,
                     num_cols, ATOMIC: tl.constexpr, HAS_BRANCH: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr):
    """``dst[dst_index[i]] (+)= weight[i] * (src + branch)[src_index[i]]`` for ``i`` in
    ``[start, start + count)`` (``branch``, shaped as ``src``, only with ``HAS_BRANCH``)."""
    i = start + tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = i < start + count
    src_row = tl.load(src_index_ptr + i, mask=row_ok, other=0)
    dst_row = tl.load(dst_index_ptr + i, mask=row_ok, other=0)
    weight = tl.load(weight_ptr + i, mask=row_ok, other=0.0)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = row_ok[:, None] & (col < num_cols)[None, :]
    offsets = src_row[:, None] * num_cols + col[None, :]
    values = tl.load(src_ptr + offsets, mask=ok, other=0.0)
    if HAS_BRANCH:
        values += tl.load(branch_ptr + offsets, mask=ok, other=0.0).to(values.dtype)
    values = values * weight[:, None]
    out = dst_ptr + dst_row[:, None] * num_cols + col[None, :]
    if ATOMIC:
        tl.atomic_add(out, values, mask=ok)
    else:
        tl.store(out, values, mask=ok)


def _launch(src, src_index, dst, dst_index, weight, start, count, atomic, branch=None, block_rows=16,
            block_cols=128):
    num_cols = src.shape[1]
    grid = (triton.cdiv(count, block_rows), triton.cdiv(num_cols, block_cols))
    _scaled_row_copy[grid](src, src if branch is None else branch, src_index, dst, dst_index, weight, start, count,
                           num_cols, ATOMIC=atomic, HAS_BRANCH=branch is not None, BLOCK_ROWS=block_rows,
                           BLOCK_COLS=block_cols)


def fused_merge(rows: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, num_kept: int,
                branch: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`.merge._weighted_merge` in two kernels and two passes over the rows (the kept rows stored,
    the merged-away rows added atomically): ``rows`` ``[M, C]`` -> ``[K, C]``. With ``branch`` ``[M, C]``
    it merges ``rows + branch`` without writing the sum."""
    rows = rows.contiguous()
    branch = branch.contiguous() if branch is not None else None
    out = rows.new_empty(num_kept, rows.shape[1])
    _launch(rows, perm, out, dest, weight, 0, num_kept, atomic=False, branch=branch)
    _launch(rows, perm, out, dest, weight, num_kept, perm.shape[0] - num_kept, atomic=True, branch=branch)
    return out


def fused_merge_backward(grad: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor
                         ) -> torch.Tensor:
    """:func:`.merge._weighted_merge_backward` in one kernel: every row's gradient is its destination's
    times its weight, ``[K, C]`` -> ``[M, C]``."""
    grad = grad.contiguous()
    grad_rows = grad.new_empty(perm.shape[0], grad.shape[1])
    _launch(grad, dest, grad_rows, perm, weight, 0, perm.shape[0], atomic=False)
    return grad_rows


@triton.jit
def _match_rows(metric_ptr, node_max_ptr, node_idx_ptr, num_tokens, dim, a_start, b_start, num_a, num_b,
                BLOCK_DIM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """For image ``program_id(0)`` and a block of its set-A tokens (every second token from ``a_start``):
    the max over set B (every second token from ``b_start``) of the cosine similarity, and where it is."""
    image = tl.program_id(0)
    ia = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = ia < num_a
    col = tl.arange(0, BLOCK_DIM)
    col_ok = col < dim
    base = metric_ptr + image * num_tokens * dim
    # columns past dim (padded to a power of two) read as 0; rows past the set get norm 1, not 0 / 0
    a = tl.load(base + (a_start + 2 * ia)[:, None] * dim + col[None, :], mask=a_ok[:, None] & col_ok[None, :],
                other=0.0)
    a = a / tl.sqrt(tl.where(a_ok, tl.sum(a * a, axis=1), 1.0))[:, None]
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int64)
    for start in range(0, num_b, BLOCK_B):
        jb = start + tl.arange(0, BLOCK_B)
        b_ok = jb < num_b
        b = tl.load(base + (b_start + 2 * jb)[:, None] * dim + col[None, :], mask=b_ok[:, None] & col_ok[None, :],
                    other=0.0)
        b = b / tl.sqrt(tl.where(b_ok, tl.sum(b * b, axis=1), 1.0))[:, None]
        # fp32 products without TF32: the library's scores (TF32's 10-bit mantissa flips near-tied matches)
        scores = tl.where(b_ok[None, :], tl.dot(a, tl.trans(b), input_precision="ieee"), float("-inf"))
        block_max = tl.max(scores, axis=1)
        block_idx = tl.argmax(scores, axis=1).to(tl.int64) + start
        better = block_max > best  # strict: the first of equal maxima wins, as in torch.max on the CPU
        best = tl.where(better, block_max, best)
        best_idx = tl.where(better, block_idx, best_idx)
    tl.store(node_max_ptr + image * num_a + ia, best, mask=a_ok)
    tl.store(node_idx_ptr + image * num_a + ia, best_idx, mask=a_ok)


def fused_most_similar(metric: torch.Tensor, num_protected: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.merge.most_similar` in one kernel (norms, scores and their row max; no ``[B, Na, Nb]`` score
    matrix): ``metric`` ``[B, N, C]`` fp32 -> maxima and indices ``[B, Na]``."""
    metric = metric.contiguous()
    n, t, dim = metric.shape
    a_offset = num_protected % 2
    num_a = (t - num_protected + 1 - a_offset) // 2
    node_max = metric.new_empty(n, num_a)
    node_idx = torch.empty(n, num_a, dtype=torch.long, device=metric.device)
    _match_rows[(n, triton.cdiv(num_a, block))](
        metric, node_max, node_idx, t, dim, num_protected + a_offset, num_protected + 1 - a_offset, num_a,
        t - num_protected - num_a, BLOCK_DIM=max(triton.next_power_of_2(dim), 16), BLOCK_A=block, BLOCK_B=block,
        num_stages=1)  # ptxas for sm_90: pipelined (3 stages) it spills at 255 registers; unpipelined, 72
    return node_max, node_idx
