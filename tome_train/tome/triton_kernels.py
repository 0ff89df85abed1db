"""The fused Triton kernels of the matching and the merge (imported by :mod:`.kernels` only on first use on a
GPU: importing triton costs time, and CPU builds of torch come without it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .schedule import bipartite_sets


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
def _merged_row_norm(src_ptr, branch_ptr, perm_ptr, dest_ptr, weight_ptr, norm_weight_ptr, norm_bias_ptr, merged_ptr,
                     normed_ptr, num_kept, kept_per_image, merged_per_image, num_cols, eps, HAS_BRANCH: tl.constexpr,
                     BLOCK_COLS: tl.constexpr, BLOCK_MERGED: tl.constexpr):
    """Output row ``j = program_id(0)`` of the merge of ``src + branch`` and its layer norm: ``merged[j] =
    weight[j] * row[perm[j]] + sum of weight[s] * row[perm[s]]`` over the image's merged-away slots ``s`` whose
    ``dest`` is ``j`` (added in slot order, in fp32, no atomics), then ``normed[j] = layer_norm(merged[j])``."""
    row = tl.program_id(0)
    col = tl.arange(0, BLOCK_COLS)
    ok = col < num_cols
    src_row = tl.load(perm_ptr + row)
    values = tl.load(src_ptr + src_row * num_cols + col, mask=ok, other=0.0)
    if HAS_BRANCH:
        values += tl.load(branch_ptr + src_row * num_cols + col, mask=ok, other=0.0).to(values.dtype)
    acc = values.to(tl.float32) * tl.load(weight_ptr + row).to(tl.float32)
    first_slot = num_kept + (row // kept_per_image) * merged_per_image
    slots = tl.arange(0, BLOCK_MERGED)
    into = tl.load(dest_ptr + first_slot + slots, mask=slots < merged_per_image, other=-1)
    # most rows receive nothing (every row of set A and the prefix, most of set B): one vector test for them
    if tl.sum((into == row).to(tl.int32), axis=0) > 0:
        for s in range(merged_per_image):
            if tl.load(dest_ptr + first_slot + s) == row:
                src_row = tl.load(perm_ptr + first_slot + s)
                values = tl.load(src_ptr + src_row * num_cols + col, mask=ok, other=0.0)
                if HAS_BRANCH:
                    values += tl.load(branch_ptr + src_row * num_cols + col, mask=ok, other=0.0).to(values.dtype)
                acc += values.to(tl.float32) * tl.load(weight_ptr + first_slot + s).to(tl.float32)
    merged = acc.to(merged_ptr.dtype.element_ty)
    tl.store(merged_ptr + row * num_cols + col, merged, mask=ok)
    # the norm of the row as stored, as the layer norm after the merge would read it
    x = merged.to(tl.float32)
    mean = tl.sum(x, axis=0) / num_cols
    centered = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / num_cols + eps)
    scale = tl.load(norm_weight_ptr + col, mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(norm_bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * num_cols + col, (centered * rstd * scale + shift).to(normed_ptr.dtype.element_ty),
             mask=ok)


def fused_merge_norm(rows: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, num_kept: int,
                     branch: torch.Tensor | None, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                     normed_dtype: torch.dtype, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.merge._weighted_merge_norm` in one kernel, one program per output row: each row gathers what merges
    into it (its image's merged-away rows are ``perm[num_kept + image * r:][:r]``), so no row is written twice and
    the complete row is at hand for the norm. ``rows`` ``[M, C]`` (and ``branch``) -> merged ``[K, C]``, normed
    ``[K, C]`` in ``normed_dtype``. It stands in for the two merge kernels, the norm's pass over the merged rows and,
    under autocast, the cast of the norm's fp32 output for the MLP: per element of an fp32 stream with an fp16
    branch, 12 bytes read and written where those move 24."""
    rows = rows.contiguous()
    branch = branch.contiguous() if branch is not None else None
    num_cols = rows.shape[1]
    merged_per_image = (perm.shape[0] - num_kept) // num_images
    dtype = rows.dtype if branch is None else torch.promote_types(rows.dtype, branch.dtype)
    merged = rows.new_empty(num_kept, num_cols, dtype=dtype)
    normed = rows.new_empty(num_kept, num_cols, dtype=normed_dtype)
    _merged_row_norm[(num_kept,)](rows, rows if branch is None else branch, perm, dest, weight, norm_weight, norm_bias,
                                  merged, normed, num_kept, num_kept // num_images, merged_per_image, num_cols, eps,
                                  HAS_BRANCH=branch is not None, BLOCK_COLS=triton.next_power_of_2(num_cols),
                                  BLOCK_MERGED=triton.next_power_of_2(max(merged_per_image, 1)))
    return merged, normed


