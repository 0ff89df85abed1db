"""Proportional attention against the explicit formula in float64, and the fp32 floor of the matching scores."""
from __future__ import annotations

import pytest
import torch
from attention_inputs import H as PACKED_HEADS
from attention_inputs import packed

from tome_train.tome import bipartite_soft_matching
from tome_train.tome.attention import additive_mask, packed_heads, proportional_attention

B, H, N, DH = 2, 3, 11, 8


def explicit(q, k, v, size, attn_bias=None):
    """``softmax(q k^T / sqrt(Dh) + log(size) + attn_bias) v``, written out."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + size.log()[:, None, None, :, 0]
    if attn_bias is not None:
        logits = logits + attn_bias
    return torch.softmax(logits, dim=-1) @ v


def inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, DH, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    size = torch.randint(1, 9, (B, N, 1), generator=g).to(dtype)
    return q, k, v, size


def caller_mask():
    """Each query may attend to a different random subset of keys (always to itself)."""
    g = torch.Generator().manual_seed(7)
    allowed = (torch.rand(B, 1, N, N, generator=g) > 0.4) | torch.eye(N, dtype=torch.bool)
    return additive_mask(allowed, N, is_causal=False).double()


@pytest.mark.parametrize("masked", [False, True])
def test_equals_explicit_formula_float64(masked):
    q, k, v, size = inputs()
    bias = caller_mask() if masked else None
    out = proportional_attention(q, k, v, size, bias)
    expected = explicit(q, k, v, size, bias)
    assert (out - expected).abs().max() <= 1e-12
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for got, want in zip(grads, expected_grads):
        assert (got - want).abs().max() <= 1e-12
    plain = proportional_attention(q, k, v, None, bias)
    assert (out - plain).abs().max() > 1e-2  # the sizes matter


def test_a_key_of_size_s_counts_as_s_copies():
    q, k, v, _ = (t.detach() for t in inputs(seed=2))
    size = torch.ones(B, N, 1, dtype=torch.float64)
    size[:, 3] = 4
    repeat = torch.tensor([0, 1, 2] + [3] * 4 + list(range(4, N)))
    copies = proportional_attention(q, k[:, :, repeat], v[:, :, repeat], None)
    assert (proportional_attention(q, k, v, size) - copies).abs().max() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matching_scores_in_fp32_for_half_precision_keys(dtype):
    # Set A is tokens 2 and 4, set B tokens 1 and 3 (token 0, the class token, is protected). Token 2
    # against tokens 1 and 3: cosine 0.99980 and 0.99995. In half precision both normalize to the same
    # score and the first would win; in fp32 the second does.
    metric = torch.zeros(1, 5, 2)
    metric[0, 0] = torch.tensor([0.3, 0.3])
    metric[0, 1] = torch.tensor([1.0, 0.02])
    metric[0, 2] = torch.tensor([1.0, 0.0])
    metric[0, 3] = torch.tensor([1.0, 0.01])
    metric[0, 4] = torch.tensor([-1.0, 0.5])
    half = metric.to(dtype)
    normed = half / half.norm(dim=-1, keepdim=True)
    assert normed[0, 2] @ normed[0, 1] == normed[0, 2] @ normed[0, 3]  # the tie half precision makes
    merge = bipartite_soft_matching(half, r=1, num_protected=1)
    assert merge.src_idx.tolist() == [[0]] and merge.dst_idx.tolist() == [[1]]
    assert bipartite_soft_matching(metric.double(), r=1).dst_idx.tolist() == [[1]]


@pytest.fixture
def probe(load_script):
    return load_script("attention_probe")


def test_probe_variants_compute_proportional_attention(probe):
    """scripts/attention_probe.py times other ways to the same result: each must be that result."""
    q, k, v, size = (t.detach().float() for t in inputs(seed=4))
    expected = explicit(q.double(), k.double(), v.double(), size.double()).float()
    qkv = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * DH)  # timm's packed layout
    for name, (attend, backend) in probe.VARIANTS.items():
        if name.startswith("plain") or backend is not None:  # plain ignores sizes; forced backends are CUDA kernels
            continue
        assert (attend(qkv, H, size) - expected).abs().max() <= 1e-5, name
    for spec in ("32x16", "32x16/16x32"):
        assert (probe.triton_blocks(spec)(qkv, H, size) - expected).abs().max() <= 1e-5, spec


@pytest.mark.parametrize("spec", ["64", "64x", "8x16", "48x32", "64x32x2", "64x32/64", "64x32/64x32/16x16"])
def test_probe_refuses_a_block_spec_that_is_not_two_powers_of_two(spec, probe, capsys):
    with pytest.raises(SystemExit) as exit_:
        probe.main(["--device", "cpu", "--blocks", spec])
    assert exit_.value.code == 2
    assert f"{spec!r} is not MxN or MxN/OxI with powers of two from 16" in capsys.readouterr().err


def test_probe_writes_a_row_per_variant_token_count_and_mode(probe, tmp_path):
    import json

    out = tmp_path / "probe.json"
    variants = list(probe.VARIANTS)
    # one warm-up call: the compiled variants compile there, not in the timed step
    probe.main(["--device", "cpu", "--batch-size", "1", "--heads", "2", "--head-dim", "8", "--tokens", "9", "5",
                "--warmup", "1", "--steps", "1", "--host-calls", "1", "--variants", *variants, "--blocks", "16x16",
                "16x16/16x16", "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == (len(variants) + 2) * 2 * 2
    assert [row["variant"] for row in rows[:len(variants) + 2]] == [*variants, "triton_16x16", "triton_16x16/16x16"]
    for row in rows:
        if row["variant"] in ("bias_cudnn", "bias_efficient", "values_cudnn"):
            assert "error" in row  # no such kernel for a CPU tensor: said in the row, the probe goes on
        else:
            assert row["ms"] > 0 and row["host_us"] > 0 and row["vs_plain"] > 0


@pytest.mark.parametrize("kernels_win", [False, True])
def test_compiled_training_attention_is_an_op_pair_running_the_eager_choice(monkeypatch, kernels_win):
    """With a gradient on a GPU, ``torch.compile`` gets proportional attention as an op and its backward op, which
    run the eager choice made through the backward (here on the CPU in fp16, the Triton kernels by Triton's
    interpreter): the choice is made inside the compiled graph's first call, the ops pass
    ``torch.library.opcheck`` (declared layouts, gradients through the backward op), one dynamic graph serves
    every token count, and output and gradients are the eager choice's, kernels' or mask's (whose backward
    recomputes its forward)."""
    from torch._dynamo.utils import counters

    from tome_train.tome import attention
    from tome_train.tome import kernels
    from tome_train.tome.kernels import FastestPath
    from tome_train.tome.triton_attention import size_biased_attention_trainable

    path = FastestPath(attention._packed_masked_attention, size_biased_attention_trainable, device_types=("cpu",),
                       agree=attention.same_attention, differentiable=True)
    monkeypatch.setattr(attention, "_trained_size_biased_attention", path)
    winner = size_biased_attention_trainable if kernels_win else attention._packed_masked_attention
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 0.0 if fn.__wrapped__ is winner else 1.0)
    op = attention.compiled_trained_size_biased_attention

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda qkv, size: op(qkv, PACKED_HEADS, size)[0] * 2, fullgraph=True,
                             dynamic=True)
    for num_tokens in (9, 7, 5):
        qkv, size = packed(num_tokens, 16, torch.float16, seed=num_tokens)
        qkv.requires_grad_()
        out = compiled(qkv, size)
        assert out.transpose(1, 2).is_contiguous()  # [B, N, H, Dh] in memory: merging the heads is a view
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).half()
        (grad,) = torch.autograd.grad(out, qkv, grad_out)
        eager_qkv = qkv.detach().clone().requires_grad_()
        expected = winner(eager_qkv, PACKED_HEADS, size) * 2
        (expected_grad,) = torch.autograd.grad(expected, eager_qkv, grad_out)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert not path.broken and len(path.choices) == 3 and set(path.choices.values()) == {winner}
    qkv, size = packed(6, 16, torch.float16)
    qkv.requires_grad_()
    torch.library.opcheck(op, (qkv, PACKED_HEADS, size))


def test_compiled_attention_is_one_op_the_compiler_calls_and_does_not_trace():
    """Without a gradient on a GPU, ``torch.compile`` gets proportional attention as one custom op that runs the
    eager choice (here on the CPU, in bf16): its declared layout is the real one (``torch.library.opcheck``), a
    graph with it compiles once for every token count (dynamic) and without a break, and gives the eager
    result."""
    from torch._dynamo.utils import counters

    from tome_train.tome import attention

    op = attention.compiled_size_biased_attention
    qkv, size = packed(9, 16, torch.bfloat16)
    torch.library.opcheck(op, (*packed_heads(qkv, PACKED_HEADS), size))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda *args: op(*args) * 2, fullgraph=True, dynamic=True)
    for num_tokens in (9, 7, 5):
        qkv, size = packed(num_tokens, 16, torch.bfloat16, seed=num_tokens)
        args = (*packed_heads(qkv, PACKED_HEADS), size)
        out = compiled(*args)
        assert out.transpose(1, 2).is_contiguous()  # [B, N, H, Dh] in memory: merging the heads is a view
        torch.testing.assert_close(out, attention._masked_attention(*args) * 2, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1
