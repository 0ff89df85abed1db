"""Bipartite soft matching and size-weighted token merging (Bolya et al., ICLR 2023).

Token layout convention: ``[B, N, C]`` with the ``num_protected`` prefix tokens (class,
distillation, register tokens) first. The partition alternates over the *whole* sequence,
prefix included, exactly as the paper's pseudocode does: even positions form set A, odd
positions set B. Protected tokens never merge and never receive a merge. After a merge the
layout is ``[protected (original order), unmerged A (original order), B]``, which for one
class token (and a distillation token) is the order of the public implementation, so
checkpoints trained with it see the same tokens in the same places.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .schedule import bipartite_sets, max_merges


@dataclasses.dataclass(frozen=True)
class Merge:
    """The rows of one bipartite merge, shared by every tensor merged in that layer.

    For ``B`` images of ``num_tokens`` tokens merging ``r`` of each: ``perm`` ``[B * N]`` orders the rows
    of ``x.reshape(B * N, -1)`` as the ``B * (N - r)`` kept rows (``keep_rows``, in output order: per image
    the protected tokens, the unmerged set-A tokens in their order, set B) and then the ``B * r``
    merged-away rows (``src_rows``, per image from the most similar down); ``dest`` ``[B * N]`` is the row
    of the merged ``[B * (N - r), -1]`` that each goes to (``0, 1, ...`` for the kept rows, ``dst_rows`` for
    the others). One ``index_select`` and one ``scatter_add`` per merged tensor apply it. The same merge
    as positions within the sets, as the paper's code has it: ``unm_idx`` ``[B, Na - r]``, ``src_idx``
    ``[B, r]`` (set A) and ``dst_idx`` ``[B, r]`` (set B).
    """

    num_protected: int
    num_tokens: int
    r: int
    perm: torch.Tensor
    dest: torch.Tensor
    # :meth:`weights` for the sizes and dtype the matching was given (:func:`match_keys` computes them with it)
    known_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def a_start(self) -> int:
        return bipartite_sets(self.num_tokens, self.num_protected).a_start

    @property
    def num_a(self) -> int:
        return bipartite_sets(self.num_tokens, self.num_protected).num_a

    @property
    def num_images(self) -> int:
        return self.perm.shape[0] // self.num_tokens

    @property
    def num_kept(self) -> int:
        return self.num_images * (self.num_tokens - self.r)

    @property
    def keep_rows(self) -> torch.Tensor:
        return self.perm[:self.num_kept]

    @property
    def src_rows(self) -> torch.Tensor:
        return self.perm[self.num_kept:]

    @property
    def dst_rows(self) -> torch.Tensor:
        return self.dest[self.num_kept:]

    def _in_set_a(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows % self.num_tokens - self.a_start) // 2

    @property
    def unm_idx(self) -> torch.Tensor:
        p, kept = self.num_protected, self.num_tokens - self.r
        return self._in_set_a(self.keep_rows.view(-1, kept)[:, p:p + self.num_a - self.r])

    @property
    def src_idx(self) -> torch.Tensor:
        return self._in_set_a(self.src_rows.view(-1, self.r))

    @property
    def dst_idx(self) -> torch.Tensor:
        kept = self.num_tokens - self.r
        return self.dst_rows.view(-1, self.r) % kept - (self.num_protected + self.num_a - self.r)

    def weights(self, size: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The size-weighted average's weights: each row's share of its destination's new size,
        ``[B * N, 1]`` in ``perm`` order (exactly 1 for a token that merges with nothing), and the new
        sizes ``[B * (N - r), 1]``, in ``dtype``. ``size`` ``[B, N, 1]`` (``None``: all ones)."""
        with torch.no_grad():
            sizes = size.reshape(-1) if size is not None else None
            return _size_weights(self.perm, self.dest, sizes, self.num_tokens, self.r, dtype)

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Merge ``x`` of shape ``[B, N, ...]`` along dim 1 into ``[B, N - r, ...]``, the tokens that meet reduced
        by ``scatter_reduce``'s ``mode``: ``sum`` for source maps (rows one-hot over disjoint input tokens, so the
        sum is their union), ``amax`` for attention masks. Tokens themselves merge by :func:`merge_wavg`.
        """
        n, t = x.shape[:2]
        rows = x.reshape(n * t, math.prod(x.shape[2:]))  # not -1: an empty batch has no elements to infer it from
        out = rows.index_select(0, self.keep_rows)
        src = rows.index_select(0, self.src_rows)
        # scatter, not index_add_: ONNX exports index_add_ as a ScatterND that drops repeated destinations
        out.scatter_reduce_(0, self.dst_rows[:, None].expand_as(src), src, reduce=mode)
        return out.reshape(n, t - self.r, *x.shape[2:])


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The rows of a merge that depend only on the shapes, not on the matching.

    For ``n`` images of ``t`` tokens merging ``r`` of them: ``prefix_rows`` ``[n, num_protected]`` and
    ``b_rows`` ``[n, Nb]`` index the flattened input ``[n * t, C]`` (the tokens that always stay),
    ``first_a`` ``[n, 1]`` each image's first set-A row (its ``i``-th set-A token is at
    ``first_a + 2 i``), ``first_dst`` ``[n, 1]`` each image's first set-B row in the merged output,
    ``kept_dest`` ``[n * (t - r)]`` the output rows ``0, 1, ...`` of the kept tokens.
    """

    prefix_rows: torch.Tensor
    b_rows: torch.Tensor
    first_a: torch.Tensor
    first_dst: torch.Tensor
    kept_dest: torch.Tensor


