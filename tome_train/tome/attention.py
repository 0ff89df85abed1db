"""Attention on PyTorch's fused kernel, with proportional attention as an additive key bias.

Proportional attention (paper, eq. 1) adds ``log(size)`` of each key to the attention
logits, so a key that stands for ``s`` merged tokens weighs as ``s`` copies of itself:
``softmax(q k^T / sqrt(d) + log(s)) v``. As a per-key bias it goes to
``scaled_dot_product_attention`` as ``attn_mask`` and attention stays fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention


def additive_mask(
    attn_mask: torch.Tensor | None, num_tokens: int, is_causal: bool, device: torch.device | None = None
) -> torch.Tensor | None:
    """A caller's mask as a float bias ``[B|1, H|1, N, N]`` (bool True = may attend).

    ``is_causal`` builds a lower-triangular mask of ``num_tokens`` on ``device``.
    """
    if is_causal:
        attn_mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """``log(size)`` of every key as a bias ``[B, 1, 1, N]`` from sizes ``[B, N, 1]``."""
    return size.log()[:, None, None, :, 0]


PROP_ATTN_METHODS = ("auto", "bias", "values")
_HEAD_DIM_STEP = 8  # fused kernels want head dims in multiples of 8


def resolve_prop_attn_method(method: str, device: torch.device, dropout_p: float) -> str:
    """``auto``: ``values`` on CUDA, ``bias`` elsewhere. Attention dropout needs ``bias``: with
    ``values`` it would drop terms of the normalizer too."""
    if method == "auto":
        method = "values" if device.type == "cuda" else "bias"
    return "bias" if dropout_p > 0 else method


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    method: str = "auto",
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(Dh) + log(size) + attn_bias) v``.

    Args:
        q, k, v: ``[B, H, N, Dh]``.
        size: ``[B, N, 1]`` tokens held by each key; ``None`` is plain attention.
        attn_bias: an additive mask broadcastable to ``[B, H, N, N]``.
        method: ``bias``, ``values`` or ``auto`` (see the module docstring).

    Returns ``[B, H, N, Dh]``.
    """
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    if size is not None and resolve_prop_attn_method(method, q.device, dropout_p) == "bias":
        log_size = size_bias(size).to(q.dtype)
        attn_bias, size = (log_size if attn_bias is None else attn_bias + log_size), None
    if size is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p)
    B, H, N, head_dim = v.shape
    s = size.to(v.dtype)[:, None].expand(B, H, N, 1)
    pad = _HEAD_DIM_STEP - 1
    v = torch.cat([v * s, s, v.new_zeros(B, H, N, pad)], dim=-1)
    q, k = F.pad(q, (0, pad + 1)), F.pad(k, (0, pad + 1))  # zeros add nothing to q k^T
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=head_dim ** -0.5)
    return out[..., :head_dim] / out[..., head_dim:head_dim + 1]


class ToMeAttention(Attention):
    """timm ``Attention`` that also returns its keys (for the matching metric) and weighs keys by size."""

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        size: torch.Tensor | None = None,
        prop_attn_method: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, N, C]``, ``attn_bias`` broadcastable to ``[B, H, N, N]``, ``size`` ``[B, N, 1]``
        for proportional attention (by ``prop_attn_method``, see :func:`proportional_attention`).

        Returns the attention output ``[B, N, C]`` and the keys ``[B, H, N, Dh]`` (a view: a layer
        that merges averages them over heads, one that does not pays nothing for them).
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = proportional_attention(q, k, v, size, attn_bias, dropout_p, prop_attn_method)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, k
