"""The Triton proportional-attention kernel (run here by Triton's interpreter, which ``tests/conftest.py``
turns on) against the explicit formula in float64, SDPA, and the meaning of a key's size."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tome_train.tome.triton_attention import proportional_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

B, H = 2, 2


def packed_qkv(num_tokens: int, head_dim: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``q, k, v`` ``[B, H, N, D]`` as timm makes them (strided views of one qkv ``[B, N, 3 * H * D]``) and
    log sizes ``[B, N]`` of sizes 1-8."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, num_tokens, 3 * H * head_dim, generator=g).to(dtype)
    q, k, v = qkv.reshape(B, num_tokens, 3, H, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    log_size = torch.randint(1, 9, (B, num_tokens), generator=g).float().log()
    return q, k, v, log_size


def explicit(q, k, v, log_size, scale):
    """``softmax(q k^T * scale + log_size) v`` written out in float64."""
    q, k, v, log_size = (t.double() for t in (q, k, v, log_size))
    return ((q @ k.transpose(-1, -2)) * scale + log_size[:, None, None, :]).softmax(-1) @ v


@pytest.mark.parametrize("num_tokens,head_dim,blocks", [
    (1, 16, {}), (7, 64, {}), (37, 16, {}),
    (70, 64, {}),  # 70 keys: two key blocks of 64, the second mostly masked
    (37, 16, {"block_m": 16, "block_n": 16}),  # three query blocks and three key blocks
    (7, 8, {}), (37, 24, {}), (9, 80, {}),  # head dims padded in the kernel: to 16, 32 and ViT-H's 80 to 128
])
def test_fp32_equals_the_formula(num_tokens, head_dim, blocks):
    """Within 1e-5 (measured <= 7.3e-7)."""
    q, k, v, log_size = packed_qkv(num_tokens, head_dim)
    scale = head_dim ** -0.5
    out = proportional_attention(q, k, v, log_size, scale, **blocks)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), explicit(q, k, v, log_size, scale), rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_tokens,head_dim", [(7, 64), (70, 64)])
def test_fp16_within_rounding_of_the_formula(num_tokens, head_dim):
    """Against float64 on the same fp16 inputs: what remains is the rounding of the softmax weights before
    the second matmul and of the output (eps 2**-11 on outputs |x| < ~2), 2e-3 (measured <= 7.1e-4).
    Not bf16: the interpreter multiplies bf16's bit patterns in ``tl.dot`` (triton-lang/triton#11584)."""
    q, k, v, log_size = packed_qkv(num_tokens, head_dim, torch.float16)
    scale = head_dim ** -0.5
    out = proportional_attention(q, k, v, log_size, scale)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), explicit(q, k, v, log_size, scale), rtol=0, atol=2e-3)


def test_zero_bias_is_plain_attention():
    q, k, v, log_size = packed_qkv(37, 16)
    out = proportional_attention(q, k, v, torch.zeros_like(log_size), 16 ** -0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_strided_views_read_as_their_contiguous_copies():
    """Bit for bit, from timm's packed qkv and with q, k and v each in its own layout (read by its own strides)."""
    q, k, v, log_size = packed_qkv(70, 16, torch.float16)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = proportional_attention(q, k, v, log_size, 0.25)
    assert torch.equal(out, proportional_attention(q.contiguous(), k.contiguous(), v.contiguous(), log_size, 0.25))
    tokens_first = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(out, proportional_attention(q.contiguous(), k, tokens_first, log_size, 0.25))


def test_output_memory_is_tokens_then_heads():
    q, k, v, log_size = packed_qkv(7, 16)
    out = proportional_attention(q, k, v, log_size, 0.25)
    assert out.shape == (B, H, 7, 16)
    assert out.transpose(1, 2).is_contiguous()


def test_a_key_of_size_s_counts_as_s_identical_keys():
    """Keys of sizes 1-3 with their log-size bias against the same keys repeated size times with none;
    the repeated run has more tokens, so more queries, of which the first ``N`` are the same."""
    num_tokens, head_dim = 20, 16
    q, k, v, _ = packed_qkv(num_tokens, head_dim, seed=1)
    sizes = torch.randint(1, 4, (num_tokens,), generator=torch.Generator().manual_seed(2))
    total = int(sizes.sum())
    assert total > num_tokens  # some key holds more than one token
    log_size = sizes.float().log().expand(B, num_tokens).contiguous()
    out = proportional_attention(q, k, v, log_size, 0.25)

    extra_queries = torch.randn(B, H, total - num_tokens, head_dim, generator=torch.Generator().manual_seed(3))
    q_rep = torch.cat([q, extra_queries], dim=2)
    k_rep, v_rep = (t.repeat_interleave(sizes, dim=2) for t in (k, v))
    out_rep = proportional_attention(q_rep, k_rep, v_rep, torch.zeros(B, total), 0.25)
    torch.testing.assert_close(out, out_rep[:, :, :num_tokens], rtol=0, atol=1e-5)


def test_the_library_stands_the_kernel_against_the_mask_without_a_gradient(monkeypatch):
    """``proportional_attention`` without a gradient goes through the kernel's FastestPath (PyTorch's mask on
    the CPU, bit for bit the mask it always used); the kernel agrees with the mask by the path's own check,
    and a choice on a CPU stand-in path runs it; with a gradient the mask is used and the path is not asked."""
    from tome_train.tome import attention
    from tome_train.tome.kernels import FastestPath
    from tome_train.tome.triton_attention import size_biased_attention

    q, k, v, log_size = packed_qkv(37, 16, seed=3)
    size = log_size.exp()[..., None]
    mask = attention.size_bias(size)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.no_grad():
        assert torch.equal(attention.proportional_attention(q, k, v, size), expected)
    assert attention._size_biased_attention.candidate == "triton_attention.size_biased_attention"
    assert attention._size_biased_attention._load() is size_biased_attention

    args = (q, k, v, log_size)
    assert attention.same_attention(args, attention._masked_attention(*args), size_biased_attention(*args))
    assert not attention.same_attention(args, attention._masked_attention(*args), size_biased_attention(*args) + 1e-4)
    half = tuple(t.half() for t in args)  # in fp16 the check allows rounding, not a kernel that drops the bias
    dropped = torch.nn.functional.scaled_dot_product_attention(*half[:3])
    assert attention.same_attention(half, attention._masked_attention(*half), size_biased_attention(*half))
    assert not attention.same_attention(half, attention._masked_attention(*half), dropped)
    on_cpu = FastestPath(attention._masked_attention, size_biased_attention, device_types=("cpu",),
                         agree=attention.same_attention)
    monkeypatch.setattr(attention, "_size_biased_attention", on_cpu)
    with torch.no_grad():
        torch.testing.assert_close(attention.proportional_attention(q, k, v, size), expected, rtol=0, atol=1e-5)
    assert len(on_cpu.choices) == 1
    on_cpu.choices.clear()
    q.requires_grad_()
    out = attention.proportional_attention(q, k, v, size)  # training: SDPA, whose backward the kernel lacks
    assert out.requires_grad and on_cpu.choices == {}
    out.sum().backward()
    assert q.grad is not None