def _build_row_layout(n: int, t: int, r: int, num_protected: int, device: torch.device) -> RowLayout:
    num_a, a_start, _, b_start = bipartite_sets(t, num_protected)
    # inference_mode(False): the cache outlives an evaluation pass, and inference tensors cannot be
    # saved for the backward pass of a later training step
    with torch.inference_mode(False):
        first = torch.arange(0, n * t, t, device=device)[:, None]
        return RowLayout(
            prefix_rows=first + torch.arange(num_protected, device=device),
            b_rows=first + torch.arange(b_start, t, 2, device=device),
            first_a=first + a_start,
            # from 0, then offset: counting from the offset up to n * (t - r) has no images to count at n = 0
            first_dst=torch.arange(0, n * (t - r), t - r, device=device)[:, None] + (num_protected + num_a - r),
            kept_dest=torch.arange(n * (t - r), device=device),
        )


# One entry per merging layer and batch size in use (ViT-H: 32 layers), each O(n * t) indices (0.6 MB at
# batch 256, 197 tokens); an evicted one is rebuilt at the cost of the kernels it saves.
_cached_row_layout = functools.lru_cache(maxsize=128)(_build_row_layout)
# False inside the ops a compiled graph calls (compiled_plan_layer): under torch.compile's mode reduce-overhead,
# CUDA graph trees run a graph's first calls with every allocation in the graph's private memory pool, where a
# cached layout would be a live tensor that no output accounts for, and the trees refuse to record the graph
_layouts_cacheable = contextvars.ContextVar("tome_train_layouts_cacheable", default=True)


def row_layout(n: int, t: int, r: int, num_protected: int, device: torch.device) -> RowLayout:
    """The :class:`RowLayout` of this shape, built once per shape in eager mode: each layer would
    otherwise launch ten small index kernels, and eager training on a GPU is bound by launches.
    Under ``torch.compile`` it is built in the graph, where the compiler folds it, and so it is while a
    CUDA graph is captured (captured kernels do not run then, and the cache would keep their empty output)
    and inside an op that a compiled graph calls (see ``_layouts_cacheable``)."""
    if kernels.recorded_into_graph(device) or not _layouts_cacheable.get():
        return _build_row_layout(n, t, r, num_protected, device)
    return _cached_row_layout(n, t, r, num_protected, device)


