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


class ToMeAttention(Attention):
    """timm ``Attention`` that also returns its keys (for the matching metric) and takes an additive bias."""

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, N, C]``, ``attn_bias`` broadcastable to ``[B, H, N, N]``.

        Returns the attention output ``[B, N, C]`` and the keys ``[B, H, N, Dh]`` (a view: a layer
        that merges averages them over heads, one that does not pays nothing for them).
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, k
