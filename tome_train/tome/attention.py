"""Attention on PyTorch's fused kernel, with proportional attention as an additive key bias.

Proportional attention (paper, eq. 1) adds ``log(size)`` of each key to the attention
logits, so a key that stands for ``s`` merged tokens weighs as ``s`` copies of itself:
``softmax(q k^T / sqrt(d) + log(s)) v``. As a per-key bias ``[B, 1, 1, N]`` it goes to
``scaled_dot_product_attention`` as ``attn_mask`` and attention stays fused (cuDNN on an H100, the
flash kernel on a CPU); on a GPU, a Triton flash kernel that adds the bias per key
(:mod:`.triton_attention`) stands in where it measures faster for the shape. Measured on an
H100 and not taken (docs/performance.md), each slower than the mask: the same result as two unmasked
calls, ``softmax(q k^T) (s v) / softmax(q k^T) s``; the bias as one more head dimension of queries and
keys; FlexAttention with the bias as its score modification. Under ``torch.compile`` on a GPU, attention
is a custom op that runs that eager choice: one without a gradient (:func:`compiled_size_biased_attention`),
and with one an op and its backward op (:func:`compiled_trained_size_biased_attention`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers.attention import Attention

from . import kernels


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


def packed_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` ``[B, H, N, Dh]`` split from timm's packed projection ``qkv`` ``[B, N, 3 * H * Dh]`` as timm's
    ``Attention`` splits them (views)."""
    batch, tokens, width = qkv.shape
    # the head dim spelled out, not -1: an empty batch has no elements to infer it from
    return qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(Dh) + log(size) + attn_bias) v``.

    Args:
        q, k, v: ``[B, H, N, Dh]``.
        size: ``[B, N, 1]`` tokens held by each key; ``None`` is plain attention.
        attn_bias: an additive mask broadcastable to ``[B, H, N, N]``.
        qkv: the packed projection ``[B, N, 3 * H * Dh]`` that ``q, k, v`` are (:func:`packed_heads`), where they
            are: training on a GPU may then take the Triton kernels, which write the gradient in its layout.

    Returns ``[B, H, N, Dh]``.
    """
    if size is not None and attn_bias is None and not dropout_p and q.dtype in (torch.float16, torch.bfloat16):
        size = size[..., 0]  # the kernels take the log themselves: no launch for it here
        if not (torch.is_grad_enabled() and q.requires_grad):
            if _as_op(_size_biased_attention, q):
                return compiled_size_biased_attention(q, k, v, size)
            return _size_biased_attention(q, k, v, size)
        if qkv is not None:
            if _as_op(_trained_size_biased_attention, q):
                return compiled_trained_size_biased_attention(qkv, q.shape[1], size)[0]
            return _trained_size_biased_attention(qkv, q.shape[1], size)
        return _masked_attention(q, k, v, size)
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    if size is not None:
        log_size = size_bias(size).to(q.dtype)
        attn_bias = log_size if attn_bias is None else attn_bias + log_size
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Proportional attention through SDPA's mask: ``q, k, v`` ``[B, H, N, Dh]``, ``size`` ``[B, N]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=size.log().to(q.dtype)[:, None, None, :])


def _packed_masked_attention(qkv: torch.Tensor, num_heads: int, size: torch.Tensor) -> torch.Tensor:
    """:func:`_masked_attention` of the heads of timm's packed ``qkv`` ``[B, N, 3 * H * Dh]``."""
    return _masked_attention(*packed_heads(qkv, num_heads), size)


# Whether an attention result (the output, and with a gradient each input's gradient) is the expected one up to
# five units in the last place of the attention dtype (fp16 4.9e-3, bf16 3.9e-2; rtol and atol 1e-5 in fp32):
# flash kernels accumulate in fp32 but round the softmax weights to the input dtype before multiplying the
# values, each at its own point. A wrong kernel (a bias dropped, a key masked) is off by 0.1 and more.
same_attention = kernels.to_units_in_last_place(5, fp32_tolerance=(1e-5, 1e-5))


# On a GPU, in half precision, a flash kernel that adds the bias per key where it measures faster than the
# mask (see .kernels), without a gradient, and with one (checked and timed through the backward). In fp32
# its dots run without tensor cores and spill registers (ptxas for sm_90): SDPA's mask keeps that case.
_size_biased_attention = kernels.FastestPath(_masked_attention, "triton_attention.size_biased_attention",
                                             agree=same_attention)
_trained_size_biased_attention = kernels.FastestPath(
    _packed_masked_attention, "triton_attention.size_biased_attention_trainable", agree=same_attention,
    differentiable=True)


def _as_op(path: kernels.FastestPath, q: torch.Tensor) -> bool:
    """Whether ``torch.compile`` gets attention as a custom op running ``path``'s eager choice: on the devices
    where the path may choose a kernel (elsewhere inductor's own lowering of the mask loses nothing)."""
    return kernels.compiling_with_ops() and q.device.type in path.device_types


