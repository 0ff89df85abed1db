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

    Shapes (``B`` batch, ``Na``/``Nb`` unprotected tokens in set A/B, ``r`` merges):
    ``unm_idx`` ``[B, Na - r]`` sorted, ``src_idx`` ``[B, r]``, ``dst_idx`` ``[B, r]``.
    """

    num_protected: int
    a_offset: int  # where set A starts among the unprotected tokens: 0 or 1
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, a0 = self.num_protected, self.a_offset
        rest = x[:, p:]
        return x[:, :p], rest[:, a0::2], rest[:, 1 - a0::2]

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Merge ``x`` of shape ``[B, N, ...]`` along dim 1 into ``[B, N - r, ...]``.

        ``mode`` is a ``scatter_reduce`` reduction: ``sum`` (size-weighted merging works on
        ``x * size``), ``amax`` (masks, source maps) or ``mean``.
        """
        shape = x.shape
        x = x.reshape(shape[0], shape[1], -1)
        prefix, a, b = self._split(x)
        n, _, c = a.shape
        unm = a.gather(1, self.unm_idx[..., None].expand(n, -1, c))
        src = a.gather(1, self.src_idx[..., None].expand(n, -1, c))
        b = b.scatter_reduce(1, self.dst_idx[..., None].expand(n, -1, c), src, reduce=mode)
        out = torch.cat([prefix, unm, b], dim=1)
        return out.reshape(shape[0], out.shape[1], *shape[2:])

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
    with torch.no_grad():
        metric = metric[:, num_protected:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, a_offset::2], metric[:, 1 - a_offset::2]
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        src_idx = edge_idx[:, :r]
        unm_idx = edge_idx[:, r:].sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)
    return Merge(num_protected, a_offset, unm_idx, src_idx, dst_idx)


def merge_wavg(
    merge: Merge, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Size-weighted average merge of tokens ``x`` ``[B, N, C]``, sizes ``[B, N, 1]`` and,
    if traced, the source map ``[B, N, N0]`` in one gather/scatter pass.

    Source rows are one-hot over disjoint original tokens, so summing them equals the
    ``amax`` merge of the paper's code. The returned ``size`` and ``source`` are detached:
    they are functions of the matching indices only, so their gradient is zero anyway.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    c = x.shape[-1]
    parts = [x * size, size.to(x.dtype)]
    if source is not None:
        parts.append(source.to(x.dtype))
    merged = merge(torch.cat(parts, dim=-1), mode="sum")
    # Sizes and sources depend only on the (no-grad) matching, never on a parameter: detached,
    # they carry no autograd graph (no useless bias gradient in attention, deepcopy-able state).
    size = merged[..., c:c + 1].detach()
    x = merged[..., :c] / size
    source = merged[..., c + 1:].detach() if source is not None else None
    return x, size, source


def unmerge_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Spread merged tokens ``[B, N, C]`` back over the original layout ``[B, N0, C]``
    with the source map ``[B, N, N0]`` (each original token gets its merged token)."""
    return source.transpose(1, 2).to(x.dtype) @ x
