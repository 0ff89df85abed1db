"""Attention inputs as a ToMe block has them, for the attention tests: timm's packed projection and sizes."""
from __future__ import annotations

import torch

B, H = 2, 2  # images, heads


def packed(num_tokens: int, head_dim: int, dtype: torch.dtype = torch.float32, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's packed projection ``qkv`` ``[B, N, 3 * H * D]`` and sizes ``[B, N]`` from 1 to 8."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, num_tokens, 3 * H * head_dim, generator=g).to(dtype)
    return qkv, torch.randint(1, 9, (B, num_tokens), generator=g).float()