def _unit_sets(metric: torch.Tensor, num_protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit-length features of set A ``[B, Na, C]`` and set B ``[B, Nb, C]`` (views of one normalized copy)."""
    sets = bipartite_sets(metric.shape[1], num_protected)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    return metric[:, sets.a_start::2], metric[:, sets.b_start::2]


def most_similar(metric: torch.Tensor, num_protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every set-A token's highest cosine similarity to a set-B token, and that token's index in set B.

    ``metric`` ``[B, N, C]`` with ``num_protected`` prefix tokens (in neither set); returns ``[B, Na]``
    maxima and ``[B, Na]`` indices (the first of equal maxima).
    """
    a, b = _unit_sets(metric, num_protected)
    return torch.bmm(a, b.transpose(1, 2)).max(dim=-1)


def same_matches(args: tuple, expected: tuple, candidate: tuple) -> bool:
    """Whether ``candidate`` finds :func:`most_similar`'s matches for ``args``: the same maxima (rtol 1e-5,
    atol 1e-6), and where it names another set-B token, one whose score is that maximum too (a near-tie,
    which another order of the same additions may break either way)."""
    metric, num_protected = args
    (expected_max, expected_idx), (candidate_max, candidate_idx) = expected, candidate
    if candidate_idx.shape != expected_idx.shape or not kernels.same_result(args, expected_max, candidate_max):
        return False
    a, b = _unit_sets(metric, num_protected)
    named = b.gather(1, candidate_idx[..., None].expand(-1, -1, b.shape[-1]))
    return kernels.same_result(args, expected_max, (a * named).sum(-1))


# On a GPU, a fused Triton kernel where it measures faster for the shape at hand (see .kernels).
_most_similar = kernels.FastestPath(most_similar, "triton_kernels.fused_most_similar", agree=same_matches)


def plan_merge(
    node_max: torch.Tensor, node_idx: torch.Tensor, r: int, num_protected: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the merge (:class:`Merge`'s ``perm`` and ``dest``, ``[B * N]`` each) that takes the ``r``
    set-A tokens with the highest maxima ``node_max`` ``[B, Na]`` onto their set-B tokens ``node_idx`` ``[B, Na]``.

    Equal maxima go in token order (a stable sort, NaN first as in ``torch.sort``): the same merge on every
    device and in :func:`.triton_kernels.fused_plan_merge`.
    """
    n = node_max.shape[0]
    if torch.jit.is_tracing():  # ONNX has no stable sort; its TopK (argsort's export) puts the lower index first
        edge_idx = node_max.argsort(dim=-1, descending=True)
    else:
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    src_idx = edge_idx[:, :r]
    unm_idx = edge_idx[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)
    layout = row_layout(n, num_tokens, r, num_protected, node_max.device)
    keep_rows = torch.cat([layout.prefix_rows, torch.add(layout.first_a, unm_idx, alpha=2), layout.b_rows], dim=1)
    src_rows = torch.add(layout.first_a, src_idx, alpha=2)
    return (torch.cat([keep_rows.view(-1), src_rows.view(-1)]),
            torch.cat([layout.kept_dest, (dst_idx + layout.first_dst).view(-1)]))


def size_weights(
    perm: torch.Tensor, dest: torch.Tensor, size: torch.Tensor | None, num_tokens: int, r: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`Merge.weights` of the merge ``perm``, ``dest`` (``[B * N]``, ``r`` of ``num_tokens`` tokens merged
    per image) for sizes ``size`` ``[B * N]`` (``None``: all ones): weights ``[B * N, 1]``, new sizes
    ``[B * (N - r), 1]``."""
    num_rows = perm.shape[0]
    num_kept = num_rows // num_tokens * (num_tokens - r)
    if size is None:
        sizes = torch.ones(num_rows, 1, dtype=dtype, device=perm.device)
    else:
        sizes = size.reshape(num_rows, 1).to(dtype)
    sizes = sizes.index_select(0, perm)
    new_size = sizes[:num_kept].scatter_add(0, dest[num_kept:, None], sizes[num_kept:])
    return sizes.div_(new_size.index_select(0, dest)), new_size


# On a GPU, one Triton kernel each (one program per image) in place of a dozen small ops, where it gives the
# same rows (exactly: a row off by one is another merge) and weights faster (see .kernels).
_plan_merge = kernels.FastestPath(plan_merge, "triton_kernels.fused_plan_merge", agree=kernels.identical)
_size_weights = kernels.FastestPath(size_weights, "triton_kernels.fused_size_weights")


def plan_layer(
    keys: torch.Tensor, size: torch.Tensor | None, r: int, num_protected: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """A merging layer's matching and merge from its attention keys ``[B, H, N, Dh]``: the keys averaged over
    heads (in fp32) matched by :func:`most_similar`, :func:`plan_merge` and :func:`size_weights` for sizes
    ``size`` ``[B * N]`` (``None``: all ones) in ``dtype``. Returns ``perm``, ``dest``, ``weight``,
    ``new_size`` and the matching's ``node_max``, ``node_idx``."""
    t = keys.shape[2]
    # scores in fp32: in fp16/bf16 they tie and flip matches (ViT-S r13, fp16: logits 0.085 from fp32's, 0.006 with
    # fp32 scores)
    node_max, node_idx = _most_similar(keys.mean(1, dtype=torch.float32), num_protected)
    perm, dest = _plan_merge(node_max, node_idx, r, num_protected, t)
    return (perm, dest, *_size_weights(perm, dest, size, t, r, dtype), node_max, node_idx)


def same_layer_plan(args: tuple, expected: tuple, candidate: tuple) -> bool:
    """Whether ``candidate`` is a :func:`plan_layer` of ``args``: its matches are the expected ones
    (:func:`same_matches`, which allows ties broken the other way), its rows exactly :func:`plan_merge`'s
    for its own maxima (so a near-tie between two maxima may order them the other way), its weights
    :func:`size_weights`' for those rows."""
    keys, size, r, num_protected, dtype = args
    t = keys.shape[2]
    perm, dest, weight, new_size, node_max, node_idx = candidate
    metric = keys.mean(1, dtype=torch.float32)
    return (same_matches((metric, num_protected), expected[4:], (node_max, node_idx))
            and kernels.identical(args, plan_merge(node_max, node_idx, r, num_protected, t), (perm, dest))
            and kernels.same_result(args, size_weights(perm, dest, size, t, r, dtype), (weight, new_size)))


# On a GPU, the whole of it in one kernel (the key mean, the matching, the rows and the weights in one launch)
# where that measures faster than the parts, each of which may be a kernel of its own (see .kernels).
_plan_layer = kernels.FastestPath(plan_layer, "triton_kernels.fused_plan_layer", agree=same_layer_plan)


def match_keys(
    keys: torch.Tensor, r: int, num_protected: int, size: torch.Tensor | None, dtype: torch.dtype
) -> Merge | None:
    """The merge of ``r`` tokens (clamped to the 50% cap; ``None`` where nothing merges) that a merging block's
    attention keys ``[B, H, N, Dh]`` plan (:func:`plan_layer`: each set-A token onto its most similar set-B token),
    with the size weights of the tokens' sizes ``size`` ``[B, N, 1]`` (``None``: all ones) in ``dtype`` computed
    along (:attr:`Merge.known_weights`). Without a gradient, and outside autocast."""
    t = keys.shape[2]
    r = min(r, max_merges(t, num_protected))
    if r <= 0:
        return None
    with torch.no_grad(), torch.autocast(keys.device.type, enabled=False):
        sizes = size.reshape(-1) if size is not None else None
        if kernels.compiling_with_ops():
            perm, dest, weight, new_size = compiled_plan_layer(keys, sizes, r, num_protected, dtype)
        else:
            perm, dest, weight, new_size, _, _ = _plan_layer(keys, sizes, r, num_protected, dtype)
    return Merge(num_protected, t, r, perm, dest, (weight, new_size))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 1) -> Merge | None:
    """Match ``r`` tokens of set A to their most similar token of set B, as a merging block does
    (:func:`match_keys`, ``metric`` taking the place of the keys averaged over heads: cosine scores in fp32).

    Args:
        metric: ``[B, N, C]`` matching features (the attention keys averaged over heads).
        r: tokens to remove; clamped to the 50% cap.
        num_protected: prefix tokens that never merge.

    Returns:
        the :class:`Merge` to apply to every tensor of this layer, or ``None`` when nothing merges.
    """
    merge = match_keys(metric[:, None], r, num_protected, None, torch.float32)
    # without the weights match_keys computes along: they are for tokens of size 1, and this merge may merge any
    return None if merge is None else dataclasses.replace(merge, known_weights=None)


@torch.library.custom_op("tome_train::plan_layer", mutates_args=())
def compiled_plan_layer(
    keys: torch.Tensor, size: torch.Tensor | None, r: int, num_protected: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`plan_layer` (its rows and weights) as ``torch.compile`` sees it: one op that a compiled graph calls
    and does not trace, which runs the eager choice (on a GPU, the one-kernel layer where that is faster). It
    takes no gradient, so training compiles it too. Traced, every layer's token count would be compiled into
    sorts, gathers and scatters of its own, and the kernel never chosen."""
    token = _layouts_cacheable.set(False)
    try:
        perm, dest, weight, new_size, _, _ = _plan_layer(keys, size, r, num_protected, dtype)
    finally:
        _layouts_cacheable.reset(token)
    return perm, dest, weight, new_size


@compiled_plan_layer.register_fake
def _(keys: torch.Tensor, size: torch.Tensor | None, r: int, num_protected: int, dtype: torch.dtype
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, _, t, _ = keys.shape
    rows = keys.new_empty(n * t, dtype=torch.long)
    return rows, torch.empty_like(rows), keys.new_empty(n * t, 1, dtype=dtype), keys.new_empty(n * (t - r), 1, dtype=dtype)


def _weighted_merge(
    rows: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, num_kept: int,
    branch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[dest[i]] += weight[i] * rows[perm[i]]``: ``rows`` ``[M, C]`` -> ``[K, C]``, with ``perm``,
    ``dest`` ``[M]`` and ``weight`` ``[M, 1]`` laid out as in :class:`Merge` (``K = num_kept`` rows first);
    with ``branch`` ``[M, C]``, the merge of ``rows + branch`` (a block's residual add).

    One copy of all rows in ``perm`` order, scaled in place, and the merged-away rows added onto
    their destinations; the result is the kept part of that copy (a view: no pass to cut it off).
    """
    if branch is not None:
        rows = rows + branch
    merged = rows.index_select(0, perm).mul_(weight)
    out = merged[:num_kept]
    # scatter, not index_add_: ONNX exports index_add_ as a ScatterND that drops repeated destinations
    out.scatter_add_(0, dest[num_kept:, None].expand(-1, rows.shape[1]), merged[num_kept:])
    return out


def _weighted_merge_backward(
    grad: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The gradient of :func:`_weighted_merge`: ``[K, C]`` -> ``[M, C]``, every row's gradient its
    destination's times its weight (``perm`` covers every row once, so each is written once)."""
    grad_merged = grad.index_select(0, dest).mul_(weight)
    return grad.new_empty(perm.shape[0], grad.shape[1]).index_copy_(0, perm, grad_merged)


# On a GPU, the fused Triton kernels where they measure faster for the shape at hand (see .kernels).
_merge_rows = kernels.FastestPath(_weighted_merge, "triton_kernels.fused_merge", agree=kernels.same_to_rounding,
                                  deterministic=False)  # it adds the merged-away rows atomically
_merge_rows_backward = kernels.FastestPath(_weighted_merge_backward, "triton_kernels.fused_merge_backward",
                                           agree=kernels.same_to_rounding)


def _weighted_merge_norm(
    rows: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, num_kept: int,
    branch: torch.Tensor | None, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
    normed_dtype: torch.dtype, num_images: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_weighted_merge` (by the merge's own choice of kernels) and the layer norm a block applies next, its
    output in ``normed_dtype`` (the MLP's input: under autocast the norm runs in fp32 and the MLP casts its output):
    merged and normed ``[K, C]``. ``num_images`` is for the one-kernel version, which finds each image's merged-away
    rows by it."""
    merged = _merge_rows(rows, perm, dest, weight, num_kept, branch)
    return merged, F.layer_norm(merged, merged.shape[-1:], norm_weight, norm_bias, eps).to(normed_dtype)


def _same_merge_and_norm(args: tuple, expected: tuple, candidate: tuple) -> bool:
    """Whether the merged rows and their norm both agree to rounding (:func:`kernels.same_to_rounding`, each in its
    own dtype)."""
    return len(candidate) == len(expected) and all(
        kernels.same_to_rounding(args, e, c) for e, c in zip(expected, candidate))


# On a GPU, one Triton kernel for the merge and the norm after it, where it measures faster (see .kernels): each
# output row gathers its merged-away rows (no atomic adds) and is normalized while it is at hand.
_merge_norm_rows = kernels.FastestPath(_weighted_merge_norm, "triton_kernels.fused_merge_norm",
                                       agree=_same_merge_and_norm)


def _save_for_merge_backward(ctx, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor,
                             branch: torch.Tensor | None) -> None:
    ctx.save_for_backward(perm, dest, weight)
    ctx.branch_dtype = branch.dtype if branch is not None else None


def _merge_input_grads(ctx, grad_rows: torch.Tensor) -> tuple:
    """The gradients of ``(rows, perm, dest, weight, num_kept, branch)`` from the rows' (``[M, C]``)."""
    grad_branch = grad_rows.to(ctx.branch_dtype) if ctx.needs_input_grad[5] else None
    return grad_rows if ctx.needs_input_grad[0] else None, None, None, None, None, grad_branch


class _WeightedMerge(torch.autograd.Function):
    """:func:`_weighted_merge` with the gradient written out (:func:`_weighted_merge_backward`): autograd
    on the forward's ops records five nodes and launches about ten kernels per layer instead, and eager
    training on a GPU is bound by launches."""

    @staticmethod
    def forward(ctx, rows, perm, dest, weight, num_kept, branch):
        _save_for_merge_backward(ctx, perm, dest, weight, branch)
        return _merge_rows(rows, perm, dest, weight, num_kept, branch)

    @staticmethod
    def backward(ctx, grad):
        return _merge_input_grads(ctx, _merge_rows_backward(grad, *ctx.saved_tensors))


@torch.library.custom_op("tome_train::weighted_merge", mutates_args=())
def compiled_weighted_merge(rows: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor,
                            num_kept: int, branch: torch.Tensor | None) -> torch.Tensor:
    """:func:`_weighted_merge` as ``torch.compile`` sees it: one op (and one for its backward,
    :func:`compiled_weighted_merge_backward`) that a compiled graph calls and does not trace, running the eager
    choice (on a GPU, the fused kernels with the residual add inside) instead of a gather and a scatter per
    layer compiled for each token count."""
    return _merge_rows(rows, perm, dest, weight, num_kept, branch)


@compiled_weighted_merge.register_fake
def _(rows: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, num_kept: int,
      branch: torch.Tensor | None) -> torch.Tensor:
    dtype = rows.dtype if branch is None else torch.promote_types(rows.dtype, branch.dtype)
    return rows.new_empty(num_kept, rows.shape[1], dtype=dtype)


@torch.library.custom_op("tome_train::weighted_merge_backward", mutates_args=())
def compiled_weighted_merge_backward(grad: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor,
                                     weight: torch.Tensor) -> torch.Tensor:
    """:func:`_weighted_merge_backward` as ``torch.compile`` sees it (see :func:`compiled_weighted_merge`)."""
    return _merge_rows_backward(grad, perm, dest, weight)


@compiled_weighted_merge_backward.register_fake
def _(grad: torch.Tensor, perm: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(perm.shape[0], grad.shape[1])


def _setup_compiled_merge(ctx, inputs: tuple, output: torch.Tensor) -> None:
    rows, perm, dest, weight, num_kept, branch = inputs
    _save_for_merge_backward(ctx, perm, dest, weight, branch)


def _compiled_merge_backward(ctx, grad: torch.Tensor) -> tuple:
    return _merge_input_grads(ctx, compiled_weighted_merge_backward(grad, *ctx.saved_tensors))


compiled_weighted_merge.register_autograd(_compiled_merge_backward, setup_context=_setup_compiled_merge)


def _merge_arguments(
    merge: Merge, x: torch.Tensor, size: torch.Tensor | None, branch: torch.Tensor | None
) -> tuple[tuple, torch.Tensor]:
    """The rows, their merge and weights as :func:`_weighted_merge` takes them, and the new sizes ``[K, 1]``."""
    n, t, c = x.shape
    weight, new_size = merge.known_weights if merge.known_weights is not None else merge.weights(size, x.dtype)
    branch_rows = branch.reshape(n * t, c) if branch is not None else None
    return (x.reshape(n * t, c), merge.perm, merge.dest, weight, merge.num_kept, branch_rows), new_size


def _merged_source(merge: Merge, source: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return merge(source.to(dtype).detach(), mode="sum") if source is not None else None


def merge_wavg(
    merge: Merge, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None = None,
    branch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Size-weighted average merge of tokens ``x`` ``[B, N, C]`` (with ``branch`` ``[B, N, C]``: of
    ``x + branch``, the residual add a merging block hands over, so that a fused kernel can read both
    and never write the sum), sizes ``[B, N, 1]`` and, if traced, the source map ``[B, N, N0]``.

    Every destination becomes the size-weighted mean of its group: each row is scaled by its share of
    the new size (exactly 1 for a token that merges with nothing, so it stays bit for bit) and added
    onto its destination. ``x`` is read once; the public implementation instead makes ``x * size``,
    splits, gathers, scatters, concatenates and divides, each a pass over every token.

    Source rows are one-hot over disjoint original tokens, so summing them equals the
    ``amax`` merge of the paper's code. The returned ``size`` and ``source`` are detached:
    they are functions of the matching indices only, so their gradient is zero anyway.
    """
    n, t, c = x.shape
    args, new_size = _merge_arguments(merge, x, size, branch)
    # the tracer (ONNX export) records k as a tensor, to keep the batch size dynamic: the plain ops take it
    needs_grad = x.requires_grad or (branch is not None and branch.requires_grad)
    differentiable = torch.is_grad_enabled() and needs_grad and not torch.jit.is_tracing()
    if kernels.compiling_with_ops():
        out = compiled_weighted_merge(*args)
    else:
        out = _WeightedMerge.apply(*args) if differentiable else _merge_rows(*args)
    return out.view(n, t - merge.r, c), new_size.view(n, t - merge.r, 1), _merged_source(merge, source, x.dtype)


def merges_into_norm(norm: nn.Module, x: torch.Tensor, branch: torch.Tensor | None = None) -> bool:
    """Whether :func:`merge_wavg_norm` may merge ``x`` (and ``branch``) and apply ``norm`` in one step: without a
    gradient, where the one-kernel version may be chosen (:meth:`kernels.FastestPath.applies`: eagerly, on a GPU), for
    a layer norm over the last dim with weight and bias (timm's ``fast_norm``, which norms in half precision, aside).
    Elsewhere the norm stays the MLP's, as in timm's block."""
    needs_grad = x.requires_grad or (branch is not None and branch.requires_grad)
    return (not (torch.is_grad_enabled() and needs_grad) and _merge_norm_rows.applies(x.device)
            and isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 and norm.weight is not None
            and norm.bias is not None and not getattr(norm, "fast_norm", False))


def merge_wavg_norm(
    merge: Merge, x: torch.Tensor, size: torch.Tensor | None, norm: nn.LayerNorm, source: torch.Tensor | None = None,
    branch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`merge_wavg` without a gradient, and the merged tokens normalized by ``norm`` for the MLP that follows:
    ``x``, ``size``, ``source`` as :func:`merge_wavg` returns them, then ``norm(x)`` ``[B, N - r, C]`` in the dtype
    the MLP computes in (autocast's where it is on, else the merged tokens'). Where :func:`merges_into_norm` holds; on a
    GPU one kernel may do both (``fused_merge_norm``): it reads the rows once and the norm never reads them back."""
    n, t, c = x.shape
    args, new_size = _merge_arguments(merge, x, size, branch)
    device = x.device.type
    merged_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    normed_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else merged_dtype
    merged, normed = _merge_norm_rows(*args, norm.weight, norm.bias, norm.eps, normed_dtype, merge.num_images)
    shape = (n, t - merge.r, c)
    return merged.view(shape), new_size.view(n, t - merge.r, 1), _merged_source(merge, source, x.dtype), normed.view(shape)


def unmerge_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Spread merged tokens ``[B, N, C]`` back over the original layout ``[B, N0, C]``
    with the source map ``[B, N, N0]`` (each original token gets its merged token)."""
    return source.transpose(1, 2).to(x.dtype) @ x
