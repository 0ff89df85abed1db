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

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Merge:
    """The indices of one bipartite merge, shared by every tensor merged in that layer.

    Shapes (``B`` batch, ``N`` tokens, ``Na``/``Nb`` unprotected tokens in set A/B, ``r`` merges):
    ``unm_idx`` ``[B, Na - r]`` sorted, ``src_idx`` ``[B, r]``, ``dst_idx`` ``[B, r]`` (positions
    within set A and set B). The same merge as rows of the flattened tensors, for one
    ``index_select`` and one ``scatter_add`` per merged tensor: ``keep_rows`` ``[B * (N - r)]``
    and ``src_rows`` ``[B * r]`` index ``x.reshape(B * N, -1)``, ``dst_rows`` ``[B * r]`` the
    merged ``[B * (N - r), -1]``.
    """

    num_protected: int
    a_offset: int  # where set A starts among the unprotected tokens: 0 or 1
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    keep_rows: torch.Tensor
    src_rows: torch.Tensor
    dst_rows: torch.Tensor

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Merge ``x`` of shape ``[B, N, ...]`` along dim 1 into ``[B, N - r, ...]``.

        ``mode`` is a ``scatter_reduce`` reduction: ``sum`` (size-weighted merging works on
        ``x * size``), ``amax`` (masks, source maps) or ``mean``.
        """
        n, t = x.shape[:2]
        rows = x.reshape(n * t, -1)
        out = rows.index_select(0, self.keep_rows)
        src = rows.index_select(0, self.src_rows)
        # scatter, not index_add_: ONNX exports index_add_ as a ScatterND that drops repeated destinations
        out.scatter_reduce_(0, self.dst_rows[:, None].expand_as(src), src, reduce=mode)
        return out.reshape(n, t - self.r, *x.shape[2:])

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Invert the layout change: ``[B, N - r, C]`` -> ``[B, N, C]``.

        Every token that was merged away gets the value of the token it merged into.
        """
        p, a0 = self.num_protected, self.a_offset
        n, _, c = x.shape
        num_unm = self.unm_idx.shape[1]
        prefix, unm, b = x[:, :p], x[:, p:p + num_unm], x[:, p + num_unm:]
        num_a = num_unm + self.r
        src = b.gather(1, self.dst_idx[..., None].expand(n, -1, c))
        a = x.new_empty(n, num_a, c)
        a.scatter_(1, self.unm_idx[..., None].expand(n, -1, c), unm)
        a.scatter_(1, self.src_idx[..., None].expand(n, -1, c), src)
        rest = x.new_empty(n, num_a + b.shape[1], c)
        rest[:, a0::2] = a
        rest[:, 1 - a0::2] = b
        return torch.cat([prefix, rest], dim=1)


def max_merges(num_tokens: int, num_protected: int) -> int:
    """The 50% cap: at most half of the unprotected tokens can merge in one layer."""
    return max((num_tokens - num_protected) // 2, 0)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 1) -> Merge | None:
    """Match ``r`` tokens of set A to their most similar token of set B.

    Args:
        metric: ``[B, N, C]`` matching features (the attention keys averaged over heads).
        r: tokens to remove; clamped to the 50% cap.
        num_protected: prefix tokens that never merge.

    Returns:
        the :class:`Merge` to apply to every tensor of this layer, or ``None`` when nothing merges.
    """
    r = min(r, max_merges(metric.shape[1], num_protected))
    if r <= 0:
        return None
    a_offset = num_protected % 2
    with torch.no_grad(), torch.autocast(metric.device.type, enabled=False):
        n, t = metric.shape[:2]
        # Scores in at least fp32: under autocast, fp16/bf16 scores tie and flip matches (ViT-S r13, fp16:
        # logits 0.085 from fp32's, 0.006 with fp32 scores).
        metric = metric[:, num_protected:].to(torch.promote_types(metric.dtype, torch.float32))
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, a_offset::2], metric[:, 1 - a_offset::2]
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        src_idx = edge_idx[:, :r]
        unm_idx = edge_idx[:, r:].sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)

        # Rows in the flattened input: image i's tokens start at row i * t, its set A at
        # i * t + a_pos and set B at i * t + b_pos, every second token.
        dev, num_a = metric.device, a.shape[1]
        first = torch.arange(0, n * t, t, device=dev)[:, None]
        first_a = first + (num_protected + a_offset)
        keep_rows = torch.cat([
            first + torch.arange(num_protected, device=dev),
            torch.add(first_a, unm_idx, alpha=2),
            first + torch.arange(num_protected + 1 - a_offset, t, 2, device=dev),
        ], dim=1)
        src_rows = torch.add(first_a, src_idx, alpha=2)
        # in the merged output, image i's set B starts at row i * (t - r) + num_protected + num_a - r
        dst_rows = dst_idx + torch.arange(num_protected + num_a - r, n * (t - r), t - r, device=dev)[:, None]
    return Merge(
        num_protected, a_offset, unm_idx, src_idx, dst_idx,
        keep_rows.flatten(), src_rows.flatten(), dst_rows.flatten(),
    )


def merge_wavg(
    merge: Merge, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Size-weighted average merge of tokens ``x`` ``[B, N, C]``, sizes ``[B, N, 1]`` and,
    if traced, the source map ``[B, N, N0]``.

    ``x`` is read once (the kept rows, copied in order and rescaled in place) plus its ``r`` merged
    rows. The public implementation instead makes ``x * size``, splits,
    gathers, scatters, concatenates and divides, each a pass over every token.

    Source rows are one-hot over disjoint original tokens, so summing them equals the
    ``amax`` merge of the paper's code. The returned ``size`` and ``source`` are detached:
    they are functions of the matching indices only, so their gradient is zero anyway.
    """
    n, t, c = x.shape
    r = merge.r
    sizes = size.reshape(n * t, 1).to(x.dtype) if size is not None else x.new_ones(n * t, 1)
    src_size = sizes.index_select(0, merge.src_rows)
    kept_size = sizes.index_select(0, merge.keep_rows)
    new_size = kept_size.scatter_add(0, merge.dst_rows[:, None], src_size)

    # Every destination becomes the size-weighted mean of its group: its own value scaled to its
    # share of the new size (exactly 1 where nothing arrives, so those rows stay bit for bit), plus the
    # shares of its sources. In place on the whole row copy, never on a view of it: autograd would
    # otherwise clone the gradient of every merged tensor for each in-place op (CopySlices), 9 copies
    # per layer in training.
    rows = x.reshape(n * t, c)
    out = rows.index_select(0, merge.keep_rows).mul_(kept_size / new_size)
    src = rows.index_select(0, merge.src_rows) * (src_size / new_size.index_select(0, merge.dst_rows))
    out.scatter_add_(0, merge.dst_rows[:, None].expand_as(src), src)
    # Sizes and sources depend only on the (no-grad) matching, never on a parameter: detached,
    # they carry no autograd graph (no useless bias gradient in attention, deepcopy-able state).
    if source is not None:
        source = merge(source.to(x.dtype).detach(), mode="sum")
    return out.view(n, t - r, c), new_size.view(n, t - r, 1).detach(), source


def unmerge_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Spread merged tokens ``[B, N, C]`` back over the original layout ``[B, N0, C]``
    with the source map ``[B, N, N0]`` (each original token gets its merged token)."""
    return source.transpose(1, 2).to(x.dtype) @ x
