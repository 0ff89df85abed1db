"""The fused Triton kernels of the merge (imported by :mod:`.kernels` only on first use on a GPU: importing
triton costs time, and CPU builds of torch come without it)."""
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