@triton.jit
def _unit_features(ptr, rows, row_ok, stride_n, stride_h, num_heads, dim, BLOCK_DIM: tl.constexpr,
                   HEADS_PER_STEP: tl.constexpr):
    """The features of ``rows`` (``ptr`` at the image's first token; a head's row is ``dim`` values in a row)
    summed over ``num_heads`` heads and scaled to unit length: ``[len(rows), BLOCK_DIM]`` fp32. Columns past
    ``dim`` (padded to a power of two) read as 0; rows past the set get norm 1, not 0 / 0. The heads are read
    ``HEADS_PER_STEP`` at a time, unrolled, so that their loads are in flight together (a warp waits for each
    load it adds before it issues the next); they are added in head order whatever the step."""
    col = tl.arange(0, BLOCK_DIM)
    ok = row_ok[:, None] & (col < dim)[None, :]
    at = ptr + rows[:, None] * stride_n + col[None, :]
    features = tl.full(ok.shape, 0.0, tl.float32)
    for first in range(0, num_heads, HEADS_PER_STEP):
        for step in tl.static_range(HEADS_PER_STEP):
            head = first + step
            features += tl.load(at + head * stride_h, mask=ok & (head < num_heads), other=0.0).to(tl.float32)
    return features / tl.sqrt(tl.where(row_ok, tl.sum(features * features, axis=1), 1.0))[:, None]


@triton.jit
def _match_block(ptr, stride_n, stride_h, num_heads, dim, ia, a_start, b_start, num_a, num_b, node_max_ptr,
                 node_idx_ptr, BLOCK_DIM: tl.constexpr, BLOCK_B: tl.constexpr, HEADS_PER_STEP: tl.constexpr,
                 PRODUCTS: tl.constexpr):
    """For the set-A tokens ``ia`` of one image (every second token from ``a_start``; ``ptr`` at its first
    token, the pointers at its first set-A token): the max over set B (every second token from ``b_start``)
    of the cosine similarity, and where it is."""
    a_ok = ia < num_a
    a = _unit_features(ptr, a_start + 2 * ia, a_ok, stride_n, stride_h, num_heads, dim, BLOCK_DIM, HEADS_PER_STEP)
    best = tl.full(ia.shape, float("-inf"), tl.float32)
    best_idx = tl.zeros(ia.shape, tl.int64)
    for start in range(0, num_b, BLOCK_B):
        jb = start + tl.arange(0, BLOCK_B)
        b_ok = jb < num_b
        b = _unit_features(ptr, b_start + 2 * jb, b_ok, stride_n, stride_h, num_heads, dim, BLOCK_DIM,
                           HEADS_PER_STEP)
        # fp32 products to fp32's accuracy or near it (PRODUCTS, see fused_plan_layer): TF32's alone, a 10-bit
        # mantissa, flip near-tied matches
        scores = tl.where(b_ok[None, :], tl.dot(a, tl.trans(b), input_precision=PRODUCTS), float("-inf"))
        block_max = tl.max(scores, axis=1)
        block_idx = tl.argmax(scores, axis=1).to(tl.int64) + start
        better = block_max > best  # strict: the first of equal maxima wins, as in torch.max on the CPU
        best = tl.where(better, block_max, best)
        best_idx = tl.where(better, block_idx, best_idx)
    tl.store(node_max_ptr + ia, best, mask=a_ok)
    tl.store(node_idx_ptr + ia, best_idx, mask=a_ok)


@triton.jit
def _match_rows(metric_ptr, node_max_ptr, node_idx_ptr, num_tokens, dim, a_start, b_start, num_a, num_b,
                BLOCK_DIM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PRODUCTS: tl.constexpr):
    """:func:`.merge.most_similar` for image ``program_id(0)`` and its set-A tokens in block ``program_id(1)``
    (``metric`` ``[B, N, dim]`` contiguous)."""
    image = tl.program_id(0)
    ia = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    _match_block(metric_ptr + image * num_tokens * dim, dim, 0, 1, dim, ia, a_start, b_start, num_a, num_b,
                 node_max_ptr + image * num_a, node_idx_ptr + image * num_a, BLOCK_DIM, BLOCK_B, 1, PRODUCTS)