@torch.library.custom_op("tome_train::size_biased_attention", mutates_args=())
def compiled_size_biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor
) -> torch.Tensor:
    """Proportional attention without a gradient as ``torch.compile`` sees it on a GPU: one op that a compiled
    graph calls and does not trace, which runs the eager choice (the Triton kernel or SDPA's mask, measured per
    shape). Traced, SDPA's mask would be lowered by inductor to memory-efficient attention with the bias
    written out per query, ``[B, 1, N, N]`` in every layer (docs/performance.md), and the kernel never
    chosen. ``q, k, v`` ``[B, H, N, Dh]``, ``size`` ``[B, N]``; returns ``[B, H, N, Dh]`` laid out as
    ``[B, N, H, Dh]`` (both kernels write it so; merging the heads is then a view)."""
    out = _size_biased_attention(q, k, v, size)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@compiled_size_biased_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, _ = q.shape
    return q.new_empty(batch, tokens, heads, v.shape[-1]).transpose(1, 2)


def _kernels_chosen_to_train(qkv: torch.Tensor, num_heads: int, size: torch.Tensor) -> bool:
    """Whether the Triton kernels train proportional attention at these shapes (choosing first if they are new:
    through the backward, with respect to ``qkv``)."""
    path = _trained_size_biased_attention
    return path.pick(qkv.detach().requires_grad_(), num_heads, size) is not path.reference


@torch.library.custom_op("tome_train::trained_size_biased_attention", mutates_args=())
def compiled_trained_size_biased_attention(
    qkv: torch.Tensor, num_heads: int, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proportional attention with a gradient as ``torch.compile`` sees it on a GPU: this op and its backward
    (:func:`compiled_trained_size_biased_attention_backward`) run the eager choice for the shape, checked and
    timed through the backward (the Triton flash kernels or SDPA's mask). Traced, the mask would go to inductor's
    memory-efficient attention with the bias written out per query, and the kernels never chosen.

    ``qkv`` timm's packed projection ``[B, N, 3 * H * Dh]`` (:func:`packed_heads`), ``size`` ``[B, N]`` (no
    gradient). Returns the output ``[B, H, N, Dh]`` laid out as ``[B, N, H, Dh]``, and each row's log-sum-exp,
    fp32 ``[B, H, N]``, for the kernels' backward (zeros where the mask was chosen, whose backward recomputes its
    forward)."""
    if not _kernels_chosen_to_train(qkv, num_heads, size):
        out = _packed_masked_attention(qkv, num_heads, size).transpose(1, 2).contiguous().transpose(1, 2)
        return out, qkv.new_zeros(qkv.shape[0], num_heads, qkv.shape[1], dtype=torch.float32)
    from .triton_attention import size_biased_attention_forward

    return size_biased_attention_forward(qkv, num_heads, size)


@compiled_trained_size_biased_attention.register_fake
def _(qkv: torch.Tensor, num_heads: int, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, width = qkv.shape
    return (qkv.new_empty(batch, tokens, num_heads, width // (3 * num_heads)).transpose(1, 2),
            qkv.new_empty(batch, num_heads, tokens, dtype=torch.float32))


@torch.library.custom_op("tome_train::trained_size_biased_attention_backward", mutates_args=())
def compiled_trained_size_biased_attention_backward(
    qkv: torch.Tensor, num_heads: int, size: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor
) -> torch.Tensor:
    """The gradient of ``qkv`` (contiguous, its shape) of :func:`compiled_trained_size_biased_attention` by the
    forward's choice for the shape. Where that was the mask, autograd through it, recomputing the forward: the
    choice keeps the mask only where the kernels are slower or disagree, which a GPU run reports."""
    if _kernels_chosen_to_train(qkv, num_heads, size):
        from .triton_attention import size_biased_attention_backward

        return size_biased_attention_backward(qkv, num_heads, size, out, lse, grad_out)
    with kernels.autograd_recording():
        leaf = qkv.detach().requires_grad_()
        (grad,) = torch.autograd.grad(_packed_masked_attention(leaf, num_heads, size), leaf, grad_out)
    return grad.contiguous()


@compiled_trained_size_biased_attention_backward.register_fake
def _(qkv: torch.Tensor, num_heads: int, size: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
      grad_out: torch.Tensor) -> torch.Tensor:
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _setup_compiled_attention(ctx, inputs: tuple, output: tuple) -> None:
    qkv, ctx.num_heads, size = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(qkv, size, *output)


def _compiled_attention_backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
    qkv, size, out, lse = ctx.saved_tensors
    return compiled_trained_size_biased_attention_backward(qkv, ctx.num_heads, size, out, lse, grad_out), None, None


compiled_trained_size_biased_attention.register_autograd(_compiled_attention_backward,
                                                         setup_context=_setup_compiled_attention)


class ToMeAttention(Attention):
    """timm ``Attention`` that also returns its keys (for the matching metric) and weighs keys by size."""

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        size: torch.Tensor | None = None,
        while_attending: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, N, C]``, ``attn_bias`` broadcastable to ``[B, H, N, N]``, ``size`` ``[B, N, 1]``
        for proportional attention; ``while_attending`` is called with the keys as soon as they exist, before
        attention is queued (a merging block may plan its merge on them on a second stream meanwhile).

        Returns the attention output ``[B, N, C]`` and the keys ``[B, H, N, Dh]`` (a view: a layer
        that merges averages them over heads, one that does not pays nothing for them).
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)
        q, k, v = packed_heads(qkv, self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if while_attending is not None:
            while_attending(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        unnormed = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        x = proportional_attention(q, k, v, size, attn_bias, dropout_p, qkv if unnormed else None)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, k