def _whole(count: int) -> tuple[int, int]:
    """A block that covers ``count`` rows (a power of two, at least 64) and the other side of a comparison tile
    of at most 2048 entries with it. Each block size is a build of its own, the first time a shape needs it
    (about a second of Triton's compilation on the host, in a model's first step): from 64 up, the late layers
    share their blocks with the middle ones, and the plan's three kernels and its one-kernel layer take 11 builds
    per dtype for ViT-B r16 and ViT-L r8 instead of 18 and 19, for masked work on at most 64 rows."""
    block = max(triton.next_power_of_2(count), 64)
    return block, max(16, 2048 // block)


def _block_dim(dim: int) -> int:
    return max(triton.next_power_of_2(dim), 16)


def fused_most_similar(metric: torch.Tensor, num_protected: int, block: int = 32, products: str = "tf32x3"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.merge.most_similar` in one kernel (norms, scores and their row max; no ``[B, Na, Nb]`` score
    matrix): ``metric`` ``[B, N, C]`` fp32 -> maxima and indices ``[B, Na]``. ``products``: see
    :func:`fused_plan_layer`."""
    metric = metric.contiguous()
    n, t, dim = metric.shape
    num_a, a_start, num_b, b_start = bipartite_sets(t, num_protected)
    node_max = metric.new_empty(n, num_a)
    node_idx = torch.empty(n, num_a, dtype=torch.long, device=metric.device)
    _match_rows[(n, triton.cdiv(num_a, block))](
        metric, node_max, node_idx, t, dim, a_start, b_start, num_a, num_b, BLOCK_DIM=_block_dim(dim), BLOCK_A=block,
        BLOCK_B=block, PRODUCTS=products, num_stages=1)  # ptxas for sm_90: pipelined (3 stages) it spills at 255 registers; unpipelined, 72
    return node_max, node_idx


@triton.jit
def _sorts_before(a, b, a_index, b_index):
    """Whether score ``a`` goes before ``b`` in a stable descending sort with NaN first (``torch.sort``'s order)."""
    a_nan, b_nan = a != a, b != b
    greater = (a > b) | (a_nan & ~b_nan)
    equal = (a == b) | (a_nan & b_nan)
    return greater | (equal & (a_index < b_index))


@triton.jit
def _plan_image(image, node_max_ptr, node_idx_ptr, perm_ptr, dest_ptr, r, num_protected, num_tokens, num_a, a_start,
                b_start, num_kept_total, BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr):
    """:func:`.merge.plan_merge` for one image: every set-A token's rank among the image's maxima (``BLOCK_A``
    covers set A), and from it the token's rows; the prefix and set B rows are fixed."""
    i = tl.arange(0, BLOCK_A)
    i_ok = i < num_a
    score = tl.load(node_max_ptr + image * num_a + i, mask=i_ok, other=0.0)
    rank = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, num_a, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        j_ok = j < num_a
        other = tl.load(node_max_ptr + image * num_a + j, mask=j_ok, other=0.0)
        ahead = _sorts_before(other[None, :], score[:, None], j[None, :], i[:, None]) & j_ok[None, :]
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    kept = num_tokens - r
    first_row = image * num_tokens
    first_out = image * kept
    a_rows = first_row + a_start + 2 * i
    # merged away: after every image's kept rows, in the order of the ranks, onto set B (after the unmerged A)
    merged = i_ok & (rank < r)
    slot = num_kept_total + image * r + rank
    tl.store(perm_ptr + slot, a_rows, mask=merged)
    dst = tl.load(node_idx_ptr + image * num_a + i, mask=merged, other=0)
    tl.store(dest_ptr + slot, first_out + num_protected + num_a - r + dst, mask=merged)
    # unmerged: after the prefix, in token order
    unmerged = i_ok & (rank >= r)
    position = tl.cumsum(unmerged.to(tl.int32), axis=0) - 1
    tl.store(perm_ptr + first_out + num_protected + position, a_rows, mask=unmerged)
    # the prefix and set B keep their rows; every kept row is its own destination
    first_b = num_protected + num_a - r
    for start in range(0, kept, BLOCK_A):
        k = start + tl.arange(0, BLOCK_A)
        k_ok = k < kept
        fixed_row = tl.where(k < num_protected, first_row + k, first_row + b_start + 2 * (k - first_b))
        tl.store(perm_ptr + first_out + k, fixed_row, mask=k_ok & ((k < num_protected) | (k >= first_b)))
        tl.store(dest_ptr + first_out + k, first_out + k, mask=k_ok)


@triton.jit
def _plan_rows(node_max_ptr, node_idx_ptr, perm_ptr, dest_ptr, r, num_protected, num_tokens, num_a, a_start,
               b_start, num_kept_total, BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr):
    """:func:`_plan_image` for image ``program_id(0)``."""
    _plan_image(tl.program_id(0), node_max_ptr, node_idx_ptr, perm_ptr, dest_ptr, r, num_protected, num_tokens,
                num_a, a_start, b_start, num_kept_total, BLOCK_A, BLOCK_J)


def fused_plan_merge(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, num_protected: int, num_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.merge.plan_merge` in one kernel, one program per image: ranks by pairwise comparison (no sort),
    the rows written in place (no concatenation). ``node_max``, ``node_idx`` ``[B, Na]`` -> ``perm``, ``dest``
    ``[B * N]``."""
    node_max, node_idx = node_max.contiguous(), node_idx.contiguous()
    n, num_a = node_max.shape
    _, a_start, _, b_start = bipartite_sets(num_tokens, num_protected)
    perm = torch.empty(n * num_tokens, dtype=torch.long, device=node_max.device)
    dest = torch.empty_like(perm)
    block_a, block_j = _whole(num_a)
    _plan_rows[(n,)](node_max, node_idx, perm, dest, r, num_protected, num_tokens, num_a, a_start, b_start,
                     n * (num_tokens - r), BLOCK_A=block_a, BLOCK_J=block_j, num_warps=4 if block_a <= 256 else 8)
    return perm, dest


@triton.jit
def _load_sizes(size_ptr, perm_ptr, slot, ok, HAS_SIZE: tl.constexpr):
    """The sizes (fp32) of the rows ``perm[slot]``; ones without ``HAS_SIZE``."""
    if HAS_SIZE:
        sizes = tl.load(size_ptr + tl.load(perm_ptr + slot, mask=ok, other=0), mask=ok, other=0.0).to(tl.float32)
    else:
        sizes = tl.where(ok, 1.0, 0.0)
    return sizes


@triton.jit
def _merged_rows(size_ptr, perm_ptr, dest_ptr, start, image, r, first_out, num_kept_total, HAS_SIZE: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """Merged-away rows ``start .. start + BLOCK_S`` of the image: their slots in ``perm``, which are real,
    their sizes and the kept row (within the image's output) each goes to."""
    s = start + tl.arange(0, BLOCK_S)
    s_ok = s < r
    slot = num_kept_total + image * r + s
    merged = _load_sizes(size_ptr, perm_ptr, slot, s_ok, HAS_SIZE)
    into = tl.load(dest_ptr + slot, mask=s_ok, other=-1) - first_out
    return slot, s_ok, merged, into


@triton.jit
def _size_weights_image(image, size_ptr, perm_ptr, dest_ptr, weight_ptr, new_size_ptr, r, kept, num_kept_total,
                        HAS_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """:func:`.merge.size_weights` for one image: each kept row's new size (its own plus those of the rows
    merged into it; ``BLOCK_K`` covers the kept rows), then every row's share of its destination's. Sizes
    are whole numbers, exact in any order of addition."""
    k = tl.arange(0, BLOCK_K)
    k_ok = k < kept
    first_out = image * kept
    own = _load_sizes(size_ptr, perm_ptr, first_out + k, k_ok, HAS_SIZE)
    total = own
    for start in range(0, r, BLOCK_S):
        slot, s_ok, merged, into = _merged_rows(size_ptr, perm_ptr, dest_ptr, start, image, r, first_out,
                                                num_kept_total, HAS_SIZE, BLOCK_S)
        total += tl.sum(tl.where(into[None, :] == k[:, None], merged[None, :], 0.0), axis=1)
    tl.store(new_size_ptr + first_out + k, total, mask=k_ok)
    # correctly rounded: a row that merges with nothing gets exactly 1 and stays bit for bit
    tl.store(weight_ptr + first_out + k, tl.div_rn(own, tl.where(k_ok, total, 1.0)), mask=k_ok)
    for start in range(0, r, BLOCK_S):
        slot, s_ok, merged, into = _merged_rows(size_ptr, perm_ptr, dest_ptr, start, image, r, first_out,
                                                num_kept_total, HAS_SIZE, BLOCK_S)
        into_total = tl.sum(tl.where(into[:, None] == k[None, :], total[None, :], 0.0), axis=1)
        tl.store(weight_ptr + slot, tl.div_rn(merged, tl.where(s_ok, into_total, 1.0)), mask=s_ok)


@triton.jit
def _size_weights_rows(size_ptr, perm_ptr, dest_ptr, weight_ptr, new_size_ptr, r, kept, num_kept_total,
                       HAS_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """:func:`_size_weights_image` for image ``program_id(0)``."""
    _size_weights_image(tl.program_id(0), size_ptr, perm_ptr, dest_ptr, weight_ptr, new_size_ptr, r, kept,
                        num_kept_total, HAS_SIZE, BLOCK_K, BLOCK_S)


def fused_size_weights(perm: torch.Tensor, dest: torch.Tensor, size: torch.Tensor | None, num_tokens: int, r: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.merge.size_weights` in one kernel, one program per image (the merge keeps a row's
    destination in its image): weights ``[B * N, 1]`` and new sizes ``[B * (N - r), 1]`` in ``dtype``."""
    n = perm.shape[0] // num_tokens
    kept = num_tokens - r
    weight = torch.empty(perm.shape[0], 1, dtype=dtype, device=perm.device)
    new_size = torch.empty(n * kept, 1, dtype=dtype, device=perm.device)
    block_k, block_s = _whole(kept)
    _size_weights_rows[(n,)](perm if size is None else size.contiguous(), perm, dest, weight, new_size, r, kept,
                             n * kept, HAS_SIZE=size is not None, BLOCK_K=block_k, BLOCK_S=block_s,
                             num_warps=4 if block_k <= 256 else 8)
    return weight, new_size


@triton.jit
def _plan_layer(keys_ptr, size_ptr, node_max_ptr, node_idx_ptr, perm_ptr, dest_ptr, weight_ptr, new_size_ptr,
                stride_b, stride_h, stride_n, num_heads, dim, r, num_protected, num_tokens, num_a, a_start, num_b,
                b_start, num_kept_total, HAS_SIZE: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_MATCH: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_S: tl.constexpr, HEADS_PER_STEP: tl.constexpr, PRODUCTS: tl.constexpr):
    """A layer's whole merge for image ``program_id(0)``, from its keys to the size weights: the matching on the
    keys summed over heads (:func:`_match_block`, set A in blocks of ``BLOCK_MATCH``), then
    :func:`_plan_image` and :func:`_size_weights_image`, each reading back what the one before stored."""
    image = tl.program_id(0)
    for start in range(0, num_a, BLOCK_MATCH):
        _match_block(keys_ptr + image * stride_b, stride_n, stride_h, num_heads, dim, start + tl.arange(0, BLOCK_MATCH),
                     a_start, b_start, num_a, num_b, node_max_ptr + image * num_a, node_idx_ptr + image * num_a,
                     BLOCK_DIM, BLOCK_B, HEADS_PER_STEP, PRODUCTS)
    # what one thread stored, others read: the barrier orders the program's global stores before its loads
    tl.debug_barrier()
    _plan_image(image, node_max_ptr, node_idx_ptr, perm_ptr, dest_ptr, r, num_protected, num_tokens, num_a, a_start,
                b_start, num_kept_total, BLOCK_A, BLOCK_J)
    tl.debug_barrier()
    _size_weights_image(image, size_ptr, perm_ptr, dest_ptr, weight_ptr, new_size_ptr, r, num_tokens - r,
                        num_kept_total, HAS_SIZE, BLOCK_K, BLOCK_S)


def fused_plan_layer(keys: torch.Tensor, size: torch.Tensor | None, r: int, num_protected: int, dtype: torch.dtype,
                     block_match: int = 128, heads_per_step: int | None = None, products: str = "tf32x3",
                     num_warps: int = 8) -> tuple[torch.Tensor, ...]:
    """:func:`.merge.plan_layer` in one kernel, one program per image (the three kernels above and the key mean
    in one launch): ``keys`` ``[B, H, N, Dh]``, read where they lie (timm's packed qkv), sizes ``[B * N]`` or
    ``None`` -> ``perm``, ``dest``, ``weight``, ``new_size``, ``node_max``, ``node_idx``.

    The matching takes set A in blocks of at most ``block_match`` tokens and reads (and sums over heads) set B
    once per block: on an H100 (ViT-B's keys, batch 256, fp16), set A's 98 tokens at 197 in one block took
    0.116 ms, in two of 64 0.146 ms. The heads are summed ``heads_per_step`` at a time (:func:`_unit_features`;
    the same sums whatever the step; ``None``: four up to head dim 64, else one): four heads issue 16 loads back to
    back where one head issues 4 and waits.

    ``products``: Triton's ``input_precision`` of the similarity dots. ``"tf32x3"``, three TF32 tensor-core products
    per fp32 one (each factor split into a TF32 part and its TF32 remainder; the remainders' product dropped):
    about 2^-21 relative error against fp32's 2^-24, well inside the choice's check on the maxima (rtol 1e-5, atol
    1e-6; a near-tie it breaks the other way is accepted, :func:`.merge.same_matches`), where TF32 alone (2^-11)
    flips near-tied matches. ``"ieee"``: fp32 fused multiply-adds on the CUDA cores, the library's before; its
    build for sm_90 is 1044 FMA instructions where tf32x3's is 33 ``wgmma``, and in run f2 the matching kernel,
    which runs the same dot, took 0.087 ms at 197 tokens for 0.5 GFLOP of padded products. Builds for sm_90 with a
    launch's specializations (Triton 3.8, 197 tokens, blocks of 128, docs/performance.md): tf32x3 102 registers
    (fp16 keys), 104 (bf16), 148 (fp32), none spilled, against ieee's 125 and, for bf16, 255 with 8 bytes spilled
    (hence blocks of 64 for bf16 before); at head dim 80 (one head at a time) 208-215, one program per SM.

    ``num_warps``: the warps of an image's program. The plan is latency-bound (one program per image: 256 programs
    over an H100's 132 SMs at batch 256), so more warps split each image's work finer; 8 until measured otherwise
    (``merge_probe.py``'s ``triton_warps4`` and ``triton_warps16``)."""
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    n, heads, t, dim = keys.shape
    num_a, a_start, num_b, b_start = bipartite_sets(t, num_protected)
    kept = t - r
    device = keys.device
    node_max = torch.empty(n, num_a, dtype=torch.float32, device=device)
    node_idx = torch.empty(n, num_a, dtype=torch.long, device=device)
    perm = torch.empty(n * t, dtype=torch.long, device=device)
    dest = torch.empty_like(perm)
    weight = torch.empty(n * t, 1, dtype=dtype, device=device)
    new_size = torch.empty(n * kept, 1, dtype=dtype, device=device)
    (block_a, block_j), (block_k, block_s) = _whole(num_a), _whole(kept)
    block_dim = _block_dim(dim)
    if heads_per_step is None:
        heads_per_step = 4 if block_dim <= 64 else 1
    # ptxas for sm_90 (Triton 3.8): at head dim 80 (padded to 128) with bf16, set B in blocks of 32 spills 330 bytes
    _plan_layer[(n,)](keys, perm if size is None else size.contiguous(), node_max, node_idx, perm, dest, weight,
                      new_size, keys.stride(0), keys.stride(1), keys.stride(2), heads, dim, r, num_protected, t, num_a,
                      a_start, num_b, b_start, n * kept, HAS_SIZE=size is not None, BLOCK_DIM=block_dim,
                      BLOCK_MATCH=min(block_a, block_match), BLOCK_B=32 if block_dim <= 64 else 16, BLOCK_A=block_a,
                      BLOCK_J=block_j, BLOCK_K=block_k, BLOCK_S=block_s, HEADS_PER_STEP=heads_per_step,
                      PRODUCTS=products, num_warps=num_warps, num_stages=1)
    return perm, dest, weight, new_size, node_max, node_idx
